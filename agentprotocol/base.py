"""The building blocks of every message: the bounds, the checks that refuse in plain words, ``Message``."""

from __future__ import annotations

import unicodedata
import uuid
from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, StrictFloat, StrictInt, StrictStr
from pydantic_core import PydanticCustomError

# -- bounds ---------------------------------------------------------------------------------------

GUEST_NAME_MAX_CHARS = 64  # the console's VirtualMachine.name max_length: the same limit everywhere
MAX_MEMORY_MIB = 1024 * 1024
MAX_VCPUS = 256
MAX_DELAY_MS = 10 * 60 * 1000
MAX_LIMIT_S = 7 * 24 * 3600
MAX_GRACEFUL_STOP_S = 3600  # a graceful stop holds its HTTP request open this long at most
MAX_BYTES = 1 << 62  # byte counters in a snapshot: far beyond any guest, refuses nonsense
MIGRATION_ID_CHARS = "letters, digits, '.', '_', ':' or '-'"
MAX_STREAMS = 16  # data-plane connections of one migration (QEMU: multifd-channels)
AUTO_STREAM_MIB = 512  # automatic sizing: at most one stream per this much guest memory


def between(low: int, high: int) -> Callable[[int], int]:
    """A check that a whole number lies in ``[low, high]``, refused in plain words otherwise."""

    def check(value: int) -> int:
        if not low <= value <= high:
            raise PydanticCustomError(
                "out_of_range",
                "must be between {low} and {high}, not {value}",
                {"low": low, "high": high, "value": value},
            )
        return value

    return check


def chars(max_chars: int, what: str) -> Callable[[str], str]:
    """A check that a text has 1 to ``max_chars`` characters (never cut: a longer one is refused)."""

    def check(value: str) -> str:
        if not 0 < len(value) <= max_chars:
            raise PydanticCustomError(
                "text_length", "must be {what} of 1-{max} characters", {"what": what, "max": max_chars}
            )
        return value

    return check


def _seconds(value: float | int) -> float:
    if isinstance(value, bool) or not 0 < value <= MAX_LIMIT_S:
        raise PydanticCustomError(
            "seconds",
            "must be more than 0 and at most {max} seconds, not {value}",
            {"max": MAX_LIMIT_S, "value": value},
        )
    return float(value)


def _guest_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise PydanticCustomError(
            "guest_id", "must be a guest id (a UUID), not {value}", {"value": repr(value[:80])}
        ) from None


def _display_name(value: str) -> str:
    if not 0 < len(value) <= GUEST_NAME_MAX_CHARS:
        raise PydanticCustomError(
            "guest_name",
            "must be 1-{max} characters, not {length}",
            {"max": GUEST_NAME_MAX_CHARS, "length": len(value)},
        )
    # Cc control, Cs lone surrogates, Zl/Zp line breaks: not printable. Cf stays (emoji joiners).
    if any(unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp") for char in value):
        raise PydanticCustomError("guest_name", "must be printable text, without control characters", {})
    return value


def _migration_id(value: str) -> str:
    ok = 0 < len(value) <= 128 and value[0].isascii() and value[0].isalnum()
    if not ok or not all(char.isascii() and (char.isalnum() or char in "._:-") for char in value):
        raise PydanticCustomError("migration_id", "must be 1-128 " + MIGRATION_ID_CHARS, {})
    return value


Seconds = Annotated[StrictFloat | StrictInt, AfterValidator(_seconds)]
GuestId = Annotated[StrictStr, AfterValidator(_guest_id)]
GuestName = Annotated[StrictStr, AfterValidator(_display_name)]
MigrationId = Annotated[StrictStr, AfterValidator(_migration_id)]
Percent = Annotated[StrictInt, AfterValidator(between(0, 100))]
Bytes = Annotated[StrictInt, AfterValidator(between(0, MAX_BYTES))]
ByteRate = Annotated[StrictInt, AfterValidator(between(0, MAX_BYTES))]
Digest = Annotated[StrictStr, AfterValidator(chars(256, "a digest"))]


Encryption = Literal["required", "off"]
"""The data plane's encryption policy for a pair of hosts: mutual TLS ("required", the default) or
plain TCP ("off", for a trusted dedicated migration network). Both sides get it; they must agree."""


class Message(BaseModel):
    """Every protocol message: unknown keys ignored, everything else checked."""

    model_config = ConfigDict(extra="ignore", validate_default=False)
