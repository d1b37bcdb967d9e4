"""Model inputs and the export pass, end to end: load → export → run with onnxruntime → compare."""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from tests.models import make_cnn, make_two_input
from toolchain.errors import ModelLoadError, UsageError
from toolchain.load import load_model, parse_shape
from toolchain.passes import export

CNN = "tests.models:make_cnn"
CNN_SHAPE = (1, 3, 32, 32)


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _torch_out(module: torch.nn.Module, *args: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*(torch.from_numpy(a) for a in args))
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def _image(shape: tuple[int, ...] = CNN_SHAPE, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _tiny_onnx(path: Path, *, opset: int = 12, dims: tuple[int | str, ...] = ("N", 3, 8, 8)) -> Path:
    """Conv → Relu → GlobalAveragePool → Flatten → Gemm, opset ``opset``, input ``x``."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
        numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "fc"),
        numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "fcb"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"], transB=1),
    ]
    batch = dims[0]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return path


def _export(model, out: Path, **kw):
    kw.setdefault("opset", 17)
    kw.setdefault("static_shapes", True)
    kw.setdefault("simplify", True)
    return export.run(model, out, **kw)


# --- kinds, end to end -------------------------------------------------------------------------


def test_onnx_file_upgrades_opset_and_fixes_batch(tmp_path: Path) -> None:
    src = _tiny_onnx(tmp_path / "tiny.onnx", opset=12)
    model = load_model(str(src))
    assert (model.kind, model.name, model.onnx_path) == ("onnx", "tiny", src)
    assert model.input_shapes is None  # the batch is dynamic

    result = _export(model, tmp_path / "out" / "tiny.onnx")

    assert result.opset == 17
    assert onnx.load(str(result.path)).opset_import[0].version == 17
    assert "upgraded opset 12->17" in result.notes
    assert "fixed input x to 1x3x8x8" in result.notes
    assert [(s.name, s.dtype, s.shape) for s in result.inputs] == [("x", "float32", (1, 3, 8, 8))]
    assert [(s.name, s.shape) for s in result.outputs] == [("logits", (1, 5))]
    x = _image((1, 3, 8, 8))
    np.testing.assert_allclose(_run(result.path, {"x": x})[0], _run(src, {"x": x})[0], rtol=1e-5, atol=1e-6)


def test_onnx_with_external_data_is_folded_into_one_file(tmp_path: Path) -> None:
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    proto = onnx.load(str(_tiny_onnx(tmp_path / "plain.onnx", opset=17, dims=(1, 3, 8, 8))))
    helper.set_model_props(proto, {"labels": "a,b,c,d,e"})
    proto.doc_string = "five classes"
    onnx.save_model(
        proto,
        str(src_dir / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    assert (src_dir / "model.onnx.data").stat().st_size > 0

    model = load_model(str(src_dir / "model.onnx"))
    assert model.input_shapes == {"x": (1, 3, 8, 8)}
    out_dir = tmp_path / "out"
    result = _export(model, out_dir / "model.onnx")

    assert "folded external data (model.onnx.data)" in result.notes
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.onnx"]
    final = onnx.load(str(result.path), load_external_data=False)
    assert all(t.data_location == TensorProto.DEFAULT for t in final.graph.initializer)
    assert [(p.key, p.value) for p in final.metadata_props] == [("labels", "a,b,c,d,e")]
    assert final.doc_string == "five classes"
    x = _image((1, 3, 8, 8))
    np.testing.assert_allclose(
        _run(result.path, {"x": x})[0],
        _run(tmp_path / "plain.onnx", {"x": x})[0],
        rtol=1e-5,
        atol=1e-6,
    )


def test_torch_factory_with_state_dict(tmp_path: Path) -> None:
    trained = make_cnn()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch.save({"model_state_dict": trained.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")

    model = load_model(CNN, weights=tmp_path / "ckpt.pt", input_shapes=[CNN_SHAPE])

    assert (model.kind, model.name, model.input_shapes) == (
        "torch",
        "make_cnn",
        {"image": CNN_SHAPE},
    )
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(model.module.state_dict()[key], value)
    result = _export(model, tmp_path / "cnn.onnx")
    assert result.opset == 17
    assert [(s.name, s.shape) for s in result.inputs] == [("image", CNN_SHAPE)]
    assert [(s.name, s.shape) for s in result.outputs] == [("output", (1, 10))]
    x = _image()
    np.testing.assert_allclose(_run(result.path, {"image": x})[0], _torch_out(trained, x)[0], rtol=1e-4, atol=1e-5)


def test_plain_state_dict_is_accepted(tmp_path: Path) -> None:
    source = make_cnn()
    with torch.no_grad():
        source.classifier.bias.fill_(0.5)
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    model = load_model(CNN, weights=tmp_path / "plain.pt")
    assert torch.all(model.module.classifier.bias == 0.5)


def test_two_inputs_keep_argument_names(tmp_path: Path) -> None:
    model = load_model("tests.models:make_two_input", input_shapes=[(1, 8), (1, 4)])
    result = _export(model, tmp_path / "two.onnx")
    assert [s.name for s in result.inputs] == ["left", "right"]
    assert [s.name for s in result.outputs] == ["output_0", "output_1"]
    left, right = _image((1, 8)), _image((1, 4), seed=2)
    got = _run(result.path, {"left": left, "right": right})
    for a, b in zip(got, _torch_out(make_two_input(), left, right), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_torchscript_file(tmp_path: Path) -> None:
    module = make_cnn()
    with warnings.catch_warnings():
        # Making the fixture needs torch.jit, which torch 2.13 deprecates.
        warnings.filterwarnings("ignore", r".*torch\.jit.* is deprecated", DeprecationWarning)
        torch.jit.save(torch.jit.trace(module, torch.zeros(CNN_SHAPE)), str(tmp_path / "cnn.torchscript"))

    with pytest.raises(UsageError, match=r"--input-shape.*image"):
        _export(load_model(str(tmp_path / "cnn.torchscript")), tmp_path / "nope.onnx")
    model = load_model(str(tmp_path / "cnn.torchscript"), input_shapes=[CNN_SHAPE])
    assert (model.kind, model.name) == ("torchscript", "cnn")
    result = _export(model, tmp_path / "ts.onnx")

    assert any("TorchScript" in note for note in result.notes)
    assert [s.name for s in result.inputs] == ["image"]
    x = _image()
    np.testing.assert_allclose(_run(result.path, {"image": x})[0], _torch_out(module, x)[0], rtol=1e-4, atol=1e-5)


def test_exported_program_file_takes_shapes_from_example_inputs(tmp_path: Path) -> None:
    module = make_cnn()
    program = torch.export.export(module, (torch.zeros(CNN_SHAPE),))
    torch.export.save(program, str(tmp_path / "cnn.pt2"))

    model = load_model(str(tmp_path / "cnn.pt2"))
    assert (model.kind, model.input_shapes) == ("exported-program", {"image": CNN_SHAPE})
    result = _export(model, tmp_path / "ep.onnx")

    x = _image()
    np.testing.assert_allclose(_run(result.path, {"image": x})[0], _torch_out(module, x)[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(UsageError, match="--input-shape"):  # the program is specialised to 1x3x32x32
        _export(model, tmp_path / "bad.onnx", input_shapes={"image": (2, 3, 32, 32)})


def test_sklearn_model_is_onnx_ml(tmp_path: Path) -> None:
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    clf = LogisticRegression(max_iter=500).fit(x, y)
    onnx.save_model(to_onnx(clf, x[:1], target_opset={"": 12, "ai.onnx.ml": 3}), str(tmp_path / "iris.onnx"))

    model = load_model(str(tmp_path / "iris.onnx"))
    assert model.kind == "onnx-ml"
    result = _export(model, tmp_path / "out.onnx")

    assert any("ZipMap" in n for n in result.notes)
    assert {s.name: (s.dtype, s.shape) for s in result.outputs} == {
        "output_label": ("int64", (1,)),
        "output_probability": ("float32", (1, 3)),
    }
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    labels, probs = zip(*(session.run(None, {"X": row[None]}) for row in x[::3]), strict=True)
    np.testing.assert_array_equal(np.concatenate(labels), clf.predict(x[::3]))
    np.testing.assert_allclose(np.concatenate(probs), clf.predict_proba(x[::3]), atol=1e-5)


def test_dynamo_failure_falls_back_to_the_tracing_exporter(tmp_path: Path) -> None:
    model = load_model("tests.models:make_branchy", input_shapes=[(1, 4)])
    result = _export(model, tmp_path / "branchy.onnx")
    assert any(n.startswith("dynamo exporter failed (TorchExportError") for n in result.notes)
    assert any("TracerWarning" in n for n in result.notes)  # the baked-in branch is reported
    assert result.opset == 17
    x = _image((1, 4))
    assert _run(result.path, {"x": x})[0].shape == (1, 4)


def test_reexport_is_byte_identical(tmp_path: Path) -> None:
    model = load_model(CNN, input_shapes=[CNN_SHAPE])
    first = _export(model, tmp_path / "a.onnx")
    second = _export(load_model(CNN, input_shapes=[CNN_SHAPE]), tmp_path / "b.onnx")
    assert first.path.read_bytes() == second.path.read_bytes()
    assert b"stack_trace" not in first.path.read_bytes()  # no workstation paths in the bundle


def test_static_shapes_off_keeps_dynamic_dims(tmp_path: Path) -> None:
    model = load_model(str(_tiny_onnx(tmp_path / "tiny.onnx", opset=17, dims=("N", 3, "H", "W"))))
    result = _export(model, tmp_path / "dyn.onnx", static_shapes=False, simplify=False)
    assert result.inputs[0].shape == ("N", 3, "H", "W")
    assert not result.simplified
    assert _run(result.path, {"x": _image((2, 3, 5, 7))})[0].shape == (2, 5)


def test_dynamic_dims_are_fixed_from_the_flag(tmp_path: Path) -> None:
    src = _tiny_onnx(tmp_path / "tiny.onnx", opset=17, dims=("N", 3, "H", "W"))
    model = load_model(str(src), input_shapes=[(1, 3, 16, 12)])
    result = _export(model, tmp_path / "fixed.onnx")
    assert result.inputs[0].shape == (1, 3, 16, 12)
    assert result.outputs[0].shape == (1, 5)
    assert result.inputs[0].is_static and result.outputs[0].is_static


# --- errors ------------------------------------------------------------------------------------


def test_static_shapes_with_dynamic_dims_and_no_shape(tmp_path: Path) -> None:
    model = load_model(str(_tiny_onnx(tmp_path / "tiny.onnx", dims=("N", 3, "H", "W"))))
    with pytest.raises(UsageError) as info:
        _export(model, tmp_path / "x.onnx")
    assert info.value.flag == "--input-shape"
    assert "'x'" in str(info.value) and "?x3x?x?" in str(info.value)


@pytest.mark.parametrize(
    ("shape", "shown"),
    [((1, 3, 8), "1x3x8"), ((1, 4, 8, 8), "1x4x8x8")],
    ids=["rank", "fixed-dim"],
)
def test_wrong_input_shape_for_onnx(tmp_path: Path, shape: tuple[int, ...], shown: str) -> None:
    model = load_model(str(_tiny_onnx(tmp_path / "tiny.onnx")), input_shapes=[shape])
    with pytest.raises(UsageError) as info:
        _export(model, tmp_path / "x.onnx")
    assert info.value.flag == "--input-shape"
    assert "'x'" in str(info.value) and "?x3x8x8" in str(info.value) and shown in str(info.value)


def test_wrong_input_shape_for_torch(tmp_path: Path) -> None:
    model = load_model("tests.models:make_mlp", input_shapes=[(1, 15)])
    with pytest.raises(UsageError, match=r"--input-shape.*1x15"):
        _export(model, tmp_path / "x.onnx")


def test_wrong_number_of_shapes() -> None:
    with pytest.raises(UsageError, match=r"--input-shape.*2 shape.*1 input"):
        load_model(CNN, input_shapes=[CNN_SHAPE, CNN_SHAPE])


def test_torch_model_without_shape(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as info:
        _export(load_model(CNN), tmp_path / "x.onnx")
    assert info.value.flag == "--input-shape" and "image" in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file") as info:
        load_model(str(tmp_path / "absent.onnx"))
    assert info.value.path == str(tmp_path / "absent.onnx")


@pytest.mark.parametrize("kind", ["random", "truncated", "empty"])
def test_corrupt_onnx(tmp_path: Path, kind: str) -> None:
    good = _tiny_onnx(tmp_path / "good.onnx").read_bytes()
    data = {
        "random": np.random.default_rng(3).bytes(4096),
        "truncated": good[: len(good) // 2],
        "empty": b"",
    }[kind]
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(data)
    with pytest.raises(ModelLoadError) as info:
        load_model(str(bad))
    assert info.value.path == str(bad)


def test_missing_external_data_file(tmp_path: Path) -> None:
    proto = onnx.load(str(_tiny_onnx(tmp_path / "plain.onnx")))
    onnx.save_model(
        proto,
        str(tmp_path / "m.onnx"),
        save_as_external_data=True,
        location="m.bin",
        size_threshold=0,
    )
    (tmp_path / "m.bin").unlink()
    with pytest.raises(ModelLoadError, match=r"m\.bin"):
        load_model(str(tmp_path / "m.onnx"))


def test_unknown_extension(tmp_path: Path) -> None:
    (tmp_path / "model.h5").write_bytes(b"\x89HDF\r\n")
    with pytest.raises(ModelLoadError, match=r"unknown model kind '\.h5'.*\.onnx.*factory"):
        load_model(str(tmp_path / "model.h5"))


def test_tflite_is_loaded_through_the_runtime_engine(tmp_path: Path) -> None:
    import numpy as np

    from tests.tflite_builder import write_custom_op, write_fully_connected

    (tmp_path / "m.tflite").write_bytes(b"TFL3")
    with pytest.raises(ModelLoadError, match=r"m\.tflite: not a TFLite flatbuffer"):
        load_model(str(tmp_path / "m.tflite"))
    write_custom_op(tmp_path / "custom.tflite", "VendorNms")
    with pytest.raises(ModelLoadError, match=r"custom\.tflite: custom op 'VendorNms' is not available in"):
        load_model(str(tmp_path / "custom.tflite"))
    path = write_fully_connected(tmp_path / "fc.tflite", np.ones((3, 6), np.float32), np.zeros(3, np.float32))
    model = load_model(str(path))
    assert (model.kind, model.name, model.tflite_path) == ("tflite", "fc", path)
    assert model.input_shapes == {"x": (1, 6)}


def test_checkpoint_given_as_model(tmp_path: Path) -> None:
    torch.save(make_cnn().state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ModelLoadError, match="--weights"):
        load_model(str(tmp_path / "weights.pt"))


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("tests.models:nope", "has no callable 'nope'"),
        ("no_such_pkg.models:make", "cannot import 'no_such_pkg.models'"),
        ("tests.models:not_a_module", "returned dict"),
    ],
)
def test_bad_factory(spec: str, pattern: str) -> None:
    with pytest.raises(ModelLoadError, match=pattern) as info:
        load_model(spec)
    assert info.value.path == spec


def test_weights_not_a_state_dict(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a torch file at all")
    with pytest.raises(ModelLoadError, match="weights-only state_dict") as info:
        load_model(CNN, weights=bad)
    assert info.value.path == str(bad)


def test_weights_with_mismatched_keys(tmp_path: Path) -> None:
    state = make_cnn().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["classifier.bias"]
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(ModelLoadError, match=r"missing classifier\.bias.*unexpected extra\.weight") as info:
        load_model(CNN, weights=tmp_path / "other.pt")
    assert info.value.path == str(tmp_path / "other.pt")


def test_weights_with_wrong_sizes(tmp_path: Path) -> None:
    state = make_cnn().state_dict()
    state["classifier.bias"] = torch.zeros(3)
    torch.save(state, tmp_path / "sizes.pt")
    with pytest.raises(ModelLoadError, match=r"size mismatch for classifier\.bias"):
        load_model(CNN, weights=tmp_path / "sizes.pt")


def test_weights_only_for_factories(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--weights"):
        load_model(str(_tiny_onnx(tmp_path / "t.onnx")), weights=tmp_path / "w.pt")


@pytest.mark.parametrize(("text", "shape"), [("1,3,224,224", (1, 3, 224, 224)), ("1x16", (1, 16)), (" 8 ", (8,))])
def test_parse_shape(text: str, shape: tuple[int, ...]) -> None:
    assert parse_shape(text) == shape


@pytest.mark.parametrize("text", ["", "1,a", "1,-3", "0,3", "1,,,", "3.5"])
def test_parse_shape_rejects(text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_shape(text)
    assert info.value.flag == "--input-shape"


# --- a real third-party detector ---------------------------------------------------------------


def _ppocr_detector() -> Path:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        reason = "rapidocr-onnxruntime is not installed (pip install --no-deps rapidocr-onnxruntime)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "ch_PP-OCRv4_det_infer.onnx"
    assert path.is_file(), f"{path} missing from the rapidocr-onnxruntime wheel"
    return path


def test_ppocr_v4_detector_exports_static_at_opset_17(tmp_path: Path) -> None:
    src = _ppocr_detector()
    model = load_model(str(src), input_shapes=[(1, 3, 640, 640)])
    result = _export(model, tmp_path / "det.onnx")

    assert result.opset == 17 and result.simplified
    assert result.inputs[0].shape == (1, 3, 640, 640)
    assert result.outputs[0].shape == (1, 1, 640, 640)
    x = _image((1, 3, 640, 640))
    np.testing.assert_allclose(_run(result.path, {"x": x})[0], _run(src, {"x": x})[0], atol=1e-4)
