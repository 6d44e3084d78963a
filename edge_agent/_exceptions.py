"""Exceptions raised by the edge agent.

::

    NovaCronError (sync._exceptions)
    ├── ConfigError                    bad agent config / firmware profile (file, field)
    └── AgentError                     base of everything the edge agent raises

Invalid configuration is always reported as :class:`sync._exceptions.ConfigError`
(the CLI maps it to exit code 2), never as an :class:`AgentError`. Modules of the
agent derive their own errors from :class:`AgentError` next to where they are raised
or here, when several modules share them.
"""

from __future__ import annotations

from sync._exceptions import NovaCronError


class AgentError(NovaCronError):
    """Base of every error the edge agent raises on purpose."""
