"""Output post-processing from the manifest: softmax, top-k and labels with numpy."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from runtime.manifest import Postprocess

__all__ = ["classify", "summarize", "top_indices"]

_SORT_ALL_BELOW = 64  # shorter vectors are sorted whole: partitioning does not pay off


def classify(output: np.ndarray, spec: Postprocess) -> dict[str, Any]:
    """Top-k classes of one sample's class vector; ``top1`` is ``{"index", "label", "score"}``.

    Runs once per served item right after the engine, when the CPU caches hold the model rather than
    numpy: it makes as few numpy calls as it can (each costs microseconds there).
    """
    vec = output.reshape(-1).astype(np.float32, copy=False)
    ids, values = _top(vec, spec.top_k)  # softmax keeps the order, so rank the logits (top-1 = np.argmax)
    if spec.softmax:  # the k winners' probabilities only: exp(x - max) / sum(exp(x - max))
        peak = values[0]
        total = float(np.exp(vec - np.float32(peak)).sum())
        scores = [math.exp(v - peak) / total for v in values]
    else:
        scores = values
    labels = spec.labels
    top = [
        {"index": i, "label": labels[i] if i < len(labels) else str(i), "score": score}
        for i, score in zip(ids, scores, strict=True)
    ]
    return {"top1": top[0], "topk": top}


def top_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores, highest first; equal scores rank by index.

    Equal scores are common in dequantized int8 outputs; ranking them by index makes top-1
    np.argmax's choice — the one the toolchain's validation counted.
    """
    return np.array(_top(scores.reshape(-1), k)[0], dtype=np.intp)


def _top(scores: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    """(indices, values) of the ``k`` highest of a 1-D vector, ranked as a stable sort of ``-scores``.

    Long vectors are partitioned (O(n)); when nothing outside the k ties with the k-th value, the k
    are ranked in Python, otherwise every candidate tied with or above the k-th is sorted.
    """
    n = scores.size
    k = min(k, n)
    if n > _SORT_ALL_BELOW and k > 0:
        part = np.argpartition(scores, n - k)[n - k :]
        values = scores[part].tolist()
        if np.count_nonzero(scores >= min(values)) == k:  # no tie across the k-th place (and no NaN)
            ranked = sorted(zip(part.tolist(), values, strict=True), key=lambda p: (-p[1], p[0]))
            return [i for i, _ in ranked], [v for _, v in ranked]
        kth = np.partition(scores, n - k)[n - k]
        cand = np.flatnonzero(scores >= kth)  # index order, so the stable sort keeps ties by index
        if cand.size >= k:  # NaN scores compare false: then rank the whole vector as below
            idx = cand[np.argsort(-scores[cand], kind="stable")][:k]
            return idx.tolist(), scores[idx].tolist()
    idx = np.argsort(-scores, kind="stable")[:k]
    return idx.tolist(), scores[idx].tolist()


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
