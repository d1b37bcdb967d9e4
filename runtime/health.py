"""Device health (CPU, memory, SoC temperature, Pi throttling, Jetson zones) and the frame-rate policy under it.

:func:`read_health` reads psutil plus sysfs under a ``root`` (``/`` on a device, a fake tree in
tests). Some sysfs reads can be slow (an offline thermal zone, the Pi firmware mailbox), so call
it from an I/O thread, never from the inference loop. :class:`RateGovernor` turns health,
inference latency and source lag into a target frame rate and says why it changed.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["Health", "RateDecision", "RateGovernor", "ThrottleFlags", "read_health", "read_thermal_zones"]

_log = logging.getLogger(__name__)

_MIB = 1024.0 * 1024.0
_THROTTLED_FILE = "sys/devices/platform/soc/soc:firmware/get_throttled"
_THERMAL_DIR = "sys/class/thermal"
# Jetson's "PMIC-Die" zone is a fixed 100 °C placeholder, not a measurement (NVIDIA forum
# "thermal_zone4 reports 100 degree celcius", balena-os/balena-jetson#142): counting it would
# throttle every Jetson forever.
_FAKE_ZONES = frozenset({"PMIC-Die"})
# Plausible die temperatures; offline zones (the CV/DLA zones of an Orin Nano) report
# sentinels such as -256 °C.
_TEMP_RANGE_C = (-40.0, 150.0)


@dataclass(frozen=True)
class ThrottleFlags:
    """Raspberry Pi firmware throttling state (``vcgencmd get_throttled``) as named booleans.

    Bit meanings, from the Raspberry Pi documentation (raspberrypi.com/documentation/computers/
    os.html#get_throttled) and the firmware sysfs patch (raspberrypi/linux, "firmware/raspberrypi:
    Add a get_throttled sysfs file", 2018): 0 under-voltage detected, 1 ARM frequency capped,
    2 currently throttled, 3 soft temperature limit active; 16–19 the same four "has occurred"
    since boot. (Some widely copied scripts swap 17 and 18; the documentation does not.)
    """

    raw: int
    under_voltage: bool
    freq_capped: bool
    throttled: bool
    soft_temp_limit: bool
    under_voltage_occurred: bool
    freq_capped_occurred: bool
    throttled_occurred: bool
    soft_temp_limit_occurred: bool

    @classmethod
    def from_bits(cls, raw: int) -> ThrottleFlags:
        """Decode the bitmask."""

        def bit(n: int) -> bool:
            return bool(raw >> n & 1)

        return cls(raw, bit(0), bit(1), bit(2), bit(3), bit(16), bit(17), bit(18), bit(19))

    @classmethod
    def parse(cls, text: str) -> ThrottleFlags | None:
        """Parse sysfs (``50005``) or vcgencmd (``throttled=0x50005``) text; None when it is not a bitmask.

        The kernel prints the value with ``%x``: digits without ``0x`` are hex, never decimal.
        """
        value = text.strip().removeprefix("throttled=").strip()
        if not re.fullmatch(r"(0[xX])?[0-9a-fA-F]{1,8}", value):
            return None
        return cls.from_bits(int(value, 16))

    @property
    def active(self) -> bool:
        """True when any condition holds right now (bits 0–3)."""
        return bool(self.raw & 0xF)

    def now(self) -> tuple[str, ...]:
        """Names of the conditions that hold right now, for log lines."""
        names = ("under-voltage", "ARM frequency capped", "throttled", "soft temperature limit")
        flags = (self.under_voltage, self.freq_capped, self.throttled, self.soft_temp_limit)
        return tuple(n for n, on in zip(names, flags, strict=True) if on)


@dataclass(frozen=True)
class Health:
    """One health sample. Memory in MiB; temperatures in °C; ``temp_c`` is the hottest real zone."""

    cpu_percent: float
    load_1m: float
    mem_used_mb: float
    mem_available_mb: float
    mem_percent: float
    rss_mb: float
    temp_c: float | None
    zones: dict[str, float]
    throttled: ThrottleFlags | None

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form for the logbook and ``status``."""
        return asdict(self)


def _zone_index(path: Path) -> int:
    digits = path.name.removeprefix("thermal_zone")
    return int(digits) if digits.isdigit() else 1 << 30


def read_thermal_zones(root: Path = Path("/")) -> dict[str, float]:
    """``{type: °C}`` for every readable thermal zone, e.g. ``CPU-therm``, ``GPU-therm`` on a Jetson.

    Placeholder zones (``PMIC-Die``) and implausible readings are left out; a second zone with
    the same type is keyed ``type.N`` (N = its zone number).
    """
    base = root / _THERMAL_DIR
    try:
        entries = sorted(base.glob("thermal_zone*"), key=_zone_index)
    except OSError:
        return {}
    zones: dict[str, float] = {}
    for zone in entries:
        try:
            kind = (zone / "type").read_text(encoding="ascii", errors="replace").strip()
            temp_c = int((zone / "temp").read_text(encoding="ascii").strip()) / 1000.0
        except (OSError, ValueError):
            continue  # offline zones fail reads with EINVAL/ENODATA/EAGAIN
        if kind in _FAKE_ZONES or not _TEMP_RANGE_C[0] <= temp_c <= _TEMP_RANGE_C[1]:
            continue
        key = kind or zone.name
        if key in zones:
            key = f"{key}.{_zone_index(zone)}"
        zones[key] = temp_c
    return zones


def _read_throttled(root: Path) -> ThrottleFlags | None:
    try:
        text = (root / _THROTTLED_FILE).read_text(encoding="ascii", errors="replace")
    except OSError:
        return None  # not a Raspberry Pi, or a kernel without the firmware attribute
    flags = ThrottleFlags.parse(text)
    if flags is None:
        _log.debug("ignoring unparsable %s: %r", _THROTTLED_FILE, text[:40])
    return flags


def read_health(root: Path = Path("/")) -> Health:
    """Sample CPU, memory and this process's RSS (psutil) and thermal/throttle state (sysfs under ``root``).

    ``cpu_percent`` covers the time since the previous call (psutil keeps the reference point;
    the first call in a process returns 0.0).
    """
    import psutil  # device extra; lazily so the governor works on a bare install

    vm = psutil.virtual_memory()
    zones = read_thermal_zones(root)
    return Health(
        cpu_percent=float(psutil.cpu_percent(interval=None)),
        load_1m=float(os.getloadavg()[0]),
        mem_used_mb=float(vm.used) / _MIB,
        mem_available_mb=float(vm.available) / _MIB,
        mem_percent=float(vm.percent),
        rss_mb=float(psutil.Process().memory_info().rss) / _MIB,
        temp_c=max(zones.values()) if zones else None,
        zones=zones,
        throttled=_read_throttled(root),
    )


@dataclass(frozen=True)
class RateDecision:
    """The target frame rate after a tick; ``reason`` is set only on the tick that changed it."""

    fps: float
    reason: str | None = None


def _fmt(fps: float) -> str:
    return f"{fps:.1f}".removesuffix(".0")


class RateGovernor:
    """Lowers the frame rate when the device throttles or falls behind, and raises it back slowly.

    Policy, evaluated on every :meth:`tick`:

    * **Pressure** is any of: the Pi firmware reports a condition *now* (under-voltage, frequency
      cap, throttling, soft temperature limit); the hottest zone is at or above ``temp_limit_c``;
      the loop falls behind — it trails the source by more than two frame periods
      (``lag_s > 2 / fps``) or more than two frames wait (``backlog > 2``).
    * Under pressure the rate **halves**, down to ``min_fps``. Another halving waits ``settle_s``
      so the previous cut can take effect (a backlog drains, a die cools).
    * After ``recover_after_s`` without pressure the rate rises by ``recover_factor`` (×1.25),
      then waits ``recover_after_s`` again; it never exceeds ``max_fps`` nor the rate inference
      can sustain (``1 / latency_s``, when given).

    Each change is logged (a cut as a warning) and returned as :attr:`RateDecision.reason`.
    Pure logic: pass ``clock`` to drive it from a fake time source in tests.
    """

    def __init__(
        self,
        max_fps: float,
        *,
        min_fps: float = 1.0,
        temp_limit_c: float = 80.0,
        recover_after_s: float = 30.0,
        settle_s: float = 5.0,
        recover_factor: float = 1.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < min_fps <= max_fps or not math.isfinite(max_fps):
            raise ValueError(f"RateGovernor: expected 0 < min_fps <= max_fps, got {min_fps!r}, {max_fps!r}")
        if recover_after_s < 0 or settle_s < 0 or not recover_factor > 1:
            raise ValueError("RateGovernor: expected recover_after_s >= 0, settle_s >= 0, recover_factor > 1")
        self.max_fps = float(max_fps)
        self.min_fps = float(min_fps)
        self.temp_limit_c = float(temp_limit_c)
        self.recover_after_s = float(recover_after_s)
        self.settle_s = float(settle_s)
        self.recover_factor = float(recover_factor)
        self._clock = clock
        self._fps = self.max_fps
        self._last_cut: float | None = None
        self._calm_since: float | None = None

    @property
    def fps(self) -> float:
        """The current target frame rate."""
        return self._fps

    def tick(
        self, health: Health | None, *, latency_s: float | None = None, lag_s: float = 0.0, backlog: int = 0
    ) -> RateDecision:
        """Feed one observation; returns the target rate and, when it changed, why."""
        now = self._clock()
        causes = self._pressure(health, lag_s, backlog)
        if causes:
            self._calm_since = None
            settled = self._last_cut is None or now - self._last_cut >= self.settle_s
            if self._fps > self.min_fps and settled:
                self._last_cut = now
                return self._change(max(self.min_fps, self._fps / 2.0), "; ".join(causes))
            return RateDecision(self._fps)
        if self._calm_since is None:
            self._calm_since = now
        if now - self._calm_since < self.recover_after_s:
            return RateDecision(self._fps)
        self._calm_since = now
        ceiling, why = self.max_fps, ""
        if latency_s is not None and latency_s > 0 and 1.0 / latency_s < ceiling:
            ceiling = max(self.min_fps, 1.0 / latency_s)
            why = f", capped by {latency_s * 1000:.0f} ms inference"
        target = min(ceiling, self._fps * self.recover_factor)
        if target <= self._fps * 1.001:
            return RateDecision(self._fps)
        return self._change(target, f"no heat, throttling or backlog for {self.recover_after_s:g} s{why}")

    def _pressure(self, health: Health | None, lag_s: float, backlog: int) -> list[str]:
        causes = []
        if health is not None and health.throttled is not None and health.throttled.active:
            causes.append("firmware reports " + ", ".join(health.throttled.now()))
        if health is not None and health.temp_c is not None and health.temp_c >= self.temp_limit_c:
            causes.append(f"SoC {health.temp_c:.1f} °C ≥ {self.temp_limit_c:g} °C")
        period = 1.0 / self._fps
        if lag_s > 2.0 * period:
            causes.append(f"falling behind: lag {lag_s:.3f} s > 2 frames ({2.0 * period:.3f} s)")
        elif backlog > 2:
            causes.append(f"falling behind: {backlog} frames waiting")
        return causes

    def _change(self, fps: float, cause: str) -> RateDecision:
        reason = f"{cause}: frame rate {_fmt(self._fps)} → {_fmt(fps)} fps"
        _log.log(logging.WARNING if fps < self._fps else logging.INFO, "%s", reason)
        self._fps = fps
        return RateDecision(fps, reason)
