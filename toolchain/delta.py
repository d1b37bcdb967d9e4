"""Delta bundles on the host: ``toolchain bundle diff OLD NEW -o DELTA`` (the format is runtime.delta's).

The new bundle is compressed with zstd using the old bundle as a raw-content dictionary, with
long-distance matching and a window covering both files: the library form of
``zstd --patch-from=OLD NEW`` (python-zstandard). Bundles are plain, uncompressed tars with sorted
members and fixed mtimes (``toolchain.bundle``), so unchanged bytes of the old model file line up
with the new one and cost almost nothing; a gzip'd tar would scramble every byte after the first
change and leave nothing to match. The delta is applied once before it is written, so a delta
that does not rebuild NEW bit for bit never leaves the host.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from runtime.delta import DeltaHeader, apply_delta, window_log
from toolchain.errors import ToolchainError, UsageError

__all__ = ["DEFAULT_LEVEL", "DeltaInfo", "bundle_identity", "diff_bundles", "make_delta"]

DEFAULT_LEVEL = 19


@dataclass(frozen=True)
class DeltaInfo:
    """What a diff produced: sizes, hashes, and which bundle versions it connects."""

    path: Path
    old_size: int
    new_size: int
    delta_size: int
    old_sha256: str
    new_sha256: str
    old: dict[str, str | None]  # name, version, profile
    new: dict[str, str | None]

    @property
    def ratio(self) -> float:
        """Delta size ÷ new bundle size."""
        return self.delta_size / self.new_size if self.new_size else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the ratio."""
        return asdict(self) | {"path": str(self.path), "ratio": round(self.ratio, 4)}


def bundle_identity(path: Path) -> dict[str, str | None]:
    """A bundle's name, version and profile from its manifest (read, not verified)."""
    from runtime.bundle import peek_bundle

    listing = peek_bundle(path)
    try:
        doc = json.loads(listing.manifest_bytes or b"")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ToolchainError(f"{path}: manifest.json is not JSON ({exc})") from exc
    profile = doc.get("profile")
    profile_name = profile.get("name") if isinstance(profile, dict) else profile
    return {"name": doc.get("name"), "version": doc.get("version"), "profile": profile_name}


def make_delta(old: bytes, new: bytes, *, level: int = DEFAULT_LEVEL) -> bytes:
    """The delta file's bytes (header + zstd frame) that turns ``old`` into ``new``."""
    import zstandard

    params = zstandard.ZstdCompressionParameters.from_level(
        level,
        source_size=len(new),
        dict_size=len(old),
        window_log=window_log(len(old), len(new)),
        enable_ldm=1,
        write_checksum=1,
        write_content_size=1,
        write_dict_id=0,
    )
    dictionary = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    frame = zstandard.ZstdCompressor(dict_data=dictionary, compression_params=params).compress(new)
    header = DeltaHeader(hashlib.sha256(old).hexdigest(), len(old), hashlib.sha256(new).hexdigest(), len(new))
    return header.pack() + frame


def diff_bundles(old: Path, new: Path, out: Path, *, force: bool = False, level: int = DEFAULT_LEVEL) -> DeltaInfo:
    """Write the delta from bundle ``old`` to bundle ``new`` to ``out``, verified by applying it first.

    Refuses (UsageError naming ``--force``) when the two differ in name or profile: a device only
    holds versions of its own model for its own profile, so such a delta could never be applied.
    """
    old, new, out = Path(old), Path(new), Path(out)
    if not 1 <= level <= 22:
        raise UsageError(f"expected a zstd level 1..22, got {level}", flag="--level")
    ids = {"old": bundle_identity(old), "new": bundle_identity(new)}
    for key in ("name", "profile"):
        if ids["old"][key] != ids["new"][key] and not force:
            raise UsageError(
                f"OLD is {key} {ids['old'][key]!r}, NEW is {ids['new'][key]!r}: no device holds the one to apply "
                "it to; pass --force to diff them anyway",
                flag="--force",
            )
    try:
        old_bytes, new_bytes = old.read_bytes(), new.read_bytes()
    except OSError as exc:
        raise ToolchainError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    data = make_delta(old_bytes, new_bytes, level=level)
    new_sha = hashlib.sha256(new_bytes).hexdigest()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".delta-") as tmp:
        candidate, rebuilt = Path(tmp) / "delta", Path(tmp) / "rebuilt.tar"
        candidate.write_bytes(data)
        apply_delta(old, candidate, rebuilt, expected_sha256=new_sha)  # DeltaError if it does not round-trip
        if rebuilt.read_bytes() != new_bytes:
            raise ToolchainError(f"the delta does not rebuild {new} bit for bit; please report this")
        os.replace(candidate, out)
    return DeltaInfo(
        out,
        len(old_bytes),
        len(new_bytes),
        len(data),
        hashlib.sha256(old_bytes).hexdigest(),
        new_sha,
        ids["old"],
        ids["new"],
    )
