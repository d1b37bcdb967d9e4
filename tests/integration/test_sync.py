"""Store-and-forward sync against a real Mosquitto: outages, broker restarts, kill -9 of the device, status, protocols.

Every test reads what a persistent-session QoS 1 subscriber (:class:`tests.broker.Collector`) got,
removes duplicates by (device, seq) as the ingest side does, and compares with the logbook.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime.errors import ConfigError
from runtime.link import Link, LinkConfig, Message, backoff_delay, fallback_protocol
from runtime.logbook import Logbook, LogbookConfig, open_readonly
from runtime.sync import BatchError, Sync, decode_batch, with_will
from runtime.topics import DATA_TABLES, escalate_response_topic, escalate_topic, fleet_filter, status_topic
from tests.broker import Broker, Collector, Received, broker_fixture  # noqa: F401 - the `broker` fixture
from tests.conftest import REPO

FLEET = "fleet1"
DEVICE_SCRIPT = Path(__file__).with_name("sync_device.py")
DATA = [fleet_filter(FLEET, t) for t in DATA_TABLES]


# --- helpers ---------------------------------------------------------------------------------------


def _logbook(tmp_path: Path, device: str = "dev1") -> Logbook:
    return Logbook(LogbookConfig(tmp_path / f"{device}.db", flush_interval_s=0.05), device_id=device)


def _write(logbook: Logbook, n: int) -> None:
    for i in range(n):
        if i % 3 == 0:
            logbook.record_inference(
                model="digits", version="1.0.0", input_ref=f"f{i}", latency_ms=0.5 + i, result={"top1": i % 10}
            )
        elif i % 3 == 1:
            logbook.record_metric("frames", float(i), labels={"source": "camera"})
        else:
            logbook.record_event("tick", f"record {i}", data={"i": i})
    logbook.flush(60)


def _link(b: Broker, device: str = "dev1", **kw: Any) -> Link:
    cfg = LinkConfig(client_id=device, port=b.port, reconnect_min_s=0.05, reconnect_max_s=0.5, **kw)
    return Link(with_will(cfg, fleet=FLEET, device=device))


def _records(messages: list[Received]) -> list[tuple[str, str, dict[str, Any]]]:
    """(device, table, record) for every record of every data batch received, duplicates included."""
    out = []
    for m in messages:
        if m.topic.rsplit("/", 1)[-1] in DATA_TABLES:
            batch = decode_batch(m.payload)
            out += [(batch["device"], batch["table"], r) for r in batch["records"]]
    return out


def _distinct(messages: list[Received]) -> dict[tuple[str, int], tuple[str, dict[str, Any]]]:
    """De-duplicated by (device, seq), as ingest does."""
    return {(d, r["seq"]): (t, r) for d, t, r in _records(messages)}


def _seqs(messages: list[Received]) -> set[int]:
    return {seq for _, seq in _distinct(messages)}


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.02)


def _assert_same_as_logbook(logbook: Logbook, got: dict[tuple[str, int], tuple[str, dict[str, Any]]]) -> None:
    """Every logbook row arrived once after de-duplication, with the same table and fields."""
    rows = {row["seq"]: row for row in logbook.export()}
    assert sorted(seq for _, seq in got) == sorted(rows)
    for (_, seq), (table, record) in got.items():
        row = rows[seq]
        assert table == row.pop("table")
        row.pop("synced")
        assert record == row, f"record {seq} differs from the logbook"


@pytest.fixture
def started() -> Iterator[list[Any]]:
    """Things to close at the end of a test, last first (Sync, Link, Logbook, Collector, Popen…)."""
    things: list[Any] = []
    yield things
    for thing in reversed(things):
        if isinstance(thing, subprocess.Popen):
            if thing.poll() is None:
                thing.kill()
            thing.wait()
        elif isinstance(thing, Link):
            thing.stop()
        else:
            thing.close() if hasattr(thing, "close") else thing.stop()
    left = [t.name for t in threading.enumerate() if t.name.startswith("edge-")]
    assert not left, f"threads left running after close: {left}"


def _start_sync(started: list[Any], link: Link, logbook: Logbook, **kw: Any) -> Sync:
    sync = Sync(link, logbook, fleet=FLEET, device=logbook.device_id, poll_interval_s=0.05, **kw)
    started += [logbook, link, sync]  # closed in reverse: sync, link, logbook
    sync.start()
    link.start()
    return sync


class _Proxy:
    """A TCP proxy to the real broker: can answer MQTT 5 as a 3.1.1-only broker does, or swallow all traffic."""

    def __init__(self, upstream: int, *, refuse_mqtt5: bool = False) -> None:
        self.upstream, self.refuse_mqtt5 = upstream, refuse_mqtt5
        self.refused = 0
        self.blackhole = False  # True: forward nothing either way (a network that silently drops packets)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._socks: list[socket.socket] = [self._server]
        threading.Thread(target=self._accept, daemon=True, name="test-proxy").start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            self._socks.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True, name="test-proxy").start()

    def _serve(self, client: socket.socket) -> None:
        head = b""
        while len(head) < 12:  # fixed header, remaining length (1 or 2 bytes), "\0\4MQTT", protocol level
            chunk = client.recv(12 - len(head))
            if not chunk:
                return
            head += chunk
        level = head[8] if head[1] & 0x80 == 0 else head[9]
        if level == 5 and self.refuse_mqtt5:
            self.refused += 1
            client.sendall(b"\x20\x02\x00\x01")  # CONNACK, return code 1: unacceptable protocol version
            client.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.upstream))
        self._socks.append(upstream)
        upstream.sendall(head)
        threading.Thread(target=self._pipe, args=(upstream, client), daemon=True, name="test-proxy").start()
        self._pipe(client, upstream)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self.blackhole:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        for s in self._socks:
            s.close()


# --- outages and restarts --------------------------------------------------------------------------


def test_records_made_while_the_broker_is_down_all_arrive(broker: Broker, tmp_path: Path, started: list[Any]) -> None:
    collector = Collector(broker, DATA, client_id="ingest-down")
    started.append(collector)
    broker.stop()  # SIGTERM: the collector's session is saved and comes back with the broker
    logbook = _logbook(tmp_path)
    link = _link(broker)
    sync = _start_sync(started, link, logbook)
    _write(logbook, 10_000)
    time.sleep(0.3)
    assert not link.connected
    assert logbook.stats()["unsynced"] == 10_000

    broker.start()
    _wait(lambda: logbook.stats()["unsynced"] == 0, 60, "the outbox to drain")
    assert collector.wait(lambda m: len(_distinct(m)) >= 10_000, 30), f"got {len(_distinct(collector.messages))}"
    got = _distinct(collector.messages)
    assert len(got) == 10_000
    _assert_same_as_logbook(logbook, got)
    assert sync.stats()["records_acked"] == 10_000
    assert sync.stats()["batches_failed"] == 0


def test_five_broker_restarts_during_a_50k_sync_lose_nothing(
    broker: Broker, tmp_path: Path, started: list[Any]
) -> None:
    """Restarts with SIGTERM: Mosquitto saves what it acknowledged (see tests/broker.py for SIGKILL)."""
    n = 50_000
    collector = Collector(broker, DATA, client_id="ingest-restarts")
    started.append(collector)
    logbook = _logbook(tmp_path)
    _write(logbook, n)
    link = _link(broker)
    sessions: list[bool] = []
    link.on_connect(sessions.append)
    sync = _start_sync(started, link, logbook, batch_size=200, max_inflight_batches=8)
    for k in range(1, 6):
        _wait(lambda k=k: sync.stats()["records_acked"] >= k * n // 7, 60, f"{k}/7 of the records acked")
        assert logbook.stats()["unsynced"] > 0, "the sync finished before the restarts; raise n"
        broker.restart()
    _wait(lambda: logbook.stats()["unsynced"] == 0, 60, "the outbox to drain")
    assert link.connects >= 6
    assert sessions[0] is False and all(sessions[1:]), f"the persistent session was not resumed: {sessions}"
    assert collector.wait(lambda m: len(_distinct(m)) >= n, 30), f"got {len(_distinct(collector.messages))}"
    got = _distinct(collector.messages)
    assert sorted(seq for _, seq in got) == list(range(1, n + 1))


def _thread_cpu_s(thread: threading.Thread) -> float:
    fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_partial_batch_held_back_during_an_outage_does_not_spin(
    broker: Broker, tmp_path: Path, started: list[Any]
) -> None:
    """Linger holds a partial batch back; if the link drops meanwhile, the sync thread must sleep, not spin."""
    logbook = _logbook(tmp_path)
    link = _link(broker)
    sync = _start_sync(started, link, logbook, batch_size=500, linger_s=0.3)
    _write(logbook, 5)  # a partial batch: published at once, starts the linger
    _wait(lambda: sync.stats()["records_acked"] == 5, 30, "the first partial batch")
    _write(logbook, 5)  # held back by the linger...
    broker.stop()  # ...and the link goes down before it is due
    _wait(lambda: not link.connected, 10, "the link to notice the outage")
    assert sync._thread is not None
    before = _thread_cpu_s(sync._thread)
    time.sleep(1.5)
    assert _thread_cpu_s(sync._thread) - before < 0.3  # a wait(0) loop would burn the whole 1.5 s
    broker.start()
    _wait(lambda: sync.stats()["records_acked"] == 10, 30, "the held-back batch after the outage")


def test_broker_sigkill_loses_at_most_what_it_had_just_acknowledged(
    broker: Broker, tmp_path: Path, started: list[Any]
) -> None:
    """SIGKILL gives Mosquitto no time to save: a message PUBACKed in the last milliseconds may be gone.

    The device still marks only acknowledged batches synced and re-sends the rest, so the collector
    misses at most the batches in flight at each kill (measured: 0 or 1 batch per kill).
    """
    n, batch, inflight, kills = 20_000, 100, 4, 5
    collector = Collector(broker, DATA, client_id="ingest-kills")
    started.append(collector)
    logbook = _logbook(tmp_path)
    _write(logbook, n)
    link = _link(broker)
    sync = _start_sync(started, link, logbook, batch_size=batch, max_inflight_batches=inflight)
    for k in range(1, kills + 1):
        _wait(lambda k=k: sync.stats()["records_acked"] >= k * n // (kills + 2), 60, f"{k} parts acked")
        broker.restart(kill=True)
        assert collector.wait(lambda _, k=k: collector.connects > k, 10)
    _wait(lambda: logbook.stats()["unsynced"] == 0, 60, "the outbox to drain")
    collector.wait(lambda m: len(_distinct(m)) >= n, 5)
    missing = n - len(_distinct(collector.messages))
    assert 0 <= missing <= kills * inflight * batch


def _device(
    tmp_path: Path, b: Broker, *args: str, name: str = "device", port: int | None = None
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start sync_device.py on ``tmp_path/device.db``, talking to ``port`` (default: the broker's)."""
    out = tmp_path / f"{name}.out"
    with open(out, "wb") as stdout, open(tmp_path / f"{name}.err", "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(DEVICE_SCRIPT), str(tmp_path / "device.db"), "--port", str(port or b.port), *args],
            stdout=stdout,
            stderr=stderr,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    return proc, out


def _last_acked(out: Path) -> int:
    lines = [line for line in out.read_text().splitlines() if line.startswith("acked ") and line.count(" ") == 3]
    return int(lines[-1].split()[1]) if lines else 0


def test_device_sigkill_mid_sync_loses_nothing(broker: Broker, tmp_path: Path, started: list[Any]) -> None:
    n, batch, inflight = 20_000, 200, 8
    collector = Collector(broker, DATA, client_id="ingest-device-kill")
    started.append(collector)
    proc, out = _device(tmp_path, broker, "--records", str(n), "--batch-size", str(batch), "--inflight", str(inflight))
    started.append(proc)
    _wait(lambda: _last_acked(out) >= n // 5 or proc.poll() is not None, 60, "the device to sync a fifth")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL, (tmp_path / "device.err").read_text()
    unsynced = open_readonly(tmp_path / "device.db").stats()["unsynced"]
    assert 0 < unsynced < n, "the kill did not land mid-sync"

    again, _ = _device(tmp_path, broker, "--batch-size", str(batch), "--inflight", str(inflight), name="again")
    started.append(again)
    assert again.wait(60) == 0, (tmp_path / "again.err").read_text()
    assert open_readonly(tmp_path / "device.db").stats()["unsynced"] == 0
    assert collector.wait(lambda m: len(_distinct(m)) >= n, 30)
    records = _records(collector.messages)
    distinct = _distinct(collector.messages)
    assert sorted(seq for _, seq in distinct) == list(range(1, n + 1))
    duplicates = len(records) - len(distinct)
    assert duplicates <= inflight * batch, f"{duplicates} duplicates: more than the batches in flight"


def test_device_sigkill_with_batches_in_flight_resends_them(broker: Broker, tmp_path: Path, started: list[Any]) -> None:
    """Batches published but never acknowledged (the network swallowed them) are still unsynced after kill -9."""
    n, batch, inflight = 6000, 100, 4
    proxy = _Proxy(broker.port)
    collector = Collector(broker, DATA, client_id="ingest-blackhole")
    started += [proxy, collector]
    args = ("--batch-size", str(batch), "--inflight", str(inflight))
    proc, out = _device(tmp_path, broker, "--records", str(n), *args, port=proxy.port)
    started.append(proc)
    _wait(lambda: _last_acked(out) >= n // 4 or proc.poll() is not None, 60, "the device to sync a quarter")
    proxy.blackhole = True
    time.sleep(0.3)  # acks already on their way land; then the device fills its window into the void
    acked = _last_acked(out)
    time.sleep(0.3)
    assert _last_acked(out) == acked, "acks arrived through a blackhole"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    synced = {row["seq"] for row in open_readonly(tmp_path / "device.db").export() if row["synced"]}
    assert 0 < len(synced) < n
    assert collector.wait(lambda m: synced <= _seqs(m), 5), "rows marked synced that the broker never got"

    again, _ = _device(tmp_path, broker, *args, name="again")
    started.append(again)
    assert again.wait(60) == 0, (tmp_path / "again.err").read_text()
    assert collector.wait(lambda m: len(_distinct(m)) >= n, 30), f"got {len(_distinct(collector.messages))}"
    assert sorted(seq for _, seq in _distinct(collector.messages)) == list(range(1, n + 1))


# --- payloads, status and protocols ----------------------------------------------------------------


def test_compressed_batches_are_zlib_and_decode_to_the_same_records(
    broker: Broker, tmp_path: Path, started: list[Any]
) -> None:
    collector = Collector(broker, DATA, client_id="ingest-zlib")
    started.append(collector)
    logbook = _logbook(tmp_path)
    _write(logbook, 3000)
    sync = _start_sync(started, _link(broker), logbook, compress=True, batch_size=250)
    _wait(lambda: logbook.stats()["unsynced"] == 0, 30, "the outbox to drain")
    assert collector.wait(lambda m: len(_distinct(m)) >= 3000, 10)
    for m in collector.messages:
        assert m.payload[:1] == b"\x78"
        assert dict(m.properties["UserProperty"]) == {"encoding": "zlib"}
        assert m.properties["ContentType"] == "application/json"
        raw = zlib.decompress(m.payload)
        assert len(m.payload) < len(raw) / 2
        assert decode_batch(m.payload) == json.loads(raw)
    _assert_same_as_logbook(logbook, _distinct(collector.messages))
    assert sync.stats()["batches_acked"] == len(collector.messages)


def _status(b: Broker, client_id: str, timeout: float = 10.0) -> Received:
    """The retained status a fresh subscriber gets."""
    with Collector(b, status_topic(FLEET, "dev1"), client_id=client_id) as c:
        assert c.wait(lambda m: bool(m), timeout), "no retained status"
        return c.messages[0]


def test_birth_retained_will_on_sigkill_offline_on_clean_stop(
    broker: Broker, tmp_path: Path, started: list[Any]
) -> None:
    watcher = Collector(broker, status_topic(FLEET, "dev1"), client_id="status-watch")
    started.append(watcher)
    proc, out = _device(tmp_path, broker, "--records", "30", "--hold")
    started.append(proc)
    _wait(lambda: "synced" in out.read_text().split(), 30, "the device to sync")
    birth = _status(broker, "status-1")
    body = json.loads(birth.payload)
    assert birth.retain and body["online"] is True
    assert {k: body[k] for k in ("device", "fleet", "group", "model", "version")} == {
        "device": "dev1",
        "fleet": FLEET,
        "group": "lab",
        "model": "digits",
        "version": "1.0.0",
    }

    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert watcher.wait(lambda m: json.loads(m[-1].payload)["online"] is False, 10), "no last will"
    will = _status(broker, "status-2")
    assert will.retain and json.loads(will.payload) == {
        "online": False,
        "device": "dev1",
        "fleet": FLEET,
        "reason": "lost",
    }

    again, out = _device(tmp_path, broker, "--hold", name="again")
    started.append(again)
    _wait(lambda: "synced" in out.read_text().split(), 30, "the device to reconnect")
    assert json.loads(_status(broker, "status-3").payload)["online"] is True
    again.send_signal(signal.SIGTERM)
    assert again.wait(10) == 0, (tmp_path / "again.err").read_text()
    stopped = json.loads(_status(broker, "status-4").payload)
    assert stopped["online"] is False and stopped["reason"] == "stopped"
    time.sleep(0.3)  # a will would come now if the broker had not discarded it on the clean disconnect
    assert json.loads(watcher.messages[-1].payload)["reason"] == "stopped"


def test_mqtt311_end_to_end(broker: Broker, tmp_path: Path, started: list[Any]) -> None:
    collector = Collector(broker, DATA, client_id="ingest-311", protocol="mqtt311")
    started.append(collector)
    logbook = _logbook(tmp_path)
    _write(logbook, 2000)
    link = _link(broker, protocol="mqtt311")
    _start_sync(started, link, logbook, compress=True)
    _wait(lambda: logbook.stats()["unsynced"] == 0, 30, "the outbox to drain")
    assert link.protocol_in_use == "mqtt311"
    assert collector.wait(lambda m: len(_distinct(m)) >= 2000, 10)
    assert all(m.properties == {} for m in collector.messages)  # no properties on 3.1.1: the payload says zlib
    _assert_same_as_logbook(logbook, _distinct(collector.messages))
    assert "as dev1 (p2, c0" in broker.log_tail(200)  # mosquitto logs 3.1.1 as p2 (v5 as p5); c0: persistent


def test_auto_falls_back_to_mqtt311_when_the_broker_refuses_mqtt5(
    broker: Broker, tmp_path: Path, started: list[Any]
) -> None:
    proxy = _Proxy(broker.port, refuse_mqtt5=True)
    collector = Collector(broker, DATA, client_id="ingest-fallback")
    started += [proxy, collector]
    logbook = _logbook(tmp_path)
    _write(logbook, 500)
    cfg = LinkConfig(client_id="dev1", port=proxy.port, protocol="auto", reconnect_min_s=0.05, reconnect_max_s=0.5)
    link = Link(with_will(cfg, fleet=FLEET, device="dev1"))
    _start_sync(started, link, logbook)
    _wait(lambda: logbook.stats()["unsynced"] == 0, 30, "the outbox to drain through the proxy")
    assert proxy.refused == 1
    assert link.protocol_in_use == "mqtt311"
    assert collector.wait(lambda m: len(_distinct(m)) >= 500, 10)
    assert "as dev1 (p2, c0" in broker.log_tail(200)


def test_fallback_decision() -> None:
    assert fallback_protocol("auto", "mqtt5", 0x84) == "mqtt311"
    assert fallback_protocol("auto", "mqtt5", 1) == "mqtt311"
    assert fallback_protocol("auto", "mqtt311", 0x84) is None  # already there
    assert fallback_protocol("mqtt5", "mqtt5", 0x84) is None  # pinned by the operator
    for refusal in (0x86, 0x87, 0x8A, 0x80):  # bad credentials, not authorized, banned, unspecified
        assert fallback_protocol("auto", "mqtt5", refusal) is None


def test_backoff_grows_to_the_cap_with_jitter() -> None:
    rng = random.Random(0)
    for attempt in range(12):
        d = min(30.0, 0.5 * 2**attempt)
        delays = [backoff_delay(attempt, 0.5, 30.0, rng) for _ in range(200)]
        assert all(d / 2 <= x <= d for x in delays)
        assert len(set(delays)) > 150  # jittered, not one value
    assert backoff_delay(10_000, 0.5, 30.0) <= 30.0


# --- the link on its own ---------------------------------------------------------------------------


def test_link_stops_within_a_second_while_the_broker_is_down(broker: Broker) -> None:
    port = broker.port
    broker.stop()
    link = Link(LinkConfig(client_id="lonely", port=port, reconnect_min_s=0.2))
    link.start()
    assert not link.wait_connected(0.5)
    handle = link.publish("edge/fleet1/lonely/events", b"{}")
    began = time.monotonic()
    link.stop()
    assert time.monotonic() - began < 1.0
    assert handle.failed and not handle.acked
    assert not [t for t in threading.enumerate() if t.name.startswith("edge-")]


def test_request_response_with_correlation_data(broker: Broker) -> None:
    server = Link(LinkConfig(client_id="model-server", port=broker.port))
    device = Link(LinkConfig(client_id="dev1", port=broker.port))

    def answer(msg: Message) -> None:
        server.publish(
            msg.properties["response_topic"],
            b"server:" + msg.payload,
            properties={"correlation_data": msg.properties["correlation_data"]},
        )

    try:
        server.start()
        device.start()
        assert server.wait_connected(5) and device.wait_connected(5)
        resp_topic = escalate_response_topic(FLEET, "dev1")
        assert device.request(escalate_topic(FLEET, "big"), b"x", response_topic=resp_topic, timeout=1.0) is None
        server.subscribe(escalate_topic(FLEET, "big"), answer)
        assert server.wait_subscribed(escalate_topic(FLEET, "big"), 5)
        reply = device.request(escalate_topic(FLEET, "big"), b"img-1", response_topic=resp_topic, timeout=5.0)
        assert reply is not None and reply.payload == b"server:img-1"
        assert len(reply.properties["correlation_data"]) == 16
    finally:
        device.stop()
        server.stop()


def test_a_refused_publish_fails_its_handle_and_the_batch_is_retried(tmp_path: Path, started: list[Any]) -> None:
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite edge/fleet1/dev1/status\ntopic read #\n")
    with Broker([f"acl_file {acl}"]) as b:
        link = Link(LinkConfig(client_id="dev1", port=b.port))
        link.start()
        assert link.wait_connected(5)
        ok = link.publish(status_topic(FLEET, "dev1"), b"{}")
        denied = link.publish("edge/fleet1/dev1/events", b"{}")
        assert ok.wait(5) and not denied.wait(5)
        assert denied.failed and "not authorized" in (denied.reason or "").lower()

        logbook = _logbook(tmp_path)
        _write(logbook, 10)
        sync = Sync(link, logbook, fleet=FLEET, device="dev1", poll_interval_s=0.05, retry_delay_s=0.2)
        started += [logbook, link, sync]
        sync.start()
        _wait(lambda: sync.stats()["batches_failed"] >= 6, 10, "batches to be refused and retried")
        assert logbook.stats()["unsynced"] == 10  # refused batches stay in the outbox


def test_decode_batch_refuses_what_is_not_a_batch() -> None:
    good = {"v": 1, "device": "d", "fleet": "f", "table": "events", "records": [{"seq": 1, "ts": 1.0}]}
    assert decode_batch(json.dumps(good).encode()) == good
    assert decode_batch(zlib.compress(json.dumps(good).encode())) == good
    bad = [
        b"",
        b"[]",
        b"\x78\x9c garbage",
        zlib.compress(b"{" * 10),
        json.dumps({**good, "v": 2}).encode(),
        json.dumps({**good, "table": "secrets"}).encode(),
        json.dumps({**good, "records": [{"seq": 0, "ts": 1.0}]}).encode(),
        json.dumps({**good, "records": [{"seq": True, "ts": 1.0}]}).encode(),
        zlib.compress(b" " * (17 * 1024 * 1024)),  # a zlib bomb past the decoded-size limit
    ]
    for payload in bad:
        with pytest.raises(BatchError):
            decode_batch(payload)


def test_records_are_spread_over_per_table_topics(broker: Broker, tmp_path: Path, started: list[Any]) -> None:
    collector = Collector(broker, DATA, client_id="ingest-topics")
    started.append(collector)
    logbook = _logbook(tmp_path)
    _write(logbook, 900)
    _start_sync(started, _link(broker), logbook, batch_size=100)
    assert {"edge-mqtt", "edge-sync"} <= {t.name for t in threading.enumerate()}
    assert collector.wait(lambda m: len(_distinct(m)) >= 900, 30)
    per_topic = collections.Counter()
    for m in collector.messages:
        batch = decode_batch(m.payload)
        assert m.topic == f"edge/{FLEET}/dev1/{batch['table']}"
        seqs = [r["seq"] for r in batch["records"]]
        assert seqs == sorted(seqs) and len(seqs) <= 100
        per_topic[batch["table"]] += len(seqs)
    assert per_topic == {"inferences": 300, "metrics": 300, "events": 300}


def test_username_and_password_reach_the_broker(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "dev1", "s3cret"], check=True)
    with Broker([f"password_file {passwords}"], allow_anonymous=False) as b:
        wrong = Link(LinkConfig(client_id="dev1", port=b.port, username="dev1", password="guess"))
        right = Link(LinkConfig(client_id="dev1", port=b.port, username="dev1", password="s3cret"))
        try:
            wrong.start()
            assert not wrong.wait_connected(1.0)
            assert "refused the connection" in caplog.text and "guess" not in caplog.text
            wrong.stop()
            right.start()
            assert right.wait_connected(5)
        finally:
            wrong.stop()
            right.stop()


def test_missing_tls_files_are_config_errors(tmp_path: Path) -> None:
    link = Link(LinkConfig(client_id="dev1", ca_file=str(tmp_path / "missing-ca.pem")))
    with pytest.raises(ConfigError, match="ca_file"):
        link.start()
    link.stop()
    with pytest.raises(ConfigError, match="needs cert_file"):
        LinkConfig(client_id="dev1", key_file="k.pem")
