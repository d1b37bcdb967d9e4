"""The bundle manifest: the contract between the toolchain that builds a model and the device that runs it.

``manifest.json`` names the model, its version lineage, the device profile it was built for,
every file with its sha256 and size, the tensors, the pre/post-processing and the validation
report. ``manifest.sig`` (ed25519) covers the manifest bytes; the manifest covers every file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from runtime.errors import ConfigError, ManifestError
from runtime.schema import from_dict, to_dict

__all__ = [
    "FORMAT_VERSION",
    "FileEntry",
    "Manifest",
    "Postprocess",
    "Preprocess",
    "ProfileRef",
    "TensorSpec",
    "parse_manifest",
]

FORMAT_VERSION = 1
_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_DTYPES = (
    "float32",
    "float16",
    "float64",
    "int8",
    "uint8",
    "int16",
    "int32",
    "int64",
    "bool",
    "string",
)


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output. Dynamic dimensions are strings (``"batch"``) or -1."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    layout: Literal["NCHW", "NHWC", "NC", "any"] = "any"

    def _validate(self) -> str | None:
        if self.dtype not in _DTYPES:
            return f"dtype: unknown dtype {self.dtype!r} (known: {', '.join(_DTYPES)})"
        for d in self.shape:
            if isinstance(d, int) and d < -1:
                return "shape: dimensions are >= 0, or -1 / a name when dynamic"
        return None

    @property
    def is_static(self) -> bool:
        """True when every dimension is a fixed positive size."""
        return all(isinstance(d, int) and d > 0 for d in self.shape)


@dataclass(frozen=True)
class FileEntry:
    """A file in the bundle, covered by the signature through its hash."""

    path: str
    sha256: str
    size: int
    role: Literal["model", "model-data", "labels", "other"] = "model"

    def _validate(self) -> str | None:
        parts = self.path.split("/")
        if self.path.startswith("/") or ".." in parts or "" in parts or "\\" in self.path:
            return "path: must be a relative path without '..'"
        if self.path in ("manifest.json", "manifest.sig"):
            return "path: manifest files are not listed"
        if not _SHA256.fullmatch(self.sha256):
            return "sha256: expected 64 lower-case hex digits"
        if self.size < 0:
            return "size: expected >= 0"
        return None


@dataclass(frozen=True)
class Preprocess:
    """How raw inputs become the model's first tensor."""

    kind: Literal["tensor", "image"] = "tensor"
    resize: tuple[int, int] | None = None  # (height, width)
    color: Literal["rgb", "bgr", "gray"] = "rgb"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    dtype: str = "float32"
    interpolation: Literal["nearest", "linear", "area", "cubic"] = "area"

    def _validate(self) -> str | None:
        if self.mean and self.std and len(self.mean) != len(self.std):
            return "std: mean and std need the same number of channels"
        if any(s == 0 for s in self.std):
            return "std: values must be non-zero"
        if self.resize is not None and min(self.resize) <= 0:
            return "resize: expected positive (height, width)"
        return None


@dataclass(frozen=True)
class Postprocess:
    """How the first output becomes a result."""

    kind: Literal["none", "classification", "dense", "embedding"] = "none"
    softmax: bool = False
    top_k: int = 5
    labels: tuple[str, ...] = ()

    def _validate(self) -> str | None:
        if self.top_k < 1:
            return "top_k: expected >= 1"
        return None


@dataclass(frozen=True)
class ProfileRef:
    """The device profile a bundle was built for."""

    name: str
    digest: str
    arch: str


@dataclass(frozen=True)
class Manifest:
    """Everything a device needs to trust and run a bundle."""

    name: str
    version: str
    created: str
    profile: ProfileRef
    backend: Literal["onnxruntime", "tflite"]
    model: str
    files: tuple[FileEntry, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precision: str = "fp32"
    task: Literal["classification", "dense", "embedding", "detection", "generic"] = "generic"
    parent_version: str | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)
    postprocess: Postprocess = field(default_factory=Postprocess)
    validation: dict[str, Any] = field(default_factory=dict)
    toolchain_version: str = ""
    format_version: int = FORMAT_VERSION

    def _validate(self) -> str | None:
        if self.format_version != FORMAT_VERSION:
            return f"format_version: this runtime reads format {FORMAT_VERSION}; upgrade edgefleet"
        if not _NAME.fullmatch(self.name):
            return "name: use letters, digits, '.', '_' or '-' (max 128)"
        if not _SEMVER.fullmatch(self.version):
            return "version: expected semantic version like 1.2.0"
        if self.parent_version is not None and not _SEMVER.fullmatch(self.parent_version):
            return "parent_version: expected semantic version like 1.1.0"
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            return "files: a path is listed twice"
        if self.model not in paths:
            return f"model: {self.model!r} is not listed in files"
        if not self.inputs:
            return "inputs: at least one input is needed"
        if not self.outputs:
            return "outputs: at least one output is needed"
        return None

    def entry(self, path: str) -> FileEntry:
        """The file entry for ``path``."""
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)

    def to_json(self) -> bytes:
        """Canonical bytes (sorted keys, 2-space indent, trailing newline) — what gets signed."""
        return (json.dumps(to_dict(self), sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")

    def with_changes(self, **changes: Any) -> Manifest:
        """A copy with fields replaced."""
        return replace(self, **changes)


def parse_manifest(data: bytes | str, *, path: str = "manifest.json") -> Manifest:
    """Parse and validate manifest bytes; anything wrong is a :class:`ManifestError`."""
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ManifestError(f"not valid JSON: {exc}", path=path) from exc
    if not isinstance(obj, dict):
        raise ManifestError("expected a JSON object", path=path)
    try:
        return from_dict(Manifest, obj, path=path)
    except ConfigError as exc:
        raise ManifestError(str(exc)) from exc
