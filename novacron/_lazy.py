"""Lazy public names for a package ``__init__`` (PEP 562).

A package whose public names live in heavier modules lists where each one is
defined; the module is imported the first time the name is used, and the name
is then cached in the package's namespace. Used by ``simulator`` and
``firmware_profiles``, so ``novacron --help`` imports neither amqtt nor the
sync cores. Kept in ``novacron`` because that package's ``__init__`` imports
nothing.

:func:`defer_import` does the same for a whole module that a library imports
but a process never uses: the agent's way to leave out what paho-mqtt and
pydantic import for features it does not touch (see
:mod:`edge_agent._runtime`).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["defer_import", "lazy_exports"]


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


_DEFER_LOCK = threading.RLock()
_LOADING: set[str] = set()


class _DeferredModule(types.ModuleType):
    """A module in ``sys.modules`` whose code has not run yet (see :func:`defer_import`)."""

    def __getattr__(self, name: str) -> Any:
        # Only called for names the module does not hold yet. The import system
        # asks every module for ``__path__`` (is it a package?); the spec answers
        # that for a plain module without running it.
        spec = self.__spec__
        if spec is None or spec.loader is None:  # pragma: no cover - defer_import checks both
            raise AttributeError(name)
        if name == "__path__" and spec.submodule_search_locations is None:
            raise AttributeError(name)
        with _DEFER_LOCK:
            if isinstance(self, _DeferredModule) and spec.name not in _LOADING:
                _LOADING.add(spec.name)
                try:
                    spec.loader.exec_module(self)
                finally:
                    _LOADING.discard(spec.name)
                self.__class__ = types.ModuleType  # type: ignore[assignment]
        return types.ModuleType.__getattribute__(self, name)


def defer_import(name: str, provides: Mapping[str, Any] | None = None) -> bool:
    """Put module ``name`` in ``sys.modules`` now and run its code at its first use.

    ``import name`` statements elsewhere then bind the module without running
    it; the first look-up of a name it does not hold yet (``name.attr``,
    ``from name import attr``) runs its code, once, under a lock, and the
    module is an ordinary module from then on. Unlike
    :class:`importlib.util.LazyLoader`, whose modules load as soon as any
    other ``import`` statement names them (the import system reads their
    ``__spec__``), this keeps a module that third-party code imports but never
    uses from costing any memory. An error in the module's code is raised at
    the use that runs it. Meant for Python source modules: an extension
    module's library is loaded when its module object is made, here.

    Args:
        name: absolute module name; its parent package is imported now.
        provides: names the module holds before its code runs: a stand-in for
            what callers use, replaced by the module's own if it ever loads.

    Returns:
        Whether the module was deferred (False: already imported, or not found).
    """
    if name in sys.modules:
        return False
    try:
        spec = importlib.util.find_spec(name)
    except ImportError:  # its parent package is missing
        return False
    if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
        return False
    module = importlib.util.module_from_spec(spec)
    module.__class__ = _DeferredModule
    vars(module).update(provides or {})
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    return True
