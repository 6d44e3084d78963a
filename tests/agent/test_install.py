"""`novacron agent install/uninstall` write a unit that systemd accepts."""

from __future__ import annotations

import shutil
import stat
import sys
from pathlib import Path

import pytest

from edge_agent.config import load_agent_config
from edge_agent.install import InstallLayout, render_unit, verify_unit
from novacron.cli import main


def test_install_writes_unit_config_and_data_dir(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    assert main(["agent", "install", "--prefix", str(prefix), "--device-id", "gw-7"]) == 0
    layout = InstallLayout(prefix)
    unit = layout.unit_path.read_text(encoding="utf-8")
    assert "Restart=always" in unit
    assert "NoNewPrivileges=yes" in unit
    assert f"--config {layout.config_path}" in unit
    assert "Environment=MALLOC_ARENA_MAX=2" in unit  # glibc reads it at process start
    assert "Environment=PYTHONOPTIMIZE=2" in unit
    assert f"Environment=PYTHONPYCACHEPREFIX={layout.data_dir / 'pycache'}" in unit
    # The install compiled the agent's modules there, at -OO, for its first start.
    cached = {p.name for p in (layout.data_dir / "pycache").rglob("*.opt-2.pyc")}
    tag = sys.implementation.cache_tag
    assert {f"agent.{tag}.opt-2.pyc", f"__main__.{tag}.opt-2.pyc"} <= cached
    assert stat.S_IMODE(layout.data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(layout.config_path.stat().st_mode) == 0o600
    config = load_agent_config(layout.config_path)
    assert config.device_id == "gw-7"
    assert config.data_dir == layout.data_dir


def test_install_keeps_an_existing_config(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    assert main(["agent", "install", "--prefix", str(prefix)]) == 0
    layout = InstallLayout(prefix)
    layout.config_path.write_text("# edited by the operator\n", encoding="utf-8")
    assert main(["agent", "install", "--prefix", str(prefix)]) == 0
    assert layout.config_path.read_text(encoding="utf-8") == "# edited by the operator\n"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = tmp_path / "novacron-agent.service"
    unit.write_text(
        render_unit(
            python=shutil.which("python3") or "/usr/bin/python3",
            config_path=Path("/etc/novacron/agent.yaml"),
            data_dir=Path("/var/lib/novacron"),
        ),
        encoding="utf-8",
    )
    ok, output = verify_unit(unit)
    assert ok, output


def test_uninstall_and_purge(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    assert main(["agent", "install", "--prefix", str(prefix)]) == 0
    layout = InstallLayout(prefix)
    assert main(["agent", "uninstall", "--prefix", str(prefix)]) == 0
    assert not layout.unit_path.exists()
    assert layout.config_path.exists()
    assert main(["agent", "uninstall", "--prefix", str(prefix), "--purge"]) == 0
    assert not layout.config_path.exists()
    assert not layout.data_dir.exists()
