"""Probe run by the arm64 tests with the same code on the host and in the emulated root (device venv only).

``python probe.py cpu`` prints what the runtime sees of the CPU; ``imports`` which top-level modules
loading the runtime pulls in; ``bundles KEY OUT.npz IMAGES BUNDLE…`` runs every image through every
bundle (verify, preprocess, engine) and saves the raw outputs; ``litert OUT.npz IN.npz MODEL…`` runs
tiny .tflite models through the LiteRT engine on the saved inputs. Needs only numpy and the runtime.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

__all__ = ["main"]


def _cpu() -> dict[str, object]:
    import platform

    from runtime.cpu import parse_cpuinfo

    procs = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    parts = sorted({str(v.get("CPU part", "")) for v in procs.values()})
    return {"machine": platform.machine(), "cpu_parts": parts}


def _imports() -> dict[str, object]:
    import importlib.util

    import runtime
    import runtime.backends.ort
    import runtime.cli
    import runtime.service

    runtime_only = sorted({m.split(".")[0] for m in sys.modules})
    import onnxruntime  # noqa: F401  # the engine's own import must not pull onnx either

    top = sorted({m.split(".")[0] for m in sys.modules})
    forbidden = [m for m in top if m in ("torch", "onnx", "toolchain", "onnxscript", "sklearn")]
    installed = {name: importlib.util.find_spec(name) is not None for name in ("torch", "onnx")}
    return {
        "version": runtime.__version__,
        "modules": runtime_only,
        "with_onnxruntime": top,
        "forbidden_loaded": forbidden,
        "installed": installed,
    }


def _bundles(key: str, out: str, images: str, bundles: list[str]) -> dict[str, object]:
    from runtime.engine import EngineOptions
    from runtime.model import load_model
    from runtime.signing import load_public_key

    files = sorted(Path(images).rglob("*.png"))
    arrays: dict[str, np.ndarray] = {}
    providers: dict[str, str] = {}
    for bundle in bundles:
        # one thread: the same reduction order on every machine, so differences are the kernels'
        model = load_model(Path(bundle), trusted_keys=[load_public_key(key)], options=EngineOptions(intra_op_threads=1))
        try:
            rows = [np.concatenate([o.ravel() for o in model.run_file(f).outputs]) for f in files]
            arrays[Path(bundle).parent.name] = np.stack(rows).astype(np.float32)
            providers[Path(bundle).parent.name] = model.engine.provider
        finally:
            model.close()
    np.savez(out, **arrays)
    return {"images": len(files), "providers": providers}


def _litert(out: str, inputs: str, models: list[str]) -> dict[str, object]:
    from runtime.engine import EngineOptions, open_engine

    feeds = np.load(inputs)["x"]
    arrays: dict[str, np.ndarray] = {}
    for model in models:
        engine = open_engine(Path(model), backend="tflite", options=EngineOptions(intra_op_threads=1))
        try:
            name = engine.inputs[0].name
            arrays[Path(model).stem] = np.stack([engine.run({name: row[None, :]})[0].ravel() for row in feeds])
        finally:
            engine.close()
    np.savez(out, **arrays)
    return {"models": len(models), "rows": len(feeds)}


def main(argv: list[str]) -> int:
    """Dispatch on the first argument; print one JSON line."""
    what, rest = argv[0], argv[1:]
    if what == "cpu":
        result = _cpu()
    elif what == "imports":
        result = _imports()
    elif what == "bundles":
        result = _bundles(rest[0], rest[1], rest[2], rest[3:])
    elif what == "litert":
        result = _litert(rest[0], rest[1], rest[2:])
    else:
        print(f"unknown probe {what!r}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
