"""The full-system arm64 VM: a cached Debian root with systemd and a kernel, booted by qemu-system-aarch64.

The VM root is the minbase root (without the venvs) plus ``systemd-sysv``, ``udev`` and
``linux-image-arm64``, installed in the chroot under qemu-user once (the initramfs is generated under
emulation: minutes) and kept in ``$EDGEFLEET_CACHE/arm64/vm-<key>``. Each run copies the current
device venv (built by install_device.sh from this checkout's wheel) and the test assets in, makes an
ext4 image with ``mkfs.ext4 -d`` (no loop mount), and boots it the shape of a Raspberry Pi 4
(``virt``, cortex-a72, 4 cores, 2 GiB), off the network (``-nic none``). ``vm_checks.py`` runs as a
oneshot unit, writes its JSON report to a second virtio disk and powers the VM off.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.arm64.harness import (
    DEVICE_VENV,
    DONE_MARK,
    REPO,
    Arm64Root,
    Harness,
    HarnessError,
    cache_key,
    host_run,
    remove_tree,
)

__all__ = ["VM_SHAPE", "boot", "build_vm_root", "run_vm_checks", "stage_vm"]

VM_PACKAGES = ("systemd-sysv", "udev", "linux-image-arm64")
VM_SHAPE = ("-M", "virt", "-cpu", "cortex-a72", "-smp", "4", "-m", "2048")  # a Raspberry Pi 4's shape
LABEL = "edgefleet-root"
MARKER = b"EDGEFLEET-RESULTS-DISK\n"
# Only what this VM needs in the initramfs: listing modules instead of MODULES=most makes generating
# it under emulation several times faster.
_INITRAMFS_CONF = "MODULES=list\nCOMPRESS=gzip\n"
_INITRAMFS_MODULES = "virtio_pci\nvirtio_blk\next4\ncrc32c_generic\n"
_MASK = ("apt-daily.timer", "apt-daily-upgrade.timer", "getty@tty1.service", "serial-getty@ttyAMA0.service")
_VMTEST_UNIT = """\
[Unit]
Description=edgefleet VM checks (tests/arm64/vm_checks.py)
After=basic.target systemd-journald.service

[Service]
Type=oneshot
ExecStart=/usr/bin/python3 /opt/edgefleet-vmtest/vm_checks.py
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=1500

[Install]
WantedBy=multi-user.target
"""


def build_vm_root(h: Harness, base: Path) -> Path:
    """The cached VM root: systemd + kernel + initramfs on top of the minbase root ``base`` (without venvs)."""
    if shutil.which("qemu-system-aarch64") is None or shutil.which("mkfs.ext4") is None:
        raise HarnessError("missing host packages: apt-get install -y qemu-system-arm e2fsprogs")
    key = cache_key(base.name, VM_PACKAGES, _INITRAMFS_CONF, _INITRAMFS_MODULES, _MASK)
    vm = h.cache / f"vm-{key}"
    with h.stage("VM root (systemd, kernel, initramfs)") as st:
        if (vm / DONE_MARK).is_file():
            return vm
        st.cold = True
        for old in h.cache.glob("vm-*"):
            remove_tree(old)
        partial = h.cache / f"vm-{key}.partial"
        _copy_system(base, partial)
        _install_system(Arm64Root(partial), h.cache / "logs" / "vm-root.log")
        _configure_boot(partial)
        (partial / DONE_MARK).write_text(" ".join(VM_PACKAGES) + "\n")
        partial.rename(vm)
        return vm


def _copy_system(base: Path, dest: Path) -> None:
    """Copy the minbase root without its venvs and test files, and never through its /proc, /sys, /dev mounts."""
    dest.mkdir()
    for entry in base.iterdir():
        if entry.name == DONE_MARK:
            continue
        if entry.name in ("proc", "sys", "dev", "opt", "tmp"):
            (dest / entry.name).mkdir()
            (dest / entry.name).chmod(0o1777 if entry.name == "tmp" else 0o755)
        else:
            host_run(["cp", "-a", "--one-file-system", str(entry), str(dest / entry.name)])
    for node in ("null", "zero", "random", "urandom", "tty", "console", "full"):
        host_run(["cp", "-a", f"/dev/{node}", str(dest / "dev" / node)])


def _install_system(root: Arm64Root, log_file: Path) -> None:
    (root.host("/etc/initramfs-tools/conf.d")).mkdir(parents=True, exist_ok=True)
    root.host("/etc/initramfs-tools/conf.d/edgefleet").write_text(_INITRAMFS_CONF)
    root.host("/etc/initramfs-tools/modules").write_text(_INITRAMFS_MODULES)
    policy = root.host("/usr/sbin/policy-rc.d")
    policy.write_text("#!/bin/sh\nexit 101\n")  # no service starts inside the chroot
    policy.chmod(0o755)
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    with root.mounted():
        root.check(["apt-get", "-q", "update"], env=env, log_file=log_file)
        install = ["apt-get", "-q", "install", "-y", "--no-install-recommends", *VM_PACKAGES]
        root.check(install, env=env, log_file=log_file, timeout=3600)
        root.check(["apt-get", "clean"], env=env)
    policy.unlink()
    for lists in root.host("/var/lib/apt/lists").glob("*_*"):
        lists.unlink()
    if not list(root.path.glob("boot/vmlinuz-*")) or not list(root.path.glob("boot/initrd.img-*")):
        raise HarnessError(f"no kernel or initramfs in {root.path}/boot (see {log_file})")


def _configure_boot(root: Path) -> None:
    (root / "etc/fstab").write_text(f"LABEL={LABEL} / ext4 rw,errors=remount-ro 0 0\n")
    (root / "etc/hostname").write_text("edgefleet-vm\n")
    system = root / "etc/systemd/system"
    for unit in _MASK:
        link = system / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    (system / "edgefleet-vmtest.service").write_text(_VMTEST_UNIT)
    wants = system / "multi-user.target.wants"
    wants.mkdir(exist_ok=True)
    (wants / "edgefleet-vmtest.service").unlink(missing_ok=True)
    (wants / "edgefleet-vmtest.service").symlink_to("/etc/systemd/system/edgefleet-vmtest.service")


def stage_vm(vm: Path, device_root: Arm64Root, inputs: Path, work: Path) -> tuple[Path, Path]:
    """Copy the device venv and the assets into the VM root, then make (root image, results disk)."""
    venv = vm / DEVICE_VENV.lstrip("/")
    remove_tree(venv)
    host_run(["cp", "-a", str(device_root.host(DEVICE_VENV)), str(venv)])
    assets = vm / "opt/edgefleet-vmtest"
    remove_tree(assets)
    (assets / "images").mkdir(parents=True)
    shutil.copy2(inputs / "rpi4" / "bundle.tar", assets / "bundle.tar")
    shutil.copy2(inputs / "fleet.pub", assets / "fleet.pub")
    for i, png in enumerate(sorted((inputs / "val").rglob("*.png"))[:6]):
        shutil.copy2(png, assets / "images" / f"{i}.png")
    shutil.copy2(REPO / "systemd" / "edge-runtime.service", assets / "edge-runtime.service")
    shutil.copy2(Path(__file__).with_name("vm_checks.py"), assets / "vm_checks.py")
    work.mkdir(parents=True, exist_ok=True)
    image, results = work / "root.img", work / "results.img"
    image.unlink(missing_ok=True)
    host_run(["mkfs.ext4", "-q", "-F", "-L", LABEL, "-d", str(vm), str(image), "3G"], log_file=work / "mkfs.log")
    with open(results, "wb") as f:
        f.write(MARKER)
        f.truncate(16 * 2**20)
    return image, results


def boot(vm: Path, image: Path, results: Path, console: Path, timeout: float = 1500) -> dict[str, Any]:
    """Boot the VM until it powers itself off; return the report the checks wrote to the results disk."""
    kernel = sorted(vm.glob("boot/vmlinuz-*"))[-1]
    initrd = sorted(vm.glob("boot/initrd.img-*"))[-1]
    argv = ["qemu-system-aarch64", *VM_SHAPE, "-nographic", "-nic", "none", "-no-reboot"]
    argv += ["-kernel", str(kernel), "-initrd", str(initrd)]
    argv += ["-append", f"root=LABEL={LABEL} rw console=ttyAMA0 panic=-1"]
    for name, disk in (("root", image), ("results", results)):
        argv += ["-drive", f"if=none,id={name},file={disk},format=raw", "-device", f"virtio-blk-pci,drive={name}"]
    with open(console, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise HarnessError(f"the VM did not power off within {timeout:.0f} s; console: {_tail(console)}") from None
    raw = results.read_bytes()
    if raw.startswith(MARKER):
        raise HarnessError(f"the VM wrote no report (qemu exit {proc.returncode}); console: {_tail(console)}")
    report: dict[str, Any] = json.loads(raw.split(b"\0", 1)[0])
    return report


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_bytes()[-n:].decode(errors="replace")


def run_vm_checks(h: Harness, device_root: Arm64Root, inputs: Path) -> dict[str, Any]:
    """Build or reuse the VM root, boot the VM once, return its report (with the host-side timings).

    ``device_root`` is the prepared qemu-user root (its device venv goes into the image); ``inputs``
    holds ``rpi4/bundle.tar``, ``fleet.pub`` and ``val/**/*.png`` (the ``arm64_inputs`` fixture).
    """
    with h.locked():
        vm = build_vm_root(h, device_root.path)
    work = h.cache / "boot"
    with h.stage("VM image (venv + assets, mkfs.ext4 -d)", build=False):
        image, results = stage_vm(vm, device_root, inputs, work)
    start = time.monotonic()
    with h.stage("VM boot + systemd checks (emulated)", build=False):
        report = boot(vm, image, results, work / "console.log")
    report["host_wall_s"] = round(time.monotonic() - start, 1)
    report["console"] = str(work / "console.log")
    image.unlink(missing_ok=True)
    return report
