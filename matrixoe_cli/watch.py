"""``migrate --watch``: one live progress bar per phase and the statistics, from the progress stream.

The stream's data arrive made safe for a terminal (``Client.for_terminal``)."""

from __future__ import annotations

import json

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.text import Text

from .client import Client

MIB = 1024 * 1024


def statistics_line(migration: dict) -> str:
    stats = migration["statistics"]
    parts = [
        f"{migration['state']['label']}",
        f"sent {stats['bytes_sent'] / MIB:.1f} MiB",
        f"remaining {stats['bytes_remaining'] / MIB:.1f} MiB",
        f"round {stats['rounds']}",
        f"dirty {stats['dirty_rate_bytes_s'] / MIB:.1f} MiB/s",
        f"throughput {stats['throughput_bytes_s'] / MIB:.1f} MiB/s",
    ]
    if migration.get("active") and "recent_throughput_bytes_s" in stats:  # live: the last seconds' rate
        parts[-1] = f"throughput {stats['recent_throughput_bytes_s'] / MIB:.1f} MiB/s (last 5 s)"
    if stats["downtime_ms"] is not None:
        parts.append(f"downtime {stats['downtime_ms']} ms")
    return " · ".join(parts)


def watch_migration(api: Client, migration: dict, console: Console, *, as_json: bool = False) -> dict:
    """Follow the migration to its end and return its final state (``ApiError`` if the stream fails).

    ``as_json``: one JSON line per state. On a terminal: rich progress bars. Otherwise (a pipe, a log):
    a plain line for every change of a phase's percent, so a log shows each phase reaching 100%.
    """
    if as_json:
        final = migration
        for _, final in api.watch(migration["id"]):
            print(json.dumps(final), flush=True)
        return final
    if console.is_terminal:
        return _watch_bars(api, migration, console)
    return _watch_lines(api, migration, console)


def _watch_bars(api: Client, migration: dict, console: Console) -> dict:
    """The phases as bars, the statistics as plain text under them that wraps at the terminal's width.

    (The statistics were a row of the progress table: at 80 columns rich cut them off with "...".)
    """
    console.print(
        f"Migrating {migration['vm']} from {migration['source']} to {migration['target']}", markup=False
    )
    progress = Progress(  # the phases' words are the server's: shown as text, never as rich markup
        TextColumn("{task.description:<12}", markup=False),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[status]}", markup=False),
        console=console,
    )
    bars: dict[str, TaskID] = {
        phase["phase"]: progress.add_task(phase["label"], total=100, status="")
        for phase in migration["phases"]
    }
    statistics = Text(statistics_line(migration), overflow="fold")
    final = migration
    with Live(Group(progress, statistics), console=console, refresh_per_second=10):
        for _, final in api.watch(migration["id"]):
            for phase in final["phases"]:
                progress.update(bars[phase["phase"]], completed=phase["percent"], status=phase["status"])
            statistics.plain = statistics_line(final)
    return final


def _watch_lines(api: Client, migration: dict, console: Console) -> dict:
    console.print(
        f"Migrating {migration['vm']} from {migration['source']} to {migration['target']}", markup=False
    )
    shown: dict[str, int] = {}
    final = migration
    for _, final in api.watch(migration["id"]):
        for phase in final["phases"]:
            if phase["percent"] != shown.get(phase["phase"], 0) or (
                phase["status"] == "done" and phase["phase"] not in shown
            ):
                shown[phase["phase"]] = phase["percent"]
                console.print(f"{phase['label']:<12} {phase['percent']:>3}%", markup=False, highlight=False)
    console.print(statistics_line(final), markup=False, highlight=False)
    return final
