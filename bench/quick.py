"""``--quick`` for every benchmark: the same code path on a small load, seconds long.

CI runs each benchmark so (``tests/test_benchmarks.py``, ``make bench-quick``): a benchmark broken by a
change fails there, not on the day someone wants its figures. Its numbers mean nothing.
"""

from __future__ import annotations

import argparse
from typing import Any

QUICK_HELP = "a small load, seconds long: checks the bench runs (CI); the figures mean nothing"


def parse_args(parser: argparse.ArgumentParser, quick: dict[str, Any]) -> argparse.Namespace:
    """``parser``'s arguments, with ``--quick`` added: it replaces the defaults by ``quick`` (options
    given on the command line still win). The namespace's ``quick`` says whether it was given."""
    parser.add_argument("--quick", action="store_true", help=QUICK_HELP)
    given, _ = parser.parse_known_args()
    if given.quick:
        parser.set_defaults(**quick)
    return parser.parse_args()
