"""A small asyncio QMP client: one unix socket, commands answered in order, events into a queue.

Only what the QEMU driver needs: connect (retrying while QEMU creates the socket), negotiate
capabilities, execute a command (optionally passing a file descriptor along, for ``getfd``),
and receive asynchronous events. A closed connection fails every waiting command.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import socket
import time
from typing import Any

READ_LIMIT = 16 * 1024 * 1024


class QmpError(Exception):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error: dict[str, Any]) -> None:
        self.command = command
        self.error_class = str(error.get("class", "GenericError"))
        self.description = str(error.get("desc", "unknown error"))
        super().__init__(f"{command}: {self.description}")


class QmpClosed(ConnectionError):
    """The QMP connection is gone (QEMU exited or closed it)."""


class QmpClient:
    def __init__(
        self, sock: socket.socket, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._sock = sock
        self._reader = reader
        self._writer = writer
        self._pending: dict[str, tuple[str, asyncio.Future[Any]]] = {}
        self._next_id = 0
        self._send_lock = asyncio.Lock()
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.greeting: dict[str, Any] = {}
        self.closed = asyncio.Event()
        self._read_task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, path: str, timeout: float = 10.0) -> QmpClient:
        """Connect to QEMU's QMP socket (retrying until it exists) and leave negotiation mode."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(sock, path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.02)
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=READ_LIMIT)
        client = cls(sock, reader, writer)
        greeting = await asyncio.wait_for(reader.readline(), max(0.1, deadline - time.monotonic()))
        client.greeting = json.loads(greeting)
        client._read_task = asyncio.create_task(client._read_loop())
        await client.execute("qmp_capabilities")
        return client

    @property
    def version(self) -> tuple[int, int, int]:
        qemu = self.greeting.get("QMP", {}).get("version", {}).get("qemu", {})
        return (int(qemu.get("major", 0)), int(qemu.get("minor", 0)), int(qemu.get("micro", 0)))

    async def execute(self, command: str, pass_fd: int | None = None, **arguments: Any) -> Any:
        """Run one command and return its ``return`` value; ``pass_fd`` rides along (SCM_RIGHTS)."""
        if self.closed.is_set():
            raise QmpClosed(f"QMP closed before {command}")
        self._next_id += 1
        command_id = f"c{self._next_id}"
        message: dict[str, Any] = {"execute": command, "id": command_id}
        if arguments:
            message["arguments"] = {key.replace("_", "-"): value for key, value in arguments.items()}
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[command_id] = (command, answer)
        data = json.dumps(message).encode() + b"\n"
        async with self._send_lock:
            if pass_fd is None:
                self._writer.write(data)
                await self._writer.drain()
            else:
                await self._send_with_fd(data, pass_fd)
        return await answer

    async def _send_with_fd(self, data: bytes, fd: int) -> None:
        # The transport's buffer is empty here (every write is drained under the lock),
        # so writing to the socket directly cannot reorder bytes.
        # A command line is far smaller than the socket buffer, so one non-blocking sendmsg takes it.
        fds = array.array("i", [fd])
        sent = self._sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        if sent < len(data):
            await asyncio.get_running_loop().sock_sendall(self._sock, data[sent:])

    async def _read_loop(self) -> None:
        try:
            while line := await self._reader.readline():
                self._dispatch(json.loads(line))
        except (ConnectionError, ValueError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed.set()
            for command, answer in self._pending.values():
                if not answer.done():
                    answer.set_exception(QmpClosed(f"QMP closed while waiting for {command}"))
            self._pending.clear()

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "event" in message:
            self.events.put_nowait(message)
            return
        command, answer = self._pending.pop(str(message.get("id")), ("", None))
        if answer is None or answer.done():
            return
        if "error" in message:
            answer.set_exception(QmpError(command, message["error"]))
        else:
            answer.set_result(message.get("return"))

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()
        if self._read_task is not None:
            self._read_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._read_task
        self.closed.set()
