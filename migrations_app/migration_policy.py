"""Migration policies: how a VM's online migrations trade downtime, bandwidth and completion.

A policy is a plain dict (stored as JSON on ``VirtualMachine.migration_policy`` as the VM's default and
on ``Migration.policy`` as the effective one of a migration) with these keys, in the console's units:

=====================  =========================================================================
``preset``             ``default``, ``minimal_downtime``, ``guaranteed_completion`` or ``custom``
``max_downtime_ms``    the allowed downtime (ms), 1 to 600 000
``bandwidth_cap_mb_s`` a bandwidth cap (MB/s, 10^6 bytes), or None for no cap
``auto_converge``      throttle the guest's vCPUs stepwise while Copy stalls
``throttle_max_pct``   the throttle's ceiling (percent of vCPU time), 1 to 99
``downtime_step_ms``   raise the allowed downtime by this much per stalled round (0: never)
``downtime_max_ms``    ... up to this (ms); None: no escalation
``at_limit``           at the round or Copy time limit: ``abort`` or ``switchover``
``no_progress_s``      the no-progress limit (s), 1 to 86 400: a phase in which no byte moves and no
                       percentage rises for this long is aborted, as a phase over its time limit is
                       (KubeVirt's ``progressTimeout``, 150 s there too); a warning shows from half of
                       it (``NO_PROGRESS_WARN_SHARE``). The worker enforces it (``engine.Watchdog``).
=====================  =========================================================================

``check_policy`` turns form or JSON input into a checked policy, or raises ``PolicyError`` in plain
words (nothing is stored then). ``agent_params`` is the ``agentprotocol.MigrationParams`` form.
The model behind the presets' promises is ``migrations_app.forecast`` (docs/convergence.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from agentprotocol import MigrationParams

MAX_DOWNTIME_MS = 600_000
MAX_BANDWIDTH_MB_S = 100_000
MAX_THROTTLE_PCT = 99
BANDWIDTH_STEP_MB_S = 0.001  # the forms' step: the smallest cap, and the grain of any cap
DEFAULT_MAX_ROUNDS = 30
DEFAULT_NO_PROGRESS_S = 150  # KubeVirt's progressTimeout default: the migration stalled, not merely slow
MAX_NO_PROGRESS_S = 86_400
NO_PROGRESS_WARN_SHARE = 0.5  # the page warns once nothing moved for this share of the no-progress limit
THROTTLE_INITIAL_PCT = 20  # QEMU's cpu-throttle-initial default
THROTTLE_INCREMENT_PCT = 10  # QEMU's cpu-throttle-increment default
AT_LIMIT_CHOICES = {
    "abort": "abort; the guest keeps running on its source",
    "switchover": "switch over anyway",
}

PRESETS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "default": (
        "Default",
        "At most 300 ms frozen, no throttling; at the limit it gives up and the guest stays on its source.",
        {},
    ),
    "minimal_downtime": (
        "Minimal downtime",
        "At most 100 ms frozen and never throttled; gives up rather than freeze the guest longer.",
        {"max_downtime_ms": 100},
    ),
    "guaranteed_completion": (
        "Guaranteed completion",
        "Finishes whatever it takes: throttles the guest, allows up to 2 s frozen, then switches over.",
        {
            "auto_converge": True,
            "throttle_max_pct": 99,
            "downtime_step_ms": 300,
            "downtime_max_ms": 2000,
            "at_limit": "switchover",
        },
    ),
    "custom": ("Custom", "Your own values below.", {}),
}


FIELDS = (
    "preset",
    "max_downtime_ms",
    "bandwidth_cap_mb_s",
    "auto_converge",
    "throttle_max_pct",
    "downtime_step_ms",
    "downtime_max_ms",
    "at_limit",
    "no_progress_s",
)


class PolicyError(ValueError):
    """A policy value out of bounds or not a value at all; ``str()`` says which and why, in words.

    ``field``: the policy key (one of ``FIELDS``) the words are about, so a form can show them beside
    that field; "" when they are about no one field (an unknown setting).
    """

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


def default_policy() -> dict[str, Any]:
    """The console's default policy (its downtime is ``MIGRATION_DOWNTIME_MS``).

    The site-wide ``MIGRATION_BANDWIDTH_MBPS`` is not part of a policy: it caps every migration on top
    of the policy's own cap (``agent_params``).
    """
    from django.conf import settings

    base: dict[str, Any] = settings.MIGRATION_AGENT_PARAMS
    return {
        "preset": "default",
        "max_downtime_ms": int(base.get("downtime_ms") or 300),
        "bandwidth_cap_mb_s": None,
        "auto_converge": False,
        "throttle_max_pct": 99,
        "downtime_step_ms": 0,
        "downtime_max_ms": None,
        "at_limit": "abort",
        "no_progress_s": int(base.get("no_progress_s") or DEFAULT_NO_PROGRESS_S),
    }


def preset_policy(name: str) -> dict[str, Any]:
    """The values of preset ``name`` (PolicyError for an unknown one)."""
    if name not in PRESETS:
        raise PolicyError(f"Unknown preset {name!r}; choose one of: {', '.join(PRESETS)}.")
    return {**default_policy(), **PRESETS[name][2], "preset": name}


def effective(stored: Mapping[str, Any] | None) -> dict[str, Any]:
    """A stored policy with every key (an empty or older one takes the defaults)."""
    return {**default_policy(), **(stored or {})}


def check_policy(raw: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A checked policy from ``raw`` (form strings or JSON values), keys missing in ``raw`` from ``base``.

    A named preset (other than ``custom``) is taken whole: the other values in ``raw`` are ignored, as
    the form says. With ``custom`` or no preset, the values given change ``base``; any change makes it
    ``custom``. Raises ``PolicyError`` naming the field and its bounds; unknown keys are refused.
    """
    policy = effective(base)
    unknown = sorted(set(raw) - set(policy) - {"preset"})
    if unknown:
        raise PolicyError(f"Unknown policy setting {', '.join(unknown)}.")
    preset = raw.get("preset")
    if preset not in (None, "", "custom"):
        check_value("preset", preset)  # raises, about the preset field, for an unknown one
        return preset_policy(str(preset))
    if preset == "custom":
        policy["preset"] = "custom"
    values = {key: value for key, value in raw.items() if key != "preset"}
    checked = dict(policy)
    for key, value in values.items():
        checked[key] = check_value(key, value)
    if checked["downtime_step_ms"] and checked["downtime_max_ms"] is None:
        raise PolicyError(
            "Downtime escalation needs a ceiling: give the downtime ceiling (ms).", "downtime_max_ms"
        )
    ceiling = checked["downtime_max_ms"]
    if ceiling is not None and ceiling < checked["max_downtime_ms"]:
        raise PolicyError(
            f"The downtime ceiling ({ceiling} ms) must be at least the maximum downtime "
            f"({checked['max_downtime_ms']} ms).",
            "downtime_max_ms",
        )
    if values and any(checked[key] != policy[key] for key in values):
        checked["preset"] = "custom"
    return checked


def policy_errors(raw: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Every bad field of ``raw`` at once: ``{field: words}`` ("" for words about no one field), empty
    when ``check_policy(raw, base)`` passes. Each value is checked alone (``check_value``); how they fit
    together only once each is good, as ``check_policy`` does. A form shows each beside its field."""
    errors: dict[str, str] = {}
    preset = raw.get("preset")
    if preset not in (None, "", "custom"):  # a named preset is taken whole: only the preset can be bad
        values: Mapping[str, Any] = {"preset": preset}
    else:
        values = raw
    for key, value in values.items():
        if key not in FIELDS:
            errors[""] = f"Unknown policy setting {key}."
            continue
        try:
            check_value(key, value)
        except PolicyError as error:
            errors[error.field] = str(error)
    if not errors:
        try:
            check_policy(raw, base)
        except PolicyError as error:
            errors[error.field] = str(error)
    return errors


# What each number of a policy takes, (min, max, step): the forms' ``<input type=number>`` attributes
# (``migration_tags.policy_bounds``) say exactly what ``check_value`` takes, from these same constants.
INPUT_BOUNDS: dict[str, tuple[float, float, float]] = {
    "max_downtime_ms": (1, MAX_DOWNTIME_MS, 1),
    "bandwidth_cap_mb_s": (0, MAX_BANDWIDTH_MB_S, BANDWIDTH_STEP_MB_S),  # 0: no cap
    "throttle_max_pct": (1, MAX_THROTTLE_PCT, 1),
    "downtime_step_ms": (0, MAX_DOWNTIME_MS, 1),
    "downtime_max_ms": (1, MAX_DOWNTIME_MS, 1),
    "no_progress_s": (1, MAX_NO_PROGRESS_S, 1),
}


def check_value(key: str, value: Any) -> Any:
    """One policy setting ``key`` (one of ``FIELDS``) checked alone: its type and bounds, not how it fits
    the others (``check_policy`` checks that). Returns the value in the policy's form (an int, a float
    or None for the bandwidth cap, a bool, a word); raises ``PolicyError`` in the Migrate dialog's words,
    its ``field`` set to ``key``.
    """
    try:
        return _check_value(key, value)
    except PolicyError as error:
        error.field = error.field or (key if key in FIELDS else "")
        raise


def _check_value(key: str, value: Any) -> Any:
    if key == "preset":
        if not isinstance(value, str | None):
            raise PolicyError(f"Preset: one of {', '.join(PRESETS)}.")
        if value in (None, "", "custom"):
            return value
        preset_policy(str(value))  # raises for an unknown one
        return value
    if key == "max_downtime_ms":
        return _whole(value, "Maximum downtime", 1, MAX_DOWNTIME_MS, "ms")
    if key == "bandwidth_cap_mb_s":
        return _cap(value)
    if key == "auto_converge":
        return _flag(value, "Auto-converge")
    if key == "throttle_max_pct":
        return _whole(value, "Throttle ceiling", 1, MAX_THROTTLE_PCT, "%")
    if key == "downtime_step_ms":
        return _whole(value, "Downtime step", 0, MAX_DOWNTIME_MS, "ms", allow_blank=True) or 0
    if key == "downtime_max_ms":
        return _whole(value, "Downtime ceiling", 1, MAX_DOWNTIME_MS, "ms", allow_blank=True)
    if key == "at_limit":
        if not isinstance(value, str) or value not in AT_LIMIT_CHOICES:
            raise PolicyError("At the limit: choose abort or switchover.")
        return value
    if key == "no_progress_s":
        return _whole(value, "No-progress limit", 1, MAX_NO_PROGRESS_S, "s")
    raise PolicyError(f"Unknown policy setting {key}.")


def no_progress_limit_s(policy: Mapping[str, Any] | None) -> int:
    """The no-progress limit (s) of ``policy`` (a stored one without it: ``DEFAULT_NO_PROGRESS_S``)."""
    return int(effective(policy)["no_progress_s"])


def no_progress_warn_after_s(limit_s: float) -> float:
    """After how many seconds without progress the page warns (s): half the limit."""
    return limit_s * NO_PROGRESS_WARN_SHARE


def agent_params(
    policy: Mapping[str, Any], max_rounds: int = DEFAULT_MAX_ROUNDS, site_cap_mbps: float | None = None
) -> MigrationParams:
    """``policy`` as the agent's ``MigrationParams`` (bandwidth in Mbit/s, as the agent takes it), without
    the phase limits (the VM's: ``vms.agent_messages.phase_limits``).

    ``site_cap_mbps``: the site-wide cap (Mbit/s); the lower of it and the policy's cap applies.
    """
    policy = effective(policy)
    caps = [c for c in (policy["bandwidth_cap_mb_s"], site_cap_mbps / 8 if site_cap_mbps else None) if c]
    cap = min(caps) if caps else None
    step = policy["downtime_step_ms"] if policy["downtime_max_ms"] is not None else 0
    return MigrationParams(
        downtime_ms=policy["max_downtime_ms"],
        bandwidth_mbps=cap * 8 if cap else None,
        max_rounds=max_rounds,
        auto_converge=policy["auto_converge"],
        throttle_initial_pct=min(THROTTLE_INITIAL_PCT, policy["throttle_max_pct"]),
        throttle_increment_pct=THROTTLE_INCREMENT_PCT,
        throttle_max_pct=policy["throttle_max_pct"],
        downtime_step_ms=step,
        downtime_max_ms=policy["downtime_max_ms"],
        at_limit=policy["at_limit"],
    )


def describe(policy: Mapping[str, Any]) -> str:
    """One line for people: "Guaranteed completion: at most 300 ms frozen, raised by ...; no cap; ..."."""
    policy = effective(policy)
    label = PRESETS.get(policy["preset"], PRESETS["custom"])[0]
    parts = [f"at most {_ms(policy['max_downtime_ms'])} frozen"]
    if policy["downtime_step_ms"] and policy["downtime_max_ms"]:
        step, ceiling = _ms(policy["downtime_step_ms"]), _ms(policy["downtime_max_ms"])
        parts[0] += f", raised by {step} per stalled round to {ceiling}"
    cap = policy["bandwidth_cap_mb_s"]
    parts.append(f"bandwidth capped at {cap:g} MB/s" if cap else "no bandwidth cap")
    parts.append(
        f"throttles the guest up to {policy['throttle_max_pct']}%"
        if policy["auto_converge"]
        else "no throttling"
    )
    parts.append(
        "switches over at the limit" if policy["at_limit"] == "switchover" else "gives up at the limit"
    )
    return f"{label}: {'; '.join(parts)}."


def _ms(value: float) -> str:
    return f"{value / 1000:g} s" if value >= 1000 else f"{value:g} ms"


def _whole(value: Any, name: str, low: int, high: int, unit: str, *, allow_blank: bool = False) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if allow_blank:
            return None
        raise PolicyError(f"{name}: give a whole number from {low} to {high} {unit}.")
    number = _number(value, name)
    if number != int(number) or not low <= number <= high:
        raise PolicyError(f"{name}: a whole number from {low} to {high} {unit}, not {value}.")
    return int(number)


def _cap(value: Any) -> float | None:
    """A cap in MB/s, or None for none: empty, None or 0 (the API's "no cap", typed or sent as text).

    Exactly what the forms' fields take in the browser (``<input type=number min=0 max=100000
    step=0.001>``, from ``INPUT_BOUNDS``): a number from 0 to ``MAX_BANDWIDTH_MB_S`` in thousandths
    of a MB/s (issue 21.4: the browser took 0.5 and the server refused it).
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    number = _number(value, "Bandwidth cap")
    if number == 0:
        return None
    thousandths = number / BANDWIDTH_STEP_MB_S
    if not 0 < number <= MAX_BANDWIDTH_MB_S or abs(thousandths - round(thousandths)) > 1e-6:
        raise PolicyError(
            f"Bandwidth cap: from {BANDWIDTH_STEP_MB_S:g} to {MAX_BANDWIDTH_MB_S} MB/s in steps of "
            f"{BANDWIDTH_STEP_MB_S:g} MB/s (0 or empty: no cap), not {value}."
        )
    return number


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise PolicyError(f"{name}: a number, not {value}.")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: a JSON integer beyond any float
        raise PolicyError(f"{name}: a number, not {str(value)[:40]!r}.") from None
    if not math.isfinite(number):
        raise PolicyError(f"{name}: a number, not {value}.")
    return number


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    words = {
        "true": True,
        "on": True,
        "1": True,
        "yes": True,
        "false": False,
        "off": False,
        "0": False,
        "": False,
    }
    if isinstance(value, str) and value.strip().lower() in words:
        return words[value.strip().lower()]
    raise PolicyError(f"{name}: on or off, not {str(value)[:40]!r}.")
