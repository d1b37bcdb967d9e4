"""The fleet command channel: signed JSON commands in, acks out; anything not signed, fresh and ours is refused.

Wire format (UTF-8 JSON, at most 64 KiB), shared with the operator side (``sign_command``)::

    {"id": "…1..128 of [A-Za-z0-9._-]…", "type": "ping", "issued_at": 1700000000.0, "expires_at": 1700000060.0,
     "target": {"device": "cam-7"} | {"group": "lobby"} | {"all": true}, "args": {…}, "v": 1 (optional),
     "sig": {"alg": "ed25519", "key_id": "…16 hex…", "signature": "…base64 of 64 bytes…"}}

The signature covers :func:`canonical` of the object without ``"sig"`` (sorted keys, no spaces,
UTF-8), as Python's ``json`` writes it; key ids are :func:`runtime.signing.key_id`. Checks, in
order, and the ``reason`` each refusal carries (:class:`~runtime.errors.CommandRefused`):
``malformed: <what>`` (not UTF-8 JSON, duplicate or unknown key, a field of the wrong type),
``unsigned``, ``unknown-key``, ``bad-signature``, ``not-for-this-device`` (the target names another
device or group: refused *and* acked, so a mis-addressed command is visible to the operator),
``replayed`` (id already accepted), ``expired`` (now > expires_at), ``from-the-future``
(issued_at > now + max_skew_s), ``stale`` (issued before the newest accepted command),
``unknown-type`` (no handler for the type; the service plugs ``model.deploy`` and
``model.rollback`` in with ``channel.handlers["model.deploy"] = handler``, see runtime.deploy).

Acks go to ``edge/<fleet>/<device>/cmd/ack`` at QoS 1:
``{"id", "device", "type", "status": "accepted"|"ok"|"refused"|"error", "reason"?, "result"?, "ts"}``.
Long-running types get ``accepted`` before their final ack. A handler that finishes later (a
rollout) returns :class:`Deferred`: the channel acks ``accepted``, marks the id deferred in the
replay state, and :meth:`CommandChannel.complete` sends the final ack when the work ends — after a
restart too, since the deferred ids are persisted (:meth:`ReplayState.pending`). A command is
idempotent by id: a repeated delivery of an executed id re-sends the stored final ack and runs
nothing; of a deferred id still running, re-sends ``accepted``; a repeat of an id accepted but
never finished (the process died running it) is refused ``replayed``.

Replay state lives in ``<state_dir>/commands.json`` (written atomically: tmp, fsync, rename, fsync
dir): the newest accepted ids with their final acks, the newest accepted ``issued_at``. Only
accepted commands are recorded, so nobody can burn an id without a trusted key. An unreadable file
is moved aside and every command issued before that moment is refused ``stale``.

The built-in handlers (``ping``, ``status``, ``config.set``, ``logs.request``, ``service.restart``)
live in :mod:`runtime.command_handlers`.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import os
import queue
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from runtime import topics
from runtime.durable import write_atomic
from runtime.errors import CommandError, CommandRefused, ConfigError
from runtime.signing import key_id

__all__ = [
    "LONG_RUNNING",
    "MAX_COMMAND_BYTES",
    "PLACEHOLDER_TYPES",
    "STATE_FILE",
    "AckHandle",
    "Command",
    "CommandChannel",
    "CommandLink",
    "Deferred",
    "Handler",
    "ReplayState",
    "canonical",
    "make_command",
    "parse_command",
    "sign_command",
]

log = logging.getLogger(__name__)

MAX_COMMAND_BYTES = 64 * 1024
STATE_FILE = "commands.json"
PLACEHOLDER_TYPES = ("model.deploy", "model.rollback")
LONG_RUNNING = frozenset({"logs.request", *PLACEHOLDER_TYPES})
# Changing these remotely would cut the device off from its fleet or its trust roots.
_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_TYPE = re.compile(r"[a-z][a-z0-9._-]{0,63}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_FIELDS = frozenset({"v", "id", "type", "issued_at", "expires_at", "target", "args", "sig"})
_SIG_FIELDS = frozenset({"alg", "key_id", "signature"})
_MAX_REASON = 200
_MAX_STORED_ACK = 16 * 1024


@dataclass(frozen=True)
class Command:
    """A command that passed every check; ``raw`` is the message exactly as received."""

    id: str
    type: str
    issued_at: float
    expires_at: float
    target: Mapping[str, Any]
    args: Mapping[str, Any]
    key_id: str
    raw: bytes


@dataclass(frozen=True)
class Deferred:
    """What a handler returns when it finishes later: the channel acks ``accepted`` now and waits for
    :meth:`CommandChannel.complete`."""

    note: str = ""


Handler = Callable[[Command], "dict[str, Any] | Deferred"]


class AckHandle(Protocol):
    """What ``Link.publish`` returns: ``wait`` blocks until the PUBACK (True) or the timeout (False)."""

    def wait(self, timeout: float) -> bool: ...


class CommandLink(Protocol):
    """What the channel needs of :class:`runtime.link.Link`: publish and subscribe."""

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> AckHandle: ...

    def subscribe(self, topic_filter: str, handler: Callable[[Any], None], *, qos: int = 1) -> None: ...


class _Bad(Exception):
    """Internal: a refusal reason, turned into CommandRefused with the id once it is known."""


# --- wire format --------------------------------------------------------------------------------


def canonical(body: Mapping[str, Any]) -> bytes:
    """The signed bytes: ``body`` without ``"sig"`` as sorted, compact, UTF-8 JSON (ValueError if impossible)."""
    unsigned = {k: v for k, v in body.items() if k != "sig"}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sign_command(body: Mapping[str, Any], private_key: Ed25519PrivateKey) -> bytes:
    """The wire bytes of ``body`` signed with ``private_key`` (any ``"sig"`` in ``body`` is replaced)."""
    try:
        signed = canonical(body)
    except (TypeError, ValueError) as exc:
        cid = body.get("id") if isinstance(body.get("id"), str) else None
        raise CommandError(f"cannot sign: the body is not plain JSON ({exc})", command_id=cid) from exc
    signature = base64.b64encode(private_key.sign(signed)).decode("ascii")
    sig = {"alg": "ed25519", "key_id": key_id(private_key), "signature": signature}
    doc = {**{k: v for k, v in body.items() if k != "sig"}, "sig": sig}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def make_command(
    type: str,
    target: Mapping[str, Any],
    args: Mapping[str, Any] | None = None,
    *,
    ttl_s: float = 60.0,
    now: float | None = None,
    command_id: str | None = None,
) -> dict[str, Any]:
    """An unsigned command body with a fresh uuid4 id, issued now and expiring ``ttl_s`` later."""
    issued = time.time() if now is None else now
    return {
        "id": command_id or uuid.uuid4().hex,
        "type": type,
        "issued_at": issued,
        "expires_at": issued + ttl_s,
        "target": dict(target),
        "args": dict(args or {}),
    }


def parse_command(
    raw: bytes,
    *,
    trusted: Sequence[Ed25519PublicKey],
    now: float,
    state: ReplayState,
    device: str,
    group: str,
    max_skew_s: float = 300.0,
    known_types: Collection[str] | None = None,
) -> Command:
    """Check ``raw`` against every rule (see the module docstring); refusals raise CommandRefused only.

    ``state`` is only read: the caller records an accepted command with ``state.accept(cmd)``.
    """
    cid: str | None = None
    try:
        doc = _load(raw)
        cid = doc.get("id") if isinstance(doc.get("id"), str) and _ID.fullmatch(doc["id"]) else None
        if cid is None:
            raise _Bad("malformed: id")
        cmd = _fields(doc, raw, trusted)
        if not _for_us(cmd.target, device, group):
            raise _Bad("not-for-this-device")
        if state.seen(cid):
            raise _Bad("replayed")
        if now > cmd.expires_at:
            raise _Bad("expired")
        if cmd.issued_at > now + max_skew_s:
            raise _Bad("from-the-future")
        if state.is_stale(cmd.issued_at):
            raise _Bad("stale")
        if known_types is not None and cmd.type not in known_types:
            raise _Bad("unknown-type")
        return cmd
    except _Bad as exc:
        raise CommandRefused(str(exc), cid) from None


def _load(raw: bytes) -> dict[str, Any]:
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise _Bad("malformed: not bytes")
    if len(raw) > MAX_COMMAND_BYTES:
        raise _Bad(f"malformed: larger than {MAX_COMMAND_BYTES} bytes")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad("malformed: not UTF-8") from None
    try:
        doc = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise _Bad("malformed: not JSON") from None
    if not isinstance(doc, dict):
        raise _Bad("malformed: not a JSON object")
    return doc


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise _Bad("malformed: duplicate key")
    return doc


def _no_constant(name: str) -> Any:
    raise _Bad(f"malformed: {name} is not JSON")


def _number(doc: Mapping[str, Any], name: str) -> float:
    value = doc.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad(f"malformed: {name}")
    try:
        number = float(value)
    except OverflowError:
        raise _Bad(f"malformed: {name}") from None
    if not math.isfinite(number):
        raise _Bad(f"malformed: {name}")
    return number


def _target(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or len(value) != 1:
        raise _Bad("malformed: target")
    ((kind, name),) = value.items()
    if kind == "all" and name is True:
        return {"all": True}
    if kind in ("device", "group") and isinstance(name, str) and 0 < len(name) <= 64:
        return {kind: name}
    raise _Bad("malformed: target")


def _fields(doc: dict[str, Any], raw: bytes, trusted: Sequence[Ed25519PublicKey]) -> Command:
    unknown = sorted(set(doc) - _FIELDS)
    if unknown:
        raise _Bad(f"malformed: unknown key {unknown[0][:40]!r}")
    if "v" in doc and (type(doc["v"]) is not int or doc["v"] != 1):
        raise _Bad("malformed: v (expected 1)")
    ctype = doc.get("type")
    if not isinstance(ctype, str) or not _TYPE.fullmatch(ctype):
        raise _Bad("malformed: type")
    issued, expires = _number(doc, "issued_at"), _number(doc, "expires_at")
    if expires <= issued:
        raise _Bad("malformed: expires_at not after issued_at")
    target = _target(doc.get("target"))
    args = doc.get("args", {})
    if not isinstance(args, dict):
        raise _Bad("malformed: args")
    kid = _verify(doc, trusted)
    return Command(doc["id"], ctype, issued, expires, target, args, kid, bytes(raw))


def _verify(doc: dict[str, Any], trusted: Sequence[Ed25519PublicKey]) -> str:
    sig = doc.get("sig")
    if sig is None:
        raise _Bad("unsigned")
    if not isinstance(sig, dict) or set(sig) != _SIG_FIELDS:
        raise _Bad("malformed: sig")
    if sig["alg"] != "ed25519":
        raise _Bad("malformed: sig.alg (expected ed25519)")
    kid, b64 = sig["key_id"], sig["signature"]
    if not isinstance(kid, str) or not _KEY_ID.fullmatch(kid):
        raise _Bad("malformed: sig.key_id")
    try:
        signature = base64.b64decode(b64.encode("ascii"), validate=True) if isinstance(b64, str) else b""
    except (UnicodeEncodeError, binascii.Error):
        signature = b""
    if len(signature) != 64:
        raise _Bad("malformed: sig.signature")
    key = next((k for k in trusted if key_id(k) == kid), None)
    if key is None:
        raise _Bad("unknown-key")
    try:
        signed = canonical(doc)
    except ValueError:  # lone surrogates, numbers too big for a float: nothing a signer could have produced
        raise _Bad("malformed: not canonical JSON") from None
    try:
        key.verify(signature, signed)
    except InvalidSignature:
        raise _Bad("bad-signature") from None
    return kid


def _for_us(target: Mapping[str, Any], device: str, group: str) -> bool:
    if "all" in target:
        return True
    if "device" in target:
        return bool(target["device"] == device)
    return bool(group) and target["group"] == group


# --- replay state -------------------------------------------------------------------------------


class ReplayState:
    """Accepted command ids (newest ``max_ids``) with their final acks, and the newest accepted issued_at.

    ``reorder_window_s`` (default 0: the strict rule) lets a command issued up to that long before the
    newest accepted one through, still exactly checked against the ids kept; anything older than an id
    that had to be forgotten is ``stale`` regardless.
    """

    def __init__(
        self,
        state_dir: str | Path,
        *,
        max_ids: int = 256,
        reorder_window_s: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(state_dir) / STATE_FILE
        self.max_ids = max(1, max_ids)
        self.reorder_window_s = max(0.0, reorder_window_s)
        self._lock = threading.Lock()
        self._seen: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.newest_accepted = 0.0
        self._floor = 0.0  # the newest issued_at among forgotten ids
        self._load(clock)

    def seen(self, command_id: str) -> bool:
        """True when ``command_id`` was accepted before (finished or not)."""
        with self._lock:
            return command_id in self._seen

    def final_ack(self, command_id: str) -> dict[str, Any] | None:
        """The final ack stored for an executed id, else None."""
        with self._lock:
            entry = self._seen.get(command_id)
            return dict(entry["ack"]) if entry and entry["ack"] is not None else None

    def is_stale(self, issued_at: float) -> bool:
        """True when a command issued at ``issued_at`` is older than the replay rules allow."""
        with self._lock:
            return issued_at < self.newest_accepted - self.reorder_window_s or issued_at <= self._floor

    def accept(self, cmd: Command) -> None:
        """Record ``cmd`` as accepted (before running it) and persist; CommandError if that fails."""
        with self._lock:
            self._seen[cmd.id] = {"issued_at": cmd.issued_at, "ack": None}
            self.newest_accepted = max(self.newest_accepted, cmd.issued_at)
            while len(self._seen) > self.max_ids:
                _, old = self._seen.popitem(last=False)
                self._floor = max(self._floor, old["issued_at"])
            self._save(cmd.id)

    def finish(self, command_id: str, ack: Mapping[str, Any]) -> None:
        """Store the final ack of an accepted id and persist (a huge result is replaced by a note)."""
        stored = dict(ack)
        if len(json.dumps(stored, default=str)) > _MAX_STORED_ACK:
            stored["result"] = {"omitted": "result too large to keep; send the command again with a new id"}
        with self._lock:
            if command_id in self._seen:
                self._seen[command_id]["ack"] = stored
                self._seen[command_id].pop("deferred", None)
                self._save(command_id)

    def defer(self, command_id: str, command_type: str) -> None:
        """Mark an accepted id as finishing later (persisted; :meth:`pending` lists it until :meth:`finish`)."""
        with self._lock:
            if command_id in self._seen:
                self._seen[command_id]["deferred"] = command_type
                self._save(command_id)

    def pending(self) -> dict[str, str]:
        """Deferred ids without a final ack yet → their command type."""
        with self._lock:
            return {k: v["deferred"] for k, v in self._seen.items() if v.get("deferred") and v["ack"] is None}

    def _save(self, command_id: str | None) -> None:
        doc = {
            "v": 1,
            "newest_accepted": self.newest_accepted,
            "floor": self._floor,
            "seen": [{"id": k, **v} for k, v in self._seen.items()],
        }
        try:
            write_atomic(self.path, json.dumps(doc, default=str).encode())
        except OSError as exc:
            raise CommandError(
                f"cannot write {self.path}: {exc.strerror}; check the state directory's space and permissions",
                command_id=command_id,
            ) from exc

    def _load(self, clock: Callable[[], float]) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise CommandError(f"cannot read {self.path}: {exc.strerror}; fix its permissions") from exc
        try:
            self._restore(json.loads(data))
        except (ValueError, TypeError, KeyError, RecursionError, AttributeError):
            aside = self.path.with_name(f"{STATE_FILE}.corrupt")
            log.error("%s is unreadable; moved to %s, commands issued before now will be refused", self.path, aside)
            try:
                os.replace(self.path, aside)
            except OSError as exc:
                raise CommandError(f"cannot move {self.path} aside: {exc.strerror}; delete it") from exc
            self._seen.clear()
            self.newest_accepted = self._floor = clock()
            self._save(None)

    def _restore(self, doc: Any) -> None:
        if not isinstance(doc, dict) or doc.get("v") != 1:
            raise ValueError("not a v1 state file")
        self.newest_accepted, self._floor = _finite(doc["newest_accepted"]), _finite(doc["floor"])
        for entry in doc["seen"]:
            ack = entry["ack"]
            if not isinstance(entry["id"], str) or not (ack is None or isinstance(ack, dict)):
                raise ValueError("bad entry")
            self._seen[entry["id"]] = {"issued_at": _finite(entry["issued_at"]), "ack": ack}
            if isinstance(entry.get("deferred"), str) and ack is None:
                self._seen[entry["id"]]["deferred"] = entry["deferred"]
        while len(self._seen) > self.max_ids:
            self._floor = max(self._floor, self._seen.popitem(last=False)[1]["issued_at"])


def _finite(value: Any) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"not a finite number: {value!r}")
    return number


# --- the channel --------------------------------------------------------------------------------


class CommandChannel:
    """Subscribes to the device's, its group's and the fleet's command topics; answers every message with acks.

    The link's network thread only queues messages (``queue_size``; beyond it a message is dropped
    and counted); ``edge-commands`` handles them one at a time, so a handler may block (waiting
    for PUBACKs, say) without stalling the network loop. ``handlers`` is copied into the mutable
    ``self.handlers``, where later work plugs in (``channel.handlers["model.deploy"] = …``). A handler
    returns a JSON-able dict (the ack's ``result``); raising CommandRefused refuses, any other
    exception is an ``error`` ack with a short reason. A handler with an ``after_ack(cmd)`` method
    gets it called once its ``ok`` ack is PUBACKed (or ``ack_timeout_s`` passed). ``reorder_window_s``
    goes to :class:`ReplayState` (0: a command issued before the newest accepted one is ``stale``).
    """

    def __init__(
        self,
        link: CommandLink,
        *,
        fleet: str,
        device: str,
        group: str,
        trusted_keys: Sequence[Ed25519PublicKey],
        state_dir: str | Path,
        handlers: Mapping[str, Handler],
        max_skew_s: float = 300.0,
        long_running: Collection[str] = LONG_RUNNING,
        ack_timeout_s: float = 5.0,
        queue_size: int = 64,
        reorder_window_s: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._link = link
        self.fleet, self.device, self.group = fleet, device, group
        self._trusted = list(trusted_keys)
        self.handlers: dict[str, Handler] = dict(handlers)
        self.state = ReplayState(state_dir, reorder_window_s=reorder_window_s, clock=clock)
        self.max_skew_s = max_skew_s
        self.long_running = frozenset(long_running)
        self.ack_timeout_s = ack_timeout_s
        self._clock = clock
        self._topics = topics.cmd_topics(fleet, device, group or None)
        self._ack_topic = topics.ack_topic(fleet, device)
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=max(1, queue_size))
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.counts = dict.fromkeys(("received", "refused", "ok", "error", "duplicate", "dropped"), 0)

    @property
    def topics(self) -> list[str]:
        """The command topics this channel listens on."""
        return list(self._topics)

    def start(self) -> None:
        """Start ``edge-commands`` and subscribe (the link re-subscribes after every reconnect)."""
        if self._thread is not None or self._closed.is_set():
            return
        self._thread = threading.Thread(target=self._run, name="edge-commands", daemon=True)
        self._thread.start()
        for topic in self._topics:
            self._link.subscribe(topic, self._on_message, qos=1)

    def close(self, timeout: float = 1.0) -> None:
        """Stop taking commands for good; finish the one running (up to ``timeout``); queued ones are dropped."""
        self._closed.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass  # the worker checks the flag at least every 0.2 s
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("edge-commands still running a command after %.1f s", timeout)
            self._thread = None

    def __enter__(self) -> CommandChannel:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_message(self, message: Any) -> None:
        if self._closed.is_set():
            return
        try:
            self._queue.put_nowait(bytes(message.payload))
        except queue.Full:
            self.counts["dropped"] += 1
            log.warning("command queue full (%d waiting); dropped a message on %s", self._queue.qsize(), message.topic)

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                raw = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if raw is None or self._closed.is_set():
                return
            try:
                self.process(raw)
            except Exception:  # the channel must outlive any one message; the trace goes to the log
                log.exception("handling a command failed; the channel carries on")

    def process(self, raw: bytes) -> list[dict[str, Any]]:
        """Handle one command message now, in this thread; return the acks published for it."""
        self.counts["received"] += 1
        try:
            cmd = parse_command(
                raw,
                trusted=self._trusted,
                now=self._clock(),
                state=self.state,
                device=self.device,
                group=self.group,
                max_skew_s=self.max_skew_s,
                known_types=self.handlers,
            )
        except CommandRefused as exc:
            stored = self.state.final_ack(exc.command_id) if exc.reason == "replayed" and exc.command_id else None
            waiting = self.state.pending().get(exc.command_id or "") if exc.reason == "replayed" else None
            if stored is None and waiting is not None and exc.command_id:
                self.counts["duplicate"] += 1
                again = self._ack(exc.command_id, waiting, "accepted")
                self._publish(again)
                return [again]
            if stored is not None:
                self.counts["duplicate"] += 1
                log.info("command %s delivered again; re-sending its final ack", exc.command_id)
                self._publish(stored)
                return [stored]
            return [self._refuse(exc.command_id, _peek_type(raw), exc.reason)]
        handler = self.handlers.get(cmd.type)
        if handler is None:  # unplugged between the check and now
            return [self._refuse(cmd.id, cmd.type, "unknown-type")]
        return self._dispatch(cmd, handler)

    def _dispatch(self, cmd: Command, handler: Handler) -> list[dict[str, Any]]:
        try:
            self.state.accept(cmd)
        except CommandError as exc:  # running it unrecorded could run it twice after a restart
            log.error("%s", exc)
            ack = self._ack(cmd.id, cmd.type, "error", reason=f"cannot record the command: {exc}")
            self._publish(ack)
            return [ack]
        acks = []
        if cmd.type in self.long_running:
            acks.append(self._ack(cmd.id, cmd.type, "accepted"))
            self._publish(acks[-1])
        final = self._execute(handler, cmd)
        if final is None:  # Deferred: complete() sends the final ack
            if cmd.type not in self.long_running:
                acks.append(self._ack(cmd.id, cmd.type, "accepted"))
                self._publish(acks[-1])
            try:
                self.state.defer(cmd.id, cmd.type)
            except CommandError as exc:
                log.error("%s", exc)
            return acks
        self.counts["ok" if final["status"] == "ok" else "error"] += 1
        try:
            self.state.finish(cmd.id, final)
        except CommandError as exc:
            log.error("%s", exc)
        handle = self._publish(final)
        acks.append(final)
        hook = getattr(handler, "after_ack", None)
        if final["status"] == "ok" and callable(hook):
            if handle is not None and not handle.wait(self.ack_timeout_s):
                log.warning("ack of command %s not confirmed within %.1f s; going on", cmd.id, self.ack_timeout_s)
            try:
                hook(cmd)
            except Exception:
                log.exception("after_ack of %s (command %s) raised", cmd.type, cmd.id)
        return acks

    def complete(
        self,
        command_id: str,
        command_type: str,
        *,
        status: str = "ok",
        result: Mapping[str, Any] | None = None,
        reason: str | None = None,
        wait_s: float = 0.0,
    ) -> bool | None:
        """Store and send the final ack of a deferred command; None (nothing sent) when it was finished before.

        True when the ack was PUBACKed within ``wait_s`` (or, with 0, handed to the link).
        """
        if self.state.final_ack(command_id) is not None:
            return None
        final = self._ack(command_id, command_type, status, reason=reason, result=dict(result) if result else None)
        self.counts["ok" if status == "ok" else "error"] += 1
        try:
            self.state.finish(command_id, final)
        except CommandError as exc:
            log.error("%s", exc)
        return self._confirmed(self._publish(final), wait_s)

    def resend(self, command_id: str, *, wait_s: float = 0.0) -> bool:
        """Publish the stored final ack of ``command_id`` again (False when none is stored or no PUBACK came)."""
        stored = self.state.final_ack(command_id)
        if stored is None:
            return False
        return self._confirmed(self._publish(stored), wait_s)

    @staticmethod
    def _confirmed(handle: AckHandle | None, wait_s: float) -> bool:
        if handle is None:
            return False
        return True if wait_s <= 0 else handle.wait(wait_s)

    def _execute(self, handler: Handler, cmd: Command) -> dict[str, Any] | None:
        try:
            result = handler(cmd)
        except CommandRefused as exc:
            log.warning("command %s (%s) refused by its handler: %s", cmd.id, cmd.type, exc.reason)
            return self._ack(cmd.id, cmd.type, "refused", reason=exc.reason)
        except (CommandError, ConfigError) as exc:
            log.warning("command %s (%s) failed: %s", cmd.id, cmd.type, exc)
            return self._ack(cmd.id, cmd.type, "error", reason=str(exc))
        except Exception as exc:
            log.exception("the %s handler raised on command %s", cmd.type, cmd.id)
            return self._ack(cmd.id, cmd.type, "error", reason=f"{type(exc).__name__}: {exc}")
        if isinstance(result, Deferred):
            return None
        try:
            if not isinstance(result, Mapping):
                raise TypeError(f"returned {type(result).__name__}, not a dict")
            json.dumps(result, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            log.error("the %s handler's result is not a JSON object: %s", cmd.type, exc)
            return self._ack(cmd.id, cmd.type, "error", reason=f"handler result is not a JSON object: {exc}")
        return self._ack(cmd.id, cmd.type, "ok", result=dict(result))

    def _refuse(self, command_id: str | None, ctype: str | None, reason: str) -> dict[str, Any]:
        self.counts["refused"] += 1
        log.warning("refused command %s: %s", command_id or "(no id)", reason)
        ack = self._ack(command_id, ctype, "refused", reason=reason)
        self._publish(ack)
        return ack

    def _ack(
        self, command_id: str | None, ctype: str | None, status: str, *, reason: str | None = None, result: Any = None
    ) -> dict[str, Any]:
        ack: dict[str, Any] = {"id": command_id, "device": self.device, "type": ctype, "status": status}
        if reason is not None:
            ack["reason"] = reason if len(reason) <= _MAX_REASON else reason[: _MAX_REASON - 1] + "…"
        if result is not None:
            ack["result"] = result
        ack["ts"] = self._clock()
        return ack

    def _publish(self, ack: Mapping[str, Any]) -> AckHandle | None:
        payload = json.dumps(ack, default=str).encode()
        try:
            return self._link.publish(self._ack_topic, payload, qos=1)
        except Exception as exc:  # a broken link must not take the channel down; the operator times out
            log.warning("cannot publish the ack of command %s: %s", ack.get("id"), exc)
            return None


def _peek_type(raw: bytes) -> str | None:
    """The ``type`` of a refused message when it is readable, for the ack; never raises."""
    try:
        doc = json.loads(bytes(raw).decode("utf-8")) if len(raw) <= MAX_COMMAND_BYTES else None
    except (ValueError, RecursionError, TypeError):
        return None
    ctype = doc.get("type") if isinstance(doc, dict) else None
    return ctype if isinstance(ctype, str) and _TYPE.fullmatch(ctype) else None
