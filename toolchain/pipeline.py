"""`toolchain build`: load → prune → export → quantize → validate → benchmark → gate → sign and pack.

One build makes a candidate per backend: ONNX (ONNX Runtime on the device) and/or TFLite (LiteRT).
``--backend`` picks them (default: the profile's ``backend``); with ``both`` each candidate is
validated, benchmarked and gated on its own, the report compares them under ``candidates``, and
``choice`` says which one the bundle carries and why (the profile's preferred backend when its
candidate passes the gate, else the other one when it does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime import __version__
from runtime.engine import EngineOptions, backend_for
from runtime.manifest import Manifest, Postprocess, Preprocess, ProfileRef, TensorSpec
from runtime.profile import DeviceProfile, QuantizationSpec
from toolchain.candidates import FLAG, MODEL_FILE, Candidate, backends, choose, export_section, merge
from toolchain.errors import GateError
from toolchain.progress import NullProgress, Progress

_log = logging.getLogger(__name__)

__all__ = ["BuildRequest", "BuildResult", "build", "default_preprocess"]


@dataclass(frozen=True)
class BuildRequest:
    """Everything `toolchain build` needs; flags override the profile's recipes."""

    model: str
    profile: DeviceProfile
    output_dir: Path
    key: Path
    weights: Path | None = None
    input_shapes: tuple[tuple[int, ...], ...] | None = None
    calibration: str | None = None
    validation: str | None = None
    name: str | None = None
    version: str = "1.0.0"
    parent_version: str | None = None
    quantize: str | None = None  # static | dynamic | fp16 | none
    activation_type: str | None = None  # int8 (S8S8) | uint8 (U8S8)
    calibration_method: str | None = None
    per_channel: bool | None = None
    prune: str | None = None  # none | magnitude | structured
    prune_amount: float | None = None
    opset: int | None = None
    preprocess: Preprocess | None = None
    labels: tuple[str, ...] = ()
    bench_iterations: int = 50
    enforce_gate: bool = True
    keep_work: bool = False
    validation_limit: int = 1000
    backend: str | None = None  # onnx | tflite | both; None = the profile's backend
    metric: str | None = None  # a toolchain.metrics name or module:function; None = from the output shape
    search: bool | None = None  # None = search when the profile recipe fails the gate
    search_budget: float = 600.0  # seconds
    train: str | None = None  # module:function returning a DataLoader (QAT for PyTorch inputs)


@dataclass
class BuildResult:
    """The report (JSON-ready) and where the bundle and report were written."""

    report: dict[str, Any]
    bundle: Path | None
    report_path: Path
    passed: bool
    warnings: list[str] = field(default_factory=list)


def default_preprocess(first: TensorSpec) -> Preprocess:
    """Image preprocessing when the first input looks like an image (NCHW/NHWC with 1 or 3 channels), else tensors."""
    shape = first.shape
    if len(shape) == 4 and first.dtype.startswith("float"):
        if shape[1] in (1, 3):
            return Preprocess(kind="image", color="gray" if shape[1] == 1 else "rgb", layout="NCHW")
        if shape[3] in (1, 3):
            return Preprocess(kind="image", color="gray" if shape[3] == 1 else "rgb", layout="NHWC")
    return Preprocess(kind="tensor")


def _quant_spec(req: BuildRequest) -> QuantizationSpec:
    spec = req.profile.quantization
    changes: dict[str, Any] = {}
    if req.quantize is not None:
        changes["mode"] = req.quantize
    if req.activation_type is not None:
        changes["activation_type"] = req.activation_type
    if req.calibration_method is not None:
        changes["calibration_method"] = req.calibration_method
    if req.per_channel is not None:
        changes["per_channel"] = req.per_channel
    return dataclasses.replace(spec, **changes) if changes else spec


def _created() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = dt.datetime.fromtimestamp(int(epoch), dt.timezone.utc) if epoch else dt.datetime.now(dt.timezone.utc)
    return when.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _random_samples(inputs: Sequence[TensorSpec], n: int) -> list[dict[str, np.ndarray]]:
    from runtime.bench import random_feeds

    return [random_feeds(tuple(inputs), seed=i) for i in range(n)]


class _Build:
    """One build, step by step; ``report`` holds what is shared, ``section`` the current candidate's part."""

    def __init__(self, req: BuildRequest, progress: Progress, work: Path):
        self.req, self.progress, self.work = req, progress, work
        self.report: dict[str, Any] = {
            "toolchain_version": __version__,
            "profile": req.profile.name,
        }
        self.section: dict[str, Any] = {}
        self.warnings: list[str] = []
        self.options = EngineOptions.from_profile(req.profile, host_cores=os.cpu_count() or 1)
        self._datasets: dict[Any, tuple[Any, Any]] = {}
        self.backends: tuple[str, ...] = ()

    def load(self) -> Any:
        from toolchain import load

        req = self.req
        self.progress.step(f"loading {req.model}")
        model = load.load_model(req.model, weights=req.weights, input_shapes=req.input_shapes)
        self.report["model"] = {"source": req.model, "kind": model.kind}
        return model

    def exports(self, model: Any, backends: Sequence[str]) -> dict[str, tuple[Any, Any]]:
        """Per backend: (FP32 reference export, export the candidate is made from — pruned when pruning)."""
        refs = {bk: self._export_for(bk, model, "reference") for bk in backends}
        if not self._prune(model):
            return {bk: (ref, ref) for bk, ref in refs.items()}
        return {bk: (refs[bk], self._export_for(bk, model, "pruned")) for bk in backends}

    def _export_for(self, backend: str, model: Any, stem: str) -> Any:
        if backend == "onnxruntime":
            return self._export(model, self.work / f"{stem}.onnx")
        if model.kind == "tflite":
            return self._existing_tflite(model)
        from toolchain.passes import tflite_export

        self.progress.step(f"exporting {stem} to TFLite (litert-torch)")
        return tflite_export.run(model, self.work / f"{stem}.tflite")

    def _existing_tflite(self, model: Any) -> Any:
        from toolchain.load import tflite_specs
        from toolchain.passes.tflite_export import TfliteExport

        path = self.work / "reference.tflite"
        shutil.copyfile(model.tflite_path, path)
        inputs, outputs = tflite_specs(path)
        note = "an existing .tflite file: validated, benchmarked and bundled as it is"
        return TfliteExport(path, tuple(inputs), tuple(outputs), "none (existing .tflite)", None, (note,))

    def _export(self, model: Any, path: Path) -> Any:
        from toolchain.passes import export

        spec = self.req.profile.export
        opset = self.req.opset or spec.opset
        self.progress.step(f"exporting {path.stem} to ONNX (opset {opset})")
        return export.run(
            model,
            path,
            opset=opset,
            static_shapes=spec.static_shapes,
            simplify=spec.simplify,
            input_shapes=model.input_shapes,
        )

    def _prune(self, model: Any) -> bool:
        req = self.req
        method = req.prune or req.profile.pruning.method
        amount = req.prune_amount if req.prune_amount is not None else req.profile.pruning.amount
        self.report["prune"] = None
        if method == "none" or amount == 0:
            return False
        if model.kind != "torch":
            self.warnings.append(f"pruning skipped: only PyTorch modules are pruned (input is {model.kind})")
            return False
        from toolchain.passes import prune

        self.progress.step(f"pruning ({method}, {amount:.0%})")
        pr = prune.run(model.module, method=method, amount=amount)  # type: ignore[arg-type]
        self.report["prune"] = {
            "method": pr.method,
            "amount": pr.amount,
            "global_sparsity": pr.global_sparsity,
            "layers": [dataclasses.asdict(layer) for layer in pr.layers],
        }
        return True

    def prune_cost(self, reference: Path, pruned: Path, val: Any, ref_out: list[np.ndarray], task: str) -> None:
        """Record what pruning alone costs: the pruned FP32 model against the unpruned reference."""
        from toolchain import validate

        if val is None or self.report.get("prune") is None:
            return
        with self.progress.bar("validating pruned FP32", len(val.samples)) as tick:
            count = iter(range(1, len(val.samples) + 1))
            out = validate.run_outputs(
                pruned,
                [s.feeds for s in val.samples],
                self.options,
                progress=lambda: tick(next(count)),
            )
        cmp = validate.compare(
            ref_out,
            out,
            task=task,
            labels=[s.label for s in val.samples],
            sources=[s.source for s in val.samples],
        )
        self.section["prune_cost"] = dataclasses.asdict(cmp)

    def datasets(
        self, inputs: tuple[TensorSpec, ...], spec: QuantizationSpec, preprocess: Preprocess
    ) -> tuple[Any, Any]:
        """Calibration and validation sets for ``inputs`` (loaded once per distinct input list)."""
        key = (inputs, spec.calibration_samples, preprocess)
        if key not in self._datasets:
            self._datasets[key] = self._load_datasets(inputs, spec, preprocess)
        return self._datasets[key]

    def _load_datasets(
        self, inputs: tuple[TensorSpec, ...], spec: QuantizationSpec, preprocess: Preprocess
    ) -> tuple[Any, Any]:
        from toolchain.calibration import load_dataset

        req = self.req
        calib = None
        if req.calibration:
            calib = load_dataset(
                req.calibration,
                inputs,
                preprocess,
                limit=spec.calibration_samples,
                role="calibration",
            )
        val = None
        if req.validation:
            val = load_dataset(req.validation, inputs, preprocess, limit=req.validation_limit, role="validation")
        elif calib is not None:
            val = calib
            warning = "validated on the calibration set: pass --validation DIR for an honest number"
            if warning not in self.warnings:
                self.warnings.append(warning)
        return calib, val

    def quantize(
        self, model_kind: str, backend: str, fp32: Path, spec: QuantizationSpec, calib: Any
    ) -> tuple[Path, str]:
        if model_kind == "onnx-ml" and spec.mode != "none":
            self.warnings.append("classical ONNX-ML model: bundled without quantization")
            spec = dataclasses.replace(spec, mode="none")
        if model_kind == "tflite":
            return self._as_is(fp32)
        out = self.work / MODEL_FILE[backend]
        self.cache_dir = self.work / "quantize-cache"
        extra: dict[str, Any] = {"cache_dir": self.cache_dir} if backend == "onnxruntime" else {}
        total = min(len(calib.samples), spec.calibration_samples) if calib is not None else 0
        label = {
            "static": "calibrating + quantizing",
            "dynamic": "quantizing (dynamic)",
            "fp16": "converting to FP16",
            "none": "keeping FP32",
        }[spec.mode]
        self.progress.step(f"{label} ({FLAG[backend].upper()})")
        with (
            self.progress.bar("calibration samples", total)
            if spec.mode == "static" and total
            else contextlib.nullcontext(_ignore) as tick
        ):
            started = time.monotonic()
            res = _quantize_pass(backend).run(
                fp32, out, spec, calibration=calib, progress=lambda i, n: tick(i), **extra
            )
            self.quantize_seconds = time.monotonic() - started
        self.section["quantize"] = {
            "precision": res.precision,
            "method": res.method,
            "per_channel": res.per_channel,
            "calibration_method": res.calibration_method,
            "calibration_samples": res.calibration_samples,
            "excluded_nodes": list(res.excluded_nodes),
            "notes": list(res.notes),
        }
        return out, res.precision

    def _as_is(self, fp32: Path) -> tuple[Path, str]:
        """An existing .tflite is the candidate itself; its precision is read from its input tensors."""
        from runtime.backends.litert import LiteEngine

        engine = LiteEngine(fp32, self.options)
        precision = "int8" if engine.quantized else "fp32"
        engine.close()
        out = self.work / "model.tflite"
        shutil.copyfile(fp32, out)
        self.section["quantize"] = {
            "precision": precision,
            "method": "none",
            "per_channel": False,
            "calibration_method": None,
            "calibration_samples": 0,
            "excluded_nodes": [],
            "notes": ["an existing .tflite file is bundled as it is (no conversion, no quantization)"],
        }
        return out, precision

    def validate(
        self, fp32: Path, cand: Path, val: Any, inputs: tuple[TensorSpec, ...]
    ) -> tuple[Any, list[np.ndarray]]:
        from toolchain import validate

        if val is not None:
            feeds = [s.feeds for s in val.samples]
            labels = [s.label for s in val.samples]
            sources = [s.source for s in val.samples]
            self.section["validation_set"] = {
                "source": val.root,
                "samples": len(feeds),
                "labeled": val.labeled,
            }
        else:
            feeds = _random_samples(inputs, 32)
            labels, sources = [None] * len(feeds), [f"random[{i}]" for i in range(len(feeds))]
            self.section["validation_set"] = {
                "source": "random inputs",
                "samples": len(feeds),
                "labeled": False,
            }
            warning = "no --validation or --calibration set: compared on random inputs (agreement only)"
            if warning not in self.warnings:
                self.warnings.append(warning)
        what = FLAG[backend_for(cand)].upper()
        with self.progress.bar(f"validating {what} reference", len(feeds)) as tick:
            count = iter(range(1, len(feeds) + 1))
            ref = validate.run_outputs(fp32, feeds, self.options, progress=lambda: tick(next(count)))
        with self.progress.bar(f"validating {what} candidate", len(feeds)) as tick:
            count = iter(range(1, len(feeds) + 1))
            out = validate.run_outputs(cand, feeds, self.options, progress=lambda: tick(next(count)))
        from toolchain.metrics import resolve

        self.metric = resolve(self.req.metric, ref[0].shape if ref else ())
        self.feeds, self.labels, self.sources = feeds, labels, sources
        cmp = validate.compare(ref, out, task=self.metric.task, labels=labels, sources=sources, metric=self.metric)
        self.section["validation"] = dataclasses.asdict(cmp)
        return cmp, ref

    def qat(self, model: Any, cand: Path, spec: QuantizationSpec, calib: Any, cmp: Any, ref: list[np.ndarray]) -> Any:
        """Fine-tune with fake INT8 and distillation (``--train``) when PTQ still fails; re-export, quantize, gate."""
        from toolchain import qat, validate

        req = self.req
        if not _qat_applies(req, model, spec):
            return cmp
        size = cand.stat().st_size
        if validate.judge(req.profile, cmp, size_mb=size / 2**20, latency_p95_ms=None).passed:
            self.section["qat"] = {"ran": False, "reason": "post-training quantization passes the gate"}
            return cmp
        loader = qat.load_loader(req.train)  # type: ignore[arg-type]  # _qat_applies checked it
        self.progress.step("quantization-aware fine-tune with the FP32 model as teacher")
        with self.progress.bar("fine-tune steps", qat.STEPS) as tick:
            student, res = qat.run(model.module, loader, progress=tick)
        tuned = dataclasses.replace(model, module=student)
        exported = self._export(tuned, self.work / "qat.onnx")
        qat_cand = self.work / "qat-model.onnx"
        from toolchain.passes import quantize

        quantize.run(exported.path, qat_cand, spec, calibration=calib)
        out = validate.run_outputs(qat_cand, self.feeds, self.options)
        qcmp = validate.compare(
            ref, out, task=self.metric.task, labels=self.labels, sources=self.sources, metric=self.metric
        )
        self.section["qat"] = {
            "ran": True,
            **dataclasses.asdict(res),
            "validation": dataclasses.asdict(qcmp),
            "ptq_validation": dataclasses.asdict(cmp),
        }
        better = (qcmp.agreement, -(qcmp.accuracy_drop or 0.0)) > (cmp.agreement, -(cmp.accuracy_drop or 0.0))
        if not better:
            self.warnings.append(
                "quantization-aware training did not beat post-training quantization; kept the PTQ model"
            )
            return cmp
        shutil.copyfile(qat_cand, cand)
        self.section["qat"]["kept"] = True
        self.section["validation"] = dataclasses.asdict(qcmp)
        self.section["quantize"].update(
            excluded_nodes=[], float_groups=[], chosen_attempt="quantization-aware training"
        )
        return qcmp

    def search(
        self, fp32: Path, cand: Path, spec: QuantizationSpec, calib: Any, cmp: Any, ref: list[np.ndarray]
    ) -> Any:
        """Run the accuracy search when the recipe failed the gate; returns the comparison of the model kept."""
        from toolchain import search, validate

        req = self.req
        size = cand.stat().st_size

        def judge(c: Any, size_bytes: int) -> bool:
            return validate.judge(req.profile, c, size_mb=size_bytes / 2**20, latency_p95_ms=None).passed

        enabled = req.search if req.search is not None else True
        if spec.mode != "static" or judge(cmp, size) or not enabled or calib is None:
            if not enabled and not judge(cmp, size):
                self.warnings.append("the recipe fails the gate and the search is off (--no-search)")
            return cmp
        outcome = search.run(
            search.SearchInputs(
                fp32=fp32,
                spec=spec,
                calibration=calib,
                feeds=self.feeds,
                labels=self.labels,
                sources=self.sources,
                reference=ref,
                metric=self.metric,
                profile=req.profile,
                options=self.options,
                work=self.work / "search",
                cache_dir=self.cache_dir,
                budget_s=req.search_budget,
                calibration_seconds=getattr(self, "quantize_seconds", None),
            ),
            self.progress,
            judge,
        )
        self.section["search"] = outcome.to_dict()
        best = outcome.best
        if best is None or best.comparison is None:
            return cmp
        search.keep(best, cand)
        self.section["validation"] = dataclasses.asdict(best.comparison)
        self.section["quantize"].update(
            settings=best.settings,
            excluded_nodes=_nodes(outcome, best),
            float_groups=list(best.float_groups),
            int16_weight_groups=list(best.int16_weight_groups),
            activation_bits=best.settings.get("activation_bits", 8),
            chosen_attempt=best.name,
        )
        if outcome.chosen is None:
            self.warnings.append(
                f"the search found no candidate that passes the gate in {outcome.seconds:.0f} s; "
                f"kept the closest ({best.name})"
            )
        return best.comparison

    def bench(self, fp32: Path, cand: Path) -> tuple[Any, Any]:
        from toolchain.bench import bench_model, host_options

        n = self.req.bench_iterations
        if n <= 0:
            return None, None
        opts = host_options(dataclasses.replace(self.options, deterministic=False))
        results = []
        for label, path in (("reference", fp32), ("candidate", cand)):
            with self.progress.bar(f"benchmarking {label} {path.suffix} (host)", n) as tick:
                results.append(bench_model(path, opts, iterations=n, progress=lambda i, _n: tick(i)))
        self.section["benchmark"] = {
            "note": f"host figures ({platform.machine()}, {os.cpu_count()} cores), not device figures",
            "threads": opts.intra_op_threads,
            "reference": dataclasses.asdict(results[0]),
            "candidate": dataclasses.asdict(results[1]),
            "latency_ratio": results[1].p50_ms / results[0].p50_ms if results[0].p50_ms else None,
        }
        return results[0], results[1]

    def candidate(self, model: Any, backend: str, exported: Any, source: Any, spec: QuantizationSpec) -> Candidate:
        """Quantize, validate, benchmark and gate one backend's candidate."""
        from toolchain import validate

        self.section = {"export": export_section(exported)}
        inputs = exported.inputs
        preprocess = self.req.preprocess or default_preprocess(inputs[0])
        calib, val = self.datasets(inputs, spec, preprocess)
        cand, precision = self.quantize(model.kind, backend, source.path, spec, calib)
        cmp, ref_out = self.validate(exported.path, cand, val, inputs)
        if backend == "onnxruntime":  # the accuracy search and QAT work on ONNX Runtime's quantizer
            cmp = self.search(source.path, cand, spec, calib, cmp, ref_out)
            cmp = self.qat(model, cand, spec, calib, cmp, ref_out)
            precision = _searched_precision(precision, self.section["quantize"])
        if source is not exported:
            self.prune_cost(exported.path, source.path, val, ref_out, cmp.task)
        ref_bench, cand_bench = self.bench(exported.path, cand)
        ref_size, cand_size = exported.path.stat().st_size, cand.stat().st_size
        self.section["size"] = {
            "reference_bytes": ref_size,
            "candidate_bytes": cand_size,
            "ratio": cand_size / ref_size,
        }
        if precision.startswith("int8") and cand_bench is not None and ref_bench is not None:
            self._int8_speed_warning(backend, ref_bench, cand_bench, ref_size, cand_size)
        gate = validate.judge(
            self.req.profile,
            cmp,
            size_mb=cand_size / 2**20,
            latency_p95_ms=cand_bench.p95_ms if cand_bench else None,
        )
        self.section["gate"] = gate.to_dict()
        return Candidate(backend, exported.path, cand, precision, cmp, ref_out, val, gate, self.section)

    def _int8_speed_warning(self, backend: str, ref: Any, cand: Any, ref_size: int, cand_size: int) -> None:
        what = f"the {FLAG[backend].upper()} INT8 model" if len(self.backends) > 1 else "the INT8 model"
        if cand.p50_ms > ref.p50_ms and cand_size > 0.9 * ref_size:
            self.warnings.append(f"{what} is slower than FP32 on this host and no smaller")
            _log.warning("%s is slower than FP32 on this host and no smaller", what)
        elif cand.p50_ms > 1.1 * ref.p50_ms:
            self.warnings.append(
                f"{what[0].upper()}{what[1:]} runs slower than FP32 on this host "
                f"({cand.p50_ms:.2f} vs {ref.p50_ms:.2f} ms p50)"
            )


def _qat_applies(req: BuildRequest, model: Any, spec: QuantizationSpec) -> bool:
    """True when --train was given; refuses inputs QAT cannot handle."""
    from toolchain.errors import UsageError

    if req.train is None:
        return False
    if model.kind != "torch" or model.module is None:
        raise UsageError(
            f"quantization-aware training needs a PyTorch module:factory input, got a {model.kind} model",
            flag="--train",
        )
    if spec.mode != "static":
        raise UsageError(f"quantization-aware training targets static INT8, the recipe is {spec.mode}", flag="--train")
    return True


def _nodes(outcome: Any, attempt: Any) -> list[str]:
    """Node names an attempt kept in float (from the sensitivity groups it lists)."""
    wanted = set(attempt.float_groups)
    return [n for s in outcome.sensitivity if s.group.label in wanted for n in s.group.nodes]


def _searched_precision(precision: str, quantize: dict[str, Any]) -> str:
    """The label of what the search kept: 16-bit activations are not "int8" (e.g. ``int8-s8s8`` → ``int8w-a16``)."""
    bits = quantize.get("activation_bits", 8)
    if bits == 8 or not precision.startswith("int8"):
        return precision
    wide = "+int16" if quantize.get("int16_weight_groups") else ""
    return f"int8{wide}w-a{bits}"


def _quantize_pass(backend: str) -> Any:
    if backend == "tflite":
        from toolchain.passes import tflite_quantize

        return tflite_quantize
    from toolchain.passes import quantize

    return quantize


def _ignore(done: int) -> None:
    """A progress callback that draws nothing."""


def _postprocess(task: str, ref_out: list[np.ndarray], labels: tuple[str, ...]) -> Postprocess:
    if task == "classification":
        first = ref_out[0].reshape(-1) if ref_out else np.zeros(1)
        is_prob = bool(np.all(first >= 0) and abs(float(first.sum()) - 1.0) < 1e-3)
        return Postprocess(kind="classification", softmax=not is_prob, top_k=min(5, first.size), labels=labels)
    if task == "dense":
        return Postprocess(kind="dense")
    return Postprocess(kind="none")


def build(req: BuildRequest, progress: Progress | None = None) -> BuildResult:
    """Run the whole build; raises :class:`GateError` when the gate fails and is enforced."""
    progress = progress or NullProgress()
    req.output_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="edgefleet-build-"))
    try:
        b = _Build(req, progress, work)
        model = b.load()
        b.backends = backends(req.backend, req.profile, model.kind, req.model)
        if model.kind == "tflite" and req.profile.backend != "tflite":
            b.warnings.append(
                f"profile {req.profile.name} prefers {req.profile.backend}; "
                "an existing .tflite file is bundled for LiteRT (backend tflite)"
            )
        spec = _quant_spec(req)
        exports = b.exports(model, b.backends)
        cands = [b.candidate(model, bk, ref, src, spec) for bk, (ref, src) in exports.items()]
        chosen, reason = choose(cands, req.profile, flag=req.backend, kind=model.kind, enforce_gate=req.enforce_gate)
        merge(b.report, cands, chosen, reason)
        return _finish(b, req, model, chosen, exports[chosen.backend][0])
    finally:
        if req.keep_work:
            progress.step(f"work files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _finish(b: _Build, req: BuildRequest, model: Any, chosen: Candidate, exported: Any) -> BuildResult:
    """Gate, then sign and pack the chosen candidate."""
    from toolchain import bundle as bundle_mod

    name = req.name or model.name
    gate, cmp = chosen.gate, chosen.cmp
    labels = req.labels or (chosen.val.label_names if chosen.val is not None else ())
    postprocess = _postprocess(cmp.task, chosen.ref_out, tuple(labels))
    b.report.update(name=name, version=req.version, precision=chosen.precision, task=cmp.task, warnings=b.warnings)
    stem = f"{name}-{req.profile.name}-{req.version}"
    report_path = req.output_dir / f"{stem}.report.json"
    if not gate.passed and req.enforce_gate:
        b.report["bundle"] = None
        report_path.write_text(json.dumps(b.report, indent=2, default=str) + "\n")
        failed = ", ".join(f"{c.name} {c.value} (limit {c.limit})" for c in gate.failures())
        raise GateError(
            f"validation gate failed for profile {req.profile.name}: {failed}; "
            f"report: {report_path} (--allow-gate-failure packs it anyway)",
            report=b.report,
        )
    if not gate.passed:
        b.warnings.append("GATE FAILED and was overridden with --allow-gate-failure")
    b.progress.step("signing and packing the bundle")
    file_name = MODEL_FILE[chosen.backend]
    manifest = Manifest(
        name=name,
        version=req.version,
        parent_version=req.parent_version,
        created=_created(),
        profile=ProfileRef(name=req.profile.name, digest=req.profile.digest, arch=req.profile.arch),
        backend=chosen.backend,  # type: ignore[arg-type]
        model=file_name,
        files=(bundle_mod.file_entry(chosen.path, file_name, role="model"),),
        inputs=exported.inputs,
        outputs=exported.outputs,
        precision=chosen.precision,
        task=_manifest_task(cmp.task),
        preprocess=req.preprocess or default_preprocess(exported.inputs[0]),
        postprocess=postprocess,
        validation={
            "gate": gate.to_dict(),
            "metrics": b.report["validation"],
            "size": b.report["size"],
            "validation_set": b.report["validation_set"],
            "choice": b.report["choice"],
        },
        toolchain_version=__version__,
    )
    out = bundle_mod.pack({file_name: chosen.path}, manifest, _load_key(req.key), req.output_dir / f"{stem}.tar")
    b.report["bundle"] = str(out)
    b.report["model_sha256"] = manifest.files[0].sha256
    report_path.write_text(json.dumps(b.report, indent=2, default=str) + "\n")
    return BuildResult(b.report, out, report_path, gate.passed, b.warnings)


def _manifest_task(task: str) -> Any:
    return task if task in ("classification", "dense", "embedding", "detection", "generic") else "generic"


def _load_key(path: Path) -> Any:
    from runtime.errors import EdgeError
    from runtime.signing import load_private_key
    from toolchain.errors import KeyFileError

    try:
        return load_private_key(path)
    except EdgeError as exc:
        raise KeyFileError(f"{exc} (create one with `toolchain keygen -o DIR`)", path=None) from exc
