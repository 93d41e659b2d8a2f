from __future__ import annotations

from .models import Migration


class MigrationFailed(Exception):
    """Ends an attempt before the commit; ``reason`` in plain words ("the target host stopped answering")."""

    def __init__(self, phase: Migration.State | str, reason: str) -> None:
        self.phase = Migration.State(phase)
        self.reason = reason
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
        super().__init__(phase, "cancelled")

    @property
    def alert(self) -> str:
        return f"Cancelled by {self.who} during the {self.phase.label} phase."
