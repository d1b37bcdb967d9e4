"""The TFLite path end to end: digits CNN → litert-torch → ai-edge-quantizer → LiteRT bundle → `edge-runtime infer`.

Needs the ``tflite-export`` extra (litert-torch, ai-edge-quantizer), which CI installs; under
``CI=true`` its absence fails the run instead of skipping the TFLite path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, run_cli
from tests.tflite_builder import write_custom_op, write_fully_connected

if importlib.util.find_spec("litert_torch") is None or importlib.util.find_spec("ai_edge_quantizer") is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("CI installs edgefleet[tflite-export]; litert-torch / ai-edge-quantizer are missing")
    pytest.skip("the tflite-export extra is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def litert_profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """rpi4 with ``backend = "tflite"``: builds for it default to the TFLite path."""
    text = (REPO / "device_profiles" / "rpi4.toml").read_text()
    assert 'backend = "onnxruntime"' in text
    path = tmp_path_factory.mktemp("profiles") / "rpi4-litert.toml"
    path.write_text(text.replace('name = "rpi4"', 'name = "rpi4-litert"').replace('"onnxruntime"', '"tflite"'))
    return path


def _build(model: str, out: Path, keys, *extra: str):
    res = run_cli("build", model, "--key", str(keys[0]), "-o", str(out), "--json", *extra)
    return res, (json.loads(res.out) if res.code == 0 else None)


@pytest.fixture(scope="module", params=["fp32", "int8"])
def built(request, digits_model, digits_dirs, keys, litert_profile, tmp_path_factory):
    """FP32 with --backend tflite on rpi4 (an ONNX profile); INT8 by default on a profile whose backend is tflite."""
    _, weights, torch_acc = digits_model
    calib, val = digits_dirs
    if request.param == "fp32":
        flags = ["--profile", "rpi4", "--backend", "tflite", "--quantize", "none"]
    else:
        flags = ["--profile", str(litert_profile)]
    res, report = _build(
        "toolchain.examples:digits_cnn",
        tmp_path_factory.mktemp(f"tfl-{request.param}"),
        keys,
        "--weights",
        str(weights),
        "--input-shape",
        "1,1,8,8",
        "--calibration",
        str(calib),
        "--validation",
        str(val),
        "--name",
        "digits",
        "--bench-iterations",
        "10",
        *flags,
    )
    assert res.code == 0, res.err
    return request.param, report, Path(report["bundle"]), torch_acc


def test_tflite_accuracy_within_one_point_of_torch(built):
    kind, report, _, torch_acc = built
    val, export = report["validation"], report["export"]
    assert report["backend"] == "tflite" and report["precision"] == ("fp32" if kind == "fp32" else "int8-s8s8")
    assert export["converter"].startswith("litert-torch ") and export["torch_max_abs_diff"] < 1e-4
    assert val["labeled"] and val["samples"] == 360
    # The FP32 .tflite reference through LiteRT scores what torch scored on the held-out split.
    assert val["reference_accuracy"] == pytest.approx(torch_acc, abs=0.3)
    assert abs(val["candidate_accuracy"] - torch_acc) <= 1.0
    assert report["gate"]["passed"] is True
    assert report["benchmark"]["candidate"]["provider"].startswith("ai-edge-litert")


def test_int8_is_full_integer_per_channel_on_the_calibration_set(built):
    kind, report, bundle, _ = built
    if kind != "int8":
        assert report["quantize"]["method"] == "none" and report["size"]["ratio"] == 1.0
        return
    quant = report["quantize"]
    assert (quant["method"], quant["per_channel"], quant["calibration_method"]) == (
        "static-full-integer",
        True,
        "minmax-ema",
    )
    assert quant["calibration_samples"] == 128  # the profile's count, picked from the 200 as the ONNX path picks them
    assert report["size"]["ratio"] <= 0.30
    assert report["choice"]["reason"] == "profile rpi4-litert uses tflite"
    from runtime.backends.litert import LiteEngine
    from runtime.engine import EngineOptions

    with tarfile.open(bundle) as tar:
        tar.extract("model.tflite", bundle.parent, filter="data")
    engine = LiteEngine(bundle.parent / "model.tflite", EngineOptions())
    # int8 storage at the model's edges too; the engine still takes and gives float
    assert {q.dtype for q in engine.quantized.values()} == {"int8"}
    assert [s.name for s in engine.inputs] == ["input"] and engine.inputs[0].dtype == "float32"


def test_bundle_manifest_names_the_litert_backend(built, keys):
    from runtime.bundle import open_bundle
    from runtime.signing import load_public_key

    _, report, bundle, _ = built
    with open_bundle(bundle, trusted_keys=[load_public_key(keys[1])]) as b:
        m = b.manifest
        assert (m.backend, m.model, b.model_path.name) == ("tflite", "model.tflite", "model.tflite")
        assert m.files[0].sha256 == report["model_sha256"]
        assert m.inputs[0].name == "input" and m.inputs[0].shape == (1, 1, 8, 8)
        assert m.validation["choice"]["backend"] == "tflite"
    verify = run_cli("verify", str(bundle), "--key", str(keys[1]))
    assert verify.code == 0 and "OK: digits 1.0.0" in verify.out


def test_infer_equals_the_toolchain_validation_run(built, keys, digits_dirs):
    from runtime.bundle import open_bundle
    from runtime.engine import EngineOptions
    from runtime.profile import load_profile
    from runtime.signing import load_public_key
    from toolchain.calibration import load_dataset
    from toolchain.validate import run_outputs

    kind, report, bundle, _ = built
    _, val = digits_dirs
    files = sorted(val.rglob("*.png"))
    res = run_cli(
        "edge-runtime", "infer", "--bundle", str(bundle), "--trusted-key", str(keys[1]), "--json", *map(str, files)
    )
    assert res.code == 0, res.err
    lines = [json.loads(line) for line in res.out.splitlines()]
    assert [r["input"] for r in lines] == [str(f) for f in files]
    with open_bundle(bundle, trusted_keys=[load_public_key(keys[1])]) as b:
        ds = load_dataset(val, b.manifest.inputs, b.manifest.preprocess, role="validation")
        opts = EngineOptions.from_profile(load_profile("rpi4"), host_cores=os.cpu_count() or 1)
        expected = run_outputs(b.model_path, [s.feeds for s in ds.samples], opts)
    by_source = {s.source: e for s, e in zip(ds.samples, expected, strict=True)}
    for r in lines:
        got = np.asarray(r["outputs"]["output_0"], dtype=np.float32)
        if kind == "int8":  # integer kernels: the same bytes whatever the thread count
            np.testing.assert_array_equal(got, by_source[r["input"]])
        else:
            np.testing.assert_allclose(got, by_source[r["input"]], rtol=1e-5, atol=1e-5)
    accuracy = 100 * np.mean([int(r["top1"]["label"]) == int(Path(r["input"]).parent.name) for r in lines])
    assert accuracy == pytest.approx(report["validation"]["candidate_accuracy"], abs=1e-9)


def test_backend_both_compares_the_candidates_and_says_which_it_bundles(
    digits_model, digits_dirs, keys, tmp_path, capsys
):
    _, weights, _ = digits_model
    calib, val = digits_dirs
    res, report = _build(
        "toolchain.examples:digits_cnn",
        tmp_path,
        keys,
        *("--weights", str(weights), "--input-shape", "1,1,8,8", "--profile", "rpi4", "--backend", "both"),
        *("--calibration", str(calib), "--validation", str(val), "--quantize", "fp16", "--bench-iterations", "5"),
    )
    assert res.code == 0, res.err
    onnx, tflite = report["candidates"]["onnx"], report["candidates"]["tflite"]
    assert onnx["summary"]["backend"] == "onnxruntime" and tflite["summary"]["backend"] == "tflite"
    assert onnx["summary"]["precision"] == tflite["summary"]["precision"] == "fp16"
    assert tflite["quantize"]["method"] == "fp16-weights" and 0.4 < tflite["size"]["ratio"] < 0.6
    for cand in (onnx, tflite):
        assert cand["summary"]["gate_passed"] is True and cand["summary"]["p50_ms"] > 0
        assert abs(cand["validation"]["accuracy_drop"]) <= 1.0
    # rpi4 prefers ONNX Runtime and its candidate passed, so that is what the bundle carries
    assert report["choice"] == {
        "backend": "onnxruntime",
        "reason": "profile rpi4 prefers onnxruntime and the ONNX candidate passed the gate",
    }
    assert report["backend"] == "onnxruntime" and report["validation"] == onnx["validation"]
    with tarfile.open(report["bundle"]) as tar:
        assert "model.onnx" in tar.getnames() and "model.tflite" not in tar.getnames()
    # the human summary draws the same comparison
    from toolchain.report import print_build

    print_build(report)
    shown = capsys.readouterr().out
    assert "candidates" in shown and "TFLITE" in shown and "bundled: onnxruntime — profile rpi4 prefers" in shown


def test_exported_program_converts_by_position_with_dynamic_int8(keys, tmp_path):
    import torch

    from tests.models import make_cnn

    program = torch.export.export(make_cnn(), (torch.zeros(1, 3, 16, 16),))
    torch.export.save(program, tmp_path / "cnn.pt2")
    res, report = _build(
        str(tmp_path / "cnn.pt2"), tmp_path, keys, "--profile", "rpi4", "--backend", "tflite", "--quantize", "dynamic"
    )
    assert res.code == 0, res.err
    assert report["export"]["torch_max_abs_diff"] < 1e-5 and report["precision"] == "int8-dynamic"
    assert report["quantize"]["method"] == "dynamic" and report["validation_set"]["source"] == "random inputs"
    assert report["validation"]["cosine_mean"] > 0.999 and report["gate"]["passed"] is True


def test_existing_tflite_file_is_validated_benchmarked_bundled_and_run(keys, tmp_path):
    """A .tflite written by another tool (here the flatbuffer writer in tests/): no conversion, no quantization."""
    rng = np.random.default_rng(3)
    weights, bias = rng.normal(size=(3, 6)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    model = write_fully_connected(tmp_path / "vendor_fc.tflite", weights, bias, softmax=True)
    res, report = _build(str(model), tmp_path / "dist", keys, "--profile", "rpi4", "--bench-iterations", "5")
    assert res.code == 0, res.err
    assert report["model"]["kind"] == "tflite" and report["backend"] == "tflite" and report["precision"] == "fp32"
    assert report["quantize"]["method"] == "none" and report["export"]["converter"] == "none (existing .tflite)"
    assert report["validation"]["agreement"] == 1.0 and report["benchmark"]["candidate"]["p50_ms"] > 0
    assert any("profile rpi4 prefers onnxruntime" in w for w in report["warnings"])
    with tarfile.open(report["bundle"]) as tar:
        assert tar.extractfile("model.tflite").read() == model.read_bytes()
    x = rng.normal(size=(1, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = run_cli(
        "edge-runtime",
        "infer",
        "--bundle",
        report["bundle"],
        "--trusted-key",
        str(keys[1]),
        "--json",
        str(tmp_path / "x.npy"),
    )
    assert out.code == 0, out.err
    z = x @ weights.T + bias
    expected = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    np.testing.assert_allclose(json.loads(out.out)["outputs"]["probs"], expected, rtol=1e-5, atol=1e-6)


def test_inputs_the_converter_cannot_take_get_a_clear_error(keys, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "relu.onnx")
    res = run_cli(
        "build", str(tmp_path / "relu.onnx"), "--profile", "rpi4", "--backend", "tflite", "--key", str(keys[0])
    )
    assert res.code == 2 and "Traceback" not in res.err
    assert "relu.onnx is an onnx model, which litert-torch cannot convert to TFLite" in res.err
    assert "'package.module:factory'" in res.err and ".pt2" in res.err and "existing .tflite" in res.err
    assert "--backend onnx" in res.err
    model = write_fully_connected(tmp_path / "fc.tflite", np.ones((2, 3), np.float32), np.zeros(2, np.float32))
    res = run_cli("build", str(model), "--profile", "rpi4", "--backend", "onnx", "--key", str(keys[0]))
    assert res.code == 2 and "already a TFLite model" in res.err and "--backend tflite" in res.err


def test_model_with_an_unsupported_custom_op_is_refused_naming_it(keys, tmp_path):
    model = write_custom_op(tmp_path / "vendor.tflite", "TFLite_Detection_PostProcess_v9")
    res = run_cli("build", str(model), "--profile", "rpi4", "--key", str(keys[0]), "-o", str(tmp_path / "dist"))
    assert res.code == 2 and "Traceback" not in res.err
    assert "custom op 'TFLite_Detection_PostProcess_v9' is not available in ai-edge-litert" in res.err
    assert not (tmp_path / "dist").exists() or not list((tmp_path / "dist").glob("*.tar"))
