"""`--train`: quantization-aware fine-tuning with distillation rescues a PyTorch model plain PTQ breaks."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.profile import load_profile
from tests.conftest import REPO
from toolchain.pipeline import BuildRequest, build

WIDEN = 600.0


def train_loader() -> list[tuple[object, object]]:
    """The `--train` function: digits training batches (inputs, labels) of 64."""
    import torch

    from toolchain.examples import digits_split

    split = digits_split()
    x = torch.from_numpy(split.train_images.astype(np.float32)[:, None] / 255.0)
    y = torch.from_numpy(split.train_labels)
    return [(x[i : i + 64], y[i : i + 64]) for i in range(0, len(x), 64)]


@pytest.fixture(scope="module")
def widened(digits_model, tmp_path_factory):
    """The digits CNN with conv2's channel 0 scaled x600 and conv3 compensating (same FP32 function).

    ReLU and max-pooling commute with a positive scale, so FP32 outputs do not change, but the
    per-tensor INT8 range of conv3's input is then spent on one channel and PTQ collapses.
    """
    import copy

    import torch

    model, _, _ = digits_model
    wide = copy.deepcopy(model)
    with torch.no_grad():
        wide[2].weight[0] *= WIDEN
        wide[2].bias[0] *= WIDEN
        wide[5].weight[:, 0] /= WIDEN
    path = tmp_path_factory.mktemp("wide") / "wide.pt"
    torch.save(wide.state_dict(), path)
    return path


def test_qat_with_distillation_passes_where_ptq_fails(tmp_path, keys, digits_dirs, widened):
    calib, val = digits_dirs
    # rpi4 budgets, with the top-1 agreement floor at 0.90 (accuracy drop stays at 1 point)
    text = (REPO / "device_profiles" / "rpi4.toml").read_text().replace("min_agreement = 0.97", "min_agreement = 0.90")
    (tmp_path / "rpi4-qat.toml").write_text(text.replace('name = "rpi4"', 'name = "rpi4-qat"'))
    res = build(
        BuildRequest(
            model="toolchain.examples:digits_cnn",
            weights=widened,
            input_shapes=((1, 1, 8, 8),),
            profile=load_profile(tmp_path / "rpi4-qat.toml"),
            output_dir=tmp_path / "dist",
            key=keys[0],
            calibration=str(calib),
            validation=str(val),
            bench_iterations=0,
            search=False,
            train="tests.integration.test_qat:train_loader",
            enforce_gate=False,
        )
    )
    qat = res.report["qat"]
    ptq = qat["ptq_validation"]
    assert ptq["accuracy_drop"] > 20 and ptq["agreement"] < 0.5  # plain PTQ collapses
    assert qat["ran"] and qat.get("kept") and qat["labeled"] and qat["last_loss"] < qat["first_loss"]
    final = res.report["validation"]
    assert final == qat["validation"]
    assert final["accuracy_drop"] <= 1.0 and final["agreement"] >= 0.90
    assert res.passed and res.report["size"]["ratio"] <= 0.3
    print(
        "QAT:",
        {k: ptq[k] for k in ("accuracy_drop", "agreement")},
        "->",
        {k: final[k] for k in ("accuracy_drop", "agreement")},
    )


def test_train_needs_a_pytorch_input(tmp_path, keys):
    from tests.integration.test_search import _fragile
    from toolchain.errors import UsageError

    model = _fragile(tmp_path / "f.onnx")
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).normal(size=(8, 1, 64)).astype(np.float32))
    with pytest.raises(UsageError, match=r"--train: .*PyTorch"):
        build(
            BuildRequest(
                model=str(model),
                profile=load_profile("rpi4"),
                output_dir=tmp_path / "dist",
                key=keys[0],
                calibration=str(tmp_path / "c.npz"),
                bench_iterations=0,
                train="tests.integration.test_qat:train_loader",
            )
        )
