"""Export pass: any loaded model becomes one self-contained, checked ONNX file at the profile opset.

PyTorch kinds go through ``torch.onnx.export`` (the dynamo exporter first, the TorchScript-based
one as the fallback and for TorchScript inputs); ONNX kinds are loaded with their external data,
folded, upgraded to the profile's opset and given static input dimensions. Both end the same way:
exporter metadata (stack traces with workstation paths) stripped, shapes inferred, optionally
simplified with onnxslim (kept only if ONNX Runtime gives the same outputs), checked, saved.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from runtime.manifest import TensorSpec
from toolchain.errors import ModelLoadError, PassError, UsageError
from toolchain.load import LoadedModel, input_names

__all__ = ["ExportResult", "run"]

_log = logging.getLogger(__name__)

_PASS = "export"
_FLAG = "--input-shape"
_DYNAMO_MIN_OPSET = 18  # torch 2.13's dynamo exporter emits opset >= 18 only
_MAX_PROTO_BYTES = 2**31 - 1  # protobuf's hard limit for one message
_CHECKED_DOMAINS = {"", "ai.onnx", "ai.onnx.ml"}  # full_check needs schemas for every op
_EXPORTER_KEYS = ("pkg.torch.", "pkg.onnxscript.", "namespace")
_ML = "ai.onnx.ml"
# Reductions whose opset-18 form gained ``noop_with_empty_axes``; onnx's 18->17 adapter keeps it.
_REDUCE_18 = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2"}
_REDUCE_18 |= {"ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}


@dataclass(frozen=True)
class ExportResult:
    """The exported file and what the pass did to get it."""

    path: Path
    opset: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    simplified: bool
    notes: tuple[str, ...]


def run(
    model: LoadedModel,
    out_path: Path,
    *,
    opset: int,
    static_shapes: bool,
    simplify: bool,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> ExportResult:
    """Export ``model`` to ``out_path`` (one .onnx file, no external data)."""
    import onnx

    shapes = dict(input_shapes if input_shapes is not None else (model.input_shapes or {}))
    notes: list[str] = []
    if model.is_torch:
        proto = _from_torch(model, shapes, opset, static_shapes, notes)
    elif model.onnx_path is not None:
        proto = _from_onnx(model, shapes, opset, static_shapes, notes)
    else:
        raise PassError(f"{model.source}: nothing to export (no module, no ONNX file)", pass_name=_PASS)
    _strip_exporter_metadata(proto.graph)
    proto = _infer_shapes(proto)
    simplified = False
    if simplify:
        proto, simplified = _simplify(proto, notes)
    _check(proto, model.source)
    _save(proto, out_path)
    final = onnx.load(str(out_path))
    return ExportResult(
        path=out_path,
        opset=_default_opset(final),
        inputs=tuple(_spec(v) for v in _graph_inputs(final)),
        outputs=tuple(_spec(v) for v in final.graph.output),
        simplified=simplified,
        notes=tuple(notes),
    )


# --- PyTorch kinds -----------------------------------------------------------------------------


def _from_torch(
    model: LoadedModel,
    shapes: dict[str, tuple[int, ...]],
    opset: int,
    static: bool,
    notes: list[str],
) -> Any:
    names = _torch_input_order(model, shapes)
    if model.kind != "exported-program":
        cast(Any, model.module).eval()
    args = _example_args(model, names, shapes)
    out_names = _probe(model, args)
    if not static and model.kind != "exported-program":
        notes.append("PyTorch modules are exported with the input shapes given (static)")
    proto = _torch_to_onnx(model, args, names, out_names, opset, notes)
    if static:  # an ExportedProgram may carry dynamic dims
        _fix_dims(proto, {n: shapes[n] for n in names}, static, model.source, notes)
    return proto


def _torch_to_onnx(
    model: LoadedModel,
    args: tuple[Any, ...],
    names: list[str],
    out_names: list[str],
    opset: int,
    notes: list[str],
) -> Any:
    if model.kind == "torchscript":
        notes.append("TorchScript input: exported with the TorchScript-based exporter")
        return _legacy_export(model, args, names, out_names, opset, notes)
    try:
        proto = _dynamo_export(model.module, args, names, out_names, opset)
    except Exception as exc:  # the dynamo exporter fails in many ways; the old one is the fallback
        _log.info("dynamo export of %s failed, falling back", model.source, exc_info=exc)
        notes.append(
            f"dynamo exporter failed ({type(exc).__name__}: {_first_line(exc)[:160]}); "
            "used the TorchScript-based exporter"
        )
        return _legacy_export(model, args, names, out_names, opset, notes)
    if _default_opset(proto) > opset:
        problem = _downgrade(proto, opset)
        if problem is not None:
            notes.append(f"dynamo exporter cannot emit opset {opset} ({problem}); used the TorchScript-based exporter")
            return _legacy_export(model, args, names, out_names, opset, notes)
        notes.append(f"converted the dynamo export from opset {_DYNAMO_MIN_OPSET} to {opset}")
    return proto


def _torch_input_order(model: LoadedModel, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    known = input_names(model, optional=True)
    required = input_names(model)
    unknown = [n for n in shapes if n not in known]
    if unknown:
        raise UsageError(f"{model.source} has no input {unknown[0]!r} (inputs: {', '.join(known)})", flag=_FLAG)
    missing = [n for n in required if n not in shapes]
    if missing:
        raise UsageError(
            f"{model.source} needs a shape for input(s) {', '.join(missing)}; "
            "e.g. --input-shape 1,3,224,224 (once per input, in order)",
            flag=_FLAG,
        )
    return [n for n in known if n in shapes]


def _example_args(model: LoadedModel, names: list[str], shapes: dict[str, tuple[int, ...]]) -> tuple[Any, ...]:
    import torch

    dtypes: dict[str, Any] = {}
    if model.kind == "exported-program":
        program: Any = model.module
        example = (program.example_inputs or ((), {}))[0]
        if len(example) == len(names) and all(tuple(t.shape) == shapes[n] for t, n in zip(example, names, strict=True)):
            return tuple(example)
        nodes = program.graph.nodes
        vals = {n.name: n.meta.get("val") for n in nodes if n.op == "placeholder"}
        dtypes = {n: getattr(vals.get(n), "dtype", torch.float32) for n in names}
    gen = torch.Generator().manual_seed(0)
    args = []
    for name in names:
        dtype = dtypes.get(name, torch.float32)
        if dtype.is_floating_point:
            args.append(torch.randn(shapes[name], generator=gen, dtype=dtype))
        else:
            args.append(torch.zeros(shapes[name], dtype=dtype))
    return tuple(args)


def _probe(model: LoadedModel, args: tuple[Any, ...]) -> list[str]:
    """Run the model once: a wrong shape fails here, clearly; the outputs give the output names."""
    import torch
    from torch.utils import _pytree

    module = _callable(model)
    try:
        with torch.no_grad():
            out = module(*args)
    except (RuntimeError, ValueError, AssertionError, IndexError, TypeError) as exc:
        shapes = ", ".join("x".join(map(str, a.shape)) for a in args)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"{model.source} does not run on inputs of shape {shapes}: {first}", flag=_FLAG) from exc
    if isinstance(out, Mapping) and all(isinstance(v, torch.Tensor) for v in out.values()):
        return [str(k) for k in out]
    count = sum(isinstance(leaf, torch.Tensor) for leaf in _pytree.tree_leaves(out))
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def _callable(model: LoadedModel) -> Any:
    """The ``nn.Module`` to run or trace (an ExportedProgram's is rebuilt from its graph)."""
    module: Any = model.module
    return module.module() if model.kind == "exported-program" else module


def _dynamo_export(module: Any, args: tuple[Any, ...], names: list[str], outs: list[str], opset: int) -> Any:
    import torch

    with warnings.catch_warnings(), torch.no_grad():
        # torch 2.13 deep-copies pytree specs inside the exporter and trips its own deprecation.
        warnings.filterwarnings("ignore", r".*LeafSpec.* is deprecated", FutureWarning)
        program: Any = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=max(opset, _DYNAMO_MIN_OPSET),
            input_names=names,
            output_names=outs,
            external_data=False,
            optimize=True,
            verbose=False,
        )
    return program.model_proto


def _legacy_export(
    model: LoadedModel,
    args: tuple[Any, ...],
    names: list[str],
    outs: list[str],
    opset: int,
    notes: list[str],
) -> Any:
    """The TorchScript-based exporter; what its tracer warns about becomes a note."""
    import onnx
    import torch

    module = _callable(model)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Deprecated since torch 2.9 and warns about its own internals, yet still the only
        # exporter for TorchScript input and for opsets < 18.
        warnings.filterwarnings("ignore", r".*legacy TorchScript-based ONNX", DeprecationWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx\.")
        warnings.filterwarnings("ignore", r"no signature found for <torch\.ScriptMethod")
        warnings.filterwarnings("ignore", r".*torch\.jit.* is deprecated", DeprecationWarning)
        target = Path(tmp) / "model.onnx"
        try:
            with torch.no_grad():
                torch.onnx.export(
                    module, args, str(target), dynamo=False, opset_version=opset,
                    input_names=names, output_names=outs,
                )  # fmt: skip
        except (RuntimeError, ValueError, TypeError, torch.onnx.errors.OnnxExporterError) as exc:
            raise PassError(
                f"{model.source}: the ONNX exporter failed at opset {opset}: {exc}", pass_name=_PASS
            ) from exc
        proto = onnx.load(str(target))
    for message in dict.fromkeys(f"{w.category.__name__}: {_first_line(w.message)}" for w in caught):
        notes.append(f"exporter warning: {message[:200]}")
    return proto


def _downgrade(proto: Any, opset: int) -> str | None:
    """Convert a dynamo export down to ``opset`` in place; the reason it cannot, or None."""
    import onnx
    import onnx.version_converter

    for node in proto.graph.node:
        if node.op_type in _REDUCE_18 and node.domain in ("", "ai.onnx"):
            keep = [a for a in node.attribute if not (a.name == "noop_with_empty_axes" and a.i == 0)]
            del node.attribute[:]
            node.attribute.extend(keep)
    try:
        converted = onnx.version_converter.convert_version(proto, opset)
        onnx.checker.check_model(converted, full_check=True)
    except (RuntimeError, ValueError, onnx.checker.ValidationError) as exc:
        return _first_line(exc)
    problem = _disagreement(proto, converted)
    if problem is None:
        proto.CopyFrom(converted)
    return problem


# --- ONNX kinds --------------------------------------------------------------------------------


def _from_onnx(
    model: LoadedModel,
    shapes: dict[str, tuple[int, ...]],
    opset: int,
    static: bool,
    notes: list[str],
) -> Any:
    import onnx
    from google.protobuf.message import DecodeError
    from onnx.external_data_helper import (
        convert_model_from_external_data,
        load_external_data_for_model,
    )

    path = model.onnx_path
    assert path is not None
    try:
        proto = onnx.load(str(path), load_external_data=False)
        locations = _external_locations(proto)
        if locations:
            load_external_data_for_model(proto, str(path.parent))
            convert_model_from_external_data(proto)
            notes.append(f"folded external data ({', '.join(locations)})")
    except (DecodeError, OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot read the model or its external data: {exc}", path=path) from exc
    if proto.ByteSize() > _MAX_PROTO_BYTES:
        raise PassError(
            f"{path}: the model is {proto.ByteSize() / 2**30:.1f} GiB; one ONNX file holds < 2 GiB "
            "and edge bundles need one file",
            pass_name=_PASS,
        )
    _fix_dims(proto, shapes, static, model.source, notes)
    if model.kind == "onnx-ml":
        _drop_zipmap(proto, notes)
    return _upgrade(proto, model, opset, notes)


def _external_locations(proto: Any) -> list[str]:
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    found = []
    for tensor in _get_all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if loc not in found:
                found.append(loc)
    return found


def _drop_zipmap(proto: Any, notes: list[str]) -> None:
    """ZipMap turns probabilities into a list of dicts; devices want the (N, classes) tensor."""
    import onnx

    outputs = {o.name: o for o in proto.graph.output}
    consumed = {i for n in proto.graph.node for i in n.input}
    batch = _graph_inputs(proto)[0].type.tensor_type.shape.dim[:1]
    for node in proto.graph.node:
        name = node.output[0] if node.output else ""
        if node.op_type != "ZipMap" or node.domain != _ML or name not in outputs or name in consumed:
            continue
        classes = max((len(a.ints) + len(a.strings) for a in node.attribute), default=0)
        node.op_type, node.domain = "Identity", ""
        del node.attribute[:]
        out = outputs[name].type
        out.Clear()
        out.tensor_type.elem_type = onnx.TensorProto.FLOAT
        out.tensor_type.shape.dim.extend(batch)  # the batch dim of the (first) input, as fixed
        classes_dim = out.tensor_type.shape.dim.add()
        if classes:
            classes_dim.dim_value = classes
        notes.append(f"replaced ZipMap on {name!r} with its float32 probability tensor")


def _fix_dims(proto: Any, shapes: dict[str, tuple[int, ...]], static: bool, source: str, notes: list[str]) -> None:
    graph_inputs = _graph_inputs(proto)
    known = [v.name for v in graph_inputs]
    unknown = [n for n in shapes if n not in known]
    if unknown:
        raise UsageError(f"{source} has no input {unknown[0]!r} (inputs: {', '.join(known)})", flag=_FLAG)
    changed = False
    for value in graph_inputs:
        dims = _dims(value)
        target = _target_dims(value.name, dims, shapes.get(value.name), static, source)
        if target is None or target == dims:
            continue
        for dim, size in zip(value.type.tensor_type.shape.dim, target, strict=True):
            dim.Clear()
            dim.dim_value = size
        notes.append(f"fixed input {value.name} to {'x'.join(map(str, target))}")
        changed = True
    if changed:  # let shape inference recompute everything downstream of the inputs
        del proto.graph.value_info[:]
        for out in proto.graph.output:
            for dim in out.type.tensor_type.shape.dim:
                if not dim.HasField("dim_value"):
                    dim.Clear()


def _target_dims(
    name: str, dims: tuple[int | str, ...], given: tuple[int, ...] | None, static: bool, source: str
) -> tuple[int, ...] | None:
    shown = "x".join(str(d) if isinstance(d, int) and d > 0 else "?" for d in dims)
    if given is not None:
        fits = len(given) == len(dims) and all(
            not (isinstance(d, int) and d > 0) or d == g for d, g in zip(dims, given, strict=True)
        )
        if not fits:
            raise UsageError(
                f"input {name!r} of {source} is {shown} ({len(dims)}-d), the flag gives {'x'.join(map(str, given))}",
                flag=_FLAG,
            )
        return tuple(given)
    if not static:
        return None
    dynamic = [i for i, d in enumerate(dims) if not (isinstance(d, int) and d > 0)]
    if not dynamic:
        return None
    if dynamic == [0] and len(dims) > 1:  # only the batch is open: the edge runs one at a time
        return (1, *(int(d) for d in dims[1:]))
    example = ",".join(
        str(d) if isinstance(d, int) and d > 0 else ("1" if i == 0 else "224") for i, d in enumerate(dims)
    )
    raise UsageError(
        f"input {name!r} of {source} has dynamic dims ({shown}) and the profile wants static "
        f"shapes; give them, e.g. --input-shape {example}",
        flag=_FLAG,
    )


def _upgrade(proto: Any, model: LoadedModel, opset: int, notes: list[str]) -> Any:
    import onnx
    import onnx.version_converter

    current = _default_opset(proto)
    if current >= opset:
        return proto
    try:
        converted = onnx.version_converter.convert_version(proto, opset)
        onnx.checker.check_model(converted)
        problem = _disagreement(proto, converted)
    except (RuntimeError, ValueError, onnx.checker.ValidationError) as exc:
        problem = _first_line(exc)
    if problem is None:
        notes.append(f"upgraded opset {current}->{opset}")
        return converted
    if model.kind == "onnx-ml":
        notes.append(f"kept opset {current}: upgrading to {opset} broke the model ({problem})")
        return proto
    raise PassError(
        f"{model.source}: cannot upgrade opset {current} to {opset} ({problem}); "
        f"re-export the model at opset >= {opset}, or target opset {current} with --opset "
        "(or export.opset in the profile)",
        pass_name=_PASS,
    )


# --- common finish -----------------------------------------------------------------------------


def _strip_exporter_metadata(graph: Any) -> None:
    """Drop exporter bookkeeping (stack traces with local paths): smaller, reproducible files."""

    def clean(props: Any) -> None:
        keep = [p for p in props if not p.key.startswith(_EXPORTER_KEYS)]
        del props[:]
        props.extend(keep)

    clean(graph.metadata_props)
    for item in (*graph.initializer, *graph.input, *graph.output, *graph.value_info):
        clean(item.metadata_props)
    for node in graph.node:
        clean(node.metadata_props)
        node.doc_string = ""
        for attr in node.attribute:
            for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                _strip_exporter_metadata(sub)


def _infer_shapes(proto: Any) -> Any:
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except (onnx.shape_inference.InferenceError, RuntimeError) as exc:
        raise PassError(f"shape inference failed: {exc}", pass_name=_PASS) from exc


def _simplify(proto: Any, notes: list[str]) -> tuple[Any, bool]:
    import onnx
    import onnxslim

    before = len(proto.graph.node)
    try:
        slim = onnxslim.slim(onnx.ModelProto.FromString(proto.SerializeToString()))
        if slim is None:
            raise ValueError("onnxslim returned no model")
        onnx.checker.check_model(slim)
    except Exception as exc:  # onnxslim fails in arbitrary ways on odd graphs; keep the original
        notes.append(f"onnxslim failed ({type(exc).__name__}: {exc}); kept the unsimplified model")
        return proto, False
    problem = _disagreement(proto, slim)
    if problem is not None:
        notes.append(f"onnxslim changed the outputs ({problem}); kept the unsimplified model")
        return proto, False
    slim.doc_string = proto.doc_string  # onnxslim drops the model's doc string
    for value in (*slim.graph.input, *slim.graph.output):  # onnxslim names unknown dims "?"
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == "?":
                dim.Clear()
    notes.append(f"onnxslim: {before} -> {len(slim.graph.node)} nodes")
    return slim, True


def _check(proto: Any, source: str) -> None:
    import onnx

    full = {op.domain for op in proto.opset_import} <= _CHECKED_DOMAINS
    try:
        onnx.checker.check_model(proto, full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise PassError(f"{source}: the exported model fails the ONNX checker: {exc}", pass_name=_PASS) from exc


def _save(proto: Any, out_path: Path) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_bytes(proto.SerializeToString(deterministic=True))
    os.replace(tmp, out_path)


# --- ONNX Runtime agreement and tensor specs ---------------------------------------------------


def _disagreement(before: Any, after: Any) -> str | None:
    """Run both models on one seeded input; why they differ, or None (agree, or not checkable)."""
    feeds = _probe_feeds(before)
    if feeds is None:
        return None
    errors = _ort_errors()
    try:
        expected = _ort_run(before, feeds)
    except errors:  # the source model itself does not run here: nothing to compare against
        return None
    try:
        got = _ort_run(after, feeds)
    except errors as exc:
        return f"onnxruntime cannot run it: {_first_line(exc)}"
    for i, (a, b) in enumerate(zip(expected, got, strict=True)):
        if not _same(a, b):
            return f"output {i} differs"
    return None


def _same(a: Any, b: Any) -> bool:
    import numpy as np

    if not isinstance(a, np.ndarray) or not isinstance(b, np.ndarray):
        return bool(a == b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind not in "fc":
        return bool(np.array_equal(a, b))
    scale = max(1.0, float(np.abs(a).max(initial=0.0)))
    return bool(np.allclose(a, b, rtol=1e-3, atol=1e-4 * scale))


def _probe_feeds(proto: Any) -> dict[str, Any] | None:
    import numpy as np
    import onnx

    rng = np.random.default_rng(0)
    feeds = {}
    for value in _graph_inputs(proto):
        if not value.type.HasField("tensor_type"):
            return None
        dims = _dims(value)
        if any(not (isinstance(d, int) and d > 0) for d in dims[1:]):
            return None
        shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in dims)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        if dtype.kind == "f":
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iub":
            feeds[value.name] = np.zeros(shape, dtype=dtype)
        else:
            return None
    return feeds


def _ort_errors() -> tuple[type[Exception], ...]:
    """ONNX Runtime's exception classes (they share no base class besides Exception)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = "Fail InvalidArgument NoSuchFile NoModel EngineError RuntimeException InvalidProtobuf"
    names += " ModelLoaded NotImplemented InvalidGraph EPFail"
    found = tuple(getattr(state, n) for n in names.split() if isinstance(getattr(state, n, None), type))
    return (RuntimeError, ValueError, *found)


def _first_line(exc: BaseException | Warning | str) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # torch colours its errors
    return text.splitlines()[0] if text else type(exc).__name__


def _ort_run(proto: Any, feeds: dict[str, Any]) -> list[Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return list(session.run(None, feeds))


def _graph_inputs(proto: Any) -> list[Any]:
    inits = {t.name for t in proto.graph.initializer}
    return [v for v in proto.graph.input if v.name not in inits]


def _dims(value: Any) -> tuple[int | str, ...]:
    return tuple(
        d.dim_value if d.HasField("dim_value") else (d.dim_param or -1) for d in value.type.tensor_type.shape.dim
    )


def _default_opset(proto: Any) -> int:
    return next((op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")), 0)


def _spec(value: Any) -> TensorSpec:
    import onnx

    if not value.type.HasField("tensor_type"):
        kind = value.type.WhichOneof("value")
        raise PassError(
            f"{value.name!r} is a {kind}, not a tensor; the device runtime needs tensor inputs "
            "and outputs (re-export without sequence/map outputs)",
            pass_name=_PASS,
        )
    elem = value.type.tensor_type.elem_type
    dtype = "string" if elem == onnx.TensorProto.STRING else onnx.helper.tensor_dtype_to_np_dtype(elem).name
    return TensorSpec(name=value.name, dtype=dtype, shape=_dims(value))
