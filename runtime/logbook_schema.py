"""The logbook's SQLite file: tables and columns, the migrations that build them, pragmas, row encoding.

``PRAGMA user_version`` holds the schema version. ``MIGRATIONS[i]`` takes a database at version
``i`` to ``i + 1``; each runs in one transaction together with the version bump, so a failed
migration leaves the file as it was. A new file goes through every step, so the upgrade path
from the first release is exercised on every device, not only on old ones.

Version 2 (current)::

    inferences(seq, ts, model, model_version, input_ref, input_digest, latency_ms, result JSON, synced)
    metrics   (seq, ts, name, value, labels JSON, synced)
    events    (seq, ts, kind, level, message, data JSON, synced)
    meta      (key, value)            next_seq, device_id, dropped_rows, last_commit, created
    outbox    VIEW: unsynced rows of all three tables (seq, table, ts)

``seq`` is the row id and one per-device counter shared by all three tables. Sync state is a
``synced`` flag on each row (indexed with ``seq``) rather than a separate outbox table: marking a
row synced is one indexed update, finding the oldest synced or unsynced rows is an index range
scan, and a row and its sync state can never disagree; the ``outbox`` view shows the queue.

Migrations are written with sqlite-utils (``create``, ``add_column``, ``transform``, ``atomic``),
imported only when one runs: it costs ~10 MB of resident memory. The hot insert path and the
readers use plain sqlite3: ``executemany`` beat ``insert_all`` 3× in isolation and 1.45× end to
end through the writer thread (measured), and the queries are a few lines of SQL each.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from runtime.errors import LogbookError

if TYPE_CHECKING:
    from sqlite_utils import Database

__all__ = [
    "COLUMNS",
    "INSERT",
    "JSON_COLUMNS",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "TABLES",
    "check_number",
    "check_sqlite_file",
    "check_text",
    "decode_row",
    "disk_bytes",
    "encode_json",
    "ensure_incremental_vacuum",
    "migrate",
    "open_database",
    "pragma",
    "used_bytes",
    "user_version",
]

_SQLITE_MAGIC = b"SQLite format 3\x00"

TABLES = ("inferences", "metrics", "events")

#: Columns of each table in the current schema, in insert order (``synced`` comes last).
COLUMNS: dict[str, tuple[str, ...]] = {
    "inferences": (
        "seq",
        "ts",
        "model",
        "model_version",
        "input_ref",
        "input_digest",
        "latency_ms",
        "result",
        "synced",
    ),
    "metrics": ("seq", "ts", "name", "value", "labels", "synced"),
    "events": ("seq", "ts", "kind", "level", "message", "data", "synced"),
}

#: Columns holding JSON text, decoded on read.
JSON_COLUMNS = frozenset({"result", "labels", "data"})

#: One INSERT per table, taking a row in :data:`COLUMNS` order.
INSERT = {t: f"INSERT INTO {t} ({', '.join(c)}) VALUES ({', '.join('?' * len(c))})" for t, c in COLUMNS.items()}


def _create_v1(db: Database) -> None:
    """Version 1, the first release: each record is ``seq``, ``ts`` and its fields as one JSON payload.

    Payloads were ``{"model", "version", "input_ref", "latency_ms", "result"}`` for inferences,
    ``{"name", "value", "labels"}`` for metrics and ``{"kind", "message", "level", "data"}`` for
    events. The next sequence number was ``max(seq) + 1`` at start-up; there was no sync.
    """
    for table in TABLES:
        db.table(table).create({"seq": int, "ts": float, "payload": str}, pk="seq", not_null={"ts", "payload"})


# (column, type, SQL that computes it from a v1 payload ``{src}``) per table.
_JSON_OR_EMPTY = (
    "CASE WHEN json_type({{src}}, '$.{key}') IS NULL THEN '{{{{}}}}' "
    "ELSE json_quote(json_extract({{src}}, '$.{key}')) END"
)
_V2_FIELDS: dict[str, tuple[tuple[str, type, str], ...]] = {
    "inferences": (
        ("model", str, "coalesce(json_extract({src}, '$.model'), '')"),
        ("model_version", str, "coalesce(json_extract({src}, '$.version'), '')"),
        ("input_ref", str, "coalesce(json_extract({src}, '$.input_ref'), '')"),
        ("input_digest", str, "json_extract({src}, '$.input_digest')"),
        ("latency_ms", float, "coalesce(json_extract({src}, '$.latency_ms'), 0.0)"),
        ("result", str, "json_quote(json_extract({src}, '$.result'))"),
    ),
    "metrics": (
        ("name", str, "coalesce(json_extract({src}, '$.name'), '')"),
        ("value", float, "coalesce(json_extract({src}, '$.value'), 0.0)"),
        ("labels", str, _JSON_OR_EMPTY.format(key="labels")),
    ),
    "events": (
        ("kind", str, "coalesce(json_extract({src}, '$.kind'), '')"),
        ("level", str, "coalesce(json_extract({src}, '$.level'), 'info')"),
        ("message", str, "coalesce(json_extract({src}, '$.message'), '')"),
        ("data", str, _JSON_OR_EMPTY.format(key="data")),
    ),
}
_V2_RAW = {"inferences": "result", "metrics": "labels", "events": "data"}  # keeps an unparsable payload


def _v1_to_v2(db: Database) -> None:
    """Version 2: typed columns (``input_digest`` and ``model_version`` new), a ``synced`` flag, meta, indexes.

    v1 rows keep their ``seq`` and become unsynced (v1 never synced), so they are uploaded.
    The sequence counter moves into ``meta`` so it never goes back, even when rows are deleted.
    """
    for table, fields in _V2_FIELDS.items():
        for column, kind, _ in fields:
            db.table(table).add_column(column, kind)
        parsed = ", ".join(f"{column} = {sql.format(src='payload')}" for column, _, sql in fields)
        defaults = ", ".join(f"{column} = {sql.format(src=repr('{}'))}" for column, _, sql in fields)
        db.execute(f"UPDATE {table} SET {parsed} WHERE json_valid(payload)")
        db.execute(f"UPDATE {table} SET {defaults} WHERE NOT json_valid(payload)")
        db.execute(f"UPDATE {table} SET {_V2_RAW[table]} = json_quote(payload) WHERE NOT json_valid(payload)")
        db.table(table).add_column("synced", int, not_null_default=0)
        required = {column for column, _, _ in fields if column != "input_digest"}
        db.table(table).transform(drop={"payload"}, not_null=required)
        db.table(table).create_index(["synced", "seq"])
    db.table("inferences").create_index(["model", "model_version"])
    db.execute("CREATE INDEX idx_inferences_input_digest ON inferences(input_digest) WHERE input_digest IS NOT NULL")
    db.table("metrics").create_index(["name"])
    db.table("events").create_index(["kind"])
    db.table("meta").create({"key": str, "value": str}, pk="key", not_null={"value"})
    next_seq = max(db.execute(f"SELECT coalesce(max(seq), 0) FROM {t}").fetchone()[0] for t in TABLES) + 1
    db.table("meta").insert({"key": "next_seq", "value": str(next_seq)})
    db.create_view(
        "outbox",
        " UNION ALL ".join(f"SELECT seq, '{t}' AS \"table\", ts FROM {t} WHERE synced = 0" for t in TABLES),
    )


#: ``MIGRATIONS[i]`` upgrades a database at ``user_version == i`` to ``i + 1``.
MIGRATIONS: tuple[Callable[[Database], None], ...] = (_create_v1, _v1_to_v2)
SCHEMA_VERSION = len(MIGRATIONS)


def user_version(conn: sqlite3.Connection) -> int:
    """The schema version stored in the file."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, path: Path) -> int:
    """Bring the database on ``conn`` to :data:`SCHEMA_VERSION`; return the version it had."""
    found = user_version(conn)
    if found > SCHEMA_VERSION:
        raise LogbookError(
            f"schema version {found} was written by a newer edge-runtime (this one knows {SCHEMA_VERSION}); "
            "upgrade edge-runtime or move the file away",
            path=path,
        )
    if found == SCHEMA_VERSION:
        return found
    # sqlite-utils costs ~10 MB of resident memory to import (measured), so only a migration loads it.
    from sqlite_utils import Database

    db = Database(conn, execute_plugins=False)  # not closed: the caller owns the connection
    for version in range(found, SCHEMA_VERSION):
        try:
            with db.atomic():
                MIGRATIONS[version](db)
                db.execute(f"PRAGMA user_version = {version + 1}")
        except sqlite3.Error as exc:
            raise LogbookError(
                f"migrating the schema from version {version} to {version + 1} failed ({exc}); "
                "the file is unchanged — free disk space or move it away and restart",
                path=path,
            ) from exc
    return found


def ensure_incremental_vacuum(conn: sqlite3.Connection, path: Path) -> None:
    """Switch a file to ``auto_vacuum=INCREMENTAL`` (one VACUUM) so deleting rows can shrink it on disk."""
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
        return
    try:
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("VACUUM")
    except sqlite3.Error as exc:
        raise LogbookError(f"VACUUM to enable incremental vacuum failed ({exc}); free disk space", path=path) from exc


def open_database(
    path: Path, *, synchronous: Literal["normal", "full"], wal_bytes: int, busy_timeout_s: float
) -> sqlite3.Connection:
    """The write connection: WAL, incremental auto-vacuum, a bounded WAL, the current schema."""
    check_sqlite_file(path)
    try:
        conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise LogbookError(f"cannot open: {exc}", path=path) from exc
    try:
        if pragma(conn, "page_count") == 0:
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only takes effect before the first table
        if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
            raise LogbookError("cannot switch to WAL journal mode (file system without shared memory?)", path=path)
        conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        conn.execute(f"PRAGMA journal_size_limit = {int(wal_bytes)}")  # the WAL is truncated to this after a reset
        conn.execute(f"PRAGMA wal_autocheckpoint = {max(16, int(wal_bytes) // pragma(conn, 'page_size'))}")
        migrate(conn, path)
        ensure_incremental_vacuum(conn, path)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise LogbookError(f"not a usable SQLite database ({exc}); move it away", path=path) from exc
    except BaseException:
        conn.close()
        raise
    return conn


def check_sqlite_file(path: Path) -> None:
    """Refuse an existing, non-empty file that is not SQLite (before SQLite touches it)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(_SQLITE_MAGIC))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise LogbookError(f"cannot read: {exc.strerror}", path=path) from exc
    if head and head != _SQLITE_MAGIC:
        raise LogbookError("not a SQLite database; move it away or point logbook.path elsewhere", path=path)


def pragma(conn: sqlite3.Connection, name: str) -> int:
    """An integer pragma's value."""
    return int(conn.execute(f"PRAGMA {name}").fetchone()[0])


def used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes in live pages: what the file shrinks to once free pages are vacuumed."""
    return (pragma(conn, "page_count") - pragma(conn, "freelist_count")) * pragma(conn, "page_size")


def disk_bytes(path: Path) -> int:
    """The database file plus its WAL, as the file system counts them."""
    total = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(FileNotFoundError):
            total += os.path.getsize(f"{path}{suffix}")
    return total


def decode_row(columns: Sequence[str], row: Sequence[Any]) -> dict[str, Any]:
    """A stored row as a dict: JSON columns decoded, ``synced`` a bool."""
    out = dict(zip(columns, row, strict=True))
    for column in JSON_COLUMNS.intersection(out):
        out[column] = json.loads(out[column])
    out["synced"] = bool(out["synced"])
    return out


def check_text(value: object, name: str) -> str:
    """``value`` if it is a str SQLite can store (no lone surrogates), else LogbookError naming ``name``."""
    if not isinstance(value, str):
        raise LogbookError(f"{name} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LogbookError(f"{name} is not valid Unicode text ({exc.reason} at {exc.start})") from exc
    return value


def check_number(value: object, name: str) -> float:
    """``value`` as a finite float, else LogbookError naming ``name``."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise LogbookError(f"{name} must be a number, got {type(value).__name__}") from exc
    if not math.isfinite(number):
        raise LogbookError(f"{name} must be finite, got {number}")
    return number


def _jsonable(value: object) -> Any:
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays, without importing numpy
    if callable(tolist):
        return tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def encode_json(value: Mapping[str, Any] | None, name: str) -> str:
    """Compact, strict JSON text for a mapping (numpy values become lists and numbers)."""
    try:
        text = json.dumps(
            {} if value is None else dict(value),
            ensure_ascii=False,
            separators=(",", ":"),
            allow_nan=False,
            default=_jsonable,
        )
    except (TypeError, ValueError, RecursionError) as exc:
        raise LogbookError(f"{name} is not JSON-serializable: {exc}") from exc
    return check_text(text, name)
