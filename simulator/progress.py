"""Live progress of a simulation run: a bar redrawn in place, or plain lines.

On a terminal, :class:`ProgressDisplay` keeps one line at the bottom and redraws
it at most every :data:`LIVE_REDRAW_S` seconds of wall time::

    [#########...........]  45%  t 135/300 s  online 1987/2000  converged 1990/2000  812 msg/s

Anywhere else (a CI log, a pipe) it prints the same text as a line of its own
every ``every_s`` seconds of wall time, so logs stay readable. Messages passed to
:meth:`ProgressDisplay.say` clear the live line first, so they never run into it.

The display only reads what it is given: a deterministic run shows it on stderr
and its report stays byte-for-byte the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TextIO

__all__ = ["LIVE_REDRAW_S", "Progress", "ProgressDisplay", "final_table"]

LIVE_REDRAW_S = 0.2
"""Shortest wall time between two redraws of the live line."""
BAR_WIDTH = 20


@dataclass(frozen=True, slots=True)
class Progress:
    """One snapshot of a run.

    Attributes:
        t_s: run time so far (virtual in deterministic mode).
        duration_s: the planned duration (settling may run past it).
        devices: fleet size.
        online: devices connected to their relay.
        converged: devices whose replicas all agree.
        rate: the run's throughput figure (``rate_unit`` per second).
        rate_unit: what ``rate`` counts (``msg`` delivered, ``event`` ingested).
        tail: mode-specific figures appended as they are.
    """

    t_s: float
    duration_s: float
    devices: int
    online: int
    converged: int
    rate: float
    rate_unit: str = "msg"
    tail: str = ""

    def render(self) -> str:
        """The one-line text, bar included."""
        frac = min(max(self.t_s / self.duration_s, 0.0), 1.0) if self.duration_s > 0 else 1.0
        filled = round(frac * BAR_WIDTH)
        phase = "" if self.t_s <= self.duration_s else " settling"
        text = (
            f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {frac:4.0%}{phase}  "
            f"t {self.t_s:.0f}/{self.duration_s:.0f} s  online {self.online}/{self.devices}  "
            f"converged {self.converged}/{self.devices}  {self.rate:,.0f} {self.rate_unit}/s"
        )
        return f"{text}  {self.tail}" if self.tail else text


class ProgressDisplay:
    """Shows :class:`Progress` snapshots on ``out``, live on a terminal.

    Args:
        out: where to write.
        every_s: wall seconds between plain lines (not a terminal).
        live: redraw one line in place (default: whether ``out`` is a terminal).
        wall: monotonic wall-clock seconds (injected for tests).
    """

    def __init__(
        self,
        out: TextIO,
        *,
        every_s: float = 5.0,
        live: bool | None = None,
        wall: Callable[[], float] = time.monotonic,
    ) -> None:
        if every_s <= 0:
            raise ValueError("every_s must be > 0")
        self.out = out
        self.every_s = every_s
        self.live = out.isatty() if live is None else live
        self._wall = wall
        self._next = wall() + (0.0 if self.live else every_s)
        self._drawn = ""
        self.last: Progress | None = None

    def update(self, progress: Progress, *, force: bool = False) -> None:
        """Show ``progress`` if it is time to (or ``force``)."""
        self.last = progress
        now = self._wall()
        if not force and now < self._next:
            return
        self._next = now + (LIVE_REDRAW_S if self.live else self.every_s)
        text = progress.render()
        if self.live:
            pad = " " * max(0, len(self._drawn) - len(text))
            self.out.write(f"\r{text}{pad}")
            self._drawn = text
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def say(self, text: str) -> None:
        """Print a message on a line of its own (the live line is redrawn after it)."""
        if self._drawn:
            self.out.write("\r" + " " * len(self._drawn) + "\r")
        self.out.write(text + "\n")
        if self._drawn:
            self.out.write(self._drawn)
        self.out.flush()

    def close(self) -> None:
        """Show the last snapshot and end the live line."""
        if self.last is not None and self.live:
            self.update(self.last, force=True)
        if self._drawn:
            self.out.write("\n")
            self.out.flush()
            self._drawn = ""


def final_table(rows: Iterable[tuple[str, object]]) -> str:
    """The run's figures as an aligned two-column table (nested values skipped)."""
    shown = [(k, v) for k, v in rows if not isinstance(v, dict | list | tuple)]
    width = max((len(k) for k, _ in shown), default=0)
    rule = "-" * (width + 2 + max((len(_cell(v)) for _, v in shown), default=0))
    lines = [rule, *(f"{k:<{width}}  {_cell(v)}" for k, v in shown), rule]
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return str(value)
