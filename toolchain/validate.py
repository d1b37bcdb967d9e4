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
from toolchain.metrics import BUILTIN, DENSE_THRESHOLD, Metric, cosine, infer_task, snr_db

__all__ = ["DENSE_THRESHOLD", "Comparison", "GateCheck", "GateResult", "compare", "infer_task", "judge"]


@dataclass(frozen=True)
class Comparison:
    """How the candidate's outputs compare with the reference's on the validation samples."""

    task: str
    samples: int
    labeled: bool
    reference_accuracy: float | None  # top-1 %, when labels are known
    candidate_accuracy: float | None
    accuracy_drop: float | None  # percentage points
    agreement: float  # mean of the metric's per-sample scores (see toolchain.metrics)
    agreement_min: float  # worst single sample
    cosine_mean: float
    cosine_min: float
    max_abs_diff: float
    worst_samples: tuple[tuple[str, float], ...] = ()  # (source, score) of the lowest-agreeing samples
    metric: str = ""  # the metric's name: a task, or the user's module:function
    snr_db_mean: float = 0.0
    scores: tuple[tuple[str, float], ...] = ()  # (source, score) of every sample, in order


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
    metric: Metric | None = None,
) -> Comparison:
    """Metrics of ``candidate`` against ``reference`` (and labels when every sample has one).

    ``metric`` scores each sample (default: the built-in metric of ``task``).
    """
    n = len(reference)
    metric = metric or BUILTIN.get(task, BUILTIN["generic"])
    pairs = list(zip(reference, candidate, strict=True))
    cos = [cosine(r, c) for r, c in pairs]
    diff = max((float(np.max(np.abs(r.astype(np.float64) - c.astype(np.float64)))) for r, c in pairs), default=0.0)
    scores = [metric.score(r, c) for r, c in pairs]
    labeled = n > 0 and all(lab is not None for lab in labels)
    ref_acc = cand_acc = drop = None
    if metric.task == "classification" and labeled:
        rtop = [int(np.argmax(r.reshape(-1))) for r in reference]
        ctop = [int(np.argmax(c.reshape(-1))) for c in candidate]
        ref_acc = 100.0 * float(np.mean([a == lab for a, lab in zip(rtop, labels, strict=False)]))
        cand_acc = 100.0 * float(np.mean([b == lab for b, lab in zip(ctop, labels, strict=False)]))
        drop = ref_acc - cand_acc
    ranked = scores if metric.task not in ("classification", "generic") else cos
    worst = sorted(zip(sources, ranked, strict=False), key=lambda t: t[1])[:5]
    return Comparison(
        task=metric.task,
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
        metric=metric.name,
        snr_db_mean=float(np.mean([snr_db(r, c) for r, c in pairs])) if n else 0.0,
        scores=tuple((s, round(v, 4)) for s, v in zip(sources, scores, strict=False)),
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
        if cmp.task != "generic":
            described = BUILTIN[cmp.task].description if cmp.task in BUILTIN else f"mean of {cmp.metric}"
            checks.append(
                GateCheck(
                    "agreement",
                    round(cmp.agreement, 4),
                    b.min_agreement,
                    cmp.agreement >= b.min_agreement,
                    described,
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
