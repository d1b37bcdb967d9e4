"""Reading a bundle on the device: safe extraction, signature check, and per-file integrity.

A bundle is a plain ``.tar`` (or a directory) with ``manifest.json``, ``manifest.sig`` and the
files the manifest lists. :func:`open_bundle` trusts nothing it has not checked, in this order:

1. tar members are vetted *before* anything is written: only regular files and directories,
   no absolute paths, no ``..``, no links, devices or fifos, no duplicate names, and at most
   ``max_bytes`` in total (tar bombs);
2. the ed25519 signature over the exact ``manifest.json`` bytes, against the trusted keys —
   before the manifest is even parsed;
3. the manifest itself (:func:`~runtime.manifest.parse_manifest`);
4. every listed file's size and sha256, and that no unlisted file is present.

A tar extracted to a temporary directory belongs to the returned :class:`Bundle`: use it as a
context manager (``with open_bundle(...) as b:``) or call :meth:`Bundle.cleanup`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import TracebackType

from runtime.errors import (
    BundleError,
    IntegrityError,
    ManifestError,
    SignatureError,
    UnsafeArchiveError,
)
from runtime.manifest import Manifest, parse_manifest
from runtime.signing import Ed25519PublicKey, verify_manifest

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MANIFEST_NAME",
    "SIGNATURE_NAME",
    "Bundle",
    "BundleListing",
    "file_digest",
    "open_bundle",
    "peek_bundle",
]

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
DEFAULT_MAX_BYTES = 2 * 1024**3
_MAX_MEMBERS = 10_000
_MAX_MANIFEST_BYTES = 16 * 1024**2
_MAX_SIG_BYTES = 64 * 1024
_CHUNK = 1024 * 1024
_PLAIN_FILE = (tarfile.REGTYPE, tarfile.AREGTYPE)


@dataclass(frozen=True)
class Bundle:
    """A bundle whose signature and files have been checked; ``root`` holds its files."""

    root: Path
    manifest: Manifest
    manifest_bytes: bytes
    key_id: str | None  # the trusted key that verified manifest.sig; None when not verified
    temporary: bool = field(default=False, compare=False)  # root is a temp dir this object owns

    def path(self, rel: str) -> Path:
        """The on-disk path of the listed file ``rel`` (KeyError if it is not listed)."""
        return self.root / self.manifest.entry(rel).path

    @property
    def model_path(self) -> Path:
        """The on-disk path of the main model file."""
        return self.path(self.manifest.model)

    def cleanup(self) -> None:
        """Remove ``root`` if it is a temporary extraction directory; a no-op otherwise."""
        if self.temporary:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Bundle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


@dataclass(frozen=True)
class BundleListing:
    """What a bundle claims, read without extracting or trusting it (for ``inspect``)."""

    kind: str  # "tar" or "directory"
    manifest_bytes: bytes | None
    sig_bytes: bytes | None
    sizes: dict[str, int]  # every other regular file -> its size in bytes


def file_digest(path: Path, *, follow_symlinks: bool = True) -> tuple[str, int]:
    """(sha256 hex, size) of a regular file, read in 1 MiB chunks.

    With ``follow_symlinks=False`` a symlink (or a fifo or device) is refused instead of read.
    Raises :class:`OSError` for an unreadable file; callers name it in their own error.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW)
    fd = os.open(path, flags)  # O_NONBLOCK: opening a fifo must not hang; regular files ignore it
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        h, size = hashlib.sha256(), 0
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def open_bundle(
    source: Path,
    *,
    trusted_keys: Sequence[Ed25519PublicKey] | None,
    dest: Path | None = None,
    verify_signature: bool = True,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Bundle:
    """Open, verify and (for a tar) extract the bundle at ``source``.

    A tar is extracted into ``dest`` (created if missing; must be empty) or, without ``dest``,
    into a new temporary directory that the returned :class:`Bundle` owns and removes on
    :meth:`Bundle.cleanup`. A directory is verified in place, or copied into ``dest`` first
    when one is given. On any error nothing extracted is left behind.
    """
    source = Path(source)
    if verify_signature and not trusted_keys:
        raise SignatureError(
            "no trusted keys configured; add the fleet's .pub file to the runtime's trusted keys "
            "before opening signed bundles",
            path=source,
        )
    if source.is_dir() and dest is None:
        return _verify(source, source, trusted_keys or (), verify_signature, temporary=False)
    if not source.is_dir() and not source.is_file():
        raise BundleError("not found (expected a .tar file or a bundle directory)", path=source)
    root, owned = _prepare_dest(source, dest)
    try:
        if source.is_dir():
            _copy_tree(source, root, max_bytes)
        else:
            _extract_tar(source, root, max_bytes)
        return _verify(source, root, trusted_keys or (), verify_signature, temporary=dest is None)
    except BaseException:
        _discard(root, owned)
        raise


def _prepare_dest(source: Path, dest: Path | None) -> tuple[Path, bool]:
    """The extraction root and whether this call created it."""
    if dest is None:
        return Path(tempfile.mkdtemp(prefix="edgefleet-bundle-")), True
    dest = Path(dest)
    try:
        dest.mkdir(parents=True)
        return dest, True
    except FileExistsError:
        if dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir()):
            return dest, False
        raise BundleError(f"extraction directory {dest} must be a new or empty directory", path=source) from None
    except OSError as exc:
        raise BundleError(f"cannot create extraction directory {dest}: {exc.strerror}", path=source) from exc


def _discard(root: Path, owned: bool) -> None:
    if owned:
        shutil.rmtree(root, ignore_errors=True)
        return
    for child in root.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _safe_name(source: Path, raw: str) -> str:
    """The normalised relative name of a tar member, or :class:`UnsafeArchiveError`."""
    if raw.startswith("/"):
        raise UnsafeArchiveError(f"member {raw!r} has an absolute path; refusing to extract", path=source)
    parts = [p for p in PurePosixPath(raw).parts if p != "."]
    if ".." in raw.split("/"):
        raise UnsafeArchiveError(f"member {raw!r} contains '..'; refusing to extract", path=source)
    if "\x00" in raw:
        raise UnsafeArchiveError(f"member {raw!r} contains a NUL byte; refusing to extract", path=source)
    return "/".join(parts)


def _member_kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return "a symlink"
    if info.islnk():
        return "a hard link"
    if info.ischr() or info.isblk():
        return "a device file"
    if info.isfifo():
        return "a fifo"
    return f"of tar type {info.type!r}"


def _vet_members(source: Path, tar: tarfile.TarFile, max_bytes: int | None) -> list[tuple[str, tarfile.TarInfo]]:
    """Every member checked for safety before a single byte is written (no size cap when None)."""
    members: list[tuple[str, tarfile.TarInfo]] = []
    seen: dict[str, bool] = {}  # name -> is a regular file
    implied_dirs: set[str] = set()
    total = 0
    for info in tar:
        if len(members) >= _MAX_MEMBERS:
            raise UnsafeArchiveError(f"more than {_MAX_MEMBERS} members; refusing to extract", path=source)
        if info.size < 0:  # tarfile accepts a negative size and then fails to seek past it
            raise BundleError(f"damaged tar: member {info.name!r} has a negative size", path=source)
        name = _safe_name(source, info.name)
        if info.type not in _PLAIN_FILE and not info.isdir():
            raise UnsafeArchiveError(
                f"member {info.name!r} is {_member_kind(info)}; bundles hold only regular files",
                path=source,
            )
        if name in seen or (name == "" and info.isfile()):
            raise UnsafeArchiveError(f"member {info.name!r} appears twice; refusing to extract", path=source)
        parents = [str(p) for p in PurePosixPath(name).parents if str(p) != "."]
        if any(seen.get(p) for p in parents) or (info.isfile() and name in implied_dirs):
            raise UnsafeArchiveError(
                f"member {info.name!r} is both a file and a directory; refusing to extract",
                path=source,
            )
        implied_dirs.update(parents)
        if info.isfile():
            total += info.size
            if max_bytes is not None and total > max_bytes:
                raise UnsafeArchiveError(
                    f"members add up to more than {max_bytes} bytes (max_bytes); not extracting",
                    path=source,
                )
        seen[name] = info.isfile()
        members.append((name, info))
    return members


def _extract_tar(source: Path, root: Path, max_bytes: int) -> None:
    """Vet every member, then write regular files and directories under ``root`` only."""
    try:
        with tarfile.open(source, "r:") as tar:
            members = _vet_members(source, tar, max_bytes)
            for name, info in members:
                if not name:
                    continue  # the archive's own "./" entry
                target = root / name
                if info.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                _write_member(tar, info, target)
    except tarfile.TarError as exc:
        raise BundleError(
            f"not a readable plain tar ({exc}); bundles are uncompressed .tar files", path=source
        ) from exc
    except (EOFError, ValueError) as exc:  # a damaged header tarfile does not wrap itself
        raise BundleError(f"damaged tar archive ({exc}); re-download the bundle", path=source) from exc
    except OSError as exc:
        raise BundleError(f"cannot extract: {exc.strerror or exc}", path=source) from exc


def _write_member(tar: tarfile.TarFile, info: tarfile.TarInfo, target: Path) -> None:
    src = tar.extractfile(info)
    if src is None:  # pragma: no cover - vetting admits only regular files here
        raise UnsafeArchiveError(f"member {info.name!r} has no data")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with src, os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(src, out, _CHUNK)


def _walk(root: Path, source: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(posix name, lstat) of every file under ``root``; links and special files are refused."""
    for dirpath, dirnames, filenames in os.walk(root):
        for entry in [*dirnames, *filenames]:
            full = Path(dirpath, entry)
            st = full.lstat()
            rel = full.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeArchiveError(f"{rel!r} is a symlink; bundles hold only regular files", path=source)
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeArchiveError(f"{rel!r} is not a regular file (device, fifo or socket)", path=source)
            yield rel, st


def _copy_tree(source: Path, root: Path, max_bytes: int) -> None:
    total = 0
    for rel, st in _walk(source, source):
        total += st.st_size
        if total > max_bytes:
            raise UnsafeArchiveError(f"files add up to more than {max_bytes} bytes (max_bytes)", path=source)
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / rel, target, follow_symlinks=False)


def _read_small(path: Path, limit: int, error: type[BundleError], source: Path) -> bytes | None:
    """The bytes of a regular file no larger than ``limit``, None if it does not exist."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path.name} is not a regular file", path=source)
    if st.st_size > limit:
        raise error(f"{path.name} is {st.st_size} bytes, more than the {limit}-byte limit", path=source)
    return path.read_bytes()


def _verify(
    source: Path,
    root: Path,
    trusted: Sequence[Ed25519PublicKey],
    verify_signature: bool,
    *,
    temporary: bool,
) -> Bundle:
    """Signature, manifest, then every file: the checks shared by tar and directory bundles."""
    manifest_bytes = _read_small(root / MANIFEST_NAME, _MAX_MANIFEST_BYTES, ManifestError, source)
    if manifest_bytes is None:
        raise ManifestError("manifest.json is missing; this is not a bundle", path=source)
    kid: str | None = None
    if verify_signature:
        sig_bytes = _read_small(root / SIGNATURE_NAME, _MAX_SIG_BYTES, SignatureError, source)
        if sig_bytes is None:
            raise SignatureError(
                "manifest.sig is missing; the bundle is unsigned — sign it with the toolchain",
                path=source,
            )
        try:
            kid = verify_manifest(manifest_bytes, sig_bytes, trusted)
        except SignatureError as exc:
            raise SignatureError(str(exc), path=source) from exc
    manifest = parse_manifest(manifest_bytes, path=f"{source}: {MANIFEST_NAME}")
    _check_files(source, root, manifest)
    return Bundle(root=root, manifest=manifest, manifest_bytes=manifest_bytes, key_id=kid, temporary=temporary)


def _check_files(source: Path, root: Path, manifest: Manifest) -> None:
    listed = {f.path for f in manifest.files}
    for rel, _ in _walk(root, source):
        if rel not in listed and rel not in (MANIFEST_NAME, SIGNATURE_NAME):
            raise IntegrityError(f"{rel} is not listed in manifest.json; refusing an unlisted file", path=source)
    for entry in manifest.files:
        try:
            digest, size = file_digest(root / entry.path, follow_symlinks=False)
        except FileNotFoundError:
            raise IntegrityError(f"{entry.path} is listed in manifest.json but missing", path=source) from None
        except OSError as exc:
            raise IntegrityError(f"{entry.path} cannot be read: {exc.strerror}", path=source) from exc
        if size != entry.size:
            raise IntegrityError(
                f"{entry.path} is {size} bytes, manifest.json says {entry.size}; rebuild or re-download the bundle",
                path=source,
            )
        if digest != entry.sha256:
            raise IntegrityError(
                f"{entry.path} sha256 {digest[:16]}… differs from manifest.json "
                f"{entry.sha256[:16]}…; "
                "the file is corrupt or was tampered with — rebuild or re-download",
                path=source,
            )


def peek_bundle(source: Path) -> BundleListing:
    """Read manifest.json, manifest.sig and file sizes without extracting, parsing or trusting.

    Tar members are vetted as in :func:`open_bundle` (an unsafe member is an error even here).
    """
    source = Path(source)
    if source.is_dir():
        sizes = {rel: st.st_size for rel, st in _walk(source, source)}
        manifest = _read_small(source / MANIFEST_NAME, _MAX_MANIFEST_BYTES, ManifestError, source)
        sig = _read_small(source / SIGNATURE_NAME, _MAX_SIG_BYTES, SignatureError, source)
        sizes.pop(MANIFEST_NAME, None)
        sizes.pop(SIGNATURE_NAME, None)
        return BundleListing("directory", manifest, sig, dict(sorted(sizes.items())))
    if not source.is_file():
        raise BundleError("not found (expected a .tar file or a bundle directory)", path=source)
    return _peek_tar(source)


def _peek_tar(source: Path) -> BundleListing:
    limits = {MANIFEST_NAME: _MAX_MANIFEST_BYTES, SIGNATURE_NAME: _MAX_SIG_BYTES}
    small: dict[str, bytes] = {}
    sizes: dict[str, int] = {}
    try:
        with tarfile.open(source, "r:") as tar:
            for name, info in _vet_members(source, tar, None):  # nothing is written: no size cap
                if not info.isfile():
                    continue
                limit = limits.get(name)
                if limit is None:
                    sizes[name] = info.size
                elif info.size > limit:
                    raise BundleError(
                        f"{name} is {info.size} bytes, more than the {limit}-byte limit",
                        path=source,
                    )
                else:
                    fh = tar.extractfile(info)
                    small[name] = fh.read() if fh is not None else b""
    except tarfile.TarError as exc:
        raise BundleError(f"not a readable plain tar ({exc})", path=source) from exc
    except (EOFError, ValueError, OSError) as exc:
        raise BundleError(f"damaged tar archive ({exc})", path=source) from exc
    sizes = dict(sorted(sizes.items()))
    return BundleListing("tar", small.get(MANIFEST_NAME), small.get(SIGNATURE_NAME), sizes)
