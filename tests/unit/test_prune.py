"""The prune pass: measured sparsity, permanence, and that the pruned model runs and exports."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tests.models import make_cnn, make_mlp
from toolchain.errors import PassError
from toolchain.load import load_model
from toolchain.passes import export, prune

CNN_SHAPE = (1, 3, 32, 32)
PRUNABLE = [
    "features.0",
    "features.3",
    "features.5",
    "hidden",
]  # every Conv/Linear but the classifier


def _export_and_compare(module: torch.nn.Module, tmp_path: Path) -> None:
    model = load_model("tests.models:make_cnn", input_shapes=[CNN_SHAPE])
    model.module = module
    result = export.run(model, tmp_path / "pruned.onnx", opset=17, static_shapes=True, simplify=True)
    x = np.random.default_rng(0).standard_normal(CNN_SHAPE).astype(np.float32)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session.run(None, {"image": x})[0], expected, rtol=1e-4, atol=1e-5)


def _is_plain(module: torch.nn.Module) -> bool:
    """No pruning re-parametrisation left: plain weights, no hooks."""
    keys = module.state_dict().keys()
    return not any(k.endswith(("_orig", "_mask")) for k in keys) and not any(
        m._forward_pre_hooks for m in module.modules()
    )


def test_magnitude_reaches_the_global_amount(tmp_path: Path) -> None:
    module = make_cnn()
    classifier_before = module.classifier.weight.detach().clone()

    report = prune.run(module, method="magnitude", amount=0.5)

    assert report.method == "magnitude" and report.amount == 0.5
    assert abs(report.global_sparsity - 0.5) <= 0.02
    assert [layer.name for layer in report.layers] == PRUNABLE
    for layer in report.layers:
        weight = module.get_submodule(layer.name).weight
        assert layer.params == weight.numel()
        assert layer.zeros == int((weight == 0).sum()) > 0
        assert layer.sparsity == pytest.approx(layer.zeros / layer.params)
    zeros = sum(layer.zeros for layer in report.layers)
    assert report.global_sparsity == pytest.approx(zeros / sum(layer.params for layer in report.layers))
    assert torch.equal(module.classifier.weight, classifier_before)  # the classifier stays dense
    assert _is_plain(module)
    _export_and_compare(module, tmp_path)


def test_structured_zeroes_a_quarter_of_output_channels(tmp_path: Path) -> None:
    module = make_cnn()

    report = prune.run(module, method="structured", amount=0.25)

    assert [layer.name for layer in report.layers] == PRUNABLE
    total = dead = 0
    for layer in report.layers:
        weight = module.get_submodule(layer.name).weight
        rows = weight.reshape(weight.shape[0], -1)
        all_zero = int((rows == 0).all(dim=1).sum())
        assert layer.channels_pruned == all_zero == round(0.25 * weight.shape[0])
        assert layer.sparsity == pytest.approx(all_zero / weight.shape[0])
        total += weight.shape[0]
        dead += all_zero
    assert dead / total == pytest.approx(0.25, abs=0.02)
    assert module.features[0].weight.shape == (8, 3, 3, 3)  # zeroed, not removed
    assert _is_plain(module)
    _export_and_compare(module, tmp_path)


def test_pruned_model_output_changes_but_stays_finite() -> None:
    module, reference = make_mlp(), make_mlp()
    prune.run(module, method="magnitude", amount=0.3)
    x = torch.randn(4, 16)
    with torch.no_grad():
        out, ref = module(x), reference(x)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, ref)


@pytest.mark.parametrize("amount", [0.0, 1.0, -0.1, 1.5])
def test_amount_out_of_range(amount: float) -> None:
    with pytest.raises(PassError, match="amount"):
        prune.run(make_mlp(), method="magnitude", amount=amount)


def test_unknown_method() -> None:
    with pytest.raises(PassError, match="unknown method"):
        prune.run(make_mlp(), method="random", amount=0.5)  # type: ignore[arg-type]


def test_single_layer_model_has_nothing_to_prune() -> None:
    with pytest.raises(PassError, match="nothing to prune"):
        prune.run(torch.nn.Linear(4, 2), method="magnitude", amount=0.5)


def test_torchscript_is_refused() -> None:
    with warnings.catch_warnings():
        # Making the fixture needs torch.jit, which torch 2.13 deprecates.
        warnings.filterwarnings("ignore", r".*torch\.jit.* is deprecated", DeprecationWarning)
        scripted = torch.jit.trace(make_mlp(), torch.zeros(1, 16))
    with pytest.raises(PassError, match=r"nn\.Module"):
        prune.run(scripted, method="magnitude", amount=0.5)
