"""Exceptions raised by the simulator.

::

    NovaCronError (sync._exceptions)
    ├── ConfigError                  a fault schedule or fleet file is invalid (source, field)
    └── SimulatorError               base of everything else the simulator raises
        ├── BrokerStartError         the embedded broker cannot listen (port)
        └── ProxyError               the TCP proxy cannot listen (port)

Invalid input files are always :class:`sync._exceptions.ConfigError`, so the
CLI maps them to exit status 2 like every other configuration error.
"""

from __future__ import annotations

from sync._exceptions import NovaCronError

__all__ = ["SimulatorError"]


class SimulatorError(NovaCronError):
    """Base of every error the simulator raises on purpose (other than ConfigError)."""
