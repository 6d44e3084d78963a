"""Process-level settings of ``novacron agent run`` that keep a gateway agent small.

An idle agent's memory is mostly imported code and native libraries (see the
``idle_rss_mb`` figure of ``bench/agent_bench.py``); what is left to tune is how
that code is loaded, and the threads and what they cost:

* **bytecode.** The systemd unit runs the interpreter with ``PYTHONOPTIMIZE=2``
  (``-OO``: no docstrings in memory, no ``assert``; the agent's asserts only
  narrow types) and ``PYTHONNODEBUGRANGES=1`` (no column tables; tracebacks
  keep their line numbers, not the ``^^^`` markers): about 2 MB less for the
  same modules. ``-OO`` reads ``.opt-2.pyc`` files, which pip does not write
  and the unit could not write next to the sources (``ProtectSystem=full``
  makes ``/usr`` read-only); without them the interpreter compiles every
  module at each start, and the compiler's leftovers cost about 8 MB more, not
  less. So the unit also sets ``PYTHONPYCACHEPREFIX`` to ``pycache`` in the
  data directory (:func:`unit_environment`), which ``novacron agent install``
  fills (:func:`edge_agent.install.fill_bytecode_cache`). After an upgrade the
  agent's first start compiles what changed and writes it there, so that one
  run is larger until the next restart.
* **malloc arenas.** glibc gives every thread that allocates its own arena (up
  to 8 per core), each keeping freed memory of its own. The agent's threads (the
  journal writer and reader, a few I/O workers) need no parallel allocation, so
  the systemd unit sets ``MALLOC_ARENA_MAX`` (:data:`PROCESS_ENVIRONMENT`), which
  glibc reads at process start. When the agent is started without it (by hand),
  :func:`limit_malloc_arenas` sets the same limit with ``mallopt`` before the
  first thread starts (that loads ``ctypes``, about 0.3 MB, which the unit's
  environment variable avoids).
* **child watcher.** On Python 3.11 asyncio waits for each subprocess in a thread
  of its own (``ThreadedChildWatcher``): ten process workloads, ten threads.
  :func:`child_watcher` uses a pidfd on the event loop instead (Linux 5.3+),
  which is what Python 3.12+ does by default.
* **I/O threads.** ``asyncio.to_thread`` uses the loop's default executor, sized
  ``min(32, cores + 4)``; :func:`io_executor` sizes it to what the drivers need.
* **imports the agent never uses.** :func:`defer_unused_imports` keeps two
  import chains of its libraries from running until something uses them
  (:func:`novacron._lazy.defer_import`), about 2 MB together:

  - ``urllib.request`` (:data:`DEFERRED_IMPORTS`), which paho-mqtt imports to
    read proxy settings from the environment and reads only when PySocks is
    installed; with it come ``http.client``, the ``email`` parser, ``tempfile``
    and ``shutil``;
  - pydantic's plugin loader, which imports ``importlib.metadata`` (with
    ``zipfile``, ``csv``, ``email.message`` and ``importlib.resources``) to
    look for plugins when the first model is built. The unit sets pydantic's
    own ``PYDANTIC_DISABLE_PLUGINS=__all__``, for which the loader finds none;
    with that setting the agent answers "no plugins" without loading it. An
    operator who wants a pydantic plugin in the agent unsets it (a unit
    drop-in); the loader then runs as usual.

None of this changes what the agent does (but for pydantic plugins, off under
the unit); each falls back to the interpreter's default where the platform
lacks the feature (non-glibc libc, no pidfd). An agent started by hand without
the unit's environment runs the same, only larger.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

from novacron._lazy import defer_import

log = logging.getLogger(__name__)

MALLOC_ARENA_MAX: Final = 2
"""glibc malloc arenas for the whole agent process (the main one plus one shared
by its threads)."""

PROCESS_ENVIRONMENT: Final[dict[str, str]] = {
    "MALLOC_ARENA_MAX": str(MALLOC_ARENA_MAX),
    "PYDANTIC_DISABLE_PLUGINS": "__all__",
    "PYTHONNODEBUGRANGES": "1",
    "PYTHONOPTIMIZE": "2",
}
"""Environment the systemd unit gives ``novacron agent run`` besides its
bytecode cache (:func:`unit_environment`); read by the C library, the
interpreter and pydantic at process start, so it cannot be set from Python."""

DEFERRED_IMPORTS: Final[tuple[str, ...]] = ("urllib.request",)
"""Modules the agent's libraries import and the agent never uses (see the
module docstring); :func:`defer_unused_imports` defers them."""

PYDANTIC_PLUGIN_LOADER: Final = "pydantic.plugin._loader"
"""pydantic's module that looks for plugins in the installed distributions."""

_PYDANTIC_PLUGINS_OFF: Final = frozenset({"__all__", "1", "true"})
"""``PYDANTIC_DISABLE_PLUGINS`` values for which pydantic loads no plugin."""

BYTECODE_CACHE_DIR: Final = "pycache"
"""The unit's ``PYTHONPYCACHEPREFIX``, below the agent's data directory."""

_M_ARENA_MAX: Final = -8  # <malloc.h>

IO_THREADS_BASE: Final = 2
"""Default-executor threads for the process driver, metrics and key files."""

#: Extra default-executor threads per driver whose blocking calls run there:
#: each driver's own concurrency limit (``BlockingRunner``), so a busy Podman
#: or libvirt runtime never starves the process driver's log pumps.
IO_THREADS_PER_DRIVER: Final[dict[str, int]] = {"podman": 4, "libvirt": 2}


def limit_malloc_arenas(max_arenas: int = MALLOC_ARENA_MAX) -> bool:
    """Cap glibc's malloc arenas unless the environment already chose a cap.

    Call it before the process starts any thread: arenas already made stay.

    Args:
        max_arenas: the cap.

    Returns:
        Whether the cap was set here (False: set by the environment, not glibc,
        or not Linux).
    """
    if not sys.platform.startswith("linux"):
        return False
    if "MALLOC_ARENA_MAX" in os.environ or "arena_max" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    import ctypes  # noqa: PLC0415 - only when the unit's environment is missing

    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no such symbol)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_ARENA_MAX, max_arenas))


def unit_environment(data_dir: Path) -> dict[str, str]:
    """The whole environment the systemd unit sets for an agent using ``data_dir``.

    :data:`PROCESS_ENVIRONMENT` and ``PYTHONPYCACHEPREFIX`` (bytecode compiled
    with those settings, in ``data_dir`` because it is writable under the
    unit's sandbox).
    """
    return {**PROCESS_ENVIRONMENT, "PYTHONPYCACHEPREFIX": str(data_dir / BYTECODE_CACHE_DIR)}


def _no_pydantic_plugins() -> tuple[()]:
    """What ``pydantic.plugin._loader.get_plugins`` returns when plugins are off."""
    return ()


def defer_unused_imports() -> list[str]:
    """Defer the import chains an agent never uses (see the module docstring).

    Call it before the agent's modules are imported. Each module is loaded
    after all if something uses it.

    Returns:
        The modules deferred (none already imported is deferred).
    """
    deferred = [name for name in DEFERRED_IMPORTS if defer_import(name)]
    plugins_off = os.environ.get("PYDANTIC_DISABLE_PLUGINS") in _PYDANTIC_PLUGINS_OFF
    if plugins_off and defer_import(
        PYDANTIC_PLUGIN_LOADER, provides={"get_plugins": _no_pydantic_plugins}
    ):
        deferred.append(PYDANTIC_PLUGIN_LOADER)
    log.debug("deferred imports: %s", ", ".join(deferred) or "none")
    return deferred


def _pidfd_works() -> bool:
    if not hasattr(os, "pidfd_open"):
        return False
    try:
        fd = os.pidfd_open(os.getpid())
    except OSError:  # ENOSYS on an old kernel, EPERM under some seccomp filters
        return False
    os.close(fd)
    return True


@contextlib.contextmanager
def child_watcher(loop: asyncio.AbstractEventLoop) -> Iterator[bool]:
    """Wait for subprocesses with pidfds on ``loop`` for the block (Python 3.11).

    Python 3.12+ does so already and deprecates child watchers: there, and where
    pidfds do not work, the block runs with the interpreter's default.

    Yields:
        Whether the pidfd watcher is in use.
    """
    if sys.version_info >= (3, 12) or not _pidfd_works():
        yield False
        return
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(loop)
    asyncio.set_child_watcher(watcher)
    try:
        yield True
    finally:
        # The policy's next get_child_watcher() makes a fresh default one.
        asyncio.set_child_watcher(None)  # type: ignore[arg-type]


def io_executor(drivers: Iterable[str]) -> ThreadPoolExecutor:
    """The default executor for an agent running ``drivers``.

    Threads start on demand, up to :data:`IO_THREADS_BASE` plus the blocking
    concurrency of each enabled runtime driver.
    """
    workers = IO_THREADS_BASE + sum(IO_THREADS_PER_DRIVER.get(d, 0) for d in set(drivers))
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="agent-io")


__all__ = [
    "BYTECODE_CACHE_DIR",
    "DEFERRED_IMPORTS",
    "IO_THREADS_BASE",
    "IO_THREADS_PER_DRIVER",
    "MALLOC_ARENA_MAX",
    "PROCESS_ENVIRONMENT",
    "PYDANTIC_PLUGIN_LOADER",
    "child_watcher",
    "defer_unused_imports",
    "io_executor",
    "limit_malloc_arenas",
    "unit_environment",
]
