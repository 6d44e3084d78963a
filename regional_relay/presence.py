"""Device presence for one region: birth/death with bdSeq, summaries for the hub.

Pure and I/O-free: the relay feeds it the retained state messages of its region
(``nc/v1/r/<region>/d/<device>/state``, see :mod:`edge_agent.link`) and every
uplink it receives, and passes the time in.

Device state payload (written by the agent)::

    {"online": bool, "bd": int}     msgpack; the MQTT Will carries online False
                                    with the bd of the session it belongs to

The bdSeq rule, as in Sparkplug B (DESIGN.md, "Sync protocol", point 4): ``bd``
grows across restarts and reconnects, so a message whose bd is lower than the
device's current bd belongs to an older session and is ignored (counted as
stale). A birth with a higher or equal bd wins; a death with a higher or equal bd
wins. A late Will of an old session therefore never marks a live device offline.

Reading a summary at the hub
----------------------------

Two different things can make a device look absent, and the hub must show both:

* **device offline** -- the region is fine, the device died: the relay's summary
  lists it with ``online`` 0 (its Will or clean shutdown was seen).
* **region unreachable** -- the relay itself is lost: the hub knows nothing
  current about the region's devices. The hub learns this from the relay's own
  retained state on ``nc/v1/hub/r/<region>/state``, msgpack
  ``{"online": bool, "bd": int, "relay": str}``, whose Will carries online False
  with the same bd. The hub applies the same bdSeq rule to it (see
  :func:`supersedes`): a stale relay death never marks a live relay lost.

So the hub reads, for a device of region R::

    relay state of R offline (or never seen)  ->  "unreachable" (last known
                                                  summary shown as stale)
    relay state online, device online == 1    ->  "online"
    relay state online, device online == 0    ->  "offline"

A summary also carries ``hub_reachable``: whether the relay's uplink to the hub
was up when the summary was produced. Summaries travel through the relay's
durable outbox, so one produced during an uplink outage reaches the hub late,
with ``hub_reachable`` False: the hub records the region as unreachable from its
point of view for that period, while the device states in it are still the
relay's accurate local view as of ``at``. ``epoch`` is the relay's own bdSeq; a
change of epoch means a new relay process whose ``cursor`` numbering restarted,
so the hub discards its cursor and asks for everything again (cursor 0).

Summary and delta wire shape (:meth:`PresenceReport.to_wire`)::

    {"v": 1, "epoch": int, "at": ms, "hub_reachable": bool,
     "since": cursor asked for, "cursor": cursor to ask for next, "more": bool,
     "online": n, "offline": n,              counts over the whole region
     "devices": {device: [online 0/1, bd, last_seen_ms, since_ms]}}

``bd`` is :data:`UNKNOWN_BD` (-1) for a device seen only through uplink traffic
(no state message yet, e.g. a broker that lost its retained messages).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from regional_relay._exceptions import PresenceError
from sync._exceptions import DecodeError
from sync._msgpack_strict import DecodeLimits, unpackb_strict
from sync.topics import validate_id

__all__ = [
    "DEFAULT_MAX_DEVICES",
    "DEFAULT_PAGE_SIZE",
    "PRESENCE_WIRE_VERSION",
    "UNKNOWN_BD",
    "DevicePresence",
    "PresenceChange",
    "PresenceCounters",
    "PresenceReport",
    "PresenceTracker",
    "decode_state",
    "supersedes",
]

log = logging.getLogger(__name__)

PRESENCE_WIRE_VERSION: Final = 1
DEFAULT_MAX_DEVICES: Final = 100_000
DEFAULT_PAGE_SIZE: Final = 500
"""Devices per report page; a worst-case entry (64-character id of 4-byte UTF-8
characters, four 9-byte ints) is about 300 bytes, so a page stays far below the
256 KiB envelope cap."""
DEFAULT_SEEN_GRANULARITY_MS: Final = 60_000
UNKNOWN_BD: Final = -1
"""bd of a device known only from its uplink traffic."""

_MAX_BD: Final = 2**64
_STATE_LIMITS: Final = DecodeLimits(
    max_size=1024, max_depth=2, max_items=16, max_str_len=256, max_bin_len=256
)


def decode_state(payload: bytes | bytearray | memoryview) -> tuple[bool, int]:
    """Strictly decode a device state payload ``{"online": bool, "bd": int}``.

    Extra keys are ignored so that a newer agent may add fields.

    Args:
        payload: the retained state message's bytes.

    Returns:
        ``(online, bd)``.

    Raises:
        PresenceError: malformed msgpack, not a map, or a missing or mistyped
            ``online`` / ``bd`` (``bd`` must be an int in ``[0, 2**64)``).
    """
    try:
        obj = unpackb_strict(payload, limits=_STATE_LIMITS)
    except DecodeError as exc:
        raise PresenceError(f"state payload: {exc}", reason="decode") from exc
    if type(obj) is not dict:
        raise PresenceError("state payload is not a map", reason="shape")
    online = obj.get("online")
    bd = obj.get("bd")
    if type(online) is not bool:
        raise PresenceError("state payload: 'online' must be a bool", reason="shape")
    if type(bd) is not int or not 0 <= bd < _MAX_BD:
        raise PresenceError("state payload: 'bd' must be an int in [0, 2**64)", reason="shape")
    return online, bd


def supersedes(current_bd: int, bd: int) -> bool:
    """The bdSeq rule: may a state message with ``bd`` replace the current one?

    Births and deaths alike are accepted when ``bd >= current_bd`` and ignored
    as belonging to an older session otherwise. The hub applies the same rule
    to relay state messages.

    Args:
        current_bd: bd of the state currently held (:data:`UNKNOWN_BD` if none).
        bd: bd of the incoming message.

    Returns:
        True if the incoming message wins.
    """
    return bd >= current_bd


@dataclass(frozen=True, slots=True)
class DevicePresence:
    """What the relay knows about one device.

    Attributes:
        online: the device's session is up.
        bd: bdSeq of the session the state belongs to (:data:`UNKNOWN_BD` if only
            traffic was seen).
        last_seen_ms: last time a message from the device itself was received
            (uplink or live birth); deaths and retained replays do not count.
        since_ms: when the current ``(online, bd)`` pair was first observed.
    """

    online: bool
    bd: int
    last_seen_ms: int
    since_ms: int

    def to_wire(self) -> list[int]:
        """Return ``[online 0/1, bd, last_seen_ms, since_ms]``."""
        return [int(self.online), self.bd, self.last_seen_ms, self.since_ms]


@dataclass(frozen=True, slots=True)
class PresenceChange:
    """A change of a device's ``(online, bd)`` pair, for logs and live events.

    Attributes:
        device: the device id.
        online: the new online flag.
        bd: the new bd.
        was_online: the previous online flag, None for a device seen first.
        previous_bd: the previous bd, None for a device seen first.
        at_ms: when it was observed.
    """

    device: str
    online: bool
    bd: int
    was_online: bool | None
    previous_bd: int | None
    at_ms: int

    @property
    def new_session(self) -> bool:
        """True when the bd changed (a restart or a reconnect)."""
        return self.previous_bd is not None and self.previous_bd != self.bd


@dataclass(frozen=True, slots=True)
class PresenceCounters:
    """Counters for ``/metrics``-style export; all monotonic.

    Attributes:
        births: accepted births.
        deaths: accepted deaths.
        stale_births: births ignored because of a lower bd.
        stale_deaths: deaths ignored because of a lower bd (late Wills).
        duplicates: state messages equal to the state held.
        garbage: state payloads that failed to decode.
        refused_devices: messages for new devices refused at the device cap.
    """

    births: int = 0
    deaths: int = 0
    stale_births: int = 0
    stale_deaths: int = 0
    duplicates: int = 0
    garbage: int = 0
    refused_devices: int = 0


@dataclass(frozen=True, slots=True)
class PresenceReport:
    """A full summary or a delta of a region's presence; see the module docstring.

    Attributes:
        epoch: the relay's bdSeq; cursors are only meaningful within one epoch.
        at_ms: when the report was produced.
        hub_reachable: the relay's uplink to the hub was up at ``at_ms``.
        since: the cursor the report starts after (0: everything).
        cursor: the cursor to ask for next.
        more: further changes exist after ``cursor`` (the page was full).
        online: devices online in the whole region.
        offline: devices offline in the whole region.
        devices: the changed devices of this page.
    """

    epoch: int
    at_ms: int
    hub_reachable: bool
    since: int
    cursor: int
    more: bool
    online: int
    offline: int
    devices: Mapping[str, DevicePresence] = field(default_factory=dict)

    def to_wire(self) -> dict[str, object]:
        """Return the msgpack-friendly form (see the module docstring)."""
        return {
            "v": PRESENCE_WIRE_VERSION,
            "epoch": self.epoch,
            "at": self.at_ms,
            "hub_reachable": self.hub_reachable,
            "since": self.since,
            "cursor": self.cursor,
            "more": self.more,
            "online": self.online,
            "offline": self.offline,
            "devices": {name: p.to_wire() for name, p in self.devices.items()},
        }


@dataclass(slots=True)
class _Entry:
    presence: DevicePresence
    version: int
    reported_seen_ms: int


class PresenceTracker:
    """Presence of every device of one region, with cursor-based deltas.

    Every accepted change gets a new version from a counter; a report lists the
    devices whose version is above the caller's cursor. The relay keeps the
    cursor the hub acknowledged and resends from there, so a lost delta is never
    a lost change. Uplink traffic only moves ``last_seen_ms``; it marks a device
    changed when it moved by at least ``seen_granularity_ms`` since the value
    last included in a version, so busy devices do not flood the deltas.

    Args:
        max_devices: most devices tracked; messages about further new devices
            are refused and counted.
        epoch: the relay's bdSeq (see :class:`PresenceReport`).
        seen_granularity_ms: see above.

    Raises:
        ValueError: a bound is not positive.
    """

    def __init__(
        self,
        *,
        max_devices: int = DEFAULT_MAX_DEVICES,
        epoch: int = 0,
        seen_granularity_ms: int = DEFAULT_SEEN_GRANULARITY_MS,
    ) -> None:
        if max_devices < 1:
            raise ValueError("max_devices must be positive")
        if seen_granularity_ms < 0:
            raise ValueError("seen_granularity_ms must not be negative")
        self.max_devices = max_devices
        self.epoch = epoch
        self.seen_granularity_ms = seen_granularity_ms
        self.hub_reachable = False
        """Set by the relay: its uplink to the hub is up."""
        self._entries: dict[str, _Entry] = {}
        self._version = 0
        self._online = 0
        # Append-only (version, device) log, sorted by version; entries whose
        # device has moved on to a later version are skipped and compacted away.
        self._log_versions: list[int] = []
        self._log_devices: list[str] = []
        self._births = self._deaths = 0
        self._stale_births = self._stale_deaths = 0
        self._duplicates = self._garbage = self._refused = 0

    # -- inputs ------------------------------------------------------------------------

    def observe_state(
        self,
        device: str,
        payload: bytes | bytearray | memoryview,
        now_ms: int,
        *,
        retained: bool = False,
    ) -> PresenceChange | None:
        """Apply a state message received on the device's state topic.

        Args:
            device: the device id (from the topic).
            payload: the message bytes.
            now_ms: the current time.
            retained: the broker delivered it as a retained replay (on
                subscribe); a replayed birth does not move ``last_seen_ms``.

        Returns:
            The change, or None when the message was a duplicate, stale, or
            refused at the device cap.

        Raises:
            PresenceError: the payload is garbage (counted).
            TopicError: ``device`` is not a valid id.
        """
        device = validate_id(device, what="device")
        try:
            online, bd = decode_state(payload)
        except PresenceError as exc:
            self._garbage += 1
            exc.device = device
            raise
        entry = self._entries.get(device)
        if entry is None:
            if not self._admit(device):
                return None
            seen = now_ms if online and not retained else 0
            self._insert(device, DevicePresence(online, bd, seen, now_ms))
            self._count_accepted(online)
            return PresenceChange(device, online, bd, None, None, now_ms)
        current = entry.presence
        if not supersedes(current.bd, bd):
            if online:
                self._stale_births += 1
            else:
                self._stale_deaths += 1
            log.debug("stale %s of %s ignored (bd %s < %s)", online, device, bd, current.bd)
            return None
        seen = current.last_seen_ms
        if online and not retained:
            seen = max(seen, now_ms)
        if online == current.online and bd == current.bd:
            self._duplicates += 1
            if online and not retained:
                self.observe_traffic(device, now_ms)
            return None
        self._count_accepted(online)
        self._online += int(online) - int(current.online)
        self._update(device, entry, DevicePresence(online, bd, seen, now_ms))
        return PresenceChange(device, online, bd, current.online, current.bd, now_ms)

    def observe_traffic(self, device: str, now_ms: int) -> PresenceChange | None:
        """Record an uplink message from ``device`` (moves ``last_seen_ms``).

        A device seen for the first time through traffic is tracked as online
        with :data:`UNKNOWN_BD`: traffic proves a session, and any state message
        supersedes that guess. Traffic never changes the online flag of a device
        already known, since the state topic is authoritative.

        Args:
            device: the device id (from the topic).
            now_ms: the current time.

        Returns:
            A change for a device seen first, else None.

        Raises:
            TopicError: ``device`` is not a valid id.
        """
        entry = self._entries.get(device)
        if entry is None:
            device = validate_id(device, what="device")
            if not self._admit(device):
                return None
            self._insert(device, DevicePresence(True, UNKNOWN_BD, now_ms, now_ms))
            return PresenceChange(device, True, UNKNOWN_BD, None, None, now_ms)
        current = entry.presence
        if now_ms <= current.last_seen_ms:
            return None
        presence = DevicePresence(current.online, current.bd, now_ms, current.since_ms)
        if now_ms - entry.reported_seen_ms >= self.seen_granularity_ms:
            self._update(device, entry, presence)
        else:
            entry.presence = presence
        return None

    # -- queries -----------------------------------------------------------------------

    def get(self, device: str) -> DevicePresence | None:
        """Return what is known about ``device``, or None."""
        entry = self._entries.get(device)
        return None if entry is None else entry.presence

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, device: object) -> bool:
        return device in self._entries

    @property
    def online_count(self) -> int:
        """Devices currently online."""
        return self._online

    @property
    def offline_count(self) -> int:
        """Devices currently offline."""
        return len(self._entries) - self._online

    @property
    def cursor(self) -> int:
        """The latest version; a report at this cursor would be empty."""
        return self._version

    def counters(self) -> PresenceCounters:
        """Return a snapshot of the counters."""
        return PresenceCounters(
            births=self._births,
            deaths=self._deaths,
            stale_births=self._stale_births,
            stale_deaths=self._stale_deaths,
            duplicates=self._duplicates,
            garbage=self._garbage,
            refused_devices=self._refused,
        )

    def summary(self, now_ms: int) -> dict[str, object]:
        """Return the wire form of a full, unpaged summary of the region.

        For large regions prefer paging with :meth:`changes_since` from cursor 0,
        which keeps every message under the envelope size cap.
        """
        return self.changes_since(0, now_ms, limit=None).to_wire()

    def changes_since(
        self, cursor: int, now_ms: int, *, limit: int | None = DEFAULT_PAGE_SIZE
    ) -> PresenceReport:
        """Return the devices changed after ``cursor``, oldest change first.

        Args:
            cursor: 0 for everything, else a ``cursor`` from an earlier report of
                the same epoch. A cursor beyond the current version (from another
                epoch) is treated as 0.
            now_ms: the current time, stamped on the report.
            limit: most devices in the report, None for no limit.

        Returns:
            The report; ask again from its ``cursor`` while ``more`` is True.

        Raises:
            ValueError: ``limit`` is not positive.
        """
        if limit is not None and limit < 1:
            raise ValueError("limit must be positive")
        if cursor > self._version or cursor < 0:
            cursor = 0
        devices: dict[str, DevicePresence] = {}
        index = bisect.bisect_right(self._log_versions, cursor)
        next_cursor = self._version
        more = False
        versions, names, entries = self._log_versions, self._log_devices, self._entries
        for i in range(index, len(versions)):
            version, name = versions[i], names[i]
            if entries[name].version != version:
                continue  # superseded by a later log record
            if limit is not None and len(devices) >= limit:
                more = True
                # Resume right after the last record included.
                next_cursor = entries[next(reversed(devices))].version
                break
            devices[name] = entries[name].presence
        return PresenceReport(
            epoch=self.epoch,
            at_ms=now_ms,
            hub_reachable=self.hub_reachable,
            since=cursor,
            cursor=next_cursor,
            more=more,
            online=self._online,
            offline=len(self._entries) - self._online,
            devices=devices,
        )

    # -- internals ---------------------------------------------------------------------

    def _admit(self, device: str) -> bool:
        if len(self._entries) < self.max_devices:
            return True
        self._refused += 1
        log.debug("device %s refused: %s devices tracked", device, self.max_devices)
        return False

    def _count_accepted(self, online: bool) -> None:
        if online:
            self._births += 1
        else:
            self._deaths += 1

    def _next_version(self, device: str) -> int:
        self._version += 1
        self._log_versions.append(self._version)
        self._log_devices.append(device)
        return self._version

    def _insert(self, device: str, presence: DevicePresence) -> None:
        version = self._next_version(device)
        self._entries[device] = _Entry(presence, version, presence.last_seen_ms)
        self._online += int(presence.online)
        self._maybe_compact()

    def _update(self, device: str, entry: _Entry, presence: DevicePresence) -> None:
        entry.presence = presence
        entry.version = self._next_version(device)
        entry.reported_seen_ms = presence.last_seen_ms
        self._maybe_compact()

    def _maybe_compact(self) -> None:
        if len(self._log_versions) <= 2 * len(self._entries) + 1024:
            return
        live = sorted((e.version, name) for name, e in self._entries.items())
        self._log_versions = [v for v, _ in live]
        self._log_devices = [name for _, name in live]
