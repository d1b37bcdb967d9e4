"""Figure 6: `edge-runtime serve` process start to READY ÷ ``python -c "import onnxruntime"``, cache warm and empty."""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import bundles
from benchmarks.harness import Context, Figure, Measure, Report, Skipped, Spread, Table, alternate, ratios
from benchmarks.process import child, child_env, notify_socket, wait_ready

__all__ = ["NAME", "TITLE", "import_seconds", "ready_seconds", "run"]

NAME = "cold_start"
TITLE = "Cold start to READY"
_CASES: tuple[tuple[str, Callable[[Context], bundles.BuiltBundle]], ...] = (
    ("digits", bundles.digits),
    ("ppocr_det", bundles.ppocr_det),
)
_SERVE = "import sys\nfrom runtime.cli import main\nsys.exit(main(['serve', '--config', sys.argv[1]]))"
_STOP_TIMEOUT_S = 30.0
_ids = itertools.count()

METHOD = (
    "The subject is a real `edge-runtime serve` process (`runtime.cli.main`, as the console script runs "
    "it) with a config that serves the bundle with no source, HTTP off and MQTT off; the time runs from "
    "just before `Popen` until `READY=1` arrives on a `NOTIFY_SOCKET` the benchmark listens on (sent "
    "after the bundle is verified, loaded and warmed up). **Warm cache**: the optimized-model cache "
    "(`cache_dir`) holds the model onnxruntime optimized on an earlier start (a device's every start but "
    "its first); **empty cache**: a new, empty `cache_dir` on every start (the first start after an "
    "install or an update, which optimizes the graph and writes the cache). The baseline is "
    '`python -c "import onnxruntime"`, start to exit, the least any onnxruntime program can pay. The '
    "three kinds of process run one at a time, alternating over {repeats} repeats; the figure is the "
    "per-repeat ratio. The page cache is warm for all of them (every file was read before)."
)


def import_seconds(folder: Path) -> float:
    """Wall time of ``python -c "import onnxruntime"``, start to exit."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import onnxruntime"], check=True, env=child_env(), cwd=folder)
    return time.perf_counter() - t0


def ready_seconds(config: Path, folder: Path) -> float:
    """Wall time from starting `edge-runtime serve` with ``config`` to its READY=1; then stops it."""
    log = folder / "serve.stderr"
    with notify_socket() as (sock, address):
        t0 = time.perf_counter()
        with child([sys.executable, "-c", _SERVE, str(config)], log, child_env(NOTIFY_SOCKET=address)) as proc:
            took = wait_ready(sock, proc, log) - t0
            proc.send_signal(signal.SIGTERM)
            if proc.wait(_STOP_TIMEOUT_S) != 0:
                raise RuntimeError(f"edge-runtime serve exited {proc.returncode} on SIGTERM: {log.read_text()[-3000:]}")
    return took


def _measure(ctx: Context, built: bundles.BuiltBundle, repeats: int) -> list[Figure]:
    folder = ctx.work / NAME / built.key
    warm_cache = folder / "cache-warm"

    def config(cache: Path) -> Path:
        tag = f"c{next(_ids)}"
        return bundles.service_config(folder / tag, built, state_dir=folder / "state", cache_dir=cache)

    warm = config(warm_cache)
    ready_seconds(warm, folder)  # fills the cache (and the page cache)
    secs = alternate(
        {
            "import": lambda: import_seconds(folder),
            "warm": lambda: ready_seconds(warm, folder),
            "empty": lambda: ready_seconds(config(folder / f"cache-empty-{next(_ids)}"), folder),
        },
        repeats,
    )
    base = Measure('python -c "import onnxruntime"', "s", Spread.of(secs["import"]))
    out = []
    for case, label in (("warm", "warm optimized-model cache"), ("empty", "empty optimized-model cache")):
        out.append(
            Figure(
                key=f"{NAME}.{built.key}_{case}_cache",
                label=f"{built.label}, {label}: to READY ÷ import onnxruntime",
                kind="ratio",
                unit="",
                value=Spread.of(ratios(secs[case], secs["import"])),
                baseline=base,
                subject=Measure("edge-runtime serve, start to READY=1", "s", Spread.of(secs[case])),
                config={**built.describe(), "repeats": repeats, "case": f"{built.label}, {label}"},
            )
        )
    return out


def run(ctx: Context) -> Report:
    """Every model, warm and empty cache, against the bare import."""
    repeats = ctx.pick(5, 1)
    figures: list[Figure] = []
    notes: list[str] = []
    for key, make in _CASES:
        try:
            built = make(ctx)
        except Skipped as exc:
            notes.append(f"{key}: skipped, {exc}.")
            figures += [
                Figure(f"{NAME}.{key}_{c}_cache", f"{key}, {c} cache", "ratio", "", None, skipped=str(exc))
                for c in ("warm", "empty")
            ]
            continue
        figures += _measure(ctx, built, repeats)
    rows: list[tuple[Any, ...]] = []
    for f in figures:
        if f.value is not None and f.subject is not None and f.baseline is not None:
            gap = f.subject.spread.median - f.baseline.spread.median
            rows.append((f.config["case"], f.baseline.spread.median, f.subject.spread.median, gap, f.value.median))
    table = Table(
        "Seconds to READY against the bare import (medians)",
        ("case", "import onnxruntime s", "serve to READY s", "serve's own s", "ratio"),
        tuple(rows),
    )
    notes += [f"{r[0]}: READY after {r[2]:.2f} s, {r[3]:.2f} s more than importing onnxruntime." for r in rows]
    return Report(NAME, TITLE, METHOD.format(repeats=repeats), tuple(figures), (table,), tuple(notes))
