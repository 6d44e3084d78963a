"""``novacron hub``: serve as a process, tokens on the host, bad config exit 2."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloud_hub.audit import AuditLog
from novacron.cli import main
from tests.fixtures_mqtt import free_port


def _novacron(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "novacron", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_token_create_list_revoke_are_audited(tmp_path: Path) -> None:
    made = _novacron(
        "hub", "token", "create", "--data-dir", str(tmp_path), "--name", "ops", "--role", "admin"
    )
    assert made.returncode == 0, made.stderr
    raw = made.stdout.strip()
    assert raw.startswith("nct_")
    listed = _novacron("hub", "token", "list", "--data-dir", str(tmp_path), "--json")
    [info] = json.loads(listed.stdout)
    assert info["name"] == "ops" and info["role"] == "admin"
    assert raw not in listed.stdout  # never the secret
    revoked = _novacron("hub", "token", "revoke", "--data-dir", str(tmp_path), info["id"])
    assert revoked.returncode == 0, revoked.stderr
    log = AuditLog.open(tmp_path / "audit.db")
    try:
        actions = [e.action for e in log.entries()]
        assert log.verify().ok
    finally:
        log.close()
    assert actions == ["cli token create", "cli token revoke"]


def test_device_token_needs_a_device(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["hub", "token", "create", "--data-dir", str(tmp_path), "--name", "d", "--role", "device"]
    )
    assert code == 2
    assert "--device" in capsys.readouterr().err


def test_bad_config_exits_2_naming_file_and_field(tmp_path: Path) -> None:
    config = tmp_path / "hub.yaml"
    config.write_text("listen: 127.0.0.1:8090\nmax_body_bytes: 1\n")
    done = _novacron("hub", "serve", "--config", str(config))
    assert done.returncode == 2
    assert str(config) in done.stderr and "max_body_bytes" in done.stderr
    done = _novacron("hub", "serve", "--listen", "nowhere")
    assert done.returncode == 2 and "--listen" in done.stderr


def test_serve_answers_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "novacron",
            "hub",
            "serve",
            "--data-dir",
            str(tmp_path),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            # Not urlopen: when the starting hub accepts but does not answer
            # within the timeout, urlopen raises and leaves its socket to the GC
            # (a ResourceWarning in whichever later test collects it).
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            try:
                conn.request("GET", "/healthz")
                assert json.loads(conn.getresponse().read())["status"] == "ok"
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the hub did not answer"
                time.sleep(0.1)
            finally:
                conn.close()
        assert (tmp_path / "hub.pub").exists() and (tmp_path / "hub.db").exists()
        assert (tmp_path / "hub.key").stat().st_mode & 0o077 == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"http://127.0.0.1:{port}" in out
