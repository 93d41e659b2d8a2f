"""How a migration ends, the same for its worker and for recovery (``docs/migrations.md``).

- ``abort``: before the commit. Record ABORTED/CANCELLED with the alert first (the record decides),
  then undo on the agents: the target drops its copy, the source runs the guest on.
- ``roll_forward``: after the commit. The target runs the guest, and only once it said so the source
  lets its copy go; then COMPLETED (with the release pending when the source does not answer it:
  ``finish_release`` later). A target that never runs it (``keep_on_source``): the source, never
  released, runs it again and the commit's flip is turned back.

Each step reads top to bottom: what the agents say (``agents.MigrationAgents``), the words of the alert
(``alerts``), the record (``records``).
"""

from __future__ import annotations

import logging
from typing import Any

from agentprotocol import FailureKind, ProgressSnapshot
from vms.agent_client import AgentRefused
from vms.devices import size_text
from vms.models import Registration

from . import alerts, records
from .agents import RELEASE_TIMEOUT_S, UNDO_ATTEMPTS, Answer, GuestStatus, MigrationAgents, runs_the_guest
from .errors import MigrationFailed
from .lease import Lease
from .models import Migration
from .records import ProgressRecord

logger = logging.getLogger(__name__)

State = Migration.State


def abort(
    agents: MigrationAgents, lease: Lease, failure: MigrationFailed, fields: dict[str, Any] | None = None
) -> bool:
    """Record the failure (the record decides), then undo on the agents if this decider recorded it or
    the migration ended unsuccessfully anyway; returns whether this decider recorded it.

    ``fields``: progress columns recorded with it (the worker's, as held in memory). Raises ``LeaseLost``
    (nothing done) when another decider holds the lease.
    """
    migration = agents.migration
    recorded = records.record_abort(migration, failure, abort_alert(agents, failure), lease, fields=fields)
    if not recorded:
        lease.confirm()
    if recorded or records.has_ended_unsuccessfully(migration.pk):
        undo_and_mark(agents)
    return recorded


def committed_by_source(agents: MigrationAgents, progress: ProgressRecord, failure: MigrationFailed) -> bool:
    """Before an abort: a source whose hypervisor commits by itself at the switchover (libvirt's P2P,
    ``MigrationAgents.source_commits_at_switchover``) may have done so already, and then nothing can
    undo it (a cancel answers 409, too late). Such a source is told to stop and its outcome awaited
    (``MigrationAgents.settle_source``); if it committed, the record follows it: the phases it went
    through recorded (``records.walk_to_frozen``), with its last figures (libvirt's downtime), then the
    commit, whatever ``failure`` was (a cancel, a limit, a check). True then: the caller rolls forward
    (``roll_forward``), never reporting "keeps running on the source". False: the source stopped in
    time, never started, or could not say (the abort goes on as for any driver).

    Sources that do not commit at the switchover are not asked anything (False at once).
    """
    if not agents.source_commits_at_switchover():
        return False
    verdict, snapshot = agents.settle_source()
    logger.warning("Migration %s: its source settled as %s (%s)", agents.agent_id, verdict, failure.reason)
    if verdict != "committed":
        return False
    if snapshot is not None:
        progress.take(snapshot)
    records.walk_to_frozen(progress)
    migration = agents.migration
    records.commit(
        migration, progress.lease, committed_by_source=alerts.committed_by_source(migration, failure)
    )
    return True


def abort_alert(agents: MigrationAgents, failure: MigrationFailed) -> str:
    """The abort's alert: the failure, then where the VM stays, by the source agent's own answer unless the
    failure already knows the guest was not running (``MigrationFailed.source_running``)."""
    known = failure.source_running
    return alerts.abort_alert(agents.migration, failure, where_the_vm_is(agents) if known is None else known)


def where_the_vm_is(agents: MigrationAgents) -> GuestStatus:
    """Whether the guest runs on the source, from the source agent's own answer (the database may be out
    of date). A guest it reports stopped or no longer has is stored Off."""
    status = agents.source_guest_status()
    if status in ("stopped", "gone"):
        records.store_source_guest_off(agents.migration)
    return status


def undo_and_mark(agents: MigrationAgents, attempts: int = UNDO_ATTEMPTS, *, cancel: bool = True) -> bool:
    """``MigrationAgents.undo``, then clear the migration's ``undo_pending`` if both agents answered (and
    restate an alert that said the source did not answer); False leaves it for recovery's next try."""
    done = agents.undo(attempts, cancel=cancel)
    if done:
        records.mark_undone(agents.migration.pk)
        restate_where_the_vm_is(agents)
        restate_target_back(agents)
    else:
        logger.warning(
            "Undo of %s not finished: an agent did not answer; recovery tries again", agents.agent_id
        )
    return done


def restate_where_the_vm_is(agents: MigrationAgents) -> bool:
    """The source answered again (its undo went through): an alert that said it did not answer is
    restated with where the VM is now, as the source reports it. Returns whether it was restated."""
    migration = records.load_migration(agents.migration.pk)
    if migration.source_id is None or migration.vm_id is None or not alerts.says_unanswered(migration):
        return False
    restated = alerts.restated_alert(migration, where_the_vm_is(agents))
    if restated is None or not records.restate_alert(migration, *restated):
        return False
    logger.info("Migration %s: alert restated after its source answered again: %s", migration.pk, restated[1])
    return True


def restate_lost_on_source(registration: Registration) -> bool:
    """The inventory marked ``registration`` (a runnable copy) Lost: if its VM's latest migration ended
    unsuccessfully from that VSP with an alert saying the VM keeps running there, restate it
    (``alerts.restated_source_lost``): the report, the Alerts and the API no longer say it runs there.
    Registered with ``vms.hooks.register_lost_listener``. Returns whether it was restated."""
    latest = (
        Migration.objects.filter(vm_id=registration.vm_id)
        .exclude(state=State.REFUSED)
        .select_related("source", "vm")
        .order_by("-requested_at", "-pk")
        .first()
    )
    if latest is None or latest.state not in (State.ABORTED, State.CANCELLED):
        return False
    if latest.source_id != registration.vsp_id or registration.lost_since is None:
        return False
    restated = alerts.restated_source_lost(latest, registration.lost_since)
    if restated is None or not records.restate_alert(latest, *restated):
        return False
    logger.warning("Migration %s: alert restated, its source lost the guest: %s", latest.pk, restated[1])
    return True


def restate_target_back(agents: MigrationAgents) -> bool:
    """The target answered again (its discard went through): an alert that said its agent was not
    running is restated (``alerts.restated_target_back``). Returns whether it was restated."""
    migration = records.load_migration(agents.migration.pk)
    restated = alerts.restated_target_back(migration)
    if restated is None or not records.restate_alert(migration, *restated):
        return False
    logger.info("Migration %s: alert restated after its target answered again: %s", migration.pk, restated[1])
    return True


def roll_forward(agents: MigrationAgents, lease: Lease) -> bool:
    """After the commit: resume the target, and only once it confirmed it runs the guest, release the source.

    Both commands are idempotent, so a recovering worker may repeat what a dead one already did; each is
    sent only while ``lease`` is still this decider's (``LeaseLost`` otherwise, nothing more done).
    Returns False (still COMMITTING, for recovery to finish) if the target cannot be reached: its VSP
    is marked unreachable and the page warns at once, naming it and the pending resume
    (``records.record_warning``). A target that does not run the guest after ``resume`` (it restarted
    and forgot the migration, or refuses) never gets it: the source, never released, resumes it
    (``keep_on_source``). A target that stops answering or forgets the migration right after it took
    over still ends COMPLETED (the source copy is gone), with an alert saying so: never COMPLETED in
    silence about a lost guest. A source that does not answer its release (a few short tries) does not
    hold the end up: the target runs the guest, so it ends COMPLETED with ``release_pending`` and a
    critical alert naming the host (``alerts.release_pending``), its VSP marked unreachable; recovery
    asks again until it answers (``finish_release``), or an administrator forgets that copy.
    """
    migration = agents.migration
    resumed = agents.resume_target()
    if resumed is None:
        warn_once(migration, lease, alerts.resume_pending(migration))
        return False
    if not runs_the_guest(resumed):
        return keep_on_source(agents, lease, resumed)
    released = agents.release_source(timeout_s=RELEASE_TIMEOUT_S)
    if isinstance(released, AgentRefused):
        logger.warning("Source of %s refused the release (no copy left): %s", agents.agent_id, released)
    note_source_disks(migration, released)
    still = agents.ask_target()
    alert = "" if runs_the_guest(still) else alerts.target_lost(migration, still)
    if released is None:
        alert = " ".join(filter(None, (alert, alerts.release_pending(migration))))
    migration.refresh_from_db()
    note_blackout(migration, still)
    message = alerts.completed_message(migration)
    records.record_completed(migration, lease, message, alert, release_pending=released is None)
    return True


def warn_once(migration: Migration, lease: Lease, warning: str) -> None:
    """The page's warning (with a timeline event), unless it says so already."""
    migration.refresh_from_db(fields=["warning"])
    if migration.warning != warning:
        records.record_warning(migration, lease, warning, warning)


def finish_release(agents: MigrationAgents) -> bool:
    """Recovery's try of a completed migration's pending release (``Migration.release_pending``): once the
    source answers (a refusal is an answer: it holds nothing of the migration any more, e.g. its agent
    restarted), the release is recorded done and the alert restated (``records.record_released``).
    Returns whether it was done; False leaves it for the next try."""
    migration = agents.migration
    answer = agents.release_source(attempts=1)
    if answer is None or (isinstance(answer, AgentRefused) and answer.status >= 500):
        return False
    source = migration.require_source().name
    before = alerts.release_pending(migration)
    alert = migration.alert.replace(before, "").strip()
    if not records.record_released(migration, alert, alerts.released_again(source)):
        return False
    note_source_disks(migration, answer)
    logger.warning("Migration %s: the source %s answered again; its copy was released", migration.pk, source)
    return True


def note_source_disks(migration: Migration, answer: Answer) -> None:
    """After the source answered its release (the target runs the guest by then): what became of the
    source's volumes of the mirrored local disks (``Migration.guest_devices``, "local"), recorded with an
    audit event (``records.record_source_disks``). The source deletes them at the release
    (``ProgressSnapshot.disks_deleted``); a refusal (its agent restarted and no longer knows the
    migration) or a volume it could not delete leaves them there, said with what they hold. Nothing to
    note without a mirror, or without an answer (the release is pending: ``finish_release`` notes it).
    There is no "keep source disks" policy yet: they are always deleted when the source can."""
    mirrored = [disk for disk in migration.guest_devices.get("disks", []) if disk.get("local")]
    if not mirrored or answer is None:
        return
    source, vm = migration.require_source().name, migration.vm_name
    deleted = answer.disks_deleted if isinstance(answer, ProgressSnapshot) else []
    gone = [disk for disk in mirrored if disk["device"] in deleted]
    left = [disk for disk in mirrored if disk["device"] not in deleted]
    if gone:
        message = (
            f"{source} deleted {vm}'s volumes of its mirrored local disks once {migration.target.name} "
            f"ran the guest: {volumes_words(gone)}"
        )
        records.record_source_disks(migration, message, deleted=True)
    if left:
        why = (
            "its agent no longer knew the migration"
            if isinstance(answer, AgentRefused)
            else "its agent did not delete them"
        )
        held = size_text(sum(int(disk["virtual_size_bytes"]) for disk in left))
        message = (
            f"{vm}'s volumes of its mirrored local disks were left on {source} ({why}): "
            f"{volumes_words(left)}; up to {held}: delete them there once no longer needed"
        )
        records.record_source_disks(migration, message, deleted=False)


def volumes_words(disks: list[dict[str, Any]]) -> str:
    """ "vda (volume db01-vda.qcow2 in pool scratch, 40 GiB)" for each disk of ``Migration.guest_devices``."""
    return ", ".join(
        f"{disk['device']} (volume {disk['volume']} in pool {disk['pool']}, "
        f"{size_text(int(disk['virtual_size_bytes']))})"
        for disk in disks
    )


def note_blackout(migration: Migration, snapshot: object) -> None:
    """Keep the network blackout the target measured once the guest ran there (``ProgressSnapshot.
    network_blackout_ms``: the longest gap in its heartbeats, ms), when it says one; a figure only."""
    blackout = getattr(snapshot, "network_blackout_ms", None)
    if isinstance(snapshot, ProgressSnapshot) and blackout is not None:
        Migration.objects.filter(pk=migration.pk).update(network_blackout_ms=blackout)
        migration.network_blackout_ms = blackout


def keep_on_source(agents: MigrationAgents, lease: Lease, refusal: ProgressSnapshot | AgentRefused) -> bool:
    """The target did not take the guest after the commit: the source, never released, runs it again.

    Records ABORTED (failed in Committing) with a critical alert and turns the registration flip back.
    Returns False if the source did not answer.
    """
    migration = agents.migration
    discarded = agents.discard_target(leased=True)
    if agents.resume_source() is None:
        return False
    status = where_the_vm_is(agents)
    failure = MigrationFailed(
        State.COMMITTING, alerts.target_did_not_run(migration, refusal), kind=FailureKind.UNREACHABLE
    )
    alert = alerts.abort_alert(migration, failure, status)
    reason = alerts.kept_on_source_reason(migration, refusal, status)
    records.record_kept_on_source(
        migration, failure, alert, lease, discarded=discarded, running=status == "running", reason=reason
    )
    return True
