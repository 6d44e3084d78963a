"""The libvirt driver against libvirt's real test driver (``test:///default``).

The test driver keeps its state per connection, so each driver instance sees a fresh
hypervisor holding one running domain named ``test`` that this agent does not own.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from edge_agent.drivers import (
    METADATA_NS,
    DriverError,
    LibvirtDriver,
    WorkloadConflictError,
    WorkloadNotFoundError,
    WorkloadStartError,
)
from sync.models import WorkloadSpec

pytestmark = pytest.mark.integration


def spec(name: str, version: str = "1", **kw: object) -> WorkloadSpec:
    fields: dict[str, object] = {"name": name, "driver": "libvirt", "version": version}
    return WorkloadSpec.model_validate(fields | kw)


@pytest_asyncio.fixture
async def driver(libvirt_uri: str) -> AsyncIterator[LibvirtDriver]:
    async with LibvirtDriver("agent-1", uri=libvirt_uri, domain_type="test") as drv:
        yield drv


@pytest.mark.asyncio
async def test_probe(driver: LibvirtDriver) -> None:
    capability = await driver.probe()
    assert capability.available, capability.reason
    assert "test:///default" in capability.reason


@pytest.mark.asyncio
async def test_probe_without_libvirt_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "libvirt", None)  # makes ``import libvirt`` fail
    async with LibvirtDriver("agent-1", uri="test:///default") as drv:
        capability = await drv.probe()
        assert not capability.available
        assert "libvirt-python is not installed" in capability.reason
        with pytest.raises(DriverError, match="not installed"):
            await drv.list()


@pytest.mark.asyncio
async def test_probe_unreachable_uri(
    libvirt_uri: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    sock = tmp_path_factory.mktemp("nolibvirt") / "none.sock"
    async with LibvirtDriver("agent-1", uri=f"qemu:///system?socket={sock}") as drv:
        capability = await drv.probe()
        assert not capability.available
        assert "cannot connect" in capability.reason


def test_generated_domain_xml() -> None:
    drv = LibvirtDriver("agent-1", domain_type="kvm")
    workload = spec(
        "vm1",
        version="3",
        resources={"cpu_millis": 1500, "memory_mb": 256},
        disk_image="/var/lib/novacron/vm1.qcow2",
    )
    root = ET.fromstring(drv.domain_xml(workload))
    assert root.get("type") == "kvm"
    assert root.findtext("name") == "vm1"
    assert root.findtext("memory") == "256"
    assert root.find("memory").get("unit") == "MiB"  # type: ignore[union-attr]
    assert root.findtext("vcpu") == "2"
    disk = root.find("devices/disk")
    assert disk is not None
    assert disk.find("source").get("file") == "/var/lib/novacron/vm1.qcow2"  # type: ignore[union-attr]
    assert disk.find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
    ours = root.find(f"metadata/{{{METADATA_NS}}}workload")
    assert ours is not None
    assert {child.tag.split("}")[1]: child.text for child in ours} == {
        "owner": "agent-1",
        "name": "vm1",
        "version": "3",
    }


def test_given_domain_xml_gets_metadata_and_is_checked() -> None:
    drv = LibvirtDriver("agent-1")
    given = (
        "<domain type='test'><memory unit='MiB'>32</memory><vcpu>1</vcpu>"
        "<metadata><other xmlns='urn:other'>keep</other></metadata>"
        "<os><type>hvm</type></os></domain>"
    )
    root = ET.fromstring(drv.domain_xml(spec("vmx", domain_xml=given)))
    assert root.findtext("name") == "vmx"
    assert root.find("metadata/{urn:other}other") is not None
    assert root.find(f"metadata/{{{METADATA_NS}}}workload") is not None
    with pytest.raises(WorkloadStartError, match="names domain"):
        drv.domain_xml(spec("vmx", domain_xml="<domain><name>other</name></domain>"))
    with pytest.raises(WorkloadStartError, match="invalid domain_xml"):
        drv.domain_xml(spec("vmx", domain_xml="<domain>"))
    with pytest.raises(WorkloadStartError, match="root element"):
        drv.domain_xml(spec("vmx", domain_xml="<network/>"))


@pytest.mark.asyncio
async def test_start_is_idempotent(driver: LibvirtDriver) -> None:
    workload = spec("vm1", resources={"cpu_millis": 2500, "memory_mb": 128})
    handle = await driver.apply(workload)
    assert handle.created
    again = await driver.apply(workload)
    assert not again.created
    assert again.runtime_id == handle.runtime_id
    state = await driver.inspect("vm1")
    assert (state.phase, state.version, state.runtime_id) == ("running", "1", handle.runtime_id)
    assert state.started_at is not None


@pytest.mark.asyncio
async def test_update_replaces_domain(driver: LibvirtDriver) -> None:
    first = await driver.apply(spec("vm1", version="1"))
    second = await driver.apply(spec("vm1", version="2"))
    assert second.created
    assert second.runtime_id != first.runtime_id
    state = await driver.inspect("vm1")
    assert (state.phase, state.version) == ("running", "2")


@pytest.mark.asyncio
async def test_stop_start_remove(driver: LibvirtDriver) -> None:
    await driver.apply(spec("vm1"))
    await driver.stop("vm1")
    state = await driver.inspect("vm1")
    assert (state.phase, state.reason, state.exit_code) == ("exited", "shut down", None)
    await driver.stop("vm1")  # no-op when shut off
    await driver.start("vm1")
    assert (await driver.inspect("vm1")).phase == "running"
    await driver.remove("vm1")
    assert (await driver.inspect("vm1")).phase == "missing"
    await driver.remove("vm1")  # no-op when missing
    with pytest.raises(WorkloadNotFoundError):
        await driver.stop("vm1")
    with pytest.raises(WorkloadNotFoundError):
        await driver.start("vm1")


@pytest.mark.asyncio
async def test_domain_killed_outside_the_driver_is_detected(driver: LibvirtDriver) -> None:
    await driver.apply(spec("vm1"))
    # test:///default keeps state per connection: reach the domain through the
    # driver's own connection, as another libvirt client would on a real host.
    await driver._runner.run(lambda: driver._conn.lookupByName("vm1").destroy())
    state = await driver.inspect("vm1")
    assert (state.phase, state.reason) == ("exited", "destroyed")
    await driver.apply(spec("vm1"))  # the supervisor's restart path
    assert (await driver.inspect("vm1")).phase == "running"


@pytest.mark.asyncio
async def test_foreign_domain_is_left_alone(driver: LibvirtDriver) -> None:
    # test:///default ships a running domain named "test" without our metadata
    state = await driver.inspect("test")
    assert state.phase == "conflict"
    assert "not owned" in state.reason
    with pytest.raises(WorkloadConflictError):
        await driver.apply(spec("test"))
    with pytest.raises(WorkloadConflictError):
        await driver.stop("test")
    with pytest.raises(WorkloadConflictError):
        await driver.remove("test")
    assert (await driver.inspect("test")).phase == "conflict"
    assert await driver._runner.run(lambda: driver._conn.lookupByName("test").isActive()) == 1


@pytest.mark.asyncio
async def test_other_agent_domains_are_not_ours(driver: LibvirtDriver) -> None:
    # a domain that another agent defined on the same hypervisor (same connection,
    # since test:///default state is per connection)
    await driver.apply(spec("b-vm"))
    theirs = LibvirtDriver("agent-2", domain_type="test").domain_xml(spec("theirs"))
    await driver._runner.run(lambda: driver._conn.defineXML(theirs).create())
    await driver.apply(spec("a-vm", version="9"))
    assert [(s.name, s.version) for s in await driver.list()] == [("a-vm", "9"), ("b-vm", "1")]
    assert (await driver.inspect("theirs")).phase == "conflict"
    with pytest.raises(WorkloadConflictError):
        await driver.remove("theirs")


@pytest.mark.asyncio
async def test_given_domain_xml_runs(driver: LibvirtDriver) -> None:
    xml = (
        "<domain type='test'><name>vmx</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>"
        "<os><type>hvm</type></os></domain>"
    )
    await driver.apply(spec("vmx", domain_xml=xml, version="5"))
    state = await driver.inspect("vmx")
    assert (state.phase, state.version) == ("running", "5")


@pytest.mark.asyncio
async def test_invalid_domain_fails_clearly(driver: LibvirtDriver) -> None:
    with pytest.raises(WorkloadStartError):
        await driver.apply(
            spec("bad", domain_xml="<domain type='nonsense'><name>bad</name></domain>")
        )
    state = await driver.inspect("bad")
    assert state.phase == "failed"
    assert state.reason
    assert [s.name for s in await driver.list()] == ["bad"]
