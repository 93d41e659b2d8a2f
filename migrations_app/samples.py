"""Per-round convergence samples kept on the migration (``Migration.round_samples``), compactly.

One sample per pre-copy round the engine saw (it reads the agent's snapshot a few times a second,
so rounds shorter than that are skipped: the round numbers say which), as a list (not a dict, to keep
the JSON small):
``[t_s, round, bytes_sent, bytes_remaining, dirty_rate_bytes_s, throughput_bytes_s]`` where ``t_s`` is
seconds (float, 0.1 s resolution) since the first sample (the start of Copy) and the rest are the agent
snapshot's own fields (bytes, bytes/s). While a round goes on its sample is updated in place, so each
round ends up holding the last state seen in it, and the report's chart moves within a long round.

The engine calls ``add_round_sample`` after every snapshot it absorbs; ``flush`` writes the list with
the other progress fields (``decisions.PROGRESS_FIELDS``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.utils import timezone

from .models import Migration

# A guest that never converges may run thousands of rounds; past this the list is thinned to every
# other sample (the first and the newest kept), so the row and the chart stay small.
MAX_ROUND_SAMPLES = 600

T, ROUND, BYTES_SENT, BYTES_REMAINING, DIRTY_RATE, THROUGHPUT = range(6)
FIELDS = ("t_s", "round", "bytes_sent", "bytes_remaining", "dirty_rate_bytes_s", "throughput_bytes_s")


def add_round_sample(migration: Migration, now: Any = None) -> None:
    """Record ``migration``'s current progress fields (already absorbed) as its round's sample.

    Nothing before the first round (``rounds`` 0). A new round appends; the same round replaces its
    sample. Changes ``migration.round_samples`` in memory only.
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
