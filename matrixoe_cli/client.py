"""A small client of the console's REST API: JSON calls, problem documents as ``ApiError``, SSE progress."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx

from .config import Login
from .safe import for_terminal, terminal_text

TIMEOUT_S = 30.0
RETRIES = 3  # for a create: the same Idempotency-Key on each try, so a retry never starts a second one


class ApiError(Exception):
    """The console refused (a problem document) or could not be reached; ``str()`` is its plain words,
    safe for a terminal (``safe.terminal_text``: they may quote what someone typed)."""

    def __init__(self, detail: str, status: int = 0) -> None:
        super().__init__(terminal_text(detail))
        self.status = status


class Client:
    """The API's JSON; with ``for_terminal`` (all but ``--json``) every string in it is made safe for a
    terminal (``safe.for_terminal``) before any command sees it: tables, lines, bars and errors alike."""

    def __init__(self, login: Login, *, for_terminal: bool = True) -> None:
        self.login = login
        self.for_terminal = for_terminal
        self.http = httpx.Client(
            base_url=f"{login.url}/api/v1",
            headers={"Authorization": f"Bearer {login.token}", "Accept": "application/json"},
            timeout=TIMEOUT_S,
        )

    def get(self, path: str, **params: Any) -> Any:
        return self._call("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: dict | None = None, headers: dict | None = None) -> Any:
        return self._call("POST", path, json=body or {}, headers=headers)

    def patch(self, path: str, body: dict) -> Any:
        return self._call("PATCH", path, json=body)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.InvalidURL as error:
            raise ApiError(f"Not an address the console could be asked at: {error}") from None
        except httpx.HTTPError as error:
            raise ApiError(f"Could not reach the console at {self.login.url}: {error}") from None
        if response.status_code >= 400:
            raise ApiError(problem_detail(response), response.status_code)
        return self._shown(response.json())

    def _shown(self, data: Any) -> Any:
        return for_terminal(data) if self.for_terminal else data

    def all_pages(self, path: str, **params: Any) -> list[dict]:
        items: list[dict] = []
        while True:
            page = self.get(path, **params, limit=500, offset=len(items))
            items.extend(page["items"])
            if not page["items"] or len(items) >= page["count"]:
                return items

    def create_migration(self, vm: str, target: str, policy: dict | None = None) -> dict:
        """POST /migrations (``policy``: overrides, as the API takes them), retried on connection errors
        with one Idempotency-Key."""
        key = str(uuid.uuid4())
        for attempt in range(RETRIES):
            try:
                return self.post(
                    "/migrations",
                    {"vm": vm, "target": target, **({"policy": policy} if policy else {})},
                    headers={"Idempotency-Key": key},
                )
            except ApiError as error:
                if error.status or attempt == RETRIES - 1:
                    raise
                time.sleep(1 + attempt)
        raise AssertionError("unreachable")

    def watch(self, migration_id: int) -> Iterator[tuple[str, dict]]:
        """(event, migration) from the progress stream: the current state first, ``end`` last."""
        try:
            with self.http.stream(
                "GET",
                f"/migrations/{migration_id}/events",
                headers={"Accept": "text/event-stream"},
                timeout=None,
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ApiError(problem_detail(response), response.status_code)
                for event, data in parse_events(response.iter_lines()):
                    yield event, self._shown(data)
        except httpx.HTTPError as error:
            raise ApiError(f"Lost the progress stream from {self.login.url}: {error}") from None


def parse_events(lines: Iterator[str]) -> Iterator[tuple[str, dict]]:
    """Server-sent events (https://html.spec.whatwg.org/multipage/server-sent-events.html), JSON data."""
    event = "message"
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


def problem_detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"The console answered {response.status_code} {response.reason_phrase}."
    return str(body.get("detail") or body.get("title") or response.reason_phrase)
