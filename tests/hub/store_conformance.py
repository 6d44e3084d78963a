"""A conformance suite for :class:`cloud_hub.store.Store` implementations.

Subclass :class:`StoreConformance` in a test module and provide two fixtures:

- ``store``: an open, empty store (closed by the fixture afterwards);
- ``reopen``: an async callable that closes a store and returns a new one on
  the same database (for persistence checks).

Only the Protocol's methods are used, so a PostgreSQL store can run it as is.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_hub.store import (
    MAX_PAGE_LIMIT,
    AssignmentRecord,
    ConflictError,
    CursorError,
    DeviceQuery,
    DeviceRecord,
    DeviceStatus,
    DeviceStatusUpdate,
    EnrollTokenRecord,
    EventRecord,
    IngestCommit,
    NotFoundError,
    RolloutRecord,
    Store,
    StoreError,
    TokenRefusedError,
)

Reopen = Callable[[Store], Awaitable[Store]]

STATUSES: tuple[DeviceStatus, ...] = ("unknown", "online", "offline", "unreachable")
SECRET = hashlib.sha256(b"secret").hexdigest()
T0 = 1_700_000_000_000


def token(
    token_id: str = "tok1",
    *,
    max_uses: int = 1,
    expires_at_ms: int | None = None,
    region: str = "eu-west",
    labels: dict[str, str] | None = None,
) -> EnrollTokenRecord:
    return EnrollTokenRecord(
        id=token_id,
        secret_hash=SECRET,
        name=f"token {token_id}",
        region=region,
        labels={"site": "lyon"} if labels is None else labels,
        max_uses=max_uses,
        expires_at_ms=expires_at_ms,
        created_at_ms=T0,
        created_by="alice",
    )


def maker(
    device_id: str,
    *,
    public_key: str | None = None,
    profile: str = "gw-small",
    labels: dict[str, str] | None = None,
) -> Callable[[EnrollTokenRecord], DeviceRecord]:
    def make(tok: EnrollTokenRecord) -> DeviceRecord:
        return DeviceRecord(
            id=device_id,
            region=tok.region,
            profile=profile,
            public_key=public_key or f"key-{device_id}",
            arch="arm64",
            labels={**tok.labels, **(labels or {})},
            facts={"os": "linux", "cpus": 4},
            enrolled_at_ms=T0 + 1,
            token_id=tok.id,
            mqtt_username=f"dev-{device_id}",
        )

    return make


async def enroll(store: Store, devices: list[tuple[str, str, str, dict[str, str]]]) -> None:
    """Enroll ``(id, region, profile, labels)`` devices, one token per region."""
    by_region: dict[str, int] = {}
    for _id, region, _profile, _labels in devices:
        by_region[region] = by_region.get(region, 0) + 1
    for region, n in by_region.items():
        await store.create_enroll_token(
            token(f"seed-{region}", max_uses=n, region=region, labels={})
        )
    for device_id, region, profile, labels in devices:
        await store.redeem_enroll_token(
            f"seed-{region}", SECRET, T0, maker(device_id, profile=profile, labels=labels)
        )


async def all_pages(store: Store, query: DeviceQuery) -> list[str]:
    ids: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        page = await store.list_devices(
            DeviceQuery(
                labels=query.labels,
                region=query.region,
                profile=query.profile,
                status=query.status,
                cursor=cursor,
                limit=query.limit,
            )
        )
        pages += 1
        assert len(page.items) <= query.limit
        ids += [d.id for d in page.items]
        if page.next_cursor is None:
            return ids
        assert page.items, "a page with a next cursor is never empty"
        cursor = page.next_cursor
        assert pages < 1000


# A fixed fleet for the pagination property: 3 regions, 2 profiles, 4 statuses, labels.
_RNG = random.Random(5)
FLEET = [
    (
        f"dev-{i:03d}",
        _RNG.choice(["eu", "us", "ap"]),
        _RNG.choice(["small", "large"]),
        {
            k: v
            for k, v in (("tier", _RNG.choice(["a", "b"])), ("env", _RNG.choice(["p", "s"])))
            if _RNG.random() < 0.7
        },
        _RNG.choice(STATUSES),
    )
    for i in range(60)
]

queries = st.builds(
    DeviceQuery,
    labels=st.dictionaries(
        st.sampled_from(["tier", "env", "missing"]),
        st.sampled_from(["a", "b", "p", "s"]),
        max_size=2,
    ),
    region=st.none() | st.sampled_from(["eu", "us", "ap", "nowhere"]),
    profile=st.none() | st.sampled_from(["small", "large"]),
    status=st.none() | st.sampled_from(STATUSES),
    limit=st.integers(1, 25),
)


def expected_ids(query: DeviceQuery) -> list[str]:
    return sorted(
        device_id
        for device_id, region, profile, labels, status in FLEET
        if (query.region is None or region == query.region)
        and (query.profile is None or profile == query.profile)
        and (query.status is None or status == query.status)
        and all(labels.get(k) == v for k, v in query.labels.items())
    )


class StoreConformance:
    """The behaviour every :class:`~cloud_hub.store.Store` must have."""

    # -- devices ---------------------------------------------------------------------

    async def test_redeem_creates_a_device(self, store: Store) -> None:
        await store.create_enroll_token(token(max_uses=2))
        dev = await store.redeem_enroll_token("tok1", SECRET, T0, maker("d1", labels={"x": "1"}))
        assert dev.id == "d1" and dev.region == "eu-west"
        assert dev.labels == {"site": "lyon", "x": "1"}
        assert dev.facts == {"os": "linux", "cpus": 4}
        assert dev.status == "unknown" and dev.last_seen_ms is None
        assert await store.get_device("d1") == dev
        assert (await store.get_enroll_token("tok1")).uses == 1

    async def test_missing_device(self, store: Store) -> None:
        with pytest.raises(NotFoundError) as err:
            await store.get_device("nope")
        assert (err.value.kind, err.value.key) == ("device", "nope")
        with pytest.raises(NotFoundError):
            await store.set_device_labels("nope", {})
        with pytest.raises(NotFoundError):
            await store.delete_device("nope")

    async def test_labels_replace_and_filter(self, store: Store) -> None:
        await enroll(
            store,
            [
                ("a", "eu", "p1", {"tier": "gold", "env": "prod"}),
                ("b", "eu", "p1", {"tier": "gold", "env": "staging"}),
                ("c", "us", "p2", {"tier": "silver", "env": "prod"}),
            ],
        )

        async def ids(**filters: Any) -> list[str]:
            return [d.id for d in (await store.list_devices(DeviceQuery(**filters))).items]

        assert await ids(labels={"tier": "gold"}) == ["a", "b"]
        assert await ids(labels={"tier": "gold", "env": "prod"}) == ["a"]
        assert await ids(labels={"env": "prod"}, region="us") == ["c"]
        assert await ids(labels={"tier": "gold", "env": "nope"}) == []
        updated = await store.set_device_labels("a", {"tier": "silver"})
        assert updated.labels == {"tier": "silver"}
        assert (await store.get_device("a")).labels == {"tier": "silver"}
        assert await ids(labels={"tier": "gold"}) == ["b"]
        assert await ids(labels={"tier": "silver"}) == ["a", "c"]
        assert await ids(labels={"env": "prod"}) == ["c"]
        assert await ids(profile="p1") == ["a", "b"]

    async def test_status_and_counts(self, store: Store) -> None:
        await enroll(store, [(f"d{i}", "eu", "p", {}) for i in range(4)])
        assert await store.count_devices() == {
            "unknown": 4,
            "online": 0,
            "offline": 0,
            "unreachable": 0,
        }
        await store.update_device_status(
            [
                DeviceStatusUpdate("d0", "online", T0 + 50),
                DeviceStatusUpdate("d1", "offline", T0 + 10),
                DeviceStatusUpdate("d2", "unreachable", None),
                DeviceStatusUpdate("ghost", "online", T0),  # unknown ids are ignored
            ]
        )
        assert await store.count_devices() == {
            "unknown": 1,
            "online": 1,
            "offline": 1,
            "unreachable": 1,
        }
        d0 = await store.get_device("d0")
        assert (d0.status, d0.last_seen_ms) == ("online", T0 + 50)
        assert (await store.get_device("d2")).last_seen_ms is None
        # last seen is never lowered; None keeps it
        await store.update_device_status(
            [DeviceStatusUpdate("d0", "offline", T0 + 5), DeviceStatusUpdate("d1", "online", None)]
        )
        d0 = await store.get_device("d0")
        assert (d0.status, d0.last_seen_ms) == ("offline", T0 + 50)
        assert (await store.get_device("d1")).last_seen_ms == T0 + 10
        page = await store.list_devices(DeviceQuery(status="offline"))
        assert [d.id for d in page.items] == ["d0"]

    async def test_delete_device(self, store: Store) -> None:
        await enroll(store, [("a", "eu", "p", {"k": "v"}), ("b", "eu", "p", {"k": "v"})])
        gone = await store.delete_device("a")
        assert gone.id == "a"
        with pytest.raises(NotFoundError):
            await store.get_device("a")
        page = await store.list_devices(DeviceQuery(labels={"k": "v"}))
        assert [d.id for d in page.items] == ["b"]
        assert (await store.count_devices())["unknown"] == 1

    @settings(
        max_examples=50,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(query=queries)
    async def test_pagination_covers_every_device_once(
        self, store: Store, query: DeviceQuery
    ) -> None:
        # The fleet is seeded once per store (the fixture is shared by the examples).
        if not await _seeded(store):
            await enroll(store, [(i, r, p, lab) for i, r, p, lab, _s in FLEET])
            await store.update_device_status(
                [DeviceStatusUpdate(i, s, T0) for i, _r, _p, _l, s in FLEET]
            )
        ids = await all_pages(store, query)
        assert ids == expected_ids(query)

    async def test_pages_while_devices_join(self, store: Store) -> None:
        await enroll(store, [(f"d{i}", "eu", "p", {}) for i in (1, 3, 5, 7)])
        first = await store.list_devices(DeviceQuery(limit=2))
        assert [d.id for d in first.items] == ["d1", "d3"]
        await enroll(store, [("d0", "us", "p", {}), ("d4", "us", "p", {})])
        rest = await store.list_devices(DeviceQuery(cursor=first.next_cursor, limit=10))
        # keyset paging: nothing twice; a device that joined past the cursor shows up
        assert [d.id for d in rest.items] == ["d4", "d5", "d7"]
        assert rest.next_cursor is None

    async def test_page_limits(self, store: Store) -> None:
        await enroll(store, [(f"d{i}", "eu", "p", {}) for i in range(3)])
        for bad in (0, -1, MAX_PAGE_LIMIT + 1):
            with pytest.raises(ValueError, match="limit"):
                await store.list_devices(DeviceQuery(limit=bad))
            with pytest.raises(ValueError, match="limit"):
                await store.list_enroll_tokens(limit=bad)
        page = await store.list_devices(DeviceQuery(limit=MAX_PAGE_LIMIT))
        assert len(page.items) == 3 and page.next_cursor is None
        page = await store.list_devices(DeviceQuery(limit=3))
        assert page.next_cursor is None  # exactly full: no empty last page
        page = await store.list_devices(DeviceQuery(limit=2))
        assert [d.id for d in page.items] == ["d0", "d1"] and page.next_cursor

    async def test_garbage_cursors(self, store: Store) -> None:
        await enroll(store, [(f"d{i}", "eu", "p", {"k": "v"}) for i in range(3)])
        first = await store.list_devices(DeviceQuery(region="eu", limit=1))
        assert first.next_cursor is not None
        for garbage in ("", "!!!", "bm90IGpzb24", "W10", "x" * 5000, "eyJhIjoxfQ"):
            with pytest.raises(CursorError):
                await store.list_devices(DeviceQuery(cursor=garbage))
        # a cursor of another filter, or of another listing
        with pytest.raises(CursorError):
            await store.list_devices(DeviceQuery(region="us", cursor=first.next_cursor))
        with pytest.raises(CursorError):
            await store.list_enroll_tokens(cursor=first.next_cursor)
        with pytest.raises(CursorError):
            await store.list_rollouts(cursor=first.next_cursor)
        with pytest.raises(CursorError):
            await store.list_deployments(cursor=first.next_cursor)
        ok = await store.list_devices(DeviceQuery(region="eu", limit=1, cursor=first.next_cursor))
        assert [d.id for d in ok.items] == ["d1"]
        assert isinstance(CursorError("x"), StoreError)

    # -- enrollment tokens -----------------------------------------------------------

    async def test_token_crud(self, store: Store) -> None:
        created = await store.create_enroll_token(token("t2", max_uses=3, expires_at_ms=T0 + 9))
        assert created == token("t2", max_uses=3, expires_at_ms=T0 + 9)
        assert await store.get_enroll_token("t2") == created
        with pytest.raises(ConflictError) as err:
            await store.create_enroll_token(token("t2"))
        assert err.value.kind == "enroll_token"
        with pytest.raises(NotFoundError):
            await store.get_enroll_token("nope")
        with pytest.raises(NotFoundError):
            await store.revoke_enroll_token("nope", T0)
        revoked = await store.revoke_enroll_token("t2", T0 + 5)
        assert revoked.revoked_at_ms == T0 + 5
        again = await store.revoke_enroll_token("t2", T0 + 7)
        assert again.revoked_at_ms == T0 + 5  # the first revocation time is kept

    async def test_token_listing_pages(self, store: Store) -> None:
        for i in reversed(range(7)):
            await store.create_enroll_token(token(f"t{i}"))
        seen: list[str] = []
        cursor = None
        while True:
            page = await store.list_enroll_tokens(cursor=cursor, limit=3)
            seen += [t.id for t in page.items]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert seen == [f"t{i}" for i in range(7)]

    async def test_concurrent_redeem_of_a_single_use_token(self, store: Store) -> None:
        await store.create_enroll_token(token("once"))
        results = await asyncio.gather(
            *(store.redeem_enroll_token("once", SECRET, T0, maker(f"d{i}")) for i in range(20)),
            return_exceptions=True,
        )
        devices = [r for r in results if isinstance(r, DeviceRecord)]
        refused = [r for r in results if isinstance(r, TokenRefusedError)]
        assert len(devices) == 1 and len(refused) == 19
        assert {r.reason for r in refused} == {"spent"}
        assert (await store.count_devices())["unknown"] == 1
        assert (await store.get_enroll_token("once")).uses == 1

    async def test_redeem_refusals(self, store: Store) -> None:
        async def reason(token_id: str, secret: str = SECRET, now: int = T0) -> str:
            with pytest.raises(TokenRefusedError) as err:
                await store.redeem_enroll_token(token_id, secret, now, maker("x"))
            return err.value.reason

        await store.create_enroll_token(token("exp", expires_at_ms=T0 + 100))
        await store.create_enroll_token(token("rev", max_uses=1))
        await store.revoke_enroll_token("rev", T0)
        assert await reason("nope") == "unknown"
        assert await reason("exp", secret="0" * 64) == "unknown"
        assert await reason("exp", secret="not hex at all é") == "unknown"
        assert await reason("exp", now=T0 + 100) == "expired"
        assert await reason("rev") == "revoked"
        # ordering: revoked before expired before spent
        await store.create_enroll_token(token("all", max_uses=1, expires_at_ms=T0 + 1))
        await store.redeem_enroll_token("all", SECRET, T0, maker("first"))
        assert await reason("all", now=T0 + 5) == "expired"
        assert await reason("all", now=T0) == "spent"
        await store.revoke_enroll_token("all", T0)
        assert await reason("all", now=T0 + 5) == "revoked"
        # an expiring token works before its expiry
        dev = await store.redeem_enroll_token("exp", SECRET, T0 + 99, maker("late"))
        assert dev.id == "late"
        assert (await store.count_devices())["unknown"] == 2
        for token_id, uses in (("exp", 1), ("rev", 0), ("all", 1)):
            assert (await store.get_enroll_token(token_id)).uses == uses

    async def test_redeem_duplicate_key_does_not_use_the_token(self, store: Store) -> None:
        await store.create_enroll_token(token("multi", max_uses=5))
        await store.redeem_enroll_token("multi", SECRET, T0, maker("d1", public_key="K"))
        for make in (maker("d2", public_key="K"), maker("d1", public_key="other")):
            with pytest.raises(TokenRefusedError) as err:
                await store.redeem_enroll_token("multi", SECRET, T0, make)
            assert err.value.reason == "duplicate_key"
        assert (await store.get_enroll_token("multi")).uses == 1
        page = await store.list_devices(DeviceQuery())
        assert [(d.id, d.public_key) for d in page.items] == [("d1", "K")]

    async def test_redeem_make_device_failure_changes_nothing(self, store: Store) -> None:
        await store.create_enroll_token(token("t"))

        def boom(tok: EnrollTokenRecord) -> DeviceRecord:
            raise RuntimeError("bad facts")

        with pytest.raises(RuntimeError, match="bad facts"):
            await store.redeem_enroll_token("t", SECRET, T0, boom)
        assert (await store.get_enroll_token("t")).uses == 0
        await store.redeem_enroll_token("t", SECRET, T0, maker("ok"))

    # -- deployments -----------------------------------------------------------------

    async def test_deployment_versions(self, store: Store) -> None:
        doc1 = {"kind": "Deployment", "metadata": {"name": "web"}, "spec": {"a": 1, "b": [1, 2]}}
        rec, new = await store.put_deployment("web", doc1, "alice", T0)
        assert new and (rec.version, rec.actor, rec.deleted) == (1, "alice", False)
        assert rec.document == doc1
        # the same document (another key order) is not a new version
        same = {"spec": {"b": [1, 2], "a": 1}, "metadata": {"name": "web"}, "kind": "Deployment"}
        rec, new = await store.put_deployment("web", same, "bob", T0 + 1)
        assert not new and (rec.version, rec.actor, rec.created_at_ms) == (1, "alice", T0)
        doc2 = {**doc1, "spec": {"a": 2}}
        rec, new = await store.put_deployment("web", doc2, "bob", T0 + 2)
        assert new and rec.version == 2 and rec.document == doc2
        assert (await store.get_deployment("web")).version == 2
        assert (await store.get_deployment("web", 1)).document == doc1
        with pytest.raises(NotFoundError):
            await store.get_deployment("web", 3)
        with pytest.raises(NotFoundError):
            await store.get_deployment("nope")
        with pytest.raises(NotFoundError):
            await store.deployment_history("nope")
        with pytest.raises(NotFoundError):
            await store.delete_deployment("nope", "bob", T0)
        gone = await store.delete_deployment("web", "carol", T0 + 3)
        assert (gone.version, gone.deleted, gone.actor, gone.document) == (3, True, "carol", doc2)
        latest = await store.get_deployment("web")
        assert latest.deleted and latest.version == 3
        with pytest.raises(NotFoundError):
            await store.delete_deployment("web", "carol", T0 + 4)
        assert (await store.list_deployments()).items == ()
        assert [d.version for d in (await store.list_deployments(include_deleted=True)).items] == [
            3
        ]
        # putting it again, even unchanged, makes it live again
        rec, new = await store.put_deployment("web", doc2, "dave", T0 + 5)
        assert new and rec.version == 4 and not rec.deleted
        history = await store.deployment_history("web")
        assert [(h.version, h.deleted, h.actor) for h in history] == [
            (1, False, "alice"),
            (2, False, "bob"),
            (3, True, "carol"),
            (4, False, "dave"),
        ]

    async def test_deployment_listing(self, store: Store) -> None:
        for i in range(7):
            await store.put_deployment(f"app{i}", {"i": i}, "a", T0)
        await store.put_deployment("app3", {"i": 33}, "a", T0)
        await store.delete_deployment("app5", "a", T0)
        names: list[tuple[str, int]] = []
        cursor = None
        while True:
            page = await store.list_deployments(cursor=cursor, limit=2)
            names += [(d.name, d.version) for d in page.items]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert names == [
            ("app0", 1),
            ("app1", 1),
            ("app2", 1),
            ("app3", 2),
            ("app4", 1),
            ("app6", 1),
        ]
        every = await store.list_deployments(include_deleted=True, limit=100)
        assert [d.name for d in every.items] == [f"app{i}" for i in range(7)]
        with pytest.raises(CursorError):  # a cursor of the other filter
            await store.list_deployments(cursor=page.next_cursor or cursor, include_deleted=True)

    # -- rollouts and assignments ------------------------------------------------------

    async def test_rollouts(self, store: Store) -> None:
        with pytest.raises(NotFoundError):
            await store.get_rollout("web")
        for i, phase in enumerate(
            ["progressing", "paused", "progressing", "complete", "progressing"]
        ):
            await store.save_rollout(
                RolloutRecord(f"d{i}", 1, phase, {"phase": phase, "wave": i}, T0 + i)
            )
        replaced = RolloutRecord("d0", 2, "paused", {"phase": "paused", "wave": 0}, T0 + 9)
        await store.save_rollout(replaced)
        assert await store.get_rollout("d0") == replaced
        progressing: list[str] = []
        cursor = None
        while True:
            page = await store.list_rollouts(phase="progressing", cursor=cursor, limit=1)
            progressing += [r.deployment for r in page.items]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert progressing == ["d2", "d4"]
        assert [r.deployment for r in (await store.list_rollouts(phase="paused")).items] == [
            "d0",
            "d1",
        ]
        assert len((await store.list_rollouts()).items) == 5

    async def test_assignments(self, store: Store) -> None:
        first = await store.set_assignments("web", ["c", "a", "b"], T0)
        assert first == [AssignmentRecord("web", d, T0) for d in ("a", "b", "c")]
        await store.set_assignments("api", ["a"], T0 + 1)
        second = await store.set_assignments("web", ["d", "b", "a", "a"], T0 + 5)
        assert second == [
            AssignmentRecord("web", "a", T0),
            AssignmentRecord("web", "b", T0),
            AssignmentRecord("web", "d", T0 + 5),
        ]
        assert await store.list_assignments(device_id="a") == [
            AssignmentRecord("api", "a", T0 + 1),
            AssignmentRecord("web", "a", T0),
        ]
        assert [(a.deployment, a.device_id) for a in await store.list_assignments()] == [
            ("api", "a"),
            ("web", "a"),
            ("web", "b"),
            ("web", "d"),
        ]
        assert await store.list_assignments(deployment="web", device_id="c") == []
        assert await store.set_assignments("web", [], T0 + 6) == []
        assert await store.list_assignments(deployment="web") == []

    # -- replicated state and events ---------------------------------------------------

    async def test_scopes(self, store: Store) -> None:
        assert await store.load_scopes() == {}
        assert await store.get_scope("device/a") is None
        await store.save_scopes({"device/a": b"\x00\x01", "desired/a": b"x"})
        await store.save_scopes({"device/a": b"\x02"})
        assert await store.load_scopes() == {"device/a": b"\x02", "desired/a": b"x"}
        assert await store.get_scope("desired/a") == b"x"

    async def test_commit_ingest(self, store: Store) -> None:
        await enroll(store, [("a", "eu", "p", {}), ("b", "eu", "p", {})])
        commit = IngestCommit(
            scopes={"device/a": b"state-a"},
            events=[EventRecord("a", "events", s, T0, {"n": s, "msg": "é"}) for s in (1, 2, 3)]
            + [EventRecord("a", "metrics", 1, T0, [1.5, None, True])]
            + [EventRecord("b", "events", 1, T0, "plain")],
            cursors={("a", "events"): 4, ("a", "metrics"): 2, ("b", "events"): 2},
            seen={"a": T0 + 100, "ghost": T0},
        )
        await store.commit_ingest(commit)
        first = await store.list_events("a")
        await store.commit_ingest(commit)  # idempotent
        assert await store.list_events("a") == first
        assert [(e.stream, e.seq) for e in first] == [
            ("events", 1),
            ("events", 2),
            ("events", 3),
            ("metrics", 1),
        ]
        assert first[0].body == {"n": 1, "msg": "é"}
        assert first[3].body == [1.5, None, True]
        assert [e.seq for e in await store.list_events("a", stream="events", after_seq=1)] == [2, 3]
        assert [e.seq for e in await store.list_events("a", stream="events", limit=2)] == [1, 2]
        assert [e.body for e in await store.list_events("b")] == ["plain"]
        assert await store.list_events("nobody") == []
        assert await store.load_cursors() == {
            ("a", "events"): 4,
            ("a", "metrics"): 2,
            ("b", "events"): 2,
        }
        assert await store.get_scope("device/a") == b"state-a"
        assert (await store.get_device("a")).last_seen_ms == T0 + 100
        # seen never lowers; an empty commit is fine
        await store.commit_ingest(IngestCommit(seen={"a": T0 + 1, "b": T0 + 7}))
        await store.commit_ingest(IngestCommit())
        assert (await store.get_device("a")).last_seen_ms == T0 + 100
        assert (await store.get_device("b")).last_seen_ms == T0 + 7

    async def test_ingest_is_atomic(self, store: Store) -> None:
        bad = IngestCommit(
            scopes={"device/a": b"x"},
            events=[
                EventRecord("a", "events", 1, T0, {"ok": 1}),
                EventRecord("a", "events", 2, T0, {"bad": {1, 2}}),
            ],
            cursors={("a", "events"): 3},
        )
        with pytest.raises(StoreError):
            await store.commit_ingest(bad)
        assert await store.list_events("a") == []
        assert await store.load_cursors() == {}
        assert await store.load_scopes() == {}

    # -- lifecycle -------------------------------------------------------------------

    async def test_reopen_persists_everything(self, store: Store, reopen: Reopen) -> None:
        await enroll(store, [("a", "eu", "p", {"k": "v"})])
        await store.update_device_status([DeviceStatusUpdate("a", "online", T0 + 3)])
        await store.create_enroll_token(token("t9", max_uses=4))
        await store.put_deployment("web", {"v": 1}, "alice", T0)
        await store.put_deployment("web", {"v": 2}, "alice", T0)
        rollout = RolloutRecord("web", 2, "progressing", {"phase": "progressing"}, T0)
        await store.save_rollout(rollout)
        await store.set_assignments("web", ["a"], T0)
        await store.commit_ingest(
            IngestCommit(
                scopes={"device/a": b"s"},
                events=[EventRecord("a", "events", 1, T0, {"x": 1})],
                cursors={("a", "events"): 2},
            )
        )
        before = (
            await store.get_device("a"),
            await store.get_enroll_token("t9"),
            await store.deployment_history("web"),
        )
        store = await reopen(store)
        after = (
            await store.get_device("a"),
            await store.get_enroll_token("t9"),
            await store.deployment_history("web"),
        )
        assert after == before
        assert after[0].status == "online"
        assert [d.id for d in (await store.list_devices(DeviceQuery(labels={"k": "v"}))).items] == [
            "a"
        ]
        assert await store.get_rollout("web") == rollout
        assert await store.list_assignments() == [AssignmentRecord("web", "a", T0)]
        assert await store.load_scopes() == {"device/a": b"s"}
        assert await store.load_cursors() == {("a", "events"): 2}
        assert [e.body for e in await store.list_events("a")] == [{"x": 1}]

    async def test_aclose_is_idempotent_and_final(self, store: Store) -> None:
        await store.aclose()
        await store.aclose()
        with pytest.raises(StoreError):
            await store.get_device("a")
        with pytest.raises(StoreError):
            await store.save_scopes({"x": b"y"})
        with pytest.raises(StoreError):
            await store.list_devices(DeviceQuery())


async def _seeded(store: Store) -> bool:
    counts = await store.count_devices()
    return sum(counts.values()) > 0
