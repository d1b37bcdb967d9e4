"""Quantization-aware fine-tuning with knowledge distillation for PyTorch inputs (``--train``).

Used when post-training quantization (and the search) cannot pass the gate. The student is a
copy of the FP32 model with INT8 fake quantization where ONNX Runtime's static QDQ puts it:
per-channel symmetric weights and per-tensor asymmetric inputs of every Conv/Linear (ranges
from a moving min/max, like MinMax calibration). The FP32 model is the teacher; the loss is
``T² · KL(student/T ‖ teacher/T)`` plus cross-entropy on the labels when the loader gives them.
Gradients pass the rounding straight through (``torch.fake_quantize_*``).

The fine-tune is :data:`STEPS` batches (the loader is cycled), Adam at 1e-3 with a cosine decay.
After the fine-tune the fake quantization is removed: the result is an FP32 model whose weights
tolerate INT8, which the pipeline exports, quantizes and gates as usual (against the original
FP32 reference, not the fine-tuned one).

``--train package.module:function``: ``function()`` returns an iterable (a ``DataLoader``) of
``(inputs, labels)`` or ``inputs`` batches shaped like the model's input.
"""

from __future__ import annotations

import copy
import importlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from toolchain.errors import PassError, UsageError

__all__ = ["STEPS", "QatResult", "load_loader", "run"]

PASS_NAME = "qat"
STEPS = 800  # optimizer steps of the fine-tune (the loader is cycled)
_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class QatResult:
    """What the fine-tune did."""

    epochs: int  # passes over the loader (the last one may be partial)
    steps: int
    first_loss: float
    last_loss: float
    labeled: bool
    temperature: float


def load_loader(spec: str) -> Iterable[Any]:
    """Call ``package.module:function`` and return its loader; errors name the ``--train`` flag."""
    if not _SPEC.match(spec):
        raise UsageError(f"expected package.module:function, got {spec!r}", flag="--train")
    module_name, _, attr = spec.partition(":")
    try:
        func = getattr(importlib.import_module(module_name), attr, None)
    except Exception as exc:  # user code
        raise UsageError(f"cannot import {module_name!r} ({type(exc).__name__}: {exc})", flag="--train") from exc
    if not callable(func):
        raise UsageError(f"module {module_name!r} has no function {attr!r}", flag="--train")
    try:
        loader = func()
    except Exception as exc:  # user code
        raise UsageError(f"{spec} raised {type(exc).__name__}: {exc}", flag="--train") from exc
    if not isinstance(loader, Iterable):
        raise UsageError(f"{spec} returned a {type(loader).__name__}, expected a DataLoader", flag="--train")
    return loader


class _ActObserver:
    """Moving min/max of a module's input and INT8 fake quantization with it (a forward pre-hook)."""

    def __init__(self, momentum: float = 0.1):
        self.momentum = momentum
        self.lo: float | None = None
        self.hi: float | None = None

    def __call__(self, module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        import torch

        x = args[0]
        lo, hi = float(x.detach().min()), float(x.detach().max())
        if self.lo is None or self.hi is None:
            self.lo, self.hi = lo, hi
        elif module.training:
            self.lo += self.momentum * (lo - self.lo)
            self.hi += self.momentum * (hi - self.hi)
        lo_r, hi_r = min(self.lo, 0.0), max(self.hi, 0.0)
        scale = max((hi_r - lo_r) / 255.0, 1e-8)
        zero = round(-128 - lo_r / scale)
        return (torch.fake_quantize_per_tensor_affine(x, scale, max(-128, min(127, zero)), -128, 127), *args[1:])


class _WeightFakeQuant:
    """Per-output-channel symmetric INT8 fake quantization of a weight (a parametrization)."""

    def __init__(self, axis: int):
        self.axis = axis

    def module(self) -> Any:
        import torch

        axis = self.axis

        class FakeQuant(torch.nn.Module):
            def forward(self, w: torch.Tensor) -> torch.Tensor:
                dims = [d for d in range(w.dim()) if d != axis]
                scale = (w.detach().abs().amax(dim=dims) / 127.0).clamp(min=1e-8)
                zero = torch.zeros_like(scale, dtype=torch.int32)
                return torch.fake_quantize_per_channel_affine(w, scale, zero, axis, -127, 127)

        return FakeQuant()


def _instrument(student: Any) -> Callable[[], None]:
    """Add fake quantization to every Conv/Linear; returns a function that removes it."""
    from torch import nn
    from torch.nn.utils import parametrize

    handles, parametrized = [], []
    for module in student.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ConvTranspose2d)):
            axis = 1 if isinstance(module, nn.ConvTranspose2d) else 0
            parametrize.register_parametrization(module, "weight", _WeightFakeQuant(axis).module())
            parametrized.append(module)
            handles.append(module.register_forward_pre_hook(_ActObserver()))

    def remove() -> None:
        for h in handles:
            h.remove()
        for m in parametrized:
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)

    return remove


def run(
    module: Any,
    loader: Iterable[Any],
    *,
    steps: int = STEPS,
    lr: float = 1e-3,
    temperature: float = 4.0,
    progress: Callable[[int], None] | None = None,
) -> tuple[Any, QatResult]:
    """Fine-tune a copy of ``module`` for ``steps`` batches (cycling the loader) with fake INT8 and
    the original as teacher; returns (FP32 student, result)."""
    import torch

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small fine-tunes: one thread is several times faster on a busy host
    teacher = copy.deepcopy(module).eval()
    student = copy.deepcopy(module).train()
    remove = _instrument(student)
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    losses: list[float] = []
    labeled = epochs = 0
    try:
        while len(losses) < steps:
            epochs += 1
            before = len(losses)
            for batch in loader:
                x, y = batch if isinstance(batch, (tuple, list)) and len(batch) == 2 else (batch, None)
                labeled |= y is not None
                loss = _distill_step(teacher, student, x, y, temperature)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                if progress:
                    progress(len(losses))
                if len(losses) >= steps:
                    break
            if len(losses) == before:
                raise UsageError("the --train loader yielded no batches", flag="--train")
    except (RuntimeError, TypeError, ValueError) as exc:
        raise PassError(
            f"fine-tuning failed ({type(exc).__name__}: {exc}); the --train loader must yield "
            "(inputs, labels) or inputs batches shaped like the model's input",
            pass_name=PASS_NAME,
        ) from exc
    finally:
        remove()
        torch.set_num_threads(threads)
    student.eval()
    return student, QatResult(epochs, len(losses), losses[0], losses[-1], bool(labeled), temperature)


def _distill_step(teacher: Any, student: Any, x: Any, y: Any, temperature: float) -> Any:
    """``T² · KL(student/T ‖ teacher/T)``, plus cross-entropy when there are labels."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        t_out = teacher(x)
    s_out = student(x)
    soft = F.kl_div(
        F.log_softmax(s_out / temperature, dim=-1), F.softmax(t_out / temperature, dim=-1), reduction="batchmean"
    )
    loss = soft * temperature**2
    return loss + F.cross_entropy(s_out, y) if y is not None else loss
