"""Figure 3: latency and throughput for 1…N inference threads, with and without the runtime's thread plan."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks import bundles
from benchmarks.broker import mosquitto
from benchmarks.harness import Context, Figure, Measure, Report, Spread, Table, alternate, ratios
from benchmarks.serve_overhead import drained, served

__all__ = ["NAME", "TITLE", "run", "thread_counts"]

NAME = "threads"
TITLE = "Threading"

METHOD = (
    "The mid-size CNN (FP32, the middle of the overhead curve, milliseconds per inference) is served by "
    "an in-process `Service` with logging and sync on (SQLite logbook, MQTT link to a real Mosquitto on "
    "loopback), started once per thread count k with `[threads] inference = k`. **With the plan**: the "
    "runtime's engine as the thread plan sets it up (k clipped to the usable cores, intra-op pool "
    "pinned when inference and I/O have cores of their own, spinning off, OpenCV/BLAS budget of one "
    "thread, I/O threads moved to the I/O cores). **Without**: a plain `InferenceSession` with "
    "`intra_op_num_threads = k` and onnxruntime's defaults otherwise (spinning on, no affinity). Both "
    "loops run the same preprocessed input and log every result with `Logbook.record_inference`, so "
    "the logbook writer and the sync thread (batches published QoS 1 and marked synced) are busy "
    "throughout. The two loops alternate over {repeats} repeats of about {seconds} s each; throughput "
    "is inferences per second of a run, latency the p50/p95 of the single calls in it. The figure per "
    "k is the per-repeat throughput ratio, plan ÷ defaults."
)


def thread_counts(cores: int) -> list[int]:
    """1 … cores, plus one more than the cores (what oversubscription does)."""
    return [*range(1, cores + 1), cores + 1]


def _bare(model_file: Any, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads  # everything else onnxruntime's default
    return ort.InferenceSession(str(model_file), sess_options=so, providers=["CPUExecutionProvider"])


def _loop(step: Callable[[], object], log: Callable[[], object], n: int, lat: list[float]) -> float:
    """Seconds for ``n`` inferences, each followed by its logbook record; single-call latencies into ``lat``."""
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        step()
        lat.append(time.perf_counter() - t)
        log()
    return time.perf_counter() - t0


def _measure(ctx: Context, built: bundles.BuiltBundle, k: int, broker: tuple[str, int]) -> dict[str, Any]:
    folder = ctx.work / NAME / f"k{k}"
    config = bundles.service_config(folder, built, state_dir=folder / "state", mqtt=broker, threads=k)
    repeats = ctx.pick(9, 2)
    with served(config) as svc:
        model, logbook = svc.model, svc.logbook
        feeds = model.tensor_from_image(built.image)
        bare = _bare(built.model_file, k)
        record = {"k": k}

        def log() -> object:
            return logbook.record_inference(
                model=model.name, version=model.version, input_ref="bench", latency_ms=1.0, result=record
            )

        steps: dict[str, Callable[[], object]] = {
            "plan": functools.partial(model.engine.run, feeds),
            "defaults": functools.partial(bare.run, None, feeds),
        }
        for step in steps.values():
            step()
        per = time.perf_counter()
        for _ in range(5):
            steps["plan"]()
        per = (time.perf_counter() - per) / 5
        n = int(min(max(ctx.pick(0.5, 0.03) / max(per, 1e-6), ctx.pick(20, 3)), 50_000))
        lat: dict[str, list[float]] = {name: [] for name in steps}
        secs = alternate(
            {name: functools.partial(_loop, step, log, n, lat[name]) for name, step in steps.items()}, repeats
        )
        plan = dict(svc.plan)
        synced = drained(svc)["records_acked"]
    tput = {name: [n / s for s in v] for name, v in secs.items()}
    return {"k": k, "n": n, "repeats": repeats, "tput": tput, "lat": lat, "plan": plan, "synced": synced}


def _figure(m: dict[str, Any]) -> Figure:
    k = m["k"]
    pct = {name: np.percentile(np.array(v) * 1000, [50, 95]).tolist() for name, v in m["lat"].items()}
    return Figure(
        key=f"{NAME}.k{k}",
        label=f"{k} thread{'s' if k > 1 else ''}: throughput, thread plan ÷ onnxruntime defaults",
        kind="ratio",
        unit="",
        value=Spread.of(ratios(m["tput"]["plan"], m["tput"]["defaults"])),
        baseline=Measure("InferenceSession, onnxruntime defaults", "inferences/s", Spread.of(m["tput"]["defaults"])),
        subject=Measure("runtime engine, thread plan", "inferences/s", Spread.of(m["tput"]["plan"])),
        config={
            "threads_requested": k,
            "plan": m["plan"],
            "items_per_run": m["n"],
            "repeats": m["repeats"],
            "p50_ms": {name: v[0] for name, v in pct.items()},
            "p95_ms": {name: v[1] for name, v in pct.items()},
            "records_synced": m["synced"],
        },
    )


def run(ctx: Context) -> Report:
    """Measure every thread count with and without the plan, logbook and sync busy."""
    built = bundles.mid_cnn(ctx)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    counts = thread_counts(cores) if not ctx.quick else [1, 2]
    with mosquitto() as broker:
        measured = [_measure(ctx, built, k, (broker.host, broker.port)) for k in counts]
    figures = tuple(_figure(m) for m in measured)
    rows = []
    for f in figures:
        c = f.config
        assert f.baseline is not None and f.subject is not None and f.value is not None
        rows.append(
            (
                c["threads_requested"],
                c["plan"]["intra_op_threads"],
                c["plan"]["mode"],
                f.subject.spread.median,
                f.baseline.spread.median,
                f.value.median,
                c["p50_ms"]["plan"],
                c["p50_ms"]["defaults"],
                c["p95_ms"]["plan"],
                c["p95_ms"]["defaults"],
            )
        )
    table = Table(
        f"{built.label}: throughput and latency per thread count (medians; logbook and sync busy)",
        (
            "threads requested",
            "plan's intra-op threads",
            "plan mode",
            "plan inf/s",
            "defaults inf/s",
            "plan ÷ defaults",
            "plan p50 ms",
            "defaults p50 ms",
            "plan p95 ms",
            "defaults p95 ms",
        ),
        tuple(rows),
    )
    best = max(rows, key=lambda r: r[3])
    notes = (
        f"This host has {cores} usable cores; the plan's mode here is '{rows[0][2]}' (I/O shares the inference "
        "cores below 4 cores, so nothing is pinned and the gain, if any, comes from spinning off and the thread "
        "count clipped to the cores).",
        f"Most throughput with the plan: {best[0]} thread(s) requested ({best[1]} used), {best[3]:,.0f} inferences/s.",
        "Beyond the core count the defaults oversubscribe (more pool threads than cores, spinning), while the "
        "plan clips the request to the cores.",
        *(
            f"With {r[0]} threads the plan serves {r[5]:.2f}× the defaults' throughput: onnxruntime's spinning pool "
            "threads burn the cores the logbook writer and sync threads (and every other process) need."
            for r in rows
            if r[0] == cores and r[5] > 1.1
        ),
        *(
            f"With {r[0]} thread(s) the plan serves {r[5]:.2f}× the defaults' throughput: the profile turns "
            "spinning off (heat on passively cooled boards, cores shared with other jobs), so pool threads sleep "
            "between operators and pay a wake-up each time, which costs throughput on this host. A profile that "
            "can afford the heat turns it on (`[runtime] spinning = true`)."
            for r in rows
            if r[5] < 0.97
        ),
    )
    method = METHOD.format(repeats=ctx.pick(9, 2), seconds=ctx.pick(0.5, 0.03))
    return Report(NAME, TITLE, method, figures, (table,), notes)
