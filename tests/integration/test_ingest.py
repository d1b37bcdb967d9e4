"""The ingest worker against a real Mosquitto: each (device, seq) stored once, however often it arrives.

Batches are made with the device's own encoder (``runtime.sync.encode_batch``) and published with
the device's own link, plain and zlib, over MQTT 5 and 3.1.1. Two ``toolchain fleet ingest``
processes in one shared-subscription group split the messages and together store every record once.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.link import Link, LinkConfig
from runtime.logbook import OutboxRecord
from runtime.sync import BatchError, encode_batch
from tests.broker import Broker, module_broker_fixture  # noqa: F401  (registers the `mqtt` fixture)
from tests.conftest import REPO
from toolchain.ingest import Batch, Ingest, IngestStore, decode_batch

FLEET = "plant"


def _inference(seq: int) -> OutboxRecord:
    payload = {
        "model": "digits",
        "model_version": "1.0.0",
        "input_ref": f"frame-{seq}.png",
        "input_digest": None,
        "latency_ms": 1.5 + seq,
        "result": {"top": [{"label": str(seq % 10), "score": 0.9}]},
    }
    return OutboxRecord.of(seq, "inferences", 1_700_000_000.0 + seq, payload)


def _metric(seq: int) -> OutboxRecord:
    return OutboxRecord.of(seq, "metrics", 1_700_000_000.0 + seq, {"name": "cpu_percent", "value": seq, "labels": {}})


def _event(seq: int) -> OutboxRecord:
    payload = {"kind": "model.loaded", "level": "info", "message": f"event {seq}", "data": {"seq": seq}}
    return OutboxRecord.of(seq, "events", 1_700_000_000.0 + seq, payload)


def _batch(device: str, table: str, records: list[OutboxRecord], *, compress: bool = False) -> bytes:
    return encode_batch(FLEET, device, table, records, compress=compress)


def _topic(device: str, table: str) -> str:
    return f"edge/{FLEET}/{device}/{table}"


class Publisher:
    """A device-side link that publishes and waits for each PUBACK."""

    def __init__(self, broker: Broker, client_id: str, protocol: str = "mqtt5") -> None:
        cfg = LinkConfig(client_id=client_id, host=broker.host, port=broker.port, protocol=protocol)
        self.link = Link(cfg)
        self.link.start()
        assert self.link.wait_connected(10)

    def send(self, topic: str, payload: bytes, properties: dict[str, Any] | None = None) -> None:
        assert self.link.publish(topic, payload, qos=1, properties=properties).wait(10), topic

    def close(self) -> None:
        self.link.stop()


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class Worker:
    """An in-process Ingest running on a thread."""

    def __init__(self, broker: Broker, db: Path, client_id: str, group: str) -> None:
        cfg = LinkConfig(client_id=client_id, host=broker.host, port=broker.port, protocol="mqtt5")
        self.ingest = Ingest(db, cfg, FLEET, group)
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.result: dict[str, int] | BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="test-ingest", daemon=True)
        self.thread.start()
        assert self.ready.wait(10), "ingest did not subscribe"

    def _run(self) -> None:
        try:
            self.result = self.ingest.run(self.stop, on_ready=self.ready.set)
        except BaseException as exc:
            self.result = exc

    def wait_messages(self, n: int, timeout: float = 10.0) -> None:
        _wait(lambda: self.ingest.stats()["messages"] >= n, timeout, f"{n} messages (have {self.ingest.stats()})")

    def close(self) -> dict[str, int]:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
        assert isinstance(self.result, dict), self.result
        return self.result


def _count(db: Path, table: str, where: str = "1") -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table} WHERE {where}").fetchone()[0])


def test_same_batch_twice_is_stored_once(mqtt: Broker, tmp_path: Path) -> None:
    db = tmp_path / "fleet.sqlite"
    worker = Worker(mqtt, db, "ingest-dedup", "dedup")
    v5, v311 = Publisher(mqtt, "cam-1"), Publisher(mqtt, "cam-2", "mqtt311")
    try:
        inferences = _batch("cam-1", "inferences", [_inference(s) for s in range(1, 51)])
        metrics = _batch("cam-1", "metrics", [_metric(s) for s in range(51, 61)], compress=True)
        zlib_props = {"content_type": "application/json", "user_properties": {"encoding": "zlib"}}
        v5.send(_topic("cam-1", "inferences"), inferences)
        v5.send(_topic("cam-1", "inferences"), inferences)  # a republish after a lost PUBACK
        v5.send(_topic("cam-1", "metrics"), metrics, zlib_props)
        v5.send(_topic("cam-1", "metrics"), metrics, zlib_props)
        # 3.1.1 has no properties: the payload says whether it is zlib
        v311.send(_topic("cam-2", "events"), _batch("cam-2", "events", [_event(s) for s in range(1, 6)], compress=True))
        v311.send(_topic("cam-2", "events"), _batch("cam-2", "events", [_event(s) for s in range(1, 8)]))
        worker.wait_messages(6)
    finally:
        v5.close()
        v311.close()
    stats = worker.close()
    assert stats == {
        "messages": 6,
        "records": 50 * 2 + 10 * 2 + 5 + 7,
        "stored": 50 + 10 + 7,
        "duplicates": 50 + 10 + 5,
        "rejected": 0,
        "errors": 0,
    }
    assert (_count(db, "inferences"), _count(db, "metrics"), _count(db, "events")) == (50, 10, 7)
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT * FROM inferences WHERE device = 'cam-1' AND seq = 7").fetchone()
        devices = {r["device"]: r["records"] for r in conn.execute("SELECT * FROM devices")}
    assert json.loads(row["result"]) == {"top": [{"label": "7", "score": 0.9}]}
    assert (row["model"], row["model_version"], row["latency_ms"], row["ts"]) == ("digits", "1.0.0", 8.5, 1.7e9 + 7)
    assert devices == {"cam-1": 60, "cam-2": 7}


def test_spoofed_and_garbage_batches_are_rejected_and_the_worker_goes_on(mqtt: Broker, tmp_path: Path) -> None:
    db = tmp_path / "fleet.sqlite"
    worker = Worker(mqtt, db, "ingest-reject", "reject")
    pub = Publisher(mqtt, "cam-3")
    try:
        # the topic says cam-3, the body says cam-9: an ACL lets cam-3 publish only under its own topics
        pub.send(_topic("cam-3", "events"), _batch("cam-9", "events", [_event(1)]))
        pub.send(_topic("cam-3", "metrics"), _batch("cam-3", "events", [_event(2)]))  # wrong table
        pub.send(_topic("cam-3", "events"), b"\x78garbage")
        pub.send(_topic("cam-3", "events"), b'{"v": 2, "records": []}')
        pub.send(_topic("cam-3", "events"), _batch("cam-3", "events", [_event(3)]))
        worker.wait_messages(5)
    finally:
        pub.close()
    stats = worker.close()
    assert (stats["rejected"], stats["stored"]) == (4, 1)
    assert _count(db, "events") == 1 and _count(db, "events", "device = 'cam-9'") == 0


def test_persistent_session_gets_what_was_published_while_the_worker_was_down(mqtt: Broker, tmp_path: Path) -> None:
    db = tmp_path / "fleet.sqlite"
    Worker(mqtt, db, "ingest-persistent", "persist").close()  # the broker now holds the session and its subscriptions
    pub = Publisher(mqtt, "cam-4")
    try:
        pub.send(_topic("cam-4", "inferences"), _batch("cam-4", "inferences", [_inference(s) for s in range(1, 21)]))
    finally:
        pub.close()
    worker = Worker(mqtt, db, "ingest-persistent", "persist")
    worker.wait_messages(1)
    assert worker.close()["stored"] == 20
    assert _count(db, "inferences", "device = 'cam-4'") == 20


def test_an_offline_member_keeps_its_share_until_it_returns(mqtt: Broker, tmp_path: Path) -> None:
    """Mosquitto 2.0 hands shared-subscription messages to offline persistent members too (documented)."""
    db = tmp_path / "fleet.sqlite"
    Worker(mqtt, db, "ingest-away", "hoard").close()
    present = Worker(mqtt, db, "ingest-present", "hoard")
    pub = Publisher(mqtt, "cam-5")
    try:
        for s in range(1, 11):
            pub.send(_topic("cam-5", "events"), _batch("cam-5", "events", [_event(s)]))
        present.wait_messages(1)
        time.sleep(0.3)
        assert 0 < present.ingest.stats()["messages"] < 10  # the rest waits in ingest-away's session
        away = Worker(mqtt, db, "ingest-away", "hoard")
        _wait(lambda: _count(db, "events", "device = 'cam-5'") == 10, 10, "the away member's share")
        assert present.ingest.stats()["messages"] + away.close()["messages"] == 10
    finally:
        pub.close()
        present.close()


# --- two processes, one share group --------------------------------------------------------------


def _start_cli_worker(broker: Broker, db: Path, client_id: str, group: str = "split") -> subprocess.Popen[str]:
    cmd = [
        sys.executable,
        "-m",
        "toolchain",
        "fleet",
        "ingest",
        "--db",
        str(db),
        "--broker",
        f"{broker.host}:{broker.port}",
        "--fleet",
        FLEET,
        "--share-group",
        group,
        "--client-id",
        client_id,
        "--json",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_ready(proc: subprocess.Popen[str], timeout: float = 20.0) -> None:
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if "ingest: subscribed" in line:
            return
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("ingest worker did not subscribe:\n" + "".join(lines))


def test_two_workers_split_the_messages_and_store_each_record_once(mqtt: Broker, tmp_path: Path) -> None:
    db = tmp_path / "fleet.sqlite"
    IngestStore(db).close()  # create the schema once, before two processes race for it
    workers = [_start_cli_worker(mqtt, db, f"ingest-split-{i}") for i in (1, 2)]
    try:
        for proc in workers:
            _wait_ready(proc)
        devices = [f"cam-{i}" for i in range(10, 14)]
        pubs = {d: Publisher(mqtt, d) for d in devices}
        try:
            batches = [
                (d, _batch(d, "inferences", [_inference(s) for s in range(k * 25 + 1, k * 25 + 26)]))
                for k in range(10)
                for d in devices
            ]
            for device, payload in batches:
                pubs[device].send(_topic(device, "inferences"), payload)
            for device, payload in batches[::2]:  # every other batch again
                pubs[device].send(_topic(device, "inferences"), payload)
        finally:
            for pub in pubs.values():
                pub.close()
        _wait(lambda: _count(db, "inferences") >= 1000, 20, "1000 rows")
        time.sleep(1.0)  # the re-sent batches were PUBACKed before the last new one; let both workers finish
        for proc in workers:
            proc.send_signal(signal.SIGTERM)
        outputs = [proc.communicate(timeout=20) for proc in workers]
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [proc.returncode for proc in workers] == [0, 0], outputs
    stats = [json.loads(out) for out, _ in outputs]
    assert all(s["messages"] > 0 for s in stats), stats  # the broker split the load
    assert sum(s["messages"] for s in stats) == 60
    assert sum(s["stored"] for s in stats) == 1000
    assert sum(s["duplicates"] for s in stats) == 500
    assert _count(db, "inferences") == 1000
    with sqlite3.connect(db) as conn:
        per_device = dict(conn.execute("SELECT device, count(DISTINCT seq) FROM inferences GROUP BY device"))
    assert per_device == dict.fromkeys(devices, 250)


def test_a_batch_that_cannot_be_stored_is_not_acknowledged(mqtt: Broker, tmp_path: Path) -> None:
    db = tmp_path / "fleet.sqlite"
    IngestStore(db).close()
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # another writer holds the database past the worker's busy timeout
    try:
        failing = _start_cli_worker(mqtt, db, "ingest-locked", "locked")
        _wait_ready(failing)
        pub = Publisher(mqtt, "cam-6")
        try:
            pub.send(_topic("cam-6", "events"), _batch("cam-6", "events", [_event(s) for s in range(1, 11)]))
        finally:
            pub.close()
        out, err = failing.communicate(timeout=30)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert failing.returncode == 1, (out, err)
    assert "cannot store" in err and "database is locked" in err and "Traceback" not in err
    assert _count(db, "events") == 0
    again = _start_cli_worker(mqtt, db, "ingest-locked", "locked")  # same session: the broker re-sends the batch
    try:
        _wait_ready(again)
        _wait(lambda: _count(db, "events") == 10, 15, "the re-sent batch")
        again.send_signal(signal.SIGTERM)
        out, err = again.communicate(timeout=20)
    finally:
        if again.poll() is None:
            again.kill()
            again.communicate()
    assert again.returncode == 0 and json.loads(out)["stored"] == 10, (out, err)


# --- the parsers, without a broker -----------------------------------------------------------------


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
_BATCHLIKE = st.fixed_dictionaries(
    {},
    optional={
        "v": st.sampled_from([1, 2, "1", None]),
        "device": st.sampled_from(["cam-1", "cam-2", "", 5]),
        "fleet": st.sampled_from([FLEET, "other"]),
        "table": st.sampled_from(["events", "metrics", "nope"]),
        "records": st.lists(st.dictionaries(st.sampled_from(["seq", "ts", "kind", "data"]), _JSON), max_size=3) | _JSON,
    },
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512) | _BATCHLIKE.map(lambda d: json.dumps(d).encode()))
def test_decode_batch_gives_a_batch_or_a_clean_error(raw: bytes) -> None:
    try:
        batch = decode_batch(raw, device="cam-1", fleet=FLEET, table="events")
    except BatchError:
        return
    assert isinstance(batch, Batch) and batch.device == "cam-1"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=60), max_size=80), st.integers(min_value=1, max_value=4))
def test_store_keeps_each_seq_once_however_often_and_however_batched(seqs: list[int], n_batches: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = IngestStore(Path(tmp) / "ingest.sqlite")
        try:
            totals = [0, 0, 0]
            for k in range(n_batches):
                records = [
                    {"seq": s, "ts": float(s), "name": "m", "value": s, "labels": {}} for s in seqs[k::n_batches]
                ]
                for i, n in enumerate(store.store(Batch("cam-1", FLEET, "metrics", records))):
                    totals[i] += n
            assert totals == [len(set(seqs)), len(seqs) - len(set(seqs)), 0]
            assert store.counts()["metrics"] == len(set(seqs))
        finally:
            store.close()


def test_store_refuses_a_database_of_another_schema(tmp_path: Path) -> None:
    from toolchain.errors import UsageError

    path = tmp_path / "other.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 9")
    with pytest.raises(UsageError, match=r"--db: .*schema version 9"):
        IngestStore(path)
    (tmp_path / "text.sqlite").write_text("not a database at all, just some text " * 100)
    with pytest.raises(UsageError, match="--db"):
        IngestStore(tmp_path / "text.sqlite")
