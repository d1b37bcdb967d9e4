"""Fetching a bundle or delta onto the device: file://, resumable http(s)://, chunked mqtt://; checked by sha256.

:func:`fetch` writes into ``<dest>.part`` and renames it to ``dest`` only once its size and sha256
are right; a wrong sha256 deletes the ``.part`` (it cannot be resumed into anything good) and raises
:class:`~runtime.errors.DownloadError` naming the url. Any other failure keeps the ``.part``, so
fetching again resumes. A ``dest`` that already holds the right content is returned as is.

- ``file:///path``: copied (from the start each time: it is local).
- ``http://``, ``https://`` (stdlib ``urllib``): resumed with ``Range: bytes=<have>-``. ``206`` with
  a ``Content-Range`` starting at ``<have>`` appends; ``200`` means the server ignored the range,
  and the file is fetched again from the start; ``416`` with ``bytes */<total>`` equal to what the
  ``.part`` holds means it is complete. A body shorter than its ``Content-Length`` (connection cut),
  timeouts, refused connections and 408/429/5xx are retried with exponential backoff; up to
  ``ATTEMPTS`` failures in a row without a byte of progress, then the error is raised. Other 4xx
  are not retried. A ``Content-Length``/``Content-Range`` total that differs from ``size`` is an
  error (the url serves another file).
- ``mqtt://<sha256>`` (the device's own fleet, ``fleet=``) or ``mqtt://<fleet>/<sha256>``: for
  small bundles, over the service's :class:`runtime.link.Link`. The chunk protocol:

  ``edge/<fleet>/blobs/<sha256>/meta``, retained, JSON: ``{"v": 1, "sha256": hex, "size": bytes,
  "chunk_size": bytes, "chunks": n, "chunk_sha256": [hex, …]}`` with ``n = ceil(size / chunk_size)``.
  ``edge/<fleet>/blobs/<sha256>/<i>``, retained, for ``i`` in ``0..n-1``: the raw bytes
  ``[i·chunk_size, (i+1)·chunk_size)`` of the file (the last one shorter).

  The operator publishes them (``toolchain.transfer``; QoS 1, retained, so a device that subscribes
  later or reconnects gets them all again) and clears them (empty retained payloads) when the
  rollout is over. The device subscribes to ``edge/<fleet>/blobs/<sha256>/#``, checks every chunk
  against ``chunk_sha256`` (a bad or stray chunk is skipped, never written), writes it at its offset
  in the ``.part`` and records it in ``<dest>.part.chunks`` (JSON: sha256, size, chunk_size and a
  bitmap of the chunks held; rewritten atomically after the ``.part`` was fsynced). A restart of
  the device, of the broker or of the fetch resumes from that bitmap: the retained chunks arrive
  again on every (re)subscribe and the ones held are skipped. Chunks arriving before the meta are
  buffered. When nothing new arrived for a while, the device subscribes again (the broker then
  resends the retained messages); after ``timeout_s`` without a new chunk it gives up (the ``.part``
  is kept). Empty payloads (a clear in progress) are ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit

from runtime.bundle import file_digest
from runtime.durable import fsync_dir
from runtime.errors import ConfigError, DownloadError
from runtime.topics import blob_filter, validate_segment

__all__ = [
    "ATTEMPTS",
    "BLOB_VERSION",
    "BlobMeta",
    "Progress",
    "blob_url",
    "chunks_path",
    "fetch",
    "parse_blob_url",
    "part_path",
]

log = logging.getLogger(__name__)

Progress = Callable[[int, int | None], None]
ATTEMPTS = 5  # failures in a row without progress before an http(s) fetch gives up
BLOB_VERSION = 1
_BACKOFF_MIN_S, _BACKOFF_MAX_S = 0.2, 5.0
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_READ = 64 * 1024
_MAX_CHUNK = 16 * 1024 * 1024
_MAX_EARLY_BYTES = 64 * 1024 * 1024  # chunks buffered while the meta has not arrived yet
_HEX = frozenset("0123456789abcdef")


def part_path(dest: Path) -> Path:
    """``<dest>.part``: where a fetch writes until the content is verified."""
    return dest.with_name(dest.name + ".part")


def chunks_path(dest: Path) -> Path:
    """``<dest>.part.chunks``: the mqtt:// received-chunk bitmap."""
    return dest.with_name(dest.name + ".part.chunks")


def blob_url(sha256: str, fleet: str | None = None) -> str:
    """``mqtt://<sha256>`` (the device's fleet) or ``mqtt://<fleet>/<sha256>``."""
    return f"mqtt://{fleet}/{sha256}" if fleet else f"mqtt://{sha256}"


def parse_blob_url(url: str, fleet: str | None = None) -> tuple[str, str]:
    """(fleet, sha256) of an mqtt:// url; ``fleet`` is used when the url does not name one."""
    parts = urlsplit(url)
    path = unquote(parts.path).strip("/")
    named, sha = (unquote(parts.netloc), path) if path else (None, unquote(parts.netloc))
    if parts.scheme != "mqtt" or not _is_sha(sha) or "/" in sha:
        raise DownloadError("expected mqtt://<sha256> or mqtt://<fleet>/<sha256>", url=url)
    chosen = named or fleet
    if chosen is None:
        raise DownloadError("mqtt://<sha256> needs the device's fleet (fetch(..., fleet=...))", url=url)
    try:
        validate_segment(chosen, "fleet")
    except ConfigError as exc:
        raise DownloadError(str(exc), url=url) from exc
    return chosen, sha


def fetch(
    url: str,
    dest: Path,
    *,
    sha256: str,
    size: int | None = None,
    link: Any = None,
    progress: Progress | None = None,
    timeout_s: float = 30,
    fleet: str | None = None,
) -> Path:
    """Fetch ``url`` into ``dest`` and check it is ``size`` bytes (when given) with this ``sha256``.

    ``link`` (a started :class:`runtime.link.Link`) and ``fleet`` are for mqtt:// only; ``timeout_s``
    bounds each network wait (http) or the time without a new chunk (mqtt). ``progress(done, total)``
    is called as bytes arrive. See the module docstring for resuming and retries.
    """
    if not _is_sha(sha256):
        raise DownloadError(f"sha256 must be 64 lowercase hex digits, got {sha256!r}", url=url)
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise DownloadError(f"size must be a byte count >= 0, got {size!r}", url=url)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file() and _digest(dest, url) == (sha256, dest.stat().st_size):
        return dest
    part = part_path(dest)
    scheme = urlsplit(url).scheme.lower()
    if scheme == "file":
        _fetch_file(url, part, progress)
    elif scheme in ("http", "https"):
        _fetch_http(url, part, size, progress, timeout_s)
    elif scheme == "mqtt":
        if link is None:
            raise DownloadError("mqtt:// needs the service's MQTT link ([mqtt] enabled = true)", url=url)
        blob_fleet, blob_sha = parse_blob_url(url, fleet)
        if blob_sha != sha256:
            raise DownloadError(f"the url names sha256 {blob_sha}, the expected one is {sha256}", url=url)
        _BlobReceiver(url, dest, sha256, size, progress, timeout_s).run(link, blob_filter(blob_fleet, sha256))
    else:
        raise DownloadError(f"unsupported scheme {scheme or '(none)'!r}; use file://, http(s):// or mqtt://", url=url)
    return _finish(url, part, dest, sha256, size)


def _is_sha(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and not set(value) - _HEX


def _digest(path: Path, url: str) -> tuple[str, int]:
    try:
        return file_digest(path)
    except OSError as exc:
        raise DownloadError(f"cannot read {path}: {exc.strerror or exc}", url=url) from exc


def _finish(url: str, part: Path, dest: Path, sha256: str, size: int | None) -> Path:
    """Check the .part and rename it to ``dest``; delete it if its content is wrong."""
    got, got_size = _digest(part, url)
    if (size is not None and got_size != size) or got != sha256:
        part.unlink(missing_ok=True)
        chunks_path(dest).unlink(missing_ok=True)
        want = f"{size} bytes with sha256 {sha256}" if size is not None else f"sha256 {sha256}"
        raise DownloadError(
            f"got {got_size} bytes with sha256 {got}, expected {want}; the partial file was deleted — "
            "check the url and the sha256/size in the deploy command",
            url=url,
        )
    with part.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(part, dest)
    chunks_path(dest).unlink(missing_ok=True)
    fsync_dir(dest.parent)
    return dest


def _fetch_file(url: str, part: Path, progress: Progress | None) -> None:
    source = Path(unquote(urlsplit(url).path))
    try:
        with source.open("rb") as src, part.open("wb") as out:
            total = os.fstat(src.fileno()).st_size
            _copy(src, out, 0, total, progress)
    except OSError as exc:
        raise DownloadError(f"cannot read {source}: {exc.strerror or exc}", url=url) from exc


def _copy(src: IO[bytes], out: IO[bytes], done: int, total: int | None, progress: Progress | None) -> int:
    """Copy ``src`` to ``out`` until EOF; returns the bytes copied. Data written is flushed even on errors."""
    copied = 0
    try:
        while chunk := src.read(_READ):
            out.write(chunk)
            copied += len(chunk)
            if progress is not None:
                progress(done + copied, total)
    finally:
        out.flush()
        os.fsync(out.fileno())
    return copied


# --- http(s) ----------------------------------------------------------------------------------------


class _Transient(Exception):
    """A failure worth retrying (connection cut, timeout, 5xx)."""


def _fetch_http(url: str, part: Path, size: int | None, progress: Progress | None, timeout_s: float) -> None:
    failures = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        if size is not None and have > size:
            part.write_bytes(b"")  # more than the file has: not this file
            have = 0
        if size is not None and have == size and have > 0:
            return  # complete: the hash decides
        try:
            _http_attempt(url, part, have, size, progress, timeout_s)
            return
        except _Transient as exc:
            now = part.stat().st_size if part.exists() else 0
            failures = 0 if now > have else failures + 1
            if failures >= ATTEMPTS:
                raise DownloadError(
                    f"gave up after {failures} attempts without progress ({exc}); {now} bytes are kept in "
                    f"{part.name}, fetch again to resume",
                    url=url,
                ) from exc
            delay = min(_BACKOFF_MAX_S, _BACKOFF_MIN_S * 2 ** max(failures - 1, 0))
            log.info("download of %s interrupted (%s); retrying in %.1f s from byte %d", url, exc, delay, now)
            time.sleep(delay)


def _http_attempt(
    url: str, part: Path, have: int, size: int | None, progress: Progress | None, timeout_s: float
) -> None:
    headers = {"Accept-Encoding": "identity", "User-Agent": "edge-runtime"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        with contextlib.closing(exc):
            if exc.code == 416:
                _range_not_satisfiable(url, part, have, exc.headers.get("Content-Range"))
                return
            if exc.code in _RETRY_STATUS:
                raise _Transient(f"HTTP {exc.code} {exc.reason}") from exc
            raise DownloadError(f"HTTP {exc.code} {exc.reason}; check the url", url=url) from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise _Transient(str(getattr(exc, "reason", exc))) from exc
    with resp:
        start, total = _response_range(url, resp, have)
        if size is not None and total is not None and total != size:
            part.unlink(missing_ok=True)
            raise DownloadError(f"the server has {total} bytes, the deploy says {size}; wrong url or file", url=url)
        length = resp.headers.get("Content-Length")
        with part.open("r+b" if part.exists() else "wb") as out:
            out.seek(start)
            out.truncate()
            try:
                copied = _copy(resp, out, start, total if total is not None else size, progress)
            except (OSError, http.client.HTTPException) as exc:
                raise _Transient(f"connection lost: {exc}") from exc
    if length is not None and length.isdigit() and copied != int(length):
        raise _Transient(f"connection closed after {copied} of {length} bytes")
    if size is not None and start + copied > size:
        raise DownloadError(f"the server sent more than the {size} bytes the deploy says", url=url)


def _response_range(url: str, resp: Any, have: int) -> tuple[int, int | None]:
    """(offset the body starts at, total size if known) of a 200 or 206 response."""
    length = resp.headers.get("Content-Length")
    if resp.status == 200:
        if have:
            log.info("%s ignored the Range request; downloading from the start", url)
        return 0, int(length) if length is not None and length.isdigit() else None
    if resp.status != 206:
        raise DownloadError(f"unexpected HTTP {resp.status}; expected 200 or 206", url=url)
    unit, _, spec = (resp.headers.get("Content-Range") or "").partition(" ")
    span, _, total = spec.partition("/")
    first = span.partition("-")[0]
    if unit != "bytes" or not first.isdigit() or int(first) != have:
        raise _Transient(f"206 with Content-Range {resp.headers.get('Content-Range')!r} for bytes={have}-")
    return have, int(total) if total.isdigit() else None


def _range_not_satisfiable(url: str, part: Path, have: int, content_range: str | None) -> None:
    """416: the .part is complete (``bytes */<have>``), or it is not this file and starts over."""
    total = (content_range or "").rpartition("/")[2]
    if total.isdigit() and int(total) == have:
        return
    part.write_bytes(b"")
    raise _Transient(f"HTTP 416 for bytes={have}- (server has {total or 'an unknown size'}); starting over")


# --- mqtt:// ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlobMeta:
    """The retained ``meta`` message of a file offered over MQTT (see the module docstring)."""

    sha256: str
    size: int
    chunk_size: int
    chunk_sha256: tuple[str, ...]

    @property
    def chunks(self) -> int:
        """Number of chunks."""
        return len(self.chunk_sha256)

    def span(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk ``index``."""
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)

    def to_json(self) -> bytes:
        """The wire form."""
        doc = {"v": BLOB_VERSION, "sha256": self.sha256, "size": self.size, "chunk_size": self.chunk_size}
        doc |= {"chunks": self.chunks, "chunk_sha256": list(self.chunk_sha256)}
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def parse(cls, payload: bytes) -> BlobMeta:
        """Parse and check a meta payload; ValueError saying what is wrong."""
        try:
            doc = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("v") != BLOB_VERSION:
            raise ValueError(f"expected a JSON object with v={BLOB_VERSION}")
        size, chunk_size, hashes = doc.get("size"), doc.get("chunk_size"), doc.get("chunk_sha256")
        if not (isinstance(size, int) and size >= 0 and isinstance(chunk_size, int) and 0 < chunk_size <= _MAX_CHUNK):
            raise ValueError(f"bad size {size!r} or chunk_size {chunk_size!r}")
        if not isinstance(hashes, list) or not all(_is_sha(h) for h in hashes) or not _is_sha(doc.get("sha256")):
            raise ValueError("sha256 and chunk_sha256 must be 64-hex-digit strings")
        if len(hashes) != -(-size // chunk_size) or doc.get("chunks") != len(hashes):
            raise ValueError(f"{len(hashes)} chunk hashes for {size} bytes in chunks of {chunk_size}")
        return cls(doc["sha256"], size, chunk_size, tuple(hashes))


class _BlobReceiver:
    """One mqtt:// fetch: chunks from the link's network thread through a queue into the .part."""

    def __init__(
        self, url: str, dest: Path, sha256: str, size: int | None, progress: Progress | None, timeout_s: float
    ) -> None:
        self.url, self.sha256, self.size, self.progress, self.timeout_s = url, sha256, size, progress, timeout_s
        self.part, self.map = part_path(dest), chunks_path(dest)
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.meta: BlobMeta | None = None
        self.have = bytearray()
        self.early: dict[int, bytes] = {}
        self.problem = "no meta message yet"
        self._fh: IO[bytes] | None = None

    def on_message(self, message: Any) -> None:
        """Link handler (network thread): hand over, nothing else."""
        if message.payload:
            self.inbox.put((message.topic.rpartition("/")[2], bytes(message.payload)))

    def run(self, link: Any, topic_filter: str) -> None:
        if threading.current_thread().name == "edge-mqtt":  # the chunks would wait behind this very call
            raise DownloadError("mqtt:// cannot be fetched from the MQTT network thread; use a worker", url=self.url)
        link.subscribe(topic_filter, self.on_message, qos=1)
        try:
            self._receive(link, topic_filter)
        finally:
            link.unsubscribe(topic_filter, self.on_message)

    def _receive(self, link: Any, topic_filter: str) -> None:
        ask_every = max(1.0, min(5.0, self.timeout_s / 4))
        last_new = last_ask = time.monotonic()
        while not self._complete():
            try:
                batch = [self.inbox.get(timeout=0.2)]
            except queue.Empty:
                batch = []
            while not self.inbox.empty() and len(batch) < 256:
                batch.append(self.inbox.get_nowait())
            if self._take(batch):
                last_new = time.monotonic()
                continue
            now = time.monotonic()
            if now - last_new > self.timeout_s:
                held = f"{sum(self.have)} of {self.meta.chunks} chunks" if self.meta else "nothing"
                raise DownloadError(
                    f"no new chunk for {self.timeout_s:g} s ({held} held; {self.problem}); is the operator "
                    "publishing it (toolchain fleet deploy --via mqtt)? Fetching again resumes",
                    url=self.url,
                )
            if now - max(last_new, last_ask) > ask_every:  # the broker resends what is retained
                link.subscribe(topic_filter, self.on_message, qos=1)
                last_ask = now

    def _complete(self) -> bool:
        return self.meta is not None and all(self.have)

    def _take(self, batch: list[tuple[str, bytes]]) -> bool:
        """Apply a batch of messages; True if a new chunk was written (then fsynced and recorded)."""
        written = False
        try:
            for leaf, payload in batch:
                if leaf == "meta":
                    if self._on_meta(payload):
                        early, self.early = self.early, {}
                        written |= any([self._write(i, chunk) for i, chunk in sorted(early.items())])
                elif leaf.isdigit() and self.meta is None:
                    self._keep_early(int(leaf), payload)
                elif leaf.isdigit():
                    written |= self._write(int(leaf), payload)
            if self._fh is not None:
                self._fh.flush()
                os.fsync(self._fh.fileno())
        finally:
            self._close()
        if written and self.meta is not None:
            self._save_map()  # only after the chunks it records are on disk
            if self.progress is not None:
                held = sum(self.meta.span(i)[1] for i, bit in enumerate(self.have) if bit)
                self.progress(held, self.meta.size)
        return written

    def _keep_early(self, index: int, payload: bytes) -> None:
        if sum(map(len, self.early.values())) + len(payload) <= _MAX_EARLY_BYTES:
            self.early[index] = payload  # past the cap it is dropped: it comes again on the next subscribe

    def _close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def _on_meta(self, payload: bytes) -> bool:
        """Take a meta message; True if it starts (or restarts) the transfer."""
        try:
            meta = BlobMeta.parse(payload)
        except ValueError as exc:
            self.problem = f"bad meta message: {exc}"
            log.warning("%s: ignoring a bad meta message: %s", self.url, exc)
            return False
        if meta.sha256 != self.sha256 or (self.size is not None and meta.size != self.size):
            self.problem = f"the meta describes {meta.size} bytes with sha256 {meta.sha256}"
            return False
        if meta == self.meta:
            return False
        self._close()
        self.meta, self.have = meta, self._load_map(meta)
        with self.part.open("r+b" if self.part.exists() else "wb") as fh:
            fh.truncate(meta.size)
        return True

    def _write(self, index: int, payload: bytes) -> bool:
        meta = self.meta
        if meta is None or index >= meta.chunks or self.have[index]:
            return False
        offset, length = meta.span(index)
        if len(payload) != length or hashlib.sha256(payload).hexdigest() != meta.chunk_sha256[index]:
            self.problem = f"chunk {index} did not match its hash (skipped)"
            log.warning("%s: chunk %d does not match the meta; skipped", self.url, index)
            return False
        if self._fh is None:
            self._fh = self.part.open("r+b")
        self._fh.seek(offset)
        self._fh.write(payload)
        self.have[index] = 1
        return True

    def _load_map(self, meta: BlobMeta) -> bytearray:
        """The chunks a previous attempt wrote, if it was for this very meta and the .part is still there."""
        try:
            doc = json.loads(self.map.read_text())
            same = [doc.get(k) for k in ("sha256", "size", "chunk_size")] == [meta.sha256, meta.size, meta.chunk_size]
            bits = bytes.fromhex(doc["have"]) if same and self.part.exists() else b""
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            bits = b""
        have = bytearray((bits[i // 8] >> (i % 8)) & 1 if i // 8 < len(bits) else 0 for i in range(meta.chunks))
        if not any(have):
            self.part.unlink(missing_ok=True)
        return have

    def _save_map(self) -> None:
        meta = self.meta
        assert meta is not None
        bits = bytearray(-(-meta.chunks // 8))
        for i, bit in enumerate(self.have):
            bits[i // 8] |= bit << (i % 8)
        doc = {"sha256": meta.sha256, "size": meta.size, "chunk_size": meta.chunk_size, "have": bits.hex()}
        tmp = self.map.with_name(self.map.name + ".tmp")
        with tmp.open("w") as fh:
            json.dump(doc, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.map)
