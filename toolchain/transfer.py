"""The operator side of mqtt:// downloads: offer a file as retained chunks + meta, and clear them afterwards.

The protocol is described in :mod:`runtime.download` (the device side). :func:`publish_blob`
publishes ``edge/<fleet>/blobs/<sha256>/<i>`` for every chunk and then
``edge/<fleet>/blobs/<sha256>/meta``, all QoS 1 and retained, and waits for the broker's PUBACKs
(a refused one — e.g. the ACL does not let this identity write there — is an error naming the
topic). The returned :class:`Blob` carries the ``url`` to put in a ``model.deploy`` command.
:func:`clear_blob` publishes empty retained messages on the same topics, which deletes them on the
broker; devices ignore empty payloads. Meant for small bundles (up to :data:`MAX_BLOB_BYTES`): the
broker keeps every retained chunk in memory and on disk until it is cleared; use http(s):// beyond.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.download import BlobMeta, blob_url
from runtime.topics import blob_topic, validate_segment
from toolchain.errors import ToolchainError, UsageError

__all__ = ["DEFAULT_CHUNK_SIZE", "MAX_BLOB_BYTES", "Blob", "clear_blob", "publish_blob"]

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 64 * 1024
MAX_BLOB_BYTES = 32 * 1024 * 1024
_WINDOW = 64  # chunks in flight before waiting for their PUBACKs


@dataclass(frozen=True)
class Blob:
    """A file offered over MQTT: where, and the url for a deploy command."""

    fleet: str
    sha256: str
    size: int
    chunk_size: int
    chunks: int

    @property
    def url(self) -> str:
        """``mqtt://<sha256>``: a device fetches it from its own fleet's blobs."""
        return blob_url(self.sha256)

    @property
    def topics(self) -> list[str]:
        """Every retained topic it occupies (meta last)."""
        return [*(blob_topic(self.fleet, self.sha256, i) for i in range(self.chunks)), self._meta_topic]

    @property
    def _meta_topic(self) -> str:
        return blob_topic(self.fleet, self.sha256, "meta")


def publish_blob(
    link: Any,
    fleet: str,
    path: Path,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    timeout_s: float = 60.0,
    max_bytes: int = MAX_BLOB_BYTES,
) -> Blob:
    """Publish ``path`` as retained chunks and meta through a started :class:`runtime.link.Link`."""
    validate_segment(fleet, "--fleet")
    if not 1024 <= chunk_size <= 16 * 1024 * 1024:
        raise UsageError(f"expected 1 KiB..16 MiB, got {chunk_size}", flag="--chunk-size")
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ToolchainError(f"cannot read {path}: {exc.strerror}") from exc
    if len(data) > max_bytes:
        raise UsageError(
            f"{path} is {len(data)} bytes; MQTT transfer is for bundles up to {max_bytes} bytes — serve it over "
            "http(s) instead",
            flag="--via",
        )
    spans = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    meta = BlobMeta(
        hashlib.sha256(data).hexdigest(), len(data), chunk_size, tuple(hashlib.sha256(c).hexdigest() for c in spans)
    )
    blob = Blob(fleet, meta.sha256, meta.size, chunk_size, meta.chunks)
    deadline = time.monotonic() + timeout_s
    for start in range(0, len(spans), _WINDOW):
        handles = [
            link.publish(blob_topic(fleet, meta.sha256, i), spans[i], qos=1, retain=True)
            for i in range(start, min(start + _WINDOW, len(spans)))
        ]
        _wait(handles, deadline)
    _wait([link.publish(blob._meta_topic, meta.to_json(), qos=1, retain=True)], deadline)
    log.info("published %s (%d bytes, %d chunks) for fleet %s", blob.url, blob.size, blob.chunks, fleet)
    return blob


def clear_blob(link: Any, blob: Blob, *, timeout_s: float = 30.0) -> None:
    """Delete the blob's retained meta and chunks from the broker (empty retained payloads, meta first)."""
    deadline = time.monotonic() + timeout_s
    topics = [blob._meta_topic, *blob.topics[:-1]]
    for start in range(0, len(topics), _WINDOW):
        _wait([link.publish(t, b"", qos=1, retain=True) for t in topics[start : start + _WINDOW]], deadline)


def _wait(handles: list[Any], deadline: float) -> None:
    for handle in handles:
        if not handle.wait(max(0.0, deadline - time.monotonic())):
            why = handle.reason or "no PUBACK before the timeout; is the broker reachable?"
            raise ToolchainError(f"publishing {handle.topic} failed: {why} (check the operator's ACL for blobs)")
