"""What the live forecast reads back from a migration's round samples (``migrations_app.samples``)."""

import pytest

from migrations_app.forecast import dirty_round_cost
from migrations_app.samples import dirty_rounds, round_left_bytes

MB = 1_000_000
# [t_s, round, bytes_sent, bytes_remaining, dirty_rate, throughput]: round 1 (100 MB) ends at 1.0 s, then
# rounds of 40, 16 and 6.4 MB at 50 MB/s plus 0.1 s each; round 5 is under way.
SAMPLES = [
    [1.0, 1, 100 * MB, 40 * MB, 0, 0],
    [1.9, 2, 140 * MB, 16 * MB, 0, 0],
    [2.32, 3, 156 * MB, 6.4 * MB, 0, 0],
    [2.548, 4, 162.4 * MB, 2 * MB, 0, 0],
    [2.6, 5, 163.4 * MB, 1.5 * MB, 0, 0],
]


def test_the_dirty_rounds_rate_and_cost_come_from_the_samples_of_consecutive_rounds():
    rounds = dirty_rounds(SAMPLES, running=True)

    assert rounds == [(40 * MB, pytest.approx(0.9)), (16 * MB, pytest.approx(0.42))]  # round 4: < 0.3 s
    rate, cost = dirty_round_cost(rounds)
    assert rate == pytest.approx(50 * MB) and cost == pytest.approx(0.1)
    # A skipped round leaves its neighbours out; the round under way is not over yet.
    assert dirty_rounds([SAMPLES[0], SAMPLES[2]], running=False) == []
    assert len(dirty_rounds(SAMPLES[:3], running=True)) == 1


def test_the_round_under_way_has_what_the_round_before_left_less_what_was_sent_since():
    # Round 5 takes the 2 MB round 4 left; 1 MB of it has been sent.
    assert round_left_bytes(SAMPLES, 5, int(163.4 * MB)) == pytest.approx(1 * MB)
    assert round_left_bytes(SAMPLES, 5, int(170 * MB)) == 0
    assert round_left_bytes(SAMPLES[:1], 3, 0) is None
