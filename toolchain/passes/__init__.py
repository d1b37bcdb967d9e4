"""Build passes, one module each (prune, export, quantize…); heavy imports live inside ``run()``."""

from __future__ import annotations

__all__: list[str] = []
