"""Tiny PyTorch model factories that tests give the toolchain as ``tests.models:<name>`` specs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["make_branchy", "make_cnn", "make_mlp", "make_two_input", "not_a_module"]


def _seeded(build: Any) -> nn.Module:
    """Build a module from a fixed seed without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module: nn.Module = build()
    return module.eval()


class _Cnn(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.hidden = nn.Linear(32, 64)
        self.classifier = nn.Linear(64, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.hidden(self.features(image))))


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class _TwoInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mixed = self.a(left) + self.b(right)
        return mixed, torch.sigmoid(mixed)


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.export refuses it, tracing bakes it
            return self.fc(x)
        return -self.fc(x)


def make_branchy() -> nn.Module:
    """Data-dependent control flow (input ``x``, N x 4): only the tracing exporter takes it."""
    return _seeded(_Branchy)


def make_cnn() -> nn.Module:
    """A small image classifier (input ``image``, N x 3 x H x W; 10 classes)."""
    return _seeded(_Cnn)


def make_mlp() -> nn.Module:
    """A three-layer perceptron (input ``x``, N x 16; 4 outputs)."""
    return _seeded(_Mlp)


def make_two_input() -> nn.Module:
    """Two inputs (``left`` N x 8, ``right`` N x 4) and two outputs."""
    return _seeded(_TwoInput)


def not_a_module() -> object:
    """A factory that returns something that is not an ``nn.Module``."""
    return {"not": "a module"}
