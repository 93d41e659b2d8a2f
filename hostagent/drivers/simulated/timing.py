"""Phase timing and failure causes shared by the simulated driver's two sides.

Each phase runs under its limit (``PhaseLimits.of(phase)``, seconds; ``asyncio.timeout`` raises
``TimeoutError``, which the sides turn into ``FailureKind.TIME_LIMIT``). ``driver.MigrationAborted``
carries the ``FailureKind`` of a failure the engine decided itself; ``TargetAborted`` and
``SourceAborted`` one the peer reported in an ABORT frame (``{"error": words, "kind": kind}``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from agentprotocol import FailureKind
from hostagent.driver import MigrationAborted
from hostagent.drivers.simulated.wire import HELLO_TIMEOUT_S  # noqa: F401  (kept importable from here)

POPULATE_BUDGET_S = 3.0  # target: at most this (and a quarter of the init limit) to pre-fault RAM


async def wait_watching(awaitable: Awaitable[Any], watched: list[asyncio.Task[Any] | None]) -> Any:
    """Await ``awaitable``, but fail as soon as a watched task fails (ending cleanly is fine)."""
    waiter = asyncio.ensure_future(awaitable)
    pending = {waiter, *(task for task in watched if task is not None)}
    try:
        while True:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not waiter and not task.cancelled():
                    failure = task.exception()
                    if failure is not None:
                        raise failure
            if waiter in done:
                return waiter.result()
    finally:
        if not waiter.done():
            waiter.cancel()


class TargetAborted(MigrationAborted):
    """The target side gave up and told the source why (an ABORT frame)."""


class SourceAborted(MigrationAborted):
    """The source side gave up and told the target why (an ABORT frame)."""


def kind_of(body: dict[str, Any]) -> FailureKind:
    """The ``kind`` an ABORT frame names (``FailureKind`` value), INTERNAL if it names none we know."""
    try:
        return FailureKind(str(body.get("kind")))
    except ValueError:
        return FailureKind.INTERNAL
