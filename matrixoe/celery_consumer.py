"""The workers' consumer: Celery's own, surviving a broker connection lost while tasks are unacked.

QA and soak bug 5: a Redis restart ended the worker with "Unrecoverable error: AttributeError('NoneType'
object has no attribute 'hostname')". On a lost connection Celery 5.7's
``Consumer.on_connection_error_after_connected`` first collects the connection (kombu drops the
transport's client), then closes it; closing the default channel restores the unacknowledged messages
(``task_acks_late``), which needs a new Redis client built from that dropped client. kombu's
``ignore_errors`` only swallows connection errors, so the AttributeError ends the worker (the same
path as celery/kombu#582). Reproduced by ``tests/test_worker_redis_restart.py``.

Chosen by ``CELERY_WORKER_CONSUMER`` (settings). Nothing is lost by skipping that restore: Redis keeps
the unacknowledged messages and redelivers them after the visibility timeout (a migration task's
second run finds its migration decided: the lease and the compare-and-set on its state).
"""

from __future__ import annotations

import logging

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
