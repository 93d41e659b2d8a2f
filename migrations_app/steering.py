"""Steering a running migration: its live forecast, the warning before its limit, and the admin's changes.

``outlook(migration)`` continues ``migrations_app.forecast`` from where the Copy stands (the numbers the
agent last reported); ``do_change_migration`` applies a change (raise the allowed downtime, change the
bandwidth cap, turn throttling on or off, switch over now) on the source agent (``POST
/v1/migrations/{id}/params``, answered at once) and records it as a ``MigrationEvent`` and an
``AuditEvent`` with who and what, then pushes the page to every watcher. The page, the REST API and
the CLI all call ``do_change_migration``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import datetime
from http import HTTPStatus
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.utils import timezone
from pydantic import ValidationError

from agentprotocol import ParamsChange, plain_words
from migrations_app import forecast
from vms.agent_client import AgentClient, AgentError, AgentRefused, AgentUnreachable, UnknownMigration
from vms.models import AuditEvent

from . import alerts, migration_policy
from .access import check_can_migrate
from .agents import agent_migration_id
from .limits import phase_limits_of
from .models import Migration, MigrationEvent
from .progress import publish_progress
from .samples import dirty_rounds, round_left_bytes

logger = logging.getLogger(__name__)

CHANGE_PERMISSION = "migrations_app.add_migration"  # who may migrate may steer
CHANGEABLE_STATES = (Migration.State.INIT, Migration.State.COPY)
ACTIONS = ("raise_downtime", "bandwidth", "auto_converge", "switchover")
POLICY_CHANGES = ("max_downtime_ms", "bandwidth_cap_mb_s", "auto_converge")  # the API's form
MiB = 1024 * 1024
MIN_RATE_S = 1.0  # Copy seconds before the live panel says a time left (``outlook``)
# Drivers whose source can turn auto-converge on while Copy runs. QEMU cannot: auto-converge is a
# migration capability, which QEMU refuses to change during a migration (its agent answers 409).
LIVE_THROTTLE_DRIVERS = frozenset({"simulated"})
# Rounds the source sends once converged, before it pauses the guest (``forecast.Link.pre_pause_rounds``).
PRE_PAUSE_ROUNDS = {"simulated": forecast.SIMULATED_PRE_PAUSE_ROUNDS}


class ChangeRefused(Exception):
    """The change was refused; ``message`` says why in plain words. Nothing was changed.

    The API answers 409 to it: the change does not apply to the migration as it is now (not yet, or
    no more).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class SourceUnavailable(ChangeRefused):
    """The source host's agent could not be asked (not running, not answering, an untrusted
    certificate): the change may apply, but nothing was changed. The API answers 503 to it."""


class BadChange(ChangeRefused):
    """The change itself is wrong (an unknown change, a value out of bounds or not a number), whatever
    the migration's state: the API answers 422 to it, 409 to the other refusals."""


@dataclass(frozen=True)
class Outlook:
    """What the phases panel says about a running Copy: ``lines`` of words, ``warning`` and ``rescues``."""

    time_left_s: float | None
    expected_downtime_ms: float | None
    allowed_downtime_ms: float
    bottleneck: str
    warning: str
    rescues: list[forecast.Rescue]
    can_throttle: bool = False
    disk_left_s: float | None = None  # while the local disks' mirror has not caught up: its time left (s)


def can_throttle_live(migration: Migration) -> bool:
    """Whether throttling (auto-converge) can be turned on while ``migration`` runs: its source agent's
    driver can (``LIVE_THROTTLE_DRIVERS``; ``VSP.agent_driver``). A driver not known yet: not offered."""
    source = migration.source
    return source is not None and source.agent_driver in LIVE_THROTTLE_DRIVERS


def live_link(migration: Migration) -> forecast.Link:
    """The link as this migration measured it: the agent's throughput, and its own dirty rounds' rate and
    fixed cost per round (``samples.dirty_rounds``, ``forecast.dirty_round_cost``) once it timed two."""
    driver = migration.source.agent_driver if migration.source is not None else ""
    link = forecast.Link(
        float(migration.throughput_bytes_s), pre_pause_rounds=PRE_PAUSE_ROUNDS.get(driver, 0)
    )
    fitted = forecast.dirty_round_cost(dirty_rounds(migration.round_samples or [], running=True))
    if fitted is None:
        return link
    return replace(link, round_rate_bytes_s=fitted[0], round_overhead_s=fitted[1])


def first_pass_left(migration: Migration, elapsed_s: float) -> float:
    """What round 1 has still to send (bytes): the agent's ``bytes_remaining`` less what the guest
    dirtied since Copy began (``dirty_rate_bytes_s`` is measured from the round's start, so about
    ``dirty_rate_bytes_s * elapsed_s``), which waits for round 2 (``forecast.CopyState``)."""
    remaining = float(migration.bytes_remaining)
    dirtied = min(remaining, float(migration.dirty_rate_bytes_s) * elapsed_s)
    return max(0.0, remaining - dirtied)


def mirroring(migration: Migration) -> bool:
    """Whether ``migration``'s local-disk mirror runs and has not caught up yet (its memory waits)."""
    return migration.disk_bytes_total > 0 and migration.disk_ready_at is None


def mirror_inputs(
    migration: Migration, elapsed: float
) -> tuple[forecast.Guest, forecast.Link, forecast.CopyState]:
    """The forecast's inputs while the local disks' mirror runs (``forecast`` step 8): what the mirror has
    left, its throughput and the guest's writes to the disks as the agent reports them; the memory's
    first pass and dirty rate as the migrate dialog last measured them (none measured: not counted)."""
    from .estimates import cached_dirty_rate

    assert migration.vm is not None
    measured = cached_dirty_rate(migration.vm)
    memory = measured.guest() if measured is not None else forecast.Guest(migration.vm.memory_mib * MiB, 0.0)
    guest = replace(
        memory,
        disk_bytes=migration.disk_bytes_total,
        disk_write_rate_bytes_s=float(migration.disk_dirty_rate_bytes_s),
    )
    driver = migration.source.agent_driver if migration.source is not None else ""
    link = forecast.Link(
        float(migration.disk_throughput_bytes_s), pre_pause_rounds=PRE_PAUSE_ROUNDS.get(driver, 0)
    )
    state = forecast.CopyState(elapsed_s=elapsed, disk_left_bytes=float(migration.disk_bytes_remaining))
    return guest, link, state


def outlook(migration: Migration, now: datetime | None = None) -> Outlook | None:
    """The live forecast of ``migration`` while it copies (None before the agent reported rates).

    Continues ``forecast.forecast`` from the row's last reported numbers: what is left (bytes, the
    agent's ``bytes_remaining``; in round 1 too, where it is what the first pass has still to send plus
    what the guest dirtied since: the guest's whole memory is never assumed), the round, the throttle
    auto-converge applies now (``Migration.throttle_pct``: the measured dirty rate is the throttled
    guest's), the link as this migration measures it now (``live_link``). ``now``: the moment of the
    reading (default: ``timezone.now()``; a replay passes its own). Rescues are offered only as the
    source's driver can do them (``can_throttle_live``). ``Outlook.time_left_s`` is in seconds; how far
    it is from the truth is what ``bench/bench_time_left.py`` measures. While a local-disk mirror has not
    caught up (``mirroring``) the forecast goes from what it has left (``mirror_inputs``), its own time
    left in ``Outlook.disk_left_s``; no warning or rescue is offered before the memory's rounds begin.
    """
    mirror = mirroring(migration)
    rate = migration.disk_throughput_bytes_s if mirror else migration.throughput_bytes_s
    if migration.state != Migration.State.COPY or migration.vm is None or not rate:
        return None
    started = migration.copy_started_at or migration.state_changed_at
    elapsed = max(0.0, ((now or timezone.now()) - started).total_seconds())
    if elapsed < MIN_RATE_S or not (migration.disk_bytes_sent if mirror else migration.bytes_sent):
        # A rate over the Copy's first instants (the agent's first figures, before it counted what the
        # first pass has to send) said "About 28 min left" for an 8 s copy: no time until it means one.
        return None
    from .estimates import forecast_policy

    policy_values = migration_policy.effective(migration.policy)
    # The Copy limit it was requested with, not the VM's of today (``limits``).
    policy = replace(
        forecast_policy(policy_values, migration.vm),
        copy_limit_s=phase_limits_of(migration).of(Migration.State.COPY),
    )
    memory = migration.vm.memory_mib * MiB
    if mirror:
        guest, link, state = mirror_inputs(migration, elapsed)
        result = forecast.forecast(guest, link, policy, state)
        hopes = result.converges or result.verdict is forecast.Verdict.MAY_NOT_CONVERGE
        return Outlook(
            max(0.0, result.total_s - elapsed) if hopes else None,
            result.downtime_ms,
            result.allowed_downtime_ms,
            forecast.bottleneck(guest, link, policy),
            "",
            [],
            can_throttle_live(migration),
            disk_left_s=result.disk_s,
        )
    left = float(migration.bytes_remaining) if migration.rounds > 1 else None
    throttle = float(migration.throttle_pct)
    # The agent's dirty rate is what the last round left over that round's time (distinct pages): for a
    # guest rewriting a small memory that reads far below what it writes; the model wants its write rate,
    # unthrottled (the throttle in force is applied again by the model).
    dirty = float(migration.dirty_rate_bytes_s)
    window = left / dirty if left and dirty > 0 else 0.0
    guest = forecast.Guest.measured(memory, dirty, window, throttle_pct=throttle)
    link = live_link(migration)
    state = forecast.CopyState(
        round=max(0, migration.rounds - 1),
        left_bytes=left,
        elapsed_s=elapsed,
        throttle_pct=throttle,
        last_round_bytes=left,
        round_left_bytes=round_left_bytes(
            migration.round_samples or [], migration.rounds, migration.bytes_sent
        ),
        first_pass_left_bytes=first_pass_left(migration, elapsed) if left is None else None,
    )
    result = forecast.forecast(guest, link, policy, state)
    why = forecast.bottleneck(guest, link, policy)
    warning = ""
    options: list[forecast.Rescue] = []
    throttle_live = can_throttle_live(migration)
    # Throttling still climbing (auto-converge on, short of its ceiling): how far the guest slows under it
    # is learnt round by round, so a stop is not certain yet: "may", and no time promised.
    climbing = (
        result.verdict is forecast.Verdict.WILL_NOT_CONVERGE
        and policy.auto_converge
        and throttle < policy.throttle_max_pct
    )
    if result.verdict.warns:
        limit = result.limit_reason or "its limit"
        may = climbing or result.verdict is forecast.Verdict.MAY_NOT_CONVERGE
        will = "may" if may else "will"
        if policy.at_limit == "switchover":  # only a close call warns then: the careful run switches over
            warning = f"This migration {will} reach {limit} and switch over anyway, with a longer freeze"
        else:
            stays = "would" if will == "may" else "will"
            warning = f"This migration {will} stop at {limit} and the guest {stays} stay on its source"
        reason = why
        if climbing:
            reason = (
                f"throttling is at {throttle:.0f}% and still climbing (up to "
                f"{policy.throttle_max_pct:.0f}%); whether the guest slows enough shows round by round"
            )
        elif will == "may" and "too close to promise" not in why:
            # bottleneck() judges a migration from its start; a close call from here is its own reason
            faster = f"{100 * forecast.MARGIN:.0f}% faster"
            reason = f"too close to promise (with the guest writing {faster} it would not finish in time)"
        warning += f": {reason}." if reason else "."
        options = forecast.rescues(guest, link, policy, state, can_throttle=throttle_live)
    if copy_over_reason(migration):  # switching over now: neither "will stop at its limit" nor a rescue
        warning, options = "", []
    # A close call's times are those of the measured rates (what happens if they hold).
    hopes = result.converges or result.verdict is forecast.Verdict.MAY_NOT_CONVERGE
    return Outlook(
        max(0.0, result.total_s - elapsed) if hopes else None,
        result.downtime_ms,
        result.allowed_downtime_ms,
        why,
        warning,
        options,
        throttle_live,
    )


def steer_values(migration: Migration) -> dict[str, Any]:
    """What the panel's manual form is prefilled with: the migration's policy in force now.

    ``{"downtime_ms": int, "bandwidth_cap_mb_s": float | None}`` (ms; MB/s, None: no cap of its own),
    from ``Migration.policy`` (``migration_policy.effective``), the same values a change writes back.
    """
    policy = migration_policy.effective(migration.policy)
    cap = policy.get("bandwidth_cap_mb_s")
    return {"downtime_ms": int(policy["max_downtime_ms"]), "bandwidth_cap_mb_s": cap or None}


def check_change(raw: dict[str, Any]) -> ParamsChange:
    """The agent's ``ParamsChange`` from the page's or API's fields (only what is changed is set in it);
    ``BadChange`` if bad.

    Two forms, one check (``migration_policy.check_policy``, so the words are the dialog's):

    - the page's, one ``action`` at a time: ``raise_downtime`` (with ``downtime_ms``), ``bandwidth``
      (``bandwidth_cap_mb_s``, empty or 0: no cap), ``auto_converge`` (turn throttling on) or
      ``switchover`` (switch over now);
    - the API's, any of the policy's own keys at once: ``max_downtime_ms`` (ms),
      ``bandwidth_cap_mb_s`` (MB/s; None, empty or 0: no cap), ``auto_converge`` (on or off). All are
      checked before anything is sent, so one bad value changes nothing.
    """
    if "action" in raw:
        action = raw.get("action")
        if action == "raise_downtime":
            return check_change({"max_downtime_ms": raw.get("downtime_ms")})
        if action == "bandwidth":
            return check_change({"bandwidth_cap_mb_s": raw.get("bandwidth_cap_mb_s")})
        if action == "auto_converge":
            return ParamsChange(auto_converge=True)
        if action == "switchover":
            return ParamsChange(switchover_now=True)
        raise BadChange(f"Unknown change {str(action)[:40]!r}; choose one of: {', '.join(ACTIONS)}.")
    unknown = sorted(set(raw) - set(POLICY_CHANGES))
    if unknown:
        words = ", ".join(str(key)[:40] for key in unknown[:5])
        raise BadChange(f"Unknown change {words}; change one of: {', '.join(POLICY_CHANGES)}.")
    if not raw:
        raise BadChange(f"Nothing to change: give one of {', '.join(POLICY_CHANGES)}.")
    try:
        checked = migration_policy.check_policy(raw)
    except migration_policy.PolicyError as error:
        raise BadChange(str(error)) from None
    change: dict[str, Any] = {}
    if "max_downtime_ms" in raw:
        change["downtime_ms"] = checked["max_downtime_ms"]
    if "bandwidth_cap_mb_s" in raw:
        change["bandwidth_mbps"] = (checked["bandwidth_cap_mb_s"] or 0) * 8
    if "auto_converge" in raw:
        change["auto_converge"] = checked["auto_converge"]
    try:
        return ParamsChange.model_validate(change)
    except ValidationError as error:  # within the policy's bounds, so never seen: still plain words
        raise BadChange(plain_words(error, "the change")) from None


def describe_change(change: ParamsChange) -> str:
    """``change`` in words: "raised the allowed downtime to 5.0 s and ..." (what is set in it)."""
    parts = []
    if change.downtime_ms is not None:
        parts.append(f"raised the allowed downtime to {forecast.ms(change.downtime_ms)}")
    if change.bandwidth_mbps is not None:
        cap = change.bandwidth_mbps / 8
        parts.append(f"set the bandwidth cap to {cap:g} MB/s" if cap else "removed the bandwidth cap")
    if change.auto_converge is not None:
        parts.append(f"turned throttling (auto-converge) {'on' if change.auto_converge else 'off'}")
    if change.switchover_now:
        parts.append("asked to switch over now")
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def within_site_cap(change: ParamsChange) -> ParamsChange:
    """``change`` as sent to the agent: a new bandwidth cap (or none) never lifts the site-wide
    ``MIGRATION_BANDWIDTH_MBPS``, as ``migration_policy.agent_params`` does at the start."""
    site = settings.MIGRATION_AGENT_PARAMS.get("bandwidth_mbps")
    if change.bandwidth_mbps is None or not site:
        return change
    return change.model_copy(update={"bandwidth_mbps": min(change.bandwidth_mbps or site, site)})


def do_change_migration(migration: Migration, raw: dict[str, Any], user: Any) -> str:
    """Apply an admin's change to a running migration; returns what was done, in words.

    ``raw``: either form of ``check_change``. Raises ``PermissionDenied`` (a user who may not migrate
    it: ``add_migration`` and an operator of its source's and its target's host groups),
    ``BadChange`` (an unknown change or a bad value) or ``ChangeRefused`` (a migration not in Init or
    Copy, the source agent refused or is unreachable): nothing changed then.
    """
    if not user.has_perm(CHANGE_PERMISSION):
        raise PermissionDenied("Your account lacks the permission to change migrations.")
    current = Migration.objects.select_related("vm", "source", "target").get(pk=migration.pk)
    if current.vm is not None:  # as for starting it: an operator of its source's and target's groups
        check_can_migrate(user, current.vm, current.target)
    change = check_change(raw)
    check_applies(current, change)
    if change.switchover_now:
        claim_switchover(current)
    try:
        send_change(current, change)
    except ChangeRefused:
        if change.switchover_now:  # not taken: another switch-over may be asked
            Migration.objects.filter(pk=current.pk).update(switchover_requested_at=None)
        raise
    words = describe_change(change)
    with transaction.atomic():
        row = Migration.objects.select_for_update().get(pk=current.pk)
        policy = migration_policy.effective(row.policy)
        before = dict(policy)
        if change.downtime_ms is not None:
            policy["max_downtime_ms"] = change.downtime_ms
        if change.bandwidth_mbps is not None:
            policy["bandwidth_cap_mb_s"] = change.bandwidth_mbps / 8 or None
        if change.auto_converge is not None:
            policy["auto_converge"] = change.auto_converge
        if policy != before:
            policy["preset"] = "custom"
        row.policy = policy
        row.save(update_fields=["policy"])
        actor = user if getattr(user, "is_authenticated", False) else None
        message = f"{user} {words}"
        MigrationEvent.objects.create(
            migration=row, from_state=row.state, to_state=row.state, message=message, actor=actor
        )
        AuditEvent.record(
            AuditEvent.Action.MIGRATION_CHANGED, row, actor=user, before=before,
            after={**policy, **change.model_dump(exclude_unset=True)},
            message=message, object_name=f"migration {row.pk} of {row.vm_name or row.pk}",
        )  # fmt: skip
        transaction.on_commit(lambda: publish_progress(row.pk))
    logger.info("%s changed migration %s: %s", user, current.pk, change.model_dump(exclude_unset=True))
    return f"{words[0].upper()}{words[1:]}."


NOTHING_CHANGED = "Nothing was changed."


def check_applies(migration: Migration, change: ParamsChange) -> None:
    """Raise ``ChangeRefused`` in the console's words when ``change`` does not apply to ``migration`` as
    it stands: not in Init or Copy; a switch-over before Copy began, or after one was asked; any change
    once its Copy is over (a switch-over asked, or Copy converged: the worker is about to quiesce)."""
    state, number = migration.state, migration.pk
    if state not in CHANGEABLE_STATES:
        raise ChangeRefused(
            f"Migration {number} is {migration.get_state_display().lower()}: only a migration in its "
            f"Init or Copy phase can be changed. {NOTHING_CHANGED}"
        )
    over = copy_over_reason(migration)
    if over:
        raise ChangeRefused(copy_over_words(migration, over))
    if change.switchover_now and state == Migration.State.INIT:
        raise ChangeRefused(
            f"Migration {number} is still in its Init phase: there is nothing to switch over yet. "
            f"Switching over is possible once Copy has begun. {NOTHING_CHANGED}"
        )


def copy_over_reason(migration: Migration) -> str:
    """Why ``migration``, still in Copy, takes no change any more: "a switch-over was already asked" or
    "its Copy converged" (the worker is about to quiesce); "" while changes apply (or it is not in Copy).
    The same for the API's 409 (``check_applies``) and the phases panel's buttons (``copy_over_note``)."""
    if migration.state != Migration.State.COPY:
        return ""
    if migration.switchover_requested_at is not None:
        return "a switch-over was already asked"
    if migration.copy_percent >= 100:
        return "its Copy converged"
    return ""


def copy_over_note(migration: Migration) -> str:
    """The phases panel's words beside its disabled steering buttons once Copy takes no change
    (``copy_over_reason``): "Switch-over asked at 12:03:04: it is switching over now; no change applies
    any more." or "Copy converged: ...". "" while the buttons apply."""
    why = copy_over_reason(migration)
    if not why:
        return ""
    if migration.switchover_requested_at is not None:
        head = f"Switch-over asked at {timezone.localtime(migration.switchover_requested_at):%H:%M:%S}"
    else:
        head = "Copy converged"
    return f"{head}: it is switching over now; no change applies any more."


def copy_over_words(migration: Migration, why: str) -> str:
    """ "Migration 7's Copy is over (a switch-over was already asked at 12:03:04): it is switching over
    now, and this change no longer applies. Nothing was changed." """
    if migration.switchover_requested_at is not None and "switch-over" in why:
        why += f" at {timezone.localtime(migration.switchover_requested_at):%H:%M:%S}"
    return (
        f"Migration {migration.pk}'s Copy is over ({why}): it is switching over now, and this change "
        f"no longer applies. {NOTHING_CHANGED}"
    )


def claim_switchover(migration: Migration) -> None:
    """Mark the switch-over asked, by compare-and-set: of two at once, the second is refused
    (``check_applies``' words), before anything is sent to the agent."""
    now = timezone.now()
    claimed = Migration.objects.filter(
        pk=migration.pk, state=Migration.State.COPY, switchover_requested_at__isnull=True
    ).update(switchover_requested_at=now)
    if not claimed:
        current = Migration.objects.get(pk=migration.pk)
        check_applies(current, ParamsChange(switchover_now=True))
        raise ChangeRefused(copy_over_words(current, "a switch-over was already asked"))
    migration.switchover_requested_at = now


def send_change(migration: Migration, change: ParamsChange) -> None:
    """``change`` to the source agent; its errors as ``ChangeRefused`` in the console's words (the
    state as it is now when the agent no longer has the Copy), ``SourceUnavailable`` when it could not
    be asked."""
    source = migration.require_source()
    try:
        with AgentClient.for_vsp(source) as agent:
            agent.change_params(agent_migration_id(migration), within_site_cap(change))
    except AgentUnreachable as error:
        cause = alerts.agent_failure(source.name, "source", error)
        raise SourceUnavailable(
            f"{cause[0].upper()}{cause[1:]}: the change could not be sent. {NOTHING_CHANGED}"
        ) from None
    except AgentRefused as error:
        raise ChangeRefused(refusal_words(migration, error)) from None
    except AgentError:
        raise ChangeRefused(
            f"The source host {source.name} sent a reply that makes no sense; the change may not have "
            f"been taken. {NOTHING_CHANGED}"
        ) from None


def refusal_words(migration: Migration, error: AgentRefused) -> str:
    """Why the source agent refused a change, in the console's words: the migration as it is now when it
    moved on (or never reached the source yet), else the agent's own reason."""
    current = Migration.objects.get(pk=migration.pk)
    if current.state not in CHANGEABLE_STATES:
        check_applies(current, ParamsChange())  # raises: ended or past Copy
    source = current.require_source().name
    if isinstance(error, UnknownMigration):
        if current.state == Migration.State.INIT:
            return (
                f"Migration {current.pk} is still in its Init phase: the source host {source} has not "
                f"begun sending yet. Try again once Copy has begun. {NOTHING_CHANGED}"
            )
        return (
            f"The source host {source} no longer holds migration {current.pk} (its agent restarted?); "
            f"the worker ends it. {NOTHING_CHANGED}"
        )
    if error.status == HTTPStatus.CONFLICT and current.state == Migration.State.COPY:
        return copy_over_words(current, "its Copy converged")
    return f"The source host {source} refused the change: {error}. {NOTHING_CHANGED}"
