"""The nodes of the deterministic simulator: device agents, relays and the hub.

Each node wraps the real pure cores: :class:`~sync.protocol.SyncSession` and
:class:`~sync.replica.Replica` for every hop, :func:`~sync.signed.signed_write`
and :class:`~sync.signed.EntryVerifier` for hub-signed desired state,
:mod:`sync.relaying` batches between relay and hub, and the hub's own
:class:`~cloud_hub.ingest.BatchIngestor`. What is simulated is only the I/O
around them (a virtual network, virtual clocks, durable storage as memory that
survives a "restart") and the workloads (a ``sim`` driver: start, crash, stop).

Topology, as in production (DESIGN.md):

* device ↔ relay: one ``SyncSession`` pair per device over scopes
  ``device/<id>`` (written by the device) and ``desired/<id>`` (hub-signed),
  plus the device's ``events`` stream.
* relay → hub: every reliable message a relay accepted from a device goes,
  byte for byte, into the relay's outbox, forwarded in relay-signed ``BATCH``
  messages; the hub ingests them (verifying each device signature, merging,
  deduping) and answers ``BATCH_ACK``; only then the relay drops them.
* hub ↔ relay: one ``SyncSession`` pair per relay over the region's
  ``desired/<id>`` scopes; the relay fans changes out to its devices.
"""

from __future__ import annotations

import hashlib
import hmac
import random
from collections import Counter, deque
from collections.abc import Iterable
from typing import Any, Protocol

from cloud_hub.ingest import BatchIngestor, BatchRefusedError
from simulator.invariants import EventKey
from sync._ed25519 import RawPublicKey
from sync._exceptions import NovaCronError, SignatureError
from sync.dots import VersionVector
from sync.envelope import Envelope, decode_envelope_unverified, verify_envelope
from sync.hlc import HybridLogicalClock
from sync.keys import KeyRing, PrivateKey, Signer, private_key_from_seed
from sync.protocol import DELTAS, EVENTS, SNAPSHOT, Replica, SyncSession
from sync.relaying import (
    BATCH,
    BATCH_ACK,
    BatchItem,
    decode_batch,
    decode_batch_ack,
    encode_batch,
)
from sync.signed import EntryVerifier, signed_write, unwrap

__all__: list[str] = []

HUB = "hub"
FORWARDER = "~forwarder"
"""Pseudo-peer of a relay's outbox forwarder timer (its traffic goes to the hub)."""
STREAM = "events"
_RELIABLE_KIND = {DELTAS: "delta", SNAPSHOT: "delta", EVENTS: "event"}


def device_scope(device: str) -> str:
    """``device/<id>``: written by the device."""
    return f"device/{device}"


def desired_scope(device: str) -> str:
    """``desired/<id>``: written (signed) by the hub."""
    return f"desired/{device}"


def relay_id(region: str) -> str:
    """The relay node of ``region``."""
    return f"relay-{region}"


def is_signed(scope: str) -> bool:
    """Whether entries of ``scope`` must carry the hub's signature."""
    return scope.startswith("desired/")


def _node_seed(seed: int, name: str) -> bytes:
    return hashlib.sha256(f"nc-sim/{seed}/{name}".encode()).digest()


def sim_signer(seed: int, name: str, cache: VerifyCache | None = None) -> Signer:
    """A key fixed by the seed and the node name (same seed, same bytes).

    With ``cache``, every signature it makes is entered there as it is made
    (see :class:`RecordingSigner`).
    """
    raw = _node_seed(seed, name)
    if cache is None:
        return Signer(private_key_from_seed(raw))
    return RecordingSigner(private_key_from_seed(raw), cache)


class VerifyCache:
    """Successful Ed25519 verifications already done in this run, bounded.

    Ed25519 verification is a pure function of (public key, signature, bytes),
    so remembering successes is exact, not a shortcut around the check: a
    device envelope is verified by its relay and again by the hub, a desired
    entry by the relay and again by the device, a resent message again by
    its receiver; each (key, signature, bytes) is computed once. Failures are
    never cached. Past ``capacity`` the oldest half is forgotten (counted).
    """

    def __init__(self, capacity: int = 200_000) -> None:
        self.capacity = capacity
        self.seen: dict[tuple[bytes, bytes, bytes], None] = {}
        self.hits = 0
        self.misses = 0
        self.evicted = 0

    def remember(self, key: tuple[bytes, bytes, bytes]) -> None:
        if len(self.seen) >= self.capacity:
            drop = list(self.seen)[: self.capacity // 2]
            for k in drop:
                del self.seen[k]
            self.evicted += len(drop)
        self.seen[key] = None


class RecordingSigner(Signer):
    """A :class:`~sync.keys.Signer` that enters each signature it makes in the
    run's :class:`VerifyCache`.

    Exact, like the cache itself: a real Ed25519 signature this key made over
    these bytes verifies by construction, so a receiver holding this key need
    not recompute it. Bytes it did not sign (a forgery, garbage, a corrupted
    copy) miss the cache and are verified for real.
    """

    __slots__ = ("_cache",)

    def __init__(self, private_key: PrivateKey, cache: VerifyCache) -> None:
        super().__init__(private_key)
        self._cache = cache

    def sign(self, data: bytes) -> bytes:
        """Sign, and remember the signature as verified."""
        sig = self._private_key.sign(data)
        self._cache.remember(
            (self.public_key_bytes, sig, data if type(data) is bytes else bytes(data))
        )
        return sig


class CachingKeyRing(KeyRing):
    """A :class:`~sync.keys.KeyRing` sharing a :class:`VerifyCache` of successes."""

    __slots__ = ("_cache",)

    def __init__(self, cache: VerifyCache | None) -> None:
        super().__init__()
        self._cache = cache

    def verify(self, kid: str, data: bytes, sig: bytes) -> None:
        """As :meth:`KeyRing.verify`, computed once per (key, signature, bytes)."""
        cache = self._cache
        raw = self.get(kid)
        if cache is None or raw is None:
            super().verify(kid, data, sig)
            return
        key = (
            raw,
            sig if type(sig) is bytes else bytes(sig),
            data if type(data) is bytes else bytes(data),
        )
        if key in cache.seen:
            cache.hits += 1
            return
        super().verify(kid, data, sig)
        cache.misses += 1
        cache.remember(key)


def ring_of(*signers: Signer, cache: VerifyCache | None = None) -> KeyRing:
    """A key ring trusting ``signers`` (sharing ``cache`` of verifications)."""
    ring = CachingKeyRing(cache)
    for s in signers:
        ring.add(s.public_key_bytes, s.key_id)
    return ring


# -- modeled signatures ---------------------------------------------------------------------

_TAG_LEN = 64  # an Ed25519 signature's size, so every message keeps its real length


class ModeledKey:
    """A :class:`~sync.keys.PrivateKey` whose signature is a keyed BLAKE2b tag.

    Deterministic mode's stand-in for Ed25519: the same 64 bytes in the same
    place of every envelope and signed entry, made by the same
    :class:`~sync.keys.Signer` and checked by the same ``KeyRing.verify`` calls
    of the sync, relay and hub code, at a twentieth of the cost (a libsodium
    signature is about 20 µs, and a 10,000-device day makes some ten million).
    Unforgeable within the run as Ed25519 is: a tag needs the key's secret,
    which only its node holds; a forged, corrupted or garbage message fails
    :meth:`ModeledKeyRing.verify`. The public key is the real Ed25519 public
    key of the same seed, so key ids are those of an Ed25519 run.
    """

    __slots__ = ("_public", "_seed")

    def __init__(self, seed: bytes) -> None:
        self._seed = seed
        self._public = private_key_from_seed(seed).public_key()

    def sign(self, data: bytes) -> bytes:
        """The 64-byte tag of ``data``."""
        return hashlib.blake2b(data, digest_size=_TAG_LEN, key=self._seed).digest()

    def private_bytes_raw(self) -> bytes:
        """The 32-byte seed."""
        return self._seed

    def public_key(self) -> RawPublicKey:
        """The Ed25519 public key of the seed."""
        return self._public


class ModeledKeyRing(KeyRing):
    """A :class:`~sync.keys.KeyRing` that checks :class:`ModeledKey` tags.

    ``secrets`` maps a modeled public key to its seed (the run's
    :class:`Signatures`); a key not in it is verified as real Ed25519.
    """

    __slots__ = ("_secrets",)

    def __init__(self, secrets: dict[bytes, bytes]) -> None:
        super().__init__()
        self._secrets = secrets

    def verify(self, kid: str, data: bytes, sig: bytes) -> None:
        """As :meth:`KeyRing.verify`, for tags of modeled keys."""
        raw = self.get(kid)
        seed = None if raw is None else self._secrets.get(raw)
        if seed is None:
            super().verify(kid, data, sig)
            return
        tag = hashlib.blake2b(data, digest_size=_TAG_LEN, key=seed).digest()
        if not hmac.compare_digest(tag, bytes(sig)):
            raise SignatureError(f"invalid signature for key id {kid!r}")


class Signatures:
    """The run's keys: every node's :class:`~sync.keys.Signer` and key rings.

    ``mode`` ``"modeled"`` (the default of deterministic runs) signs with
    :class:`ModeledKey`; ``"ed25519"`` signs with real Ed25519 keys, each
    verification computed once per run when ``cache`` is set
    (:class:`VerifyCache`). Either way a node's key is fixed by the seed and
    its name, and a run's report is the same but for its ``signatures`` entry
    (tested).
    """

    MODES = ("modeled", "ed25519")

    def __init__(self, seed: int, mode: str = "modeled", *, cache: bool = True) -> None:
        if mode not in self.MODES:
            raise ValueError(f"signatures: {mode!r} is not one of {', '.join(self.MODES)}")
        self.seed = seed
        self.mode = mode
        self.cache = VerifyCache() if mode == "ed25519" and cache else None
        self._secrets: dict[bytes, bytes] = {}

    def signer(self, name: str) -> Signer:
        """The signer of node ``name``."""
        if self.mode == "ed25519":
            return sim_signer(self.seed, name, self.cache)
        seed = _node_seed(self.seed, name)
        signer = Signer(ModeledKey(seed))
        self._secrets[signer.public_key_bytes] = seed
        return signer

    def ring(self, *signers: Signer) -> KeyRing:
        """A key ring trusting ``signers``."""
        if self.mode == "ed25519":
            return ring_of(*signers, cache=self.cache)
        ring = ModeledKeyRing(self._secrets)
        for s in signers:
            ring.add(s.public_key_bytes, s.key_id)
        return ring

    def stats(self) -> dict[str, Any]:
        """The mode, and the verification cache's counts (the report keeps the mode only:
        the counts depend on how regions are grouped into workers)."""
        out: dict[str, Any] = {"mode": self.mode}
        if self.cache is not None:
            out.update(hits=self.cache.hits, misses=self.cache.misses, evicted=self.cache.evicted)
        return out


class Wire(Protocol):
    """What nodes need of the simulator around them."""

    def now_ms(self) -> int:
        """Virtual time."""
        ...

    def send(self, src: str, dst: str, data: bytes) -> None:
        """Put a message on the virtual network."""
        ...

    def wake(self, node: str, peer: str) -> None:
        """Ask for a tick of ``node``'s session with ``peer`` soon."""
        ...

    def dirty(self, replica: str, scope: str) -> None:
        """``replica``'s state of ``scope`` may have changed."""
        ...


class OffsetClock:
    """A node's wall clock: virtual time plus a skew (``clock_skew`` faults)."""

    def __init__(self, wire: Wire) -> None:
        self._wire = wire
        self.offset_ms = 0

    def now_ms(self) -> int:
        """Virtual time plus the skew."""
        return self._wire.now_ms() + self.offset_ms


class SimDevice:
    """An agent: its replica (the journal), one session with its relay, workloads.

    Durable across reconnects: the replica, the event stream, what runs. A new
    connection gets a new session (new HELLO, ``bd`` + 1) as the real link does.
    """

    def __init__(
        self,
        device_id: str,
        region: str,
        profile: str,
        *,
        signer: Signer,
        relay_keys: KeyRing,
        hub_keys: KeyRing,
        wire: Wire,
        event_capacity: int,
    ) -> None:
        self.id = device_id
        self.region = region
        self.profile = profile
        self.relay = relay_id(region)
        self.signer = signer
        self.relay_keys = relay_keys
        self.hub_keys = hub_keys
        self.wire = wire
        self.clock = OffsetClock(wire)
        self.replica = Replica(device_id, HybridLogicalClock(self.clock))
        self.scope = device_scope(device_id)
        self.desired = desired_scope(device_id)
        self.replica.scope(self.scope)
        self.replica.scope(self.desired)
        self.events = self.replica.stream(STREAM, event_capacity)
        self.bd = 0
        self.running: dict[str, dict[str, Any]] = {}
        self.restarts: Counter[str] = Counter()
        self.disk_full = False
        self.acked_vv = VersionVector()
        self.stats: Counter[str] = Counter()
        self._apply_pending = False
        self.connected = False
        """False until the first connection: the agent sends nothing before it."""
        self.session = self._new_session()

    def _new_session(self) -> SyncSession:
        self.bd += 1
        return SyncSession(
            self.replica,
            self.relay,
            self.signer,
            self.relay_keys,
            self.clock,
            scopes=[self.scope, self.desired],
            streams=[STREAM],
            bd_seq=self.bd,
            session_id=f"{self.id}#{self.bd}",
            on_change=self._changed,
            validate=EntryVerifier(self.hub_keys, is_signed),
        )

    def _send(self, out: list[bytes]) -> None:
        for data in out:
            self.wire.send(self.id, self.relay, data)

    def connect(self) -> None:
        """A new connection to the relay: a new session and its HELLO."""
        old = self.session.peer_vv.get(self.scope)
        if old is not None:
            self.acked_vv.merge(old)
        self.session = self._new_session()
        self.connected = True
        self._send(self.session.start())
        self.wire.wake(self.id, self.relay)

    def tick(self) -> bool:
        """Timers; return whether the session still has work."""
        if not self.connected:
            return False
        out = self.session.tick()
        self._send(out)
        return bool(out) or self.busy()

    def busy(self) -> bool:
        """Whether the session waits for something (acks, HELLO, event upload)."""
        s = self.session
        return s.unacked > 0 or not s.hello_confirmed or len(self.events) > 0

    def receive(self, data: bytes) -> None:
        """A message from the relay."""
        if not self.connected:
            self.stats["before_connect"] += 1
            return
        if self.disk_full:
            # The journal cannot record it: no ACK, the relay sends it again.
            self.stats["refused_disk_full"] += 1
            return
        try:
            out = self.session.receive(data)
        except NovaCronError as exc:
            self.stats[f"rejected_{type(exc).__name__}"] += 1
            return
        self._send(out)
        if self._apply_pending:
            self._apply_pending = False
            self.apply_desired()
        self.wire.wake(self.id, self.relay)

    def _changed(self, scope: str, entries: list[list[Any]] | None) -> None:
        self.wire.dirty(self.id, scope)
        if scope == self.desired:
            self._apply_pending = True

    # -- the sim driver --------------------------------------------------------------

    def _write(self, key: str, value: Any | None) -> None:
        if value is None:
            delta = self.replica.delete(self.scope, key)
        else:
            delta = self.replica.set(self.scope, key, value)
        self.wire.dirty(self.id, self.scope)
        if self.connected:  # otherwise the first HELLO exchange brings it
            self._send(self.session.local_update(self.scope, delta))
            self.wire.wake(self.id, self.relay)

    def _event(self, item: dict[str, Any]) -> None:
        if self.disk_full:
            self.stats["events_dropped_disk_full"] += 1
            return
        self.events.append(item)
        self.wire.wake(self.id, self.relay)

    def apply_desired(self) -> None:
        """Start, update or stop workloads to match the (verified) desired scope."""
        want: dict[str, dict[str, Any]] = {}
        for key, value in self.replica.scope(self.desired).items():
            spec = unwrap(value)
            if isinstance(spec, dict):
                want[key] = spec
        for name, spec in sorted(want.items()):
            if self.running.get(name) != spec:
                self.running[name] = spec
                self._write(f"reported/{name}", self._status(name, "running"))
                self._event({"k": "started", "w": name, "v": spec.get("version", "")})
        for name in sorted(set(self.running) - set(want)):
            del self.running[name]
            self._write(f"reported/{name}", None)
            self._event({"k": "stopped", "w": name})

    def _status(self, name: str, phase: str) -> dict[str, Any]:
        spec = self.running.get(name, {})
        return {
            "phase": phase,
            "version": spec.get("version", ""),
            "restarts": self.restarts[name],
        }

    def crash(self, rng: random.Random) -> None:
        """A workload exits unexpectedly and is restarted by the supervisor."""
        if not self.running or self.disk_full:
            return
        name = rng.choice(sorted(self.running))
        self.restarts[name] += 1
        self._event({"k": "exited", "w": name, "code": 137})
        self._write(f"reported/{name}", self._status(name, "running"))

    def status(self, n: int) -> None:
        """A periodic status report: state, so it must converge (unlike events)."""
        if self.disk_full:
            self.stats["status_skipped_disk_full"] += 1
            return
        self._write("status", {"n": n, "running": len(self.running)})

    def telemetry(self, n: int) -> None:
        """A periodic telemetry event."""
        self._event({"k": "tm", "n": n})

    def garbage(self, rng: random.Random) -> None:
        """Send bytes that are not an envelope (a ``garbage`` fault)."""
        self.stats["garbage_sent"] += 1
        self.wire.send(self.id, self.relay, rng.randbytes(rng.randrange(1, 200)))

    def acked_dots(self) -> VersionVector:
        """The device's own dots its relay acknowledged (any session)."""
        acked = self.acked_vv.copy()
        current = self.session.peer_vv.get(self.scope)
        if current is not None:
            acked.merge(current)
        return acked.meet(self.replica.scope(self.scope).context)


class SimRelay:
    """A regional relay: device sessions, a durable outbox to the hub, a hub session."""

    def __init__(
        self,
        region: str,
        devices: Iterable[SimDevice],
        *,
        signer: Signer,
        hub_keys: KeyRing,
        wire: Wire,
        outbox_capacity: int,
        keys: Signatures,
        batch_items: int = 500,
        window_items: int = 2_000,
        resend_ms: int = 5_000,
    ) -> None:
        self.region = region
        self.id = relay_id(region)
        self.signer = signer
        self.hub_keys = hub_keys
        self.wire = wire
        self.clock = OffsetClock(wire)
        self.replica = Replica(self.id, HybridLogicalClock(self.clock))
        self.device_keys = {d.id: keys.ring(d.signer) for d in devices}
        self.outbox: dict[int, BatchItem] = {}
        self.outbox_capacity = outbox_capacity
        self.unsent: deque[int] = deque()
        self.inflight: dict[int, int] = {}
        self.batch_items = batch_items
        self.window_items = window_items
        self.resend_ms = resend_ms
        self._next_id = 1
        self._batch_seq = 0
        self.epoch = 0
        self.stats: Counter[str] = Counter()
        self.device_sessions: dict[str, SyncSession] = {}
        self.hub_session: SyncSession
        self.restart(start=False)

    def _hub_session(self) -> SyncSession:
        return SyncSession(
            self.replica,
            HUB,
            self.signer,
            self.hub_keys,
            self.clock,
            scopes=[desired_scope(d) for d in sorted(self.device_keys)],
            bd_seq=self.epoch,
            session_id=f"{self.id}>hub#{self.epoch}",
            on_change=self._from_hub,
            validate=EntryVerifier(self.hub_keys, is_signed),
        )

    def _device_session(self, device: str) -> SyncSession:
        return SyncSession(
            self.replica,
            device,
            self.signer,
            self.device_keys[device],
            self.clock,
            scopes=[device_scope(device), desired_scope(device)],
            bd_seq=self.epoch,
            session_id=f"{self.id}>{device}#{self.epoch}",
            on_change=self._from_device,
            validate=EntryVerifier(self.hub_keys, is_signed),
        )

    def restart(self, *, start: bool = True) -> None:
        """A (re)start: new sessions and epoch; the outbox and replica survive."""
        self.epoch += 1
        self.device_sessions = {d: self._device_session(d) for d in sorted(self.device_keys)}
        self.inflight.clear()
        self.unsent = deque(sorted(self.outbox))
        self.reconnect_hub(start=start)
        self.wire.wake(self.id, FORWARDER)
        if start:
            # Devices learn of the new sessions and catch up on desired state.
            for device, session in self.device_sessions.items():
                self._send(device, session.start())
                self.wire.wake(self.id, device)

    def reconnect_hub(self, *, start: bool = True) -> None:
        """A new connection to the hub's broker."""
        self.epoch += 1
        self.hub_session = self._hub_session()
        if start:
            self._send(HUB, self.hub_session.start())
            self.wire.wake(self.id, HUB)

    def _send(self, dst: str, out: list[bytes]) -> None:
        for data in out:
            self.wire.send(self.id, dst, data)

    def _from_device(self, scope: str, entries: list[list[Any]] | None) -> None:
        self.wire.dirty(self.id, scope)

    def _from_hub(self, scope: str, entries: list[list[Any]] | None) -> None:
        self.wire.dirty(self.id, scope)
        device = scope.split("/", 1)[1]
        session = self.device_sessions.get(device)
        if session is None:
            return
        wire_entries = self.replica.scope(scope).entries_wire() if entries is None else entries
        self._send(device, session.send_entries(scope, wire_entries))
        self.wire.wake(self.id, device)

    def session_for(self, peer: str) -> SyncSession | None:
        """The session with ``peer`` (a device id or the hub)."""
        return self.hub_session if peer == HUB else self.device_sessions.get(peer)

    def tick(self, peer: str) -> bool:
        """Timers of the session with ``peer``, or of the forwarder (``FORWARDER``)."""
        if peer == FORWARDER:
            self.forward()
            return bool(self.outbox)
        session = self.session_for(peer)
        if session is None:
            return False
        out = session.tick()
        self._send(peer, out)
        return bool(out) or session.unacked > 0 or not session.hello_confirmed

    def receive(self, src: str, data: bytes) -> None:
        """A message from a device or the hub."""
        if src == HUB:
            self._receive_hub(data)
            return
        session = self.device_sessions.get(src)
        if session is None:
            self.stats["unknown_device"] += 1
            return
        try:
            peek = decode_envelope_unverified(data)
        except NovaCronError:
            self.stats["garbage"] += 1
            return
        kind = _RELIABLE_KIND.get(peek.type)
        if kind is not None and len(self.outbox) >= self.outbox_capacity:
            # Full: no ACK, the device keeps it and sends it again (counted).
            self.stats["outbox_full"] += 1
            return
        try:
            out = session.receive_envelope(peek)
        except NovaCronError as exc:
            self.stats[f"rejected_{type(exc).__name__}"] += 1
            return
        inbox = self.replica.inbox.get((src, STREAM))
        if inbox is not None:
            inbox.items.clear()  # the outbox holds them; the cursor is what counts
        if kind == "delta" and not self._own_scope(peek, src):
            # A device's echo of a scope it does not write (desired state it
            # holds): merged above if it verified, but not the hub's business.
            self.stats["echo_not_forwarded"] += 1
            kind = None
        if kind is not None:
            item_id = self._next_id
            self._next_id += 1
            self.outbox[item_id] = BatchItem(item_id, src, kind, bytes(data))
            self.unsent.append(item_id)
            self.wire.wake(self.id, FORWARDER)
        self._send(src, out)
        self.wire.wake(self.id, src)

    @staticmethod
    def _own_scope(env: Envelope, device: str) -> bool:
        body: Any = env.decode_body()  # verified by the session already
        return isinstance(body, dict) and body.get("sc") == device_scope(device)

    def _receive_hub(self, data: bytes) -> None:
        try:
            peek = decode_envelope_unverified(data)
            if peek.type == BATCH_ACK:
                verify_envelope(peek, self.hub_keys)
                _, ids = decode_batch_ack(peek)
                for i in ids:
                    self.outbox.pop(i, None)
                    self.inflight.pop(i, None)
                return
            out = self.hub_session.receive_envelope(peek)
        except NovaCronError as exc:
            self.stats[f"hub_rejected_{type(exc).__name__}"] += 1
            return
        self._send(HUB, out)
        self.wire.wake(self.id, HUB)

    def forward(self) -> None:
        """Send what the outbox holds, a window at a time; resend the stale."""
        now = self.wire.now_ms()
        stale = [i for i, sent in self.inflight.items() if now - sent >= self.resend_ms]
        for i in sorted(stale, reverse=True):
            del self.inflight[i]
            if i in self.outbox:
                self.unsent.appendleft(i)
                self.stats["resent_items"] += 1
        while self.unsent and len(self.inflight) < self.window_items:
            items: list[BatchItem] = []
            while self.unsent and len(items) < self.batch_items:
                i = self.unsent.popleft()
                if i in self.outbox and i not in self.inflight:
                    items.append(self.outbox[i])
                    self.inflight[i] = now
            if not items:
                break
            self._batch_seq += 1
            data = encode_batch(
                self.signer,
                src=self.id,
                seq=self._batch_seq,
                ts=self.replica.hlc.now(),
                epoch=self.epoch,
                items=items,
            )
            self.stats["batches"] += 1
            self.wire.send(self.id, HUB, data)


class SimHub:
    """The hub: ingest of relay batches, hub-signed desired state, relay sessions.

    A deterministic run makes one per region (the hub's shard for that region's
    relay and devices; see :mod:`simulator.deterministic`), but nothing here
    assumes it: given several relays, it serves them all.

    Args:
        dedupe: ``False`` plants a bug: events are stored as they arrive in
            batches, duplicates included, as a hub without dedupe would.
    """

    def __init__(
        self,
        relays: Iterable[SimRelay],
        devices: Iterable[SimDevice],
        *,
        signer: Signer,
        wire: Wire,
        keys: Signatures,
        dedupe: bool = True,
    ) -> None:
        self.signer = signer
        self.wire = wire
        self.dedupe = dedupe
        self.clock = OffsetClock(wire)
        self.replica = Replica(HUB, HybridLogicalClock(self.clock))
        relays = list(relays)
        self.relay_keys = {r.id: keys.ring(r.signer) for r in relays}
        self.region_devices = {r.id: sorted(r.device_keys) for r in relays}
        self.device_relay = {d.id: d.relay for d in devices}
        self.ingestor = BatchIngestor(
            self.replica,
            relays={r.id: (r.region, self.relay_keys[r.id]) for r in relays},
            hub_id=HUB,
        )
        for d in devices:
            self.ingestor.set_device_keys(d.id, keys.ring(d.signer))
        self.stored: list[EventKey] = []
        self.stats: Counter[str] = Counter()
        self._seq = 0
        self.incarnation = 0
        self.sessions: dict[str, SyncSession] = {}
        self.restart(start=False)

    def restart(self, *, start: bool = True) -> None:
        """A (re)start: new relay sessions; the store (replica, cursors) survives."""
        self.incarnation += 1
        self.sessions = {}
        for relay, devices in sorted(self.region_devices.items()):
            self.sessions[relay] = SyncSession(
                self.replica,
                relay,
                self.signer,
                self.relay_keys[relay],
                self.clock,
                scopes=[desired_scope(d) for d in devices],
                bd_seq=self.incarnation,
                session_id=f"hub>{relay}#{self.incarnation}",
                on_change=lambda scope, _e: self.wire.dirty(HUB, scope),
            )
            if start:
                self._send(relay, self.sessions[relay].start())
                self.wire.wake(HUB, relay)

    def _send(self, dst: str, out: list[bytes]) -> None:
        for data in out:
            self.wire.send(HUB, dst, data)

    def start(self) -> None:
        """Announce every relay session (HELLO)."""
        for relay, session in self.sessions.items():
            self._send(relay, session.start())
            self.wire.wake(HUB, relay)

    def tick(self, relay: str) -> bool:
        """Timers of the session with ``relay``."""
        session = self.sessions[relay]
        out = session.tick()
        self._send(relay, out)
        return bool(out) or session.unacked > 0 or not session.hello_confirmed

    def set_desired(self, device: str, key: str, value: Any) -> None:
        """Write hub-signed ``desired/<device>[key] = value`` and send it down."""
        scope = desired_scope(device)
        delta = signed_write(self.replica, scope, key, value, self.signer)
        self.wire.dirty(HUB, scope)
        relay = self.device_relay[device]
        self._send(relay, self.sessions[relay].local_update(scope, delta))
        self.wire.wake(HUB, relay)

    def receive(self, src: str, data: bytes) -> None:
        """A message from a relay: a ``BATCH`` or sync protocol."""
        try:
            peek = decode_envelope_unverified(data)
        except NovaCronError:
            self.stats["garbage"] += 1
            return
        if peek.type == BATCH:
            self._batch(src, data, peek)
            return
        session = self.sessions.get(src)
        if session is None:
            return
        try:
            out = session.receive_envelope(peek)
        except NovaCronError as exc:
            self.stats[f"rejected_{type(exc).__name__}"] += 1
            return
        self._send(src, out)
        self.wire.wake(HUB, src)

    def _batch(self, src: str, data: bytes, peek: Envelope) -> None:
        try:
            result = self.ingestor.ingest_envelope(peek, self.wire.now_ms())
        except BatchRefusedError as exc:
            self.stats[f"refused_{exc.reason}"] += 1
            return
        if self.dedupe:
            for (device, stream), run in sorted(result.events.items()):
                self.stored += [
                    EventKey(device, stream, run.start + i) for i in range(len(run.items))
                ]
        else:
            self._store_naively(data, src)
        for scope in sorted(result.changed):
            self.wire.dirty(HUB, scope)
        self.stats["events"] += sum(len(r.items) for r in result.events.values())
        self._seq += 1
        ack = self.ingestor.ack(result, self.signer, self._seq, self.replica.hlc.now())
        self.wire.send(HUB, src, ack)

    def _store_naively(self, data: bytes, src: str) -> None:
        """The planted bug: every event of every EVENTS item, seen before or not."""
        for item in decode_batch(data, self.relay_keys[src]).items:
            if item.kind != "event":
                continue
            env = decode_envelope_unverified(item.payload)
            body: Any = env.decode_body()
            self.stored += [
                EventKey(item.device, body["st"], body["from"] + i)
                for i in range(len(body["items"]))
            ]
