"""What the log says about refused and broken requests: one line for a 403, a traceback for a 500."""

import logging
import sys

import pytest
from django.core.exceptions import PermissionDenied

from matrixoe.log_filters import ClientErrorsOnOneLine
from tests.factories import make_viewer

pytestmark = pytest.mark.django_db


def console_handler() -> logging.Handler:
    """The handler the settings' LOGGING configures on the root logger."""
    for handler in logging.getLogger().handlers:
        if any(isinstance(f, ClientErrorsOnOneLine) for f in handler.filters):
            return handler
    raise AssertionError("no console handler with ClientErrorsOnOneLine")


def as_written(record: logging.LogRecord) -> str:
    handler = console_handler()
    assert handler.filter(record)
    return handler.format(record)


def test_a_403_for_a_read_only_operator_is_one_line_in_the_log(client, caplog):
    client.force_login(make_viewer())
    with caplog.at_level(logging.WARNING, logger="django.request"):
        assert client.get("/migrations/vms/1/migrate/").status_code == 403
    (record,) = [r for r in caplog.records if r.name == "django.request"]
    written = as_written(record)
    assert "Forbidden (Permission denied): /migrations/vms/1/migrate/" in written
    assert "Traceback" not in written and len(written.splitlines()) == 1


def test_a_server_error_keeps_its_traceback():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord(
            "django.request", logging.ERROR, __file__, 1, "Internal Server Error: /x", (), sys.exc_info()
        )
    record.status_code = 500
    assert "Traceback" in as_written(record)


def test_a_403_record_from_elsewhere_without_a_status_keeps_its_traceback():
    try:
        raise PermissionDenied("no")
    except PermissionDenied:
        record = logging.LogRecord("vms", logging.ERROR, __file__, 1, "unexpected", (), sys.exc_info())
    assert "Traceback" in as_written(record)
