"""The accuracy search of `toolchain build`: recipe variants, per-node sensitivity and mixed precision.

Runs when the profile's recipe fails the gate (see :func:`run`), within a time budget:

1. **recipe** — the same calibration with symmetric/asymmetric activations, ``reduce_range``
   and per-channel toggled (activation ranges are computed once per calibration method and
   reused), then the other calibration methods (MinMax, Entropy, Percentile) when their
   estimated cost fits the remaining budget;
2. **sensitivity** — on the best recipe, the error each fusion group contributes when it is
   the only part quantized (:mod:`toolchain.sensitivity`), on the validation set;
3. **mixed precision** — the most sensitive groups stay in float, fewest first: 1, 2, 4… groups
   until the gate passes, then bisection down to the fewest. A candidate larger than
   :data:`MAX_SIZE_RATIO` × FP32 is not an INT8 model worth shipping, so doubling stops there.

Among candidates that pass, the fastest on the target wins: measured on this host when it has
the profile's architecture, otherwise :func:`latency_proxy` (fewest float↔int8 boundaries,
then fewest float compute nodes) until device numbers exist.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.engine import EngineOptions
from runtime.profile import DeviceProfile, QuantizationSpec
from toolchain.metrics import Metric, cosine
from toolchain.progress import Progress
from toolchain.sensitivity import NodeGroup, Sensitivity, measure, node_groups

__all__ = ["MAX_SIZE_RATIO", "Attempt", "SearchInputs", "SearchOutcome", "keep", "latency_proxy", "run"]

MAX_SIZE_RATIO = 0.5  # a mixed-precision candidate must stay at most half the FP32 size
_SENSITIVITY_SAMPLES = 3  # the validation samples the best recipe scored worst
_SENSITIVITY_SHARE = 0.5  # of the budget left after the recipes; mixed precision gets the rest
_SENSITIVITY_TOLERANCE = 0.005
_HISTOGRAM_COST = 4.5  # entropy/percentile calibration vs MinMax, measured on PP-OCRv4 det
_QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass
class Attempt:
    """One candidate the search built and validated."""

    name: str
    phase: str  # recipe | mixed-precision
    settings: dict[str, Any]
    float_groups: tuple[str, ...]
    float_nodes: int
    agreement: float
    agreement_min: float
    accuracy_drop: float | None
    cosine_mean: float
    passed: bool
    size_bytes: int
    size_ratio: float
    proxy: dict[str, int]
    seconds: float
    host_p50_ms: float | None = None
    path: Path | None = None
    comparison: Any = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (without the model path and the full comparison)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("path", "comparison")}
        out["float_groups"] = list(self.float_groups)
        return out


@dataclass(frozen=True)
class SearchInputs:
    """What the search needs from the build."""

    fp32: Path
    spec: QuantizationSpec
    calibration: Any  # toolchain.calibration.Dataset
    feeds: Sequence[dict[str, np.ndarray]]
    labels: Sequence[int | None]
    sources: Sequence[str]
    reference: Sequence[np.ndarray]
    metric: Metric
    profile: DeviceProfile
    options: EngineOptions
    work: Path
    cache_dir: Path
    budget_s: float
    calibration_seconds: float | None = None  # how long the pipeline's first calibration took


@dataclass
class SearchOutcome:
    """Every attempt, the sensitivity table, and the chosen attempt (None: nothing passed)."""

    attempts: list[Attempt] = field(default_factory=list)
    sensitivity: list[Sensitivity] = field(default_factory=list)
    chosen: Attempt | None = None
    best: Attempt | None = None  # the chosen one, or the closest to passing
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    speed_basis: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the build report."""
        return {
            "seconds": round(self.seconds, 1),
            "chosen": self.chosen.name if self.chosen else None,
            "speed_basis": self.speed_basis,
            "attempts": [a.to_dict() for a in self.attempts],
            "sensitivity": [
                {
                    "group": s.group.label,
                    "nodes": list(s.group.nodes),
                    "error": round(s.error, 5),
                    "measured": s.measured,
                }
                for s in sorted(self.sensitivity, key=lambda s: -s.error)
                if s.error > 0
            ][:40],
            "notes": self.notes,
        }


def latency_proxy(model_path: Path) -> dict[str, int]:
    """Static speed proxy for targets this host cannot time: float↔int8 boundaries and float nodes.

    A node runs as an INT8 kernel when every input (weights included) arrives through a
    DequantizeLinear and every output goes to a QuantizeLinear; any other node computes in
    float. A boundary is a DequantizeLinear feeding a float node or a QuantizeLinear fed by
    one: a conversion pass over a tensor that no QLinear fusion removes.
    """
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    boundaries = float_nodes = 0
    for n in graph.node:
        if n.op_type in _QDQ or n.op_type == "Constant":
            continue
        inputs = [i for i in n.input if i]
        from_dq = [i for i in inputs if i in producer and producer[i].op_type == "DequantizeLinear"]
        to_q = [c for o in n.output for c in consumers.get(o, []) if c.op_type == "QuantizeLinear"]
        outputs_used = [c for o in n.output for c in consumers.get(o, [])]
        # an int8 kernel: every input (weights too) arrives dequantized, every output is requantized
        if inputs and len(from_dq) == len(inputs) and outputs_used and len(to_q) == len(outputs_used):
            continue
        float_nodes += 1
        boundaries += len(from_dq) + len(to_q)
    return {"boundaries": boundaries, "float_nodes": float_nodes}


class _Search:
    def __init__(self, inp: SearchInputs, progress: Progress, judge: Callable[[Any, int], bool]):
        self.inp, self.progress, self.judge = inp, progress, judge
        self.start = time.monotonic()
        self.deadline = self.start + inp.budget_s
        self.out = SearchOutcome()
        self.ref_size = inp.fp32.stat().st_size
        self.counter = 0

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def quantize(self, spec: QuantizationSpec, tuning: Any, path: Path) -> Path:
        from toolchain.passes import quantize

        quantize.run(
            self.inp.fp32, path, spec, calibration=self.inp.calibration, tuning=tuning, cache_dir=self.inp.cache_dir
        )
        return path

    def outputs(self, path: Path, idx: Sequence[int]) -> list[np.ndarray]:
        from toolchain import validate

        return validate.run_outputs(path, [self.inp.feeds[i] for i in idx], self.inp.options)

    def attempt(
        self, name: str, phase: str, spec: QuantizationSpec, tuning: Any, groups: Sequence[NodeGroup]
    ) -> Attempt:
        from toolchain import validate

        t0 = time.monotonic()
        self.counter += 1
        path = self.quantize(spec, tuning, self.inp.work / f"attempt-{self.counter:03d}.onnx")
        out = self.outputs(path, range(len(self.inp.feeds)))
        cmp = validate.compare(
            self.inp.reference,
            out,
            task=self.inp.metric.task,
            labels=self.inp.labels,
            sources=self.inp.sources,
            metric=self.inp.metric,
        )
        size = path.stat().st_size
        att = Attempt(
            name=name,
            phase=phase,
            settings=_settings(spec, tuning),
            float_groups=tuple(g.label for g in groups),
            float_nodes=sum(len(g.nodes) for g in groups),
            agreement=round(cmp.agreement, 4),
            agreement_min=round(cmp.agreement_min, 4),
            accuracy_drop=None if cmp.accuracy_drop is None else round(cmp.accuracy_drop, 3),
            cosine_mean=round(cmp.cosine_mean, 5),
            passed=self.judge(cmp, size),
            size_bytes=size,
            size_ratio=round(size / self.ref_size, 4),
            proxy=latency_proxy(path),
            seconds=round(time.monotonic() - t0, 2),
            path=path,
            comparison=cmp,
        )
        self.out.attempts.append(att)
        verdict = "[green]passes[/]" if att.passed else "fails"
        self.progress.step(
            f"search: {name}: {self.inp.metric.name} {att.agreement:.4f} (worst {att.agreement_min:.4f}), "
            f"size {att.size_ratio:.2f}× — {verdict}"
        )
        return att


def _settings(spec: QuantizationSpec, tuning: Any) -> dict[str, Any]:
    return {
        "calibration_method": spec.calibration_method,
        "activation_type": spec.activation_type,
        "symmetric_activations": tuning.symmetric_activations,
        "per_channel": spec.per_channel,
        "reduce_range": spec.reduce_range,
    }


def _quality(a: Attempt) -> tuple[bool, float, float]:
    return (
        a.passed,
        -(a.accuracy_drop or 0.0),
        a.agreement if a.agreement_min is None else a.agreement + a.agreement_min,
    )


def _recipes(s: _Search) -> tuple[QuantizationSpec, Any]:
    """Phase 1: recipe variants on cached ranges, then other calibration methods if they fit."""
    from toolchain.passes.quantize import Tuning

    base = s.inp.spec
    best = s.attempt("profile recipe", "recipe", base, Tuning(), ())
    chosen = (base, Tuning())
    variants: list[tuple[str, QuantizationSpec, Any]] = [
        ("symmetric activations", base, Tuning(symmetric_activations=True)),
        ("reduce_range", dataclasses.replace(base, reduce_range=not base.reduce_range), Tuning()),
        (
            "per-tensor weights" if base.per_channel else "per-channel weights",
            dataclasses.replace(base, per_channel=not base.per_channel),
            Tuning(),
        ),
    ]
    for method in ("minmax", "percentile", "entropy"):
        if method != base.calibration_method:
            variants.append((f"{method} calibration", dataclasses.replace(base, calibration_method=method), Tuning()))
    for name, spec, tuning in variants:
        if best.passed:
            break
        if s.left() <= 0:
            s.out.notes.append(f"recipe '{name}' skipped: time budget spent")
            continue
        if spec.calibration_method != base.calibration_method and not _ranges_cached(s, spec):
            estimate = _calibration_estimate(s, spec.calibration_method)
            if estimate > s.left() / 4:
                s.out.notes.append(
                    f"recipe '{name}' skipped: calibration estimated at {estimate:.0f} s, more than a quarter of the "
                    f"{s.left():.0f} s left (raise --search-budget to try it)"
                )
                continue
        att = s.attempt(name, "recipe", spec, tuning, ())
        if _quality(att) > _quality(best):
            best, chosen = att, (spec, tuning)
    s.out.best = best
    return chosen


def _ranges_cached(s: _Search, spec: QuantizationSpec) -> bool:
    return (s.inp.cache_dir / f"ranges-{spec.calibration_method}.json").is_file()


def _calibration_estimate(s: _Search, method: str) -> float:
    """Seconds a calibration with ``method`` should take, scaled from the build's first calibration."""
    measured = s.inp.calibration_seconds or 10.0
    cost = {"minmax": 1.0, "entropy": _HISTOGRAM_COST, "percentile": _HISTOGRAM_COST}
    return measured * cost[method] / cost[s.inp.spec.calibration_method]


def _sensitivity(s: _Search, spec: QuantizationSpec, tuning: Any, groups: list[NodeGroup]) -> list[Sensitivity]:
    """Phase 2: error of quantizing each group alone, on the samples the best recipe scored worst."""
    best = s.out.best
    scores = dict(best.comparison.scores) if best is not None and best.comparison is not None else {}
    order = sorted(range(len(s.inp.feeds)), key=lambda i: scores.get(s.inp.sources[i], 0.0))
    idx = order[:_SENSITIVITY_SAMPLES]
    ref = [s.inp.reference[i] for i in idx]

    def error_of(chunk: Sequence[NodeGroup]) -> float:
        s.counter += 1
        nodes = tuple(n for g in chunk for n in g.nodes)
        path = s.quantize(spec, dataclasses.replace(tuning, nodes_to_quantize=nodes), s.inp.work / "sensitivity.onnx")
        out = s.outputs(path, idx)
        return float(
            np.mean([(1 - s.inp.metric.score(r, c)) + (1 - cosine(r, c)) for r, c in zip(ref, out, strict=True)])
        )

    stop_at = time.monotonic() + max(0.0, s.left()) * _SENSITIVITY_SHARE
    with s.progress.bar("sensitivity (node groups measured)", len(groups)) as tick:
        result = measure(
            groups,
            error_of,
            tolerance=_SENSITIVITY_TOLERANCE,
            should_stop=lambda: time.monotonic() > stop_at,
            progress=tick,
        )
    unmeasured = sum(not r.measured for r in result)
    if unmeasured:
        s.out.notes.append(
            f"sensitivity: {unmeasured} of {len(result)} node groups not measured alone (half the budget spent); "
            "they rank by their block's error"
        )
    return result


def _mixed_precision(s: _Search, spec: QuantizationSpec, tuning: Any, ranked: list[Sensitivity]) -> None:
    """Phase 3: keep the top-k sensitive groups in float; k = 1, 2, 4… then bisect to the fewest."""
    order = [r.group for r in ranked if r.error > 0]
    if not order:
        s.out.notes.append("mixed precision skipped: no node group showed any error when quantized alone")
        return
    lo, hi, k, too_big = 0, None, 1, None
    while k <= len(order) and s.left() > 0:
        att = _mp_attempt(s, spec, tuning, order[:k])
        if att.size_ratio > MAX_SIZE_RATIO:
            too_big = k
            s.out.notes.append(
                f"mixed precision: {k} float groups make the model {att.size_ratio:.2f}× FP32, over the "
                f"{MAX_SIZE_RATIO}× limit; searched below it"
            )
            break
        if att.passed:
            hi = k
            break
        lo, k = k, min(k * 2, len(order)) if k < len(order) else k + 1
    while hi is None and too_big is not None and too_big - lo > 1 and s.left() > 0:
        mid = (lo + too_big) // 2  # the largest float set that still fits the size limit
        att = _mp_attempt(s, spec, tuning, order[:mid])
        if att.size_ratio > MAX_SIZE_RATIO:
            too_big = mid
        elif att.passed:
            hi = mid
        else:
            lo = mid
    while hi is not None and hi - lo > 1 and s.left() > 0:
        mid = (lo + hi) // 2  # the fewest float groups that pass
        if _acceptable(_mp_attempt(s, spec, tuning, order[:mid])):
            hi = mid
        else:
            lo = mid


def _acceptable(a: Attempt) -> bool:
    """Passes the gate, and a mixed-precision model stays within the size limit."""
    return a.passed and (a.phase == "recipe" or a.size_ratio <= MAX_SIZE_RATIO)


def _mp_attempt(s: _Search, spec: QuantizationSpec, tuning: Any, groups: Sequence[NodeGroup]) -> Attempt:
    nodes = tuple(n for g in groups for n in g.nodes)
    return s.attempt(
        f"mixed precision: {len(groups)} group(s) float",
        "mixed-precision",
        spec,
        dataclasses.replace(tuning, nodes_to_exclude=nodes),
        groups,
    )


def _choose(s: _Search) -> None:
    """The fastest passing attempt: host timing when the host is the target's arch, else the proxy."""
    from toolchain.validate import host_matches

    passing = [a for a in s.out.attempts if _acceptable(a)]
    if not passing:
        s.out.chosen = None
        small = [a for a in s.out.attempts if a.phase == "recipe" or a.size_ratio <= MAX_SIZE_RATIO]
        s.out.best = max(small, key=_quality) if small else None
        return
    if host_matches(s.inp.profile) and len(passing) > 1:
        s.out.speed_basis = "host p50 latency (host = target architecture)"
        for a in passing:
            a.host_p50_ms = _time(a.path, s.inp.feeds[0], s.inp.options) if a.path else None
        s.out.chosen = min(passing, key=lambda a: (a.host_p50_ms or 0.0, a.size_bytes))
    else:
        s.out.speed_basis = "proxy: fewest float/int8 boundaries, then fewest float nodes"
        s.out.chosen = min(passing, key=lambda a: (a.proxy["boundaries"], a.proxy["float_nodes"], a.size_bytes))
    s.out.best = s.out.chosen


def _time(path: Path, feeds: dict[str, np.ndarray], options: EngineOptions, runs: int = 5) -> float:
    from runtime.engine import open_engine

    engine = open_engine(path, options=options)
    try:
        engine.run(feeds)
        t0 = time.perf_counter()
        for _ in range(runs):
            engine.run(feeds)
        return (time.perf_counter() - t0) / runs * 1000
    finally:
        engine.close()


def run(inp: SearchInputs, progress: Progress, judge: Callable[[Any, int], bool]) -> SearchOutcome:
    """Search for a candidate that passes ``judge(comparison, size_bytes)``; see the module docstring."""
    s = _Search(inp, progress, judge)
    progress.step(f"search: the profile recipe fails the gate; searching for up to {inp.budget_s:.0f} s")
    spec, tuning = _recipes(s)
    if not any(a.passed for a in s.out.attempts) and s.left() > 0:
        prepared = inp.cache_dir / f"prepared-{'pc' if spec.per_channel else 'pt'}.onnx"
        groups = node_groups(prepared)
        s.out.sensitivity = _sensitivity(s, spec, tuning, groups)
        ranked = sorted(s.out.sensitivity, key=lambda r: -r.error)
        _mixed_precision(s, spec, tuning, ranked)
    if s.left() <= 0:
        s.out.notes.append(f"time budget of {inp.budget_s:.0f} s reached")
    _choose(s)
    s.out.seconds = time.monotonic() - s.start
    for a in s.out.attempts:
        if a is not s.out.best and a.path is not None and a.path.parent == inp.work:
            a.path.unlink(missing_ok=True)
    return s.out


def keep(attempt: Attempt, dest: Path) -> Path:
    """Copy the chosen attempt's model to ``dest``."""
    assert attempt.path is not None
    shutil.copyfile(attempt.path, dest)
    return dest
