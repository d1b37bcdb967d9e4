"""The systemd notification protocol (sd_notify) over the stdlib, and a watchdog that pings only while the loop lives.

Protocol (``man sd_notify``): newline-separated ``KEY=VALUE`` assignments in one datagram sent to the
``AF_UNIX`` socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace).
``$WATCHDOG_USEC`` is the unit's ``WatchdogSec=``; ``$WATCHDOG_PID``, when set, names the one process
the watchdog is meant for. Outside systemd every call is a no-op that returns ``False``.

The service sends ``READY=1`` only after the model is loaded and warmed up, ``STATUS=`` with model,
version and throughput, and ``WATCHDOG=1`` from :class:`WatchdogKeeper`, which pings only while a
:class:`Liveness` shows the inference loop made progress recently. A stalled loop therefore stops
the pings and systemd kills and restarts the service (``WatchdogSec=`` + ``Restart=on-failure``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, MutableMapping

__all__ = ["Liveness", "Notifier", "WatchdogKeeper"]

_log = logging.getLogger(__name__)

_ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
# systemd keeps at most 16 KiB of status text; a line this long is a bug upstream anyway
_STATUS_MAX = 4096
# never let a busy or wedged systemd block the caller (the inference loop sends STATUS)
_SEND_TIMEOUT_S = 0.5


def _address(spec: str) -> str | None:
    """The socket address for ``$NOTIFY_SOCKET``: a path, or ``@name`` as an abstract name."""
    if spec.startswith("@") and len(spec) > 1:
        return "\0" + spec[1:]
    if spec.startswith("/"):
        return spec
    return None  # vsock: and relative paths are not supported


def _positive_int(text: str | None) -> int | None:
    try:
        value = int(text) if text else 0
    except ValueError:
        return None
    return value if value > 0 else None


class Notifier:
    """Sends sd_notify messages; a no-op when not started by systemd.

    Build it with :meth:`from_env` in the service, or with explicit arguments in tests.
    Send errors are logged (once per run of failures) and never raised: the service must not
    die because journald or PID 1 hiccups. Methods return ``True`` when a datagram was sent.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        watchdog_usec: int | None = None,
        watchdog_pid: int | None = None,
    ) -> None:
        self._spec = socket_path or None
        self._address = _address(socket_path) if socket_path else None
        if socket_path and self._address is None:
            _log.warning("NOTIFY_SOCKET=%r is not a path or @abstract name; not notifying", socket_path)
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._watchdog_pid = watchdog_pid
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._failing = False

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = False) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        ``unset=True`` removes them from ``environ`` (default ``os.environ``) so child processes
        do not inherit them and talk to systemd in the service's name.
        """
        env: MutableMapping[str, str] = os.environ if environ is None else environ
        notifier = cls(
            env.get("NOTIFY_SOCKET"),
            watchdog_usec=_positive_int(env.get("WATCHDOG_USEC")),
            watchdog_pid=_positive_int(env.get("WATCHDOG_PID")),
        )
        if unset:
            for key in _ENV_KEYS:
                env.pop(key, None)
        return notifier

    @property
    def enabled(self) -> bool:
        """True when there is a notification socket to talk to."""
        return self._address is not None

    @property
    def watchdog_enabled(self) -> bool:
        """True when systemd expects ``WATCHDOG=1`` from this very process."""
        if not self.enabled or self._watchdog_usec is None:
            return False
        return self._watchdog_pid is None or self._watchdog_pid == os.getpid()

    @property
    def watchdog_timeout(self) -> float | None:
        """``WatchdogSec=`` in seconds: the unit is killed after this long without a ping."""
        return self._watchdog_usec / 1e6 if self.watchdog_enabled and self._watchdog_usec else None

    @property
    def watchdog_interval(self) -> float | None:
        """The recommended ping period in seconds: half of :attr:`watchdog_timeout` (sd_watchdog_enabled(3))."""
        timeout = self.watchdog_timeout
        return timeout / 2.0 if timeout is not None else None

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: start-up (model loaded and warmed up) is complete."""
        return self._send("READY=1", status)

    def status(self, text: str) -> bool:
        """``STATUS=``: one line shown by ``systemctl status``."""
        return self._send(None, text)

    def watchdog(self) -> bool:
        """``WATCHDOG=1``; skipped when the watchdog is off or meant for another process."""
        return self._send("WATCHDOG=1", None) if self.watchdog_enabled else False

    def stopping(self) -> bool:
        """``STOPPING=1``: shutdown has begun."""
        return self._send("STOPPING=1", None)

    def reloading(self) -> bool:
        """``RELOADING=1`` with the ``MONOTONIC_USEC=`` that Type=notify-reload (systemd 253+) requires."""
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._send(f"RELOADING=1\nMONOTONIC_USEC={now_usec}", None)

    def extend_timeout(self, usec: int) -> bool:
        """``EXTEND_TIMEOUT_USEC=``: ask for ``usec`` more before the start/stop timeout fires."""
        if isinstance(usec, bool) or not isinstance(usec, int) or usec <= 0:
            raise ValueError(f"extend_timeout: expected a positive int of microseconds, got {usec!r}")
        return self._send(f"EXTEND_TIMEOUT_USEC={usec}", None)

    def close(self) -> None:
        """Close the socket (a later send opens a new one)."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def _send(self, head: str | None, status: str | None) -> bool:
        if self._address is None:
            return False
        lines = [head] if head else []
        if status is not None:
            # a newline would start a new assignment: STATUS must not be able to inject WATCHDOG=1
            clean = " ".join(status.splitlines())[:_STATUS_MAX]
            lines.append(f"STATUS={clean}")
        payload = "\n".join(lines).encode("utf-8", "replace")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    self._sock.settimeout(_SEND_TIMEOUT_S)
                self._sock.sendto(payload, self._address)
            except OSError as exc:
                if not self._failing:
                    _log.warning("cannot notify systemd at %s (%s); will keep trying quietly", self._spec, exc)
                    self._failing = True
                return False
            if self._failing:
                _log.info("notifying systemd at %s works again", self._spec)
                self._failing = False
            return True


class Liveness:
    """Heartbeats from the inference loop; :meth:`alive` is False after ``stall_after_s`` without one.

    The clock starts at construction, so a loop that never beats counts as stalled too.
    """

    def __init__(self, stall_after_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not stall_after_s > 0:
            raise ValueError(f"stall_after_s: expected > 0, got {stall_after_s!r}")
        self.stall_after_s = float(stall_after_s)
        self._clock = clock
        self._last = clock()

    def heartbeat(self) -> None:
        """Record progress (one float store: cheap enough for every frame)."""
        self._last = self._clock()

    def age(self) -> float:
        """Seconds since the last heartbeat."""
        return self._clock() - self._last

    def alive(self) -> bool:
        """True while the last heartbeat is younger than ``stall_after_s``."""
        return self.age() < self.stall_after_s


class WatchdogKeeper:
    """A daemon thread (``edge-watchdog``) that sends ``WATCHDOG=1`` every ``interval`` s while ``is_alive()``.

    When ``is_alive()`` turns False the pings stop (logged once per stall), so systemd's
    ``WatchdogSec=`` fires and the unit restarts. Pick ``interval`` at most
    :attr:`Notifier.watchdog_interval`. :meth:`start` does nothing when the watchdog is off.
    """

    def __init__(self, notifier: Notifier, is_alive: Callable[[], bool], interval: float) -> None:
        if not interval > 0:
            raise ValueError(f"interval: expected > 0 s, got {interval!r}")
        self._notifier = notifier
        self._is_alive = is_alive
        self._interval = float(interval)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pings = 0

    @property
    def running(self) -> bool:
        """True while the thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start pinging (idempotent; a no-op when systemd set no watchdog for this process)."""
        if self.running:
            return
        if not self._notifier.watchdog_enabled:
            _log.debug("systemd watchdog is off for this process; not starting edge-watchdog")
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="edge-watchdog", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop pinging and join the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        stalled = False
        while True:
            if self._is_alive():
                if stalled:
                    _log.info("inference loop is making progress again; watchdog pings resume")
                    stalled = False
                if self._notifier.watchdog():
                    self.pings += 1
            elif not stalled:
                _log.error("inference loop stalled; withholding watchdog pings so systemd restarts the service")
                stalled = True
            if self._stop.wait(self._interval):
                return
