"""Task-aware agreement metrics: how close a candidate's output is to the FP32 reference, per sample.

Every metric scores one validation sample from the first output of both models: ``1.0`` means
the candidate agrees with the reference, lower is worse. The gate compares the mean score with
the profile's ``budgets.min_agreement`` (``generic`` is judged by its mean cosine against
``budgets.min_cosine``, see :mod:`toolchain.validate`).

Built-in metrics (``--metric NAME``):

* ``classification`` — 1 when the top-1 class matches, else 0 (the gate adds the labelled
  accuracy drop when the validation set has labels);
* ``dense`` — IoU of the maps thresholded at :data:`DENSE_THRESHOLD` (segmentation, text
  detection probability maps); 1.0 when neither map has a pixel above it;
* ``embedding`` — cosine similarity of the vectors;
* ``detection`` — boxes ``[..., K, 4 + 1 + …]`` laid out ``x1, y1, x2, y2, score``: boxes whose
  score reaches :data:`BOX_SCORE_THRESHOLD` are matched greedily by IoU; the score is the sum of
  matched IoUs over the larger box count (1.0 when both have none);
* ``generic`` — 1 when the cosine similarity reaches 0.99, else 0; the SNR in dB is reported.

A user metric is ``package.module:function`` with the signature
``function(reference: numpy.ndarray, candidate: numpy.ndarray) -> float`` — called once per
sample with the first output of each model, returning a score where 1.0 means "as good as FP32".
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from toolchain.errors import UsageError

__all__ = [
    "BOX_SCORE_THRESHOLD",
    "BUILTIN",
    "DENSE_THRESHOLD",
    "Metric",
    "cosine",
    "infer_task",
    "resolve",
    "snr_db",
]

DENSE_THRESHOLD = 0.3  # probability-map threshold for dense (segmentation/detection-map) agreement
BOX_SCORE_THRESHOLD = 0.3
_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
ScoreFn = Callable[[np.ndarray, np.ndarray], float]


@dataclass(frozen=True)
class Metric:
    """A named per-sample score (1.0 = agrees with the reference)."""

    name: str  # task name, or the user's module:function
    task: str  # classification | dense | embedding | detection | generic | custom
    score: ScoreFn
    description: str


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays (1.0 when both are zero)."""
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a64, b64) / (na * nb))


def snr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Signal-to-noise ratio of the candidate against the reference, in dB (capped at 120)."""
    ref = reference.astype(np.float64).ravel()
    noise = float(np.sum((ref - candidate.astype(np.float64).ravel()) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0:
        return 120.0
    return min(120.0, 10 * math.log10(signal / noise)) if signal > 0 else -120.0


def _top1(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 if int(np.argmax(a.reshape(-1))) == int(np.argmax(b.reshape(-1))) else 0.0


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ma, mb = a > DENSE_THRESHOLD, b > DENSE_THRESHOLD
    union = int(np.logical_or(ma, mb).sum())
    return 1.0 if union == 0 else float(np.logical_and(ma, mb).sum() / union)


def _boxes(out: np.ndarray) -> np.ndarray:
    rows = out.reshape(-1, out.shape[-1]) if out.ndim else out.reshape(0, 5)
    if rows.shape[-1] < 5:
        raise UsageError(
            f"detection metric expects boxes laid out x1,y1,x2,y2,score[,...] in the last axis, "
            f"got an output of shape {out.shape}; pass --metric generic or your own module:function",
            flag="--metric",
        )
    return rows[rows[:, 4] >= BOX_SCORE_THRESHOLD, :4].astype(np.float64)


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _matched_iou(reference: np.ndarray, candidate: np.ndarray) -> float:
    ref, cand = _boxes(reference), _boxes(candidate)
    if len(ref) == 0 and len(cand) == 0:
        return 1.0
    if len(ref) == 0 or len(cand) == 0:
        return 0.0
    ious = _box_iou(ref, cand)
    total = 0.0
    while ious.size and ious.max() > 0:
        i, j = np.unravel_index(int(np.argmax(ious)), ious.shape)
        total += float(ious[i, j])
        ious[i, :], ious[:, j] = -1.0, -1.0
    return total / max(len(ref), len(cand))


def _generic(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 if cosine(a, b) >= 0.99 else 0.0


BUILTIN: dict[str, Metric] = {
    "classification": Metric("classification", "classification", _top1, "top-1 agreement"),
    "dense": Metric("dense", "dense", _iou, f"mean IoU at {DENSE_THRESHOLD}"),
    "embedding": Metric("embedding", "embedding", cosine, "mean cosine"),
    "detection": Metric("detection", "detection", _matched_iou, "mean matched box IoU"),
    "generic": Metric("generic", "generic", _generic, "share with cosine >= 0.99"),
}


def infer_task(output_shape: Sequence[int | str]) -> str:
    """Guess the task from the first output's shape: (N, C) classification, (N, C, H, W) dense map."""
    rank = len(output_shape)
    last = output_shape[-1] if output_shape else 1
    if rank == 2 and (not isinstance(last, int) or last > 1):
        return "classification"
    if rank == 4:
        return "dense"
    return "generic"


def resolve(spec: str | None, output_shape: Sequence[int | str]) -> Metric:
    """The metric named by ``--metric`` (a built-in or ``module:function``), else the inferred task's."""
    if spec is None:
        return BUILTIN[infer_task(output_shape)]
    if spec in BUILTIN:
        return BUILTIN[spec]
    if not _SPEC.match(spec):
        names = ", ".join(BUILTIN)
        raise UsageError(f"expected one of {names} or package.module:function, got {spec!r}", flag="--metric")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # user code: a failing import is the user's to fix
        raise UsageError(
            f"cannot import metric module {module_name!r} ({type(exc).__name__}: {exc})", flag="--metric"
        ) from exc
    func = getattr(module, attr, None)
    if not callable(func):
        raise UsageError(f"module {module_name!r} has no function {attr!r}", flag="--metric")
    return Metric(spec, "custom", _checked(spec, func), f"mean of {spec}")


def _checked(spec: str, func: Callable[..., object]) -> ScoreFn:
    """Wrap a user metric so a wrong return value is a clear error naming it."""

    def score(reference: np.ndarray, candidate: np.ndarray) -> float:
        try:
            value = func(reference, candidate)
        except Exception as exc:  # user code
            raise UsageError(f"{spec} raised {type(exc).__name__}: {exc}", flag="--metric") from exc
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise UsageError(f"{spec} returned {value!r}; return a float (1.0 = as good as FP32)", flag="--metric")
        if not math.isfinite(float(value)):
            raise UsageError(f"{spec} returned {value}; return a finite float", flag="--metric")
        return float(value)

    return score
