"""Writers of real tiny .tflite flatbuffers (tflite schema) for tests: float, full-integer and custom-op models."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "custom_op_model",
    "int8_params",
    "write_custom_op",
    "write_fully_connected",
    "write_int8_fully_connected",
]

# Numbers from the tflite schema (schema.fbs); it only ever appends, so they are stable.
_FLOAT32, _INT32, _INT8 = 0, 2, 9  # TensorType
_FULLY_CONNECTED, _SOFTMAX, _CUSTOM = 9, 25, 32  # BuiltinOperator
_FC_OPTIONS, _SOFTMAX_OPTIONS = 8, 9  # BuiltinOptions union tags
_SCHEMA_VERSION = 3


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]
    type: int
    buffer: int = 0  # 0 is the schema's empty sentinel buffer: activations have no data
    scale: float | None = None
    zero_point: int = 0
    signature: tuple[int, ...] | None = None  # -1 marks a dynamic dimension


@dataclass
class _Op:
    opcode: int
    inputs: list[int]
    outputs: list[int]
    options: tuple[int, dict[str, Any]] | None = None  # (union tag, fields)


@dataclass
class _Graph:
    """A single-subgraph model under construction."""

    buffers: list[bytes] = field(default_factory=lambda: [b""])
    tensors: list[_Tensor] = field(default_factory=list)
    opcodes: list[tuple[int, str | None]] = field(default_factory=list)
    ops: list[_Op] = field(default_factory=list)

    def constant(self, name: str, array: np.ndarray, type_: int, scale: float | None = None) -> int:
        self.buffers.append(np.ascontiguousarray(array).tobytes())
        tensor = _Tensor(name, tuple(array.shape), type_, len(self.buffers) - 1, scale)
        return self.tensor(tensor)

    def tensor(self, tensor: _Tensor) -> int:
        self.tensors.append(tensor)
        return len(self.tensors) - 1

    def op(
        self, builtin: int, inputs: list[int], outputs: list[int], *, custom: str | None = None, **opts: Any
    ) -> None:
        code = (builtin, custom)
        if code not in self.opcodes:
            self.opcodes.append(code)
        options = (opts.pop("tag"), opts) if "tag" in opts else None
        self.ops.append(_Op(self.opcodes.index(code), inputs, outputs, options))


def _vector_of_offsets(b: Any, offsets: list[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return int(b.EndVector())


def _bytes(b: Any, data: bytes) -> int:
    """A [ubyte] vector aligned to 16 bytes, as the converter writes weight buffers."""
    b.StartVector(1, len(data), 16)
    b.head = b.head - len(data)
    b.Bytes[b.head : b.head + len(data)] = data
    return int(b.EndVector())


def _ints(b: Any, values: tuple[int, ...] | list[int], dtype: str = "<i4") -> int:
    return int(b.CreateNumpyVector(np.asarray(values, dtype=dtype)))


def _quantization(b: Any, t: _Tensor) -> int:
    scale = b.CreateNumpyVector(np.asarray([t.scale], dtype="<f4"))
    zero = _ints(b, [t.zero_point], "<i8")
    b.StartObject(7)
    b.PrependUOffsetTRelativeSlot(2, scale, 0)
    b.PrependUOffsetTRelativeSlot(3, zero, 0)
    return int(b.EndObject())


def _tensor(b: Any, t: _Tensor) -> int:
    name = b.CreateString(t.name)
    shape = _ints(b, t.shape)
    signature = _ints(b, t.signature) if t.signature is not None else None
    quant = _quantization(b, t) if t.scale is not None else None
    b.StartObject(8)
    b.PrependUOffsetTRelativeSlot(0, shape, 0)
    b.PrependInt8Slot(1, t.type, 0)
    b.PrependUint32Slot(2, t.buffer, 0)
    b.PrependUOffsetTRelativeSlot(3, name, 0)
    if quant is not None:
        b.PrependUOffsetTRelativeSlot(4, quant, 0)
    if signature is not None:
        b.PrependUOffsetTRelativeSlot(7, signature, 0)
    return int(b.EndObject())


def _options(b: Any, tag: int, fields: dict[str, Any]) -> int:
    if tag == _FC_OPTIONS:
        b.StartObject(6)
        b.PrependInt8Slot(0, int(fields.get("activation", 0)), 0)
        return int(b.EndObject())
    b.StartObject(1)
    b.PrependFloat32Slot(0, float(fields.get("beta", 1.0)), 0.0)
    return int(b.EndObject())


def _operator(b: Any, op: _Op) -> int:
    inputs, outputs = _ints(b, op.inputs), _ints(b, op.outputs)
    options = _options(b, *op.options) if op.options else None
    b.StartObject(9)
    b.PrependUint32Slot(0, op.opcode, 0)
    b.PrependUOffsetTRelativeSlot(1, inputs, 0)
    b.PrependUOffsetTRelativeSlot(2, outputs, 0)
    if op.options and options is not None:
        b.PrependUint8Slot(3, op.options[0], 0)
        b.PrependUOffsetTRelativeSlot(4, options, 0)
    return int(b.EndObject())


def _opcode(b: Any, builtin: int, custom: str | None) -> int:
    name = b.CreateString(custom) if custom else None
    b.StartObject(4)
    b.PrependInt8Slot(0, min(builtin, 127), 0)  # pre-2.4 readers look only at this field
    if name is not None:
        b.PrependUOffsetTRelativeSlot(1, name, 0)
    b.PrependInt32Slot(2, 1, 1)
    b.PrependInt32Slot(3, builtin, 0)
    return int(b.EndObject())


def _subgraph(b: Any, g: _Graph, inputs: list[int], outputs: list[int]) -> int:
    tensors = _vector_of_offsets(b, [_tensor(b, t) for t in g.tensors])
    operators = _vector_of_offsets(b, [_operator(b, op) for op in g.ops])
    ins, outs, name = _ints(b, inputs), _ints(b, outputs), b.CreateString("main")
    b.StartObject(5)
    b.PrependUOffsetTRelativeSlot(0, tensors, 0)
    b.PrependUOffsetTRelativeSlot(1, ins, 0)
    b.PrependUOffsetTRelativeSlot(2, outs, 0)
    b.PrependUOffsetTRelativeSlot(3, operators, 0)
    b.PrependUOffsetTRelativeSlot(4, name, 0)
    return int(b.EndObject())


def _buffer(b: Any, data: bytes) -> int:
    vec = _bytes(b, data) if data else None
    b.StartObject(3)
    if vec is not None:
        b.PrependUOffsetTRelativeSlot(0, vec, 0)
    return int(b.EndObject())


def _write(path: Path, g: _Graph, inputs: list[int], outputs: list[int]) -> Path:
    path = Path(path)
    path.write_bytes(_serialize(g, inputs, outputs))
    return path


def _serialize(g: _Graph, inputs: list[int], outputs: list[int]) -> bytes:
    import flatbuffers

    b = flatbuffers.Builder(1024)
    buffers = _vector_of_offsets(b, [_buffer(b, data) for data in g.buffers])
    subgraphs = _vector_of_offsets(b, [_subgraph(b, g, inputs, outputs)])
    opcodes = _vector_of_offsets(b, [_opcode(b, code, custom) for code, custom in g.opcodes])
    description = b.CreateString("edgefleet test model")
    b.StartObject(8)
    b.PrependUint32Slot(0, _SCHEMA_VERSION, 0)
    b.PrependUOffsetTRelativeSlot(1, opcodes, 0)
    b.PrependUOffsetTRelativeSlot(2, subgraphs, 0)
    b.PrependUOffsetTRelativeSlot(3, description, 0)
    b.PrependUOffsetTRelativeSlot(4, buffers, 0)
    b.Finish(b.EndObject(), file_identifier=b"TFL3")
    return bytes(b.Output())


def write_fully_connected(
    path: Path,
    weights: np.ndarray,
    bias: np.ndarray,
    *,
    softmax: bool = False,
    dynamic_batch: bool = False,
    input_name: str = "x",
) -> Path:
    """Float32 ``y = x @ weights.T + bias`` (then softmax), input ``x`` of shape ``[1, in]``.

    ``dynamic_batch`` marks the batch dimension -1 in the shape signature, as the converter does.
    """
    out_dim, in_dim = weights.shape
    g = _Graph()
    sig = (-1, in_dim) if dynamic_batch else None
    x = g.tensor(_Tensor(input_name, (1, in_dim), _FLOAT32, signature=sig))
    w = g.constant("weights", weights.astype("<f4"), _FLOAT32)
    bb = g.constant("bias", bias.astype("<f4"), _FLOAT32)
    out_sig = (-1, out_dim) if dynamic_batch else None
    y = g.tensor(_Tensor("logits", (1, out_dim), _FLOAT32, signature=out_sig))
    g.op(_FULLY_CONNECTED, [x, w, bb], [y], tag=_FC_OPTIONS)
    if softmax:
        p = g.tensor(_Tensor("probs", (1, out_dim), _FLOAT32, signature=out_sig))
        g.op(_SOFTMAX, [y], [p], tag=_SOFTMAX_OPTIONS, beta=1.0)
        y = p
    return _write(path, g, [x], [y])


def int8_params(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric int8 (scale, zero point) covering ``[lo, hi]`` (always including 0), as TFLite computes them."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zero_point = int(np.clip(round(-128 - lo / scale), -128, 127))
    return scale, zero_point


def write_int8_fully_connected(path: Path, weights: np.ndarray, bias: np.ndarray, calibration: np.ndarray) -> Path:
    """Full-integer ``y = x @ weights.T + bias``: int8 input and output, int8 weights, int32 bias.

    Input and output quantization cover the ranges seen on ``calibration`` (float rows ``[n, in]``);
    weights are symmetric per-tensor, bias is quantized with ``input_scale * weight_scale``.
    """
    out_dim, in_dim = weights.shape
    in_scale, in_zp = int8_params(float(calibration.min()), float(calibration.max()))
    reference = calibration @ weights.T + bias
    out_scale, out_zp = int8_params(float(reference.min()), float(reference.max()))
    w_scale = float(np.abs(weights).max()) / 127.0 or 1.0
    q_weights = np.clip(np.round(weights / w_scale), -127, 127).astype(np.int8)
    q_bias = np.round(bias / (in_scale * w_scale)).astype("<i4")
    g = _Graph()
    x = g.tensor(_Tensor("x", (1, in_dim), _INT8, scale=in_scale, zero_point=in_zp))
    w = g.constant("weights", q_weights, _INT8, scale=w_scale)
    bb = g.constant("bias", q_bias, _INT32, scale=in_scale * w_scale)
    y = g.tensor(_Tensor("logits", (1, out_dim), _INT8, scale=out_scale, zero_point=out_zp))
    g.op(_FULLY_CONNECTED, [x, w, bb], [y], tag=_FC_OPTIONS)
    return _write(path, g, [x], [y])


def custom_op_model(name: str = "MyCustomOp", *, size: int = 4) -> bytes:
    """A float32 ``[1, size]`` → ``[1, size]`` model made of one custom operator called ``name``."""
    g = _Graph()
    x = g.tensor(_Tensor("x", (1, size), _FLOAT32))
    y = g.tensor(_Tensor("y", (1, size), _FLOAT32))
    g.op(_CUSTOM, [x], [y], custom=name)
    return _serialize(g, [x], [y])


def write_custom_op(path: Path, name: str = "MyCustomOp", *, size: int = 4) -> Path:
    """Write :func:`custom_op_model` to ``path``."""
    path = Path(path)
    path.write_bytes(custom_op_model(name, size=size))
    return path
