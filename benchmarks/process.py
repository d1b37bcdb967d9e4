"""Child processes of the benchmarks: a clean environment, always reaped, and READY read from a NOTIFY_SOCKET."""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["REPO", "child", "child_env", "notify_socket", "wait_ready"]

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 120.0
_names = itertools.count()


def child_env(**extra: str) -> dict[str, str]:
    """This environment without systemd's variables, with the checkout on PYTHONPATH, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return {**env, **extra}


@contextlib.contextmanager
def child(args: Sequence[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """A child process that is always gone on exit (killed if it is still running); stderr appended to ``log``."""
    with log.open("ab") as err:
        proc = subprocess.Popen(
            args, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@contextlib.contextmanager
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket in the abstract namespace and the ``NOTIFY_SOCKET`` value that reaches it."""
    name = f"edgefleet-bench-{os.getpid()}-{next(_names)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)  # abstract namespace: no path-length limit, nothing left on disk
        sock.settimeout(0.05)
        yield sock, "@" + name


def wait_ready(sock: socket.socket, proc: subprocess.Popen[bytes], log: Path) -> float:
    """Block until ``proc`` sends ``READY=1`` on ``sock``; the ``time.perf_counter()`` it arrived."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if b"READY=1" in sock.recv(4096).split(b"\n"):
                return time.perf_counter()
        except TimeoutError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"edge-runtime serve exited {proc.returncode} before READY; see {log}")
    raise RuntimeError(f"edge-runtime serve sent no READY within {READY_TIMEOUT_S:.0f} s; see {log}")
