"""regional_relay package."""

from __future__ import annotations

__all__: list[str] = []
