"""Helpers for crash tests of the SQLite stores (the agent's journal, the relay's outbox)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(_REPO)}


def run_python(source: str, *args: str) -> str:
    """Run ``source`` in a fresh interpreter (the repo importable) and return its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", source, *args],
        capture_output=True,
        text=True,
        env=_child_env(),
        check=True,
        timeout=120,
    )
    return done.stdout


_LAZY_IMPORT_CHILD = """
import asyncio
import sys

{imports}


async def main(path: str) -> None:
{body}
    print("sqlite_utils" in sys.modules)


asyncio.run(main(sys.argv[1]))
"""


def imports_sqlite_utils(imports: str, body: str, db_path: Path) -> bool:
    """Run ``body`` (the inside of ``async def main(path)``) in a fresh interpreter.

    Returns:
        Whether sqlite-utils had been imported when ``body`` returned.
    """
    source = _LAZY_IMPORT_CHILD.format(
        imports=textwrap.dedent(imports), body=textwrap.indent(textwrap.dedent(body), "    ")
    )
    out = run_python(source, str(db_path)).split()
    assert out in (["True"], ["False"]), out
    return out == ["True"]


def sigkill_mid_stream(source: str, db_path: Path, *, at_least: int) -> list[int]:
    """Run a child that writes durably, SIGKILL it mid-stream, return what it acknowledged.

    The child (``source``, written next to ``db_path`` and run as
    ``python child.py db_path``) prints ``ready``, then one integer per line,
    each only after the write it names returned (was durable). The child is
    killed once ``at_least`` lines were read; lines already in the pipe at the
    kill are collected too.

    Returns:
        The integers printed, asserted to be ``1..n`` in order with
        ``n >= at_least`` and the child to have died of SIGKILL.
    """
    script = db_path.with_name("child.py")
    script.write_text(source)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(db_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=_child_env(),
    )
    assert proc.stdout is not None
    printed: list[int] = []
    try:
        assert proc.stdout.readline().strip() == "ready"
        while len(printed) < at_least:
            line = proc.stdout.readline()
            if not line:
                break
            printed.append(int(line))
        os.kill(proc.pid, signal.SIGKILL)
        # Lines already written before the kill are still in the pipe.
        printed.extend(int(line) for line in proc.stdout if line.strip())
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert len(printed) >= at_least and printed == list(range(1, len(printed) + 1))
    return printed
