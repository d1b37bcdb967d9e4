"""Prune pass: zero PyTorch weights by magnitude or whole output channels, and report what it did.

Only ``nn.Module`` inputs (kind ``torch``) are pruned; ONNX, TorchScript and ExportedProgram
inputs are left alone (the pipeline reports that). The module is changed **in place** and the
pruning is made permanent (``prune.remove``), so the export pass sees plain weights.

- ``magnitude``: one global L1 threshold over every Conv/Linear weight except the last such layer
  (the classifier: few weights, large accuracy cost).
- ``structured``: per layer, the ``amount`` share of output channels (dim 0) with the smallest
  L2 norm is zeroed in every Conv/Linear except the last. Shapes stay the same: the channels are
  zeros, not removed (physically removing them needs the graph surgery this pass does not do).

Sparsity is measured by counting zeros afterwards, never taken from the requested amount.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from toolchain.errors import PassError

__all__ = ["LayerSparsity", "PruneReport", "run"]

_PASS = "prune"


@dataclass(frozen=True)
class LayerSparsity:
    """Zeros in one layer's weight after pruning."""

    name: str
    kind: str
    params: int
    zeros: int
    sparsity: float
    channels_pruned: int  # output channels whose weights are all zero


@dataclass(frozen=True)
class PruneReport:
    """What the pass did; ``global_sparsity`` is over the weights that were candidates."""

    method: str
    amount: float
    layers: tuple[LayerSparsity, ...]
    global_sparsity: float


def run(module: Any, *, method: Literal["magnitude", "structured"], amount: float) -> PruneReport:
    """Prune ``module`` in place and return the measured sparsity per layer."""
    import torch
    from torch.nn.utils import prune

    if isinstance(module, torch.jit.ScriptModule) or not isinstance(module, torch.nn.Module):
        raise PassError(
            f"only PyTorch nn.Module models can be pruned, got {type(module).__name__}",
            pass_name=_PASS,
        )
    if method not in ("magnitude", "structured"):
        raise PassError(f"unknown method {method!r} (magnitude or structured)", pass_name=_PASS)
    if not 0.0 < amount < 1.0:
        raise PassError(f"amount must be a fraction in (0, 1), got {amount}", pass_name=_PASS)
    layers = _candidates(module)
    with torch.no_grad():
        if method == "magnitude":
            prune.global_unstructured(
                [(m, "weight") for _, m in layers],
                pruning_method=prune.L1Unstructured,
                amount=amount,
            )
        else:
            for _, layer in layers:
                prune.ln_structured(layer, "weight", amount=amount, n=2, dim=0)  # type: ignore[no-untyped-call]
        for _, layer in layers:
            prune.remove(layer, "weight")  # type: ignore[no-untyped-call]
    report = tuple(_measure(name, layer) for name, layer in layers)
    total = sum(r.params for r in report)
    zeros = sum(r.zeros for r in report)
    return PruneReport(method=method, amount=amount, layers=report, global_sparsity=zeros / total if total else 0.0)


def _candidates(module: Any) -> list[tuple[str, Any]]:
    """Conv/Linear layers in definition order, without the last one; shared weights once."""
    from torch import nn

    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    found: list[tuple[str, Any]] = []
    seen: set[int] = set()
    for name, sub in module.named_modules():
        weight = getattr(sub, "weight", None)
        if isinstance(sub, kinds) and isinstance(weight, nn.Parameter) and id(weight) not in seen:
            seen.add(id(weight))
            found.append((name, sub))
    if len(found) < 2:
        raise PassError(
            f"nothing to prune: {type(module).__name__} has {len(found)} Conv/Linear layer(s) and "
            "the last one (the classifier) is kept dense",
            pass_name=_PASS,
        )
    return found[:-1]


def _measure(name: str, layer: Any) -> LayerSparsity:
    weight = layer.weight.detach()
    params = weight.numel()
    zeros = int((weight == 0).sum())
    dead = int((weight.reshape(weight.shape[0], -1) == 0).all(dim=1).sum())
    return LayerSparsity(
        name=name,
        kind=type(layer).__name__,
        params=params,
        zeros=zeros,
        sparsity=zeros / params if params else 0.0,
        channels_pruned=dead,
    )
