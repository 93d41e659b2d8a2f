"""What the forecast needs, measured: a guest's dirty rate and the link rate between two VSPs.

- **Dirty rate**: the source agent measures the running guest over ``DIRTY_RATE_WINDOW_S``
  (``GET /v1/guests/{id}/dirty-rate``: the simulated driver from its write tracking, the QEMU driver
  with ``calc-dirty-rate``). Kept ``DIRTY_RATE_FRESH_S`` in the cache, so the dialog asks at most that often.
- **Link rate**: the throughput of past migrations between the pair (source -> target), newest weighted
  most: an exponentially weighted mean over the last ``LINK_HISTORY`` completed ones, each older one
  weighing ``LINK_DECAY`` times the next newer. No history: the pair's last link probe
  (``link_probes``: a short burst of filler between the two agents' data planes), queued in the
  background when there is none or it is older than ``link_probes.PROBE_FRESH_S``; until it arrives
  the dialog says "not known yet, measuring" (a stale probe is still used meanwhile, with its age).
  History, when there is any, wins over a probe.

- **Dirty rounds' cost**: the rate of the later rounds (scattered pages) and their fixed cost per round,
  fitted (``forecast.dirty_round_cost``) on each of the pair's last ``LINK_HISTORY`` completed
  migrations that timed at least two dirty rounds (``Migration.round_samples``,
  ``samples.dirty_rounds``), weighted as the link rate is (``round_cost``). None without any: the
  model then moves the dirty rounds at the link rate with no fixed cost.

Both come with the time they were measured, so the page can say how old they are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.utils import timezone

from migrations_app import forecast, link_probes
from vms.agent_client import AgentClient, AgentError
from vms.models import VSP, VirtualMachine

from . import migration_policy
from .models import Migration
from .placement import local_disks

log = logging.getLogger(__name__)

DIRTY_RATE_WINDOW_S = 0.5
DIRTY_RATE_FRESH_S = 30
LINK_HISTORY = 5
LINK_DECAY = 0.5


@dataclass(frozen=True)
class DirtyRate:
    """A guest's measured writes: ``rate_bytes_s`` (bytes/s), its memory and write set (bytes), when."""

    rate_bytes_s: float
    memory_bytes: int
    written_bytes: int | None
    working_set_bytes: int | None
    at: datetime

    def guest(self) -> forecast.Guest:
        """The model's guest: the write rate behind this distinct-page rate (``forecast.write_rate``)."""
        return forecast.Guest.measured(
            self.memory_bytes,
            self.rate_bytes_s,
            DIRTY_RATE_WINDOW_S,
            self.written_bytes,
            self.working_set_bytes,
        )


@dataclass(frozen=True)
class LinkRate:
    """The link rate (bytes/s) between two VSPs, from ``migrations`` past migrations (0: from a link
    probe), the newest ``at``."""

    rate_bytes_s: float
    at: datetime
    migrations: int

    def words(self) -> str:
        """Where the rate comes from, for ``forecast.explain``: "on its last migration, 3 min ago"."""
        age = age_words(self.at)
        if self.migrations == 0:
            return f"in a probe {age}"
        if self.migrations == 1:
            return f"on its last migration, {age}"
        return f"over its last {self.migrations} migrations (newest {age})"


@dataclass(frozen=True)
class RoundCost:
    """The pair's dirty rounds: ``rate_bytes_s`` (bytes/s) and ``overhead_s`` (s) per round, fitted on
    ``migrations`` completed migrations (``round_cost``)."""

    rate_bytes_s: float
    overhead_s: float
    migrations: int

    def words(self) -> str:
        """For the dialog: "its dirty rounds moved 4.6 MB/s plus 120 ms a round on its last migration"."""
        where = (
            "on its last migration" if self.migrations == 1 else f"over its last {self.migrations} migrations"
        )
        return (
            f"Its dirty rounds moved {forecast.mb(self.rate_bytes_s)} plus "
            f"{forecast.ms(1000 * self.overhead_s)} a round {where}."
        )


def round_cost(source: VSP, target: VSP) -> RoundCost | None:
    """The pair's dirty-round rate and fixed cost per round from its completed migrations, or None.

    Of the last ``LINK_HISTORY`` completed migrations from ``source`` to ``target``, those whose round
    samples fit a line (``forecast.dirty_round_cost`` on ``samples.dirty_rounds``: two dirty rounds or
    more) count, newest weighted most (each older one ``LINK_DECAY`` times the next newer, as
    ``link_rate``): a weighted mean of their rates (bytes/s) and of their costs (s).
    """
    from .samples import dirty_rounds

    rows = uncapped(
        Migration.objects.filter(source=source, target=target, state=Migration.State.COMPLETED)
        .order_by("-state_changed_at")
        .values_list("round_samples", "policy")
    )
    fits = [forecast.dirty_round_cost(dirty_rounds(samples or [], running=False)) for samples, _ in rows]
    fitted = [fit for fit in fits if fit is not None]
    if not fitted:
        return None
    weights = [LINK_DECAY**index for index in range(len(fitted))]
    total = sum(weights)
    rate = sum(weight * fit[0] for weight, fit in zip(weights, fitted, strict=True)) / total
    overhead = sum(weight * fit[1] for weight, fit in zip(weights, fitted, strict=True)) / total
    return RoundCost(rate, overhead, len(fitted))


def uncapped(rows: Any) -> list[tuple[Any, ...]]:
    """The first ``LINK_HISTORY`` of ``rows`` (value tuples whose last item is the migration's kept
    ``policy``) that ran without a bandwidth cap of their own: a capped migration measured its cap, not
    the link (a 5 MB/s cap once made the dialog call a 200 MB/s link 6 MB/s). The site's cap, which
    every migration of the pair carries, still counts as the link. Reads at most 4 x ``LINK_HISTORY``."""
    kept = []
    for row in rows[: 4 * LINK_HISTORY]:
        if not (row[-1] or {}).get("bandwidth_cap_mb_s"):
            kept.append(row)
            if len(kept) == LINK_HISTORY:
                break
    return kept


def age_words(at: datetime) -> str:
    """How long ago ``at`` was: "just now" (under 1 s), "12 s ago", "3 min ago", "2 h ago"."""
    seconds = max(0.0, (timezone.now() - at).total_seconds())
    if seconds < 1:
        return "just now"
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.0f} h ago"


def link_rate(source: VSP, target: VSP) -> LinkRate | None:
    """The pair's link rate from its completed migrations (newest weighted most), or None without any."""
    rows = uncapped(
        Migration.objects.filter(
            source=source, target=target, state=Migration.State.COMPLETED, throughput_bytes_s__gt=0
        )
        .order_by("-state_changed_at")
        .values_list("throughput_bytes_s", "state_changed_at", "policy")
    )
    if not rows:
        return None
    weights = [LINK_DECAY**index for index in range(len(rows))]
    rate = sum(weight * row[0] for weight, row in zip(weights, rows, strict=True)) / sum(weights)
    return LinkRate(rate, rows[0][1], len(rows))


def model_link(source: VSP, rate_bytes_s: float) -> forecast.Link:
    """The model's link from ``source`` at ``rate_bytes_s`` (bytes/s), with how its driver switches over.

    A simulated source sends up to ``forecast.SIMULATED_PRE_PAUSE_ROUNDS`` more rounds before it pauses
    the guest; QEMU switches over at once (0). The driver is what the agent's health said last
    (``VSP.agent_driver``, recorded when the migrate dialog opens and by the inventory collection);
    unknown counts as QEMU's 0.
    """
    rounds = forecast.SIMULATED_PRE_PAUSE_ROUNDS if source.agent_driver == "simulated" else 0
    return forecast.Link(rate_bytes_s, pre_pause_rounds=rounds)


def known_link_rate(source: VSP, target: VSP) -> tuple[LinkRate | None, bool]:
    """(the pair's link rate, whether a probe is being measured): history first, else the last probe.

    With no history and no probe measured within ``link_probes.PROBE_FRESH_S``, a probe is queued in the
    background (at most once a minute per pair); a stale one is still returned meanwhile. Never waits.
    """
    history = link_rate(source, target)
    if history is not None:
        return history, False
    probe = link_probes.latest_probe(source, target)
    fresh = probe is not None and link_probes.is_fresh(probe)
    if not fresh:
        link_probes.request_probe(source, target)
    if probe is None or probe.rate_bytes_s is None or probe.measured_at is None:
        return None, True
    return LinkRate(probe.rate_bytes_s, probe.measured_at, 0), not fresh


def _cache_key(vm: VirtualMachine) -> str:
    return f"dirty-rate:{vm.guest_id}"


def cached_dirty_rate(vm: VirtualMachine) -> DirtyRate | None:
    """The last measurement of ``vm`` still fresh, or None (never waits)."""
    found: Any = cache.get(_cache_key(vm))
    return found if isinstance(found, DirtyRate) else None


def measure_dirty_rate(vm: VirtualMachine) -> DirtyRate | None:
    """Ask ``vm``'s source agent to measure its dirty rate now (about 0.5 s); None when it cannot."""
    vsp = vm.current_vsp
    if vsp is None:
        return None
    try:
        with AgentClient.for_vsp(vsp) as agent:
            answer = agent.dirty_rate(str(vm.guest_id), DIRTY_RATE_WINDOW_S)
    except AgentError as error:
        log.info("could not measure the dirty rate of %s: %s", vm.name, error)
        return None
    measured = DirtyRate(
        float(answer.dirty_rate_bytes_s),
        answer.memory_bytes,
        answer.written_bytes,
        answer.working_set_bytes,
        timezone.now(),
    )
    cache.set(_cache_key(vm), measured, DIRTY_RATE_FRESH_S)
    return measured


def forecast_policy(policy: dict[str, Any], vm: VirtualMachine) -> forecast.Policy:
    """A stored policy (``migration_policy``) as the model's ``forecast.Policy``, the site cap applied."""
    site = settings.MIGRATION_AGENT_PARAMS
    params = migration_policy.agent_params(
        policy,
        max_rounds=site.get("max_rounds") or migration_policy.DEFAULT_MAX_ROUNDS,
        site_cap_mbps=site.get("bandwidth_mbps"),
    )
    cap = params.bandwidth_mbps
    return forecast.Policy(
        max_downtime_ms=params.downtime_ms,
        bandwidth_cap_bytes_s=cap * 125_000 if cap else None,
        auto_converge=params.auto_converge,
        throttle_initial_pct=params.throttle_initial_pct,
        throttle_increment_pct=params.throttle_increment_pct,
        throttle_max_pct=params.throttle_max_pct,
        downtime_step_ms=params.downtime_step_ms,
        downtime_max_ms=params.downtime_max_ms,
        max_rounds=params.max_rounds,
        copy_limit_s=vm.copy_limit_s,
        at_limit=params.at_limit,
    )


@dataclass(frozen=True)
class TargetForecast:
    """The dialog's forecast for one target: ``verdict`` (None: unknown), ``lines`` of words."""

    verdict: forecast.Verdict | None
    lines: list[str]
    total_s: float | None = None
    downtime_ms: float | None = None
    measuring_link: bool = False  # a link probe is on its way: the dialog asks again shortly
    limit_reason: str = ""  # where a migration that will not converge stops: "the round limit (30 rounds)"

    @property
    def warns(self) -> bool:
        """The dialog warns: the migration will, or may, stop at its limit (``Verdict.warns``)."""
        return self.verdict is not None and self.verdict.warns


def mirrored_bytes(vm: VirtualMachine, source: VSP) -> int:
    """The data of ``vm``'s disks on local pools of ``source`` (bytes allocated, as its agent last said):
    what a migration mirrors before the memory (``forecast`` step 8; holes are not read)."""
    return sum(max(0, disk.allocated_bytes) for disk in local_disks(vm, source))


def forecast_to(
    vm: VirtualMachine, target: VSP, policy: dict[str, Any], guest: DirtyRate | None
) -> TargetForecast:
    """Forecast moving ``vm`` to ``target`` under ``policy`` with what is known now (never measures)."""
    source = vm.current_vsp
    if source is None:
        return TargetForecast(None, [f"{vm.name} is not running anywhere: nothing to forecast."])
    link, measuring = known_link_rate(source, target)
    model_policy = forecast_policy(policy, vm)
    cap = model_policy.bandwidth_cap_bytes_s
    unmeasured = (
        f"the link from {source.name} to {target.name} is not known yet (no migration between them): "
        "measuring it with a short probe"
    )
    missing = []
    if guest is None:
        missing.append(f"{vm.name}'s dirty rate is not measured yet")
    if link is None and cap is None:
        missing.append(unmeasured)
    if guest is None or (link is None and cap is None):
        lines = [f"No forecast: {'; '.join(missing)}."]
        failed = link_probes.last_failure(source, target) if measuring else ""
        if failed:
            lines.append(f"The last link probe failed: {failed}. Trying again within a minute.")
        return TargetForecast(None, lines, measuring_link=measuring)
    assert guest is not None
    rounds = None
    if link is not None:
        the_link, link_words = model_link(source, link.rate_bytes_s), link.words()
        rounds = round_cost(source, target) if link.migrations else None
        if rounds is not None:  # as the live panel and the bench: the dirty rounds at their own cost
            the_link = replace(
                the_link, round_rate_bytes_s=rounds.rate_bytes_s, round_overhead_s=rounds.overhead_s
            )
    else:
        # No history but a cap: the migration can carry at most the cap, so the forecast is a best case
        # (a guest that writes faster than the cap cannot converge whatever the link).
        assert cap is not None
        the_link = model_link(source, cap)
        link_words = ""  # forecast.explain: not measured, the cap is the best case
    model_guest = replace(guest.guest(), disk_bytes=mirrored_bytes(vm, source))
    result = forecast.forecast(model_guest, the_link, model_policy)
    lines = forecast.explain(
        model_guest,
        the_link,
        model_policy,
        result,
        vm=vm.name,
        target=target.name,
        link_source=link_words,
    )
    if rounds is not None:
        lines.insert(1, rounds.words())
    if measuring:
        lines.append(
            "Link rate being measured again with a probe." if link else "Link rate not known yet — measuring."
        )
        failed = link_probes.last_failure(source, target)
        if failed:
            lines.append(f"The last link probe failed: {failed}. Trying again within a minute.")
    lines.append(f"Dirty rate measured {age_words(guest.at)}.")
    return TargetForecast(
        result.verdict, lines, result.total_s, result.downtime_ms, measuring, result.limit_reason
    )


def will_not_converge_warning(vm: VirtualMachine, target: VSP, policy: dict[str, Any]) -> str:
    """Why moving ``vm`` to ``target`` under ``policy`` (an effective ``migration_policy``) is forecast
    not to converge, in the dialog's words; "" when it is not (it converges, may not, or is unknown).

    What the Migrate dialog asks the admin to confirm before starting, and the API and the CLI say
    beside the migration they start anyway: the guest's dirty rate against what the link (or the cap)
    carries, where it would stop (``forecast.explain``'s first and last sentences, the verdict's limit).
    Measures the dirty rate (about 0.5 s) only when the pair's link, or a bandwidth cap, is known:
    without either there is no verdict to warn about. Never raises for an agent that does not answer.
    """
    source = vm.current_vsp
    if source is None:
        return ""
    guest = cached_dirty_rate(vm)
    if guest is None:
        link, _ = known_link_rate(source, target)
        if link is None and forecast_policy(policy, vm).bandwidth_cap_bytes_s is None:
            return ""
        guest = measure_dirty_rate(vm)
    result = forecast_to(vm, target, policy, guest)
    if result.verdict is not forecast.Verdict.WILL_NOT_CONVERGE:
        return ""
    why = " ".join(line for line in result.lines if line.startswith((f"{vm.name} writes", "Because")))
    stops = f"It would copy until {result.limit_reason or 'its limit'}"
    if result.total_s is not None:
        stops += f" (about {forecast.duration_words(result.total_s)})"
    return (
        f"{vm.name} will not converge to {target.name} under this policy: {why} {stops}, then stop, "
        f"and {vm.name} would keep running on {source.name}."
    )
