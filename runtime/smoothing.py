"""Temporal smoothing of video results: the mean class scores over a sliding window of frames."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.errors import ConfigError

__all__ = ["Smoothed", "TemporalSmoother"]


@dataclass(frozen=True)
class Smoothed:
    """Window mean of the class scores and its top-1."""

    scores: np.ndarray  # float64 mean over the window, one value per class
    index: int
    score: float
    label: str | None
    frames: int  # how many frames the mean covers (< window until the window fills)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready top-1 (the scores vector is left out: the raw result already has it per frame)."""
        return {"index": self.index, "label": self.label, "score": self.score, "frames": self.frames}


class TemporalSmoother:
    """Average the last ``window`` score vectors; ``window`` 0 or 1 passes each vector through.

    Feed probabilities (or pass ``softmax=True`` for logits): a mean of logits is not a probability.
    A vector of a different length than the previous ones (a new model) starts a fresh window.
    Not thread-safe: one smoother belongs to one video stream.
    """

    def __init__(self, window: int):
        if window < 0:
            raise ConfigError(f"expected a window of 0 or more frames, got {window}", key="source.smoothing_window")
        self.window = window
        self._history: deque[np.ndarray] = deque(maxlen=max(1, window))

    def update(self, scores: np.ndarray, *, softmax: bool = False, labels: Sequence[str] = ()) -> Smoothed:
        """Add one frame's class scores and return the smoothed result."""
        vec = np.asarray(scores, dtype=np.float64).reshape(-1)
        if vec.size == 0:
            raise ValueError("cannot smooth an empty score vector")
        if softmax:
            exp = np.exp(vec - vec.max())
            vec = exp / exp.sum()
        if self._history and self._history[-1].shape != vec.shape:
            self._history.clear()
        self._history.append(vec)
        mean = vec if len(self._history) == 1 else np.mean(np.stack(self._history), axis=0)
        index = int(np.argmax(mean))
        label = labels[index] if index < len(labels) else None
        return Smoothed(scores=mean, index=index, score=float(mean[index]), label=label, frames=len(self._history))

    def reset(self) -> None:
        """Forget the window (a new stream or a scene cut)."""
        self._history.clear()
