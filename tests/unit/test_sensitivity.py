"""Fusion groups, block-wise sensitivity measurement and the static latency proxy."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toolchain.search import latency_proxy
from toolchain.sensitivity import measure, node_groups


def _model(path: Path) -> Path:
    """Conv -> hard-swish (Add, Clip, Div, Mul) -> Conv -> residual Add -> Relu."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(4, 4, 1, 1)).astype(np.float32), "w2")
    three = numpy_helper.from_array(np.array(3.0, np.float32), "three")
    six = numpy_helper.from_array(np.array(6.0, np.float32), "six")
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c1", "three"], ["a"], name="hs_add"),
        helper.make_node("Clip", ["a", "zero", "six"], ["cl"], name="hs_clip"),
        helper.make_node("Div", ["cl", "six"], ["d"], name="hs_div"),
        helper.make_node("Mul", ["c1", "d"], ["hs"], name="hs_mul"),
        helper.make_node("Conv", ["hs", "w2"], ["c2"], name="conv2"),
        helper.make_node("Add", ["c2", "hs"], ["res"], name="residual"),
        helper.make_node("Relu", ["res"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [w1, w2, three, six, zero],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def test_groups_keep_a_conv_with_its_activation_chain(tmp_path) -> None:
    groups = node_groups(_model(tmp_path / "m.onnx"))
    assert [g.nodes for g in groups] == [
        ("conv1", "hs_add", "hs_clip", "hs_div", "hs_mul"),  # decomposed hard-swish joins its conv
        ("conv2",),
        ("residual",),  # reads two groups: a group of its own
        ("relu",),
    ]
    assert groups[0].label.startswith("conv1 (Conv+Add+Clip+Div+…)")


def test_measure_splits_only_noisy_blocks_and_stops_on_time() -> None:
    from toolchain.sensitivity import NodeGroup

    groups = [NodeGroup(i, (f"n{i}",), ("Conv",)) for i in range(16)]
    errors = {3: 0.5, 12: 0.2}
    calls: list[int] = []

    def error_of(chunk):
        calls.append(len(chunk))
        return sum(errors.get(g.index, 0.0) for g in chunk)

    result = measure(groups, error_of, tolerance=0.01, block=8)
    assert [r.group.index for r in sorted(result, key=lambda r: -r.error)][:2] == [3, 12]
    assert result[3].measured and result[3].error == 0.5 and result[0].error == 0.0
    assert len(calls) < 16  # quiet halves are never split down to single groups
    stopped = measure(groups, error_of, tolerance=0.01, block=8, should_stop=lambda: len(calls) > 20)
    assert all(r.error >= 0 for r in stopped) and any(not r.measured for r in stopped)


def test_latency_proxy_counts_float_int8_boundaries(tmp_path) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    src = _model(tmp_path / "m.onnx")

    class Reader:
        def __init__(self) -> None:
            self.left = [{"x": np.random.default_rng(i).normal(size=(1, 3, 8, 8)).astype(np.float32)} for i in range(4)]

        def get_next(self):
            return self.left.pop() if self.left else None

    full, mixed = tmp_path / "full.onnx", tmp_path / "mixed.onnx"
    for out, excl in ((full, []), (mixed, ["conv2"])):
        quantize_static(
            src, out, Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8, nodes_to_exclude=excl,
        )  # fmt: skip
    assert latency_proxy(src) == {"boundaries": 0, "float_nodes": 8}
    assert latency_proxy(mixed)["boundaries"] > latency_proxy(full)["boundaries"]
