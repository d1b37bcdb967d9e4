"""Exceptions raised by the host toolchain.

Every error the toolchain raises on purpose derives from :class:`ToolchainError`::

    ToolchainError                 exit 1 unless noted
    ├── UsageError                 bad flag value or combination (flag named); exit 2
    ├── ModelLoadError             model file missing, corrupt, or of an unknown kind (file named); exit 2
    ├── DatasetError               calibration/validation set missing, empty or unreadable (folder named); exit 2
    ├── PassError                  a pass (prune, export, quantize…) failed; the pass is named
    ├── GateError                  the candidate failed the profile's validation gate (carries the report); exit 1
    └── KeyFileError               signing key missing or unreadable (file named); exit 2

Errors from the runtime (``runtime.errors.EdgeError``: profiles, manifests, signatures) pass
through unchanged; the CLI prints both kinds as one line and exits with their ``exit_code``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = [
    "DatasetError",
    "GateError",
    "KeyFileError",
    "ModelLoadError",
    "PassError",
    "ToolchainError",
    "UsageError",
]


class ToolchainError(Exception):
    """Root of every error the toolchain raises on purpose."""

    exit_code = 1


class UsageError(ToolchainError):
    """A flag value or combination that cannot work."""

    exit_code = 2

    def __init__(self, message: str, *, flag: str | None = None):
        self.flag = flag
        super().__init__(f"{flag}: {message}" if flag else message)


class _PathError(ToolchainError):
    exit_code = 2

    def __init__(self, message: str, *, path: str | Path | None = None):
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)


class ModelLoadError(_PathError):
    """A model that is missing, corrupt or of an unknown kind."""


class DatasetError(_PathError):
    """A calibration or validation set that is missing, empty or unreadable."""


class KeyFileError(_PathError):
    """A signing or verification key that is missing or unreadable."""


class PassError(ToolchainError):
    """A build pass failed."""

    def __init__(self, message: str, *, pass_name: str):
        self.pass_name = pass_name
        super().__init__(f"{pass_name}: {message}")


class GateError(ToolchainError):
    """The candidate failed the profile's validation gate."""

    def __init__(self, message: str, *, report: dict[str, Any] | None = None):
        self.report = report or {}
        super().__init__(message)
