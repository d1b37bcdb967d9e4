"""The on-device log: inferences, metrics and events in SQLite, written by one thread, bounded on disk.

One writer thread (``edge-logbook``) owns the only write connection; a second writer on the same
file, in this process or another, is refused (``flock`` on ``<path>.lock``). ``record_*`` give a
record its per-device sequence number at once and queue it; the writer commits every
``flush_interval_s`` or ``batch_size`` records, whichever comes first, and callers block while
``4 × batch_size`` records wait, so a kill -9 loses at most one flush interval of records even
under overload. With ``durable=True`` a ``record_*`` call returns only once its record is committed
(group commit: one transaction for whatever is queued, then every waiter wakes). The journal is a
WAL with ``synchronous=NORMAL`` by default: a commit survives the process dying at any instant,
while a power cut may lose the last commits (the file stays consistent); ``synchronous="full"``
fsyncs every commit, so commits also survive power loss, at one fsync per commit. A failed commit
is logged and retried with its records kept queued; ``close()`` tries once more and raises if
records could not be written. A row the database refuses (a constraint broken by something else
writing the file) is never retried: the rest of its batch is committed and the row is named in a
``logbook.rejected`` event and counted in ``stats()["rejected"]``.

Sync state is a ``synced`` flag per row (see :mod:`runtime.logbook_schema`); ``pending()`` and
``mark_synced()`` are the MQTT sync's outbox. With ``outbox=False`` rows are stored as synced.

Disk use is bounded. After each commit the writer checks the file size, allowing for one more
commit of the size of the last one: past ``soft_cap_mb`` it deletes the oldest synced rows, past
``hard_cap_mb`` the oldest unsynced ones too, and records that drop as a ``logbook.dropped`` event
(counts and seq range) and in ``stats()["dropped"]``. Freed pages go back to the file system
(``auto_vacuum=INCREMENTAL``), so the database file stays under the hard cap; its WAL comes on top,
kept near 1/32 of the hard cap (plus the last commit or trim until the next checkpoint).
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import itertools
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from runtime.errors import ConfigError, LogbookError
from runtime.logbook_schema import (
    COLUMNS,
    INSERT,
    JSON_COLUMNS,
    SCHEMA_VERSION,
    TABLES,
    check_number,
    check_sqlite_file,
    check_text,
    decode_row,
    disk_bytes,
    encode_json,
    open_database,
    pragma,
    used_bytes,
    user_version,
)

__all__ = ["Logbook", "LogbookConfig", "LogbookReader", "OutboxRecord", "open_readonly"]

logger = logging.getLogger(__name__)

_MB = 1024 * 1024
_LEVELS = frozenset({"debug", "info", "warning", "error", "critical"})
_BUSY_TIMEOUT_S = 1.0  # only an operator's sqlite3 shell competes with the writer; a failed commit is retried
_WAIT_S = 30.0  # a caller blocked this long by a writer that cannot commit gets an error instead
_RETRY_MAX_S = 5.0
_DELETE_BATCH = 5000  # most rows deleted per step when trimming to a cap
_HEADROOM = 0.02  # a cap trims to 98 % of itself, so it does not trim again on the next commit
_EXPORT_PAGE = 1000
_Item = tuple[str, tuple[Any, ...]]  # (table, row); table "" carries (table or "", *seqs) to mark synced


@dataclass(frozen=True)
class LogbookConfig:
    """Where the log lives, how often it commits, how durable a record is, and how much disk it may use."""

    path: Path
    flush_interval_s: float = 0.5  # longest a returned record waits for its commit (what kill -9 may lose)
    batch_size: int = 500  # commit sooner once this many records are queued
    durable: bool = False  # record_* returns after its commit: kill -9 loses nothing that returned
    synchronous: Literal["normal", "full"] = "normal"  # "full": fsync each commit, survives power loss too
    soft_cap_mb: float = 256.0  # past this, the oldest synced rows are deleted
    hard_cap_mb: float = 512.0  # past this, the oldest unsynced rows too; the drop is logged as an event
    outbox: bool = True  # False: no sync configured, every row counts as synced

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        checks = (
            ("flush_interval_s", self.flush_interval_s > 0, "must be > 0"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("synchronous", self.synchronous in ("normal", "full"), 'must be "normal" or "full"'),
            ("soft_cap_mb", self.soft_cap_mb > 0, "must be > 0"),
            ("hard_cap_mb", self.hard_cap_mb >= self.soft_cap_mb, "must be >= soft_cap_mb"),
        )
        for key, ok, rule in checks:
            if not ok:
                raise ConfigError(f"{rule}, got {getattr(self, key)!r}", key=f"logbook.{key}")


@dataclass(frozen=True)
class OutboxRecord:
    """An unsynced record: its sequence number, table, timestamp, and the record as wire JSON.

    ``wire`` is ``{"seq": …, "ts": …, <fields>}`` as compact UTF-8 JSON, built from the stored row
    without decoding its JSON columns (the sync pastes it into a batch as it is).
    """

    seq: int
    table: str
    ts: float
    wire: str

    @classmethod
    def of(cls, seq: int, table: str, ts: float, payload: Mapping[str, Any]) -> OutboxRecord:
        """A record from decoded fields (for tests and benchmarks that make records without a logbook)."""
        return cls(seq, table, ts, _WIRE_ENCODE({"seq": seq, "ts": ts, **payload}))

    @property
    def payload(self) -> dict[str, Any]:
        """The record's fields, JSON columns decoded (without ``seq`` and ``ts``)."""
        fields: dict[str, Any] = json.loads(self.wire)
        del fields["seq"], fields["ts"]
        return fields


class LogbookReader:
    """Read-only access to a logbook file: safe from any thread, and from another process while a writer runs.

    Every call opens its own short-lived read-only connection, so readers never block the
    writer and never hold a WAL snapshot between calls. :meth:`pending`, which the sync calls for
    every batch, keeps one connection per thread open instead (outside a statement it holds no
    snapshot either; opening one costs more than the query); :meth:`close` closes those.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise LogbookError("no logbook here; start `edge-runtime serve` to create it", path=self.path)
        check_sqlite_file(self.path)
        self._uri = self.path.resolve().as_uri() + "?mode=ro"
        self._kept = threading.local()
        self._kept_lock = threading.Lock()
        self._kept_all: list[sqlite3.Connection] = []
        with self._connect() as conn:
            found = user_version(conn)
        if found == 0:
            raise LogbookError("not a logbook (no schema); start `edge-runtime serve` to create one", path=self.path)
        if found != SCHEMA_VERSION:
            newer = "a newer edge-runtime" if found > SCHEMA_VERSION else "an older edge-runtime"
            raise LogbookError(
                f"schema version {found} was written by {newer} (this one reads {SCHEMA_VERSION}); "
                "`edge-runtime serve` migrates an older file when it starts",
                path=self.path,
            )

    @contextlib.contextmanager
    def _connect(self, *, keep: bool = False) -> Iterator[sqlite3.Connection]:
        """A read-only connection; ``keep``: this thread's kept one (reopened after an error)."""
        conn = getattr(self._kept, "conn", None) if keep else None
        if conn is None:
            try:
                conn = sqlite3.connect(self._uri, uri=True, timeout=_BUSY_TIMEOUT_S, check_same_thread=False)
            except sqlite3.Error as exc:
                raise LogbookError(f"cannot open for reading: {exc}", path=self.path) from exc
            if keep:
                self._kept.conn = conn
                with self._kept_lock:
                    self._kept_all.append(conn)
        failed = True
        try:
            yield conn
            failed = False
        except sqlite3.DatabaseError as exc:
            raise LogbookError(f"cannot read: {exc}", path=self.path) from exc
        finally:
            if not keep:
                conn.close()
            elif failed:
                self._kept.conn = None
                conn.close()

    def close(self) -> None:
        """Close the connections :meth:`pending` kept open (a later call opens a new one)."""
        with self._kept_lock:
            kept, self._kept_all = self._kept_all, []
        for conn in kept:
            conn.close()
        self._kept = threading.local()

    def tail(self, n: int = 20, *, table: str = "inferences") -> list[dict[str, Any]]:
        """The last ``n`` rows of ``table``, oldest first."""
        columns = COLUMNS[_table(table)]
        with self._connect() as conn:
            rows = conn.execute(
                f"SELECT {', '.join(columns)} FROM {table} ORDER BY seq DESC LIMIT ?", (max(0, n),)
            ).fetchall()
        return [decode_row(columns, row) for row in reversed(rows)]

    def export(
        self, *, since: float | None = None, tables: Sequence[str] = ("inferences", "metrics", "events")
    ) -> Iterator[dict[str, Any]]:
        """Rows of ``tables`` with ``ts >= since``, each with a ``"table"`` key, in ``seq`` order.

        Reads in pages and holds no connection between them, so a slow or abandoned consumer
        neither blocks WAL checkpoints nor leaks a connection.
        """
        pages = [self._pages(_table(t), since) for t in tables]
        return heapq.merge(*pages, key=lambda row: int(row["seq"]))

    def _pages(self, table: str, since: float | None) -> Iterator[dict[str, Any]]:
        columns = COLUMNS[table]
        where = "seq > ?" + ("" if since is None else " AND ts >= ?")
        sql = f"SELECT {', '.join(columns)} FROM {table} WHERE {where} ORDER BY seq LIMIT {_EXPORT_PAGE}"
        last = 0
        while True:
            with self._connect() as conn:
                rows = conn.execute(sql, (last,) if since is None else (last, since)).fetchall()
            for row in rows:
                yield {"table": table, **decode_row(columns, row)}
            if len(rows) < _EXPORT_PAGE:
                return
            last = rows[-1][0]

    def pending(self, limit: int = 500) -> list[OutboxRecord]:
        """Up to ``limit`` unsynced records of all tables, in ``seq`` order."""
        per_table = []
        with self._connect(keep=True) as conn:
            for table in TABLES:
                plain, raw = _WIRE_COLUMNS[table]
                rows = conn.execute(
                    f"SELECT {', '.join((*plain, *raw))} FROM {table} WHERE synced = 0 ORDER BY seq LIMIT ?", (limit,)
                ).fetchall()
                per_table.append([(row[0], table, row) for row in rows])
        merged = itertools.islice(heapq.merge(*per_table), max(0, limit))
        return [OutboxRecord(seq, table, float(row[1]), _wire(table, row)) for seq, table, row in merged]

    def stats(self) -> dict[str, Any]:
        """Rows per table, unsynced rows, bytes on disk and in use, rows dropped unsynced, last seq and commit."""
        with self._connect() as conn:
            rows = {t: int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in TABLES}
            unsynced = sum(
                int(conn.execute(f"SELECT count(*) FROM {t} WHERE synced = 0").fetchone()[0]) for t in TABLES
            )
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            used = used_bytes(conn)
        last_commit = meta.get("last_commit")
        return {
            "path": str(self.path),
            "device_id": meta.get("device_id"),
            "schema_version": SCHEMA_VERSION,
            "rows": rows,
            "unsynced": unsynced,
            "db_bytes": disk_bytes(self.path),
            "used_bytes": used,
            "dropped": int(meta.get("dropped_rows", 0)),
            "last_seq": int(meta["next_seq"]) - 1,
            "last_commit": float(last_commit) if last_commit is not None else None,
        }


def open_readonly(path: str | Path) -> LogbookReader:
    """A reader for a logbook that a running service may be writing (no writer thread, no migration)."""
    return LogbookReader(path)


class Logbook:
    """The device's log: ``record_*`` from any thread, one writer thread, reads through :class:`LogbookReader`."""

    def __init__(self, config: LogbookConfig, *, device_id: str) -> None:
        if not isinstance(device_id, str) or not device_id:
            raise LogbookError(f"device_id must be a non-empty string, got {device_id!r}", path=config.path)
        self.config = config
        self.path = config.path
        self.device_id = device_id
        self._lock = threading.Lock()
        self._writer_wake = threading.Condition(self._lock)
        self._caller_wake = threading.Condition(self._lock)
        self._items: list[_Item] = []
        self._first_at = 0.0  # monotonic time the oldest queued item arrived
        self._urgent = False
        self._closing = False
        self._stopped = False
        self._enqueued = 0  # items ever queued; an item's ticket is its position in this count
        self._committed = 0  # items ever committed (commits go in queue order)
        self._marking: set[int] = set()  # seqs whose mark_synced is queued, hidden from pending()
        self._failure: BaseException | None = None
        self._last_error: str | None = None
        self._lost = 0
        self._rejected = 0  # rows the database refused (constraint violations), set aside
        self._max_queued = max(4 * config.batch_size, 1000)
        self._synced = 0 if config.outbox else 1
        self._last_commit: float | None = None
        check_sqlite_file(self.path)
        self._lock_fd = _take_writer_lock(self.path)
        try:
            self._conn = open_database(
                self.path, synchronous=config.synchronous, wal_bytes=_wal_bytes(config), busy_timeout_s=_BUSY_TIMEOUT_S
            )
        except BaseException:
            os.close(self._lock_fd)
            raise
        try:
            self._next_seq, self._dropped = _load_meta(self._conn, device_id, self.path)
            self._page_size = pragma(self._conn, "page_size")
            self._pages = pragma(self._conn, "page_count")  # file size after the last cap check
            self._reader = LogbookReader(self.path)
        except BaseException:
            self._conn.close()
            os.close(self._lock_fd)
            raise
        self._stored_next = self._next_seq
        self._thread = threading.Thread(target=self._run, name="edge-logbook", daemon=True)
        self._thread.start()

    def __enter__(self) -> Logbook:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # --- recording (any thread) ---------------------------------------------------------------

    def record_inference(
        self,
        *,
        model: str,
        version: str,
        input_ref: str,
        latency_ms: float,
        result: Mapping[str, Any],
        input_digest: str | None = None,
        ts: float | None = None,
    ) -> int:
        """Queue one inference result; return its sequence number."""
        fields = (
            check_text(model, "model"),
            check_text(version, "version"),
            check_text(input_ref, "input_ref"),
            None if input_digest is None else check_text(input_digest, "input_digest"),
            check_number(latency_ms, "latency_ms"),
            encode_json(result, "result"),
        )
        return self._append("inferences", ts, fields)

    def record_metric(
        self, name: str, value: float, *, labels: Mapping[str, str] | None = None, ts: float | None = None
    ) -> int:
        """Queue one metric sample; return its sequence number."""
        fields = (
            check_text(name, "name"),
            check_number(value, f"metric {name!r} value"),
            encode_json(labels, "labels"),
        )
        return self._append("metrics", ts, fields)

    def record_event(
        self,
        kind: str,
        message: str,
        *,
        data: Mapping[str, Any] | None = None,
        level: str = "info",
        ts: float | None = None,
    ) -> int:
        """Queue one event (``level`` is a logging level name); return its sequence number."""
        if level not in _LEVELS:
            raise LogbookError(f"event level must be one of {sorted(_LEVELS)}, got {level!r}", path=self.path)
        fields = (check_text(kind, "kind"), level, check_text(message, "message"), encode_json(data, "data"))
        return self._append("events", ts, fields)

    def mark_synced(self, seqs: Iterable[int], *, table: str | None = None) -> None:
        """Queue marking these records synced (the writer applies it); they leave :meth:`pending` at once.

        ``table``: all of ``seqs`` are rows of that table (one update per record instead of one per table).
        """
        marked = tuple(int(s) for s in seqs)
        if not marked or not self.config.outbox:
            return
        where = "" if table is None else _table(table)
        with self._lock:
            self._enqueue(("", (where, *marked)))
            self._marking.update(marked)

    def flush(self, timeout: float | None = None) -> None:
        """Block until everything queued so far is committed (LogbookError after ``timeout`` seconds)."""
        with self._lock:
            target = self._enqueued
            if self._committed >= target:
                return
            self._urgent = True
            self._writer_wake.notify()
            self._wait(lambda: self._committed >= target, timeout, "flush")

    def close(self) -> None:
        """Commit what is queued, stop the writer thread and close the file."""
        with self._lock:
            already = self._closing
            self._closing = True
            self._writer_wake.notify()
        if already:
            self._thread.join()
            return
        self._thread.join()
        self._reader.close()
        os.close(self._lock_fd)
        if self._lost:
            raise LogbookError(
                f"{self._lost} queued records could not be written ({self._last_error}); "
                "check free disk space and file permissions",
                path=self.path,
            )

    def _append(self, table: str, ts: float | None, fields: tuple[Any, ...]) -> int:
        stamp = time.time() if ts is None else check_number(ts, "ts")
        with self._lock:
            self._room()  # may wait, releasing the lock: take the seq only after it
            seq = self._next_seq
            self._next_seq += 1
            self._enqueue((table, (seq, stamp, *fields, self._synced)))
            if self.config.durable:
                ticket = self._enqueued
                self._wait(lambda: self._committed >= ticket, _WAIT_S, f"committing record {seq}")
        return seq

    def _room(self) -> None:
        """Wait (lock held, released while waiting) until the queue has room (the writer is behind or failing)."""
        while True:
            if self._closing or self._stopped:
                raise LogbookError("the logbook is closed", path=self.path)
            if len(self._items) < self._max_queued:
                return
            self._wait(lambda: len(self._items) < self._max_queued or self._closing, _WAIT_S, "queueing a record")

    def _enqueue(self, item: _Item) -> None:
        """Append under the lock, after waiting for room."""
        self._room()
        self._items.append(item)
        self._enqueued += 1
        n = len(self._items)
        if n == 1:
            self._first_at = time.monotonic()
        if n == 1 or n == self.config.batch_size or self.config.durable:
            self._writer_wake.notify()

    def _wait(self, done: Callable[[], bool], timeout: float | None, what: str) -> None:
        """Wait (lock held) until ``done()``; fail if the writer died or ``timeout`` passes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            if self._failure is not None or self._stopped:
                raise LogbookError(f"{what}: the writer stopped ({self._failure or self._last_error})", path=self.path)
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise LogbookError(
                    f"{what} timed out after {timeout:g} s (last write error: {self._last_error or 'none'})",
                    path=self.path,
                )
            self._caller_wake.wait(remaining)

    # --- reading --------------------------------------------------------------------------------

    def tail(self, n: int = 20, *, table: str = "inferences") -> list[dict[str, Any]]:
        """The last ``n`` committed rows of ``table``, oldest first."""
        return self._reader.tail(n, table=table)

    def export(
        self, *, since: float | None = None, tables: Sequence[str] = ("inferences", "metrics", "events")
    ) -> Iterator[dict[str, Any]]:
        """Committed rows with ``ts >= since``, each with a ``"table"`` key, in ``seq`` order."""
        return self._reader.export(since=since, tables=tables)

    def pending(self, limit: int = 500) -> list[OutboxRecord]:
        """Up to ``limit`` committed, unsynced records in ``seq`` order (for the MQTT sync)."""
        with self._lock:
            marking = set(self._marking)
        records = self._reader.pending(limit + len(marking))
        return [r for r in records if r.seq not in marking][: max(0, limit)]

    def stats(self) -> dict[str, Any]:
        """:meth:`LogbookReader.stats` plus records still queued and the writer's last error."""
        stats = self._reader.stats()
        with self._lock:
            stats["queued"] = len(self._items)
            stats["rejected"] = self._rejected
            stats["last_error"] = self._last_error
            if self._last_commit is not None:
                stats["last_commit"] = self._last_commit
        return stats

    # --- the writer thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                items, closing = self._take()
                if items and not self._commit(items):
                    with self._lock:  # close() gave up on a failing file: count what is left as lost
                        self._lost += sum(1 for table, _ in self._items if table)
                        self._items = []
                    return
                if items:
                    self._enforce_caps()
                if closing and not items:
                    return
        except BaseException as exc:
            with self._lock:
                self._failure = exc
            raise
        finally:
            with self._lock:
                self._stopped = True
                self._caller_wake.notify_all()
            self._conn.close()

    def _take(self) -> tuple[list[_Item], bool]:
        """Wait until a commit is due, then take up to a batch of what is queued (all of it when durable)."""
        batch, interval = self.config.batch_size, self.config.flush_interval_s
        with self._lock:
            while not self._closing:
                n = len(self._items)
                if n and (self._urgent or self.config.durable or n >= batch):
                    break
                timeout = None
                if n:
                    timeout = self._first_at + interval - time.monotonic()
                    if timeout <= 0:
                        break
                self._writer_wake.wait(timeout)
            if self.config.durable or len(self._items) <= batch:
                items, self._items = self._items, []  # group commit: everything queued, every waiter wakes
            else:  # a transaction stays one batch, so the disk cap is checked at least once per batch
                items, self._items = self._items[:batch], self._items[batch:]
            self._urgent = bool(self._urgent and self._items)
            self._caller_wake.notify_all()
            return items, self._closing

    def _commit(self, items: list[_Item]) -> bool:
        """Write ``items`` in one transaction, retrying on failure; False if close() came and it still failed."""
        delay = 0.05
        for attempt in itertools.count(1):
            try:
                try:
                    self._write(items)
                except sqlite3.IntegrityError as exc:  # retrying cannot help: store the rest, set those aside
                    self._salvage(items, exc)
                break
            except sqlite3.DatabaseError as exc:
                self._last_error = f"{type(exc).__name__}: {exc}"
                logger.error(
                    "%s: committing %d queued records failed (attempt %d): %s; they stay queued, retrying in %.2f s",
                    self.path,
                    len(items),
                    attempt,
                    exc,
                    delay,
                )
                with self._lock:
                    if self._closing:  # close() is waiting: that was the last try
                        self._lost += sum(1 for table, _ in items if table)
                        return False
                    self._writer_wake.wait(delay)  # close() cuts the back-off short
                delay = min(2 * delay, _RETRY_MAX_S)
        marked = [s for table, row in items if not table for s in row[1:]]
        with self._lock:
            self._committed += len(items)
            self._marking.difference_update(marked)
            self._last_commit = time.time()
            self._caller_wake.notify_all()
        return True

    def _write(self, items: list[_Item]) -> None:
        rows: dict[str, list[tuple[Any, ...]]] = {}
        marks: dict[str, list[tuple[int]]] = {}  # table ("" when not known) -> seqs to mark synced
        for table, row in items:
            if table:
                rows.setdefault(table, []).append(row)
            else:
                marks.setdefault(row[0], []).extend((s,) for s in row[1:])
        with self._transaction() as conn:
            for table, table_rows in rows.items():
                conn.executemany(INSERT[table], table_rows)
                self._stored_next = max(self._stored_next, table_rows[-1][0] + 1)
            self._apply_marks(conn, marks)
            self._write_meta(conn)

    @staticmethod
    def _apply_marks(conn: sqlite3.Connection, marks: Mapping[str, list[tuple[int]]]) -> None:
        """Set ``synced`` on the queued seqs, per table ("" when the table is not known: every table)."""
        for where, seqs in marks.items():
            for table in (where,) if where else TABLES:
                conn.executemany(f"UPDATE {table} SET synced = 1 WHERE seq = ?", seqs)

    def _salvage(self, items: list[_Item], error: sqlite3.IntegrityError) -> None:
        """Commit ``items`` row by row, leaving out rows the database refuses; record a ``logbook.rejected`` event.

        A row breaks a constraint only when something else wrote the file (another program, a restored
        backup): retrying the batch would stall the log for good, so those rows are set aside, named
        in the event and counted in ``stats()["rejected"]``.
        """
        rejected: list[tuple[str, int]] = []
        with self._transaction() as conn:
            for table, row in items:
                if not table:
                    self._apply_marks(conn, {row[0]: [(s,) for s in row[1:]]})
                    continue
                conn.execute("SAVEPOINT row")
                try:
                    conn.execute(INSERT[table], row)
                except sqlite3.IntegrityError:
                    conn.execute("ROLLBACK TO row")
                    rejected.append((table, int(row[0])))
                else:
                    self._stored_next = max(self._stored_next, int(row[0]) + 1)
                conn.execute("RELEASE row")
            if rejected:
                self._record_rejection(conn, rejected, error)
            self._write_meta(conn)
        self._rejected += len(rejected)
        logger.error(
            "%s: %d records refused by the database (%s) were set aside: %s",
            self.path,
            len(rejected),
            error,
            ", ".join(f"{t} seq {s}" for t, s in rejected[:10]),
        )

    def _record_rejection(self, conn: sqlite3.Connection, rejected: list[tuple[str, int]], error: Exception) -> None:
        """Insert the ``logbook.rejected`` event (in the salvage's transaction)."""
        message = (
            f"{len(rejected)} records were refused by the database ({error}); another program may be writing this file"
        )
        data = {"rows": len(rejected), "refused": [{"table": t, "seq": s} for t, s in rejected[:100]]}
        self._insert_event(conn, "logbook.rejected", "error", message, data)

    def _insert_event(self, conn: sqlite3.Connection, kind: str, level: str, message: str, data: Any) -> None:
        """The writer's own event, inside its current transaction, with the next seq."""
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
        conn.execute(INSERT["events"], (seq, time.time(), kind, level, message, encode_json(data, "data"), 0))
        self._stored_next = max(self._stored_next, seq + 1)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _write_meta(self, conn: sqlite3.Connection) -> None:
        conn.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            [("next_seq", str(self._stored_next)), ("last_commit", repr(time.time()))],
        )

    # --- disk caps (writer thread, after each commit) ---------------------------------------------

    def _enforce_caps(self) -> None:
        """After a commit: trim so that a next commit that grows the file as much as this one stays under the caps."""
        conn = self._conn
        try:
            pages = pragma(conn, "page_count")
            growth = max(0, pages - self._pages) * self._page_size
            self._pages = pages
            soft = self.config.soft_cap_mb * _MB - growth
            hard = self.config.hard_cap_mb * _MB - growth
            if pages * self._page_size <= soft:
                return
            if used_bytes(conn) > soft:
                self._trim(max(0.0, soft - self.config.soft_cap_mb * _MB * _HEADROOM), synced_only=self.config.outbox)
            if used_bytes(conn) > hard:
                self._trim(max(0.0, hard - self.config.hard_cap_mb * _MB * _HEADROOM), synced_only=False)
            self._vacuum()
            self._pages = pragma(conn, "page_count")
        except sqlite3.DatabaseError as exc:
            self._last_error = f"{type(exc).__name__}: {exc}"
            logger.error(
                "%s: trimming the log to its disk cap failed: %s; retrying after the next commit", self.path, exc
            )

    def _vacuum(self) -> None:
        """Give free pages back to the file system, a WAL's worth at a time so the WAL does not balloon."""
        conn, chunk = self._conn, pragma(self._conn, "wal_autocheckpoint")
        free = pragma(conn, "freelist_count")
        while free:
            conn.executescript(f"PRAGMA incremental_vacuum({chunk});")  # execute() would free one page per call
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            free, before = pragma(conn, "freelist_count"), free
            if free >= before:  # not an incremental-vacuum file after all; nothing more to give back
                break

    def _trim(self, target: float, *, synced_only: bool) -> None:
        """Delete the oldest (synced) rows until ``target`` bytes are in use; a drop of unsynced rows is logged."""
        deleted: dict[str, int] = {}
        first = last = 0
        message = ""
        batch = 64  # then sized from the bytes the previous step freed, so the trim stops near the target
        with self._transaction() as conn:
            used = used_bytes(conn)
            while used > target:
                oldest = _oldest(conn, synced_only, batch)
                if not oldest:
                    break
                first, last = first or oldest[0][0], oldest[-1][0]
                for table in TABLES:
                    upto = max((seq for seq, t in oldest if t == table), default=0)
                    if upto:
                        cur = conn.execute(
                            f"DELETE FROM {table} WHERE seq <= ?{' AND synced = 1' * synced_only}", (upto,)
                        )
                        deleted[table] = deleted.get(table, 0) + cur.rowcount
                freed, used = used - (now := used_bytes(conn)), now
                per_row = freed / len(oldest)
                batch = min(_DELETE_BATCH, max(1, math.ceil((used - target) / per_row))) if per_row > 0 else 2 * batch
            total = sum(deleted.values())
            dropped = total if not synced_only and self.config.outbox else 0  # unsynced rows lost
            if dropped:
                message = self._record_drop(conn, deleted, first, last)
        if dropped:  # counted and logged once the drop and its event are committed
            self._dropped += dropped
            logger.warning("%s: %s", self.path, message)
        elif total:
            logger.debug(
                "%s: deleted %d %s rows (seq %d..%d) to stay under the cap",
                self.path,
                total,
                "synced" if synced_only else "oldest",
                first,
                last,
            )

    def _record_drop(self, conn: sqlite3.Connection, deleted: dict[str, int], first: int, last: int) -> str:
        """Insert the ``logbook.dropped`` event and the new drop count (in the trim's transaction)."""
        total = sum(deleted.values())
        message = (
            f"dropped {total} unsynced records (seq {first}..{last}): the log passed its hard cap of "
            f"{self.config.hard_cap_mb:g} MB before they were synced"
        )
        data = {
            "rows": total,
            "tables": deleted,
            "first_seq": first,
            "last_seq": last,
            "hard_cap_mb": self.config.hard_cap_mb,
        }
        self._insert_event(conn, "logbook.dropped", "warning", message, data)
        conn.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            [("dropped_rows", str(self._dropped + total)), ("next_seq", str(self._stored_next))],
        )
        return message


# --- module internals -----------------------------------------------------------------------------


def _oldest(conn: sqlite3.Connection, synced_only: bool, limit: int) -> list[tuple[int, str]]:
    """The ``limit`` globally oldest rows ``(seq, table)`` (one index range scan per table)."""
    where = "WHERE synced = 1 " if synced_only else ""
    per_table = [
        [(int(seq), t) for (seq,) in conn.execute(f"SELECT seq FROM {t} {where}ORDER BY seq LIMIT {int(limit)}")]
        for t in TABLES
    ]
    return list(itertools.islice(heapq.merge(*per_table), limit))


def _take_writer_lock(path: Path) -> int:
    """An exclusive flock on ``<db>.lock``: one writer per file, across threads and processes."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise LogbookError(f"cannot create the writer lock: {exc.strerror}", path=path) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LogbookError(
            "another Logbook (this or another process) is writing this file; stop it, or read with open_readonly()",
            path=path,
        ) from None
    return fd


def _wal_bytes(config: LogbookConfig) -> int:
    """The WAL counts against the cap too: keep it near 1/32 of the hard cap (at most SQLite's 4 MB default)."""
    return int(min(max(config.hard_cap_mb * _MB / 32, 64 * 1024), 4 * _MB))


def _load_meta(conn: sqlite3.Connection, device_id: str, path: Path) -> tuple[int, int]:
    """(next sequence number, rows dropped so far); claims the file for ``device_id``."""
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    owner = meta.get("device_id")
    if owner is None:
        conn.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?)", [("device_id", device_id), ("created", repr(time.time()))]
        )
    elif owner != device_id:
        raise LogbookError(
            f"this log belongs to device {owner!r}, not {device_id!r}; its sequence numbers and unsynced rows are "
            "that device's — restore the device id or move the file away",
            path=path,
        )
    stored_max = max(int(conn.execute(f"SELECT coalesce(max(seq), 0) FROM {t}").fetchone()[0]) for t in TABLES)
    return max(int(meta["next_seq"]), stored_max + 1), int(meta.get("dropped_rows", 0))


def _table(name: str) -> str:
    if name not in COLUMNS:
        raise LogbookError(f"unknown table {name!r}; expected one of {', '.join(TABLES)}")
    return name


_WIRE_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

#: Per table: the plain columns (``seq`` and ``ts`` first, as on the wire) and the JSON columns, pasted as stored.
_WIRE_COLUMNS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    t: (
        tuple(c for c in cols if c not in JSON_COLUMNS and c != "synced"),
        tuple(c for c in cols if c in JSON_COLUMNS),
    )
    for t, cols in COLUMNS.items()
}


def _wire(table: str, row: Sequence[Any]) -> str:
    """A stored row as wire JSON: plain columns encoded, JSON columns (stored compact and valid) pasted in."""
    plain, raw = _WIRE_COLUMNS[table]
    head = _WIRE_ENCODE(dict(zip(plain, row, strict=False)))
    if not raw:
        return head
    tail = ",".join(f'"{name}":{text}' for name, text in zip(raw, row[len(plain) :], strict=True))
    return f"{head[:-1]},{tail}}}"
