"""The arm64 harness: a cached Debian bookworm arm64 root run under qemu-user, with the device venv in it.

Everything expensive lives in ``$EDGEFLEET_CACHE/arm64`` (default ``~/.cache/edgefleet/arm64``), outside
the checkout, in layers rebuilt only when their own inputs change:

- ``qemu/``: the static ``qemu-aarch64`` from Debian trixie's ``qemu-user`` package (bookworm's 7.2
  segfaults importing current onnxruntime wheels), fetched with apt through a separate sources list and
  unpacked with ``dpkg -x``; registered with binfmt_misc (flag F) so a plain ``chroot`` runs arm64 code.
- ``base-<key>/``: ``debootstrap --arch=arm64 --variant=minbase`` bookworm from this machine's Debian mirror.
- ``/opt/edge-runtime`` inside it: the device venv made by ``tests/arm64/install_device.sh`` (the script
  ``Dockerfile.arm64`` runs) from a wheel of the checkout. When only the code changed, the script runs
  again on the kept venv and swaps in the new wheel; the dependencies are reinstalled only when the
  install script or the device/tflite requirements change.
- ``/opt/edge-tests`` inside it: a second venv with the test-only packages (pytest, hypothesis, onnx…)
  that sees the device venv through a ``.pth`` file, so the device venv stays exactly what ships.
- ``wheels/<key>/``: the checkout's wheel, keyed by the packaged files.

The CPU is chosen per process with ``QEMU_CPU`` (cortex-a72 = Raspberry Pi 4, cortex-a76 = Pi 5,
cortex-a57 = Jetson Nano). Needs root (chroot, bind mounts, binfmt_misc); every mount is undone by
:meth:`Arm64Root.mounted`, at exit, and by ``python -m tests.arm64.harness cleanup``.

By hand: ``python -m tests.arm64.harness build [--vm] | shell [--cpu C] | run [--cpu C] -- CMD… |
vm | cleanup | status``. Timings under emulation say nothing about a board's speed.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

__all__ = [
    "BOARD_CPUS",
    "CPUS",
    "DEVICE_VENV",
    "DONE_MARK",
    "INSTALL_SCRIPT",
    "IN_ROOT_TESTS",
    "OPTIONAL_TESTS",
    "PROFILES",
    "REPO",
    "SKIP_ENV",
    "TESTS_DIR",
    "TEST_VENV",
    "Arm64Root",
    "Harness",
    "HarnessError",
    "Stage",
    "cache_dir",
    "cache_key",
    "cleanup_mounts",
    "debian_mirror",
    "device_requirements",
    "fetch_trixie_deb",
    "host_run",
    "main",
    "packaged_files",
    "pip_env",
    "register_binfmt",
    "remove_tree",
    "stage_tests",
]

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
SKIP_ENV = "EDGEFLEET_SKIP_ARM64"
SUITE = "bookworm"
QEMU_SUITE = "trixie"
BOARD_CPUS = {"rpi4": "cortex-a72", "rpi5": "cortex-a76", "jetson-nano": "cortex-a57"}
CPUS = tuple(BOARD_CPUS.values())
PROFILES = ("rpi4", "rpi5", "jetson-nano", "generic-arm64")  # bundles built on the host for the parity checks
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
DEVICE_VENV = "/opt/edge-runtime"
TEST_VENV = "/opt/edge-tests"
EXTRAS = "device,tflite"
# Test-only packages for the in-root pytest run, pinned to the host's versions when it has them
# (tflite-runtime: the LiteRT engine is tested with both interpreter packages on arm64 too).
TEST_PACKAGES = ("pytest", "pytest-timeout", "hypothesis", "onnx", "flatbuffers", "tflite-runtime")
INSTALL_SCRIPT = Path(__file__).with_name("install_device.sh")
BINFMT_NAME = "edgefleet-aarch64"
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
_MAGIC = r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
_MAGIC_HEX = "7f454c460201010000000000000000000200b700"
_MASK = r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
_LAYOUT = "1"  # bump to rebuild every cached layer
DONE_MARK = ".edgefleet-complete"
_PATH = f"{DEVICE_VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ACTIVE_MOUNTS: list[Path] = []  # mounts this process made, undone at exit


class HarnessError(RuntimeError):
    """A prerequisite is missing or a build step failed; the message says which and what to do."""


def cache_dir() -> Path:
    """``$EDGEFLEET_CACHE/arm64`` (default ``~/.cache/edgefleet/arm64``)."""
    base = os.environ.get("EDGEFLEET_CACHE") or str(Path.home() / ".cache" / "edgefleet")
    return (Path(base).expanduser() / "arm64").resolve()  # resolved: compared with /proc/self/mountinfo


def cache_key(*parts: object) -> str:
    """A short digest of a layer's inputs (bytes as they are, anything else by repr)."""
    h = hashlib.sha256(_LAYOUT.encode())
    for part in parts:
        h.update(part if isinstance(part, bytes) else repr(part).encode())
    return h.hexdigest()[:16]


def host_run(argv: Sequence[str], *, log_file: Path | None = None, timeout: float = 3600, **kw: Any) -> str:
    """Run a host command; on failure raise HarnessError with the tail of its output."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kw)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HarnessError(f"{argv[0]} failed to run: {exc}") from exc
    out = proc.stdout + proc.stderr
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text(f"$ {' '.join(argv)}\n{out}")
    if proc.returncode != 0:
        where = f" (full log: {log_file})" if log_file else ""
        raise HarnessError(f"`{' '.join(argv[:6])}…` exited {proc.returncode}{where}:\n{out[-3000:]}")
    return proc.stdout


# --- mounts ------------------------------------------------------------------------------------------


def _mount_points() -> list[Path]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            raw = line.split()[4]
            points.append(Path(raw.encode().decode("unicode_escape")))
    return points


def _umount(point: Path) -> None:
    if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)  # busy: detach now, free later
    with contextlib.suppress(ValueError):
        _ACTIVE_MOUNTS.remove(point)


def cleanup_mounts(under: Path | None = None) -> list[Path]:
    """Unmount everything mounted below ``under`` (default: the arm64 cache), deepest first."""
    top = (under or cache_dir()).resolve()
    found = [p for p in _mount_points() if p == top or top in p.parents]
    for point in sorted(found, key=lambda p: len(p.parts), reverse=True):
        _umount(point)
    return found


@atexit.register
def _undo_mounts() -> None:
    for point in reversed(list(_ACTIVE_MOUNTS)):
        _umount(point)


def remove_tree(path: Path) -> None:
    """rm -rf that refuses to descend into a bind-mounted /dev or /sys."""
    if not path.exists():
        return
    cleanup_mounts(path)
    if any(p == path.resolve() or path.resolve() in p.parents for p in _mount_points()):
        raise HarnessError(f"{path} still has mounts below it; run `python -m tests.arm64.harness cleanup`")
    shutil.rmtree(path)


# --- the root ----------------------------------------------------------------------------------------


@dataclass
class Arm64Root:
    """A Debian arm64 root run through chroot + binfmt_misc + qemu-user, one emulated CPU per process."""

    path: Path

    def host(self, inside: str | Path) -> Path:
        """The host path of ``inside`` (an absolute path in the root)."""
        return self.path / str(inside).lstrip("/")

    @contextlib.contextmanager
    def mounted(self) -> Iterator[Arm64Root]:
        """/proc, /sys and /dev inside the root (onnxruntime reads them); undone even when a test fails."""
        made: list[Path] = []
        present = set(_mount_points())
        try:
            for name, args in (
                ("proc", ["-t", "proc", "proc"]),
                ("sys", ["--bind", "/sys"]),
                ("dev", ["--bind", "/dev"]),
            ):
                target = self.path / name
                if target in present:
                    continue  # already mounted by another session of the harness: leave it to that one
                host_run(["mount", *args, str(target)])
                made.append(target)
                _ACTIVE_MOUNTS.append(target)
            resolv = self.host("/etc/resolv.conf")
            if resolv.is_symlink():  # an absolute link would be followed on the host: never write through it
                resolv.unlink()
            if Path("/etc/resolv.conf").is_file():
                shutil.copyfile("/etc/resolv.conf", resolv)  # pip in the root resolves names like the host
            yield self
        finally:
            for target in reversed(made):
                _umount(target)

    def command(
        self, argv: Sequence[str], *, cpu: str = CPUS[0], env: Mapping[str, str] | None = None, cwd: str = "/"
    ) -> tuple[list[str], dict[str, str]]:
        """(argv, env) that run ``argv`` in the root on ``cpu``; the host environment does not leak in."""
        full_env = {"PATH": _PATH, "HOME": "/root", "LANG": "C.UTF-8", "TMPDIR": "/tmp", "QEMU_CPU": cpu}
        full_env.update(env or {})
        wrapped = ["chroot", str(self.path), "/bin/sh", "-c", 'cd "$0" && exec "$@"', cwd, *argv]
        return wrapped, full_env

    def run(
        self,
        argv: Sequence[str],
        *,
        cpu: str = CPUS[0],
        env: Mapping[str, str] | None = None,
        cwd: str = "/",
        timeout: float = 900,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the root (inside :meth:`mounted`) and capture its output as text."""
        cmd, full_env = self.command(argv, cpu=cpu, env=env, cwd=cwd)
        return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)

    def popen(
        self,
        argv: Sequence[str],
        *,
        cpu: str = CPUS[0],
        env: Mapping[str, str] | None = None,
        cwd: str = "/",
        **kw: Any,
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` in the root; its pid is the emulated process itself (chroot and sh exec into it)."""
        cmd, full_env = self.command(argv, cpu=cpu, env=env, cwd=cwd)
        return subprocess.Popen(cmd, env=full_env, **kw)

    def check(self, argv: Sequence[str], *, log_file: Path | None = None, timeout: float = 3600, **kw: Any) -> str:
        """Run ``argv`` in the root; HarnessError with its output when it fails."""
        cmd, full_env = self.command(argv, **kw)
        return host_run(cmd, env=full_env, log_file=log_file, timeout=timeout)

    def du(self, inside: str) -> int:
        """Bytes used by a directory of the root (apparent size of regular files)."""
        return sum(p.stat().st_size for p in self.host(inside).rglob("*") if p.is_file() and not p.is_symlink())


# --- building the layers -----------------------------------------------------------------------------


@dataclass
class Stage:
    """One build or run step: how long it took and whether it had to build (cold) or reused a cache (warm)."""

    name: str
    build: bool = True  # False: a test step (always runs), not a cached layer
    seconds: float = 0.0
    cold: bool = False

    def describe(self) -> str:
        """``name: 12.3 s, built|cached|ran``."""
        how = ("built" if self.cold else "cached") if self.build else "ran"
        return f"{self.name}: {self.seconds:.1f} s, {how}"


@dataclass
class Harness:
    """Builds and caches the layers, and records how long each stage took in this process."""

    repo: Path = REPO
    cache: Path = field(default_factory=cache_dir)
    stages: list[Stage] = field(default_factory=list)

    @contextlib.contextmanager
    def stage(self, name: str, *, build: bool = True) -> Iterator[Stage]:
        """Time a step; a build step's body sets ``.cold = True`` when it built rather than reused."""
        st = Stage(name, build)
        start = time.monotonic()
        try:
            yield st
        finally:
            st.seconds = time.monotonic() - start
            self.stages.append(st)
            self._remember(st)

    def _remember(self, st: Stage) -> None:
        path = self.cache / "stages.json"
        with contextlib.suppress(OSError, ValueError):
            known = json.loads(path.read_text()) if path.is_file() else {}
            kind = ("cold" if st.cold else "warm") if st.build else "last"
            known.setdefault(st.name, {})[kind] = round(st.seconds, 1)
            path.write_text(json.dumps(known, indent=1, sort_keys=True))

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One builder at a time per cache (a second pytest or a shell by hand waits)."""
        self.cache.mkdir(parents=True, exist_ok=True)
        with open(self.cache / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def require_tools(self) -> None:
        """Root and the host tools the build needs, else HarnessError saying what to install."""
        if os.geteuid() != 0:
            raise HarnessError("the arm64 harness needs root (chroot, mounts, binfmt_misc)")
        need = {"debootstrap": "debootstrap", "chroot": "coreutils", "dpkg-deb": "dpkg", "apt-get": "apt"}
        missing = sorted({pkg for tool, pkg in need.items() if shutil.which(tool) is None})
        if missing:
            raise HarnessError(f"missing host packages: apt-get install -y {' '.join(missing)}")

    def mirror(self) -> str:
        """This machine's Debian mirror ($EDGEFLEET_DEBIAN_MIRROR, else the apt sources serving bookworm)."""
        if os.environ.get("EDGEFLEET_DEBIAN_MIRROR"):
            return os.environ["EDGEFLEET_DEBIAN_MIRROR"]
        return debian_mirror(Path("/etc/apt"))

    def prepare(self) -> Arm64Root:
        """Every qemu-user layer, built or reused: qemu, binfmt, the base root, the device and test venvs."""
        self.require_tools()
        with self.locked():
            qemu = self.fetch_qemu()
            register_binfmt(qemu)
            root = Arm64Root(self.base_root())
            wheel = self.wheel()
            with root.mounted():
                self.device_venv(root, wheel)
                self.test_venv(root)
        return root

    def fetch_qemu(self) -> Path:
        """The static trixie ``qemu-aarch64`` (downloaded once)."""
        exe = self.cache / "qemu" / "qemu-aarch64"
        with self.stage("qemu-user (trixie)") as st:
            if exe.is_file():
                return exe
            st.cold = True
            apt = self.cache / "apt-trixie"
            remove_tree(apt)
            deb = fetch_trixie_deb(apt, self.mirror(), ("qemu-user", "qemu-user-static"))
            unpacked = apt / "x"
            host_run(["dpkg-deb", "-x", str(deb), str(unpacked)])
            found = unpacked / "usr" / "bin" / "qemu-aarch64"
            if not found.is_file() or not _is_static(found):
                raise HarnessError(f"{deb.name} holds no static usr/bin/qemu-aarch64")
            exe.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(found, exe.with_suffix(".tmp"))
            exe.with_suffix(".tmp").rename(exe)
            remove_tree(apt)
            return exe

    def base_root(self) -> Path:
        """The debootstrapped minbase root (arm64 bookworm), built once per mirror and package list."""
        mirror = self.mirror()
        key = cache_key(SUITE, mirror, BASE_PACKAGES)
        root = self.cache / f"base-{key}"
        with self.stage("debootstrap minbase") as st:
            if (root / DONE_MARK).is_file():
                return root
            st.cold = True
            for old in self.cache.glob("base-*"):
                remove_tree(old)
            partial = self.cache / f"base-{key}.partial"
            argv = ["debootstrap", "--arch=arm64", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}"]
            try:
                host_run([*argv, SUITE, str(partial), mirror], log_file=self.cache / "logs" / "debootstrap.log")
            finally:
                cleanup_mounts(partial)  # debootstrap mounts /proc itself and can leave it on failure
            Arm64Root(partial).check(["apt-get", "clean"])
            (partial / DONE_MARK).write_text(mirror + "\n")
            partial.rename(root)
            return root

    def wheel(self) -> Path:
        """A wheel of the checkout (built on the host; it is pure Python), keyed by the packaged files."""
        files = packaged_files(self.repo)
        key = cache_key(*((str(p.relative_to(self.repo)), p.read_bytes()) for p in files))
        out = self.cache / "wheels" / key
        with self.stage("edgefleet wheel") as st:
            found = sorted(out.glob("edgefleet-*.whl"))
            if found:
                return found[0]
            st.cold = True
            remove_tree(self.cache / "wheels")
            src = self.cache / "wheel-src"
            remove_tree(src)
            for p in files:
                dest = src / p.relative_to(self.repo)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, dest)
            pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out)]
            host_run([*pip, str(src)], log_file=self.cache / "logs" / "wheel.log")
            remove_tree(src)
            return sorted(out.glob("edgefleet-*.whl"))[0]

    def device_venv(self, root: Arm64Root, wheel: Path) -> None:
        """Run install_device.sh in the root; the dependency layer is rebuilt only when its inputs change."""
        deps = cache_key(INSTALL_SCRIPT.read_bytes(), device_requirements(self.repo), EXTRAS)
        state = _read_json(root.host("/opt/.edgefleet-device.json"))
        with self.stage("device venv (install_device.sh)") as st:
            if state.get("deps") == deps and state.get("wheel") == wheel.name + wheel.parent.name:
                return
            st.cold = True
            st.name += ": dependencies" if state.get("deps") != deps else ": new wheel only"
            if state.get("deps") != deps:
                remove_tree(root.host(DEVICE_VENV))
                remove_tree(root.host(TEST_VENV))
            shutil.copy2(INSTALL_SCRIPT, root.host("/tmp/install_device.sh"))
            shutil.copy2(wheel, root.host(f"/tmp/{wheel.name}"))
            argv = ["sh", "/tmp/install_device.sh", f"/tmp/{wheel.name}", DEVICE_VENV, EXTRAS]
            root.check(argv, env=pip_env(root), log_file=self.cache / "logs" / "install_device.log")
            root.host(f"/tmp/{wheel.name}").unlink()
            _write_json(
                root.host("/opt/.edgefleet-device.json"), {"deps": deps, "wheel": wheel.name + wheel.parent.name}
            )

    def test_venv(self, root: Arm64Root) -> None:
        """pytest & co. in a venv of their own that imports the device venv's packages through a .pth file."""
        device = _read_json(root.host("/opt/.edgefleet-device.json")).get("deps", "")
        pins = tuple(_pin(name) for name in TEST_PACKAGES)
        key = cache_key(device, pins)
        with self.stage("test venv (pytest, hypothesis, onnx)") as st:
            if _read_json(root.host("/opt/.edgefleet-tests.json")).get("key") == key:
                return
            st.cold = True
            remove_tree(root.host(TEST_VENV))
            root.check(["python3", "-m", "venv", TEST_VENV])
            site = root.host(DEVICE_VENV).glob("lib/python3*/site-packages")
            device_site = "/" + str(next(site).relative_to(root.path))
            pth = next(root.host(TEST_VENV).glob("lib/python3*/site-packages")) / "edge-runtime.pth"
            pth.write_text(device_site + "\n")
            pip = [f"{TEST_VENV}/bin/pip", "install", "--no-cache-dir", "--only-binary=:all:", *pins]
            root.check(pip, env=pip_env(root), log_file=self.cache / "logs" / "test_venv.log")
            _write_json(root.host("/opt/.edgefleet-tests.json"), {"key": key})


# --- the runtime's own tests, copied into the root ----------------------------------------------------

# Host-independent tests of the device package: they need no toolchain, torch or broker. Files named in
# OPTIONAL_TESTS join when they exist (model store, rollout state machine, downloads).
IN_ROOT_TESTS = (
    "tests/unit/test_engine.py",
    "tests/unit/test_cpu.py",
    "tests/unit/test_logbook.py",
    "tests/integration/test_logbook_crash.py",
    "tests/unit/test_commands.py",
    "tests/unit/test_preprocess.py",
    "tests/unit/test_litert.py",
    "tests/unit/test_notify.py",
    "tests/unit/test_health.py",
    "tests/unit/test_topics.py",
    "tests/unit/test_durable.py",
)
OPTIONAL_TESTS = ("tests/unit/test_store.py", "tests/unit/test_rollout.py", "tests/unit/test_download.py")
_SUPPORT = (
    "pyproject.toml",
    "tests/__init__.py",
    "tests/conftest.py",
    "tests/tflite_builder.py",
    "tests/unit/__init__.py",
    "tests/integration/__init__.py",
    "tests/integration/logbook_writer.py",
    "tests/integration/sync_device.py",
)
TESTS_DIR = "/opt/edgefleet-tests"


def stage_tests(root: Arm64Root, repo: Path = REPO) -> list[str]:
    """Copy the in-root tests to ``/opt/edgefleet-tests/repo`` (no runtime/ there: the venv's is tested).

    ``shared/boards`` (recorded sysfs trees) goes beside it as ``/opt/edgefleet-tests/shared``, the
    layout ``tests/conftest.py`` expects. Returns the test files, relative to the repo.
    """
    top = root.host(TESTS_DIR)
    remove_tree(top)
    tests = [t for t in (*IN_ROOT_TESTS, *OPTIONAL_TESTS) if (repo / t).is_file()]
    for rel in (*_SUPPORT, *tests):
        dest = top / "repo" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / rel, dest)
    shutil.copy2(Path(__file__).with_name("inroot_conftest.py"), top / "repo" / "conftest.py")
    shutil.copy2(Path(__file__).with_name("probe.py"), top / "probe.py")
    boards = repo.parent / "shared" / "boards"
    if boards.is_dir():
        shutil.copytree(boards, top / "shared" / "boards")
    return tests


# --- host-side pieces --------------------------------------------------------------------------------


def debian_mirror(apt_dir: Path) -> str:
    """The URI of the apt source serving ``bookworm`` (deb822 ``*.sources`` first, then sources.list)."""
    for src in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        for para in src.read_text().split("\n\n"):
            fields = dict(
                line.split(":", 1) for line in para.splitlines() if ":" in line and not line.startswith((" ", "#"))
            )
            suites = fields.get("Suites", "").split()
            if SUITE in suites and "deb" in fields.get("Types", "").split():
                return fields["URIs"].split()[0]
    for lst in [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]:
        for line in lst.read_text().splitlines() if lst.is_file() else []:
            words = [w for w in line.split() if not w.startswith("[")]
            if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                return words[1]
    raise HarnessError(f"no apt source for {SUITE} under {apt_dir}; set EDGEFLEET_DEBIAN_MIRROR=http://…/debian")


def fetch_trixie_deb(apt: Path, mirror: str, names: Sequence[str]) -> Path:
    """Download the first of ``names`` that trixie has, with apt state kept in ``apt`` (system apt untouched)."""
    for sub in ("lists/partial", "cache/archives/partial", "sources"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    (apt / "sources" / "trixie.sources").write_text(
        f"Types: deb\nURIs: {mirror}\nSuites: {QEMU_SUITE}\nComponents: main\nSigned-By: {keyring}\n"
    )
    opts = [
        "-o", "Dir::Etc::SourceList=/dev/null",
        "-o", f"Dir::Etc::SourceParts={apt / 'sources'}",
        "-o", f"Dir::State::Lists={apt / 'lists'}",
        "-o", "Dir::State::Status=/dev/null",
        "-o", f"Dir::Cache={apt / 'cache'}",
        "-o", "APT::Sandbox::User=root",
    ]  # fmt: skip
    host_run(["apt-get", "-q", *opts, "update"], log_file=apt.parent / "logs" / "apt-trixie.log")
    for name in names:
        policy = host_run(["apt-cache", *opts, "policy", name])
        if "Candidate:" in policy and "Candidate: (none)" not in policy:
            host_run(["apt-get", "-q", *opts, "download", name], cwd=apt)
            return next(apt.glob(f"{name}_*.deb"))
    raise HarnessError(f"Debian {QEMU_SUITE} at {mirror} has none of {', '.join(names)}")


def _is_static(exe: Path) -> bool:
    """True when the ELF file has no program interpreter (it runs inside any chroot)."""
    data = exe.read_bytes()[:65536]
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    (phoff,) = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    types = [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]
    return 3 not in types  # PT_INTERP


def register_binfmt(qemu: Path) -> None:
    """binfmt_misc entry for arm64 ELF → ``qemu`` (flags OPF: the open file serves every chroot)."""
    if not (BINFMT_DIR / "register").exists():
        host_run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)])
    entry = BINFMT_DIR / BINFMT_NAME
    others = [
        p for p in BINFMT_DIR.iterdir()
        if p.name not in ("register", "status", BINFMT_NAME) and f"magic {_MAGIC_HEX}" in _entry_text(p)
    ]  # fmt: skip
    if entry.exists():
        if f"interpreter {qemu}\n" in entry.read_text() and not others:
            return
        entry.write_text("-1")  # stale path, or another aarch64 handler registered after ours: re-add last
    (BINFMT_DIR / "register").write_text(f":{BINFMT_NAME}:M::{_MAGIC}:{_MASK}:{qemu}:OPF")


def _entry_text(p: Path) -> str:
    """An enabled binfmt_misc entry's text ('' when disabled or unreadable)."""
    with contextlib.suppress(OSError):
        text = p.read_text()
        if "enabled" in text.splitlines()[0]:
            return text
    return ""


def packaged_files(repo: Path) -> list[Path]:
    """What the wheel is built from: pyproject, README and the packages (no caches)."""
    files = [repo / "pyproject.toml", repo / "README.md"]
    for pkg in ("runtime", "toolchain", "device_profiles"):
        files += [p for p in (repo / pkg).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return sorted(files)


def device_requirements(repo: Path) -> list[str]:
    """The requirements of the device install: base + the device and tflite extras."""
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    return [*project.get("dependencies", []), *extras.get("device", []), *extras.get("tflite", [])]


def pip_env(root: Arm64Root) -> dict[str, str]:
    """pip settings for the root: the host's CA bundle (a TLS-inspecting proxy's CA lives there) and index."""
    env = {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_DEFAULT_TIMEOUT": os.environ.get("PIP_DEFAULT_TIMEOUT", "120")}
    host_ca = Path(os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt")
    if host_ca.is_file():
        shutil.copyfile(host_ca, root.host("/etc/ssl/certs/edgefleet-host-ca.crt"))
        env["PIP_CERT"] = "/etc/ssl/certs/edgefleet-host-ca.crt"
    index = os.environ.get("PIP_INDEX_URL", "")
    if index.startswith(("http://", "https://")):
        env["PIP_INDEX_URL"] = index
    return env


def _pin(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{name}=={version(name)}"
    except PackageNotFoundError:
        return name


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


# --- command line ------------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace, harness: Harness) -> int:
    root = harness.prepare()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    with root.mounted():
        cmd, env = root.command(argv or ["/bin/bash"], cpu=args.cpu, cwd=args.cwd)
        return subprocess.call(cmd, env=env)


def _cmd_status(harness: Harness) -> int:
    print(f"cache: {harness.cache}")
    for p in sorted(harness.cache.glob("*")):
        print(f"  {p.name}")
    entry = BINFMT_DIR / BINFMT_NAME
    print(f"binfmt: {entry.read_text().splitlines()[:2] if entry.exists() else 'not registered'}")
    print(f"mounts under the cache: {[str(p) for p in _mount_points() if harness.cache in p.parents]}")
    print(f"stage times (s): {_read_json(harness.cache / 'stages.json')}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tests.arm64.harness build|shell|run|vm|cleanup|status``."""
    ap = argparse.ArgumentParser(prog="python -m tests.arm64.harness", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build or refresh every cached layer")
    b.add_argument("--vm", action="store_true", help="also the full-system VM root (about 11 min the first time)")
    for name, text in (("shell", "an interactive shell in the root"), ("run", "run a command in the root")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--cpu", default=CPUS[0], help=f"QEMU_CPU (default {CPUS[0]}; also {', '.join(CPUS[1:])})")
        p.add_argument("--cwd", default="/", help="working directory inside the root")
        if name == "run":
            p.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND ARGS…")
    v = sub.add_parser("vm", help="boot the systemd VM, run the unit checks, print their JSON report")
    v.add_argument("--inputs", type=Path, required=True, help="dir with rpi4/bundle.tar, fleet.pub, val/**/*.png")
    c = sub.add_parser("cleanup", help="unmount everything the harness mounted under the cache")
    c.add_argument("--binfmt", action="store_true", help="also remove the binfmt_misc entry for arm64")
    sub.add_parser("status", help="cache layers, binfmt entry, mounts, last stage times")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    harness = Harness()
    try:
        if args.cmd == "cleanup":
            print("\n".join(f"unmounted {p}" for p in cleanup_mounts()) or "nothing mounted")
            if args.binfmt and (BINFMT_DIR / BINFMT_NAME).exists():
                (BINFMT_DIR / BINFMT_NAME).write_text("-1")
                print(f"removed binfmt_misc entry {BINFMT_NAME}")
            return 0
        if args.cmd == "status":
            return _cmd_status(harness)
        if args.cmd in ("shell", "run"):
            args.argv = getattr(args, "argv", [])
            return _cmd_run(args, harness)
        if args.cmd in ("build", "vm"):
            root = harness.prepare()
        if args.cmd == "build" and args.vm:
            from tests.arm64.vm import build_vm_root

            with harness.locked():
                build_vm_root(harness, root.path)
        if args.cmd == "vm":
            from tests.arm64.vm import run_vm_checks

            print(json.dumps(run_vm_checks(harness, root, args.inputs), indent=1))
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for st in harness.stages:
            print(st.describe(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
