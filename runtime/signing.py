"""Ed25519 signing keys and ``manifest.sig``, which binds a manifest to the key that signed it.

Key files are PEM: ``<name>.key`` (PKCS#8, unencrypted, mode 0600) and ``<name>.pub``
(SubjectPublicKeyInfo). A key is named by its *key id*, the first 16 hex digits of the
sha256 of the raw 32-byte public key. ``manifest.sig`` is a small JSON object::

    {"algorithm": "ed25519", "key_id": "…16 hex…", "signature": "…base64 of 64 bytes…"}

The signature covers the exact ``manifest.json`` bytes. Ed25519 signatures are deterministic,
so signing the same manifest with the same key always gives the same ``manifest.sig``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from runtime.errors import SignatureError

__all__ = [
    "ALGORITHM",
    "Ed25519PrivateKey",
    "Ed25519PublicKey",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "parse_signature",
    "sign_manifest",
    "verify_manifest",
]

log = logging.getLogger(__name__)

ALGORITHM = "ed25519"
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")
_MAX_KEY_FILE = 64 * 1024
_MAX_SIG_FILE = 4 * 1024
_SIG_KEYS = frozenset({"algorithm", "key_id", "signature"})


def key_id(public_key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """First 16 hex digits of sha256 over the raw 32-byte public key."""
    if isinstance(public_key, Ed25519PrivateKey):
        public_key = public_key.public_key()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(out_dir: Path, name: str = "fleet", *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new ``<name>.key`` (0600) and ``<name>.pub`` into ``out_dir``; return both paths.

    Existing files are refused (the error names them) unless ``overwrite`` is true: a fleet's
    devices trust the old public key, so replacing it by accident would orphan them.
    """
    out_dir = Path(out_dir)
    if not name or "/" in name or name in (".", ".."):
        raise SignatureError(f"key name {name!r} must be a plain file name like 'fleet'")
    private_path, public_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    if not overwrite:
        for p in (private_path, public_path):
            if p.exists() or p.is_symlink():
                raise SignatureError(
                    "already exists; refusing to overwrite a signing key "
                    "(pass overwrite=True / --force, or choose another name)",
                    path=p,
                )
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_key_file(private_path, private_pem, 0o600, overwrite=overwrite)
        _write_key_file(public_path, public_pem, 0o644, overwrite=overwrite)
    except FileExistsError as exc:
        raise SignatureError("already exists; refusing to overwrite a signing key", path=exc.filename) from exc
    except OSError as exc:
        raise SignatureError(f"cannot write key file: {exc.strerror}", path=exc.filename or out_dir) from exc
    return private_path, public_path


def _write_key_file(path: Path, data: bytes, mode: int, *, overwrite: bool) -> None:
    """Create ``path`` with ``mode`` from the first byte on (never world-readable in between)."""
    if overwrite:
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.unlink(missing_ok=True)
        _write_new(tmp, data, mode)
        os.replace(tmp, path)
    else:
        _write_new(path, data, mode)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits we want (0644 for .pub)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_key_file(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(_MAX_KEY_FILE + 1)
    except FileNotFoundError:
        raise SignatureError("key file not found", path=path) from None
    except IsADirectoryError:
        raise SignatureError("is a directory, expected a PEM key file", path=path) from None
    except OSError as exc:
        raise SignatureError(f"cannot read key file: {exc.strerror}", path=path) from exc
    if len(data) > _MAX_KEY_FILE or b"-----BEGIN " not in data:
        raise SignatureError("not a PEM key file (expected '-----BEGIN … KEY-----')", path=path)
    return data


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an unencrypted PKCS#8 PEM ed25519 private key; errors name the file and the problem."""
    path = Path(path)
    data = _read_key_file(path)
    if b"-----BEGIN PUBLIC KEY-----" in data:
        raise SignatureError("is a public key; signing needs the private key (the .key file)", path=path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:  # cryptography's signal for "this key is encrypted"
        raise SignatureError("is encrypted; edgefleet expects an unencrypted key (mode 0600)", path=path) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SignatureError(f"not a readable PEM private key: {exc}", path=path) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"is a {type(key).__name__}, not an ed25519 key; create one with keygen", path=path)
    try:
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            log.warning("%s: private key is readable by group/others; chmod 600 it", path)
    except OSError:
        pass  # it was readable a moment ago; permissions are advice, not a requirement
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load a PEM ed25519 public key; errors name the file and the problem."""
    path = Path(path)
    data = _read_key_file(path)
    if b"PRIVATE KEY-----" in data:
        raise SignatureError("is a private key; devices must only hold the public key (the .pub file)", path=path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SignatureError(f"not a readable PEM public key: {exc}", path=path) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"is a {type(key).__name__}, not an ed25519 key", path=path)
    return key


def sign_manifest(manifest_bytes: bytes, private_key: Ed25519PrivateKey) -> bytes:
    """The ``manifest.sig`` content for ``manifest_bytes`` (deterministic for a given key)."""
    signature = private_key.sign(manifest_bytes)
    doc = {
        "algorithm": ALGORITHM,
        "key_id": key_id(private_key),
        "signature": base64.b64encode(signature).decode("ascii"),
    }
    return (json.dumps(doc, sort_keys=True, indent=2) + "\n").encode("ascii")


def parse_signature(sig_bytes: bytes) -> tuple[str, bytes]:
    """(key id, raw 64-byte signature) from ``manifest.sig`` bytes, without verifying anything.

    A malformed file is a :class:`SignatureError`; so is any algorithm other than ed25519.
    """
    if len(sig_bytes) > _MAX_SIG_FILE:
        raise SignatureError(
            f"malformed: {len(sig_bytes)} bytes, a signature file is under 4 KiB",
            path="manifest.sig",
        )
    try:
        doc = json.loads(sig_bytes)
    except (
        ValueError,
        RecursionError,
    ) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SignatureError(f"malformed: not JSON ({exc})", path="manifest.sig") from exc
    if not isinstance(doc, dict) or set(doc) != _SIG_KEYS:
        raise SignatureError(
            "malformed: expected a JSON object with exactly algorithm, key_id and signature",
            path="manifest.sig",
        )
    if doc["algorithm"] != ALGORITHM:
        raise SignatureError(f"unsupported algorithm {doc['algorithm']!r}; expected 'ed25519'", path="manifest.sig")
    kid, sig_b64 = doc["key_id"], doc["signature"]
    if not isinstance(kid, str) or not _KEY_ID.match(kid):
        raise SignatureError("malformed: key_id must be 16 lower-case hex digits", path="manifest.sig")
    if not isinstance(sig_b64, str):
        raise SignatureError("malformed: signature must be a base64 string", path="manifest.sig")
    try:
        raw = base64.b64decode(sig_b64.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error) as exc:
        raise SignatureError(f"malformed: signature is not base64 ({exc})", path="manifest.sig") from exc
    if len(raw) != 64:
        raise SignatureError(f"malformed: an ed25519 signature is 64 bytes, got {len(raw)}", path="manifest.sig")
    return kid, raw


def verify_manifest(manifest_bytes: bytes, sig_bytes: bytes, trusted: Sequence[Ed25519PublicKey]) -> str:
    """Check ``sig_bytes`` over ``manifest_bytes`` against ``trusted``; return the key id used."""
    kid, raw = parse_signature(sig_bytes)
    by_id = {key_id(k): k for k in trusted}
    key = by_id.get(kid)
    if key is None:
        known = ", ".join(sorted(by_id)) or "none configured"
        raise SignatureError(
            f"signed by key {kid}, which is not among the trusted keys ({known}); "
            "add its .pub file to the trusted keys or re-sign the bundle with a trusted key",
            path="manifest.sig",
        )
    try:
        key.verify(raw, manifest_bytes)
    except InvalidSignature as exc:
        raise SignatureError(
            f"signature does not match manifest.json (tampered or wrong key {kid}); rebuild or re-sign the bundle",
            path="manifest.sig",
        ) from exc
    return kid
