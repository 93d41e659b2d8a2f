"""The host agent's protocol: every message between the console and an agent, in one place.

This module is shared by the agent (server, engines, both drivers) and the console (its agent
client and the migration control plane). It imports nothing from Django or the console, so the
agent package still installs alone on a host.

Decisions are made by ``FailureKind``, never by the words of an error; the words are for people.
"""

from __future__ import annotations

from enum import StrEnum


class FailureKind(StrEnum):
    """Why a migration attempt ended before its commit; the console builds the alert's words from it."""

    TIME_LIMIT = "time_limit"  # a phase ran over its time limit
    CANCELLED = "cancelled"  # an administrator (or the control plane) cancelled it
    REFUSED = "refused"  # the target refused (no room, already has the guest, bad token, ...)
    UNREACHABLE = "unreachable"  # a peer (agent or data plane) stopped answering
    DIGEST_MISMATCH = "digest_mismatch"  # the target's memory digest differs from the source's
    NOT_CONVERGED = "not_converged"  # pre-copy hit its round limit without converging
    INTERNAL = "internal"  # anything else: a bug or an unexpected error
