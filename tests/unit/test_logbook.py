"""The SQLite logbook against real files: round trips, sequence numbers, migration, disk caps, sync state."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.errors import ConfigError, LogbookError
from runtime.logbook import Logbook, LogbookConfig, open_readonly
from runtime.logbook_schema import MIGRATIONS, SCHEMA_VERSION
from tests.conftest import REPO

MB = 1024 * 1024
BLOB = "x" * 1000  # ~1 kB per record, so a few hundred records cross a sub-megabyte cap


def _open(tmp_path: Path, name: str = "log.db", device: str = "dev-1", **options: Any) -> Logbook:
    options.setdefault("flush_interval_s", 0.05)
    return Logbook(LogbookConfig(tmp_path / name, **options), device_id=device)


def _infer(lb: Logbook, i: int, blob: str = "") -> int:
    return lb.record_inference(
        model="digits", version="1.0.0", input_ref=f"img{i}.png", latency_ms=1.0 + i, result={"i": i, "blob": blob}
    )


def _seqs(path: Path, table: str) -> list[int]:
    conn = sqlite3.connect(path)
    try:
        return [s for (s,) in conn.execute(f"SELECT seq FROM {table} ORDER BY seq")]
    finally:
        conn.close()


def _pragma(path: Path, name: str) -> Any:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        conn.close()


def _disk_bytes(path: Path) -> int:
    return sum(os.path.getsize(p) for p in (path, Path(f"{path}-wal")) if p.exists())


# --- round trips and sequence numbers -----------------------------------------------------------


def test_every_record_kind_round_trips(tmp_path: Path) -> None:
    with _open(tmp_path) as lb:
        result = {"top1": {"index": 3, "label": "three", "score": 0.9}}
        s1 = lb.record_inference(
            model="digits",
            version="1.2.0",
            input_ref="a.png",
            latency_ms=2.5,
            result=result,
            input_digest="d",
            ts=100.0,
        )
        s2 = lb.record_metric("cpu.percent", 41.5, labels={"core": "0"}, ts=101.0)
        s3 = lb.record_event("model.loaded", "digits 1.2.0 ready", data={"warmup_ms": 12}, level="warning", ts=102.0)
        lb.flush()
        inference = lb.tail(1)[0]
        metric = lb.tail(1, table="metrics")[0]
        event = lb.tail(1, table="events")[0]
    assert (s1, s2, s3) == (1, 2, 3)
    common = {"synced": False}
    assert inference == {
        **common,
        **{"seq": 1, "ts": 100.0, "model": "digits", "model_version": "1.2.0", "input_ref": "a.png"},
        **{"input_digest": "d", "latency_ms": 2.5, "result": result},
    }
    assert metric == {**common, "seq": 2, "ts": 101.0, "name": "cpu.percent", "value": 41.5, "labels": {"core": "0"}}
    assert event == {
        **common,
        **{"seq": 3, "ts": 102.0, "kind": "model.loaded", "level": "warning", "message": "digits 1.2.0 ready"},
        "data": {"warmup_ms": 12},
    }


def test_numpy_values_in_a_result_are_stored_as_plain_json(tmp_path: Path) -> None:
    import numpy as np

    with _open(tmp_path) as lb:
        result = {"scores": np.array([0.25, 0.75], dtype=np.float32), "index": np.int64(1)}
        lb.record_inference(model="m", version="1", input_ref="x", latency_ms=np.float32(1.5), result=result)
        lb.flush()
        assert lb.tail(1)[0]["result"] == {"scores": [0.25, 0.75], "index": 1}


def test_seq_is_shared_by_all_kinds_and_monotonic_across_reopen(tmp_path: Path) -> None:
    issued = []
    with _open(tmp_path) as lb:
        for i in range(30):
            if i % 3 == 0:
                issued.append(_infer(lb, i))
            else:
                issued.append(lb.record_metric("m", i) if i % 3 == 1 else lb.record_event("e", str(i)))
    with _open(tmp_path) as lb:
        issued += [lb.record_event("boot", "again"), _infer(lb, 99)]
    assert issued == list(range(1, 33))
    path = tmp_path / "log.db"
    stored = sorted(_seqs(path, "inferences") + _seqs(path, "metrics") + _seqs(path, "events"))
    assert stored == issued


def test_seq_is_unique_across_threads(tmp_path: Path) -> None:
    got: list[list[int]] = [[] for _ in range(4)]

    def work(k: int) -> None:
        for i in range(300):
            got[k].append(lb.record_metric(f"t{k}", i) if i % 2 else lb.record_event("t", f"{k}:{i}"))

    with _open(tmp_path, batch_size=64) as lb:
        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for seqs in got:
        assert seqs == sorted(seqs)  # each caller sees its own records in order
    every = sorted(s for seqs in got for s in seqs)
    assert every == list(range(1, 1201))
    path = tmp_path / "log.db"
    assert sorted(_seqs(path, "metrics") + _seqs(path, "events")) == every


def test_seq_is_never_reused_after_rows_are_deleted(tmp_path: Path) -> None:
    with _open(tmp_path) as lb:
        last = [_infer(lb, i) for i in range(5)][-1]
    conn = sqlite3.connect(tmp_path / "log.db")
    with conn:
        conn.execute("DELETE FROM inferences")
    conn.close()
    with _open(tmp_path) as lb:
        assert lb.record_event("after", "delete") == last + 1


def test_file_is_wal_with_incremental_vacuum(tmp_path: Path) -> None:
    with _open(tmp_path) as lb:
        _infer(lb, 0)
        assert _pragma(tmp_path / "log.db", "journal_mode") == "wal"
    assert _pragma(tmp_path / "log.db", "auto_vacuum") == 2  # incremental
    assert _pragma(tmp_path / "log.db", "user_version") == SCHEMA_VERSION


def test_reopen_after_close_keeps_rows_and_stats(tmp_path: Path) -> None:
    with _open(tmp_path) as lb:
        for i in range(10):
            _infer(lb, i)
    with _open(tmp_path) as lb:
        stats = lb.stats()
        assert stats["rows"] == {"inferences": 10, "metrics": 0, "events": 0}
        assert stats["last_seq"] == 10 and stats["unsynced"] == 10 and stats["device_id"] == "dev-1"
        assert [r["input_ref"] for r in lb.tail(3)] == ["img7.png", "img8.png", "img9.png"]


# --- schema migration -----------------------------------------------------------------------------


def _v1_file(path: Path) -> None:
    """A file as the first release wrote it: the v1 DDL from the migration list, rows with JSON payloads."""
    from sqlite_utils import Database

    with Database(path, execute_plugins=False) as db:
        db.execute("PRAGMA journal_mode = WAL")
        with db.atomic():
            MIGRATIONS[0](db)
            db.execute("PRAGMA user_version = 1")
        rows = {
            "inferences": [
                (
                    1,
                    10.0,
                    {
                        "model": "digits",
                        "version": "0.9.0",
                        "input_ref": "a.png",
                        "latency_ms": 3.5,
                        "result": {"top1": {"index": 7}},
                    },
                ),
                (
                    4,
                    13.0,
                    {
                        "model": "digits",
                        "version": "0.9.0",
                        "input_ref": "b.png",
                        "latency_ms": 4.0,
                        "result": "scalar",
                    },
                ),
                (6, 15.0, "{not json"),
            ],
            "metrics": [(2, 11.0, {"name": "temp", "value": 51.0, "labels": {"zone": "soc"}})],
            "events": [
                (3, 12.0, {"kind": "boot", "message": "hi", "level": "info", "data": {"n": 1}}),
                (5, 14.0, {"kind": "stop", "message": "bye"}),
            ],
        }
        with db.atomic():
            for table, items in rows.items():
                for seq, ts, payload in items:
                    text = payload if isinstance(payload, str) else json.dumps(payload)
                    db.execute(f"INSERT INTO {table} (seq, ts, payload) VALUES (?, ?, ?)", (seq, ts, text))


def test_migration_from_a_real_v1_file_preserves_rows(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    _v1_file(path)
    assert _pragma(path, "user_version") == 1 and _pragma(path, "auto_vacuum") == 0
    with _open(tmp_path) as lb:
        assert _pragma(path, "user_version") == 2
        inferences = lb.tail(10)
        assert inferences[0] == {
            "seq": 1,
            "ts": 10.0,
            "model": "digits",
            "model_version": "0.9.0",
            "input_ref": "a.png",
            "input_digest": None,
            "latency_ms": 3.5,
            "result": {"top1": {"index": 7}},
            "synced": False,
        }
        assert inferences[1]["result"] == "scalar"
        assert inferences[2]["result"] == "{not json"  # an unreadable v1 payload is kept, as text
        assert lb.tail(5, table="metrics") == [
            {"seq": 2, "ts": 11.0, "name": "temp", "value": 51.0, "labels": {"zone": "soc"}, "synced": False}
        ]
        events = lb.tail(5, table="events")
        assert events[0]["data"] == {"n": 1} and events[1] == {
            "seq": 5,
            "ts": 14.0,
            "kind": "stop",
            "level": "info",
            "message": "bye",
            "data": {},
            "synced": False,
        }
        assert [r.seq for r in lb.pending()] == [1, 2, 3, 4, 5, 6]  # v1 never synced: everything is queued
        assert lb.record_event("migrated", "to v2") == 7
    assert _pragma(path, "auto_vacuum") == 2


def test_a_file_from_a_newer_release_is_refused(tmp_path: Path) -> None:
    with _open(tmp_path) as lb:
        _infer(lb, 0)
    conn = sqlite3.connect(tmp_path / "log.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(LogbookError, match="newer edge-runtime") as err:
        _open(tmp_path)
    assert str(tmp_path / "log.db") in str(err.value)
    with pytest.raises(LogbookError, match="newer edge-runtime"):
        open_readonly(tmp_path / "log.db")


# --- bad files, wrong owners, bad values -----------------------------------------------------------


def test_a_file_that_is_not_sqlite_is_a_logbook_error_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "log.db"
    bad.write_text("this is a text file, not a database\n" * 10)
    with pytest.raises(LogbookError, match="not a SQLite database") as err:
        _open(tmp_path)
    assert str(bad) in str(err.value)
    with pytest.raises(LogbookError, match="not a SQLite database"):
        open_readonly(bad)
    with pytest.raises(LogbookError, match="no logbook here"):
        open_readonly(tmp_path / "missing.db")


def test_one_writer_per_file(tmp_path: Path) -> None:
    with _open(tmp_path):
        with pytest.raises(LogbookError, match="another Logbook"):
            _open(tmp_path)
    with _open(tmp_path) as lb:  # the lock goes with close()
        assert lb.record_event("ok", "reopened") == 1


def test_a_log_belongs_to_one_device(tmp_path: Path) -> None:
    with _open(tmp_path, device="dev-1") as lb:
        _infer(lb, 0)
    with pytest.raises(LogbookError, match="belongs to device 'dev-1', not 'dev-2'"):
        _open(tmp_path, device="dev-2")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda lb: lb.record_metric("temp", math.nan), "must be finite"),
        (lambda lb: lb.record_metric("temp", "hot"), "must be a number"),
        (lambda lb: lb.record_event("x", "y", level="loud"), "event level"),
        (lambda lb: lb.record_event("x", "y", data={"when": object()}), "not JSON-serializable"),
        (lambda lb: lb.record_event("x", "y", data={"v": math.inf}), "not JSON-serializable"),
        (lambda lb: lb.record_event("x", "bad \udc80 text"), "not valid Unicode"),
        (
            lambda lb: lb.record_inference(model=1, version="v", input_ref="r", latency_ms=1.0, result={}),
            "model must be a string",
        ),
    ],
)
def test_bad_values_are_refused_before_they_reach_the_writer(tmp_path: Path, call: Any, message: str) -> None:
    with _open(tmp_path) as lb:
        with pytest.raises(LogbookError, match=message):
            call(lb)
        assert lb.record_event("still", "works") >= 1  # a refused record poisons nothing


def test_config_is_validated_with_key_names() -> None:
    with pytest.raises(ConfigError, match=r"logbook\.hard_cap_mb: must be >= soft_cap_mb"):
        LogbookConfig(Path("x.db"), soft_cap_mb=10, hard_cap_mb=5)
    with pytest.raises(ConfigError, match=r"logbook\.flush_interval_s"):
        LogbookConfig(Path("x.db"), flush_interval_s=0)


# --- writer thread: durability, failures, close ---------------------------------------------------


def test_durable_record_is_committed_when_it_returns(tmp_path: Path) -> None:
    with _open(tmp_path, flush_interval_s=30.0, durable=True) as lb:
        for i in range(20):
            seq = _infer(lb, i)
            assert _seqs(tmp_path / "log.db", "inferences")[-1] == seq  # visible to another connection at once


def test_batch_mode_commits_within_the_flush_interval(tmp_path: Path) -> None:
    with _open(tmp_path, flush_interval_s=0.2, batch_size=10_000) as lb:
        seq = _infer(lb, 0)
        deadline = time.monotonic() + 5
        while seq not in _seqs(tmp_path / "log.db", "inferences") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert seq in _seqs(tmp_path / "log.db", "inferences")


def test_a_failed_commit_is_logged_and_retried(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with _open(tmp_path) as lb:
        _infer(lb, 0)
        lb.flush()
        blocker = sqlite3.connect(tmp_path / "log.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # an operator's shell holding the write lock
        try:
            with caplog.at_level(logging.ERROR, logger="runtime.logbook"):
                seq = _infer(lb, 1)
                deadline = time.monotonic() + 10
                while "stay queued" not in caplog.text and time.monotonic() < deadline:
                    time.sleep(0.05)
            assert "database is locked" in caplog.text and "stay queued" in caplog.text
            assert "locked" in (lb.stats()["last_error"] or "")
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        lb.flush(timeout=15)
        assert _seqs(tmp_path / "log.db", "inferences") == [1, seq]


def test_close_reports_records_it_could_not_write(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lb = _open(tmp_path, flush_interval_s=10.0)
    _infer(lb, 0)
    lb.flush()
    blocker = sqlite3.connect(tmp_path / "log.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        for i in range(5):
            _infer(lb, i)
        start = time.monotonic()
        with caplog.at_level(logging.ERROR, logger="runtime.logbook"):
            with pytest.raises(LogbookError, match=r"5 queued records could not be written.*database is locked"):
                lb.close()
        assert time.monotonic() - start < 5  # one last try (the 1 s busy timeout), not a retry loop
        assert not any(t.name == "edge-logbook" for t in threading.enumerate())
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert _seqs(tmp_path / "log.db", "inferences") == [1]
    with _open(tmp_path) as again:  # the writer lock went with close(), even though it failed
        assert again.record_event("restart", "after a failed close") == 2


def test_close_stops_the_writer_thread_quickly(tmp_path: Path) -> None:
    lb = _open(tmp_path, flush_interval_s=10.0)
    for i in range(100):
        _infer(lb, i)
    assert any(t.name == "edge-logbook" and t.daemon for t in threading.enumerate())
    start = time.monotonic()
    lb.close()
    assert time.monotonic() - start < 1.0
    assert not any(t.name == "edge-logbook" for t in threading.enumerate())
    assert len(_seqs(tmp_path / "log.db", "inferences")) == 100  # close() flushed
    with pytest.raises(LogbookError, match="closed"):
        _infer(lb, 0)
    lb.close()  # idempotent


# --- sync state -----------------------------------------------------------------------------------


def test_pending_and_mark_synced(tmp_path: Path) -> None:
    with _open(tmp_path) as lb:
        seqs = [_infer(lb, 0), lb.record_metric("m", 1.0), lb.record_event("e", "x"), _infer(lb, 1)]
        lb.flush()
        pending = lb.pending()
        assert [(r.seq, r.table) for r in pending] == list(
            zip(seqs, ["inferences", "metrics", "events", "inferences"], strict=True)
        )
        assert pending[1].payload == {"name": "m", "value": 1.0, "labels": {}}
        assert [r.seq for r in lb.pending(limit=2)] == seqs[:2]
        lb.mark_synced(seqs[:3])
        assert [r.seq for r in lb.pending()] == [seqs[3]]  # hidden at once, before the writer commits
        lb.flush()
        assert [r.seq for r in lb.pending()] == [seqs[3]]
        assert lb.stats()["unsynced"] == 1
    reader = open_readonly(tmp_path / "log.db")
    assert [r.seq for r in reader.pending()] == [seqs[3]]
    assert reader.tail(2)[0]["synced"] is True


def test_mark_synced_with_a_table_marks_only_that_tables_rows(tmp_path: Path) -> None:
    with _open(tmp_path) as lb:
        inference, metric = _infer(lb, 0), lb.record_metric("m", 1.0)
        lb.flush()
        lb.mark_synced([inference, metric], table="metrics")  # the inference's seq is not a metrics row
        lb.flush()
        assert lb.stats()["unsynced"] == 1
        with pytest.raises(LogbookError, match="unknown table"):
            lb.mark_synced([inference], table="inference")
    assert [r.seq for r in open_readonly(tmp_path / "log.db").pending()] == [inference]


def test_pending_wire_json_is_the_stored_row_re_encoded(tmp_path: Path) -> None:
    """The outbox pastes stored JSON columns instead of decoding them: the text must equal a full re-encode."""
    result = {"top1": {"index": 3, "label": "drei ✓", "score": 0.1 + 0.2}, "outputs": {"y": [1e-30, -0.0, 7]}}
    with _open(tmp_path) as lb:
        lb.record_inference(model="m", version="1", input_ref='cam "0"', latency_ms=1 / 3, result=result)
        lb.record_metric("temp", 51.25, labels={"zone": "cpu"})
        lb.record_event("model.swap", "to 2.0", data={"from": None, "ok": True})
        lb.flush()
        rows = {r["seq"]: r for t in ("inferences", "metrics", "events") for r in lb.tail(5, table=t)}
        for record in lb.pending():
            row = dict(rows[record.seq])
            del row["synced"]
            expected = json.dumps(row, ensure_ascii=False, separators=(",", ":"))
            assert record.wire == expected
            assert json.loads(record.wire) == {**record.payload, "seq": record.seq, "ts": record.ts}


def test_without_sync_every_row_counts_as_synced(tmp_path: Path) -> None:
    with _open(tmp_path, outbox=False) as lb:
        _infer(lb, 0)
        lb.record_event("e", "x")
        lb.flush()
        assert lb.pending() == [] and lb.stats()["unsynced"] == 0


def test_export_since_is_ordered_by_seq_across_tables(tmp_path: Path) -> None:
    with _open(tmp_path) as lb:
        for i in range(2500):  # more than one export page
            if i % 3 == 0:
                lb.record_inference(model="m", version="1", input_ref=str(i), latency_ms=1.0, result={}, ts=float(i))
            elif i % 3 == 1:
                lb.record_metric("m", float(i), ts=float(i))
            else:
                lb.record_event("e", str(i), ts=float(i))
        lb.flush()
        rows = list(lb.export(since=1000.0))
        only_events = list(lb.export(since=2490.0, tables=("events",)))
    assert [r["seq"] for r in rows] == list(range(1001, 2501))
    assert [r["ts"] for r in rows] == [float(i) for i in range(1000, 2500)]
    assert {r["table"] for r in rows} == {"inferences", "metrics", "events"}
    assert [r["message"] for r in only_events] == ["2492", "2495", "2498"]
    with pytest.raises(LogbookError, match="unknown table"):
        list(open_readonly(tmp_path / "log.db").export(tables=("nope",)))


# --- disk caps ------------------------------------------------------------------------------------


def test_soft_cap_deletes_only_synced_rows_oldest_first(tmp_path: Path) -> None:
    with _open(tmp_path, soft_cap_mb=0.25, hard_cap_mb=64, batch_size=50) as lb:
        first = [_infer(lb, i, BLOB) for i in range(300)]  # ~300 kB, all unsynced: nothing may go
        lb.flush()
        assert _seqs(tmp_path / "log.db", "inferences") == first
        lb.mark_synced(first[:150])
        later = [_infer(lb, i, BLOB) for i in range(300, 400)]
        lb.flush()
        stats = lb.stats()
    kept = _seqs(tmp_path / "log.db", "inferences")
    deleted = sorted(set(first + later) - set(kept))
    assert deleted, "the soft cap deleted nothing"
    assert deleted == first[: len(deleted)]  # the oldest synced rows, and only synced rows
    assert set(first[150:] + later) <= set(kept)
    assert stats["dropped"] == 0
    assert not [
        e for e in open_readonly(tmp_path / "log.db").tail(10, table="events") if e["kind"] == "logbook.dropped"
    ]


def test_hard_cap_drops_unsynced_rows_and_records_the_drop(tmp_path: Path) -> None:
    with _open(tmp_path, soft_cap_mb=0.25, hard_cap_mb=0.5, batch_size=50) as lb:
        issued = [_infer(lb, i, BLOB) for i in range(1000)]  # ~1 MB, never synced
    stats = open_readonly(tmp_path / "log.db").stats()
    kept = set(_seqs(tmp_path / "log.db", "inferences"))
    missing = sorted(set(issued) - kept)
    assert missing and missing == issued[: len(missing)]  # oldest first
    assert issued[-1] in kept
    drops = [e for e in open_readonly(tmp_path / "log.db").tail(100, table="events") if e["kind"] == "logbook.dropped"]
    assert drops and all(e["level"] == "warning" and not e["synced"] for e in drops)
    reported = [s for e in drops for s in range(e["data"]["first_seq"], e["data"]["last_seq"] + 1)]
    assert sorted(s for s in reported if s in set(issued)) == missing  # every dropped seq is accounted for
    assert sum(e["data"]["rows"] for e in drops) == len(missing) == stats["dropped"]
    assert all(e["data"]["tables"] == {"inferences": e["data"]["rows"]} for e in drops)


def test_disk_use_stays_under_the_hard_cap_while_writing_three_times_it(tmp_path: Path) -> None:
    hard, batch, row = 2.0 * MB, 100, 1300  # a 1 kB blob plus the other columns and index entries
    path = tmp_path / "log.db"
    # The main file is trimmed after every commit with room for the next one, so it stays under the cap;
    # the slack is the WAL on top of it: its size limit (cap/32), the last trim's transaction (2 % of the
    # cap, deleted down to 98 %) and up to two commits appended before an autocheckpoint resets it.
    slack = hard / 32 + 0.02 * hard + 2 * batch * row
    peak = {"file": 0, "disk": 0}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                peak["file"] = max(peak["file"], path.stat().st_size)
                peak["disk"] = max(peak["disk"], _disk_bytes(path))
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with _open(tmp_path, soft_cap_mb=1.0, hard_cap_mb=hard / MB, batch_size=batch) as lb:
            for i in range(int(3 * hard / 1000)):
                _infer(lb, i, BLOB)
    finally:
        stop.set()
        watcher.join()
    stats = open_readonly(path).stats()
    assert stats["dropped"] > 3000  # three caps' worth went through
    assert peak["file"] <= hard, f"the database file peaked at {peak['file']} bytes"
    assert peak["disk"] <= hard + slack, f"file + WAL peaked at {peak['disk']} bytes"
    assert _disk_bytes(path) <= hard


# --- readers --------------------------------------------------------------------------------------


def test_another_process_reads_while_the_writer_runs(tmp_path: Path) -> None:
    stop = threading.Event()

    def keep_writing(lb: Logbook) -> None:
        i = 0
        while not stop.is_set():
            lb.record_metric("load", float(i))
            i += 1
            time.sleep(0.0005)

    code = (
        "import json, sys\n"
        "from runtime.logbook import open_readonly\n"
        "r = open_readonly(sys.argv[1])\n"
        "seen = []\n"
        "for _ in range(20):\n"
        "    seen.append(r.stats()['rows']['metrics'])\n"
        "    assert r.tail(5, table='metrics') and r.pending(10) and next(iter(r.export()))\n"
        "print(json.dumps(seen))\n"
    )
    with _open(tmp_path) as lb:
        writer = threading.Thread(target=keep_writing, args=(lb,))
        writer.start()
        try:
            lb.flush()
            time.sleep(0.2)
            proc = subprocess.run(
                [sys.executable, "-c", code, str(tmp_path / "log.db")],
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                capture_output=True,
                text=True,
                timeout=60,
            )
        finally:
            stop.set()
            writer.join()
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen[0] > 0 and seen == sorted(seen)


# --- arbitrary payloads ---------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=25,
)


def test_arbitrary_json_payloads_round_trip(tmp_path: Path) -> None:
    with _open(tmp_path) as lb:

        @settings(max_examples=150, deadline=None)
        @given(payload=st.dictionaries(st.text(), _json, max_size=6), message=st.text())
        def check(payload: dict[str, Any], message: str) -> None:
            seq = lb.record_event("fuzz", message, data=payload)
            _ = lb.record_inference(model="m", version="1", input_ref=message, latency_ms=0.5, result=payload)
            lb.flush()
            event = lb.tail(1, table="events")[0]
            assert (event["seq"], event["message"], event["data"]) == (seq, message, payload)
            assert lb.tail(1)[0]["result"] == payload
            assert lb.pending(1_000_000)[-1].payload["result"] == payload

        check()


def test_seq_stays_unique_when_writers_wait_for_a_full_queue(tmp_path: Path) -> None:
    """Many threads against a small queue: a caller that waits for room must not share a seq with another."""
    import threading

    cfg = LogbookConfig(path=tmp_path / "race.sqlite", batch_size=16, flush_interval_s=0.05, outbox=False)
    lb = Logbook(cfg, device_id="dev")
    seqs: list[int] = []
    guard = threading.Lock()

    def work() -> None:
        mine = [lb.record_metric("m", float(i)) for i in range(1500)]
        with guard:
            seqs.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lb.close()
    assert len(seqs) == len(set(seqs)) == 8 * 1500
    assert open_readonly(cfg.path).stats()["rows"]["metrics"] == 8 * 1500


def test_a_row_the_database_refuses_is_set_aside_and_the_rest_is_stored(tmp_path: Path) -> None:
    """A constraint violation (another program wrote the seq we hand out next) must not stall the log."""
    with _open(tmp_path) as lb:
        first = _infer(lb, 0)
        lb.flush()
        intruder = sqlite3.connect(tmp_path / "log.db")
        with intruder:
            intruder.execute(
                "INSERT INTO inferences (seq, ts, model, model_version, input_ref, input_digest, latency_ms, result,"
                " synced) VALUES (?, 0, 'other', '1', 'intruder', NULL, 1.0, '{}', 0)",
                (first + 1,),
            )
        intruder.close()
        clash, after = _infer(lb, 1), _infer(lb, 2)
        assert clash == first + 1
        lb.flush(timeout=10)  # committed: the batch is not retried forever
        stats = lb.stats()
        assert stats["rejected"] == 1 and stats["queued"] == 0
        assert _seqs(tmp_path / "log.db", "inferences") == [first, clash, after]
        refs = {r["seq"]: r["input_ref"] for r in lb.tail(5)}
        assert refs[clash] == "intruder" and refs[after] == "img2.png"
        (event,) = [e for e in lb.tail(5, table="events") if e["kind"] == "logbook.rejected"]
        assert event["data"]["refused"] == [{"table": "inferences", "seq": clash}]
        assert event["seq"] > after  # the event got a seq of its own
        later = _infer(lb, 3)
        lb.flush(timeout=10)
        assert _seqs(tmp_path / "log.db", "inferences")[-1] == later  # the log goes on
