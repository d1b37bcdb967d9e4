"""Figure 1: `serve` loop throughput, logging and sync on, ÷ a bare onnxruntime run loop (same model and threads)."""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import bundles
from benchmarks.broker import mosquitto
from benchmarks.harness import (
    Context,
    Figure,
    Goal,
    Measure,
    Report,
    Skipped,
    Spread,
    Table,
    alternate,
    ratios,
    timed,
)

__all__ = ["GOAL", "NAME", "TITLE", "bare_session", "drained", "run", "served"]

NAME = "serve_overhead"
TITLE = "Serve loop overhead"
GOAL = Goal(">=", 0.95)
_CASES: tuple[tuple[str, Callable[[Context], bundles.BuiltBundle]], ...] = (
    ("digits", bundles.digits),
    ("mid_cnn", bundles.mid_cnn),
    ("ppocr_det", bundles.ppocr_det),
)
_CONNECT_TIMEOUT_S = 10.0
_SESSION_KEYS = (
    "session.intra_op.allow_spinning",
    "session.inter_op.allow_spinning",
    "session.intra_op_thread_affinities",
)

METHOD = (
    "Each model is built into a signed bundle by the toolchain for this host's profile. A `Service` is "
    "started in-process from a config the way `edge-runtime serve` starts it (thread plan, SQLite logbook"
    " in a real file with the default flush interval, bundle verified and warmed up, MQTT link with "
    "store-and-forward sync and the command channel connected to a real Mosquitto on loopback), without "
    "sources, HTTP endpoint or health thread. The subjects time N back-to-back `Service.infer_item(Item)`"
    " calls: on a tensor item holding the same preprocessed tensor the baseline runs (the figure with the"
    " goal: both loops get the same input, so the difference is the runtime's own work), and on one "
    "decoded image of the model's input size (preprocessing included, which the bare loop never does). "
    "Each call checks the input, runs the engine, post-processes and calls `Logbook.record_inference`; "
    "the writer thread commits and the sync thread publishes every record (QoS 1 batches, marked synced "
    "on PUBACK) in the background, as in production. The baseline times N `InferenceSession.run` calls of"
    " a bare onnxruntime session on the bundle's own `model.onnx`, with the engine session's "
    "intra-/inter-op threads and spinning policy, on the already preprocessed tensor. All loops are first"
    " checked to compute the same result. The three loops run in rotating order (A B C, B C A, …) in the "
    "same thread, N chosen so a run lasts about {seconds} s, and the figure is the median over {repeats} "
    "repeats of the per-repeat throughput ratio (adjacent runs share the machine's conditions), with its "
    "min–max; the ratio of the fastest runs of each loop is given too, as other processes on the machine "
    "only ever slow a run down. The stage tables time each stage of a served item in its own loop the "
    "same way; the rows marked as differences are what is left between measured stages."
)


@contextlib.contextmanager
def served(config: Path) -> Iterator[Any]:
    """A :class:`runtime.service.Service` started as `serve` starts it, minus sources, HTTP, health, sd_notify.

    With ``[mqtt] enabled`` in ``config`` the link, sync and command channel are started as well and
    connected before the service is handed out.
    """
    from runtime.config import load_config
    from runtime.service import Service

    cfg = load_config(config)
    svc = Service(cfg, config_path=config)
    mask = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        svc.open()  # what run() does before its loop: thread plan, logbook, verified and warmed-up model
        if cfg.mqtt.enabled:
            svc._start_mqtt()  # what run() does next when MQTT is configured
            if not svc.link.wait_connected(_CONNECT_TIMEOUT_S):
                raise RuntimeError(f"the service did not connect to {cfg.mqtt.host}:{cfg.mqtt.port}")
            svc._pin_io_threads()
        yield svc
    finally:
        svc.close()
        if mask is not None:
            os.sched_setaffinity(0, mask)  # the thread plan pins the calling thread; give the run its cores back


def bare_session(model_file: Path, engine: Any) -> Any:
    """A plain ``InferenceSession`` on ``model_file`` with the threads and spinning policy of ``engine``'s session."""
    import onnxruntime as ort

    used = engine.session.get_session_options()
    so = ort.SessionOptions()
    so.intra_op_num_threads = used.intra_op_num_threads
    so.inter_op_num_threads = used.inter_op_num_threads
    for key in _SESSION_KEYS:
        with contextlib.suppress(RuntimeError):  # onnxruntime raises when the key was never set
            so.add_session_config_entry(key, used.get_session_config_entry(key))
    return ort.InferenceSession(str(model_file), sess_options=so, providers=["CPUExecutionProvider"])


def _same_result(record: dict[str, Any], bare: list[np.ndarray]) -> None:
    """Refuse to time two loops that do not compute the same thing."""
    if "top1" in record:
        ok = record["top1"]["index"] == int(np.argmax(bare[0]))
    elif "dense" in record:
        ok = bool(np.isclose(record["dense"]["mean"], float(bare[0].mean()), rtol=1e-3, atol=1e-6))
    else:
        ok = True
    if not ok:
        raise RuntimeError(f"serve and the bare session disagree on the same input: {record} vs {bare[0].ravel()[:8]}")


def drained(svc: Any, timeout: float = 30.0) -> dict[str, Any]:
    """Sync's counters once every logged record has been acknowledged (proof that sync really ran)."""
    svc.logbook.flush(timeout)
    deadline = time.monotonic() + timeout
    while svc.logbook.pending(1) and time.monotonic() < deadline:
        svc.sync.notify()
        time.sleep(0.05)
    stats: dict[str, Any] = svc.sync.stats()
    stats["pending_after_drain"] = len(svc.logbook.pending(1000))
    return stats


def _calls_for(seconds: float, per_call: float, least: int) -> int:
    return int(min(max(seconds / max(per_call, 1e-7), least), 500_000))


def _facts(svc: Any) -> dict[str, Any]:
    """The serving conditions worth recording next to a figure."""
    used = svc.model.engine.session.get_session_options()
    return {
        "intra_op_threads": used.intra_op_num_threads,
        "inter_op_threads": used.inter_op_num_threads,
        "thread_plan": svc.plan.get("reason"),
        "logbook_flush_interval_s": svc.cfg.logbook.flush_interval_s,
    }


def _measure(
    ctx: Context, built: bundles.BuiltBundle, repeats: int, broker: tuple[str, int]
) -> tuple[list[Figure], Table]:
    """Two figures per model: the serve loop fed the tensor the bare loop gets, and fed the decoded image."""
    from runtime.sources import Item

    folder = ctx.work / NAME / built.key
    config = bundles.service_config(folder, built, state_dir=folder / "state", mqtt=broker)
    with served(config) as svc:
        image = Item(ref=f"bench:{built.key}", data=built.image, kind="image", ts=time.time())
        feeds = svc.model.tensor_from_image(built.image)
        tensor = Item(ref=f"bench:{built.key}", data=next(iter(feeds.values())), kind="tensor", ts=time.time())
        session = bare_session(built.model_file, svc.model.engine)
        _same_result(svc.infer_item(image), session.run(None, feeds))
        _same_result(svc.infer_item(tensor), session.run(None, feeds))
        loops: dict[str, Callable[[], object]] = {
            "bare": lambda: session.run(None, feeds),
            "tensor": lambda: svc.infer_item(tensor),
            "image": lambda: svc.infer_item(image),
        }
        per_item = timed(loops["image"], 3) / 3
        n = _calls_for(ctx.pick(0.2, 0.03), per_item, ctx.pick(3, 2))
        for loop in loops.values():  # warm every path (allocator, caches) before the first timed run
            timed(loop, n // 4 + 1)
        seconds = alternate({k: functools.partial(timed, f, n) for k, f in loops.items()}, repeats)
        rates = {k: [n / s for s in v] for k, v in seconds.items()}
        base = rates["bare"]
        overhead = {
            k: Spread.of([(1 / s - 1 / b) * 1e6 for s, b in zip(rates[k], base, strict=True)]).median
            for k in ("tensor", "image")
        }
        stages = _stages(ctx, svc, image, feeds, loops["bare"], overhead["image"], built.label)
        facts = {**_facts(svc), "items_per_run": n, "repeats": repeats, "sync": drained(svc)}
    figures = []
    for kind, suffix, what, goal in (
        ("tensor", "", "the same tensor as the bare loop", GOAL),
        ("image", "_image", "the decoded image (preprocessing included)", None),
    ):
        subj = rates[kind]
        figures.append(
            Figure(
                key=f"{NAME}.{built.key}{suffix}",
                label=f"{built.label}, fed {what}",
                kind="ratio",
                unit="",
                value=Spread.of(ratios(subj, base)),
                goal=goal,
                baseline=Measure("bare InferenceSession.run loop", "inferences/s", Spread.of(base)),
                subject=Measure(
                    f"Service.infer_item on {kind} items, logging and sync on", "inferences/s", Spread.of(subj)
                ),
                config={
                    **built.describe(),
                    **facts,
                    "input": kind,
                    "bare_ms_per_inference": 1000 / Spread.of(base).median,
                    "serve_ms_per_inference": 1000 / Spread.of(subj).median,
                    "overhead_us_per_inference": overhead[kind],
                    # other processes only ever slow a run down: the fastest runs are the least disturbed
                    "best_run_ratio": max(subj) / max(base),
                },
            )
        )
    return figures, stages


def _stage_calls(svc: Any, item: Any, feeds: dict[str, np.ndarray], bare: Callable[[], object]) -> dict[str, Any]:
    """One callable per stage of a served item, fed exactly what the service feeds it."""
    from runtime.model import Prediction
    from runtime.postprocess import summarize

    model, logbook = svc.model, svc.logbook
    names = [o.name for o in model.engine.outputs]
    outputs = model.engine.run(feeds)
    record = {**model.run(feeds, ref=item.ref).to_dict(), "model": model.name, "version": model.version}

    def post() -> object:
        result = summarize(outputs, names, model.manifest.postprocess)
        return Prediction(input=item.ref, latency_ms=0.03, result=result, outputs=outputs).to_dict()

    def enqueue() -> object:
        return logbook.record_inference(
            model=model.name, version=model.version, input_ref=item.ref, latency_ms=0.03, result=record
        )

    return {
        "pre": lambda: model.tensor_from_image(item.data),
        "post": post,
        "enqueue": enqueue,
        "engine": lambda: model.engine.run(feeds),
        "whole": lambda: svc.infer_item(item),
        "bare": bare,
        "small": _small,
    }


def _small() -> object:
    return np.ones(8)


def _after_run(run: Callable[[], object], call: Callable[[], object], n: int) -> Spread:
    """µs of ``call`` timed alone, each time right after ``run`` (caches as the model leaves them)."""
    out = []
    for _ in range(n):
        run()
        t0 = time.perf_counter()
        call()
        out.append((time.perf_counter() - t0) * 1e6)
    return Spread.of(out)


def _stages(
    ctx: Context,
    svc: Any,
    item: Any,
    feeds: dict[str, np.ndarray],
    bare: Callable[[], object],
    overhead_us: float,
    label: str,
) -> Table:
    """Per-stage cost of one served item in µs, each stage timed in its own loop, against the figure's overhead."""
    stages = _stage_calls(svc, item, feeds, bare)
    calls = {k: _calls_for(ctx.pick(0.1, 0.005), timed(f, 2) / 2, ctx.pick(2, 1)) for k, f in stages.items()}
    repeats = ctx.pick(7, 3)
    secs = alternate({k: functools.partial(timed, f, calls[k]) for k, f in stages.items()}, repeats)
    us = {k: Spread.of([s / calls[k] * 1e6 for s in v]) for k, v in secs.items()}
    svc.infer_item(item)
    inside = Spread.of([1000 * x for x in svc.stats.latencies])  # the engine, timed by LoadedModel.run in the loop
    whole = us["whole"].median
    fixed = sum(us[k].median for k in ("pre", "post", "enqueue"))

    def row(what: str, s: Spread) -> tuple[Any, ...]:
        return (what, s.median, s.low, s.high, 100 * s.median / whole)

    def derived(what: str, value: float) -> tuple[Any, ...]:
        return (what, value, None, None, 100 * value / whole)

    rows = (
        row("preprocess: decoded image → tensor (LoadedModel.tensor_from_image)", us["pre"]),
        row("post-processing: summarize + Prediction.to_dict", us["post"]),
        row("logbook enqueue: Logbook.record_inference (JSON encoding, queue)", us["enqueue"]),
        derived("= fixed per-item stages (sum of the three above)", fixed),
        derived("overhead per image item (serve − bare, median of the pairs)", overhead_us),
        derived("difference: locks, bookkeeping, interleaving, writer-thread contention", overhead_us - fixed),
        row("post-processing right after an inference", _after_run(bare, stages["post"], ctx.pick(200, 5))),
        row("one small numpy call (np.ones(8)) right after an inference", _after_run(bare, _small, ctx.pick(200, 5))),
        row("the same small numpy call in a tight loop", us["small"]),
        row("engine alone: OrtEngine.run", us["engine"]),
        row("engine inside the serve loop (Prediction.latency_ms of the last items)", inside),
        row("bare InferenceSession.run (the baseline)", us["bare"]),
        row("whole item: Service.infer_item", us["whole"]),
    )
    return Table(
        title=f"{label}: where a served item's time goes (µs; each stage timed alone, median of {repeats} runs)",
        columns=("stage", "µs (median)", "min", "max", "% of whole item"),
        rows=rows,
    )


def _curve(figures: list[Figure]) -> Table:
    rows = []
    for f in figures:
        if f.value is not None:
            c = f.config
            rows.append(
                (
                    f.label,
                    c["bare_ms_per_inference"],
                    c["serve_ms_per_inference"],
                    c["overhead_us_per_inference"],
                    f.value.median,
                    c["best_run_ratio"],
                )
            )
    return Table(
        title="Overhead against model cost (medians)",
        columns=(
            "model",
            "bare ms/inference",
            "serve ms/inference",
            "overhead µs/inference",
            "ratio (median)",
            "ratio of the fastest runs",
        ),
        rows=tuple(rows),
    )


def _notes(figures: list[Figure]) -> tuple[str, ...]:
    done = [f for f in figures if f.value is not None]
    notes = [
        f"{f.label}: {f.config['overhead_us_per_inference']:,.0f} µs of serve overhead per item on "
        f"{f.config['bare_ms_per_inference'] * 1000:,.0f} µs of inference → ratio {f.value.median:.3f}"
        + (f" ({'meets' if f.passed else 'misses'} the goal)." if f.goal is not None else " (no goal: context).")
        for f in done
        if f.value is not None
    ]
    notes += [f"{f.key}: skipped, {f.skipped}." for f in figures if f.skipped]
    notes += [
        f"{f.label}: sync published {f.config['sync']['records_acked']:,} records in "
        f"{f.config['sync']['batches_acked']:,} QoS 1 batches during the run, all acknowledged "
        f"({f.config['sync']['pending_after_drain']} left in the outbox after draining)."
        for f in done
        if f.config["input"] == "tensor"
    ]
    fixed = [f.config["overhead_us_per_inference"] for f in done if f.config["input"] == "tensor"]
    if fixed:
        least = min(fixed)
        notes.append(
            f"The runtime's own work per item (input check, post-processing, the logbook record, and the writer "
            f"and sync threads' share of the cores) is a roughly fixed {least:,.0f} µs or more here; the goal "
            f"(≥ 0.95) therefore holds for models that take about {least * 19 / 1000:,.1f} ms or more per "
            "inference on this machine, and a model of a few tens of µs (the digits CNN) cannot meet it while "
            "every result is logged and synced."
        )
    notes.append(
        "Preprocessing grows with the image: the figures fed decoded images add it (a 640×640 image costs "
        "about a millisecond, the 8×8 digit a few µs), which the bare loop, given a ready tensor, never pays. "
        "The stage tables show which stage costs what."
    )
    notes.append(
        "Stages timed alone in tight loops run faster than when they alternate with other work (the "
        "engine's pool threads go back to sleep and the caches cool between runs); the difference row "
        "collects that interleaving cost with the locks, the service's bookkeeping and the writer thread's "
        "competition for the cores. It subtracts two medians, so it is as noisy as the larger of them."
    )
    notes.append(
        "An inference streams the model's weights and activations through the CPU caches, so the Python and "
        "numpy code that runs next finds them cold: the stage tables time one small numpy call right after an "
        "inference against the same call in a tight loop. Every distinct code path of a served item (input "
        "check, post-processing, the record's JSON, the logbook queue) pays that once per item, which is why "
        "the overhead in the loop exceeds the sum of the stages timed alone; fewer, larger operations per item "
        "are what lowers it."
    )
    notes.append(
        "The logbook's writer thread commits every served item to SQLite on the same cores as the inference "
        "threads when the thread plan shares them (this host: see the thread plan in benchmarks.json); the "
        "'engine inside the serve loop' row shows what that contention does to the engine itself."
    )
    return tuple(notes)


def run(ctx: Context) -> Report:
    """Measure every case (a case whose model is not installed is reported as skipped)."""
    repeats = ctx.pick(21, 3)
    figures: list[Figure] = []
    tables: list[Table] = []
    with mosquitto() as broker:
        for key, make in _CASES:
            try:
                built = make(ctx)
            except Skipped as exc:
                figures.append(Figure(f"{NAME}.{key}", key, "ratio", "", None, GOAL, skipped=str(exc)))
                figures.append(Figure(f"{NAME}.{key}_image", key, "ratio", "", None, None, skipped=str(exc)))
                continue
            figs, stages = _measure(ctx, built, repeats, (broker.host, broker.port))
            figures += figs
            tables.append(stages)
    method = METHOD.format(seconds=ctx.pick(0.2, 0.03), repeats=repeats)
    return Report(NAME, TITLE, method, tuple(figures), (_curve(figures), *tables), _notes(figures))
