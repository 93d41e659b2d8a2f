"""The two host agents of one migration, and every call the control plane makes to them.

One ``MigrationAgents`` per decider run (the worker's, recovery's): a client of each agent (connected on
first use), the id both agents know the attempt by, and the requests built from the migration's
records (``IncomingRequest`` and ``OutgoingRequest``: the guest from ``vms.agent_messages``, the policy
from ``migration_policy``). Its calls come in two kinds:

- **during the phases** (``prepare_target``, ``start_source``, ``progress``, ``command_progress``,
  ``target_snapshot``): each runs in a helper thread so that an ``interrupt`` (the watchdog's: a cancel,
  a time limit, a lost lease) ends the wait at once, and each agent error becomes a ``MigrationFailed``
  of the current phase naming the host (``alerts.agent_failure``); an agent that did not answer marks
  its VSP unreachable at once;
- **in the endings** (``cancel_source``, ``undo``, ``discard_target``, ``resume_target``,
  ``release_source``, ``resume_source``, ``ask_target``, ``source_guest_status``): idempotent, retried,
  never raising an agent error: what the agent answered (``Answer``), or None when it never did.

A command that changes something on an agent is sent only after ``lease.confirm()`` (``LeaseLost``
otherwise, nothing sent), except the undo after an abort, which follows a recorded outcome.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from typing import Any, Literal, TypeVar

from django.conf import settings
from django.db import connection
from pydantic import ValidationError

from agentprotocol import (
    FAILED_STATES,
    Encryption,
    Endpoint,
    IncomingRequest,
    LocalDisks,
    MigrationParams,
    OutgoingRequest,
    PreparedIncoming,
    ProgressSnapshot,
    plain_words,
)
from vms.agent_client import (
    AgentClient,
    AgentError,
    AgentNotRunning,
    AgentProtocolError,
    AgentRefused,
    AgentUnreachable,
    UnknownGuest,
    UnknownMigration,
)
from vms.agent_messages import guest_spec
from vms.inventory import mark_reachable, note_answered
from vms.models import VSP

from . import alerts, migration_policy
from .errors import MigrationFailed
from .lease import Lease, LeaseLost
from .limits import phase_limits_of
from .models import Migration
from .placement import local_disks

logger = logging.getLogger(__name__)

Side = Literal["source", "target"]
GuestStatus = Literal["running", "stopped", "gone", "unknown"]
# What an agent command came to: its snapshot, its refusal (final, not retried), or None (no answer).
Answer = ProgressSnapshot | AgentRefused | None
T = TypeVar("T")

WATCH_INTERVAL_S = 0.1  # how often a wait on an agent checks the run's stop
COMMAND_POLL_INTERVAL_S = 0.15  # while quiesce/freeze block: how often the source's snapshot is read
SILENT_AFTER_S = 1.0  # a host whose call is this long without an answer at a time-out "did not answer"
UNDO_ATTEMPTS = 3
CANCEL_TIMEOUT_S = 1.0  # per attempt: a cancel that does not land at once is tried again, not waited on
CANCEL_ATTEMPTS = 4
ROLL_FORWARD_ATTEMPTS = 6
# The source's release after the target runs the guest: 0.2 + 0.4 s between tries, so a dead source is
# reported within about a second of the commit (plus the client's time-out per try for a hung one).
RELEASE_ATTEMPTS = 3
RELEASE_TIMEOUT_S = 3.0  # per try: a hung (SIGSTOPped) source must not hold the completion for long
SOURCE_ASK_TIMEOUT_S = 2.0  # per attempt: how long an alert waits for the source to say whether the VM runs
SOURCE_ASK_ATTEMPTS = 2
CAUSE_ASK_TIMEOUT_S = 2.0  # asking an agent why a call or the data plane broke: once, briefly
CAUSE_RESTART_WAIT_S = 4.0  # how long an agent refusing connections is asked again (a restart)
CAUSE_RETRY_S = 0.5
HEALTH_TIMEOUT_S = 1.0  # a stalled migration asks each agent whether it answers at all, this long at most
# A source whose hypervisor commits at the switchover (``Health.switchover_commits``: libvirt's P2P):
SETTLE_TIMEOUT_S = 30.0  # how long its outcome is waited for once it was told to stop (libvirt: ~2 s)
SETTLE_POLL_S = 0.2
SETTLE_ASK_TIMEOUT_S = 2.0  # per question: a dead source must not hold the decision for long
# The source's states once its hypervisor completed the switchover: the target runs the guest.
SWITCHED_OVER_STATES = ("ready", "released")
Settled = Literal["committed", "stopped", "unknown"]


def agent_for(vsp: VSP, timeout_s: float | None = None) -> AgentClient:
    """A client of ``vsp``'s host agent (close it, or use it as a context manager).

    ``timeout_s``: per request (s); the ``AGENT_TIMEOUT_S`` setting when None.
    """
    return AgentClient.for_vsp(vsp, timeout_s=timeout_s)


def agent_migration_id(migration: Migration) -> str:
    """The id both agents know this attempt by; derived from the row so recovery can name it too."""
    return f"m{migration.pk}-{migration.requested_at:%Y%m%d%H%M%S%f}"


class MigrationAgents:
    """The source and target agents of ``migration``, as one decider talks to them.

    ``lease``: the decider's (None only for an ended migration that nobody decides any more: the undo of
    leftovers). ``timeout_s``: per request (the ``AGENT_TIMEOUT_S`` setting when None). Close it, or use
    ``with``.
    """

    def __init__(
        self, migration: Migration, lease: Lease | None = None, *, timeout_s: float | None = None
    ) -> None:
        self.migration = migration
        self.lease = lease
        self.agent_id = agent_migration_id(migration)
        self.source = agent_for(migration.require_source(), timeout_s)
        self.target = agent_for(migration.target, timeout_s)
        # Set by another thread (the watchdog): a cancel or time limit (``MigrationFailed``) or ``LeaseLost``.
        self.stop_reason: MigrationFailed | LeaseLost | None = None
        # The side the driving thread is waiting on, and since when (monotonic s); None between calls.
        self.waiting_on: tuple[Side, float] | None = None
        # The source's ``Health.switchover_commits`` once asked (``learn_switchover_commits``); None before.
        self.switchover_commits: bool | None = None
        self.source_started = False  # the source answered ``start_source``: it may be sending

    def close(self) -> None:
        self.source.close()
        self.target.close()

    def __enter__(self) -> MigrationAgents:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def interrupt(self, reason: MigrationFailed | LeaseLost) -> None:
        """From another thread: the driving thread raises ``reason`` at its next call or check, and at once
        from a call it is waiting on (within ``WATCH_INTERVAL_S``)."""
        self.stop_reason = reason

    def check_stop(self) -> None:
        """Raise the reason of an ``interrupt``, if any."""
        if self.stop_reason is not None:
            raise self.stop_reason

    # --- the requests, built from the records ----------------------------------------------------

    def incoming_request(self, encryption: Encryption, streams: int | None) -> IncomingRequest:
        """What the target prepares: the guest as the VM defines it, its phase limits, the pair's policy,
        and ``local_disks`` (``local_disks_mode``)."""
        vm = self.migration.require_vm()
        return IncomingRequest(
            migration_id=self.agent_id,
            guest=guest_spec(vm),
            limits=phase_limits_of(self.migration).agent_form(),
            encryption=encryption,
            streams=streams,
            local_disks=self.local_disks_mode(),
        )

    def local_disks_mode(self) -> LocalDisks:
        """ "mirror" when the guest has a disk on a local pool of its source (``placement.local_disks``: the
        target allocates a volume for each in a local pool of its own, the source mirrors it), else
        "refuse": both requests carry the same."""
        vm = self.migration.require_vm()
        return "mirror" if local_disks(vm, self.migration.source) else "refuse"

    def outgoing_request(
        self, target: Endpoint, encryption: Encryption, streams: int | None
    ) -> OutgoingRequest:
        """What the source starts: the guest's id, where to send it, how (``migration_params``)."""
        return OutgoingRequest(
            migration_id=self.agent_id,
            guest=str(self.migration.require_vm().guest_id),
            target=target,
            params=self.migration_params(),
            encryption=encryption,
            streams=streams,
            local_disks=self.local_disks_mode(),
        )

    def migration_params(self) -> MigrationParams:
        """The migration's effective policy (the site's round limit and bandwidth cap applied) and the VM's
        phase limits."""
        site = settings.MIGRATION_AGENT_PARAMS
        params = migration_policy.agent_params(
            self.migration.policy,
            max_rounds=site.get("max_rounds") or migration_policy.DEFAULT_MAX_ROUNDS,
            site_cap_mbps=site.get("bandwidth_mbps"),
        )
        return params.model_copy(update={"limits": phase_limits_of(self.migration).agent_form()})

    # --- during the phases: interruptible, failures in words --------------------------------------

    def prepare_target(self, encryption: Encryption, streams: int | None) -> PreparedIncoming:
        """The target reserves room and opens its data-plane listener (Init)."""
        request = self._request(lambda: self.incoming_request(encryption, streams))
        return self._phase_call("target", lambda: self.target.prepare_incoming(request), changes=True)

    def start_source(self, target: Endpoint, encryption: Encryption, streams: int | None) -> ProgressSnapshot:
        """The source connects to ``target`` and starts pre-copy (Init)."""
        request = self._request(lambda: self.outgoing_request(target, encryption, streams))
        started = self._phase_call("source", lambda: self.source.start_outgoing(request), changes=True)
        self.source_started = True
        return started

    def progress(self, after_seq: int) -> Generator[ProgressSnapshot, None, None]:
        """The source's progress stream (changes after ``after_seq``), each snapshot as it comes; ends when
        the agent ends the stream. Close the iterator to stop reading it (its connection is closed then;
        not while a read of it, abandoned by a stop, still runs in its helper thread)."""
        self.check_stop()
        stream = self.source.iter_progress(self.agent_id, after_seq)
        end = object()
        while True:
            with self._failures("source"):
                snapshot = self._interruptible("source", lambda: next(stream, end))
            if snapshot is end:
                return
            assert isinstance(snapshot, ProgressSnapshot)
            try:
                yield snapshot
            except GeneratorExit:
                stream.close()
                raise

    def command_progress(
        self, command: Literal["quiesce", "freeze"]
    ) -> Iterator[tuple[bool, ProgressSnapshot]]:
        """Run a blocking source command (it answers when its phase is over): ``(False, snapshot)`` for the
        source's snapshot every ``COMMAND_POLL_INTERVAL_S`` meanwhile (so the phase's percentage moves on
        the page), then ``(True, answer)``: the command's answer. The command runs on a connection of its
        own, in a helper thread."""
        self.check_stop()
        self._confirm_lease()
        done = threading.Event()
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                with agent_for(self.migration.require_source()) as agent:
                    outcome["snapshot"] = getattr(agent, command)(self.agent_id)
            except Exception as error:  # handed to the driving thread below
                outcome["error"] = error
            finally:
                done.set()

        threading.Thread(target=work, name=f"{command}-{self.migration.pk}", daemon=True).start()
        while not done.wait(COMMAND_POLL_INTERVAL_S):
            try:
                snapshot = self._interruptible("source", lambda: self.source.snapshot(self.agent_id))
            except (AgentUnreachable, AgentRefused, AgentProtocolError) as error:
                logger.debug("Progress poll of %s during %s: %s", self.agent_id, command, error)
                continue
            if not done.is_set():
                yield False, snapshot
        self.check_stop()
        if "error" in outcome:
            with self._failures("source"):
                raise outcome["error"]
        yield True, outcome["snapshot"]

    def learn_switchover_commits(self) -> bool | None:
        """Whether the source's hypervisor commits the migration by itself at the switchover (its health's
        ``switchover_commits``: libvirt's peer-to-peer migration), asked once (Init) and kept in
        ``switchover_commits``; None when the agent did not say (asked again when it matters:
        ``source_commits_at_switchover``). Interrupted by the run's stop, as a phase call is (a stop
        right after the start leaves it None: the decision then asks again)."""
        if self.switchover_commits is None:
            try:
                health = self._interruptible("source", self.source.health)
            except AgentError as error:
                logger.info("The source of %s did not say what its driver commits: %s", self.agent_id, error)
            else:
                self.switchover_commits = health.switchover_commits
        return self.switchover_commits

    def target_snapshot(self) -> ProgressSnapshot:
        """The target's own view of the migration (its memory digest, Frozen)."""
        return self._phase_call("target", lambda: self.target.snapshot(self.agent_id))

    def silent_side(self) -> Side | None:
        """The side whose call has gone unanswered for ``SILENT_AFTER_S``, else None (the watchdog asks)."""
        waiting = self.waiting_on
        if waiting is None or time.monotonic() - waiting[1] < SILENT_AFTER_S:
            return None
        return waiting[0]

    def silent_agent(self, timeout_s: float = HEALTH_TIMEOUT_S) -> Side | None:
        """Which agent does not answer a health question within ``timeout_s`` (the target first: it is
        the one a stalled data plane waits on), or None when both answer. Each answer or silence is
        recorded on its VSP at once (``vms.inventory.mark_reachable``)."""
        silent: Side | None = None
        sides: tuple[Side, ...] = ("target", "source")
        for side in sides:
            with agent_for(self.vsp(side), timeout_s) as agent:
                try:
                    agent.health()
                except AgentError:
                    mark_reachable(self.vsp(side), False)
                    silent = silent or side
                    continue
            mark_reachable(self.vsp(side), True)
        return silent

    def _request(self, build: Callable[[], T]) -> T:
        """A request built from the records; a value out of the protocol's bounds fails the phase in words
        (no agent is asked)."""
        try:
            return build()
        except ValidationError as error:
            raise MigrationFailed(
                self.migration.state, f"the request to the agents is invalid: {plain_words(error, 'it')}"
            ) from None

    def _phase_call(self, side: Side, work: Callable[[], T], *, changes: bool = False) -> T:
        self.check_stop()
        if changes:
            self._confirm_lease()
        with self._failures(side):
            result = self._interruptible(side, work)
        note_answered(self.vsp(side))  # an agent that answers is reachable again at once
        self.check_stop()
        return result

    def _interruptible(self, side: Side, work: Callable[[], T]) -> T:
        """``work()`` (a call to ``side``'s agent) in a helper thread; the run's stop interrupts the wait.

        A frozen peer (SIGSTOP, a hung host) holds an HTTP call until the client's time-out (10 s); the
        phase's time limit must not wait for that. The abandoned call ends on its own time-out. Raises
        what ``work`` raised, or the stop reason.
        """
        self.check_stop()
        outcome: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()

        def helper() -> None:
            try:
                outcome.put((True, work()))
            except BaseException as error:  # handed to the driving thread
                outcome.put((False, error))
            finally:
                connection.close()

        self.waiting_on = (side, time.monotonic())
        try:
            threading.Thread(target=helper, name=f"{side}-call-{self.migration.pk}", daemon=True).start()
            while True:
                try:
                    ok, value = outcome.get(timeout=WATCH_INTERVAL_S)
                    break
                except queue.Empty:
                    self.check_stop()
        finally:
            self.waiting_on = None
        if not ok:
            raise value
        result: T = value
        return result

    @contextmanager
    def _failures(self, side: Side) -> Iterator[None]:
        """Agent errors become a failure of the current phase naming the host, of the error's kind (a stop
        reason wins). An agent that did not answer marks its VSP unreachable at once (the migrate dialog
        and the checks see it), not at the next inventory collection."""
        try:
            yield
        except AgentError as error:
            if type(error) is AgentUnreachable:  # the connection broke off: ask why
                error = self.why_unreachable(side, error)
            if isinstance(error, AgentUnreachable):
                self._check_lease()
                mark_reachable(self.vsp(side), False, error=error)
            self.check_stop()
            reason = alerts.agent_failure(self.vsp(side).name, side, error)
            raise MigrationFailed(self.migration.state, reason, kind=error.kind) from None

    def why_unreachable(self, side: Side, error: AgentUnreachable) -> AgentUnreachable:
        """A call to ``side`` broke off (a reset, a stream cut): ask its agent once more, briefly, so the
        alert can say whether it is not running (connection refused: it crashed or stopped) or hangs
        (no answer). Returns the more telling error, else ``error`` (it answers again)."""
        try:
            with agent_for(self.vsp(side), CAUSE_ASK_TIMEOUT_S) as agent:
                agent.health()
        except AgentUnreachable as again:
            return again if type(again) is not AgentUnreachable else error
        except AgentError:
            pass
        return error

    def peer_cause(self, side: Side) -> str | None:
        """Why the data plane broke, as ``side``'s agent tells it, in words: its agent is not running,
        hangs, restarted (it no longer knows the migration), or untrusted; None when it answers with the
        migration still known (then the link itself failed). A peer that did not answer is marked
        unreachable.

        An agent that refuses connections is asked again for ``CAUSE_RESTART_WAIT_S``: one that a service
        manager restarts at once comes back empty, and "restarted" says more than "not running".
        """
        who = alerts.host(side, self.vsp(side).name)
        deadline = time.monotonic() + CAUSE_RESTART_WAIT_S
        while True:
            try:
                with agent_for(self.vsp(side), CAUSE_ASK_TIMEOUT_S) as agent:
                    agent.snapshot(self.agent_id)
            except UnknownMigration:
                return f"{who}'s agent restarted and no longer knows the migration (a crash or a restart)"
            except AgentNotRunning as error:
                if time.monotonic() < deadline:
                    time.sleep(CAUSE_RETRY_S)
                    continue
                mark_reachable(self.vsp(side), False, error=error)
                return alerts.unreachable_cause(who, error)
            except AgentUnreachable as error:
                if type(error) is AgentUnreachable:
                    error = self.why_unreachable(side, error)
                mark_reachable(self.vsp(side), False, error=error)
                return alerts.unreachable_cause(who, error)
            except AgentError as error:
                logger.info("Asking the %s why the data plane broke: %s", who, error)
            return None

    # --- in the endings: retried, answers instead of errors ---------------------------------------

    def cancel_source(self) -> bool:
        """Tell the source to stop sending, promptly: short attempts, retried (a refusal: nothing to stop)."""
        return retried(
            lambda: self.source.cancel(self.agent_id, CANCEL_TIMEOUT_S), CANCEL_ATTEMPTS, delay=0.1
        )

    def source_commits_at_switchover(self) -> bool | None:
        """``switchover_commits`` as learnt, else asked now (one short question, for recovery): None when the
        source does not answer."""
        if self.switchover_commits is None:
            try:
                with agent_for(self.migration.require_source(), SETTLE_ASK_TIMEOUT_S) as agent:
                    self.switchover_commits = agent.health().switchover_commits
            except AgentError as error:
                logger.info("Asking the source of %s what its driver commits: %s", self.agent_id, error)
        return self.switchover_commits

    def settle_source(self, timeout_s: float = SETTLE_TIMEOUT_S) -> tuple[Settled, ProgressSnapshot | None]:
        """For a source whose hypervisor commits at the switchover: stop it if it has not switched over yet
        (``cancel_source``), then wait up to ``timeout_s`` s for its outcome, by its own snapshot:

        - "committed": it switched over and its hypervisor completed the job (the target runs the guest:
          libvirt's completed job; a cancel after the switchover answers 409, too late);
        - "stopped": cancelled or failed first (the source runs the guest again), or it never started;
        - "unknown": no answer, or still undecided at the time-out.

        A source that no longer knows the migration (its agent restarted: libvirt's job ran on without
        it, ``docs/libvirt-driver.md``) is judged by its guest (``_settled_by_guest``). While the
        source does not answer, the target's word that it runs the arrived guest is "committed".

        Returns the verdict and the last snapshot read (None without one). Sends the cancel without the
        lease: stopping is always allowed, as the watchdog's cancel is.
        """
        deadline = time.monotonic() + timeout_s
        self.cancel_source()
        last: ProgressSnapshot | None = None
        while True:
            try:
                with agent_for(self.migration.require_source(), SETTLE_ASK_TIMEOUT_S) as agent:
                    last = agent.snapshot(self.agent_id)
            except UnknownMigration:
                return self._settled_by_guest(), last
            except AgentError as error:
                logger.info("Asking the source of %s for its outcome: %s", self.agent_id, error)
                if self._target_runs_it():
                    return "committed", last
            if last is not None and last.state in SWITCHED_OVER_STATES:
                return "committed", last
            if last is not None and last.state in FAILED_STATES:
                return "stopped", last
            if time.monotonic() >= deadline:
                return "unknown", last
            time.sleep(SETTLE_POLL_S)

    def _target_runs_it(self) -> bool:
        """The target's word, when the source does not answer: it runs the arrived guest ("ready", or
        "completed" once resumed), so the source's hypervisor committed."""
        try:
            with agent_for(self.migration.target, SETTLE_ASK_TIMEOUT_S) as agent:
                return agent.snapshot(self.agent_id).state in ("ready", "completed")
        except AgentError:
            return False

    def _settled_by_guest(self) -> Settled:
        """The outcome for a source that does not know the migration, by its guest: running there is
        "stopped"; left shut off because it migrated away (``not_runnable``) is "committed" only if the
        target says it runs it too (a domain an admin moved elsewhere is not this migration's);
        otherwise "stopped" (the abort's alert says where the VM is), or "unknown" without an answer."""
        guest_id = str(self.migration.require_vm().guest_id)
        try:
            with agent_for(self.migration.require_source(), SETTLE_ASK_TIMEOUT_S) as agent:
                guest = agent.get_guest(guest_id)
        except UnknownGuest:
            return "stopped"
        except AgentError as error:
            logger.info("Asking the source of %s for its guest: %s", self.agent_id, error)
            return "unknown"
        if guest.hardware_status == "not_runnable" and self._target_runs_it():
            return "committed"
        return "stopped"

    def undo(self, attempts: int = UNDO_ATTEMPTS, *, cancel: bool = True) -> bool:
        """After an abort: stop the source's sending, drop the target's copy, make sure the source runs.

        True once both the target's discard and the source's resume were answered (a refusal is an answer:
        that agent holds nothing of this migration any more). ``cancel``: a later try skips it (the
        source's resume stops any sending as well).
        """
        if cancel:
            self.cancel_source()
        discarded = self.discard_target(attempts)
        resumed = retried(self._noted("source", lambda: self.source.resume(self.agent_id)), attempts)
        return discarded and resumed

    def discard_target(self, attempts: int = UNDO_ATTEMPTS, *, leased: bool = False) -> bool:
        """The target drops its copy; True once it answered."""
        command = self._leased(lambda: self.target.discard(self.agent_id), leased)
        return retried(self._noted("target", command), attempts)

    def resume_target(self) -> Answer:
        """After the commit: the target runs the guest (``ROLL_FORWARD_ATTEMPTS`` tries, under the lease).
        Its answer, or its silence, is recorded on its VSP at once (``_noted``)."""
        command = self._leased(lambda: self.target.resume(self.agent_id))
        return ask(self._noted("target", command), ROLL_FORWARD_ATTEMPTS)

    def release_source(self, attempts: int = RELEASE_ATTEMPTS, timeout_s: float | None = None) -> Answer:
        """After the target runs the guest: the source lets its copy go (under the lease, if any). A few
        short tries: the migration completes without the answer (``endings.roll_forward``) and recovery
        asks again. ``timeout_s``: per try (the client's when None). Recorded on its VSP (``_noted``)."""
        command = self._leased(lambda: self.source.release(self.agent_id, timeout_s))
        return ask(self._noted("source", command), attempts)

    def resume_source(self, attempts: int = ROLL_FORWARD_ATTEMPTS) -> Answer:
        """The source runs its guest again (under the lease): the target never took it after the commit, or
        the migration ended and its undo is tried again."""
        return ask(self._noted("source", self._leased(lambda: self.source.resume(self.agent_id))), attempts)

    def ask_target(self, attempts: int = 2) -> Answer:
        """The target's snapshot, or its refusal, or None: whether it still runs the guest it took over."""
        return ask(lambda: self.target.snapshot(self.agent_id), attempts)

    def source_guest_status(
        self, attempts: int = SOURCE_ASK_ATTEMPTS, timeout_s: float | None = SOURCE_ASK_TIMEOUT_S
    ) -> GuestStatus:
        """Whether the source runs the guest, by its own answer: "running", "stopped", "gone" (it does not
        know the guest) or "unknown" (no answer in ``attempts`` tries of ``timeout_s`` each). ``LeaseLost``
        (nothing asked) once a renewal found the lease gone."""
        self._check_lease()
        guest_id = str(self.migration.require_vm().guest_id)
        for attempt in range(attempts):
            try:
                guest = self.source.get_guest(guest_id, timeout_s=timeout_s)
            except UnknownGuest:
                return "gone"
            except AgentError as error:
                logger.info("Asking the source of %s (attempt %s): %s", self.agent_id, attempt + 1, error)
                if attempt + 1 < attempts:
                    time.sleep(0.5)
                continue
            return "running" if guest.hardware_status == "on" else "stopped"
        return "unknown"

    # --- plumbing -------------------------------------------------------------------------------

    def vsp(self, side: Side) -> VSP:
        return self.migration.require_source() if side == "source" else self.migration.target

    def _noted(self, side: Side, command: Callable[[], T]) -> Callable[[], T]:
        """``command`` to ``side``'s agent, its outcome recorded on the VSP at once: no answer marks it
        unreachable (the dialog and the checks see it), an answer (a refusal too) reachable again."""

        def noted() -> T:
            try:
                result = command()
            except AgentUnreachable:
                self._check_lease()
                mark_reachable(self.vsp(side), False)
                raise
            except AgentRefused:  # an answer, though not the one hoped for
                note_answered(self.vsp(side))
                raise
            note_answered(self.vsp(side))
            return result

        return noted

    def _leased(self, command: Callable[[], T], leased: bool = True) -> Callable[[], T]:
        """``command`` sent only after the lease is confirmed (each retry confirms again)."""
        if not leased:
            return command

        def confirmed() -> T:
            self._confirm_lease()
            return command()

        return confirmed

    def _confirm_lease(self) -> None:
        if self.lease is not None:
            self.lease.confirm()

    def _check_lease(self) -> None:
        if self.lease is not None:
            self.lease.check()


def ask(command: Callable[[], ProgressSnapshot], attempts: int, *, delay: float = 0.2) -> Answer:
    """Run an idempotent agent command until it answers: its snapshot, or its refusal (not retried).

    ``attempts`` tries, ``delay`` seconds apart at first, doubling up to 5 s; None if it never answered.
    """
    for attempt in range(1, attempts + 1):
        try:
            return command()
        except AgentRefused as refusal:
            return refusal
        except (AgentUnreachable, AgentProtocolError) as error:
            logger.warning("Agent command failed (attempt %s of %s): %s", attempt, attempts, error)
            if attempt < attempts:
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
    return None


def retried(command: Callable[[], ProgressSnapshot], attempts: int, *, delay: float = 0.2) -> bool:
    """A clean-up command (cancel, discard, resume after an abort): True once the agent answered.

    A refusal (4xx) counts as an answer here (logged): the agent has nothing left to clean up. A 5xx
    (the agent failed to do it) does not: the clean-up is still to be done. Decisions that depend on
    what the agent holds use ``ask`` and go by the refusal's class.
    """
    answer = ask(command, attempts, delay=delay)
    if isinstance(answer, AgentRefused):
        if answer.status >= 500:
            logger.warning("Agent failed a clean-up command: %s", answer)
            return False
        logger.warning("Agent refused a clean-up command: %s", answer)
    return answer is not None


def runs_the_guest(answer: Answer) -> bool:
    """The target's answer to ``resume`` (or its snapshot) says it holds the guest and runs it."""
    return isinstance(answer, ProgressSnapshot) and answer.state == "completed"
