"""The operator side of the fleet: signed commands to a device, a group or all devices, their acks, retained status.

A :class:`Fleet` session connects to the broker with a clean, short-lived session, subscribes to
every device's retained status (``edge/<fleet>/+/status``: the birth message while a device is
up, its last will once it is gone) and to the command acks (``edge/<fleet>/+/cmd/ack``), and sends
commands signed with the operator's ed25519 key (:func:`runtime.commands.sign_command`) to one
command topic: the device's, its group's or the fleet's.

MQTT has no "end of retained messages" marker, so :meth:`Fleet.statuses` waits until no new status
has arrived for ``settle_s`` after connecting. :meth:`Fleet.send` waits for a *final* ack
(``ok``, ``refused`` or ``error``; ``accepted``/``progress`` are remembered but do not end the wait)
from each expected device; the ones that stay silent until the timeout are reported as ``timeout``.
A group or fleet-wide command reaches whoever is subscribed, so acks from devices that were not
expected are collected too.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from toolchain.errors import ToolchainError, UsageError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from runtime.link import Link, LinkConfig, Message

__all__ = [
    "FINAL_STATUSES",
    "Ack",
    "CommandOutcome",
    "DeviceStatus",
    "Fleet",
    "Target",
    "find_temperature",
    "model_fields",
    "operator_client_id",
    "status_rows",
]

log = logging.getLogger(__name__)

#: Ack statuses that end the wait for a device.
FINAL_STATUSES = frozenset({"ok", "refused", "error"})
_MAX_MESSAGE = 1024 * 1024  # a status or ack larger than this is ignored
_GRACE_S = 1.0


def operator_client_id() -> str:
    """A unique client id for one operator command (the session is clean and short-lived)."""
    host = socket.gethostname().split(".")[0][:24] or "host"
    return f"operator-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Target:
    """Who a command is for: exactly one of a device id, a group name, or the whole fleet."""

    device: str | None = None
    group: str | None = None
    all: bool = False

    def __post_init__(self) -> None:
        from runtime.topics import validate_device, validate_segment

        if sum((self.device is not None, self.group is not None, self.all)) != 1:
            raise UsageError("choose exactly one target", flag="--device/--group/--all")
        if self.device is not None:
            validate_device(self.device, "--device")
        if self.group is not None:
            validate_segment(self.group, "--group")

    def wire(self) -> dict[str, Any]:
        """The ``target`` object of the command body."""
        if self.device is not None:
            return {"device": self.device}
        if self.group is not None:
            return {"group": self.group}
        return {"all": True}

    def topic(self, fleet: str) -> str:
        """The command topic this target listens on."""
        from runtime import topics

        if self.device is not None:
            return topics.cmd_topic(fleet, self.device)
        if self.group is not None:
            return topics.group_cmd_topic(fleet, self.group)
        return topics.all_cmd_topic(fleet)

    def covers(self, status: DeviceStatus) -> bool:
        """True if a device with this status is addressed by the target."""
        if self.device is not None:
            return status.device == self.device
        if self.group is not None:
            return status.group == self.group
        return True

    def __str__(self) -> str:
        return f"device {self.device}" if self.device else f"group {self.group}" if self.group else "all devices"


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def find_temperature(doc: Any) -> float | None:
    """``temp_c`` from a status or status-command result, at the top level or under ``health``."""
    if not isinstance(doc, Mapping):
        return None
    for source in (doc, doc.get("health")):
        if isinstance(source, Mapping):
            for key in ("temp_c", "temperature_c", "temperature"):
                found = _number(source.get(key))
                if found is not None:
                    return found
    return None


def model_fields(doc: Mapping[str, Any]) -> tuple[str | None, str | None, str | None]:
    """(model, version, profile) from a status: flat (``"model": "digits", "version": …``) or the
    service's nested ``"model": {"name", "version", "profile", …}``."""
    model = doc.get("model")
    if isinstance(model, Mapping):
        return _text(model.get("name")), _text(model.get("version")), _text(model.get("profile"))
    return _text(model), _text(doc.get("version")), _text(doc.get("profile"))


@dataclass(frozen=True)
class DeviceStatus:
    """What a device's retained status says (birth message or last will)."""

    device: str
    online: bool
    group: str | None = None
    profile: str | None = None
    model: str | None = None
    version: str | None = None
    ts: float | None = None
    temp_c: float | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, device: str, payload: bytes) -> DeviceStatus | None:
        """The status in ``payload``; None for an empty (cleared) or unreadable one."""
        if not payload or len(payload) > _MAX_MESSAGE:
            return None
        try:
            doc = json.loads(payload)
        except (ValueError, RecursionError):
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("online"), bool):
            return None
        model, version, profile = model_fields(doc)
        return cls(
            device=device,
            online=doc["online"],
            group=_text(doc.get("group")),
            profile=profile,
            model=model,
            version=version,
            ts=_number(doc.get("ts")),
            temp_c=find_temperature(doc),
            raw=doc,
        )


@dataclass(frozen=True)
class Ack:
    """A device's answer to a command; ``rtt_ms`` is from the publish to this ack's arrival."""

    device: str
    status: str
    reason: str | None = None
    result: Any = None
    ts: float | None = None
    rtt_ms: float | None = None

    @property
    def final(self) -> bool:
        """True for ok / refused / error."""
        return self.status in FINAL_STATUSES


@dataclass(frozen=True)
class CommandOutcome:
    """One command and what came back: the last ack per device (final if one arrived)."""

    id: str
    type: str
    target: Target
    issued_at: float
    expected: tuple[str, ...]
    acks: Mapping[str, Ack]
    elapsed_s: float
    published: bool
    publish_error: str | None = None

    @property
    def missing(self) -> list[str]:
        """Expected devices without a final ack (timed out)."""
        return [d for d in self.expected if d not in self.acks or not self.acks[d].final]

    @property
    def failed(self) -> list[str]:
        """Devices whose final ack is refused or error."""
        return sorted(d for d, a in self.acks.items() if a.final and a.status != "ok")

    @property
    def ok(self) -> bool:
        """Every expected device acked ``ok`` and nobody refused or failed."""
        return self.published and not self.missing and not self.failed


class _Pending:
    """Acks collected for one command id (guarded by the Fleet's condition)."""

    def __init__(self, expected: Iterable[str]) -> None:
        self.expected = set(expected)
        self.start = time.monotonic()
        self.acks: dict[str, Ack] = {}

    def done(self) -> bool:
        return all(d in self.acks and self.acks[d].final for d in self.expected)


class Fleet:
    """An operator session with the broker: read retained status, send signed commands, collect acks."""

    def __init__(self, link_cfg: LinkConfig, fleet: str, *, key: Ed25519PrivateKey | None = None) -> None:
        from runtime.link import Link
        from runtime.topics import fleet_filter

        self.fleet = fleet
        self._status_filter = fleet_filter(fleet, "status")
        self._ack_filter = fleet_filter(fleet, "cmd/ack")
        self.link_cfg = link_cfg
        self._key = key
        self._cond = threading.Condition()
        self._statuses: dict[str, DeviceStatus] = {}
        self._last_status_at = 0.0
        self._pending: dict[str, _Pending] = {}
        self._link: Link = Link(link_cfg)
        self._link.subscribe(self._status_filter, self._on_status, qos=1)
        self._link.subscribe(self._ack_filter, self._on_ack, qos=1)
        self._connected_at: float | None = None

    # --- connection -------------------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> Fleet:
        """Connect to the broker (once); ToolchainError naming the broker if it cannot be reached in time."""
        if self._connected_at is not None:
            return self
        self._link.start()
        deadline = time.monotonic() + timeout
        subscribed = self._link.wait_connected(timeout) and all(
            self._link.wait_subscribed(f, max(0.0, deadline - time.monotonic()))
            for f in (self._status_filter, self._ack_filter)
        )
        if not subscribed:
            self._link.stop(timeout=1.0)
            cfg = self.link_cfg
            raise ToolchainError(
                f"cannot connect and subscribe to the MQTT broker at {cfg.host}:{cfg.port} within {timeout:g} s; "
                "check --broker, the TLS options (--ca/--cert/--key-file), --username/--password and the ACL"
            )
        self._connected_at = time.monotonic()
        return self

    def close(self) -> None:
        """Disconnect (idempotent)."""
        self._link.stop(timeout=2.0)

    def __enter__(self) -> Fleet:
        return self.connect()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # --- retained status --------------------------------------------------------------------

    def _device_of(self, topic: str, kind: str) -> str | None:
        from runtime.topics import parse_topic

        info = parse_topic(topic)
        if info is None or info.fleet != self.fleet or info.kind != kind:
            return None
        return info.device or None

    def _on_status(self, msg: Message) -> None:
        device = self._device_of(msg.topic, "status")
        if device is None:
            return
        status = DeviceStatus.parse(device, msg.payload)
        with self._cond:
            if status is None:
                self._statuses.pop(device, None)  # an empty retained message clears a device
            else:
                self._statuses[device] = status
            self._last_status_at = time.monotonic()
            self._cond.notify_all()

    def statuses(self, *, settle_s: float = 0.3, max_wait_s: float = 3.0) -> dict[str, DeviceStatus]:
        """Every device's latest status, once the retained burst has settled (see the module docstring)."""
        if self._connected_at is None:
            raise ToolchainError("not connected; call connect() first")
        deadline = self._connected_at + max_wait_s
        with self._cond:
            while True:
                now = time.monotonic()
                quiet_since = max(self._connected_at, self._last_status_at)
                if now - quiet_since >= settle_s or now >= deadline:
                    return dict(sorted(self._statuses.items()))
                self._cond.wait(min(settle_s - (now - quiet_since), deadline - now))

    def expected(self, target: Target, statuses: Mapping[str, DeviceStatus]) -> list[str]:
        """Devices that should ack a command to ``target``: the device itself, or the online members."""
        if target.device is not None:
            return [target.device]
        return sorted(d for d, s in statuses.items() if s.online and target.covers(s))

    # --- commands ---------------------------------------------------------------------------

    def _on_ack(self, msg: Message) -> None:
        arrived = time.monotonic()
        device = self._device_of(msg.topic, "ack")
        if device is None or len(msg.payload) > _MAX_MESSAGE:
            return
        try:
            doc = json.loads(msg.payload)
        except (ValueError, RecursionError):
            return
        if not isinstance(doc, dict) or not isinstance(doc.get("id"), str) or not isinstance(doc.get("status"), str):
            return
        with self._cond:
            pending = self._pending.get(doc["id"])
            if pending is None or (device in pending.acks and pending.acks[device].final):
                return  # not ours, or a repeated final ack (idempotent re-delivery)
            pending.acks[device] = Ack(
                device=device,
                status=doc["status"],
                reason=_text(doc.get("reason")),
                result=doc.get("result"),
                ts=_number(doc.get("ts")),
                rtt_ms=(arrived - pending.start) * 1000.0,
            )
            self._cond.notify_all()

    def send(
        self,
        type: str,
        args: Mapping[str, Any] | None,
        target: Target,
        *,
        expect: Iterable[str],
        timeout: float,
        ttl_s: float = 300.0,
    ) -> CommandOutcome:
        """Sign and publish one command, then wait up to ``timeout`` for a final ack from every ``expect`` device."""
        from runtime.commands import make_command, sign_command

        if self._key is None:
            raise UsageError("sending a command needs the operator's private key", flag="--key")
        if ttl_s <= 0 or timeout < 0:
            raise UsageError("must be positive", flag="--ttl/--timeout")
        body = make_command(type, target.wire(), args, ttl_s=ttl_s)
        command_id: str = body["id"]
        raw = sign_command(body, self._key)
        pending = _Pending(expect)
        with self._cond:
            self._pending[command_id] = pending
        try:
            handle = self._link.publish(target.topic(self.fleet), raw, qos=1)
            # nobody known to wait for: collect whatever answers in a short grace period
            deadline = pending.start + (timeout if pending.expected else min(timeout, _GRACE_S))
            with self._cond:
                while not (pending.expected and pending.done()):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                acks = dict(sorted(pending.acks.items()))
            published = handle.acked or bool(acks) or handle.wait(max(0.0, deadline - time.monotonic()))
        finally:
            with self._cond:
                self._pending.pop(command_id, None)
        return CommandOutcome(
            id=command_id,
            type=type,
            target=target,
            issued_at=float(body["issued_at"]),
            expected=tuple(sorted(pending.expected)),
            acks=acks,
            elapsed_s=time.monotonic() - pending.start,
            published=published,
            publish_error=None if published else handle.reason or "no PUBACK within the timeout",
        )


def _row(device: str, status: DeviceStatus | None, ack: Ack | None, expected: bool) -> dict[str, Any]:
    result = ack.result if ack is not None and isinstance(ack.result, Mapping) else {}
    seen = (status.ts if status else None, ack.ts if ack else None)
    last_seen = max((t for t in seen if t is not None), default=None)
    online: bool | None = status.online if status is not None else None
    if ack is not None and ack.final:
        online = True  # it answered just now, whatever an older status said
        outcome, reason = ack.status, ack.reason
    elif expected:
        outcome, reason = "timeout", f"last ack {ack.status!r}" if ack is not None else "no ack"
    else:
        outcome, reason = ("offline" if status is not None and not status.online else "not targeted"), None
    temp = find_temperature(result)
    model, version, profile = model_fields(result)
    return {
        "device": device,
        "online": online,
        "group": status.group if status else _text(result.get("group")),
        "profile": profile or (status.profile if status else None),
        "model": model or (status.model if status else None),
        "version": version or (status.version if status else None),
        "last_seen": last_seen,
        "temp_c": temp if temp is not None else (status.temp_c if status else None),
        "result": outcome,
        "reason": reason,
        "rtt_ms": round(ack.rtt_ms, 3) if ack is not None and ack.final and ack.rtt_ms is not None else None,
        "ack": ack.result if ack is not None else None,
    }


def status_rows(
    statuses: Mapping[str, DeviceStatus], target: Target, outcome: CommandOutcome | None = None
) -> list[dict[str, Any]]:
    """One row per device the target covers (known from status, expected, or answering), sorted by id."""
    acks = dict(outcome.acks) if outcome is not None else {}
    expected = set(outcome.expected) if outcome is not None else set()
    devices = {d for d, s in statuses.items() if target.covers(s)} | expected | set(acks)
    rows = []
    for device in sorted(devices):
        row = _row(device, statuses.get(device), acks.get(device), device in expected)
        if outcome is None:
            row["result"] = None
        rows.append(row)
    return rows
