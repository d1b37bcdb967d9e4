"""`toolchain build` on every model input kind, with pruning, and on a real third-party model."""

from __future__ import annotations

import importlib.util
import json
import os
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest

from runtime.profile import load_profile
from toolchain.pipeline import BuildRequest, build


def _build(tmp_path: Path, keys, model: str, profile: str = "rpi4", **kw):
    req = BuildRequest(
        model=model,
        profile=load_profile(profile),
        output_dir=tmp_path / "dist",
        key=keys[0],
        bench_iterations=kw.pop("bench_iterations", 0),
        **kw,
    )
    return build(req)


def _members(bundle: Path) -> list[str]:
    with tarfile.open(bundle) as tar:
        return tar.getnames()


def _digits_onnx(weights: Path, path: Path, **save_kw) -> Path:
    """The digits CNN as an ONNX file written by someone else's tools (here: our export, re-saved)."""
    import onnx

    from toolchain.load import load_model
    from toolchain.passes import export

    model = load_model("toolchain.examples:digits_cnn", weights=weights, input_shapes=[(1, 1, 8, 8)])
    export.run(model, path, opset=17, static_shapes=True, simplify=False, input_shapes=model.input_shapes)
    onnx.save_model(onnx.load(str(path)), str(path), **save_kw)
    return path


def test_onnx_with_external_data_is_folded_into_one_file(tmp_path, keys, digits_model, digits_dirs):
    _, weights, _ = digits_model
    calib, val = digits_dirs
    src = _digits_onnx(
        weights,
        tmp_path / "net.onnx",
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="net.onnx.data",
        size_threshold=0,
    )
    assert (tmp_path / "net.onnx.data").stat().st_size > 100_000
    res = _build(tmp_path, keys, str(src), calibration=str(calib), validation=str(val))
    assert _members(res.bundle) == ["manifest.json", "manifest.sig", "model.onnx"]
    assert res.report["model"]["kind"] == "onnx"
    assert res.report["validation"]["accuracy_drop"] <= 1.0 and res.passed


def test_torchscript_input(tmp_path, keys, digits_model, digits_dirs):
    import torch

    model, _, torch_acc = digits_model
    calib, val = digits_dirs
    path = tmp_path / "digits.torchscript.pt"
    with warnings.catch_warnings():  # users still ship TorchScript; torch 2.13 deprecates making it
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.trace(model.eval(), torch.zeros(1, 1, 8, 8)), str(path))
    res = _build(
        tmp_path,
        keys,
        str(path),
        input_shapes=((1, 1, 8, 8),),
        calibration=str(calib),
        validation=str(val),
    )
    assert res.report["model"]["kind"] == "torchscript"
    assert res.report["validation"]["reference_accuracy"] == pytest.approx(torch_acc, abs=0.3)
    assert res.passed


def test_exported_program_input(tmp_path, keys, digits_model, digits_dirs):
    import torch

    model, _, torch_acc = digits_model
    calib, val = digits_dirs
    path = tmp_path / "digits.pt2"
    torch.export.save(torch.export.export(model.eval(), (torch.zeros(1, 1, 8, 8),)), str(path))
    res = _build(tmp_path, keys, str(path), calibration=str(calib), validation=str(val), profile="x86-64")
    assert res.report["model"]["kind"] == "exported-program"
    assert res.report["validation"]["reference_accuracy"] == pytest.approx(torch_acc, abs=0.3)
    assert res.passed and res.report["precision"] == "int8-u8s8"


def test_onnx_ml_classical_model_is_bundled_without_quantization(tmp_path, keys, digits):
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    x = digits.train_images.reshape(len(digits.train_images), -1).astype(np.float32) / 255.0
    clf = LogisticRegression(max_iter=500).fit(x, digits.train_labels)
    src = tmp_path / "logreg.onnx"
    src.write_bytes(to_onnx(clf, x[:1], options={id(clf): {"zipmap": False}}).SerializeToString())
    xt = digits.test_images.reshape(len(digits.test_images), -1).astype(np.float32) / 255.0
    val = tmp_path / "val.npz"
    np.savez(val, X=xt[:, None, :].reshape(len(xt), 1, 64), labels=digits.test_labels)
    res = _build(tmp_path, keys, str(src), validation=str(val), calibration=str(val))
    assert res.report["model"]["kind"] == "onnx-ml"
    assert res.report["precision"] == "fp32" and res.report["quantize"]["method"] == "none"
    assert res.report["validation"]["agreement"] == 1.0 and res.report["validation"]["max_abs_diff"] == 0.0
    assert any("without quantization" in w for w in res.warnings)
    assert res.passed


@pytest.mark.parametrize(("method", "amount"), [("magnitude", 0.5), ("structured", 0.25)])
def test_pruning_reaches_sparsity_and_reports_its_cost(tmp_path, keys, digits_model, digits_dirs, method, amount):
    _, weights, _ = digits_model
    calib, val = digits_dirs
    res = _build(
        tmp_path,
        keys,
        "toolchain.examples:digits_cnn",
        weights=weights,
        input_shapes=((1, 1, 8, 8),),
        calibration=str(calib),
        validation=str(val),
        prune=method,
        prune_amount=amount,
        enforce_gate=False,
    )
    prune = res.report["prune"]
    if method == "magnitude":
        assert prune["global_sparsity"] == pytest.approx(amount, abs=0.02)
    else:
        assert prune["global_sparsity"] >= amount * 0.8
    assert any(layer["sparsity"] > 0 for layer in prune["layers"])
    cost = prune["cost"]
    # the cost is measured, not assumed: pruned FP32 vs the unpruned reference on the labelled set
    assert cost["labeled"] and cost["samples"] == 360
    assert cost["accuracy_drop"] == pytest.approx(cost["reference_accuracy"] - cost["candidate_accuracy"])
    # the gate compares the final candidate with the *unpruned* reference
    assert res.report["validation"]["reference_accuracy"] == cost["reference_accuracy"]
    drop = res.report["validation"]["accuracy_drop"]
    assert res.passed == (drop <= 1.0)


def _ppocr_model() -> Path:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        if os.environ.get("CI") == "true":
            pytest.fail("rapidocr-onnxruntime is not installed (.ci/bootstrap installs it with --no-deps)")
        pytest.skip("rapidocr-onnxruntime not installed: pip install --no-deps rapidocr-onnxruntime")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "ch_PP-OCRv4_det_infer.onnx"
    assert path.is_file(), path
    return path


CALIBRATION_IMAGES = (
    "camera",
    "brick",
    "chelsea",
    "hubble_deep_field",
    "immunohistochemistry",
    "coins",
    "clock",
    "moon",
    "logo",
    "cat",
    "horse",
)
HELD_OUT_IMAGES = ("text", "page", "astronaut", "coffee", "rocket")


def _skimage_folder(root: Path, names: tuple[str, ...]) -> Path:
    """Real images shipped inside scikit-image, written as PNG files (the preprocessing resizes them)."""
    import cv2
    import skimage.data

    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        img = getattr(skimage.data, name)()
        if img.dtype != np.uint8:
            img = (img * 255).astype(np.uint8) if img.max() <= 1 else img.astype(np.uint8)
        if img.ndim == 2:
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        elif img.shape[2] == 4:
            img = cv2.cvtColor(img, cv2.COLOR_RGBA2BGR)
        else:
            img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(root / f"{name}.png"), img)
    return root


PPOCR_SEARCH_BUDGET = 240.0  # seconds; CI runs the whole suite on 2 cores


def test_ppocr_v4_detector_search_and_mixed_precision(tmp_path, keys):
    """PP-OCRv4 det (opset 12, Constant-node weights, dynamic shapes) for rpi4, IoU@0.3 of the
    probability maps against FP32 on held-out images. Plain INT8 is known to be poor (naive S8S8
    MinMax: mean IoU 0.64, astronaut 0.0, text 0.46). The issue's acceptance: the bounded search
    keeps a model with IoU >= 0.90 on every held-out image at most half the FP32 size, reports
    the host latency ratio, and says which groups got which precision."""
    import time

    from runtime.manifest import Preprocess

    model = _ppocr_model()
    calib = _skimage_folder(tmp_path / "calib", CALIBRATION_IMAGES)
    held_out = _skimage_folder(tmp_path / "val", HELD_OUT_IMAGES)
    started = time.monotonic()
    res = _build(
        tmp_path,
        keys,
        str(model),
        input_shapes=((1, 3, 640, 640),),
        calibration=str(calib),
        validation=str(held_out),
        enforce_gate=False,
        bench_iterations=3,
        metric="dense",
        search_budget=PPOCR_SEARCH_BUDGET,
        preprocess=Preprocess(kind="image", color="bgr", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    )
    wall = time.monotonic() - started
    rep = res.report
    val, search = rep["validation"], rep["search"]
    plain = search["attempts"][0]
    quant = rep["quantize"]
    print(
        f"PP-OCRv4 det rpi4: plain INT8 mean IoU {plain['agreement']} -> kept {val['agreement']:.4f};",
        "per image:",
        {Path(source).stem: iou for source, iou in val["scores"]},
        f"size {rep['size']['ratio']:.3f}x, host latency {rep['benchmark']['latency_ratio']:.2f}x FP32,",
        f"{len(search['attempts'])} attempts, kept '{quant.get('chosen_attempt')}',",
        f"{len(quant['float_groups'])} groups float, {len(quant.get('int16_weight_groups', []))} int16-weight,",
        f"search {search['seconds']:.0f} s, build {wall:.0f} s, gate {'passed' if res.passed else 'FAILED'}",
    )
    for a in search["attempts"]:
        print(
            f"  {a['name']}: IoU {a['agreement']} (worst {a['agreement_min']}), size {a['size_ratio']}x, "
            f"{a['proxy']}, {a['seconds']} s"
        )
    print("  notes:", search["notes"])
    assert rep["model"]["kind"] == "onnx"
    assert rep["export"]["opset"] == 17 and any("12" in n for n in rep["export"]["notes"])
    assert rep["task"] == "dense"
    # the label says what was kept: 16-bit activations are not called plain int8
    bits = quant.get("activation_bits", 8)
    assert rep["precision"] == (
        "int8-s8s8" if bits == 8 else f"int8{'+int16' * bool(quant['int16_weight_groups'])}w-a{bits}"
    )
    assert val["samples"] == 5 and [s for s, _ in val["scores"]] == sorted(
        val["scores"] and [s for s, _ in val["scores"]]
    )
    assert plain["name"] == "profile recipe" and not plain["passed"]
    assert search["seconds"] <= PPOCR_SEARCH_BUDGET + 60
    # the acceptance: IoU >= 0.90 against FP32 on every held-out image, size <= 0.5x FP32
    scores = {Path(source).stem: iou for source, iou in val["scores"]}
    assert set(scores) == set(HELD_OUT_IMAGES)
    assert min(scores.values()) >= 0.90, scores
    assert rep["size"]["ratio"] <= 0.5
    assert search["chosen"] == quant["chosen_attempt"]
    # the report says which groups got which precision
    kept = next(a for a in search["attempts"] if a["name"] == search["chosen"])
    assert kept["int16_weight_groups"] == quant["int16_weight_groups"]
    assert kept["float_groups"] == quant["float_groups"]
    if quant["int16_weight_groups"]:
        measured = {w["group"] for w in search["weight_sensitivity"]}
        assert set(quant["int16_weight_groups"]) <= measured
    assert {"boundaries", "float_nodes"} <= set(kept["proxy"])
    # the host latency ratio is reported, and a model slower than FP32 says so loudly
    ratio = rep["benchmark"]["latency_ratio"]
    assert ratio is not None
    assert (ratio > 1.1) == any("slower than FP32" in w for w in res.warnings)
    agreement = next(c for c in rep["gate"]["checks"] if c["name"] == "agreement")
    assert agreement["passed"] == (val["agreement"] >= agreement["limit"])
    assert res.passed == all(c["passed"] is not False for c in rep["gate"]["checks"])
    with tarfile.open(res.bundle) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())
    assert manifest["inputs"][0]["shape"] == [1, 3, 640, 640]
    assert manifest["validation"]["gate"]["passed"] == res.passed


def test_jetson_profile_builds_fp16(tmp_path, keys, digits_model, digits_dirs):
    """Jetson profiles quantize to FP16 (TensorRT/CUDA listed first; on this GPU-less host the CPU runs it)."""
    _, weights, _ = digits_model
    _, val = digits_dirs
    res = _build(
        tmp_path,
        keys,
        "toolchain.examples:digits_cnn",
        profile="jetson-nano",
        weights=weights,
        input_shapes=((1, 1, 8, 8),),
        validation=str(val),
    )
    assert res.report["precision"] == "fp16" and res.report["quantize"]["method"] == "fp16"
    assert 0.45 <= res.report["size"]["ratio"] <= 0.55
    assert res.report["validation"]["agreement"] >= 0.99 and res.passed
