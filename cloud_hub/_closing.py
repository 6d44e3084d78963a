"""The context-manager halves of the hub's closable objects.

A class that defines ``close`` (or ``aclose``) inherits ``with obj:`` (or
``async with obj:``), which returns the object itself and closes it on the way
out, whatever the outcome.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

__all__ = ["AsyncClosing", "Closing"]


class Closing:
    """``with obj:`` returns ``obj`` and calls :meth:`close` on the way out."""

    def close(self) -> None:
        """Release what the object holds (subclasses implement it)."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        """Return the object itself."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close, see :meth:`close`."""
        self.close()


class AsyncClosing:
    """``async with obj:`` returns ``obj`` and awaits :meth:`aclose` on the way out."""

    async def aclose(self) -> None:
        """Release what the object holds (subclasses implement it)."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        """Return the object itself."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close, see :meth:`aclose`."""
        await self.aclose()
