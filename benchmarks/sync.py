"""Figure 5: records/s acknowledged by store-and-forward sync ÷ a raw paho QoS 1 publish loop of the same payloads."""

from __future__ import annotations

import functools
import itertools
import random
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.broker import mosquitto
from benchmarks.harness import Context, Figure, Measure, Report, Spread, Table, alternate, ratios

__all__ = ["NAME", "TITLE", "run"]

NAME = "sync"
TITLE = "Sync throughput"
_BATCH = 200  # the runtime's default [mqtt] batch_size
_TIMEOUT_S = 120.0
_ids = itertools.count()

METHOD = (
    "Each repeat fills a fresh logbook (real SQLite file) with N inference records (digits-sized "
    "classification results with varied classes, scores, latencies and frame numbers), untimed. The "
    "subject is the runtime's `Sync` on a `Link` already "
    "connected (MQTT 5) to a real Mosquitto on loopback (no persistence): from `Sync.start()` until all "
    "N records are acknowledged — read from the outbox, batched ({batch} records per batch, the default), "
    "encoded (JSON, or zlib-compressed JSON), published QoS 1 with at most 8 batches in flight, and marked "
    "synced in the logbook after each PUBACK (with the commit it waits for). The baseline is a plain paho "
    "client (MQTT 5, loop thread) publishing the very same batch payloads, pre-encoded, QoS 1 on the same "
    "topic, timed until the last PUBACK (paho's default 20 messages in flight). They alternate over "
    "{repeats} repeats; the figure is the per-repeat ratio of records/s acknowledged. The broker runs on "
    "the same 2 cores as both publishers."
)


def _filled(folder: Path, n: int) -> Any:
    from runtime.logbook import Logbook, LogbookConfig

    folder.mkdir(parents=True, exist_ok=True)
    lb = Logbook(LogbookConfig(path=folder / f"outbox-{next(_ids)}.sqlite"), device_id="bench")
    rng = random.Random(0)  # varied results, so compression works on realistic records, not n copies of one
    for i in range(n):
        top = rng.randrange(10)
        result = {
            "top1": {"index": top, "label": str(top), "score": round(rng.uniform(0.5, 1.0), 4)},
            "topk": [[top, round(rng.uniform(0.5, 1.0), 4)], [rng.randrange(10), round(rng.uniform(0.0, 0.5), 4)]],
        }
        latency = round(rng.uniform(0.03, 0.2), 4)
        lb.record_inference(
            model="digits", version="1.0.0", input_ref=f"cam0#frame={i}", latency_ms=latency, result=result
        )
    lb.flush(60.0)
    return lb


def _payloads(folder: Path, n: int, compress: bool) -> list[bytes]:
    from runtime.sync import encode_batch

    lb = _filled(folder, n)
    try:
        records = lb.pending(n)  # one table only: batches are consecutive runs of the outbox, as Sync cuts them
        chunks = [records[i : i + _BATCH] for i in range(0, len(records), _BATCH)]
        return [encode_batch("bench", "bench", "inferences", c, compress=compress) for c in chunks]
    finally:
        lb.close()


def _sync_seconds(folder: Path, n: int, compress: bool, port: int) -> float:
    from runtime.link import Link, LinkConfig
    from runtime.sync import Sync

    lb = _filled(folder, n)
    link = Link(LinkConfig(client_id=f"bench-sync-{next(_ids)}", port=port, protocol="mqtt5"))
    link.start()
    try:
        if not link.wait_connected(10.0):
            raise RuntimeError(f"sync benchmark: no connection to the broker on port {port}")
        sync = Sync(link, lb, fleet="bench", device="bench", batch_size=_BATCH, compress=compress)
        t0 = time.perf_counter()
        sync.start()
        deadline = time.monotonic() + _TIMEOUT_S
        while sync.stats()["records_acked"] < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"sync acknowledged {sync.stats()['records_acked']} of {n} records in time")
            time.sleep(0.001)
        took = time.perf_counter() - t0
        sync.close()
        return took
    finally:
        link.stop()
        lb.close()


def _raw_seconds(payloads: list[bytes], port: int) -> float:
    from paho.mqtt.client import Client, MQTTv5
    from paho.mqtt.enums import CallbackAPIVersion

    done, acked = threading.Event(), itertools.count(1)
    client = Client(CallbackAPIVersion.VERSION2, client_id=f"bench-raw-{next(_ids)}", protocol=MQTTv5)
    client.on_publish = lambda *_: done.set() if next(acked) == len(payloads) else None
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        t0 = time.perf_counter()
        for p in payloads:
            client.publish("edge/bench/bench/inferences", p, qos=1)
        if not done.wait(_TIMEOUT_S):
            raise RuntimeError("raw paho: not every PUBACK arrived in time")
        return time.perf_counter() - t0
    finally:
        client.disconnect()
        client.loop_stop()


def run(ctx: Context) -> Report:
    """Sync with and without compression against the raw publish loop."""
    n, repeats = ctx.pick(20_000, 400), ctx.pick(7, 2)
    folder = ctx.work / NAME
    figures, rows = [], []
    with mosquitto() as broker:
        for compress in (False, True):
            payloads = _payloads(folder, n, compress)
            secs = alternate(
                {
                    "raw": functools.partial(_raw_seconds, payloads, broker.port),
                    "sync": functools.partial(_sync_seconds, folder, n, compress, broker.port),
                },
                repeats,
            )
            raw, sub = [n / s for s in secs["raw"]], [n / s for s in secs["sync"]]
            case = "compressed" if compress else "plain"
            size = sum(map(len, payloads)) / len(payloads)
            figures.append(
                Figure(
                    key=f"{NAME}.{case}",
                    label=f"{'zlib' if compress else 'JSON'} batches of {_BATCH}: Sync ÷ raw paho, records/s",
                    kind="ratio",
                    unit="",
                    value=Spread.of(ratios(sub, raw)),
                    baseline=Measure("raw paho QoS 1 publish loop, same payloads", "records/s", Spread.of(raw)),
                    subject=Measure("Sync, acknowledged and marked synced", "records/s", Spread.of(sub)),
                    config={"records": n, "batches": len(payloads), "mean_batch_bytes": size, "repeats": repeats},
                )
            )
            rows.append((case, len(payloads), size, size / _BATCH, Spread.of(sub).median, Spread.of(raw).median))
    table = Table(
        "Payloads and rates (medians)",
        ("batches", "count", "bytes per batch", "bytes per record", "Sync records/s", "raw paho records/s"),
        tuple(rows),
    )
    plain, packed = rows[0], rows[1]
    notes = (
        f"Compression shrinks a batch from {plain[2]:,.0f} to {packed[2]:,.0f} bytes "
        f"({packed[2] / plain[2]:.2f}×) for {packed[4] / plain[4]:.2f}× the plain Sync rate on this host.",
        "Sync's extra work per batch is reading the outbox, encoding, and the logbook commit that marks the "
        "batch synced; the raw loop does none of it, so the ratio is the price of store-and-forward.",
    )
    method = METHOD.format(batch=_BATCH, repeats=repeats)
    return Report(NAME, TITLE, method, tuple(figures), (table,), notes)
