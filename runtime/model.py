"""A verified bundle loaded for serving: engine, preprocessing into reused buffers, post-processing."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from runtime.bundle import Bundle, open_bundle
from runtime.engine import Engine, EngineOptions, open_engine
from runtime.errors import InputError
from runtime.manifest import Manifest
from runtime.postprocess import summarize
from runtime.preprocess import fit_rank, image_to_tensor, load_image

__all__ = ["LoadedModel", "Prediction", "load_model", "profile_providers"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """One inference: what went in, how long it took, what came out (task fields merged in)."""

    input: str
    latency_ms: float
    result: dict[str, Any]
    outputs: list[np.ndarray]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (``input``, ``latency_ms``, ``outputs``, and ``top1`` for classifiers)."""
        return {"input": self.input, "latency_ms": round(self.latency_ms, 4), **self.result}


class LoadedModel:
    """A bundle whose signature and hashes were checked, with its engine ready to run."""

    def __init__(self, bundle: Bundle, engine: Engine):
        self.bundle = bundle
        self.engine = engine
        self.manifest: Manifest = bundle.manifest
        self._lock = threading.Lock()  # one inference at a time per session; buffers are shared
        self._buffers: dict[str, np.ndarray] = {}
        for spec in engine.inputs:
            if all(isinstance(d, int) and d > 0 for d in spec.shape) and spec.dtype != "string":
                self._buffers[spec.name] = np.empty(tuple(int(d) for d in spec.shape), dtype=spec.dtype)
        self._names = [o.name for o in engine.outputs]

    @property
    def name(self) -> str:
        """Bundle name."""
        return self.manifest.name

    @property
    def version(self) -> str:
        """Bundle version."""
        return self.manifest.version

    def tensor_from_image(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Preprocess a decoded image (BGR/grey uint8) for the first input."""
        spec = self.manifest.inputs[0]
        return {spec.name: image_to_tensor(image, self.manifest.preprocess, spec)}

    def tensor_from_array(self, array: np.ndarray, *, source: str) -> dict[str, np.ndarray]:
        """Check a raw tensor against the first input (adds a missing batch axis)."""
        spec = self.manifest.inputs[0]
        try:
            return {spec.name: fit_rank(array, spec, source=source)}
        except InputError:
            raise
        except (TypeError, ValueError) as exc:
            raise InputError(f"{source}: cannot use as input {spec.name!r}: {exc}") from exc

    def tensor_from_file(self, path: str | Path) -> dict[str, np.ndarray]:
        """Load an image or ``.npy`` file as the model's input."""
        p = Path(path)
        if p.suffix.lower() == ".npy":
            try:
                arr = np.load(p, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise InputError(f"{p}: not a readable .npy array ({exc})") from exc
            return self.tensor_from_array(arr, source=str(p))
        return self.tensor_from_image(load_image(p))

    def run(self, feeds: Mapping[str, np.ndarray], *, ref: str = "", full_outputs: bool = False) -> Prediction:
        """One inference; an input that needs a cast or is not contiguous goes through a reused buffer.

        A contiguous input of the model's dtype goes to the engine as it is (ONNX Runtime reads it in
        place): copying a 1×3×640×640 float tensor would cost about 0.35 ms per item for nothing.
        """
        with self._lock:
            staged: dict[str, np.ndarray] = {}
            for name, arr in feeds.items():
                buf = self._buffers.get(name)
                if (
                    buf is not None
                    and buf.shape == arr.shape
                    and (arr.dtype != buf.dtype or not arr.flags.c_contiguous)
                ):
                    np.copyto(buf, arr, casting="same_kind")
                    staged[name] = buf
                else:
                    staged[name] = arr
            t0 = time.perf_counter()
            outputs = self.engine.run(staged)
            latency = (time.perf_counter() - t0) * 1000.0
        result = summarize(outputs, self._names, self.manifest.postprocess, full=full_outputs)
        return Prediction(input=ref, latency_ms=latency, result=result, outputs=outputs)

    def run_file(self, path: str | Path, *, full_outputs: bool = False) -> Prediction:
        """Load, preprocess and run one input file."""
        return self.run(self.tensor_from_file(path), ref=str(path), full_outputs=full_outputs)

    def warmup(self, runs: int = 3) -> None:
        """Run seeded random inputs so the first real request is not the slow one."""
        from runtime.bench import random_feeds

        feeds = random_feeds(self.engine.inputs)
        for _ in range(runs):
            self.engine.run(feeds)

    def close(self) -> None:
        """Release the session and the extracted files."""
        self.engine.close()
        self.bundle.cleanup()


def profile_providers(profile: str) -> tuple[str, ...]:
    """Execution providers of a shipped profile (in its order), or () when the profile is not shipped."""
    from runtime.errors import ProfileError
    from runtime.profile import builtin_profile_names, load_profile

    if profile not in builtin_profile_names():
        return ()
    try:
        return load_profile(profile).execution_providers
    except ProfileError:
        return ()


def load_model(
    source: Path,
    *,
    trusted_keys: Sequence[Any],
    options: EngineOptions,
    extract_to: Path | None = None,
    providers: Sequence[str] | None = None,
) -> LoadedModel:
    """Verify ``source`` (tar or directory) against ``trusted_keys`` and load it into its engine.

    ``providers`` defaults to the execution providers of the profile the bundle was built for
    (TensorRT → CUDA → CPU for Jetson), each skipped with a log line when this build lacks it.
    """
    bundle = open_bundle(source, trusted_keys=list(trusted_keys), dest=extract_to)
    if providers is None:
        providers = profile_providers(bundle.manifest.profile.name)
    if providers:
        options = replace(options, providers=tuple(providers))
    try:
        engine = open_engine(bundle.model_path, backend=bundle.manifest.backend, options=options)
    except BaseException:
        bundle.cleanup()
        raise
    log.info(
        "loaded %s %s (%s, %s) signed by %s",
        bundle.manifest.name,
        bundle.manifest.version,
        bundle.manifest.precision,
        engine.provider,
        bundle.key_id,
    )
    return LoadedModel(bundle, engine)
