"""Health from fake sysfs trees (Raspberry Pi, Jetson, a bare machine) and the frame-rate policy."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.health import Health, RateGovernor, ThrottleFlags, read_health, read_thermal_zones

THROTTLED = "sys/devices/platform/soc/soc:firmware/get_throttled"


def _zone(root: Path, n: int, kind: str, millideg: str | None) -> None:
    d = root / "sys/class/thermal" / f"thermal_zone{n}"
    d.mkdir(parents=True)
    (d / "type").write_text(kind + "\n")
    if millideg is not None:
        (d / "temp").write_text(millideg + "\n")


@pytest.fixture
def pi(tmp_path: Path) -> Path:
    """A Raspberry Pi 4 under a weak power supply: sysfs prints get_throttled with %x (no 0x)."""
    _zone(tmp_path, 0, "cpu-thermal", "82354")
    (tmp_path / THROTTLED).parent.mkdir(parents=True)
    (tmp_path / THROTTLED).write_text("50005\n")
    return tmp_path


@pytest.fixture
def jetson(tmp_path: Path) -> Path:
    """Jetson Nano zone names (tegra210), plus the Orin-style offline zones and a duplicate type."""
    for n, (kind, temp) in enumerate(
        [
            ("AO-therm", "41500"),
            ("CPU-therm", "47500"),
            ("GPU-therm", "45000"),
            ("PLL-therm", "43000"),
            ("PMIC-Die", "100000"),  # a fixed placeholder, not a sensor
            ("thermal-fan-est", "45600"),
            ("cv0-thermal", "-256000"),  # offline zone sentinel
            ("cv1-thermal", None),  # offline zone: temp unreadable
            ("CPU-therm", "46000"),
        ]
    ):
        _zone(tmp_path, n, kind, temp)
    return tmp_path


def test_pi_throttling_and_temperature(pi: Path) -> None:
    h = read_health(pi)
    assert h.zones == {"cpu-thermal": pytest.approx(82.354)}
    assert h.temp_c == pytest.approx(82.354)
    t = h.throttled
    assert t is not None and t.raw == 0x50005
    assert t.under_voltage and t.throttled and not t.freq_capped and not t.soft_temp_limit
    assert t.under_voltage_occurred and t.throttled_occurred
    assert not t.freq_capped_occurred and not t.soft_temp_limit_occurred
    assert t.active and t.now() == ("under-voltage", "throttled")


def test_jetson_zones_by_type_name(jetson: Path) -> None:
    zones = read_thermal_zones(jetson)
    assert zones == {
        "AO-therm": 41.5,
        "CPU-therm": 47.5,
        "GPU-therm": 45.0,
        "PLL-therm": 43.0,
        "thermal-fan-est": 45.6,
        "CPU-therm.8": 46.0,
    }
    h = read_health(jetson)
    assert h.temp_c == 47.5  # not PMIC-Die's 100 °C
    assert h.throttled is None


def test_machine_without_sensors(tmp_path: Path) -> None:
    h = read_health(tmp_path)
    assert h.zones == {} and h.temp_c is None and h.throttled is None


def test_psutil_values_are_sane_on_this_host(tmp_path: Path) -> None:
    read_health(tmp_path)  # primes psutil's cpu_percent reference point
    h = read_health(tmp_path)
    assert 0.0 <= h.cpu_percent <= 100.0
    assert h.load_1m >= 0.0
    assert h.mem_available_mb > 16 and h.mem_used_mb > 16
    assert 0.0 < h.mem_percent < 100.0
    assert 5.0 < h.rss_mb < h.mem_used_mb + h.mem_available_mb  # a Python process is >5 MiB
    d = h.to_dict()
    assert d["temp_c"] is None and d["zones"] == {} and set(d) >= {"cpu_percent", "rss_mb", "throttled"}


def test_health_to_dict_nests_throttle_flags(pi: Path) -> None:
    d = read_health(pi).to_dict()
    assert d["throttled"] == {**ThrottleFlags.from_bits(0x50005).__dict__}


@pytest.mark.parametrize(
    ("text", "raw"),
    [("50005\n", 0x50005), ("0x50005", 0x50005), ("throttled=0x80008\n", 0x80008), ("0", 0), ("10", 0x10)],
)
def test_throttle_parse_accepts_sysfs_and_vcgencmd(text: str, raw: int) -> None:
    flags = ThrottleFlags.parse(text)
    assert flags is not None and flags.raw == raw


def test_throttle_bits_16_to_19_are_the_occurred_flags() -> None:
    t = ThrottleFlags.from_bits(0xA0002)  # a real reading: capped now, capped and soft limit since boot
    assert t.freq_capped and not t.throttled
    assert t.freq_capped_occurred and t.soft_temp_limit_occurred and not t.throttled_occurred
    assert ThrottleFlags.from_bits(1 << 18).throttled_occurred and not ThrottleFlags.from_bits(1 << 18).active


@pytest.mark.parametrize("text", ["", "zz", "0x", "throttled=", "-5", "123456789", "5 0"])
def test_throttle_parse_rejects_garbage(text: str) -> None:
    assert ThrottleFlags.parse(text) is None


@given(st.text(max_size=40))
def test_throttle_parse_never_raises(text: str) -> None:
    flags = ThrottleFlags.parse(text)
    assert flags is None or 0 <= flags.raw < 1 << 32


def test_unparsable_get_throttled_is_ignored(tmp_path: Path) -> None:
    (tmp_path / THROTTLED).parent.mkdir(parents=True)
    (tmp_path / THROTTLED).write_bytes(b"\xff\xfe garbage")
    assert read_health(tmp_path).throttled is None


# --- RateGovernor --------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _health(temp_c: float | None = 50.0, throttled: int | None = None) -> Health:
    return Health(
        cpu_percent=50.0,
        load_1m=1.0,
        mem_used_mb=300.0,
        mem_available_mb=600.0,
        mem_percent=33.0,
        rss_mb=80.0,
        temp_c=temp_c,
        zones={} if temp_c is None else {"cpu-thermal": temp_c},
        throttled=None if throttled is None else ThrottleFlags.from_bits(throttled),
    )


@pytest.fixture
def clock() -> _Clock:
    return _Clock()


def test_heat_halves_the_rate_and_says_why(clock: _Clock, caplog: pytest.LogCaptureFixture) -> None:
    gov = RateGovernor(30, temp_limit_c=80, clock=clock)
    assert gov.tick(_health(70.0)).reason is None and gov.fps == 30
    with caplog.at_level(logging.WARNING, logger="runtime.health"):
        d = gov.tick(_health(82.0))
    assert d.fps == 15 and d.reason == "SoC 82.0 °C ≥ 80 °C: frame rate 30 → 15 fps"
    assert any(r.levelno == logging.WARNING and "30 → 15" in r.getMessage() for r in caplog.records)


def test_cuts_wait_for_the_previous_one_to_settle_and_stop_at_the_floor(clock: _Clock) -> None:
    gov = RateGovernor(30, min_fps=2, settle_s=5, clock=clock)
    hot = _health(85.0)
    assert gov.tick(hot).fps == 15
    clock.t += 1
    assert gov.tick(hot) == gov.tick(hot)  # within settle_s: no change, no reason
    assert gov.fps == 15
    rates = []
    for _ in range(6):
        clock.t += 5
        rates.append(gov.tick(hot).fps)
    assert rates == [7.5, 3.75, 2, 2, 2, 2]


def test_recovery_steps_up_by_a_quarter_after_calm(clock: _Clock) -> None:
    gov = RateGovernor(30, recover_after_s=30, clock=clock)
    gov.tick(_health(90.0))  # 30 → 15
    cool = _health(60.0)
    clock.t += 1
    gov.tick(cool)  # calm starts
    clock.t += 29.5
    assert gov.tick(cool).reason is None and gov.fps == 15
    clock.t += 0.5
    d = gov.tick(cool)
    assert d.fps == pytest.approx(18.75)
    assert d.reason == "no heat, throttling or backlog for 30 s: frame rate 15 → 18.8 fps"
    clock.t += 10
    assert gov.tick(cool).reason is None  # the next step waits another 30 s
    steps = []
    for _ in range(4):
        clock.t += 30
        steps.append(gov.tick(cool).fps)
    assert steps == [pytest.approx(23.4375), pytest.approx(29.296875), 30, 30]  # never above max


def test_a_hot_blip_restarts_the_calm_period(clock: _Clock) -> None:
    gov = RateGovernor(30, recover_after_s=30, settle_s=0, min_fps=1, clock=clock)
    gov.tick(_health(90.0))
    clock.t += 1
    gov.tick(_health(60.0))
    clock.t += 25
    gov.tick(_health(81.0))  # pressure again: 15 → 7.5 and the calm clock resets
    assert gov.fps == 7.5
    clock.t += 1
    gov.tick(_health(60.0))
    clock.t += 20
    assert gov.tick(_health(60.0)).reason is None
    clock.t += 10
    assert gov.tick(_health(60.0)).fps == pytest.approx(9.375)


def test_falling_behind_by_lag_or_backlog(clock: _Clock) -> None:
    gov = RateGovernor(30, settle_s=0, clock=clock)
    assert gov.tick(None, lag_s=0.06).reason is None  # 1.8 frames behind at 30 fps: fine
    d = gov.tick(None, lag_s=0.1)
    assert (
        d.fps == 15 and d.reason is not None and d.reason.startswith("falling behind: lag 0.100 s > 2 frames (0.067 s)")
    )
    assert gov.tick(None, lag_s=0.1).reason is None  # 0.1 s < 2 frames at 15 fps
    d = gov.tick(None, backlog=3)
    assert d.fps == 7.5 and d.reason == "falling behind: 3 frames waiting: frame rate 15 → 7.5 fps"


def test_firmware_throttling_now_cuts_but_past_events_do_not(clock: _Clock) -> None:
    gov = RateGovernor(20, settle_s=0, clock=clock)
    assert gov.tick(_health(50.0, throttled=0x50000)).reason is None  # only "has occurred" bits
    d = gov.tick(_health(50.0, throttled=0x50005))
    assert d.reason == "firmware reports under-voltage, throttled: frame rate 20 → 10 fps"


def test_several_causes_are_joined(clock: _Clock) -> None:
    gov = RateGovernor(30, clock=clock)
    d = gov.tick(_health(81.0, throttled=0x8), lag_s=1.0)
    assert d.reason is not None
    assert d.reason.startswith("firmware reports soft temperature limit; SoC 81.0 °C ≥ 80 °C; falling behind")


def test_recovery_never_exceeds_what_inference_sustains(clock: _Clock) -> None:
    gov = RateGovernor(30, recover_after_s=10, clock=clock)
    gov.tick(None, lag_s=1.0)  # 30 → 15
    clock.t += 1
    gov.tick(None, latency_s=0.06)
    clock.t += 10
    d = gov.tick(None, latency_s=0.06)  # 15 × 1.25 = 18.75, but 60 ms inference sustains 16.7
    assert d.fps == pytest.approx(1 / 0.06)
    assert d.reason == "no heat, throttling or backlog for 10 s, capped by 60 ms inference: frame rate 15 → 16.7 fps"
    clock.t += 10
    assert gov.tick(None, latency_s=0.06).reason is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_fps": 0},
        {"max_fps": 10, "min_fps": 20},
        {"max_fps": 10, "min_fps": 0},
        {"max_fps": float("inf")},
        {"max_fps": 10, "recover_factor": 1.0},
        {"max_fps": 10, "recover_after_s": -1},
    ],
)
def test_governor_rejects_bad_arguments(kwargs: dict[str, float]) -> None:
    kwargs = dict(kwargs)
    max_fps = kwargs.pop("max_fps")
    with pytest.raises(ValueError, match="RateGovernor"):
        RateGovernor(max_fps, **kwargs)  # type: ignore[arg-type]
