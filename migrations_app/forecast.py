"""Will a pre-copy migration converge, how long will it take, how long will the guest be frozen?

Plain Python, no Django: the migrate dialog, the live phases panel, the REST API and evacuation plans
all ask this module, with plain numbers (bytes, bytes/s, ms, s). The model is documented, with a worked
example, in ``docs/convergence.md``; in short (Clark et al., "Live Migration of Virtual Machines",
NSDI 2005, sections 3 and 5):

1. Round 1 sends every written page of the guest once, at the link rate ``L`` (capped by the policy's
   bandwidth cap). Pages never written travel as zero markers and cost nothing here.
2. While a round of ``t`` seconds is on the wire, the guest dirties pages at ``D`` bytes/s; the next
   round sends those. Writes fall within a working set of ``W`` bytes, so one round never holds more
   than ``W``: ``dirtied(t) = min(D * t, W)``. That is an upper bound whatever the write pattern (a
   write dirties at most one new page, and at most ``W`` can be dirty); it is exact for the simulated
   guest, whose writes walk its working set in a scattered order without repeating a page, and errs
   toward "will not converge" for a guest that rewrites hot pages. Each round is thus ``D / L`` of the
   one before (Clark et al.'s geometric series): it converges when ``D`` is well below ``L``.
   Round 1 moves long runs of pages at ``L``; the later rounds move scattered pages, which can cost
   the agents more per byte: they move at their own rate ``L_r`` (``Link.round_rate_bytes_s``) plus a
   fixed cost per round ``c`` (``Link.round_overhead_s``: the round's end markers and the judgement).
3. The copy converges when what is left would move within the allowed downtime:
   ``left / L_f + overhead <= allowed``, where ``L_f`` is how fast the paused guest's last pages move,
   checks included (``Link.freeze_rate_bytes_s``, else ``L_r``) and ``overhead`` the fixed cost of the
   switchover (vCPU and device state, queued I/O, the target's check). The Frozen phase (the guest's
   downtime) then lasts ``left / L_f + overhead``. The simulated source keeps sending rounds until
   it is asked to freeze (``Link.settle_s`` later), then finishes the round under way and sends a
   few more while the freeze would take more than half the allowed downtime
   (``Link.pre_pause_rounds``; QEMU switches over at once). A migration not started yet also spends
   ``Link.setup_s`` outside Copy (Init, the I/O quiesce and the hand-over), counted in its total.
4. Auto-converge: after every *stalled* round (one that did not shrink what is left to at most
   ``STALL_RATIO`` of the round before), the guest's vCPUs are throttled: first
   ``throttle_initial_pct``, then ``throttle_increment_pct`` more per stalled round, up to
   ``throttle_max_pct``. A throttle of ``p`` percent scales the dirty rate by ``1 - p / 100``
   (QEMU's ``cpu-throttle-initial`` / ``cpu-throttle-increment`` / ``max-cpu-throttle``).
5. Downtime escalation: after every stalled round the allowed downtime rises by
   ``downtime_step_ms``, up to ``downtime_max_ms`` (oVirt's convergence schedule, Nova's
   ``live_migration_downtime_steps``).
6. The copy stops after ``max_rounds`` rounds or ``copy_limit_s`` seconds; ``at_limit`` then says
   what happens: ``"abort"`` (the migration fails, the guest stays on its source) or
   ``"switchover"`` (switch over anyway, accepting a downtime of ``left / L_f + overhead``;
   Nova's ``live_migration_timeout_action``). Switching over *now* (``switchover_now``): QEMU pauses
   at once; the simulated source first sends the rest of the round under way.
7. A promise it can keep: the measured ``D`` and ``L`` are noisy (a loaded host moves its dirty
   rounds slower, a guest writes in bursts), and near ``D ~ L`` a small error decides whether the
   last allowed round is enough. So "converges" is said only when the copy also converges with the
   guest writing ``1 + MARGIN`` times faster. When the measured rates converge but that careful run
   does not, the verdict is "converges only with throttling" if the policy's auto-converge rescues
   the careful run, else "may not converge under this policy: too close to promise"
   (``Verdict.MAY_NOT_CONVERGE``, ``Forecast.close_call``), with the numbers of the measured rates
   (what happens if they hold) and ``promises`` says what would make it a promise. "Will not
   converge" is said only when the measured rates themselves do not converge.
8. Local disks (live storage migration, ``Guest.disk_bytes``): the source mirrors them first, then the
   memory (Proxmox's order; ``hostagent/README.md``). The first pass reads the disks' data at the link
   rate ``L`` while the guest writes them at ``D_d``; the blocks it rewrote go again until the mirror
   catches up, a geometric series as in step 2: ``disk_s = A / (L - D_d)`` for ``A`` bytes of data
   (never ready when ``D_d >= L``). From then on every guest write to the disks is sent as it happens
   (write-blocking), so the memory's rounds get ``L - D_d``: the pair's bandwidth cap covers both.
   Copy lasts ``disk_s`` more. ``D_d`` is known once a mirror runs (the agent measures it); before the
   start it is 0 unless given (``explain`` says it is not counted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import StrEnum

STALL_RATIO = 0.9  # a round that leaves more than 90% of the round before did not make progress
MAX_SIMULATED_ROUNDS = 10_000  # a backstop: policies cap rounds far lower
DEFAULT_OVERHEAD_MS = 10.0  # switchover cost measured with the simulated driver (docs/convergence.md)
MB = 1_000_000
SIMULATED_PRE_PAUSE_ROUNDS = 5  # hostagent/drivers/simulated/source.py PRE_PAUSE_ROUNDS
CLICK_ROUNDS = 1  # a rescue must still work this many rounds later: the admin reads, then clicks
PAGE_BYTES = 4096
MARGIN = 0.25  # step 7: a verdict "converges" must hold with the guest writing this much faster


class Verdict(StrEnum):
    """The forecast's answer, in the words the dialog shows (``Verdict.X.label``)."""

    CONVERGES = "converges"
    CONVERGES_WITH_THROTTLE = "converges_with_throttle"
    SWITCHOVER_AT_LIMIT = "switchover_at_limit"
    MAY_NOT_CONVERGE = "may_not_converge"
    WILL_NOT_CONVERGE = "will_not_converge"

    @property
    def label(self) -> str:
        return {
            Verdict.CONVERGES: "converges",
            Verdict.CONVERGES_WITH_THROTTLE: "converges only with throttling",
            Verdict.SWITCHOVER_AT_LIMIT: "switches over at the limit, with a longer freeze",
            Verdict.MAY_NOT_CONVERGE: "may not converge under this policy: too close to promise",
            Verdict.WILL_NOT_CONVERGE: "will not converge under this policy",
        }[self]

    @property
    def warns(self) -> bool:
        """Whether the admin is warned: the migration will, or may, stop at its limit."""
        return self in (Verdict.MAY_NOT_CONVERGE, Verdict.WILL_NOT_CONVERGE)


@dataclass(frozen=True)
class Policy:
    """How a migration may behave. Defaults are the console's default policy.

    ``max_downtime_ms``: the allowed downtime (ms). ``bandwidth_cap_bytes_s``: None for no cap.
    ``auto_converge`` with ``throttle_*_pct`` (percent of vCPU time taken away). ``downtime_step_ms``
    and ``downtime_max_ms``: escalation (0 / None: off). ``max_rounds``, ``copy_limit_s`` (None:
    unlimited) and ``at_limit`` (``"abort"`` or ``"switchover"``).
    """

    max_downtime_ms: float = 300.0
    bandwidth_cap_bytes_s: float | None = None
    auto_converge: bool = False
    throttle_initial_pct: float = 20.0
    throttle_increment_pct: float = 10.0
    throttle_max_pct: float = 99.0
    downtime_step_ms: float = 0.0
    downtime_max_ms: float | None = None
    max_rounds: int = 30
    copy_limit_s: float | None = None
    at_limit: str = "abort"


@dataclass(frozen=True)
class Guest:
    """What the guest holds and how fast it writes.

    ``memory_bytes``: its memory size. ``written_bytes``: what round 1 must send (pages ever written);
    None means all of it. ``dirty_rate_bytes_s``: measured distinct-page write rate. ``working_set_bytes``:
    how much memory its writes land in; None means all of it. ``disk_bytes`` and
    ``disk_write_rate_bytes_s``: its local disks, mirrored before the memory (step 8).
    """

    memory_bytes: int
    dirty_rate_bytes_s: float
    written_bytes: int | None = None
    working_set_bytes: int | None = None
    disk_bytes: int = 0  # data of its local disks to mirror first (bytes; holes are not read): step 8
    disk_write_rate_bytes_s: float = 0.0  # how fast it writes those disks (bytes/s; 0: not known)

    @classmethod
    def measured(
        cls,
        memory_bytes: int,
        distinct_rate_bytes_s: float,
        window_s: float,
        written_bytes: int | None = None,
        working_set_bytes: int | None = None,
        throttle_pct: float = 0.0,
    ) -> Guest:
        """The guest as a dirty-rate measurement describes it (``write_rate`` undoes the saturation)."""
        wss = memory_bytes if working_set_bytes is None else max(1, min(working_set_bytes, memory_bytes))
        rate = write_rate(distinct_rate_bytes_s, window_s, wss)
        unthrottled = rate / max(1.0 - min(max(throttle_pct, 0.0), 99.0) / 100.0, 0.01)
        return cls(memory_bytes, unthrottled, written_bytes, working_set_bytes)

    @property
    def first_pass_bytes(self) -> int:
        return self.memory_bytes if self.written_bytes is None else min(self.written_bytes, self.memory_bytes)

    @property
    def write_set_bytes(self) -> int:
        wss = self.memory_bytes if self.working_set_bytes is None else self.working_set_bytes
        return max(1, min(wss, self.memory_bytes))


@dataclass(frozen=True)
class Link:
    """The path between two VSPs' data planes: ``rate_bytes_s`` measured, ``overhead_ms`` per switchover.

    ``round_rate_bytes_s``: how fast the later rounds' scattered dirty pages move, when known (a round of
    single pages costs the agents more per byte than round 1's long runs: the simulated agent judges
    convergence by it); None: the same as ``rate_bytes_s``. ``pre_pause_rounds``: once converged, the
    source sends up to this many more rounds while the freeze would take more than half the allowed
    downtime, before it pauses the guest, the round under way when it is asked to switch over always
    finishing first (the simulated agent: ``SIMULATED_PRE_PAUSE_ROUNDS``; QEMU: 0).
    ``round_overhead_s``: a dirty round's fixed cost (s) on top of its bytes / ``round_rate_bytes_s``.
    ``setup_s``: the time a migration spends outside Copy (s: Init, I/O quiesce, the hand-over), added
    to the total of a migration not started yet. ``settle_s``: of that, the time from convergence to
    the freeze request (the I/O quiesce), during which the simulated source keeps sending rounds (with
    ``pre_pause_rounds``). All 0 when not measured. ``freeze_rate_bytes_s``: how fast what is left
    moves when the guest is paused, checks included (the simulated agents hash every page they move,
    and the source judges convergence by send and hash together); None: the dirty rounds' rate.
    """

    rate_bytes_s: float
    overhead_ms: float = DEFAULT_OVERHEAD_MS
    round_rate_bytes_s: float | None = None
    pre_pause_rounds: int = 0
    round_overhead_s: float = 0.0
    setup_s: float = 0.0
    settle_s: float = 0.0
    freeze_rate_bytes_s: float | None = None


@dataclass(frozen=True)
class CopyState:
    """Where a running pre-copy stands (for the live forecast); a new migration starts at ``CopyState()``.

    ``round``: rounds finished. ``left_bytes``: dirty bytes waiting for the next round (None before round 1
    ends). ``elapsed_s``: Copy seconds so far. ``throttle_pct`` and ``allowed_downtime_ms`` (None: the
    policy's) as they are now; ``last_round_bytes``: what the last round sent (stall detection).
    ``round_left_bytes``: the part of ``left_bytes`` the round under way has still to send (the rest was
    dirtied since it began); None: not known, taken as all of it.
    ``first_pass_left_bytes``: while round 1 runs (``left_bytes`` None), what it has still to send
    (bytes); None: all of the guest's written memory (a migration not started yet). Round 1 then ends
    after that over the link rate, and what the guest dirtied since round 1 began (``elapsed_s`` ago)
    waits for round 2. ``disk_left_bytes``: while a local-disk mirror has not caught up, what it has
    still to copy (the memory's rounds have not begun); 0 once it did, or without one.
    """

    round: int = 0
    left_bytes: float | None = None
    elapsed_s: float = 0.0
    throttle_pct: float = 0.0
    allowed_downtime_ms: float | None = None
    last_round_bytes: float | None = None
    round_left_bytes: float | None = None
    first_pass_left_bytes: float | None = None
    disk_left_bytes: float = 0.0  # what the disk mirror has still to copy before the memory begins (step 8)


@dataclass(frozen=True)
class Forecast:
    """The answer. Times in s and ms; ``rounds`` counts pre-copy rounds including round 1.

    ``converged_round``: the round whose end saw convergence (None when it does not converge). The
    round limit (``Policy.max_rounds``) bounds it, as the agents' does: convergence must be seen by the
    end of round ``max_rounds``. The rounds the simulated source sends after that, until it freezes
    the guest (step 3), are not counted against the limit: ``rounds`` includes them, so it may exceed
    ``max_rounds``; the agent's round counter (the run's "round") does the same.

    ``copy_s``: Copy phase duration; ``total_s``: Copy plus the switchover (Init and I/O Quiesce are not
    modelled: they are short and do not depend on the guest). ``downtime_ms`` is the expected Frozen
    time at the switchover, None when the migration would abort. ``throttle_pct`` and
    ``allowed_downtime_ms`` are the values in force at the end (after auto-converge and escalation).
    ``left_bytes_at_limit``: what was left when the limit hit (the cost of a forced switchover).
    ``disk_s``: the part of ``copy_s`` the local disks' mirror takes (step 8; ``math.inf``: it never
    catches up, the verdict then "will not converge" at ``limit_reason``).
    ``close_call``: the measured rates alone converge, but not with the ``MARGIN`` a promise needs
    (step 7): the verdict is ``Verdict.MAY_NOT_CONVERGE``, the times, rounds and downtime those of the
    measured rates (what happens if they hold), ``limit_reason`` and ``left_bytes_at_limit`` those of
    the careful run (where it would stop).
    """

    verdict: Verdict
    copy_s: float
    total_s: float
    downtime_ms: float | None
    rounds: int
    throttle_pct: float
    allowed_downtime_ms: float
    left_bytes_at_limit: float | None = None
    limit_reason: str = ""
    close_call: bool = False
    trail: list[tuple[int, float, float]] = field(default_factory=list, repr=False)  # (round, bytes, t_s)
    converged_round: int | None = None
    disk_s: float = 0.0  # of ``copy_s``: the local disks' mirror before the memory (step 8)

    @property
    def converges(self) -> bool:
        return self.verdict in (Verdict.CONVERGES, Verdict.CONVERGES_WITH_THROTTLE)


def effective_rate(link: Link, policy: Policy) -> float:
    """Bytes/s the data plane gets: the link's measured rate, capped by the policy.

    Raises ValueError when that is not a positive number.
    """
    rate = link.rate_bytes_s
    if policy.bandwidth_cap_bytes_s:
        rate = min(rate, policy.bandwidth_cap_bytes_s)
    if not rate or rate <= 0 or math.isnan(rate):
        raise ValueError("the link rate must be a positive number of bytes per second")
    return rate


def round_rate(link: Link, policy: Policy) -> float:
    """Bytes/s of the dirty rounds and the switchover: ``link.round_rate_bytes_s`` (else its rate), capped."""
    if link.round_rate_bytes_s is None:
        return effective_rate(link, policy)
    return effective_rate(replace(link, rate_bytes_s=link.round_rate_bytes_s), policy)


def freeze_ms(link: Link, policy: Policy, left_bytes: float) -> float:
    """The freeze (ms) to move ``left_bytes`` with the guest paused: ``left / L_f + overhead`` (step 3).

    ``L_f`` is ``link.freeze_rate_bytes_s`` when known (never above the dirty rounds' rate), else the
    dirty rounds' rate (``round_rate``).
    """
    rate = round_rate(link, policy)
    if link.freeze_rate_bytes_s is not None and link.freeze_rate_bytes_s > 0:
        rate = min(rate, link.freeze_rate_bytes_s)
    return 1000.0 * max(left_bytes, 0.0) / rate + link.overhead_ms


def dirtied_bytes(guest: Guest, seconds: float, throttle_pct: float = 0.0) -> float:
    """Distinct bytes the guest dirties in ``seconds`` under a throttle: ``min(D t, W)`` (step 2)."""
    rate = max(0.0, guest.dirty_rate_bytes_s) * (1.0 - min(max(throttle_pct, 0.0), 100.0) / 100.0)
    return min(rate * max(seconds, 0.0), float(guest.write_set_bytes))


def dirty_round_cost(rounds: list[tuple[float, float]]) -> tuple[float, float] | None:
    """The dirty rounds' rate (bytes/s) and fixed cost per round (s), from measured rounds.

    ``rounds``: (bytes sent, seconds taken) of dirty rounds (round 2 on) of one migration. A
    least-squares line ``seconds = cost + bytes / rate`` through them gives ``Link.round_rate_bytes_s``
    and ``Link.round_overhead_s``; when the line makes no sense (rounds of about one size, or noise
    giving a negative cost or slope), the mean rate with no fixed cost. None with fewer than two rounds
    or no time measured.
    """
    rounds = [(float(sent), float(seconds)) for sent, seconds in rounds if sent > 0 and seconds > 0]
    if len(rounds) < 2:
        return None
    mean_b = sum(sent for sent, _ in rounds) / len(rounds)
    mean_t = sum(seconds for _, seconds in rounds) / len(rounds)
    spread = sum((sent - mean_b) ** 2 for sent, _ in rounds)
    slope = sum((sent - mean_b) * (seconds - mean_t) for sent, seconds in rounds) / spread if spread else 0.0
    cost = mean_t - slope * mean_b
    if slope <= 0 or cost < 0:
        return sum(sent for sent, _ in rounds) / sum(seconds for _, seconds in rounds), 0.0
    return 1 / slope, cost


SATURATED = 0.99  # past this share of the working set dirty, faster writes cannot be told apart


def write_rate(distinct_rate_bytes_s: float, window_s: float, working_set_bytes: float) -> float:
    """The guest's write rate ``D`` (bytes/s) from a measured *distinct* dirty rate (bytes/s).

    An agent counts the distinct pages dirtied over ``window_s`` (the dirty-rate endpoint; a round's
    ``dirty_rate_bytes_s``, whose window is the round). Writes landing at random within a working set
    ``W`` hit ``W * (1 - exp(-D t / W))`` distinct bytes (the law the simulated agent's dirty-rate
    endpoint reports by, and what QEMU's sampled ``calc-dirty-rate`` sees of rewritten hot pages), so a
    measurement over a window that is long against ``W / D`` reads low: an 8 MiB guest writing 12 MB/s
    measured over 1.5 s reads 5.1 MB/s. This inverts it: ``D = -W / t * ln(1 - d t / W)``, with
    ``d t / W`` capped at ``SATURATED`` (then ``D`` is a lower bound). For writes that never repeat a
    page it reads a little high near saturation, the safe side for step 2. Zero or a zero window:
    returned as it is.
    """
    if distinct_rate_bytes_s <= 0 or window_s <= 0 or working_set_bytes <= 0:
        return max(0.0, distinct_rate_bytes_s)
    share = min(distinct_rate_bytes_s * window_s / working_set_bytes, SATURATED)
    return -working_set_bytes / window_s * math.log1p(-share)


def forecast(guest: Guest, link: Link, policy: Policy, state: CopyState | None = None) -> Forecast:
    """Simulate pre-copy round by round and say how it ends, keeping only promises it can keep.

    Steps 1-6 of the module docstring with the measured rates, then step 7: a verdict that converges
    must also converge with the guest writing ``1 + MARGIN`` times faster; else "converges only with
    throttling" when the policy's auto-converge rescues the careful run, or ``Verdict.MAY_NOT_CONVERGE``
    (marked ``close_call``) with the measured rates' numbers and the careful run's limit. ``state``
    continues a running migration (the live panel); None forecasts one not started yet. Raises
    ValueError when the link rate is not a positive number.
    """
    nominal = _simulate(guest, link, policy, state)
    if not nominal.converges:
        return nominal
    busier = replace(guest, dirty_rate_bytes_s=guest.dirty_rate_bytes_s * (1 + MARGIN))
    careful = _simulate(busier, link, policy, state)
    if careful.converges:
        if careful.verdict is Verdict.CONVERGES_WITH_THROTTLE:
            return replace(nominal, verdict=Verdict.CONVERGES_WITH_THROTTLE)
        return nominal
    return replace(
        nominal,
        verdict=Verdict.MAY_NOT_CONVERGE,
        close_call=True,
        limit_reason=careful.limit_reason,
        left_bytes_at_limit=careful.left_bytes_at_limit,
    )


def mirror_seconds(guest: Guest, link: Link, policy: Policy, left_bytes: float) -> float:
    """Seconds until the local disks' mirror catches up with ``left_bytes`` still to copy (step 8):
    ``left / (L - D_d)``; ``math.inf`` when the guest writes its disks as fast as the link carries."""
    if left_bytes <= 0:
        return 0.0
    net = effective_rate(link, policy) - max(0.0, guest.disk_write_rate_bytes_s)
    return left_bytes / net if net > 0 else math.inf


def _simulate(guest: Guest, link: Link, policy: Policy, state: CopyState | None) -> Forecast:
    """Pre-copy round by round (steps 1-6 and 8 of the module docstring), with the rates as given."""
    disk_left = float(guest.disk_bytes) if state is None else state.disk_left_bytes
    disk_s = mirror_seconds(guest, link, policy, disk_left)
    first_rate, rate = effective_rate(link, policy), round_rate(link, policy)
    setup = link.setup_s if state is None else 0.0
    state = state or CopyState()
    allowed = state.allowed_downtime_ms if state.allowed_downtime_ms is not None else policy.max_downtime_ms
    throttle, elapsed, rounds = state.throttle_pct, state.elapsed_s, state.round
    if math.isinf(disk_s):
        reason = "the disk mirror, which never catches up with the guest's writes to its local disks"
        return replace(
            _at_limit(policy, elapsed, setup, rounds, throttle, allowed, disk_left, 0.0, reason, []),
            verdict=Verdict.WILL_NOT_CONVERGE,
            downtime_ms=None,
            disk_s=disk_s,
        )
    elapsed += disk_s
    if guest.disk_write_rate_bytes_s > 0 and guest.disk_bytes:  # write-blocking shares the link (step 8)
        first_rate = max(first_rate - guest.disk_write_rate_bytes_s, 1.0)
        rate = max(rate - guest.disk_write_rate_bytes_s, 1.0)
    last_round = state.last_round_bytes
    left = state.left_bytes
    trail: list[tuple[int, float, float]] = []
    # The agent judges a round once, when it ends (stall -> throttle and escalation, then "does it fit?");
    # a running migration's state is a round the agent judged already.
    judged = state.left_bytes is not None
    if left is None:  # round 1: the whole written memory (or what it has still to send); never "stalled"
        first_pass = float(guest.first_pass_bytes)
        if state.first_pass_left_bytes is not None:
            first_pass = max(0.0, min(state.first_pass_left_bytes, first_pass))
        seconds = first_pass / first_rate
        round_s = seconds + (elapsed if state.first_pass_left_bytes is not None else 0.0)
        rounds, elapsed, last_round = 1, elapsed + seconds, None
        left = dirtied_bytes(guest, round_s, throttle)
        trail.append((rounds, float(first_pass), elapsed))
        judged = True
    ever_throttled = throttle > 0
    while True:
        if not judged and last_round is not None and left > STALL_RATIO * last_round:
            # As the agent does after a stalled round: the new throttle slows the writes of the next
            # round on, the raised downtime counts for this very judgement.
            if policy.auto_converge:
                throttle = _next_throttle(policy, throttle)
                ever_throttled = True
            if policy.downtime_step_ms > 0:
                ceiling = policy.downtime_max_ms if policy.downtime_max_ms is not None else allowed
                allowed = min(allowed + policy.downtime_step_ms, max(ceiling, allowed))
        judged = False
        downtime_ms = freeze_ms(link, policy, left)
        if downtime_ms <= allowed:
            verdict = Verdict.CONVERGES_WITH_THROTTLE if ever_throttled else Verdict.CONVERGES
            copy_s, converged_round = elapsed, rounds
            if link.pre_pause_rounds > 0:  # step 3: the simulated source's rounds before its pause
                rounds, elapsed, left = _settle(
                    guest, link, policy, rate, throttle, allowed, rounds, elapsed, left, trail
                )
                downtime_ms = freeze_ms(link, policy, left)
            # setup_s holds the time from convergence to the freeze: only rounds past it add to the total
            after_freeze_s = max(0.0, elapsed - copy_s - link.settle_s)
            return Forecast(
                verdict,
                copy_s,
                setup + copy_s + after_freeze_s + downtime_ms / 1000,
                downtime_ms,
                rounds,
                throttle,
                allowed,
                trail=trail,
                converged_round=converged_round,
                disk_s=disk_s,
            )
        reason = _limit_reached(policy, rounds, elapsed)
        if reason:
            ended = (elapsed, setup, rounds, throttle, allowed, left, downtime_ms)
            return replace(_at_limit(policy, *ended, reason, trail), disk_s=disk_s)
        seconds = left / rate + link.round_overhead_s
        rounds, elapsed, last_round = rounds + 1, elapsed + seconds, left
        trail.append((rounds, left, elapsed))
        left = dirtied_bytes(guest, seconds, throttle)


SETTLE_ROUNDS_MAX = 200  # rounds shrinking toward nothing: the backstop of ``_settle``'s loop


def _settle(
    guest: Guest,
    link: Link,
    policy: Policy,
    rate: float,
    throttle: float,
    allowed: float,
    rounds: int,
    elapsed: float,
    left: float,
    trail: list[tuple[int, float, float]],
) -> tuple[int, float, float]:
    """The simulated source's rounds from convergence to the pause (step 3): (rounds, elapsed s, left).

    It keeps sending rounds until it is asked to freeze ``link.settle_s`` later (the console's I/O
    quiesce), the round under way then finishing; then up to ``link.pre_pause_rounds`` more while the
    freeze would take more than half the allowed downtime. Appends each round to ``trail``.
    """
    freeze_at = elapsed + link.settle_s

    def send() -> None:
        nonlocal rounds, elapsed, left
        seconds = left / rate + link.round_overhead_s
        rounds, elapsed = rounds + 1, elapsed + seconds
        trail.append((rounds, left, elapsed))
        left = dirtied_bytes(guest, seconds, throttle)

    if left >= PAGE_BYTES:
        send()  # the round under way when convergence is seen
    for _ in range(SETTLE_ROUNDS_MAX):
        if elapsed >= freeze_at or left < PAGE_BYTES:
            break
        send()
    for _ in range(link.pre_pause_rounds):
        if freeze_ms(link, policy, left) <= allowed / 2:
            break
        send()
    return rounds, elapsed, left


def _limit_reached(policy: Policy, rounds: int, elapsed: float) -> str:
    if rounds >= min(policy.max_rounds, MAX_SIMULATED_ROUNDS):
        return f"the round limit ({policy.max_rounds} rounds)"
    if policy.copy_limit_s is not None and elapsed >= policy.copy_limit_s:
        return f"the Copy time limit ({policy.copy_limit_s:g} s)"
    return ""


def _at_limit(
    policy: Policy,
    elapsed: float,
    setup: float,
    rounds: int,
    throttle: float,
    allowed: float,
    left: float,
    downtime_ms: float,
    reason: str,
    trail: list[tuple[int, float, float]],
) -> Forecast:
    if policy.at_limit == "switchover":
        return Forecast(
            Verdict.SWITCHOVER_AT_LIMIT,
            elapsed,
            setup + elapsed + downtime_ms / 1000,
            downtime_ms,
            rounds,
            throttle,
            allowed,
            left_bytes_at_limit=left,
            limit_reason=reason,
            trail=trail,
        )
    return Forecast(
        Verdict.WILL_NOT_CONVERGE,
        elapsed,
        setup + elapsed,
        None,
        rounds,
        throttle,
        allowed,
        left_bytes_at_limit=left,
        limit_reason=reason,
        trail=trail,
    )


def _next_throttle(policy: Policy, throttle: float) -> float:
    step = policy.throttle_initial_pct if throttle <= 0 else throttle + policy.throttle_increment_pct
    return min(step, policy.throttle_max_pct)


# --- what the admin reads ---------------------------------------------------------------------------


def rounds_words(result: Forecast, policy: Policy) -> str:
    """The rounds of a converging ``result`` against the round limit, in words.

    "converging in round 30 of the 30 allowed, then 1 more round before the freeze": the limit bounds
    the round that sees convergence (``Forecast.converged_round``); the rounds after it, until the guest
    is frozen, are not counted against it (docs/convergence.md step 6).
    """
    seen = result.converged_round if result.converged_round is not None else result.rounds
    words = f"converging in round {seen} of the {policy.max_rounds} allowed"
    after = result.rounds - seen
    if after > 0:
        words += f", then {after} more round{'s' if after != 1 else ''} before the freeze"
    return words


def bottleneck(guest: Guest, link: Link, policy: Policy) -> str:
    """Why Copy does not converge, in plain words; "" when it converges as it is."""
    rate = round_rate(link, policy)
    unthrottled = forecast(guest, link, replace(policy, auto_converge=False, at_limit="abort"))
    if unthrottled.converges:
        return ""
    capped = policy.bandwidth_cap_bytes_s is not None and policy.bandwidth_cap_bytes_s < link.rate_bytes_s
    if guest.dirty_rate_bytes_s >= rate:
        writes, carried = mb_apart(guest.dirty_rate_bytes_s, rate)
        if writes == carried:  # equal even to 1 kB/s: "more than" would read false
            limit = "the bandwidth cap lets through" if capped else "the link carries"
            return f"the guest writes {writes}, as fast as {limit}"
        if capped:
            return f"the guest writes {writes}, more than the bandwidth cap of {carried} lets through"
        return f"the guest writes faster ({writes}) than the link carries ({carried})"
    if unthrottled.close_call:
        return (
            f"the guest writes {mb(guest.dirty_rate_bytes_s)}, "
            f"{100 * guest.dirty_rate_bytes_s / rate:.0f}% of what the link carries ({mb(rate)}): "
            "too close to promise"
        )
    return (
        f"what the guest rewrites during one round takes longer to send than the allowed downtime "
        f"of {ms(policy.max_downtime_ms)}"
    )


@dataclass(frozen=True)
class Rescue:
    """One way to make a stalled migration finish: ``action`` (machine name), ``words``, ``forecast``.

    For the live panel's one-click buttons (``rescues``): ``label`` is the button's text ("Raise the
    allowed downtime to 53.7 s"), ``cost`` what it costs, said beside it, and ``downtime_ms`` the exact
    value a ``raise_downtime`` button submits (ms; what ``label`` shows, to the tenth of a second).
    """

    action: str
    words: str
    forecast: Forecast
    label: str = ""
    cost: str = ""
    downtime_ms: float | None = None


def rescues(
    guest: Guest, link: Link, policy: Policy, state: CopyState, *, can_throttle: bool = True
) -> list[Rescue]:
    """What would rescue a running migration from ``state``, and what each costs, cheapest freeze first.

    Offers: raising the allowed downtime to what one more round would need, throttling the guest
    (only when the source can turn it on mid-migration, ``can_throttle``: QEMU cannot; and only when
    the agent's stepwise throttle, started now, completes within the rounds and time left with
    ``CLICK_ROUNDS`` to spare), and switching over now (``switchover_now``).
    """
    options: list[Rescue] = []
    needed_ms = _downtime_that_converges(guest, link, policy, state)
    if needed_ms is not None:
        raised = replace(policy, max_downtime_ms=needed_ms, at_limit="abort")
        result = forecast(guest, link, raised, replace(state, allowed_downtime_ms=needed_ms))
        if result.converges:
            more = seconds_words(max(result.total_s - state.elapsed_s, 0))
            cost = f"frozen about {ms(result.downtime_ms or needed_ms)}, about {more} more"
            label = f"Raise the allowed downtime to {ms(needed_ms)}"
            options.append(
                Rescue("raise_downtime", f"{label[0].lower()}{label[1:]}", result, label, cost, needed_ms)
            )
    if can_throttle and not policy.auto_converge:
        # Offered only if it completes with a round to spare: the click lands while a round runs, and
        # the agent throttles from the round judged after it (20% first, then 10% more per stalled round).
        rounds_left = policy.max_rounds - CLICK_ROUNDS
        throttled = replace(policy, auto_converge=True, at_limit="abort", max_rounds=rounds_left)
        result = forecast(guest, link, throttled, state)
        if result.converges:
            cost = (
                f"up to {result.throttle_pct:.0f}% of its vCPU time, "
                f"about {seconds_words(max(result.total_s - state.elapsed_s, 0))} more"
            )
            options.append(
                Rescue("auto_converge", f"throttle the guest ({cost})", result, "Throttle the guest", cost)
            )
    now_ms, finishing_s = switchover_now(guest, link, policy, state)
    now = Forecast(
        Verdict.CONVERGES,
        state.elapsed_s + finishing_s,
        state.elapsed_s + finishing_s + now_ms / 1000,
        now_ms,
        state.round,
        state.throttle_pct,
        max(now_ms, policy.max_downtime_ms),
    )
    cost = f"about {seconds_words(now_ms / 1000)} frozen"
    if finishing_s >= 1:
        cost += f", once the round under way is sent (about {seconds_words(finishing_s)} more)"
    options.append(Rescue("switchover", f"switch over now: {cost}", now, "Switch over now", cost))
    return sorted(options, key=lambda rescue: rescue.forecast.downtime_ms or math.inf)


PROMISE_DOWNTIME_MAX_MS = 10_000.0  # ``promises`` looks no further for an allowed downtime
PROMISE_ROUNDS_MAX = 200  # ... nor for a round limit


def promises(guest: Guest, link: Link, policy: Policy) -> list[Rescue]:
    """What would make a forecast of a migration not started yet a promise (a converging verdict).

    For "may not converge" (a close call) or "will not converge": each policy change, alone, under
    which ``forecast`` converges with the margin of step 7: the smallest allowed downtime (in 50 ms
    steps, up to ``PROMISE_DOWNTIME_MAX_MS``; action ``raise_downtime``), throttling turned on when it
    is off (``auto_converge``), the smallest round limit (up to ``PROMISE_ROUNDS_MAX``; ``max_rounds``,
    the console's site setting). Empty when none does (or the forecast converges already). Each
    ``Rescue.forecast`` is the forecast under that change.
    """
    if forecast(guest, link, policy).converges:
        return []
    options: list[Rescue] = []
    start = math.floor(policy.max_downtime_ms / 50.0) * 50.0 + 50.0
    for needed in _steps(start, PROMISE_DOWNTIME_MAX_MS, 50.0):
        ceiling = policy.downtime_max_ms
        raised = replace(
            policy,
            max_downtime_ms=needed,
            downtime_max_ms=None if ceiling is None else max(ceiling, needed),
        )
        result = forecast(guest, link, raised)
        if result.converges:
            options.append(Rescue("raise_downtime", f"allow {ms(needed)} of downtime", result))
            break
    if not policy.auto_converge:
        result = forecast(guest, link, replace(policy, auto_converge=True))
        if result.converges:
            words = "turn on throttling (auto-converge)"
            if result.throttle_pct > 0:
                words = f"turn on throttling (up to {result.throttle_pct:.0f}% of the guest's vCPU time)"
            options.append(Rescue("auto_converge", words, result))
    for rounds in range(policy.max_rounds + 1, PROMISE_ROUNDS_MAX + 1):
        result = forecast(guest, link, replace(policy, max_rounds=rounds))
        if result.converges:
            words = f"allow {rounds} rounds (the site's round limit, now {policy.max_rounds})"
            options.append(Rescue("max_rounds", words, result))
            break
    return options


def _steps(start: float, stop: float, step: float) -> list[float]:
    return [start + step * index for index in range(int((stop - start) // step) + 1)]


def switchover_now(guest: Guest, link: Link, policy: Policy, state: CopyState) -> tuple[float, float]:
    """Switching over now: the freeze (ms) and the seconds the guest still runs before it (step 6).

    A source that pauses at once (QEMU: ``link.pre_pause_rounds`` 0) freezes for all that is left:
    ``left / L_r + overhead``. The simulated source first finishes the round under way
    (``state.round_left_bytes``, else all of ``left``) while the guest runs, which dirties more
    meanwhile: frozen for ``min(left - rest + dirtied(rest / L_r), W) / L_r + overhead``.
    """
    rate = round_rate(link, policy)
    left = state.left_bytes if state.left_bytes is not None else float(guest.first_pass_bytes)
    if link.pre_pause_rounds <= 0:
        return freeze_ms(link, policy, left), 0.0
    rest = left if state.round_left_bytes is None else min(max(state.round_left_bytes, 0.0), left)
    finishing_s = rest / rate
    dirtied = dirtied_bytes(guest, finishing_s, state.throttle_pct)
    frozen = min(left - rest + dirtied, float(guest.write_set_bytes))
    return freeze_ms(link, policy, frozen), finishing_s


def _downtime_that_converges(guest: Guest, link: Link, policy: Policy, state: CopyState) -> float | None:
    """The smallest allowed downtime (ms) under which one more round ends the copy, with the guest writing
    ``MARGIN`` faster than measured (step 7); rounded up to 50 ms, or to 100 ms from 1 s, so that ``ms``
    shows it exactly (the panel's button says "53.7 s" and submits 53,700 ms)."""
    rate = round_rate(link, policy)
    left = state.left_bytes if state.left_bytes is not None else float(guest.first_pass_bytes)
    busier = replace(guest, dirty_rate_bytes_s=guest.dirty_rate_bytes_s * (1 + MARGIN))  # step 7
    next_left = dirtied_bytes(busier, left / rate + link.round_overhead_s, state.throttle_pct)
    needed = freeze_ms(link, policy, next_left)
    current = state.allowed_downtime_ms or policy.max_downtime_ms
    if needed <= current:
        return None
    step = 100.0 if needed >= 950.0 else 50.0
    return math.ceil(needed / step) * step


def explain(
    guest: Guest, link: Link, policy: Policy, result: Forecast, *, vm: str, target: str, link_source: str
) -> list[str]:
    """The sentences behind a verdict, e.g. "db01 writes 410 MB/s; the link to vsp2 carried 650 MB/s ...".

    ``link_source`` says where the link rate comes from ("on its last migration", "in a probe 2 min ago");
    an empty one means the link is not measured and ``link`` is the policy's bandwidth cap (a best case).
    """
    rate = effective_rate(link, policy)
    if not link_source:
        writes, allowed = mb_apart(guest.dirty_rate_bytes_s, rate)
        lines = [
            f"{vm} writes {writes}; the link to {target} is not measured yet "
            f"(no migration between them), and the bandwidth cap allows at most {allowed}."
        ]
    else:
        writes, carried = mb_apart(guest.dirty_rate_bytes_s, link.rate_bytes_s)
        lines = [f"{vm} writes {writes}; the link to {target} carried {carried} {link_source}."]
    if link_source and rate < link.rate_bytes_s:
        lines.append(f"The bandwidth cap allows {mb_apart(rate, link.rate_bytes_s)[0]}.")
    if guest.disk_bytes:
        lines.append(disk_words(guest, link, policy, result, measured=bool(link_source)))
    if result.converges:  # its time and freeze are the verdict's own line: said once (issue 21.4)
        lines.append(
            f"Expected: {rounds_words(result, policy)}, within the allowed downtime of "
            f"{ms(result.allowed_downtime_ms)}."
        )
        if result.verdict is Verdict.CONVERGES_WITH_THROTTLE:
            # The same throttle as the policy's summary ("throttles the guest up to 99%"): its ceiling,
            # and how far this migration is expected to take it (issue 21.4: "up to 30%" beside "99%").
            lines.append(
                f"Throttling expected to reach {result.throttle_pct:.0f}% (the policy allows up to "
                f"{policy.throttle_max_pct:.0f}%)."
            )
    elif result.verdict is Verdict.MAY_NOT_CONVERGE:
        lines.append(
            f"If the measured rates hold: {duration_words(result.total_s)}, {rounds_words(result, policy)}, "
            f"frozen about {ms(result.downtime_ms or 0)} (allowed {ms(result.allowed_downtime_ms)})."
        )
        reason = bottleneck(guest, link, policy) or "too close to promise"
        stops = "switch over anyway" if policy.at_limit == "switchover" else "stop"
        lines.append(
            f"With the guest writing {100 * MARGIN:.0f}% faster it would {stops} at "
            f"{result.limit_reason or 'its limit'}: {reason}."
        )
        options = promises(guest, link, policy)
        if options:
            lines.append("A promise with any one of: " + "; ".join(option.words for option in options) + ".")
    elif result.verdict is Verdict.SWITCHOVER_AT_LIMIT:
        lines.append(
            f"At {result.limit_reason} it switches over anyway: about "
            f"{seconds_words((result.downtime_ms or 0) / 1000)} frozen."
        )
    else:  # where and when it stops is the verdict's own line (the dialog's headline): here only why
        reason = bottleneck(guest, link, policy) or "what is left does not shrink fast enough"
        lines.append(f"Because {reason}.")
    return lines


def disk_words(guest: Guest, link: Link, policy: Policy, result: Forecast, *, measured: bool) -> str:
    """The local disks' part of a forecast (step 8): "Copies 40 GiB of disk first: about 6 min 40 s at
    the pair's measured rate (100 MB/s); then memory." with what it cannot count."""
    rate = effective_rate(link, policy)
    at = f"the pair's measured rate ({mb(rate)})" if measured else f"the bandwidth cap ({mb(rate)})"
    if math.isinf(result.disk_s):
        return (
            f"Copies {size_words(guest.disk_bytes)} of disk first, but never catches up: the guest writes "
            f"its local disks at {mb(guest.disk_write_rate_bytes_s)}, at least {at}."
        )
    words = (
        f"Copies {size_words(guest.disk_bytes)} of disk first: about {duration_words(result.disk_s)} at {at}"
    )
    if guest.disk_write_rate_bytes_s > 0:
        return f"{words}, the guest writing them at {mb(guest.disk_write_rate_bytes_s)}; then memory."
    return f"{words}; then memory (the guest's writes to its disks are not measured before the start)."


def size_words(size: float) -> str:
    """Bytes for people, as the pages write them (``vms.devices.size_text``): "40 GiB", "1.5 MiB"."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    value, unit = float(size), 0
    while value >= 1024 and unit < len(units) - 1:
        value, unit = value / 1024, unit + 1
    return f"{f'{value:.1f}'.removesuffix('.0')} {units[unit]}"


def mb(bytes_s: float, decimals: int | None = None) -> str:
    """A rate in MB/s (10^6 bytes), as admins read link and dirty rates: whole from 10 MB/s, else one
    decimal; ``decimals`` forces that many."""
    value = bytes_s / MB
    if decimals is None:
        decimals = 0 if value >= 10 else 1
    return f"{value:.{decimals}f} MB/s"


def mb_apart(first: float, second: float) -> tuple[str, str]:
    """Two rates (bytes/s) as ``mb`` words, with as many decimals (up to 3) as it takes to tell them
    apart, so a sentence that compares them never reads "10 MB/s, more than the cap of 10 MB/s".
    The same words for both means they are equal to 1 kB/s."""
    words = (mb(first), mb(second))
    for decimals in (1, 2, 3):
        if words[0] != words[1] or first == second:
            break
        words = (mb(first, decimals), mb(second, decimals))
    return words


def ms(milliseconds: float) -> str:
    return f"{milliseconds / 1000:.1f} s" if milliseconds >= 1000 else f"{milliseconds:.0f} ms"


def duration_words(value: float | None) -> str:
    """A duration, forecast or time left in words, the console's one format (the ``seconds`` template
    filter): "not known yet" for None, "under 1 s" for less than a second (rounded it read "took 0 s"),
    else "42 s" or "3 min 5 s"."""
    if value is None:
        return "not known yet"
    if 0 < value < 1:
        return "under 1 s"
    whole = round(value)
    if whole < 60:
        return f"{whole} s"
    return f"{whole // 60} min {whole % 60} s"


def seconds_words(seconds: float) -> str:
    """A duration for a sentence: "0.4 s", "12 s", "2.5 min" (tenths below 10 s, so never "0 s")."""
    if seconds >= 90:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
