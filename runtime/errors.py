"""Exceptions raised by the on-device runtime.

Every error the runtime raises on purpose derives from :class:`EdgeError`::

    EdgeError
    ├── ConfigError            bad TOML/JSON value or unknown key (file and key path named); exit 2
    │   └── ProfileError       a device profile that does not validate
    ├── BundleError            a bundle that cannot be trusted or read
    │   ├── ManifestError      manifest.json missing, malformed or incomplete
    │   ├── IntegrityError     a file's sha256/size differs from the manifest, or a file is missing
    │   ├── SignatureError     signature missing, malformed, or not made by a trusted key
    │   └── UnsafeArchiveError absolute path, `..`, link or device file inside the tar
    ├── EngineError            the inference engine could not load or run the model
    │   └── InputError         an input that does not fit the model (shape, dtype, unreadable file)
    ├── LogbookError           the on-device SQLite log cannot be opened, migrated or written (path named)
    ├── StoreError             the on-device model store: a version not held, a changed version, a bad pointer
    ├── DownloadError          a model download that failed or did not match its sha256 (url named)
    ├── DeltaError             a delta bundle that does not apply: wrong base, truncated, corrupt, bad result
    ├── RolloutError           the rollout ledger cannot be read or written, or a rollout cannot move on
    └── CommandError           a fleet command that could not be carried out (command id named)
        └── CommandRefused     a command refused before running: unsigned, bad signature, expired,
                               replayed, malformed…; ``reason`` is a short stable string for the ack

Messages say what is wrong and what to do about it.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "BundleError",
    "CommandError",
    "CommandRefused",
    "ConfigError",
    "DeltaError",
    "DownloadError",
    "EdgeError",
    "EngineError",
    "InputError",
    "IntegrityError",
    "LogbookError",
    "ManifestError",
    "ProfileError",
    "RolloutError",
    "SignatureError",
    "StoreError",
    "UnsafeArchiveError",
]


class EdgeError(Exception):
    """Root of every error the runtime raises on purpose."""

    exit_code = 1


class ConfigError(EdgeError):
    """A configuration value or file that does not validate."""

    exit_code = 2

    def __init__(self, message: str, *, path: str | Path | None = None, key: str | None = None):
        self.path = str(path) if path is not None else None
        self.key = key
        prefix = ""
        if self.path:
            prefix += f"{self.path}: "
        if key:
            prefix += f"{key}: "
        super().__init__(prefix + message)


class ProfileError(ConfigError):
    """A device profile that does not validate."""


class BundleError(EdgeError):
    """A bundle that cannot be trusted or read."""

    exit_code = 2

    def __init__(self, message: str, *, path: str | Path | None = None):
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)


class ManifestError(BundleError):
    """manifest.json missing, malformed or incomplete."""


class IntegrityError(BundleError):
    """A bundle file's hash or size differs from the manifest, or a listed file is missing."""


class SignatureError(BundleError):
    """Signature missing, malformed, or not made by a trusted key."""


class UnsafeArchiveError(BundleError):
    """An archive member that could escape the extraction directory."""


class EngineError(EdgeError):
    """The inference engine could not load or run a model."""


class InputError(EngineError):
    """An input that does not fit the model."""

    exit_code = 2


class LogbookError(EdgeError):
    """The on-device SQLite log cannot be opened, migrated, read or written."""

    def __init__(self, message: str, *, path: str | Path | None = None):
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)


class StoreError(EdgeError):
    """The on-device model store cannot add, find or switch a version (store path named when known)."""

    def __init__(self, message: str, *, path: str | Path | None = None):
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)


class DownloadError(EdgeError):
    """A download that failed or whose content does not match its sha256; ``url`` names the source."""

    def __init__(self, message: str, *, url: str | None = None):
        self.url = url
        super().__init__(f"{url}: {message}" if url else message)


class DeltaError(EdgeError):
    """A delta bundle that cannot be applied (wrong base, truncated, corrupt, result hash or size off)."""

    def __init__(self, message: str, *, path: str | Path | None = None):
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)


class RolloutError(EdgeError):
    """The rollout ledger cannot be read or written, or a rollout cannot make the move asked of it."""

    def __init__(self, message: str, *, path: str | Path | None = None):
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)


class CommandError(EdgeError):
    """A fleet command that could not be carried out; ``command_id`` names it when known."""

    def __init__(self, message: str, *, command_id: str | None = None):
        self.command_id = command_id
        super().__init__(f"command {command_id}: {message}" if command_id else message)


class CommandRefused(CommandError):
    """A command refused before it ran; ``reason`` is the short stable string sent in the ack."""

    def __init__(self, reason: str, command_id: str | None = None):
        self.reason = reason
        super().__init__(f"refused: {reason}", command_id=command_id)
