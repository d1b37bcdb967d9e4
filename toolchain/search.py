"""The accuracy search of `toolchain build`: recipe variants, per-node sensitivity and mixed precision.

Runs when the profile's recipe fails the gate (see :func:`run`), within a time budget:

1. **recipe** — the same calibration with symmetric/asymmetric activations, ``reduce_range``
   and per-channel toggled (activation ranges are computed once per calibration method and
   reused), then the other calibration methods (MinMax, Entropy, Percentile) when their
   estimated cost fits the remaining budget;
2. **16-bit** — the same recipe with 16-bit activations (int8 weights); if that fails, int16
   weights everywhere, and when that passes but is over the size limit, int16 weights only
   for the groups whose int8 weights add the most error per weight byte (their sensitivity
   measured like step 3's), filled up to the size limit. ONNX Runtime runs 16-bit Q/DQ through
   float kernels, so these models are smaller, not faster, than FP32;
3. **sensitivity** — on the best recipe, the error each fusion group contributes when it is
   the only part quantized (:mod:`toolchain.sensitivity`), on the validation set;
4. **mixed precision** — the most sensitive groups stay in float, fewest first: 1, 2, 4… groups
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
from toolchain.sensitivity import ANCHOR_OPS, NodeGroup, Sensitivity, measure, node_groups

__all__ = ["MAX_SIZE_RATIO", "Attempt", "SearchInputs", "SearchOutcome", "keep", "latency_proxy", "run"]

MAX_SIZE_RATIO = 0.5  # a mixed-precision candidate must stay at most half the FP32 size
_SENSITIVITY_SAMPLES = 3  # the validation samples the best recipe scored worst
_SENSITIVITY_SHARE = 0.5  # of the budget left after the recipes; mixed precision gets the rest
_SENSITIVITY_TOLERANCE = 0.005
_WEIGHT_SENSITIVITY_SHARE = 0.8  # one fill attempt follows it; float mixed precision only if that fails
_WIDE_MARGIN = 0.03  # the int16-weight fill stays this far under the limit (scales and zero points)
_HISTOGRAM_COST = 4.5  # entropy/percentile calibration vs MinMax, measured on PP-OCRv4 det
_QDQ = ("QuantizeLinear", "DequantizeLinear")
_WIDE_TYPES = (4, 5)  # onnx.TensorProto.UINT16, INT16: zero points of 16-bit Q/DQ


@dataclass
class Attempt:
    """One candidate the search built and validated."""

    name: str
    phase: str  # recipe | 16-bit | mixed-precision
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
    int16_weight_groups: tuple[str, ...] = ()  # groups whose weights are int16 (the others int8)
    path: Path | None = None
    comparison: Any = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (without the model path and the full comparison)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("path", "comparison")}
        out["float_groups"] = list(self.float_groups)
        out["int16_weight_groups"] = list(self.int16_weight_groups)
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
    weight_sensitivity: list[Sensitivity] = field(default_factory=list)
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
            "weight_sensitivity": [
                {"group": s.group.label, "error": round(s.error, 5), "measured": s.measured}
                for s in sorted(self.weight_sensitivity, key=lambda s: -s.error)
                if s.error > 0
            ][:200],
            "notes": self.notes,
        }


def latency_proxy(model_path: Path) -> dict[str, int]:
    """Static speed proxy for targets this host cannot time: float↔int8 boundaries and float nodes.

    A node runs as an INT8 kernel when every input (weights included) arrives through an
    8-bit DequantizeLinear and every output goes to a QuantizeLinear; any other node computes in
    float (ONNX Runtime has no 16-bit QLinear kernels: 16-bit Q/DQ pairs run as float compute).
    A boundary is a DequantizeLinear feeding a float node or a QuantizeLinear fed by
    one: a conversion pass over a tensor that no QLinear fusion removes.
    """
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    wide = {i.name for i in graph.initializer if i.data_type in _WIDE_TYPES}
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
        narrow = [i for i in from_dq if not (set(producer[i].input[2:3]) & wide)]
        to_q = [c for o in n.output for c in consumers.get(o, []) if c.op_type == "QuantizeLinear"]
        outputs_used = [c for o in n.output for c in consumers.get(o, [])]
        # an int8 kernel: every input (weights too) arrives dequantized, every output is requantized
        if inputs and len(narrow) == len(inputs) and outputs_used and len(to_q) == len(outputs_used):
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
        self,
        name: str,
        phase: str,
        spec: QuantizationSpec,
        tuning: Any,
        groups: Sequence[NodeGroup],
        wide: Sequence[NodeGroup] = (),
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
            int16_weight_groups=tuple(g.label for g in wide),
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
        "activation_bits": tuning.activation_bits,
        "symmetric_activations": tuning.symmetric_activations,
        "per_channel": spec.per_channel,
        "reduce_range": spec.reduce_range,
        "int16_weight_nodes": len(tuning.wide_weights),
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

    stop = _Stop(time.monotonic() + max(0.0, s.left()) * _SENSITIVITY_SHARE)
    with s.progress.bar("sensitivity (node groups measured)", len(groups)) as tick:
        result = measure(groups, error_of, tolerance=_SENSITIVITY_TOLERANCE, should_stop=stop, progress=tick)
    _coverage_note(s, "sensitivity", result, stop, f"{_SENSITIVITY_SHARE:.0%}")
    return result


class _Stop:
    """``should_stop`` for :func:`measure` that remembers whether it ever stopped it."""

    def __init__(self, at: float) -> None:
        self.at, self.hit = at, False

    def __call__(self) -> bool:
        self.hit = self.hit or time.monotonic() > self.at
        return self.hit


def _coverage_note(s: _Search, what: str, result: list[Sensitivity], stop: _Stop, share: str) -> None:
    """Say how many groups were not measured alone, and whether the budget or a quiet block was why."""
    unmeasured = sum(not r.measured for r in result)
    if not unmeasured:
        return
    why = (
        f"{share} of the budget left was spent; they rank by their block's error"
        if stop.hit
        else f"their blocks added at most {_SENSITIVITY_TOLERANCE} error together"
    )
    s.out.notes.append(f"{what}: {unmeasured} of {len(result)} groups not measured alone ({why})")


def _worst_samples(s: _Search, att: Attempt | None) -> list[int]:
    """The validation samples ``att`` scored worst (the sensitivity runs on those)."""
    scores = dict(att.comparison.scores) if att is not None and att.comparison is not None else {}
    order = sorted(range(len(s.inp.feeds)), key=lambda i: scores.get(s.inp.sources[i], 0.0))
    return order[:_SENSITIVITY_SAMPLES]


def _sixteen_bit(s: _Search, spec: QuantizationSpec, tuning: Any, groups: list[NodeGroup], prepared: Path) -> None:
    """Phase 2: 16-bit activations; if int8 weights still fail, int16 weights where they matter most per byte.

    When int16 weights everywhere pass but exceed the size limit, each weighted group's
    sensitivity is the error its weights add when they alone go back to int8 (above the
    all-int16 model's error); groups are then made int16 by error per weight byte until the
    estimated size reaches :data:`MAX_SIZE_RATIO` minus :data:`_WIDE_MARGIN`.
    """
    a16 = dataclasses.replace(tuning, activation_bits=16)
    base = s.attempt("16-bit activations", "16-bit", spec, a16, ())
    s.out.notes.append(
        "16-bit candidates use com.microsoft Q/DQ ops at opset 21 (devices need onnxruntime >= 1.18) "
        "and run through float kernels: smaller than FP32, not faster"
    )
    weights = _weight_elements(prepared, groups)
    anchors = [g for g in groups if weights.get(g.index)]
    if base.passed or not anchors or s.left() <= 0:
        return
    every = dataclasses.replace(a16, wide_weights=tuple(g.nodes[0] for g in anchors))
    full = s.attempt("16-bit activations, int16 weights", "16-bit", spec, every, (), anchors)
    if not full.passed:
        s.out.notes.append("16-bit: even int16 weights and activations everywhere fail the gate")
        return
    if full.size_ratio <= MAX_SIZE_RATIO or s.left() <= 0:
        return
    ranked = _weight_sensitivity(s, spec, a16, anchors, _worst_samples(s, base))
    s.out.weight_sensitivity = ranked
    room = (MAX_SIZE_RATIO - _WIDE_MARGIN - base.size_ratio) * s.ref_size
    chosen: list[NodeGroup] = []
    for r in sorted(ranked, key=lambda r: -r.error / weights[r.group.index]):
        if r.error <= 0:
            break
        if weights[r.group.index] <= room:  # int16 costs one more byte per weight than int8
            chosen.append(r.group)
            room -= weights[r.group.index]
    if chosen and s.left() > 0:
        wide = dataclasses.replace(a16, wide_weights=tuple(g.nodes[0] for g in chosen))
        s.attempt(f"16-bit activations, int16 weights in {len(chosen)} group(s)", "16-bit", spec, wide, (), chosen)


def _weight_elements(prepared: Path, groups: Sequence[NodeGroup]) -> dict[int, int]:
    """Weight elements of each group's compute node (0 for groups without an initializer weight)."""
    import onnx

    graph = onnx.load(str(prepared), load_external_data=False).graph
    sizes = {i.name: int(np.prod(i.dims)) for i in graph.initializer}
    first = {n.name: n for n in graph.node}
    out: dict[int, int] = {}
    for g in groups:
        node = first.get(g.nodes[0])
        if node is not None and node.op_type in ANCHOR_OPS and len(node.input) > 1:
            out[g.index] = sizes.get(node.input[1], 0)
    return out


def _weight_sensitivity(
    s: _Search, spec: QuantizationSpec, a16: Any, anchors: list[NodeGroup], idx: list[int]
) -> list[Sensitivity]:
    """Error each group's weights add when they alone are int8 in an otherwise int16-weight model."""
    ref = [s.inp.reference[i] for i in idx]

    def raw(chunk: Sequence[NodeGroup]) -> float:
        s.counter += 1
        narrow = {g.index for g in chunk}
        wide = tuple(g.nodes[0] for g in anchors if g.index not in narrow)
        path = s.quantize(spec, dataclasses.replace(a16, wide_weights=wide), s.inp.work / "sensitivity.onnx")
        out = s.outputs(path, idx)
        return float(
            np.mean([(1 - s.inp.metric.score(r, c)) + (1 - cosine(r, c)) for r, c in zip(ref, out, strict=True)])
        )

    floor = raw(())
    stop = _Stop(time.monotonic() + max(0.0, s.left()) * _WEIGHT_SENSITIVITY_SHARE)
    with s.progress.bar("sensitivity of int8 weights (groups measured)", len(anchors)) as tick:
        result = measure(
            anchors,
            lambda chunk: max(0.0, raw(chunk) - floor),
            tolerance=_SENSITIVITY_TOLERANCE,
            should_stop=stop,
            progress=tick,
        )
    _coverage_note(s, "weight sensitivity", result, stop, f"{_WEIGHT_SENSITIVITY_SHARE:.0%}")
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
        _sixteen_bit(s, spec, tuning, groups, prepared)
    if not any(_acceptable(a) for a in s.out.attempts) and s.left() > 0:
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
