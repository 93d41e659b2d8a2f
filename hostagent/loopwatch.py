"""How long the agent's event loop went without yielding: every request waits that long.

A task wakes every ``TICK_S``; between two wake-ups the loop ran other callbacks. Two figures per gap:
- wall: how late the wake-up came (ms) — includes time the OS gave the process no CPU (a loaded host);
- CPU: how much CPU the loop's thread used in the gap (ms, ``time.thread_time``) — work that ran
  without yielding, whatever the host's load. Health reports the longest of each over the last
  ``window_s`` seconds, at most ``KEPT_S`` (``agentprotocol.Health.loop_stall_ms`` / ``loop_busy_ms``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

TICK_S = 0.01
KEPT_S = 120  # gaps are kept this long, for ``longest(window_s)``


class LoopWatch:
    def __init__(self) -> None:
        self._gaps: deque[tuple[float, float, float]] = deque(maxlen=int(KEPT_S / TICK_S))
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="loop watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        while True:
            woke, cpu = time.monotonic(), time.thread_time()
            await asyncio.sleep(TICK_S)
            late_ms = (time.monotonic() - woke - TICK_S) * 1000
            busy_ms = (time.thread_time() - cpu) * 1000
            self._gaps.append((time.monotonic(), late_ms, busy_ms))

    def longest(self, window_s: float) -> tuple[float, float]:
        """(wall ms, CPU ms): the longest gaps between the watch's wake-ups in the last ``window_s`` s."""
        since = time.monotonic() - window_s
        recent = [(late, busy) for at, late, busy in self._gaps if at >= since]
        return max((late for late, _ in recent), default=0.0), max((busy for _, busy in recent), default=0.0)
