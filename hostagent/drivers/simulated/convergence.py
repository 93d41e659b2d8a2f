"""Convergence judgement of the simulated source: how fast pages move, and when pre-copy may stop.

Pre-copy has converged when what is still dirty would move (and be hashed) within the allowed
downtime at the measured rate (``downtime_ms``); it gives up when round ``max_rounds`` (or a later
one, when the rounds before could not be judged yet) ends judged and not converged. Rounds sent
after convergence, until the pause, are not counted against the limit. Rates: bytes per
wall-clock second of rounds (waits between rounds excluded); the dirty-page rounds' own rate is
preferred, since scattered pages go slower than the first pass's long runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from agentprotocol import FailureKind
from hostagent.driver import MigrationAborted
from hostagent.drivers.simulated.memory import PAGE_SIZE

if TYPE_CHECKING:
    from agentprotocol import MigrationParams
    from hostagent.drivers.simulated.guest import SimulatedGuest
    from hostagent.drivers.simulated.wire import FrameWriter
    from hostagent.progress import Progress

RATE_SAMPLE_BYTES = 256 * 1024
HASH_RATE_SAMPLE_PAGES = 1000
UNJUDGED_ROUND_WAIT_S = 0.2  # between rounds while the target still hashes the first pass
UNJUDGED_ROUNDS_FACTOR = 10
STALL_RATIO = 0.9  # as migrations_app.forecast: a round leaving more than 90% of the one before stalled

log = logging.getLogger(__name__)


class ConvergenceJudge:
    """Mixed into ``SourceMigration``: round timing, rates, and the convergence decision."""

    guest: SimulatedGuest
    params: MigrationParams
    progress: Progress
    _writer: FrameWriter | None
    _writers: list[FrameWriter]
    _converged: asyncio.Event
    _target_hashed: asyncio.Event
    _target_digested: int
    _dirty_round_rate: float | None
    _hash_rate_pages_s: float | None
    _hashed_once: bool
    _round_started: tuple[float, int] | None
    _rounds_seconds: float
    _rounds_bytes: int
    _dirty_mark: tuple[float, int]
    _last_round_bytes: int | None
    _policy_round: int
    _force_switchover: bool
    allowed_downtime_ms: int
    migration_id: str

    async def _refresh_digests(self) -> int:
        """Hash the pages written since the last time, in a worker thread; learns the hashing rate."""
        started = time.monotonic()
        hashed = await asyncio.get_running_loop().run_in_executor(None, self.guest.memory.refresh_digests)
        elapsed = time.monotonic() - started
        if hashed >= HASH_RATE_SAMPLE_PAGES and elapsed > 0:
            self._hash_rate_pages_s = hashed / elapsed
        self._hashed_once = True
        return hashed

    def _expected_ms(self, pending_pages: int) -> int | None:
        """Downtime to move and hash ``pending_pages`` (the target hashes alongside the source)."""
        rate = self._dirty_round_rate or self._throughput()
        if not rate:
            return None
        seconds = pending_pages * PAGE_SIZE / rate
        if self._hash_rate_pages_s:
            seconds += pending_pages / self._hash_rate_pages_s
        return round(1000 * seconds)

    def _bytes_sent(self) -> int:
        """Bytes sent on every stream so far."""
        return sum(writer.bytes_sent for writer in self._writers)

    def _judge_convergence(self) -> None:
        pending_bytes = self.guest.memory.dirty_count() * PAGE_SIZE
        expected_ms = self._expected_ms(pending_bytes // PAGE_SIZE)
        # Until a round of dirty pages measured how fast they go, only "nothing left" converges;
        # and not before the target hashed the first pass, or Frozen would wait for that.
        judged = self._dirty_round_rate is not None or pending_bytes < RATE_SAMPLE_BYTES
        # Nor before this side hashed it (in the background, ``source._hash_in_background``): until
        # then the hashing rate, part of the expected downtime, is unknown.
        judged = judged and self._target_digested >= 1 and self._hashed_once
        fields: dict[str, Any] = {
            "bytes_remaining": pending_bytes,
            "expected_downtime_ms": expected_ms,
            "dirty_rate_bytes_s": self._dirty_rate(pending_bytes),
            "throughput_bytes_s": round(self._throughput()),
        }
        if self._converged.is_set():
            self.progress.update(**fields)
            return
        sent = self._bytes_sent()
        fields["percent"] = {"copy": min(99, 100 * sent // (sent + pending_bytes)) if sent else 0}
        if judged:
            self._apply_policy_after_round(pending_bytes)
        fields["allowed_downtime_ms"] = self.allowed_downtime_ms
        fields["throttle_pct"] = round(self.guest.throttle_pct)
        fits = judged and expected_ms is not None and expected_ms <= self.allowed_downtime_ms
        exhausted = self._rounds_exhausted(judged)
        if exhausted and self.params.at_limit == "switchover":
            log.info("migration %s: round limit reached, switching over anyway", self.migration_id)
            self._force_switchover = True
        if fits or self._force_switchover or (pending_bytes == 0 and judged):
            fields.update(converged=True, percent={"copy": 100})
            self._converged.set()
        elif exhausted:
            raise MigrationAborted(
                f"did not converge in {self.params.max_rounds} rounds: the guest writes "
                f"{fields['dirty_rate_bytes_s'] / 1e6:.1f} MB/s, "
                f"the link moves {(self._dirty_round_rate or self._throughput()) / 1e6:.1f} MB/s",
                FailureKind.NOT_CONVERGED,
            )
        self.progress.update(**fields)

    async def _wait_for_target_hashing(self) -> None:
        """Pace the rounds while the target hashes the first pass, instead of spinning through them."""
        self._target_hashed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(UNJUDGED_ROUND_WAIT_S):
                await self._target_hashed.wait()

    def _apply_policy_after_round(self, pending_bytes: int) -> None:
        """After a stalled round (more than STALL_RATIO of the round before is left): escalate the allowed
        downtime and, with auto-converge, throttle the guest one more step (``forecast`` items 4-5)."""
        finished = self.progress.current.round
        if finished <= self._policy_round or self._last_round_bytes is None:
            return
        self._policy_round = finished
        if pending_bytes <= STALL_RATIO * self._last_round_bytes:
            return
        params = self.params
        if params.downtime_step_ms:
            ceiling = params.downtime_max_ms or params.downtime_ms
            self.allowed_downtime_ms = max(
                self.allowed_downtime_ms, min(ceiling, self.allowed_downtime_ms + params.downtime_step_ms)
            )
        if params.auto_converge:
            throttle = self.guest.throttle_pct
            step = params.throttle_initial_pct if throttle == 0 else throttle + params.throttle_increment_pct
            self.guest.throttle_pct = min(step, params.throttle_max_pct)

    def _rounds_exhausted(self, judged: bool) -> bool:
        """Rounds run while the target still hashes a big first pass say nothing about convergence.

        They count only once convergence can be judged, up to a hard cap of
        UNJUDGED_ROUNDS_FACTOR times the limit so that a target that never reports cannot keep
        the copy going forever.
        """
        rounds, limit = self.progress.current.round, self.params.max_rounds
        return (judged and rounds >= limit) or rounds >= UNJUDGED_ROUNDS_FACTOR * limit

    def _begin_round(self) -> None:
        self._round_started = (time.monotonic(), self._bytes_sent())

    def _end_round(self, dirty_round: bool = False) -> None:
        assert self._round_started is not None
        started, sent_before = self._round_started
        seconds, sent = time.monotonic() - started, self._bytes_sent() - sent_before
        self._rounds_seconds += seconds
        self._rounds_bytes += sent
        self._round_started = None
        if dirty_round:
            self._last_round_bytes = sent
        if dirty_round and sent >= RATE_SAMPLE_BYTES and seconds > 0:
            self._dirty_round_rate = sent / seconds

    def _throughput(self) -> float:
        """Bytes on the wire per wall-clock second of rounds (hashing and waits between rounds excluded)."""
        seconds, sent = self._rounds_seconds, self._rounds_bytes
        if self._round_started is not None:
            started, sent_before = self._round_started
            seconds += time.monotonic() - started
            sent += self._bytes_sent() - sent_before
        return sent / seconds if seconds > 0 else 0.0

    def _dirty_rate(self, pending_bytes: int) -> int:
        since, _ = self._dirty_mark
        elapsed = time.monotonic() - since
        return round(pending_bytes / elapsed) if elapsed > 0 else 0
