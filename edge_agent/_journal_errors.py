"""Exceptions raised by the agent's local journal.

::

    NovaCronError                    (sync._exceptions)
    └── AgentError                   (edge_agent._exceptions)
        └── JournalError         base of every journal error (path)
            ├── JournalClosedError   used before open / after close, or a write
            │                        still waiting for queue space at close
            ├── JournalOverflowError metric write refused: the write queue is full
            └── JournalWriteError    SQLite failed to apply or commit a write
"""

from __future__ import annotations

from edge_agent._exceptions import AgentError


class JournalError(AgentError):
    """Base of every error raised by the journal, and of misuse of its API.

    Attributes:
        path: the journal file concerned (``""`` when not known).
    """

    def __init__(self, message: str, *, path: str = "") -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class JournalClosedError(JournalError):
    """The journal is not open, is closing, or its writer thread has stopped."""


class JournalOverflowError(JournalError):
    """A metrics-only write was refused because the bounded write queue is full.

    Metrics are periodic samples: the next one supersedes a refused one, so the
    journal refuses them (and counts the refusal) rather than blocking the
    sampler or evicting writes whose callers already await durability.

    Attributes:
        pending_rows: rows queued when the write was refused.
        limit_rows: the queue bound.
        refused: how many metric events this call carried.
    """

    def __init__(self, *, pending_rows: int, limit_rows: int, refused: int, path: str = "") -> None:
        self.pending_rows = pending_rows
        self.limit_rows = limit_rows
        self.refused = refused
        super().__init__(
            f"write queue full ({pending_rows}/{limit_rows} rows): {refused} metric(s) refused",
            path=path,
        )


class JournalWriteError(JournalError):
    """SQLite could not apply or commit a write (disk full, I/O error, bad input)."""
