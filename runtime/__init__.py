"""edgefleet on-device runtime: runs signed model bundles with the least overhead the board allows."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
