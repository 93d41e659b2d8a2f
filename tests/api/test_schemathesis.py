"""schemathesis over the whole OpenAPI schema against a live console (real server, worker, Redis, agents,
a token of a user who may do everything the API offers): no 5xx, every response matching its schema
and its documented status codes and content types, auth enforced, bad input rejected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from api.tokens import do_create_token
from tests.api.conftest import WRITER
from tests.conftest import log_path
from tests.factories import make_user
from tests.migrations_app.guests import place_vm

pytestmark = [pytest.mark.schemathesis, pytest.mark.django_db(transaction=True)]

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


@pytest.mark.timeout(900)  # every operation of the schema, 25 examples each: 480 s seen at load 15
def test_it_passes_schemathesis_over_the_whole_schema(host_agents, fleet, live_console, tmp_path):
    place_vm(host_agents, fleet)  # something real to find, migrate and cancel
    token = do_create_token(make_user("fuzzer", permissions=WRITER), "schemathesis")[1]
    log = log_path("schemathesis")
    log.parent.mkdir(parents=True, exist_ok=True)

    result = subprocess.run(
        [
            str(SCHEMATHESIS),
            "run",
            f"{live_console}/api/v1/openapi.json",
            "--url",
            live_console,
            "--header",
            f"Authorization: Bearer {token}",
            "--checks",
            "all",
            "--max-examples",
            "25",
            "--workers",
            "1",
            "--seed",
            "14",
            "--report-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )

    log.write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
