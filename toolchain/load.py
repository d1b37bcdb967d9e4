"""Model inputs: recognise what the user passed to ``toolchain build`` and load it.

Kinds, detected from the argument:

- ``model.onnx`` (external data files next to it are fine) → ``onnx``; an ONNX graph that uses
  the ``ai.onnx.ml`` domain (scikit-learn via skl2onnx…) → ``onnx-ml`` (not quantized);
- ``package.module:factory`` (a callable returning an ``nn.Module``), optionally with
  ``--weights file.pt`` (a state_dict) → ``torch``;
- a ``torch.jit.save`` archive (``.pt``/``.pth``/``.torchscript``…) → ``torchscript``;
- a ``torch.export.save`` archive (``.pt2``) → ``exported-program``;
- an already-converted LiteRT model (``.tflite``) → ``tflite``: opened in the runtime's LiteRT engine
  (so a custom op the interpreter lacks is refused here, by name), then validated, benchmarked and
  bundled as it is.

Anything else, a missing file or a corrupt one is a :class:`~toolchain.errors.ModelLoadError`
naming the file.
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from toolchain.errors import ModelLoadError, UsageError

__all__ = ["KINDS_HELP", "LoadedModel", "input_names", "load_model", "parse_shape", "tflite_specs"]

ModelKind = Literal["onnx", "onnx-ml", "torch", "torchscript", "exported-program", "tflite"]

KINDS_HELP = (
    "an ONNX file (.onnx), a PyTorch factory 'package.module:factory' (with --weights FILE.pt), "
    "a TorchScript file (torch.jit.save: .pt/.pth/.torchscript) "
    "an ExportedProgram (torch.export.save: .pt2) or a LiteRT model (.tflite)"
)
_FACTORY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
_TORCH_SUFFIXES = (".pt", ".pth", ".torchscript", ".ptl", ".pt2", ".zip")
_SHAPE_EXAMPLE = "--input-shape 1,3,224,224 (once per input, in order)"
_ML_DOMAIN = "ai.onnx.ml"


@dataclass
class LoadedModel:
    """A model ready for the build passes."""

    kind: ModelKind
    source: str
    name: str
    module: Any | None = None
    onnx_path: Path | None = None
    tflite_path: Path | None = None
    input_shapes: dict[str, tuple[int, ...]] | None = None

    @property
    def is_torch(self) -> bool:
        """True for the kinds that hold a PyTorch object in ``module``."""
        return self.kind in ("torch", "torchscript", "exported-program")


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse ``"1,3,224,224"`` (or ``1x3x224x224``) into a tuple of positive ints."""
    parts = re.split(r"\s*[,x]\s*", text.strip().strip("()[]").strip().lower())
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise UsageError(
            f"expected positive integers separated by commas, got {text!r}; e.g. {_SHAPE_EXAMPLE}",
            flag="--input-shape",
        )
    return dims


def load_model(
    spec: str,
    *,
    weights: Path | None = None,
    input_shapes: Sequence[tuple[int, ...]] | None = None,
) -> LoadedModel:
    """Detect the kind of ``spec`` and load it; ``input_shapes`` are given per input, in order."""
    path = Path(spec)
    if _FACTORY.match(spec) and not path.exists():
        model = _load_factory(spec, weights)
    else:
        if weights is not None:
            raise UsageError(
                "--weights only applies to a PyTorch factory 'package.module:factory'",
                flag="--weights",
            )
        model = _load_file(path)
    model.input_shapes = _bind_shapes(model, input_shapes)
    return model


def _load_file(path: Path) -> LoadedModel:
    suffix = path.suffix.lower()
    if not path.is_file():
        what = "no such file" if not path.exists() else "not a file"
        raise ModelLoadError(f"{what}; expected {KINDS_HELP}", path=path)
    if suffix == ".onnx":
        return _load_onnx(path)
    if suffix == ".tflite":
        return _load_tflite(path)
    archive = _archive_kind(path) if zipfile.is_zipfile(path) else None
    if archive == "exported-program":
        return _load_exported_program(path)
    if archive == "torchscript":
        return _load_torchscript(path)
    if archive == "checkpoint":
        raise ModelLoadError(
            "a torch.save pickle (state_dict or whole model), which is never unpickled here; "
            "pass the model as 'package.module:factory' and its state_dict with --weights",
            path=path,
        )
    if suffix in _TORCH_SUFFIXES:
        raise ModelLoadError(
            f"not a TorchScript or ExportedProgram archive (corrupt, or a legacy pickle); expected {KINDS_HELP}",
            path=path,
        )
    raise ModelLoadError(f"unknown model kind {suffix or '(no suffix)'!r}; expected {KINDS_HELP}", path=path)


def _archive_kind(path: Path) -> str | None:
    """Tell torch archives apart by their layout (``<root>/<entry>``), not by suffix."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = {n.split("/")[1] for n in archive.namelist() if n.count("/") >= 1}
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelLoadError(f"unreadable archive: {exc}", path=path) from exc
    if "archive_format" in entries or "models" in entries:
        return "exported-program"
    if "constants.pkl" in entries or "code" in entries:
        return "torchscript"
    if "data.pkl" in entries:
        return "checkpoint"
    return None


def _load_onnx(path: Path) -> LoadedModel:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"not a readable ONNX model ({exc}); re-export it", path=path) from exc
    graph = proto.graph
    if proto.ir_version <= 0 or not proto.opset_import or not graph.node or not graph.output:
        raise ModelLoadError("not an ONNX model (no graph, opset or outputs)", path=path)
    _check_external_data(proto, path)
    domains = {op.domain for op in proto.opset_import} | {n.domain for n in graph.node}
    kind: ModelKind = "onnx-ml" if _ML_DOMAIN in domains else "onnx"
    return LoadedModel(kind=kind, source=str(path), name=_sanitize(path.stem), onnx_path=path)


def _load_tflite(path: Path) -> LoadedModel:
    """Open the file in the runtime's LiteRT engine: unreadable files and missing (custom) ops fail here."""
    from runtime.backends.litert import LiteEngine
    from runtime.engine import EngineOptions
    from runtime.errors import EngineError

    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[4:8] != b"TFL3":
        raise ModelLoadError("not a TFLite flatbuffer (no TFL3 identifier); re-export it", path=path)
    try:
        engine = LiteEngine(path, EngineOptions())
    except EngineError as exc:
        raise ModelLoadError(str(exc).removeprefix(f"{path}: "), path=path) from exc
    engine.close()
    return LoadedModel(kind="tflite", source=str(path), name=_sanitize(path.stem), tflite_path=path)


def tflite_specs(path: Path) -> tuple[Any, ...]:
    """Input and output specs of a .tflite model as the runtime's LiteRT engine reports them."""
    from runtime.backends.litert import LiteEngine
    from runtime.engine import EngineOptions

    engine = LiteEngine(path, EngineOptions())
    try:
        return engine.inputs, engine.outputs
    finally:
        engine.close()


def _all_tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def _check_external_data(proto: Any, path: Path) -> None:
    """Every external data file must sit next to the model, inside its folder, and exist."""
    import onnx

    base = path.resolve().parent
    for tensor in _all_tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(base):
            raise ModelLoadError(
                f"tensor {tensor.name!r} points outside the model folder ({location!r})",
                path=path,
            )
        if not target.is_file():
            raise ModelLoadError(
                f"external data file {location!r} (tensor {tensor.name!r}) is missing; keep it next to the .onnx file",
                path=path,
            )


def _load_factory(spec: str, weights: Path | None) -> LoadedModel:
    import torch

    module_name, attr = spec.split(":")
    try:
        mod = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ModelLoadError(
            f"cannot import {module_name!r} ({exc}); is it on PYTHONPATH? expected {KINDS_HELP}",
            path=spec,
        ) from exc
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise ModelLoadError(f"{module_name!r} has no callable {attr!r}", path=spec)
    module = factory()
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(f"{attr}() returned {type(module).__name__}, expected a torch.nn.Module", path=spec)
    if weights is not None:
        _load_weights(module, weights)
    return LoadedModel(kind="torch", source=spec, name=_sanitize(attr), module=module.eval())


def _load_weights(module: Any, path: Path) -> None:
    """Load a state_dict strictly: plain, under ``state_dict``/``model_state_dict``, or with the
    ``module.`` prefix ``DataParallel`` adds. Never unpickles code (``weights_only=True``)."""
    import pickle

    import torch

    if not path.is_file():
        raise ModelLoadError("weights file not found", path=path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"not a weights-only state_dict ({reason}); save one with torch.save(model.state_dict(), FILE)",
            path=path,
        ) from exc
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise ModelLoadError("expected a state_dict (parameter name -> tensor)", path=path)
    if obj and all(k.startswith("module.") for k in obj):  # saved from DataParallel
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    expected = set(module.state_dict())
    missing = sorted(expected - set(obj))
    unexpected = sorted(set(obj) - expected)
    if missing or unexpected:
        raise ModelLoadError(
            "state_dict does not match the model: "
            + "; ".join(
                f"{label} {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected))
                if keys
            ),
            path=path,
        )
    try:
        module.load_state_dict(obj, strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln][:3]
        raise ModelLoadError(f"state_dict does not match the model: {'; '.join(lines) or exc}", path=path) from exc


def _load_torchscript(path: Path) -> LoadedModel:
    import torch

    try:
        with warnings.catch_warnings():
            # torch 2.13 deprecates torch.jit; loading existing archives still works.
            warnings.filterwarnings("ignore", r".*torch\.jit.* is deprecated", DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    except (RuntimeError, ValueError, OSError) as exc:
        raise ModelLoadError(f"not a loadable TorchScript archive ({exc})", path=path) from exc
    name = _sanitize(path.stem)
    return LoadedModel(kind="torchscript", source=str(path), name=name, module=module.eval())


def _load_exported_program(path: Path) -> LoadedModel:
    import torch

    try:
        program = torch.export.load(str(path))
    except (RuntimeError, ValueError, OSError, KeyError) as exc:
        raise ModelLoadError(f"not a loadable ExportedProgram archive ({exc})", path=path) from exc
    return LoadedModel(kind="exported-program", source=str(path), name=_sanitize(path.stem), module=program)


def input_names(model: LoadedModel, *, optional: bool = False) -> list[str]:
    """The model's input names, in order; PyTorch modules list optional arguments if asked."""
    module: Any = model.module
    if model.kind == "exported-program":
        return list(module.graph_signature.user_inputs)
    if model.kind == "torchscript":
        args = module.forward.schema.arguments[1:]
        return [a.name for a in args if not a.has_default_value()]
    if model.kind == "torch":
        return _torch_params(module, required_only=not optional)
    if model.kind == "tflite":
        return [spec.name for spec in tflite_specs(cast(Path, model.tflite_path))[0]]
    return [i.name for i, _ in _onnx_inputs(model)]


def _torch_params(module: Any, *, required_only: bool = False) -> list[str]:
    plain = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = inspect.signature(module.forward).parameters.values()
    return [
        p.name for p in params if p.kind in plain and not (required_only and p.default is not inspect.Parameter.empty)
    ]


def _onnx_inputs(model: LoadedModel) -> list[tuple[Any, tuple[int | str, ...]]]:
    import onnx

    proto = onnx.load(str(model.onnx_path), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}
    out = []
    for value in proto.graph.input:
        if value.name in inits:
            continue
        dims = value.type.tensor_type.shape.dim
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or -1) for d in dims)
        out.append((value, shape))
    return out


def _static_shapes(model: LoadedModel) -> dict[str, tuple[int, ...]] | None:
    """Shapes the model itself fixes (ONNX static inputs, ExportedProgram example inputs)."""
    if model.kind in ("onnx", "onnx-ml"):
        shapes = {v.name: dims for v, dims in _onnx_inputs(model)}
    elif model.kind == "tflite":
        shapes = {spec.name: spec.shape for spec in tflite_specs(cast(Path, model.tflite_path))[0]}
    elif model.kind == "exported-program":
        nodes = cast(Any, model.module).graph.nodes
        vals = {n.name: n.meta.get("val") for n in nodes if n.op == "placeholder"}
        shapes = {}
        for name in input_names(model):
            val = vals.get(name)
            shapes[name] = tuple(val.shape) if val is not None and hasattr(val, "shape") else (-1,)
    else:
        return None
    if all(dims and all(isinstance(d, int) and d > 0 for d in dims) for dims in shapes.values()):
        return {k: tuple(int(d) for d in v) for k, v in shapes.items()}
    return None


def _bind_shapes(model: LoadedModel, shapes: Sequence[tuple[int, ...]] | None) -> dict[str, tuple[int, ...]] | None:
    if not shapes:
        return _static_shapes(model)
    names = input_names(model)
    if model.kind == "torch" and len(shapes) > len(names):
        names = input_names(model, optional=True)[: len(shapes)]
    if len(shapes) != len(names):
        raise UsageError(
            f"{len(shapes)} shape(s) given but {model.source} has {len(names)} input(s) "
            f"({', '.join(names) or 'none'}); e.g. {_SHAPE_EXAMPLE}",
            flag="--input-shape",
        )
    return dict(zip(names, (tuple(s) for s in shapes), strict=True))


def _sanitize(name: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")
    return clean[:128] or "model"
