"""The ``podman`` driver: workloads as Podman containers, through the Podman API.

podman-py is blocking, so every runtime call runs in a worker thread behind a
semaphore (:class:`~edge_agent.drivers.base.BlockingRunner`); calls for one workload
are serialised by a per-name lock.

Ownership: each container carries the labels ``io.novacron.owner=<agent id>``,
``io.novacron.workload=<name>`` and ``io.novacron.version=<spec version>``. A container
without this agent's owner label is never stopped, replaced or removed: ``inspect``
reports it as ``conflict`` and mutating calls raise
:class:`~edge_agent.drivers.WorkloadConflictError`.

Images are never pulled: a gateway may be offline and a pull may hang. ``apply``
checks local storage first and reports ``image not found: <ref>``.

Resource limits: ``spec.resources.cpu_millis`` becomes a CFS quota
(``cpu_millis * 100`` µs per 100 ms period) and ``memory_mb`` a memory limit. If the
runtime refuses them (a cgroup error at create or start, e.g. no usable cgroup
controllers or a limit below what the runtime accepts) and ``limits="best-effort"``,
the container is created again without limits, a warning is logged, the container
is labelled ``io.novacron.limits=skipped`` and ``inspect`` says so in ``reason``.
With ``limits="enforce"`` the refusal is a :class:`WorkloadStartError`.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import re
import socket
import threading
import urllib.parse
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal, ParamSpec, TypeVar

import podman
import podman.errors
import requests

from edge_agent.drivers._exceptions import (
    DriverError,
    DriverUnavailableError,
    ImageNotFoundError,
    WorkloadConflictError,
    WorkloadNotFoundError,
    WorkloadStartError,
)
from edge_agent.drivers.base import (
    LIMITS_LABEL,
    OWNER_LABEL,
    VERSION_LABEL,
    WORKLOAD_LABEL,
    ActualPhase,
    ActualState,
    BlockingRunner,
    DriverBase,
    DriverCapability,
    WorkloadHandle,
)
from sync.models import WorkloadSpec

logger = logging.getLogger(__name__)

DEFAULT_URL = "unix:///run/podman/podman.sock"
CPU_PERIOD_US = 100_000
_LIMIT_REFUSAL = re.compile(
    r"cgroup|memory limit|memory\.limit|cpu[ ._-]?(quota|period|cfs|shares|max)", re.IGNORECASE
)
_TIME_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?$")

LimitsMode = Literal["enforce", "best-effort"]

_P = ParamSpec("_P")
_T = TypeVar("_T")


class PodmanDriver(DriverBase):
    """Runs workloads as Podman containers owned by one agent.

    Args:
        owner: the agent id written into the owner label.
        url: the Podman API socket, e.g. ``unix:///run/podman/podman.sock``.
        stop_timeout_s: seconds a container gets to stop before SIGKILL.
        api_timeout_s: HTTP timeout of one API call (must exceed ``stop_timeout_s``).
        limits: ``"best-effort"`` falls back to no limits (with a warning) when the
            runtime refuses them; ``"enforce"`` fails the workload instead.
        max_concurrency: blocking API calls allowed at once.
    """

    def __init__(
        self,
        owner: str,
        *,
        url: str = DEFAULT_URL,
        stop_timeout_s: int = 10,
        api_timeout_s: float = 60.0,
        limits: LimitsMode = "best-effort",
        max_concurrency: int = 4,
    ) -> None:
        super().__init__()
        if api_timeout_s <= stop_timeout_s:
            raise ValueError("api_timeout_s must exceed stop_timeout_s")
        self.owner = owner
        self.url = url
        self.stop_timeout_s = stop_timeout_s
        self.api_timeout_s = api_timeout_s
        self.limits = limits
        self._runner = BlockingRunner(max_concurrency)
        self._client: podman.PodmanClient | None = None
        self._client_lock = threading.Lock()

    @property
    def name(self) -> str:
        """The driver name, ``"podman"``."""
        return "podman"

    async def aclose(self) -> None:
        """Close the API client (containers keep running)."""
        client, self._client = self._client, None
        if client is not None:
            await self._runner.run(client.close)

    async def probe(self) -> DriverCapability:
        """Ping the API service; unavailable with the reason when it does not answer."""
        try:
            version = await self._call("", self._version_sync)
        except DriverError as exc:
            return DriverCapability(available=False, reason=exc.reason)
        return DriverCapability(available=True, reason=f"podman {version} at {self.url}")

    async def apply(self, spec: WorkloadSpec) -> WorkloadHandle:
        """Create and start ``spec``'s container, replacing one of another version.

        Raises:
            WorkloadConflictError: a container of that name is not owned by this agent.
            ImageNotFoundError: the image is not in local storage.
            WorkloadStartError: the runtime refused to create or start it.
            DriverUnavailableError: the API service cannot be reached.
        """
        if spec.driver != "podman" or spec.image is None:
            raise DriverError("not a podman workload", driver=self.name, workload=spec.name)
        async with self._lock(spec.name):
            try:
                handle = await self._call(spec.name, self._apply_sync, spec)
            except WorkloadStartError as exc:
                self._note_failure(spec.name, spec.version, exc.reason)
                raise
            self._clear_failure(spec.name)
            return handle

    async def stop(self, name: str) -> None:
        """Stop an owned container (SIGTERM, ``stop_timeout_s``, SIGKILL).

        Raises:
            WorkloadNotFoundError: no container of that name.
            WorkloadConflictError: the container is not owned by this agent.
        """
        async with self._lock(name):
            await self._call(name, self._stop_sync, name)

    async def start(self, name: str) -> None:
        """Start an owned, stopped container.

        Raises:
            WorkloadNotFoundError: no container of that name.
            WorkloadConflictError: the container is not owned by this agent.
            WorkloadStartError: the runtime refused to start it.
        """
        async with self._lock(name):
            try:
                await self._call(name, self._start_sync, name)
            except WorkloadStartError as exc:
                self._note_failure(name, None, exc.reason)
                raise
            self._clear_failure(name)

    async def remove(self, name: str) -> None:
        """Stop and delete an owned container; no-op when missing.

        Raises:
            WorkloadConflictError: the container is not owned by this agent.
        """
        async with self._lock(name):
            await self._call(name, self._remove_sync, name)
            self._clear_failure(name)

    async def inspect(self, name: str) -> ActualState:
        """Observe one container (``conflict`` when it is not owned)."""
        state = await self._call(name, self._inspect_sync, name)
        if state.phase in ("missing", "exited"):
            return self._failed_state(name, state) or state
        return state

    async def list(self) -> list[ActualState]:
        """Observe every container this agent owns, plus workloads that failed to create."""
        return self._with_failures(await self._call("", self._list_sync))

    # -- async plumbing ----------------------------------------------------------

    async def _call(
        self, workload: str, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> _T:
        """Run a blocking helper in a thread; translate what podman-py raises."""
        try:
            return await self._runner.run(self._guarded, fn, *args, **kwargs)
        except DriverError:
            raise
        except podman.errors.APIError as exc:
            if exc.status_code is None:
                raise DriverUnavailableError(
                    f"podman API at {self.url} unreachable: {_cause(exc)}",
                    driver=self.name,
                    workload=workload,
                ) from exc
            raise DriverError(
                f"podman API error: {_explain(exc)}", driver=self.name, workload=workload
            ) from exc
        except (podman.errors.PodmanError, requests.RequestException, OSError) as exc:
            raise DriverUnavailableError(
                f"podman API at {self.url} unreachable: {exc}", driver=self.name, workload=workload
            ) from exc

    # -- blocking helpers (run in worker threads) -------------------------------

    def _guarded(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return fn(*args, **kwargs)
        except podman.errors.APIError as exc:
            if exc.status_code is None:  # connection-level failure: reconnect next time
                with self._client_lock:
                    client, self._client = self._client, None
                if client is not None:
                    client.close()  # type: ignore[no-untyped-call]
            raise

    def _client_sync(self) -> podman.PodmanClient:
        with self._client_lock:
            if self._client is None:
                self._check_socket()
                self._client = podman.PodmanClient(base_url=self.url, timeout=self.api_timeout_s)
            return self._client

    def _check_socket(self) -> None:
        """Connect to a unix socket once before handing it to podman-py.

        podman-py leaks the socket of a failed connection (a ``ResourceWarning`` at
        garbage collection), so an absent service is detected here, cleanly.
        """
        parsed = urllib.parse.urlparse(self.url)
        if parsed.scheme not in ("unix", "http+unix"):
            return
        path = urllib.parse.unquote(parsed.path if parsed.scheme == "unix" else parsed.netloc)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.api_timeout_s)
            try:
                sock.connect(path)
            except OSError as exc:
                raise DriverUnavailableError(
                    f"podman API at {self.url} unreachable: {exc.strerror or exc}",
                    driver=self.name,
                ) from exc

    def _version_sync(self) -> str:
        client = self._client_sync()
        if not client.ping():
            raise DriverUnavailableError(f"podman API at {self.url} did not answer ping")
        version = client.version()  # type: ignore[no-untyped-call]
        return str(version.get("Version", "?"))

    def _get_sync(self, name: str) -> Any | None:
        try:
            return self._client_sync().containers.get(name)
        except podman.errors.NotFound:
            return None

    def _owned(self, container: Any) -> bool:
        labels = _labels(container)
        return labels.get(OWNER_LABEL) == self.owner

    def _require_sync(self, name: str) -> Any:
        container = self._get_sync(name)
        if container is None:
            raise WorkloadNotFoundError("no such container", driver=self.name, workload=name)
        if not self._owned(container):
            raise self._conflict(name)
        return container

    def _conflict(self, name: str) -> WorkloadConflictError:
        return WorkloadConflictError(
            f"container {name!r} exists but is not owned by agent {self.owner!r}; left alone",
            driver=self.name,
            workload=name,
        )

    def _apply_sync(self, spec: WorkloadSpec) -> WorkloadHandle:
        container = self._get_sync(spec.name)
        if container is not None:
            if not self._owned(container):
                raise self._conflict(spec.name)
            if _labels(container).get(VERSION_LABEL) == spec.version:
                if _status(container) not in ("running", "paused"):
                    self._start_container(spec.name, container)
                return self._handle(spec, container, created=False)
            logger.info(
                "replacing container %s: version %s -> %s",
                spec.name,
                _labels(container).get(VERSION_LABEL),
                spec.version,
            )
            self._stop_and_remove(container)
        image = spec.image or ""
        if not self._client_sync().images.exists(image):
            raise ImageNotFoundError(image, driver=self.name, workload=spec.name)
        container = self._create_and_start(spec, with_limits=True)
        logger.info(
            "started container %s version %s (%s)", spec.name, spec.version, container.id[:12]
        )
        return self._handle(spec, container, created=True)

    def _create_and_start(self, spec: WorkloadSpec, *, with_limits: bool) -> Any:
        client = self._client_sync()
        labels = {
            OWNER_LABEL: self.owner,
            WORKLOAD_LABEL: spec.name,
            VERSION_LABEL: spec.version,
            LIMITS_LABEL: "applied" if with_limits else "skipped",
        }
        kwargs: dict[str, Any] = {
            "name": spec.name,
            "labels": labels,
            "environment": dict(spec.env),
            "stdin_open": False,
            "tty": False,
        }
        if spec.command:
            kwargs["command"] = list(spec.command)
        if spec.working_dir:
            kwargs["working_dir"] = spec.working_dir
        if with_limits:
            kwargs["cpu_period"] = CPU_PERIOD_US
            kwargs["cpu_quota"] = max(1000, spec.resources.cpu_millis * CPU_PERIOD_US // 1000)
            kwargs["mem_limit"] = spec.resources.memory_mb * 1024 * 1024
        try:
            container = client.containers.create(spec.image or "", **kwargs)
        except podman.errors.APIError as exc:
            if exc.status_code is None:
                raise
            if self._get_sync(spec.name) is not None and "in use" in _explain(exc):
                raise self._conflict(spec.name) from exc
            if with_limits and self._limits_refused(spec.name, exc):
                return self._create_and_start(spec, with_limits=False)
            raise WorkloadStartError(
                f"create failed: {_explain(exc)}", driver=self.name, workload=spec.name
            ) from exc
        try:
            container.start()
        except podman.errors.APIError as exc:
            if exc.status_code is None:
                raise
            container.remove(force=True, v=True)  # a created-only container helps no one
            if with_limits and self._limits_refused(spec.name, exc):
                return self._create_and_start(spec, with_limits=False)
            raise WorkloadStartError(
                f"start failed: {_explain(exc)}", driver=self.name, workload=spec.name
            ) from exc
        container.reload()
        return container

    def _limits_refused(self, name: str, exc: podman.errors.APIError) -> bool:
        message = _explain(exc)
        if self.limits != "best-effort" or not _LIMIT_REFUSAL.search(message):
            return False
        logger.warning(
            "runtime refused resource limits for container %s, running it without: %s",
            name,
            message,
        )
        return True

    def _start_container(self, name: str, container: Any) -> None:
        try:
            container.start()
        except podman.errors.APIError as exc:
            if exc.status_code is None:
                raise
            raise WorkloadStartError(
                f"start failed: {_explain(exc)}", driver=self.name, workload=name
            ) from exc
        logger.info("started container %s", name)

    def _stop_and_remove(self, container: Any) -> None:
        if _status(container) in ("running", "paused", "stopping"):
            container.stop(timeout=self.stop_timeout_s, ignore=True)
        with contextlib.suppress(podman.errors.NotFound):
            container.remove(force=True, v=True)

    def _stop_sync(self, name: str) -> None:
        container = self._require_sync(name)
        if _status(container) in ("running", "paused", "stopping"):
            container.stop(timeout=self.stop_timeout_s, ignore=True)
            logger.info("stopped container %s", name)

    def _start_sync(self, name: str) -> None:
        container = self._require_sync(name)
        if _status(container) not in ("running", "paused"):
            self._start_container(name, container)

    def _remove_sync(self, name: str) -> None:
        container = self._get_sync(name)
        if container is None:
            return
        if not self._owned(container):
            raise self._conflict(name)
        self._stop_and_remove(container)
        logger.info("removed container %s", name)

    def _inspect_sync(self, name: str) -> ActualState:
        container = self._get_sync(name)
        if container is None:
            return ActualState(name=name, driver=self.name, phase="missing")
        if not self._owned(container):
            return ActualState(
                name=name,
                driver=self.name,
                phase="conflict",
                reason=str(self._conflict(name).reason),
                runtime_id=str(container.id),
            )
        return self._state(name, container)

    def _list_sync(self) -> builtins.list[ActualState]:
        client = self._client_sync()
        listed = client.containers.list(all=True, filters={"label": f"{OWNER_LABEL}={self.owner}"})
        states = []
        for summary in listed:
            try:
                container = client.containers.get(summary.id)
            except podman.errors.NotFound:
                continue  # removed meanwhile
            if not self._owned(container):
                continue
            labels = _labels(container)
            states.append(self._state(labels.get(WORKLOAD_LABEL) or container.name, container))
        return states

    def _handle(self, spec: WorkloadSpec, container: Any, *, created: bool) -> WorkloadHandle:
        return WorkloadHandle(
            name=spec.name,
            driver=self.name,
            runtime_id=str(container.id),
            version=spec.version,
            created=created,
        )

    def _state(self, name: str, container: Any) -> ActualState:
        attrs: dict[str, Any] = container.attrs
        state: dict[str, Any] = attrs.get("State") or {}
        labels = _labels(container)
        status = str(state.get("Status", "")).lower()
        error = str(state.get("Error") or "")
        exit_code = state.get("ExitCode")
        notes: list[str] = []
        phase: ActualPhase
        if status in ("running", "paused", "stopping"):
            phase = "running"
            if status != "running":
                notes.append(status)
        elif status in ("exited", "stopped", "created", "configured", "initialized"):
            phase = "failed" if error else "exited"
            if error:
                notes.append(error)
            elif status in ("created", "configured", "initialized"):
                notes.append("created, not started")
                exit_code = None
            else:
                notes.append(f"exited with code {exit_code}")
            if state.get("OOMKilled"):
                notes.append("out of memory")
        else:
            phase = "failed"
            notes.append(f"container state {status or 'unknown'}")
        if labels.get(LIMITS_LABEL) == "skipped":
            notes.append("resource limits not enforced (runtime refused them)")
        return ActualState(
            name=name,
            driver=self.name,
            phase=phase,
            version=labels.get(VERSION_LABEL),
            exit_code=int(exit_code) if phase == "exited" and exit_code is not None else None,
            reason="; ".join(notes),
            started_at=_parse_time(state.get("StartedAt")),
            finished_at=_parse_time(state.get("FinishedAt")),
            runtime_id=str(container.id),
        )


def _now() -> datetime:
    return datetime.now(UTC)


def _labels(container: Any) -> dict[str, str]:
    config = container.attrs.get("Config") or {}
    labels = config.get("Labels") or container.attrs.get("Labels") or {}
    return {str(k): str(v) for k, v in labels.items()}


def _status(container: Any) -> str:
    return str((container.attrs.get("State") or {}).get("Status", "")).lower()


def _explain(exc: podman.errors.APIError) -> str:
    return str(exc.explanation or exc)


def _cause(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    return str(cause) if cause is not None else str(exc)


def _parse_time(value: object) -> datetime | None:
    """Parse Podman's RFC 3339 times (nanoseconds); the zero time means never."""
    if not isinstance(value, str):
        return None
    match = _TIME_RE.match(value.strip())
    if match is None:
        return None
    base, fraction, zone = match.groups()
    if base.startswith("0001-"):
        return None
    micro = (fraction or ".0")[1:7].ljust(6, "0")
    offset = "+00:00" if zone in (None, "Z") else zone
    return datetime.fromisoformat(f"{base}.{micro}{offset}").astimezone(UTC)
