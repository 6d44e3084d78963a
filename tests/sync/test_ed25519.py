"""The Ed25519 backends (sync/_ed25519.py): PyNaCl (libsodium) and cryptography.

Ed25519 signatures are deterministic, so the two backends must agree byte for
byte on every key and signature; cryptography is the reference.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from sync import _ed25519
from sync._exceptions import SignatureError
from sync.keys import KeyRing, Signer, load_private_key, private_key_from_seed, save_private_key

NACL = _ed25519.nacl_backend()
needs_nacl = pytest.mark.skipif(NACL is None, reason="PyNaCl is not installed")
BACKENDS = [
    pytest.param(_ed25519.cryptography_backend(), id="cryptography"),
    pytest.param(NACL, id="nacl", marks=needs_nacl),
]

# RFC 8032, section 7.1, TEST 2 (one-byte message).
RFC_SEED = bytes.fromhex("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb")
RFC_PUBLIC = bytes.fromhex("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c")
RFC_MESSAGE = bytes.fromhex("72")
RFC_SIG = bytes.fromhex(
    "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
    "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rfc8032_vector(backend: _ed25519.Backend) -> None:
    key = backend.private_key(RFC_SEED)
    assert key.public_key().public_bytes_raw() == RFC_PUBLIC
    assert key.private_bytes_raw() == RFC_SEED
    assert key.sign(RFC_MESSAGE) == RFC_SIG
    public = backend.public_key(RFC_PUBLIC)
    assert public.public_bytes_raw() == RFC_PUBLIC
    assert public.is_valid(RFC_SIG, RFC_MESSAGE)
    assert not public.is_valid(RFC_SIG, b"\x73")
    assert not public.is_valid(RFC_SIG[:-1], RFC_MESSAGE)
    assert not public.is_valid(bytes(64), RFC_MESSAGE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_lengths_are_value_errors(backend: _ed25519.Backend) -> None:
    for bad in (b"", bytes(31), bytes(33)):
        with pytest.raises(ValueError, match="32 bytes"):
            backend.private_key(bad)
        with pytest.raises(ValueError, match="32 bytes"):
            backend.public_key(bad)


@needs_nacl
@settings(max_examples=50, deadline=None)
@given(seed=st.binary(min_size=32, max_size=32), message=st.binary(max_size=300))
def test_nacl_agrees_with_cryptography(seed: bytes, message: bytes) -> None:
    assert NACL is not None
    reference = Ed25519PrivateKey.from_private_bytes(seed)
    key = NACL.private_key(seed)
    public = reference.public_key().public_bytes_raw()
    assert key.public_key().public_bytes_raw() == public
    sig = key.sign(message)
    assert sig == reference.sign(message)
    assert NACL.public_key(public).is_valid(sig, message)
    tampered = bytes([sig[0] ^ 1]) + sig[1:]
    assert not NACL.public_key(public).is_valid(tampered, message)
    assert not _ed25519.cryptography_backend().public_key(public).is_valid(tampered, message)


def test_the_default_backend_is_nacl_where_available() -> None:
    expected = "nacl" if NACL is not None else "cryptography"
    assert _ed25519.BACKEND.name == expected


def _backend_in_subprocess(env: dict[str, str]) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", "from sync._ed25519 import BACKEND; print(BACKEND.name)"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_the_environment_can_force_cryptography() -> None:
    env = os.environ | {_ed25519.ENV_VAR: "cryptography"}
    assert _backend_in_subprocess(env) == "cryptography"


def test_a_signing_process_does_not_load_cryptography() -> None:
    code = (
        "import sys\n"
        "from sync.keys import KeyRing, Signer\n"
        "s = Signer.generate(); r = KeyRing(); kid = r.add(s.public_key_bytes)\n"
        "r.verify(kid, b'x', s.sign(b'x'))\n"
        "print(sorted(m for m in sys.modules if m.startswith('cryptography')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != _ed25519.ENV_VAR}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    if NACL is not None:
        assert proc.stdout.strip() == "[]"


def test_pem_files_are_those_cryptography_writes_and_reads(tmp_path: Path) -> None:
    reference = Ed25519PrivateKey.generate()
    ours = private_key_from_seed(reference.private_bytes_raw())
    save_private_key(ours, tmp_path / "ours.key")
    theirs = reference.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    assert (tmp_path / "ours.key").read_bytes() == theirs
    (tmp_path / "theirs.key").write_bytes(theirs)
    loaded = load_private_key(tmp_path / "theirs.key")
    assert loaded.private_bytes_raw() == reference.private_bytes_raw()


def test_another_pem_layout_is_read_through_cryptography(tmp_path: Path) -> None:
    reference = Ed25519PrivateKey.generate()
    pem = reference.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    path = tmp_path / "crlf.key"
    path.write_bytes(pem.replace(b"\n", b"\r\n"))  # not the exact layout we write
    path.chmod(0o600)
    assert load_private_key(path).private_bytes_raw() == reference.private_bytes_raw()


def test_a_signer_takes_a_cryptography_key_too() -> None:
    reference = Ed25519PrivateKey.generate()
    signer = Signer(reference)
    ring = KeyRing()
    kid = ring.add(signer.public_key_bytes)
    assert signer.public_key_bytes == reference.public_key().public_bytes_raw()
    ring.verify(kid, b"data", signer.sign(b"data"))
    with pytest.raises(SignatureError):
        ring.verify(kid, b"other", signer.sign(b"data"))
