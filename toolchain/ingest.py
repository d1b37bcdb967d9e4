"""The ingest worker: device batches from MQTT shared subscriptions into SQLite, each (device, seq) once.

Devices publish their logbook in batches (:mod:`runtime.sync`): one QoS 1 message per batch on
``edge/<fleet>/<device>/{inferences,metrics,events}``, a JSON object
``{"v": 1, "device", "fleet", "table", "records": [{"seq", "ts", …fields}]}``, optionally
zlib-compressed. Delivery is at-least-once, so the same record can arrive twice (a batch
republished after a lost PUBACK, a device killed before it marked rows synced). The database
keeps one row per ``(device, seq)``: a primary key plus ``INSERT OR IGNORE``, so a duplicate
costs one index probe and is counted, never stored.

Several workers split the load with one MQTT 5 shared subscription group
(``$share/<group>/edge/<fleet>/+/<table>``): the broker hands each message to one member.
Each worker keeps a persistent session under its own client id, so messages published
while it is down wait in the broker. Mosquitto 2.0 keeps handing a share of the messages to a
member that is offline with a live session (they wait there until it comes back or the session
expires, ``--session-expiry``): to retire a worker for good, run it once more with
``--session-expiry 0`` so it drains its queue and its session ends when it stops.

Every message is stored in one transaction *inside* the message callback: paho sends the PUBACK
only after the callback returns, so a batch is acknowledged to the broker only once its rows
are committed; a worker killed between its commit and the PUBACK gets the batch again, and the
primary key drops it.

Schema (``PRAGMA user_version`` = 1)::

    inferences(device, seq, ts, model, model_version, input_ref, input_digest, latency_ms, result JSON, received_at)
    metrics   (device, seq, ts, name, value, labels JSON, received_at)
    events    (device, seq, ts, kind, level, message, data JSON, received_at)
    devices   (device, fleet, first_seen, last_seen, records)
    -- primary key (device, seq) on the three record tables; one database per fleet

The topic names the device (a broker ACL lets a device publish only under its own topics), so
a batch whose body claims another device, fleet or table is rejected, as is anything that is
not a batch; rejections are counted and logged, never raised.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.sync import BatchError
from toolchain.errors import ToolchainError, UsageError

if TYPE_CHECKING:
    from runtime.link import LinkConfig, Message

__all__ = ["FIELDS", "SCHEMA_VERSION", "TABLES", "Batch", "Ingest", "IngestStore", "decode_batch"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
TABLES = ("inferences", "metrics", "events")

#: Fields each record carries besides ``seq`` and ``ts`` (the device logbook's columns).
FIELDS: dict[str, tuple[str, ...]] = {
    "inferences": ("model", "model_version", "input_ref", "input_digest", "latency_ms", "result"),
    "metrics": ("name", "value", "labels"),
    "events": ("kind", "level", "message", "data"),
}
_JSON_FIELDS = frozenset({"result", "labels", "data"})
_TYPES: dict[str, type] = {"latency_ms": float, "value": float}
_MAX_SEQ = 2**63 - 1  # SQLite's INTEGER


@dataclass(frozen=True)
class Batch:
    """A decoded batch: the publishing device, its fleet, the table and the records (``seq``, ``ts``, fields)."""

    device: str
    fleet: str
    table: str
    records: list[dict[str, Any]]


def decode_batch(payload: bytes, *, device: str, fleet: str, table: str) -> Batch:
    """Decode one batch published on ``edge/<fleet>/<device>/<table>``; BatchError if it is not one.

    The wire format is :mod:`runtime.sync`'s (:func:`runtime.sync.decode_batch`: JSON or a zlib
    stream, told apart by the first byte, so MQTT 3.1.1 publishers need no properties); on top of
    it the body must name the device, fleet and table of its topic.
    """
    from runtime.sync import decode_batch as decode_wire

    doc = decode_wire(payload)
    for key, expected in (("device", device), ("fleet", fleet), ("table", table)):
        if doc.get(key) != expected:
            raise BatchError(f"batch field {key!r} is {doc.get(key)!r} but the topic says {expected!r}")
    return Batch(device, fleet, table, doc["records"])


def _column_value(field: str, value: Any) -> Any:
    if field in _JSON_FIELDS:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    kind = _TYPES.get(field)
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if value is None or isinstance(value, str | int | float):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _row(batch: Batch, record: Any, received_at: float) -> tuple[Any, ...] | None:
    """The row for one record, or None if it lacks a usable seq/ts (or holds NaN/inf in JSON)."""
    if not isinstance(record, dict):
        return None
    seq, ts = record.get("seq"), record.get("ts")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= _MAX_SEQ:
        return None
    if not isinstance(ts, int | float) or isinstance(ts, bool) or not math.isfinite(ts):
        return None
    try:
        fields = tuple(_column_value(f, record.get(f)) for f in FIELDS[batch.table])
    except (ValueError, TypeError, RecursionError):
        return None
    return (batch.device, seq, float(ts), *fields, received_at)


class IngestStore:
    """The ingest SQLite file (WAL): one row per ``(device, seq)`` in each record table, plus ``devices``.

    Thread-safe: one connection guarded by a lock, so the MQTT callback thread can write.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
        except sqlite3.Error as exc:
            raise UsageError(f"cannot open {self.path}: {exc}", flag="--db") from exc
        self._lock = threading.Lock()
        try:
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise UsageError(f"{self.path} is not a usable ingest database ({exc}); move it away", flag="--db") from exc
        self._insert = {
            t: f"INSERT OR IGNORE INTO {t} (device, seq, ts, {', '.join(FIELDS[t])}, received_at) "
            f"VALUES ({', '.join('?' * (len(FIELDS[t]) + 4))})"
            for t in TABLES
        }

    def _migrate(self) -> None:
        found = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
        if found == SCHEMA_VERSION:
            return
        if found != 0:
            raise UsageError(
                f"{self.path} has ingest schema version {found}, this toolchain knows {SCHEMA_VERSION}; "
                "upgrade the toolchain or use another --db",
                flag="--db",
            )
        from sqlite_utils import Database

        db = Database(self._conn, execute_plugins=False)
        kinds: dict[str, type] = {"latency_ms": float, "value": float}
        with db.atomic():
            for table in TABLES:
                columns: dict[str, type] = {"device": str, "seq": int, "ts": float}
                columns |= {f: kinds.get(f, str) for f in FIELDS[table]}
                columns["received_at"] = float
                db.table(table).create(
                    columns, pk=("device", "seq"), not_null={"device", "seq", "ts", "received_at"}, if_not_exists=True
                )
                db.table(table).create_index(["ts"], if_not_exists=True)
            db.table("devices").create(
                {"device": str, "fleet": str, "first_seen": float, "last_seen": float, "records": int},
                pk="device",
                if_not_exists=True,
            )
            self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def store(self, batch: Batch, received_at: float | None = None) -> tuple[int, int, int]:
        """Store a batch in one transaction; return (stored, duplicates, rejected records)."""
        now = time.time() if received_at is None else received_at
        rows = [_row(batch, r, now) for r in batch.records]
        good = [r for r in rows if r is not None]
        with self._lock:
            before = self._conn.total_changes
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(self._insert[batch.table], good)
                stored = self._conn.total_changes - before
                self._conn.execute(
                    "INSERT INTO devices (device, fleet, first_seen, last_seen, records) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT(device) DO UPDATE SET last_seen = excluded.last_seen, "
                    "records = records + excluded.records, fleet = excluded.fleet",
                    (batch.device, batch.fleet, now, now, stored),
                )
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
        return stored, len(good) - stored, len(rows) - len(good)

    def counts(self) -> dict[str, int]:
        """Rows per record table."""
        with self._lock:
            return {t: int(self._conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in TABLES}

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            self._conn.close()


class Ingest:
    """One ingest worker: ``run(stop_event)`` consumes until the event is set; ``stats()`` at any time."""

    def __init__(self, db_path: str | Path, link_cfg: LinkConfig, fleet: str, share_group: str = "ingest") -> None:
        from runtime.topics import validate_segment

        validate_segment(fleet, "fleet")
        validate_segment(share_group, "share_group")
        self.db_path = Path(db_path)
        self.link_cfg = link_cfg
        self.fleet = fleet
        self.share_group = share_group
        self._lock = threading.Lock()
        self._stats = dict.fromkeys(("messages", "records", "stored", "duplicates", "rejected", "errors"), 0)
        self._store: IngestStore | None = None
        self._failed: BaseException | None = None
        self._stop = threading.Event()
        self._parked = threading.Event()  # never set: see _fail

    def topic_filters(self) -> list[str]:
        """The shared-subscription filters this worker subscribes to (``$share/<group>/edge/<fleet>/+/<table>``)."""
        from runtime.topics import fleet_filter, shared

        return [shared(fleet_filter(self.fleet, table), self.share_group) for table in TABLES]

    def stats(self) -> dict[str, int]:
        """Counters: messages, records, stored, duplicates, rejected (messages and records), errors."""
        with self._lock:
            return dict(self._stats)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for key, delta in deltas.items():
                self._stats[key] += delta

    def handle(self, msg: Message) -> None:
        """Store one message; runs on the MQTT thread, and paho sends the PUBACK when it returns."""
        from runtime.topics import parse_topic

        info = parse_topic(msg.topic)
        if info is None or info.fleet != self.fleet or info.kind not in TABLES or not info.device:
            self._count(messages=1, rejected=1)
            log.warning("ignored a message on %r: not a data topic of fleet %r", msg.topic, self.fleet)
            return
        try:
            batch = decode_batch(msg.payload, device=info.device, fleet=self.fleet, table=info.kind)
        except BatchError as exc:
            self._count(messages=1, rejected=1)
            log.warning("rejected a batch on %s: %s", msg.topic, exc)
            return
        store = self._store
        assert store is not None, "handle() runs only while run() is running"
        try:
            stored, duplicates, rejected = store.store(batch)
        except sqlite3.Error as exc:
            self._fail(exc)
            return
        self._count(messages=1, records=len(batch.records), stored=stored, duplicates=duplicates, rejected=rejected)
        if rejected:
            log.warning("%s: %d record(s) without a usable seq/ts dropped", msg.topic, rejected)

    def _fail(self, exc: BaseException) -> None:
        """A batch that cannot be stored must not be acknowledged: stop the worker and park this thread.

        Returning would let paho send the PUBACK, and the device would never send the batch again.
        The parked (daemon) network thread sends nothing more; the broker keeps the message in
        this worker's session and delivers it after a restart.
        """
        log.error("%s: cannot store a batch: %s; stopping without acknowledging it", self.db_path, exc)
        self._count(errors=1)
        self._failed = exc
        self._stop.set()
        self._parked.wait()

    def run(
        self,
        stop_event: threading.Event,
        *,
        connect_timeout: float = 10.0,
        on_ready: Callable[[], None] | None = None,
    ) -> dict[str, int]:
        """Subscribe and store until ``stop_event`` is set; return :meth:`stats`.

        ``on_ready()`` is called once the broker has granted the shared subscriptions. Not being
        connected after ``connect_timeout`` is only logged (the link keeps retrying with backoff).
        A database that cannot be written stops the worker with a ToolchainError.
        """
        from runtime.link import Link

        self._store = IngestStore(self.db_path)
        link = Link(self.link_cfg)
        watcher = threading.Thread(target=self._relay, args=(stop_event,), name="edge-ingest-stop", daemon=True)
        try:
            for topic_filter in self.topic_filters():
                link.subscribe(topic_filter, self.handle, qos=1)
            link.start()
            watcher.start()
            deadline = time.monotonic() + connect_timeout
            if all(link.wait_subscribed(f, max(0.0, deadline - time.monotonic())) for f in self.topic_filters()):
                log.info("subscribed to %s", ", ".join(self.topic_filters()))
                if on_ready is not None:
                    on_ready()
            else:
                cfg = self.link_cfg
                log.warning("not subscribed at %s:%d after %.0f s; still trying", cfg.host, cfg.port, connect_timeout)
            self._stop.wait()
        finally:
            link.stop(timeout=1.0 if self._failed is not None else 5.0)
            store, self._store = self._store, None
            if self._failed is None:
                store.close()
        if self._failed is not None:
            raise ToolchainError(
                f"{self.db_path}: cannot store batches ({self._failed}); the batch that failed stays with "
                "the broker for the next run — fix the database (disk space, permissions) and restart"
            ) from self._failed
        return self.stats()

    def _relay(self, stop_event: threading.Event) -> None:
        """Turn the caller's stop event into ours (which a storage failure also sets)."""
        while not self._stop.is_set():
            if stop_event.wait(0.2):
                self._stop.set()
