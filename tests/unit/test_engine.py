"""The ONNX Runtime engine: provider order and fallback, the optimized-model cache, input errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from runtime.engine import EngineOptions, open_engine
from runtime.errors import EngineError, InputError


def _model(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], rng.standard_normal(12).astype(np.float32).tolist())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y0"]), helper.make_node("Relu", ["y0"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_providers_fall_back_in_order_and_say_which_runs(tmp_path, caplog):
    model = _model(tmp_path / "m.onnx")
    opts = EngineOptions(providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"))
    with caplog.at_level(logging.INFO, logger="runtime.backends.ort"):
        engine = open_engine(model, options=opts)
    assert engine.provider == "CPUExecutionProvider"
    text = caplog.text
    assert "TensorrtExecutionProvider is not in this onnxruntime build; falling back" in text
    assert "CUDAExecutionProvider is not in this onnxruntime build" in text
    assert "runs m.onnx on CPUExecutionProvider" in text
    engine.close()


def test_optimized_model_cache_is_written_then_used(tmp_path):
    model = _model(tmp_path / "m.onnx")
    cache = tmp_path / "cache"
    x = {"x": np.arange(4, dtype=np.float32).reshape(1, 4)}
    first = open_engine(model, options=EngineOptions(cache_dir=cache))
    y1 = first.run(x)[0]
    first.close()
    cached = list(cache.glob("*.ort.onnx"))
    assert len(cached) == 1 and cached[0].stat().st_size > 0
    second = open_engine(model, options=EngineOptions(cache_dir=cache))
    assert second.model_path == cached[0]  # the cold start reads the optimized graph
    np.testing.assert_array_equal(second.run(x)[0], y1)
    second.close()


def test_wrong_input_is_an_input_error(tmp_path):
    engine = open_engine(_model(tmp_path / "m.onnx"))
    with pytest.raises(InputError, match="rejected inputs"):
        engine.run({"x": np.zeros((2, 5), dtype=np.float32)})
    with pytest.raises(InputError, match="model inputs are"):
        engine.run({"nope": np.zeros((1, 4), dtype=np.float32)})
    engine.close()


def test_corrupt_model_and_unknown_backend_are_engine_errors(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(EngineError, match=r"bad\.onnx"):
        open_engine(bad)
    with pytest.raises(EngineError, match=r"backend .tvm."):
        open_engine(_model(tmp_path / "m.onnx"), backend="tvm")


def test_profile_options_pin_the_big_cluster(tmp_path):
    from runtime.profile import load_profile

    opts = EngineOptions.from_profile(load_profile("rpi5"))
    assert opts.intra_op_threads == 4 and opts.pin_cores == (0, 1, 2, 3)
    clipped = EngineOptions.from_profile(load_profile("rpi5"), host_cores=2)
    assert clipped.intra_op_threads == 2 and clipped.pin_cores == (0, 1)
    engine = open_engine(_model(tmp_path / "m.onnx"), options=clipped)
    assert engine.run({"x": np.ones((1, 4), dtype=np.float32)})[0].shape == (1, 3)
    engine.close()
