"""An agent as those older than storage pools answer: a real agent behind a small HTTP proxy that answers
``GET /v1/resources`` with 404 (what such an agent's router does) and passes everything else on.

A stand-in, because an agent of that age is not in this checkout to run: only that one route differs.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx


class _Handler(BaseHTTPRequestHandler):
    upstream = ""

    def _pass_on(self) -> None:
        if self.path.startswith("/v1/resources"):
            self._answer(404, b"404: Not Found", "text/plain")
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")}
        reply = httpx.request(
            self.command, self.upstream + self.path, content=body, headers=headers, timeout=30
        )
        self._answer(reply.status_code, reply.content, reply.headers.get("content-type", "application/json"))

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_DELETE = _pass_on

    def log_message(self, *args: object) -> None:
        pass


class OlderAgent:
    """``OlderAgent(agent_url)``: ``url`` answers as an agent older than pools; ``close()`` stops it."""

    def __init__(self, upstream: str) -> None:
        handler = type("Handler", (_Handler,), {"upstream": upstream.rstrip("/")})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
