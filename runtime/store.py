"""The on-device model store: verified bundle versions, the atomic active pointer, crash-loop rollback.

Layout under ``root`` (``<state_dir>/models``)::

    <name>/<version>/bundle.tar   the signed bundle as received, verified before it lands (files 0444)
    <name>/<version>/meta.json    {"name", "version", "profile", "sha256", "size", "added_at", "source"}
    ACTIVE                        {"name", "version", "previous": {"name", "version"} | null,
                                   "activated_at", "good", "rolled_back_from": {...} | null}
    boot.json                     starts of the not-yet-good active version (crash-loop bookkeeping)

A version is staged in a hidden ``.staging-<pid>-…`` directory, verified there, and renamed into
place, so a kill -9 at any point leaves either no version or a whole one; leftovers are removed when
a store is opened. ``ACTIVE`` and ``boot.json`` are replaced atomically (temp file in the same
directory, fsync, rename, fsync of the directory). Changes hold a thread lock and an ``flock`` on
``.lock``, so the service and ``edge-runtime models`` can work on one store at the same time.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import tarfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.bundle import MANIFEST_NAME, SIGNATURE_NAME, file_digest, open_bundle, peek_bundle
from runtime.durable import fsync_dir, write_atomic
from runtime.errors import BundleError, StoreError
from runtime.manifest import Manifest

__all__ = [
    "ACTIVE_FILE",
    "BOOT_FILE",
    "BUNDLE_FILE",
    "CRASH_ENV",
    "META_FILE",
    "BootDecision",
    "ModelStore",
    "StoredModel",
    "crash_injection",
    "inject_crash",
]

log = logging.getLogger(__name__)

ACTIVE_FILE = "ACTIVE"
BOOT_FILE = "boot.json"
BUNDLE_FILE = "bundle.tar"
META_FILE = "meta.json"
CRASH_ENV = "EDGE_TEST_CRASH_VERSION"
_LOCK_FILE = ".lock"
_STAGING = ".staging-"
_TRASH = ".trash-"
_STALE_STAGING_S = 6 * 3600.0  # a staging dir this old is a leftover even if its pid is alive again
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class StoredModel:
    """One version held by the store; ``path`` is its verified ``bundle.tar``."""

    name: str
    version: str
    profile: str
    sha256: str
    size: int
    added_at: float
    path: Path
    source: str = ""

    @property
    def key(self) -> tuple[str, str]:
        """(name, version)."""
        return (self.name, self.version)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (``path`` as a string)."""
        return {
            "name": self.name,
            "version": self.version,
            "profile": self.profile,
            "sha256": self.sha256,
            "size": self.size,
            "added_at": self.added_at,
            "source": self.source,
            "path": str(self.path),
        }


@dataclass(frozen=True)
class BootDecision:
    """What :meth:`ModelStore.boot` decided: the model to serve, what it reverted from, and why."""

    model: StoredModel | None
    reverted_from: StoredModel | None
    reason: str
    starts: int = 0  # starts counted for the not-yet-good version (0 when it is good)

    @property
    def reverted(self) -> bool:
        """True when this start rolled back a crash-looping version."""
        return self.reverted_from is not None


def crash_injection(env: Mapping[str, str] | None = None) -> str | None:
    """Fault injection for tests only: the version named by ``EDGE_TEST_CRASH_VERSION``, else None.

    Read it once at start; pass the result to :func:`inject_crash` after each load.
    """
    value = (os.environ if env is None else env).get(CRASH_ENV, "").strip()
    return value or None


def inject_crash(injected: str | None, version: str) -> None:
    """SIGKILL this process if ``version`` is the one :func:`crash_injection` named (tests only)."""
    if injected is not None and injected == version:
        log.error("%s=%s: killing this process after loading version %s", CRASH_ENV, injected, version)
        os.kill(os.getpid(), signal.SIGKILL)


def _ref(model: StoredModel | None) -> dict[str, str] | None:
    return {"name": model.name, "version": model.version} if model is not None else None


def _label(key: tuple[str, str] | StoredModel) -> str:
    name, version = key.key if isinstance(key, StoredModel) else key
    return f"{name} {version}"


class ModelStore:
    """Versions of signed bundles under ``root`` with an atomically swapped active pointer."""

    def __init__(self, root: Path, *, keep: int = 3) -> None:
        if keep < 1:
            raise StoreError(f"keep must be >= 1, got {keep}", path=root)
        self.root = Path(root)
        self.keep = keep
        self._lock = threading.RLock()
        self._depth = 0
        self._lock_fd: int | None = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the model store: {exc.strerror}", path=self.root) from exc
        try:
            with self._locked():
                self._clean_leftovers()
        except StoreError as exc:  # a read-only view (`models list` as another user) still works
            log.debug("not cleaning %s: %s", self.root, exc)

    @classmethod
    def from_config(cls, cfg: Any) -> ModelStore:
        """The store of a :class:`~runtime.config.ServiceConfig` (``<state_dir>/models``, ``[models] keep``)."""
        return cls(Path(cfg.state_dir) / "models", keep=cfg.models.keep)

    # --- locking, files ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """This thread and no other process changes the store inside the block (re-entrant)."""
        with self._lock:
            if self._depth == 0:
                try:
                    fd = os.open(self.root / _LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                except OSError as exc:
                    raise StoreError(f"cannot lock the model store: {exc.strerror}", path=self.root) from exc
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._lock_fd = fd
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._lock_fd is not None:
                    os.close(self._lock_fd)  # closing releases the flock
                    self._lock_fd = None

    def _write_json(self, path: Path, obj: Mapping[str, Any]) -> None:
        """Replace ``path`` atomically: temp file beside it, fsync, rename, fsync the directory."""
        try:
            write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
        except OSError as exc:
            raise StoreError(f"cannot write {path.name}: {exc.strerror}", path=path.parent) from exc

    def _remove(self, path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StoreError(f"cannot remove {path.name}: {exc.strerror}", path=path.parent) from exc
        fsync_dir(path.parent)

    def _clean_leftovers(self) -> None:
        """Remove what a killed process left: staging dirs, half-deleted versions, temp files."""
        import psutil  # only here: a staging dir's owner may still be alive

        now = time.time()
        for entry in self.root.iterdir():
            name = entry.name
            if name.startswith(_STAGING):  # another process's add works outside the lock: judge by its pid
                pid = name[len(_STAGING) :].split("-", 1)[0]
                if not pid.isdigit() or int(pid) == os.getpid():
                    continue
                try:
                    old = now - entry.lstat().st_mtime > _STALE_STAGING_S
                except FileNotFoundError:
                    continue  # its add just finished
                if old or not psutil.pid_exists(int(pid)):
                    log.info("removing %s, left by an interrupted add", entry)
                    shutil.rmtree(entry, ignore_errors=True)
            elif name.startswith(_TRASH):
                shutil.rmtree(entry, ignore_errors=True)
            elif name.startswith(".") and name.endswith(".tmp"):
                entry.unlink(missing_ok=True)

    def _dir(self, name: str, version: str) -> Path:
        if not _SAFE.fullmatch(name) or not _SAFE.fullmatch(version):
            raise StoreError(f"not a model name and version: {name!r} {version!r}", path=self.root)
        return self.root / name / version

    # --- reading -----------------------------------------------------------------------------------

    def _read_meta(self, vdir: Path) -> StoredModel | None:
        """The version in ``vdir``, or None when it is not a whole version (logged)."""
        try:
            meta = json.loads((vdir / META_FILE).read_bytes())
            model = StoredModel(
                name=str(meta["name"]),
                version=str(meta["version"]),
                profile=str(meta["profile"]),
                sha256=str(meta["sha256"]),
                size=int(meta["size"]),
                added_at=float(meta["added_at"]),
                path=vdir / BUNDLE_FILE,
                source=str(meta.get("source", "")),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("%s: damaged %s (%s); ignoring this version", vdir, META_FILE, exc)
            return None
        if model.key != (vdir.parent.name, vdir.name) or not model.path.is_file():
            log.error("%s: %s does not match its directory or %s is missing; ignoring it", vdir, META_FILE, BUNDLE_FILE)
            return None
        return model

    def _held(self, name: str, version: str) -> StoredModel | None:
        try:
            return self._read_meta(self._dir(name, version))
        except StoreError:
            return None

    def get(self, name: str, version: str) -> StoredModel:
        """The held version ``name`` ``version``; a :class:`StoreError` names what is held otherwise."""
        model = self._read_meta(self._dir(name, version))
        if model is None:
            held = ", ".join(_label(m) for m in self.list()) or "nothing"
            raise StoreError(f"{name} {version} is not in the store (held: {held})", path=self.root)
        return model

    def list(self) -> builtins.list[StoredModel]:
        """Every whole version held, newest first."""
        out: builtins.list[StoredModel] = []
        for ndir in self.root.iterdir() if self.root.is_dir() else ():
            if ndir.name.startswith(".") or not ndir.is_dir() or ndir.is_symlink():
                continue
            for vdir in ndir.iterdir():
                if not vdir.name.startswith(".") and vdir.is_dir() and not vdir.is_symlink():
                    model = self._read_meta(vdir)
                    if model is not None:
                        out.append(model)
        return sorted(out, key=lambda m: (m.added_at, m.name, m.version), reverse=True)

    def pointer(self) -> dict[str, Any] | None:
        """The parsed ``ACTIVE`` file, or None when there is none (a damaged one is logged and ignored)."""
        try:
            ptr = json.loads((self.root / ACTIVE_FILE).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("%s: damaged %s (%s); treating the store as having no active model", self.root, ACTIVE_FILE, exc)
            return None
        if not isinstance(ptr, dict) or not isinstance(ptr.get("name"), str) or not isinstance(ptr.get("version"), str):
            log.error("%s: %s lacks name/version; treating the store as having no active model", self.root, ACTIVE_FILE)
            return None
        return ptr

    def _pointed(self, ptr: Mapping[str, Any] | None, key: str) -> StoredModel | None:
        ref = ptr.get(key) if ptr is not None else None
        if not isinstance(ref, dict) or not isinstance(ref.get("name"), str) or not isinstance(ref.get("version"), str):
            return None
        return self._held(ref["name"], ref["version"])

    def active(self) -> StoredModel | None:
        """The active version, or None (no pointer yet, or it names a version no longer held)."""
        ptr = self.pointer()
        return self._held(ptr["name"], ptr["version"]) if ptr is not None else None

    def previous(self) -> StoredModel | None:
        """The version a rollback returns to, or None."""
        return self._pointed(self.pointer(), "previous")

    def is_good(self) -> bool:
        """True when the active version has been marked good (survived ``good_after_s``, or was rolled back to)."""
        ptr = self.pointer()
        return bool(ptr is not None and ptr.get("good") is True)

    # --- adding ------------------------------------------------------------------------------------

    def add(self, bundle: Path, *, trusted_keys: Sequence[Any], source: str = "") -> StoredModel:
        """Copy ``bundle`` (tar or directory) in, verified (signature + every file) before it lands.

        The same name, version and sha256 again is a no-op; the same name and version with other
        bytes is a :class:`StoreError` (versions are immutable). A refused bundle raises
        :class:`StoreError` whose ``__cause__`` is the :class:`~runtime.errors.BundleError`.
        """
        src = Path(bundle)
        staging = self.root / f"{_STAGING}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            staging.mkdir()
            sha, size = self._stage(src, staging / BUNDLE_FILE)
            manifest = self._verify(src, staging, trusted_keys)
            return self._commit(staging, manifest, sha, size, source or str(src))
        except BundleError as exc:
            raise StoreError(f"refused: {exc}", path=self.root) from exc
        except OSError as exc:
            raise StoreError(f"cannot add {src}: {exc.strerror or exc}", path=self.root) from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _stage(self, src: Path, out: Path) -> tuple[str, int]:
        """Write ``src`` as a tar at ``out`` (fsynced); its (sha256, size)."""
        if src.is_dir():
            _pack_dir(src, out)
            return file_digest(out)
        if not src.is_file():
            raise BundleError("not found (expected a .tar file or a bundle directory)", path=src)
        h, size = hashlib.sha256(), 0
        with open(src, "rb") as fin, open(out, "xb") as fout:
            while chunk := fin.read(_CHUNK):
                h.update(chunk)
                size += len(chunk)
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        return h.hexdigest(), size

    def _verify(self, src: Path, staging: Path, trusted_keys: Sequence[Any]) -> Manifest:
        """Full check of the staged copy (what lands is what was checked); the extraction is dropped."""
        extract = staging / "extract"
        try:
            with open_bundle(staging / BUNDLE_FILE, trusted_keys=list(trusted_keys), dest=extract) as b:
                return b.manifest
        except BundleError as exc:  # name the bundle given, not the staged copy; keep the subclass
            raise type(exc)(str(exc).replace(str(staging / BUNDLE_FILE), str(src))) from exc
        finally:
            shutil.rmtree(extract, ignore_errors=True)

    def _commit(self, staging: Path, manifest: Manifest, sha: str, size: int, source: str) -> StoredModel:
        target = self._dir(manifest.name, manifest.version)
        meta = {
            "name": manifest.name,
            "version": manifest.version,
            "profile": manifest.profile.name,
            "sha256": sha,
            "size": size,
            "added_at": time.time(),
            "source": source,
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for f in (staging / META_FILE, staging / BUNDLE_FILE):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            f.chmod(0o444)
        fsync_dir(staging)
        with self._locked():
            held = self._read_meta(target)
            if held is not None:
                if held.sha256 == sha:
                    return held
                raise StoreError(
                    f"{_label(held)} is already held with sha256 {held.sha256[:16]}…, this bundle is "
                    f"{sha[:16]}…; versions are immutable — build it with a new version",
                    path=self.root,
                )
            if target.exists():  # not a whole version (should not happen): move it out of the way
                self._trash(target)
            created = not target.parent.exists()
            target.parent.mkdir(exist_ok=True)
            if created:
                fsync_dir(self.root)
            os.rename(staging, target)
            fsync_dir(target.parent)
            fsync_dir(self.root)
        log.info("stored %s %s (%s, %d bytes)", manifest.name, manifest.version, sha[:12], size)
        model = self._read_meta(target)
        assert model is not None  # just written
        return model

    # --- the pointer -------------------------------------------------------------------------------

    def _set_pointer(self, model: StoredModel, previous: StoredModel | None, *, good: bool, **extra: Any) -> None:
        ptr = {
            "name": model.name,
            "version": model.version,
            "previous": _ref(previous),
            "activated_at": time.time(),
            "good": good,
            **extra,
        }
        self._write_json(self.root / ACTIVE_FILE, ptr)
        self._remove(self.root / BOOT_FILE)

    def activate(self, name: str, version: str) -> StoredModel:
        """Make ``name`` ``version`` active (not yet good); the old active one becomes previous.

        When the old active version was itself not yet marked good, the previous one stays
        previous, so a crash loop always reverts to a version that served well. Activating the
        active version is a no-op. Versions beyond ``keep`` are collected afterwards.
        """
        with self._locked():
            model = self.get(name, version)
            ptr = self.pointer()
            current = self._held(ptr["name"], ptr["version"]) if ptr is not None else None
            if current is not None and current.key == model.key:
                return model
            # prefer a version that served well: the old active one if good, else its previous
            unproven = ptr is not None and ptr.get("good") is not True
            choices = [self._pointed(ptr, "previous"), current] if unproven else [current]
            previous = next((m for m in choices if m is not None and m.key != model.key), None)
            self._set_pointer(model, previous, good=False, rolled_back_from=None)
            log.info("activated %s (previous: %s)", _label(model), _label(previous) if previous else "none")
            self.collect()
            return model

    def rollback(self, to: tuple[str, str] | None = None, *, reason: str = "") -> StoredModel:
        """Make the previous version (or ``to`` = (name, version)) active and good.

        The version rolled back from is recorded in ``ACTIVE`` as ``rolled_back_from`` and is not
        kept as previous (it is the one that failed); the old previous stays previous when
        rolling back to another named version.
        """
        with self._locked():
            ptr = self.pointer()
            current = self._held(ptr["name"], ptr["version"]) if ptr is not None else None
            old_previous = self._pointed(ptr, "previous")
            if to is not None:
                target = self.get(*to)
            elif old_previous is not None:
                target = old_previous
            else:
                held = ", ".join(_label(m) for m in self.list()) or "nothing"
                raise StoreError(
                    f"no previous version to roll back to; name one (edge-runtime models rollback --to VERSION); "
                    f"held: {held}",
                    path=self.root,
                )
            if current is not None and current.key == target.key:
                raise StoreError(f"{_label(target)} is already the active version", path=self.root)
            keep_prev = old_previous if old_previous is not None and old_previous.key != target.key else None
            self._set_pointer(target, keep_prev, good=True, rolled_back_from=_ref(current), reason=reason)
            log.warning(
                "rolled back to %s from %s%s",
                _label(target),
                _label(current) if current else "none",
                f": {reason}" if reason else "",
            )
            self.collect()
            return target

    def mark_good(self) -> None:
        """The active version has served long enough without a crash: mark it good, forget its starts."""
        with self._locked():
            ptr = self.pointer()
            if ptr is None:
                raise StoreError("no active model to mark good", path=self.root)
            if ptr.get("good") is not True:
                self._write_json(self.root / ACTIVE_FILE, {**ptr, "good": True})
                log.info("%s %s marked good", ptr["name"], ptr["version"])
            self._remove(self.root / BOOT_FILE)

    def _trash(self, vdir: Path) -> None:
        """Remove a version directory so that a kill -9 midway never leaves half a version listed."""
        trash = self.root / f"{_TRASH}{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(vdir, trash)
        fsync_dir(vdir.parent)
        shutil.rmtree(trash, ignore_errors=True)

    def collect(self, *, protect: Sequence[tuple[str, str]] = ()) -> builtins.list[StoredModel]:
        """Delete versions beyond ``keep`` per name, oldest first; never active, previous or ``protect``."""
        with self._locked():
            ptr = self.pointer()
            keep = {(ptr["name"], ptr["version"])} if ptr is not None else set()
            prev = self._pointed(ptr, "previous")
            keep |= {prev.key} if prev is not None else set()
            keep |= set(protect)
            removed: builtins.list[StoredModel] = []
            by_name: dict[str, builtins.list[StoredModel]] = {}
            for m in self.list():
                by_name.setdefault(m.name, []).append(m)
            for models in by_name.values():
                slots = self.keep - sum(1 for m in models if m.key in keep)
                for m in models:  # newest first
                    if m.key in keep:
                        continue
                    if slots > 0:
                        slots -= 1
                        continue
                    try:
                        self._trash(m.path.parent)
                    except OSError as exc:
                        raise StoreError(f"cannot remove {_label(m)}: {exc.strerror}", path=self.root) from exc
                    log.info("collected %s", _label(m))
                    removed.append(m)
            return removed

    # --- crash loops -------------------------------------------------------------------------------

    def boot(self, *, crash_limit: int, window_s: float, now: float | None = None) -> BootDecision:
        """Call once per process start, before loading: count starts of a not-yet-good active version.

        The ``crash_limit``-th start within ``window_s`` seconds (wall clock, so restarts and reboots
        count) rolls back to the previous version and says so; without a previous version the
        decision says that too and keeps the active one.
        """
        if crash_limit < 1 or window_s <= 0:
            raise StoreError(f"crash_limit must be >= 1 and window_s > 0 (got {crash_limit}, {window_s})")
        now = time.time() if now is None else now
        with self._locked():
            ptr = self.pointer()
            active = self._held(ptr["name"], ptr["version"]) if ptr is not None else None
            if ptr is None or active is None:
                what = (
                    "no active model in the store"
                    if ptr is None
                    else (f"ACTIVE names {ptr['name']} {ptr['version']}, which the store does not hold")
                )
                return BootDecision(None, None, what)
            if ptr.get("good") is True:
                return BootDecision(active, None, f"{_label(active)} is marked good")
            starts = [*self._starts(ptr, now, window_s), now]
            n = len(starts)
            loop = f"{n} starts of {_label(active)} within {window_s:g} s and it is not marked good"
            if n >= crash_limit:
                prev = self._pointed(ptr, "previous")
                if prev is not None:
                    reason = f"crash loop: {loop}; reverted to {_label(prev)}"
                    self.rollback((prev.name, prev.version), reason=reason)
                    return BootDecision(prev, active, reason)
                reason = f"crash loop: {loop}, but there is no previous version to revert to; keeping it"
            else:
                reason = f"start {n} of {crash_limit} allowed within {window_s:g} s of {_label(active)}, not yet good"
            boot = {"name": active.name, "version": active.version, "activated_at": ptr.get("activated_at")}
            self._write_json(self.root / BOOT_FILE, {**boot, "starts": starts[-crash_limit:]})
            log.log(logging.ERROR if n >= crash_limit else logging.INFO, "%s", reason)
            return BootDecision(active, None, reason, starts=n)

    def _starts(self, ptr: Mapping[str, Any], now: float, window_s: float) -> builtins.list[float]:
        """Recorded starts of this very activation within the window (either side: clocks jump on boards)."""
        try:
            boot = json.loads((self.root / BOOT_FILE).read_bytes())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.error("%s: damaged %s (%s); counting starts afresh", self.root, BOOT_FILE, exc)
            return []
        same = isinstance(boot, dict) and all(boot.get(k) == ptr.get(k) for k in ("name", "version", "activated_at"))
        raw = boot.get("starts") if same else None
        if not isinstance(raw, list):
            return []
        return [float(t) for t in raw if isinstance(t, (int, float)) and abs(now - float(t)) <= window_s]


def _pack_dir(src: Path, out: Path) -> None:
    """A bundle directory as a plain tar (manifest, signature, then files sorted; fixed headers)."""
    listing = peek_bundle(src)  # refuses links and special files
    names = [n for n in (MANIFEST_NAME, SIGNATURE_NAME) if (src / n).is_file()] + sorted(listing.sizes)
    with open(out, "xb") as fh:
        with tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for rel in names:
                fd = os.open(src / rel, os.O_RDONLY | os.O_NOFOLLOW)
                with os.fdopen(fd, "rb") as f:
                    info = tarfile.TarInfo(rel)
                    info.size, info.mode, info.mtime = os.fstat(fd).st_size, 0o644, 0
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, f)
        fh.flush()
        os.fsync(fh.fileno())
