"""Delta bundles on the device: the file format and :func:`apply_delta` (old bundle + delta → new bundle).

A delta is a fixed header followed by one zstd frame (``toolchain.delta`` makes it): the new bundle
compressed with the old bundle as a raw-content dictionary, long-distance matching on and a window
that covers both — what ``zstd --patch-from=OLD NEW`` does. Header, big-endian (``HEADER``)::

    magic      6 bytes  b"EFDLTA"
    version    u16      1
    base       32 bytes sha256 of the bundle it applies to
    base_size  u64
    result     32 bytes sha256 of the bundle it makes
    size       u64      size of that bundle

:func:`apply_delta` checks the base (size and sha256), decompresses (the frame carries a zstd
checksum), checks the result's size and sha256 against the header and the caller's
``expected_sha256`` and only then writes ``out`` atomically. Anything off is a
:class:`~runtime.errors.DeltaError`; the caller then falls back to the full bundle. The signature
is checked afterwards like for any bundle (the model store's ``add``). Needs ``zstandard`` (the
``device`` extra), imported only when a delta is applied.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

from runtime.durable import write_atomic
from runtime.errors import DeltaError

__all__ = ["FORMAT_VERSION", "HEADER", "MAGIC", "DeltaHeader", "apply_delta", "read_header", "window_log"]

MAGIC = b"EFDLTA"
FORMAT_VERSION = 1
HEADER = struct.Struct(">6sH32sQ32sQ")
_MIN_WINDOW_LOG, _MAX_WINDOW_LOG = 20, 31


@dataclass(frozen=True)
class DeltaHeader:
    """What a delta file says it does."""

    base_sha256: str
    base_size: int
    result_sha256: str
    result_size: int
    version: int = FORMAT_VERSION

    def pack(self) -> bytes:
        """The header's bytes."""
        return HEADER.pack(
            MAGIC,
            self.version,
            bytes.fromhex(self.base_sha256),
            self.base_size,
            bytes.fromhex(self.result_sha256),
            self.result_size,
        )


def window_log(base_size: int, result_size: int) -> int:
    """The zstd window (log2 bytes) that lets the new bundle reference all of the old one."""
    return max(_MIN_WINDOW_LOG, min(_MAX_WINDOW_LOG, (base_size + result_size).bit_length()))


def read_header(data: bytes, path: Path | str | None = None) -> DeltaHeader:
    """Parse the header at the start of ``data``; DeltaError if it is not a delta of a known version."""
    if len(data) < HEADER.size:
        raise DeltaError(f"truncated: {len(data)} bytes, a delta header alone is {HEADER.size}", path=path)
    magic, version, base, base_size, result, size = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise DeltaError("not an edgefleet delta (bad magic); make one with `toolchain bundle diff`", path=path)
    if version != FORMAT_VERSION:
        raise DeltaError(f"delta format version {version}; this runtime reads version {FORMAT_VERSION}", path=path)
    return DeltaHeader(base.hex(), base_size, result.hex(), size, version)


def apply_delta(old_bundle: Path, delta: Path, out: Path, *, expected_sha256: str) -> Path:
    """Rebuild the new bundle from ``old_bundle`` and ``delta`` into ``out``; checks every hash and size."""
    old_bundle, delta, out = Path(old_bundle), Path(delta), Path(out)
    data = _read(delta, delta)
    header = read_header(data, delta)
    if header.result_sha256 != expected_sha256:
        raise DeltaError(
            f"it makes the bundle with sha256 {header.result_sha256}, the deploy expects {expected_sha256}", path=delta
        )
    base = _read(old_bundle, delta)
    base_sha = hashlib.sha256(base).hexdigest()
    if len(base) != header.base_size or base_sha != header.base_sha256:
        raise DeltaError(
            f"wrong base: it applies to {header.base_size} bytes with sha256 {header.base_sha256}, "
            f"{old_bundle} is {len(base)} bytes with sha256 {base_sha}; fetch the full bundle",
            path=delta,
        )
    result = _decompress(base, data[HEADER.size :], header, delta)
    got = hashlib.sha256(result).hexdigest()
    if len(result) != header.result_size or got != expected_sha256:
        raise DeltaError(
            f"the result is {len(result)} bytes with sha256 {got}, expected {header.result_size} bytes with "
            f"sha256 {expected_sha256}; fetch the full bundle",
            path=delta,
        )
    write_atomic(out, result)
    return out


def _read(path: Path, delta: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DeltaError(f"cannot read {path}: {exc.strerror or exc}", path=delta) from exc


def _decompress(base: bytes, frame: bytes, header: DeltaHeader, delta: Path) -> bytes:
    import zstandard

    try:
        claimed = zstandard.frame_content_size(frame)
        if claimed != header.result_size:  # checked before a single byte is allocated for it
            raise DeltaError(f"the zstd frame says {claimed} bytes, the header {header.result_size}", path=delta)
        dictionary = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        dctx = zstandard.ZstdDecompressor(
            dict_data=dictionary, max_window_size=1 << window_log(header.base_size, header.result_size)
        )
        return dctx.decompress(frame, max_output_size=header.result_size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise DeltaError(f"corrupt or truncated zstd data ({exc}); fetch the full bundle", path=delta) from exc
