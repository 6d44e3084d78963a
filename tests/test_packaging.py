"""The wheel ``pip install .`` builds holds every module and data file of the tree.

An editable install (the dev venv, CI) imports from the checkout and hides a
package list that misses a subpackage; a gateway installs the wheel. This
builds that wheel (offline: ``--no-build-isolation``, setuptools from the dev
extras) from a copy of the sources and compares its contents with the tree.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.test_public_api import PACKAGES

REPO = Path(__file__).resolve().parents[1]


def _tree_files() -> set[str]:
    files: set[str] = set()
    for package in PACKAGES:
        for path in (REPO / package).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                files.add(path.relative_to(REPO).as_posix())
    return files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for package in PACKAGES:
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (built,) = out.glob("novacron_edge-*.whl")
    return built


def test_the_wheel_holds_every_module_and_data_file(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        wheel_names = set(zf.namelist())
    tree = _tree_files()
    assert "edge_agent/drivers/process.py" in tree  # a subpackage: the case that broke
    missing = sorted(tree - wheel_names)
    assert not missing, f"not in the wheel: {missing}"


def test_the_wheel_declares_the_console_script(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
        entry_points = zf.read(name).decode()
    assert "novacron = novacron.cli:run" in entry_points.splitlines()
