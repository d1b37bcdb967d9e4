"""The embedded example: a small CNN trained on scikit-learn's handwritten digits, with its data sets.

Real data that ships inside scikit-learn (1,797 8×8 scans of handwritten digits), so the whole
product can be shown end to end offline: train → build → validate → bundle → run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DigitsSplit", "digits_cnn", "digits_split", "train_digits_cnn", "write_digit_images"]


def digits_cnn() -> Any:
    """A 3-conv CNN for 1×1×8×8 digits (about 100k parameters, 10 classes)."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 2 * 2, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


@dataclass(frozen=True)
class DigitsSplit:
    """Digits as uint8 8×8 images (0..255) with labels, split into train / held-out test."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def digits_split(test_fraction: float = 0.2, seed: int = 0) -> DigitsSplit:
    """Load scikit-learn's digits as 0..255 images and split them reproducibly (stratified)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)
    xtr, xte, ytr, yte = train_test_split(
        images, data.target, test_size=test_fraction, random_state=seed, stratify=data.target
    )
    return DigitsSplit(xtr, ytr.astype(np.int64), xte, yte.astype(np.int64))


def train_digits_cnn(split: DigitsSplit, *, epochs: int = 30, seed: int = 0) -> tuple[Any, float]:
    """Train :func:`digits_cnn` on the split's training part; returns (module, test accuracy %)."""
    import torch

    torch.manual_seed(seed)
    model = digits_cnn()
    x = torch.from_numpy(split.train_images.astype(np.float32)[:, None] / 255.0)
    y = torch.from_numpy(split.train_labels)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
    model.eval()
    with torch.no_grad():
        xt = torch.from_numpy(split.test_images.astype(np.float32)[:, None] / 255.0)
        acc = float((model(xt).argmax(1).numpy() == split.test_labels).mean() * 100)
    return model, acc


def write_digit_images(images: np.ndarray, labels: np.ndarray, root: Path) -> Path:
    """Write images as PNG files in class sub-folders ``root/<digit>/<n>.png``."""
    import cv2

    root.mkdir(parents=True, exist_ok=True)
    for i, (img, lab) in enumerate(zip(images, labels, strict=False)):
        folder = root / str(int(lab))
        folder.mkdir(exist_ok=True)
        cv2.imwrite(str(folder / f"{i:04d}.png"), img)
    return root
