"""Checks on what clients send: every bad value becomes ``InvalidRequest`` with plain words."""

from __future__ import annotations

import re
from typing import Any

from hostagent.driver import (
    DEFAULT_LIMITS,
    DEFAULT_PARAMS,
    Endpoint,
    GuestSpec,
    InvalidRequest,
    MigrationParams,
    PhaseLimits,
)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MIGRATION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
MAX_MEMORY_MIB = 1024 * 1024
MAX_VCPUS = 256
MAX_DELAY_MS = 10 * 60 * 1000
MAX_LIMIT_S = 7 * 24 * 3600


def require_object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRequest(f"{what} must be a JSON object")
    return value


def check_name(value: Any, what: str = "guest name") -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise InvalidRequest(f"{what} must be 1-64 letters, digits, '.', '_' or '-'")
    return value


def check_migration_id(value: Any) -> str:
    if not isinstance(value, str) or not MIGRATION_ID.match(value):
        raise InvalidRequest("migration_id must be 1-128 letters, digits, '.', '_', ':' or '-'")
    return value


def check_int(body: dict[str, Any], key: str, low: int, high: int, default: int | None = None) -> int:
    value = body.get(key, default)
    if value is None:
        raise InvalidRequest(f"{key} is required")
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{key} must be a whole number")
    if not low <= value <= high:
        raise InvalidRequest(f"{key} must be between {low} and {high}, not {value}")
    return value


def check_seconds(body: dict[str, Any], key: str, default: float | None) -> float | None:
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{key} must be a number of seconds or null")
    if not 0 < value <= MAX_LIMIT_S:
        raise InvalidRequest(f"{key} must be more than 0 and at most {MAX_LIMIT_S} seconds, not {value}")
    return float(value)


def check_guest_spec(body: Any, name: str | None = None) -> GuestSpec:
    body = require_object(body, "the guest")
    spec: GuestSpec = {
        "name": check_name(body.get("name", name)),
        "memory_mib": check_int(body, "memory_mib", 1, MAX_MEMORY_MIB),
        "vcpus": check_int(body, "vcpus", 1, MAX_VCPUS, 1),
        "os_type": check_os_type(body.get("os_type", "linux")),
        "dirty_pages_per_s": check_int(body, "dirty_pages_per_s", 0, 1_000_000, 100),
        "io_latency_ms": check_int(body, "io_latency_ms", 0, MAX_DELAY_MS, 20),
        "state_save_ms": check_int(body, "state_save_ms", 0, MAX_DELAY_MS, 0),
        "fill_percent": check_int(body, "fill_percent", 0, 100, 25),
    }
    if name is not None and spec["name"] != name:
        raise InvalidRequest("the name in the body differs from the one in the URL")
    running = body.get("running", False)
    if not isinstance(running, bool):
        raise InvalidRequest("running must be true or false")
    spec["running"] = running
    return spec


def check_os_type(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        raise InvalidRequest("os_type must be a short text")
    return value


def check_limits(body: Any) -> PhaseLimits:
    body = require_object(body if body is not None else {}, "limits")
    return {
        "init_s": check_seconds(body, "init_s", DEFAULT_LIMITS["init_s"]),
        "copy_s": check_seconds(body, "copy_s", DEFAULT_LIMITS["copy_s"]),
        "quiesce_s": check_seconds(body, "quiesce_s", DEFAULT_LIMITS["quiesce_s"]),
        "frozen_s": check_seconds(body, "frozen_s", DEFAULT_LIMITS["frozen_s"]),
    }


def check_params(body: Any) -> MigrationParams:
    body = require_object(body if body is not None else {}, "params")
    bandwidth = body.get("bandwidth_mbps")
    if bandwidth is not None and (
        isinstance(bandwidth, bool)
        or not isinstance(bandwidth, int | float)
        or not 0 < bandwidth <= 1_000_000
    ):
        raise InvalidRequest("bandwidth_mbps must be null or a number of megabits per second up to 1000000")
    return {
        "downtime_ms": check_int(body, "downtime_ms", 1, 600_000, DEFAULT_PARAMS["downtime_ms"]),
        "bandwidth_mbps": bandwidth,
        "max_rounds": check_int(body, "max_rounds", 1, 10_000, DEFAULT_PARAMS["max_rounds"]),
        "limits": check_limits(body.get("limits")),
    }


def check_endpoint(body: Any) -> Endpoint:
    body = require_object(body, "target")
    host, token = body.get("host"), body.get("token")
    if not isinstance(host, str) or not 0 < len(host) <= 255:
        raise InvalidRequest("target.host must be a host name or address")
    if not isinstance(token, str) or not 0 < len(token) <= 512:
        raise InvalidRequest("target.token must be the token the target gave")
    return {"host": host, "port": check_int(body, "port", 1, 65535), "token": token}
