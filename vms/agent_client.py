"""The one console-side client of the host agent's HTTP API (see ``hostagent/README.md``).

Synchronous (``httpx``), for Celery tasks and views. Every failure is one of three
errors, never a ``KeyError`` or an ``httpx`` exception:
``AgentUnreachable`` (no answer), ``AgentRefused`` (a 4xx/5xx answer, with the
agent's words), ``AgentProtocolError`` (an answer that is not what the API promises).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, TypedDict

import httpx

SNAPSHOT_FIELDS: dict[str, type | tuple[type, ...]] = {
    "migration_id": str,
    "role": str,
    "guest": str,
    "state": str,
    "percent": dict,
    "bytes_sent": int,
    "bytes_remaining": int,
    "round": int,
    "converged": bool,
    "seq": int,
}
GUEST_FIELDS: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "os_status": str,
    "hardware_status": str,
    "memory_mib": int,
    "vcpus": int,
}
PHASE_NAMES = ("init", "copy", "quiesce", "frozen")


class Endpoint(TypedDict):
    """A prepared target's data-plane address and one-time token, as ``start_outgoing`` takes it."""

    host: str
    port: int
    token: str


class AgentError(Exception):
    pass


class AgentUnreachable(AgentError):
    """The agent did not answer: connection refused or reset, time-out, stream cut."""


class AgentRefused(AgentError):
    """The agent answered with an error status; ``message`` is its explanation."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return self.message


class AgentProtocolError(AgentError):
    """The agent answered something that is not what the API promises."""


def _setting(name: str, default: float) -> float:
    """Time-outs may come from Django settings when Django is configured; the client works without."""
    try:
        from django.conf import settings
    except ImportError:
        return default
    return float(getattr(settings, name, default)) if settings.configured else default


def _require(body: Any, fields: dict[str, type | tuple[type, ...]], what: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise AgentProtocolError(f"the agent's {what} is not a JSON object")
    for field, expected in fields.items():
        value = body.get(field)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise AgentProtocolError(f"the agent's {what} lacks a valid {field!r}")
    return body


def check_snapshot(body: Any) -> dict[str, Any]:
    snapshot = _require(body, SNAPSHOT_FIELDS, "progress snapshot")
    percent = snapshot["percent"]
    if not all(isinstance(percent.get(phase), int) for phase in PHASE_NAMES):
        raise AgentProtocolError("the agent's progress snapshot has no valid percent per phase")
    return snapshot


def check_guest(body: Any) -> dict[str, Any]:
    return _require(body, GUEST_FIELDS, "guest")


class AgentClient:
    def __init__(
        self,
        base_url: str,
        secret: str,
        *,
        timeout_s: float | None = None,
        command_timeout_s: float | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s if timeout_s is not None else _setting("AGENT_TIMEOUT_S", 10.0)
        # quiesce and freeze answer when their phase is over: up to the phase limits.
        self.command_timeout_s = (
            command_timeout_s if command_timeout_s is not None else _setting("AGENT_COMMAND_TIMEOUT_S", 180.0)
        )
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {secret}"},
            timeout=self.timeout_s,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- host and guests ------------------------------------------------
    def health(self) -> dict[str, Any]:
        return _require(
            self._call("GET", "/v1/health"), {"name": str, "version": str, "driver": str}, "health"
        )

    def list_guests(self) -> list[dict[str, Any]]:
        body = self._call("GET", "/v1/guests")
        if not isinstance(body, dict) or not isinstance(body.get("guests"), list):
            raise AgentProtocolError("the agent's guest list is not {'guests': [...]}")
        return [check_guest(guest) for guest in body["guests"]]

    def get_guest(self, name: str) -> dict[str, Any]:
        return check_guest(self._call("GET", f"/v1/guests/{name}"))

    def define_guest(self, spec: dict[str, Any]) -> dict[str, Any]:
        return check_guest(self._call("PUT", f"/v1/guests/{spec['name']}", spec))

    def start_guest(self, name: str) -> dict[str, Any]:
        return check_guest(self._call("POST", f"/v1/guests/{name}/start"))

    def stop_guest(self, name: str, *, graceful_timeout_s: float | None = None) -> dict[str, Any]:
        """Stop the guest: gracefully within ``graceful_timeout_s`` seconds, or at once when None.

        The request says which (``{"graceful_timeout_s": s}`` or ``{"force": true}``); the call waits up to
        the timeout plus the client's own.
        """
        body: dict[str, Any] = (
            {"force": True} if graceful_timeout_s is None else {"graceful_timeout_s": graceful_timeout_s}
        )
        timeout = None if graceful_timeout_s is None else self.timeout_s + graceful_timeout_s
        return check_guest(self._call("POST", f"/v1/guests/{name}/stop", body, timeout_s=timeout))

    def delete_guest(self, name: str) -> None:
        self._call("DELETE", f"/v1/guests/{name}")

    # -- migrations -----------------------------------------------------
    def prepare_incoming(
        self, guest: dict[str, Any], migration_id: str, limits: dict[str, Any] | None = None
    ) -> Endpoint:
        """Target side: reserve room, open the data-plane listener; returns what ``start_outgoing`` takes."""
        body = {"migration_id": migration_id, "guest": guest, "limits": limits or {}}
        answer = _require(
            self._call("POST", "/v1/migrations/incoming", body),
            {"data_host": str, "data_port": int, "token": str},
            "prepared endpoint",
        )
        return {"host": answer["data_host"], "port": answer["data_port"], "token": answer["token"]}

    def start_outgoing(
        self, guest_name: str, migration_id: str, target: Endpoint, params: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        body = {
            "migration_id": migration_id,
            "guest": guest_name,
            "target": {"host": target["host"], "port": target["port"], "token": target["token"]},
            "params": params or {},
        }
        return check_snapshot(self._call("POST", "/v1/migrations/outgoing", body))

    def snapshot(self, migration_id: str) -> dict[str, Any]:
        return check_snapshot(self._call("GET", f"/v1/migrations/{migration_id}"))

    def iter_progress(self, migration_id: str, after_seq: int = 0) -> Iterator[dict[str, Any]]:
        """Snapshots from the streaming endpoint: the current one first, then each change.

        Changes with ``seq <= after_seq`` (already seen) are skipped, the first
        (current) snapshot never is. Ends after a terminal state. The agent repeats
        the current snapshot every few seconds when nothing changes, so a silent
        stream means a dead agent (``AgentUnreachable`` after ``timeout_s``).
        """
        path = f"/v1/migrations/{migration_id}/progress"
        try:
            with self._http.stream("GET", path) as response:
                if response.status_code >= 400:
                    response.read()
                    raise self._refusal(response)
                first = True
                for line in response.iter_lines():
                    if not line.strip():
                        continue
                    snapshot = check_snapshot(self._decode(line))
                    if first or snapshot["seq"] > after_seq:
                        yield snapshot
                    first = False
        except httpx.TransportError as error:
            raise AgentUnreachable(f"progress stream from {self.base_url} broke off: {error}") from error

    def quiesce(self, migration_id: str) -> dict[str, Any]:
        return self._command(migration_id, "quiesce", self.command_timeout_s)

    def freeze(self, migration_id: str) -> dict[str, Any]:
        return self._command(migration_id, "freeze", self.command_timeout_s)

    def resume(self, migration_id: str) -> dict[str, Any]:
        return self._command(migration_id, "resume")

    def discard(self, migration_id: str) -> dict[str, Any]:
        return self._command(migration_id, "discard")

    def release(self, migration_id: str) -> dict[str, Any]:
        return self._command(migration_id, "release")

    def cancel(self, migration_id: str, timeout_s: float | None = None) -> dict[str, Any]:
        """``timeout_s``: a cancel must land promptly, so callers pass a short one and retry."""
        return self._command(migration_id, "cancel", timeout_s)

    # -- plumbing -------------------------------------------------------
    def _command(self, migration_id: str, command: str, timeout_s: float | None = None) -> dict[str, Any]:
        path = f"/v1/migrations/{migration_id}/{command}"
        return check_snapshot(self._call("POST", path, timeout_s=timeout_s))

    def _call(self, method: str, path: str, body: Any = None, timeout_s: float | None = None) -> Any:
        try:
            response = self._http.request(
                method, path, json=body, timeout=timeout_s if timeout_s is not None else self.timeout_s
            )
        except httpx.TransportError as error:
            raise AgentUnreachable(
                f"{method} {self.base_url}{path}: {error or type(error).__name__}"
            ) from error
        if response.status_code >= 400:
            raise self._refusal(response)
        return self._decode(response.content)

    @staticmethod
    def _decode(content: bytes | str) -> Any:
        try:
            return json.loads(content)
        except ValueError as error:
            raise AgentProtocolError("the agent's answer is not JSON") from error

    @staticmethod
    def _refusal(response: httpx.Response) -> AgentRefused:
        try:
            message = response.json().get("error")
        except (ValueError, AttributeError):
            message = None
        if not isinstance(message, str) or not message:
            message = f"HTTP {response.status_code} without an explanation"
        return AgentRefused(response.status_code, message)
