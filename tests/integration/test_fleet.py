"""`toolchain fleet` against 200 simulated devices on a real Mosquitto: status, config to all, ping, a killed device.

The devices (:mod:`tests.simdevice`) run the runtime's own link and command channel with the real
ping / status / config.set handlers; the operator side is the real CLI in a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime.command_handlers import read_overrides
from runtime.signing import generate_keypair, load_public_key
from tests.broker import Broker, module_broker_fixture  # noqa: F401  (registers the `mqtt` fixture)
from tests.conftest import REPO, Cli, run_cli
from tests.simdevice import SimFleet

FLEET = "yard"
N_DEVICES = 200


@pytest.fixture(scope="module")
def sims(mqtt: Broker, operator: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimFleet]:
    root = tmp_path_factory.mktemp("devices")
    started = time.monotonic()
    fleet = SimFleet(
        mqtt.host,
        mqtt.port,
        fleet=FLEET,
        count=N_DEVICES,
        trusted_keys=[load_public_key(operator[1])],
        root=root,
        groups=("lobby", "dock"),
    ).start()
    print(f"\n{N_DEVICES} simulated devices connected in {time.monotonic() - started:.2f} s")
    yield fleet
    fleet.stop()


def fleet_cli(mqtt: Broker, operator: tuple[Path, Path], *args: str, fleet: str = FLEET, timeout: str = "30") -> Cli:
    return run_cli(
        "fleet",
        *args,
        "--broker",
        f"{mqtt.host}:{mqtt.port}",
        "--fleet",
        fleet,
        "--key",
        str(operator[0]),
        "--timeout",
        timeout,
        timeout=120,
    )


def _json(res: Cli) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads(res.out)
    except ValueError:
        raise AssertionError(f"not JSON (exit {res.code}):\n{res.out}\n{res.err}") from None
    return doc


def _rows(doc: dict[str, Any], prefix: str = "sim-") -> dict[str, dict[str, Any]]:
    return {r["device"]: r for r in doc["devices"] if r["device"].startswith(prefix)}


def test_status_all_lists_every_device_online(mqtt: Broker, operator: tuple[Path, Path], sims: SimFleet) -> None:
    res = fleet_cli(mqtt, operator, "status", "--all", "--json")
    assert res.code == 0, res.err
    rows = _rows(_json(res))
    assert sorted(rows) == sorted(sims.devices)
    for name, row in rows.items():
        assert row["online"] is True and row["result"] == "ok", row
        assert (row["model"], row["version"], row["profile"]) == ("digits", "1.0.0", "rpi4")
        assert row["temp_c"] == sims.devices[name].temp_c
        assert row["last_seen"] > time.time() - 60
    assert _json(res)["summary"]["acked_ok"] >= N_DEVICES


def test_config_set_to_all_is_acked_ok_by_every_device(
    mqtt: Broker, operator: tuple[Path, Path], sims: SimFleet
) -> None:
    started = time.monotonic()
    res = fleet_cli(mqtt, operator, "config", "logbook.flush_interval_s=1.0", "--all", "--json", timeout="60")
    wall = time.monotonic() - started
    assert res.code == 0, res.out[-2000:] + res.err
    doc = _json(res)
    rows = _rows(doc)
    assert len(rows) == N_DEVICES and all(r["result"] == "ok" for r in rows.values())
    assert all(r["ack"] == {**r["ack"], "key": "logbook.flush_interval_s", "value": 1.0} for r in rows.values())
    print(
        f"\nconfig.set to {N_DEVICES} devices: all acked ok {doc['summary']['elapsed_s']:.2f} s after the publish "
        f"(CLI wall time {wall:.2f} s, slowest ack {max(r['rtt_ms'] for r in rows.values()):.0f} ms)"
    )
    for dev in sims.devices.values():
        assert dev.config is not None and dev.config.logbook.flush_interval_s == 1.0
        assert read_overrides(dev.state_dir) == {"logbook": {"flush_interval_s": 1.0}}


def test_group_reaches_only_its_members(mqtt: Broker, operator: tuple[Path, Path], sims: SimFleet) -> None:
    res = fleet_cli(mqtt, operator, "status", "--group", "dock", "--json")
    assert res.code == 0, res.err
    rows = _rows(_json(res))
    assert sorted(rows) == sorted(d for d, dev in sims.devices.items() if dev.group == "dock")
    assert len(rows) == N_DEVICES // 2 and all(r["result"] == "ok" for r in rows.values())


def test_ping_one_device_reports_its_round_trip(mqtt: Broker, operator: tuple[Path, Path], sims: SimFleet) -> None:
    res = fleet_cli(mqtt, operator, "ping", "--device", "sim-007", "--json")
    assert res.code == 0, res.err
    (row,) = _json(res)["devices"]
    assert row["device"] == "sim-007" and row["result"] == "ok"
    assert 0 < row["rtt_ms"] < 30_000 and row["ack"]["pong"] > 0
    human = fleet_cli(mqtt, operator, "ping", "--device", "sim-008")
    assert human.code == 0 and "sim-008" in human.out and " ms" in human.out and "1/1 acked ok" in human.out


def test_human_status_table(mqtt: Broker, operator: tuple[Path, Path], sims: SimFleet) -> None:
    res = fleet_cli(mqtt, operator, "status")  # no target: the whole fleet
    assert res.code == 0, res.err
    for column in ("device", "online", "model", "version", "last seen", "temperature", "result"):
        assert column in res.out
    assert "sim-199" in res.out and f"{N_DEVICES}/{N_DEVICES} acked ok" in res.out


def _start_doomed(mqtt: Broker, operator: tuple[Path, Path], tmp_path: Path) -> subprocess.Popen[str]:
    cmd = [
        sys.executable,
        "-m",
        "tests.simdevice",
        "--port",
        str(mqtt.port),
        "--fleet",
        FLEET,
        "--prefix",
        "doomed",
        "--trusted-key",
        str(operator[1]),
        "--state",
        str(tmp_path / "doomed"),
    ]
    proc = subprocess.Popen(
        cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready 1":
        proc.kill()
        raise AssertionError(f"simdevice did not start: {line!r} {proc.communicate()[1]}")
    return proc


def test_killed_device_shows_offline(mqtt: Broker, operator: tuple[Path, Path], sims: SimFleet, tmp_path: Path) -> None:
    proc = _start_doomed(mqtt, operator, tmp_path)
    try:
        alive = fleet_cli(mqtt, operator, "status", "--device", "doomed-000", "--json")
        assert alive.code == 0 and _rows(_json(alive), "doomed")["doomed-000"]["online"] is True
    finally:
        proc.send_signal(signal.SIGKILL)  # no DISCONNECT: the broker publishes the last will
        proc.communicate()
    deadline = time.monotonic() + 15
    while True:
        passive = fleet_cli(mqtt, operator, "status", "--no-query", "--json")
        if _rows(_json(passive), "doomed")["doomed-000"]["online"] is False or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    res = fleet_cli(mqtt, operator, "status", "--all", "--json")
    assert res.code == 0, res.err  # an offline device is not expected to answer
    doomed = _rows(_json(res), "doomed")["doomed-000"]
    assert doomed["online"] is False and doomed["result"] == "offline"
    assert doomed["model"] == "digits"  # the last will still says what it ran
    assert len([r for r in _rows(_json(res)).values() if r["result"] == "ok"]) == N_DEVICES
    gone = fleet_cli(mqtt, operator, "ping", "--device", "doomed-000", "--json", timeout="1")
    assert gone.code == 1 and _json(gone)["devices"][0]["result"] == "timeout"
    assert _json(gone)["summary"]["timeout"] == ["doomed-000"]


def test_silent_device_is_reported_as_timeout(mqtt: Broker, operator: tuple[Path, Path], tmp_path: Path) -> None:
    small = SimFleet(
        mqtt.host,
        mqtt.port,
        fleet="quiet",
        count=3,
        trusted_keys=[load_public_key(operator[1])],
        root=tmp_path,
    ).start()
    try:
        mute = small.devices["sim-001"]
        assert mute.channel is not None
        mute.channel.close()  # connected and retained online, but it no longer answers commands
        res = fleet_cli(mqtt, operator, "ping", "--all", "--json", fleet="quiet", timeout="2")
    finally:
        small.stop()
    assert res.code == 1
    doc = _json(res)
    assert {r["device"]: r["result"] for r in doc["devices"]} == {
        "sim-000": "ok",
        "sim-001": "timeout",
        "sim-002": "ok",
    }
    assert doc["summary"]["timeout"] == ["sim-001"]


def test_refusals_and_errors_exit_1_with_the_reason(
    mqtt: Broker, operator: tuple[Path, Path], sims: SimFleet, tmp_path: Path
) -> None:
    stranger, _ = generate_keypair(tmp_path, "stranger")
    res = run_cli(
        "fleet", "ping", "--device", "sim-001", "--json", "--broker", f"{mqtt.host}:{mqtt.port}",
        "--fleet", FLEET, "--key", str(stranger), "--timeout", "20",
    )  # fmt: skip
    assert res.code == 1
    assert (_json(res)["devices"][0]["result"], _json(res)["devices"][0]["reason"]) == ("refused", "unknown-key")

    unknown = fleet_cli(mqtt, operator, "send", "model.teleport", "--device", "sim-002", "--json")
    assert unknown.code == 1 and _json(unknown)["devices"][0]["reason"] == "unknown-type"

    locked = fleet_cli(mqtt, operator, "config", "logbook.path=/tmp/elsewhere", "--device", "sim-003", "--json")
    row = _json(locked)["devices"][0]
    assert locked.code == 1 and row["result"] == "error" and "logbook.path" in row["reason"]

    bad = fleet_cli(mqtt, operator, "config", "logbook.flush_interval_s=999", "--device", "sim-004", "--json")
    row = _json(bad)["devices"][0]
    assert bad.code == 1 and row["result"] == "error" and "flush_interval_s" in row["reason"]
    assert sims.devices["sim-004"].config is not None
    assert sims.devices["sim-004"].config.logbook.flush_interval_s != 999


# --- usage, without devices -----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["status", "ping", "config", "send", "ingest"])
def test_every_fleet_command_has_help(command: str) -> None:
    res = run_cli("fleet", command, "--help")
    assert res.code == 0 and "usage: toolchain fleet" in res.out and "--broker" in res.out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["ping", "--fleet", "f"], "--device/--group/--all"),
        (["ping", "--all", "--fleet", "f", "--broker", "127.0.0.1:http"], "--broker"),
        (["send", "x", "--args", "[1]", "--all", "--fleet", "f"], "--args"),
        (["send", "x", "--args", "{nope", "--all", "--fleet", "f"], "--args"),
        (["config", "novalue", "--all", "--fleet", "f"], "KEY=VALUE"),
        (["ping", "--all", "--fleet", "f", "--key", "/nonexistent/op.key"], "/nonexistent/op.key"),
        (["ping", "--device", "a/b", "--fleet", "f"], "--device"),
        (["ping", "--all", "--fleet", "f", "--timeout", "0"], "--timeout"),
    ],
)
def test_bad_usage_is_one_line_and_exit_2(args: list[str], needle: str, operator: tuple[Path, Path]) -> None:
    if "--key" not in args:
        args = [*args, "--key", str(operator[0])]
    res = run_cli("fleet", *args)
    assert res.code == 2, (res.code, res.out, res.err)
    assert "Traceback" not in res.err
    lines = [ln for ln in res.err.splitlines() if ln.startswith("toolchain: error:")]
    assert len(lines) == 1 and needle in lines[0], res.err


def test_unreachable_broker_is_exit_1_naming_it() -> None:
    port = _free_port()
    res = run_cli(
        "fleet", "status", "--no-query", "--fleet", "f", "--broker", f"127.0.0.1:{port}", "--connect-timeout", "1"
    )
    assert res.code == 1 and f"127.0.0.1:{port}" in res.err and "Traceback" not in res.err
