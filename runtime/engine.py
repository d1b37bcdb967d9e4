"""One inference interface over ONNX Runtime and LiteRT, and the options both take from a profile."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from runtime.errors import EngineError
from runtime.manifest import TensorSpec
from runtime.profile import DeviceProfile

__all__ = ["Engine", "EngineOptions", "backend_for", "open_engine"]


@dataclass(frozen=True)
class EngineOptions:
    """Session settings: thread budget, pinning, providers and the optimized-model cache."""

    intra_op_threads: int = 1
    inter_op_threads: int = 1
    pin_cores: tuple[int, ...] = ()  # cores for intra-op threads; () = let the OS decide
    spinning: bool = False
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    cache_dir: Path | None = None  # where the optimized model is kept for fast cold starts
    deterministic: bool = False  # disable graph rewrites that change numerics slightly (validation)

    @classmethod
    def from_profile(
        cls, profile: DeviceProfile, *, host_cores: int | None = None, **overrides: object
    ) -> EngineOptions:
        """Options a device of ``profile`` would use, clipped to ``host_cores`` when running elsewhere."""
        threads = profile.cpu.inference_threads
        pin: tuple[int, ...] = profile.cpu.big_cores if profile.runtime.pin_threads else ()
        if host_cores is not None:
            threads = max(1, min(threads, host_cores))
            pin = tuple(c for c in pin if c < host_cores)[:threads]
        opts = cls(
            intra_op_threads=threads,
            inter_op_threads=profile.runtime.inter_op_threads,
            pin_cores=pin,
            spinning=profile.runtime.spinning,
            providers=profile.execution_providers,
        )
        return _replace(opts, overrides)


def _replace(opts: EngineOptions, overrides: Mapping[str, object]) -> EngineOptions:
    from dataclasses import replace

    return replace(opts, **overrides) if overrides else opts  # type: ignore[arg-type]


class Engine(Protocol):
    """A loaded model ready to run. Implementations: ``OrtEngine``, ``LiteEngine``."""

    backend: str
    provider: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run one inference; returns outputs in ``outputs`` order."""
        ...

    def close(self) -> None:
        """Release the session."""
        ...


def backend_for(model: Path) -> str:
    """The backend a bare model file needs, from its suffix: ``.tflite`` → tflite, anything else → onnxruntime."""
    return "tflite" if Path(model).suffix.lower() == ".tflite" else "onnxruntime"


def open_engine(model: Path, *, backend: str = "onnxruntime", options: EngineOptions | None = None) -> Engine:
    """Load ``model`` with the backend named in its manifest."""
    opts = options or EngineOptions()
    if backend == "onnxruntime":
        from runtime.backends.ort import OrtEngine

        return OrtEngine(model, opts)
    if backend == "tflite":
        from runtime.backends.litert import LiteEngine

        return LiteEngine(model, opts)
    raise EngineError(f"backend {backend!r} is not available in this runtime (known: onnxruntime, tflite)")
