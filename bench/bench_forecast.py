"""Benchmark: the convergence forecast (``migrations_app.forecast``) against real migrations.

    .venv/bin/python bench/bench_forecast.py [--memory-mib 1024] [--cap-mb-s 200] [--max-rounds 8]
        [--percents 0,25,50,75,100,150] [--calibrate-percent 25] [--encryption off] [--keep-logs]
    BENCH_TRACE=1 ...   also prints the source's snapshot at each round

Two real host agents (simulated driver) on loopback. The "link" is the migration's bandwidth cap
(``bandwidth_mbps``), so the simulated workload can write faster than it. First an idle guest is
migrated at that cap: its bytes over start -> ready are the link rate ``L`` (the agent's own
throughput leaves out Init, the target hashing round 1 and the switchover). Then a guest writing
``--calibrate-percent`` of ``L`` is migrated to learn the rate of the dirty rounds (scattered pages,
hashing included: what the agent expects, ``bytes_remaining / expected_downtime_ms``), which is the
model's ``Link.round_rate_bytes_s``. Then, for each dirty rate (a percentage of ``L``), with and
without auto-converge, a fresh guest of ``--memory-mib`` (all pages written, writes spread over all of
it) is started, its dirty rate is measured through the agent's dirty-rate endpoint over the console's
window (``estimates.DIRTY_RATE_WINDOW_S``, turned into a write rate by ``Guest.measured``),
``forecast(Guest, Link, Policy)`` predicts the outcome under the default policy's 300 ms downtime and
``--max-rounds``, and the guest is migrated through the agent API as the console drives it. One row
per case: predicted against actual total time (start to ready) and downtime (the Frozen phase),
rounds, the throttle reached and the outcome; then how many cases met the aim (the forecast says
converges: it does, total within 25% and downtime within 50 ms; it says will not converge: it fails)
and the machine's load.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.agents import BenchAgent, guest_id_for  # noqa: E402
from migrations_app import forecast  # noqa: E402  (plain module: no Django needed)

DIRTY_RATE_WINDOW_S = 0.5  # as migrations_app.estimates.DIRTY_RATE_WINDOW_S (which imports Django)
PAGE = 4096


@dataclass
class Actual:
    outcome: str  # "completed" or the agent's error
    total_s: float  # start -> ready (or -> failed)
    downtime_ms: float | None
    rounds: int
    throughput: float
    throttle_pct: int
    digests_equal: bool | None
    round_rates: list[float]  # bytes/s the agent expected its dirty rounds to move at (rounds 2+)


def define(agent: BenchAgent, name: str, memory_mib: int, pages_per_s: int) -> dict[str, Any]:
    spec = {"name": name, "memory_mib": memory_mib, "vcpus": 2, "os_type": "linux"}
    agent.client.define_guest(
        {
            **spec,
            "guest_id": guest_id_for(name),
            "dirty_pages_per_s": pages_per_s,
            "fill_percent": 100,
            "running": True,
        }
    )
    return spec


def drop(agent: BenchAgent, name: str) -> None:
    """Stop and delete a bench guest (frees its memory: two 1 GiB guests per case otherwise pile up)."""
    guest_id = guest_id_for(name)
    with contextlib.suppress(Exception):
        agent.client.stop_guest(guest_id, graceful_timeout_s=0)
    with contextlib.suppress(Exception):
        agent.client.delete_guest(guest_id)


def migrate(
    source: BenchAgent, target: BenchAgent, spec: dict[str, Any], params: dict[str, Any], encryption: str
) -> Actual:
    """Prepare, start with ``params``, quiesce once converged, freeze, resume, release (as the console)."""
    migration_id = f"bench-{secrets.token_hex(3)}"
    wanted = {key: spec[key] for key in ("name", "memory_mib", "vcpus", "os_type")}
    wanted["guest_id"] = guest_id_for(spec["name"])
    started = time.perf_counter()
    endpoint = target.client.prepare_incoming(wanted, migration_id, {}, encryption)
    source.client.start_outgoing(wanted["guest_id"], migration_id, endpoint, params, encryption)
    last: dict[str, Any] = {}
    round_rates: list[float] = []
    for snapshot in source.client.iter_progress(migration_id):
        expected_ms = snapshot.get("expected_downtime_ms")
        if snapshot.get("round", 0) >= 2 and expected_ms and snapshot["bytes_remaining"] > 1 << 20:
            round_rates.append(snapshot["bytes_remaining"] / (expected_ms / 1000))
        if os.environ.get("BENCH_TRACE") and snapshot.get("round") != last.get("round"):
            keys = ("round", "bytes_remaining", "expected_downtime_ms", "allowed_downtime_ms",
                    "dirty_rate_bytes_s", "throughput_bytes_s", "throttle_pct", "converged")  # fmt: skip
            trace = {key: snapshot.get(key) for key in keys}
            print(f"    {time.perf_counter() - started:6.2f}s {trace}", flush=True)
        last = snapshot
        if snapshot["converged"] or snapshot["state"] not in ("init", "copy"):
            break
    if not last.get("converged"):
        ended = time.perf_counter() - started
        with contextlib.suppress(Exception):
            target.client.cancel(migration_id)
        return Actual(
            f"failed: {last.get('error') or last.get('state')}",
            ended,
            None,
            last.get("round", 0),
            last.get("throughput_bytes_s", 0),
            last.get("throttle_pct", 0),
            None,
            round_rates,
        )
    source.client.quiesce(migration_id)
    ready = source.client.freeze(migration_id)
    total_s = time.perf_counter() - started
    if ready["state"] != "ready":
        return Actual(f"failed: {ready.get('error')}", total_s, None, ready["round"], 0, 0, None, round_rates)
    target.client.resume(migration_id)
    source.client.release(migration_id)
    return Actual(
        "completed",
        total_s,
        ready["downtime_ms"],
        ready["round"],
        ready["throughput_bytes_s"],
        ready.get("throttle_pct", 0),
        ready["source_digest"] == ready["target_digest"],
        round_rates,
    )


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"


def met_aim(predicted: forecast.Forecast, actual: Actual) -> tuple[bool, str]:
    """The issue's aim for one case, and why not in words."""
    if predicted.converges:
        if actual.outcome != "completed":
            return False, "predicted to converge, failed"
        total_off = abs(actual.total_s - predicted.total_s) / predicted.total_s
        downtime_off = abs((actual.downtime_ms or 0) - (predicted.downtime_ms or 0))
        if total_off > 0.25:
            return False, f"total off by {100 * total_off:.0f}%"
        if downtime_off > 50:
            return False, f"downtime off by {downtime_off:.0f} ms"
        return True, ""
    if actual.outcome == "completed":
        return False, "predicted not to converge, completed"
    return True, ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory-mib", type=int, default=1024)
    parser.add_argument("--cap-mb-s", type=float, default=200, help="the link: a bandwidth cap in MB/s")
    parser.add_argument("--max-rounds", type=int, default=8)
    parser.add_argument("--percents", default="0,25,50,75,100,150", help="dirty rates, %% of the link")
    parser.add_argument("--encryption", default="off", choices=("off", "required"))
    parser.add_argument(
        "--calibrate-percent", type=int, default=25, help="measure the dirty rounds' rate (0: skip)"
    )
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    bench_started = time.perf_counter()
    cap_mbps = args.cap_mb_s * 8
    print(
        f"guest {args.memory_mib} MiB (all written, writes anywhere in it); link = bandwidth cap "
        f"{args.cap_mb_s:g} MB/s; policy: downtime 300 ms, {args.max_rounds} rounds, abort at the limit; "
        f"data plane encryption {args.encryption}"
    )
    print(load())
    scratch = Path(tempfile.mkdtemp(prefix="bench-forecast-"))
    source, target = BenchAgent("fc-src", scratch), BenchAgent("fc-dst", scratch)
    rows: list[tuple[str, forecast.Forecast, Actual, bool, str]] = []
    try:
        base = {"downtime_ms": 300, "max_rounds": args.max_rounds, "bandwidth_mbps": cap_mbps}
        spec = define(source, "fc-idle", args.memory_mib, 0)
        idle = migrate(source, target, spec, base, args.encryption)
        drop(target, "fc-idle")
        drop(source, "fc-idle")
        # The link as a migration sees it end to end: the idle guest's bytes over start -> ready (Init, the
        # target hashing round 1 and the switchover included; the agent's own throughput leaves them out).
        end_to_end = args.memory_mib * 2**20 / idle.total_s
        print(
            f"measured link rate (idle guest at the cap): {end_to_end / 1e6:.0f} MB/s start to ready "
            f"({idle.total_s:.2f} s; the agent's data-plane throughput {idle.throughput / 1e6:.0f} MB/s)"
        )
        pre_pause = forecast.SIMULATED_PRE_PAUSE_ROUNDS  # the simulated source's rounds before its pause
        link = forecast.Link(end_to_end, pre_pause_rounds=pre_pause)
        if args.calibrate_percent:
            # Dirty rounds move scattered pages, slower than round 1's runs: what does the agent expect?
            pages_per_s = round(args.calibrate_percent / 100 * end_to_end / PAGE)
            spec = define(source, "fc-calibrate", args.memory_mib, pages_per_s)
            calibration = migrate(source, target, spec, {**base, "max_rounds": 4}, args.encryption)
            drop(target, "fc-calibrate")
            drop(source, "fc-calibrate")
            rates = sorted(calibration.round_rates)
            if rates:
                link = forecast.Link(
                    end_to_end, round_rate_bytes_s=rates[len(rates) // 2], pre_pause_rounds=pre_pause
                )
                print(
                    f"dirty rounds' rate (median of what the agent expected, guest at "
                    f"{args.calibrate_percent}% of the link): {rates[len(rates) // 2] / 1e6:.0f} MB/s"
                )
        header = f"{'dirty':>5} {'auto-conv':>9} {'measured':>9} | {'predicted':<34} | {'actual':<42} | aim"
        print()
        print(header)
        print(
            f"{'% L':>5} {'':>9} {'MB/s':>9} | {'verdict':<19} {'total':>6} {'down':>7} | "
            f"{'outcome':<19} {'total':>6} {'down':>7} {'rnd':>3} {'thr':>4} |"
        )
        for percent in [int(value) for value in args.percents.split(",")]:
            for auto in (False, True):
                name = f"fc-{percent}-{'ac' if auto else 'plain'}"
                pages_per_s = round(percent / 100 * link.rate_bytes_s / PAGE)
                spec = define(source, name, args.memory_mib, pages_per_s)
                time.sleep(0.3)  # the workload is running
                measured = source.client.dirty_rate(guest_id_for(name), DIRTY_RATE_WINDOW_S)
                guest = forecast.Guest.measured(
                    measured["memory_bytes"],
                    measured["dirty_rate_bytes_s"],
                    DIRTY_RATE_WINDOW_S,
                    measured.get("written_bytes"),
                    measured.get("working_set_bytes"),
                )
                policy = forecast.Policy(
                    max_downtime_ms=300,
                    bandwidth_cap_bytes_s=None,  # the link was measured at the cap
                    auto_converge=auto,
                    max_rounds=args.max_rounds,
                )
                predicted = forecast.forecast(guest, link, policy)
                actual = migrate(source, target, spec, {**base, "auto_converge": auto}, args.encryption)
                drop(target, name)
                drop(source, name)
                ok, why = met_aim(predicted, actual)
                rows.append((name, predicted, actual, ok, why))
                down_p = f"{predicted.downtime_ms:.0f}ms" if predicted.downtime_ms is not None else "-"
                down_a = f"{actual.downtime_ms:.0f}ms" if actual.downtime_ms is not None else "-"
                outcome = "completed" if actual.outcome == "completed" else "not converged"
                if actual.outcome not in ("completed",) and "converge" not in actual.outcome:
                    outcome = actual.outcome[:19]
                if actual.digests_equal is False:
                    outcome += " (digests differ!)"
                verdict = predicted.verdict.value.replace("converges_with_throttle", "converges w/ thr")
                total_p = f"{predicted.total_s:.1f}s" if predicted.converges else "-"
                rate = measured["dirty_rate_bytes_s"] / 1e6
                print(
                    f"{percent:>5} {'on' if auto else 'off':>9} {rate:>9.0f} | "
                    f"{verdict:<19} {total_p:>6} {down_p:>7} | "
                    f"{outcome:<19} {actual.total_s:>5.1f}s {down_a:>7} {actual.rounds:>3} "
                    f"{actual.throttle_pct:>3}% | {'yes' if ok else 'NO: ' + why}",
                    flush=True,
                )
    finally:
        source.stop()
        target.stop()
        if args.keep_logs:
            print(f"\nagent logs in {scratch}")
        else:
            shutil.rmtree(scratch)
    met = sum(1 for row in rows if row[3])
    print(
        f"\nmet the aim: {met} of {len(rows)} cases; "
        f"whole bench {time.perf_counter() - bench_started:.0f} s; {load()}"
    )


if __name__ == "__main__":
    main()
