"""Ed25519 key helpers: storage, key ids, Signer and KeyRing."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)

from sync._exceptions import ConfigError, SignatureError
from sync.keys import (
    KEY_ID_LEN,
    KeyRing,
    Signer,
    key_id,
    load_private_key,
    save_private_key,
)
from sync.keys import (
    generate_private_key as generate_ed25519,
)


@pytest.mark.parametrize("fmt", ["pem", "raw"])
def test_save_load_round_trip_mode_0600(tmp_path: Path, fmt: str) -> None:
    key = generate_ed25519()
    path = tmp_path / "device.key"
    save_private_key(key, path, fmt=fmt)  # type: ignore[arg-type]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_private_key(path).private_bytes_raw() == key.private_bytes_raw()
    assert [p.name for p in tmp_path.iterdir()] == ["device.key"]  # no temp file left


def test_save_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "k"
    save_private_key(generate_ed25519(), path)
    second = generate_ed25519()
    save_private_key(second, path)
    assert load_private_key(path).private_bytes_raw() == second.private_bytes_raw()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_save_into_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        save_private_key(generate_ed25519(), tmp_path / "nope" / "k")


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_private_key(tmp_path / "missing")
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a key")
    with pytest.raises(ConfigError, match="not a PEM"):
        load_private_key(junk)
    ec = tmp_path / "ec.pem"
    ec.write_bytes(
        generate_private_key(SECP256R1()).private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
        )
    )
    with pytest.raises(ConfigError, match="Ed25519"):
        load_private_key(ec)


def test_loose_permissions_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "k"
    save_private_key(generate_ed25519(), path)
    path.chmod(0o644)
    load_private_key(path)
    assert "group/others" in caplog.text


def test_key_id_is_short_stable_hex() -> None:
    signer = Signer.generate()
    kid = key_id(signer.public_key_bytes)
    assert kid == signer.key_id == key_id(signer.public_key_bytes)
    assert len(kid) == KEY_ID_LEN
    int(kid, 16)
    with pytest.raises(SignatureError):
        key_id(b"short")


def test_signer_from_file_and_explicit_id(tmp_path: Path) -> None:
    signer = Signer.generate(key_id="hub")
    assert signer.key_id == "hub"
    save_private_key(signer.private_key, tmp_path / "k")
    again = Signer.from_file(tmp_path / "k")
    assert again.public_key_bytes == signer.public_key_bytes
    assert again.key_id == key_id(signer.public_key_bytes)
    with pytest.raises(SignatureError):
        Signer.generate(key_id="")
    assert "hub" in repr(signer)


def test_keyring_add_get_verify() -> None:
    signer = Signer.generate()
    ring = KeyRing()
    kid = ring.add(signer.public_key_bytes)
    assert kid == signer.key_id
    assert ring.add(signer.public_key_bytes) == kid  # idempotent
    assert ring.get(kid) == signer.public_key_bytes
    assert ring.get("nope") is None
    assert kid in ring
    assert len(ring) == 1
    assert list(ring) == [kid]
    sig = signer.sign(b"data")
    assert len(sig) == 64
    ring.verify(kid, b"data", sig)
    with pytest.raises(SignatureError, match="invalid signature"):
        ring.verify(kid, b"datA", sig)
    with pytest.raises(SignatureError, match="unknown key id"):
        ring.verify("other", b"data", sig)
    with pytest.raises(SignatureError, match="64 bytes"):
        ring.verify(kid, b"data", sig[:-1])
    ring.remove(kid)
    ring.remove(kid)
    assert kid not in ring


def test_keyring_rejects_conflicts_and_bad_keys() -> None:
    ring = KeyRing()
    a, b = Signer.generate(), Signer.generate()
    ring.add(a.public_key_bytes, "dev-1")
    with pytest.raises(SignatureError, match="already bound"):
        ring.add(b.public_key_bytes, "dev-1")
    with pytest.raises(SignatureError):
        ring.add(b"\x00" * 31)
    with pytest.raises(SignatureError):
        ring.add(b.public_key_bytes, "x" * 65)
