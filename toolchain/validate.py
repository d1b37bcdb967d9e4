"""The validation gate: reference (FP32) vs candidate through the device's own engine, judged by the profile."""

from __future__ import annotations

import platform
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.engine import EngineOptions, backend_for, open_engine
from runtime.profile import DeviceProfile

__all__ = ["Comparison", "GateCheck", "GateResult", "compare", "infer_task", "judge"]

DENSE_THRESHOLD = 0.3  # probability-map threshold for dense (segmentation/detection-map) agreement


@dataclass(frozen=True)
class Comparison:
    """How the candidate's outputs compare with the reference's on the validation samples."""

    task: str
    samples: int
    labeled: bool
    reference_accuracy: float | None  # top-1 %, when labels are known
    candidate_accuracy: float | None
    accuracy_drop: float | None  # percentage points
    agreement: (
        float  # top-1 agreement (classification), mean IoU of thresholded maps (dense), else share with cosine >= 0.99
    )
    agreement_min: float  # worst single sample (IoU for dense; 0/1 for classification)
    cosine_mean: float
    cosine_min: float
    max_abs_diff: float
    worst_samples: tuple[tuple[str, float], ...] = ()  # (source, score) of the lowest-agreeing samples


@dataclass(frozen=True)
class GateCheck:
    """One budget and whether the candidate met it."""

    name: str
    value: float | None
    limit: float
    passed: bool | None  # None = not evaluated (says why in note)
    note: str = ""


@dataclass(frozen=True)
class GateResult:
    """All checks; the gate passes when no evaluated check failed."""

    checks: tuple[GateCheck, ...] = field(default_factory=tuple)

    @property
    def passed(self) -> bool:
        """True when every evaluated check passed."""
        return all(c.passed is not False for c in self.checks)

    def failures(self) -> list[GateCheck]:
        """Checks that failed."""
        return [c for c in self.checks if c.passed is False]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"passed": self.passed, "checks": [asdict(c) for c in self.checks]}


def infer_task(output_shape: Sequence[int | str]) -> str:
    """Guess the task from the first output's shape: (N, C) classification, (N, C, H, W) dense map."""
    rank = len(output_shape)
    last = output_shape[-1] if output_shape else 1
    if rank == 2 and (not isinstance(last, int) or last > 1):
        return "classification"
    if rank == 4:
        return "dense"
    return "generic"


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a64, b64) / (na * nb))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ma, mb = a > DENSE_THRESHOLD, b > DENSE_THRESHOLD
    union = np.logical_or(ma, mb).sum()
    return 1.0 if union == 0 else float(np.logical_and(ma, mb).sum() / union)


def run_outputs(
    model: Path,
    feeds: Sequence[dict[str, np.ndarray]],
    options: EngineOptions,
    progress: Callable[[], None] | None = None,
) -> list[np.ndarray]:
    """First output of ``model`` for every feed, through the runtime's engine for its kind (.onnx, .tflite)."""
    engine = open_engine(model, backend=backend_for(model), options=options)
    try:
        outs = []
        for f in feeds:
            outs.append(engine.run(f)[0])
            if progress:
                progress()
        return outs
    finally:
        engine.close()


def compare(
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    *,
    task: str,
    labels: Sequence[int | None],
    sources: Sequence[str],
) -> Comparison:
    """Metrics of ``candidate`` against ``reference`` (and labels when every sample has one)."""
    n = len(reference)
    cos = [_cosine(r, c) for r, c in zip(reference, candidate, strict=False)]
    pairs = list(zip(reference, candidate, strict=True))
    diff = max((float(np.max(np.abs(r.astype(np.float64) - c.astype(np.float64)))) for r, c in pairs), default=0.0)
    labeled = n > 0 and all(lab is not None for lab in labels)
    ref_acc = cand_acc = drop = None
    if task == "classification":
        rtop = [int(np.argmax(r.reshape(-1))) for r in reference]
        ctop = [int(np.argmax(c.reshape(-1))) for c in candidate]
        scores = [1.0 if a == b else 0.0 for a, b in zip(rtop, ctop, strict=False)]
        if labeled:
            ref_acc = 100.0 * float(np.mean([a == lab for a, lab in zip(rtop, labels, strict=False)]))
            cand_acc = 100.0 * float(np.mean([b == lab for b, lab in zip(ctop, labels, strict=False)]))
            drop = ref_acc - cand_acc
    elif task == "dense":
        scores = [_iou(r, c) for r, c in zip(reference, candidate, strict=False)]
    else:
        scores = [1.0 if c >= 0.99 else 0.0 for c in cos]
    worst = sorted(zip(sources, scores if task == "dense" else cos, strict=False), key=lambda t: t[1])[:5]
    return Comparison(
        task=task,
        samples=n,
        labeled=labeled,
        reference_accuracy=ref_acc,
        candidate_accuracy=cand_acc,
        accuracy_drop=drop,
        agreement=float(np.mean(scores)) if n else 0.0,
        agreement_min=float(min(scores)) if n else 0.0,
        cosine_mean=float(np.mean(cos)) if n else 0.0,
        cosine_min=float(min(cos)) if n else 0.0,
        max_abs_diff=diff,
        worst_samples=tuple((s, round(v, 4)) for s, v in worst),
    )


def host_matches(profile: DeviceProfile) -> bool:
    """True when this machine is of the profile's architecture (host latency then speaks for the target)."""
    machine = platform.machine().lower()
    aliases = {"amd64": "x86_64", "arm64": "aarch64"}
    return aliases.get(machine, machine) == profile.arch


def judge(
    profile: DeviceProfile, cmp: Comparison | None, *, size_mb: float, latency_p95_ms: float | None
) -> GateResult:
    """Apply the profile's budgets to the comparison, the model size and the host latency."""
    b = profile.budgets
    checks = [GateCheck("model_size_mb", round(size_mb, 3), b.max_model_mb, size_mb <= b.max_model_mb)]
    if cmp is not None:
        if cmp.accuracy_drop is not None:
            checks.append(
                GateCheck(
                    "accuracy_drop_points",
                    round(cmp.accuracy_drop, 3),
                    b.max_accuracy_drop,
                    cmp.accuracy_drop <= b.max_accuracy_drop,
                )
            )
        else:
            checks.append(
                GateCheck(
                    "accuracy_drop_points",
                    None,
                    b.max_accuracy_drop,
                    None,
                    "no labels in the validation set (use class sub-folders)",
                )
            )
        if cmp.task in ("classification", "dense"):
            checks.append(
                GateCheck(
                    "agreement",
                    round(cmp.agreement, 4),
                    b.min_agreement,
                    cmp.agreement >= b.min_agreement,
                    "top-1 agreement" if cmp.task == "classification" else f"mean IoU at {DENSE_THRESHOLD}",
                )
            )
        else:
            checks.append(
                GateCheck(
                    "cosine_mean",
                    round(cmp.cosine_mean, 5),
                    b.min_cosine,
                    cmp.cosine_mean >= b.min_cosine,
                )
            )
    if latency_p95_ms is None:
        checks.append(GateCheck("latency_ms_p95", None, b.latency_ms_p95, None, "not benchmarked"))
    elif host_matches(profile):
        checks.append(
            GateCheck(
                "latency_ms_p95",
                round(latency_p95_ms, 3),
                b.latency_ms_p95,
                latency_p95_ms <= b.latency_ms_p95,
                "host = target arch",
            )
        )
    else:
        checks.append(
            GateCheck(
                "latency_ms_p95",
                round(latency_p95_ms, 3),
                b.latency_ms_p95,
                None,
                f"host is {platform.machine()}, target {profile.arch}: measure on the device with `edge-runtime bench`",
            )
        )
    return GateResult(tuple(checks))
