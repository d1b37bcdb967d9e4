"""The command channel over a real Mosquitto: an operator's paho client sends good and bad commands to a device.

Every bad payload — replayed, stale, expired, unsigned, wrongly signed, mis-addressed, and Hypothesis-made
garbage — gets a ``refused`` ack with a reason, and the device keeps answering pings afterwards. A command
for another device that arrives on this device's topic is refused ``not-for-this-device``; one published on
another device's (or group's) topic never reaches this device at all.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from runtime.command_handlers import logs_handler, logs_publisher, ping_handler
from runtime.commands import (
    Command,
    CommandChannel,
    ReplayState,
    make_command,
    parse_command,
    sign_command,
)
from runtime.errors import CommandRefused
from runtime.link import Link, LinkConfig
from runtime.logbook import Logbook, LogbookConfig
from runtime.signing import Ed25519PrivateKey, Ed25519PublicKey, generate_keypair, load_private_key, load_public_key
from tests.broker import Broker, Collector

FLEET, DEVICE, GROUP = "itest", "cam-1", "lobby"
ACK_WAIT = 10.0


class Operator:
    """The operator side, as plain paho: publishes commands at QoS 1 and waits for the PUBACK."""

    def __init__(self, broker: Broker) -> None:
        from paho.mqtt.client import CallbackAPIVersion, Client, MQTTv5

        self.client = Client(CallbackAPIVersion.VERSION2, client_id=f"operator-{uuid.uuid4().hex[:8]}", protocol=MQTTv5)
        self.client.connect(broker.host, broker.port, keepalive=10)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(5.0)
        assert info.is_published(), f"the broker did not acknowledge a command on {topic}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Setup:
    broker: Broker
    operator: Operator
    acks: Collector
    logs: Collector
    channel: CommandChannel
    book: Logbook
    key: Ed25519PrivateKey
    trusted: list[Ed25519PublicKey]
    stranger: Ed25519PrivateKey
    state_dir: Path
    pings: list[str]

    def topic(self, device: str = DEVICE) -> str:
        return f"edge/{FLEET}/{device}/cmd"

    def command(self, ctype: str = "ping", target: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        args = kw.pop("args", {})
        doc = make_command(ctype, target or {"device": DEVICE}, args, now=kw.pop("now", time.time()))
        doc.update(kw)
        return doc

    def exchange(self, payload: bytes, topic: str | None = None, *, count: int = 1) -> list[dict[str, Any]]:
        """Publish one message; return the next ``count`` acks from this device (fails when they do not come)."""
        before = len(self.acks.messages)
        self.operator.send(topic or self.topic(), payload)
        arrived = self.acks.wait(lambda m: len(m) >= before + count, ACK_WAIT)
        acks = [json.loads(m.payload) for m in self.acks.messages[before:]]
        assert arrived, f"expected {count} ack(s), got {acks}"
        assert all(a["device"] == DEVICE for a in acks)
        return acks[:count]

    def ping_ok(self) -> None:
        (ack,) = self.exchange(sign_command(self.command(), self.key))
        assert ack["status"] == "ok" and "pong" in ack["result"], ack


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("commands")
    key_path, pub_path = generate_keypair(tmp / "keys", "operator")
    stranger_path, _ = generate_keypair(tmp / "keys", "stranger")
    pings: list[str] = []
    ping = ping_handler()

    def counted_ping(cmd: Command) -> dict[str, Any]:
        pings.append(cmd.id)
        return ping(cmd)

    trusted = [load_public_key(pub_path)]
    with Broker() as broker:
        book = Logbook(LogbookConfig(path=tmp / "logbook.sqlite"), device_id=DEVICE)
        link = Link(LinkConfig(client_id=DEVICE, port=broker.port, protocol="mqtt5", reconnect_min_s=0.05))
        channel = CommandChannel(
            link,
            fleet=FLEET,
            device=DEVICE,
            group=GROUP,
            trusted_keys=trusted,
            state_dir=tmp / "state",
            handlers={
                "ping": counted_ping,
                "logs.request": logs_handler(book.export, logs_publisher(link, FLEET, DEVICE)),
            },
        )
        acks = Collector(broker, f"edge/{FLEET}/+/cmd/ack", client_id="ack-collector")
        logs = Collector(broker, f"edge/{FLEET}/+/logs", client_id="logs-collector")
        operator = Operator(broker)
        try:
            channel.start()
            link.start()
            assert link.wait_connected(10)
            for topic in channel.topics:
                assert link.wait_subscribed(topic, 10), topic
            yield Setup(
                broker,
                operator,
                acks,
                logs,
                channel,
                book,
                load_private_key(key_path),
                trusted,
                load_private_key(stranger_path),
                tmp / "state",
                pings,
            )
        finally:
            operator.close()
            acks.stop()
            logs.stop()
            channel.close()
            link.stop()
            book.close()


def test_commands_on_the_device_group_and_fleet_topics_are_answered(setup: Setup) -> None:
    topics = [setup.topic(), f"edge/{FLEET}/group/{GROUP}/cmd", f"edge/{FLEET}/all/cmd"]
    targets: list[dict[str, Any]] = [{"device": DEVICE}, {"group": GROUP}, {"all": True}]
    for topic, target in zip(topics, targets, strict=True):
        doc = setup.command(target=target)
        (ack,) = setup.exchange(sign_command(doc, setup.key), topic)
        assert (ack["id"], ack["status"], ack["type"]) == (doc["id"], "ok", "ping")


def test_a_command_for_another_device_is_refused_or_never_arrives(setup: Setup) -> None:
    doc = setup.command(target={"device": "cam-2"})
    (ack,) = setup.exchange(sign_command(doc, setup.key))  # on our topic: refused, so the operator sees it
    assert (ack["id"], ack["status"], ack["reason"]) == (doc["id"], "refused", "not-for-this-device")
    before = len(setup.acks.messages)
    setup.operator.send(setup.topic("cam-2"), sign_command(doc, setup.key))
    setup.operator.send(
        f"edge/{FLEET}/group/yard/cmd", sign_command(setup.command(target={"group": "yard"}), setup.key)
    )
    setup.ping_ok()  # answered after both, so they were not just slow: we never received them
    assert len(setup.acks.messages) == before + 1


def test_replays_are_idempotent_or_refused(setup: Setup) -> None:
    doc = setup.command()
    raw = sign_command(doc, setup.key)
    (first,) = setup.exchange(raw)
    (again,) = setup.exchange(raw)
    assert first["status"] == "ok" and again == first  # the stored ack, byte for byte
    assert setup.pings.count(doc["id"]) == 1
    stale = setup.command(now=doc["issued_at"] - 1)  # captured before the newest accepted, never seen
    (ack,) = setup.exchange(sign_command(stale, setup.key))
    assert (ack["id"], ack["status"], ack["reason"]) == (stale["id"], "refused", "stale")
    # an id the device accepted but never finished (it died running it) cannot run again
    unfinished = setup.command()
    unfinished_raw = sign_command(unfinished, setup.key)
    cmd = parse_command(
        unfinished_raw, trusted=setup.trusted, now=time.time(), state=setup.channel.state, device=DEVICE, group=GROUP
    )
    setup.channel.state.accept(cmd)
    (ack,) = setup.exchange(unfinished_raw)
    assert (ack["id"], ack["status"], ack["reason"]) == (unfinished["id"], "refused", "replayed")
    assert unfinished["id"] not in setup.pings
    setup.ping_ok()


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("expired", "expired"),
        ("unsigned", "unsigned"),
        ("wrong key", "unknown-key"),
        ("tampered", "bad-signature"),
        ("future", "from-the-future"),
        ("not json", "malformed: not JSON"),
    ],
)
def test_bad_commands_are_refused_with_a_reason(setup: Setup, name: str, reason: str) -> None:
    now = time.time()
    doc = setup.command(now=now - 3600) if name == "expired" else setup.command()
    if name == "future":
        doc = setup.command(now=now + 3600)
    if name == "unsigned":
        raw = json.dumps(doc).encode()
    elif name == "wrong key":
        raw = sign_command(doc, setup.stranger)
    elif name == "tampered":
        raw = sign_command(doc, setup.key).replace(b'"type":"ping"', b'"type":"status"')
    elif name == "not json":
        raw = b"\x00garbage"
    else:
        raw = sign_command(doc, setup.key)
    (ack,) = setup.exchange(raw)
    assert ack["status"] == "refused" and ack["reason"] == reason
    assert ack["id"] == (None if name == "not json" else doc["id"])
    setup.ping_ok()


def test_logs_request_publishes_the_slice_and_acks_twice(setup: Setup) -> None:
    book = setup.book
    start = time.time()
    for i in range(20):
        book.record_event("tick", f"event {i}", ts=start + i)
    book.flush()
    doc = setup.command("logs.request", args={"since": start, "limit": 15})
    accepted, final = setup.exchange(sign_command(doc, setup.key), count=2)
    assert [accepted["status"], final["status"]] == ["accepted", "ok"]
    assert final["result"]["rows"] == 15 and final["result"]["truncated"] and final["result"]["acked"]
    assert setup.logs.wait(lambda m: len(m) >= final["result"]["chunks"], ACK_WAIT)
    rows = [r for m in setup.logs.messages for r in json.loads(m.payload)["rows"]]
    assert [r["message"] for r in rows] == [f"event {i}" for i in range(15)]
    assert all(m.topic == f"edge/{FLEET}/{DEVICE}/logs" for m in setup.logs.messages)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
FIELDS = st.sampled_from(["id", "type", "issued_at", "expires_at", "target", "args", "sig", "v", "x"])


@st.composite
def malformed(draw: st.DrawFn, key: Ed25519PrivateKey) -> bytes:
    kind = draw(st.sampled_from(["bytes", "object", "mutated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "object":
        return json.dumps(draw(st.dictionaries(FIELDS, JSON, max_size=8))).encode()
    doc = json.loads(sign_command(make_command("ping", {"device": DEVICE}), key))
    doc[draw(FIELDS)] = draw(JSON)
    return json.dumps(doc).encode()


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_hypothesis_malformed_payloads_are_refused_and_the_device_keeps_serving(
    setup: Setup, data: st.DataObject
) -> None:
    raw = data.draw(malformed(setup.key))
    try:  # a mutation may, rarely, still be a valid command (e.g. "v" set to 1): only refusals are sent
        parse_command(
            raw,
            trusted=setup.trusted,
            now=time.time(),
            state=ReplayState(setup.state_dir / "scratch"),
            device=DEVICE,
            group=GROUP,
        )
        assume(False)
    except CommandRefused:
        pass
    (ack,) = setup.exchange(raw)
    assert ack["status"] == "refused" and ack["reason"], ack


def test_the_device_still_answers_after_all_that(setup: Setup) -> None:
    setup.ping_ok()
    assert setup.channel.counts["refused"] >= 50
