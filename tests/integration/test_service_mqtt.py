"""The whole device service on a real broker: results reach ingest, the fleet CLI sees and commands it."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time

import cv2

from tests.broker import broker_fixture  # noqa: F401  (registers the `broker` fixture)
from tests.conftest import REPO, run_cli
from tests.integration.test_runtime import _config, _post, _serve, _stop, _val_files, _wait_status


def _rows(db, table: str) -> int:
    con = sqlite3.connect(db)
    try:
        return int(con.execute(f"select count(*) from {table}").fetchone()[0])
    finally:
        con.close()


def test_served_results_reach_ingest_and_the_fleet_commands_the_device(broker, bundle, keys, digits_dirs, tmp_path):
    path, _ = bundle
    broker_arg = f"127.0.0.1:{broker.port}"
    cfg = _config(
        tmp_path,
        path,
        keys[1],
        health={"interval_s": 0.3},
        logbook={"flush_interval_s": 0.1},
        mqtt={"enabled": True, "port": broker.port, "batch_size": 50},
    )
    db = tmp_path / "fleet.sqlite"
    ingest = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "toolchain",
            "fleet",
            "ingest",
            "--db",
            str(db),
            "--broker",
            broker_arg,
            "--fleet",
            "default",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin"},
    )
    proc = _serve(cfg)
    try:
        status = _wait_status(tmp_path / "state", proc)
        image = cv2.imencode(".png", cv2.imread(str(_val_files(digits_dirs[1], 1)[0]), cv2.IMREAD_GRAYSCALE))[1]
        for _ in range(7):
            assert _post(status["http"]["port"], image.tobytes())[0] == 200
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not db.exists() or _rows(db, "inferences") < 7):
            time.sleep(0.2)
        assert _rows(db, "inferences") == 7 and _rows(db, "events") >= 2
        fleet = ["--broker", broker_arg, "--fleet", "default", "--key", str(keys[0]), "--json"]
        st = run_cli("fleet", "status", "--all", *fleet)
        assert st.code == 0, st.err
        row = next(r for r in json.loads(st.out)["devices"] if r["device"] == "dev-1")
        assert row["online"] is True and row["model"] == "digits" and row["version"] == "1.0.0"
        setting = run_cli("fleet", "config", "health.interval_s=5", "--device", "dev-1", *fleet)
        assert setting.code == 0, setting.out + setting.err
        assert (tmp_path / "state" / "config.override.json").is_file()
        restart = run_cli("fleet", "send", "service.restart", "--device", "dev-1", *fleet)
        assert restart.code == 0, restart.out + restart.err
        assert proc.wait(timeout=30) == 1  # non-zero so systemd's Restart=on-failure starts it again
        gone = run_cli("fleet", "status", "--no-query", "--all", "--broker", broker_arg, "--fleet", "default", "--json")
        after = next(r for r in json.loads(gone.out)["devices"] if r["device"] == "dev-1")
        assert after["online"] is False
    finally:
        _stop(proc)
        ingest.send_signal(signal.SIGTERM)
        ingest.communicate(timeout=30)
