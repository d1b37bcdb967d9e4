"""The quantize pass: FP32 ONNX -> static INT8 QDQ, dynamic INT8, FP16 or an unchanged copy.

Wraps ``onnxruntime.quantization`` (imported inside :func:`run`). Static quantization runs
``quant_pre_process`` (symbolic shape inference + ORT basic optimisation) first, falling back to
the unprocessed model with a note when that fails, then calibrates on the calibration set.
FP16 uses ``onnxruntime.transformers.float16`` (shipped with onnxruntime) with float32 inputs
and outputs kept, so callers feed the same tensors to every variant.

ONNX Runtime logs through the *root* logger and its entropy/percentile calibrators ``print()``;
while the pass runs, its warnings are collected into :attr:`QuantizeResult.notes` and its stdout
is kept off the caller's stdout (logged at DEBUG). The output is always a single ``.onnx`` file
and is byte-identical for the same model, spec and calibration samples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.profile import QuantizationSpec
from toolchain.calibration import Dataset, DatasetReader, Sample
from toolchain.errors import DatasetError, PassError, UsageError

__all__ = ["QuantizeResult", "Tuning", "run"]

PASS_NAME = "quantize"
_log = logging.getLogger(__name__)
_PER_CHANNEL_MIN_OPSET = 13  # DequantizeLinear gained its `axis` attribute in opset 13
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_MAX_ORT_NOTES = 8


@dataclass(frozen=True)
class Tuning:
    """Knobs the search turns beyond the profile's recipe (the defaults change nothing).

    ``nodes_to_quantize`` (when not empty) quantizes only those nodes — used to measure one
    node group's sensitivity alone; ``nodes_to_exclude`` keeps nodes in float.
    ``activation_bits`` 16 quantizes every activation to 16 bits (int16/uint16 as the profile's
    activation type), ``wide_weights`` names nodes whose weight input is quantized to int16;
    both use ORT's ``com.microsoft`` Q/DQ ops and make the model opset 21.
    """

    symmetric_activations: bool = False
    nodes_to_exclude: tuple[str, ...] = ()
    nodes_to_quantize: tuple[str, ...] = ()
    activation_bits: int = 8
    wide_weights: tuple[str, ...] = ()


@dataclass(frozen=True)
class QuantizeResult:
    """What the quantize pass produced."""

    path: Path
    precision: str  # "int8-s8s8", "int8-u8s8", "int8-dynamic", "fp16", "fp32"
    method: str  # "static-qdq", "static-qoperator", "dynamic", "fp16", "none"
    per_channel: bool
    calibration_method: str | None
    calibration_samples: int
    excluded_nodes: tuple[str, ...]
    notes: tuple[str, ...]


def run(
    fp32_path: Path,
    out_path: Path,
    spec: QuantizationSpec,
    *,
    calibration: Dataset | None,
    progress: Callable[[int, int], None] | None = None,
    nodes_to_exclude: Sequence[str] = (),
    tuning: Tuning | None = None,
    cache_dir: Path | None = None,
) -> QuantizeResult:
    """Quantize ``fp32_path`` into ``out_path`` (one file) as ``spec.mode`` says.

    Static mode needs ``calibration`` (at most ``spec.calibration_samples`` of it are used,
    spread evenly over the set); ``progress(done, total)`` follows the calibration samples.
    ``nodes_to_exclude`` names nodes kept in float (names missing from the model are noted).
    With ``cache_dir``, the pre-processed model and the activation ranges of each calibration
    method are computed once and reused by later calls with the same ``fp32_path``.
    """
    tuning = tuning or Tuning()
    if nodes_to_exclude:
        tuning = dataclasses.replace(tuning, nodes_to_exclude=(*tuning.nodes_to_exclude, *nodes_to_exclude))
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if not fp32_path.is_file():
        raise PassError(f"{fp32_path}: no such model file", pass_name=PASS_NAME)
    samples = _calibration_samples(spec, calibration)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    excluded: tuple[str, ...] = ()
    if spec.mode == "none":
        with _translated(spec):
            _copy(fp32_path, out_path, notes)
    else:
        with (
            tempfile.TemporaryDirectory(prefix=".quantize-", dir=out_path.parent) as tmp,
            _ort_output(notes, stdout_progress=progress) as progress_cb,
            _translated(spec),
        ):
            work = Path(tmp)
            if spec.mode == "fp16":
                excluded = _fp16(fp32_path, work / "model.onnx", tuning.nodes_to_exclude, notes)
            else:
                excluded = _integer(
                    fp32_path,
                    work,
                    spec,
                    _Inputs(samples, calibration, progress_cb, cache_dir),
                    tuning,
                    notes,
                )
            _finish(work / "model.onnx", out_path, fp32_path, notes)
    static = spec.mode == "static"
    return QuantizeResult(
        path=out_path,
        precision=_precision(spec),
        method=f"static-{spec.format}" if static else spec.mode,
        per_channel=spec.per_channel and spec.mode in ("static", "dynamic"),
        calibration_method=spec.calibration_method if static else None,
        calibration_samples=len(samples),
        excluded_nodes=excluded,
        notes=tuple(notes),
    )


def _precision(spec: QuantizationSpec) -> str:
    if spec.mode == "static":
        short = {"int8": "s8", "uint8": "u8"}
        return f"int8-{short[spec.activation_type]}{short[spec.weight_type]}"
    return {"dynamic": "int8-dynamic", "fp16": "fp16"}.get(spec.mode, "fp32")


@contextlib.contextmanager
def _translated(spec: QuantizationSpec) -> Iterator[None]:
    """Turn onnx/onnxruntime exceptions into a PassError naming the pass and the mode."""
    try:
        yield
    except (PassError, DatasetError, UsageError):
        raise
    except Exception as exc:  # onnx/onnxruntime raise anything from ValueError to their own Fail
        text = str(exc).strip()
        first = text.splitlines()[0] if text else ""
        raise PassError(
            f"mode {spec.mode!r} failed in onnx/onnxruntime: {type(exc).__name__}: {first}; "
            "try another --quantize mode, or exclude the failing node",
            pass_name=PASS_NAME,
        ) from exc


def _calibration_samples(spec: QuantizationSpec, calibration: Dataset | None) -> tuple[Sample, ...]:
    """The samples static calibration uses: up to ``calibration_samples``, spread over the set."""
    if spec.mode != "static":
        return ()
    if calibration is None or not calibration.samples:
        raise UsageError(
            "static INT8 quantization needs representative inputs: pass --calibration DIR "
            "(a folder of images or .npy files), or use --quantize dynamic",
            flag="--calibration",
        )
    total = len(calibration.samples)
    count = min(total, spec.calibration_samples)
    picks = np.linspace(0, total - 1, count).round().astype(int) if count < total else range(total)
    return tuple(calibration.samples[int(i)] for i in picks)


def _copy(src: Path, dst: Path, notes: list[str]) -> None:
    import onnx  # deferred: heavy
    from onnx.external_data_helper import uses_external_data

    header = onnx.load(str(src), load_external_data=False)
    if any(uses_external_data(t) for t in header.graph.initializer):
        onnx.save(onnx.load(str(src)), str(dst))  # fold the external data into one file
        notes.append("copied; external data folded into one file")
    else:
        shutil.copyfile(src, dst)
        notes.append("copied unchanged")


@dataclass(frozen=True)
class _Inputs:
    samples: tuple[Sample, ...]
    calibration: Dataset | None
    progress: Callable[[int, int], None] | None
    cache_dir: Path | None


def _prepared(src: Path, work: Path, spec: QuantizationSpec, cache_dir: Path | None, notes: list[str]) -> Path:
    """Opset upgrade + ORT pre-processing, done once per cache directory and per-channel choice."""
    cached = (
        cache_dir / f"prepared-{'pc' if spec.per_channel and spec.mode == 'static' else 'pt'}.onnx"
        if cache_dir
        else None
    )
    if cached is not None and cached.is_file():
        notes.append("pre-processed model reused from the search cache")
        return cached
    model_in = _upgrade_opset(src, work, spec, notes)
    model_in = _pre_process(model_in, work, notes)
    if cached is None:
        return model_in
    cached.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_in, cached)
    return cached


def _integer(
    src: Path,
    work: Path,
    spec: QuantizationSpec,
    inputs: _Inputs,
    tuning: Tuning,
    notes: list[str],
) -> tuple[str, ...]:
    """Static or dynamic INT8 via onnxruntime.quantization; returns the excluded node names."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    samples, calibration = inputs.samples, inputs.calibration
    model_in = _prepared(src, work, spec, inputs.cache_dir, notes)
    excluded = _existing_nodes(model_in, tuning.nodes_to_exclude, notes)
    qtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    out = work / "model.onnx"
    if spec.mode == "dynamic":
        quantize_dynamic(
            model_in,
            out,
            per_channel=spec.per_channel,
            reduce_range=spec.reduce_range,
            weight_type=qtype[spec.weight_type],
            nodes_to_exclude=list(excluded),
        )
        return excluded
    assert calibration is not None  # _calibration_samples checked it
    _check_feeds(model_in, samples, calibration)
    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[spec.calibration_method]
    if spec.calibration_method == "entropy":
        notes.append(
            "entropy calibration: quantize_static runs ORT's calibrator with 128 histogram bins "
            "(not configurable there), which often yields the min-max range; 'percentile' clips "
            "outliers"
        )
    ranges = inputs.cache_dir / f"ranges-{spec.calibration_method}.json" if inputs.cache_dir else None
    if ranges is not None and ranges.is_file():
        notes.append(f"{spec.calibration_method} activation ranges reused from the search cache")
    extra: dict[str, Any] = {"ActivationSymmetric": True} if tuning.symmetric_activations else {}
    activation = qtype[spec.activation_type]
    if tuning.activation_bits == 16 or tuning.wide_weights:
        extra["UseQDQContribOps"] = True
        extra["TensorQuantOverrides"] = _wide_weight_overrides(model_in, tuning.wide_weights, spec.per_channel)
        if tuning.activation_bits == 16:
            activation = {"int8": QuantType.QInt16, "uint8": QuantType.QUInt16}[spec.activation_type]
    quantize_static(
        model_in,
        out,
        None if ranges is not None and ranges.is_file() else DatasetReader(samples, progress=inputs.progress),
        quant_format=QuantFormat.QDQ if spec.format == "qdq" else QuantFormat.QOperator,
        per_channel=spec.per_channel,
        reduce_range=spec.reduce_range,
        activation_type=activation,
        weight_type=qtype[spec.weight_type],
        nodes_to_exclude=list(excluded),
        nodes_to_quantize=list(tuning.nodes_to_quantize),
        calibrate_method=method,
        calibration_providers=["CPUExecutionProvider"],
        extra_options=extra,
        calibration_cache_path=ranges,
    )
    return excluded


def _wide_weight_overrides(model_path: Path, nodes: Sequence[str], per_channel: bool) -> dict[str, list[Any]]:
    """``TensorQuantOverrides`` making the weight input of ``nodes`` int16 (same channel axis as ORT uses)."""
    import onnx
    from onnxruntime.quantization import QuantType

    if not nodes:
        return {}
    graph = onnx.load(str(model_path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    wanted = set(nodes)
    out: dict[str, list[Any]] = {}
    for node in graph.node:
        if node.name not in wanted or len(node.input) < 2 or node.input[1] not in weights:
            continue
        override: dict[str, Any] = {"quant_type": QuantType.QInt16}
        if per_channel and node.op_type in ("Conv", "ConvTranspose"):
            override["axis"] = 0 if node.op_type == "Conv" else 1
        out[node.input[1]] = [override]
    return out


def _upgrade_opset(src: Path, work: Path, spec: QuantizationSpec, notes: list[str]) -> Path:
    """Per-channel static QDQ needs opset >= 13; convert older models first."""
    import onnx
    import onnx.version_converter

    if spec.mode != "static" or not spec.per_channel:
        return src
    model = onnx.load(str(src))
    opset = _onnx_opset(model)
    if opset >= _PER_CHANNEL_MIN_OPSET:
        return src
    try:
        upgraded = onnx.version_converter.convert_version(model, _PER_CHANNEL_MIN_OPSET)
    except Exception as exc:  # the converter raises RuntimeError/ValueError/C++ errors
        raise PassError(
            f"per-channel quantization needs opset {_PER_CHANNEL_MIN_OPSET}, and converting this "
            f"opset-{opset} model failed ({exc}); re-export at opset >= {_PER_CHANNEL_MIN_OPSET} "
            "or set per_channel = false in the profile",
            pass_name=PASS_NAME,
        ) from exc
    path = work / "upgraded.onnx"
    onnx.save(upgraded, str(path))
    notes.append(f"opset {opset} upgraded to {_PER_CHANNEL_MIN_OPSET} for per-channel quantization")
    return path


def _onnx_opset(model: Any) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _pre_process(src: Path, work: Path, notes: list[str]) -> Path:
    """Run ORT's quantization pre-processing; on failure keep the unprocessed model and say so."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = work / "preprocessed.onnx"
    try:
        quant_pre_process(src, out)
    except Exception as exc:  # symbolic shape inference fails on some graphs; not fatal
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        notes.append(
            f"quantization pre-processing failed ({type(exc).__name__}: {first}); quantized the model without it"
        )
        return src
    return out


def _existing_nodes(model_path: Path, names: Sequence[str], notes: list[str]) -> tuple[str, ...]:
    import onnx

    if not names:
        return ()
    present = {n.name for n in onnx.load(str(model_path)).graph.node}
    missing = [n for n in names if n not in present]
    if missing:
        notes.append(f"nodes to exclude not found in the model (ignored): {', '.join(missing)}")
    return tuple(n for n in dict.fromkeys(names) if n in present)


def _check_feeds(model_path: Path, samples: tuple[Sample, ...], calibration: Dataset) -> None:
    """The calibration feeds must name exactly the model's graph inputs."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    wanted = {i.name for i in graph.input if i.name not in initializers}
    for sample in samples:
        if set(sample.feeds) != wanted:
            raise DatasetError(
                f"{sample.source} feeds {sorted(sample.feeds)} but the model's inputs are "
                f"{sorted(wanted)}; load the calibration set against this model's inputs",
                path=calibration.root,
            )


def _fp16(src: Path, dst: Path, nodes_to_exclude: Sequence[str], notes: list[str]) -> tuple[str, ...]:
    """FP16 weights and compute, float32 inputs/outputs."""
    import onnx

    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError:  # older/slim onnxruntime builds: the same converter lives in onnxconverter-common
        from onnxconverter_common.float16 import convert_float_to_float16

    excluded = _existing_nodes(src, nodes_to_exclude, notes)
    model = onnx.load(str(src))
    converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=list(excluded))
    onnx.save(converted, str(dst))
    return excluded


def _finish(produced: Path, out_path: Path, fp32_path: Path, notes: list[str]) -> None:
    """Check the output is one self-contained file, count Q/DQ nodes, move it into place."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(produced), load_external_data=False)
    if any(uses_external_data(t) for t in model.graph.initializer):
        raise PassError(
            "onnxruntime wrote external data; models over 2 GB are not supported on devices",
            pass_name=PASS_NAME,
        )
    before = _count_ops(onnx.load(str(fp32_path), load_external_data=False))
    after = _count_ops(model)
    qdq = sum(after.get(op, 0) - before.get(op, 0) for op in _QDQ_OPS)
    if qdq:
        notes.append(f"inserted {qdq} QuantizeLinear/DequantizeLinear nodes")
    quantized = {op: n for op, n in sorted(after.items()) if _is_quantized_op(op) and op not in _QDQ_OPS}
    if quantized:
        notes.append("quantized ops: " + ", ".join(f"{op} x{n}" for op, n in quantized.items()))
    if after.get("ConvInteger"):
        notes.append(
            "dynamic quantization made ConvInteger nodes, often slower than FP32 on CPUs; "
            "static quantization suits convolutional models better"
        )
    shutil.move(str(produced), str(out_path))


def _count_ops(model: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _is_quantized_op(op: str) -> bool:
    return op.startswith("QLinear") or op.endswith("Integer") or op == "DynamicQuantizeLinear"


class _Collector(logging.Handler):
    """Keeps the first line of onnxruntime's WARNING+ records."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "onnxruntime" not in record.pathname:
            return
        lines = record.getMessage().strip().splitlines()
        line = lines[0][:200] if lines else ""
        # "Please consider pre-processing" only appears when it failed, which is noted already
        if line and not line.startswith("Please consider") and f"onnxruntime: {line}" not in self.messages:
            self.messages.append(f"onnxruntime: {line}")


@contextlib.contextmanager
def _ort_output(
    notes: list[str], *, stdout_progress: Callable[[int, int], None] | None
) -> Iterator[Callable[[int, int], None] | None]:
    """Collect ORT's root-logger warnings into ``notes`` and keep its prints off stdout.

    A handler on the root logger also stops ``logging.warning()`` from calling
    ``basicConfig()`` behind the CLI's back. Yields the progress callback wrapped so it runs
    with the caller's real stdout (progress bars keep working).
    """
    real_stdout = sys.stdout
    wrapped: Callable[[int, int], None] | None = None
    if stdout_progress is not None:
        callback = stdout_progress

        def wrapped(done: int, total: int) -> None:
            with contextlib.redirect_stdout(real_stdout):
                callback(done, total)

    collector = _Collector()
    root = logging.getLogger()
    root.addHandler(collector)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield wrapped
    finally:
        root.removeHandler(collector)
        for line in captured.getvalue().splitlines():
            _log.debug("onnxruntime: %s", line)
        notes.extend(collector.messages[:_MAX_ORT_NOTES])
