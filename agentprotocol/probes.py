"""Link probes: a one-time listener on the receiving agent, filler from the sending one, the rate measured."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field, StrictFloat, StrictInt, StrictStr
from pydantic_core import PydanticCustomError

from .base import ByteRate, Bytes, Encryption, Message, between, chars
from .migration import Endpoint

MAX_PROBE_BYTES = 64 << 20  # filler one probe may send: enough to fill any socket buffer on the way
MIN_PROBE_BYTES = 1 << 20
MAX_PROBE_S = 2.0  # how long the source may send filler; the whole probe ends within a few seconds
MIN_PROBE_S = 0.05


def _probe_seconds(value: float | int) -> float:
    if isinstance(value, bool) or not MIN_PROBE_S <= value <= MAX_PROBE_S:
        raise PydanticCustomError(
            "probe_seconds",
            "must be between {low} and {high} seconds, not {value}",
            {"low": MIN_PROBE_S, "high": MAX_PROBE_S, "value": value},
        )
    return float(value)


ProbeBytes = Annotated[StrictInt, AfterValidator(between(MIN_PROBE_BYTES, MAX_PROBE_BYTES))]
ProbeSeconds = Annotated[StrictFloat | StrictInt, AfterValidator(_probe_seconds)]


class ProbeRequest(Message):
    """``POST /v1/probes/incoming`` on the peer (receiving) agent: open a one-time probe listener.

    ``max_bytes`` (bytes, 1 MiB-64 MiB) and ``seconds`` (0.05-2 s) bound what the listener accepts;
    ``encryption`` is the pair's data-plane policy, as for a migration.
    """

    encryption: Encryption = "required"
    max_bytes: ProbeBytes = MAX_PROBE_BYTES
    seconds: ProbeSeconds = 0.5


class PreparedProbe(Message):
    """The receiving agent's answer to ``ProbeRequest``: its probe listener, one-time token and bounds."""

    data_host: Annotated[StrictStr, AfterValidator(chars(255, "a host name or address"))]
    data_port: Annotated[StrictInt, AfterValidator(between(1, 65535))]
    token: Annotated[StrictStr, AfterValidator(chars(512, "a token"))]
    max_bytes: ProbeBytes
    seconds: ProbeSeconds

    def endpoint(self) -> Endpoint:
        return Endpoint(host=self.data_host, port=self.data_port, token=self.token)

    def probe_run(self, encryption: Encryption) -> ProbeRun:
        """The sending agent's request to probe this listener, within the bounds it granted."""
        return ProbeRun(
            target=self.endpoint(), encryption=encryption, max_bytes=self.max_bytes, seconds=self.seconds
        )


class ProbeRun(Message):
    """``POST /v1/probes/outgoing`` on the sending agent: probe the prepared ``target`` now.

    ``max_bytes`` and ``seconds`` must not exceed what the target granted (it refuses more).
    """

    target: Endpoint
    encryption: Encryption = "required"
    max_bytes: ProbeBytes = MAX_PROBE_BYTES
    seconds: ProbeSeconds = 0.5


class ProbeResult(Message):
    """A probe's measurement: ``bytes`` the peer received in ``seconds`` (the sender's wall clock, from the
    first filler byte to the peer's receipt), so ``rate_bytes_s`` = bytes / seconds (bytes/s)."""

    bytes: Bytes
    seconds: Annotated[StrictFloat | StrictInt, Field(gt=0, le=60, allow_inf_nan=False)]
    rate_bytes_s: ByteRate
    encryption: Encryption
