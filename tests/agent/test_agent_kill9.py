"""kill -9 of a whole agent while it appends events: nothing acknowledged is lost.

Acceptance: "kill -9 of the agent while it appends 10,000 events: after restart every
event whose append returned is present exactly once, and integrity_check is ok."

The agent runs in a child process (a real ``Agent``, offline: the relay port is
closed and there is no ``hub.pub``), prints ``<i> <seq>`` after each
``record_event`` returned, and is SIGKILLed part-way. Everything it printed was
acknowledged as durable, so it must all be in the journal afterwards.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
import sqlite3
import sys
import textwrap
from pathlib import Path

from edge_agent.agent import EVENTS_STREAM, Agent
from edge_agent.config import AgentConfig
from edge_agent.journal import Journal
from sync.envelope import unpackb_strict
from tests.agent.agent_harness import make_config

TOTAL = 10_000
KILL_AFTER = 2_000
KIND = "test"
# Hang guards (not timing assertions): a wedged child or agent fails the test.
CHILD_TIMEOUT_S = 180.0
AGENT_TIMEOUT_S = 60.0

_CHILD = textwrap.dedent(
    """
    import asyncio
    import sys
    from pathlib import Path

    from edge_agent.agent import Agent
    from edge_agent.config import AgentConfig
    from firmware_profiles import load_profile


    async def main(config_path: str, stream: str, kind: str, total: int) -> None:
        config = AgentConfig.model_validate_json(Path(config_path).read_text())
        async with Agent(config, load_profile(config.profile)) as agent:
            print("ready", flush=True)
            for i in range(total):
                seq = await agent.record_event(stream, kind, {"i": i})
                sys.stdout.write(f"{i} {seq}\\n")
                sys.stdout.flush()
        print("done", flush=True)


    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
    """
)


async def _run_and_kill(config: AgentConfig, workdir: Path) -> dict[int, int]:
    """Run the agent child, SIGKILL it after ``KILL_AFTER`` acknowledged appends.

    Returns:
        ``{seq: i}`` for every append the child reported as returned.
    """
    script = workdir / "agent_child.py"
    script.write_text(_CHILD)
    config_path = workdir / "agent.json"
    config_path.write_text(config.model_dump_json())
    stderr_path = workdir / "agent_child.stderr"
    printed: dict[int, int] = {}
    with stderr_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            str(config_path),
            EVENTS_STREAM,
            KIND,
            str(TOTAL),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(CHILD_TIMEOUT_S):
                first = await proc.stdout.readline()
                assert first == b"ready\n", (first, stderr_path.read_text())
                while len(printed) < KILL_AFTER:
                    line = await proc.stdout.readline()
                    assert line.endswith(b"\n"), ("child ended early", stderr_path.read_text())
                    _take(line, printed)
                proc.send_signal(signal.SIGKILL)
                # Lines written before the kill are still in the pipe: they count too.
                # A line cut short (no newline) was never fully reported; ignore it.
                while line := await proc.stdout.readline():
                    if line.endswith(b"\n"):
                        _take(line, printed)
                returncode = await proc.wait()
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
    assert returncode == -signal.SIGKILL, "the child finished before it was killed"
    return printed


def _take(line: bytes, printed: dict[int, int]) -> None:
    i_text, seq_text = line.split()
    i, seq = int(i_text), int(seq_text)
    assert seq not in printed, f"seq {seq} returned twice"
    printed[seq] = i


async def test_kill9_while_appending_loses_no_acknowledged_event(tmp_path: Path) -> None:
    config, profile = make_config(tmp_path / "agent")  # offline: closed port, no hub.pub
    printed = await _run_and_kill(config, tmp_path)
    assert len(printed) >= KILL_AFTER
    assert len(set(printed.values())) == len(printed)
    seqs = sorted(printed)
    assert [printed[s] for s in seqs] == sorted(printed.values())  # seqs follow the order

    # The journal as the next agent finds it.
    journal_path = config.data_dir / "journal.db"
    quota = config.quotas.journal_quota_mb * 1024 * 1024
    async with asyncio.timeout(AGENT_TIMEOUT_S):
        async with Journal.open(journal_path, quota_bytes=quota) as journal:
            assert journal.quarantined_path is None
            events = await journal.read_events(EVENTS_STREAM, limit=TOTAL + 1)
    by_seq = {e.seq: e for e in events}
    assert len(by_seq) == len(events)
    found: collections.Counter[int] = collections.Counter()
    for event in events:
        assert event.kind == KIND
        payload = unpackb_strict(event.payload)
        assert isinstance(payload, dict)
        found[payload["i"]] += 1
    for seq, i in printed.items():
        assert seq in by_seq, f"acknowledged event {i} (seq {seq}) lost"
        assert unpackb_strict(by_seq[seq].payload) == {"i": i}
        assert found[i] == 1, f"event {i} stored {found[i]} times"
    last_held = max(by_seq)

    conn = sqlite3.connect(journal_path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()

    # A fresh agent on the same config starts and carries on after every printed seq.
    async with asyncio.timeout(AGENT_TIMEOUT_S):
        async with Agent(config, profile) as agent:
            assert agent.journal.quarantined_path is None
            # The unacknowledged events are back in the upstream send window, once each.
            window = agent.replica.streams[EVENTS_STREAM]
            start, items = window.read(1, TOTAL + 1)
            assert (start, len(items)) == (min(by_seq), len(by_seq))
            for seq, i in printed.items():
                item = items[seq - start]
                assert item[0] == KIND and unpackb_strict(item[2]) == {"i": i}
            seq = await agent.record_event(EVENTS_STREAM, KIND, {"i": "after restart"})
    assert seq > max(printed)
    assert seq > last_held
