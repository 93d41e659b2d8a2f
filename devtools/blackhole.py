"""Ports that accept connections and never answer: a hung host agent for tests and benchmarks.

Each port is a listening socket that is never ``accept()``-ed: the kernel completes the TCP handshake
(up to the backlog), takes the client's bytes (a TLS ClientHello, an HTTP request) and nobody ever
replies, so the client waits for its own time-out, as with an agent that is alive but stuck.
``release()`` closes the sockets: the connections waiting on them are reset (the client fails at once)
and new ones are refused.
"""

from __future__ import annotations

import socket


class BlackHole:
    """``count`` silent ports on ``host``; ``urls(scheme)`` names them, ``release()`` ends them."""

    def __init__(self, count: int = 1, host: str = "127.0.0.1", backlog: int = 1024) -> None:
        self.host = host
        self._sockets = [socket.create_server((host, 0), backlog=backlog) for _ in range(count)]
        self.ports = [sock.getsockname()[1] for sock in self._sockets]

    def urls(self, scheme: str = "http") -> list[str]:
        return [f"{scheme}://{self.host}:{port}" for port in self.ports]

    def release(self) -> None:
        for sock in self._sockets:
            sock.close()

    def __enter__(self) -> BlackHole:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
