"""The device's MQTT connection (the only runtime module importing paho): connect, publish, subscribe, request.

One paho-mqtt 2 client (callback API version 2) with a persistent session: MQTT 5 ``clean_start=False``
plus a session expiry, or ``clean_session=False`` on 3.1.1. ``protocol="auto"`` connects with MQTT 5
and switches to 3.1.1 for good when the broker answers "unsupported protocol version" (a 3.1.1-only
broker's CONNACK return code 1, which paho reports as reason code 0x84). Its network thread
(paho's ``loop_start``, renamed ``edge-mqtt``) reconnects after every loss, waiting an exponential
backoff between ``reconnect_min_s`` and ``reconnect_max_s`` with jitter (each wait is drawn from
``[d/2, d]``) so that a fleet does not reconnect in lock step after a broker restart; the delay is
handed to paho through ``reconnect_delay_set`` before each wait.

Publishing: :meth:`Link.publish` returns a :class:`PublishHandle` that becomes ``acked`` only when
paho reports the PUBACK with a success reason code (QoS 1), ``failed`` on a failure reason code
(MQTT 5, e.g. 0x87 not authorized) or when the link stops. paho keeps unacknowledged QoS 1
messages in memory and sends them again after a reconnect, within this process only: the durable
copy is the caller's (the logbook outbox), which must publish again what was not acked when the
process died. Subscriptions are made again after every connect (until :meth:`Link.unsubscribe`);
every SUBSCRIBE, even for a filter already held, makes the broker send its retained messages again.
Handlers run on the network thread: keep them short; an exception in one is logged and does not stop
the link.
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

from runtime.errors import ConfigError
from runtime.topics import topic_matches, validate_filter

if TYPE_CHECKING:
    from paho.mqtt.client import Client, ConnectFlags, DisconnectFlags, MQTTMessage
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

__all__ = [
    "Link",
    "LinkConfig",
    "Message",
    "PublishHandle",
    "backoff_delay",
    "fallback_protocol",
]

log = logging.getLogger(__name__)

Protocol = Literal["mqtt5", "mqtt311", "auto"]
_UNSUPPORTED_PROTOCOL = 0x84  # MQTT 5 CONNACK reason; paho maps a 3.1.1 CONNACK return code 1 to it
_PROPERTY_NAMES = {
    "content_type": "ContentType",
    "response_topic": "ResponseTopic",
    "correlation_data": "CorrelationData",
    "payload_format": "PayloadFormatIndicator",
    "message_expiry": "MessageExpiryInterval",
}


@dataclass(frozen=True, kw_only=True)
class LinkConfig:
    """Where and how to connect; plain values so the service can fill it from its ``[mqtt]`` config."""

    client_id: str
    host: str = "127.0.0.1"
    port: int = 1883
    keepalive_s: int = 30
    protocol: Protocol = "auto"  # auto: MQTT 5, falling back to 3.1.1 if the broker refuses it
    session_expiry_s: int = 7 * 86400  # persistent session (MQTT 5); 3.1.1 uses clean_session=False
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None  # TLS is on when a CA or a client certificate is given
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False  # skip the host name check (test brokers with self-made certificates)
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    will_topic: str | None = None
    will_payload: bytes = b""
    will_retain: bool = True

    def __post_init__(self) -> None:
        checks = (
            ("client_id", isinstance(self.client_id, str) and 0 < len(self.client_id) <= 128, "must be 1..128 chars"),
            ("port", 0 < self.port < 65536, "must be 1..65535"),
            ("keepalive_s", 5 <= self.keepalive_s <= 65535, "must be 5..65535"),
            ("protocol", self.protocol in ("mqtt5", "mqtt311", "auto"), 'must be "mqtt5", "mqtt311" or "auto"'),
            ("session_expiry_s", 0 <= self.session_expiry_s <= 0xFFFFFFFF, "must be 0..4294967295"),
            ("reconnect_min_s", self.reconnect_min_s > 0, "must be > 0"),
            ("reconnect_max_s", self.reconnect_max_s >= self.reconnect_min_s, "must be >= reconnect_min_s"),
            ("key_file", self.key_file is None or self.cert_file is not None, "needs cert_file too"),
            ("password", self.password is None or self.username is not None, "needs username too"),
        )
        for key, ok, rule in checks:
            if not ok:
                shown = "<hidden>" if key == "password" else repr(getattr(self, key))
                raise ConfigError(f"{rule}, got {shown}", key=f"mqtt.{key}")
        if self.will_topic is not None:
            validate_filter(self.will_topic, "mqtt.will_topic")
            if "+" in self.will_topic or "#" in self.will_topic:
                raise ConfigError(f"must not contain wildcards: {self.will_topic!r}", key="mqtt.will_topic")

    @property
    def tls(self) -> bool:
        """Whether the connection uses TLS."""
        return self.ca_file is not None or self.cert_file is not None


@dataclass(frozen=True)
class Message:
    """A received message. ``properties`` (MQTT 5 only): user_properties (dict), content_type,
    response_topic, correlation_data (bytes), payload_format, message_expiry."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: dict[str, Any] = field(default_factory=dict)


class PublishHandle:
    """The fate of one publish: ``acked`` once the broker acknowledged it, ``failed`` if it never will be."""

    def __init__(self, topic: str, qos: int) -> None:
        self.topic = topic
        self.qos = qos
        self.reason: str | None = None  # why it failed
        self._done = threading.Event()
        self._acked = False
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[PublishHandle], None]] = []

    @property
    def acked(self) -> bool:
        """True once the PUBACK (QoS 1) arrived with a success code, or the message was sent (QoS 0)."""
        return self._acked

    @property
    def failed(self) -> bool:
        """True if the broker refused it or the link stopped before it was acknowledged."""
        return self._done.is_set() and not self._acked

    @property
    def done(self) -> bool:
        """Acked or failed."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until done (or ``timeout``); True if acked."""
        self._done.wait(timeout)
        return self._acked

    def add_done_callback(self, callback: Callable[[PublishHandle], None]) -> None:
        """Call ``callback(handle)`` once done (at once if it already is); it runs on the thread that resolves it."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(callback)
                return
        callback(self)

    def _resolve(self, ok: bool, reason: str | None = None) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self._acked, self.reason = ok, reason
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)

    def __repr__(self) -> str:
        state = "acked" if self._acked else f"failed ({self.reason})" if self.done else "pending"
        return f"<PublishHandle {self.topic} qos={self.qos} {state}>"


def backoff_delay(attempt: int, min_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Wait before reconnect ``attempt`` (0-based): ``d = min(max_s, min_s·2^attempt)``, drawn from ``[d/2, d]``."""
    d = min(max_s, min_s * 2.0 ** min(max(attempt, 0), 32))
    return d / 2 + (rng or random).uniform(0.0, d / 2)


def fallback_protocol(requested: Protocol, in_use: str, reason_code: int) -> str | None:
    """The protocol to retry with after a refused CONNACK, or None to keep trying as is.

    Only ``auto`` falls back, only from MQTT 5, and only for "unsupported protocol version"
    (0x84, or 1 as a 3.1.1 broker sends it); any other refusal (bad credentials, banned) is not
    about the protocol.
    """
    if requested == "auto" and in_use == "mqtt5" and reason_code in (_UNSUPPORTED_PROTOCOL, 1):
        return "mqtt311"
    return None


@dataclass
class _Subscription:
    topic_filter: str
    qos: int
    handler: Callable[[Message], None]


class Link:
    """One MQTT connection shared by sync, commands and escalation; see the module docstring."""

    def __init__(self, cfg: LinkConfig) -> None:
        self.cfg = cfg
        self._lock = threading.RLock()
        self._client: Client | None = None
        self._generation = 0
        self._protocol = "mqtt311" if cfg.protocol == "mqtt311" else "mqtt5"
        self._pending: dict[tuple[int, int], PublishHandle] = {}
        self._early: dict[tuple[int, int], tuple[bool, str | None]] = {}
        self._subs: list[_Subscription] = []
        self._unsubscribe_later: set[str] = set()  # dropped while offline: the persistent session still has them
        self._suback: dict[tuple[int, int], list[str]] = {}
        self._early_suback: dict[tuple[int, int], list[ReasonCode]] = {}
        self._subscribed: set[str] = set()
        self._sub_cond = threading.Condition(self._lock)
        self._connect_callbacks: list[Callable[[bool], None]] = []
        self._connected = threading.Event()
        self._requests: dict[bytes, list[Message]] = {}
        self._request_cond = threading.Condition(self._lock)
        self._attempt = 0
        self._started = False
        self._stopping = False
        self._retired: list[Client] = []
        self._rng = random.Random()
        self.connects = 0  # successful connects so far

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start connecting in the background (thread ``edge-mqtt``); returns at once, broker up or not."""
        with self._lock:
            if self._started:
                return
            self._stopping = False
            self._start_client()  # ConfigError for unreadable TLS files, before anything runs
            self._started = True

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (the broker then drops the last will) and stop the network thread."""
        with self._lock:
            if not self._started:
                return
            self._stopping = True
            client, retired = self._client, list(self._retired)
            self._retired.clear()
        for old in [*retired, client]:
            if old is not None:
                _stop_client(old, timeout)
        self._connected.clear()
        with self._lock:
            self._started = False
            pending, self._pending = list(self._pending.values()), {}
            self._early.clear()
            self._suback.clear()
            self._early_suback.clear()
            self._subscribed.clear()
            self._request_cond.notify_all()
        for handle in pending:
            handle._resolve(False, "the link stopped before the broker acknowledged it")

    def __enter__(self) -> Link:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def connected(self) -> bool:
        """True between a successful CONNACK and the next disconnect."""
        return self._connected.is_set()

    @property
    def protocol_in_use(self) -> str:
        """``mqtt5`` or ``mqtt311`` (after an ``auto`` fallback, 3.1.1 for the rest of this link's life)."""
        return self._protocol

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected (True) or ``timeout`` passes (False)."""
        return self._connected.wait(timeout)

    def on_connect(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(session_present)`` on the network thread after every successful connect."""
        with self._lock:
            self._connect_callbacks.append(callback)

    # --- publish / subscribe / request ------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: Mapping[str, Any] | None = None,
    ) -> PublishHandle:
        """Queue a message; never blocks on the network. Properties are dropped on MQTT 3.1.1."""
        handle = PublishHandle(topic, qos)
        if qos not in (0, 1):
            raise ConfigError(f"qos must be 0 or 1, got {qos!r}", key="qos")
        with self._lock:
            client, generation = self._client, self._generation
            v5 = self._protocol == "mqtt5"
        if client is None or self._stopping:
            handle._resolve(False, "the link is not started")
            return handle
        props = _publish_properties(properties) if v5 and properties else None
        try:
            info = client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        except ValueError as exc:
            raise ConfigError(f"cannot publish: {exc}", key=f"topic {topic!r}") from exc
        from paho.mqtt.client import MQTT_ERR_NO_CONN, MQTT_ERR_SUCCESS

        if info.rc not in (MQTT_ERR_SUCCESS, MQTT_ERR_NO_CONN) or (qos == 0 and info.rc != MQTT_ERR_SUCCESS):
            handle._resolve(False, f"paho refused the publish (rc={info.rc})")
            return handle
        key = (generation, info.mid)
        with self._lock:
            early = self._early.pop(key, None)
            if early is None and self._stopping:  # stop() has already failed the pending handles
                early = (False, "the link stopped before the broker acknowledged it")
            elif early is None:
                self._pending[key] = handle
        if early is not None:
            handle._resolve(*early)
        return handle

    def subscribe(self, topic_filter: str, handler: Callable[[Message], None], *, qos: int = 1) -> None:
        """Deliver messages matching ``topic_filter`` (``$share/…`` allowed) to ``handler``; renewed on reconnect."""
        if topic_filter.startswith("$share/"):
            parts = topic_filter.split("/", 2)
            validate_filter(parts[2] if len(parts) == 3 else "", "topic_filter")
        else:
            validate_filter(topic_filter)
        with self._lock:
            self._subs.append(_Subscription(topic_filter, qos, handler))
            client = self._client if self.connected else None
        if client is not None:
            self._send_subscribe(client, [(topic_filter, qos)])

    def unsubscribe(self, topic_filter: str, handler: Callable[[Message], None] | None = None) -> None:
        """Stop delivering ``topic_filter`` to ``handler`` (to every handler when None).

        The broker is sent an UNSUBSCRIBE only when no handler is left on that filter, now and again on
        the next connect (the persistent session would keep a subscription whose UNSUBSCRIBE was lost
        with the connection); not renewed on reconnect from then on. Unknown filters are ignored.
        """
        with self._lock:
            kept = [
                s
                for s in self._subs
                if s.topic_filter != topic_filter or (handler is not None and s.handler != handler)
            ]
            removed = len(kept) != len(self._subs)
            self._subs = kept
            last = removed and not any(s.topic_filter == topic_filter for s in kept)
            if last:
                self._subscribed.discard(topic_filter)
                # sent again on the next connect: one sent just as the connection dropped is lost
                self._unsubscribe_later.add(topic_filter)
            client = self._client if self.connected and last else None
        if client is not None:
            client.unsubscribe(topic_filter)

    def wait_subscribed(self, topic_filter: str, timeout: float) -> bool:
        """Block until the broker granted ``topic_filter`` on the current connection."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while topic_filter not in self._subscribed:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping:
                    return False
                self._sub_cond.wait(remaining)
            return True

    def request(
        self, topic: str, payload: bytes, *, response_topic: str, timeout: float, qos: int = 1
    ) -> Message | None:
        """MQTT 5 request/response: publish with a response topic and fresh correlation data, wait for the answer.

        None when no answer came within ``timeout`` (or on MQTT 3.1.1, which has no correlation data).
        """
        deadline = time.monotonic() + timeout
        if self._protocol != "mqtt5":
            log.debug("request to %s skipped: MQTT 3.1.1 has no response topic or correlation data", topic)
            return None
        with self._lock:
            known = any(s.topic_filter == response_topic for s in self._subs)
        if not known:
            self.subscribe(response_topic, self._on_response, qos=1)
        if not self.wait_subscribed(response_topic, max(0.0, deadline - time.monotonic())):
            return None
        correlation = uuid.uuid4().bytes
        with self._lock:
            self._requests[correlation] = []
        try:
            props = {"response_topic": response_topic, "correlation_data": correlation}
            self.publish(topic, payload, qos=qos, properties=props)
            with self._lock:
                answers = self._requests[correlation]
                while not answers and not self._stopping:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._request_cond.wait(remaining)
                return answers[0] if answers else None
        finally:
            with self._lock:
                self._requests.pop(correlation, None)

    def _on_response(self, message: Message) -> None:
        correlation = message.properties.get("correlation_data")
        with self._lock:
            answers = self._requests.get(correlation) if isinstance(correlation, bytes) else None
            if answers is not None:
                answers.append(message)
                self._request_cond.notify_all()

    # --- the paho client --------------------------------------------------------------------------

    def _start_client(self) -> None:
        """Build, configure and start a client for ``self._protocol`` (lock held)."""
        client = self._make_client()
        self._generation += 1
        self._client = client
        generation = self._generation
        client.on_connect = lambda c, u, f, r, p: self._handle_connect(generation, c, f, r)
        client.on_disconnect = lambda c, u, f, r, p: self._handle_disconnect(generation, f, r)
        client.on_connect_fail = lambda c, u: self._schedule_retry(c)
        client.on_publish = lambda c, u, mid, r, p: self._handle_puback(generation, mid, r)
        client.on_subscribe = lambda c, u, mid, codes, p: self._handle_suback(generation, mid, codes)
        client.on_message = lambda c, u, m: self._handle_message(m)
        kwargs: dict[str, Any] = {}
        if self._protocol == "mqtt5":
            props = _properties("CONNECT")
            props.SessionExpiryInterval = self.cfg.session_expiry_s
            kwargs = {"clean_start": False, "properties": props}
        client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s, **kwargs)
        client.loop_start()
        thread = getattr(client, "_thread", None)  # paho names it paho-mqtt-client-<id>; the runtime's are edge-*
        if isinstance(thread, threading.Thread):
            thread.name = "edge-mqtt"

    def _make_client(self) -> Client:
        from paho.mqtt.client import Client, MQTTv5, MQTTv311
        from paho.mqtt.enums import CallbackAPIVersion

        v5 = self._protocol == "mqtt5"
        client = Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.cfg.client_id,
            protocol=MQTTv5 if v5 else MQTTv311,
            clean_session=None if v5 else False,
        )
        client.reconnect_delay_set(*self._delay_pair(0))
        if self.cfg.username is not None:
            client.username_pw_set(self.cfg.username, self.cfg.password)
        if self.cfg.tls:
            self._configure_tls(client)
        if self.cfg.will_topic is not None:
            will_props = None
            if v5:
                will_props = _properties("WILLMESSAGE")
                will_props.ContentType = "application/json"
            client.will_set(
                self.cfg.will_topic, self.cfg.will_payload, qos=1, retain=self.cfg.will_retain, properties=will_props
            )
        return client

    def _configure_tls(self, client: Client) -> None:
        cfg = self.cfg
        try:
            client.tls_set(ca_certs=cfg.ca_file, certfile=cfg.cert_file, keyfile=cfg.key_file)
        except FileNotFoundError as exc:
            raise ConfigError(
                f"TLS file not found: {exc.filename}; check mqtt.ca_file, mqtt.cert_file and mqtt.key_file",
                key="mqtt.ca_file",
            ) from exc
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot load the TLS CA/certificate/key: {exc}; check the PEM files and that the key matches",
                key="mqtt.cert_file",
            ) from exc
        if cfg.tls_insecure:
            client.tls_insecure_set(True)

    def _delay_pair(self, attempt: int) -> tuple[int, int]:
        delay = backoff_delay(attempt, self.cfg.reconnect_min_s, self.cfg.reconnect_max_s, self._rng)
        return cast(int, delay), cast(int, delay)  # paho types these int but does float arithmetic with them

    def _schedule_retry(self, client: Client) -> None:
        """After a failed attempt or a lost connection: the next wait, with jitter (network thread)."""
        with self._lock:
            attempt, self._attempt = self._attempt, self._attempt + 1
        client.reconnect_delay_set(*self._delay_pair(attempt))

    def _handle_connect(self, generation: int, client: Client, flags: ConnectFlags, reason: ReasonCode) -> None:
        if generation != self._generation:
            return
        if reason.is_failure:
            self._refused(client, int(reason.value), reason.getName())
            return
        with self._lock:
            self._attempt = 0
            self.connects += 1
            self._subscribed.clear()
            subs = [(s.topic_filter, s.qos) for s in self._subs]
            stale = sorted(self._unsubscribe_later - {f for f, _ in subs})
            self._unsubscribe_later.clear()
            callbacks = list(self._connect_callbacks)
        self._connected.set()
        log.info(
            "connected to %s:%d as %s (%s, session %s)",
            self.cfg.host,
            self.cfg.port,
            self.cfg.client_id,
            self._protocol,
            "resumed" if flags.session_present else "new",
        )
        if subs:
            self._send_subscribe(client, list(dict.fromkeys(subs)))
        if stale:
            client.unsubscribe(stale)
        for callback in callbacks:
            try:
                callback(bool(flags.session_present))
            except Exception:  # a callback's bug must not kill the network thread; it is logged with its traceback
                log.exception("on_connect callback %r failed", callback)

    def _refused(self, client: Client, code: int, name: str) -> None:
        switch_to = fallback_protocol(self.cfg.protocol, self._protocol, code)
        if switch_to is None:
            log.warning(
                "%s:%d refused the connection as %s: %s (0x%02X); retrying with backoff — check mqtt.username, "
                "mqtt.password, the client certificate and the broker's ACL",
                self.cfg.host,
                self.cfg.port,
                self.cfg.client_id,
                name,
                code,
            )
            return
        log.warning("%s:%d does not speak MQTT 5; falling back to MQTT 3.1.1", self.cfg.host, self.cfg.port)
        client.disconnect()  # ends this client's loop; the new one starts now, on its own thread
        with self._lock:
            if self._stopping:
                return
            self._retired.append(client)
            pending, self._pending = list(self._pending.values()), {}
            self._early.clear()
            self._protocol = switch_to
            self._start_client()
        for handle in pending:
            handle._resolve(False, "not acknowledged before the switch to MQTT 3.1.1; publish it again")

    def _handle_disconnect(self, generation: int, flags: DisconnectFlags, reason: ReasonCode) -> None:
        if generation != self._generation:
            return
        was_connected = self._connected.is_set()
        self._connected.clear()
        with self._lock:
            self._subscribed.clear()
            client, stopping = self._client, self._stopping
        if was_connected and not stopping:
            why = f"the broker sent {reason.getName()}" if flags.is_disconnect_packet_from_server else "connection lost"
            log.warning("disconnected from %s:%d (%s); reconnecting", self.cfg.host, self.cfg.port, why)
        if client is not None and not stopping:
            self._schedule_retry(client)

    def _handle_puback(self, generation: int, mid: int, reason: ReasonCode) -> None:
        ok = not reason.is_failure
        result = (ok, None if ok else f"the broker refused it: {reason.getName()} (0x{int(reason.value):02X})")
        with self._lock:
            handle = self._pending.pop((generation, mid), None)
            if handle is None:
                self._early[(generation, mid)] = result
        if handle is not None:
            handle._resolve(*result)

    def _send_subscribe(self, client: Client, subs: list[tuple[str, int]]) -> None:
        with self._lock:
            generation = self._generation
        result, mid = client.subscribe(subs)
        if result != 0 or mid is None:
            return  # not connected after all: the next connect subscribes again
        filters = [f for f, _ in subs]
        with self._lock:
            codes = self._early_suback.pop((generation, mid), None)  # the SUBACK may beat us here
            if codes is None:
                self._suback[(generation, mid)] = filters
            else:
                self._granted(filters, codes)

    def _handle_suback(self, generation: int, mid: int, codes: list[ReasonCode]) -> None:
        with self._lock:
            filters = self._suback.pop((generation, mid), None)
            if filters is None:
                self._early_suback[(generation, mid)] = codes
            else:
                self._granted(filters, codes)

    def _granted(self, filters: list[str], codes: list[ReasonCode]) -> None:
        """Record the broker's answer to one SUBSCRIBE (lock held)."""
        for topic_filter, code in zip(filters, codes, strict=False):
            if code.is_failure:
                log.warning("the broker refused the subscription %s: %s", topic_filter, code.getName())
            else:
                self._subscribed.add(topic_filter)
        self._sub_cond.notify_all()

    def _handle_message(self, msg: MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            log.warning("dropped a message whose topic is not UTF-8")
            return
        message = Message(topic, bytes(msg.payload), int(msg.qos), bool(msg.retain), _message_properties(msg))
        with self._lock:
            handlers = [s.handler for s in self._subs if topic_matches(s.topic_filter, topic)]
        for handler in dict.fromkeys(handlers):
            try:
                handler(message)
            except Exception:  # a handler's bug must not kill the network thread; it is logged with its traceback
                log.exception("handler %r failed on a message on %s", handler, topic)


def _stop_client(client: Client, timeout: float) -> None:
    """Disconnect (if connected) and join paho's thread; a thread that does not stop in ``timeout`` is left."""
    if client.is_connected():
        client.disconnect()
    done = threading.Event()

    def stop() -> None:
        client.loop_stop()
        done.set()

    stopper = threading.Thread(target=stop, name="edge-mqtt-stop", daemon=True)
    stopper.start()
    if not done.wait(timeout):
        log.warning("the MQTT network thread did not stop within %.1f s", timeout)


def _publish_properties(values: Mapping[str, Any]) -> Properties:
    props = _properties("PUBLISH")
    for key, value in values.items():
        if key == "user_properties":
            items = value.items() if isinstance(value, Mapping) else value
            props.UserProperty = [(str(k), str(v)) for k, v in items]
        elif key in _PROPERTY_NAMES:
            setattr(props, _PROPERTY_NAMES[key], value)
        else:
            raise ConfigError(
                f"unknown MQTT property {key!r}; expected user_properties or {', '.join(_PROPERTY_NAMES)}",
                key="properties",
            )
    return props


def _properties(packet: Literal["CONNECT", "WILLMESSAGE", "PUBLISH"]) -> Properties:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    return Properties(getattr(PacketTypes, packet))  # type: ignore[no-untyped-call]


def _message_properties(msg: MQTTMessage) -> dict[str, Any]:
    props = msg.properties
    if props is None:
        return {}
    found: dict[str, Any] = {}
    users = getattr(props, "UserProperty", None)
    if users:
        found["user_properties"] = dict(users)
    for key, name in _PROPERTY_NAMES.items():
        value = getattr(props, name, None)
        if value is not None:
            found[key] = value
    return found
