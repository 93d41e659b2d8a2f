"""The words of a migration's alerts and failures, for people; decisions go by ``FailureKind``.

Every sentence an alert or a timeline event says about why a migration failed and where its VM is
comes from here: the failure of a phase (an agent that stopped answering, refused, or answered
nonsense; a time limit), where the VM stays after an abort, what the target lost after the commit.
Nothing here changes state or asks an agent: callers pass what they learnt.
"""

from __future__ import annotations

from datetime import UTC, datetime

from agentprotocol import ProgressSnapshot
from vms.agent_client import (
    AgentAddressRefused,
    AgentError,
    AgentNotRunning,
    AgentRefused,
    AgentTimedOut,
    AgentUnreachable,
    AgentUntrusted,
    UnknownMigration,
)

from .errors import MigrationFailed
from .models import Migration

NO_ONE_NAMED = "an administrator"


def cancelled_by(migration_id: int) -> str:
    """Who asked to cancel, for the alert: ``Migration.cancel_requested_by``, or "an administrator"."""
    requester = Migration.objects.filter(pk=migration_id).select_related("cancel_requested_by").first()
    if requester is None or requester.cancel_requested_by is None:
        return NO_ONE_NAMED
    return str(requester.cancel_requested_by)


def host(side: str, vsp_name: str) -> str:
    """ "the target host vsp2": how alerts name an agent."""
    return f"the {side} host {vsp_name}"


def agent_failure(vsp_name: str, side: str, error: AgentError) -> str:
    """Why a phase failed at an agent's error, by its cause (``unreachable_cause``), "... refused: <its
    words>", or "... sent a reply that makes no sense"."""
    if isinstance(error, AgentUnreachable):
        return unreachable_cause(host(side, vsp_name), error)
    if isinstance(error, AgentRefused):
        return f"{host(side, vsp_name)} refused: {error}"
    return f"{host(side, vsp_name)} sent a reply that makes no sense"


def unreachable_cause(who: str, error: AgentUnreachable) -> str:
    """What the console knows of why ``who`` ("the target host vsp2") could not be asked:

    - a certificate it does not trust: "... presented a TLS certificate the console does not trust
      (SHA-256 fingerprint AB:CD:...)": the agent answered, but not as the host registered;
    - connection refused: "... agent is not running (connection refused)": it stopped or crashed;
    - a time-out: "... stopped answering (no answer in 10 s)": it or its host hangs;
    - anything else (a reset, a stream cut): "... stopped answering (the connection broke off)".
    """
    if isinstance(error, AgentAddressRefused):
        return f"{who} was not asked: {str(error).split(': ', 1)[-1]}"
    if isinstance(error, AgentUntrusted):
        fingerprint = f" (SHA-256 fingerprint {error.fingerprint})" if error.fingerprint else ""
        return f"{who} presented a TLS certificate the console does not trust{fingerprint}"
    if isinstance(error, AgentNotRunning):
        return f"{who}'s agent is not running (connection refused)"
    if isinstance(error, AgentTimedOut):
        within = f" in {error.timeout_s:g} s" if error.timeout_s else ""
        return f"{who} stopped answering (no answer{within})"
    return f"{who} stopped answering (the connection broke off)"


def progress_ended_early(source_name: str) -> str:
    return f"{host('source', source_name)} ended its progress report early"


def over_time_limit(limit_s: int | None, elapsed_s: float, silent: tuple[str, str] | None = None) -> str:
    """The reason of a phase stopped at its limit, with the real time it had run: "it ran over its time
    limit of 2 s (stopped after 3.1 s; the target host vsp2 did not answer)". ``silent``: (side, VSP
    name) of the call that went unanswered, if any."""
    detail = f"stopped after {elapsed_s:.1f} s"
    if silent is not None:
        detail += f"; {host(*silent)} did not answer"
    return f"it ran over its time limit of {limit_s} s ({detail})"


def no_progress_detail(since: datetime, silent: tuple[str, str] | None) -> str:
    """ "nothing moved since 18:52:03 UTC; the target host vsp2 does not answer" (``silent``: (side,
    VSP name) of the call waited on, if any)."""
    detail = f"nothing moved since {since:%H:%M:%S} UTC"
    if silent is not None:
        detail += f"; {host(*silent)} does not answer"
    return detail


def no_progress_warning(
    phase: str, stalled_s: float, limit_s: int, since: datetime, silent: tuple[str, str] | None = None
) -> str:
    """The page's warning while a phase is only stalled: "No progress in the Copy phase for 75 s (nothing
    moved since 18:52:03 UTC; the target host vsp2 does not answer). The migration aborts at 150 s without
    progress (its no-progress limit); the VM keeps running on its source meanwhile." """
    return (
        f"No progress in the {phase} phase for {stalled_s:.0f} s ({no_progress_detail(since, silent)}). "
        f"The migration aborts at {limit_s} s without progress (its no-progress limit); the VM keeps "
        "running on its source meanwhile."
    )


def no_progress_moving_again(stalled_s: float) -> str:
    """The timeline's line when bytes move again after a warning."""
    return f"Progress again after {stalled_s:.0f} s without any: the no-progress warning is withdrawn"


def over_no_progress_limit(
    limit_s: int, stalled_s: float, since: datetime, silent: tuple[str, str] | None = None
) -> str:
    """The reason of a phase stopped at the no-progress limit: "no progress for 150.2 s, over its
    no-progress limit of 150 s (nothing moved since 18:52:03 UTC; the target host vsp2 does not answer)"."""
    detail = no_progress_detail(since, silent).replace("does not answer", "did not answer")
    return f"no progress for {stalled_s:.1f} s, over its no-progress limit of {limit_s} s ({detail})"


def stays_sentence(migration: Migration, status: bool | str | None) -> str:
    """Where the VM is, in the alert's last sentence; ``status`` as ``MigrationAgents.source_guest_status``
    gives it ("running", "stopped", "gone", "unknown") or a bool (runs or not)."""
    source = migration.require_source().name
    if status is True or status == "running":
        return f"The VM keeps running on {source}."
    if status is False or status == "stopped":
        return f"The VM stays on {source}, where it was not running."
    if status == "gone":
        return (
            f"The VM is not running: {source} no longer has it (its host agent restarted, and a simulated "
            "host's guests die with its agent: a host crash). Start it again on "
            f"{source}."
        )
    return f"The VM stays on {source}, which did not answer: if its host crashed, the VM is down there."


def committed_by_source(migration: Migration, failure: MigrationFailed) -> str:
    """The timeline's words when the source's hypervisor had already committed the migration at its
    switchover (libvirt) as the control plane was about to end it (``failure``: a cancel, a limit, a
    check), so the migration completes instead."""
    source = host("source", migration.require_source().name)
    return (
        f"{source}'s hypervisor had already switched the guest over to {migration.target.name} and "
        f"committed the migration itself (its driver commits at the switchover, as libvirt does), so this "
        f"could not stop it any more: {failure.alert} The migration completes"
    )


def abort_alert(migration: Migration, failure: MigrationFailed, status: bool | str | None) -> str:
    """The alert of an abort: the failure, then where the VM stays (``stays_sentence``)."""
    return f"{failure.alert} {stays_sentence(migration, status)}"


def says_unanswered(migration: Migration) -> bool:
    """The abort's alert ends saying the source did not answer (so it may be restated)."""
    return migration.alert.endswith(stays_sentence(migration, "unknown"))


def restated_alert(migration: Migration, status: str) -> tuple[str, str] | None:
    """An abort's alert that said the source "did not answer", restated now that it answered (``status``
    as ``stays_sentence`` takes it): (new alert, timeline event), or None when there is nothing to say
    (the alert did not end so, or the source still says nothing).

    QA: a QEMU source agent killed mid-migration, restarted, re-adopted its guest and resumed it, and the
    alert still said the VM was down there.
    """
    unanswered = stays_sentence(migration, "unknown")
    if status == "unknown" or not migration.alert.endswith(unanswered):
        return None
    now = stays_sentence(migration, status).removesuffix(".")
    again = "its host agent answered again after the abort"
    alert = f"{migration.alert.removesuffix(unanswered)}{now} ({again})."
    return alert, f"{migration.source} answered again: {now[0].lower()}{now[1:]}."


def restated_source_lost(migration: Migration, since: datetime) -> tuple[str, str] | None:
    """An ended migration's alert that says the VM keeps running on its source, restated once that source
    no longer reports the guest (the inventory marked its copy Lost at ``since``, an aware time): (new
    alert, timeline event), or None when the alert says no such thing. What followed the sentence (a
    note that the source answered again) is history the new words replace.

    QA: a demo agent restarted after an abort, its guests gone (the VM shown Lost), and the report still
    said the VM keeps running there.
    """
    source = migration.require_source().name
    keeps = f"The VM keeps running on {source}"
    if keeps not in migration.alert:
        return None
    ended = "cancel" if migration.state == Migration.State.CANCELLED else "abort"
    until = f"{since.astimezone(UTC):%H:%M:%S} UTC"
    restated = (
        f"The VM kept running on {source} after the {ended} until {until}, when {source} no longer "
        "reported it (its host agent restarted without it, or it was removed): it is not running there "
        "now."
    )
    alert = migration.alert[: migration.alert.index(keeps)] + restated
    return alert, f"{source} no longer reports the VM (since {until}): it is not running there."


def restated_target_back(migration: Migration) -> tuple[str, str] | None:
    """An abort's alert that said the target's agent was not running, restated once that agent answered
    again (its discard went through): it was not running and now answers, so it restarted. (new alert,
    timeline event), or None when the alert did not say so.

    QA: a target agent killed mid-Copy and restarted by its service manager read as "the network
    failed"; the abort itself can only say it was not running (the restart comes seconds later).
    """
    not_running = f"{host('target', migration.target.name)}'s agent is not running (connection refused)"
    if not_running not in migration.alert:
        return None
    restarted = (
        f"{host('target', migration.target.name)}'s agent stopped (connection refused) and has restarted "
        "since: it crashed or was restarted"
    )
    event = f"{migration.target.name} answered again: its agent had stopped and restarted."
    return migration.alert.replace(not_running, restarted), event


def target_lost(migration: Migration, answer: ProgressSnapshot | AgentRefused | None) -> str:
    """After the release, the target no longer confirms it runs the guest (``answer``: what it said
    instead): the critical alert of a COMPLETED migration whose VM may be down."""
    target, vm = migration.target.name, migration.vm
    if isinstance(answer, UnknownMigration):
        why = (
            "its host agent restarted right after it took over, and a simulated host's guests die with "
            "its agent (a host crash)"
        )
    elif answer is None:
        why = "it stopped answering right after it took over; if its host crashed, the VM is down"
    else:
        why = f"it reports {answer.state if isinstance(answer, ProgressSnapshot) else answer}"
    released = f"The source copy on {migration.require_source().name} was released."
    return f"{vm} may not be running on {target}: {why}. {released}"


def target_did_not_run(migration: Migration, refusal: ProgressSnapshot | AgentRefused) -> str:
    """Why a migration was kept on its source after the commit: the target's answer to ``resume``."""
    if isinstance(refusal, UnknownMigration):
        return f"{migration.target.name} lost the guest before running it (its host agent restarted)"
    said = f"it reports {refusal.state}" if isinstance(refusal, ProgressSnapshot) else str(refusal)
    return f"{migration.target.name} did not run the guest ({said})"


REASON_LENGTH = 200  # ``Registration.not_runnable_reason``


def kept_on_source_reason(
    migration: Migration, refusal: ProgressSnapshot | AgentRefused, status: bool | str | None
) -> str:
    """The Not Runnable reason of the target's copy when the commit's flip is turned back
    (``records.unflip_registrations``): why the target did not take the guest (``target_did_not_run``),
    then where the guest is by the source's own answer (``status`` as ``stays_sentence`` takes it), so a
    source that lost the guest too (its agent killed, a simulated host's guests dying with it) is not said
    to keep it. At most ``REASON_LENGTH`` characters (cut with "…")."""
    source = migration.require_source().name
    if status is True or status == "running":
        where = f"the guest stays on VSP {source}"
    elif status is False or status == "stopped":
        where = f"the guest stays on VSP {source}, where it is not running"
    elif status == "gone":
        where = f"VSP {source} no longer has it either (the VM is not running): start it again on {source}"
    else:
        where = f"the guest stays on VSP {source}, which did not answer: it may be down there"
    why = target_did_not_run(migration, refusal)
    reason = f"After the commit, {why}; {where}"
    return reason if len(reason) <= REASON_LENGTH else reason[: REASON_LENGTH - 1] + "…"


def resume_pending(migration: Migration) -> str:
    """The page's warning while the roll forward cannot reach the target after the commit."""
    target, source = migration.target.name, migration.require_source().name
    return (
        f"{host('target', target)} does not answer after the commit: {migration.vm} is committed to "
        f"{target} and its resume there is pending ({target} is marked unreachable; tried again until it "
        f"answers). The copy on {source} is kept paused, not released, meanwhile."
    )


def release_pending(migration: Migration) -> str:
    """The critical alert of a migration completed while the source did not answer its release: the host,
    what is pending, what an administrator may do. ``endings.finish_release`` removes exactly this text."""
    target, source = migration.target.name, migration.require_source().name
    return (
        f"{host('source', source)} did not answer after the commit: {migration.vm} runs on {target}, but "
        f"the release of its old copy on {source} is pending ({source} is marked unreachable; the release "
        f"is tried again until it answers). That copy stays paused and Not Runnable: do not start it. If "
        f"{source} never comes back, an administrator may forget that copy from this migration's report."
    )


def released_again(source_name: str) -> str:
    """The timeline's line once a pending release was answered."""
    return f"{source_name} answered again: its copy was released; nothing is pending"


def release_forgotten(source_name: str) -> str:
    """The timeline's line once an administrator forgot a pending release."""
    return (
        f"The pending release on {source_name} was forgotten by an administrator: the console no longer "
        f"asks {source_name} to let its copy go"
    )


def completed_message(migration: Migration) -> str:
    """The timeline's last event: "Completed: web01 runs on vsp2 (downtime 120 ms)"."""
    message = f"Completed: {migration.vm} runs on {migration.target}"
    if migration.downtime_ms is not None:
        message += f" (downtime {migration.downtime_ms} ms)"
    return message
