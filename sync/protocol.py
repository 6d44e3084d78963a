"""The sync protocol: a pure state machine, bytes in and bytes out.

One :class:`SyncSession` talks to one peer on behalf of a :class:`Replica` (the
CRDT scopes and event streams of one node). It does no I/O and reads time only
from the injected clock, so the same code runs over MQTT, over the simulator's
virtual network and in unit tests; the caller moves the bytes::

    session = SyncSession(replica, "relay-1", signer, keyring, clock)
    send(session.start())                 # HELLO
    send(session.receive(data))           # for every message from the peer
    send(session.tick())                  # every few hundred ms
    send(session.local_update("device/d1", delta))

Messages (the envelope ``type``; bodies are msgpack maps with short keys, every
one carrying the sender's session id ``s``):

``HELLO``    ``{s, bd, r, ps, vv: {scope: vector}, ev: {stream: next_seq}}``: the
             sender's version vector per scope and, per stream it receives, the
             next event seq it wants. ``bd`` is the birth/death sequence; ``r``
             asks for a HELLO back; ``ps`` is the peer session it knows of.
             Answered with the deltas (or a snapshot) the announcer lacks.
``DELTAS``   ``{s, sc, d: [entry, ...], c}``: LWW entries
             ``[key, ts, origin, counter, deleted, value]`` of scope ``sc``;
             ``c`` optionally adds dots the batch covers but whose writes were
             superseded (a wire-form version vector, or nil).
``SNAPSHOT`` ``{s, sc, st}``: one chunk of the state of scope ``sc``, sent
             instead of deltas to a peer whose vector does not cover the
             tombstones collected here ("rebirth"). ``st`` is an
             :meth:`LwwMap.to_wire` state merged by causal join, so deleted keys
             never come back (see "Snapshot chunks" below).
``EVENTS``   ``{s, st, from, first, items}``: events ``from, from + 1, ...`` of
             stream ``st``; ``first`` is the oldest seq the sender still holds.
             A batch that does not follow on is left unacknowledged (resent).
``ACK``      ``{s, ps, a, vv, ev}``: acknowledges the reliable messages with the
             envelope seqs in ``a`` and reports the receiver's vectors for the
             scopes and cursors for the streams they touched.

``DELTAS``, ``SNAPSHOT`` and ``EVENTS`` are reliable: kept until acknowledged
and resent, byte for byte, after a timeout that doubles up to a cap (with a
deterministic jitter). Duplicates are harmless because merges are idempotent.
Every envelope carries a per-session sequence number; a gap that is not filled
within ``gap_timeout_ms`` (the lost message was not a resent one, or the peer
restarted) makes the session send a new HELLO, which brings back whatever is
missing. A HELLO is resent until the peer acknowledges the session.

Size: no envelope exceeds the 256 KiB cap. Entry batches (``DELTAS``,
``SNAPSHOT``) are cut at ``max_batch`` entries and halved again while a body
packs to more than ``max_body_bytes``; context dots too many for one message are
cut into pieces that travel in messages of their own (``sync/_chunks.py``).
``EVENTS`` batches shrink the same way. An entry or event too large for any
envelope cannot be sent: it is counted in :attr:`SessionStats.oversize` and
logged, and the peer keeps lacking it (bound values where they are written).

Snapshot chunks: a full state does not fit one envelope past a few thousand
keys, so a snapshot is a series of chunks, each reliable on its own and each a
valid state that may be merged alone, in any order, any number of times. A
chunk's context claims exactly the dots of its own entries, plus (in the
trailing chunks) dots the sender has seen but holds no entry for: writes it
overwrote, and tombstones it collected. It never claims the dot of an entry
sent in another chunk, so the causal join neither drops a receiver's copy of
such an entry nor later skips the entry as "seen". Whatever the order of
arrival, the receiver drops exactly the entries the sender superseded (the
superseding entry, if any, wins anyway when its chunk lands), and its context
grows to the sender's. The last chunk carries the sender's horizon. Entries
whose dots the peer already claims are left out, so a snapshot interrupted by
loss or a full queue resumes where it stopped on the next HELLO.

Bounds: at most ``max_unacked`` reliable messages wait for an ack. A new delta
batch past the bound is dropped, counted in :attr:`SessionStats.overflows`, and
recovered by a new HELLO exchange once the queue drains (the dots stay missing
at the peer, so nothing is lost). Events stay in their :class:`EventStream` until
acknowledged, and are sent only as the queue has room.

Errors: :meth:`SyncSession.receive` raises :class:`~sync._exceptions.WireError`
(garbage, forged or unknown-key bytes), :class:`~sync._exceptions.ProtocolError`
(a well-formed message that breaks the protocol) or
:class:`~sync._exceptions.CrdtError` (a malformed delta); in each case nothing
has changed.

Clock skew: a peer's clock far ahead is not an error. Every scope has a single
writer (``device/<id>``: the device; ``desired/<id>``: the hub, which signs it;
a relay's and the hub's own scopes: that node), so a skewed writer's timestamps
only ever race with its own, which its monotonic clock already orders. What a
skewed peer must not do is drag this node's clock along: a message or entry
more than ``max_skew_ms`` ahead is merged, but moves the local clock only to
that bound (:meth:`~sync.hlc.HybridLogicalClock.observe`), counted in
:attr:`SessionStats.clock_skew`. Refusing such data instead leaves a device
whose clock jumped ahead and back unable to sync for as long as the jump, and a
gateway that booted in 1970 unable to take its desired state.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import compress, repeat
from operator import attrgetter, eq, is_, not_
from typing import Any, ClassVar, cast

from sync._chunks import Chunk, entry_dots, pack_chunks, plan_chunks, split_vector
from sync._exceptions import CrdtError, OversizeError, ProtocolError
from sync.crdt import LwwMap, validate_entries
from sync.dots import VersionVector
from sync.envelope import (
    Envelope,
    decode_envelope_unverified,
    encode_envelope,
    packb,
    verify_envelope,
)
from sync.hlc import Clock
from sync.keys import KeyRing, Signer
from sync.replica import EventStream, InboundStream, Replica

__all__ = [
    "ACK",
    "DELTAS",
    "EVENTS",
    "HELLO",
    "SNAPSHOT",
    "EventStream",
    "InboundStream",
    "Replica",
    "SessionStats",
    "SyncSession",
]

log = logging.getLogger(__name__)

HELLO = "HELLO"
DELTAS = "DELTAS"
EVENTS = "EVENTS"
ACK = "ACK"
SNAPSHOT = "SNAPSHOT"
_RELIABLE = frozenset((DELTAS, EVENTS, SNAPSHOT))
_MAX_NAME_LEN = 256
_MAX_SEEN = 4096  # out-of-order seqs remembered before a gap is declared at once
_CONTEXT = attrgetter("context")
_GENERATION = attrgetter("_gen")  # VersionVector.generation, read in C by map()
_FEW_SCOPES = 8  # up to this many, a plain loop is cheaper than the map() pipeline


@dataclass
class SessionStats:
    """Counters of one session (for metrics)."""

    sent: int = 0
    received: int = 0
    resent: int = 0
    duplicates: int = 0
    gaps: int = 0
    hellos_sent: int = 0
    snapshots_sent: int = 0
    overflows: int = 0
    deltas_applied: int = 0
    oversize: int = 0
    """Entries or events too large for any envelope (not sent; logged)."""
    clock_skew: int = 0
    """Messages whose sender's clock was more than ``max_skew_ms`` ahead: merged,
    the local clock moved only to the bound."""


_Apply = Callable[[], tuple[list[bytes], bool]]
"""A validated message's effect: returns the replies and whether to ACK it."""


@dataclass
class _Pending:
    data: bytes
    due_ms: int
    backoff_ms: int
    scope: str | None


def _check_name(what: str, name: object) -> str:
    if type(name) is not str or not 0 < len(name) <= _MAX_NAME_LEN:
        raise ProtocolError(f"invalid {what}: {name!r:.80}")
    return name


def _check_int(what: str, v: object) -> int:
    if type(v) is not int or not 0 <= v < 1 << 63:
        raise ProtocolError(f"invalid {what}: {v!r:.80}")
    return v


def _body(obj: object, keys: frozenset[str]) -> dict[str, Any]:
    if type(obj) is not dict or obj.keys() != keys:
        raise ProtocolError(f"message body must be a map with keys {sorted(keys)}")
    _check_name("session id", obj["s"])
    return obj


_HELLO_KEYS = frozenset(("s", "bd", "r", "ps", "vv", "ev"))
_DELTAS_KEYS = frozenset(("s", "sc", "d", "c"))
_SNAPSHOT_KEYS = frozenset(("s", "sc", "st"))
_EVENTS_KEYS = frozenset(("s", "st", "from", "first", "items"))
_ACK_KEYS = frozenset(("s", "ps", "a", "vv", "ev"))


class SyncSession:
    """The sync protocol with one peer, as a deterministic state machine.

    Every method returns the envelopes to send to the peer, in order.

    Args:
        replica: the local state (shared by every session of the node).
        peer_id: the peer's id; envelopes from any other ``src`` are refused.
        signer: signs outgoing envelopes.
        keyring: the keys trusted for the peer's envelopes.
        clock: the wall clock driving timeouts.
        scopes: scopes synced with this peer (default: all the replica has
            now; more can be added with :meth:`add_scope`).
        streams: outbound streams sent to this peer.
        bd_seq: birth/death sequence number, persisted by the caller.
        session_id: defaults to a random UUID (pass one for determinism).
        max_batch: most LWW entries or events per envelope.
        max_body_bytes: a batch whose packed body exceeds this is cut in
            smaller ones; the default leaves room under the 256 KiB envelope cap.
        max_unacked: most reliable messages awaiting an ack.
        resend_initial_ms: first resend timeout.
        resend_max_ms: cap of the doubling resend timeout.
        gap_timeout_ms: how long a seq gap may stay open before a new HELLO.
        on_change: called as ``on_change(scope, entries)`` with the wire entries
            of every applied DELTAS batch and of every snapshot chunk that
            only brought entries (a relay forwards them), and as
            ``on_change(scope, None)`` after a snapshot chunk that may have
            removed entries was merged.
        validate: called as ``validate(scope, entries)`` before a DELTAS batch
            or SNAPSHOT chunk is applied; raising refuses the whole message
            with nothing changed (see :class:`sync.signed.EntryVerifier`).
    """

    def __init__(
        self,
        replica: Replica,
        peer_id: str,
        signer: Signer,
        keyring: KeyRing,
        clock: Clock,
        *,
        scopes: Iterable[str] | None = None,
        streams: Iterable[str] = (),
        bd_seq: int = 0,
        session_id: str | None = None,
        max_batch: int = 500,
        max_body_bytes: int = 200 * 1024,
        max_unacked: int = 256,
        resend_initial_ms: int = 1_000,
        resend_max_ms: int = 60_000,
        gap_timeout_ms: int = 5_000,
        on_change: Callable[[str, list[list[Any]] | None], None] | None = None,
        validate: Callable[[str, list[list[Any]]], None] | None = None,
    ) -> None:
        self.replica = replica
        self.peer_id = peer_id
        self._signer = signer
        self._keyring = keyring
        self._clock = clock
        self.scopes: set[str] = set(replica.scopes if scopes is None else scopes)
        self.streams: set[str] = set(streams)
        self.bd_seq = bd_seq
        self.session_id = session_id or uuid.uuid4().hex
        if max_batch < 1 or max_body_bytes < 1:
            raise ValueError("max_batch and max_body_bytes must be >= 1")
        self.max_batch = max_batch
        self.max_body_bytes = max_body_bytes
        self.max_unacked = max_unacked
        self.resend_initial_ms = resend_initial_ms
        self.resend_max_ms = resend_max_ms
        self.gap_timeout_ms = gap_timeout_ms
        self.on_change = on_change
        self.validate = validate
        self.stats = SessionStats()
        self._rng = random.Random(self.session_id)
        self._seq = 0
        self._unacked: dict[int, _Pending] = {}
        self._confirmed_by: str | None = None
        """The peer session that acknowledged this session's HELLO."""
        self._hello_due: int | None = None
        self._hello_backoff = resend_initial_ms
        self._resync = False
        # What we know of the peer.
        self.peer_session: str | None = None
        self.peer_bd_seq: int | None = None
        self.peer_vv: dict[str, VersionVector] = {}
        self._sent_upto: dict[str, int] = {}
        # Anti-entropy memo (see _lagging_scopes): the scopes, sorted, and per
        # scope the peer's vector, our context and its generation when the
        # first was last found to cover the second.
        self._ae_order: list[str] = []
        self._ae_known: list[VersionVector | None] = []
        self._ae_ctx: list[VersionVector | None] = []
        self._ae_gen: list[int] = []
        # Receive-side sequence tracking of the peer's session.
        self._recv_next = 0
        self._recv_seen: set[int] = set()
        self._gap_since: int | None = None

    # -- public API ----------------------------------------------------------------------

    @property
    def unacked(self) -> int:
        """Reliable messages waiting for an ack."""
        return len(self._unacked)

    @property
    def hello_confirmed(self) -> bool:
        """Whether the peer's current session acknowledged this session's HELLO.

        A confirmation by an earlier peer session does not count: a peer that
        comes back with a new session has not seen our vector until it says so,
        so our HELLO is retried until it does.
        """
        return self._confirmed_by is not None and self._confirmed_by == self.peer_session

    def add_scope(self, scope: str) -> list[bytes]:
        """Start syncing ``scope`` with the peer (announced by a new HELLO)."""
        self.scopes.add(scope)
        return self._hello(reply=True)

    def start(self) -> list[bytes]:
        """Begin the session: announce ourselves with a HELLO."""
        return self._hello(reply=True)

    def local_update(self, scope: str, delta: LwwMap) -> list[bytes]:
        """Send a local (or forwarded) delta of ``scope`` to the peer.

        The delta must already be merged into the replica.
        """
        if scope not in self.scopes:
            return []
        return self.send_entries(scope, delta.entries_wire())

    def send_entries(self, scope: str, entries: list[list[Any]]) -> list[bytes]:
        """Send wire-form LWW entries of ``scope`` (see :meth:`LwwMap.entries_wire`)."""
        if scope not in self.scopes or not entries:
            return []
        known = self.peer_vv.get(scope)
        if known is not None:
            entries = [e for e in entries if (e[2], e[3]) not in known]
        return self._send_deltas(scope, plan_chunks(entries, [], self.max_batch))

    def tick(self) -> list[bytes]:
        """Do what time asks: resends, HELLO retries, gap handling, event upload."""
        now = self._clock.now_ms()
        out: list[bytes] = []
        if self._gap_since is not None and now - self._gap_since >= self.gap_timeout_ms:
            self.stats.gaps += 1
            log.debug("seq gap from %s open too long: re-HELLO", self.peer_id)
            self._recv_next = max(self._recv_seen, default=self._recv_next - 1) + 1
            self._recv_seen.clear()
            self._gap_since = None
            out += self._hello(reply=True)
        elif self._resync and len(self._unacked) < self.max_unacked // 2:
            out += self._hello(reply=True)
        elif not self.hello_confirmed and self._hello_due is not None and now >= self._hello_due:
            out += self._hello(reply=True, backoff=True)
        for pending in self._unacked.values():
            if now >= pending.due_ms:
                pending.backoff_ms = min(pending.backoff_ms * 2, self.resend_max_ms)
                pending.due_ms = now + self._jitter(pending.backoff_ms)
                self.stats.resent += 1
                out.append(pending.data)
        out += self._anti_entropy()
        out += self._upload_events()
        return out

    def _anti_entropy(self) -> list[bytes]:
        """Send what an idle peer still lacks, as far as its acks tell.

        Forwarded deltas carry no context for writes that were superseded before
        they were forwarded, and batches may be dropped on overflow; comparing
        the peer's acknowledged vector with ours once nothing is in flight for a
        scope closes those holes, so vectors (and with them tombstone collection)
        converge, not just values.
        """
        if not self.hello_confirmed or self._resync:
            return []
        out: list[bytes] = []
        for sc in self._lagging_scopes():
            out += self._catch_up(sc, self.peer_vv[sc])
        return out

    def _lagging_scopes(self) -> list[str]:
        """Scopes not waiting for an ack whose context the peer's vector lacks, sorted.

        A relay's or the hub's session syncs thousands of scopes and ticks
        every second while busy, so the scan skips, without a comparison of
        vectors, every scope found covered before whose peer vector and
        context are the same objects with the same :attr:`VersionVector.generation`
        (a vector only grows: covered then, covered now). The skip test runs
        over all scopes at once with C-level ``map``.
        """
        order = self._ae_order
        if len(order) != len(self.scopes) or not self.scopes.issuperset(order):
            order = self._ae_order = sorted(self.scopes)
            n = len(order)
            self._ae_known = [None] * n
            self._ae_ctx = [None] * n
            self._ae_gen = [-1] * n
        if len(order) <= _FEW_SCOPES:
            return self._lagging_scopes_few(order)
        maps = list(map(self.replica.scopes.get, order))
        if any(map(is_, maps, repeat(None))):
            # Scope not in the replica yet: made on first look, as below.
            return self._lagging_scopes_slow(order)
        ctxs = list(map(_CONTEXT, maps))
        gens = list(map(_GENERATION, ctxs))
        knowns = list(map(self.peer_vv.get, order))
        clean = map(
            all,
            zip(
                map(is_, knowns, self._ae_known),
                map(is_, ctxs, self._ae_ctx),
                map(eq, gens, self._ae_gen),
                strict=True,
            ),
        )
        lagging: list[str] = []
        busy: set[str | None] | None = None
        for i in compress(range(len(order)), map(not_, clean)):
            known = knowns[i]
            if known is None:
                continue
            if busy is None:
                busy = {p.scope for p in self._unacked.values()}
            if order[i] in busy:
                continue
            if known.dominates(ctxs[i]):
                self._ae_known[i] = known
                self._ae_ctx[i] = ctxs[i]
                self._ae_gen[i] = gens[i]
            else:
                lagging.append(order[i])
        return lagging

    def _lagging_scopes_few(self, order: list[str]) -> list[str]:
        """:meth:`_lagging_scopes` for a device's few scopes: the same test, a plain loop."""
        scopes = self.replica.scopes
        lagging: list[str] = []
        busy: set[str | None] | None = None
        for i, sc in enumerate(order):
            known = self.peer_vv.get(sc)
            if known is None:
                continue
            state = scopes.get(sc)
            if state is None:
                return self._lagging_scopes_slow(order)
            ctx = state.context
            if (
                known is self._ae_known[i]
                and ctx is self._ae_ctx[i]
                and ctx._gen == self._ae_gen[i]
            ):
                continue
            if busy is None:
                busy = {p.scope for p in self._unacked.values()}
            if sc in busy:
                continue
            if known.dominates(ctx):
                self._ae_known[i] = known
                self._ae_ctx[i] = ctx
                self._ae_gen[i] = ctx._gen
            else:
                lagging.append(sc)
        return lagging

    def _lagging_scopes_slow(self, order: list[str]) -> list[str]:
        busy = {p.scope for p in self._unacked.values()}
        lagging: list[str] = []
        for sc in order:
            known = self.peer_vv.get(sc)
            if sc in busy or known is None:
                continue
            if not known.dominates(self.replica.scope(sc).context):
                lagging.append(sc)
        return lagging

    def receive(self, data: bytes) -> list[bytes]:
        """Process one envelope from the peer; return the replies.

        Raises:
            WireError: garbage, oversize, unsupported or badly signed bytes.
            ProtocolError: a well-formed message that breaks the protocol.
            CrdtError: a malformed delta, snapshot or vector.

        On any error the session and the replica are unchanged.
        """
        return self.receive_envelope(decode_envelope_unverified(data))

    def receive_envelope(self, env: Envelope) -> list[bytes]:
        """:meth:`receive` of an envelope the caller already decoded, unverified.

        For a caller that peeked at the envelope to route it
        (:func:`~sync.envelope.decode_envelope_unverified`): nothing of it is
        trusted; its signature is checked here as in :meth:`receive`, before
        the body is decoded.

        Raises:
            WireError: a bad signature or unknown key.
            ProtocolError: a well-formed message that breaks the protocol.
            CrdtError: a malformed delta, snapshot or vector.
        """
        verify_envelope(env, self._keyring)
        if env.src != self.peer_id:
            raise ProtocolError(f"envelope from {env.src!r}, expected {self.peer_id!r}")
        body = env.decode_body()
        handler = self._HANDLERS.get(env.type)
        if handler is None:
            raise ProtocolError(f"unknown message type {env.type!r}")
        # Parse and validate fully before anything changes.
        action = handler(self, body)
        msg = cast("dict[str, Any]", body)  # checked by the handler
        self._observe_skew(self.replica.hlc.observe(env.ts))
        self.stats.received += 1
        if self._track_seq(env.type, msg["s"], env.seq):
            # Applied again anyway: merges are idempotent, and after a gap reset
            # a resent message can look old without having been applied.
            self.stats.duplicates += 1
        out, ack = action()
        if ack:
            out += self._ack(env.seq, env.type, msg)
        return out

    # -- sending ----------------------------------------------------------------------------

    def _observe_skew(self, within: bool) -> None:
        if not within:
            self.stats.clock_skew += 1
            log.debug(
                "clock of %s more than %d ms ahead: merged, local clock held at the bound",
                self.peer_id,
                self.replica.hlc.max_skew_ms,
            )

    def _jitter(self, ms: int) -> int:
        return ms + int(ms * 0.25 * self._rng.random())

    def _envelope(self, type_: str, body: dict[str, Any] | bytes) -> tuple[int, bytes]:
        """Sign and encode; the seq is used up only if encoding succeeds.

        Raises:
            OversizeError: the envelope would exceed the size cap.
        """
        seq = self._seq + 1
        data = encode_envelope(
            type_,
            self.replica.replica_id,
            seq,
            self.replica.hlc.now(),
            body if isinstance(body, bytes) else packb(body),
            self._signer,
        )
        self._seq = seq
        self.stats.sent += 1
        return seq, data

    def _reliable(
        self, type_: str, body: bytes, scope: str | None, *, droppable: bool
    ) -> list[bytes]:
        if len(self._unacked) >= self.max_unacked:
            self.stats.overflows += 1
            if droppable:
                # The peer still lacks these dots; a HELLO once the queue drains
                # brings them. Counted, never silent.
                self._resync = True
                log.debug("outbound queue to %s full: %s dropped", self.peer_id, type_)
                return []
        try:
            seq, data = self._envelope(type_, body)
        except OversizeError as exc:
            # Only a batch of one entry or event gets here (larger ones were
            # cut): it can never be sent under this cap. Counted and logged;
            # the peer keeps lacking it.
            self.stats.oversize += 1
            log.warning("%s to %s not sent: %s", type_, self.peer_id, exc)
            return []
        now = self._clock.now_ms()
        self._unacked[seq] = _Pending(
            data, now + self._jitter(self.resend_initial_ms), self.resend_initial_ms, scope
        )
        return [data]

    def _send_deltas(self, scope: str, chunks: list[Chunk]) -> list[bytes]:
        def build(chunk: Chunk) -> bytes:
            ctx = chunk.ctx.to_wire() if chunk.ctx else None
            return packb({"s": self.session_id, "sc": scope, "d": chunk.entries, "c": ctx})

        out: list[bytes] = []
        for _, body in pack_chunks(chunks, build, self.max_body_bytes):
            out += self._reliable(DELTAS, body, scope, droppable=True)
        return out

    def _hello(self, *, reply: bool, backoff: bool = False) -> list[bytes]:
        self._resync = False
        vv = {sc: self.replica.scope(sc).context.to_wire() for sc in sorted(self.scopes)}
        # Only this peer's streams (a relay's inbox holds every device of its
        # region, and each device session says HELLO), sorted by stream.
        ev = {st: inb.next_seq for st, inb in self.replica.inbound_of(self.peer_id)}
        body = {
            "s": self.session_id,
            "bd": self.bd_seq,
            "r": reply,
            "ps": self.peer_session,
            "vv": vv,
            "ev": ev,
        }
        _, data = self._envelope(HELLO, body)
        now = self._clock.now_ms()
        self._hello_backoff = (
            min(self._hello_backoff * 2, self.resend_max_ms) if backoff else self.resend_initial_ms
        )
        self._hello_due = now + self._jitter(self._hello_backoff)
        self.stats.hellos_sent += 1
        return [data]

    def _ack(self, seq: int, type_: str, body: dict[str, Any]) -> list[bytes]:
        vv: dict[str, Any] = {}
        ev: dict[str, int] = {}
        if type_ == EVENTS:
            inb = self.replica.inbox.get((self.peer_id, body["st"]))
            ev[body["st"]] = inb.next_seq if inb else 1
        else:
            vv[body["sc"]] = self.replica.scope(body["sc"]).context.to_wire()
        ack = {"s": self.session_id, "ps": self.peer_session, "a": [seq], "vv": vv, "ev": ev}
        _, data = self._envelope(ACK, ack)
        return [data]

    def _catch_up(self, scope: str, claimed: VersionVector) -> list[bytes]:
        state = self.replica.scope(scope)
        if state.needs_snapshot(claimed):
            return self._snapshot(scope, state, claimed)
        entries = state.entries_wire(claimed)
        # Dots the peer lacks whose writes were superseded: they ride with the
        # last batch (or after it), never with a dot whose entry is still on
        # its way.
        covered = state.context.difference(claimed).difference(entry_dots(entries))
        pieces = split_vector(covered, max_bytes=self.max_body_bytes // 2)
        return self._send_deltas(scope, plan_chunks(entries, pieces, self.max_batch))

    def _snapshot(self, scope: str, state: LwwMap, claimed: VersionVector) -> list[bytes]:
        """Send ``state`` as SNAPSHOT chunks (see "Snapshot chunks" above)."""
        self.stats.snapshots_sent += 1
        log.debug("peer %s is behind the tombstone horizon of %s: snapshot", self.peer_id, scope)
        # Dots seen here with no entry held: claimable by any chunk, since no
        # chunk holds an entry for them. The dot of an entry is claimed only by
        # the chunk carrying it, and entries the peer has seen are not resent
        # (its join would skip them anyway).
        held = VersionVector()
        for _, (_, origin, counter, _, _) in state.entries():
            held.add_counter(origin, counter)
        superseded = state.context.difference(held)
        pieces = split_vector(superseded, max_bytes=self.max_body_bytes // 2)
        chunks = plan_chunks(state.entries_wire(claimed), pieces, self.max_batch, tail=True)
        horizon = state.horizon.to_wire()

        def build(chunk: Chunk) -> bytes:
            ctx = entry_dots(chunk.entries)
            if chunk.ctx:
                ctx.merge(chunk.ctx)
            st = {"e": chunk.entries, "c": ctx.to_wire(), "h": horizon if chunk.last else {}}
            return packb({"s": self.session_id, "sc": scope, "st": st})

        out: list[bytes] = []
        for _, body in pack_chunks(chunks, build, self.max_body_bytes):
            out += self._reliable(SNAPSHOT, body, scope, droppable=True)
        return out

    def _upload_events(self) -> list[bytes]:
        out: list[bytes] = []
        streams = self.streams
        for name in sorted(streams) if len(streams) > 1 else streams:
            stream = self.replica.streams.get(name)
            if stream is None or self._sent_upto.get(name, 1) >= stream.next_seq:
                continue  # nothing unsent (read would return no item)
            while len(self._unacked) < self.max_unacked:
                start, items = stream.read(self._sent_upto.get(name, 1), self.max_batch)
                if not items:
                    break
                body = self._events_body(name, start, stream.first_seq, items)
                while len(body) > self.max_body_bytes and len(items) > 1:
                    items = items[: len(items) // 2]
                    body = self._events_body(name, start, stream.first_seq, items)
                sent = self._reliable(EVENTS, body, None, droppable=False)
                if not sent:
                    # One event too large for any envelope (counted, logged):
                    # the stream stalls here rather than lose it silently.
                    break
                out += sent
                self._sent_upto[name] = start + len(items)
        return out

    def _events_body(self, name: str, start: int, first: int, items: list[Any]) -> bytes:
        return packb(
            {"s": self.session_id, "st": name, "from": start, "first": first, "items": items}
        )

    # -- receiving ------------------------------------------------------------------------------

    def _track_seq(self, type_: str, sid: str, seq: int) -> bool:
        """Record a received seq; return whether it was seen before."""
        if type_ == HELLO:
            if sid != self.peer_session:
                # A new peer session (restart or reconnect): sequence restarts.
                self.peer_session = sid
                self._recv_next = seq + 1
                self._recv_seen.clear()
                self._gap_since = None
                return False
        elif sid != self.peer_session:
            # A message of a session we have no HELLO for (lost or reordered):
            # applied, but it cannot take part in gap detection.
            return False
        if seq < self._recv_next or seq in self._recv_seen:
            return True
        if seq == self._recv_next:
            self._recv_next += 1
            while self._recv_next in self._recv_seen:
                self._recv_seen.discard(self._recv_next)
                self._recv_next += 1
            if not self._recv_seen:
                self._gap_since = None
        else:
            self._recv_seen.add(seq)
            if self._gap_since is None:
                self._gap_since = self._clock.now_ms()
            if len(self._recv_seen) > _MAX_SEEN:
                self._gap_since = self._clock.now_ms() - self.gap_timeout_ms
        return False

    def _on_hello(self, raw: object) -> _Apply:
        body = _body(raw, _HELLO_KEYS)
        sender = _check_name("session id", body["s"])
        bd = _check_int("bdSeq", body["bd"])
        if type(body["r"]) is not bool:
            raise ProtocolError("HELLO field r must be a bool")
        ps = body["ps"]
        if ps is not None:
            _check_name("session id", ps)
        if type(body["vv"]) is not dict or type(body["ev"]) is not dict:
            raise ProtocolError("HELLO vv and ev must be maps")
        claims = {
            _check_name("scope", sc): VersionVector.from_wire(vv) for sc, vv in body["vv"].items()
        }
        cursors = {
            _check_name("stream", st): _check_int("cursor", c) for st, c in body["ev"].items()
        }
        if self.peer_bd_seq is not None and bd < self.peer_bd_seq:
            raise ProtocolError(f"HELLO with stale bdSeq {bd} < {self.peer_bd_seq}")

        def apply() -> tuple[list[bytes], bool]:
            self.peer_bd_seq = bd
            if ps == self.session_id:
                self._confirmed_by = sender
            out: list[bytes] = []
            if body["r"]:
                out += self._hello(reply=False)
            for sc in sorted(claims):
                if sc in self.scopes:
                    self.peer_vv[sc] = claims[sc].copy()
                    out += self._catch_up(sc, claims[sc])
            for st, cursor in cursors.items():
                if st in self.streams:
                    self._sent_upto[st] = cursor
                    self.replica.stream(st).release(cursor)
            # An ack of the peer's session, so it stops resending its HELLO.
            ack: dict[str, Any] = {
                "s": self.session_id,
                "ps": self.peer_session,
                "a": [],
                "vv": {},
                "ev": {},
            }
            out.append(self._envelope(ACK, ack)[1])
            return out, False

        return apply

    def _on_deltas(self, raw: object) -> _Apply:
        body = _body(raw, _DELTAS_KEYS)
        scope = _check_name("scope", body["sc"])
        if scope not in self.scopes:
            raise ProtocolError(f"DELTAS for scope {scope!r} not synced with {self.peer_id!r}")
        entries = body["d"]
        if type(entries) is not list:
            raise ProtocolError("DELTAS field d must be a list")
        if len(entries) > max(self.max_batch, 10_000):
            raise ProtocolError("DELTAS batch too large")
        ctx = None if body["c"] is None else VersionVector.from_wire(body["c"])
        for e in entries:
            if type(e) is not list or len(e) != 6:
                raise CrdtError("LWW entry must be a 6-item list")
        validate_entries(entries)
        if self.validate is not None:
            self.validate(scope, entries)

        def apply() -> tuple[list[bytes], bool]:
            self._observe_skew(self.replica.observe_entries(entries))
            n = self.replica.scope(scope).apply_entries(entries, ctx)
            self.stats.deltas_applied += n
            # The peer sent these dots, so it has them: never echo them back.
            known = self.peer_vv.get(scope)
            if known is None:
                known = self.peer_vv[scope] = VersionVector()
            known.merge(entry_dots(entries))
            if ctx is not None:
                known.merge(ctx)
            if n and self.on_change is not None:
                self.on_change(scope, entries)
            return [], True

        return apply

    def _on_snapshot(self, raw: object) -> _Apply:
        body = _body(raw, _SNAPSHOT_KEYS)
        scope = _check_name("scope", body["sc"])
        if scope not in self.scopes:
            raise ProtocolError(f"SNAPSHOT for scope {scope!r} not synced with {self.peer_id!r}")
        snap = LwwMap.from_wire(body["st"])
        entries: list[list[Any]] = body["st"]["e"]  # validated by from_wire
        if self.validate is not None:
            self.validate(scope, entries)
        # A chunk claiming only its own entries' dots cannot make the causal
        # join drop anything (a dot names one write of one key): merging it is
        # a plain delta merge, without the scan of the whole local map.
        additive = snap.context == entry_dots(entries)

        def apply() -> tuple[list[bytes], bool]:
            self._observe_skew(self.replica.observe_entries(entries))
            state = self.replica.scope(scope)
            if additive:
                n = state.apply_entries(entries, None)
                state.horizon.merge(snap.horizon)
                self.stats.deltas_applied += n
                if n and self.on_change is not None:
                    self.on_change(scope, entries)
            else:
                state.merge_state(snap)
                if self.on_change is not None:
                    self.on_change(scope, None)
            return [], True

        return apply

    def _on_events(self, raw: object) -> _Apply:
        body = _body(raw, _EVENTS_KEYS)
        stream = _check_name("stream", body["st"])
        start = _check_int("from", body["from"])
        first = _check_int("first", body["first"])
        items = body["items"]
        if type(items) is not list or not 1 <= first <= start:
            raise ProtocolError("EVENTS items must be a list and 1 <= first <= from")
        if len(items) > max(self.max_batch, 10_000):
            raise ProtocolError("EVENTS batch too large")

        def apply() -> tuple[list[bytes], bool]:
            inb = self.replica.inbox.setdefault((self.peer_id, stream), InboundStream())
            if start > inb.next_seq:
                if first <= inb.next_seq:
                    # An earlier batch is still on its way: no ack, so this one
                    # is resent after it.
                    return [], False
                # The sender no longer holds what we lack (its quota dropped
                # it, and counted it): skip ahead rather than stall.
                inb.skipped += first - inb.next_seq
                inb.next_seq = first
                if start > first:
                    return [], False
            skip = inb.next_seq - start
            if skip < len(items):
                inb.items.extend(items[skip:])
                inb.next_seq = start + len(items)
            return [], True

        return apply

    def _on_ack(self, raw: object) -> _Apply:
        body = _body(raw, _ACK_KEYS)
        sender = _check_name("session id", body["s"])
        ps = body["ps"]
        if ps is not None:
            _check_name("session id", ps)
        acked = body["a"]
        if type(acked) is not list or type(body["vv"]) is not dict or type(body["ev"]) is not dict:
            raise ProtocolError("ACK fields a, vv, ev have the wrong types")
        seqs = [_check_int("seq", s) for s in acked]
        vvs = {_check_name("scope", sc): VersionVector.from_wire(v) for sc, v in body["vv"].items()}
        cursors = {
            _check_name("stream", st): _check_int("cursor", c) for st, c in body["ev"].items()
        }

        def apply() -> tuple[list[bytes], bool]:
            if ps != self.session_id:
                # An ACK for an earlier session of ours (late, across a reconnect):
                # its seqs number that session's messages, not this one's. Its
                # vectors and cursors are still facts about the peer.
                seqs.clear()
            else:
                self._confirmed_by = sender
            for s in seqs:
                self._unacked.pop(s, None)
            for sc, vv in vvs.items():
                if sc in self.scopes:
                    known = self.peer_vv.get(sc)
                    if known is None:
                        known = self.peer_vv[sc] = VersionVector()
                    known.merge(vv)
            for st, cursor in cursors.items():
                stream = self.replica.streams.get(st)
                if stream is not None and st in self.streams:
                    stream.release(cursor)
            return [], False

        return apply

    _HANDLERS: ClassVar[dict[str, Callable[[SyncSession, object], _Apply]]] = {
        HELLO: _on_hello,
        DELTAS: _on_deltas,
        SNAPSHOT: _on_snapshot,
        EVENTS: _on_events,
        ACK: _on_ack,
    }
