"""Deterministic mode: the real sync cores under virtual time and seeded faults."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from simulator._detnodes import Signatures, VerifyCache, ring_of, sim_signer
from simulator.deterministic import SimConfig, _groups, run_deterministic
from simulator.faults import FaultSchedule, load_fault_schedule
from simulator.fleet import assign_fleet, load_fleet_spec
from simulator.progress import Progress
from simulator.report import render_html, report_json
from sync._exceptions import SignatureError
from sync.keys import KeyRing, Signer

ROOT = Path(__file__).resolve().parents[2]
OUTAGE = load_fault_schedule(ROOT / "examples" / "faults" / "region-outage.yaml")
MIXED = load_fault_schedule(ROOT / "examples" / "faults" / "mixed.yaml")
FLEET = load_fleet_spec(ROOT / "examples" / "fleets" / "default.yaml")


def busy(**kw: Any) -> SimConfig:
    """Busy enough that a one-minute outage leaves scopes and events behind."""
    return SimConfig(status_interval_s=60.0, event_interval_s=60.0, rollout_every_s=90.0, **kw)


def test_region_outage_converges_and_reports() -> None:
    cfg = busy(devices=80, regions=2, duration_s=240, seed=4)
    result = run_deterministic(cfg, OUTAGE, FLEET)
    inv = result.invariants
    assert inv.ok, inv.summary() + "\n" + "\n".join(map(str, inv.violations))
    assert inv.checked["events"] > 500 and inv.checked["deltas"] > 300
    [lag] = inv.lags
    assert lag.fault == 0 and lag.heal_t == 120.0
    assert lag.lag_s is not None and 0 < lag.lag_s <= 30
    doc = result.report.to_dict()
    online = dict(
        zip(doc["series"]["devices_online"]["t"], doc["series"]["devices_online"]["v"], strict=True)
    )
    assert online[60.0] == 80  # a hub partition leaves devices connected to their relay
    outbox = dict(
        zip(doc["series"]["outbox_items"]["t"], doc["series"]["outbox_items"]["v"], strict=True)
    )
    assert outbox[115.0] > 50  # the cut region's relay holds what the hub has not acknowledged
    assert outbox[result.report.to_dict()["series"]["outbox_items"]["t"][-1]] == 0
    final = doc["final"]
    assert final["faults_applied"] == {"heal": 1, "partition": 1}
    assert final["invariants_ok"] is True


def test_mixed_faults_hold_every_invariant() -> None:
    cfg = busy(devices=100, regions=2, duration_s=360, seed=2)
    result = run_deterministic(cfg, MIXED, FLEET)
    inv = result.invariants
    assert inv.ok, inv.summary() + "\n" + "\n".join(map(str, inv.violations))
    final = result.report.final
    assert set(final["faults_applied"]) >= {
        "partition",
        "kill_relay",
        "kill_hub",
        "kill_broker",
        "garbage",
    }
    assert final["relay"]["garbage"] > 0  # garbage was refused, not merged
    # Every fault but garbage (nothing to heal) has a lag, and each converged.
    assert sorted(lag.fault for lag in inv.lags) == [0, 1, 2, 3, 4, 5, 6]
    assert all(lag.lag_s is not None for lag in inv.lags)
    assert inv.checked["single_copy"] == 3


def test_same_seed_same_bytes_other_seed_other_run() -> None:
    cfg = busy(devices=40, regions=2, duration_s=200, seed=11)
    a = run_deterministic(cfg, MIXED, FLEET)
    b = run_deterministic(cfg, MIXED, FLEET)
    c = run_deterministic(busy(devices=40, regions=2, duration_s=200, seed=12), MIXED, FLEET)
    assert report_json(a.report) == report_json(b.report)
    assert render_html(a.report) == render_html(b.report)
    assert report_json(a.report) != report_json(c.report)


def test_planted_bug_no_dedupe_is_caught() -> None:
    cfg = busy(devices=80, regions=2, duration_s=240, seed=4, dedupe=False, extra_loss=0.05)
    result = run_deterministic(cfg, OUTAGE, FLEET)
    assert not result.invariants.ok
    assert result.invariants.failed() == ["events"]
    assert all("stored" in v.detail for v in result.invariants.violations)


def test_web_replica_moves_keep_one_copy() -> None:
    """Partition the region hosting web replicas: the hub moves them; after heal one copy each."""
    cfg = busy(devices=40, regions=2, duration_s=400, seed=5, web_replicas=3, move_after_s=60)
    schedule = FaultSchedule.model_validate(
        {
            "faults": [
                {"kind": "partition_region", "at": 30, "duration": 200, "region": "region-00"},
                {"kind": "partition_region", "at": 240, "duration": 100, "region": "region-01"},
            ]
        }
    )
    result = run_deterministic(cfg, schedule, FLEET)
    assert result.invariants.ok, "\n".join(map(str, result.invariants.violations))
    assert result.stats["web_moves"] >= 1


def test_clock_jump_ahead_and_back_converges() -> None:
    """Devices whose clocks jump two hours ahead and back keep syncing: their
    timestamps stay ahead (their clocks never go back), which their relay
    merges without letting its own clock follow."""
    schedule = FaultSchedule.model_validate(
        {
            "faults": [
                {
                    "kind": "clock_skew",
                    "at": 20,
                    "duration": 120,
                    "devices": {"count": 10},
                    "hours": 2,
                }
            ]
        }
    )
    cfg = busy(devices=40, regions=2, duration_s=300, seed=6)
    result = run_deterministic(cfg, schedule, FLEET)
    assert result.invariants.ok, result.invariants.summary()


def test_recorded_signatures_spare_only_their_own_bytes() -> None:
    """A signer of the run enters what it signs in the verification cache; any
    other bytes, signature or key is still verified for real (and fails)."""
    cache = VerifyCache()
    signer = sim_signer(1, "gw-1", cache)
    ring = ring_of(signer, cache=cache)
    sig = signer.sign(b"status")
    ring.verify(signer.key_id, b"status", sig)
    assert (cache.hits, cache.misses) == (1, 0)
    mallory = sim_signer(2, "gw-1", cache)  # records too, under its own key
    for data, bad in [(b"statuS", sig), (b"status", mallory.sign(b"status"))]:
        with pytest.raises(SignatureError):
            ring.verify(signer.key_id, data, bad)
    assert cache.hits == 1


def test_modeled_signatures_give_the_ed25519_run_report() -> None:
    """Keyed BLAKE2b tags in Ed25519's place change nothing a run reports but
    its ``signatures`` entry: same keys and ids, same message sizes, same
    refusals of garbage (the schedule sends some)."""
    cfg = busy(devices=40, regions=2, duration_s=240, seed=8)
    modeled = run_deterministic(cfg, MIXED, FLEET).report.to_dict()
    real = run_deterministic(replace(cfg, signatures="ed25519"), MIXED, FLEET).report.to_dict()
    assert modeled["final"].pop("signatures") == {"mode": "modeled"}
    assert real["final"].pop("signatures")["mode"] == "ed25519"
    assert modeled["meta"].pop("signatures") == "modeled"
    assert real["meta"].pop("signatures") == "ed25519"
    assert modeled["final"]["relay"]["garbage"] > 0
    assert modeled == real


def test_modeled_signatures_refuse_forgeries() -> None:
    keys = Signatures(1)
    signer, other = keys.signer("gw-1"), keys.signer("gw-2")
    assert signer.key_id == sim_signer(1, "gw-1").key_id  # the Ed25519 key of the same seed
    ring = keys.ring(signer)
    tag = signer.sign(b"status")
    assert len(tag) == 64
    ring.verify(signer.key_id, b"status", tag)
    bad = [
        (signer.key_id, b"statuS", tag),  # other bytes
        (signer.key_id, b"status", other.sign(b"status")),  # another node's tag
        (signer.key_id, b"status", tag[:-1] + bytes([tag[-1] ^ 1])),  # a flipped bit
        (signer.key_id, b"status", tag[:32]),  # short
        (other.key_id, b"status", other.sign(b"status")),  # a key this ring does not trust
    ]
    for kid, data, sig in bad:
        with pytest.raises(SignatureError):
            ring.verify(kid, data, sig)
    # A key that is not modeled (a real one) is verified as Ed25519.
    real = Signer.generate()
    mixed = keys.ring(real)
    mixed.verify(real.key_id, b"x", real.sign(b"x"))
    with pytest.raises(SignatureError):
        mixed.verify(real.key_id, b"y", real.sign(b"x"))
    assert isinstance(mixed, KeyRing)
    with pytest.raises(ValueError, match="signatures"):
        Signatures(1, "hmac")


def test_any_number_of_workers_gives_the_same_report() -> None:
    """Regions run apart (a hub shard each; what crosses regions comes from the
    seed), so splitting them over worker processes changes nothing reported."""
    cfg = busy(devices=60, regions=4, duration_s=300, seed=3)
    shown: dict[int, list[Progress]] = {1: [], 2: [], 3: []}
    reports = {
        w: run_deterministic(cfg, MIXED, FLEET, workers=w, progress=shown[w].append)
        for w in (1, 2, 3)
    }
    one = reports[1]
    assert one.invariants.ok, one.invariants.summary()
    assert one.report.final["faults_applied"]["kill_hub"] == 1  # a global fault, counted once
    assert one.report.final["ingest"]["events"] > 400
    for w in (2, 3):
        assert report_json(reports[w].report) == report_json(one.report), w
        assert render_html(reports[w].report) == render_html(one.report)
        assert reports[w].stats["workers"] == w
        assert shown[w] == shown[1]  # the progress line adds the workers' parts up
    assert len(shown[1]) > 60 and shown[1][-1].online == 60


def test_region_groups_are_contiguous_and_balanced() -> None:
    fleet = assign_fleet(FLEET, 1000, regions=10, seed=1)
    for workers in (1, 2, 3, 10, 50):
        groups = _groups(fleet, workers)
        assert [r for g in groups for r in g] == list(fleet.regions)
        assert len(groups) == min(workers, 10)
    sizes = [sum(1 for d in fleet.devices if d.region in g) for g in _groups(fleet, 2)]
    assert abs(sizes[0] - sizes[1]) <= 150, sizes


def test_a_failing_worker_fails_the_run_with_its_traceback() -> None:
    cfg = busy(devices=20, regions=2, duration_s=60, seed=1, signatures="rsa")
    with pytest.raises(RuntimeError, match=r"(?s)worker [01] failed.*signatures: 'rsa'"):
        run_deterministic(cfg, None, FLEET, workers=2)
