"""A bench's own console settings, set before Django is imported: nothing shared with a running console.

``isolated_console`` gives the bench's processes (and the bench itself) a throwaway SQLite database in a
new work directory (``BENCH_DATABASE_URL`` overrides it, e.g. a PostgreSQL database made beforehand),
their own Celery queue and Channels prefix on the machine's Redis, and production settings.
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent


def isolated_console(prefix: str, **settings: str) -> Path:
    """Set the environment for a private console (``settings``: more variables); returns the work dir."""
    work_dir = Path(tempfile.mkdtemp(prefix=prefix))
    run_id = secrets.token_hex(4)
    os.environ.update(
        DJANGO_SETTINGS_MODULE="matrixoe.settings",
        DATABASE_URL=os.environ.get("BENCH_DATABASE_URL", f"sqlite:///{work_dir / 'bench.sqlite3'}"),
        CELERY_QUEUE=f"bench-{run_id}",
        CHANNELS_PREFIX=f"bench-{run_id}",
        LOG_LEVEL="WARNING",
        **settings,
    )
    if str(BASE_DIR) not in sys.path:
        sys.path.insert(0, str(BASE_DIR))
    return work_dir
