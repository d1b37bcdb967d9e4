"""Shared fixtures: the digits data and model, signing keys, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


@dataclass(frozen=True)
class Cli:
    """Result of running a console command in a subprocess."""

    code: int
    out: str
    err: str


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: int = 600) -> Cli:
    """Run ``python -m toolchain ARGS`` (or ``runtime.cli`` when args[0] == 'edge-runtime')."""
    module = "toolchain"
    if args and args[0] == "edge-runtime":
        module, args = "runtime.cli", args[1:]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Cli(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="session")
def digits():
    """scikit-learn digits as 0..255 images, split 80/20 (stratified, seed 0)."""
    from toolchain.examples import digits_split

    return digits_split()


@pytest.fixture(scope="session")
def digits_model(digits, tmp_path_factory):
    """The digits CNN trained once per session: (module, state_dict path, torch test accuracy %)."""
    import torch

    from toolchain.examples import train_digits_cnn

    model, acc = train_digits_cnn(digits)
    path = tmp_path_factory.mktemp("digits") / "digits.pt"
    torch.save(model.state_dict(), path)
    return model, path, acc


@pytest.fixture(scope="session")
def digits_dirs(digits, tmp_path_factory):
    """Image folders with class sub-folders: (calibration from train, validation = held-out split)."""
    from toolchain.examples import write_digit_images

    root = tmp_path_factory.mktemp("digits-data")
    calib = write_digit_images(digits.train_images[:200], digits.train_labels[:200], root / "calib")
    val = write_digit_images(digits.test_images, digits.test_labels, root / "val")
    return calib, val


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    """An ed25519 key pair (private path, public path)."""
    from runtime.signing import generate_keypair

    return generate_keypair(tmp_path_factory.mktemp("keys"), "fleet")


@pytest.fixture(scope="session")
def operator(tmp_path_factory):
    """The fleet operator's ed25519 key pair (private path, public path): signs fleet commands."""
    from runtime.signing import generate_keypair

    return generate_keypair(tmp_path_factory.mktemp("operator"), "operator")


@pytest.fixture(scope="session")
def bundle(digits_model, digits_dirs, keys, tmp_path_factory):
    """The digits CNN built for rpi4 (INT8 S8S8) by the toolchain."""
    from runtime.profile import load_profile
    from toolchain.pipeline import BuildRequest, build

    _, weights, _ = digits_model
    calib, val = digits_dirs
    out = tmp_path_factory.mktemp("rt-dist")
    res = build(
        BuildRequest(
            model="toolchain.examples:digits_cnn",
            weights=weights,
            input_shapes=((1, 1, 8, 8),),
            profile=load_profile("rpi4"),
            output_dir=out,
            key=keys[0],
            calibration=str(calib),
            validation=str(val),
            name="digits",
            bench_iterations=0,
        )
    )
    return res.bundle, res.report
