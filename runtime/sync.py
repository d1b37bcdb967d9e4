"""Store-and-forward of the logbook to MQTT: batches from the outbox, marked synced only once acknowledged.

The ``edge-sync`` thread reads ``logbook.pending()`` in ``seq`` order, groups the records per table
into batches of at most ``batch_size`` and publishes each batch as one QoS 1 message on
``edge/<fleet>/<device>/<table>``, keeping at most ``max_inflight_batches`` unacknowledged. A batch's
rows are marked synced (``logbook.mark_synced`` then ``logbook.flush``) only after its PUBACK, so a
crash at any instant re-sends at most the batches in flight: delivery is at-least-once and the
receiver drops duplicates by ``(device, seq)``. Within one process paho re-sends unacknowledged
batches after a reconnect; after a restart they are still unsynced in the logbook and go again.
A batch the broker refuses (MQTT 5 failure reason code) is retried after ``retry_delay_s``.

Wire format of a batch (UTF-8 JSON)::

    {"v": 1, "device": "<id>", "fleet": "<fleet>", "table": "inferences",
     "records": [{"seq": 17, "ts": 1718000000.25, ...the row's fields...}, ...]}

With ``compress=True`` the body is a zlib stream instead. The payload describes itself — a JSON
batch starts with ``{`` (0x7B), a zlib stream with 0x78 — so :func:`decode_batch` reads both on
MQTT 3.1.1, which has no properties; on MQTT 5 the message also carries the content type
``application/json`` and, when compressed, the user property ``encoding=zlib``.

Status: on every connect a retained birth message ``{"online": true, "device", "fleet", "ts", …}``
(plus what the ``status`` callable returns: group, profile, model, version…) goes to
``edge/<fleet>/<device>/status``; the last will (:func:`with_will`) is the retained
``{"online": false, …, "reason": "lost"}``, and :meth:`Sync.close` publishes
``{"online": false, …, "reason": "stopped"}`` itself before the link disconnects cleanly (a clean
disconnect discards the will).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from runtime.errors import ConfigError, EdgeError, LogbookError
from runtime.link import Link, LinkConfig, PublishHandle
from runtime.logbook import Logbook, OutboxRecord
from runtime.topics import DATA_TABLES, data_topic, status_topic, validate_device, validate_segment

__all__ = ["BatchError", "Sync", "decode_batch", "encode_batch", "offline_payload", "with_will"]

log = logging.getLogger(__name__)

WIRE_VERSION = 1
CONTENT_TYPE = "application/json"
MAX_BATCH_BYTES = 16 * 1024 * 1024  # decoded size a receiver accepts (guards against zlib bombs)
_FLUSH_TIMEOUT_S = 10.0


class BatchError(EdgeError, ValueError):
    """A sync batch that cannot be decoded or does not have the documented shape."""


def encode_batch(fleet: str, device: str, table: str, records: list[OutboxRecord], *, compress: bool = False) -> bytes:
    """One batch as bytes (JSON, or its zlib stream with ``compress``); records go in as their wire JSON."""
    head = {"v": WIRE_VERSION, "device": device, "fleet": fleet, "table": table}
    raw = _json(head)[:-1] + b',"records":[' + ",".join(r.wire for r in records).encode("utf-8") + b"]}"
    return zlib.compress(raw, 6) if compress else raw


def decode_batch(payload: bytes) -> dict[str, Any]:
    """A received batch (JSON or zlib, told apart by the first byte), its shape checked; BatchError otherwise."""
    if not isinstance(payload, bytes | bytearray) or not payload:
        raise BatchError("empty payload; expected a JSON or zlib sync batch")
    raw = bytes(payload)
    if raw[0] == 0x78:
        inflater = zlib.decompressobj()
        try:
            raw = inflater.decompress(raw, MAX_BATCH_BYTES)
        except zlib.error as exc:
            raise BatchError(f"corrupt zlib batch: {exc}") from exc
        if inflater.unconsumed_tail or not inflater.eof:
            raise BatchError(f"zlib batch truncated or larger than {MAX_BATCH_BYTES} bytes decoded")
    elif raw[0] != 0x7B:
        raise BatchError(f"payload starts with 0x{raw[0]:02X}; expected '{{' (JSON) or 0x78 (zlib)")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BatchError(f"batch is not valid JSON: {exc}") from exc
    _check_batch(body)
    return body  # type: ignore[no-any-return]


def _check_batch(body: object) -> None:
    if not isinstance(body, dict):
        raise BatchError("batch must be a JSON object")
    if body.get("v") != WIRE_VERSION:
        raise BatchError(f"unsupported batch version {body.get('v')!r}; this reader knows {WIRE_VERSION}")
    for key in ("device", "fleet"):
        if not isinstance(body.get(key), str) or not body[key]:
            raise BatchError(f"batch field {key!r} must be a non-empty string")
    if body.get("table") not in DATA_TABLES:
        raise BatchError(f"batch field 'table' must be one of {', '.join(DATA_TABLES)}, got {body.get('table')!r}")
    records = body.get("records")
    if not isinstance(records, list):
        raise BatchError("batch field 'records' must be a list")
    for record in records:
        if not isinstance(record, dict):
            raise BatchError("every record must be a JSON object")
        seq, ts = record.get("seq"), record.get("ts")
        if type(seq) is not int or seq < 1:
            raise BatchError(f"record 'seq' must be an integer >= 1, got {seq!r}")
        if type(ts) not in (int, float):
            raise BatchError(f"record 'ts' must be a number, got {ts!r}")


def offline_payload(fleet: str, device: str, reason: str = "lost", **extra: Any) -> bytes:
    """The retained offline status: ``reason`` "lost" for the last will, "stopped" for a clean stop."""
    return _json({**extra, "online": False, "device": device, "fleet": fleet, "reason": reason})


def with_will(cfg: LinkConfig, *, fleet: str, device: str) -> LinkConfig:
    """``cfg`` with the device's last will: retained ``{"online": false, "reason": "lost"}`` on its status topic."""
    return dataclasses.replace(
        cfg, will_topic=status_topic(fleet, device), will_payload=offline_payload(fleet, device), will_retain=True
    )


def _json(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8")


@dataclass
class _Batch:
    table: str
    seqs: list[int]
    handle: PublishHandle


class Sync:
    """Drains the logbook's outbox to MQTT on thread ``edge-sync``; publishes the birth and offline status."""

    def __init__(
        self,
        link: Link,
        logbook: Logbook,
        *,
        fleet: str,
        device: str,
        batch_size: int = 200,
        compress: bool = False,
        max_inflight_batches: int = 8,
        status: Callable[[], Mapping[str, Any]] | None = None,
        poll_interval_s: float = 0.5,
        retry_delay_s: float = 5.0,
        linger_s: float = 0.05,
    ) -> None:
        checks = (
            ("batch_size", batch_size, batch_size >= 1, ">= 1"),
            ("max_inflight_batches", max_inflight_batches, max_inflight_batches >= 1, ">= 1"),
            ("poll_interval_s", poll_interval_s, poll_interval_s > 0, "> 0"),
            ("retry_delay_s", retry_delay_s, retry_delay_s >= 0, ">= 0"),
            ("linger_ms", linger_s * 1000, 0 <= linger_s <= 10, "0..10000"),
        )
        for key, value, ok, rule in checks:
            if not ok:
                raise ConfigError(f"must be {rule}, got {value!r}", key=f"mqtt.{key}")
        self.link, self.logbook = link, logbook
        self.fleet, self.device = validate_segment(fleet, "fleet"), validate_device(device)
        self.batch_size, self.compress, self.max_inflight = batch_size, compress, max_inflight_batches
        self.poll_interval_s, self.retry_delay_s, self.linger_s = poll_interval_s, retry_delay_s, linger_s
        self._status = status
        self._topics = {t: data_topic(self.fleet, self.device, t) for t in DATA_TABLES}
        self._status_topic = status_topic(self.fleet, self.device)
        self._cond = threading.Condition()
        self._wake = False
        self._closing = False
        self._inflight: list[_Batch] = []  # touched by the edge-sync thread only
        self._retry_at = 0.0
        self._partial_at = 0.0  # a partial batch may go out from then on (linger)
        self._due = 0.0  # wake for a held-back partial batch then (0: no wake needed)
        self._counts = {"batches_acked": 0, "records_acked": 0, "batches_failed": 0, "births": 0}
        self._last_ack: float | None = None
        self._thread: threading.Thread | None = None
        link.on_connect(self._on_connect)

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the ``edge-sync`` thread (start the link too; the order does not matter)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="edge-sync", daemon=True)
        self._thread.start()
        if self.link.connected and not self._counts["births"]:  # the link connected before this Sync existed
            self._on_connect(True)

    def notify(self) -> None:
        """Look at the outbox now rather than at the next poll (cheap; never blocks)."""
        with self._cond:
            self._wake = True
            self._cond.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread, settle acks that arrive within a second, publish the offline status (if connected).

        The link stays up; stop it afterwards (a clean disconnect, so the broker drops the will).
        """
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        deadline = time.monotonic() + min(1.0, timeout)
        for batch in list(self._inflight):
            batch.handle.wait(max(0.0, deadline - time.monotonic()))
        try:
            self._settle()
        except LogbookError as exc:  # not marked: those rows go again after the restart
            log.error("could not mark the last acknowledged batches synced: %s", exc)
        if self.link.connected:
            stamp = {"ts": time.time()}
            handle = self.link.publish(
                self._status_topic,
                offline_payload(self.fleet, self.device, "stopped", **stamp),
                qos=1,
                retain=True,
                properties={"content_type": CONTENT_TYPE},
            )
            if not handle.wait(timeout):
                log.warning("the offline status was not acknowledged within %.1f s", timeout)

    def stats(self) -> dict[str, Any]:
        """Batches and records acknowledged, batches in flight and failed, time of the last ack."""
        inflight = list(self._inflight)
        return {
            **self._counts,
            "inflight_batches": len(inflight),
            "inflight_records": sum(len(b.seqs) for b in inflight),
            "last_ack": self._last_ack,
            "connected": self.link.connected,
            "running": self._thread is not None and self._thread.is_alive(),
        }

    # --- status -----------------------------------------------------------------------------------

    def _on_connect(self, session_present: bool) -> None:
        """Birth message (network thread): retained online status with what the service reports."""
        if self._closing:
            return
        extra: Mapping[str, Any] = {}
        if self._status is not None:
            try:
                extra = self._status()
            except Exception:  # the birth must go out even if the service's status callable has a bug
                log.exception("the status callable failed; publishing a minimal birth message")
        body = {**extra, "online": True, "device": self.device, "fleet": self.fleet, "ts": time.time()}
        self.link.publish(
            self._status_topic, _json(body), qos=1, retain=True, properties={"content_type": CONTENT_TYPE}
        )
        self._counts["births"] += 1
        self.notify()

    # --- the edge-sync thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._wake and not self._closing:
                    wait = self.poll_interval_s
                    if self._due:
                        wait = min(wait, max(0.0, self._due - time.monotonic()))
                    self._cond.wait(wait)
                self._wake = False
                if self._closing:
                    return
            self._due = 0.0  # a held-back batch is due once; _fill sets it again if it holds one back again
            try:
                self._settle()
                if self.link.connected and time.monotonic() >= self._retry_at:
                    self._fill()
            except LogbookError as exc:  # the writer is failing: nothing is marked, so nothing is lost; retry
                log.error("sync paused: %s; retrying in %.1f s", exc, self.retry_delay_s)
                self._retry_at = time.monotonic() + self.retry_delay_s

    def _settle(self) -> None:
        """Mark acknowledged batches synced; free failed ones for a later retry."""
        done = [b for b in self._inflight if b.handle.done]
        if not done:
            return
        acked = [b for b in done if b.handle.acked]
        for batch in acked:
            self.logbook.mark_synced(batch.seqs, table=batch.table)
        self._inflight = [b for b in self._inflight if not b.handle.done]
        for batch in done:
            if batch.handle.acked:
                self._counts["batches_acked"] += 1
                self._counts["records_acked"] += len(batch.seqs)
            else:
                self._counts["batches_failed"] += 1
                log.warning("batch of %d %s not delivered: %s", len(batch.seqs), batch.table, batch.handle.reason)
                if "refused" in (batch.handle.reason or ""):
                    self._retry_at = time.monotonic() + self.retry_delay_s
        if acked:
            self._last_ack = time.time()
            self.logbook.flush(_FLUSH_TIMEOUT_S)  # a kill after this re-sends only batches still in flight

    def _fill(self) -> None:
        """Publish new batches while fewer than half of the in-flight slots are taken (or none are).

        A partial batch goes out only when nothing is in flight and ``linger_s`` has passed since the last
        partial one: a quiet device sends a record at once, a busy one sends fewer, fuller batches (each
        ack costs a commit) while its records wait at most ``linger_s`` longer.
        """
        free = self.max_inflight - len(self._inflight)
        if free <= 0 or (self._inflight and free < (self.max_inflight + 1) // 2):
            return
        busy = {s for b in self._inflight for s in b.seqs}
        records = [r for r in self.logbook.pending(free * self.batch_size + len(busy)) if r.seq not in busy]
        chunks = _chunks(records, self.batch_size)[:free]
        now = time.monotonic()
        if self._inflight or now < self._partial_at:
            full = [c for c in chunks if len(c[1]) >= self.batch_size]
            if len(full) < len(chunks) and not self._inflight:
                self._due = self._partial_at  # nothing in flight to wake us: wake when the linger is over
            chunks = full
        for table, chunk in chunks:
            if len(chunk) < self.batch_size:
                self._partial_at = now + self.linger_s
            self._publish(table, chunk)

    def _publish(self, table: str, records: list[OutboxRecord]) -> None:
        payload = encode_batch(self.fleet, self.device, table, records, compress=self.compress)
        props: dict[str, Any] = {"content_type": CONTENT_TYPE}
        if self.compress:
            props["user_properties"] = {"encoding": "zlib"}
        handle = self.link.publish(self._topics[table], payload, qos=1, properties=props)
        self._inflight.append(_Batch(table, [r.seq for r in records], handle))
        handle.add_done_callback(lambda _: self.notify())


def _chunks(records: list[OutboxRecord], size: int) -> list[tuple[str, list[OutboxRecord]]]:
    """Records grouped per table into chunks of at most ``size``, ordered by their first seq."""
    per_table: dict[str, list[list[OutboxRecord]]] = {}
    for record in records:
        chunks = per_table.setdefault(record.table, [[]])
        if len(chunks[-1]) >= size:
            chunks.append([])
        chunks[-1].append(record)
    ordered = [(table, chunk) for table, chunks in per_table.items() for chunk in chunks]
    return sorted(ordered, key=lambda item: item[1][0].seq)
