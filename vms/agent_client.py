"""The one console-side client of the host agent's HTTP API (see ``hostagent/README.md``).

Synchronous (``httpx``), for Celery tasks and views. Every request is a message of the protocol
package (``agentprotocol``: ``GuestSpec``, ``IncomingRequest``, ``OutgoingRequest``, ``StopRequest``,
``ParamsChange``, ``ProbeRequest``, ``ProbeRun``) and every answer is parsed into one (``GuestInfo``,
``ProgressSnapshot``, ...) and returned as that model: no hand-built dict goes out, none comes back.
A field added to a message is a change of its model only: the client sends and returns whole models.
Guests are named by ``guest_id``. Every failure is one of three errors (each with the ``FailureKind`` a
migration hitting it ends with), never a ``KeyError`` or an ``httpx`` exception:
``AgentUnreachable`` (no answer), ``AgentRefused`` (a 4xx/5xx answer, with the
agent's words; ``UnknownMigration`` and ``UnknownGuest`` when the agent does not know the
migration or the guest), ``AgentProtocolError`` (an answer that is not what the API promises).

TLS: an ``https://`` agent must show a certificate the console trusts, given per VSP as
``trust`` (``VSP.agent_certificate``): the deployment CA's certificate (PEM; the agent's
certificate must name the URL's host), or the SHA-256 fingerprint of the agent's own certificate
(pinned: the console fetches the certificate, compares the fingerprint, and then trusts exactly
that certificate). Without either, the system's CAs. The bearer secret is sent only over a
connection whose certificate passed; a failed check is ``AgentUntrusted``, naming the URL.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import ssl
from collections.abc import Generator
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from agentprotocol import (
    Deleted,
    DirtyRate,
    ErrorReply,
    FailureKind,
    GuestInfo,
    GuestList,
    GuestSpec,
    Health,
    HostResources,
    IncomingRequest,
    Message,
    OutgoingRequest,
    ParamsChange,
    PreparedIncoming,
    PreparedProbe,
    ProbeRequest,
    ProbeResult,
    ProbeRun,
    ProgressSnapshot,
    ProtocolViolation,
    StoppedGuest,
    StopRequest,
    load_json,
    parse,
)
from vms.agent_address import check_agent_address

M = TypeVar("M", bound=BaseModel)
FORCE = StopRequest(force=True)  # a stop without a graceful timeout: the power cut at once


class AgentError(Exception):
    """Every failure of a call; ``kind`` is the ``FailureKind`` a migration that hits it ends with."""

    kind = FailureKind.INTERNAL


class AgentUnreachable(AgentError):
    """The agent did not answer: connection refused or reset, time-out, stream cut."""

    kind = FailureKind.UNREACHABLE


class AgentNotRunning(AgentUnreachable):
    """Connection refused: nothing listens at the agent's address, so its process is not running (it
    stopped or crashed), while its host answers."""


class AgentTimedOut(AgentUnreachable):
    """No answer within the time-out (``timeout_s``): the agent or its host hangs, or the network
    drops what it sends."""

    def __init__(self, message: str, timeout_s: float | None = None) -> None:
        super().__init__(message)
        self.timeout_s = timeout_s


class AgentRefused(AgentError):
    """The agent answered with an error status; ``message`` is its explanation."""

    kind = FailureKind.REFUSED

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return self.message


class AgentUntrusted(AgentUnreachable):
    """The agent's TLS certificate is not the one registered (or not signed by the registered CA).

    An ``AgentUnreachable`` for every caller (nothing was sent to it, not even the secret), with
    kind ``refused``: it answered, but not as the host the console knows. ``fingerprint``: the SHA-256
    fingerprint of the certificate it presented (``AB:CD:...``), when it could be read; else None.
    """

    kind = FailureKind.REFUSED

    def __init__(self, message: str, fingerprint: str | None = None) -> None:
        super().__init__(message)
        self.fingerprint = fingerprint


class AgentAddressRefused(AgentUntrusted):
    """The console will not talk to this address at all: plain http beside a registered certificate,
    or plain http in production (``vms.agent_address``); nothing was sent. ``str()`` says why."""


class UnknownMigration(AgentRefused):
    """The agent holds no migration of that id (``agentprotocol.ErrorReply`` code ``unknown_migration``).

    It restarted since it was told of it (a simulated agent forgets everything), or was never told.
    Not a success: a target that does not know the migration does not hold the guest's copy.
    """

    kind = FailureKind.UNREACHABLE  # for a migration it is a peer that went away and came back empty


class UnknownGuest(AgentRefused):
    """No guest of that id on the host (``agentprotocol.ErrorReply`` code ``unknown_guest``)."""


REFUSAL_BY_CODE: dict[str, type[AgentRefused]] = {
    "unknown_migration": UnknownMigration,
    "unknown_guest": UnknownGuest,
}


class AgentProtocolError(AgentError):
    """The agent answered something that is not what the API promises (``agentprotocol``)."""

    kind = FailureKind.INTERNAL


def _setting(name: str, default: float) -> float:
    """Time-outs may come from Django settings when Django is configured; the client works without."""
    try:
        from django.conf import settings
    except ImportError:
        return default
    return float(getattr(settings, name, default)) if settings.configured else default


def _reply(model: type[M], body: Any, what: str) -> M:
    """``body`` parsed as the protocol's ``model``; else ``AgentProtocolError`` in plain words."""
    try:
        return parse(model, body, f"the agent's {what}")
    except ProtocolViolation as violation:
        raise AgentProtocolError(
            f"the agent's {what} is not what the protocol promises: {violation}"
        ) from None


def wire(message: Message) -> dict[str, Any]:
    """A request as it goes on the wire: the JSON of what the console set (the rest is the model's
    default on both sides, so the agent reads the same message)."""
    return message.model_dump(mode="json", exclude_unset=True)


FINGERPRINT = re.compile(r"(?:[0-9A-Fa-f]{2}:?){31}[0-9A-Fa-f]{2}")


def normalize_fingerprint(text: str) -> str | None:
    """``AB:CD:..`` (32 upper-case hex pairs) from hex with or without colons; None if it is not one."""
    text = text.strip()
    if text.lower().startswith("sha256:"):
        text = text[7:]
    if not FINGERPRINT.fullmatch(text):
        return None
    digits = text.replace(":", "").upper()
    if len(digits) != 64:
        return None
    return ":".join(digits[i : i + 2] for i in range(0, 64, 2))


def check_trust(trust: str) -> str:
    """``trust`` (a CA certificate in PEM, or a SHA-256 fingerprint) checked and normalized.

    Raises ``ValueError`` in plain words when it is neither.
    """
    trust = trust.strip()
    if not trust:
        return ""
    if "-----BEGIN CERTIFICATE-----" in trust:
        try:
            ssl.create_default_context(cadata=trust)
        except (ssl.SSLError, ValueError):
            raise ValueError("this is not a readable PEM certificate") from None
        return trust
    fingerprint = normalize_fingerprint(trust)
    if fingerprint is None:
        raise ValueError(
            "give the CA certificate (PEM, -----BEGIN CERTIFICATE-----) or the SHA-256 fingerprint of the "
            "agent's certificate (64 hex digits, colons optional)"
        )
    return fingerprint


def certificate_fingerprint(der: bytes) -> str:
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, 64, 2))


def transport_failure(error: BaseException, message: str, timeout_s: float | None) -> AgentUnreachable:
    """The ``AgentUnreachable`` a failed connection or request is, by its cause: ``AgentNotRunning``
    (connection refused), ``AgentTimedOut`` (no answer within ``timeout_s`` s), else the base class (a
    reset, a stream cut, a name that does not resolve)."""
    if _caused_by(error, ConnectionRefusedError) or "Connection refused" in str(error):
        return AgentNotRunning(message)
    if isinstance(error, httpx.TimeoutException | TimeoutError) or _caused_by(error, TimeoutError):
        return AgentTimedOut(message, timeout_s)
    return AgentUnreachable(message)


def _caused_by(error: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = error
    for _ in range(8):  # httpx -> httpcore -> OSError: a short chain
        if seen is None:
            return False
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def unreachable_words(error: AgentUnreachable) -> str:
    """Why an agent could not be asked, in a few words that follow "Agent unreachable: " (a VSP's
    ``agent_problem``): "certificate not trusted (SHA-256 fingerprint AB:...)", "agent not running
    (connection refused)", "no answer in 10 s", "not asked: <why>", "the connection broke off"."""
    if isinstance(error, AgentAddressRefused):
        return f"not asked: {str(error).split(': ', 1)[-1]}"
    if isinstance(error, AgentUntrusted):
        fingerprint = f" (SHA-256 fingerprint {error.fingerprint})" if error.fingerprint else ""
        return f"TLS certificate not trusted{fingerprint}"
    if isinstance(error, AgentNotRunning):
        return "agent not running (connection refused)"
    if isinstance(error, AgentTimedOut):
        return f"no answer in {error.timeout_s:g} s" if error.timeout_s else "no answer"
    return "the connection broke off"


PRESENTED_TIMEOUT_S = 2.0


def presented_fingerprint(base_url: str) -> str | None:
    """The SHA-256 fingerprint of the certificate the ``https://`` agent at ``base_url`` presents (read
    without trusting it; nothing is sent), or None if it cannot be read: an alert about an untrusted
    certificate names it, so an administrator can compare it with the host's own."""
    url = httpx.URL(base_url)
    if url.scheme != "https":
        return None
    try:
        pem = ssl.get_server_certificate((url.host, url.port or 443), timeout=PRESENTED_TIMEOUT_S)
        return certificate_fingerprint(ssl.PEM_cert_to_DER_cert(pem))
    except (OSError, ValueError):
        return None


class AgentClient:
    """One agent's API. ``trust``: see the module's TLS paragraph (ignored for ``http://`` URLs)."""

    def __init__(
        self,
        base_url: str,
        secret: str,
        *,
        trust: str = "",
        timeout_s: float | None = None,
        command_timeout_s: float | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._secret = secret
        self._trust = trust.strip()
        self._transport = transport
        self._client: httpx.Client | None = None
        self.timeout_s = timeout_s if timeout_s is not None else _setting("AGENT_TIMEOUT_S", 10.0)
        # quiesce and freeze answer when their phase is over: up to the phase limits.
        self.command_timeout_s = (
            command_timeout_s if command_timeout_s is not None else _setting("AGENT_COMMAND_TIMEOUT_S", 180.0)
        )

    @classmethod
    def for_vsp(cls, vsp: Any, **options: Any) -> AgentClient:
        """The client of ``vsp``'s agent (``vms.VSP``: its URL, secret and registered certificate)."""
        return cls(vsp.agent_url, vsp.agent_secret, trust=getattr(vsp, "agent_certificate", ""), **options)

    @property
    def _http(self) -> httpx.Client:
        """The HTTP client, built on first use: pinning by fingerprint first fetches the certificate."""
        if self._client is None:
            self._client = httpx.Client(
                base_url=self.base_url,
                headers={"Authorization": f"Bearer {self._secret}"},
                timeout=self.timeout_s,
                transport=self._transport,
                verify=self._verify(),
            )
        return self._client

    def _verify(self) -> ssl.SSLContext | bool:
        try:  # before any connection: no secret goes to a plain-http address that must not get one
            check_agent_address(self.base_url, self._trust)
        except ValueError as error:
            raise AgentAddressRefused(f"{self.base_url}: {error}") from None
        url = httpx.URL(self.base_url)
        if url.scheme != "https" or not self._trust:
            return True
        if "-----BEGIN CERTIFICATE-----" in self._trust:
            try:
                return ssl.create_default_context(cadata=self._trust)
            except (ssl.SSLError, ValueError):
                raise AgentUntrusted(
                    f"the CA certificate registered for {self.base_url} is unreadable"
                ) from None
        wanted = normalize_fingerprint(self._trust)
        if wanted is None:
            raise AgentUntrusted(f"the certificate fingerprint registered for {self.base_url} is unreadable")
        address = (url.host, url.port or 443)
        try:
            pem = ssl.get_server_certificate(address, timeout=self.timeout_s)
        except (OSError, ValueError) as error:
            raise transport_failure(
                error, f"{self.base_url}: no TLS answer: {error or type(error).__name__}", self.timeout_s
            ) from error
        presented = certificate_fingerprint(ssl.PEM_cert_to_DER_cert(pem))
        if not hmac.compare_digest(presented, wanted):
            raise AgentUntrusted(
                f"the agent at {self.base_url} presented a certificate with SHA-256 fingerprint {presented}, "
                f"not the registered {wanted}: refusing to talk to it",
                fingerprint=presented,
            )
        context = ssl.create_default_context(cadata=pem)
        context.check_hostname = False  # the pinned certificate itself is the identity
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        return context

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- host and guests ------------------------------------------------
    def health(self, window_s: float | None = None) -> Health:
        """The agent's name, version, driver, number of guests, and its event loop's longest stall (ms)
        over the last ``window_s`` s (default: as long as the agent keeps, 120 s)."""
        path = "/v1/health" if window_s is None else f"/v1/health?window_s={window_s:g}"
        return self._call("GET", path, Health, "health")

    def resources(self) -> HostResources | None:
        """The host's storage pools, networks and volume writers; None from an agent older than pools
        (it answers ``GET /v1/resources`` with 404: its pools and networks are not known)."""
        try:
            return self._call("GET", "/v1/resources", HostResources, "resources")
        except AgentRefused as refusal:
            if refusal.status == 404 and not isinstance(refusal, UnknownGuest | UnknownMigration):
                return None
            raise

    def list_guests(self) -> list[GuestInfo]:
        """Every guest on the host."""
        return self._call("GET", "/v1/guests", GuestList, "guest list").guests

    def get_guest(self, guest_id: str, timeout_s: float | None = None) -> GuestInfo:
        """``UnknownGuest`` if the host has no such guest."""
        return self._call("GET", f"/v1/guests/{guest_id}", GuestInfo, "guest", timeout_s=timeout_s)

    def define_guest(self, spec: GuestSpec) -> GuestInfo:
        """Define (or keep: same definition) the guest ``spec`` describes; ``spec.running`` also starts it."""
        return self._call("PUT", f"/v1/guests/{spec.guest_id}", GuestInfo, "guest", spec)

    def start_guest(self, guest_id: str) -> GuestInfo:
        return self._call("POST", f"/v1/guests/{guest_id}/start", GuestInfo, "guest")

    def stop_guest(self, guest_id: str, stop: StopRequest = FORCE) -> StoppedGuest:
        """Stop the guest as ``stop`` says: gracefully within ``stop.graceful_timeout_s`` seconds, or at once
        (``force``, the default).

        The call waits up to the graceful timeout plus the client's own. The answer says how the stop
        ended (``StoppedGuest.stop``: "shut_down", "timed_out" when the guest did not shut down in time and
        was forced off, "forced", "already_off") and ``stop_s``.
        """
        grace = stop.graceful_timeout_s
        timeout = None if grace is None else self.timeout_s + grace
        path = f"/v1/guests/{guest_id}/stop"
        return self._call("POST", path, StoppedGuest, "stopped guest", stop, timeout_s=timeout)

    def delete_guest(self, guest_id: str) -> Deleted:
        return self._call("DELETE", f"/v1/guests/{guest_id}", Deleted, "deletion")

    # -- migrations -----------------------------------------------------
    def prepare_incoming(self, request: IncomingRequest) -> PreparedIncoming:
        """Target side: reserve room, open the data-plane listener; its ``endpoint()`` is what the source's
        ``OutgoingRequest.target`` takes."""
        path = "/v1/migrations/incoming"
        return self._call("POST", path, PreparedIncoming, "prepared endpoint", request)

    def start_outgoing(self, request: OutgoingRequest) -> ProgressSnapshot:
        """Source side: start migrating ``request.guest`` to ``request.target`` (``encryption`` and
        ``streams`` as the target was prepared with)."""
        return self._call("POST", "/v1/migrations/outgoing", ProgressSnapshot, "progress snapshot", request)

    def change_params(self, migration_id: str, change: ParamsChange) -> ProgressSnapshot:
        """Source side: change a running Copy; the snapshot after it."""
        path = f"/v1/migrations/{migration_id}/params"
        return self._call("POST", path, ProgressSnapshot, "progress snapshot", change)

    def dirty_rate(self, guest_id: str, seconds: float = 1.0) -> DirtyRate:
        """The running guest's dirty rate over ``seconds``; waits that long."""
        path = f"/v1/guests/{guest_id}/dirty-rate?seconds={seconds:g}"
        return self._call("GET", path, DirtyRate, "dirty rate", timeout_s=self.timeout_s + seconds)

    # -- link probes ----------------------------------------------------
    def prepare_probe(self, request: ProbeRequest) -> PreparedProbe:
        """Receiving side: open a one-time probe listener (for the sender's ``ProbeRun``, ``probe_run``)."""
        return self._call("POST", "/v1/probes/incoming", PreparedProbe, "prepared probe", request)

    def probe(self, run: ProbeRun) -> ProbeResult:
        """Sending side: probe the peer's listener now (``bytes``, ``seconds``, ``rate_bytes_s`` in bytes/s).

        Waits at most the probe's seconds plus about 16 s (handshake, draining a slow link). A peer that
        refuses or cannot be reached is ``AgentRefused`` (409) with the words why.
        """
        # The agent answers within the handshake (6 s), the probe's seconds and its grace (10 s).
        timeout = self.timeout_s + 20
        return self._call("POST", "/v1/probes/outgoing", ProbeResult, "probe result", run, timeout_s=timeout)

    def snapshot(self, migration_id: str) -> ProgressSnapshot:
        return self._call("GET", f"/v1/migrations/{migration_id}", ProgressSnapshot, "progress snapshot")

    def iter_progress(self, migration_id: str, after_seq: int = 0) -> Generator[ProgressSnapshot, None, None]:
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
                    snapshot = _reply(ProgressSnapshot, self._decode(line), "progress snapshot")
                    if first or snapshot.seq > after_seq:
                        yield snapshot
                    first = False
        except httpx.TransportError as error:
            message = f"progress stream from {self.base_url} broke off: {error or type(error).__name__}"
            raise transport_failure(error, message, self.timeout_s) from error

    def quiesce(self, migration_id: str) -> ProgressSnapshot:
        return self._command(migration_id, "quiesce", self.command_timeout_s)

    def freeze(self, migration_id: str) -> ProgressSnapshot:
        return self._command(migration_id, "freeze", self.command_timeout_s)

    def resume(self, migration_id: str) -> ProgressSnapshot:
        return self._command(migration_id, "resume")

    def discard(self, migration_id: str) -> ProgressSnapshot:
        return self._command(migration_id, "discard")

    def release(self, migration_id: str, timeout_s: float | None = None) -> ProgressSnapshot:
        """``timeout_s``: per request (the client's own when None)."""
        return self._command(migration_id, "release", timeout_s)

    def cancel(self, migration_id: str, timeout_s: float | None = None) -> ProgressSnapshot:
        """``timeout_s``: a cancel must land promptly, so callers pass a short one and retry."""
        return self._command(migration_id, "cancel", timeout_s)

    # -- plumbing -------------------------------------------------------
    def _command(self, migration_id: str, command: str, timeout_s: float | None = None) -> ProgressSnapshot:
        path = f"/v1/migrations/{migration_id}/{command}"
        return self._call("POST", path, ProgressSnapshot, "progress snapshot", timeout_s=timeout_s)

    def _call(
        self,
        method: str,
        path: str,
        reply: type[M],
        what: str,
        request: Message | None = None,
        *,
        timeout_s: float | None = None,
    ) -> M:
        """Send ``request`` (a protocol message, or no body) and parse the answer as ``reply``."""
        body = None if request is None else wire(request)
        try:
            response = self._http.request(
                method, path, json=body, timeout=timeout_s if timeout_s is not None else self.timeout_s
            )
        except httpx.TransportError as error:
            if "CERTIFICATE_VERIFY_FAILED" in str(error):
                raise AgentUntrusted(
                    f"the agent at {self.base_url} presented a certificate the console does not trust "
                    f"(not from the registered CA, or not the pinned one): {error}",
                    fingerprint=presented_fingerprint(self.base_url),
                ) from error
            message = f"{method} {self.base_url}{path}: {error or type(error).__name__}"
            raise transport_failure(
                error, message, timeout_s if timeout_s is not None else self.timeout_s
            ) from error
        if response.status_code >= 400:
            raise self._refusal(response)
        return _reply(reply, self._decode(response.content), what)

    @staticmethod
    def _decode(content: bytes | str) -> Any:
        try:
            return load_json(content, "the agent's answer")
        except ProtocolViolation as violation:
            raise AgentProtocolError(str(violation)) from None

    @staticmethod
    def _refusal(response: httpx.Response) -> AgentRefused:
        """The refusal's class goes by its ``code`` (``agentprotocol.ErrorReply``), never by its words."""
        try:
            reply = parse(ErrorReply, response.content, "the agent's refusal")
        except ProtocolViolation:
            return AgentRefused(response.status_code, f"HTTP {response.status_code} without an explanation")
        message = reply.error or f"HTTP {response.status_code} without an explanation"
        refusal = REFUSAL_BY_CODE.get(reply.code or "", AgentRefused)
        return refusal(response.status_code, message)
