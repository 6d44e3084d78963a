"""Broker accounts in Mosquitto's password and ACL files (cloud_hub.broker_accounts).

Unit tests for the pure parts (hash format, file editing), then a real Mosquitto
running the relay host configuration we ship (``examples/mosquitto/relay.conf``)
with the password and ACL files this module writes, reloaded by SIGHUP through
a pid file.

Usernames differ from device ids on purpose (``acct-a`` owns device ``gw-a``): the
shipped ``relay.acl`` patterns key on the username, so only the per-account ACL
blocks written here can give these accounts their device's topics.

"Does not arrive" is shown without sleeping, as in tests/relay/test_broker_conf.py:
a marker follows on an allowed topic, and Mosquitto delivers one publisher's
messages in order.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest
from paho.mqtt.reasoncodes import ReasonCode

from cloud_hub.broker_accounts import (
    MANAGED_MARKER,
    BrokerAccounts,
    BrokerAccountsError,
    DeviceAccount,
    MosquittoFileAccounts,
    device_acl_block,
    hash_password,
    mosquitto_reloader,
    parse_acl,
    passwd_users,
    render_acl,
    set_passwd_entry,
    verify_password,
)
from edge_agent._mqtt import connected
from sync.topics import device_topic
from tests.fixtures_mqtt import (
    MOSQUITTO,
    MOSQUITTO_PASSWD,
    MosquittoBroker,
    free_port,
    relay_broker_conf,
    write_password_file,
)
from tests.helpers import wait_until_async
from tests.relay.relay_harness import collect_until

REGION = "eu-west"
DEADLINE_S = 15.0
RELAY_STATIC_ACL = (
    "# relay and hub accounts (static)\n"
    "user relay\n"
    "topic read nc/v1/r/+/d/+/up\n"
    "topic read nc/v1/r/+/d/+/state\n"
    "topic write nc/v1/r/+/d/+/down\n"
    "topic readwrite nc/v1/hub/#\n"
)
HASH_RE = re.compile(r"\$7\$101\$[A-Za-z0-9+/]{16}\$[A-Za-z0-9+/]{86}==")


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def mosquitto_passwd(*args: str | Path) -> None:
    subprocess.run([MOSQUITTO_PASSWD, *map(str, args)], check=True, capture_output=True)


def need_mosquitto() -> None:
    if not Path(MOSQUITTO).exists() or not Path(MOSQUITTO_PASSWD).exists():
        pytest.skip("mosquitto and mosquitto_passwd are not installed (CI installs them)")


# -- hashes ---------------------------------------------------------------------------------


def test_hash_has_the_mosquitto_passwd_format() -> None:
    encoded = hash_password("s3cret")
    assert HASH_RE.fullmatch(encoded), encoded
    assert verify_password("s3cret", encoded)
    assert not verify_password("s3cret!", encoded)
    assert hash_password("s3cret") != encoded  # a fresh salt each time


def test_hash_with_a_given_salt_is_deterministic() -> None:
    salt = bytes(range(12))
    assert hash_password("pw", salt=salt) == hash_password("pw", salt=salt)
    assert hash_password("pw", salt=salt).split("$")[3] == "AAECAwQFBgcICQoL"


def test_verify_reads_what_mosquitto_passwd_writes(tmp_path: Path) -> None:
    need_mosquitto()
    path = tmp_path / "passwd"
    mosquitto_passwd("-c", "-b", path, "alice", "wonder land")
    [line] = path.read_text(encoding="utf-8").splitlines()
    user, encoded = line.split(":", 1)
    assert user == "alice"
    assert HASH_RE.fullmatch(encoded)
    assert verify_password("wonder land", encoded)
    assert not verify_password("wonderland", encoded)


@pytest.mark.parametrize(
    "encoded", ["", "plain", "$7$0$AAAA$BBBB", "$7$x$AAAA$BBBB", "$7$101$!!$??", "$9$1$2$3"]
)
def test_verify_refuses_unreadable_hashes(encoded: str) -> None:
    assert not verify_password("pw", encoded)


# -- the password file ------------------------------------------------------------------------


def test_set_passwd_entry_keeps_other_lines_byte_for_byte() -> None:
    text = "# comment\nrelay:$7$101$abc$def\n\nhub:$6$x$y\n"
    added = set_passwd_entry(text, "acct-a", "$7$1$s$h")
    assert added == text + "acct-a:$7$1$s$h\n"
    replaced = set_passwd_entry(added, "relay", "$7$2$s$h")
    assert replaced == "# comment\nrelay:$7$2$s$h\n\nhub:$6$x$y\nacct-a:$7$1$s$h\n"
    assert set_passwd_entry(added, "acct-a", None) == text
    assert set_passwd_entry(text, "nobody", None) == text
    assert passwd_users(added) == ["relay", "hub", "acct-a"]
    # A file without a final newline gets one before the new line.
    assert set_passwd_entry("relay:x", "b", "y") == "relay:x\nb:y\n"


# -- the ACL file -------------------------------------------------------------------------------


def test_acl_block_is_the_device_topic_set() -> None:
    block = device_acl_block(DeviceAccount("acct-a", "gw-a", REGION))
    assert block.splitlines() == [
        "user acct-a",
        f"topic write {device_topic(REGION, 'gw-a', 'up')}",
        f"topic readwrite {device_topic(REGION, 'gw-a', 'state')}",
        f"topic read {device_topic(REGION, 'gw-a', 'down')}",
    ]


def test_acl_round_trip_and_static_part() -> None:
    accounts = {
        "b": DeviceAccount("b", "gw-b", "us-east"),
        "a": DeviceAccount("a", "gw-a", REGION),
    }
    text = render_acl(RELAY_STATIC_ACL, accounts)
    assert text.startswith(RELAY_STATIC_ACL + MANAGED_MARKER + "\n")
    assert text.index("user a\n") < text.index("user b\n")
    static, parsed = parse_acl(text)
    assert static == RELAY_STATIC_ACL
    assert parsed == accounts
    # A hand-written file (no marker) is all static.
    shipped = (Path(__file__).parents[2] / "examples/mosquitto/relay.acl").read_text("utf-8")
    assert parse_acl(shipped) == (shipped, {})
    assert parse_acl(render_acl("", {})) == ("", {})


@pytest.mark.parametrize(
    "edit",
    [
        lambda t: t.replace("topic read nc/v1/r/eu-west/d/gw-a/down", "topic read #"),
        lambda t: t + "topic readwrite #\n",
        lambda t: t.replace("topic write nc/v1/r/eu-west/d/gw-a/up", "topic write x/y"),
        lambda t: t.replace("user a\n", "usr a\n"),
    ],
)
def test_a_hand_edited_managed_section_is_refused(edit: Callable[[str], str]) -> None:
    text = edit(render_acl("", {"a": DeviceAccount("a", "gw-a", REGION)}))
    with pytest.raises(BrokerAccountsError):
        parse_acl(text)


# -- MosquittoFileAccounts on files --------------------------------------------------------


class CountingReload:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1


def test_implements_the_protocol(tmp_path: Path) -> None:
    accounts: BrokerAccounts = MosquittoFileAccounts(tmp_path / "p", tmp_path / "a")
    assert accounts is not None


def test_reload_and_pid_file_are_exclusive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        MosquittoFileAccounts(
            tmp_path / "p", tmp_path / "a", reload=CountingReload(), pid_file=tmp_path / "pid"
        )


async def test_provision_and_revoke_edit_both_files(tmp_path: Path) -> None:
    passwd, acl = tmp_path / "passwd", tmp_path / "acl"
    passwd.write_text("relay:$7$101$AAECAwQFBgcICQoL$xyz\n", encoding="utf-8")
    passwd.chmod(0o600)
    reload = CountingReload()
    accounts = MosquittoFileAccounts(passwd, acl, reload=reload, static_acl=RELAY_STATIC_ACL)

    await accounts.provision("acct-a", "pw-a", "gw-a", REGION)
    await accounts.provision("acct-b", "pw-b", "gw-b", "us-east")
    assert reload.calls == 2
    lines = passwd.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "relay:$7$101$AAECAwQFBgcICQoL$xyz"
    assert passwd_users(passwd.read_text(encoding="utf-8")) == ["relay", "acct-a", "acct-b"]
    assert verify_password("pw-a", lines[1].split(":", 1)[1])
    assert passwd.stat().st_mode & 0o777 == 0o600  # the mode is kept
    assert acl.stat().st_mode & 0o777 == 0o640  # a new file's default
    assert await accounts.accounts() == {
        "acct-a": DeviceAccount("acct-a", "gw-a", REGION),
        "acct-b": DeviceAccount("acct-b", "gw-b", "us-east"),
    }
    assert acl.read_text(encoding="utf-8").startswith(RELAY_STATIC_ACL)

    # Provisioning again rotates the password in place.
    await accounts.provision("acct-a", "pw-a2", "gw-a", REGION)
    lines = passwd.read_text(encoding="utf-8").splitlines()
    assert lines[1].startswith("acct-a:")
    assert verify_password("pw-a2", lines[1].split(":", 1)[1])

    await accounts.revoke("acct-a")
    assert passwd_users(passwd.read_text(encoding="utf-8")) == ["relay", "acct-b"]
    assert set(await accounts.accounts()) == {"acct-b"}
    calls = reload.calls
    await accounts.revoke("acct-a")  # gone already: nothing to do, no reload
    assert reload.calls == calls
    assert files_in(tmp_path) == ["acl", "passwd"]  # no temp files left


async def test_static_part_is_kept_when_not_given(tmp_path: Path) -> None:
    passwd, acl = tmp_path / "passwd", tmp_path / "acl"
    shipped = (Path(__file__).parents[2] / "examples/mosquitto/relay.acl").read_text("utf-8")
    acl.write_text(shipped, encoding="utf-8")
    accounts = MosquittoFileAccounts(passwd, acl)
    await accounts.provision("acct-a", "pw", "gw-a", REGION)
    await MosquittoFileAccounts(passwd, acl).provision("acct-b", "pw", "gw-b", REGION)
    text = acl.read_text(encoding="utf-8")
    assert text.startswith(shipped + MANAGED_MARKER + "\n")
    assert set(parse_acl(text)[1]) == {"acct-a", "acct-b"}


async def test_accounts_not_managed_here_are_left_alone(tmp_path: Path) -> None:
    passwd, acl = tmp_path / "passwd", tmp_path / "acl"
    passwd.write_text("relay:$7$101$AAECAwQFBgcICQoL$xyz\n", encoding="utf-8")
    reload = CountingReload()
    accounts = MosquittoFileAccounts(passwd, acl, reload=reload, static_acl="")
    with pytest.raises(BrokerAccountsError, match="not managed"):
        await accounts.provision("relay", "hijack", "gw-x", REGION)
    with pytest.raises(BrokerAccountsError, match="not managed"):
        await accounts.revoke("relay")
    static_only = MosquittoFileAccounts(
        tmp_path / "p2", acl, reload=reload, static_acl=RELAY_STATIC_ACL
    )
    with pytest.raises(BrokerAccountsError, match="static ACL"):
        await static_only.provision("relay", "hijack", "gw-x", REGION)
    assert passwd.read_text(encoding="utf-8") == "relay:$7$101$AAECAwQFBgcICQoL$xyz\n"
    assert reload.calls == 0


@pytest.mark.parametrize(
    ("username", "password", "device", "region"),
    [
        ("a/b", "pw", "gw-a", REGION),
        ("a+", "pw", "gw-a", REGION),
        ("a b", "pw", "gw-a", REGION),
        ("a:b", "pw", "gw-a", REGION),
        ("", "pw", "gw-a", REGION),
        ("x" * 65, "pw", "gw-a", REGION),
        ("acct", "", "gw-a", REGION),
        ("acct", "p\x00w", "gw-a", REGION),
        ("acct", "x" * 1025, "gw-a", REGION),
        ("acct", "pw", "gw/a", REGION),
        ("acct", "pw", "gw-a", "eu#west"),
    ],
)
async def test_invalid_input_is_refused_before_any_write(
    tmp_path: Path, username: str, password: str, device: str, region: str
) -> None:
    reload = CountingReload()
    accounts = MosquittoFileAccounts(tmp_path / "passwd", tmp_path / "acl", reload=reload)
    with pytest.raises(BrokerAccountsError):
        await accounts.provision(username, password, device, region)
    assert files_in(tmp_path) == []
    assert reload.calls == 0


async def test_concurrent_changes_are_serialized(tmp_path: Path) -> None:
    passwd, acl = tmp_path / "passwd", tmp_path / "acl"
    accounts = MosquittoFileAccounts(passwd, acl, reload=CountingReload())
    names = [f"acct-{i:02d}" for i in range(24)]
    await asyncio.gather(*(accounts.provision(n, f"pw-{n}", f"gw-{n}", REGION) for n in names))
    assert sorted(passwd_users(passwd.read_text(encoding="utf-8"))) == names
    await asyncio.gather(*(accounts.revoke(n) for n in names[::2]))
    assert sorted(passwd_users(passwd.read_text(encoding="utf-8"))) == names[1::2]
    assert sorted(await accounts.accounts()) == names[1::2]


async def test_a_failed_reload_is_reported(tmp_path: Path) -> None:
    async def broken() -> None:
        raise BrokerAccountsError("no broker")

    accounts = MosquittoFileAccounts(tmp_path / "passwd", tmp_path / "acl", reload=broken)
    with pytest.raises(BrokerAccountsError, match="no broker"):
        await accounts.provision("acct-a", "pw", "gw-a", REGION)


@pytest.mark.parametrize("content", [None, "", "abc", "1", "-5"])
async def test_reloader_refuses_a_bad_pid_file(tmp_path: Path, content: str | None) -> None:
    pid_file = tmp_path / "mosquitto.pid"
    if content is not None:
        pid_file.write_text(content, encoding="ascii")
    with pytest.raises(BrokerAccountsError, match="pid file"):
        await mosquitto_reloader(pid_file)()


async def test_reloader_reports_a_dead_pid(tmp_path: Path) -> None:
    pid_file = tmp_path / "mosquitto.pid"
    pid_file.write_text(f"{dead_pid()}\n", encoding="ascii")
    with pytest.raises(BrokerAccountsError, match="cannot signal"):
        await mosquitto_reloader(pid_file)()


# -- against a real Mosquitto ----------------------------------------------------------------


@dataclass
class Setup:
    broker: MosquittoBroker
    accounts: MosquittoFileAccounts
    passwd: Path
    acl: Path
    pid_file: Path


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    """The shipped relay config on a free port; ``relay`` made by mosquitto_passwd;
    reloads by SIGHUP to the pid in the broker's own pid file."""
    need_mosquitto()
    workdir = tmp_path / "broker"
    workdir.mkdir()
    passwd, acl = workdir / "passwd", workdir / "relay.acl"
    write_password_file(passwd, {"relay": "relay-pw"})
    acl.write_text(RELAY_STATIC_ACL, encoding="utf-8")
    port = free_port()
    conf = relay_broker_conf(
        workdir, port, password_file=passwd, acl_file=acl, log_path=workdir / "mosquitto.log"
    )
    pid_file = workdir / "mosquitto.pid"
    # Mosquitto writes its pid file itself (also in the foreground).
    broker = MosquittoBroker(workdir, port, extra_conf=f"pid_file {pid_file}\n", conf_text=conf)
    broker.start()
    assert broker.proc is not None
    assert pid_file.read_text(encoding="ascii").strip() == str(broker.proc.pid)
    accounts = MosquittoFileAccounts(passwd, acl, pid_file=pid_file)
    try:
        yield Setup(broker, accounts, passwd, acl, pid_file)
    finally:
        broker.stop()


PASSWORDS = {"relay": "relay-pw", "acct-a": "pw-a", "acct-b": "pw-b"}


@asynccontextmanager
async def client(s: Setup, user: str, password: str | None = None) -> AsyncIterator[aiomqtt.Client]:
    async with connected(
        aiomqtt.Client(
            "127.0.0.1",
            s.broker.port,
            username=user,
            password=PASSWORDS[user] if password is None else password,
            identifier=f"c-{user}",
            timeout=DEADLINE_S,
        )
    ) as c:
        yield c


async def can_connect(s: Setup, user: str, password: str | None = None) -> bool:
    try:
        async with client(s, user, password):
            return True
    except aiomqtt.MqttError:
        return False


async def eventually(check: Callable[[], Awaitable[bool]], expected: bool) -> None:
    """Mosquitto applies a SIGHUP asynchronously: poll until ``check`` gives ``expected``."""

    async def holds() -> bool:
        return await check() is expected

    await wait_until_async(holds, within=DEADLINE_S)


def topic(device: str, kind: str) -> str:
    assert kind in ("up", "down", "state")
    return device_topic(REGION, device, kind)  # type: ignore[arg-type]


async def provision_both(s: Setup) -> None:
    await s.accounts.provision("acct-a", PASSWORDS["acct-a"], "gw-a", REGION)
    await s.accounts.provision("acct-b", PASSWORDS["acct-b"], "gw-b", REGION)
    await eventually(lambda: can_connect(s, "acct-b"), True)
    await eventually(lambda: can_connect(s, "acct-a"), True)


def refused(codes: tuple[int, ...] | list[ReasonCode]) -> list[bool]:
    """Per topic of a SUBACK: was the subscription refused (0x80 and above)?"""
    return [c >= 0x80 if isinstance(c, int) else c.is_failure for c in codes]


@pytest.mark.integration
async def test_a_provisioned_device_uses_its_own_topics(setup: Setup) -> None:
    s = setup
    assert not await can_connect(s, "acct-a")
    await provision_both(s)
    async with client(s, "relay") as relay, client(s, "acct-a") as a:
        await relay.subscribe("nc/v1/r/+/d/+/up", qos=1)
        await relay.subscribe("nc/v1/r/+/d/+/state", qos=1)
        assert refused(await a.subscribe(topic("gw-a", "down"), qos=1)) == [False]
        assert refused(await a.subscribe(topic("gw-a", "state"), qos=1)) == [False]
        await a.publish(topic("gw-a", "state"), b"online", qos=1, retain=True)
        await a.publish(topic("gw-a", "up"), b"uplink", qos=1)
        seen_relay = await collect_until(relay, b"uplink")
        await relay.publish(topic("gw-a", "down"), b"downlink", qos=1)
        seen_a = await collect_until(a, b"downlink")
    assert seen_relay == [(topic("gw-a", "state"), b"online"), (topic("gw-a", "up"), b"uplink")]
    assert seen_a == [(topic("gw-a", "state"), b"online"), (topic("gw-a", "down"), b"downlink")]


@pytest.mark.integration
async def test_a_device_cannot_publish_as_another(setup: Setup) -> None:
    s = setup
    await provision_both(s)
    async with client(s, "relay") as relay, client(s, "acct-a") as a:
        await relay.subscribe("nc/v1/r/+/d/+/up", qos=1)
        await relay.subscribe("nc/v1/r/+/d/+/state", qos=1)
        await relay.subscribe("nc/v1/r/+/d/+/down", qos=1)  # the relay may not read it
        await a.publish(topic("gw-b", "up"), b"forged uplink", qos=1)
        await a.publish(topic("gw-b", "state"), b"forged state", qos=1)
        await a.publish(topic("gw-b", "down"), b"forged downlink", qos=1)
        await a.publish(topic("gw-a", "down"), b"own downlink", qos=1)
        await a.publish(f"nc/v1/hub/r/{REGION}/up", b"forged batch", qos=1)
        await a.publish(topic("gw-a", "up"), b"marker", qos=1)
        seen = await collect_until(relay, b"marker")
    assert seen == [(topic("gw-a", "up"), b"marker")]


@pytest.mark.integration
async def test_a_device_cannot_read_another_devices_topics(setup: Setup) -> None:
    """Mosquitto 2.0's acl_file grants every SUBSCRIBE (its source says "FIXME -
    implement ACL subscription strings") and checks read access per message: the
    subscription is accepted, but nothing of another device reaches it, retained
    or live."""
    s = setup
    await provision_both(s)
    async with client(s, "acct-b") as b:
        await b.publish(topic("gw-b", "state"), b"b retained state", qos=1, retain=True)
    async with client(s, "relay") as relay, client(s, "acct-a") as a:
        await a.subscribe(topic("gw-b", "down"), qos=1)
        await a.subscribe(topic("gw-b", "state"), qos=1)
        await a.subscribe("nc/v1/r/+/d/+/down", qos=1)
        await a.subscribe("#", qos=1)
        await relay.publish(topic("gw-b", "down"), b"for b only", qos=1)
        await relay.publish(f"nc/v1/hub/r/{REGION}/down", b"hub batch", qos=1)
        await relay.publish(topic("gw-a", "down"), b"marker", qos=1)
        seen = await collect_until(a, b"marker")
    # The marker arrives once per matching subscription ("#", "+", exact).
    assert {t for t, _ in seen} == {topic("gw-a", "down")}
    assert {p for _, p in seen} == {b"marker"}


@pytest.mark.integration
async def test_a_wrong_password_is_refused(setup: Setup) -> None:
    s = setup
    await provision_both(s)
    assert not await can_connect(s, "acct-a", "pw-b")
    assert not await can_connect(s, "acct-a", "")
    assert not await can_connect(s, "acct-b", "pw-a")


@pytest.mark.integration
async def test_revoke_locks_the_device_out(setup: Setup) -> None:
    s = setup
    await provision_both(s)
    async with client(s, "acct-a") as a:
        await a.subscribe(topic("gw-a", "down"), qos=1)
        await s.accounts.revoke("acct-a")
        # Mosquitto drops the connection of an account that is gone on reload.
        with pytest.raises(aiomqtt.MqttError):
            async with asyncio.timeout(DEADLINE_S):
                async for _ in a.messages:
                    pass
    await eventually(lambda: can_connect(s, "acct-a"), False)
    assert await can_connect(s, "acct-b")
    assert await can_connect(s, "relay")
    # Provisioned again with a new password: the old one stays refused.
    await s.accounts.provision("acct-a", "new-pw", "gw-a", REGION)
    await eventually(lambda: can_connect(s, "acct-a", "new-pw"), True)
    assert not await can_connect(s, "acct-a")


@pytest.mark.integration
async def test_mosquitto_passwd_accounts_are_kept(setup: Setup) -> None:
    s = setup
    relay_line = s.passwd.read_text(encoding="utf-8")
    await provision_both(s)
    # An operator adds an account with mosquitto_passwd between two hub changes.
    await asyncio.to_thread(mosquitto_passwd, "-b", s.passwd, "ops", "ops-pw")
    lines = s.passwd.read_text(encoding="utf-8").splitlines(keepends=True)
    await s.accounts.revoke("acct-b")
    after = s.passwd.read_text(encoding="utf-8")
    assert after.startswith(relay_line)
    assert [ln for ln in lines if not ln.startswith("acct-b:")] == after.splitlines(keepends=True)
    await eventually(lambda: can_connect(s, "acct-b"), False)
    assert await can_connect(s, "relay")
    assert await can_connect(s, "ops", "ops-pw")
    assert await can_connect(s, "acct-a")
    # mosquitto_passwd in turn reads our file and keeps our lines.
    await asyncio.to_thread(mosquitto_passwd, "-D", s.passwd, "ops")
    assert passwd_users(s.passwd.read_text(encoding="utf-8")) == ["relay", "acct-a"]
    s.broker.reload()
    assert await can_connect(s, "acct-a")
