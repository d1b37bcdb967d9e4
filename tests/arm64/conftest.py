"""Fixtures of the arm64 tests: the prepared qemu-user root (mounted for the session), the skip flag, a report.

``EDGEFLEET_SKIP_ARM64=1`` deselects every test under tests/arm64 on a developer machine (the summary
says so); under ``CI=true`` the flag is ignored and a missing prerequisite fails instead of skipping.
The terminal summary lists each stage's time (built vs cached), what ran on which emulated CPU, the
parity deltas and the footprint — every time and size measured under emulation, none a board's.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.arm64.gate import skip_requested, unavailable
from tests.arm64.harness import PROFILES, SKIP_ENV, Arm64Root, Harness, HarnessError, stage_tests
from tests.tflite_builder import write_fully_connected, write_int8_fully_connected

HERE = Path(__file__).resolve().parent
_REPORT = pytest.StashKey[dict[str, Any]]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_REPORT] = {"sections": {}, "deselected": 0}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mine = [i for i in items if HERE in Path(str(i.path)).resolve().parents]
    for item in mine:
        item.add_marker(pytest.mark.arm64)
    if mine and skip_requested():
        keep = [i for i in items if i not in mine]
        config.hook.pytest_deselected(items=mine)
        items[:] = keep
        config.stash[_REPORT]["deselected"] = len(mine)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    report = config.stash.get(_REPORT, {})
    tr = terminalreporter
    if report.get("deselected"):
        tr.write_sep("=", "arm64 (qemu) tests DESELECTED", yellow=True)
        tr.write_line(f"{report['deselected']} arm64 tests not run: {SKIP_ENV} is set (ignored under CI=true)")
        return
    sections = report.get("sections", {})
    if not sections:
        return
    tr.write_sep("=", "arm64 under qemu (emulated: no number here is a board's performance)")
    for title, lines in sections.items():
        tr.write_line(f"{title}:")
        for line in lines:
            tr.write_line(f"  {line}")


@pytest.fixture(scope="session")
def arm64_report(request: pytest.FixtureRequest) -> dict[str, list[str]]:
    """Sections of the terminal summary: title → lines (tests append to them)."""
    sections: dict[str, list[str]] = request.config.stash[_REPORT]["sections"]
    return sections


@pytest.fixture(scope="session")
def arm64_harness() -> Harness:
    """The harness (cache in $EDGEFLEET_CACHE/arm64)."""
    return Harness()


@pytest.fixture(scope="session")
def arm64_root(arm64_harness: Harness, arm64_report: dict[str, list[str]]) -> Iterator[Arm64Root]:
    """The arm64 root with the device venv of this checkout, mounted for the session, tests staged."""
    try:
        root = arm64_harness.prepare()
    except HarnessError as exc:
        unavailable(str(exc))
    with root.mounted():
        stage_tests(root)
        yield root
    arm64_report.setdefault("stages (this run; built = cold cache, cached = warm)", []).extend(
        st.describe() for st in arm64_harness.stages
    )


@pytest.fixture(scope="session")
def arm64_inputs(digits_model: Any, digits_dirs: Any, keys: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Host-built bundles per profile, the held-out images, the public key and tiny .tflite models."""
    from runtime.profile import load_profile
    from toolchain.pipeline import BuildRequest, build

    _, weights, _ = digits_model
    calib, val = digits_dirs
    out = tmp_path_factory.mktemp("arm64-inputs")
    precisions = {}
    for profile in PROFILES:
        req = BuildRequest(
            model="toolchain.examples:digits_cnn",
            weights=weights,
            input_shapes=((1, 1, 8, 8),),
            profile=load_profile(profile),
            output_dir=out / "build" / profile,
            key=keys[0],
            calibration=str(calib),
            validation=str(val),
            name="digits",
            bench_iterations=0,
        )
        res = build(req)
        (out / profile).mkdir()
        shutil.copy2(res.bundle, out / profile / "bundle.tar")
        precisions[profile] = str(res.report["precision"]).split("-")[0]
    shutil.rmtree(out / "build")
    shutil.copytree(val, out / "val")
    shutil.copy2(keys[1], out / "fleet.pub")
    _tflite_models(out)
    (out / "precision.json").write_text(json.dumps(precisions))
    return out


def _tflite_models(out: Path) -> None:
    rng = np.random.default_rng(7)
    weights = rng.standard_normal((10, 16)).astype(np.float32)
    bias = rng.standard_normal(10).astype(np.float32)
    x = rng.uniform(-2, 2, (64, 16)).astype(np.float32)
    write_fully_connected(out / "fc_float.tflite", weights, bias, softmax=True)
    write_int8_fully_connected(out / "fc_int8.tflite", weights, bias, calibration=x)
    np.savez(out / "litert_in.npz", x=x)
