"""Counts a Celery worker's database queries, for benchmarks only: ``celery worker --include query_counter``.

Every query the worker's Django connections run goes through one execute wrapper; after each task the
process's total is written to ``$QUERY_COUNT_DIR/queries-<pid>`` (one integer), so the bench sums its
workers' files. Imported by the worker after Django is set up (Celery's ``--include``).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from celery.signals import task_postrun
from django.db.backends.signals import connection_created

_lock = threading.Lock()
_total = 0


def _count(execute: Any, sql: str, params: Any, many: bool, context: dict[str, Any]) -> Any:
    global _total
    with _lock:
        _total += 1
    return execute(sql, params, many, context)


def _install(sender: Any, connection: Any, **kwargs: Any) -> None:
    if _count not in connection.execute_wrappers:
        connection.execute_wrappers.append(_count)


def _write(**kwargs: Any) -> None:
    directory = os.environ.get("QUERY_COUNT_DIR")
    if directory:
        with _lock:
            total = _total
        Path(directory, f"queries-{os.getpid()}").write_text(str(total))


connection_created.connect(_install, weak=False)
task_postrun.connect(_write, weak=False)
