"""How fast the agents answer ``GET /v1/health`` while they migrate a large, mostly-empty guest uncapped.

Issue 10: a 4 GiB guest made the source agent take 10.8 s to answer health; a 7 GiB mostly-empty one
froze it 5.5 s. Prints, per agent, the health round trip's p50/p99/max (ms) from a poller thread
(one request every 20 ms) during one migration, and the event loop's longest stall as the agent
measured it (wall ms; the loop thread's CPU ms in that gap).

    .venv/bin/python bench/bench_agent_responsiveness.py --memory-mib 7168 --fill-percent 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agentprotocol import GuestSpec  # noqa: E402
from bench import quick  # noqa: E402
from bench.agents import BenchAgent, guest_id_for, migrate  # noqa: E402
from vms.agent_client import AgentClient  # noqa: E402


def poll(client: AgentClient, stop: threading.Event, took_ms: list[float]) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        client.health()
        took_ms.append((time.perf_counter() - started) * 1000)
        stop.wait(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-mib", type=int, default=7168)
    parser.add_argument("--fill-percent", type=int, default=2)
    args = quick.parse_args(parser, {"memory_mib": 256})
    with tempfile.TemporaryDirectory() as scratch:
        source, target = BenchAgent("vsp1", Path(scratch)), BenchAgent("vsp2", Path(scratch))
        try:
            name = f"big-{args.memory_mib}"
            spec = {
                "name": name,
                "memory_mib": args.memory_mib,
                "vcpus": 1,
                "fill_percent": args.fill_percent,
            }
            guest = source.client.define_guest(
                GuestSpec.model_validate({**spec, "guest_id": guest_id_for(name), "running": True})
            )
            spec["os_type"] = guest.os_type
            stop = threading.Event()
            timings: dict[str, list[float]] = {"source": [], "target": []}
            pollers = [
                threading.Thread(
                    target=poll,
                    args=(AgentClient(a.client.base_url, a.secret, trust=a.trust), stop, timings[side]),
                )
                for side, a in (("source", source), ("target", target))
            ]
            for poller in pollers:
                poller.start()
            started = time.monotonic()
            try:
                moved = migrate(source, target, spec)
            finally:
                stop.set()
            for poller in pollers:
                poller.join()
            print(
                f"{args.memory_mib} MiB guest, {args.fill_percent}% written, uncapped: {moved.total_s:.1f} s"
            )
            for side, agent in (("source", source), ("target", target)):
                took = sorted(timings[side])
                p99 = took[min(len(took) - 1, int(len(took) * 0.99))]
                health = agent.client.health(window_s=time.monotonic() - started)
                print(
                    f"  {side}: {len(took)} health polls, p50 {statistics.median(took):.1f} ms, "
                    f"p99 {p99:.1f} ms, max {took[-1]:.1f} ms; loop stall {health.loop_stall_ms} ms "
                    f"(loop CPU {health.loop_busy_ms} ms)"
                )
        finally:
            source.stop()
            target.stop()


if __name__ == "__main__":
    main()
