"""Placement: which devices a deployment lands on. Pure, synchronous, deterministic.

:func:`place` takes a :class:`~cloud_hub.manifests.Deployment` and a snapshot of
the fleet as :class:`DeviceView` records and returns a :class:`Placement`. No I/O,
no clock, no randomness: the same input gives the same output, whatever the order
of the devices, so the simulator's deterministic mode and every hub replica agree.

**Filters**, in this order; a device is rejected with the first reason that holds
(:data:`REJECT_REASONS`): ``region``, ``profile``, ``arch``, ``labels``,
``driver`` (the selector's drivers and the workload's own), ``gpu``, ``offline``
(by default only for ``replicas``; an ``each`` deployment lands on offline
devices too, which get it when they return), then free resources: ``cpu`` and
``memory`` (profile capacity minus what is allocated must cover the request).

**Scores** order the candidates. ``replicas`` takes the first N; ``each`` takes every
feasible device, in the same order, so a rollout's early waves sample every region:

1. *Region spread* is strict: candidates are taken round by round, one per region
   per round, so region counts never differ by more than one unless a region runs
   out of feasible devices. A partitioned region then loses as few replicas as the
   fleet allows.
2. Within a round, the higher *key* wins: ``0.5 * headroom + 0.5 * reliability``
   minus ``0.2`` for every replica already taken in the same region on the same
   firmware profile (a soft *profile spread*: a much roomier or more reliable
   device may still share a profile). ``headroom`` is the free fraction of the
   scarcer of CPU and memory after placing; ``reliability`` is the device's
   recent uptime fraction.
3. Ties are broken by a stable hash of ``(deployment name, device id)``
   (BLAKE2b, not Python's randomised ``hash``), so a fleet of identical devices
   gives each deployment a different, reproducible set, then by device id.

The greedy "take the best, penalise its region and profile, repeat" is computed in
closed form: a candidate's penalty depends only on its rank among better
candidates of its own region and profile, so one sort per region and one
``heapq.nsmallest`` give the greedy's answer in O(n log n).

Devices already running the deployment (``current``) are kept first when they
still match (no resource check: their reservation is already in ``allocated``),
and the spread counts them; new replicas fill the remainder.

**Lost replicas**: :func:`rebalance` moves replicas off devices lost longer than
``lost_after_s``; :func:`dedupe_replicas` decides which copy survives when such a
device comes back (the newest placement: see its docstring for why).

Performance: plain loops over slotted dataclasses and tuples, no pydantic in the
loop; one deployment over 10,000 devices is placed in a few tens of
milliseconds (``bench/hub_bench.py``, figure ``placement_10k_ms``).
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import Final, Literal, Self

from cloud_hub._exceptions import PlacementError
from cloud_hub.manifests import Deployment, PlacementMode
from firmware_profiles import FirmwareProfile
from sync.models import Resources

__all__ = [
    "Assignment",
    "Dedupe",
    "DeviceView",
    "PROFILE_PENALTY",
    "Placement",
    "REJECT_REASONS",
    "Rebalance",
    "RejectReason",
    "WEIGHT_HEADROOM",
    "WEIGHT_RELIABILITY",
    "apply_placement",
    "dedupe_replicas",
    "place",
    "rebalance",
    "tiebreak",
]

RejectReason = Literal[
    "region", "profile", "arch", "labels", "driver", "gpu", "offline", "cpu", "memory"
]

REJECT_REASONS: Final[tuple[RejectReason, ...]] = (
    "region",
    "profile",
    "arch",
    "labels",
    "driver",
    "gpu",
    "offline",
    "cpu",
    "memory",
)
"""Every rejection reason, in the order the filters are applied."""

WEIGHT_HEADROOM: Final = 0.5
"""Weight of the free fraction left after placing, in a replica candidate's key."""

WEIGHT_RELIABILITY: Final = 0.5
"""Weight of the device's reliability (recent uptime fraction) in the key."""

PROFILE_PENALTY: Final = 0.2
"""Key penalty per replica already on the same profile in the same region."""


@dataclass(frozen=True, slots=True)
class DeviceView:
    """What placement needs to know about one device; a plain, cheap record.

    Attributes:
        id: the device id.
        region: the region it belongs to.
        profile: its firmware profile name.
        arch: CPU architecture.
        drivers: workload drivers available on it.
        gpu: whether it has a usable GPU.
        cpu_millis: CPU capacity (profile cores x 1000).
        memory_mb: memory capacity.
        allocated_cpu_millis: CPU already reserved by placed workloads.
        allocated_memory_mb: memory already reserved by placed workloads.
        labels: its labels.
        online: whether it is connected right now.
        reliability: recent uptime fraction, 0..1.
    """

    id: str
    region: str
    profile: str
    arch: str
    drivers: frozenset[str]
    gpu: bool
    cpu_millis: int
    memory_mb: int
    allocated_cpu_millis: int = 0
    allocated_memory_mb: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    online: bool = True
    reliability: float = 1.0

    @classmethod
    def from_profile(
        cls,
        device_id: str,
        region: str,
        profile: FirmwareProfile,
        *,
        labels: Mapping[str, str] | None = None,
        allocated: Resources | None = None,
        online: bool = True,
        reliability: float = 1.0,
    ) -> Self:
        """A view whose capacity, architecture, drivers and GPU come from ``profile``.

        Args:
            device_id: the device id.
            region: its region.
            profile: its firmware profile.
            labels: its labels.
            allocated: what placed workloads already reserve on it.
            online: whether it is connected.
            reliability: recent uptime fraction, 0..1.
        """
        return cls(
            id=device_id,
            region=region,
            profile=profile.name,
            arch=profile.arch,
            drivers=frozenset(profile.drivers),
            gpu=profile.gpu,
            cpu_millis=profile.cpu_cores * 1000,
            memory_mb=profile.memory_mb,
            allocated_cpu_millis=allocated.cpu_millis if allocated else 0,
            allocated_memory_mb=allocated.memory_mb if allocated else 0,
            labels=dict(labels or {}),
            online=online,
            reliability=reliability,
        )

    @property
    def free_cpu_millis(self) -> int:
        """CPU capacity not yet reserved."""
        return self.cpu_millis - self.allocated_cpu_millis

    @property
    def free_memory_mb(self) -> int:
        """Memory not yet reserved."""
        return self.memory_mb - self.allocated_memory_mb


@dataclass(frozen=True, slots=True)
class Placement:
    """The outcome of :func:`place`.

    Attributes:
        deployment: the deployment's name.
        mode: ``each`` or ``replicas``.
        devices: chosen device ids in placement order: kept ones first, then the
            others in the order the spread-aware greedy takes them (region
            round-robin, best key first). Rollout waves take targets in this order.
        wanted: replicas asked for (``None`` in ``each`` mode).
        cpu_millis: CPU reserved per copy.
        memory_mb: memory reserved per copy.
        kept: chosen devices that were already running the deployment; a prefix
            of ``devices``.
        feasible: devices that passed every filter (kept ones included).
        rejected: rejection reason per rejected device id.
        rejections: how many devices each reason rejected (only reasons that did).
    """

    deployment: str
    mode: PlacementMode
    devices: tuple[str, ...]
    wanted: int | None
    cpu_millis: int
    memory_mb: int
    kept: tuple[str, ...] = ()
    feasible: int = 0
    rejected: Mapping[str, RejectReason] = field(default_factory=dict)
    rejections: Mapping[RejectReason, int] = field(default_factory=dict)

    @property
    def shortfall(self) -> int:
        """Replicas that could not be placed for want of feasible devices."""
        return 0 if self.wanted is None else max(0, self.wanted - len(self.devices))

    @property
    def added(self) -> tuple[str, ...]:
        """Chosen devices that were not running the deployment yet, in placement order."""
        kept = set(self.kept)
        return tuple(d for d in self.devices if d not in kept)


def tiebreak(deployment: str, device_id: str) -> int:
    """Stable 64-bit hash of ``(deployment, device_id)`` that breaks score ties.

    Args:
        deployment: the deployment's name.
        device_id: the device id.
    """
    digest = blake2b(f"{deployment}\x00{device_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


# A replica candidate: (score, tiebreak, region, profile, device id).
_Candidate = tuple[float, int, str, str, str]


def _select(
    candidates: Iterable[_Candidate],
    n: int,
    region_taken: Mapping[str, int],
    profile_taken: Mapping[tuple[str, str], int],
) -> list[_Candidate]:
    """The ``n`` candidates the spread-aware greedy picks, in closed form.

    ``region_taken`` and ``profile_taken`` count replicas already placed (kept),
    so new picks spread around them.
    """
    if n <= 0:
        return []
    by_region: dict[str, list[_Candidate]] = {}
    for cand in candidates:
        group = by_region.get(cand[2])
        if group is None:
            by_region[cand[2]] = [cand]
        else:
            group.append(cand)
    # (region round, -key, -tiebreak, device id): smallest first. Rounds make the
    # region spread strict; the device id settles an exact tie, which a 64-bit
    # hash makes all but impossible, independently of the input order.
    ranked: list[tuple[int, float, int, str, _Candidate]] = []
    for region, group in by_region.items():
        # Best first; the device id makes the order total whatever the input order.
        group.sort(key=lambda c: (-c[0], -c[1], c[4]))
        profile_rank: dict[str, int] = {}
        keyed: list[tuple[float, int, str, _Candidate]] = []
        for cand in group:
            rank = profile_rank.get(cand[3])
            if rank is None:
                rank = profile_taken.get((region, cand[3]), 0)
            profile_rank[cand[3]] = rank + 1
            keyed.append((PROFILE_PENALTY * rank - cand[0], -cand[1], cand[4], cand))
        keyed.sort()
        base = region_taken.get(region, 0)
        for i, (neg_key, neg_tie, dev, cand) in enumerate(keyed):
            ranked.append((base + i, neg_key, neg_tie, dev, cand))
    return [r[4] for r in heapq.nsmallest(n, ranked)]


def place(
    deployment: Deployment,
    devices: Sequence[DeviceView],
    *,
    current: Collection[str] = (),
    include_offline: bool | None = None,
    replicas: int | None = None,
) -> Placement:
    """Choose the devices ``deployment`` runs on.

    Args:
        deployment: the deployment to place.
        devices: the fleet; ``allocated_*`` must already include every placed
            workload (this deployment's own reservation on ``current`` devices too).
        current: devices already running this deployment; kept when they still
            match, without a resource check.
        include_offline: whether offline devices may be chosen; by default yes for
            ``each`` (they catch up when they return), no for ``replicas``.
        replicas: override the manifest's replica count (``rebalance`` uses it).

    Returns:
        The chosen devices, with the reason every other device was rejected.

    Raises:
        PlacementError: two devices share an id.
    """
    spec = deployment.spec
    name = deployment.metadata.name
    selector = spec.selector
    resources = spec.effective_resources
    req_cpu, req_mem = resources.cpu_millis, resources.memory_mb
    mode = spec.mode
    wanted = (replicas if replicas is not None else spec.replicas) if mode == "replicas" else None
    if include_offline is None:
        include_offline = mode == "each"
    regions = frozenset(selector.regions) or None
    profiles = frozenset(selector.profiles) or None
    arches = frozenset(selector.arch) or None
    label_items = tuple(selector.labels.items())
    need_drivers = spec.required_drivers
    gpu = selector.gpu
    current_set = frozenset(current)

    rejected: dict[str, RejectReason] = {}
    kept: list[DeviceView] = []
    fresh: list[DeviceView] = []
    seen: set[str] = set()
    for dev in devices:
        dev_id = dev.id
        if dev_id in seen:
            raise PlacementError(f"device {dev_id!r} appears twice", deployment=name)
        seen.add(dev_id)
        if regions is not None and dev.region not in regions:
            rejected[dev_id] = "region"
        elif profiles is not None and dev.profile not in profiles:
            rejected[dev_id] = "profile"
        elif arches is not None and dev.arch not in arches:
            rejected[dev_id] = "arch"
        elif label_items and not _labels_match(dev.labels, label_items):
            rejected[dev_id] = "labels"
        elif not need_drivers <= dev.drivers:
            rejected[dev_id] = "driver"
        elif gpu is not None and dev.gpu is not gpu:
            rejected[dev_id] = "gpu"
        elif not dev.online and not include_offline:
            rejected[dev_id] = "offline"
        elif dev_id in current_set:
            kept.append(dev)
        elif dev.cpu_millis - dev.allocated_cpu_millis < req_cpu:
            rejected[dev_id] = "cpu"
        elif dev.memory_mb - dev.allocated_memory_mb < req_mem:
            rejected[dev_id] = "memory"
        else:
            fresh.append(dev)

    # Kept copies are already reserved: their headroom is what is left now.
    kept_c = [_candidate(name, d, 0, 0) for d in kept]
    fresh_c = [_candidate(name, d, req_cpu, req_mem) for d in fresh]
    if wanted is None:
        # Every feasible device, but in spread order, so a rollout's first wave
        # (which takes targets in placement order) samples every region.
        wanted_kept, wanted_fresh = len(kept_c), len(fresh_c)
    else:
        wanted_kept = min(wanted, len(kept_c))
        wanted_fresh = wanted - wanted_kept
    picked_kept = _select(kept_c, wanted_kept, {}, {})
    region_taken: dict[str, int] = {}
    profile_taken: dict[tuple[str, str], int] = {}
    for cand in picked_kept:
        region_taken[cand[2]] = region_taken.get(cand[2], 0) + 1
        profile_taken[cand[2], cand[3]] = profile_taken.get((cand[2], cand[3]), 0) + 1
    picked = _select(fresh_c, wanted_fresh, region_taken, profile_taken)
    chosen_kept = [c[4] for c in picked_kept]
    chosen = chosen_kept + [c[4] for c in picked]

    counts: dict[RejectReason, int] = {}
    for reason in rejected.values():
        counts[reason] = counts.get(reason, 0) + 1
    return Placement(
        deployment=name,
        mode=mode,
        devices=tuple(chosen),
        wanted=wanted,
        cpu_millis=req_cpu,
        memory_mb=req_mem,
        kept=tuple(chosen_kept),
        feasible=len(kept) + len(fresh),
        rejected=rejected,
        rejections={r: counts[r] for r in REJECT_REASONS if r in counts},
    )


def _labels_match(labels: Mapping[str, str], wanted: tuple[tuple[str, str], ...]) -> bool:
    return all(labels.get(key) == value for key, value in wanted)


def _candidate(name: str, dev: DeviceView, req_cpu: int, req_mem: int) -> _Candidate:
    cpu_cap, mem_cap = dev.cpu_millis, dev.memory_mb
    cpu_free = (cpu_cap - dev.allocated_cpu_millis - req_cpu) / cpu_cap if cpu_cap > 0 else 0.0
    mem_free = (mem_cap - dev.allocated_memory_mb - req_mem) / mem_cap if mem_cap > 0 else 0.0
    headroom = max(0.0, min(cpu_free, mem_free))
    reliability = min(1.0, max(0.0, dev.reliability))
    score = WEIGHT_HEADROOM * headroom + WEIGHT_RELIABILITY * reliability
    return (score, tiebreak(name, dev.id), dev.region, dev.profile, dev.id)


def apply_placement(devices: Iterable[DeviceView], placement: Placement) -> list[DeviceView]:
    """The fleet after reserving ``placement``'s resources on its added devices.

    Devices the placement kept already hold the reservation and are unchanged.

    Args:
        devices: the fleet the placement was computed over.
        placement: the result of :func:`place`.

    Returns:
        The devices in the same order, with ``allocated_*`` updated.
    """
    added = set(placement.added)
    out: list[DeviceView] = []
    for dev in devices:
        if dev.id in added:
            out.append(
                dataclasses.replace(
                    dev,
                    allocated_cpu_millis=dev.allocated_cpu_millis + placement.cpu_millis,
                    allocated_memory_mb=dev.allocated_memory_mb + placement.memory_mb,
                )
            )
        else:
            out.append(dev)
    return out


@dataclass(frozen=True, slots=True, order=True)
class Assignment:
    """One replica of a ``replicas`` deployment placed on one device.

    Attributes:
        slot: which replica (0 .. N-1); a slot has exactly one live copy.
        device_id: the device running it.
        generation: the hub's placement counter when the copy was placed; a
            later placement has a larger generation.
    """

    slot: int
    device_id: str
    generation: int


@dataclass(frozen=True, slots=True)
class Rebalance:
    """The outcome of :func:`rebalance`.

    Attributes:
        assignments: the new desired set, one per slot, sorted by slot.
        moved: ``(old, new)`` for every replica moved off a lost device.
        stranded: replicas on lost devices left in place: no feasible device
            could take them (retried on the next call).
        placement: the placement of the replacements (with rejection reasons).
    """

    assignments: tuple[Assignment, ...]
    moved: tuple[tuple[Assignment, Assignment], ...]
    stranded: tuple[Assignment, ...]
    placement: Placement


def rebalance(
    deployment: Deployment,
    devices: Sequence[DeviceView],
    assignments: Iterable[Assignment],
    lost_for_s: Mapping[str, float],
    *,
    lost_after_s: float,
    generation: int,
) -> Rebalance:
    """Move replicas off devices lost longer than ``lost_after_s``.

    Replacements are chosen by :func:`place` among the remaining feasible devices
    (never a lost one, never one already holding a replica), spreading around the
    replicas that stay. A device lost for less than ``lost_after_s`` keeps its
    replica: a short outage is not worth a move.

    Args:
        deployment: a ``replicas`` deployment.
        devices: the fleet; ``allocated_*`` include the current replicas.
        assignments: the current desired set, one per slot.
        lost_for_s: seconds each unreachable device has been lost (absent: online).
        lost_after_s: how long a device must be lost before its replica moves.
        generation: the placement counter for the new copies; must exceed every
            current assignment's, so :func:`dedupe_replicas` can order them.

    Returns:
        The new desired set, what moved and what could not.

    Raises:
        PlacementError: the deployment is not ``replicas``, a slot appears twice,
            or ``generation`` does not exceed the current ones.
    """
    name = deployment.metadata.name
    if deployment.spec.mode != "replicas":
        raise PlacementError("only replicas deployments can be rebalanced", deployment=name)
    current = sorted(assignments)
    slots = [a.slot for a in current]
    if len(set(slots)) != len(slots):
        raise PlacementError("a slot appears twice in the assignments", deployment=name)
    if current and generation <= max(a.generation for a in current):
        raise PlacementError(
            f"generation {generation} must exceed the current assignments'", deployment=name
        )
    lost = {dev for dev, secs in lost_for_s.items() if secs >= lost_after_s}
    staying = [a for a in current if a.device_id not in lost]
    moving = [a for a in current if a.device_id in lost]
    candidates = [d for d in devices if d.id not in lost]
    staying_ids = {a.device_id for a in staying}
    placement = place(
        deployment,
        candidates,
        current=staying_ids,
        replicas=len(staying_ids) + len(moving),
    )
    new_devices = list(placement.added[: len(moving)])
    moved = tuple(
        (old, Assignment(slot=old.slot, device_id=dev, generation=generation))
        for old, dev in zip(moving, new_devices, strict=False)
    )
    stranded = tuple(moving[len(new_devices) :])
    result = sorted([*staying, *(new for _, new in moved), *stranded])
    return Rebalance(assignments=tuple(result), moved=moved, stranded=stranded, placement=placement)


@dataclass(frozen=True, slots=True)
class Dedupe:
    """The outcome of :func:`dedupe_replicas`.

    Attributes:
        keep: the copies that survive, sorted.
        remove: the copies to stop and delete, sorted.
    """

    keep: tuple[Assignment, ...]
    remove: tuple[Assignment, ...]


def dedupe_replicas(assignments: Iterable[Assignment], returned_device: str) -> Dedupe:
    """Decide which copy survives when a lost device comes back with its replica.

    ``assignments`` holds the hub's desired set plus what the returned device
    reports running. For every slot the returned device holds, exactly one copy
    survives: **the newest placement** (largest ``generation``); on an equal
    generation the copy that is not on the returned device, then the smallest
    device id. Slots the returned device does not hold are left alone.

    Why the newest and not the original:

    * It is what the desired-state CRDT already says. When the replica moved, the
      hub deleted it from the lost device's scope (a tombstone newer than the
      original write); when the device syncs after the partition, the merge
      removes its copy by itself. Keeping the original would need two new hub
      writes (undo the move, stop the replacement) racing the device's sync.
    * The replacement has been serving while the device was away, on a device
      chosen against the current fleet; stopping it for the returning one
      interrupts a healthy replica to favour one that just proved unreliable, and
      a flapping device would ping-pong the replica.
    * It needs no clock: generations are the hub's own counter, so every hub
      replica and the simulator reach the same answer.

    Args:
        assignments: desired and reported copies of one deployment's replicas.
        returned_device: the device that came back.

    Returns:
        Which copies to keep and which to remove; every input copy is in one.
    """
    copies = sorted(set(assignments))
    slots = {a.slot for a in copies if a.device_id == returned_device}
    best: dict[int, Assignment] = {}
    for a in copies:
        if a.slot not in slots:
            continue
        held = best.get(a.slot)
        if held is None or _survivor_key(a, returned_device) < _survivor_key(held, returned_device):
            best[a.slot] = a
    survivors = set(best.values())
    keep = tuple(a for a in copies if a.slot not in slots or a in survivors)
    remove = tuple(a for a in copies if a.slot in slots and a not in survivors)
    return Dedupe(keep=keep, remove=remove)


def _survivor_key(a: Assignment, returned_device: str) -> tuple[int, bool, str]:
    """Smallest wins: newest generation, then not the returned device, then id."""
    return (-a.generation, a.device_id == returned_device, a.device_id)
