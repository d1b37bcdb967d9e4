"""A real Mosquitto broker for tests: started on a free loopback port, stopped, SIGKILLed and restarted.

Fixtures ``broker`` (one per test) and ``broker_session`` (one per session): import them into a
test module (``from tests.broker import broker_fixture`` registers ``broker`` without shadowing the
test argument; ``from tests.broker import broker`` works too), or list this module in the root
conftest's ``pytest_plugins = ["tests.broker"]`` to have them everywhere.

What Mosquitto 2.0 keeps across a restart (``persistence true``, checked against 2.0.11):

- **SIGTERM / SIGINT** (``stop()``): a clean shutdown. Mosquitto writes its in-memory database
  (retained messages, persistent sessions with their subscriptions, queued and in-flight QoS 1/2
  messages) to ``persistence_file`` before it exits, so nothing it acknowledged is lost.
- **SIGKILL** (``kill()``): no chance to save. What comes back is the last *autosave*: every
  ``autosave_interval`` seconds (default 1800), or with ``autosave_on_changes true`` once that many
  changes accumulated. Only some things count as changes: subscriptions, persistent-session
  connects, retained messages, and messages *queued* for a session (offline, or past its in-flight
  window); a message handed straight to a connected subscriber does not. The config here saves
  after every change (``autosave_interval 1`` + ``autosave_on_changes true``), and still the save
  runs in the main loop after the PUBACK went out, so a message PUBACKed in the last milliseconds
  before the kill can be gone: measured with 20 SIGKILLs during a 50,000-record sync, 2 runs in 6
  lost 100–600 records, always whole batches acknowledged within ~3 ms of a kill. The publisher saw
  the PUBACK and will not send it again — that loss is the broker's, not the client's. Tests that
  assert "nothing lost" therefore restart the broker with :meth:`stop` (connections still drop
  mid-flight, unacknowledged messages are still re-sent), and SIGKILL tests bound the loss.
- ``max_queued_messages`` (default 1000 per session) would silently drop messages queued for a
  persistent session beyond it; the config here lifts it. For MQTT 3.1.1 subscribers the in-flight
  window is ``max_inflight_messages`` (20); MQTT 5 subscribers get their Receive Maximum (paho: 65535).
- Mosquitto logs each client's protocol as ``p2`` (3.1.1) or ``p5`` (MQTT 5) and ``c0``/``c1`` for
  a persistent/clean session: ``New client connected from … as dev1 (p5, c0, k30)``.

``SIGUSR1`` makes Mosquitto save its database without exiting (:meth:`Broker.save`).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

__all__ = [
    "Broker",
    "Collector",
    "Received",
    "broker",
    "broker_fixture",
    "broker_session",
    "broker_session_fixture",
    "module_broker_fixture",
    "mosquitto_binary",
    "require_mosquitto",
]

_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/usr/bin/mosquitto")
_APT = "apt-get install -y mosquitto"


def mosquitto_binary() -> str | None:
    """Path of the mosquitto executable, or None when it is not installed."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((c for c in _CANDIDATES if os.access(c, os.X_OK)), None)


def require_mosquitto() -> str:
    """The mosquitto path; otherwise fail the test under ``CI=true`` and skip it elsewhere."""
    path = mosquitto_binary()
    if path is None:
        message = f"mosquitto is not installed; install it with `{_APT}` (Debian/Ubuntu)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " — CI must run the broker tests", pytrace=False)
        pytest.skip(message)
    return path


def _free_port(attempts: int = 50) -> int:
    """A port nobody listens on; retried, because other tests' TIME_WAIT sockets can exhaust the ephemeral range."""
    for attempt in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", 0))
            except OSError:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.1)
                continue
            return int(sock.getsockname()[1])
    raise AssertionError("unreachable")


class Broker:
    """One mosquitto process with a temporary config and persistence directory.

    ``listeners`` has one entry per listener, each a list of config lines that follow that
    listener's ``listener <port> 127.0.0.1`` line (e.g. ``cafile``/``certfile``/``keyfile``/
    ``require_certificate``); every listener gets its own free port (``ports``, ``port`` is the
    first). ``extra_conf`` lines go in the global section, before the listeners (``acl_file``,
    ``password_file``, ``per_listener_settings``…). Ports and the persistence file are kept across
    :meth:`restart`.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        extra_conf: Sequence[str] = (),
        *,
        listeners: Sequence[Sequence[str]] = ((),),
        allow_anonymous: bool = True,
        persistence: bool = True,
        autosave_on_changes: bool = True,
        directory: str | Path | None = None,
    ) -> None:
        if not listeners:
            raise ValueError("a broker needs at least one listener")
        self.binary = require_mosquitto()
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="mosquitto-")
        self.directory = Path(directory) if directory else Path(self._tmp.name)  # type: ignore[union-attr]
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ports = [_free_port() for _ in listeners]
        self.conf_path = self.directory / "mosquitto.conf"
        self.log_path = self.directory / "mosquitto.log"
        lines = [
            f"user {pwd.getpwuid(os.getuid()).pw_name}",  # as root, mosquitto would switch to user mosquitto
            f"allow_anonymous {'true' if allow_anonymous else 'false'}",
            "max_queued_messages 1000000",  # default 1000 drops messages queued for an offline session
            "max_queued_bytes 0",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if persistence:
            (self.directory / "data").mkdir(exist_ok=True)
            lines += [
                "persistence true",
                f"persistence_location {self.directory / 'data'}/",
                "persistence_file mosquitto.db",
            ]
            if autosave_on_changes:  # a full save after every change: the smallest SIGKILL window there is
                lines += ["autosave_interval 1", "autosave_on_changes true"]
        lines += list(extra_conf)
        for port, conf in zip(self.ports, listeners, strict=True):
            lines += [f"listener {port} {self.host}", *conf]
        self.conf_path.write_text("\n".join(lines) + "\n")
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    @property
    def port(self) -> int:
        """The first listener's port."""
        return self.ports[0]

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:<port>`` of the first listener."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """True while the mosquitto process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The process id, while running."""
        return self._proc.pid if self.running and self._proc else None

    def start(self, timeout: float = 10.0) -> Broker:
        """Start mosquitto and wait until every listener accepts connections."""
        if self.running:
            return self
        self._log_file = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        for port in self.ports:
            while not self._accepts(port):
                if self._proc.poll() is not None:
                    self._reap()
                    raise RuntimeError(f"mosquitto exited with {self._proc.returncode}:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"mosquitto did not listen on {port} within {timeout} s:\n{self.log_tail()}")
                time.sleep(0.02)
        return self

    def _accepts(self, port: int) -> bool:
        try:
            with socket.create_connection((self.host, port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait: mosquitto saves its database (sessions, queued messages) before exiting."""
        self._signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: nothing saved since the last autosave (see the module docstring)."""
        self._signal(signal.SIGKILL, 10.0)

    def save(self) -> None:
        """Ask a running mosquitto to write its database now (SIGUSR1); returns without waiting for it."""
        if self._proc is not None and self.running:
            self._proc.send_signal(signal.SIGUSR1)

    def restart(self, *, kill: bool = False, down_s: float = 0.0) -> None:
        """Stop (or kill) and start again on the same ports with the same persistence file."""
        self.kill() if kill else self.stop()
        if down_s:
            time.sleep(down_s)
        self.start()

    def _signal(self, sig: signal.Signals, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._reap()

    def _reap(self) -> None:
        if self._proc is not None and self._proc.poll() is not None and self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of mosquitto's log (for assertion messages)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def close(self) -> None:
        """Stop the broker and remove its temporary directory."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Broker({self.host}:{self.ports}, running={self.running})"


@pytest.fixture(name="broker")
def broker_fixture() -> Iterator[Broker]:
    """A fresh running broker for one test (tests may stop, kill and restart it)."""
    with Broker() as b:
        yield b


@pytest.fixture(name="broker_session", scope="session")
def broker_session_fixture() -> Iterator[Broker]:
    """One running broker shared by the session; do not stop it, and use unique client ids and topics."""
    with Broker() as b:
        yield b


@pytest.fixture(name="mqtt", scope="module")
def module_broker_fixture() -> Iterator[Broker]:
    """One running broker per test module (`mqtt`); tests in the module share it, so do not stop it."""
    with Broker() as b:
        yield b


# The fixtures are named by `name=`: import either spelling into a test module. The *_fixture names
# do not shadow the test arguments (ruff F811); `broker`/`broker_session` are kept for the documented import.
broker = broker_fixture
broker_session = broker_session_fixture


# --- a subscriber that records what it receives --------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """One message as the collector saw it."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: dict[str, Any] = field(default_factory=dict)
    at: float = 0.0  # time.monotonic() on arrival


class Collector:
    """A paho client that subscribes with a persistent session (QoS 1) and records every message.

    The session survives broker restarts (``clean_start=False`` and a session expiry on MQTT 5,
    ``clean_session=False`` on 3.1.1), so with a persistent broker it also gets what was queued
    for it while it or the broker was away. paho reconnects by itself; thread-safe accessors.
    """

    def __init__(
        self,
        broker: Broker | tuple[str, int],
        topics: str | Sequence[str],
        *,
        client_id: str = "test-collector",
        protocol: str = "mqtt5",
        qos: int = 1,
        start: bool = True,
    ) -> None:
        from paho.mqtt.client import Client, MQTTv5, MQTTv311
        from paho.mqtt.enums import CallbackAPIVersion

        self.host, self.port = (broker.host, broker.port) if isinstance(broker, Broker) else broker
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        self.qos = qos
        self._v5 = protocol == "mqtt5"
        self._lock = threading.Condition()
        self._messages: list[Received] = []
        self.connects = 0
        self.subscribed = 0  # SUBACKs received
        self._client = Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTv5 if self._v5 else MQTTv311,
            clean_session=None if self._v5 else False,
        )
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.reconnect_delay_set(0.05, 0.5)  # type: ignore[arg-type]  # paho types int, takes float
        if start:
            self.start()

    def start(self, timeout: float = 10.0) -> Collector:
        """Connect, subscribe, and wait until the subscription is in place."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = None
        if self._v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 3600
        kwargs: dict[str, Any] = {"clean_start": False, "properties": props} if self._v5 else {}
        self._client.connect_async(self.host, self.port, keepalive=10, **kwargs)
        self._client.loop_start()
        if not self.wait(lambda _: self.subscribed > 0, timeout):
            self.stop()
            raise RuntimeError(f"collector could not connect and subscribe to {self.host}:{self.port}")
        return self

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            return
        client.subscribe([(topic, self.qos) for topic in self.topics])  # again on every connect: harmless
        with self._lock:
            self.connects += 1
            self._lock.notify_all()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, properties: Any) -> None:
        with self._lock:
            self.subscribed += 1
            self._lock.notify_all()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        props: dict[str, Any] = {}
        if msg.properties is not None:
            props = {k: v for k, v in msg.properties.json().items() if v not in (None, [], "")}
        received = Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), props, time.monotonic())
        with self._lock:
            self._messages.append(received)
            self._lock.notify_all()

    @property
    def messages(self) -> list[Received]:
        """A snapshot of everything received so far, in arrival order."""
        with self._lock:
            return list(self._messages)

    def clear(self) -> None:
        """Forget what was received so far."""
        with self._lock:
            self._messages.clear()

    def wait(self, predicate: Callable[[list[Received]], bool], timeout: float) -> bool:
        """Block until ``predicate(messages)`` is true (checked on each arrival); False after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate(self._messages):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(min(remaining, 0.2))
            return True

    def stop(self) -> None:
        """Disconnect (the broker keeps the session) and stop paho's thread."""
        with contextlib.suppress(Exception):
            self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Collector:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
