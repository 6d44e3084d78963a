"""The ``novacron`` command line: one console script for every component."""

from __future__ import annotations

__all__: list[str] = []
