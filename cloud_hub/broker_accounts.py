"""Mosquitto accounts for enrolled devices: password file, ACL file, reload.

When a device enrolls, the hub gives it a broker account on its region's relay
broker; when it is deleted, the account goes. :class:`BrokerAccounts` is what the
hub needs from any account backend; :class:`MosquittoFileAccounts` implements it
for a Mosquitto 2.x broker configured with ``password_file`` and ``acl_file``
(``examples/mosquitto/relay.conf``).

Password file
    One ``username:$7$<iterations>$<salt>$<hash>`` line per account: PBKDF2-HMAC
    SHA-512 with a 12-byte random salt, 101 iterations and a 64-byte digest, salt
    and digest in standard padded base64: exactly what ``mosquitto_passwd`` 2.0
    writes (``common/password_mosq.c``). Lines of accounts this module does not
    manage (the relay's, the hub's, made with ``mosquitto_passwd``) are kept byte
    for byte, in place.

ACL file
    Everything above the marker line :data:`MANAGED_MARKER` is the static part (the
    relay and hub accounts, patterns); below it, one block per device account::

        user <username>
        topic write nc/v1/r/<region>/d/<device>/up
        topic readwrite nc/v1/r/<region>/d/<device>/state
        topic read nc/v1/r/<region>/d/<device>/down

    The device may publish its uplink and its retained birth/death state (its
    MQTT Will), read its state back, and subscribe to its downlink: the topic set
    of :mod:`sync.topics` that ``edge_agent.link`` uses. Nothing else: not another
    device's topics, not the hub's. (Mosquitto 2.0's ``acl_file`` accepts every
    SUBSCRIBE and checks read access on each message, retained ones included: a
    device may subscribe to another's downlink but receives nothing from it.) The
    managed section is read back on every change, so the files are the only state
    and survive a hub restart.

Writes go to a temporary file in the same directory, are fsynced and renamed over
the old file (then the directory is fsynced): the broker never reads half a
file. Changes are serialized by a lock and the file I/O runs in a worker thread.
After a change the broker is told to reload (by default SIGHUP to the pid in its
pid file, see :func:`mosquitto_reloader`); Mosquitto rereads both files and
disconnects clients whose account is gone.

Order of writes keeps a crash harmless: :meth:`~MosquittoFileAccounts.provision`
writes the ACL block before the password, :meth:`~MosquittoFileAccounts.revoke`
removes the password before the ACL block, so an account never has a password
without its ACL (an ACL block without a password is inert and is cleaned up by
the next call for that user).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import signal
import tempfile
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from cloud_hub._exceptions import HubError
from sync._exceptions import TopicError
from sync.topics import device_topic, parse_topic, validate_id

__all__ = [
    "MANAGED_MARKER",
    "PBKDF2_ITERATIONS",
    "SALT_BYTES",
    "BrokerAccounts",
    "BrokerAccountsError",
    "DeviceAccount",
    "MosquittoFileAccounts",
    "device_acl_block",
    "hash_password",
    "mosquitto_reloader",
    "parse_acl",
    "passwd_users",
    "render_acl",
    "set_passwd_entry",
    "verify_password",
]

logger = logging.getLogger(__name__)

PBKDF2_ITERATIONS: Final = 101
"""Iterations ``mosquitto_passwd`` 2.0 uses (``PW_DEFAULT_ITERATIONS``)."""
SALT_BYTES: Final = 12
"""Salt length ``mosquitto_passwd`` 2.0 uses."""
_DIGEST_BYTES: Final = 64
MAX_PASSWORD_CHARS: Final = 1024
MANAGED_MARKER: Final = (
    "# --- novacron: device accounts below are managed by the hub; edits are lost ---"
)
_DEFAULT_MODE: Final = 0o640


class BrokerAccountsError(HubError):
    """An account cannot be provisioned or revoked, or the broker cannot be reloaded.

    Attributes:
        username: the account concerned (``""`` when not about one account).
    """

    def __init__(self, message: str, *, username: str = "") -> None:
        self.username = username
        super().__init__(f"broker account {username!r}: {message}" if username else message)


class BrokerAccounts(Protocol):
    """Broker accounts for devices: what the hub's enrollment and deletion need."""

    async def provision(self, username: str, password: str, device_id: str, region: str) -> None:
        """Create or replace ``username``'s account, confined to the device's topics.

        Returns once the broker has been told to apply it.

        Raises:
            BrokerAccountsError: invalid input, a name taken by an account not
                managed here, or the files or the reload failed.
        """
        ...

    async def revoke(self, username: str) -> None:
        """Remove ``username``'s account (nothing happens if there is none).

        Raises:
            BrokerAccountsError: the account is not managed here, or the files or
                the reload failed.
        """
        ...


@dataclass(frozen=True, slots=True)
class DeviceAccount:
    """A managed device account, as the ACL file records it.

    Attributes:
        username: the MQTT username.
        device_id: the device whose topics it may use.
        region: the device's region.
    """

    username: str
    device_id: str
    region: str


# -- pure core: password hashes ------------------------------------------------------------


def hash_password(
    password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS
) -> str:
    """Hash ``password`` the way ``mosquitto_passwd`` 2.0 does (``$7$``).

    Args:
        password: the password (UTF-8 encoded before hashing).
        salt: the salt (default: :data:`SALT_BYTES` random bytes). Mosquitto 2.0
            accepts 12-byte salts only.
        iterations: PBKDF2 iterations.

    Returns:
        ``$7$<iterations>$<base64 salt>$<base64 digest>``.
    """
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return (
        f"$7${iterations}${base64.b64encode(salt).decode('ascii')}"
        f"${base64.b64encode(digest).decode('ascii')}"
    )


def verify_password(password: str, encoded: str) -> bool:
    """Check ``password`` against a Mosquitto hash (``$7$`` PBKDF2 or ``$6$`` SHA-512).

    Returns:
        True when it matches; False on a mismatch or a hash this cannot read.
    """
    parts = encoded.split("$")
    try:
        if len(parts) == 5 and parts[0] == "" and parts[1] == "7":
            iterations = int(parts[2])
            salt = base64.b64decode(parts[3], validate=True)
            expected = base64.b64decode(parts[4], validate=True)
            if iterations < 1:
                return False
            actual = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
        elif len(parts) == 4 and parts[0] == "" and parts[1] == "6":
            salt = base64.b64decode(parts[2], validate=True)
            expected = base64.b64decode(parts[3], validate=True)
            actual = hashlib.sha512(password.encode("utf-8") + salt).digest()
        else:
            return False
    except ValueError:  # bad base64 or iteration count
        return False
    return len(expected) == _DIGEST_BYTES and hmac.compare_digest(actual, expected)


# -- pure core: the password file -----------------------------------------------------------


def _passwd_user(line: str) -> str | None:
    """The username of a password-file line, None for blanks and comments."""
    stripped = line.rstrip("\r\n")
    if not stripped or stripped.startswith("#") or ":" not in stripped:
        return None
    return stripped.split(":", 1)[0]


def passwd_users(text: str) -> list[str]:
    """Usernames in a password file, in file order."""
    return [u for line in text.splitlines() if (u := _passwd_user(line)) is not None]


def set_passwd_entry(text: str, username: str, encoded: str | None) -> str:
    """Return the password file ``text`` with ``username``'s line set or removed.

    Other lines are kept byte for byte. A replaced line stays in its place; a new
    one is appended.

    Args:
        text: the current file.
        username: the account.
        encoded: its new hash, or None to remove it.
    """
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    done = False
    for line in lines:
        if _passwd_user(line) == username:
            if encoded is not None and not done:
                out.append(f"{username}:{encoded}\n")
            done = True
            continue
        out.append(line)
    if encoded is not None and not done:
        if out and not out[-1].endswith("\n"):
            out[-1] += "\n"
        out.append(f"{username}:{encoded}\n")
    return "".join(out)


# -- pure core: the ACL file ----------------------------------------------------------------


def device_acl_block(account: DeviceAccount) -> str:
    """The ACL lines confining ``account`` to its device's topics."""
    up = device_topic(account.region, account.device_id, "up")
    state = device_topic(account.region, account.device_id, "state")
    down = device_topic(account.region, account.device_id, "down")
    return (
        f"user {account.username}\ntopic write {up}\ntopic readwrite {state}\ntopic read {down}\n"
    )


def render_acl(static: str, accounts: Mapping[str, DeviceAccount]) -> str:
    """The whole ACL file: the static part, the marker, one block per account.

    Args:
        static: the static part (relay and hub accounts, patterns); may be empty.
        accounts: managed accounts by username, written sorted by username.
    """
    head = static if not static or static.endswith("\n") else static + "\n"
    blocks = "".join("\n" + device_acl_block(accounts[name]) for name in sorted(accounts))
    return f"{head}{MANAGED_MARKER}\n{blocks}"


_USER_LINE: Final = re.compile(r"user +(.+)")


def parse_acl(text: str) -> tuple[str, dict[str, DeviceAccount]]:
    """Split an ACL file into its static part and its managed accounts.

    A file without the marker (one written by hand, like the shipped
    ``relay.acl``) is all static.

    Returns:
        ``(static, accounts)``: the text above the marker line, and the managed
        accounts by username.

    Raises:
        BrokerAccountsError: the managed section is not what :func:`render_acl`
            writes (it was edited by hand).
    """
    head, sep, managed = text.partition(MANAGED_MARKER + "\n")
    if not sep:
        if text.endswith(MANAGED_MARKER):
            return text[: -len(MANAGED_MARKER)], {}
        return text, {}
    accounts: dict[str, DeviceAccount] = {}
    lines = [line for line in managed.splitlines() if line.strip()]
    if len(lines) % 4:
        raise BrokerAccountsError("the managed section of the ACL file was edited by hand")
    for i in range(0, len(lines), 4):
        user = _USER_LINE.fullmatch(lines[i])
        up_line = lines[i + 1]
        if user is None or not up_line.startswith("topic write "):
            raise BrokerAccountsError(f"unexpected line in the managed ACL section: {lines[i]!r}")
        try:
            parsed = parse_topic(up_line.removeprefix("topic write "))
        except TopicError as exc:
            raise BrokerAccountsError(f"unexpected managed ACL line {up_line!r}") from exc
        if parsed.device is None:
            raise BrokerAccountsError(f"unexpected managed ACL line {up_line!r}")
        account = DeviceAccount(user.group(1), parsed.device, parsed.region)
        if "\n".join(lines[i : i + 4]) + "\n" != device_acl_block(account):
            raise BrokerAccountsError(f"managed ACL block of {account.username!r} was edited")
        accounts[account.username] = account
    return head, accounts


def _static_users(static: str) -> set[str]:
    return {
        m.group(1).strip()
        for line in static.splitlines()
        if (m := _USER_LINE.fullmatch(line.strip())) is not None
    }


# -- validation -------------------------------------------------------------------------------


def _check_username(username: str) -> None:
    try:
        validate_id(username, what="username")
    except TopicError as exc:
        raise BrokerAccountsError(str(exc), username=username) from exc
    if ":" in username:
        # The password file separates user and hash with ':'.
        raise BrokerAccountsError("may not contain ':'", username=username)


def _check_password(username: str, password: str) -> None:
    if not password:
        raise BrokerAccountsError("empty password", username=username)
    if len(password) > MAX_PASSWORD_CHARS:
        raise BrokerAccountsError(
            f"password longer than {MAX_PASSWORD_CHARS} characters", username=username
        )
    if "\x00" in password:
        # Mosquitto hashes the C string: everything after a NUL would be ignored.
        raise BrokerAccountsError("password contains NUL", username=username)


# -- file I/O (blocking; run in a worker thread) -------------------------------------------


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as exc:
        raise BrokerAccountsError(f"cannot read {path}: {exc}") from exc


def _write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: temp file, fsync, rename, fsync the directory.

    The new file keeps the old one's permission bits and (when allowed) group.
    """
    try:
        old = path.stat()
    except FileNotFoundError:
        old = None
    directory = path.parent
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise BrokerAccountsError(f"cannot write {path}: {exc}") from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.chmod((old.st_mode & 0o7777) if old is not None else _DEFAULT_MODE)
        if old is not None:
            with contextlib.suppress(PermissionError):
                os.chown(tmp, -1, old.st_gid)
        tmp.replace(path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise BrokerAccountsError(f"cannot write {path}: {exc}") from exc
        raise


# -- reload ---------------------------------------------------------------------------------


def _read_pid(pid_file: Path) -> int:
    try:
        text = pid_file.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise BrokerAccountsError(f"cannot read the broker pid file {pid_file}: {exc}") from exc
    if not text.isdigit() or int(text) <= 1:
        raise BrokerAccountsError(f"the broker pid file {pid_file} holds {text[:40]!r}, not a pid")
    return int(text)


def mosquitto_reloader(pid_file: Path) -> Callable[[], Awaitable[None]]:
    """A reload callable that sends SIGHUP to the broker whose pid is in ``pid_file``.

    The pid file is read at every reload (the broker may have restarted). Mosquitto
    handles the signal asynchronously: when the callable returns, the broker has
    been told, and applies the change within its next loop iteration.

    Raises (from the callable):
        BrokerAccountsError: the pid file is missing or malformed, no such process,
            or no permission to signal it.
    """

    async def reload() -> None:
        pid = await asyncio.to_thread(_read_pid, pid_file)
        try:
            os.kill(pid, signal.SIGHUP)
        except OSError as exc:  # ProcessLookupError, PermissionError
            raise BrokerAccountsError(f"cannot signal broker pid {pid}: {exc}") from exc
        logger.debug("sent SIGHUP to mosquitto pid %d", pid)

    return reload


# -- the asyncio shell ----------------------------------------------------------------------


class MosquittoFileAccounts:
    """:class:`BrokerAccounts` kept in a Mosquitto password file and ACL file.

    The two files are the only state: every change reads them, edits them and
    writes them back, so several hub restarts (or a hand edit of the static part
    and of non-managed password lines) are safe. One instance per pair of files;
    changes through one instance are serialized.
    """

    def __init__(
        self,
        passwd_file: Path,
        acl_file: Path,
        *,
        reload: Callable[[], Awaitable[None]] | None = None,
        pid_file: Path | None = None,
        static_acl: str | None = None,
    ) -> None:
        """Set up; nothing is read or written until the first change.

        Args:
            passwd_file: Mosquitto's ``password_file``.
            acl_file: Mosquitto's ``acl_file``.
            reload: called after each change to make the broker apply it.
            pid_file: instead of ``reload``: SIGHUP the pid in this file
                (:func:`mosquitto_reloader`). With neither, nothing is reloaded
                (the caller reloads the broker itself).
            static_acl: the ACL text above the managed section (the relay's and the
                hub's accounts). None keeps what the ACL file has there now (the
                whole file, if the hub never wrote it).

        Raises:
            ValueError: both ``reload`` and ``pid_file`` were given.
        """
        if reload is not None and pid_file is not None:
            raise ValueError("give reload or pid_file, not both")
        self._passwd_file = Path(passwd_file)
        self._acl_file = Path(acl_file)
        self._reload = mosquitto_reloader(pid_file) if pid_file is not None else reload
        self._static_acl = static_acl
        self._lock = asyncio.Lock()
        # A thread lock too: the edit runs in worker threads, and two instances on
        # the same files in one process (tests, a restarted component) must not
        # interleave their read-modify-write.
        self._thread_lock = threading.Lock()

    async def provision(self, username: str, password: str, device_id: str, region: str) -> None:
        """Create or replace ``username``'s account, confined to the device's topics.

        Raises:
            BrokerAccountsError: an invalid username, password, device id or region;
                a username that belongs to an account not managed here (the relay's);
                an unreadable or unwritable file; a failed reload.
        """
        _check_username(username)
        _check_password(username, password)
        try:
            account = DeviceAccount(
                username, validate_id(device_id, what="device"), validate_id(region, what="region")
            )
        except TopicError as exc:
            raise BrokerAccountsError(str(exc), username=username) from exc
        encoded = hash_password(password)
        async with self._lock:
            await asyncio.to_thread(self._provision_sync, account, encoded)
            await self._apply()
        logger.info(
            "broker account %s provisioned for device %s in region %s", username, device_id, region
        )

    async def revoke(self, username: str) -> None:
        """Remove ``username``'s account; nothing happens (no reload) if there is none.

        Raises:
            BrokerAccountsError: the account is not managed here (the relay's), an
                unreadable or unwritable file, a failed reload.
        """
        _check_username(username)
        async with self._lock:
            changed = await asyncio.to_thread(self._revoke_sync, username)
            if changed:
                await self._apply()
        if changed:
            logger.info("broker account %s revoked", username)

    async def accounts(self) -> dict[str, DeviceAccount]:
        """The managed device accounts, by username (from the ACL file)."""
        async with self._lock:
            text = await asyncio.to_thread(_read, self._acl_file)
        return parse_acl(text)[1]

    async def _apply(self) -> None:
        if self._reload is not None:
            await self._reload()

    def _static(self, current_static: str) -> str:
        return current_static if self._static_acl is None else self._static_acl

    def _provision_sync(self, account: DeviceAccount, encoded: str) -> None:
        with self._thread_lock:
            acl_text = _read(self._acl_file)
            current_static, accounts = parse_acl(acl_text)
            static = self._static(current_static)
            passwd = _read(self._passwd_file)
            name = account.username
            if name in _static_users(static):
                raise BrokerAccountsError("has entries in the static ACL", username=name)
            if name not in accounts and name in passwd_users(passwd):
                raise BrokerAccountsError(
                    "exists in the password file but is not managed by the hub", username=name
                )
            accounts[name] = account
            new_acl = render_acl(static, accounts)
            if new_acl != acl_text:
                _write_atomic(self._acl_file, new_acl)
            _write_atomic(self._passwd_file, set_passwd_entry(passwd, name, encoded))

    def _revoke_sync(self, username: str) -> bool:
        with self._thread_lock:
            acl_text = _read(self._acl_file)
            current_static, accounts = parse_acl(acl_text)
            passwd = _read(self._passwd_file)
            in_passwd = username in passwd_users(passwd)
            if username not in accounts:
                if in_passwd:
                    raise BrokerAccountsError(
                        "exists in the password file but is not managed by the hub",
                        username=username,
                    )
                return False
            if in_passwd:
                _write_atomic(self._passwd_file, set_passwd_entry(passwd, username, None))
            del accounts[username]
            _write_atomic(self._acl_file, render_acl(self._static(current_static), accounts))
            return True
