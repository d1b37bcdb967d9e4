"""Host side of the bundle: hash files, pack a reproducible signed tar, re-sign, verify, inspect.

The tar is byte-for-byte reproducible: ``manifest.json`` first, then ``manifest.sig``, then the
listed files sorted by path; every header has mtime ``SOURCE_DATE_EPOCH`` (0 when unset),
uid/gid 0, empty owner names and mode 0644; no compression. Verification runs the device's
own reader (:func:`runtime.bundle.open_bundle`), so the host accepts exactly what a device would.
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from runtime import signing
from runtime.bundle import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    file_digest,
    open_bundle,
    peek_bundle,
)
from runtime.errors import IntegrityError, ManifestError, SignatureError
from runtime.manifest import FileEntry, Manifest, parse_manifest
from runtime.schema import to_dict
from runtime.signing import Ed25519PrivateKey, Ed25519PublicKey
from toolchain.errors import KeyFileError, ModelLoadError, UsageError

__all__ = [
    "VerifyResult",
    "file_entry",
    "generate_keypair",
    "inspect_bundle",
    "load_private_key",
    "load_public_keys",
    "pack",
    "render_inspect",
    "sign_bundle",
    "verify_bundle",
]

PrivateKeyLike = Ed25519PrivateKey | str | Path
PublicKeyLike = Ed25519PublicKey | str | Path
_Role = Literal["model", "model-data", "labels", "other"]


@dataclass(frozen=True)
class VerifyResult:
    """A bundle that passed the device's checks: who signed it and what was checked."""

    path: str
    name: str
    version: str
    key_id: str
    files: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """Plain form for ``--json``."""
        return {**to_dict(self), "files": list(self.files)}


def _key_file_error(exc: SignatureError, path: str | Path) -> KeyFileError:
    """The runtime's key-file error as the toolchain's (the user passed this path)."""
    message = str(exc)
    if exc.path and message.startswith(f"{exc.path}: "):
        message = message[len(exc.path) + 2 :]
    return KeyFileError(message, path=exc.path or path)


def generate_keypair(out_dir: Path, name: str = "fleet", *, overwrite: bool = False) -> tuple[Path, Path]:
    """:func:`runtime.signing.generate_keypair`, with key-file problems as :class:`KeyFileError`."""
    try:
        return signing.generate_keypair(Path(out_dir), name, overwrite=overwrite)
    except SignatureError as exc:
        raise _key_file_error(exc, out_dir) from exc


def load_private_key(key: PrivateKeyLike) -> Ed25519PrivateKey:
    """A private key object, loading it first when given a path (errors: :class:`KeyFileError`)."""
    if isinstance(key, Ed25519PrivateKey):
        return key
    try:
        return signing.load_private_key(Path(key))
    except SignatureError as exc:
        raise _key_file_error(exc, key) from exc


def load_public_keys(keys: Sequence[PublicKeyLike]) -> list[Ed25519PublicKey]:
    """Public key objects, loading paths (errors: :class:`KeyFileError`); at least one is needed."""
    if isinstance(keys, (str, Path, Ed25519PublicKey)):
        keys = [keys]
    if not keys:
        raise UsageError("verifying needs at least one trusted public key (the fleet's .pub file)")
    out: list[Ed25519PublicKey] = []
    for key in keys:
        if isinstance(key, Ed25519PublicKey):
            out.append(key)
            continue
        try:
            out.append(signing.load_public_key(Path(key)))
        except SignatureError as exc:
            raise _key_file_error(exc, key) from exc
    return out


def file_entry(path: Path, rel: str, role: _Role = "model") -> FileEntry:
    """The manifest entry (sha256 + size) for the file at ``path``, stored as ``rel``."""
    try:
        digest, size = file_digest(Path(path))
    except FileNotFoundError:
        raise ModelLoadError("file not found", path=path) from None
    except OSError as exc:
        raise ModelLoadError(f"cannot read: {exc.strerror}", path=path) from exc
    return FileEntry(path=rel, sha256=digest, size=size, role=role)


def _epoch() -> int:
    raw = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise UsageError(f"expected a non-negative integer, got {raw!r}", flag="SOURCE_DATE_EPOCH")
    return value


def _check_files(files: Mapping[str, Path], manifest: Manifest) -> None:
    """The files given are exactly the files listed, with the listed sizes and hashes."""
    listed = {f.path: f for f in manifest.files}
    extra, missing = sorted(set(files) - set(listed)), sorted(set(listed) - set(files))
    if extra:
        raise IntegrityError(f"{extra[0]} is not listed in the manifest; add its file_entry()")
    if missing:
        raise IntegrityError(f"{missing[0]} is listed in the manifest but no file was given for it")
    for rel, entry in sorted(listed.items()):
        actual = file_entry(files[rel], rel, entry.role)
        if (actual.sha256, actual.size) != (entry.sha256, entry.size):
            raise IntegrityError(
                f"{rel} ({files[rel]}) does not match its manifest entry "
                f"(sha256/size changed since file_entry); rebuild the manifest"
            )


@contextmanager
def _atomic(out: Path) -> Iterator[BinaryIO]:
    """A file that replaces ``out`` only once fully written and synced (mode 0644)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_tar(out: Path, manifest_bytes: bytes, sig_bytes: bytes, files: Mapping[str, Path]) -> Path:
    """Write the reproducible tar: fixed headers, fixed order, no compression."""
    mtime = _epoch()

    def header(name: str, size: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, mtime, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.type = tarfile.REGTYPE
        return info

    with _atomic(out) as fh, tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in ((MANIFEST_NAME, manifest_bytes), (SIGNATURE_NAME, sig_bytes)):
            tar.addfile(header(name, len(data)), io.BytesIO(data))
        for rel in sorted(files):
            with open(files[rel], "rb") as src:
                tar.addfile(header(rel, os.fstat(src.fileno()).st_size), src)
    return out


def pack(files: Mapping[str, Path], manifest: Manifest, private_key: PrivateKeyLike, out: Path) -> Path:
    """Sign ``manifest`` and write it with ``files`` (bundle path -> local file) as the tar ``out``.

    The manifest is validated as a device would parse it, and every file must match its entry.
    """
    key = load_private_key(private_key)
    manifest_bytes = manifest.to_json()
    parse_manifest(manifest_bytes)  # a manifest built in code skipped from_dict's validation
    _check_files(files, manifest)
    sig_bytes = signing.sign_manifest(manifest_bytes, key)
    return _write_tar(Path(out), manifest_bytes, sig_bytes, {k: Path(v) for k, v in files.items()})


def sign_bundle(bundle_path: Path, private_key: PrivateKeyLike) -> Path:
    """Re-sign an existing bundle (tar or directory) in place; its files must match its manifest.

    The manifest bytes are kept exactly as they are; only ``manifest.sig`` changes, and a tar is
    rewritten with the same reproducible layout as :func:`pack`.
    """
    key = load_private_key(private_key)
    bundle_path = Path(bundle_path)
    if bundle_path.is_dir():
        bundle = open_bundle(bundle_path, trusted_keys=None, verify_signature=False)
        with _atomic(bundle_path / SIGNATURE_NAME) as fh:
            fh.write(signing.sign_manifest(bundle.manifest_bytes, key))
        return bundle_path
    with open_bundle(bundle_path, trusted_keys=None, verify_signature=False) as bundle:
        sig_bytes = signing.sign_manifest(bundle.manifest_bytes, key)
        files = {f.path: bundle.path(f.path) for f in bundle.manifest.files}
        return _write_tar(bundle_path, bundle.manifest_bytes, sig_bytes, files)


def verify_bundle(bundle_path: Path, public_keys: Sequence[PublicKeyLike]) -> VerifyResult:
    """Run the device's full check (signature, manifest, every file) on ``bundle_path``."""
    keys = load_public_keys(public_keys)
    with open_bundle(Path(bundle_path), trusted_keys=keys) as bundle:
        assert bundle.key_id is not None  # verify_signature=True always sets it
        return VerifyResult(
            path=str(bundle_path),
            name=bundle.manifest.name,
            version=bundle.manifest.version,
            key_id=bundle.key_id,
            files=tuple(f.path for f in bundle.manifest.files),
        )


def _signature_info(sig_bytes: bytes | None) -> dict[str, Any]:
    if sig_bytes is None:
        return {"present": False, "key_id": None, "error": None}
    try:
        kid, _ = signing.parse_signature(sig_bytes)
    except SignatureError as exc:
        return {"present": True, "key_id": None, "error": str(exc)}
    return {"present": True, "key_id": kid, "error": None}


def inspect_bundle(bundle_path: Path) -> dict[str, Any]:
    """What a bundle claims (manifest, file sizes, signer key id), without trusting or extracting.

    Nothing is verified here (use :func:`verify_bundle`); ``files[].size_ok`` only compares the
    stored size with the manifest's. The plain dict is what ``--json`` prints.
    """
    bundle_path = Path(bundle_path)
    listing = peek_bundle(bundle_path)
    if listing.manifest_bytes is None:
        raise ManifestError("manifest.json is missing; this is not a bundle", path=bundle_path)
    manifest = parse_manifest(listing.manifest_bytes, path=f"{bundle_path}: {MANIFEST_NAME}")
    files = [
        {
            "path": f.path,
            "role": f.role,
            "sha256": f.sha256,
            "size": f.size,
            "stored_size": listing.sizes.get(f.path),
            "size_ok": listing.sizes.get(f.path) == f.size,
        }
        for f in manifest.files
    ]
    listed = {f.path for f in manifest.files}
    info: dict[str, Any] = {
        "path": str(bundle_path),
        "kind": listing.kind,
        "sha256": None,
        "size": None,
        "manifest": to_dict(manifest),
        "files": files,
        "unlisted": [name for name in listing.sizes if name not in listed],
        "signature": _signature_info(listing.sig_bytes),
    }
    if listing.kind == "tar":
        info["sha256"], info["size"] = file_digest(bundle_path)
    return info


def render_inspect(info: Mapping[str, Any]) -> str:
    """A short human-readable summary of :func:`inspect_bundle`'s result."""
    m, sig = info["manifest"], info["signature"]
    signer = f"key {sig['key_id']}" if sig["key_id"] else ("malformed" if sig["present"] else "unsigned")
    lines = [
        f"{m['name']} {m['version']}  ({m['backend']}, {m['precision']}, profile {m['profile']['name']})",
        f"bundle:    {info['path']} ({info['kind']})",
        f"sha256:    {info['sha256'] or '-'}",
        f"signature: {signer}",
        "files:",
    ]
    for f in info["files"]:
        stored = f["stored_size"]
        state = "ok" if f["size_ok"] else ("MISSING" if stored is None else f"STORED {stored:,} B")
        lines.append(f"  {f['path']:<32} {f['role']:<10} {f['size']:>12,} B  {state}")
    lines += [f"  {name:<32} UNLISTED" for name in info["unlisted"]]
    return "\n".join(lines)
