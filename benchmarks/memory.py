"""Figure 7: resident memory of `edge-runtime serve` (digits), idle and after requests, minus bare onnxruntime."""

from __future__ import annotations

import functools
import itertools
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import bundles
from benchmarks.harness import Context, Figure, Goal, Measure, Report, Spread, Table, alternate, differences
from benchmarks.process import child, child_env, notify_socket, wait_ready

__all__ = ["GOAL", "NAME", "TITLE", "Sample", "bare_sample", "proc_memory", "run", "serve_sample"]

NAME = "memory"
TITLE = "Memory"
GOAL = Goal("<=", 25.0)
REPO = Path(__file__).resolve().parent.parent
_MIB = 1024.0  # /proc reports kB (KiB)
_READY_TIMEOUT_S = 120.0  # the baseline process
_STOP_TIMEOUT_S = 30.0
# imports that may explain the gap, each measured on top of the bare baseline (when serve loaded it)
_SUSPECTS = (
    "cv2",
    "sqlite_utils",
    "http.server",
    "ssl",  # http.client imports it at module level, so the local HTTP endpoint pulls in OpenSSL
    "cryptography.hazmat.primitives.asymmetric.ed25519",
    "psutil",
    "sqlite3",
)
_NOT_PACKAGES = frozenset({"cython_runtime"})  # a pseudo-module Cython extensions register
_counter = itertools.count()

# The service as the console script runs it, plus a SIGUSR1 handler that lists sys.modules (sent only
# after memory has been read). `json` and `signal` are imported by the service anyway.
_SERVE = r"""
import json, os, signal, sys
config, dump = sys.argv[1], sys.argv[2]

def _dump(*_):
    with open(dump + ".tmp", "w") as fh:
        json.dump(sorted(sys.modules), fh)
    os.replace(dump + ".tmp", dump)

signal.signal(signal.SIGUSR1, _dump)
from runtime.cli import main
sys.exit(main(["serve", "--config", config]))
"""

# The baseline: numpy + onnxruntime + a session on the same model, run once, then idle.
_BARE = r"""
import os, signal, sys, time
ready, dump, model, threads, imports = sys.argv[1:6]

def _dump(*_):
    import json
    with open(dump + ".tmp", "w") as fh:
        json.dump(sorted(sys.modules), fh)
    os.replace(dump + ".tmp", dump)

signal.signal(signal.SIGUSR1, _dump)
import numpy as np
import onnxruntime as ort
failed = []
for name in (open(imports).read().split() if imports != "-" else []):
    try:
        __import__(name)
    except Exception:
        failed.append(name)
so = ort.SessionOptions()
so.intra_op_num_threads = int(threads)
so.inter_op_num_threads = 1
so.add_session_config_entry("session.intra_op.allow_spinning", "0")
sess = ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])
types = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(int64)": np.int64}
feeds = {
    i.name: np.zeros([d if isinstance(d, int) and d > 0 else 1 for d in i.shape], types.get(i.type, np.float32))
    for i in sess.get_inputs()
}
sess.run(None, feeds)
with open(ready, "w") as fh:
    fh.write(" ".join(failed))
while True:
    time.sleep(3600)
"""

METHOD = (
    "The digits INT8 bundle is served by a real `edge-runtime serve` subprocess (`runtime.cli.main`, as "
    "the console script runs it) from a config with no source and the HTTP endpoint on port 0; READY is "
    "read from a test `NOTIFY_SOCKET` (sent after the model is loaded and warmed up), then the process "
    "idles {idle} s and VmRSS and VmHWM are read from `/proc/<pid>/status`. The baseline is a "
    "`python -c` process that imports numpy and onnxruntime, creates an `InferenceSession` on the same "
    "`model.onnx` with the same intra-op threads, runs it once and sleeps; its memory is read the same "
    "way after the same idle time. `existing logbook` reuses a logbook file created by an earlier start "
    "(the steady state of a device); `fresh logbook` starts on a new file, which runs the schema "
    "migrations. `loaded` starts serve with the HTTP endpoint on a fixed port and, after READY, posts "
    "{requests} PNG images of a digit to `POST /v1/infer` one after the other (each inferred, logged and "
    "committed), then idles and is read the same way. The optimized-model cache is warm in all. "
    "Baseline and serve processes alternate, "
    "one at a time, over {repeats} repeat(s); the figure is the median of the per-repeat differences. Memory "
    "is in MiB (1,048,576 bytes). The module lists come from `sys.modules`, dumped on SIGUSR1 after the "
    "memory was read; the attribution table starts the baseline again with one more import (or every "
    "module serve had loaded) and reports the extra resident memory."
)


@dataclass(frozen=True)
class Sample:
    """Memory of one idle process and the modules it had loaded."""

    rss_mb: float
    hwm_mb: float
    modules: tuple[str, ...]


def proc_memory(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of ``pid`` in MiB, from ``/proc/<pid>/status``."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / _MIB
    return values["VmRSS"], values["VmHWM"]


def _modules(proc: subprocess.Popen[bytes], dump: Path, log: Path) -> tuple[str, ...]:
    proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10.0
    while not dump.is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"pid {proc.pid} did not list its modules (exit {proc.returncode}); see {log}")
        time.sleep(0.02)
    return tuple(json.loads(dump.read_text()))


def serve_sample(config: Path, folder: Path, idle_s: float, load: Callable[[], object] | None = None) -> Sample:
    """Start `edge-runtime serve` with ``config``, wait for READY (then ``load()``) and ``idle_s``, read its memory."""
    n = next(_counter)
    dump, log = folder / f"serve-{n}.modules.json", folder / "serve.stderr"
    with notify_socket() as (sock, address):
        args = [sys.executable, "-c", _SERVE, str(config), str(dump)]
        with child(args, log, child_env(NOTIFY_SOCKET=address)) as proc:
            wait_ready(sock, proc, log)
            if load is not None:
                load()
            time.sleep(idle_s)
            rss, hwm = proc_memory(proc.pid)
            modules = _modules(proc, dump, log)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(_STOP_TIMEOUT_S)
            if code != 0:
                raise RuntimeError(f"edge-runtime serve exited {code} on SIGTERM; see {log}")
    return Sample(rss, hwm, modules)


def bare_sample(model: Path, threads: int, folder: Path, idle_s: float, imports: Sequence[str] = ()) -> Sample:
    """The baseline process (numpy + onnxruntime + session, run once), optionally with ``imports`` on top."""
    n = next(_counter)
    ready, dump, log = folder / f"bare-{n}.ready", folder / f"bare-{n}.modules.json", folder / "bare.stderr"
    listing = "-"
    if imports:
        listing = str(folder / f"bare-{n}.imports")
        Path(listing).write_text("\n".join(imports))
    args = [sys.executable, "-c", _BARE, str(ready), str(dump), str(model), str(threads), listing]
    with child(args, log, child_env()) as proc:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while not ready.is_file():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the baseline process did not get ready (exit {proc.returncode}); see {log}")
            time.sleep(0.02)
        time.sleep(idle_s)
        rss, hwm = proc_memory(proc.pid)
        modules = _modules(proc, dump, log)
    return Sample(rss, hwm, modules)


def _importable(modules: Iterable[str]) -> list[str]:
    """Modules worth importing again in a baseline: not entry points, not private aliases of the interpreter."""
    return [m for m in modules if m != "__main__" and not m.endswith(".__main__") and not m.startswith("_frozen")]


def _third_party(modules: Iterable[str]) -> set[str]:
    tops = {m.split(".")[0] for m in modules}
    return {t for t in tops if not t.startswith("_") and t not in sys.stdlib_module_names and t not in _NOT_PACKAGES}


@dataclass
class _Run:
    """Everything measured in one run of this benchmark."""

    samples: dict[str, list[Sample]]
    attribution: dict[str, list[float]]
    bare_rss: float  # median, what attribution is relative to
    threads: int
    idle_s: float
    repeats: int
    model: dict[str, Any]


def _measure(ctx: Context) -> _Run:
    from runtime.cpu import plan_threads, read_topology

    built = bundles.digits(ctx)
    root = ctx.work / NAME
    threads = plan_threads(read_topology()).intra_op_threads  # what serve's thread plan gives the engine
    idle, repeats = ctx.pick(2.0, 0.3), ctx.pick(3, 1)
    cache = root / "cache"

    def config(tag: str, logbook: Path) -> Path:
        return bundles.service_config(
            root / tag, built, state_dir=root / tag / "state", cache_dir=cache, logbook_path=logbook, http=True
        )

    existing = config("existing", root / "existing" / "logbook.sqlite")
    serve_sample(existing, root, idle)  # creates the logbook file and warms the optimized-model cache
    port = _free_port()
    loaded = bundles.service_config(
        root / "loaded", built, state_dir=root / "loaded" / "state", cache_dir=cache, http=True, http_port=port
    )
    serve_sample(loaded, root, idle)  # its logbook exists too: loaded is compared with existing
    requests = ctx.pick(500, 10)
    png = _png(built.image)
    samples: dict[str, list[Sample]] = {"bare": [], "existing": [], "fresh": [], "loaded": []}
    fresh = (config(f"fresh-{i}", root / f"fresh-{i}" / "logbook.sqlite") for i in range(repeats))

    def take(kind: str, sample: Sample) -> float:
        samples[kind].append(sample)
        return sample.rss_mb

    alternate(
        {
            "bare": lambda: take("bare", bare_sample(built.model_file, threads, root, idle)),
            "existing": lambda: take("existing", serve_sample(existing, root, idle)),
            "fresh": lambda: take("fresh", serve_sample(next(fresh), root, idle)),
            "loaded": lambda: take("loaded", serve_sample(loaded, root, idle, lambda: _post(port, png, requests))),
        },
        repeats,
    )
    bare_rss = Spread.of([s.rss_mb for s in samples["bare"]]).median
    attribution = _attribute(ctx, built, samples, threads, idle, repeats)
    return _Run(samples, attribution, bare_rss, threads, idle, repeats, {**built.describe(), "requests": requests})


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _png(image: Any) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("cv2 could not encode the digits image as PNG")
    return bytes(buf)


def _post(port: int, png: bytes, count: int) -> None:
    """``count`` inferences through serve's local endpoint (POST /v1/infer), one connection each."""
    import http.client

    for _ in range(count):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("POST", "/v1/infer", body=png, headers={"Content-Type": "image/png"})
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"POST /v1/infer answered {resp.status}: {body[:200]!r}")
        finally:
            conn.close()


def _attribute(
    ctx: Context, built: bundles.BuiltBundle, samples: dict[str, list[Sample]], threads: int, idle: float, repeats: int
) -> dict[str, list[float]]:
    """Resident memory of the baseline with one more import, and with every module serve had loaded."""
    steady, fresh = set(samples["existing"][0].modules), set(samples["fresh"][0].modules)
    loaded = set(samples["loaded"][0].modules)

    def label(m: str) -> str:
        return m if m in steady else f"{m} (fresh logbook only)" if m in fresh else f"{m} (after requests only)"

    variants: dict[str, Sequence[str]] = {label(m): [m] for m in _SUSPECTS if m in steady | fresh | loaded}
    variants = dict(list(variants.items())[: ctx.pick(len(variants), 2)])  # the smoke test needs the path, not all
    everything = _importable(samples["existing"][0].modules)
    variants["every module serve loads (existing logbook)"] = everything
    folder = ctx.work / NAME / "attribution"
    folder.mkdir(parents=True, exist_ok=True)
    return alternate(
        {
            label: functools.partial(_bare_rss, built.model_file, threads, folder, idle, mods)
            for label, mods in variants.items()
        },
        repeats,
    )


def _bare_rss(model: Path, threads: int, folder: Path, idle: float, imports: Sequence[str]) -> float:
    return bare_sample(model, threads, folder, idle, imports).rss_mb


def _figure(kind: str, label: str, run: _Run, key: str = "") -> Figure:
    base = [s.rss_mb for s in run.samples["bare"]]
    subj = [s.rss_mb for s in run.samples[kind]]
    return Figure(
        key=key or f"{NAME}.idle_{kind}_logbook",
        label=label,
        kind="difference",
        unit="MiB",
        value=Spread.of(differences(subj, base)),
        goal=None if kind == "loaded" else GOAL,  # the goal is for the idle service
        baseline=Measure("bare python + numpy + onnxruntime + session, VmRSS", "MiB", Spread.of(base)),
        subject=Measure(
            f"edge-runtime serve {'after requests' if kind == 'loaded' else 'idle'}, VmRSS", "MiB", Spread.of(subj)
        ),
        config={
            **run.model,
            "intra_op_threads": run.threads,
            "idle_s": run.idle_s,
            "repeats": run.repeats,
            "serve_vmhwm_mb": Spread.of([s.hwm_mb for s in run.samples[kind]]).median,
            "bare_vmhwm_mb": Spread.of([s.hwm_mb for s in run.samples["bare"]]).median,
            "serve_modules": len(run.samples[kind][0].modules),
            "bare_modules": len(run.samples["bare"][0].modules),
        },
    )


def _tables(run: _Run) -> tuple[Table, ...]:
    names = {
        "bare": "bare baseline",
        "existing": "serve, existing logbook",
        "fresh": "serve, fresh logbook",
        "loaded": f"serve after {run.model['requests']} HTTP inferences, existing logbook",
    }
    per_process = []
    bare_mods = set(run.samples["bare"][0].modules)
    modules = []
    for kind, label in names.items():
        ss = run.samples[kind]
        rss = Spread.of([s.rss_mb for s in ss])
        hwm = Spread.of([s.hwm_mb for s in ss])
        per_process.append((label, rss.median, rss.low, rss.high, hwm.median, len(ss[0].modules)))
        if kind != "bare":
            extra = sorted(_third_party(ss[0].modules) - _third_party(bare_mods))
            modules.append((label, len(set(ss[0].modules) - bare_mods), ", ".join(extra)))
    gap = Spread.of([s.rss_mb for s in run.samples["existing"]]).median - run.bare_rss
    attribution = []
    for label, values in run.attribution.items():
        more = Spread.of([v - run.bare_rss for v in values])
        attribution.append((f"bare + {label}", more.median, more.low, more.high, 100 * more.median / gap))
    return (
        Table(
            "Resident memory per process (MiB)",
            ("process", "VmRSS median", "min", "max", "VmHWM median", "modules loaded"),
            tuple(per_process),
        ),
        Table(
            "What serve loads that the baseline does not",
            ("process", "extra modules", "third-party packages not in the baseline"),
            tuple(modules),
        ),
        Table(
            "Attribution: the baseline with more imports (MiB over the bare baseline's median VmRSS)",
            ("process", "extra VmRSS median", "min", "max", "% of the existing-logbook gap"),
            tuple(attribution),
        ),
    )


def _notes(run: _Run, figures: Sequence[Figure]) -> tuple[str, ...]:
    gap = {f.key: f.value.median for f in figures if f.value is not None}
    existing, fresh = gap[f"{NAME}.idle_existing_logbook"], gap[f"{NAME}.idle_fresh_logbook"]
    loaded = gap[f"{NAME}.loaded_existing_logbook"]
    imports = {k: Spread.of(v).median - run.bare_rss for k, v in run.attribution.items()}
    everything = imports.pop("every module serve loads (existing logbook)")
    cv2 = imports.get("cv2 (after requests only)")
    ranked = sorted(imports.items(), key=lambda kv: -kv[1])
    notes = [
        f"Idle serve costs {existing:.1f} MiB over the baseline with an existing logbook and {fresh:.1f} MiB "
        f"with a fresh one (goal ≤ {GOAL.target:.0f}); the fresh start runs the migrations, which import "
        f"sqlite-utils ({fresh - existing:+.1f} MiB here).",
        "Single imports on top of the baseline: "
        + ", ".join(f"{k} {v:+.1f} MiB" for k, v in ranked)
        + " (they share dependencies, so they do not add up).",
        f"Importing every module serve had loaded accounts for {everything:.1f} MiB of the {existing:.1f} MiB gap; "
        f"the remaining {existing - everything:.1f} MiB is serve's own state: its threads (logbook writer, HTTP "
        "endpoint, health, watchdog), the SQLite connection and page cache, the verified bundle and its "
        "extraction, the engine's optimized-model cache path and the warm-up buffers.",
        f"After {run.model['requests']} inferences through the HTTP endpoint serve holds {loaded:.1f} MiB over "
        f"the baseline ({loaded - existing:+.1f} MiB against idle): OpenCV, imported to decode the first image"
        + (f" ({cv2:+.1f} MiB on its own)" if cv2 is not None else "")
        + ", the endpoint's request handling, the logbook's page cache and onnxruntime's arena after real work.",
    ]
    return tuple(notes)


def run(ctx: Context) -> Report:
    """Measure the idle serve process against the bare baseline, with an existing and a fresh logbook."""
    measured = _measure(ctx)
    figures = (
        _figure("existing", "serve idle, digits, existing logbook", measured),
        _figure("fresh", "serve idle, digits, fresh logbook (runs migrations)", measured),
        _figure(
            "loaded",
            f"serve after {measured.model['requests']} HTTP inferences, digits, existing logbook",
            measured,
            key=f"{NAME}.loaded_existing_logbook",
        ),
    )
    method = METHOD.format(idle=measured.idle_s, repeats=measured.repeats, requests=measured.model["requests"])
    return Report(NAME, TITLE, method, figures, _tables(measured), _notes(measured, figures))
