"""Simulated devices for fleet tests: many real MQTT clients in one process, each with its own command channel.

Each :class:`SimDevice` is what the fleet sees of a real device, built from the runtime's own
parts: a :class:`runtime.link.Link` (own client id, persistent session, retained birth status on
every connect, retained ``online: false`` last will) and a :class:`runtime.commands.CommandChannel`
(own state directory, the real ``ping``, ``status`` and ``config.set`` handlers; ``config.set``
validates against the real :class:`runtime.config.ServiceConfig` and persists the override).
Without ``models`` there is no model and no logbook: the status reports a profile, model and
version given here. With ``models`` (profile → factory bundle) every device also holds a real
model store (:class:`runtime.store.ModelStore`), a rollout ledger and the service's own
:class:`runtime.deploy.Deployer` for ``model.deploy`` / ``model.rollback``: the bundle is really
fetched (file://, http://, mqtt://), verified into the store, loaded, and judged by the real
shadow/canary gates on traffic the device serves while a trial runs (:class:`SimModels`: a fixed
set of digit images through the active model, the candidate beside it). Loaded models are shared
per bundle sha256 by every device of the process, so 50 devices cost one onnxruntime session per
bundle, not 50; the status then reports the serving model.

:class:`SimFleet` starts and stops N of them (at most :data:`MAX_PER_PROCESS`: paho's select()
loop cannot use descriptors past 1024). ``python -m tests.simdevice`` runs a fleet in its own
process and prints ``ready <n>`` once every device is connected, so a test can SIGKILL the process
and watch the broker publish the last wills, and a benchmark can spread 500 devices over processes.
"""

from __future__ import annotations

import argparse
import functools
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from runtime import topics
from runtime.command_handlers import config_set_handler, ping_handler, status_handler
from runtime.commands import CommandChannel
from runtime.config import RolloutSection, ServiceConfig
from runtime.link import Link, LinkConfig
from runtime.shadow import ModelSlot, SharedModel, Trial

__all__ = ["MAX_PER_PROCESS", "SimDevice", "SimFleet", "SimModels", "main"]


class _Item:
    """One served input, shaped like the service's (``kind``, ``data``, ``ref``)."""

    kind = "image"

    def __init__(self, ref: str, data: np.ndarray) -> None:
        self.ref, self.data = ref, data


@functools.lru_cache(maxsize=1)
def _traffic() -> tuple[_Item, ...]:
    """The inputs every simulated device serves: 64 of scikit-learn's digits as 0..255 images."""
    from sklearn.datasets import load_digits

    images = np.round(load_digits().images[:64] * (255.0 / 16.0)).astype(np.uint8)
    return tuple(_Item(f"digit-{i}", img) for i, img in enumerate(images))


def _feeds(model: Any, item: _Item) -> dict[str, Any]:
    out: dict[str, Any] = model.tensor_from_image(item.data)
    return out


class _Borrowed:
    """A model shared by every device of the process: closing it is a no-op (the cache owns it)."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.manifest, self.name, self.version = model.manifest, model.name, model.version

    def run(self, feeds: Any, *, ref: str = "", full_outputs: bool = False) -> Any:
        return self._model.run(feeds, ref=ref, full_outputs=full_outputs)

    def tensor_from_image(self, image: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = self._model.tensor_from_image(image)
        return out

    def close(self) -> None:
        pass


class _ModelCache:
    """Loaded bundles by sha256, shared by the simulated devices of this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, Any] = {}
        self.loads = 0

    def get(self, path: Path, trusted_keys: Sequence[Ed25519PublicKey]) -> _Borrowed:
        from runtime.bundle import file_digest
        from runtime.engine import EngineOptions
        from runtime.model import load_model

        sha, _ = file_digest(path)
        with self._lock:  # one load per sha; loads are rare and short
            if sha not in self._models:
                self._models[sha] = load_model(path, trusted_keys=trusted_keys, options=EngineOptions(), providers=())
                self.loads += 1
            return _Borrowed(self._models[sha])

    def close(self) -> None:
        with self._lock:
            for model in self._models.values():
                model.close()
            self._models.clear()


MODELS = _ModelCache()


class SimModels:
    """The service's side of a rollout for one simulated device (the host of :class:`runtime.deploy.Deployer`).

    While a trial runs, a traffic thread serves :func:`_traffic` inputs every ``interval_s`` the way
    the service does: in canary a share goes to the candidate, otherwise the active model serves and
    the trial sees it (shadow). Outside a trial the device is idle.
    """

    def __init__(
        self,
        dev: SimDevice,
        factory: Path,
        *,
        trusted_keys: Sequence[Ed25519PublicKey],
        defaults: RolloutSection,
        interval_s: float = 0.004,
    ) -> None:
        from runtime.deploy import Deployer
        from runtime.rollout import LEDGER_FILE, Ledger
        from runtime.store import ModelStore

        self.dev, self.trusted, self.interval_s = dev, list(trusted_keys), interval_s
        self.events: list[tuple[float, str, str, dict[str, Any]]] = []  # (time, kind, message, data)
        self.slot = ModelSlot()
        self.trial: Trial | None = None
        self._traffic_thread: threading.Thread | None = None
        self.store = ModelStore(dev.state_dir / "models")
        if self.store.active() is None:
            stored = self.store.add(factory, trusted_keys=self.trusted, source="factory")
            self.store.activate(stored.name, stored.version)
            self.store.mark_good()
        active = self.store.active()
        assert active is not None
        self.slot.install(self.load(active.path))
        self.ledger = Ledger(dev.state_dir / LEDGER_FILE)
        self.deployer = Deployer(
            self,
            store=self.store,
            ledger=self.ledger,
            state_dir=dev.state_dir,
            trusted_keys=self.trusted,
            defaults=defaults,
            fleet=dev.fleet,
        )

    # --- the host protocol of runtime.deploy.Deployer ----------------------------------------

    def load(self, bundle: str | Path) -> Any:
        return MODELS.get(Path(bundle), self.trusted)

    def serving(self) -> Any:
        return self.slot.current

    def promote(self, candidate: SharedModel) -> None:
        self.slot.install(candidate)
        self.dev.publish_status()  # the retained status says what it serves now

    def start_trial(self, candidate: SharedModel, stage: str, shadow_share: float, canary_share: float) -> Trial:
        serving = self.slot.current
        trial = Trial(
            candidate,
            stage=stage,
            kind=serving.manifest.postprocess.kind,
            shadow_share=shadow_share,
            canary_share=canary_share,
            feeds_of=_feeds,
            run_active=self._run_active,
        )
        self.trial = trial
        self._traffic_thread = threading.Thread(target=self._serve, args=(trial,), name="sim-traffic", daemon=True)
        self._traffic_thread.start()
        return trial

    def stop_trial(self) -> None:
        self.trial = None

    def event(self, kind: str, message: str, *, level: str = "info", **data: Any) -> None:
        self.events.append((time.time(), kind, message, data))

    # --- traffic -------------------------------------------------------------------------------

    def _run_active(self, item: _Item) -> Any:
        with self.slot.borrow() as model:
            return model.run(_feeds(model, item), ref=item.ref)

    def _serve(self, trial: Trial) -> None:
        items = _traffic()
        n = 0
        while self.trial is trial:
            item = items[n % len(items)]
            n += 1
            if trial.take_canary() and trial.candidate.acquire():
                try:
                    pred = trial.candidate.model.run(_feeds(trial.candidate.model, item), ref=item.ref)
                except Exception:  # the candidate's failure is an error sample, as in the service
                    pred = None
                finally:
                    trial.candidate.release()
                trial.canary_result(item, pred)
            else:
                with self.slot.borrow() as model:
                    feeds = _feeds(model, item)
                    trial.served(feeds, model.run(feeds, ref=item.ref))
            time.sleep(self.interval_s)

    def close(self) -> None:
        self.deployer.close()
        self.trial = None
        if self._traffic_thread is not None:
            self._traffic_thread.join(5.0)
        self.ledger.close()


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
    models: SimModels | None = None

    def status(self, online: bool = True) -> dict[str, Any]:
        """The status document (birth message, last will, and the ``status`` command's result)."""
        if self.models is not None:
            serving = self.models.serving()
            self.model, self.version = serving.name, serving.version
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
            if self.models is not None:
                doc["rollout"] = self.models.deployer.status()
        return doc

    def publish_status(self) -> None:
        """Re-publish the retained status (after a model change)."""
        if self.link.connected:
            self.link.publish(topics.status_topic(self.fleet, self.device), _json(self.status()), qos=1, retain=True)

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


def _plug_deployer(dev: SimDevice) -> None:
    """model.deploy / model.rollback on the device's channel, final acks through ``channel.complete``."""
    from runtime.deploy import Deployer

    assert dev.models is not None and dev.channel is not None
    deployer, channel = dev.models.deployer, dev.channel
    channel.handlers["model.deploy"] = deployer.deploy
    channel.handlers["model.rollback"] = deployer.rollback

    def finish(rollout: Any) -> bool:
        status, result = Deployer.final_ack(rollout)
        reason = rollout.reason if status != "ok" else None
        channel.complete(rollout.id, "model.deploy", status=status, result=result, reason=reason)
        return True

    deployer.link, deployer.finish = dev.link, finish


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
        profiles: Sequence[str] = ("rpi4",),
        models: Mapping[str, Path] | None = None,
        bundle_keys: Sequence[Ed25519PublicKey] | None = None,
        rollout: RolloutSection | None = None,
    ) -> None:
        """``profiles[i % len]`` is device i's profile; with ``models`` (profile → factory bundle) the devices of
        those profiles run a model store and the real deployer (bundles verified against ``bundle_keys``,
        default ``trusted_keys``; gate defaults from ``rollout``)."""
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
            dev = SimDevice(name, fleet, group, state, temp_c=40.0 + i % 20, profile=profiles[i % len(profiles)])
            if models is not None and dev.profile in models:
                dev.models = SimModels(
                    dev,
                    Path(models[dev.profile]),
                    trusted_keys=bundle_keys if bundle_keys is not None else trusted_keys,
                    defaults=rollout or RolloutSection(),
                )
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
            if dev.models is not None:
                _plug_deployer(dev)
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
            if dev.models is not None:
                dev.models.close()

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
