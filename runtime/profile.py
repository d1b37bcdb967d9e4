"""Device profiles: what a device class is, for the toolchain to target and the runtime to tune to.

A profile is a TOML file (``device_profiles/<name>.toml`` ships with the package; any other file
can be given by path). It is validated on load: an unknown key or a bad value is a
:class:`~runtime.errors.ProfileError` naming the file and key.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from runtime.errors import ProfileError
from runtime.schema import from_dict, load_toml, loads_toml, to_dict

__all__ = [
    "KNOWN_PROVIDERS",
    "Budgets",
    "CpuCluster",
    "CpuSpec",
    "DeviceProfile",
    "ExportSpec",
    "IsaFeatures",
    "PruningSpec",
    "QuantizationSpec",
    "RuntimeSpec",
    "builtin_profile_names",
    "load_profile",
    "parse_profile",
]

# Used with fullmatch: "^...$" with match() would let a trailing newline through.
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
KNOWN_PROVIDERS = (
    "CPUExecutionProvider",
    "XnnpackExecutionProvider",
    "CUDAExecutionProvider",
    "TensorrtExecutionProvider",
    "ArmNNExecutionProvider",
    "ACLExecutionProvider",
)


@dataclass(frozen=True)
class CpuCluster:
    """A group of identical cores (big.LITTLE boards have two)."""

    cores: tuple[int, ...]
    kind: Literal["big", "little", "uniform"] = "uniform"
    model: str = "unknown"
    max_mhz: int = 0

    def _validate(self) -> str | None:
        if not self.cores:
            return "cores: a cluster needs at least one core"
        if any(c < 0 or c > 1023 for c in self.cores):
            return "cores: core numbers must be 0..1023"
        if len(set(self.cores)) != len(self.cores):
            return "cores: a core is listed twice"
        if self.max_mhz < 0 or self.max_mhz > 10000:
            return "max_mhz: expected 0..10000 (0 = unknown)"
        return None


@dataclass(frozen=True)
class IsaFeatures:
    """Instruction-set features the quantization recipe can rely on."""

    neon: bool = False
    dotprod: bool = False
    i8mm: bool = False
    fp16: bool = False
    avx2: bool = False
    avx512_vnni: bool = False


@dataclass(frozen=True)
class CpuSpec:
    """CPU topology and the inference thread budget."""

    cluster: tuple[CpuCluster, ...]
    threads: int = 0  # 0 = all cores of the fastest cluster

    def _validate(self) -> str | None:
        if not self.cluster:
            return "cluster: at least one [[cpu.cluster]] is needed"
        cores = [c for cl in self.cluster for c in cl.cores]
        if len(set(cores)) != len(cores):
            return "cluster: a core belongs to two clusters"
        if self.threads < 0 or self.threads > len(cores):
            return f"threads: expected 0..{len(cores)} (0 = size of the fastest cluster)"
        return None

    @property
    def core_count(self) -> int:
        """Number of cores over all clusters."""
        return sum(len(c.cores) for c in self.cluster)

    @property
    def big_cores(self) -> tuple[int, ...]:
        """Cores of the fastest cluster (by kind, then max frequency)."""
        rank = {"big": 2, "uniform": 1, "little": 0}
        best = max(self.cluster, key=lambda c: (rank[c.kind], c.max_mhz, len(c.cores)))
        return best.cores

    @property
    def inference_threads(self) -> int:
        """Intra-op threads: the configured count, or the size of the fastest cluster."""
        return self.threads or len(self.big_cores)


@dataclass(frozen=True)
class QuantizationSpec:
    """How the toolchain compresses a model for this device class."""

    mode: Literal["static", "dynamic", "fp16", "none"] = "static"
    format: Literal["qdq", "qoperator"] = "qdq"
    activation_type: Literal["int8", "uint8"] = "int8"
    weight_type: Literal["int8", "uint8"] = "int8"
    per_channel: bool = True
    reduce_range: bool = False
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    calibration_samples: int = 128

    def _validate(self) -> str | None:
        if self.calibration_samples < 1 or self.calibration_samples > 100_000:
            return "calibration_samples: expected 1..100000"
        return None


@dataclass(frozen=True)
class PruningSpec:
    """Default pruning applied to PyTorch inputs (ONNX inputs are not pruned)."""

    method: Literal["none", "magnitude", "structured"] = "none"
    amount: float = 0.0

    def _validate(self) -> str | None:
        if not 0.0 <= self.amount < 1.0:
            return "amount: expected a fraction in [0, 1)"
        if self.method != "none" and self.amount == 0.0:
            return "amount: pruning method set but amount is 0"
        return None


@dataclass(frozen=True)
class ExportSpec:
    """ONNX export settings."""

    opset: int = 17
    static_shapes: bool = True
    simplify: bool = True

    def _validate(self) -> str | None:
        if not 11 <= self.opset <= 23:
            return "opset: expected 11..23"
        return None


@dataclass(frozen=True)
class Budgets:
    """Gates a candidate model must pass; latency is judged on the device class, not the host."""

    max_model_mb: float = 100.0
    latency_ms_p95: float = 1000.0
    max_accuracy_drop: float = 1.0  # percentage points of top-1
    min_agreement: float = 0.97  # share of top-1 (or thresholded) outputs equal to FP32
    min_cosine: float = 0.98

    def _validate(self) -> str | None:
        if self.max_model_mb <= 0:
            return "max_model_mb: expected a positive number"
        if self.latency_ms_p95 <= 0:
            return "latency_ms_p95: expected a positive number"
        if not 0 <= self.max_accuracy_drop <= 100:
            return "max_accuracy_drop: expected percentage points 0..100"
        if not 0 <= self.min_agreement <= 1:
            return "min_agreement: expected a fraction 0..1"
        if not -1 <= self.min_cosine <= 1:
            return "min_cosine: expected -1..1"
        return None


@dataclass(frozen=True)
class RuntimeSpec:
    """Session settings the device runtime applies."""

    inter_op_threads: int = 1
    spinning: bool = False
    pin_threads: bool = True
    optimized_model_cache: bool = True

    def _validate(self) -> str | None:
        if not 1 <= self.inter_op_threads <= 64:
            return "inter_op_threads: expected 1..64"
        return None


@dataclass(frozen=True)
class DeviceProfile:
    """A device class: topology, ISA, memory, accelerator, backend, recipes and budgets."""

    name: str
    arch: Literal["aarch64", "armv7l", "x86_64"]
    cpu: CpuSpec
    memory_mb: int
    description: str = ""
    isa: IsaFeatures = field(default_factory=IsaFeatures)
    accelerator: Literal["none", "cuda", "tensorrt"] = "none"
    backend: Literal["onnxruntime", "tflite"] = "onnxruntime"
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    quantization: QuantizationSpec = field(default_factory=QuantizationSpec)
    pruning: PruningSpec = field(default_factory=PruningSpec)
    export: ExportSpec = field(default_factory=ExportSpec)
    budgets: Budgets = field(default_factory=Budgets)
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)

    def _validate(self) -> str | None:
        if not _NAME.fullmatch(self.name):
            return "name: use 1-64 lower-case letters, digits, '.', '_' or '-'"
        if not 16 <= self.memory_mb <= 1_048_576:
            return "memory_mb: expected 16..1048576"
        if not self.execution_providers:
            return "execution_providers: list at least one provider"
        for ep in self.execution_providers:
            if ep not in KNOWN_PROVIDERS:
                known = ", ".join(KNOWN_PROVIDERS)
                return f"execution_providers: unknown provider {ep!r} (known: {known})"
        if len(set(self.execution_providers)) != len(self.execution_providers):
            return "execution_providers: a provider is listed twice"
        if self.execution_providers[-1] != "CPUExecutionProvider":
            return "execution_providers: CPUExecutionProvider must be listed as the last fallback"
        if self.arch != "x86_64" and (self.isa.avx2 or self.isa.avx512_vnni):
            return "isa: avx2/avx512_vnni are x86 features"
        if self.arch == "x86_64" and (self.isa.neon or self.isa.dotprod or self.isa.i8mm):
            return "isa: neon/dotprod/i8mm are ARM features"
        gpu = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        if self.accelerator == "none" and any(ep in gpu for ep in self.execution_providers):
            return "execution_providers: CUDA/TensorRT listed but accelerator is 'none'"
        return None

    @property
    def digest(self) -> str:
        """sha256 of the canonical JSON form; bundles record it."""
        blob = json.dumps(to_dict(self), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def to_dict(self) -> dict[str, object]:
        """Plain form (JSON-ready)."""
        out: dict[str, object] = to_dict(self)
        return out


def parse_profile(data: object, *, path: str | Path = "<profile>") -> DeviceProfile:
    """Validate a decoded TOML mapping as a device profile."""
    if not isinstance(data, dict):
        raise ProfileError("expected a TOML table", path=path)
    return from_dict(DeviceProfile, data, path=path, error=ProfileError)


def builtin_profile_names() -> list[str]:
    """Names of the profiles shipped in ``device_profiles/``."""
    root = resources.files("device_profiles")
    return sorted(p.name[: -len(".toml")] for p in root.iterdir() if p.name.endswith(".toml"))


def _is_path(name_or_path: str | Path) -> bool:
    """A ``Path``, or text that names a file (``.toml`` suffix or a directory part), not a name."""
    if isinstance(name_or_path, Path):
        return True
    return name_or_path.endswith(".toml") or "/" in name_or_path or os.sep in name_or_path


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """Load a shipped profile by name (``rpi4``) or any profile file by path (``./lab.toml``).

    A shipped file's stem must equal its ``name`` key so a profile is never mistaken for another.
    A name never reads a file from the working directory: give a path for that.
    """
    text = str(name_or_path)
    if _is_path(name_or_path):
        path = Path(text)
        data = load_toml(path, ProfileError)
        profile = parse_profile(data, path=path.name if path.parent == Path(".") else path)
        return profile
    if not _NAME.fullmatch(text):
        raise ProfileError(f"not a profile name or .toml path: {text!r}")
    resource = resources.files("device_profiles") / f"{text}.toml"
    if not resource.is_file():
        known = ", ".join(builtin_profile_names())
        raise ProfileError(f"unknown profile {text!r} (known: {known}; or give a path to a .toml file)")
    filename = f"{text}.toml"
    data = loads_toml(resource.read_text(encoding="utf-8"), path=filename, error=ProfileError)
    profile = parse_profile(data, path=filename)
    if profile.name != text:
        message = f"{profile.name!r} differs from the file name; rename one"
        raise ProfileError(message, path=filename, key="name")
    return profile
