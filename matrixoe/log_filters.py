"""Logging filters for the console's handlers."""

from __future__ import annotations

import logging


class ClientErrorsOnOneLine(logging.Filter):
    """Drop the traceback from Django's log line of a 4xx answer (403, 404, 400, 405).

    Django logs "Forbidden (Permission denied): /path" with the PermissionDenied's traceback, so a
    read-only operator clicking around fills the log with tracebacks of nothing wrong. The one line
    (with its path and status) stays; records of 5xx answers and every other record keep their
    traceback, so real errors are never hidden.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        status = getattr(record, "status_code", None)
        if record.exc_info and isinstance(status, int) and 400 <= status < 500:
            record.exc_info = None
            record.exc_text = None
        return True
