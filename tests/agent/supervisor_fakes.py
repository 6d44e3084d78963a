"""In-memory desired view and transition sink for supervisor tests (the agent's
real ones read and write the journal)."""

from __future__ import annotations

from collections.abc import Mapping

from edge_agent._journal_errors import JournalWriteError
from edge_agent.supervisor import OverrideAction, RejectedSpec
from sync.models import WorkloadPhase, WorkloadSpec, WorkloadStatus


class View:
    """Desired workloads and overrides held in plain dicts."""

    def __init__(self) -> None:
        self.specs: dict[str, WorkloadSpec | RejectedSpec] = {}
        self.over: dict[str, OverrideAction] = {}

    def desired(self) -> Mapping[str, WorkloadSpec | RejectedSpec]:
        return self.specs

    def overrides(self) -> Mapping[str, OverrideAction]:
        return self.over


class Sink:
    """Keeps every status transition the supervisor reports."""

    def __init__(self) -> None:
        self.transitions: list[tuple[WorkloadStatus, WorkloadPhase | None]] = []
        self.full = False
        """Refuse every transition, as the journal does on a full disk."""

    async def on_transition(self, status: WorkloadStatus, previous: WorkloadPhase | None) -> None:
        if self.full:
            raise JournalWriteError("write failed: database or disk is full", path="journal.db")
        self.transitions.append((status, previous))

    def phases(self, name: str) -> list[WorkloadPhase]:
        return [s.phase for s, _ in self.transitions if s.name == name]
