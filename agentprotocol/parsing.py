"""Turning what arrived into a message, or into ``ProtocolViolation`` with plain words."""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)
UNION_TAG = re.compile(r"int|float|str|bool|none|[a-z-]+\[.*\]")


class ProtocolViolation(ValueError):
    """A message that is not what the protocol promises; ``str()`` is plain words for people."""


def plain_words(error: ValidationError, what: str = "the request body") -> str:
    """The first problem of ``error`` as one sentence, e.g. "memory_mib must be between 1 and 8, not 9"."""
    first = error.errors(include_url=False)[0]
    # Unions add a tag per member to the location ("bandwidth_mbps.float"): people need the field.
    path = [str(part) for part in first["loc"] if not UNION_TAG.fullmatch(str(part))]
    where = ".".join(path) or what
    kind = first["type"]
    if kind == "missing":
        return f"{where} is required"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"{where} must be a JSON object"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"{where} must be a whole number"
    if kind in ("bool_type", "bool_parsing"):
        return f"{where} must be true or false"
    if kind in ("float_type", "float_parsing"):
        return f"{where} must be a number"
    if kind in ("string_type",):
        return f"{where} must be a text"
    if kind == "json_invalid":
        return f"{what} is not valid JSON"
    message = first["msg"]
    if kind in (
        "literal_error",
        "enum",
        "greater_than",
        "less_than_equal",
        "greater_than_equal",
        "less_than",
    ):
        message = message[0].lower() + message[1:]
        return f"{where}: {message}"
    return f"{where} {message}"


def load_json(raw: bytes | bytearray | str, what: str = "the request body") -> Any:
    """``raw`` decoded as JSON; anything that is not (bad UTF-8, bad syntax, nesting deep enough to
    exhaust the parser's recursion) is ``ProtocolViolation``, never another exception."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ProtocolViolation(f"{what} is not valid JSON") from None


def parse(model: type[M], body: bytes | str | dict[str, Any] | Any, what: str = "the request body") -> M:
    """``body`` (JSON text or already-decoded JSON) as ``model``; ``ProtocolViolation`` in plain words."""
    try:
        if isinstance(body, bytes | str):
            return model.model_validate_json(body)
        return model.model_validate(body)
    except ValidationError as error:
        raise ProtocolViolation(plain_words(error, what)) from None
