"""`toolchain demo`: the main job end to end, offline, on the embedded digits example."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from runtime.profile import load_profile
from toolchain.examples import digits_split, train_digits_cnn, write_digit_images

__all__ = ["run_demo"]


def run_demo(out: Path, *, profile: str = "rpi4", json_out: bool = False, quiet: bool = False) -> int:
    """Train the digits CNN, write real image folders, build a signed bundle for ``profile``, show the report."""
    import torch

    from runtime.signing import generate_keypair
    from toolchain import report
    from toolchain.pipeline import BuildRequest, build
    from toolchain.progress import NullProgress, RichProgress

    progress = NullProgress() if quiet or json_out else RichProgress()
    prof = load_profile(profile)
    out.mkdir(parents=True, exist_ok=True)
    progress.step("training a CNN on scikit-learn's handwritten digits (1,437 train / 360 held-out)")
    split = digits_split()
    model, acc = train_digits_cnn(split)
    weights = out / "digits.pt"
    torch.save(model.state_dict(), weights)
    calib = write_digit_images(split.train_images[:200], split.train_labels[:200], out / "data" / "calib")
    val = write_digit_images(split.test_images, split.test_labels, out / "data" / "val")
    key = out / "keys" / "fleet.key"
    if not key.is_file():
        generate_keypair(key.parent, "fleet")
    req = BuildRequest(
        model="toolchain.examples:digits_cnn",
        weights=weights,
        input_shapes=((1, 1, 8, 8),),
        profile=prof,
        output_dir=out / "dist",
        key=key,
        calibration=str(calib),
        validation=str(val),
        name="digits",
    )
    result = build(req, progress)
    result.report["demo"] = {
        "torch_test_accuracy": acc,
        "weights": str(weights),
        "public_key": str(key.with_suffix(".pub")),
    }
    if json_out:
        json.dump(result.report, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        report.print_build(result.report)
        print(f"report: {result.report_path}")
        print(f"verify: toolchain verify {result.bundle} --key {key.with_suffix('.pub')}")
    return 0
