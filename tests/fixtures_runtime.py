"""Real container and VM runtimes for the driver tests (no mocks).

``podman_service`` (session scope) starts a private Podman API service:

* a generated ``containers.conf`` (runc, lowered default ulimits because the sandbox
  has no CAP_SYS_RESOURCE, a private ``tmp_dir``) and ``storage.conf`` (vfs driver,
  graphroot and runroot under pytest's tmp dir) pointed to by ``CONTAINERS_CONF`` and
  ``CONTAINERS_STORAGE_CONF``, so nothing touches the machine's own Podman storage;
* a busybox image built locally (there is no registry): a rootfs holding the static
  ``busybox`` binary and applet symlinks, imported with ``podman import`` as
  ``localhost/nc-busybox:test``;
* ``podman system service --time=0 unix://<tmp>/podman.sock``, polled until it
  answers a ping.

Teardown force-removes every container of the private storage and stops the service
(SIGTERM, then SIGKILL). Tests skip only when ``podman`` or ``busybox`` is absent.

``libvirt_uri`` gives ``test:///default`` (state private to each connection) and
skips when libvirt-python is not installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import podman
import pytest

BUSYBOX_IMAGE = "localhost/nc-busybox:test"
_APPLETS = ("sh", "sleep", "echo", "cat", "true", "false", "ls", "env", "pwd", "kill")
_READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class PodmanService:
    """A private Podman API service for the test session.

    Attributes:
        url: API socket URL for podman-py (``unix:///...``).
        env: environment for ``podman`` CLI calls against the same storage.
        image: the locally built busybox image reference.
        root: directory holding configs, storage and the socket.
    """

    url: str
    env: dict[str, str]
    image: str
    root: Path

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``podman <args>`` against the private storage."""
        return subprocess.run(
            ["podman", *args],
            env=self.env,
            check=check,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def remove_owned(self, owner: str) -> None:
        """Force-remove every container labelled as owned by ``owner``."""
        ids = self.cli(
            "ps", "-aq", "--filter", f"label=io.novacron.owner={owner}", check=False
        ).stdout.split()
        if ids:
            self.cli("rm", "-f", "-t", "0", *ids, check=False)


def _find_busybox() -> Path | None:
    for candidate in (shutil.which("busybox"), "/bin/busybox", "/usr/bin/busybox"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def _write_configs(root: Path) -> dict[str, str]:
    (root / "tmp").mkdir()
    containers_conf = root / "containers.conf"
    containers_conf.write_text(
        "[containers]\n"
        'default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
        f'tmp_dir = "{root / "tmp"}"\n'
    )
    storage_conf = root / "storage.conf"
    storage_conf.write_text(
        f'[storage]\ndriver = "vfs"\ngraphroot = "{root / "graph"}"\nrunroot = "{root / "run"}"\n'
    )
    env = dict(os.environ)
    env["CONTAINERS_CONF"] = str(containers_conf)
    env["CONTAINERS_STORAGE_CONF"] = str(storage_conf)
    return env


def _build_image_tar(root: Path, busybox: Path) -> Path:
    rootfs = root / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "tmp").mkdir()
    shutil.copy2(busybox, rootfs / "bin" / "busybox")
    for applet in _APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    tar_path = root / "rootfs.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(rootfs, arcname=".")
    return tar_path


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"podman system service exited early:\n{log.read_text()}")
        # Probe with a plain socket first: podman-py leaks the socket of a failed connect.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(url.removeprefix("unix://"))
            except OSError:
                time.sleep(0.1)
                continue
        with podman.PodmanClient(base_url=url, timeout=5) as client:
            if client.ping():
                return
        time.sleep(0.1)
    pytest.fail(f"podman system service not ready after {_READY_TIMEOUT_S}s:\n{log.read_text()}")


@pytest.fixture(scope="session")
def podman_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodmanService]:
    """A private Podman API service with the busybox test image (session scope)."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (apt-get install podman runc)")
    busybox = _find_busybox()
    if busybox is None:
        pytest.skip("busybox is not installed (apt-get install busybox-static)")
    root = tmp_path_factory.mktemp("podman")
    env = _write_configs(root)
    socket_path = root / "podman.sock"
    url = f"unix://{socket_path}"
    service = PodmanService(url=url, env=env, image=BUSYBOX_IMAGE, root=root)
    service.cli("import", str(_build_image_tar(root, busybox)), BUSYBOX_IMAGE)
    log = root / "service.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            ["podman", "system", "service", "--time=0", url],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_ready(url, process, log)
        yield service
    finally:
        service.cli("rm", "-a", "-f", "-t", "0", check=False)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)


@pytest.fixture
def podman_owner(podman_service: PodmanService) -> Iterator[str]:
    """A fresh agent id; its containers are force-removed after the test."""
    owner = f"agent-{uuid.uuid4().hex[:8]}"
    try:
        yield owner
    finally:
        podman_service.remove_owned(owner)


@pytest.fixture
def libvirt_uri() -> str:
    """``test:///default``; skips when libvirt-python is not installed."""
    if importlib.util.find_spec("libvirt") is None:
        pytest.skip("libvirt-python is not installed (pip install novacron-edge[libvirt])")
    return "test:///default"
