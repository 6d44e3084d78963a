"""Bounded, rotated log files for supervised processes.

``<name>.log`` is the live file; ``<name>.log.1`` … ``<name>.log.N`` are older ones.
A file is rotated before a write would take it past ``max_bytes``, so the bytes kept
on disk for one workload never exceed ``max_bytes * (backups + 1)``. The writer is
synchronous and thread-safe; the process driver calls it through
``asyncio.to_thread``.
"""

from __future__ import annotations

import threading
from collections import deque
from pathlib import Path


class RotatingLogWriter:
    """Append-only log file with size-based rotation.

    Args:
        path: the live log file (its directory must exist).
        max_bytes: size cap of one file, at least 1.
        backups: how many rotated files to keep, at least 0.
    """

    def __init__(self, path: Path, *, max_bytes: int, backups: int) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        if backups < 0:
            raise ValueError("backups must not be negative")
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()
        self._file = path.open("ab")
        self._size = self._file.tell()

    def write(self, data: bytes) -> None:
        """Append ``data``, rotating as often as needed to respect the cap."""
        with self._lock:
            view = memoryview(data)
            while view:
                room = self.max_bytes - self._size
                if room <= 0:
                    self._rotate()
                    room = self.max_bytes
                chunk = view[:room]
                self._file.write(chunk)
                self._size += len(chunk)
                view = view[len(chunk) :]
            self._file.flush()

    def close(self) -> None:
        """Close the live file; later writes raise ``ValueError``."""
        with self._lock:
            self._file.close()

    def _rotate(self) -> None:
        self._file.close()
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            oldest = _backup(self.path, self.backups)
            oldest.unlink(missing_ok=True)
            for index in range(self.backups - 1, 0, -1):
                src = _backup(self.path, index)
                if src.exists():
                    src.replace(_backup(self.path, index + 1))
            self.path.replace(_backup(self.path, 1))
        self._file = self.path.open("ab")
        self._size = 0


def _backup(path: Path, index: int) -> Path:
    return path.with_name(f"{path.name}.{index}")


def log_files(path: Path) -> list[Path]:
    """The live file and its rotated backups that exist, oldest first."""
    backups: list[tuple[int, Path]] = []
    for candidate in path.parent.glob(f"{path.name}.*"):
        suffix = candidate.name[len(path.name) + 1 :]
        if suffix.isdigit():
            backups.append((int(suffix), candidate))
    ordered = [p for _, p in sorted(backups, reverse=True)]
    if path.exists():
        ordered.append(path)
    return ordered


def read_tail(path: Path, lines: int | None) -> str:
    """Read the last ``lines`` lines (all when None) across rotated files.

    Bytes that are not UTF-8 are replaced. Memory use is bounded by the size cap of
    the files, which the writer enforces.
    """
    if lines is not None and lines <= 0:
        return ""
    kept: deque[bytes] = deque(maxlen=lines)
    partial = b""
    for file in log_files(path):
        try:
            data = file.read_bytes()
        except FileNotFoundError:  # rotated away while reading
            continue
        pieces = (partial + data).split(b"\n")
        partial = pieces.pop()
        kept.extend(piece + b"\n" for piece in pieces)
    if partial:
        kept.append(partial)
    return b"".join(kept).decode("utf-8", errors="replace")
