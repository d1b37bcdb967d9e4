"""Store-and-forward sync from the emulated arm64 device to a real Mosquitto on the host's loopback.

qemu-user shares the host's network namespace, so the device in the root reaches the host broker at
127.0.0.1. Each board's CPU: the device writes records, syncs, loses the broker (clean restart), is
SIGKILLed mid-sync, starts again, and the host collector ends up with every record exactly as logged.
The device's SQLite file, written on arm64, is read back on the host.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from runtime.logbook import open_readonly
from tests.arm64.harness import CPUS, DEVICE_VENV, TESTS_DIR, Arm64Root, Harness
from tests.broker import Broker, Collector, broker_fixture  # noqa: F401 - the `broker` fixture
from tests.integration.test_sync import DATA, _distinct, _last_acked, _wait

N, BATCH, INFLIGHT = 3000, 100, 4
SCRIPT = f"{TESTS_DIR}/repo/tests/integration/sync_device.py"


def _device(
    root: Arm64Root, cpu: str, work: str, port: int, name: str, *args: str
) -> tuple[subprocess.Popen[Any], Path]:
    """sync_device.py in the root on ``cpu`` with the device venv's Python; stdout to ``work/name.out``."""
    out = root.host(f"{work}/{name}.out")
    argv = [f"{DEVICE_VENV}/bin/python", SCRIPT, f"{work}/device.db", "--port", str(port), "--device", f"dev-{cpu}"]
    argv += ["--batch-size", str(BATCH), "--inflight", str(INFLIGHT), *args]
    with open(out, "wb") as stdout, open(root.host(f"{work}/{name}.err"), "wb") as stderr:
        proc = root.popen(argv, cpu=cpu, env={"PYTHONPATH": f"{TESTS_DIR}/repo"}, stdout=stdout, stderr=stderr)
    return proc, out


@pytest.mark.parametrize("cpu", CPUS)
def test_sync_survives_broker_restart_and_device_kill(
    arm64_root: Arm64Root, arm64_harness: Harness, broker: Broker, cpu: str, arm64_report: dict[str, list[str]]
) -> None:
    work = f"/tmp/sync-{cpu}"
    host_work = arm64_root.host(work)
    if host_work.exists():
        for p in host_work.iterdir():
            p.unlink()
    host_work.mkdir(exist_ok=True)
    collector = Collector(broker, DATA, client_id=f"ingest-{cpu}")
    started: list[Any] = [collector]
    try:
        with arm64_harness.stage(f"sync to the host broker on {cpu}", build=False):
            proc, out = _device(arm64_root, cpu, work, broker.port, "first", "--records", str(N))
            started.append(proc)
            _wait(lambda: _last_acked(out) >= N // 4 or proc.poll() is not None, 300, "a quarter synced")
            broker.restart(down_s=0.5)  # clean stop: nothing the broker acknowledged is lost
            _wait(lambda: _last_acked(out) >= N // 2 or proc.poll() is not None, 300, "half synced")
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(30) == -signal.SIGKILL, root_err(arm64_root, work, "first")
            unsynced = open_readonly(host_work / "device.db").stats()["unsynced"]
            assert 0 < unsynced < N, "the kill did not land mid-sync"
            again, _ = _device(arm64_root, cpu, work, broker.port, "again")
            started.append(again)
            assert again.wait(300) == 0, root_err(arm64_root, work, "again")
        assert open_readonly(host_work / "device.db").stats()["unsynced"] == 0
        assert collector.wait(lambda m: len(_distinct(m)) >= N, 30), f"got {len(_distinct(collector.messages))}"
        got = _distinct(collector.messages)
        assert sorted(seq for dev, seq in got if dev == f"dev-{cpu}") == list(range(1, N + 1))
        stored = {r["seq"]: r for r in open_readonly(host_work / "device.db").export()}
        assert all(stored[seq]["table"] == table for (_, seq), (table, _) in got.items())
    finally:
        for thing in reversed(started):
            if isinstance(thing, subprocess.Popen):
                if thing.poll() is None:
                    thing.kill()
                thing.wait()
            else:
                thing.stop()
    arm64_report.setdefault("sync to Mosquitto on the host loopback", []).append(
        f"{cpu}: {N} records, broker restarted, device SIGKILLed with {unsynced} unsynced; all {N} arrived"
    )


def root_err(root: Arm64Root, work: str, name: str) -> str:
    """The tail of a device process's stderr, for assertion messages."""
    path = root.host(f"{work}/{name}.err")
    return path.read_text(errors="replace")[-3000:] if path.is_file() else ""
