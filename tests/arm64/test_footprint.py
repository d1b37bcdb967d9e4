"""Footprint of the device install in the arm64 root: venv size, import discipline, idle RSS of `serve`.

Sizes are the real arm64 wheels' sizes. The RSS is the qemu-user process as the host kernel sees it:
the emulated program's memory plus the emulator's own (translated-code cache and bookkeeping), so it
is reported beside the same measure of an idle bare ``python3`` — emulated, never a board's number
(the systemd VM test reports the guest kernel's own view).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.arm64.harness import CPUS, DEVICE_VENV, TESTS_DIR, Arm64Root

WORK = "/tmp/footprint"


def test_device_venv_holds_the_runtime_and_no_host_frameworks(
    arm64_root: Arm64Root, arm64_report: dict[str, list[str]]
) -> None:
    site = next(arm64_root.host(DEVICE_VENV).glob("lib/python3*/site-packages"))
    sizes: dict[str, int] = {}
    for entry in site.iterdir():
        name = entry.name.split("-")[0].lower()
        if entry.is_dir() and not entry.name.endswith((".dist-info", "__pycache__")):
            sizes[name] = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
    total = arm64_root.du(DEVICE_VENV)
    assert {"runtime", "onnxruntime", "numpy", "cv2", "paho"} <= set(sizes)
    assert not {"torch", "onnx", "onnxscript", "sklearn"} & set(sizes), sorted(sizes)
    top = sorted(sizes.items(), key=lambda kv: -kv[1])[:6]
    arm64_report.setdefault("footprint (arm64 root; emulated)", []).extend(
        [
            f"device venv {DEVICE_VENV} (device + tflite extras): {total / 2**20:.0f} MiB",
            "largest: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in top),
            f"edgefleet's own packages (runtime): {sizes['runtime'] / 2**20:.2f} MiB",
        ]
    )


def test_importing_the_runtime_loads_no_torch_or_onnx(arm64_root: Arm64Root) -> None:
    proc = arm64_root.run([f"{DEVICE_VENV}/bin/python", f"{TESTS_DIR}/probe.py", "imports"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout)
    assert seen["forbidden_loaded"] == [] and seen["installed"] == {"torch": False, "onnx": False}
    assert "runtime" in seen["modules"] and "onnxruntime" in seen["with_onnxruntime"]


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def _wait_ready(sock: socket.socket, proc: subprocess.Popen[bytes], timeout: float) -> float:
    deadline = time.monotonic() + timeout
    start = time.monotonic()
    while time.monotonic() < deadline:
        assert proc.poll() is None, "serve exited before READY"
        try:
            if b"READY=1" in sock.recv(4096):
                return time.monotonic() - start
        except TimeoutError:
            continue
    raise AssertionError(f"no READY=1 within {timeout} s")


def test_serve_idle_rss(arm64_root: Arm64Root, arm64_inputs: Path, arm64_report: dict[str, list[str]]) -> None:
    work = arm64_root.host(WORK)
    shutil.rmtree(work, ignore_errors=True)
    (work / "state").mkdir(parents=True)
    shutil.copy2(arm64_inputs / "rpi4" / "bundle.tar", work / "bundle.tar")
    shutil.copy2(arm64_inputs / "fleet.pub", work / "fleet.pub")
    (work / "config.toml").write_text(
        f'bundle = "{WORK}/bundle.tar"\ntrusted_keys = ["{WORK}/fleet.pub"]\nstate_dir = "{WORK}/state"\n'
        'device_id = "footprint"\n[http]\nport = 0\n'
    )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(work / "notify.sock"))
    sock.settimeout(1.0)
    env = {"NOTIFY_SOCKET": f"{WORK}/notify.sock"}
    argv = [f"{DEVICE_VENV}/bin/edge-runtime", "serve", "--config", f"{WORK}/config.toml"]
    with open(work / "out", "wb") as out, open(work / "err", "wb") as err:
        proc = arm64_root.popen(argv, cpu=CPUS[0], env=env, stdout=out, stderr=err)
    bare = arm64_root.popen(["python3", "-c", "import time; time.sleep(60)"], cpu=CPUS[0])
    try:
        ready_s = _wait_ready(sock, proc, 300)
        time.sleep(5)  # idle: no source, no requests
        serve_kb, bare_kb = _rss_kb(proc.pid), _rss_kb(bare.pid)
    finally:
        for p in (proc, bare):
            p.terminate()
        rc = proc.wait(60)
        bare.wait(60)
        sock.close()
    assert rc == 0, (work / "err").read_text()[-3000:]
    assert (work / "state" / "status.json").is_file()
    arm64_report.setdefault("footprint (arm64 root; emulated)", []).append(
        f"edge-runtime serve idle on {CPUS[0]} (rpi4 bundle, HTTP on): {serve_kb / 1024:.0f} MiB RSS as seen by the "
        f"host (qemu-user process: program + emulator); an idle bare python3 the same way: {bare_kb / 1024:.0f} MiB; "
        f"READY after {ready_s:.1f} s emulated"
    )
