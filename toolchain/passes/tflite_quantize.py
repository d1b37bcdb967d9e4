"""The TFLite quantize pass: FP32 ``.tflite`` -> full-integer INT8, dynamic INT8, FP16 weights or a copy.

Wraps ai-edge-quantizer (the ``tflite-export`` extra; imported inside :func:`run`):

* ``static``: full-integer INT8 — int8 weights (symmetric, per output channel unless
  ``per_channel`` is off), int8 activations calibrated on the same calibration samples the ONNX
  path uses (min/max, as a moving average over the samples: ai-edge-quantizer's way; the report
  calls it ``minmax-ema``), and int8 model inputs and outputs (the runtime's LiteRT engine
  quantizes float feeds and dequantizes outputs, so callers feed the same tensors as for FP32);
* ``dynamic``: int8 weights, activations quantized at run time;
* ``fp16``: weights stored as float16, computed in float32;
* ``none``: the FP32 model unchanged.

LiteRT's integer kernels take int8 activations, so a profile asking for uint8 (the x86 ONNX
recipe) or for entropy/percentile calibration gets int8 min/max here, with a note saying so.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from runtime.profile import QuantizationSpec
from toolchain.calibration import Dataset, Sample
from toolchain.errors import PassError
from toolchain.passes.quantize import QuantizeResult, _calibration_samples
from toolchain.passes.tflite_export import INSTALL_HINT, quiet_converter

__all__ = ["run"]

PASS_NAME = "tflite-quantize"
_CHUNK = 16  # calibration samples per ai-edge-quantizer call (the progress bar moves per chunk)


def _quantizer(fp32: Path) -> tuple[Any, Any, Any]:
    try:
        from ai_edge_quantizer import qtyping, quantizer
        from ai_edge_quantizer.algorithm_manager import AlgorithmName
    except ImportError as exc:
        raise PassError(f"ai-edge-quantizer is not installed ({exc}); {INSTALL_HINT}", pass_name=PASS_NAME) from exc
    return quantizer.Quantizer(str(fp32)), qtyping, AlgorithmName


def _configure(qt: Any, qtyping: Any, algorithms: Any, spec: QuantizationSpec, notes: list[str]) -> tuple[str, str]:
    """Load the recipe for ``spec.mode``; returns (precision, method)."""
    every = {"regex": ".*", "operation_name": qtyping.TFLOperationName.ALL_SUPPORTED}
    granularity = qtyping.QuantGranularity.CHANNELWISE if spec.per_channel else qtyping.QuantGranularity.TENSORWISE
    if spec.mode == "fp16":
        qt.add_weight_only_config(**every, num_bits=16, algorithm_key=algorithms.FLOAT_CASTING)
        return "fp16", "fp16-weights"
    if spec.mode == "dynamic":
        qt.add_dynamic_config(**every, num_bits=8, granularity=granularity)
        return "int8-dynamic", "dynamic"
    if spec.activation_type != "int8":
        notes.append(f"LiteRT integer kernels take int8 activations: activation_type {spec.activation_type} not used")
    if spec.calibration_method != "minmax":
        notes.append(f"ai-edge-quantizer calibrates min/max (moving average): {spec.calibration_method} not used")
    qt.add_static_config(**every, activation_num_bits=8, weight_num_bits=8, weight_granularity=granularity)
    return "int8-s8s8", "static-full-integer"


def _calibrate(
    qt: Any, fp32: Path, samples: Sequence[Sample], progress: Callable[[int, int], None] | None
) -> dict[str, Any]:
    from ai_edge_litert.interpreter import Interpreter

    signatures = Interpreter(model_path=str(fp32)).get_signature_list()
    if len(signatures) != 1:
        raise PassError(f"{fp32}: expected one signature to calibrate, found {len(signatures)}", pass_name=PASS_NAME)
    key = next(iter(signatures))
    result: dict[str, Any] | None = None
    for start in range(0, len(samples), _CHUNK):
        if progress:
            progress(start, len(samples))
        chunk = [dict(s.feeds) for s in samples[start : start + _CHUNK]]
        result = qt.calibrate({key: chunk}, previous_calibration_result=result)
    if progress:
        progress(len(samples), len(samples))
    return result or {}


def run(
    fp32_path: Path,
    out_path: Path,
    spec: QuantizationSpec,
    *,
    calibration: Dataset | None,
    progress: Callable[[int, int], None] | None = None,
) -> QuantizeResult:
    """Quantize ``fp32_path`` into ``out_path`` as ``spec.mode`` says (see the module docstring).

    Static mode needs ``calibration``: at most ``spec.calibration_samples`` of it, spread evenly
    over the set, as the ONNX pass picks them; ``progress(done, total)`` follows those samples.
    """
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if not fp32_path.is_file():
        raise PassError(f"{fp32_path}: no such model file", pass_name=PASS_NAME)
    samples = _calibration_samples(spec, calibration)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    if spec.mode == "none":
        shutil.copyfile(fp32_path, out_path)
        return QuantizeResult(out_path, "fp32", "none", False, None, 0, (), ())
    qt, qtyping, algorithms = _quantizer(fp32_path)
    precision, method = _configure(qt, qtyping, algorithms, spec, notes)
    try:
        with quiet_converter(notes):
            qsvs = _calibrate(qt, fp32_path, samples, progress) if samples else None
            result = qt.quantize(qsvs, enable_progress_report=False)
    # ai-edge-quantizer raises ValueError/RuntimeError/KeyError… with no tree of its own.
    except Exception as exc:
        if isinstance(exc, PassError):
            raise
        raise PassError(
            f"ai-edge-quantizer could not quantize {fp32_path.name} ({spec.mode}): {type(exc).__name__}: {exc}",
            pass_name=PASS_NAME,
        ) from exc
    out_path.write_bytes(bytes(result.quantized_model))
    return QuantizeResult(
        path=out_path,
        precision=precision,
        method=method,
        per_channel=spec.per_channel and spec.mode != "fp16",
        calibration_method="minmax-ema" if samples else None,
        calibration_samples=len(samples),
        excluded_nodes=(),
        notes=tuple(notes),
    )
