"""Simulated devices for fleet tests: many real MQTT clients in one process, each with its own command channel.

Each :class:`SimDevice` is what the fleet sees of a real device, built from the runtime's own
parts: a :class:`runtime.link.Link` (own client id, persistent session, retained birth status on
every connect, retained ``online: false`` last will) and a :class:`runtime.commands.CommandChannel`
(own state directory, the real ``ping``, ``status`` and ``config.set`` handlers; ``config.set``
validates against the real :class:`runtime.config.ServiceConfig` and persists the override).
There is no model and no logbook: the status reports a profile, model and version given here.

:class:`SimFleet` starts and stops N of them (at most :data:`MAX_PER_PROCESS`: paho's select()
loop cannot use descriptors past 1024). ``python -m tests.simdevice`` runs a fleet in its own
process and prints ``ready <n>`` once every device is connected, so a test can SIGKILL the process
and watch the broker publish the last wills, and a benchmark can spread 500 devices over processes.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from runtime import topics
from runtime.commands import CommandChannel, config_set_handler, ping_handler, status_handler
from runtime.config import ServiceConfig
from runtime.link import Link, LinkConfig

__all__ = ["MAX_PER_PROCESS", "SimDevice", "SimFleet", "main"]


@dataclass
class SimDevice:
    """One simulated device: a link, a command channel, a config that config.set changes."""

    device: str
    fleet: str
    group: str
    state_dir: Path
    link: Link = field(init=False)
    channel: CommandChannel | None = None
    config: ServiceConfig | None = None
    profile: str = "rpi4"
    model: str = "digits"
    version: str = "1.0.0"
    temp_c: float = 45.0
    started: float = field(default_factory=time.monotonic)
    connects: int = 0
    applied: list[str] = field(default_factory=list)

    def status(self, online: bool = True) -> dict[str, Any]:
        """The status document (birth message, last will, and the ``status`` command's result)."""
        doc: dict[str, Any] = {
            "online": online,
            "device": self.device,
            "fleet": self.fleet,
            "group": self.group,
            "profile": self.profile,
            "model": self.model,
            "version": self.version,
            "ts": time.time(),
        }
        if online:
            doc["temp_c"] = self.temp_c
            doc["uptime_s"] = round(time.monotonic() - self.started, 3)
            if self.config is not None:
                doc["flush_interval_s"] = self.config.logbook.flush_interval_s
        return doc

    def current_config(self) -> ServiceConfig:
        """The config as config.set last left it."""
        assert self.config is not None
        return self.config

    def _apply(self, new: ServiceConfig, key: str) -> bool:
        self.config = new
        self.applied.append(key)
        return True

    def _birth(self, session_present: bool) -> None:
        self.connects += 1
        self.link.publish(topics.status_topic(self.fleet, self.device), _json(self.status()), qos=1, retain=True)


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


#: paho's network loop uses select(), which cannot watch descriptors numbered 1024 or more; each
#: device holds three (its socket and paho's wake-up socket pair), so one process tops out near 330.
MAX_PER_PROCESS = 300


class SimFleet:
    """N simulated devices ``<prefix>-000 …`` on one broker; group of device i is ``groups[i % len(groups)]``."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        fleet: str,
        count: int,
        trusted_keys: Sequence[Ed25519PublicKey],
        root: Path,
        prefix: str = "sim",
        groups: Sequence[str] = ("",),
        keepalive_s: int = 10,
        customize: Callable[[SimDevice], None] | None = None,
    ) -> None:
        if count > MAX_PER_PROCESS:
            raise ValueError(
                f"{count} devices in one process: paho's select() loop stops at descriptor 1024, so keep it to "
                f"{MAX_PER_PROCESS} and start more with `python -m tests.simdevice --prefix …` processes"
            )
        self.fleet = fleet
        self.devices: dict[str, SimDevice] = {}
        for i in range(count):
            name = f"{prefix}-{i:03d}"
            state = Path(root) / name
            state.mkdir(parents=True, exist_ok=True)
            group = groups[i % len(groups)]
            cfg = LinkConfig(
                host=host,
                port=port,
                client_id=f"{fleet}-{name}",
                keepalive_s=keepalive_s,
                protocol="mqtt5",
                reconnect_min_s=0.2,
                reconnect_max_s=2.0,
                will_topic=topics.status_topic(fleet, name),
                will_retain=True,
            )
            dev = SimDevice(name, fleet, group, state, temp_c=40.0 + i % 20)
            dev.link = Link(replace(cfg, will_payload=_json(dev.status(online=False))))
            dev.config = ServiceConfig(
                bundle=str(state / "model.tar"),
                trusted_keys=("operator.pub",),
                device_id=name,
                fleet=fleet,
                group=group,
                state_dir=str(state),
            )
            handlers = {
                "ping": ping_handler(),
                "status": status_handler(dev.status),
                "config.set": config_set_handler(dev.current_config, state, apply=dev._apply),
            }
            dev.channel = CommandChannel(
                dev.link,
                fleet=fleet,
                device=name,
                group=group,
                trusted_keys=trusted_keys,
                state_dir=state,
                handlers=handlers,
            )
            if customize is not None:
                customize(dev)
            self.devices[name] = dev

    def start(self, timeout: float = 60.0) -> SimFleet:
        """Connect every device (birth status retained) and start its command channel."""
        for dev in self.devices.values():
            dev.link.on_connect(dev._birth)
            assert dev.channel is not None
            dev.channel.start()
            dev.link.start()
        deadline = time.monotonic() + timeout
        for dev in self.devices.values():
            if not dev.link.wait_connected(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"{dev.device} did not connect within {timeout} s")
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Clean stop: every device publishes its offline status, then disconnects."""
        handles = []
        for dev in self.devices.values():
            if dev.link.connected:
                topic = topics.status_topic(self.fleet, dev.device)
                handles.append(dev.link.publish(topic, _json(dev.status(online=False)), qos=1, retain=True))
        deadline = time.monotonic() + timeout
        for h in handles:
            h.wait(max(0.0, deadline - time.monotonic()))
        for dev in self.devices.values():
            if dev.channel is not None:
                dev.channel.close()
            dev.link.stop(timeout=2.0)

    def __enter__(self) -> SimFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Run a simulated fleet until SIGTERM; ``ready <n>`` on stdout once all are connected."""
    from runtime.signing import load_public_key

    ap = argparse.ArgumentParser(prog="python -m tests.simdevice", description=main.__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--fleet", required=True)
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--prefix", default="sim")
    ap.add_argument("--group", action="append", default=[])
    ap.add_argument("--trusted-key", action="append", required=True, help="operator public key (.pub)")
    ap.add_argument("--state", required=True, help="root of the devices' state directories")
    args = ap.parse_args(argv)
    keys = [load_public_key(Path(k)) for k in args.trusted_key]
    sims = SimFleet(
        args.host,
        args.port,
        fleet=args.fleet,
        count=args.count,
        trusted_keys=keys,
        root=Path(args.state),
        prefix=args.prefix,
        groups=args.group or ("",),
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    sims.start()
    print(f"ready {len(sims.devices)}", flush=True)
    stop.wait()
    sims.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
