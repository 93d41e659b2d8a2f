"""Benchmark: the convergence forecast (``migrations_app.forecast``) against real migrations.

    .venv/bin/python bench/bench_forecast.py [--memory-mib 1024] [--cap-mb-s 200] [--max-rounds 8]
        [--percents 0,25,50,75,100,150] [--calibrate-percent 50] [--encryption off] [--keep-logs]
    BENCH_TRACE=1 ...   also prints the source's snapshot at each round

Two real host agents (simulated driver) on loopback. The "link" is the migration's bandwidth cap
(``bandwidth_mbps``), so the simulated workload can write faster than it. First two idle guests are
migrated at that cap: the second one's data-plane throughput, as the agent reports it, is the link rate
``L`` (what the console keeps per pair, ``estimates.link_rate``), and its start -> ready less its one
round is the time spent outside Copy's rounds (``Link.setup_s``). Then a guest writing
``--calibrate-percent`` of ``L`` is migrated and its dirty rounds timed (scattered pages): a line
through (bytes, seconds) per round gives their rate and fixed cost per round
(``Link.round_rate_bytes_s``, ``Link.round_overhead_s``), and what the source expects of the freeze when
it judges a round (bytes left over expected downtime: send and hash) gives ``Link.freeze_rate_bytes_s``.
Then, for each dirty rate (a percentage of ``L``), with and without auto-converge, a fresh guest of
``--memory-mib`` (all pages written, writes spread over all of it) is started, its dirty rate is
measured through the agent's dirty-rate endpoint over the console's window
(``estimates.DIRTY_RATE_WINDOW_S``, turned into a write rate by ``Guest.measured``), ``forecast(Guest,
Link, Policy)`` predicts the outcome under the default policy's 300 ms downtime and ``--max-rounds``,
and the guest is migrated through the agent API as the console drives it. One row per case: predicted
against actual total time (start to ready) and downtime (the Frozen phase), rounds, the throttle reached
and the outcome; then how many cases met the aim, per verdict (it says converges, with or without
throttling: it does, total within 25% and downtime within 50 ms; it says will not converge: it fails)
and the machine's load. A "may not converge" verdict (``forecast.Verdict.MAY_NOT_CONVERGE``: the
measured rates converge, but not with the model's margin, ``forecast.MARGIN``) promises nothing either
way: those cases are reported (how many completed), not scored.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agentprotocol import (  # noqa: E402
    Encryption,
    GuestSpec,
    IncomingRequest,
    MigrationParams,
    OutgoingRequest,
    ProgressSnapshot,
    StopRequest,
)
from bench import quick  # noqa: E402
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
    round_starts: list[tuple[float, int, int]]  # (s since start, round, bytes sent) as each round began
    settle_s: float = 0.0  # from the converged snapshot to the end of the I/O quiesce
    judged: list[tuple[int, int]] = field(default_factory=list)  # (bytes left, expected downtime ms)


def define(agent: BenchAgent, name: str, memory_mib: int, pages_per_s: int) -> dict[str, Any]:
    spec = {"name": name, "memory_mib": memory_mib, "vcpus": 2, "os_type": "linux"}
    agent.client.define_guest(
        GuestSpec.model_validate(
            {
                **spec,
                "guest_id": guest_id_for(name),
                "dirty_pages_per_s": pages_per_s,
                "fill_percent": 100,
                "running": True,
            }
        )
    )
    return spec


def drop(agent: BenchAgent, name: str) -> None:
    """Stop and delete a bench guest (frees its memory: two 1 GiB guests per case otherwise pile up)."""
    guest_id = guest_id_for(name)
    with contextlib.suppress(Exception):
        agent.client.stop_guest(guest_id, StopRequest(graceful_timeout_s=0))
    with contextlib.suppress(Exception):
        agent.client.delete_guest(guest_id)


def migrate(
    source: BenchAgent,
    target: BenchAgent,
    spec: dict[str, Any],
    params: dict[str, Any],
    encryption: Encryption,
) -> Actual:
    """Prepare, start with ``params``, quiesce once converged, freeze, resume, release (as the console)."""
    migration_id = f"bench-{secrets.token_hex(3)}"
    wanted = GuestSpec(
        guest_id=guest_id_for(spec["name"]),
        **{key: spec[key] for key in ("name", "memory_mib", "vcpus", "os_type")},
    )
    started = time.perf_counter()
    incoming = IncomingRequest(migration_id=migration_id, guest=wanted, encryption=encryption)
    endpoint = target.client.prepare_incoming(incoming).endpoint()
    source.client.start_outgoing(
        OutgoingRequest(
            migration_id=migration_id,
            guest=wanted.guest_id,
            target=endpoint,
            params=MigrationParams.model_validate(params),
            encryption=encryption,
        )
    )
    last: ProgressSnapshot | None = None
    round_starts: list[tuple[float, int, int]] = []
    judged: list[tuple[int, int]] = []
    for snapshot in source.client.iter_progress(migration_id):
        new_round = last is None or snapshot.round != last.round
        if new_round and snapshot.state == "copy":
            round_starts.append((time.perf_counter() - started, snapshot.round, snapshot.bytes_sent))
            # A new round's first snapshot carries the judgement of the one before: what is left and the
            # freeze the source expects for it (send and hash).
            expected_ms = snapshot.expected_downtime_ms
            if snapshot.round >= 3 and expected_ms and snapshot.bytes_remaining > 1 << 20:
                judged.append((snapshot.bytes_remaining, expected_ms))
        if os.environ.get("BENCH_TRACE") and new_round:
            keys = {"round", "bytes_remaining", "expected_downtime_ms", "allowed_downtime_ms",
                    "dirty_rate_bytes_s", "throughput_bytes_s", "throttle_pct", "converged"}  # fmt: skip
            trace = snapshot.model_dump(include=keys)
            print(f"    {time.perf_counter() - started:6.2f}s {trace}", flush=True)
        last = snapshot
        if snapshot.converged or snapshot.state not in ("init", "copy"):
            break
    if last is None or not last.converged:
        ended = time.perf_counter() - started
        with contextlib.suppress(Exception):
            target.client.cancel(migration_id)
        return Actual(
            f"failed: {last and (last.error or last.state)}",
            ended,
            None,
            last.round if last else 0,
            last.throughput_bytes_s if last else 0,
            last.throttle_pct if last else 0,
            None,
            round_starts,
        )
    converged_at = time.perf_counter()
    source.client.quiesce(migration_id)
    settle_s = time.perf_counter() - converged_at
    ready = source.client.freeze(migration_id)
    total_s = time.perf_counter() - started
    if ready.state != "ready":
        failed = f"failed: {ready.error}"
        return Actual(failed, total_s, None, ready.round, 0, 0, None, round_starts)
    target.client.resume(migration_id)
    source.client.release(migration_id)
    return Actual(
        "completed",
        total_s,
        ready.downtime_ms,
        ready.round,
        ready.throughput_bytes_s,
        ready.throttle_pct,
        ready.source_digest == ready.target_digest,
        round_starts,
        settle_s,
        judged,
    )


def dirty_rounds(round_starts: list[tuple[float, int, int]]) -> list[tuple[float, float]]:
    """(bytes, seconds) of each dirty round (2 on) of one migration, from its round starts."""
    return [
        (sent_next - sent, at_next - at)
        for (at, number, sent), (at_next, _, sent_next) in zip(round_starts, round_starts[1:], strict=False)
        if number >= 2 and sent_next - sent > 1 << 20
    ]


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"


def met_aim(predicted: forecast.Forecast, actual: Actual) -> tuple[bool | None, str]:
    """The issue's aim for one case, and why not in words; None: "may not converge", not scored."""
    if predicted.verdict is forecast.Verdict.MAY_NOT_CONVERGE:
        return None, "not scored"
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
        "--calibrate-percent", type=int, default=50, help="time the dirty rounds at this rate (0: skip)"
    )
    parser.add_argument("--keep-logs", action="store_true")
    quick_load = {
        "memory_mib": 64,
        "cap_mb_s": 400,
        "max_rounds": 3,
        "percents": "0,150",
        "calibrate_percent": 0,
    }
    args = quick.parse_args(parser, quick_load)
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
    rows: list[tuple[str, forecast.Forecast, Actual, bool | None, str]] = []
    try:
        base = {"downtime_ms": 300, "max_rounds": args.max_rounds, "bandwidth_mbps": cap_mbps}
        # The link as the console knows it: the agent's data-plane throughput of a past migration between
        # the pair (``estimates.link_rate``). Two idle guests: the first migration of a fresh agent pays
        # for warming up (the target backing its memory); the second is what later migrations see.
        for attempt in (1, 2):
            spec = define(source, f"fc-idle-{attempt}", args.memory_mib, 0)
            idle = migrate(source, target, spec, base, args.encryption)
            drop(target, spec["name"])
            drop(source, spec["name"])
        memory = args.memory_mib * 2**20
        rate = idle.throughput
        # What a migration spends outside Copy's rounds (Init, the I/O quiesce, the hand-over, the target's
        # check): the idle guest's start -> ready less its one round and its freeze.
        setup_s = max(0.0, idle.total_s - memory / rate - (idle.downtime_ms or 0) / 1000)
        print(
            f"measured link rate (idle guest at the cap): the agent's throughput {rate / 1e6:.0f} MB/s; "
            f"start to ready {idle.total_s:.2f} s, of which {setup_s:.2f} s outside the copy rounds "
            f"({idle.settle_s:.2f} s from convergence to the end of the I/O quiesce)"
        )
        pre_pause = forecast.SIMULATED_PRE_PAUSE_ROUNDS  # the simulated source's rounds before its pause
        timing = {"pre_pause_rounds": pre_pause, "setup_s": setup_s, "settle_s": idle.settle_s}
        link = forecast.Link(rate, **timing)
        if args.calibrate_percent:
            # Dirty rounds move scattered pages, perhaps slower than round 1's runs: time them.
            pages_per_s = round(args.calibrate_percent / 100 * rate / PAGE)
            spec = define(source, "fc-calibrate", args.memory_mib, pages_per_s)
            calibration = migrate(source, target, spec, {**base, "max_rounds": 30}, args.encryption)
            drop(target, "fc-calibrate")
            drop(source, "fc-calibrate")
            fitted = forecast.dirty_round_cost(dirty_rounds(calibration.round_starts))
            freezes = sorted(left / (expected_ms / 1000) for left, expected_ms in calibration.judged)
            freeze_rate = freezes[len(freezes) // 2] if freezes else None
            if fitted:
                link = forecast.Link(
                    rate,
                    round_rate_bytes_s=fitted[0],
                    round_overhead_s=fitted[1],
                    freeze_rate_bytes_s=freeze_rate,
                    **timing,
                )
                freeze_words = f"{freeze_rate / 1e6:.0f} MB/s" if freeze_rate else "not judged"
                print(
                    f"dirty rounds (timed while migrating a guest writing {args.calibrate_percent}% of the "
                    f"link): {fitted[0] / 1e6:.0f} MB/s plus {1000 * fitted[1]:.0f} ms a round; the freeze "
                    f"the source expects (send and hash, median): {freeze_words}"
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
                    measured.memory_bytes,
                    measured.dirty_rate_bytes_s,
                    DIRTY_RATE_WINDOW_S,
                    measured.written_bytes,
                    measured.working_set_bytes,
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
                shows_times = predicted.converges or predicted.verdict is forecast.Verdict.MAY_NOT_CONVERGE
                total_p = f"{predicted.total_s:.1f}s" if shows_times else "-"
                rate = measured.dirty_rate_bytes_s / 1e6
                print(
                    f"{percent:>5} {'on' if auto else 'off':>9} {rate:>9.0f} | "
                    f"{verdict:<19} {total_p:>6} {down_p:>7} | "
                    f"{outcome:<19} {actual.total_s:>5.1f}s {down_a:>7} {actual.rounds:>3} "
                    f"{actual.throttle_pct:>3}% | {aim_words(ok, why)}",
                    flush=True,
                )
    finally:
        source.stop()
        target.stop()
        if args.keep_logs:
            print(f"\nagent logs in {scratch}")
        else:
            shutil.rmtree(scratch)
    print()
    for verdict in forecast.Verdict:
        cases = [row for row in rows if row[1].verdict is verdict]
        if not cases:
            continue
        completed = sum(1 for row in cases if row[2].outcome == "completed")
        if verdict is forecast.Verdict.MAY_NOT_CONVERGE:
            print(f"{verdict.label}: {len(cases)} cases, {completed} completed (not scored)")
        else:
            met = sum(1 for row in cases if row[3])
            print(f"{verdict.label}: {len(cases)} cases, {completed} completed, {met} met the aim")
    scored = [row for row in rows if row[3] is not None]
    met = sum(1 for row in scored if row[3])
    print(
        f"met the aim: {met} of {len(scored)} scored cases ({len(rows) - len(scored)} not scored); "
        f"whole bench {time.perf_counter() - bench_started:.0f} s; {load()}"
    )


def aim_words(ok: bool | None, why: str) -> str:
    """The aim column: "yes", "NO: why", or "(not scored)" for a "may not converge" case."""
    if ok is None:
        return f"({why})"
    return "yes" if ok else f"NO: {why}"


if __name__ == "__main__":
    main()
