"""Output post-processing from the manifest: softmax, top-k and labels with numpy."""

from __future__ import annotations

from typing import Any

import numpy as np

from runtime.manifest import Postprocess

__all__ = ["classify", "softmax", "summarize"]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis (float32)."""
    x = logits.astype(np.float32, copy=False)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    out: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return out


def classify(output: np.ndarray, spec: Postprocess) -> dict[str, Any]:
    """Top-k classes of one sample's class vector; ``top1`` is ``{"index", "label", "score"}``."""
    vec = output.reshape(-1)
    probs = softmax(vec) if spec.softmax else vec.astype(np.float32, copy=False)
    k = min(spec.top_k, probs.size)
    # A stable sort of the whole vector: equal scores (common in dequantized int8 outputs) rank by
    # index, so top-1 is np.argmax's choice — the one the toolchain's validation counted.
    idx = np.argsort(-probs, kind="stable")[:k]

    def entry(i: int) -> dict[str, Any]:
        label = spec.labels[i] if i < len(spec.labels) else str(i)
        return {"index": int(i), "label": label, "score": float(probs[i])}

    top = [entry(int(i)) for i in idx]
    return {"top1": top[0], "topk": top}


def summarize(outputs: list[np.ndarray], names: list[str], spec: Postprocess, *, full: bool = False) -> dict[str, Any]:
    """The result record for one inference: outputs (as lists, or shapes when large) plus task fields."""
    result: dict[str, Any] = {}
    if spec.kind == "classification" and outputs:
        result.update(classify(outputs[0], spec))
    elif spec.kind == "dense" and outputs:
        m = outputs[0]
        result["dense"] = {
            "shape": list(m.shape),
            "mean": float(m.mean()),
            "max": float(m.max()),
            "coverage_0.3": float((m > 0.3).mean()),
        }
    result["outputs"] = {
        name: (out.tolist() if full or out.size <= 64 else {"shape": list(out.shape), "dtype": str(out.dtype)})
        for name, out in zip(names, outputs, strict=True)
    }
    return result
