"""LiteRT engine: a .tflite model in ai-edge-litert's (or tflite-runtime's) interpreter with the XNNPACK delegate.

Tensors are named as the model's only signature names them (``input``, ``output_0`` for a model
converted by litert-torch, the same names its ONNX export has), else by their tensor names.
Full-integer models take and give the same float tensors as the ONNX path: a quantized (int8,
uint8, int16) input fed a float array is quantized with that input's scale and zero point, and
a quantized output is dequantized to float32. ``inputs``/``outputs`` therefore report
``float32`` for such tensors; :attr:`LiteEngine.quantized` keeps their storage type and
parameters, and an input fed its storage type directly goes in unchanged.
"""

from __future__ import annotations

import importlib
import logging
import re
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from runtime.engine import EngineOptions
from runtime.errors import EngineError, InputError
from runtime.manifest import TensorSpec

__all__ = ["PACKAGES", "LiteEngine", "Quantization", "custom_op_names", "interpreter_class"]

log = logging.getLogger(__name__)

# Interpreter packages in order of preference: (distribution, module holding Interpreter).
PACKAGES: tuple[tuple[str, str], ...] = (
    ("ai-edge-litert", "ai_edge_litert.interpreter"),
    ("tflite-runtime", "tflite_runtime.interpreter"),
)
_INSTALL_HINT = "install one with `pip install edgefleet[tflite]` (ai-edge-litert)"
_QUANTIZED = ("int8", "uint8", "int16")
_CUSTOM = 32  # BuiltinOperator.CUSTOM in the tflite schema


@dataclass(frozen=True)
class Quantization:
    """Affine quantization of one model input or output: ``real = (q - zero_point) * scale``."""

    dtype: str  # storage type in the model: int8, uint8 or int16
    scale: float
    zero_point: int

    def quantize(self, values: np.ndarray) -> np.ndarray:
        """Float values to the storage type, rounded to nearest and saturated."""
        info = np.iinfo(self.dtype)
        q: np.ndarray = np.round(np.asarray(values, dtype=np.float32) / np.float32(self.scale)) + self.zero_point
        stored: np.ndarray = np.clip(q, info.min, info.max).astype(self.dtype)
        return stored

    def dequantize(self, values: np.ndarray) -> np.ndarray:
        """Stored integers back to float32."""
        real: np.ndarray = (values.astype(np.int32) - self.zero_point) * np.float32(self.scale)
        return real.astype(np.float32)


def _installed_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _numpy_mismatch(dist: str, version: str) -> str | None:
    """Why ``dist`` cannot run with this numpy, if it cannot: tflite-runtime ≤ 2.14 is built for NumPy 1.x."""
    if dist != "tflite-runtime" or int(np.__version__.split(".")[0]) < 2:
        return None
    parts = [int(p) if p.isdigit() else 0 for p in version.split(".")[:2]]
    if len(parts) == 2 and (parts[0], parts[1]) < (2, 15):
        return f"tflite-runtime {version} is built for NumPy 1.x and crashes with NumPy {np.__version__}"
    return None


def interpreter_class(package: str | None = None) -> tuple[type, str]:
    """The ``Interpreter`` class and a ``"<package> <version>"`` label.

    Prefers ai-edge-litert and falls back to tflite-runtime; ``package`` forces one of the two.
    """
    wanted = [p for p in PACKAGES if package in (None, p[0])]
    if not wanted:
        raise EngineError(f"unknown LiteRT package {package!r} (known: {', '.join(p[0] for p in PACKAGES)})")
    problems: list[str] = []
    for dist, module_name in wanted:
        version = _installed_version(dist)
        mismatch = _numpy_mismatch(dist, version) if version else None
        if mismatch:  # checked before importing: such a build crashes inside its extension module
            problems.append(mismatch)
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            problems.append(f"{dist} is not installed")
            continue
        version = version or str(getattr(importlib.import_module(module_name.split(".")[0]), "__version__", "?"))
        return module.Interpreter, f"{dist} {version}"
    raise EngineError(f"no usable LiteRT interpreter: {'; '.join(problems)}; {_INSTALL_HINT}")


def _read(fmt: str, data: bytes, pos: int) -> int:
    if pos < 0:  # unpack_from would count a negative offset from the end
        raise struct.error(f"offset {pos} before the buffer")
    return int(struct.unpack_from(fmt, data, pos)[0])


def _table_field(data: bytes, table: int, slot: int) -> int | None:
    """Absolute position of field ``slot`` of the flatbuffer table at ``table``, or None when absent."""
    vtable = table - _read("<i", data, table)
    if 4 + 2 * slot >= _read("<H", data, vtable):
        return None
    offset = _read("<H", data, vtable + 4 + 2 * slot)
    return table + offset if offset else None


def _deref(data: bytes, pos: int) -> int:
    return pos + _read("<I", data, pos)


def custom_op_names(data: bytes) -> list[str]:
    """Names of the custom operators a .tflite flatbuffer uses (a minimal reader of ``Model.operator_codes``).

    Best effort: bytes that are not a readable model give ``[]``.
    """
    try:
        codes = _table_field(data, _deref(data, 0), 1)
        if codes is None:
            return []
        vec = _deref(data, codes)
        count = _read("<I", data, vec)
        if count > len(data) // 4:
            return []
        names: list[str] = []
        for i in range(count):
            code = _deref(data, vec + 4 + 4 * i)
            old, new = _table_field(data, code, 0), _table_field(data, code, 3)
            builtin = max(_read("<b", data, old) if old else 0, _read("<i", data, new) if new else 0)
            name_at = _table_field(data, code, 1)
            if builtin == _CUSTOM and name_at is not None:
                start = _deref(data, name_at) + 4
                names.append(data[start : start + _read("<I", data, start - 4)].decode("utf-8", "replace"))
        return names
    except struct.error:
        return []  # not a flatbuffer we can read; the interpreter's own message stands


_UNRESOLVED = (
    re.compile(r"unresolved custom op: (.+?)\.(?:\s|$)"),
    re.compile(r"Didn't find (?:custom )?op for (?:builtin )?(?:opcode|name) '([^']+)'"),
    re.compile(r"builtin_code out of range: (\d+)"),
)


def _missing_op(message: str, model: Path) -> tuple[str, bool] | None:
    """The operator the interpreter could not resolve and whether it is a custom one.

    Named from the model's own operator codes when the message quotes one, else from the message.
    """
    try:
        customs = custom_op_names(model.read_bytes())
    except OSError:
        customs = []
    quoted = [name for name in customs if name in message]
    if quoted:
        return max(quoted, key=len), True
    for pattern in _UNRESOLVED:
        match = pattern.search(message)
        if match:
            return match.group(1), match.group(1) in customs
    if customs and re.search(r"custom op|failed to prepare|Registration failed", message):
        return ", ".join(sorted(set(customs))), True
    return None


def _signature_names(loaded: Any) -> dict[int, str]:
    """Tensor index -> signature name when the model has exactly one signature (else {}: tensor names stand)."""
    signatures = loaded.get_signature_list()
    if len(signatures) != 1:
        return {}
    runner = loaded.get_signature_runner(next(iter(signatures)))
    details = {**runner.get_input_details(), **runner.get_output_details()}
    return {int(d["index"]): str(name) for name, d in details.items()}


def _spec_and_quantization(
    detail: Mapping[str, Any], name_of: Mapping[int, str]
) -> tuple[TensorSpec, Quantization | None]:
    dtype = np.dtype(detail["dtype"])
    name = "string" if dtype.kind in "SUO" else dtype.name
    signature = detail.get("shape_signature")
    dims = signature if signature is not None and len(signature) else detail["shape"]
    shape = tuple(int(d) for d in dims)
    params = detail.get("quantization_parameters") or {}
    scales = np.asarray(params.get("scales", ()))
    quant = None
    if name in _QUANTIZED and scales.size == 1 and float(scales[0]) > 0:
        zero = int(np.asarray(params.get("zero_points", (0,))).reshape(-1)[0])
        quant = Quantization(dtype=name, scale=float(scales[0]), zero_point=zero)
        name = "float32"
    tensor_name = name_of.get(int(detail["index"]), str(detail["name"]))
    return TensorSpec(name=tensor_name, dtype=name, shape=shape), quant


def _resolver(interpreter: type, deterministic: bool) -> Any:
    """AUTO (= BUILTIN: optimized kernels plus the default XNNPACK delegate), or the same kernels without it."""
    kinds = importlib.import_module(interpreter.__module__).OpResolverType
    return kinds.BUILTIN_WITHOUT_DEFAULT_DELEGATES if deterministic else kinds.AUTO


class LiteEngine:
    """A .tflite model loaded into a LiteRT interpreter, with XNNPACK as the CPU delegate.

    ``package`` forces ``"ai-edge-litert"`` or ``"tflite-runtime"``; by default the first one installed.
    Tensors are allocated once and reallocated only when a feed resizes a dynamic dimension.
    One inference runs at a time: the interpreter is not reentrant.
    """

    backend = "tflite"

    def __init__(self, model: Path, options: EngineOptions, *, package: str | None = None) -> None:
        self.model_path = Path(model)
        if not self.model_path.is_file():
            raise EngineError(f"{self.model_path}: no such model file")
        interpreter, self.package = interpreter_class(package)
        self.num_threads = max(1, options.intra_op_threads)
        self.op_resolver = _resolver(interpreter, options.deterministic)
        if options.pin_cores:
            log.debug("LiteRT has no thread affinity option; pinning is left to the process (%s)", options.pin_cores)
        self._interpreter, ins, outs, names = self._load(interpreter)
        self.provider = f"{self.package} ({'builtin kernels' if options.deterministic else 'XNNPACK'})"
        log.info("%s runs %s with %d threads", self.provider, self.model_path.name, self.num_threads)
        in_specs = [_spec_and_quantization(d, names) for d in ins]
        out_specs = [_spec_and_quantization(d, names) for d in outs]
        self.inputs = tuple(spec for spec, _ in in_specs)
        self.outputs = tuple(spec for spec, _ in out_specs)
        self.quantized: dict[str, Quantization] = {s.name: q for s, q in in_specs + out_specs if q is not None}
        self._in_index = [int(d["index"]) for d in ins]
        self._in_dtype = [np.dtype(d["dtype"]) for d in ins]
        self._in_shape = [tuple(int(n) for n in d["shape"]) for d in ins]
        self._out_index = [int(d["index"]) for d in outs]
        self._lock = threading.Lock()

    def _load(self, interpreter: type) -> tuple[Any, list[dict[str, Any]], list[dict[str, Any]], dict[int, str]]:
        """The interpreter with tensors allocated, its input and output details and signature names."""
        try:
            loaded = interpreter(
                model_path=str(self.model_path),
                num_threads=self.num_threads,
                experimental_op_resolver_type=self.op_resolver,
            )
            loaded.allocate_tensors()
            # Read here too: a corrupt tensor name only fails when decoded (UnicodeDecodeError is a ValueError).
            return loaded, loaded.get_input_details(), loaded.get_output_details(), _signature_names(loaded)
        except (ValueError, RuntimeError, SystemError) as exc:  # the pybind wrapper's only failure types
            raise self._load_error(str(exc)) from exc

    def _load_error(self, message: str) -> EngineError:
        missing = _missing_op(message, self.model_path)
        if missing is None:
            first = message.strip().splitlines()[0] if message.strip() else "unknown error"
            return EngineError(f"{self.model_path}: {self.package} cannot load the model: {first}")
        op, custom = missing
        kind = "custom op" if custom else "operator"
        return EngineError(
            f"{self.model_path}: {kind} {op!r} is not available in {self.package}; "
            "convert the model with builtin operators only, or run it with a runtime that registers this op"
        )

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run one inference; float feeds of quantized inputs are quantized, quantized outputs dequantized."""
        with self._lock:
            if self._interpreter is None:
                raise EngineError(f"{self.model_path}: engine is closed; open it again")
            self._stage(feeds)
            try:
                self._interpreter.invoke()
            except (ValueError, RuntimeError) as exc:
                raise EngineError(f"{self.model_path}: {self.package} failed to run the model: {exc}") from exc
            return [self._fetch(spec.name, index) for spec, index in zip(self.outputs, self._out_index, strict=True)]

    def _stage(self, feeds: Mapping[str, np.ndarray]) -> None:
        names = [spec.name for spec in self.inputs]
        if set(feeds) != set(names):
            raise InputError(f"{self.model_path}: model inputs are {names}, got {sorted(feeds)}")
        arrays = [self._convert(i, feeds[spec.name]) for i, spec in enumerate(self.inputs)]
        resize = [i for i, arr in enumerate(arrays) if self._needs_resize(i, arr.shape)]
        for i in resize:
            self._interpreter.resize_tensor_input(self._in_index[i], list(arrays[i].shape))
            self._in_shape[i] = arrays[i].shape
        if resize:
            try:
                self._interpreter.allocate_tensors()
            except (ValueError, RuntimeError) as exc:
                raise InputError(f"{self.model_path}: cannot run with input shapes {self._in_shape}: {exc}") from exc
        for index, arr in zip(self._in_index, arrays, strict=True):
            try:
                self._interpreter.set_tensor(index, arr)
            except ValueError as exc:
                raise InputError(f"{self.model_path}: {exc}") from exc

    def _convert(self, i: int, value: np.ndarray) -> np.ndarray:
        spec, want = self.inputs[i], self._in_dtype[i]
        arr = np.asarray(value)
        quant = self.quantized.get(spec.name)
        if quant is not None and arr.dtype.kind == "f":
            arr = quant.quantize(arr)
        if arr.dtype != want:
            takes = f"float (quantized to {want}) or {want}" if quant is not None else str(want)
            raise InputError(f"{self.model_path}: input {spec.name!r} is {arr.dtype}; the model takes {takes}")
        return np.ascontiguousarray(arr)

    def _needs_resize(self, i: int, shape: tuple[int, ...]) -> bool:
        """True when input ``i`` must be resized to ``shape``; only its dynamic dimensions may differ."""
        if shape == self._in_shape[i]:
            return False
        spec = self.inputs[i]
        fits = len(shape) == len(spec.shape) and all(d == -1 or d == n for d, n in zip(spec.shape, shape, strict=True))
        if not fits:
            raise InputError(f"{self.model_path}: input {spec.name!r} has shape {shape}; the model takes {spec.shape}")
        return True

    def _fetch(self, name: str, index: int) -> np.ndarray:
        out: np.ndarray = self._interpreter.get_tensor(index)  # a copy, not a view of the arena
        quant = self.quantized.get(name)
        return quant.dequantize(out) if quant is not None else out

    def close(self) -> None:
        """Release the interpreter and its tensor arena."""
        with self._lock:
            self._interpreter = None
