"""The fleet simulator: brokers, network faults, invariants, reports, deterministic mode.

Public names are imported lazily so that ``novacron --help``, which imports
:mod:`simulator._cli`, pays neither for amqtt nor for the sync cores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from novacron._lazy import lazy_exports

if TYPE_CHECKING:
    from simulator._errors import SimulatorError
    from simulator.broker import BrokerControl, BrokerStartError, EmbeddedBroker
    from simulator.composition import FleetStack, SimDevice, Tuning
    from simulator.demo import DemoOptions, run_demo
    from simulator.deterministic import DeterministicSim, SimConfig, SimResult, run_deterministic
    from simulator.faults import (
        Action,
        DeviceRef,
        DeviceSelector,
        FaultSchedule,
        FaultTimeline,
        load_fault_schedule,
    )
    from simulator.fleet import Fleet, FleetSpec, RegionSpec, assign_fleet, load_fleet_spec
    from simulator.injector import FaultInjector, FaultTarget, ProxyNetwork
    from simulator.invariants import InvariantReport, Observations, check_invariants
    from simulator.netproxy import ProxyError, TcpProxy
    from simulator.realrun import RealResult, RealRunConfig, run_real
    from simulator.report import ReportBuilder, RunReport, write_report
    from simulator.swarm import SwarmOutcome, run_swarm

__all__ = [
    "Action",
    "BrokerControl",
    "BrokerStartError",
    "DemoOptions",
    "DeterministicSim",
    "DeviceRef",
    "DeviceSelector",
    "EmbeddedBroker",
    "FaultInjector",
    "FaultSchedule",
    "FaultTarget",
    "FaultTimeline",
    "Fleet",
    "FleetSpec",
    "FleetStack",
    "InvariantReport",
    "Observations",
    "ProxyError",
    "ProxyNetwork",
    "RealResult",
    "RealRunConfig",
    "RegionSpec",
    "ReportBuilder",
    "RunReport",
    "SimConfig",
    "SimDevice",
    "SimResult",
    "SimulatorError",
    "SwarmOutcome",
    "TcpProxy",
    "Tuning",
    "assign_fleet",
    "check_invariants",
    "load_fault_schedule",
    "load_fleet_spec",
    "run_demo",
    "run_deterministic",
    "run_real",
    "run_swarm",
    "write_report",
]

_HOMES = {
    "SimulatorError": "simulator._errors",
    "BrokerControl": "simulator.broker",
    "BrokerStartError": "simulator.broker",
    "EmbeddedBroker": "simulator.broker",
    "DeterministicSim": "simulator.deterministic",
    "SimConfig": "simulator.deterministic",
    "SimResult": "simulator.deterministic",
    "run_deterministic": "simulator.deterministic",
    "Action": "simulator.faults",
    "DeviceRef": "simulator.faults",
    "DeviceSelector": "simulator.faults",
    "FaultSchedule": "simulator.faults",
    "FaultTimeline": "simulator.faults",
    "load_fault_schedule": "simulator.faults",
    "FaultInjector": "simulator.injector",
    "FaultTarget": "simulator.injector",
    "ProxyNetwork": "simulator.injector",
    "Fleet": "simulator.fleet",
    "FleetSpec": "simulator.fleet",
    "RegionSpec": "simulator.fleet",
    "assign_fleet": "simulator.fleet",
    "load_fleet_spec": "simulator.fleet",
    "InvariantReport": "simulator.invariants",
    "Observations": "simulator.invariants",
    "check_invariants": "simulator.invariants",
    "ProxyError": "simulator.netproxy",
    "TcpProxy": "simulator.netproxy",
    "ReportBuilder": "simulator.report",
    "RunReport": "simulator.report",
    "write_report": "simulator.report",
    "SwarmOutcome": "simulator.swarm",
    "FleetStack": "simulator.composition",
    "SimDevice": "simulator.composition",
    "Tuning": "simulator.composition",
    "DemoOptions": "simulator.demo",
    "run_demo": "simulator.demo",
    "RealResult": "simulator.realrun",
    "RealRunConfig": "simulator.realrun",
    "run_real": "simulator.realrun",
    "run_swarm": "simulator.swarm",
}

__getattr__, __dir__ = lazy_exports(__name__, _HOMES, __all__)
