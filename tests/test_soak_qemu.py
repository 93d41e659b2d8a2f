"""The QEMU soak's own rules (``make soak DRIVER=qemu``), without a stack or QEMU: which faults its seeds
draw, and that killing a QEMU host's agent kills the agent alone (its guests' QEMUs run on)."""

import os
import signal
import sys
from pathlib import Path

import pytest

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR / "bench"))

from soak_run import FAULT_KINDS, QEMU_FAULT_KINDS, Scenario  # noqa: E402
from soak_stack import QEMU_AGENT_NAMES, Agent, Stack  # noqa: E402

from devtools.processes import PYTHON, start_process, wait_until  # noqa: E402


def test_ten_consecutive_qemu_seeds_draw_every_qemu_fault_and_kills_and_link_faults_in_copy():
    scenarios = [Scenario.from_seed(seed, "qemu") for seed in range(700, 710)]

    assert sorted(scenario.kind for scenario in scenarios) == sorted(QEMU_FAULT_KINDS)
    for scenario in scenarios:
        assert {scenario.source, scenario.target} == set(QEMU_AGENT_NAMES)
        assert scenario.memory_mib in (128, 192)
        if scenario.kind in ("kill-source", "kill-target", "link-cut", "link-stall"):
            assert scenario.phase == "copy"
    assert Scenario.from_seed(703, "qemu") == Scenario.from_seed(703, "qemu")  # a seed replays
    assert not {"pause-source", "pause-target"} & set(QEMU_FAULT_KINDS)  # SIGSTOP would stop its QEMUs


def test_the_simulated_soak_draws_as_before():
    scenario = Scenario.from_seed(20261129)

    assert scenario.driver == "simulated"
    assert scenario.kind == FAULT_KINDS[20261129 % len(FAULT_KINDS)]  # a seed picks its kind by position
    assert scenario.describe().startswith(f"seed 20261129: {scenario.kind} at ")


def test_killing_a_qemu_host_agent_leaves_the_rest_of_its_process_group_running(tmp_path):
    """What stands in for QEMU is a child of the agent, in its process group (as the driver starts it)."""
    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time; "
        f"child = subprocess.Popen(['sleep', '300']); open({str(pid_file)!r}, 'w').write(str(child.pid)); "
        "time.sleep(300)"
    )
    process = start_process("agent-vsp1", [PYTHON, "-c", code], tmp_path / "agent.log")
    stack = Stack(tmp_path, driver="qemu")
    stack.agents["vsp1"] = Agent("vsp1", 0, tmp_path / "s", "s", process)
    try:
        assert wait_until(lambda: pid_file.exists() and pid_file.read_text(), 30)
        child = int(pid_file.read_text())

        stack.kill("vsp1")

        assert not process.running
        state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert state not in ("Z", "X"), "the child runs on"
        assert os.getpgid(child) == process.process.pid, "in the agent's process group"
    finally:
        os.killpg(process.process.pid, signal.SIGKILL)


def test_only_keeps_the_seeds_of_the_named_kinds_and_refuses_an_unknown_kind():
    from soak import run_seeds

    seeds = run_seeds(1, 3, "kill-source", "qemu")

    assert seeds == [1, 11, 21]  # QEMU_FAULT_KINDS[seed % 10] == "kill-source"
    assert run_seeds(5, 2, "", "simulated") == [5, 6]
    with pytest.raises(SystemExit, match="pause-source"):  # the message lists the driver's kinds
        run_seeds(1, 1, "link-cut,nope", "simulated")
    with pytest.raises(SystemExit, match="fault kinds of the qemu driver"):
        run_seeds(1, 1, "pause-source", "qemu")


def test_local_disk_runs_strike_in_the_mirror_and_only_with_agents_that_mirror():
    from soak_run import MIRROR_KINDS, QEMU_MIRROR_FAULT_KINDS

    simulated = [Scenario.from_seed(seed) for seed in range(900, 900 + 4 * len(FAULT_KINDS))]
    local = [scenario for scenario in simulated if scenario.local]
    assert {scenario.kind for scenario in local} == set(MIRROR_KINDS)
    assert all(scenario.phase in ("mirror", "mirror-ready") and scenario.prefill_mib for scenario in local)
    assert all(scenario.local for scenario in simulated if scenario.kind == "pool-full")
    assert {scenario.kind for scenario in simulated if not scenario.local} >= set(FAULT_KINDS) - {"pool-full"}

    with_mirror = [Scenario.from_seed(seed, "qemu", mirrors=True) for seed in range(700, 722)]
    assert sorted({s.kind for s in with_mirror}) == sorted(QEMU_MIRROR_FAULT_KINDS)
    assert all(s.local == (s.kind in MIRROR_KINDS) for s in with_mirror)
    without = [Scenario.from_seed(seed, "qemu") for seed in range(700, 722)]
    assert not any(s.local or s.kind == "pool-full" for s in without)
