"""I/O Quiesce on QEMU: what happens to the guest's in-flight disk requests at the switchover, measured.

QEMU drains by itself: when the migration decides to switch over, the source's migration thread
stops the VM (``vm_stop``: vCPUs paused, state ``finish-migrate``), then ``bdrv_drain_all()`` waits
for every request already submitted to complete, and ``bdrv_flush_all()`` flushes the images; only
then does it send the device state (which carries the virtqueues, with those completions) and
inactivate the images (``storage``). A request the guest queues but QEMU has not yet taken cannot
exist: the vCPUs are stopped. So nothing is lost and nothing needs the agent's help; what the agent
can do is measure it.

QMP gives no count of requests in flight at a past instant (``query-blockstats`` counts completed
ones, and the drain runs with the main loop's lock held, so no QMP command sees it happen). QEMU's
trace events do: every QEMU the driver starts writes a trace file (``-msg timestamp=on``: each line
carries the QEMU pid and the wall-clock time in microseconds) with ``runstate_set`` and
``vm_stop_flush_all`` enabled; for a migration the source also enables ``virtio_blk_handle_*`` and
``virtio_blk_req_complete`` (``enable_request_tracing``). ``io_quiesce`` then reads, around the
switchover's stop:

- ``outstanding``: requests QEMU had taken from the guest and not yet completed when the VM stopped;
- ``drain_ms``: from the stop until the last of those completed (0 if none was outstanding);
- ``flushed_ms``: from the stop until ``vm_stop_flush_all`` (drain and flush done);
- ``completed_in_drain``: those requests completed after the stop (equals ``outstanding`` unless one
  failed or the trace was cut).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from hostagent.drivers.qemu.qmp import QmpClient

# QEMU's trace events the driver turns on: at launch (switchover times, the target's announce) ...
LAUNCH_TRACE_EVENTS = ("runstate_set", "vm_stop_flush_all", "qemu_announce_self_iter")
# ... and on the source of a migration, for its duration (a line per request).
REQUEST_TRACE_EVENTS = ("virtio_blk_handle_write", "virtio_blk_handle_read", "virtio_blk_req_complete")

_LINE = re.compile(r"^(\d+)@(\d+)\.(\d{6}):(\w+) (.*)$")
_REQ = re.compile(r"\breq (0x[0-9a-f]+)")
_NEW_STATE = re.compile(r"new_state \d+ \(([\w-]+)\)")


@dataclass(frozen=True)
class TraceLine:
    at: float  # wall-clock seconds (QEMU's gettimeofday)
    event: str
    detail: str


def read_trace(path: Path) -> list[TraceLine]:
    """QEMU's trace lines (``<pid>@<s>.<us>:<event> <args>``) in file order; other lines skipped."""
    lines = []
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    for raw in text.splitlines():
        found = _LINE.match(raw)
        if found:
            at = int(found.group(2)) + int(found.group(3)) / 1e6
            lines.append(TraceLine(at, found.group(4), found.group(5)))
    return lines


def state_changes(lines: list[TraceLine], new_state: str) -> list[float]:
    """When QEMU's run state became ``new_state`` (``finish-migrate``: the source stopped for the
    switchover; ``running``: a VM ran or resumed)."""
    return [
        line.at
        for line in lines
        if line.event == "runstate_set" and (m := _NEW_STATE.search(line.detail)) and m.group(1) == new_state
    ]


@dataclass(frozen=True)
class IoQuiesce:
    """The drain of one switchover (module docstring). Times in ms from ``stopped_at`` (wall s)."""

    stopped_at: float
    outstanding: int
    completed_in_drain: int
    drain_ms: float
    flushed_ms: float | None
    requests_traced: int  # requests taken from the guest while tracing ran, before the stop


def io_quiesce(trace: Path, after: float = 0.0) -> IoQuiesce | None:
    """The first switchover stop in QEMU's ``trace`` at or after ``after`` (wall s), measured; None if
    the source never stopped for a switchover there (e.g. the migration aborted in Copy)."""
    lines = read_trace(trace)
    outstanding: dict[str, float] = {}
    traced = 0
    stop_index = None
    for index, line in enumerate(lines):
        if line.at < after:
            continue
        if line.event.startswith("virtio_blk_handle_") and (req := _REQ.search(line.detail)):
            outstanding[req.group(1)] = line.at
            traced += 1
        elif line.event == "virtio_blk_req_complete" and (req := _REQ.search(line.detail)):
            outstanding.pop(req.group(1), None)
        elif line.event == "runstate_set" and "(finish-migrate)" in line.detail.split("new_state", 1)[-1]:
            stop_index = index
            break
    if stop_index is None:
        return None
    stopped_at = lines[stop_index].at
    waiting = set(outstanding)
    completed, last_completion, flushed_at = 0, stopped_at, None
    for line in lines[stop_index + 1 :]:
        if line.event == "virtio_blk_req_complete" and (req := _REQ.search(line.detail)):
            if req.group(1) in waiting:
                waiting.discard(req.group(1))
                completed += 1
                last_completion = line.at
        elif line.event == "vm_stop_flush_all":
            flushed_at = line.at
            break
    return IoQuiesce(
        stopped_at=stopped_at,
        outstanding=len(outstanding),
        completed_in_drain=completed,
        drain_ms=round((last_completion - stopped_at) * 1000, 3),
        flushed_ms=None if flushed_at is None else round((flushed_at - stopped_at) * 1000, 3),
        requests_traced=traced,
    )


async def enable_request_tracing(qmp: QmpClient, enable: bool = True) -> None:
    """Turn the per-request trace events on (for a migration) or off again."""
    for name in REQUEST_TRACE_EVENTS:
        await qmp.execute("trace-event-set-state", name=name, enable=enable)
