"""Will a pre-copy migration converge, how long will it take, how long will the guest be frozen?

Plain Python, no Django: the migrate dialog, the live phases panel, the REST API and evacuation plans
all ask this module, with plain numbers (bytes, bytes/s, ms, s). The model is documented, with a worked
example, in ``docs/convergence.md``; in short (Clark et al., "Live Migration of Virtual Machines",
NSDI 2005, sections 3 and 5):

1. Round 1 sends every written page of the guest once, at the link rate ``L`` (capped by the policy's
   bandwidth cap). Pages never written travel as zero markers and cost nothing here.
2. While a round of ``t`` seconds is on the wire, the guest dirties pages at ``D`` bytes/s; the next
   round sends those. Writes fall within a working set of ``W`` bytes, so one round never holds more
   than ``W``: ``dirtied(t) = W * (1 - exp(-D * t / W))`` (distinct pages hit by writes spread over the
   working set; about ``D * t`` while ``D * t`` is small against ``W``). Each round is thus about
   ``D / L`` of the one before: it converges when ``D`` is well below ``L``.
3. The copy converges when what is left would move within the allowed downtime:
   ``left / L + overhead <= allowed``. The Frozen phase (the guest's downtime) then lasts
   ``left / L + overhead``, where ``overhead`` is the fixed cost of the switchover (vCPU and device
   state, queued I/O, the target's check).
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
   ``"switchover"`` (switch over anyway, accepting a downtime of ``left / L + overhead``;
   Nova's ``live_migration_timeout_action``).
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


class Verdict(StrEnum):
    """The forecast's answer, in the words the dialog shows (``Verdict.X.label``)."""

    CONVERGES = "converges"
    CONVERGES_WITH_THROTTLE = "converges_with_throttle"
    SWITCHOVER_AT_LIMIT = "switchover_at_limit"
    WILL_NOT_CONVERGE = "will_not_converge"

    @property
    def label(self) -> str:
        return {
            Verdict.CONVERGES: "converges",
            Verdict.CONVERGES_WITH_THROTTLE: "converges only with throttling",
            Verdict.SWITCHOVER_AT_LIMIT: "switches over at the limit, with a longer freeze",
            Verdict.WILL_NOT_CONVERGE: "will not converge under this policy",
        }[self]


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
    how much memory its writes land in; None means all of it.
    """

    memory_bytes: int
    dirty_rate_bytes_s: float
    written_bytes: int | None = None
    working_set_bytes: int | None = None

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
    """

    rate_bytes_s: float
    overhead_ms: float = DEFAULT_OVERHEAD_MS
    round_rate_bytes_s: float | None = None
    pre_pause_rounds: int = 0


@dataclass(frozen=True)
class CopyState:
    """Where a running pre-copy stands (for the live forecast); a new migration starts at ``CopyState()``.

    ``round``: rounds finished. ``left_bytes``: dirty bytes waiting for the next round (None before round 1
    ends). ``elapsed_s``: Copy seconds so far. ``throttle_pct`` and ``allowed_downtime_ms`` (None: the
    policy's) as they are now; ``last_round_bytes``: what the last round sent (stall detection).
    """

    round: int = 0
    left_bytes: float | None = None
    elapsed_s: float = 0.0
    throttle_pct: float = 0.0
    allowed_downtime_ms: float | None = None
    last_round_bytes: float | None = None


@dataclass(frozen=True)
class Forecast:
    """The answer. Times in s and ms; ``rounds`` counts pre-copy rounds including round 1.

    ``copy_s``: Copy phase duration; ``total_s``: Copy plus the switchover (Init and I/O Quiesce are not
    modelled: they are short and do not depend on the guest). ``downtime_ms`` is the expected Frozen
    time at the switchover, None when the migration would abort. ``throttle_pct`` and
    ``allowed_downtime_ms`` are the values in force at the end (after auto-converge and escalation).
    ``left_bytes_at_limit``: what was left when the limit hit (the cost of a forced switchover).
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
    trail: list[tuple[int, float, float]] = field(default_factory=list, repr=False)  # (round, bytes, t_s)

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


def dirtied_bytes(guest: Guest, seconds: float, throttle_pct: float = 0.0) -> float:
    """Distinct bytes the guest dirties in ``seconds`` under a throttle (step 2 of the model)."""
    rate = max(0.0, guest.dirty_rate_bytes_s) * (1.0 - min(max(throttle_pct, 0.0), 100.0) / 100.0)
    wss = guest.write_set_bytes
    return wss * -math.expm1(-rate * max(seconds, 0.0) / wss)


SATURATED = 0.99  # past this share of the working set dirty, faster writes cannot be told apart


def write_rate(distinct_rate_bytes_s: float, window_s: float, working_set_bytes: float) -> float:
    """The guest's write rate ``D`` (bytes/s) from a measured *distinct* dirty rate (bytes/s).

    An agent counts the distinct pages dirtied over ``window_s`` (the dirty-rate endpoint; a round's
    ``dirty_rate_bytes_s``, whose window is the round). Writes spread over a working set ``W`` hit
    ``W * (1 - exp(-D t / W))`` distinct bytes (step 2), so a measurement over a window that is long
    against ``W / D`` reads low: an 8 MiB guest writing 12 MB/s measured over 1.5 s reads 4.7 MB/s.
    This inverts it: ``D = -W / t * ln(1 - d t / W)``, with ``d t / W`` capped at ``SATURATED`` (then
    ``D`` is a lower bound). Zero or a zero window: returned as it is.
    """
    if distinct_rate_bytes_s <= 0 or window_s <= 0 or working_set_bytes <= 0:
        return max(0.0, distinct_rate_bytes_s)
    share = min(distinct_rate_bytes_s * window_s / working_set_bytes, SATURATED)
    return -working_set_bytes / window_s * math.log1p(-share)


def forecast(guest: Guest, link: Link, policy: Policy, state: CopyState | None = None) -> Forecast:
    """Simulate pre-copy round by round (steps 1-6 of the module docstring) and say how it ends.

    ``state`` continues a running migration (the live panel); None forecasts one not started yet.
    Raises ValueError when the link rate is not a positive number.
    """
    first_rate, rate = effective_rate(link, policy), round_rate(link, policy)
    state = state or CopyState()
    allowed = state.allowed_downtime_ms if state.allowed_downtime_ms is not None else policy.max_downtime_ms
    throttle, elapsed, rounds = state.throttle_pct, state.elapsed_s, state.round
    last_round = state.last_round_bytes
    left = state.left_bytes
    trail: list[tuple[int, float, float]] = []
    # The agent judges a round once, when it ends (stall -> throttle and escalation, then "does it fit?");
    # a running migration's state is a round the agent judged already.
    judged = state.left_bytes is not None
    if left is None:  # round 1: the whole written memory; the agent never calls it stalled
        seconds = guest.first_pass_bytes / first_rate
        rounds, elapsed, last_round = 1, elapsed + seconds, None
        left = dirtied_bytes(guest, seconds, throttle)
        trail.append((rounds, float(guest.first_pass_bytes), elapsed))
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
        downtime_ms = 1000.0 * left / rate + link.overhead_ms
        if downtime_ms <= allowed:
            verdict = Verdict.CONVERGES_WITH_THROTTLE if ever_throttled else Verdict.CONVERGES
            copy_s = elapsed
            for extra in range(link.pre_pause_rounds):  # step 3: rounds sent before the pause
                # the round under way when the switchover is asked for finishes first
                if extra and downtime_ms <= allowed / 2:
                    break
                seconds = left / rate
                rounds, elapsed = rounds + 1, elapsed + seconds
                trail.append((rounds, left, elapsed))
                left = dirtied_bytes(guest, seconds, throttle)
                downtime_ms = 1000.0 * left / rate + link.overhead_ms
            return Forecast(
                verdict,
                copy_s,
                elapsed + downtime_ms / 1000,
                downtime_ms,
                rounds,
                throttle,
                allowed,
                trail=trail,
            )
        reason = _limit_reached(policy, rounds, elapsed)
        if reason:
            return _at_limit(policy, elapsed, rounds, throttle, allowed, left, downtime_ms, reason, trail)
        seconds = left / rate
        rounds, elapsed, last_round = rounds + 1, elapsed + seconds, left
        trail.append((rounds, left, elapsed))
        left = dirtied_bytes(guest, seconds, throttle)


def _limit_reached(policy: Policy, rounds: int, elapsed: float) -> str:
    if rounds >= min(policy.max_rounds, MAX_SIMULATED_ROUNDS):
        return f"the round limit ({policy.max_rounds} rounds)"
    if policy.copy_limit_s is not None and elapsed >= policy.copy_limit_s:
        return f"the Copy time limit ({policy.copy_limit_s:g} s)"
    return ""


def _at_limit(
    policy: Policy,
    elapsed: float,
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
            elapsed + downtime_ms / 1000,
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
        elapsed,
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


def bottleneck(guest: Guest, link: Link, policy: Policy) -> str:
    """Why Copy does not converge, in plain words; "" when it converges as it is."""
    rate = round_rate(link, policy)
    if forecast(guest, link, replace(policy, auto_converge=False, at_limit="abort")).converges:
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
    return (
        f"what the guest rewrites during one round takes longer to send than the allowed downtime "
        f"of {ms(policy.max_downtime_ms)}"
    )


@dataclass(frozen=True)
class Rescue:
    """One way to make a stalled migration finish: ``action`` (machine name), ``words``, ``forecast``."""

    action: str
    words: str
    forecast: Forecast


def rescues(guest: Guest, link: Link, policy: Policy, state: CopyState) -> list[Rescue]:
    """What would rescue a running migration from ``state``, and what each costs, cheapest freeze first.

    Offers: raising the allowed downtime to what one more round would need, throttling the guest
    (only when the agent's stepwise throttle, started now, completes within the rounds and time left
    with ``CLICK_ROUNDS`` to spare), and switching over now (frozen for what is left / the link rate).
    """
    rate = round_rate(link, policy)
    left = state.left_bytes if state.left_bytes is not None else float(guest.first_pass_bytes)
    options: list[Rescue] = []
    needed_ms = _downtime_that_converges(guest, link, policy, state)
    if needed_ms is not None:
        raised = replace(policy, max_downtime_ms=needed_ms, at_limit="abort")
        result = forecast(guest, link, raised, replace(state, allowed_downtime_ms=needed_ms))
        if result.converges:
            options.append(Rescue("raise_downtime", f"raise the allowed downtime to {ms(needed_ms)}", result))
    if not policy.auto_converge:
        # Offered only if it completes with a round to spare: the click lands while a round runs, and
        # the agent throttles from the round judged after it (20% first, then 10% more per stalled round).
        rounds_left = policy.max_rounds - CLICK_ROUNDS
        throttled = replace(policy, auto_converge=True, at_limit="abort", max_rounds=rounds_left)
        result = forecast(guest, link, throttled, state)
        if result.converges:
            options.append(
                Rescue(
                    "auto_converge",
                    f"throttle the guest (up to {result.throttle_pct:.0f}% of its vCPU time, "
                    f"about {seconds_words(max(result.total_s - state.elapsed_s, 0))} more)",
                    result,
                )
            )
    now_ms = 1000.0 * left / rate + link.overhead_ms
    now = Forecast(
        Verdict.CONVERGES,
        state.elapsed_s,
        state.elapsed_s + now_ms / 1000,
        now_ms,
        state.round,
        state.throttle_pct,
        max(now_ms, policy.max_downtime_ms),
    )
    options.append(Rescue("switchover", f"switch over now: about {seconds_words(now_ms / 1000)} frozen", now))
    return sorted(options, key=lambda rescue: rescue.forecast.downtime_ms or math.inf)


def _downtime_that_converges(guest: Guest, link: Link, policy: Policy, state: CopyState) -> float | None:
    """The smallest allowed downtime (ms, rounded up to 50 ms) under which one more round ends the copy."""
    rate = round_rate(link, policy)
    left = state.left_bytes if state.left_bytes is not None else float(guest.first_pass_bytes)
    next_left = dirtied_bytes(guest, left / rate, state.throttle_pct)
    needed = 1000.0 * next_left / rate + link.overhead_ms
    current = state.allowed_downtime_ms or policy.max_downtime_ms
    if needed <= current:
        return None
    return math.ceil(needed / 50.0) * 50.0


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
    if result.converges:
        lines.append(
            f"Expected: {seconds_words(result.total_s)} in {result.rounds} rounds, frozen about "
            f"{ms(result.downtime_ms or 0)} (allowed {ms(result.allowed_downtime_ms)})."
        )
        if result.verdict is Verdict.CONVERGES_WITH_THROTTLE:
            lines.append(f"Auto-converge throttles the guest up to {result.throttle_pct:.0f}%.")
    elif result.verdict is Verdict.SWITCHOVER_AT_LIMIT:
        lines.append(
            f"At {result.limit_reason} it switches over anyway: about "
            f"{seconds_words((result.downtime_ms or 0) / 1000)} frozen."
        )
    else:
        reason = bottleneck(guest, link, policy) or "it does not shrink fast enough"
        lines.append(f"It stops at {result.limit_reason}: {reason}.")
    return lines


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


def seconds_words(seconds: float) -> str:
    """A duration for a sentence: "0.4 s", "12 s", "2.5 min" (tenths below 10 s, so never "0 s")."""
    if seconds >= 90:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
