"""The workers' consumer: Celery's own, surviving a broker connection lost while tasks are unacked.

QA and soak bug 5: a Redis restart ended the worker with "Unrecoverable error: AttributeError('NoneType'
object has no attribute 'hostname')". On a lost connection Celery 5.7's
``Consumer.on_connection_error_after_connected`` first collects the connection (kombu drops the
transport's client), then closes it; closing the default channel restores the unacknowledged messages
(``task_acks_late``), which needs a new Redis client built from that dropped client. kombu's
``ignore_errors`` only swallows connection errors, so the AttributeError ends the worker (the same
path as celery/kombu#582). Reproduced by ``tests/test_worker_redis_restart.py``.

The same dropped client ends the worker once more when a task that was running across the loss
finishes: its acknowledgement (acks-late) goes to the channel of the lost connection, which needs a
client built from the collected connection (AttributeError, again past kombu's ``ack_log_error``,
which only catches connection errors): "Unrecoverable error", and every other task running in that
worker (other migrations) died with it (QA: a Redis failover of the cluster profile). The
acknowledgement is therefore skipped with a warning when its connection is gone: the message stays
unacknowledged in Redis and is handed out again after the visibility timeout, where its second run
changes nothing (``tests/migrations_app/test_redelivery.py``).

Chosen by ``CELERY_WORKER_CONSUMER`` (settings). Nothing is lost by skipping that restore: Redis keeps
the unacknowledged messages and redelivers them after the visibility timeout (a migration task's
second run finds its migration decided: the lease and the compare-and-set on its state).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery.worker.consumer import Consumer

logger = logging.getLogger(__name__)


class BrokerRestartSafeConsumer(Consumer):
    """``Consumer`` whose clean-up of a lost connection cannot end the worker (see the module)."""

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        """Celery's clean-up; the AttributeError of closing an already collected connection is logged
        and the consumer goes on to reconnect (``self.connection`` is None by then, as Celery leaves it)."""
        try:
            super().on_connection_error_after_connected(exc)
        except AttributeError:
            logger.warning(
                "Closing the lost broker connection failed inside kombu (its client was already "
                "collected); reconnecting anyway. Unacknowledged messages stay in Redis.",
                exc_info=True,
            )
            self.connection = None

    def call_soon_ack(self, p: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Celery's, with an acknowledgement (``Message.ack_log_error`` / ``reject_log_error``) that
        cannot end the worker when the connection its message came on was lost meanwhile."""
        return super().call_soon_ack(unless_connection_gone(p), *args, **kwargs)


def unless_connection_gone(acknowledge: Callable[..., Any]) -> Callable[..., Any]:
    """``acknowledge`` (a bound method of a kombu ``Message``), skipped with a warning when the
    message's channel has lost its connection (kombu's client of it is None)."""

    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return acknowledge(*args, **kwargs)
        except AttributeError:
            message = getattr(acknowledge, "__self__", None)
            channel = getattr(message, "channel", None)
            if getattr(getattr(channel, "connection", None), "client", True) is not None:
                raise  # not the lost connection: a real bug, not hidden
            logger.warning(
                "Could not acknowledge task message %s: the broker connection it came on was lost "
                "while the task ran. It stays unacknowledged in Redis (if Redis kept it) and is handed "
                "out again after the visibility timeout; that second run changes nothing.",
                getattr(message, "delivery_tag", "?"),
            )
            return None

    return guarded
