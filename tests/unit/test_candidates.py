"""Which candidate a `--backend both` build bundles, and why; which backends an input can take."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.profile import load_profile
from toolchain.candidates import Candidate, backends, choose, merge
from toolchain.errors import UsageError
from toolchain.validate import GateCheck, GateResult, compare


def _candidate(backend: str, passed: bool) -> Candidate:
    import numpy as np

    out = [np.eye(3, dtype=np.float32)[i : i + 1] for i in range(3)]
    gate = GateResult((GateCheck("agreement", 1.0 if passed else 0.5, 0.97, passed),))
    cmp = compare(out, out, task="classification", labels=[0, 1, 2], sources=["a", "b", "c"])
    sections = {"size": {"candidate_bytes": 10}, "gate": gate.to_dict(), "validation": {"backend": backend}}
    return Candidate(backend, Path("ref"), Path("cand"), "fp32", cmp, out, None, gate, sections)


RPI4 = load_profile("rpi4")  # prefers onnxruntime


@pytest.mark.parametrize(
    ("onnx_ok", "tflite_ok", "enforce", "bundled", "reason"),
    [
        (True, True, True, "onnxruntime", "profile rpi4 prefers onnxruntime and the ONNX candidate passed the gate"),
        (False, True, True, "tflite", "the ONNX candidate failed the gate (agreement); the TFLITE candidate passed it"),
        (True, False, True, "onnxruntime", "profile rpi4 prefers onnxruntime and the ONNX candidate passed the gate"),
        (
            False,
            False,
            True,
            "onnxruntime",
            "both candidates failed the gate; ONNX is profile rpi4's preferred backend",
        ),
        (False, False, False, "onnxruntime", "preferred backend (packed because of --allow-gate-failure)"),
    ],
)
def test_choice_prefers_the_profile_backend_when_it_passes(onnx_ok, tflite_ok, enforce, bundled, reason) -> None:
    cands = [_candidate("onnxruntime", onnx_ok), _candidate("tflite", tflite_ok)]
    chosen, why = choose(cands, RPI4, flag="both", kind="torch", enforce_gate=enforce)
    assert chosen.backend == bundled and why.endswith(reason)
    report: dict = {"prune": None}
    merge(report, cands, chosen, why)
    assert report["choice"] == {"backend": bundled, "reason": why}
    assert report["validation"] == {"backend": bundled}
    assert set(report["candidates"]) == {"onnx", "tflite"}
    assert report["candidates"]["tflite"]["summary"]["gate_passed"] is tflite_ok


def test_single_backend_reasons() -> None:
    one = [_candidate("tflite", True)]
    assert choose(one, RPI4, flag="tflite", kind="torch", enforce_gate=True)[1] == "--backend tflite"
    assert choose(one, RPI4, flag=None, kind="tflite", enforce_gate=True)[1].startswith("an existing .tflite")


def test_backends_per_input_kind() -> None:
    assert backends(None, RPI4, "torch", "m") == ("onnxruntime",)
    assert backends("both", RPI4, "exported-program", "m") == ("onnxruntime", "tflite")
    assert backends(None, RPI4, "tflite", "m.tflite") == ("tflite",)
    with pytest.raises(UsageError, match=r"--backend: m\.pt is a torchscript model, which litert-torch cannot"):
        backends("tflite", RPI4, "torchscript", "m.pt")
    with pytest.raises(UsageError, match=r"already a TFLite model"):
        backends("both", RPI4, "tflite", "m.tflite")
