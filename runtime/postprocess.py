"""Output post-processing from the manifest: softmax, top-k and labels with numpy."""

from __future__ import annotations

from typing import Any

import numpy as np

from runtime.manifest import Postprocess

__all__ = ["classify", "softmax", "summarize", "top_indices"]

_SORT_ALL_BELOW = 64  # shorter vectors are sorted whole: partitioning does not pay off


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
    idx = top_indices(probs, spec.top_k)

    def entry(i: int) -> dict[str, Any]:
        label = spec.labels[i] if i < len(spec.labels) else str(i)
        return {"index": int(i), "label": label, "score": float(probs[i])}

    top = [entry(int(i)) for i in idx]
    return {"top1": top[0], "topk": top}


def top_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores, highest first; equal scores rank by index.

    Equal scores are common in dequantized int8 outputs; ranking them by index makes top-1
    np.argmax's choice — the one the toolchain's validation counted. Long vectors are partitioned
    first (O(n)), so only the candidates tied with or above the k-th score are sorted.
    """
    k = min(k, scores.size)
    if scores.size <= _SORT_ALL_BELOW or k <= 0:
        return np.argsort(-scores, kind="stable")[:k]
    kth = np.partition(scores, scores.size - k)[scores.size - k]
    cand = np.flatnonzero(scores >= kth)  # index order, so the stable sort keeps ties by index
    if cand.size < k:  # NaN scores compare false: rank the whole vector as argsort does
        return np.argsort(-scores, kind="stable")[:k]
    return cand[np.argsort(-scores[cand], kind="stable")][:k]


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
            "coverage_0.3": np.count_nonzero(m > 0.3) / max(m.size, 1),
        }
    result["outputs"] = {
        name: (out.tolist() if full or out.size <= 64 else {"shape": list(out.shape), "dtype": _dtype_name(out.dtype)})
        for name, out in zip(names, outputs, strict=True)
    }
    return result


_DTYPE_NAMES: dict[np.dtype[Any], str] = {}


def _dtype_name(dtype: np.dtype[Any]) -> str:
    """``str(dtype)``, cached (it costs microseconds per call on the serving path)."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype)
    return name
