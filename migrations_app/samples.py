"""Per-round convergence samples kept on the migration (``Migration.round_samples``), compactly.

One sample per pre-copy round the engine saw (it reads the agent's snapshot a few times a second,
so rounds shorter than that are skipped: the round numbers say which), as a list (not a dict, to keep
the JSON small):
``[t_s, round, bytes_sent, bytes_remaining, dirty_rate_bytes_s, throughput_bytes_s]`` where ``t_s`` is
seconds (float, 0.1 s resolution) since the first sample (the start of Copy) and the rest are the agent
snapshot's own fields (bytes, bytes/s). While a round goes on its sample is updated in place, so each
round ends up holding the last state seen in it, and the report's chart moves within a long round.

The engine calls ``add_round_sample`` after every snapshot it absorbs; ``flush`` writes the list with
the other progress fields (``records.PROGRESS_FIELDS``).
"""

from __future__ import annotations

from collections import deque
from datetime import timedelta
from typing import Any

from django.utils import timezone

from .models import Migration

# A guest that never converges may run thousands of rounds; past this the list is thinned to every
# other sample (the first and the newest kept), so the row and the chart stay small.
MAX_ROUND_SAMPLES = 600

MIN_ROUND_S = 0.3  # a dirty round shorter than this says little about its rate (``dirty_rounds``)
MIN_ROUND_BYTES = 1 << 20
T, ROUND, BYTES_SENT, BYTES_REMAINING, DIRTY_RATE, THROUGHPUT = range(6)
FIELDS = ("t_s", "round", "bytes_sent", "bytes_remaining", "dirty_rate_bytes_s", "throughput_bytes_s")


def add_round_sample(migration: Migration, now: Any = None, *, keep_left: bool = False) -> None:
    """Record ``migration``'s current progress fields (already absorbed) as its round's sample.

    Nothing before the first round (``rounds`` 0). A new round appends; the same round replaces its
    sample. ``keep_left`` (the freeze was asked for): the same round's bytes left never go down, so the
    last round shows what was left when the guest was to be paused, not the 0 the agent reports once
    the paused guest's last pages are across. Changes ``migration.round_samples`` in memory only.
    """
    if migration.rounds <= 0:
        return
    now = now or timezone.now()
    samples: list[list[float | int]] = list(migration.round_samples or [])
    anchor = _anchor(migration, samples, now)
    sample = [
        round((now - anchor).total_seconds(), 1),
        migration.rounds,
        migration.bytes_sent,
        migration.bytes_remaining,
        migration.dirty_rate_bytes_s,
        migration.throughput_bytes_s,
    ]
    if samples and samples[-1][ROUND] == migration.rounds:
        if keep_left:
            sample[BYTES_REMAINING] = max(sample[BYTES_REMAINING], samples[-1][BYTES_REMAINING])
        samples[-1] = sample
    else:
        samples.append(sample)
    if len(samples) > MAX_ROUND_SAMPLES:
        samples = [*samples[:-1:2], samples[-1]]
    migration.round_samples = samples


def _anchor(migration: Migration, samples: list[list[float | int]], now: Any) -> Any:
    """When t_s = 0: remembered on the instance; for a worker that took over, derived from the samples."""
    anchor = getattr(migration, "_round_samples_anchor", None)
    if anchor is None:
        offset = samples[-1][T] if samples else 0
        anchor = now - timedelta(seconds=float(offset))
        migration._round_samples_anchor = anchor  # type: ignore[attr-defined]
    return anchor


def samples_as_series(samples: list[list[float | int]]) -> dict[str, list[float | int]]:
    """Column-wise, for the chart: ``{"t_s": [...], "round": [...], ...}`` (uPlot's data layout)."""
    columns: dict[str, list[float | int]] = {name: [] for name in FIELDS}
    for sample in samples:
        if len(sample) < len(FIELDS):
            continue
        for name, value in zip(FIELDS, sample, strict=False):
            columns[name].append(value)
    return columns


def dirty_rounds(samples: list[list[float | int]], *, running: bool) -> list[tuple[float, float]]:
    """(bytes sent, seconds) of each dirty round (2 on) the samples hold with the round before it.

    A round's sample holds the last state seen in it, about its end, so round ``r`` sent
    ``bytes_sent[r] - bytes_sent[r - 1]`` in ``t[r] - t[r - 1]``. Rounds whose neighbour was skipped,
    shorter than ``MIN_ROUND_S`` (the times are kept to 0.1 s) or of under 1 MiB are left out, and so
    is the last one while the migration runs (``running``: still under way). For
    ``forecast.dirty_round_cost``.
    """
    usable = [sample for sample in samples if len(sample) >= len(FIELDS)]
    if running:
        usable = usable[:-1]
    rounds = []
    for before, sample in zip(usable, usable[1:], strict=False):
        if sample[ROUND] != before[ROUND] + 1 or sample[ROUND] < 2:
            continue
        sent, seconds = sample[BYTES_SENT] - before[BYTES_SENT], sample[T] - before[T]
        if sent >= MIN_ROUND_BYTES and seconds >= MIN_ROUND_S:
            rounds.append((float(sent), float(seconds)))
    return rounds


def round_left_bytes(samples: list[list[float | int]], round_number: int, bytes_sent: int) -> float | None:
    """What the round under way (``round_number``) has still to send, in bytes, or None when unknown.

    The round before it left ``bytes_remaining`` at its last sample: about what this round took to send
    (the pages dirtied until it was taken); less what was sent since. For
    ``forecast.CopyState.round_left_bytes``.
    """
    before = next((sample for sample in reversed(samples) if sample[ROUND] == round_number - 1), None)
    if before is None or len(before) < len(FIELDS):
        return None
    return float(max(0, before[BYTES_REMAINING] - (bytes_sent - before[BYTES_SENT])))


RECENT_RATE_S = 5.0  # the live rate's window: long enough to smooth a round's bursts, short enough to follow
MIN_RATE_SPAN_S = 1.0  # a window under this says too little: the agent's own figure stands meanwhile


class RecentRate:
    """Bytes per second over the last ``RECENT_RATE_S`` of readings of a growing byte count (one worker's,
    in memory: a worker that takes over starts a new window).

    ``add(at_s, total_bytes)`` takes a reading (``at_s``: a monotonic clock, s) and returns the rate from
    the newest reading at least ``RECENT_RATE_S`` old (the oldest one until there is one) to this one,
    bytes/s; None while the readings span under ``MIN_RATE_SPAN_S``. A count that goes down (another
    source of numbers) starts the window again.
    """

    def __init__(self) -> None:
        self.readings: deque[tuple[float, int]] = deque()

    def add(self, at_s: float, total_bytes: int) -> float | None:
        if self.readings and total_bytes < self.readings[-1][1]:
            self.readings.clear()
        self.readings.append((at_s, total_bytes))
        while len(self.readings) > 2 and self.readings[1][0] <= at_s - RECENT_RATE_S:
            self.readings.popleft()
        first_s, first_bytes = self.readings[0]
        span = at_s - first_s
        if span < MIN_RATE_SPAN_S:
            return None
        return (total_bytes - first_bytes) / span
