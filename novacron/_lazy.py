"""Lazy public names for a package ``__init__`` (PEP 562).

A package whose public names live in heavier modules lists where each one is
defined; the module is imported the first time the name is used, and the name
is then cached in the package's namespace. Used by ``simulator`` and
``firmware_profiles``, so ``novacron --help`` imports neither amqtt nor the
sync cores. Kept in ``novacron`` because that package's ``__init__`` imports
nothing.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, homes: Mapping[str, str], exported: list[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``.

    Args:
        package: the package's ``__name__``.
        homes: public name -> the module that defines it.
        exported: the package's ``__all__``.

    Returns:
        ``(__getattr__, __dir__)``, to assign at module level.
    """

    def __getattr__(name: str) -> Any:  # noqa: N807 - the PEP 562 hook
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:  # noqa: N807 - the PEP 562 hook
        return sorted(set(vars(sys.modules[package])) | set(exported))

    return __getattr__, __dir__
