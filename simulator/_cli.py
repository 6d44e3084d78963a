"""``novacron sim run``, ``novacron sim swarm`` and ``novacron demo``.

Imported by the CLI dispatcher on every run, so nothing heavy at module level:
the handlers import the simulator when they run.

Exit codes: 0 every invariant held; 1 an invariant failed (or a swarm seed
did); 2 bad input (a fault schedule, fleet file or argument: ConfigError).

``sim run`` without ``--deterministic`` runs real agents, relays and the hub
over a broker (:mod:`simulator.realrun`); ``demo`` is :mod:`simulator.demo`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _cores() -> int:
    """One worker per core: the default of ``sim run`` in either mode."""
    import os  # noqa: PLC0415

    return max(1, os.cpu_count() or 1)


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``sim`` (``run``, ``swarm``) and ``demo`` to the ``novacron`` parser.

    Args:
        subparsers: the top-level subparsers action of ``novacron``.
    """
    sim = subparsers.add_parser(
        "sim",
        help="simulate a fleet with faults and check the invariants",
        description="Run a simulated fleet (real agents, relays and a hub, or the "
        "deterministic virtual-time mode) under a fault schedule, check the invariants "
        "and write a report.",
    )
    sub = sim.add_subparsers(dest="sim_command", metavar="SIM_COMMAND", required=True)

    run = sub.add_parser(
        "run",
        help="run one simulation and write its report",
        description="Simulate N devices in R regions for a duration under a fault schedule; "
        "exit 1 if an invariant fails.",
    )
    run.add_argument("--devices", type=_positive_int, default=100, help="devices (default 100)")
    run.add_argument(
        "--regions", type=_positive_int, default=None, help="regions (default: the fleet file's)"
    )
    run.add_argument(
        "--broker", metavar="URL", help="use this MQTT broker (default: an embedded one)"
    )
    run.add_argument(
        "--faults", type=Path, metavar="FILE", help="fault schedule YAML (default: no faults)"
    )
    run.add_argument(
        "--fleet", type=Path, metavar="FILE", help="fleet file (default: every built-in profile)"
    )
    run.add_argument(
        "--duration", type=_positive_float, default=300.0, help="seconds (default 300)"
    )
    run.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    run.add_argument(
        "--report", type=Path, metavar="DIR", help="write report.json and report.html here"
    )
    run.add_argument(
        "--deterministic",
        action="store_true",
        help="virtual time and a simulated network (replayable from --seed)",
    )
    run.add_argument(
        "--signatures",
        choices=("modeled", "ed25519"),
        default=None,
        help="deterministic mode: 'modeled' (default) signs with keyed BLAKE2b tags in "
        "Ed25519's place, 'ed25519' with real Ed25519 (about 1.3x slower; same report "
        "but for its signatures entry); real mode always uses Ed25519",
    )
    run.add_argument(
        "--swarm-seed",
        type=int,
        metavar="SEED",
        help="replay a swarm case (its fleet size, rates and faults come from the seed)",
    )
    run.add_argument(
        "--converge-deadline",
        type=_positive_float,
        metavar="S",
        help="fail when a fault takes longer than S seconds to converge after its heal",
    )
    run.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="worker processes (default: one per core); in deterministic mode each runs a "
        "group of regions and the report is the same for any number",
    )
    run.set_defaults(func=_cmd_run)

    swarm = sub.add_parser(
        "swarm",
        help="run many short deterministic simulations with faults drawn per seed",
        description="VOPR-style swarm: each seed draws its own fault mix and rates; the seeds "
        "of failures are printed for replay with `sim run --deterministic --swarm-seed`.",
    )
    swarm.add_argument(
        "--seeds", type=_positive_int, default=200, help="how many seeds (default 200)"
    )
    swarm.add_argument("--start-seed", type=int, default=0, help="first seed (default 0)")
    swarm.add_argument(
        "--devices", type=_positive_int, default=20, help="devices per run (default 20)"
    )
    swarm.add_argument(
        "--regions", type=_positive_int, default=2, help="regions per run (default 2)"
    )
    swarm.add_argument(
        "--duration", type=_positive_float, default=240.0, help="seconds per run (default 240)"
    )
    swarm.add_argument("--workers", type=_positive_int, default=1, help="processes (default 1)")
    swarm.set_defaults(func=_cmd_swarm)

    demo = subparsers.add_parser(
        "demo",
        help="one-command demo: embedded broker, hub, two regions, a rollout and an outage",
        description="Start an embedded MQTT broker, a hub on 127.0.0.1:8090, two regions of "
        "simulated devices (real agents, enrolled with tokens), roll out a sample deployment "
        "in waves, cut a region from the hub at t=20 s and heal it at t=40 s (scaled to "
        "--duration). Exit 0 when every device converged on the hub's desired state.",
    )
    demo.add_argument(
        "--duration",
        type=_positive_float,
        default=None,
        help="stop after S seconds (default: Ctrl-C)",
    )
    demo.add_argument("--devices", type=_positive_int, default=24, help="devices (default 24)")
    demo.add_argument(
        "--listen",
        default="127.0.0.1:8090",
        metavar="HOST:PORT",
        help="hub API address (default 127.0.0.1:8090; port 0: any free port)",
    )
    demo.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="keep the hub's, relays' and devices' data here (default: a temporary directory)",
    )
    demo.add_argument(
        "--deployment",
        type=Path,
        metavar="FILE",
        help="the deployment to roll out (default: examples/demo/deployment.yaml)",
    )
    demo.add_argument("--seed", type=int, default=0, help="fleet assignment seed (default 0)")
    demo.set_defaults(func=_cmd_demo)


def _print_result(result: Any, report_dir: Path | None) -> None:
    inv = result.invariants
    final = result.report.final
    print(inv.summary())
    lags = [
        f"#{x.fault} {x.kind}: {'never' if x.lag_s is None else f'{x.lag_s:g} s'}" for x in inv.lags
    ]
    if lags:
        print("convergence after heal: " + "; ".join(lags))
    for v in inv.violations[:20]:
        print(f"  {v}")
    from simulator.progress import final_table  # noqa: PLC0415

    keys = (
        "devices",
        "regions",
        "sim_seconds",
        "events_stored",
        "events_dropped_by_quota",
        "max_convergence_lag_s",
        "invariants_ok",
    )
    print(final_table([*((k, final[k]) for k in keys if k in final), ("wall_s", result.wall_s)]))
    if report_dir is not None:
        from simulator.report import write_report  # noqa: PLC0415 - heavy import

        json_path, html_path = write_report(result.report, report_dir)
        print(f"report: {json_path} {html_path}")


def _cmd_run(args: argparse.Namespace) -> int:
    if not args.deterministic and args.swarm_seed is None:
        if args.signatures is not None:
            from sync._exceptions import ConfigError  # noqa: PLC0415

            raise ConfigError(
                "applies to --deterministic only (real mode signs with Ed25519)",
                source="<argv>",
                field="--signatures",
            )
        return _cmd_run_real(args)
    from dataclasses import replace  # noqa: PLC0415

    from simulator.deterministic import SimConfig, run_deterministic  # noqa: PLC0415
    from simulator.faults import FaultSchedule, load_fault_schedule  # noqa: PLC0415
    from simulator.fleet import load_fleet_spec  # noqa: PLC0415

    fleet = load_fleet_spec(args.fleet) if args.fleet else None
    schedule: FaultSchedule | None
    if args.swarm_seed is not None:
        from simulator.swarm import swarm_case  # noqa: PLC0415

        config, schedule = swarm_case(args.swarm_seed)
        source = f"<swarm seed {args.swarm_seed}>"
    else:
        schedule = load_fault_schedule(args.faults) if args.faults else None
        source = str(args.faults or "")
        config = SimConfig(
            devices=args.devices,
            regions=args.regions,
            duration_s=args.duration,
            seed=args.seed,
            sample_s=max(1.0, min(60.0, args.duration / 1500)),
        )
    if args.converge_deadline is not None:
        config = replace(config, converge_deadline_s=args.converge_deadline)
    if args.signatures is not None:
        config = replace(config, signatures=args.signatures)
    from simulator.progress import ProgressDisplay  # noqa: PLC0415

    # On stderr: stdout (the results) stays the same for the same seed.
    display = ProgressDisplay(sys.stderr)
    try:
        result = run_deterministic(
            config,
            schedule,
            fleet,
            schedule_source=source,
            progress=display.update,
            workers=args.workers or _cores(),
        )
    finally:
        display.close()
    _print_result(result, args.report)
    return EXIT_OK if result.invariants.ok else EXIT_FAILED


def _cmd_run_real(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415

    from simulator.faults import load_fault_schedule  # noqa: PLC0415
    from simulator.fleet import load_fleet_spec  # noqa: PLC0415
    from simulator.realrun import RealRunConfig, run_real  # noqa: PLC0415

    if args.broker is not None and not args.broker.startswith(("mqtt://", "tcp://")):
        from sync._exceptions import ConfigError  # noqa: PLC0415

        raise ConfigError("must be mqtt://HOST:PORT", source="<argv>", field="--broker")
    _quiet_logging(getattr(args, "log_level", "INFO"))
    config = RealRunConfig(
        devices=args.devices,
        regions=args.regions,
        duration_s=args.duration,
        seed=args.seed,
        broker_url=None if args.broker is None else "mqtt://" + args.broker.split("://", 1)[1],
        workers=args.workers or _cores(),
        fleet=load_fleet_spec(args.fleet) if args.fleet else None,
        schedule=load_fault_schedule(args.faults) if args.faults else None,
        schedule_source=str(args.faults or ""),
        converge_deadline_s=args.converge_deadline,
    )
    result = asyncio.run(run_real(config))
    if args.report is not None:
        from simulator.report import write_report  # noqa: PLC0415

        json_path, html_path = write_report(result.report, args.report)
        print(f"report: {json_path} {html_path}")
    return EXIT_OK if result.invariants.ok else EXIT_FAILED


def _cmd_swarm(args: argparse.Namespace) -> int:
    from simulator.swarm import run_swarm  # noqa: PLC0415

    seeds = range(args.start_seed, args.start_seed + args.seeds)
    outcomes = run_swarm(
        seeds,
        devices=args.devices,
        regions=args.regions,
        duration_s=args.duration,
        workers=args.workers,
    )
    failed = [o for o in outcomes if not o.ok]
    for o in failed:
        print(f"seed {o.seed} FAILED ({', '.join(o.failed)}): {'; '.join(o.violations[:2])}")
        print(f"  replay: novacron sim run --deterministic --swarm-seed {o.seed}")
    print(
        json.dumps(
            {
                "seeds": len(outcomes),
                "failed": [o.seed for o in failed],
                "wall_s": round(sum(o.wall_s for o in outcomes), 1),
            }
        )
    )
    return EXIT_FAILED if failed else EXIT_OK


def _quiet_logging(level: str) -> None:
    """The demo talks on stdout; logs only from WARNING unless --log-level DEBUG."""
    import logging  # noqa: PLC0415

    if level != "DEBUG":
        logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("amqtt").setLevel(logging.ERROR if level != "DEBUG" else logging.INFO)


def _cmd_demo(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415

    from cloud_hub.config import parse_listen  # noqa: PLC0415
    from simulator.demo import DemoOptions, run_demo  # noqa: PLC0415
    from sync._exceptions import ConfigError  # noqa: PLC0415

    try:
        parse_listen(args.listen)
    except ValueError as exc:
        raise ConfigError(str(exc), source="<argv>", field="--listen") from exc
    _quiet_logging(getattr(args, "log_level", "INFO"))
    options = DemoOptions(
        duration_s=args.duration,
        devices=args.devices,
        listen=args.listen,
        data_dir=args.data_dir.resolve() if args.data_dir else None,
        deployment=args.deployment,
        seed=args.seed,
    )
    try:
        return asyncio.run(run_demo(options))
    except OSError as exc:  # the API port is taken, the data directory unwritable ...
        print(f"novacron: demo: {exc} (see --listen and --data-dir)", file=sys.stderr)
        return EXIT_FAILED
