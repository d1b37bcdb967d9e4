"""edgefleet host toolchain: turns a PyTorch or ONNX model into a validated, signed bundle per device profile."""

from __future__ import annotations

from runtime import __version__

__all__ = ["__version__"]
