"""Reproducible benchmarks: every figure a ratio against a baseline measured in the same run (`python -m benchmarks`).

One module per benchmark; each exposes ``NAME``, ``TITLE`` and ``run(ctx) -> Report`` and is listed
in :data:`BENCHMARKS` in the order the runner (:mod:`benchmarks.harness`) runs them.
"""

from __future__ import annotations

__all__ = ["BENCHMARKS"]

BENCHMARKS: tuple[str, ...] = (
    "serve_overhead",
    "compression",
    "threads",
    "logbook",
    "sync",
    "cold_start",
    "memory",
    "fleet_scale",
    "emulation",
    "updates",
)
