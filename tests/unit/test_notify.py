"""sd_notify on the wire: a real AF_UNIX datagram socket plays systemd's NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.notify import Liveness, Notifier, WatchdogKeeper


class _Systemd:
    """The receiving end: a bound DGRAM socket and the datagrams it got, with arrival times."""

    def __init__(self, address: str, spec: str) -> None:
        self.spec = spec  # what NOTIFY_SOCKET holds
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)

    def recv(self, window: float) -> list[tuple[float, str]]:
        """Every datagram that arrives within ``window`` seconds."""
        out: list[tuple[float, str]] = []
        end = time.monotonic() + window
        while time.monotonic() < end:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            out.append((time.monotonic(), data.decode()))
        return out

    def one(self) -> str:
        """Exactly one datagram: waits up to 2 s for it, then briefly for a stray second one."""
        self.sock.settimeout(2.0)
        try:
            first = self.sock.recv(65536).decode()
        finally:
            self.sock.settimeout(0.05)
        extra = self.recv(0.05)
        assert extra == [], extra
        return first


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[_Systemd]:
    path = tmp_path / "notify.sock"
    short = None
    if len(str(path)) > 100:  # sun_path holds 108 bytes
        short = tempfile.mkdtemp(prefix="sd")
        path = Path(short) / "n.sock"
    peer = _Systemd(str(path), str(path))
    yield peer
    peer.sock.close()
    if short:
        path.unlink(missing_ok=True)
        os.rmdir(short)


@pytest.fixture
def abstract_systemd() -> Iterator[_Systemd]:
    name = f"edge-test-{uuid.uuid4().hex}"
    peer = _Systemd("\0" + name, "@" + name)
    yield peer
    peer.sock.close()


def test_ready_sends_ready_and_status(systemd: _Systemd) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": systemd.spec})
    assert n.enabled
    assert n.ready("model digits 1.2.0 warmed up") is True
    assert systemd.one() == "READY=1\nSTATUS=model digits 1.2.0 warmed up"
    n.close()


def test_abstract_socket_gets_status_stopping_and_extend(abstract_systemd: _Systemd) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": abstract_systemd.spec})
    assert n.status("serving 14.8 fps")
    assert abstract_systemd.one() == "STATUS=serving 14.8 fps"
    assert n.extend_timeout(30_000_000)
    assert abstract_systemd.one() == "EXTEND_TIMEOUT_USEC=30000000"
    assert n.stopping()
    assert abstract_systemd.one() == "STOPPING=1"
    assert n.reloading()
    lines = abstract_systemd.one().split("\n")
    assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC=") and int(lines[1].split("=")[1]) > 0
    n.close()


def test_status_cannot_inject_assignments(systemd: _Systemd) -> None:
    n = Notifier(systemd.spec, watchdog_usec=1_000_000)
    n.status("bad model name\nWATCHDOG=1")
    msg = systemd.one()
    assert "\n" not in msg and msg.startswith("STATUS=bad model name")
    n.close()


def test_watchdog_ping_and_intervals(systemd: _Systemd) -> None:
    n = Notifier.from_env(
        {"NOTIFY_SOCKET": systemd.spec, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    )
    assert n.watchdog_enabled
    assert n.watchdog_timeout == 30.0
    assert n.watchdog_interval == 15.0
    assert n.watchdog() is True
    assert systemd.one() == "WATCHDOG=1"
    n.close()


def test_watchdog_pid_mismatch_disables_the_watchdog_only(systemd: _Systemd) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": systemd.spec, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"})
    assert not n.watchdog_enabled
    assert n.watchdog_interval is None and n.watchdog_timeout is None
    assert n.watchdog() is False
    assert systemd.recv(0.2) == []
    assert n.ready()  # the notification socket itself still works
    assert systemd.one() == "READY=1"
    n.close()


def test_not_under_systemd_everything_is_a_noop() -> None:
    n = Notifier.from_env({})
    assert not n.enabled and not n.watchdog_enabled and n.watchdog_interval is None
    assert n.ready("x") is False and n.status("x") is False and n.watchdog() is False
    assert n.stopping() is False and n.extend_timeout(1) is False
    keeper = WatchdogKeeper(n, lambda: True, 0.01)
    keeper.start()
    assert not keeper.running  # no thread without a watchdog


def test_unset_removes_the_variables_for_children(systemd: _Systemd) -> None:
    env = {"NOTIFY_SOCKET": systemd.spec, "WATCHDOG_USEC": "5000000", "PATH": "/bin"}
    n = Notifier.from_env(env, unset=True)
    assert env == {"PATH": "/bin"}
    assert n.watchdog()
    assert systemd.one() == "WATCHDOG=1"
    n.close()


def test_bad_socket_values_disable_notifications() -> None:
    assert not Notifier("relative/path").enabled
    assert not Notifier("vsock:2:1234").enabled
    assert Notifier.from_env({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "soon"}).watchdog_interval is None


def test_send_errors_are_logged_once_and_never_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier(str(tmp_path / "nobody-listens.sock"), watchdog_usec=1_000_000)
    with caplog.at_level(logging.WARNING, logger="runtime.notify"):
        results = [n.ready("x"), n.status("y"), n.watchdog(), n.watchdog()]
    assert results == [False, False, False, False]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "nobody-listens.sock" in warnings[0].getMessage()
    n.close()


def test_extend_timeout_rejects_nonsense() -> None:
    n = Notifier(None)
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="extend_timeout"):
            n.extend_timeout(bad)  # type: ignore[arg-type]


def test_liveness_with_a_fake_clock() -> None:
    now = [100.0]
    live = Liveness(2.0, clock=lambda: now[0])
    assert live.alive()  # counts from construction
    now[0] = 101.9
    assert live.alive()
    now[0] = 102.0
    assert not live.alive() and live.age() == pytest.approx(2.0)
    live.heartbeat()
    assert live.alive()
    with pytest.raises(ValueError):
        Liveness(0)


def _pings(got: list[tuple[float, str]], start: float, end: float) -> int:
    return sum(1 for t, msg in got if start <= t < end and msg == "WATCHDOG=1")


def test_keeper_pings_while_the_loop_lives_and_stops_when_it_stalls(systemd: _Systemd) -> None:
    notifier = Notifier(systemd.spec, watchdog_usec=200_000)
    live = Liveness(0.2)
    keeper = WatchdogKeeper(notifier, live.alive, interval=0.05)
    beating = threading.Event()
    beating.set()
    done = threading.Event()

    def inference_loop() -> None:
        while not done.is_set():
            if beating.is_set():
                live.heartbeat()
            time.sleep(0.01)

    loop = threading.Thread(target=inference_loop, daemon=True)
    loop.start()
    keeper.start()
    assert keeper.running
    assert [t.name for t in threading.enumerate()].count("edge-watchdog") == 1
    try:
        t0 = time.monotonic()
        alive_phase = systemd.recv(0.5)
        beating.clear()  # the loop stalls: no more heartbeats
        t_stall = time.monotonic()
        stalled_phase = systemd.recv(1.0)
        beating.set()  # and recovers
        t_back = time.monotonic()
        recovered = systemd.recv(0.4)
    finally:
        keeper.stop()
        done.set()
        loop.join(1.0)
    assert _pings(alive_phase, t0, t_stall) >= 3
    # the stall is visible after stall_after_s (0.2) plus at most one interval; allow slack
    detected = t_stall + 0.2 + 0.05 + 0.15
    assert _pings(stalled_phase, detected, detected + 0.5) == 0
    assert _pings(stalled_phase, t_stall, t_stall + 1.0) <= 6  # the few sent before detection
    assert _pings(recovered, t_back, t_back + 0.4) >= 2
    notifier.close()


def test_keeper_stops_within_a_second_and_leaves_no_thread(systemd: _Systemd) -> None:
    notifier = Notifier(systemd.spec, watchdog_usec=10_000_000)
    keeper = WatchdogKeeper(notifier, lambda: True, interval=5.0)
    keeper.start()
    keeper.start()  # idempotent
    assert [t.name for t in threading.enumerate()].count("edge-watchdog") == 1
    thread = next(t for t in threading.enumerate() if t.name == "edge-watchdog")
    assert thread.daemon
    t0 = time.monotonic()
    keeper.stop()
    assert time.monotonic() - t0 < 1.0
    assert not thread.is_alive() and not keeper.running
    assert keeper.pings == 1  # the immediate first ping
    assert systemd.one() == "WATCHDOG=1"
    notifier.close()


def test_keeper_rejects_a_bad_interval() -> None:
    with pytest.raises(ValueError, match="interval"):
        WatchdogKeeper(Notifier(None), lambda: True, 0)
