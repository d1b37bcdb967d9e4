"""Host benchmark of reference and candidate, each in a fresh process so peak memory is its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from runtime.bench import BenchResult
from runtime.engine import EngineOptions
from toolchain.errors import PassError

__all__ = ["bench_model", "host_options"]


def host_options(options: EngineOptions) -> EngineOptions:
    """The profile's thread settings clipped to this host's cores (reported as host figures)."""
    from dataclasses import replace

    cores = os.cpu_count() or 1
    threads = max(1, min(options.intra_op_threads, cores))
    pins = tuple(c for c in options.pin_cores if c < cores)[:threads]
    return replace(options, intra_op_threads=threads, pin_cores=pins)


def bench_model(
    model: Path,
    options: EngineOptions,
    *,
    feeds: Mapping[str, np.ndarray] | None = None,
    iterations: int = 50,
    warmup: int = 5,
    progress: Callable[[int, int], None] | None = None,
) -> BenchResult:
    """Benchmark ``model`` with ``python -m runtime.bench`` in a child process."""
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "runtime.bench",
            str(model),
            "--threads",
            str(options.intra_op_threads),
            "--iterations",
            str(iterations),
            "--warmup",
            str(warmup),
            "--progress",
        ]
        if options.pin_cores:
            cmd += ["--pin", ",".join(str(c) for c in options.pin_cores)]
        if feeds is not None:
            path = Path(tmp) / "feeds.npz"
            np.savez(path, **dict(feeds))  # type: ignore[arg-type]
            cmd += ["--feeds", str(path)]
        errors: list[str] = []
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
            assert proc.stderr is not None and proc.stdout is not None
            for line in proc.stderr:
                parts = line.split()
                if len(parts) == 3 and parts[0] == "progress":
                    if progress:
                        progress(int(parts[1]), int(parts[2]))
                else:
                    errors.append(line)
            out = proc.stdout.read()
            code = proc.wait()
        if code != 0:
            raise PassError(f"benchmark of {model.name} failed: {''.join(errors)[-2000:]}", pass_name="bench")
    return BenchResult(**json.loads(out))
