"""novacron._lazy.defer_import: a module in sys.modules whose code runs at its first use.

Made-up modules in a temporary directory count their own runs, so each test
sees exactly when (and how often) a deferred module's code ran.
"""

from __future__ import annotations

import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from novacron._lazy import defer_import

HEAVY = """\
import sys
import time
sys.heavy_runs = getattr(sys, "heavy_runs", 0) + 1
time.sleep(SLEEP)
VALUE = 42
def name():
    return "real"
"""


def _runs() -> int:
    return getattr(sys, "heavy_runs", 0)


@pytest.fixture
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``heavy`` (counts its runs), ``user`` (imports it, as a library would)
    and package ``pkgx`` with submodule ``mod``, importable for one test."""
    (tmp_path / "heavy.py").write_text(HEAVY.replace("SLEEP", "0.0"))
    (tmp_path / "slow_heavy.py").write_text(HEAVY.replace("SLEEP", "0.2"))
    (tmp_path / "user.py").write_text("import heavy\n\ndef use():\n    return heavy.VALUE\n")
    (tmp_path / "pkgx").mkdir()
    (tmp_path / "pkgx" / "__init__.py").write_text("")
    (tmp_path / "pkgx" / "mod.py").write_text(HEAVY.replace("SLEEP", "0.0"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "heavy_runs", 0, raising=False)
    yield tmp_path
    for name in ("heavy", "slow_heavy", "user", "pkgx", "pkgx.mod"):
        sys.modules.pop(name, None)


def test_an_import_statement_binds_a_deferred_module_without_running_it(modules: Path) -> None:
    assert defer_import("heavy")
    import user  # type: ignore[import-not-found]

    assert _runs() == 0
    assert isinstance(user.heavy, types.ModuleType)
    assert user.heavy.__spec__ is not None and user.heavy.__spec__.name == "heavy"
    assert _runs() == 0, "reading the module's spec ran it"
    assert user.use() == 42
    assert _runs() == 1
    assert type(sys.modules["heavy"]) is types.ModuleType  # an ordinary module from now on
    assert user.use() == 42
    assert _runs() == 1


def test_provided_names_answer_until_the_module_runs(modules: Path) -> None:
    assert defer_import("heavy", provides={"name": lambda: "stand-in"})
    from heavy import name  # type: ignore[import-not-found]

    assert name() == "stand-in"
    assert _runs() == 0
    import heavy

    assert heavy.VALUE == 42  # a name it lacked: the module runs
    assert _runs() == 1
    assert heavy.name() == "real"


def test_a_deferred_submodule_is_its_package_s_attribute(modules: Path) -> None:
    assert defer_import("pkgx.mod")
    import pkgx.mod  # type: ignore[import-not-found]
    from pkgx import mod

    assert mod is pkgx.mod is sys.modules["pkgx.mod"]
    assert _runs() == 0
    from pkgx.mod import VALUE

    assert VALUE == 42
    assert _runs() == 1


def test_concurrent_first_uses_run_the_module_once(modules: Path) -> None:
    assert defer_import("slow_heavy")
    import slow_heavy  # type: ignore[import-not-found]

    start = threading.Barrier(4)
    seen: list[int] = []

    def use() -> None:
        start.wait()
        seen.append(slow_heavy.VALUE)

    threads = [threading.Thread(target=use) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert seen == [42] * 4
    assert _runs() == 1


def test_an_imported_or_missing_module_is_not_deferred(modules: Path) -> None:
    import heavy

    assert not defer_import("heavy")
    assert heavy.VALUE == 42
    assert not defer_import("no_such_module_anywhere")
    assert not defer_import("no_such_package_anywhere.mod")
    assert "no_such_module_anywhere" not in sys.modules
