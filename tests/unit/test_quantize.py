"""The quantize pass on a real small CNN: static S8S8/U8S8 QDQ, dynamic, FP16, copies and errors."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime.manifest import Preprocess, TensorSpec
from runtime.profile import QuantizationSpec
from toolchain.calibration import Dataset, Sample, load_dataset
from toolchain.errors import DatasetError, PassError, UsageError
from toolchain.passes import quantize

SHAPE = (1, 3, 16, 16)
REPO = Path(__file__).resolve().parents[2]


def _cnn(opset: int = 17) -> onnx.ModelProto:
    """Conv, Relu, Conv, Relu, GlobalAveragePool, Flatten, Gemm; ~40k fixed-seed weights."""
    rng = np.random.default_rng(0)

    def weight(name: str, shape: tuple[int, ...], fan_in: int) -> TensorProto:
        data = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        return numpy_helper.from_array(data.astype(np.float32), name)

    inits = [
        weight("w1", (32, 3, 3, 3), 27),
        weight("b1", (32,), 27),
        weight("w2", (128, 32, 3, 3), 288),
        weight("b2", (128,), 288),
        weight("wf", (10, 128), 128),
        weight("bf", (10,), 128),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(SHAPE))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _samples(count: int, seed: int) -> tuple[Sample, ...]:
    rng = np.random.default_rng(seed)
    return tuple(Sample({"x": rng.random(SHAPE, dtype=np.float32)}, None, f"mem[{i}]") for i in range(count))


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fp32") / "model.onnx"
    onnx.save(_cnn(), str(path))
    return path


@pytest.fixture(scope="module")
def calib() -> Dataset:
    return Dataset("mem", _samples(24, seed=1), ())


def _outputs(path: Path, samples: tuple[Sample, ...]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, s.feeds)[0] for s in samples])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.min(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize(
    ("activation", "precision", "zero_point_type"),
    [("int8", "int8-s8s8", TensorProto.INT8), ("uint8", "int8-u8s8", TensorProto.UINT8)],
)
def test_static_per_channel_qdq(
    fp32: Path,
    calib: Dataset,
    tmp_path: Path,
    activation: str,
    precision: str,
    zero_point_type: int,
) -> None:
    spec = QuantizationSpec(mode="static", activation_type=activation, per_channel=True)  # type: ignore[arg-type]
    res = quantize.run(fp32, tmp_path / "q.onnx", spec, calibration=calib)
    assert res.path == tmp_path / "q.onnx" and res.path.is_file()
    assert (res.precision, res.method, res.per_channel) == (precision, "static-qdq", True)
    assert res.calibration_method == "minmax" and res.calibration_samples == 24
    assert res.path.stat().st_size <= 0.35 * fp32.stat().st_size
    model = onnx.load(str(res.path))
    assert {t.data_location for t in model.graph.initializer} == {TensorProto.DEFAULT}
    ops = [n.op_type for n in model.graph.node]
    qdq = ops.count("QuantizeLinear") + ops.count("DequantizeLinear")
    assert any(f"inserted {qdq} QuantizeLinear/DequantizeLinear" in n for n in res.notes)
    assert qdq >= 8
    # weights are per-channel: a DequantizeLinear with a vector scale on each conv weight
    inits = {i.name: i for i in model.graph.initializer}
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("w2")]
    assert weight_dq and list(inits[weight_dq[0].input[1]].dims) == [128]
    activation_q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert {inits[n.input[2]].data_type for n in activation_q} == {zero_point_type}
    held_out = _samples(16, seed=7)
    assert _cosine(_outputs(fp32, held_out), _outputs(res.path, held_out)) >= 0.99


def test_dynamic(fp32: Path, tmp_path: Path) -> None:
    res = quantize.run(fp32, tmp_path / "d.onnx", QuantizationSpec(mode="dynamic"), calibration=None)
    assert (res.precision, res.method, res.calibration_method) == ("int8-dynamic", "dynamic", None)
    assert res.calibration_samples == 0
    ops = _ops(res.path)
    assert "DynamicQuantizeLinear" in ops and "MatMulInteger" in ops
    assert any("ConvInteger" in n and "static" in n for n in res.notes)
    assert res.path.stat().st_size <= 0.35 * fp32.stat().st_size
    held_out = _samples(8, seed=7)
    assert _cosine(_outputs(fp32, held_out), _outputs(res.path, held_out)) >= 0.99


def test_fp16_keeps_float32_io(fp32: Path, tmp_path: Path) -> None:
    res = quantize.run(fp32, tmp_path / "h.onnx", QuantizationSpec(mode="fp16"), calibration=None)
    assert (res.precision, res.method, res.per_channel) == ("fp16", "fp16", False)
    ratio = res.path.stat().st_size / fp32.stat().st_size
    assert 0.45 <= ratio <= 0.6
    model = onnx.load(str(res.path))
    io = [*model.graph.input, *model.graph.output]
    assert {v.type.tensor_type.elem_type for v in io} == {TensorProto.FLOAT}
    assert {i.data_type for i in model.graph.initializer} == {TensorProto.FLOAT16}
    held_out = _samples(8, seed=7)
    ref, got = _outputs(fp32, held_out), _outputs(res.path, held_out)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=2e-2, atol=2e-2)
    assert _cosine(ref, got) >= 0.999


def test_none_copies_the_model(fp32: Path, tmp_path: Path) -> None:
    res = quantize.run(fp32, tmp_path / "c.onnx", QuantizationSpec(mode="none"), calibration=None)
    assert (res.precision, res.method) == ("fp32", "none")
    assert res.path.read_bytes() == fp32.read_bytes()


def test_static_output_is_byte_identical_across_runs(fp32: Path, calib: Dataset, tmp_path: Path) -> None:
    spec = QuantizationSpec()
    a = quantize.run(fp32, tmp_path / "a" / "q.onnx", spec, calibration=calib)
    b = quantize.run(fp32, tmp_path / "b" / "other-name.onnx", spec, calibration=calib)
    assert a.path.read_bytes() == b.path.read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["q.onnx"]  # no temp files left


def test_static_output_is_byte_identical_across_processes(fp32: Path, calib: Dataset, tmp_path: Path) -> None:
    """A different PYTHONHASHSEED changes set order; the model must not depend on it.

    The child also checks ORT prints nothing and leaves the root logger unconfigured.
    """
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.concatenate([s.feeds["x"] for s in calib.samples]))
    script = (
        "import sys; from pathlib import Path\n"
        "from runtime.manifest import Preprocess, TensorSpec\n"
        "from runtime.profile import QuantizationSpec\n"
        "from toolchain.calibration import load_dataset\n"
        "from toolchain.passes import quantize\n"
        f"ds = load_dataset(sys.argv[2], [TensorSpec('x', 'float32', {SHAPE!r})], Preprocess())\n"
        "quantize.run(Path(sys.argv[1]), Path(sys.argv[3]), QuantizationSpec(), calibration=ds)\n"
        "# ORT warns through logging.warning(), which would call basicConfig() on a bare root\n"
        "spec = QuantizationSpec(format='qoperator', calibration_samples=2)\n"
        "quantize.run(Path(sys.argv[1]), Path('qop.onnx'), spec, calibration=ds)\n"
        "import logging; assert not logging.getLogger().handlers, logging.getLogger().handlers\n"
    )
    outs = []
    for seed in ("1", "2"):
        out = tmp_path / f"q{seed}.onnx"
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        proc = subprocess.run(
            [sys.executable, "-W", "error", "-c", script, str(fp32), str(data), str(out)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        assert (proc.stdout, proc.stderr) == ("", "")  # nothing leaks to the terminal
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    ds = load_dataset(data, [TensorSpec("x", "float32", SHAPE)], Preprocess())
    here = quantize.run(fp32, tmp_path / "here.onnx", QuantizationSpec(), calibration=ds)
    assert here.path.read_bytes() == outs[0]


def test_opset_12_is_upgraded_for_per_channel(calib: Dataset, tmp_path: Path) -> None:
    old = tmp_path / "opset12.onnx"
    onnx.save(_cnn(opset=12), str(old))
    res = quantize.run(old, tmp_path / "q.onnx", QuantizationSpec(per_channel=True), calibration=calib)
    assert any("opset 12 upgraded to 13" in n for n in res.notes)
    model = onnx.load(str(res.path))
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {13}
    held_out = _samples(4, seed=7)
    assert _cosine(_outputs(old, held_out), _outputs(res.path, held_out)) >= 0.99


def test_opset_12_per_tensor_is_left_alone(calib: Dataset, tmp_path: Path) -> None:
    old = tmp_path / "opset12.onnx"
    onnx.save(_cnn(opset=12), str(old))
    res = quantize.run(old, tmp_path / "q.onnx", QuantizationSpec(per_channel=False), calibration=calib)
    assert not any("upgraded" in n for n in res.notes) and res.per_channel is False
    model = onnx.load(str(res.path))
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {12}
    ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("calibration", [None, Dataset("calib", (), ())])
def test_static_without_calibration_is_a_usage_error(fp32: Path, tmp_path: Path, calibration: Dataset | None) -> None:
    with pytest.raises(UsageError) as info:
        quantize.run(fp32, tmp_path / "q.onnx", QuantizationSpec(), calibration=calibration)
    assert "--calibration" in str(info.value) and "dynamic" in str(info.value)
    assert info.value.exit_code == 2
    assert not (tmp_path / "q.onnx").exists()


def test_progress_counts_up_to_the_samples_used(
    fp32: Path, calib: Dataset, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    seen: list[tuple[int, int]] = []

    def bar(done: int, total: int) -> None:
        seen.append((done, total))
        print(f"bar {done}/{total}")  # a progress bar on stdout must still reach the terminal

    spec = QuantizationSpec(calibration_samples=6)
    res = quantize.run(fp32, tmp_path / "q.onnx", spec, calibration=calib, progress=bar)
    assert res.calibration_samples == 6
    assert [d for d, _ in seen] == list(range(7))
    assert {t for _, t in seen} == {6}
    assert capfd.readouterr().out.splitlines() == [f"bar {i}/6" for i in range(7)]


def test_calibration_prints_stay_off_stdout(
    fp32: Path, calib: Dataset, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """ORT's entropy calibrator print()s; the pass keeps stdout clean for JSON reports."""
    spec = QuantizationSpec(calibration_method="entropy", calibration_samples=8)
    res = quantize.run(fp32, tmp_path / "q.onnx", spec, calibration=calib)
    assert res.calibration_method == "entropy"
    assert any(n.startswith("entropy calibration") for n in res.notes)
    out, err = capfd.readouterr()
    assert out == ""
    assert "histogram" not in err


def test_ort_warnings_become_notes_without_configuring_logging(fp32: Path, calib: Dataset, tmp_path: Path) -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    spec = QuantizationSpec(format="qoperator", calibration_samples=4)
    res = quantize.run(fp32, tmp_path / "q.onnx", spec, calibration=calib)
    assert res.method == "static-qoperator"
    assert any(n.startswith("onnxruntime: Please use QuantFormat.QDQ") for n in res.notes)
    assert any("QLinearConv x2" in n for n in res.notes)
    assert root.handlers == before


def test_nodes_to_exclude(fp32: Path, calib: Dataset, tmp_path: Path) -> None:
    res = quantize.run(
        fp32,
        tmp_path / "q.onnx",
        QuantizationSpec(calibration_samples=4),
        calibration=calib,
        nodes_to_exclude=["fc", "no_such_node"],
    )
    assert res.excluded_nodes == ("fc",)
    assert any("no_such_node" in n for n in res.notes)
    model = onnx.load(str(res.path))
    fc = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert "wf" in fc.input  # the float weight feeds the Gemm directly, no DequantizeLinear


def test_calibration_feeds_must_match_model_inputs(fp32: Path, tmp_path: Path) -> None:
    wrong = Dataset("calib_dir", (Sample({"image": np.zeros(SHAPE, np.float32)}, None, "a.npy"),), ())
    with pytest.raises(DatasetError) as info:
        quantize.run(fp32, tmp_path / "q.onnx", QuantizationSpec(), calibration=wrong)
    assert "calib_dir" in str(info.value) and "'x'" in str(info.value)


@pytest.mark.parametrize("mode", ["static", "dynamic", "fp16", "none"])
def test_broken_model_is_a_pass_error(calib: Dataset, tmp_path: Path, mode: str) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all")
    spec = QuantizationSpec(mode=mode)  # type: ignore[arg-type]
    with pytest.raises(PassError) as info:
        quantize.run(bad, tmp_path / "q.onnx", spec, calibration=calib)
    assert info.value.pass_name == "quantize" and str(info.value).startswith("quantize: ")
    assert f"mode {mode!r} failed" in str(info.value)
    assert info.value.__cause__ is not None
    with pytest.raises(PassError, match="no such model file"):
        quantize.run(tmp_path / "missing.onnx", tmp_path / "q.onnx", QuantizationSpec(), calibration=calib)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]
