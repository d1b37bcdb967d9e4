"""Parity: bundles built on the host give the same outputs on emulated Raspberry Pi and Jetson CPUs.

The digits CNN is built by the toolchain for rpi4, rpi5, generic-arm64 (INT8 QDQ, S8S8) and
jetson-nano (FP16; here its CPU path, no GPU). Every held-out image goes through verify → OpenCV
preprocessing → ONNX Runtime on the host and, with the device venv, under cortex-a72, cortex-a76
and cortex-a57 — one intra-op thread everywhere, so any difference comes from the kernels ONNX
Runtime picks for the CPU. Tolerances, relative to the largest host output of the bundle:

- INT8: 1e-3 (well under one int8 step of the output range) and top-1 identical;
- FP16: 1e-2 and top-1 identical on at least 99% of images — Cortex-A76 has FP16 arithmetic
  (ARMv8.2), and ONNX Runtime then computes in half precision instead of widening to FP32;
- LiteRT (tiny .tflite models from tests/tflite_builder.py): float 1e-5; int8 one quantization step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.arm64.harness import BOARD_CPUS, CPUS, DEVICE_VENV, PROFILES, REPO, TESTS_DIR, Arm64Root, Harness

ORT_TOL = {"int8": (1e-3, 1.0), "fp16": (1e-2, 0.99), "fp32": (1e-4, 1.0)}  # (relative max |Δ|, top-1 agreement)
WORK = "/tmp/parity"


def _probe_args(top: str) -> list[list[str]]:
    bundles = [f"{top}/{p}/bundle.tar" for p in PROFILES]
    models = [f"{top}/fc_float.tflite", f"{top}/fc_int8.tflite"]
    return [
        ["bundles", f"{top}/fleet.pub", f"{top}/ort-OUT.npz", f"{top}/val", *bundles],
        ["litert", f"{top}/litert-OUT.npz", f"{top}/litert_in.npz", *models],
    ]


@pytest.fixture(scope="module")
def host_outputs(arm64_inputs: Path) -> Path:
    """The probes run on the host (x86-64, the host's onnxruntime and ai-edge-litert)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for args in _probe_args(str(arm64_inputs)):
        args = [a.replace("OUT", "host") for a in args]
        proc = subprocess.run(
            [sys.executable, str(REPO / "tests/arm64/probe.py"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    return arm64_inputs


@pytest.fixture(scope="module")
def staged(arm64_root: Arm64Root, host_outputs: Path) -> str:
    target = arm64_root.host(WORK)
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(host_outputs, target)
    return WORK


def _compare(host: np.ndarray, arm: np.ndarray, rel: float) -> tuple[float, float, float]:
    """(relative max |Δ|, allowed, top-1 agreement)."""
    assert host.shape == arm.shape
    scale = float(np.abs(host).max()) or 1.0
    delta = float(np.abs(host - arm).max()) / scale
    return delta, rel, float((host.argmax(1) == arm.argmax(1)).mean())


@pytest.mark.parametrize("cpu", CPUS)
def test_ort_bundles_match_the_host(
    arm64_root: Arm64Root, arm64_harness: Harness, staged: str, cpu: str, arm64_report: dict[str, list[str]]
) -> None:
    args = [a.replace("OUT", cpu) for a in _probe_args(staged)[0]]
    with arm64_harness.stage(f"parity probe (ONNX Runtime, 4 bundles) on {cpu}", build=False):
        proc = arm64_root.run([f"{DEVICE_VENV}/bin/python", f"{TESTS_DIR}/probe.py", *args], cpu=cpu, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(json.loads(proc.stdout)["providers"].values()) == {"CPUExecutionProvider"}
    precision = json.loads(arm64_root.host(f"{staged}/precision.json").read_text())
    host, arm = np.load(arm64_root.host(f"{staged}/ort-host.npz")), np.load(arm64_root.host(f"{staged}/ort-{cpu}.npz"))
    lines = arm64_report.setdefault("parity vs host, ONNX Runtime (relative max |Δ|, top-1 agreement)", [])
    failures = []
    for profile in PROFILES:
        rel, min_agree = ORT_TOL[precision[profile]]
        delta, allowed, agree = _compare(host[profile], arm[profile], rel)
        board = " (its board)" if BOARD_CPUS.get(profile) == cpu else ""
        lines.append(
            f"{profile} {precision[profile]} on {cpu}{board}: {delta:.2e} (≤ {allowed:.0e}), top-1 {agree:.1%}"
        )
        if delta > allowed or agree < min_agree:
            failures.append(f"{profile}: relative |Δ| {delta:.3g} > {allowed:g} or top-1 {agree:.3f} < {min_agree}")
    assert not failures, failures


@pytest.mark.parametrize("cpu", CPUS)
def test_litert_models_match_the_host(
    arm64_root: Arm64Root, staged: str, cpu: str, arm64_report: dict[str, list[str]]
) -> None:
    args = [a.replace("OUT", cpu) for a in _probe_args(staged)[1]]
    proc = arm64_root.run([f"{DEVICE_VENV}/bin/python", f"{TESTS_DIR}/probe.py", *args], cpu=cpu, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    host, arm = (
        np.load(arm64_root.host(f"{staged}/litert-host.npz")),
        np.load(arm64_root.host(f"{staged}/litert-{cpu}.npz")),
    )
    f_delta = float(np.abs(host["fc_float"] - arm["fc_float"]).max())
    q_host, q_arm = host["fc_int8"], arm["fc_int8"]
    step = float(q_host.max() - q_host.min()) / 255.0  # the output quantization step (range / 255)
    q_delta = float(np.abs(q_host - q_arm).max())
    arm64_report.setdefault("parity vs host, LiteRT (max |Δ|)", []).append(
        f"{cpu}: float {f_delta:.2e} (≤ 1e-05); int8 {q_delta:.2e} (≤ one step {step:.2e})"
    )
    assert f_delta <= 1e-5 and q_delta <= step + 1e-6, (f_delta, q_delta, step)
