"""QMP for the QEMU driver, over the ``qemu.qmp`` package (QEMU's own asyncio QMP library).

``qemu.qmp`` covers all the driver uses: connecting to a unix socket, capabilities negotiation,
commands (``execute``), passing a file descriptor with SCM_RIGHTS for ``getfd``
(``send_fd_scm``) and asynchronous events (``EventListener``). This thin layer adds what the
driver relies on around it: retrying the connection while QEMU creates the socket, keyword
arguments in Python spelling (``downtime_limit`` -> ``downtime-limit``), an events queue,
a ``closed`` flag, and two errors: ``QmpError`` (QEMU refused a command) and ``QmpClosed``
(the connection is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, QMPError, Runstate

# qemu.qmp logs every disconnect of a QEMU we quit or kill on purpose; the driver says what matters.
logging.getLogger("qemu.qmp").setLevel(logging.ERROR)


class QmpError(Exception):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error_class: str, description: str) -> None:
        self.command = command
        self.error_class = error_class
        self.description = description
        super().__init__(f"{command}: {description}")


class QmpClosed(ConnectionError):
    """The QMP connection is gone (QEMU exited or closed it)."""


class QmpClient:
    """One QMP connection to one QEMU process; ``events`` receives its asynchronous events."""

    def __init__(self, client: QMPClient) -> None:
        self._client = client
        self._listener = EventListener()
        client.register_listener(self._listener)
        self._fd_lock = asyncio.Lock()
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.closed = asyncio.Event()
        self._tasks = [asyncio.create_task(self._pump_events()), asyncio.create_task(self._watch_state())]

    @classmethod
    async def connect(cls, path: str, timeout: float = 10.0) -> QmpClient:
        """Connect to QEMU's QMP socket (retrying until it exists) and leave negotiation mode."""
        deadline = time.monotonic() + timeout
        while True:
            client = QMPClient(path)
            try:
                await client.connect(path)
                return cls(client)
            except ConnectError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.02)

    @property
    def version(self) -> tuple[int, int, int]:
        """QEMU's version from the QMP greeting."""
        greeting = self._client.greeting
        if greeting is None:
            return (0, 0, 0)
        qemu = greeting.QMP.version.get("qemu")
        if not isinstance(qemu, dict):
            return (0, 0, 0)
        return (int(qemu.get("major", 0)), int(qemu.get("minor", 0)), int(qemu.get("micro", 0)))

    async def execute(self, command: str, pass_fd: int | None = None, **arguments: Any) -> Any:
        """Run one command and return its ``return`` value; ``pass_fd`` rides along (SCM_RIGHTS)."""
        if self.closed.is_set():
            raise QmpClosed(f"QMP closed before {command}")
        args = {key.replace("_", "-"): value for key, value in arguments.items()} or None
        try:
            if pass_fd is None:
                return await self._client.execute(command, args)
            async with self._fd_lock:  # the fd waits in QEMU for the next getfd: one at a time
                self._client.send_fd_scm(pass_fd)
                return await self._client.execute(command, args)
        except ExecuteError as error:
            raise QmpError(command, error.error_class, str(error)) from None
        except (QMPError, OSError, EOFError) as error:
            raise QmpClosed(f"QMP closed while waiting for {command}: {error}") from None

    async def _pump_events(self) -> None:
        async for event in self._listener:
            self.events.put_nowait(dict(event))

    async def _watch_state(self) -> None:
        while self._client.runstate == Runstate.RUNNING:
            await self._client.runstate_changed()
        self.closed.set()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.disconnect()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.closed.set()
