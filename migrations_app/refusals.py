"""Refused migration attempts, kept in the history whatever refused them and whatever path asked.

A refused attempt (who, what, why) is a ``Migration`` row in the terminal state REFUSED
(``history.record_refusal``), its ``failure_kind`` one of ``KINDS``: ``permission`` (the user's
rights: ``vms.access``), ``precheck`` (the console's checks: same host, maintenance, memory,
unreachable agent, ...), ``already_migrating`` (the VM has a migration queued or running, also when
two requests raced). Bad input (a policy value that is not one) is not an attempt and is not kept.

The row must outlive the refusal's rollback. An action refuses inside a transaction its caller may
hold (the API's create route keeps its idempotency key in one, an evacuation starts all its guests in
one), and that rollback would take a row written there with it. So ``note_refusal`` writes at once
when no transaction is open and otherwise keeps the attempt until the outermost transaction has
ended: written at its commit (``transaction.on_commit``), or after its rollback by whoever opened
``refusals_recorded()`` around the work (``RecordRefusalsMiddleware`` does for every request).
An attempt a caller turns into something else (an idempotent replay) is ``withdraw``-n first.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from django.db import transaction
from django.http import HttpRequest, HttpResponse

from vms.models import VSP, VirtualMachine

from .history import record_refusal

logger = logging.getLogger(__name__)

PERMISSION = "permission"
PRECHECK = "precheck"
ALREADY_MIGRATING = "already_migrating"
KINDS = (PERMISSION, PRECHECK, ALREADY_MIGRATING)


@dataclass(eq=False)
class RefusedAttempt:
    """One refused request to migrate ``vm`` to ``target``; ``reason`` is the sentence the user got."""

    vm: VirtualMachine
    target: VSP
    user: Any
    reason: str
    kind: str
    done: bool = False  # recorded, or withdrawn

    def record(self) -> None:
        """Write the REFUSED row, once; only outside any transaction (it must not share one's fate)."""
        if self.done:
            return
        self.done = True
        record_refusal(self.vm, self.target, self.user, self.reason, kind=self.kind)

    def withdraw(self) -> None:
        """Not a refusal after all (an idempotent retry answered with the first migration): keep nothing."""
        self.done = True


def in_a_transaction() -> bool:
    """Whether a transaction the code opened is under way. The one a test runner wraps a whole test in
    does not count (marked ``_from_testcase``: Django's own durable-block check ignores it the same way)."""
    blocks = transaction.get_connection().atomic_blocks
    return any(not getattr(block, "_from_testcase", False) for block in blocks)


_pending: ContextVar[list[RefusedAttempt] | None] = ContextVar("pending_refusals", default=None)


def note_refusal(vm: VirtualMachine, target: VSP, user: Any, reason: str, kind: str) -> RefusedAttempt:
    """Keep a refused attempt in the history: at once outside a transaction, else once it has ended."""
    attempt = RefusedAttempt(vm, target, user, reason, kind)
    if not in_a_transaction():
        attempt.record()
        return attempt
    pending = _pending.get()
    if pending is None:
        logger.warning(
            "Refusal of %s to %s noted inside a transaction without refusals_recorded(): it is kept only "
            "if that transaction commits",
            vm.name,
            target.name,
        )
    else:
        pending.append(attempt)
    transaction.on_commit(attempt.record)
    return attempt


@contextlib.contextmanager
def refusals_recorded() -> Iterator[None]:
    """Around work that may refuse inside transactions it rolls back: the attempts noted meanwhile are
    written when it ends (those a commit already wrote, or a caller withdrew, are skipped)."""
    pending: list[RefusedAttempt] = []
    token = _pending.set(pending)
    try:
        yield
    finally:
        _pending.reset(token)
        for attempt in pending:
            if attempt.done:
                continue
            if in_a_transaction():  # still inside the caller's transaction
                transaction.on_commit(attempt.record)
                continue
            try:
                attempt.record()
            except Exception:  # noqa: BLE001 - the response or the error under way matters more
                logger.exception("Could not record the refusal of %s to %s", attempt.vm, attempt.target)


class RecordRefusalsMiddleware:
    """Every request's refused migration attempts are written once the request's transactions ended."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        with refusals_recorded():
            return self.get_response(request)
