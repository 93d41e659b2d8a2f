"""The OS image guest's workload, guestload (``scripts/guest/guestload.c``), seen from the host:
what it says on its serial console, and its self-check on demand over the command port.

The command port is the guest's second serial port (ttyS1), a Unix socket QEMU listens on
(``<run_dir>/<guest_id>.<instance>.cmd``). After a move the agent (or a test) connects to the
*target's* socket, writes ``selfcheck <tag>`` and reads the answer: guestload drains its disk writes,
checks all its memory and every block it wrote, prints the result on the console and answers it on
the port. A request made over a serial line cannot be lost across a migration unnoticed: the answer
carries the tag, and no answer within the timeout is a failure.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path

_ALIVE = re.compile(
    rb"guestload: alive t=(\d+) writes=(\d+) checks=\d+ disk_writes=(\d+) disk_inflight=\d+ "
    rb"disk_errors=(\d+) heartbeats=(\d+)"
)
_CHECK_OK = re.compile(rb"guestload: (?:self)?check ok")
_CHECK_FAIL = re.compile(rb"guestload: (?:self)?check FAIL")
_BOOTED = re.compile(rb"guest-os: booted in ([0-9.]+) s")
_FIELD = re.compile(r"(\w+)=(\S+)")


class SelfCheckError(RuntimeError):
    """No answer from the guest's command port (the message says why)."""


@dataclass(frozen=True)
class SelfCheck:
    """guestload's answer to ``selfcheck <tag>``: ``ok``, and its fields (``pages``, ``blocks``,
    ``drained``, ``drain_us``; on failure ``mem_bad``, ``disk_bad``, ``lost``, ``torn``, ``unacked``,
    ``first_page``, ``first_block``), with the line as it came."""

    tag: str
    ok: bool
    fields: dict[str, str]
    line: str


def parse_selfcheck(line: str) -> SelfCheck | None:
    """``guestload: selfcheck ok|FAIL tag=... k=v ...``; None for any other line."""
    words = line.strip().split(maxsplit=3)
    if len(words) < 3 or words[:2] != ["guestload:", "selfcheck"] or words[2] not in ("ok", "FAIL"):
        return None
    fields = dict(_FIELD.findall(line))
    return SelfCheck(tag=fields.get("tag", ""), ok=words[2] == "ok", fields=fields, line=line.strip())


async def request_selfcheck(command_socket: Path, tag: str, timeout: float = 60.0) -> SelfCheck:
    """Ask the guest behind ``command_socket`` to check itself now; its answer.

    ``tag``: letters, digits, ``-_.`` (it comes back in the answer). Raises ``SelfCheckError`` if the
    port cannot be reached or no answer with that tag comes within ``timeout`` s, ``ValueError`` for
    a bad tag."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", tag):
        raise ValueError(f"a self-check tag is 1-40 letters, digits or -_. ; got {tag!r}")
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(command_socket)), 5)
    except (OSError, TimeoutError) as error:
        raise SelfCheckError(f"cannot reach the guest's command port {command_socket}: {error}") from None
    try:
        writer.write(f"\nselfcheck {tag}\n".encode())
        await writer.drain()
        async with asyncio.timeout(timeout):
            while line := await reader.readline():
                answer = parse_selfcheck(line.decode(errors="replace"))
                if answer is not None and answer.tag == tag:
                    return answer
        raise SelfCheckError(f"the guest's command port {command_socket} closed before answering")
    except TimeoutError:
        raise SelfCheckError(f"no self-check answer from the guest within {timeout:g} s") from None
    finally:
        writer.close()


def workload_report(serial: bytes) -> dict[str, object]:
    """What guestload last said on the console: the counts the driver reports under ``workload``.

    ``selfchecks_passed``/``failed`` count both the periodic passes (``check``) and the on-demand
    checks (``selfcheck``), as memwriter's do; ``requested_checks`` lists the on-demand answers."""
    alive = _ALIVE.findall(serial)
    booted = _BOOTED.search(serial)
    answers = (parse_selfcheck(raw.decode(errors="replace")) for raw in serial.splitlines())
    requested = [answer for answer in answers if answer is not None]
    last = alive[-1] if alive else None
    return {
        "kind": "guestload",
        "booted": b"guestload: filled" in serial or bool(alive),
        "boot_s": float(booted.group(1)) if booted else None,
        "alive_lines": len(alive),
        "last_alive_s": int(last[0]) if last else None,
        "pages_written": int(last[1]) if last else 0,
        "disk_writes": int(last[2]) if last else 0,
        "disk_errors": int(last[3]) if last else 0,
        "heartbeats_sent": int(last[4]) if last else 0,
        "selfchecks_passed": len(_CHECK_OK.findall(serial)),
        "selfchecks_failed": len(_CHECK_FAIL.findall(serial)),
        "requested_checks": [{"tag": answer.tag, "ok": answer.ok} for answer in requested],
    }
