"""Latency, throughput and memory of one model on this machine, with a given thread plan.

Run as ``python -m runtime.bench MODEL --json`` to measure in a fresh process, so peak memory
is the model's and not whatever the caller had loaded.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from runtime.engine import EngineOptions, backend_for, open_engine
from runtime.manifest import TensorSpec

__all__ = ["BenchResult", "benchmark", "random_feeds"]


@dataclass(frozen=True)
class BenchResult:
    """Timings in milliseconds; memory in MiB (peak resident set of the measuring process)."""

    iterations: int
    threads: int
    provider: str
    p50_ms: float
    p95_ms: float
    mean_ms: float
    throughput_per_s: float
    peak_rss_mb: float
    load_ms: float


def random_feeds(inputs: tuple[TensorSpec, ...], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs of the right shape; dynamic dimensions become 1."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in inputs:
        shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in spec.shape)
        if spec.dtype.startswith("float"):
            feeds[spec.name] = rng.random(shape, dtype=np.float32).astype(spec.dtype)
        elif spec.dtype == "bool":
            feeds[spec.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[spec.name] = rng.integers(0, 8, shape).astype(spec.dtype)
    return feeds


def _peak_rss_mb() -> float:
    # VmHWM belongs to this process image; ru_maxrss survives exec and would report the
    # parent's peak when the parent was bigger (a toolchain with torch loaded, say).
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 1024.0 / 1024.0


def benchmark(
    model: Path,
    options: EngineOptions,
    *,
    feeds: Mapping[str, np.ndarray] | None = None,
    warmup: int = 5,
    iterations: int = 50,
    backend: str = "onnxruntime",
    progress: Callable[[int, int], None] | None = None,
) -> BenchResult:
    """Time ``iterations`` runs after ``warmup`` runs."""
    t0 = time.perf_counter()
    engine = open_engine(model, backend=backend, options=options)
    load_ms = (time.perf_counter() - t0) * 1000
    try:
        data = dict(feeds) if feeds is not None else random_feeds(engine.inputs)
        for _ in range(warmup):
            engine.run(data)
        times = np.empty(iterations)
        for i in range(iterations):
            t = time.perf_counter()
            engine.run(data)
            times[i] = time.perf_counter() - t
            if progress:
                progress(i + 1, iterations)
        ms = times * 1000
        return BenchResult(
            iterations=iterations,
            threads=options.intra_op_threads,
            provider=engine.provider,
            p50_ms=float(np.percentile(ms, 50)),
            p95_ms=float(np.percentile(ms, 95)),
            mean_ms=float(ms.mean()),
            throughput_per_s=float(iterations / times.sum()),
            peak_rss_mb=_peak_rss_mb(),
            load_ms=load_ms,
        )
    finally:
        engine.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m runtime.bench``: one model, JSON result on stdout."""
    ap = argparse.ArgumentParser(prog="python -m runtime.bench", description=__doc__)
    ap.add_argument("model", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pin", default="", help="comma-separated cores for intra-op threads")
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--feeds", type=Path, help=".npz with one array per input name")
    ap.add_argument("--progress", action="store_true", help="print 'progress I N' lines on stderr")
    args = ap.parse_args(argv)
    pin = tuple(int(c) for c in args.pin.split(",") if c)
    opts = EngineOptions(intra_op_threads=args.threads, pin_cores=pin)
    feeds = dict(np.load(args.feeds)) if args.feeds else None

    def report(i: int, n: int) -> None:
        print(f"progress {i} {n}", file=sys.stderr, flush=True)

    result = benchmark(
        args.model,
        opts,
        backend=backend_for(args.model),
        feeds=feeds,
        warmup=args.warmup,
        iterations=args.iterations,
        progress=report if args.progress else None,
    )
    json.dump(asdict(result), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
