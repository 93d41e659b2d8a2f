"""Run the tests marked ``postgres`` a second time, on PostgreSQL.

Uses TEST_POSTGRES_URL (default: the local server, user postgres). When no
PostgreSQL answers, says so loudly and exits 0, unless MATRIXOE_NO_SKIPS=1
(CI), where a missing PostgreSQL is a failure.
"""

import os
import subprocess
import sys

import psycopg

URL = os.environ.get("TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres")


def postgres_answers() -> bool:
    try:
        with psycopg.connect(URL.rsplit("/", 1)[0] + "/postgres", connect_timeout=3):
            return True
    except psycopg.Error:
        return False


def main() -> int:
    if not postgres_answers():
        message = f"PostgreSQL tests SKIPPED: no PostgreSQL answers on {URL} (set TEST_POSTGRES_URL)."
        print("\n" + "!" * len(message) + "\n" + message + "\n" + "!" * len(message))
        return 1 if os.environ.get("MATRIXOE_NO_SKIPS") == "1" else 0
    env = dict(os.environ, TEST_DATABASE="postgres", TEST_POSTGRES_URL=URL)
    return subprocess.call([sys.executable, "-m", "pytest", "-m", "postgres", "-q"], env=env)


if __name__ == "__main__":
    sys.exit(main())
