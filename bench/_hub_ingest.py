"""The hub's ingest figure: relay batches of device deltas into the SQLite store.

:func:`measure_ingest` builds a synthetic region (device keys, signed ``DELTAS``
envelopes, relay-signed ``BATCH`` messages; not timed), then times what the
reconciler does with them, minus MQTT: :class:`cloud_hub._reconciler_core.ReconcilerCore`
verifies each batch (relay signature, every device signature, origins), merges
the deltas, and each group of batches is committed in one
:meth:`Store.commit_ingest <cloud_hub.store.Store.commit_ingest>` transaction
to a real SQLite store (WAL), with its ``BATCH_ACK`` messages built. The
baseline, in the same run, is raw ``sqlite3`` ``executemany`` of one row per
delta into a bare table with the store's pragmas, one transaction per group:
what SQLite alone costs for the same rows, with no verification, no CRDT and
no index.

A "delta" is one LWW entry (``[key, ts, origin, counter, deleted, value]``);
devices send them ``entries_per_envelope`` to a signed envelope, as an agent's
session does when it catches up after a reconnect.
"""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from cloud_hub._reconciler_core import IngestGroup, ReconcilerCore
from cloud_hub._sqlite_store import open_sqlite_store
from cloud_hub.health import HealthTracker
from sync.envelope import encode_envelope, packb
from sync.hlc import SystemClock, pack_ts
from sync.keys import KeyRing, Signer
from sync.protocol import DELTAS
from sync.relaying import BatchItem, encode_batch

__all__ = ["measure_ingest"]

_RELAY = "relay-bench"
_REGION = "bench"
_BATCH_BYTES = 180 * 1024  # below the 256 KiB envelope cap with room for framing


def _build(
    n_devices: int, deltas_per_device: int, entries_per_envelope: int, batch_items: int
) -> tuple[ReconcilerCore, list[bytes], list[list[tuple[Any, ...]]], int]:
    """Keys, envelopes and batches (not timed); the core ready to ingest."""
    hub, relay = Signer.generate(), Signer.generate()
    relay_keys = KeyRing()
    relay_keys.add(relay.public_key_bytes, relay.key_id)
    core = ReconcilerCore(
        hub, {_RELAY: (_REGION, relay_keys)}, clock=SystemClock(), health=HealthTracker()
    )
    now = SystemClock().now_ms()
    envelopes: list[tuple[str, bytes, list[list[Any]]]] = []
    for d in range(n_devices):
        device = f"gw-{d:06d}"
        signer = Signer.generate()
        core.register_device(device, _REGION, signer.public_key_bytes)
        for first in range(1, deltas_per_device + 1, entries_per_envelope):
            last = min(first + entries_per_envelope, deltas_per_device + 1)
            entries = [
                [f"reported/k{c % 50}", pack_ts(now - 60_000 + c, 0), device, c, False, {"v": c}]
                for c in range(first, last)
            ]
            body = {"s": "bench", "sc": f"device/{device}", "d": entries, "c": None}
            data = encode_envelope(DELTAS, device, first, 1, packb(body), signer)
            envelopes.append((device, data, entries))
    # Interleave devices the way a relay's outbox does (arrival order).
    per_device = len(envelopes) // max(n_devices, 1)
    order = sorted(range(len(envelopes)), key=lambda i: (i % per_device, i // per_device))
    batches: list[bytes] = []
    rows: list[list[tuple[Any, ...]]] = []
    items: list[BatchItem] = []
    batch_rows: list[tuple[Any, ...]] = []
    size = 0
    for i in order:
        device, data, entries = envelopes[i]
        if items and (len(items) >= batch_items or size + len(data) > _BATCH_BYTES):
            batches.append(_batch(relay, len(batches) + 1, items))
            rows.append(batch_rows)
            items, batch_rows, size = [], [], 0
        items.append(BatchItem(i + 1, device, "delta", data))
        size += len(data)
        batch_rows += [(f"device/{device}", *e[:5], packb(e[5])) for e in entries]
    if items:
        batches.append(_batch(relay, len(batches) + 1, items))
        rows.append(batch_rows)
    return core, batches, rows, len(envelopes)


def _batch(relay: Signer, seq: int, items: list[BatchItem]) -> bytes:
    return encode_batch(relay, src=_RELAY, seq=seq, ts=1, epoch=1, items=items)


async def _ingest(core: ReconcilerCore, batches: list[bytes], path: Path, group: int) -> float:
    store = await asyncio.to_thread(open_sqlite_store, path)
    async with store:
        start = time.perf_counter()
        for i in range(0, len(batches), group):
            pending = IngestGroup()
            now = SystemClock().now_ms()
            for data in batches[i : i + group]:
                core.ingest(pending, data, now)
            outcome = core.seal(pending)
            await store.commit_ingest(outcome.commit)
        return time.perf_counter() - start


def _raw(rows: list[list[tuple[Any, ...]]], path: Path, group: int) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(
            "CREATE TABLE deltas (scope TEXT, key TEXT, ts INTEGER, origin TEXT,"
            " counter INTEGER, deleted INTEGER, value BLOB)"
        )
        start = time.perf_counter()
        for i in range(0, len(rows), group):
            conn.execute("BEGIN IMMEDIATE")
            for batch in rows[i : i + group]:
                conn.executemany("INSERT INTO deltas VALUES (?, ?, ?, ?, ?, ?, ?)", batch)
            conn.execute("COMMIT")
        return time.perf_counter() - start
    finally:
        conn.close()


def measure_ingest(
    n_devices: int,
    deltas_per_device: int,
    *,
    entries_per_envelope: int = 10,
    batch_items: int = 250,
    group_batches: int = 64,
) -> dict[str, Any]:
    """Time the hub's ingest of relay batches, and raw SQLite for the same rows.

    Args:
        n_devices: devices of the synthetic region.
        deltas_per_device: LWW entries each device sends (keys cycle over 50,
            so later writes supersede earlier ones as in a live device).
        entries_per_envelope: entries per signed device envelope.
        batch_items: most envelopes per relay batch (batches also stay under
            the envelope size cap).
        group_batches: batches committed per transaction (the reconciler's
            group commit).

    Returns:
        ``ingest_deltas_per_s``, ``ingest_raw_executemany_rows_per_s``,
        ``ingest_ratio_vs_raw`` (ingest / raw) and the run's shape.
    """
    if min(n_devices, deltas_per_device, entries_per_envelope, batch_items, group_batches) < 1:
        raise ValueError("every count must be >= 1")
    core, batches, rows, n_envelopes = _build(
        n_devices, deltas_per_device, entries_per_envelope, batch_items
    )
    total = n_devices * deltas_per_device
    gc_was_enabled = gc.isenabled()
    with tempfile.TemporaryDirectory(prefix="nc-hub-ingest-") as tmp:
        try:
            gc.collect()
            gc.disable()
            ingest_s = asyncio.run(_ingest(core, batches, Path(tmp) / "hub.db", group_batches))
            raw_s = _raw(rows, Path(tmp) / "raw.db", group_batches)
        finally:
            if gc_was_enabled:
                gc.enable()
    stats = core.ingestor.stats
    if stats.dots != total or stats.rejected or stats.refused:
        raise RuntimeError(
            f"ingest bench: {stats.dots} of {total} deltas merged "
            f"(rejected {dict(stats.rejected)}, refused {dict(stats.refused)})"
        )
    ingest_rate = total / ingest_s
    raw_rate = total / raw_s
    return {
        "ingest_deltas_per_s": round(ingest_rate),
        "ingest_raw_executemany_rows_per_s": round(raw_rate),
        "ingest_ratio_vs_raw": round(ingest_rate / raw_rate, 4),
        "ingest_deltas": total,
        "ingest_devices": n_devices,
        "ingest_envelopes": n_envelopes,
        "ingest_entries_per_envelope": entries_per_envelope,
        "ingest_batches": len(batches),
        "ingest_group_batches": group_batches,
        "ingest_seconds": round(ingest_s, 3),
    }
