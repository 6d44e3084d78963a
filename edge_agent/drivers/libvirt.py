"""The ``libvirt`` driver: workloads as libvirt domains (virtual machines).

libvirt-python is optional (``pip install novacron-edge[libvirt]``) and imported
lazily: without it, :meth:`LibvirtDriver.probe` reports the driver unavailable with
the reason and nothing else breaks. Its calls block, so they run in worker threads
behind a semaphore. The driver keeps one connection for its lifetime (the
``test:///default`` driver keeps its state per connection).

Domains come from the spec: ``domain_xml`` when given (its ``<name>`` must be absent
or equal to the workload name), else a domain generated from ``memory_mb``, vCPUs
(``cpu_millis`` rounded up to whole CPUs) and ``disk_image``. Ownership lives in the
domain's ``<metadata>``: a ``<novacron:workload>`` element in the
:data:`METADATA_NS` namespace carrying ``owner``, ``name`` and ``version``. A domain
without this agent's owner element is never touched.

VMs have no exit code: a domain that was shut down or destroyed is ``exited`` with
the reason; one that crashed or failed is ``failed``. Start times are known only for
domains this driver instance started.
"""

from __future__ import annotations

import asyncio
import builtins
import importlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from edge_agent.drivers._exceptions import (
    DriverError,
    DriverUnavailableError,
    WorkloadConflictError,
    WorkloadNotFoundError,
    WorkloadStartError,
)
from edge_agent.drivers.base import (
    ActualPhase,
    ActualState,
    BlockingRunner,
    DriverBase,
    DriverCapability,
    WorkloadHandle,
    vcpus_for,
)
from sync.models import WorkloadSpec

if TYPE_CHECKING:
    import xml.etree.ElementTree as ET

logger = logging.getLogger(__name__)

METADATA_NS = "https://novacron.dev/xmlns/workload/1"
METADATA_PREFIX = "novacron"
DEFAULT_URI = "qemu:///system"

# libvirt constants, copied so that the module works without libvirt-python.
_PAUSED, _SHUTDOWN = 3, 4  # virDomainState values used by name below
_SHUTOFF_REASONS = {
    0: "shut off",
    1: "shut down",
    2: "destroyed",
    3: "crashed",
    4: "migrated",
    5: "saved",
    6: "failed to start",
    7: "restored from snapshot",
    8: "daemon down",
}
_ERR_NO_SUPPORT, _ERR_INVALID_ARG, _ERR_NO_DOMAIN, _ERR_NO_METADATA = 3, 8, 42, 80
_METADATA_ELEMENT = 2  # VIR_DOMAIN_METADATA_ELEMENT
_UNDEFINE_FLAGS = 1 | 2 | 4  # MANAGED_SAVE | SNAPSHOTS_METADATA | NVRAM

_P = ParamSpec("_P")
_T = TypeVar("_T")


class LibvirtDriver(DriverBase):
    """Runs workloads as libvirt domains owned by one agent.

    Args:
        owner: the agent id written into the domain metadata.
        uri: libvirt connection URI (``test:///default`` in tests).
        domain_type: ``<domain type=...>`` of generated domains (``kvm``, ``qemu``,
            ``test``).
        shutdown_timeout_s: time a guest gets to shut down before it is destroyed.
        max_concurrency: blocking libvirt calls allowed at once.
        poll_interval_s: how often a shutdown is polled.
    """

    def __init__(
        self,
        owner: str,
        *,
        uri: str = DEFAULT_URI,
        domain_type: str = "kvm",
        shutdown_timeout_s: float = 30.0,
        max_concurrency: int = 2,
        poll_interval_s: float = 0.2,
    ) -> None:
        super().__init__()
        self.owner = owner
        self.uri = uri
        self.domain_type = domain_type
        self.shutdown_timeout_s = shutdown_timeout_s
        self.poll_interval_s = poll_interval_s
        self._runner = BlockingRunner(max_concurrency)
        self._module: Any = None
        self._conn: Any = None
        self._started: dict[str, datetime] = {}

    @property
    def name(self) -> str:
        """The driver name, ``"libvirt"``."""
        return "libvirt"

    async def aclose(self) -> None:
        """Close the libvirt connection (domains keep running)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._runner.run(conn.close)

    async def probe(self) -> DriverCapability:
        """Import libvirt-python and open the connection; never raises."""
        try:
            description = await self._call("", self._describe_sync)
        except DriverError as exc:
            return DriverCapability(available=False, reason=exc.reason)
        return DriverCapability(available=True, reason=description)

    async def apply(self, spec: WorkloadSpec) -> WorkloadHandle:
        """Define and start ``spec``'s domain, replacing one of another version.

        Raises:
            WorkloadConflictError: a domain of that name is not owned by this agent.
            WorkloadStartError: the domain XML is invalid or libvirt refused it.
            DriverUnavailableError: libvirt is missing or unreachable.
        """
        if spec.driver != "libvirt":
            raise DriverError("not a libvirt workload", driver=self.name, workload=spec.name)
        async with self._lock(spec.name):
            try:
                handle = await self._apply(spec)
            except WorkloadStartError as exc:
                self._note_failure(spec.name, spec.version, exc.reason)
                raise
            self._clear_failure(spec.name)
            return handle

    async def stop(self, name: str) -> None:
        """Shut an owned domain down, destroying it after ``shutdown_timeout_s``.

        Raises:
            WorkloadNotFoundError: no domain of that name.
            WorkloadConflictError: the domain is not owned by this agent.
        """
        async with self._lock(name):
            domain = await self._call(name, self._require_sync, name)
            await self._shutdown(name, domain)

    async def start(self, name: str) -> None:
        """Start an owned, shut-off domain.

        Raises:
            WorkloadNotFoundError: no domain of that name.
            WorkloadConflictError: the domain is not owned by this agent.
            WorkloadStartError: libvirt refused to start it.
        """
        async with self._lock(name):
            domain = await self._call(name, self._require_sync, name)
            await self._call(name, self._start_sync, name, domain)

    async def remove(self, name: str) -> None:
        """Shut down, destroy and undefine an owned domain; no-op when missing.

        Raises:
            WorkloadConflictError: the domain is not owned by this agent.
        """
        async with self._lock(name):
            self._clear_failure(name)
            domain = await self._call(name, self._lookup_sync, name)
            if domain is None:
                return
            if await self._call(name, self._owner_of_sync, domain) is None:
                raise self._conflict(name)
            await self._shutdown(name, domain)
            await self._call(name, self._undefine_sync, domain)
            self._started.pop(name, None)
            logger.info("removed domain %s", name)

    async def inspect(self, name: str) -> ActualState:
        """Observe one domain (``conflict`` when it is not owned)."""
        state = await self._call(name, self._inspect_sync, name)
        if state.phase == "missing":
            return self._failed_state(name) or state
        return state

    async def list(self) -> list[ActualState]:
        """Observe every domain this agent owns, plus workloads that failed to define."""
        return self._with_failures(await self._call("", self._list_sync))

    # -- async plumbing ----------------------------------------------------------

    async def _call(
        self, workload: str, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> _T:
        """Run a blocking helper in a thread; translate what libvirt raises."""
        try:
            return await self._runner.run(fn, *args, **kwargs)
        except DriverError:
            raise
        except Exception as exc:
            if self._module is not None and isinstance(exc, self._module.libvirtError):
                raise DriverError(
                    f"libvirt error: {exc.get_error_message() or exc}",
                    driver=self.name,
                    workload=workload,
                ) from exc
            raise

    async def _apply(self, spec: WorkloadSpec) -> WorkloadHandle:
        domain = await self._call(spec.name, self._lookup_sync, spec.name)
        if domain is not None:
            meta = await self._call(spec.name, self._owner_of_sync, domain)
            if meta is None:
                raise self._conflict(spec.name)
            if meta.get("version") == spec.version:
                await self._call(spec.name, self._start_sync, spec.name, domain)
                uuid = await self._call(spec.name, domain.UUIDString)
                return self._handle(spec, uuid, created=False)
            logger.info(
                "replacing domain %s: version %s -> %s",
                spec.name,
                meta.get("version"),
                spec.version,
            )
            await self._shutdown(spec.name, domain)
            await self._call(spec.name, self._undefine_sync, domain)
        xml = self.domain_xml(spec)
        defined = await self._call(spec.name, self._define_sync, spec.name, xml)
        await self._call(spec.name, self._start_sync, spec.name, defined)
        uuid = await self._call(spec.name, defined.UUIDString)
        logger.info("started domain %s version %s", spec.name, spec.version)
        return self._handle(spec, uuid, created=True)

    async def _shutdown(self, name: str, domain: Any) -> None:
        """Graceful shutdown, polled until shut off or the timeout, then destroy."""
        if not await self._call(name, domain.isActive):
            return
        try:
            await self._call(name, domain.shutdown)
            async with asyncio.timeout(self.shutdown_timeout_s):
                # Polled: shutdown completion events need libvirt's event loop glue.
                while await self._call(name, domain.isActive):  # noqa: ASYNC110
                    await asyncio.sleep(self.poll_interval_s)
            logger.info("shut down domain %s", name)
            return
        except TimeoutError:
            logger.warning(
                "domain %s did not shut down within %ss, destroying it",
                name,
                self.shutdown_timeout_s,
            )
        except DriverError as exc:
            logger.warning("graceful shutdown of domain %s failed (%s), destroying it", name, exc)
        if await self._call(name, domain.isActive):
            await self._call(name, domain.destroy)

    def _conflict(self, name: str) -> WorkloadConflictError:
        return WorkloadConflictError(
            f"domain {name!r} exists but is not owned by agent {self.owner!r}; left alone",
            driver=self.name,
            workload=name,
        )

    def _handle(self, spec: WorkloadSpec, uuid: str, *, created: bool) -> WorkloadHandle:
        return WorkloadHandle(
            name=spec.name, driver=self.name, runtime_id=uuid, version=spec.version, created=created
        )

    # -- domain XML (pure) ---------------------------------------------------------

    def domain_xml(self, spec: WorkloadSpec) -> str:
        """The domain XML for ``spec``, with this agent's ownership metadata.

        Raises:
            WorkloadStartError: ``spec.domain_xml`` is not valid domain XML or names
                another domain.
        """
        import xml.etree.ElementTree as ET  # noqa: PLC0415 - the XML parser only when used

        if spec.domain_xml is not None:
            try:
                root = ET.fromstring(spec.domain_xml)
            except ET.ParseError as exc:
                raise WorkloadStartError(
                    f"invalid domain_xml: {exc}", driver=self.name, workload=spec.name
                ) from exc
            if root.tag != "domain":
                raise WorkloadStartError(
                    "domain_xml root element must be <domain>", driver=self.name, workload=spec.name
                )
            name_el = root.find("name")
            if name_el is None:
                name_el = ET.Element("name")
                root.insert(0, name_el)
                name_el.text = spec.name
            elif (name_el.text or "").strip() != spec.name:
                raise WorkloadStartError(
                    f"domain_xml names domain {name_el.text!r}, not {spec.name!r}",
                    driver=self.name,
                    workload=spec.name,
                )
        else:
            root = self._generated_domain(spec)
        metadata = root.find("metadata")
        if metadata is None:
            metadata = ET.SubElement(root, "metadata")
        for old in metadata.findall(f"{{{METADATA_NS}}}workload"):
            metadata.remove(old)
        ours = ET.SubElement(metadata, f"{{{METADATA_NS}}}workload")
        for key, value in (("owner", self.owner), ("name", spec.name), ("version", spec.version)):
            ET.SubElement(ours, f"{{{METADATA_NS}}}{key}").text = value
        ET.register_namespace(METADATA_PREFIX, METADATA_NS)
        return ET.tostring(root, encoding="unicode")

    def _generated_domain(self, spec: WorkloadSpec) -> ET.Element:
        import xml.etree.ElementTree as ET  # noqa: PLC0415 - the XML parser only when used

        root = ET.Element("domain", {"type": self.domain_type})
        ET.SubElement(root, "name").text = spec.name
        ET.SubElement(root, "memory", {"unit": "MiB"}).text = str(spec.resources.memory_mb)
        ET.SubElement(root, "vcpu").text = str(vcpus_for(spec.resources.cpu_millis))
        os_el = ET.SubElement(root, "os")
        ET.SubElement(os_el, "type").text = "hvm"
        ET.SubElement(os_el, "boot", {"dev": "hd"})
        devices = ET.SubElement(root, "devices")
        if spec.disk_image:
            fmt = "qcow2" if spec.disk_image.endswith(".qcow2") else "raw"
            disk = ET.SubElement(devices, "disk", {"type": "file", "device": "disk"})
            ET.SubElement(disk, "driver", {"name": "qemu", "type": fmt})
            ET.SubElement(disk, "source", {"file": spec.disk_image})
            ET.SubElement(disk, "target", {"dev": "vda", "bus": "virtio"})
        return root

    # -- blocking helpers (run in worker threads) -------------------------------

    def _connection_sync(self) -> Any:
        if self._conn is not None:
            return self._conn
        if self._module is None:
            try:
                module = importlib.import_module("libvirt")
            except ImportError as exc:
                raise DriverUnavailableError(
                    f"libvirt-python is not installed ({exc})", driver=self.name
                ) from exc
            # libvirt prints every error to stderr unless a handler is registered;
            # errors reach us as exceptions anyway.
            module.registerErrorHandler(lambda _ctx, _err: None, None)
            self._module = module
        try:
            self._conn = self._module.open(self.uri)
        except self._module.libvirtError as exc:
            raise DriverUnavailableError(
                f"cannot connect to {self.uri}: {exc.get_error_message() or exc}",
                driver=self.name,
            ) from exc
        return self._conn

    def _describe_sync(self) -> str:
        conn = self._connection_sync()
        version = int(conn.getLibVersion())
        major, minor, micro = version // 1_000_000, version // 1000 % 1000, version % 1000
        return f"libvirt {major}.{minor}.{micro} ({conn.getType()}) at {self.uri}"

    def _lookup_sync(self, name: str) -> Any | None:
        conn = self._connection_sync()
        try:
            return conn.lookupByName(name)
        except self._module.libvirtError as exc:
            if exc.get_error_code() == _ERR_NO_DOMAIN:
                return None
            raise

    def _owner_of_sync(self, domain: Any) -> dict[str, str] | None:
        """Our metadata of ``domain`` when this agent owns it, else None."""
        try:
            text = domain.metadata(_METADATA_ELEMENT, METADATA_NS)
        except self._module.libvirtError as exc:
            if exc.get_error_code() == _ERR_NO_METADATA:
                return None
            raise
        import xml.etree.ElementTree as ET  # noqa: PLC0415 - the XML parser only when used

        try:
            element = ET.fromstring(text)
        except ET.ParseError:
            return None
        meta = {child.tag.rsplit("}", 1)[-1]: (child.text or "").strip() for child in element}
        return meta if meta.get("owner") == self.owner else None

    def _require_sync(self, name: str) -> Any:
        domain = self._lookup_sync(name)
        if domain is None:
            raise WorkloadNotFoundError("no such domain", driver=self.name, workload=name)
        if self._owner_of_sync(domain) is None:
            raise self._conflict(name)
        return domain

    def _define_sync(self, name: str, xml: str) -> Any:
        conn = self._connection_sync()
        try:
            return conn.defineXML(xml)
        except self._module.libvirtError as exc:
            raise WorkloadStartError(
                f"define failed: {exc.get_error_message() or exc}", driver=self.name, workload=name
            ) from exc

    def _start_sync(self, name: str, domain: Any) -> None:
        if domain.isActive():
            return
        try:
            domain.create()
        except self._module.libvirtError as exc:
            raise WorkloadStartError(
                f"start failed: {exc.get_error_message() or exc}", driver=self.name, workload=name
            ) from exc
        self._started[name] = _now()
        logger.info("started domain %s", name)

    def _undefine_sync(self, domain: Any) -> None:
        try:
            domain.undefineFlags(_UNDEFINE_FLAGS)
        except self._module.libvirtError as exc:
            if exc.get_error_code() not in (_ERR_NO_SUPPORT, _ERR_INVALID_ARG):
                raise
            domain.undefine()  # drivers without NVRAM support reject the flag

    def _inspect_sync(self, name: str) -> ActualState:
        domain = self._lookup_sync(name)
        if domain is None:
            return ActualState(name=name, driver=self.name, phase="missing")
        meta = self._owner_of_sync(domain)
        if meta is None:
            return ActualState(
                name=name,
                driver=self.name,
                phase="conflict",
                reason=self._conflict(name).reason,
                runtime_id=str(domain.UUIDString()),
            )
        return self._state(name, domain, meta)

    def _list_sync(self) -> builtins.list[ActualState]:
        conn = self._connection_sync()
        states = []
        for domain in conn.listAllDomains(0):
            try:
                meta = self._owner_of_sync(domain)
            except self._module.libvirtError as exc:
                if exc.get_error_code() == _ERR_NO_DOMAIN:
                    continue  # undefined meanwhile
                raise
            if meta is None:
                continue
            name = meta.get("name") or str(domain.name())
            states.append(self._state(name, domain, meta))
        return states

    def _state(self, name: str, domain: Any, meta: dict[str, str]) -> ActualState:
        state, reason_code = domain.state()
        phase: ActualPhase
        match state:
            case 1 | 2:  # running, blocked
                phase, reason = "running", ""
            case 3 | 4 | 7:  # paused, shutting down, pm-suspended
                phase = "running"
                reason = {_PAUSED: "paused", _SHUTDOWN: "shutting down"}.get(state, "suspended")
            case 5:  # shut off
                reason = _SHUTOFF_REASONS.get(reason_code, "shut off")
                phase = "failed" if reason_code in (3, 6) else "exited"
                if name not in self._started and reason_code == 0:
                    reason = "defined, not started"
            case 6:
                phase, reason = "failed", "crashed"
            case _:
                phase, reason = "failed", f"domain state {state}"
        return ActualState(
            name=name,
            driver=self.name,
            phase=phase,
            version=meta.get("version"),
            reason=reason,
            started_at=self._started.get(name),
            runtime_id=str(domain.UUIDString()),
        )


def _now() -> datetime:
    return datetime.now(UTC)
