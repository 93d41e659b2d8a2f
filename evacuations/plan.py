"""The evacuation plan the admin reviews: who leaves (to which target, with its forecast) and who stays.

Every guest registered on the VSP either leaves (a step: a target and a forecast) or stays (a reason: vPar,
powered off, online migration disabled, Not Runnable copy, no target with room...). Targets are chosen
greedily, the largest guest first: each goes to the eligible VSP with the most memory still free once the
earlier steps of the same plan are counted, so the load spreads and no target is ever overcommitted (free
memory as ``vms.capacity`` counts it, in-flight reservations included). Between VSPs with equal room the
one with the shorter forecast wins. The default order puts the largest expected time last; the admin may
change any target or the order, and the plan is checked again (``problems``) before it may start.

**The forecast** per guest is the migrate dialog's, by the same function with the same inputs
(``estimates.forecast_to``): the VM's own policy, its own dirty rate (measured by its agent or cached
by the dialog, ``dirty_rates``), the pair's link rate (its newest migrations weighted most, else its link
probe, else the policy's cap) and the pair's fitted dirty rounds. A guest whose dirty rate cannot be
measured, or a pair with no known link rate, has no forecast ("not known yet"). A step forecast to
*may not* / *will not converge* keeps the plan from starting until the admin changes the VM's policy,
excludes the VM (it stays) or confirms that step.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from migrations_app import estimates, forecast
from migrations_app.access import migration_targets
from migrations_app.checks import check_vm, host_refusal
from migrations_app.models import Migration
from migrations_app.placement import devices_refusal, load_devices
from vms.access import visible_vsps
from vms.capacity import free_memory_by_vsp
from vms.models import VSP, Registration, VirtualMachine

from .rights import may_evacuate


@dataclass
class PlanStep:
    """A guest that leaves: ``target`` (None: none chosen), ``predicted_s`` (None: not known yet),
    ``problem`` (why the admin's choice cannot be, "" when it can), ``verdict``: the forecast's
    (``forecast.Verdict``; None: not known yet), ``reasons``: the forecast's explanation in words (the
    migrate dialog's lines), ``confirmed``: the admin starts it although its forecast warns."""

    vm: VirtualMachine
    target: VSP | None
    predicted_s: float | None
    problem: str = ""
    verdict: forecast.Verdict | None = None
    reasons: list[str] = field(default_factory=list)
    confirmed: bool = False

    @classmethod
    def of(
        cls,
        vm: VirtualMachine,
        target: VSP | None,
        rate: estimates.DirtyRate | None,
        problem: str = "",
        confirmed: bool = False,
    ) -> PlanStep:
        """The step moving ``vm`` to ``target`` with its measured dirty ``rate``, forecast by ``predict``."""
        result = predict(vm, target, rate) if target is not None else None
        if result is None:
            return cls(vm, target, None, problem, confirmed=confirmed)
        return cls(vm, target, result.total_s, problem, result.verdict, result.lines, confirmed)

    @property
    def stops_at_limit(self) -> bool:
        """Its forecast says it will not converge: it would run until its limit and stay on its source."""
        return self.verdict == forecast.Verdict.WILL_NOT_CONVERGE

    @property
    def warns(self) -> bool:
        """Its forecast says it will, or may, not converge (``forecast.Verdict.warns``)."""
        return self.verdict is not None and self.verdict.warns

    @property
    def unconfirmed_warning(self) -> str:
        """Why it may not start as it is ("" when it may): a warning forecast the admin did not confirm."""
        if not self.warns or self.confirmed:
            return ""
        assert self.verdict is not None
        return (
            f"{self.vm.name} {self.verdict.label}: change its migration policy, exclude it from the "
            "evacuation, or confirm that it starts anyway."
        )


@dataclass(frozen=True)
class Staying:
    """A guest that stays, with why; ``vm_id`` when the admin excluded it (so the page may undo that)."""

    vm_name: str
    reason: str
    vm_id: int | None = None


EXCLUDED_REASON = "excluded from this evacuation by the admin"


@dataclass(frozen=True)
class Arriving:
    """A guest migrating to the evacuated VSP (``migration``, still active): once it lands it is moved
    on to ``target`` (None: no VSP has room, a problem of the plan)."""

    vm: VirtualMachine
    migration: Migration
    target: VSP | None

    @property
    def words(self) -> str:
        """What the plan says of it, e.g. "migrating here from vsp1 (Copy): the evacuation waits for it
        to land, then moves it on to vsp2"."""
        source = self.migration.source.name if self.migration.source else "another VSP"
        state = self.migration.get_state_display()
        then = f"moves it on to {self.target.name}" if self.target else "cannot move it on (no room)"
        return (
            f"migrating here from {source} ({state}): the evacuation waits for it to land, then {then}; "
            f"if its migration does not complete, it stays on {source}"
        )


def arriving_migrations(vsp: VSP) -> list[Migration]:
    """The active migrations whose target is ``vsp`` (queued ones too), the largest guest first."""
    return list(
        Migration.objects.filter(target=vsp, state__in=Migration.ACTIVE_STATES, vm__isnull=False)
        .select_related("vm", "source")
        .order_by("-vm__memory_mib", "pk")
    )


@dataclass
class Plan:
    """``steps`` in the order they run; ``staying`` with their reasons; ``targets``: every other VSP with
    its refusal ("" when eligible) and free memory (MiB) before the plan; ``planned_free``: after it.
    ``problems``: what keeps it from starting (a choice that cannot be, a warning not confirmed)."""

    vsp: VSP
    steps: list[PlanStep]
    staying: list[Staying]
    targets: list[tuple[VSP, str, int]] = field(default_factory=list)
    planned_free: dict[int, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    arriving: list[Arriving] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.steps or self.arriving)

    @property
    def known_total_s(self) -> float:
        """When the steps with a forecast would all be done, ``max_concurrent_migrations`` at a time (s).

        A step forecast not to converge is not counted (``not_converging_count``): it moves nothing.
        """
        known = [
            step.predicted_s
            for step in self.steps
            if step.predicted_s is not None and not step.stops_at_limit
        ]
        return time_left_s(known, self.vsp.max_concurrent_migrations)

    @property
    def not_converging_count(self) -> int:
        """Steps forecast not to converge (``PlanStep.stops_at_limit``), left out of ``known_total_s``."""
        return sum(1 for step in self.steps if step.stops_at_limit)

    @property
    def blocking_problems(self) -> list[str]:
        """The problems that ticking "start it anyway" does not solve (the others are unconfirmed
        warnings: the page's Start waits for a choice on each, without Update plan)."""
        unconfirmed = {step.unconfirmed_warning for step in self.steps if step.unconfirmed_warning}
        return [problem for problem in self.problems if problem not in unconfirmed]

    @property
    def unknown_count(self) -> int:
        return sum(1 for step in self.steps if step.predicted_s is None)


def dirty_rates(vsp: VSP, *, measure: bool = True) -> dict[int, estimates.DirtyRate]:
    """Per VM id: the dirty rate of each running guest on ``vsp``, as the migrate dialog has it.

    The cached measurement (``estimates.cached_dirty_rate``) when fresh, else (``measure``) a new one
    from the source agent (``estimates.measure_dirty_rate``, about 0.5 s a guest, then cached); a guest
    it cannot measure is left out (its time is then "not known yet", never another guest's rate).
    """
    rates: dict[int, estimates.DirtyRate] = {}
    registrations = Registration.objects.filter(
        vsp=vsp, hardware_status=Registration.HardwareStatus.ON
    ).select_related("vm")
    for registration in registrations:
        vm = registration.vm
        if not registration.is_runnable or vm.is_vpar or not vm.online_migration_enabled:
            continue
        rate = estimates.cached_dirty_rate(vm)
        if rate is None and measure:
            rate = estimates.measure_dirty_rate(vm)
        if rate is not None:
            rates[vm.pk] = rate
    return rates


def predict_s(vm: VirtualMachine, target: VSP, rate: estimates.DirtyRate | None) -> float | None:
    """The forecast total time (s) of migrating ``vm`` to ``target``; None: not known yet (``predict``)."""
    result = predict(vm, target, rate)
    return None if result is None else result.total_s


def predict(
    vm: VirtualMachine, target: VSP, rate: estimates.DirtyRate | None
) -> estimates.TargetForecast | None:
    """The migrate dialog's forecast of moving ``vm`` to ``target``; None: not known yet.

    The very function the dialog calls (``estimates.forecast_to``) with the same inputs: the VM's own
    policy, its measured dirty ``rate`` (``dirty_rates``), the pair's link rate (newest migrations
    weighted most, else its link probe, else the policy's cap as a best case) and the pair's fitted
    dirty rounds. Without the guest's own dirty rate there is no forecast: the mean of other guests'
    rates over the pair is not this guest's (QA: the idle db01 was planned at 48 s and took 3 s).
    """
    if rate is None:
        return None
    result = estimates.forecast_to(vm, target, vm.migration_policy, rate)
    return None if result.verdict is None else result


# How the stay reasons of a guest not running on the VSP begin (``summary.said_not_running``).
NOT_RUNNING_REASONS = ("Not Runnable copy here", "lost:", "powered off:")


def stay_reason(registration: Registration, vsp: VSP) -> str | None:
    """Why the guest of this copy on ``vsp`` cannot leave by online migration, or None if it can."""
    vm = registration.vm
    if not registration.is_runnable:
        why = f": {registration.not_runnable_reason}" if registration.not_runnable_reason else ""
        return f"Not Runnable copy here{why}; nothing runs to move"
    if vm.is_vpar:
        return "vPars do not migrate"
    if registration.is_lost:
        return "lost: its host no longer reports it, so nothing runs to move (Start defines it again)"
    if registration.hardware_status != Registration.HardwareStatus.ON:
        return "powered off: online migration moves running guests only"
    if not vm.online_migration_enabled:
        return "online migration is disabled for this VM"
    return check_vm(vm, vsp)


def build_plan(
    vsp: VSP,
    chosen_targets: Mapping[int, int] | None = None,
    order: Sequence[int] | None = None,
    *,
    rates: Mapping[int, estimates.DirtyRate] | None = None,
    excluded: Collection[int] = (),
    confirmed: Collection[int] = (),
    user: Any = None,
) -> Plan:
    """The evacuation plan of ``vsp``.

    ``user``: targets are the VSPs where they are an operator when they may start this evacuation
    (``migrations_app.access.migration_targets``), else the VSPs they see (``visible_vsps``: a viewer
    reads what the plan would do among them); another group's VSP is neither offered nor named.
    ``None``: every VSP.

    ``chosen_targets``: the admin's target VSP id per VM id (others are chosen here). ``order``: VM ids in
    the order the admin wants (every leaving VM once); None orders by forecast, the largest time last and
    unknown times after the known ones, larger guests later. A choice that cannot be (unknown VSP, not
    eligible, no room) is kept on its step with a ``problem`` and listed in ``plan.problems``.
    ``rates``: each guest's measured dirty rate by VM id (``dirty_rates``; None: the cached ones only).
    ``excluded``: VM ids the admin keeps on ``vsp`` (they stay, with ``EXCLUDED_REASON``).
    ``confirmed``: VM ids the admin starts although their forecast may or will not converge; any other
    such step is listed in ``plan.problems`` (``PlanStep.unconfirmed_warning``), so it is never started
    silently.
    """
    chosen_targets = {vm: vsp_id for vm, vsp_id in (chosen_targets or {}).items() if vm not in excluded}
    if order is not None:
        order = [vm_id for vm_id in order if vm_id not in excluded]
    if rates is None:
        rates = dirty_rates(vsp, measure=False)
    registrations = (
        Registration.objects.filter(vsp=vsp)
        .select_related("vm")
        .prefetch_related("vm__registrations__vsp")
        .order_by("vm__name")
    )
    if user is None:
        candidates = VSP.objects.all()
    else:
        candidates = migration_targets(user) if may_evacuate(user, vsp) else visible_vsps(user)
    others = list(candidates.exclude(pk=vsp.pk).filter(retired_at=None).order_by("name"))
    free = free_memory_by_vsp([other.pk for other in others])
    targets = [(other, host_refusal(vsp, other) or "", free.get(other.pk, 0)) for other in others]
    eligible = {other.pk: other for other, refusal, _ in targets if not refusal}
    by_id = {other.pk: (other, refusal) for other, refusal, _ in targets}
    planned_free = {other.pk: free.get(other.pk, 0) for other in others}
    for eligible_vsp in eligible.values():  # as the dialog: a pair with no known link rate gets a probe
        estimates.known_link_rate(vsp, eligible_vsp)

    incoming = arriving_migrations(vsp)
    arriving_ids = {migration.vm_id for migration in incoming}
    leaving: list[VirtualMachine] = []
    staying: list[Staying] = []
    for registration in registrations:
        if registration.vm_id in arriving_ids:
            continue  # whatever its copy here says now, it is on its way: listed as arriving
        reason = stay_reason(registration, vsp)
        if not reason and registration.vm_id in excluded:
            reason = EXCLUDED_REASON
        if reason:
            chosen_to_stay = registration.vm_id if reason == EXCLUDED_REASON else None
            staying.append(Staying(registration.vm.name, reason, chosen_to_stay))
        else:
            leaving.append(registration.vm)

    steps: list[PlanStep] = []
    problems: list[str] = []
    # The admin's choices first (they take their room), then the rest, the largest guest first.
    chosen = [vm for vm in leaving if vm.pk in chosen_targets]
    free_choice = sorted((vm for vm in leaving if vm.pk not in chosen_targets), key=lambda vm: -vm.memory_mib)
    for vm in chosen:
        target_id = chosen_targets[vm.pk]
        target, refusal = by_id.get(target_id, (None, ""))
        problem = ""
        if target_id == vsp.pk:
            problem = (
                f"{vm.name} cannot go to {vsp.name}: it is the host being evacuated; choose another target"
            )
        elif target is None:
            problem = f"{vm.name} cannot go to VSP {target_id}: there is no such VSP; choose another target"
        elif refusal:
            problem = f"{vm.name} cannot go to {target.name}: {refusal}"
        elif devices := devices_refusal(vm, vsp, target):
            problem = f"{vm.name} cannot go to {target.name}: {devices}"
        elif planned_free[target_id] < vm.memory_mib:
            problem = (
                f"{vm.name} cannot go to {target.name}: not enough free memory once the earlier steps "
                f"are counted (needs {vm.memory_mib} MiB, {planned_free[target_id]} MiB free)"
            )
        else:
            planned_free[target_id] -= vm.memory_mib
        if problem:
            problems.append(problem)
        steps.append(PlanStep.of(vm, target, rates.get(vm.pk), problem, vm.pk in confirmed))
    for vm in free_choice:
        # The guest's disks and cards first: a target without its shared pools or networks never takes it.
        had = load_devices(vm, vsp)
        unfit = {pk: devices_refusal(vm, vsp, eligible[pk], had) for pk in eligible}
        reachable = {pk: other for pk, other in eligible.items() if not unfit[pk]}
        roomy = [pk for pk in reachable if planned_free[pk] >= vm.memory_mib]
        if not roomy:
            refused = next((why for why in unfit.values() if why), "")
            reason = refused if eligible and not reachable else no_room_reason(vm, planned_free, reachable)
            staying.append(Staying(vm.name, reason))
            continue

        def preference(pk: int, vm: VirtualMachine = vm) -> tuple[int, float, str]:
            predicted = predict_s(vm, eligible[pk], rates.get(vm.pk))
            return (
                -planned_free[pk],
                predicted if predicted is not None else float("inf"),
                eligible[pk].name,
            )

        best = min(roomy, key=preference)
        planned_free[best] -= vm.memory_mib
        steps.append(PlanStep.of(vm, eligible[best], rates.get(vm.pk), confirmed=vm.pk in confirmed))

    steps = _ordered(steps, order, problems)
    problems.extend(step.unconfirmed_warning for step in steps if step.unconfirmed_warning)
    staying.sort(key=lambda stay: stay.vm_name)
    arriving = [plan_arriving(migration, eligible, planned_free, problems) for migration in incoming]
    return Plan(vsp, steps, staying, targets, planned_free, problems, arriving)


def plan_arriving(
    migration: Migration, eligible: dict[int, VSP], planned_free: dict[int, int], problems: list[str]
) -> Arriving:
    """Where the guest of ``migration`` goes on once it lands: the eligible VSP with the most memory left
    (``planned_free``, which it then takes); none: a problem of the plan, in ``problems``."""
    vm = migration.vm
    assert vm is not None  # arriving_migrations: only migrations of a VM
    roomy = [pk for pk in eligible if planned_free[pk] >= vm.memory_mib]
    if not roomy:
        source = migration.source.name if migration.source else "another VSP"
        problems.append(
            f"{vm.name} is migrating here from {source} and no other VSP can take it on once it lands "
            f"({no_room_reason(vm, planned_free, eligible)}): wait for its migration to end, or cancel it."
        )
        return Arriving(vm, migration, None)
    best = max(roomy, key=lambda pk: (planned_free[pk], eligible[pk].name))
    planned_free[best] -= vm.memory_mib
    return Arriving(vm, migration, eligible[best])


def no_room_reason(vm: VirtualMachine, planned_free: dict[int, int], eligible: dict[int, VSP]) -> str:
    if not eligible:
        return "no other VSP can take guests (each is disabled, unlicensed, unreachable or in maintenance)"
    most = max(eligible, key=lambda pk: planned_free[pk])
    return (
        f"no target with room: needs {vm.memory_mib} MiB, the most left is {max(planned_free[most], 0)} MiB "
        f"on {eligible[most].name} once the earlier steps are counted"
    )


def _ordered(steps: list[PlanStep], order: Sequence[int] | None, problems: list[str]) -> list[PlanStep]:
    if order is None:
        return sorted(
            steps,
            key=lambda step: (
                step.predicted_s is None,
                step.predicted_s or 0.0,
                step.vm.memory_mib,
                step.vm.name,
            ),
        )
    position = {vm_id: index for index, vm_id in enumerate(order)}
    if sorted(position) != sorted(step.vm.pk for step in steps) or len(position) != len(order):
        problems.append("The order must list every leaving guest once.")
        return steps
    return sorted(steps, key=lambda step: position[step.vm.pk])


def time_left_s(left: list[float], at_once: int) -> float:
    """When the last of ``left`` (seconds each, running ones first, then in queue order) ends, with
    ``at_once`` running at a time: each next one takes the slot that frees first."""
    slots = [0.0] * max(at_once, 1)
    for seconds in left:
        soonest = min(range(len(slots)), key=slots.__getitem__)
        slots[soonest] += seconds
    return max(slots)
