"""API tokens (hashed storage, expiry, revocation) and the role authorization matrix."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import itertools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import cast, get_args

import pytest

from cloud_hub._exceptions import AuthError, TokenNotFoundError
from cloud_hub.auth import (
    ADMIN_KINDS,
    FLEET_KINDS,
    ROLES,
    Action,
    Principal,
    Resource,
    ResourceKind,
    Role,
    SQLiteTokenStore,
    TokenStore,
    action_for_method,
    authorize,
    hash_token,
    parse_token,
)

ACTIONS: tuple[Action, ...] = get_args(Action)
KINDS: tuple[ResourceKind, ...] = get_args(ResourceKind)


class FakeClock:
    """A settable wall clock (seconds)."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Iterator[SQLiteTokenStore]:
    with SQLiteTokenStore.open(tmp_path / "tokens.db", clock=clock) as s:
        yield s


def _p(role: str, device_id: str | None = None) -> Principal:
    return Principal("0123456789ab", f"{role}-token", cast(Role, role), device_id)


# -- authorization -----------------------------------------------------------------------

GW1 = _p("device", "gw-1")

# (principal, action, resource, allowed): the rules of the issue, one row each.
MATRIX: list[tuple[Principal, Action, Resource, bool]] = [
    # viewer: reads fleet resources only
    (_p("viewer"), "read", Resource("deployment"), True),
    (_p("viewer"), "read", Resource("device", "gw-1"), True),
    (_p("viewer"), "read", Resource("rollout", "web"), True),
    (_p("viewer"), "read", Resource("event"), True),
    (_p("viewer"), "mutate", Resource("deployment"), False),
    (_p("viewer"), "mutate", Resource("device", "gw-1"), False),
    (_p("viewer"), "mutate", Resource("enrollment_token"), False),
    (_p("viewer"), "read", Resource("token"), False),
    (_p("viewer"), "read", Resource("audit"), False),
    (_p("viewer"), "admin", Resource("device", "gw-1"), False),
    # operator: reads and mutates fleet resources
    (_p("operator"), "mutate", Resource("deployment", "web"), True),
    (_p("operator"), "mutate", Resource("rollout", "web"), True),
    (_p("operator"), "mutate", Resource("device", "gw-1"), True),
    (_p("operator"), "mutate", Resource("enrollment_token"), True),
    (_p("operator"), "read", Resource("enrollment_token"), True),
    (_p("operator"), "read", Resource("token"), False),
    (_p("operator"), "mutate", Resource("token"), False),
    (_p("operator"), "read", Resource("audit"), False),
    (_p("operator"), "admin", Resource("device", "gw-1"), False),
    # admin: everything
    (_p("admin"), "mutate", Resource("token"), True),
    (_p("admin"), "read", Resource("audit"), True),
    (_p("admin"), "admin", Resource("device", "gw-1"), True),
    (_p("admin"), "mutate", Resource("deployment"), True),
    # device: its own device, read only
    (GW1, "read", Resource("device", "gw-1"), True),
    (GW1, "read", Resource("device", "gw-2"), False),
    (GW1, "read", Resource("device"), False),  # the device list
    (GW1, "mutate", Resource("device", "gw-1"), False),
    (GW1, "admin", Resource("device", "gw-1"), False),
    (GW1, "read", Resource("deployment", "gw-1"), False),
    (GW1, "read", Resource("rollout"), False),
    (GW1, "read", Resource("event"), False),
    (GW1, "read", Resource("token", "gw-1"), False),
    (_p("device", None), "read", Resource("device"), False),
    (_p("device", None), "read", Resource("device", None), False),
    # unknown role: nothing
    (_p("root"), "read", Resource("device", "gw-1"), False),
]


@pytest.mark.parametrize(
    ("principal", "action", "resource", "allowed"),
    MATRIX,
    ids=[f"{p.role}-{a}-{r.kind}-{r.id}" for p, a, r, _ in MATRIX],
)
def test_authorization_matrix(
    principal: Principal, action: Action, resource: Resource, allowed: bool
) -> None:
    assert authorize(principal, action, resource) is allowed


def _expected(role: str, action: Action, kind: ResourceKind, rid: str | None) -> bool:
    """The rules again, written as set membership, for the exhaustive check."""
    if role == "admin":
        return True
    if role == "operator":
        return action in ("read", "mutate") and kind in FLEET_KINDS
    if role == "viewer":
        return action == "read" and kind in FLEET_KINDS
    if role == "device":
        return (action, kind, rid) == ("read", "device", "gw-1")
    return False


@pytest.mark.parametrize("role", [*ROLES, "root", ""])
def test_authorization_is_exhaustive(role: str) -> None:
    principal = _p(role, "gw-1" if role == "device" else None)
    for action, kind, rid in itertools.product(ACTIONS, KINDS, [None, "gw-1", "gw-2"]):
        got = authorize(principal, action, Resource(kind, rid))
        assert got is _expected(role, action, kind, rid), (role, action, kind, rid)


def test_kinds_partition() -> None:
    assert set(KINDS) == FLEET_KINDS | ADMIN_KINDS
    assert not FLEET_KINDS & ADMIN_KINDS


@pytest.mark.parametrize(
    ("method", "action"),
    [
        ("GET", "read"),
        ("head", "read"),
        ("OPTIONS", "read"),
        ("POST", "mutate"),
        ("PUT", "mutate"),
        ("PATCH", "mutate"),
        ("DELETE", "mutate"),
    ],
)
def test_action_for_method(method: str, action: Action) -> None:
    assert action_for_method(method) == action


# -- tokens ------------------------------------------------------------------------------


def test_store_satisfies_the_protocol(store: SQLiteTokenStore) -> None:
    generic: TokenStore = store
    raw, info = generic.create("ci", "operator")
    assert generic.authenticate(raw) == Principal(info.id, "ci", "operator", None)


def test_create_and_authenticate(store: SQLiteTokenStore, clock: FakeClock) -> None:
    raw, info = store.create("gateway 42", "device", device_id="gw-42")
    assert raw.startswith(f"nct_{info.id}_")
    assert parse_token(raw) == info.id
    assert len(raw.split("_", 2)[2]) >= 43  # token_urlsafe(32)
    assert info.created_at == dt.datetime.fromtimestamp(clock.now, dt.UTC)
    assert info.expires_at is None and not info.revoked
    principal = store.authenticate(raw)
    assert principal == Principal(info.id, "gateway 42", "device", "gw-42")
    assert principal is not None and principal.actor == info.id
    assert store.get(info.id) == info
    assert store.get("ffffffffffff") is None
    assert info.to_dict()["created_at"] == info.created_at.isoformat()


def test_tokens_are_unique(store: SQLiteTokenStore) -> None:
    made = [store.create(f"t{i}", "viewer") for i in range(20)]
    assert len({raw for raw, _ in made}) == 20
    assert len({info.id for _, info in made}) == 20


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "nct",
        "nct__",
        "Bearer nct_0123456789ab_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        "xyz_0123456789ab_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        "nct_0123456789AB_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        "nct_0123456789ab_short",
        "nct_0123456789ab_" + "x" * 500,
        "nct_0123456789ab_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx é",
    ],
)
def test_malformed_tokens_do_not_authenticate(store: SQLiteTokenStore, raw: str) -> None:
    store.create("x", "admin")
    assert store.authenticate(raw) is None


def test_wrong_secret_or_unknown_id_is_refused(store: SQLiteTokenStore) -> None:
    raw, _ = store.create("x", "admin")
    prefix, token_id, secret = raw.split("_", 2)
    flipped = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    assert store.authenticate(f"{prefix}_{token_id}_{flipped}") is None
    other_id = "f" * 12 if token_id != "f" * 12 else "e" * 12
    assert store.authenticate(f"{prefix}_{other_id}_{secret}") is None
    assert store.authenticate(raw) is not None


def test_only_the_hash_is_stored(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "tokens.db"
    raws: list[str] = []
    with SQLiteTokenStore.open(path, clock=clock) as s:
        for i in range(5):
            raw, _ = s.create(f"t{i}", "operator")
            raws.append(raw)
    blobs = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert blobs  # the database file is there
    for raw in raws:
        secret = raw.split("_", 2)[2]
        assert secret.encode() not in blobs
        assert raw.encode() not in blobs
        assert hash_token(raw).encode() in blobs
        assert hash_token(raw) == hashlib.sha256(raw.encode()).hexdigest()


def test_tokens_survive_reopening(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "tokens.db"
    with SQLiteTokenStore.open(path, clock=clock) as s:
        raw, info = s.create("keep", "viewer")
    with SQLiteTokenStore.open(path, clock=clock) as s:
        assert s.authenticate(raw) == info.principal()
        assert s.list() == [info]


def test_expiry(store: SQLiteTokenStore, clock: FakeClock) -> None:
    raw, info = store.create("short", "viewer", ttl=dt.timedelta(minutes=5))
    assert info.expires_at == info.created_at + dt.timedelta(minutes=5)
    clock.now += 299.999
    assert store.authenticate(raw) is not None
    clock.now += 0.001
    assert store.authenticate(raw) is None
    assert not info.active(dt.datetime.fromtimestamp(clock.now, dt.UTC))
    assert store.get(info.id) == info  # still listed, just inactive


def test_revocation(store: SQLiteTokenStore, clock: FakeClock) -> None:
    raw, info = store.create("ops", "operator")
    clock.now += 1
    other_raw, _ = store.create("ops2", "operator")
    clock.now += 10
    revoked = store.revoke(info.id)
    assert revoked.revoked_at == dt.datetime.fromtimestamp(clock.now, dt.UTC)
    assert store.authenticate(raw) is None
    assert store.authenticate(other_raw) is not None
    clock.now += 10
    assert store.revoke(info.id).revoked_at == revoked.revoked_at  # idempotent
    with pytest.raises(TokenNotFoundError) as err:
        store.revoke("ffffffffffff")
    assert err.value.token_id == "ffffffffffff"
    listed = store.list()
    assert [t.name for t in listed] == ["ops", "ops2"]
    assert [t.revoked for t in listed] == [True, False]


def test_timing_safe_compare_is_used(
    store: SQLiteTokenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw, info = store.create("x", "admin")
    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def recording(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)  # what cloud_hub.auth calls
    assert store.authenticate(raw) is not None
    secret = raw.split("_", 2)[2]
    assert store.authenticate(f"nct_{info.id}_{secret[::-1]}") is None
    other = "f" * 12 if info.id != "f" * 12 else "e" * 12
    assert store.authenticate(f"nct_{other}_{secret}") is None  # unknown id: still compared
    assert len(calls) == 3
    assert calls[0] == (hash_token(raw), hash_token(raw))


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (("", "viewer", None, None), "name"),
        (("x" * 200, "viewer", None, None), "name"),
        (("line\nbreak", "viewer", None, None), "printable"),
        (("x", "root", None, None), "unknown role"),
        (("x", "device", None, None), "needs a device id"),
        (("x", "operator", "gw-1", None), "only device tokens"),
        (("x", "device", "gw/1", None), "forbidden"),
        (("x", "viewer", None, dt.timedelta(0)), "ttl"),
        (("x", "viewer", None, dt.timedelta(seconds=-1)), "ttl"),
    ],
)
def test_invalid_create_is_refused(
    store: SQLiteTokenStore,
    spec: tuple[str, str, str | None, dt.timedelta | None],
    match: str,
) -> None:
    name, role, device_id, ttl = spec
    with pytest.raises(AuthError, match=match):
        store.create(name, cast(Role, role), device_id=device_id, ttl=ttl)
    assert store.list() == []


def test_closed_store_refuses(tmp_path: Path) -> None:
    s = SQLiteTokenStore.open(tmp_path / "t.db")
    s.close()
    s.close()
    with pytest.raises(AuthError, match="closed"):
        s.list()


def test_concurrent_use(store: SQLiteTokenStore) -> None:
    raws = [store.create(f"t{i}", "viewer")[0] for i in range(4)]
    failures: list[str] = []

    def work(i: int) -> None:
        for _ in range(50):
            if store.authenticate(raws[i % 4]) is None:
                failures.append(raws[i % 4])
        store.create(f"more{i}", "operator")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert len(store.list()) == 12
