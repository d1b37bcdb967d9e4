"""Inside the arm64 VM (systemd 252, booted by tests/arm64/vm.py): install the unit and exercise it for real.

Run once per boot by ``edgefleet-vmtest.service`` as root with the system Python (stdlib only). It
installs ``edge-runtime.service`` as systemd/README.md says, then checks: active only after READY;
the hardened service writes its state directory; kill -9 of the main process restarts it; a stalled
inference loop (``EDGE_TEST_STALL_AFTER``) is killed by the watchdog and restarted; a bad config
exits 2 and is not restarted. The JSON report goes to the results disk (the virtio disk whose first
bytes are the host's marker), then the VM powers off. Times here are emulated (TCG), not a board's.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ASSETS = Path("/opt/edgefleet-vmtest")
UNIT = "edge-runtime.service"
ETC = Path("/etc/edge-runtime")
STATE = Path("/var/lib/edge-runtime")
DROPIN = Path("/etc/systemd/system/edge-runtime.service.d/stall.conf")
MARKER = b"EDGEFLEET-RESULTS-DISK\n"
IMAGES = 6
CONFIG = """\
bundle = "{assets}/bundle.tar"
trusted_keys = ["{etc}/keys/fleet.pub"]
device_id = "vm"
warmup_runs = 1
[source]
kind = "directory"
path = "{state}/inbox"
after = "move"
[watchdog]
stall_after_s = 3.0
"""


def say(msg: str) -> None:
    print(f"[vm-checks] {msg}", flush=True)


def sh(*argv: str, check: bool = True) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
    return proc.stdout


def show(*props: str) -> dict[str, str]:
    out = sh("systemctl", "show", UNIT, *(f"--property={p}" for p in props))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            unit = show("ActiveState", "SubState", "Result", "MainPID")
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}; unit: {unit}")
        time.sleep(0.1)
    return time.monotonic() - start


def journal() -> str:
    return sh("journalctl", "-u", UNIT, "--no-pager", "-o", "cat", check=False)


def feed_images() -> None:
    inbox = STATE / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    for i, src in enumerate(sorted((ASSETS / "images").glob("*.png"))[:IMAGES]):
        tmp = inbox / f".{time.monotonic_ns()}-{i}.tmp"
        shutil.copy(src, tmp)
        tmp.rename(inbox / f"{time.monotonic_ns()}-{i}.png")  # atomic, as the source expects
    sh("chown", "-R", "edge-runtime:edge-runtime", str(STATE))


def install() -> dict[str, Any]:
    """systemd/README.md's install steps (the venv in /opt/edge-runtime came from install_device.sh)."""
    sh(
        "useradd",
        "--system",
        "--user-group",
        "--home-dir",
        str(STATE),
        "--no-create-home",
        "--shell",
        "/usr/sbin/nologin",
        "edge-runtime",
    )
    (ETC / "keys").mkdir(parents=True, exist_ok=True)
    shutil.copy(ASSETS / "fleet.pub", ETC / "keys" / "fleet.pub")
    (ETC / "config.toml").write_text(CONFIG.format(assets=ASSETS, etc=ETC, state=STATE))
    shutil.copy(ASSETS / UNIT, f"/etc/systemd/system/{UNIT}")
    verify = subprocess.run(
        ["systemd-analyze", "verify", f"/etc/systemd/system/{UNIT}"], capture_output=True, text=True
    )
    sh("systemctl", "daemon-reload")
    STATE.mkdir(mode=0o750, exist_ok=True)
    feed_images()
    return {"ok": True, "verify_rc": verify.returncode, "verify_output": (verify.stdout + verify.stderr)[-2000:]}


def check_ready() -> dict[str, Any]:
    """Start without blocking and sample the state: activating while the model loads, active once READY."""
    sh("systemctl", "start", "--no-block", UNIT)
    seen: list[str] = []
    start = time.monotonic()
    while time.monotonic() - start < 300:
        p = show("ActiveState", "SubState")
        state = f"{p['ActiveState']}/{p['SubState']}"
        if not seen or seen[-1] != state:
            seen.append(state)
        if p["ActiveState"] in ("active", "failed"):
            break
        time.sleep(0.05)
    p = show(
        "StatusText",
        "ExecMainStartTimestampMonotonic",
        "ActiveEnterTimestampMonotonic",
        "MainPID",
        "ProtectSystem",
        "User",
    )
    gap = (int(p["ActiveEnterTimestampMonotonic"]) - int(p["ExecMainStartTimestampMonotonic"])) / 1e6
    ok = seen[-1] == "active/running" and "activating/start" in seen and p["StatusText"].startswith("digits")
    return {
        "ok": ok and gap > 0.5,
        "states": seen,
        "status_text": p["StatusText"],
        "start_to_active_s": round(gap, 2),
        "protect_system": p["ProtectSystem"],
        "user": p["User"],
    }


def _db_rows() -> int:
    db = sqlite3.connect(f"file:{STATE}/logbook.sqlite?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT COUNT(*) FROM inferences").fetchone()[0])
    finally:
        db.close()


def check_state_dir() -> dict[str, Any]:
    """ProtectSystem=strict leaves the StateDirectory writable: logbook rows, moved inputs, status file."""
    wait_for(lambda: (STATE / "logbook.sqlite").exists() and _db_rows() >= IMAGES, 120, "the logbook rows")
    pid = int(show("MainPID")["MainPID"])
    # the last "/" entry is the one the service sees (ProtectSystem= stacks a read-only bind on top)
    mounts = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    root_mount = [line for line in mounts if line.split()[4] == "/"][-1]
    owner = (STATE / "logbook.sqlite").stat()
    time.sleep(5)  # idle: inbox empty
    rss_kb = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    done = len(glob.glob(f"{STATE}/inbox/done/*.png"))
    cgroup = show("MemoryCurrent")["MemoryCurrent"]  # the unit's cgroup: process + page cache it caused
    ok = done >= IMAGES and owner.st_uid != 0 and " ro," in f" {root_mount.split()[5]},"
    return {
        "ok": ok,
        "inference_rows": _db_rows(),
        "moved_to_done": done,
        "status_json": (STATE / "status.json").is_file(),
        "root_mount_options_seen_by_service": root_mount.split()[5],
        "idle_rss_mib": round(rss_kb / 1024, 1),
        "memory_current_mib": round(int(cgroup) / 2**20, 1) if cgroup.isdigit() else None,
    }


def check_kill_restarts() -> dict[str, Any]:
    before = show("MainPID", "NRestarts")
    os.kill(int(before["MainPID"]), 9)
    took = wait_for(
        lambda: (
            show("MainPID")["MainPID"] not in ("0", before["MainPID"])
            and show("ActiveState")["ActiveState"] == "active"
        ),
        300,
        "a restarted, active service",
    )
    after = show("MainPID", "NRestarts")
    return {
        "ok": int(after["NRestarts"]) == int(before["NRestarts"]) + 1,
        "old_pid": before["MainPID"],
        "new_pid": after["MainPID"],
        "n_restarts": after["NRestarts"],
        "kill_to_active_s": round(took, 1),
    }


def check_watchdog() -> dict[str, Any]:
    DROPIN.parent.mkdir(parents=True, exist_ok=True)
    DROPIN.write_text("[Service]\nEnvironment=EDGE_TEST_STALL_AFTER=3\nWatchdogSec=8\n")
    sh("systemctl", "daemon-reload")
    feed_images()
    sh("systemctl", "restart", UNIT)
    first = show("MainPID", "NRestarts")
    took = wait_for(lambda: "Watchdog timeout" in journal(), 240, "the watchdog to fire")
    wait_for(
        lambda: (
            show("MainPID")["MainPID"] not in ("0", first["MainPID"]) and show("ActiveState")["ActiveState"] == "active"
        ),
        300,
        "the restart after the watchdog",
    )
    after = show("NRestarts", "MainPID")
    text = journal()
    DROPIN.unlink()
    sh("systemctl", "daemon-reload")
    lines = [line for line in text.splitlines() if "atchdog" in line or "Aborted" in line or "stalling" in line]
    ok = "Failed with result 'watchdog'" in text and int(after["NRestarts"]) > int(first["NRestarts"])
    return {
        "ok": ok,
        "restart_to_watchdog_s": round(took, 1),
        "n_restarts": after["NRestarts"],
        "journal": lines[-8:],
        "python_stacks_in_journal": "Fatal Python error: Aborted" in text,
    }


def check_bad_config() -> dict[str, Any]:
    """An unknown key: the service exits 2 before READY, and RestartPreventExitStatus=2 keeps it down."""
    good = (ETC / "config.toml").read_text()
    (ETC / "config.toml").write_text("bogus_key = 1\n" + good)
    sh("systemctl", "restart", UNIT, check=False)  # a manual restart also resets NRestarts to 0
    wait_for(lambda: show("ActiveState")["ActiveState"] == "failed", 300, "the unit to fail")
    first = show("NRestarts", "ExecMainPID")
    time.sleep(8)  # four times RestartSec=2: a restart would have happened by now
    p = show("ActiveState", "Result", "ExecMainStatus", "NRestarts", "ExecMainPID", "MainPID")
    (ETC / "config.toml").write_text(good)
    err = [line for line in journal().splitlines() if "bogus_key" in line]
    same = p["NRestarts"] == first["NRestarts"] == "0" and p["ExecMainPID"] == first["ExecMainPID"]
    ok = p["ActiveState"] == "failed" and p["ExecMainStatus"] == "2" and same and p["MainPID"] == "0"
    return {"ok": ok, **{k: p[k] for k in ("ActiveState", "Result", "ExecMainStatus", "NRestarts")}, "log": err[-2:]}


def write_results(report: dict[str, Any]) -> None:
    data = json.dumps(report).encode() + b"\n\0"
    for dev in sorted(glob.glob("/dev/vd?")):
        with open(dev, "r+b") as f:
            if f.read(len(MARKER)) == MARKER:
                f.seek(0)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                say(f"results written to {dev}")
                return
    say("no results disk found; report follows on the console")
    print("EDGEFLEET-RESULTS " + json.dumps(report), flush=True)


def main() -> int:
    report: dict[str, Any] = {
        "checks": {},
        "uname": os.uname().release,
        "systemd": sh("systemctl", "--version").split("\n")[0],
    }
    report["boot_to_checks_s"] = float(Path("/proc/uptime").read_text().split()[0])
    steps = [
        ("install", install),
        ("ready", check_ready),
        ("state_dir", check_state_dir),
        ("kill_restart", check_kill_restarts),
        ("watchdog", check_watchdog),
        ("bad_config", check_bad_config),
    ]
    for name, step in steps:
        say(f"{name}…")
        t0 = time.monotonic()
        try:
            report["checks"][name] = {**step(), "seconds": round(time.monotonic() - t0, 1)}
        except Exception as exc:  # one failed check must not hide the others' results
            report["checks"][name] = {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "trace": traceback.format_exc()[-2000:],
            }
        say(f"{name}: {'ok' if report['checks'][name].get('ok') else 'FAILED'}")
    report["journal_tail"] = journal()[-6000:]
    write_results(report)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        subprocess.run(["systemctl", "poweroff", "--no-block"])
