"""Install the agent on a gateway as a hardened systemd service.

``novacron agent install`` writes three things, all relative to ``prefix``
(``/`` on a real gateway, a scratch directory in tests and packaging):

* ``etc/systemd/system/novacron-agent.service`` — the unit;
* ``etc/novacron/agent.yaml`` — a commented starting config (never overwritten);
* ``var/lib/novacron`` — the data directory (mode 0700), with the agent's
  bytecode compiled in ``pycache`` (:func:`fill_bytecode_cache`).

``novacron agent uninstall`` removes the unit and, only with ``purge``, the
config and data. Neither command starts or stops the service: that stays an
explicit ``systemctl`` step for the operator.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edge_agent._exceptions import AgentError
from edge_agent._runtime import unit_environment

log = logging.getLogger(__name__)

UNIT_NAME = "novacron-agent.service"

#: What ``novacron agent run`` imports, at start or once its link is up (the
#: link and its MQTT client, the codecs of the relay's host name), besides
#: ``novacron.__main__``. Anything else is compiled into the cache by the agent
#: on first use.
AGENT_MODULES = (
    "novacron.cli",
    "edge_agent._cli",
    "edge_agent.agent",
    "edge_agent.config",
    "edge_agent.link",
    "aiomqtt",
    "encodings.ascii",
    "encodings.idna",
)

# Run by fill_bytecode_cache's child: import (and so compile) every module
# named in argv, and compile novacron.__main__, which `-m` runs, not imports.
_FILL_CODE = """\
import importlib, importlib.util, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
main = importlib.util.find_spec("novacron.__main__")
main.loader.get_code(main.name)
"""


class InstallError(AgentError):
    """The agent could not be installed or uninstalled."""


@dataclass(frozen=True, slots=True)
class InstallLayout:
    """Where an installation puts its files, below ``prefix``."""

    prefix: Path

    @property
    def unit_path(self) -> Path:
        """The systemd unit file."""
        return self.prefix / "etc/systemd/system" / UNIT_NAME

    @property
    def config_path(self) -> Path:
        """The agent's YAML config."""
        return self.prefix / "etc/novacron/agent.yaml"

    @property
    def data_dir(self) -> Path:
        """The journal, keys and logs."""
        return self.prefix / "var/lib/novacron"


def render_unit(*, python: str, config_path: Path, data_dir: Path) -> str:
    """Return the text of the systemd unit.

    The agent supervises containers and VMs through their API sockets, so it
    keeps root but gets a read-only view of the system except its data dir.
    Its environment is :func:`edge_agent._runtime.unit_environment` (settings
    the C library and the interpreter read at process start).
    """
    environment = "".join(f"Environment={k}={v}\n" for k, v in unit_environment(data_dir).items())
    return f"""\
[Unit]
Description=NovaCron Edge agent (workload supervisor and sync)
Documentation=https://example.invalid/novacron-edge
Wants=network-online.target
After=network-online.target podman.socket libvirtd.service

[Service]
Type=simple
ExecStart={python} -m novacron agent run --config {config_path}
# Read at process start (malloc arenas, pydantic plugins off, -OO bytecode
# cached in the data dir): see edge_agent/_runtime.py.
{environment}Restart=always
RestartSec=2
# Give workloads and the journal time to flush on stop.
TimeoutStopSec=30
KillMode=mixed
NoNewPrivileges=yes
ProtectSystem=full
ProtectHome=read-only
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=no
RestrictSUIDSGID=yes
LockPersonality=yes
ReadWritePaths={data_dir}
StateDirectoryMode=0700
UMask=0077
LimitNOFILE=8192

[Install]
WantedBy=multi-user.target
"""


def install(prefix: Path, *, config_text: str, python: str | None = None) -> InstallLayout:
    """Write the unit, a starting config (kept if present) and the data dir."""
    layout = InstallLayout(prefix)
    # The unit must name the paths as they will be seen at run time.
    runtime = InstallLayout(Path("/")) if prefix == Path("/") else layout
    try:
        layout.data_dir.mkdir(parents=True, exist_ok=True)
        layout.data_dir.chmod(0o700)
        layout.config_path.parent.mkdir(parents=True, exist_ok=True)
        if layout.config_path.exists():
            log.info("keeping existing config %s", layout.config_path)
        else:
            layout.config_path.write_text(config_text, encoding="utf-8")
            layout.config_path.chmod(0o600)
        layout.unit_path.parent.mkdir(parents=True, exist_ok=True)
        layout.unit_path.write_text(
            render_unit(
                python=python or sys.executable,
                config_path=runtime.config_path,
                data_dir=runtime.data_dir,
            ),
            encoding="utf-8",
        )
    except OSError as exc:
        raise InstallError(f"cannot install under {prefix}: {exc}") from exc
    log.info("installed %s", layout.unit_path)
    fill_bytecode_cache(unit_environment(runtime.data_dir), python=python or sys.executable)
    return layout


def fill_bytecode_cache(
    environment: Mapping[str, str],
    *,
    python: str = sys.executable,
    cwd: Path = Path("/"),
    timeout_s: float = 300.0,
) -> bool:
    """Compile the agent's modules into the bytecode cache of ``environment``.

    Imports :data:`AGENT_MODULES` in a child ``python`` with ``environment``
    (the unit's: its ``PYTHONPYCACHEPREFIX``, ``-OO``, no column tables), from
    ``cwd`` (the unit's working directory), so that the agent's first start
    reads bytecode instead of compiling about 400 modules, which would cost it
    time and about 8 MB of memory until its next restart. Best effort: the
    agent compiles what is missing itself.

    Returns:
        Whether the child succeeded (a failure is logged).
    """
    env = {**os.environ, **environment}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # this run is for writing it
    try:
        proc = subprocess.run(
            [python, "-c", _FILL_CODE, *AGENT_MODULES],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout_s,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("could not fill the bytecode cache: %s", exc)
        return False
    if proc.returncode != 0:
        log.warning("could not fill the bytecode cache: %s", proc.stderr.strip()[-2000:])
        return False
    return True


def uninstall(prefix: Path, *, purge: bool = False) -> list[Path]:
    """Remove the unit (and with ``purge`` the config and data); return what went."""
    layout = InstallLayout(prefix)
    removed: list[Path] = []
    try:
        if layout.unit_path.exists():
            layout.unit_path.unlink()
            removed.append(layout.unit_path)
        if purge:
            if layout.config_path.exists():
                layout.config_path.unlink()
                removed.append(layout.config_path)
            if layout.data_dir.exists():
                shutil.rmtree(layout.data_dir)
                removed.append(layout.data_dir)
    except OSError as exc:
        raise InstallError(f"cannot uninstall under {prefix}: {exc}") from exc
    return removed


def verify_unit(unit_path: Path) -> tuple[bool, str]:
    """Run ``systemd-analyze verify`` on the unit when the tool exists.

    Returns:
        ``(ok, output)``; ``(True, "systemd-analyze not available")`` without it.
    """
    tool = shutil.which("systemd-analyze")
    if tool is None:
        return True, "systemd-analyze not available"
    proc = subprocess.run(
        [tool, "verify", str(unit_path)], capture_output=True, text=True, check=False, timeout=60
    )
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()
