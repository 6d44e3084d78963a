"""A real Mosquitto broker per test, on a free loopback port, that can be killed.

Tests use :class:`MosquittoBroker` to cut and restore the network the way a
gateway sees it: ``kill()`` is SIGKILL (no clean disconnect, no persistence
flush beyond what Mosquitto already wrote), ``start()`` brings it back on the
same port with the same persistence directory.

:func:`relay_broker` builds one from the configuration we ship for relay hosts
(``examples/mosquitto/relay.conf`` and ``relay.acl``), with accounts made by
``mosquitto_passwd``: the relay tests run against exactly that configuration.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "mosquitto"
RELAY_CONF = EXAMPLES / "relay.conf"
RELAY_ACL = EXAMPLES / "relay.acl"


def _stay_user() -> str:
    """As root, Mosquitto switches to the 'mosquitto' user, which cannot write the
    test's persistence directory or log: keep the test's user."""
    return f"user {getpass.getuser()}\n" if os.geteuid() == 0 else ""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MosquittoBroker:
    """One Mosquitto process on 127.0.0.1:``port`` with its own persistence dir."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        extra_conf: str = "",
        *,
        conf_text: str | None = None,
    ) -> None:
        """Write the broker's config; :meth:`start` runs it.

        Args:
            workdir: directory for the config, log and persistence.
            port: the loopback port (default: a free one).
            extra_conf: lines appended to the default test config.
            conf_text: a complete config to use instead of the default one (it
                must listen on :attr:`port`; see :func:`relay_broker`).
        """
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        if conf_text is not None:
            self.conf_path.write_text(conf_text + extra_conf, encoding="utf-8")
            return
        self.conf_path.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {workdir}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 100000\n"
            "max_inflight_messages 100\n"
            "message_size_limit 1048576\n"
            f"log_dest file {self.log_path}\n"
            "log_type error\nlog_type warning\nlog_type notice\n" + _stay_user() + extra_conf,
            encoding="ascii",
        )

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT``."""
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        """Start the broker and wait until it accepts TCP connections."""
        if self.proc is not None and self.proc.poll() is None:
            return
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {log}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout}s")

    def kill(self) -> None:
        """SIGKILL the broker (an abrupt network loss for every client)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def reload(self) -> None:
        """SIGHUP the broker: it reloads its password and ACL files."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        """Terminate the broker cleanly."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A started Mosquitto broker on a free port, stopped after the test."""
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto is not installed (CI installs it)")
    broker = MosquittoBroker(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def write_password_file(path: Path, users: Mapping[str, str]) -> None:
    """Write a Mosquitto password file for ``users`` (name -> password).

    Plain ``name:password`` lines hashed in place by ``mosquitto_passwd -U``,
    one process for any number of accounts.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{name}:{pw}\n" for name, pw in users.items()), encoding="utf-8")
    path.chmod(0o600)
    subprocess.run([MOSQUITTO_PASSWD, "-U", str(path)], check=True, capture_output=True)


def relay_broker_conf(
    workdir: Path, port: int, *, password_file: Path, acl_file: Path, log_path: Path
) -> str:
    """``examples/mosquitto/relay.conf`` adapted to a test: loopback port, paths.

    Only the deployment-specific lines change (listener, persistence location,
    password and ACL files, log destination); every limit stays as shipped.
    """
    replacements = {
        "listener": f"listener {port} 127.0.0.1",
        "persistence_location": f"persistence_location {workdir}/",
        "password_file": f"password_file {password_file}",
        "acl_file": f"acl_file {acl_file}",
        "log_dest": f"log_dest file {log_path}",
    }
    seen: set[str] = set()
    lines = []
    for line in RELAY_CONF.read_text(encoding="utf-8").splitlines():
        match = re.match(r"(\w+)\s", line)
        key = match.group(1) if match else ""
        if key not in replacements:
            lines.append(line)
            continue
        if key in seen:
            raise ValueError(f"relay.conf sets {key} twice; the test helper expects once")
        seen.add(key)
        lines.append(replacements[key])
    missing = set(replacements) - seen
    if missing:
        raise ValueError(f"relay.conf lacks {sorted(missing)}")
    lines.append(_stay_user())
    return "\n".join(lines) + "\n"


def relay_broker(
    workdir: Path, users: Mapping[str, str], *, port: int | None = None
) -> MosquittoBroker:
    """A (not yet started) broker with the relay host configuration we ship.

    Args:
        workdir: directory for config, accounts, ACL, log and persistence.
        users: accounts to create, name -> password: device ids, ``relay``,
            ``hub``. Add more later with :func:`write_password_file` on
            ``workdir / "passwd"`` followed by :meth:`MosquittoBroker.reload`.
        port: the loopback port (default: a free one).

    Returns:
        The broker; call ``start()`` and ``stop()``.
    """
    if not Path(MOSQUITTO).exists() or not Path(MOSQUITTO_PASSWD).exists():
        pytest.skip("mosquitto and mosquitto_passwd are not installed (CI installs them)")
    workdir.mkdir(parents=True, exist_ok=True)
    password_file = workdir / "passwd"
    write_password_file(password_file, users)
    acl_file = workdir / "relay.acl"
    shutil.copyfile(RELAY_ACL, acl_file)
    port = port or free_port()
    conf = relay_broker_conf(
        workdir,
        port,
        password_file=password_file,
        acl_file=acl_file,
        log_path=workdir / "mosquitto.log",
    )
    return MosquittoBroker(workdir, port, conf_text=conf)
