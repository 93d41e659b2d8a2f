from __future__ import annotations

from agentprotocol import FailureKind

from .models import Migration


class MigrationFailed(Exception):
    """Ends an attempt before the commit; ``reason`` in plain words ("the target host stopped answering")."""

    def __init__(
        self,
        phase: Migration.State | str,
        reason: str,
        *,
        kind: FailureKind | str = FailureKind.INTERNAL,
        source_running: bool | None = None,
    ) -> None:
        self.phase = Migration.State(phase)
        self.reason = reason
        self.kind = FailureKind(kind)  # what decisions and statistics go by; ``reason`` is for people
        # False when the guest was found not running on the source: the alert must not say it "keeps running".
        # None: unknown here, the database's hardware status decides.
        self.source_running = source_running
        super().__init__(self.alert)

    @property
    def alert(self) -> str:
        return f"{self.phase.label} phase failed: {self.reason}."


class Superseded(Exception):
    """Another worker (or recovery, or a cancel) decided this migration first: stop without acting."""


class MigrationCancelled(MigrationFailed):
    """An admin cancelled before the commit: ends CANCELLED rather than ABORTED."""

    def __init__(self, phase: Migration.State | str, who: str) -> None:
        self.who = who
        super().__init__(phase, "cancelled", kind=FailureKind.CANCELLED)

    @property
    def alert(self) -> str:
        return f"Cancelled by {self.who} during the {self.phase.label} phase."
