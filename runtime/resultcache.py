"""LRU cache of inference results keyed by the sha256 digest of the input bytes."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from runtime.errors import ConfigError

__all__ = ["ResultCache"]


class ResultCache:
    """Thread-safe LRU map ``digest → result``; ``capacity`` 0 disables it (every ``get`` misses, uncounted).

    Results are copied one level deep on ``put`` and ``get``, so a caller adding keys to its copy does not
    change the cached one; nested values are shared and must be treated as read-only. The cache does not
    know which model produced a result: ``clear()`` it when the serving model changes.
    """

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ConfigError(f"expected a capacity of 0 or more entries, got {capacity}", key="cache.size")
        self.capacity = capacity
        self._entries: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, digest: str) -> dict[str, Any] | None:
        """The cached result for ``digest`` (now the most recently used), or ``None``."""
        if self.capacity == 0:
            return None
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(digest)
            self.hits += 1
            return dict(entry)

    def put(self, digest: str, result: Mapping[str, Any]) -> None:
        """Store ``result``, evicting the least recently used entry when full."""
        if self.capacity == 0:
            return
        with self._lock:
            self._entries[digest] = dict(result)
            self._entries.move_to_end(digest)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    @property
    def hit_rate(self) -> float:
        """Hits ÷ lookups so far (0.0 before the first lookup)."""
        with self._lock:
            lookups = self.hits + self.misses
            return self.hits / lookups if lookups else 0.0

    def clear(self) -> None:
        """Drop every entry (the counters stay)."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, digest: object) -> bool:
        with self._lock:
            return digest in self._entries

    def stats(self) -> dict[str, Any]:
        """Counters for ``status``."""
        with self._lock:
            lookups = self.hits + self.misses
            return {
                "capacity": self.capacity,
                "size": len(self._entries),
                "hits": self.hits,
                "misses": self.misses,
                "hit_rate": round(self.hits / lookups, 4) if lookups else 0.0,
            }
