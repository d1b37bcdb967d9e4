"""The TFLite export pass: a PyTorch module (or ExportedProgram) -> one FP32 ``.tflite`` file with litert-torch.

litert-torch (the ``tflite-export`` extra) traces the module with ``torch.export`` and lowers it
to LiteRT builtin operators; it is imported inside :func:`run`. Inputs are passed by keyword, so
the model's signature names its inputs as the module's ``forward`` does (``input`` for an
``nn.Sequential``) — the names the ONNX export uses too — and the runtime's LiteRT engine reports
those names. TorchScript archives and ONNX files are not convertible this way: the error says
which inputs are.

The converter prints progress to stdout and logs from C++ to stderr; while the pass runs both
file descriptors go to a buffer that is logged at DEBUG, so ``toolchain build --json`` keeps a
clean stdout. Its Python warnings become :attr:`TfliteExport.notes`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from runtime.manifest import TensorSpec
from toolchain.errors import PassError, UsageError
from toolchain.load import LoadedModel

__all__ = ["CONVERTIBLE", "TFLITE_INPUTS_HELP", "TfliteExport", "quiet_converter", "run"]

PASS_NAME = "tflite-export"
CONVERTIBLE = ("torch", "exported-program")
TFLITE_INPUTS_HELP = (
    "a PyTorch factory 'package.module:factory' (with --weights FILE.pt), "
    "an ExportedProgram (torch.export.save: .pt2) or an existing .tflite file"
)
INSTALL_HINT = "install the converter with `pip install 'edgefleet[tflite-export]'` (litert-torch, ai-edge-quantizer)"
_log = logging.getLogger(__name__)
_MAX_NOTES = 8


@dataclass(frozen=True)
class TfliteExport:
    """What the TFLite export pass produced."""

    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    converter: str  # "litert-torch 0.10.0"
    torch_max_abs_diff: float | None  # FP32 .tflite vs the PyTorch module on seeded random inputs
    notes: tuple[str, ...]


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


@contextlib.contextmanager
def quiet_converter(notes: list[str]) -> Iterator[None]:
    """Send the converter's stdout/stderr (Python and C++) to a DEBUG log and its warnings to ``notes``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    previous = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "n"
    with tempfile.TemporaryFile(mode="w+b") as sink, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for fd in saved:
            os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            if previous is None:
                os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
            else:
                os.environ["LITERT_TORCH_SHOW_PROGRESS"] = previous
            sink.seek(0)
            _log.debug("converter output:\n%s", sink.read().decode("utf-8", "replace"))
            for w in caught:
                if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
                    continue  # the libraries' own API churn, nothing about this model
                text = f"{w.category.__name__}: {str(w.message).splitlines()[0] if str(w.message) else ''}"
                if text not in notes and len(notes) < _MAX_NOTES:
                    notes.append(text)


def _module_and_kwargs(model: LoadedModel) -> tuple[Any, dict[str, Any], bool]:
    """The module, sample inputs by name, and whether it takes them by keyword (an ExportedProgram's
    module takes them by position: its signature then names them ``args_0``…)."""
    import torch

    if model.kind not in CONVERTIBLE:
        raise UsageError(
            f"{model.source} is {'an' if model.kind[0] in 'aeio' else 'a'} {model.kind} model, which litert-torch "
            f"cannot convert; a TFLite build takes {TFLITE_INPUTS_HELP} (build this one with --backend onnx)",
            flag="--backend",
        )
    if not model.input_shapes:
        raise UsageError(
            "the TFLite export needs static input shapes, e.g. --input-shape 1,3,224,224 (once per input)",
            flag="--input-shape",
        )
    kwargs = {name: torch.zeros(shape, dtype=torch.float32) for name, shape in model.input_shapes.items()}
    if model.kind == "exported-program":  # its unlifted module is already in inference form (eval() refuses)
        return model.module.module(), kwargs, False  # type: ignore[union-attr]
    return model.module.eval(), kwargs, True  # type: ignore[union-attr]


def _torch_diff(
    module: Any, path: Path, kwargs: dict[str, Any], by_name: bool, inputs: tuple[TensorSpec, ...]
) -> float:
    """Largest |torch - tflite| over the first output on a few seeded random inputs."""
    import torch

    from runtime.backends.litert import LiteEngine
    from runtime.engine import EngineOptions

    engine = LiteEngine(path, EngineOptions(deterministic=True))
    rng = np.random.default_rng(0)
    worst = 0.0
    try:
        for _ in range(4):
            feeds = {name: rng.random(tuple(t.shape), dtype=np.float32) for name, t in kwargs.items()}
            with torch.no_grad():
                tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
                ref = module(**tensors) if by_name else module(*tensors.values())
            first = ref[0] if isinstance(ref, (tuple, list)) else ref
            names = list(feeds)  # the signature names are the keyword names; by position if not
            got = engine.run({s.name: feeds[s.name if s.name in feeds else names[i]] for i, s in enumerate(inputs)})[0]
            worst = max(worst, float(np.max(np.abs(first.numpy().astype(np.float64) - got))))
    finally:
        engine.close()
    return worst


def run(model: LoadedModel, out_path: Path) -> TfliteExport:
    """Convert ``model`` (kind ``torch`` or ``exported-program``) to an FP32 ``.tflite`` at ``out_path``."""
    module, kwargs, by_name = _module_and_kwargs(model)
    from toolchain.load import tflite_specs

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    with quiet_converter(notes):  # importing it logs too (absl, torchao)
        try:
            import litert_torch
        except ImportError as exc:
            raise PassError(f"litert-torch is not installed ({exc}); {INSTALL_HINT}", pass_name=PASS_NAME) from exc
    try:
        with quiet_converter(notes):
            edge = (
                litert_torch.convert(module, (), kwargs)
                if by_name
                else litert_torch.convert(module, tuple(kwargs.values()))
            )
            edge.export(str(out_path))
    # The converter fails in many ways (torch.export, MLIR lowering, unsupported ops), with no
    # exception tree of its own; every failure of this third-party call becomes a PassError.
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PassError(
            f"litert-torch could not convert {model.source}: {type(exc).__name__}: {first}; "
            "check that torch.export handles the module (no data-dependent control flow) "
            "or build it with --backend onnx",
            pass_name=PASS_NAME,
        ) from exc
    inputs, outputs = tflite_specs(out_path)
    diff = _torch_diff(module, out_path, kwargs, by_name, inputs)
    return TfliteExport(
        path=out_path,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        converter=f"litert-torch {_version('litert-torch')}",
        torch_max_abs_diff=diff,
        notes=tuple(notes),
    )
