"""Text from the console made safe for a terminal before the command prints it.

Whatever the server sends (names, Not Runnable reasons, alerts, refusals, the words of an error) was
typed by someone, and a terminal obeys what it is sent: ESC starts CSI and OSC sequences (clear the
screen, move the cursor, retitle the window, fake a status line), other C0 and C1 controls move and
erase, and Unicode's bidirectional controls reorder what is shown. Every such character is shown as
its escape instead (``\\x1b``, ``\\u202e``), so the text reads as it was sent and does nothing. A line
break or tab is escaped too: one value stays on its line. ``--json`` output needs none of this: JSON
escapes control characters itself, and the command prints it with ``ensure_ascii``.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

# Unicode's bidirectional formatting characters (UAX #9): marks, embeddings, overrides, isolates.
BIDI_CONTROLS = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_UNSAFE = re.compile(f"[\\x00-\\x1f\\x7f-\\x9f\u2028\u2029{BIDI_CONTROLS}]")


NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    if char in NAMED:
        return NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def terminal_text(value: str) -> str:
    """``value`` with every control, line break and bidi control shown as its escape."""
    return _UNSAFE.sub(_escaped, value)


def for_terminal(data: Any) -> Any:
    """``data`` (the API's JSON: dicts, lists, strings, numbers) with every string ``terminal_text``-ed,
    keys included."""
    if isinstance(data, str):
        return terminal_text(data)
    if isinstance(data, dict):
        return {for_terminal(key): for_terminal(value) for key, value in data.items()}
    if isinstance(data, list):
        return [for_terminal(item) for item in data]
    return data


def segment(name: str) -> str:
    """A name typed on the command line as one URL path segment: "/", "?", "#", controls percent-encoded,
    so the API is asked about exactly that name (and answers 404 in words when there is none)."""
    return quote(name, safe="")
