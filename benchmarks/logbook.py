"""Figure 4: logbook records/s ÷ raw sqlite3 ``executemany`` in one transaction, for each durability setting."""

from __future__ import annotations

import functools
import itertools
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import Context, Figure, Measure, Report, Spread, Table, alternate, ratios

__all__ = ["NAME", "SETTINGS", "TITLE", "run"]

NAME = "logbook"
TITLE = "Logbook write rate"
#: (case, label, LogbookConfig fields)
SETTINGS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("default", "default (commit every 0.5 s or 500 records, synchronous=NORMAL)", {}),
    ("synchronous_full", "synchronous=FULL (fsync each commit)", {"synchronous": "full"}),
    ("durable", "durable (each record committed before it returns)", {"durable": True}),
    ("durable_full", "durable + synchronous=FULL", {"durable": True, "synchronous": "full"}),
)
_RESULT = {"top1": {"index": 3, "label": "3", "score": 0.981}, "topk": [[3, 0.981], [8, 0.012]], "latency_ms": 0.04}
_files = itertools.count()

METHOD = (
    "The subject is the runtime's `Logbook` on a fresh file: N `record_inference` calls from one thread "
    "(a digits-sized classification result, JSON-encoded by the logbook), then `flush()` until the writer "
    "thread has committed them all; records/s = N ÷ that time. The baseline writes the same N rows into "
    "the same schema (`inferences` table, WAL, the same pragmas, created by the logbook's own "
    "`open_database`) with plain `sqlite3`: JSON-encode each result, then one `executemany` in one "
    "transaction (`BEGIN IMMEDIATE … COMMIT`) with synchronous=NORMAL. Subject and baseline alternate "
    "over {repeats} repeats, each on its own fresh file in the benchmark's temporary directory "
    "(this machine's disk); N is chosen per setting so a run lasts about {seconds} s (durable settings "
    "commit once per record and are far slower). The figure is the per-repeat ratio of records/s."
)


def _fresh(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"logbook-{next(_files)}.sqlite"


def _raw(folder: Path, n: int) -> float:
    """Seconds for the plain-sqlite3 baseline to store ``n`` rows in one transaction."""
    from runtime.logbook_schema import INSERT, open_database

    conn = open_database(_fresh(folder), synchronous="normal", wal_bytes=64 << 20, busy_timeout_s=5.0)
    try:
        t0 = time.perf_counter()
        now = time.time()
        rows = [(i + 1, now, "digits", "1.0.0", "bench", None, 0.04, json.dumps(_RESULT), 0) for i in range(n)]
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(INSERT["inferences"], rows)
        conn.execute("COMMIT")
        return time.perf_counter() - t0
    finally:
        conn.close()


def _subject(folder: Path, n: int, fields: dict[str, Any]) -> float:
    """Seconds for the runtime's Logbook to record and commit ``n`` inferences."""
    from runtime.logbook import Logbook, LogbookConfig

    with Logbook(LogbookConfig(path=_fresh(folder), **fields), device_id="bench") as lb:
        t0 = time.perf_counter()
        for _ in range(n):
            lb.record_inference(model="digits", version="1.0.0", input_ref="bench", latency_ms=0.04, result=_RESULT)
        lb.flush(60.0)
        return time.perf_counter() - t0


def _count(folder: Path, fields: dict[str, Any], seconds: float) -> int:
    probe = 50 if fields.get("durable") else 2000
    per = _subject(folder, probe, fields) / probe
    return int(min(max(seconds / per, 20), 500_000))


def run(ctx: Context) -> Report:
    """Every durability setting against the raw baseline."""
    folder = ctx.work / NAME
    repeats, seconds = ctx.pick(7, 2), ctx.pick(0.5, 0.03)
    figures: list[Figure] = []
    rows: list[tuple[Any, ...]] = []
    default_rate = None
    for case, label, fields in SETTINGS:
        n = _count(folder, fields, seconds)
        runs = {
            "raw": functools.partial(_raw, folder, n),
            "logbook": functools.partial(_subject, folder, n, fields),
        }
        secs = alternate(runs, repeats)
        raw, sub = [n / s for s in secs["raw"]], [n / s for s in secs["logbook"]]
        fig = Figure(
            key=f"{NAME}.{case}",
            label=f"{label}: Logbook ÷ raw sqlite3, records/s",
            kind="ratio",
            unit="",
            value=Spread.of(ratios(sub, raw)),
            baseline=Measure("sqlite3 executemany, one transaction", "records/s", Spread.of(raw)),
            subject=Measure("Logbook.record_inference + flush", "records/s", Spread.of(sub)),
            config={"records_per_run": n, "repeats": repeats, **fields},
        )
        figures.append(fig)
        rate = Spread.of(sub).median
        default_rate = default_rate or rate
        rows.append((label, rate, 1e6 / rate, rate / default_rate, Spread.of(raw).median))
    table = Table(
        "Cost of each durability setting (medians)",
        ("setting", "records/s", "µs per record", "÷ default setting", "raw sqlite3 records/s"),
        tuple(rows),
    )
    notes = tuple(
        f"{r[0]}: {r[1]:,.0f} records/s ({r[2]:,.1f} µs each), {r[3]:.3f}× the default setting." for r in rows
    )
    return Report(NAME, TITLE, METHOD.format(repeats=repeats, seconds=seconds), tuple(figures), (table,), notes)
