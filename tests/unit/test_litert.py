"""LiteEngine on real tiny .tflite models: float and full-integer numerics, custom-op refusal, inputs, threads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.backends.litert import (
    PACKAGES,
    LiteEngine,
    Quantization,
    _missing_op,
    custom_op_names,
    interpreter_class,
)
from runtime.engine import EngineOptions, open_engine
from runtime.errors import EngineError, InputError
from tests.conftest import REPO
from tests.tflite_builder import custom_op_model, write_custom_op, write_fully_connected, write_int8_fully_connected

try:  # the backend module itself imports no interpreter; every test here needs one
    _, LABEL = interpreter_class()
except EngineError as exc:
    pytest.skip(f"no LiteRT interpreter: {exc}", allow_module_level=True)

_PARAMS = np.random.default_rng(7)
WEIGHTS = _PARAMS.normal(size=(3, 6)).astype(np.float32)
BIAS = _PARAMS.normal(size=3).astype(np.float32)


def _rows(n: int, seed: int = 0) -> np.ndarray:
    """``n`` seeded float32 rows of the models' input width; each test draws its own."""
    return np.random.default_rng(seed).normal(size=(n, 6)).astype(np.float32)


def _usable(package: str) -> bool:
    try:
        interpreter_class(package)
    except EngineError:
        return False
    return True


def _package_params() -> list[str]:
    """Every interpreter package whose wheel works with this Python and numpy (tflite-runtime stops at
    Python 3.11 and numpy 1.x; a package that is absent or unusable is covered by the clear-error test)."""
    return [dist for dist, _ in PACKAGES if _usable(dist)]


def test_ai_edge_litert_is_usable_in_the_dev_install() -> None:
    assert "ai-edge-litert" in _package_params()


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


@pytest.fixture
def fc_model(tmp_path: Path) -> Path:
    return write_fully_connected(tmp_path / "fc.tflite", WEIGHTS, BIAS)


@pytest.mark.parametrize("package", _package_params())
def test_float_model_matches_numpy(tmp_path: Path, package: str) -> None:
    path = write_fully_connected(tmp_path / "fc.tflite", WEIGHTS, BIAS, softmax=True)
    engine = LiteEngine(path, EngineOptions(), package=package)
    assert engine.provider.startswith(f"{package} ") and engine.provider.endswith("(XNNPACK)")
    assert [(s.name, s.dtype, s.shape) for s in engine.inputs] == [("x", "float32", (1, 6))]
    assert [(s.name, s.dtype, s.shape) for s in engine.outputs] == [("probs", "float32", (1, 3))]
    for x in _rows(3)[:, None, :]:  # the allocated arena is reused across runs
        (probs,) = engine.run({"x": x})
        assert probs.dtype == np.float32
        np.testing.assert_allclose(probs, _softmax(x @ WEIGHTS.T + BIAS), rtol=1e-5, atol=1e-6)
    engine.close()


def test_outputs_are_copies_not_views_of_the_arena(fc_model: Path) -> None:
    engine = LiteEngine(fc_model, EngineOptions())
    x = np.ones((1, 6), np.float32)
    (first,) = engine.run({"x": x})
    expected = first.copy()
    engine.run({"x": -x})
    np.testing.assert_array_equal(first, expected)


def test_int8_model_takes_and_gives_float(tmp_path: Path) -> None:
    calibration = _rows(256, seed=1)
    path = write_int8_fully_connected(tmp_path / "fc_int8.tflite", WEIGHTS, BIAS, calibration)
    engine = LiteEngine(path, EngineOptions())
    # The interface looks like the float model; the storage type is kept in ``quantized``.
    assert [(s.dtype, s.shape) for s in (*engine.inputs, *engine.outputs)] == [("float32", (1, 6)), ("float32", (1, 3))]
    q_in, q_out = engine.quantized["x"], engine.quantized["logits"]
    assert q_in.dtype == q_out.dtype == "int8" and q_in.scale > 0 and q_out.scale > 0
    errors = []
    for x in calibration[:32]:
        (y,) = engine.run({"x": x[None, :]})
        assert y.dtype == np.float32 and y.shape == (1, 3)
        errors.append(np.abs(y - (x @ WEIGHTS.T + BIAS)).max())
    # Worst case: half a step of rounding on the output, and half a step on every input and weight it sums.
    w_scale = np.abs(WEIGHTS).max() / 127
    bound = 0.5 * q_out.scale + 0.5 * (
        q_in.scale * np.abs(WEIGHTS).sum(axis=1).max() + w_scale * np.abs(calibration[:32]).sum(axis=1).max()
    )
    assert max(errors) < bound, (max(errors), bound)
    assert max(errors) > 0  # it really went through int8 arithmetic


def test_int8_input_fed_its_storage_type_goes_in_unchanged(tmp_path: Path) -> None:
    calibration = _rows(64, seed=2)
    path = write_int8_fully_connected(tmp_path / "q.tflite", WEIGHTS, BIAS, calibration)
    engine = LiteEngine(path, EngineOptions())
    x = calibration[:1]
    q = engine.quantized["x"].quantize(x)
    assert q.dtype == np.int8
    np.testing.assert_array_equal(engine.run({"x": q})[0], engine.run({"x": x})[0])
    with pytest.raises(InputError, match=r"'x' is int32; the model takes float \(quantized to int8\) or int8"):
        engine.run({"x": q.astype(np.int32)})


def test_quantization_rounds_and_saturates() -> None:
    q = Quantization(dtype="int8", scale=0.5, zero_point=-3)
    assert q.quantize(np.array([0.0, 1.0, 1.2, 1000.0, -1000.0])).tolist() == [-3, -1, -1, 127, -128]
    assert q.dequantize(np.array([-3, -1, 127], dtype=np.int8)).tolist() == [0.0, 1.0, 65.0]


def test_custom_op_is_refused_at_load_naming_it(tmp_path: Path) -> None:
    path = write_custom_op(tmp_path / "custom.tflite", "MyCustomOp")
    with pytest.raises(EngineError, match=rf"custom\.tflite: custom op 'MyCustomOp' is not available in {LABEL};"):
        LiteEngine(path, EngineOptions())


def test_custom_op_name_comes_from_the_model_when_it_has_odd_characters(tmp_path: Path) -> None:
    path = write_custom_op(tmp_path / "odd.tflite", "Vendor.Fused Op")
    assert custom_op_names(path.read_bytes()) == ["Vendor.Fused Op"]
    with pytest.raises(EngineError, match=r"custom op 'Vendor\.Fused Op' is not available"):
        LiteEngine(path, EngineOptions())


def test_op_is_named_from_the_model_when_the_message_does_not(tmp_path: Path) -> None:
    path = write_custom_op(tmp_path / "custom.tflite", "Mystery")
    assert _missing_op("Node number 0 failed to prepare.", path) == ("Mystery", True)
    assert _missing_op("Didn't find op for builtin opcode 'STABLEHLO_COMPOSITE' version '2'", path) == (
        "STABLEHLO_COMPOSITE",
        False,
    )
    assert _missing_op("Op builtin_code out of range: 4000.", tmp_path / "gone.tflite") == ("4000", False)
    assert _missing_op("out of memory", path) is None


def test_flatbuffer_reader_finds_no_custom_ops_in_builtin_models_or_garbage(fc_model: Path) -> None:
    assert custom_op_names(fc_model.read_bytes()) == []
    assert custom_op_names(b"\xff" * 3) == []
    assert custom_op_names(b"") == []


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_flatbuffer_reader_takes_any_bytes(data: bytes) -> None:
    names = custom_op_names(data)
    assert isinstance(names, list) and all(isinstance(n, str) for n in names)


_FUZZ_MODEL = custom_op_model("Fuzzed")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_flatbuffer_reader_survives_corrupted_models(data: st.DataObject) -> None:
    model = bytearray(_FUZZ_MODEL)
    for _ in range(data.draw(st.integers(1, 8))):
        model[data.draw(st.integers(0, len(model) - 1))] = data.draw(st.integers(0, 255))
    names = custom_op_names(bytes(model[: data.draw(st.integers(0, len(model)))]))
    assert all(isinstance(n, str) for n in names)


def test_unreadable_model_is_an_engine_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"not a flatbuffer" * 8)
    with pytest.raises(EngineError, match=rf"garbage\.tflite: {LABEL} cannot load the model"):
        LiteEngine(garbage, EngineOptions())
    with pytest.raises(EngineError, match=r"missing\.tflite: no such model file"):
        LiteEngine(tmp_path / "missing.tflite", EngineOptions())


def test_corrupt_tensor_name_is_an_engine_error_at_load(tmp_path: Path) -> None:
    path = write_fully_connected(tmp_path / "names.tflite", WEIGHTS, BIAS, input_name="QQQQ")
    path.write_bytes(path.read_bytes().replace(b"QQQQ", b"\xc2QQQ"))  # the flatbuffer stays valid, the UTF-8 not
    with pytest.raises(EngineError, match=r"names\.tflite: .* cannot load the model: 'utf-8' codec"):
        LiteEngine(path, EngineOptions())


def test_wrong_inputs_are_input_errors(fc_model: Path) -> None:
    engine = LiteEngine(fc_model, EngineOptions())
    with pytest.raises(InputError, match=r"'x' has shape \(1, 5\); the model takes \(1, 6\)"):
        engine.run({"x": np.ones((1, 5), np.float32)})
    with pytest.raises(InputError, match=r"'x' has shape \(2, 6\)"):  # batch is static in this model
        engine.run({"x": np.ones((2, 6), np.float32)})
    with pytest.raises(InputError, match=r"'x' is float64; the model takes float32"):
        engine.run({"x": np.ones((1, 6), np.float64)})
    with pytest.raises(InputError, match=r"model inputs are \['x'\], got \['y'\]"):
        engine.run({"y": np.ones((1, 6), np.float32)})
    # A refused feed leaves the engine usable.
    x = np.ones((1, 6), np.float32)
    np.testing.assert_allclose(engine.run({"x": x})[0], x @ WEIGHTS.T + BIAS, rtol=1e-5)


def test_dynamic_batch_is_resized_only_when_it_changes(tmp_path: Path) -> None:
    path = write_fully_connected(tmp_path / "dyn.tflite", WEIGHTS, BIAS, dynamic_batch=True)
    engine = LiteEngine(path, EngineOptions())
    assert engine.inputs[0].shape == (-1, 6) and engine.outputs[0].shape == (-1, 3)
    for batch in (4, 4, 1, 2):
        x = _rows(batch, seed=batch)
        (y,) = engine.run({"x": x})
        np.testing.assert_allclose(y, x @ WEIGHTS.T + BIAS, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match=r"has shape \(2, 7\); the model takes \(-1, 6\)"):
        engine.run({"x": np.ones((2, 7), np.float32)})


def test_open_engine_dispatches_tflite(fc_model: Path) -> None:
    engine = open_engine(fc_model, backend="tflite", options=EngineOptions(intra_op_threads=2))
    assert isinstance(engine, LiteEngine) and engine.backend == "tflite"
    x = np.full((1, 6), 0.5, np.float32)
    np.testing.assert_allclose(engine.run({"x": x})[0], x @ WEIGHTS.T + BIAS, rtol=1e-5)
    engine.close()
    with pytest.raises(EngineError, match="engine is closed"):
        engine.run({"x": x})


_THREADS = """
import os, sys
from pathlib import Path
import numpy as np
from runtime.backends.litert import LiteEngine
from runtime.engine import EngineOptions
count = lambda: len(os.listdir("/proc/self/task"))
before = count()
engine = LiteEngine(Path(sys.argv[1]), EngineOptions(intra_op_threads=int(sys.argv[2])))
engine.run({"x": np.ones((1, 6), np.float32)})
during = count()
engine.close()
print(before, during, count())
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc")
def test_xnnpack_pool_has_the_asked_threads_and_close_joins_them(fc_model: Path) -> None:
    # In a fresh process, so no other test's threads come and go while counting.
    proc = subprocess.run(
        [sys.executable, "-c", _THREADS, str(fc_model), "3"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    before, during, after = map(int, proc.stdout.split())
    assert during - before == 2  # the calling thread plus two pool workers
    assert after == before


def test_thread_count_and_resolver_follow_the_options(fc_model: Path) -> None:
    engine = LiteEngine(fc_model, EngineOptions(intra_op_threads=3))
    assert engine.num_threads == 3
    assert engine.op_resolver.name == "AUTO"  # AUTO = BUILTIN kernels + the default XNNPACK delegate
    exact = LiteEngine(fc_model, EngineOptions(deterministic=True))
    assert exact.num_threads == 1
    assert exact.op_resolver.name == "BUILTIN_WITHOUT_DEFAULT_DELEGATES"
    assert exact.provider.endswith("(builtin kernels)")
    x = np.ones((1, 6), np.float32)
    np.testing.assert_allclose(exact.run({"x": x})[0], engine.run({"x": x})[0], rtol=1e-5)


def test_interpreter_class_prefers_ai_edge_litert_and_names_unknown_packages() -> None:
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed")
    cls, label = interpreter_class()
    assert cls.__module__.startswith("ai_edge_litert") and label.startswith("ai-edge-litert ")
    with pytest.raises(EngineError, match=r"unknown LiteRT package 'tensorflow'"):
        interpreter_class("tensorflow")


def test_unusable_tflite_runtime_is_refused_with_what_to_install() -> None:
    if _usable("tflite-runtime"):
        pytest.skip("tflite-runtime works here")
    # Not installed (the usual case), or a 2.14 build that crashes under NumPy 2.
    with pytest.raises(
        EngineError, match=r"tflite-runtime (is not installed|.*NumPy).*pip install edgefleet\[tflite\]"
    ):
        interpreter_class("tflite-runtime")


_TFLITE_RUNTIME_DIRECT = """
import sys
import numpy as np
from tflite_runtime.interpreter import Interpreter
interpreter = Interpreter(model_path=sys.argv[1])
interpreter.allocate_tensors()
print("ran")
"""


def test_tflite_runtime_where_its_wheel_exists_runs_or_is_refused_for_a_real_reason(fc_model: Path) -> None:
    """The fallback package, on this Python: its only wheel (2.14, Python <= 3.11) is built for NumPy 1.x.

    Under NumPy 1 it is one of the parametrized packages above. Under NumPy 2 the engine refuses it
    before importing it, and this shows the refusal hides nothing: loaded directly, it cannot run.
    """
    from importlib import metadata

    try:
        version = metadata.version("tflite-runtime")
    except metadata.PackageNotFoundError:
        if sys.version_info < (3, 12) and os.environ.get("CI") == "true":
            pytest.fail("the dev extra installs tflite-runtime on Python <= 3.11 (its wheels stop there)")
        pytest.skip("tflite-runtime is not installed (no wheel past Python 3.11; `pip install -e .[dev]` adds it)")
    if _usable("tflite-runtime"):
        assert "tflite-runtime" in _package_params()
        return
    with pytest.raises(
        EngineError, match=rf"tflite-runtime {version} is built for NumPy 1\.x and crashes with NumPy 2"
    ):
        interpreter_class("tflite-runtime")
    direct = subprocess.run(
        [sys.executable, "-c", _TFLITE_RUNTIME_DIRECT, str(fc_model)], capture_output=True, text=True, timeout=120
    )
    assert direct.returncode != 0 and "ran" not in direct.stdout
    assert "NumPy 1.x cannot be run in" in direct.stderr or "_ARRAY_API not found" in direct.stderr


def test_no_interpreter_at_all_names_both_packages(monkeypatch: pytest.MonkeyPatch, fc_model: Path) -> None:
    for _, module in PACKAGES:  # a None entry makes ``import`` raise ImportError, as when not installed
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(EngineError, match=r"ai-edge-litert .*; tflite-runtime .*pip install edgefleet\[tflite\]"):
        LiteEngine(fc_model, EngineOptions())
