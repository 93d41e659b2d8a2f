"""The real ``matrixoe`` command (installed in the virtualenv by ``make``) against a live console:
real server, worker, Redis and host agents; each run in a subprocess with its own config directory."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from api.tokens import do_create_token
from migrations_app.models import Migration
from tests.api.conftest import WRITER, ApiClient
from tests.factories import make_user, make_vm, make_vsp
from tests.migrations_app.guests import place_vm
from vms.models import VSP

pytestmark = pytest.mark.django_db(transaction=True)

MATRIXOE = Path(sys.executable).parent / "matrixoe"
# The command's code from this checkout, whichever checkout the virtualenv's editable install points at.
SOURCE = {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def matrixoe(config_dir: Path, *args: str, env: dict | None = None, timeout: float = 120):
    assert MATRIXOE.exists(), f"{MATRIXOE} missing: `make` installs it (pip install -e . --no-deps)"
    environment = {k: v for k, v in os.environ.items() if k not in ("MATRIXOE_URL", "MATRIXOE_TOKEN")} | {
        "MATRIXOE_CONFIG_DIR": str(config_dir),
        "COLUMNS": "160",
        **SOURCE,
        **(env or {}),
    }
    return subprocess.run(
        [str(MATRIXOE), *args], capture_output=True, text=True, env=environment, timeout=timeout
    )


@pytest.fixture
def token():
    return do_create_token(make_user("alice", permissions=WRITER), "cli")[1]


@pytest.fixture
def logged_in(tmp_path, live_console, token) -> Path:
    result = matrixoe(tmp_path, "login", live_console, "--token", token)
    assert result.returncode == 0, result.stderr
    return tmp_path


def test_it_logs_in_and_keeps_the_token_readable_by_the_user_only(logged_in, token):
    login_file = logged_in / "login.json"

    assert stat.S_IMODE(login_file.stat().st_mode) == 0o600
    assert json.loads(login_file.read_text())["token"] == token


def test_it_refuses_a_wrong_token_at_login(tmp_path, live_console):
    result = matrixoe(tmp_path, "login", live_console, "--token", "moe_wrong")

    assert result.returncode == 1
    assert "Login refused" in result.stderr
    assert not (tmp_path / "login.json").exists()


def test_it_migrates_with_watch_showing_four_phases_at_100_and_the_new_vsp(host_agents, fleet, logged_in):
    vm = place_vm(host_agents, fleet, memory_mib=16, fill_percent=30)

    result = matrixoe(logged_in, "migrate", vm.name, "--to", "hostb", "--watch")

    assert result.returncode == 0, result.stdout + result.stderr
    for label in ("Init", "Copy", "I/O Quiesce", "Frozen"):
        assert any(
            line.split() and line.startswith(label) and line.rstrip().endswith("100%")
            for line in result.stdout.splitlines()
        ), (label, result.stdout)
    assert f"{vm.name} now runs on VSP hostb." in result.stdout
    status = matrixoe(logged_in, "status", vm.name)
    assert "VSP:" in status.stdout and "hostb" in status.stdout.split("VSP:")[1].splitlines()[0]
    history = json.loads(matrixoe(logged_in, "history", vm.name, "--json").stdout)
    assert [(m["target"], m["state"]["value"]) for m in history] == [("hostb", "completed")]


def test_watch_on_an_80_column_terminal_cuts_off_nothing(host_agents, fleet, logged_in):
    """QA: at 80 columns the bars' statistics row was cut off with "…" (rich fits a table row to the
    width); the statistics now wrap under the bars. TTY_COMPATIBLE=1: rich draws as on a terminal."""
    vm = place_vm(host_agents, fleet, memory_mib=16, fill_percent=30)

    terminal = {"COLUMNS": "80", "TTY_COMPATIBLE": "1"}
    result = matrixoe(logged_in, "migrate", vm.name, "--to", "hostb", "--watch", env=terminal)

    assert result.returncode == 0, result.stdout + result.stderr
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "\n", result.stdout)
    assert "━" in shown, shown  # the bars were drawn: the terminal path, not the log lines
    assert "…" not in shown, shown
    assert re.search(r"throughput\s+[\d.]+\s+MiB/s\s+·\s+downtime\s+\d+\s+ms", shown), shown
    assert f"{vm.name} now runs on VSP hostb." in shown
    assert max(len(line) for line in shown.splitlines()) <= 80, shown


def test_it_exits_non_zero_with_the_refusals_words(host_agents, fleet, logged_in):
    vm = place_vm(host_agents, fleet)

    result = matrixoe(logged_in, "migrate", vm.name, "--to", "hosta", "--watch")

    assert result.returncode == 1
    assert f"{vm.name} cannot migrate to hosta: same host." in result.stderr
    # Nothing started, and the refused attempt is in the history (it was rolled back with the API's
    # transaction: issue 18 item 5), for the console's pages and the command alike.
    refused = Migration.objects.get(vm=vm)
    assert (refused.state, refused.requested_by.username, refused.target.name) == (
        "refused",
        "alice",
        "hosta",
    )
    history = matrixoe(logged_in, "history", vm.name)
    assert history.returncode == 0 and re.search(rf"{vm.name}\s.*hosta\s.*alice\s.*Refused", history.stdout)


def test_it_lists_as_json_with_the_environment_overriding_the_stored_login(
    host_agents, fleet, tmp_path, live_console, token
):
    env = {"MATRIXOE_URL": live_console, "MATRIXOE_TOKEN": token}

    vsps = matrixoe(tmp_path, "vsps", "--json", env=env)
    vms = matrixoe(tmp_path, "vms", "--vsp", "hostc", "--json", env=env)
    unknown = matrixoe(tmp_path, "vms", "--vsp", "nowhere", env=env)

    assert [v["name"] for v in json.loads(vsps.stdout)] == ["hosta", "hostb", "hostc"]
    assert json.loads(vms.stdout) == []
    assert unknown.returncode == 1 and "No VSP with the id or name 'nowhere'." in unknown.stderr
    assert matrixoe(tmp_path, "vsps").returncode == 1  # nothing stored, no environment: not logged in


def test_it_cancels_a_running_migration_and_says_so(host_agents, fleet, logged_in, wait_for):
    vm = place_vm(host_agents, fleet, memory_mib=64, fill_percent=100)  # a long Copy at the capped bandwidth

    started = json.loads(matrixoe(logged_in, "migrate", vm.name, "--to", "hostb", "--json").stdout)
    cancelled = matrixoe(logged_in, "cancel", vm.name)

    assert cancelled.returncode == 0, cancelled.stderr
    assert f"Cancel of the migration of {vm.name} requested" in cancelled.stdout
    assert wait_for(lambda: Migration.objects.get(pk=started["id"]).state == "cancelled", timeout=60)
    again = matrixoe(logged_in, "cancel", vm.name)
    assert again.returncode == 1
    assert f"Nothing to cancel: {vm.name} has no queued or running migration." in again.stderr


def test_it_starts_one_forecast_not_to_converge_and_prints_why_as_a_warning(
    host_agents, fleet, logged_in, wait_for
):
    """The dialog asks first; the command starts it, as the API does, and says why on stderr."""
    capped = {"preset": "custom", "bandwidth_cap_mb_s": 5}
    hot = place_vm(
        host_agents,
        fleet,
        memory_mib=8,
        dirty_pages_per_s=3000,
        fill_percent=100,
        vm_fields={"migration_policy": capped},
    )

    result = matrixoe(logged_in, "migrate", hot.name, "--to", "hostc")

    assert result.returncode == 0, result.stderr
    assert "Migration " in result.stdout and "queued" in result.stdout
    assert result.stderr.startswith(f"Warning: {hot.name} will not converge to hostc under this policy: "), (
        result.stderr
    )
    assert matrixoe(logged_in, "cancel", hot.name).returncode == 0
    assert wait_for(lambda: not Migration.objects.get(vm=hot).is_active, timeout=60)


def test_it_exits_non_zero_with_the_alert_when_the_watched_migration_is_cancelled(
    host_agents, fleet, logged_in, wait_for
):
    vm = place_vm(host_agents, fleet, memory_mib=64, fill_percent=100)  # a long Copy at the capped bandwidth
    environment = os.environ | {"MATRIXOE_CONFIG_DIR": str(logged_in), "COLUMNS": "160", **SOURCE}
    watching = subprocess.Popen(
        [str(MATRIXOE), "migrate", vm.name, "--to", "hostb", "--watch"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in environment.items() if k not in ("MATRIXOE_URL", "MATRIXOE_TOKEN")},
    )
    try:
        assert wait_for(lambda: Migration.objects.filter(vm=vm, state="copy").exists(), timeout=60)
        assert matrixoe(logged_in, "cancel", vm.name).returncode == 0
        stdout, stderr = watching.communicate(timeout=120)
    finally:
        watching.kill()

    assert watching.returncode == 1, stdout + stderr
    assert "Cancelled by alice during the Copy phase. The VM keeps running on hosta." in stderr


def test_it_shows_an_evacuation_plan_and_refuses_to_start_one_where_nothing_can_leave(logged_in):
    src = make_vsp("evac-src", memory_mib=16384)
    make_vsp("evac-big", memory_mib=1000)
    make_vm("evac-g700", vsp=src, memory_mib=700)
    make_vm("evac-vpar", vsp=src, kind="vpar", memory_mib=64)
    only_vpar = make_vsp("evac-lonely", memory_mib=256)  # too small to take evac-g700
    make_vm("evac-vpar2", vsp=only_vpar, kind="vpar", memory_mib=64)

    plan = matrixoe(logged_in, "evacuate", "evac-src", "--plan-only", "--json")
    refused = matrixoe(logged_in, "evacuate", "evac-lonely")

    assert plan.returncode == 0, plan.stderr
    steps = json.loads(plan.stdout)["steps"]
    assert [(step["vm"], step["target"]) for step in steps] == [("evac-g700", "evac-big")]
    assert refused.returncode == 1
    assert "Nothing on evac-lonely can leave." in refused.stderr
    assert not VSP.objects.get(name="evac-src").maintenance


def test_the_plan_table_says_which_guest_will_not_converge_and_it_starts_only_confirmed(
    host_agents, fleet, logged_in, wait_for
):
    """A guest writing 20 MB/s (measured by its real agent) under a 10 MB/s policy cap: the plan's JSON has
    the verdict, the table its words; ``evacuate`` refuses with the reason, ``--confirm`` starts it."""
    from evacuations.actions import do_cancel_evacuation
    from evacuations.models import Evacuation
    from tests.factories import MIGRATION_ADMIN_PERMISSIONS, make_migration

    hosta = fleet["hosta"]
    capped = {"preset": "custom", "bandwidth_cap_mb_s": 10}
    vm = place_vm(
        host_agents,
        fleet,
        memory_mib=16,
        fill_percent=50,
        dirty_pages_per_s=5000,
        vm_fields={"migration_policy": capped},
    )
    earlier = make_vm("cli-earlier", vsp=fleet["hostb"], memory_mib=16, hardware_status="off")
    for target in (fleet["hostb"], fleet["hostc"]):
        make_migration(earlier, hosta, target, state="completed", throughput_bytes_s=50_000_000)

    plan = matrixoe(logged_in, "evacuate", "hosta", "--plan-only", "--json")
    table = matrixoe(logged_in, "evacuate", "hosta", "--plan-only")
    refused = matrixoe(logged_in, "evacuate", "hosta")

    assert plan.returncode == 0, plan.stderr
    step = json.loads(plan.stdout)["steps"][0]
    assert (step["vm"], step["verdict"]) == (vm.name, "will_not_converge")
    assert table.returncode == 0, table.stderr
    words = " ".join(re.sub(r"[│┃|]", " ", table.stdout).split())
    assert "(will not converge under this policy" in words, words
    assert refused.returncode == 1
    assert f"{vm.name} will not converge under this policy: change its migration policy" in refused.stderr
    assert not Evacuation.objects.exists()

    started = matrixoe(logged_in, "evacuate", "hosta", "--confirm", vm.name, "--json")
    assert started.returncode == 0, started.stderr
    evacuation = Evacuation.objects.get()
    assert json.loads(started.stdout)["id"] == evacuation.pk
    do_cancel_evacuation(evacuation, make_user("canceller", MIGRATION_ADMIN_PERMISSIONS))
    assert wait_for(lambda: Evacuation.objects.get().state == "cancelled", timeout=120)


def test_it_changes_the_running_migration_and_switches_it_over(host_agents, fleet, logged_in, wait_for):
    vm = place_vm(
        host_agents, fleet, memory_mib=8, dirty_pages_per_s=3000, fill_percent=100
    )  # never converges
    started = json.loads(matrixoe(logged_in, "migrate", vm.name, "--to", "hostb", "--json").stdout)
    assert wait_for(lambda: Migration.objects.get(pk=started["id"]).state == "copy", timeout=60)

    refused = matrixoe(logged_in, "change", vm.name, "--bandwidth", "-5")
    not_whole = matrixoe(logged_in, "change", vm.name, "--max-downtime", "300.5")
    not_a_number = matrixoe(logged_in, "change", vm.name, "--bandwidth", "abc")
    nothing = matrixoe(logged_in, "change", vm.name)
    changed = matrixoe(logged_in, "change", vm.name, "--max-downtime", "400", "--no-auto-converge", "--json")
    switched = matrixoe(logged_in, "switchover", vm.name)

    assert refused.returncode == 1
    assert (
        "Bandwidth cap: from 0.001 to 100000 MB/s in steps of 0.001 MB/s (0 or empty: no cap), not -5."
        in refused.stderr
    )
    assert not_whole.returncode == 1 and not_a_number.returncode == 1  # not typer's exit 2
    assert "Maximum downtime: a whole number from 1 to 600000 ms, not 300.5." in not_whole.stderr
    assert "Bandwidth cap: a number, not 'abc'." in not_a_number.stderr
    assert nothing.returncode == 1 and "Nothing to change: give --max-downtime" in nothing.stderr
    assert changed.returncode == 0, changed.stderr
    body = json.loads(changed.stdout)
    assert body["done"] == "Raised the allowed downtime to 400 ms and turned throttling (auto-converge) off."
    assert body["policy"]["max_downtime_ms"] == 400
    assert switched.returncode == 0, switched.stderr
    assert f"{vm.name}: Asked to switch over now." in switched.stdout
    assert wait_for(lambda: not Migration.objects.get(pk=started["id"]).is_active, timeout=120)
    assert Migration.objects.get(pk=started["id"]).state == "completed"
    again = matrixoe(logged_in, "switchover", vm.name)
    assert again.returncode == 1
    assert f"Nothing to change: {vm.name} has no running migration." in again.stderr


@pytest.mark.parametrize(
    ("typed", "words"),
    [
        ("300.5", "Maximum downtime: a whole number from 1 to 600000 ms, not 300.5."),
        ("abc", "Maximum downtime: a number, not 'abc'."),
        ("-1", "Maximum downtime: a whole number from 1 to 600000 ms, not -1."),
    ],
)
def test_a_bad_number_gets_the_dialogs_words_and_exit_status_1_not_the_option_parsers(
    host_agents, fleet, logged_in, typed, words
):
    """The QA's case: typer refused these with exit 2 and its own "valid integer" box."""
    vm = place_vm(host_agents, fleet)

    result = matrixoe(logged_in, "migrate", vm.name, "--to", "hostb", f"--max-downtime={typed}")

    assert result.returncode == 1, result.stderr
    assert words in result.stderr, result.stderr
    assert "valid integer" not in result.stderr
    assert not Migration.objects.filter(vm=vm).exists()


def test_a_number_written_as_the_page_takes_it_is_taken(host_agents, fleet, logged_in):
    vm = place_vm(host_agents, fleet)

    result = matrixoe(
        logged_in,
        "migrate",
        vm.name,
        "--to",
        "hostb",
        "--max-downtime",
        "1e3",
        "--bandwidth",
        "7.5",
        "--json",
    )

    assert result.returncode == 0, result.stderr
    policy = Migration.objects.get(pk=json.loads(result.stdout)["id"]).policy
    assert (policy["max_downtime_ms"], policy["bandwidth_cap_mb_s"]) == (1000, 7.5)


@pytest.mark.parametrize("typed", ["abc", "0", "2.5", "501"])
def test_a_bad_history_limit_is_said_in_words_with_exit_status_1(logged_in, typed):
    result = matrixoe(logged_in, "history", "--limit", typed)

    assert result.returncode == 1, result.stderr
    assert f"--limit: a whole number from 1 to 500, not '{typed}'." in result.stderr


# Sequences a terminal would obey: clear the screen and home the cursor, a fake green status line, a
# window title (OSC ... BEL), a C1 CSI, a right-to-left override, and a line break faking another field.
ESCAPES = "\x1b[2J\x1b[H\x1b[32mMigration completed\x1b[0m\x1b]0;owned\x07\x9b31m\u202erevo\nVSP:  vsp9"
OBEYED = ("\x1b[2J", "\x1b[H", "\x1b]0;", "\x07", "\x9b", "\u202e", "\x1b[32mMigration")


def obeyed(output: str) -> list[str]:
    return [sequence for sequence in OBEYED if sequence in output]


def test_what_the_server_sends_is_printed_inert_in_lines_tables_and_errors(
    host_agents, fleet, logged_in, token
):
    """QA (issue 18 item 17): a Lab administrator set a Not Runnable reason with clear-screen and
    fake-status escapes; `matrixoe status` printed them raw (BEL was stripped, ESC was not)."""
    vm = make_vm("lab01", vsp=fleet["hostb"], hardware_status="off")
    make_vm("[blink]web\x1b[2J", vsp=fleet["hostc"])  # a name typed in the admin, rich markup and all
    copy = ApiClient(token).post(f"/vms/{vm.name}/registrations/hostb/not-runnable", {"reason": ESCAPES})
    assert copy.status_code == 200, copy.content

    for terminal in ({}, {"TTY_COMPATIBLE": "1"}):  # a pipe, and a terminal (rich's own styling on)
        status = matrixoe(logged_in, "status", vm.name, env=terminal)
        listed = matrixoe(logged_in, "vms", env=terminal)
        refused = matrixoe(logged_in, "status", "\x1b[2Jnobody", env=terminal)
        for result in (status, listed, refused):
            assert obeyed(result.stdout + result.stderr) == [], (terminal, result.stdout + result.stderr)
        assert "\\x1b[2J\\x1b[H\\x1b[32mMigration completed" in status.stdout, status.stdout
        assert "\\u202erevo\\nVSP:  vsp9" in status.stdout
        assert not re.search(r"^VSP:\s+vsp9", status.stdout, re.MULTILINE)  # no forged line
        assert "[blink]web\\x1b[2J" in listed.stdout  # shown as typed, not as markup
        assert refused.returncode == 1 and "\\x1b[2Jnobody" in refused.stderr
    as_json = matrixoe(logged_in, "status", vm.name, "--json").stdout
    assert obeyed(as_json) == [] and json.loads(as_json)["not_runnable_reason"] == ESCAPES  # exact, escaped


def test_watch_bars_on_a_terminal_print_the_servers_names_inert(host_agents, fleet, logged_in):
    """The bars' heading and last line carry the VSPs' names as the console has them (a superuser types
    them in the admin; the agents never see them)."""
    vm = place_vm(host_agents, fleet, memory_mib=16, fill_percent=30)
    target = fleet["hostb"]
    target.name = "hostb\x1b]0;owned\x07\x1b[2J"
    target.save(update_fields=["name"])

    terminal = {"COLUMNS": "120", "TTY_COMPATIBLE": "1"}
    result = matrixoe(logged_in, "migrate", vm.name, "--to", str(target.pk), "--watch", env=terminal)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "━" in result.stdout  # the bars were drawn
    assert obeyed(result.stdout) == [], result.stdout
    assert "hostb\\x1b]0;owned\\x07\\x1b[2J" in result.stdout


def test_a_guest_on_an_unreachable_host_says_its_statuses_are_only_as_last_reported(logged_in, token):
    """The General tab, the VM list and the VSP page say "as last reported: vsp2 unreachable since
    20:13:05" beside the statuses of a copy whose host does not answer; the API and the command said
    nothing (issue 18 follow-up): the statuses read as the truth now. The host's name is typed by an
    administrator, so the note is printed inert too."""
    from datetime import timedelta

    from django.utils import timezone

    since = timezone.now() - timedelta(minutes=3)
    far = make_vsp("far\x1b[2J", agent_reachable=False, unreachable_since=since)
    vm = make_vm("far01", vsp=far)
    near = make_vm("near01", vsp=make_vsp("near"))
    note = f"as last reported: far\x1b[2J unreachable since {timezone.localtime(since):%H:%M:%S}"

    api = ApiClient(token)
    assert api.get(f"/vms/{vm.pk}").json()["host_unreachable"] == note
    assert api.get(f"/vms/{near.pk}").json()["host_unreachable"] == ""
    status = matrixoe(logged_in, "status", vm.name)
    listed = matrixoe(logged_in, "vms")

    inert = note.replace("\x1b", "\\x1b")
    assert status.returncode == 0, status.stderr
    for label in ("OS Status", "Virtual Hardware Status"):
        line = next(line for line in status.stdout.splitlines() if line.startswith(f"{label}:"))
        assert line.endswith(f"({inert})"), line
    row = next(line for line in listed.stdout.splitlines() if "far01" in line)
    assert "as last reported" in row, listed.stdout
    assert "as last reported" not in next(line for line in listed.stdout.splitlines() if "near01" in line)
    assert obeyed(status.stdout + listed.stdout) == []
