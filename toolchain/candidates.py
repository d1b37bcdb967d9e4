"""A build's candidates, one per backend: which backends a build makes, their comparison, and the one bundled."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.profile import DeviceProfile
from toolchain.errors import UsageError

__all__ = ["BACKENDS", "FLAG", "MODEL_FILE", "Candidate", "backends", "choose", "export_section", "merge"]

BACKENDS = {"onnx": "onnxruntime", "tflite": "tflite"}  # --backend value -> manifest backend
FLAG = {v: k for k, v in BACKENDS.items()}  # manifest backend -> --backend value
MODEL_FILE = {"onnxruntime": "model.onnx", "tflite": "model.tflite"}


@dataclass
class Candidate:
    """One backend's candidate: the files, its report sections and the gate's verdict."""

    backend: str  # onnxruntime | tflite
    reference: Path
    path: Path
    precision: str
    cmp: Any  # validate.Comparison
    ref_out: list[np.ndarray]
    val: Any  # calibration.Dataset | None
    gate: Any  # validate.GateResult
    sections: dict[str, Any]  # export, quantize, validation_set, validation, benchmark, size, gate, prune_cost

    def summary(self) -> dict[str, Any]:
        """The row of the report's ``candidates`` comparison."""
        bench = (self.sections.get("benchmark") or {}).get("candidate") or {}
        return {
            "backend": self.backend,
            "precision": self.precision,
            "size_bytes": self.sections["size"]["candidate_bytes"],
            "reference_accuracy": self.cmp.reference_accuracy,
            "candidate_accuracy": self.cmp.candidate_accuracy,
            "agreement": self.cmp.agreement,
            "p50_ms": bench.get("p50_ms"),
            "p95_ms": bench.get("p95_ms"),
            "gate_passed": self.gate.passed,
            "gate_failures": [c.name for c in self.gate.failures()],
        }


def export_section(exported: Any) -> dict[str, Any]:
    """The report's ``export`` section for an ONNX export or a TFLite export."""
    if exported.path.suffix == ".tflite":
        return {
            "format": "tflite",
            "converter": exported.converter,
            "torch_max_abs_diff": exported.torch_max_abs_diff,
            "notes": list(exported.notes),
        }
    return {"opset": exported.opset, "simplified": exported.simplified, "notes": list(exported.notes)}


def backends(flag: str | None, profile: DeviceProfile, kind: str, source: str) -> tuple[str, ...]:
    """The backends to build for ``--backend flag`` (None = the profile's), checked against the model kind."""
    from toolchain.passes.tflite_export import CONVERTIBLE, TFLITE_INPUTS_HELP

    wanted_flag = flag or FLAG[profile.backend]
    if wanted_flag not in (*BACKENDS, "both"):
        raise UsageError(f"expected onnx, tflite or both, got {wanted_flag!r}", flag="--backend")
    if kind == "tflite":
        if flag in ("onnx", "both"):
            raise UsageError(
                f"{source} is already a TFLite model: it is bundled as it is with --backend tflite "
                "(converting .tflite to ONNX is not supported)",
                flag="--backend",
            )
        return ("tflite",)
    wanted = ("onnxruntime", "tflite") if wanted_flag == "both" else (BACKENDS[wanted_flag],)
    if "tflite" in wanted and kind not in CONVERTIBLE:
        default = "" if flag else f" (the default of profile {profile.name})"
        raise UsageError(
            f"{source} is {'an' if kind[0] in 'aeio' else 'a'} {kind} model, which litert-torch cannot convert "
            f"to TFLite{default}; TFLite builds take {TFLITE_INPUTS_HELP}. Build this model with --backend onnx",
            flag="--backend",
        )
    return wanted


def choose(
    cands: list[Candidate], profile: DeviceProfile, *, flag: str | None, kind: str, enforce_gate: bool
) -> tuple[Candidate, str]:
    """The candidate the bundle carries, and why: the profile's backend if it passes, else one that does."""
    if len(cands) == 1:
        if kind == "tflite":
            return cands[0], "an existing .tflite file runs on LiteRT only"
        if flag:
            return cands[0], f"--backend {flag}"
        return cands[0], f"profile {profile.name} uses {profile.backend}"
    preferred = next((c for c in cands if c.backend == profile.backend), cands[0])
    other = next(c for c in cands if c is not preferred)
    pref, oth = FLAG[preferred.backend].upper(), FLAG[other.backend].upper()
    if preferred.gate.passed:
        return preferred, f"profile {profile.name} prefers {preferred.backend} and the {pref} candidate passed the gate"
    failed = ", ".join(c.name for c in preferred.gate.failures())
    if other.gate.passed:
        return other, f"the {pref} candidate failed the gate ({failed}); the {oth} candidate passed it"
    why = f"both candidates failed the gate; {pref} is profile {profile.name}'s preferred backend"
    return preferred, why + ("" if enforce_gate else " (packed because of --allow-gate-failure)")


def merge(report: dict[str, Any], cands: list[Candidate], chosen: Candidate, reason: str) -> None:
    """Put the chosen candidate's sections at the top of ``report``; compare candidates when there are two."""
    sections = dict(chosen.sections)
    cost = sections.pop("prune_cost", None)
    if cost is not None and report.get("prune"):
        report["prune"]["cost"] = cost
    report.update(sections)
    report["backend"] = chosen.backend
    report["choice"] = {"backend": chosen.backend, "reason": reason}
    if len(cands) > 1:
        report["candidates"] = {
            FLAG[c.backend]: {"summary": c.summary(), **{k: v for k, v in c.sections.items() if k != "prune_cost"}}
            for c in cands
        }
