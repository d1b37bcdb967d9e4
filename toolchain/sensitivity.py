"""Per-node sensitivity: which node groups hurt the metric when quantized, measured on the validation set.

The graph is cut into **fusion groups**: a compute node (Conv, ConvTranspose, Gemm, MatMul)
with the element-wise chain that follows it and reads nothing from outside it (bias/BN affine,
Relu, Clip, HardSigmoid, decomposed hard-swish ``x * clip(x + 3, 0, 6) / 6``…). ONNX Runtime's
QDQ fusions work on those units, so a group is kept in float or quantized as a whole and an
exclusion never splits a fused kernel. Other nodes (pooling, residual adds, resize, concat) are
groups of their own.

Sensitivity is the error a group contributes when it is **the only part quantized**
(``nodes_to_quantize``), scored with the build's metric against the FP32 outputs. To stay
fast on big graphs, consecutive groups are first measured as blocks; a block whose error stays
under ``tolerance`` marks all its groups insensitive, any other block is halved until single
groups are measured. Results are cached by group and settings by the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ANCHOR_OPS", "NodeGroup", "Sensitivity", "measure", "node_groups"]

ANCHOR_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_CHAIN_OPS = frozenset(
    {
        "Relu",
        "Clip",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "LeakyRelu",
        "Tanh",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "BatchNormalization",
    }
)


@dataclass(frozen=True)
class NodeGroup:
    """Nodes kept in float or quantized together (a fused compute node and its activation chain)."""

    index: int
    nodes: tuple[str, ...]
    ops: tuple[str, ...]

    @property
    def name(self) -> str:
        """The first node's name (the compute node for a fused group)."""
        return self.nodes[0]

    @property
    def label(self) -> str:
        """``name (Conv+Mul+Add…)`` for reports."""
        ops = "+".join(self.ops[:4]) + ("+…" if len(self.ops) > 4 else "")
        return f"{self.name} ({ops})"


@dataclass(frozen=True)
class Sensitivity:
    """Measured error of quantizing one group alone (``measured`` False: inherited from a quiet block)."""

    group: NodeGroup
    error: float
    measured: bool


def node_groups(model_path: Path) -> list[NodeGroup]:
    """The model's fusion groups in graph (topological) order; Constant nodes belong to none."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    consts = {i.name for i in graph.initializer}
    consts |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    owner: dict[str, int] = {}
    members: list[list[tuple[str, str]]] = []
    anchored: list[bool] = []
    for node in graph.node:
        if node.op_type == "Constant":
            continue
        inputs = [i for i in node.input if i and i not in consts]
        sources = {owner[i] for i in inputs if i in owner}
        outside = any(i not in owner for i in inputs)
        if node.op_type in _CHAIN_OPS and len(sources) == 1 and not outside and anchored[next(iter(sources))]:
            index = next(iter(sources))
        else:
            index = len(members)
            members.append([])
            anchored.append(node.op_type in ANCHOR_OPS)
        members[index].append((node.name, node.op_type))
        for out in node.output:
            owner[out] = index
    return [
        NodeGroup(i, tuple(n for n, _ in m), tuple(op for _, op in m))
        for i, m in enumerate(members)
        if all(n for n, _ in m)
    ]


def measure(
    groups: Sequence[NodeGroup],
    error_of: Callable[[Sequence[NodeGroup]], float],
    *,
    tolerance: float,
    block: int = 8,
    should_stop: Callable[[], bool] = lambda: False,
    progress: Callable[[int], None] | None = None,
) -> list[Sensitivity]:
    """Sensitivity of every group; ``error_of(groups)`` quantizes only those groups and scores them.

    Blocks of ``block`` consecutive groups under ``tolerance`` are not split. When
    ``should_stop()`` turns true (time budget), unmeasured groups inherit their block's error.
    """
    results: dict[int, Sensitivity] = {}
    # (chunk, error of the block it was split from: what its groups inherit if time runs out)
    pending: list[tuple[tuple[NodeGroup, ...], float]] = [
        (tuple(groups[i : i + block]), 0.0) for i in range(0, len(groups), block)
    ]
    while pending:
        chunk, inherited = pending.pop(0)
        if should_stop():
            for g in chunk:
                results.setdefault(g.index, Sensitivity(g, inherited / len(chunk), False))
            continue
        err = error_of(chunk)
        if len(chunk) == 1 or err <= tolerance:
            for g in chunk:
                results[g.index] = Sensitivity(g, err / len(chunk), len(chunk) == 1)
        else:
            half = len(chunk) // 2
            pending[:0] = [(chunk[:half], err / 2), (chunk[half:], err / 2)]
        if progress:
            progress(len(results))
    return [results[g.index] for g in groups]
