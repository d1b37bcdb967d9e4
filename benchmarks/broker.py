"""A real Mosquitto for the benchmarks that need a broker: loopback, free port, no persistence, stopped on exit.

The same way ``tests/broker.py`` starts one (temporary config, ``listener <port> 127.0.0.1``,
``allow_anonymous true``, queues unlimited), minus pytest and minus persistence: the benchmarks
measure the path to the broker, not the broker's disk. :class:`~benchmarks.harness.Skipped` when
Mosquitto is not installed (``apt-get install -y mosquitto``).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness import Skipped

__all__ = ["Mosquitto", "mosquitto"]

_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/usr/bin/mosquitto")


@dataclass(frozen=True)
class Mosquitto:
    """A running broker: where it listens and its process id (for CPU accounting)."""

    host: str
    port: int
    pid: int
    log: Path


def _binary() -> str:
    found = shutil.which("mosquitto") or next((c for c in _CANDIDATES if os.access(c, os.X_OK)), None)
    if found is None:
        raise Skipped("mosquitto is not installed (apt-get install -y mosquitto)")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def mosquitto(max_connections: int = -1) -> Iterator[Mosquitto]:
    """Start Mosquitto on a free loopback port; SIGTERM and wait on exit."""
    binary = _binary()
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-mosquitto-") as tmp:
        port = _free_port()
        conf, log = Path(tmp) / "mosquitto.conf", Path(tmp) / "mosquitto.log"
        lines = [
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            "allow_anonymous true",
            "max_queued_messages 1000000",
            "max_queued_bytes 0",
            "persistence false",
            f"max_connections {max_connections}",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            f"listener {port} 127.0.0.1",
        ]
        conf.write_text("\n".join(lines) + "\n")
        with log.open("ab") as out:
            proc = subprocess.Popen([binary, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        try:
            deadline = time.monotonic() + 10.0
            while not _accepts(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mosquitto did not start on port {port}: {log.read_text(errors='replace')}")
                time.sleep(0.02)
            yield Mosquitto("127.0.0.1", port, proc.pid, log)
        finally:
            proc.terminate()
            try:
                proc.wait(10.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
