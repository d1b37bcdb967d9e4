"""The service configuration (`/etc/edge-runtime/config.toml`): typed, validated, with EDGE_* overrides.

Every key is optional except ``bundle`` and ``trusted_keys``; an unknown key or a bad value is a
:class:`~runtime.errors.ConfigError` naming the file and key (exit 2, and systemd does not restart).
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from runtime.errors import ConfigError
from runtime.schema import from_dict, load_toml

__all__ = [
    "CacheSection",
    "EscalationSection",
    "HealthSection",
    "HttpSection",
    "LogbookSection",
    "ModelsSection",
    "MqttSection",
    "RolloutSection",
    "ServiceConfig",
    "SourceSection",
    "ThreadsSection",
    "WatchdogSection",
    "load_config",
]


@dataclass(frozen=True)
class ThreadsSection:
    """Inference thread budget: 0 = the plan's choice (big cluster / all but one core)."""

    inference: int = 0
    reserve_io_core: Literal["auto", "yes", "no"] = "auto"

    def _validate(self) -> str | None:
        return "inference: expected 0..256" if not 0 <= self.inference <= 256 else None


@dataclass(frozen=True)
class LogbookSection:
    """SQLite logbook: where, how often it commits, how big it may grow."""

    path: str = ""  # default: <state_dir>/logbook.sqlite
    flush_interval_s: float = 0.5
    durable: bool = False  # true: every record is committed before the inference returns (zero loss)
    soft_cap_mb: float = 256.0
    hard_cap_mb: float = 512.0

    def _validate(self) -> str | None:
        if not 0.0 < self.flush_interval_s <= 60.0:
            return "flush_interval_s: expected 0 < s <= 60"
        if not 0 < self.soft_cap_mb <= self.hard_cap_mb:
            return "hard_cap_mb: expected 0 < soft_cap_mb <= hard_cap_mb"
        return None


@dataclass(frozen=True)
class SourceSection:
    """Where inputs come from in `serve` (the HTTP endpoint is separate and can run alongside)."""

    kind: Literal["none", "directory", "video", "camera"] = "none"
    path: str = ""  # directory or video file
    camera: int = 0
    max_fps: float = 15.0
    realtime: bool = True  # video files: skip frames when inference falls behind (false: every frame)
    after: Literal["keep", "move", "delete"] = "move"  # directory: what to do with processed files
    smoothing_window: int = 0  # video: average class scores over the last N frames (0 = off)

    def _validate(self) -> str | None:
        if self.kind in ("directory", "video") and not self.path:
            return f"path: a {self.kind} source needs a path"
        if not 0.0 < self.max_fps <= 1000.0:
            return "max_fps: expected 0 < fps <= 1000"
        if not 0 <= self.smoothing_window <= 1000:
            return "smoothing_window: expected 0..1000"
        return None


@dataclass(frozen=True)
class HttpSection:
    """Local inference endpoint for other programs on the device."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8470
    max_body_kb: int = 8192
    rate_limit_per_s: float = 50.0
    burst: int = 20

    def _validate(self) -> str | None:
        if not 0 <= self.port <= 65535:
            return "port: expected 0..65535"
        if self.host not in ("127.0.0.1", "localhost", "::1"):
            return "host: the endpoint serves this device only; use 127.0.0.1 (or ::1)"
        if self.max_body_kb < 1 or self.rate_limit_per_s <= 0 or self.burst < 1:
            return "max_body_kb: limits must be positive"
        return None


@dataclass(frozen=True)
class HealthSection:
    """Periodic health records and the frame-rate policy under heat or load."""

    interval_s: float = 10.0
    temp_limit_c: float = 80.0
    min_fps: float = 1.0

    def _validate(self) -> str | None:
        return "interval_s: expected 0.1..3600" if not 0.1 <= self.interval_s <= 3600 else None


@dataclass(frozen=True)
class CacheSection:
    """LRU cache of results keyed by input digest (0 = off)."""

    size: int = 0

    def _validate(self) -> str | None:
        return "size: expected 0..1000000" if not 0 <= self.size <= 1_000_000 else None


@dataclass(frozen=True)
class WatchdogSection:
    """The loop counts as stalled after this long without progress; keep it below WatchdogSec."""

    stall_after_s: float = 20.0

    def _validate(self) -> str | None:
        return "stall_after_s: expected 0.1..3600" if not 0.1 <= self.stall_after_s <= 3600 else None


@dataclass(frozen=True)
class MqttSection:
    """Store-and-forward sync and the signed command channel (off: the device works offline only)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 1883
    protocol: Literal["auto", "mqtt5", "mqtt311"] = "auto"
    keepalive_s: int = 30
    username: str = ""
    password_file: str = ""  # a file holding the password (kept out of the config)
    ca_file: str = ""  # TLS is on when a CA or client certificate is given
    cert_file: str = ""
    key_file: str = ""
    batch_size: int = 200
    linger_ms: int = 50  # a partial batch waits this long after the previous one (fewer, fuller batches)
    compress: bool = False
    operator_keys: tuple[str, ...] = ()  # keys trusted for commands; () = trusted_keys

    def _validate(self) -> str | None:
        if not 1 <= self.port <= 65535:
            return "port: expected 1..65535"
        if not 1 <= self.batch_size <= 10000:
            return "batch_size: expected 1..10000"
        if not 0 <= self.linger_ms <= 10000:
            return "linger_ms: expected 0..10000"
        if self.key_file and not self.cert_file:
            return "key_file: needs cert_file too"
        if self.password_file and not self.username:
            return "password_file: needs username too"
        return None


@dataclass(frozen=True)
class EscalationSection:
    """Ask a bigger server-side model over MQTT 5 when the local top-1 score is under ``threshold``."""

    enabled: bool = False
    model: str = ""  # the server-side model (edge/<fleet>/escalate/<model>); "" = the bundle's name
    threshold: float = 0.6  # top-1 scores below this are escalated (above 1 with softmax: every result)
    timeout_s: float = 2.0  # the inference waits at most this long, then keeps the local result
    breaker_failures: int = 3  # failures in a row that open the circuit breaker
    breaker_reset_s: float = 30.0  # an open breaker lets one trial request through after this long
    max_request_kb: int = 1024

    def _validate(self) -> str | None:
        if not math.isfinite(self.threshold):
            return "threshold: expected a finite number"
        if not 0.01 <= self.timeout_s <= 60.0:
            return "timeout_s: expected 0.01..60"
        if not 1 <= self.breaker_failures <= 1000:
            return "breaker_failures: expected 1..1000"
        if not 0.1 <= self.breaker_reset_s <= 86400.0:
            return "breaker_reset_s: expected 0.1..86400"
        if not 4 <= self.max_request_kb <= 65536:
            return "max_request_kb: expected 4..65536"
        return None


@dataclass(frozen=True)
class ModelsSection:
    """The on-device model store (`<state_dir>/models`) and crash-loop rollback of a new version."""

    keep: int = 3  # versions held per model name; the active and previous ones are never collected
    crash_limit: int = 3  # this many starts of a not-yet-good version within crash_window_s → revert
    crash_window_s: float = 600.0
    good_after_s: float = 120.0  # serving this long without a crash marks the active version good

    def _validate(self) -> str | None:
        if not 1 <= self.keep <= 1000:
            return "keep: expected 1..1000 (the active and previous versions are always kept)"
        if not 1 <= self.crash_limit <= 1000:
            return "crash_limit: expected 1..1000 starts"
        if not 1.0 <= self.crash_window_s <= 604800.0:
            return "crash_window_s: expected 1..604800 seconds"
        if not 0.0 <= self.good_after_s <= 86400.0:
            return "good_after_s: expected 0..86400 seconds"
        return None


@dataclass(frozen=True)
class RolloutSection:
    """Defaults of a `model.deploy` that does not set them: the gates and the shares of traffic a candidate sees."""

    min_samples: int = 30  # candidate runs per stage before the gates are judged
    max_p95_ratio: float = 1.5  # candidate p95 latency ÷ active p95 latency
    min_agreement: float = 0.9  # share of inputs where the candidate agrees with the active model
    max_error_rate: float = 0.02  # candidate runs that raised (engine, pre- or post-processing)
    max_duration_s: float = 600.0  # per stage: fewer than min_samples by then → rolled back (timeout)
    shadow_share: float = 1.0  # share of served inputs the candidate also runs on in shadow
    canary_share: float = 0.1  # share of requests the candidate serves in canary
    shadow_queue: int = 8  # shadow inputs waiting for the candidate; more are dropped, never waited for

    def _validate(self) -> str | None:
        from runtime.rollout import Gates

        gates = Gates(
            self.min_samples, self.max_p95_ratio, self.min_agreement, self.max_error_rate, self.max_duration_s
        )
        problem = gates._validate()
        if problem:
            return problem
        if not 0.0 < self.shadow_share <= 1.0:
            return "shadow_share: expected 0 < share <= 1"
        if not 0.0 < self.canary_share <= 1.0:
            return "canary_share: expected 0 < share <= 1"
        if not 1 <= self.shadow_queue <= 1024:
            return "shadow_queue: expected 1..1024"
        return None


@dataclass(frozen=True)
class ServiceConfig:
    """Everything `edge-runtime serve` needs."""

    bundle: str
    trusted_keys: tuple[str, ...]
    device_id: str = ""  # default: the host name
    fleet: str = "default"
    group: str = ""
    state_dir: str = "/var/lib/edge-runtime"
    cache_dir: str = ""  # default: <state_dir>/cache
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    providers: tuple[str, ...] = ()  # execution providers in order; () = the bundle's profile's
    warmup_runs: int = 3
    max_consecutive_failures: int = 10
    threads: ThreadsSection = field(default_factory=ThreadsSection)
    logbook: LogbookSection = field(default_factory=LogbookSection)
    source: SourceSection = field(default_factory=SourceSection)
    http: HttpSection = field(default_factory=HttpSection)
    health: HealthSection = field(default_factory=HealthSection)
    cache: CacheSection = field(default_factory=CacheSection)
    watchdog: WatchdogSection = field(default_factory=WatchdogSection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    escalation: EscalationSection = field(default_factory=EscalationSection)
    models: ModelsSection = field(default_factory=ModelsSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)

    def _validate(self) -> str | None:
        if self.escalation.enabled and not self.mqtt.enabled:
            return "escalation.enabled: escalation talks MQTT; set [mqtt] enabled = true too"
        if self.escalation.enabled and self.escalation.timeout_s >= self.watchdog.stall_after_s:
            return "escalation.timeout_s: must be below watchdog.stall_after_s (the wait counts as inference time)"
        if not self.trusted_keys:
            return "trusted_keys: list at least one public key file (bundles are always verified)"
        if not 0 <= self.warmup_runs <= 1000:
            return "warmup_runs: expected 0..1000"
        if not 1 <= self.max_consecutive_failures <= 1_000_000:
            return "max_consecutive_failures: expected >= 1"
        return None

    @property
    def device(self) -> str:
        """The device id (config, else host name)."""
        return self.device_id or socket.gethostname()

    @property
    def state_path(self) -> Path:
        """State directory."""
        return Path(self.state_dir)

    @property
    def logbook_path(self) -> Path:
        """SQLite logbook file."""
        return Path(self.logbook.path) if self.logbook.path else self.state_path / "logbook.sqlite"

    @property
    def cache_path(self) -> Path:
        """Optimized-model cache directory."""
        return Path(self.cache_dir) if self.cache_dir else self.state_path / "cache"


_ENV = {
    "EDGE_BUNDLE": "bundle",
    "EDGE_DEVICE_ID": "device_id",
    "EDGE_FLEET": "fleet",
    "EDGE_STATE_DIR": "state_dir",
    "EDGE_CACHE_DIR": "cache_dir",
    "EDGE_LOG_LEVEL": "log_level",
}


def _overrides(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # systemd's StateDirectory=/CacheDirectory= hand us the real paths
    if env.get("STATE_DIRECTORY"):
        out["state_dir"] = env["STATE_DIRECTORY"].split(":")[0]
    if env.get("CACHE_DIRECTORY"):
        out["cache_dir"] = env["CACHE_DIRECTORY"].split(":")[0]
    for var, key in _ENV.items():
        if env.get(var):
            out[key] = env[var]
    return out


def _with_remote_settings(cfg: ServiceConfig, data: dict[str, Any], path: Path) -> ServiceConfig:
    """Lay the settings `config.set` persisted in the state dir over the file's; a bad set is ignored, logged."""
    import logging

    from runtime.command_handlers import merge_overrides, read_overrides

    try:
        overrides = read_overrides(cfg.state_dir)
    except ConfigError as exc:
        logging.getLogger(__name__).error("ignoring remote settings: %s", exc)
        return cfg
    if not overrides:
        return cfg
    try:
        return from_dict(ServiceConfig, merge_overrides(data, overrides), path=path)
    except ConfigError as exc:
        logging.getLogger(__name__).error("ignoring remote settings (%s): %s", Path(cfg.state_dir), exc)
        return cfg


def load_config(path: str | Path, *, env: Mapping[str, str] | None = None) -> ServiceConfig:
    """Read, validate and apply environment overrides; relative paths resolve against the file's folder."""
    p = Path(path)
    data = load_toml(p)
    data.update(_overrides(os.environ if env is None else env))
    cfg = from_dict(ServiceConfig, data, path=p)
    cfg = _with_remote_settings(cfg, data, p)
    base = p.parent
    keys = tuple(str(base / k) if not Path(k).is_absolute() else k for k in cfg.trusted_keys)
    bundle = cfg.bundle if Path(cfg.bundle).is_absolute() else str(base / cfg.bundle)
    cfg = replace(cfg, trusted_keys=keys, bundle=bundle, mqtt=_resolve_mqtt(cfg.mqtt, base, p))
    for k in cfg.trusted_keys:
        if not Path(k).is_file():
            raise ConfigError(f"trusted key file not found: {k}", path=p, key="trusted_keys")
    return cfg


def _resolve_mqtt(m: MqttSection, base: Path, path: Path) -> MqttSection:
    """MQTT credential files: relative to the config file's folder, and they must exist when MQTT is on."""

    def resolve(value: str) -> str:
        return value if not value or Path(value).is_absolute() else str(base / value)

    m = replace(
        m,
        ca_file=resolve(m.ca_file),
        cert_file=resolve(m.cert_file),
        key_file=resolve(m.key_file),
        password_file=resolve(m.password_file),
        operator_keys=tuple(resolve(k) for k in m.operator_keys),
    )
    if m.enabled:
        for key in ("ca_file", "cert_file", "key_file", "password_file"):
            value = getattr(m, key)
            if value and not Path(value).is_file():
                raise ConfigError(f"file not found: {value}", path=path, key=f"mqtt.{key}")
        for k in m.operator_keys:
            if not Path(k).is_file():
                raise ConfigError(f"operator key file not found: {k}", path=path, key="mqtt.operator_keys")
    return m
