"""ONNX Runtime engine: providers in the profile's order with fallback, pinned intra-op threads, model cache."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from runtime.engine import EngineOptions
from runtime.errors import EngineError, InputError
from runtime.manifest import TensorSpec

__all__ = ["OrtEngine", "available_providers"]

log = logging.getLogger(__name__)

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
    "tensor(string)": "string",
}


def _ort() -> Any:
    import onnxruntime

    return onnxruntime


def available_providers() -> list[str]:
    """Execution providers this onnxruntime build offers."""
    return list(_ort().get_available_providers())


def _spec(arg: Any) -> TensorSpec:
    dtype = _ORT_TYPES.get(arg.type, "float32" if arg.type.startswith("tensor") else "string")
    shape = tuple(d if isinstance(d, int) else (str(d) if d else -1) for d in (arg.shape or ()))
    return TensorSpec(name=arg.name, dtype=dtype, shape=shape)


def _provider_list(wanted: tuple[str, ...], opts: EngineOptions) -> list[Any]:
    have = set(available_providers())
    chosen: list[Any] = []
    for ep in wanted:
        if ep not in have:
            log.warning("execution provider %s is not in this onnxruntime build; falling back", ep)
            continue
        if ep == "XnnpackExecutionProvider":
            chosen.append((ep, {"intra_op_num_threads": str(opts.intra_op_threads)}))
        else:
            chosen.append(ep)
    if not chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


class OrtEngine:
    """A model loaded into an onnxruntime ``InferenceSession``."""

    backend = "onnxruntime"

    def __init__(self, model: Path, options: EngineOptions):
        ort = _ort()
        self.model_path = Path(model)
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = options.inter_op_threads
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        if not options.spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if options.pin_cores and options.intra_op_threads > 1:
            # onnxruntime pins the intra-op pool's extra threads; the calling thread is the first.
            pins = options.pin_cores[1 : options.intra_op_threads]
            if len(pins) == options.intra_op_threads - 1:
                so.add_session_config_entry("session.intra_op_thread_affinities", ";".join(str(c + 1) for c in pins))
        if options.deterministic:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        if options.cache_dir is not None:
            self._use_cache(so, options.cache_dir)
        providers = _provider_list(options.providers, options)
        try:
            self.session = ort.InferenceSession(str(self.model_path), sess_options=so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise EngineError(f"{self.model_path}: onnxruntime cannot load the model: {exc}") from exc
        self.provider = self.session.get_providers()[0]
        log.info("onnxruntime runs %s on %s", self.model_path.name, self.provider)
        self.inputs = tuple(_spec(a) for a in self.session.get_inputs())
        self.outputs = tuple(_spec(a) for a in self.session.get_outputs())
        self._output_names = [o.name for o in self.outputs]

    def _use_cache(self, so: Any, cache_dir: Path) -> None:
        # the optimized graph is specific to this model, onnxruntime version and provider list
        h = hashlib.sha256(self.model_path.read_bytes())
        h.update(f"{_ort().__version__}|{','.join(available_providers())}".encode())
        digest = h.hexdigest()[:16]
        cache_dir.mkdir(parents=True, exist_ok=True)
        cached = cache_dir / f"{digest}.ort.onnx"
        if cached.is_file():
            self.model_path = cached
            so.graph_optimization_level = _ort().GraphOptimizationLevel.ORT_DISABLE_ALL
        else:
            so.optimized_model_filepath = str(cached)

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run one inference."""
        try:
            return list(self.session.run(self._output_names, dict(feeds)))
        except Exception as exc:
            names = {i.name for i in self.inputs}
            if set(feeds) != names:
                raise InputError(f"model inputs are {sorted(names)}, got {sorted(feeds)}") from exc
            shapes = {k: tuple(v.shape) for k, v in feeds.items()}
            raise InputError(
                f"onnxruntime rejected inputs {shapes} for {[(i.name, i.shape) for i in self.inputs]}: {exc}"
            ) from exc

    def close(self) -> None:
        """Release the session."""
        self.session = None
