"""Signed fleet commands: every refusal reason, replay state across restarts, idempotency, built-in handlers.

The channel tests drive ``CommandChannel.process`` through a tiny in-memory stand-in for ``runtime.link.Link``
(publish/subscribe only); the wire against a real Mosquitto is ``tests/integration/test_commands_broker.py``.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.command_handlers import (
    OVERRIDE_FILE,
    RestartHandler,
    config_set_handler,
    logs_handler,
    merge_overrides,
    ping_handler,
    read_overrides,
    status_handler,
)
from runtime.commands import (
    STATE_FILE,
    Command,
    CommandChannel,
    ReplayState,
    canonical,
    make_command,
    parse_command,
    sign_command,
)
from runtime.config import ServiceConfig
from runtime.errors import CommandError, CommandRefused, ConfigError
from runtime.logbook import Logbook, LogbookConfig
from runtime.signing import Ed25519PrivateKey, Ed25519PublicKey, generate_keypair, load_private_key, load_public_key

NOW = 1_700_000_000.0
FLEET, DEVICE, GROUP = "f1", "cam-1", "lobby"


@dataclass(frozen=True)
class Keys:
    operator: Ed25519PrivateKey
    public: Ed25519PublicKey
    stranger: Ed25519PrivateKey


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("keys")
    op_key, op_pub = generate_keypair(d, "operator")
    other_key, _ = generate_keypair(d, "stranger")
    return Keys(load_private_key(op_key), load_public_key(op_pub), load_private_key(other_key))


def body(
    ctype: str = "ping", *, target: dict[str, Any] | None = None, issued: float = NOW, **kw: Any
) -> dict[str, Any]:
    doc = make_command(ctype, target or {"device": DEVICE}, now=issued, ttl_s=60.0)
    doc.update(kw)  # may set args, or anything else, to something make_command would not write
    return doc


def parse(raw: bytes, keys: Keys, state: ReplayState, *, now: float = NOW, **kw: Any) -> Command:
    opts: dict[str, Any] = {"device": DEVICE, "group": GROUP, **kw}
    return parse_command(raw, trusted=[keys.public], now=now, state=state, **opts)


def refusal(raw: bytes, keys: Keys, state: ReplayState, **kw: Any) -> CommandRefused:
    with pytest.raises(CommandRefused) as info:
        parse(raw, keys, state, **kw)
    return info.value


# --- the wire format ------------------------------------------------------------------------------


def test_a_signed_command_parses_into_its_fields(keys: Keys, tmp_path: Path) -> None:
    doc = body("config.set", args={"key": "health.interval_s", "value": 5})
    raw = sign_command(doc, keys.operator)
    cmd = parse(raw, keys, ReplayState(tmp_path))
    assert (cmd.id, cmd.type, cmd.issued_at, cmd.expires_at) == (doc["id"], "config.set", NOW, NOW + 60)
    assert cmd.target == {"device": DEVICE} and cmd.args == {"key": "health.interval_s", "value": 5}
    assert cmd.raw == raw and len(cmd.key_id) == 16


def test_canonical_form_is_sorted_compact_utf8_without_sig() -> None:
    assert canonical({"b": 1, "a": "é", "sig": {"x": 1}}) == '{"a":"é","b":1}'.encode()
    with pytest.raises(ValueError):
        canonical({"a": float("nan")})


def test_signing_a_body_that_is_not_plain_json_names_the_command(keys: Keys) -> None:
    with pytest.raises(CommandError, match="c-1"):
        sign_command({"id": "c-1", "x": float("inf")}, keys.operator)


def test_every_target_kind_reaches_the_device_it_names(keys: Keys, tmp_path: Path) -> None:
    state = ReplayState(tmp_path)
    for target in ({"device": DEVICE}, {"group": GROUP}, {"all": True}):
        assert parse(sign_command(body(target=target), keys.operator), keys, state).target == target


def _tampered(keys: Keys) -> bytes:
    doc = json.loads(sign_command(body(args={"n": 1}), keys.operator))
    doc["args"]["n"] = 2
    return json.dumps(doc).encode()


def _bad_signature_bytes(keys: Keys) -> bytes:
    doc = json.loads(sign_command(body(), keys.operator))
    doc["sig"]["signature"] = base64.b64encode(bytes(64)).decode()
    return json.dumps(doc).encode()


REFUSALS: dict[str, Callable[[Keys], bytes]] = {
    "unsigned": lambda k: json.dumps(body()).encode(),
    "bad-signature": _tampered,
    "bad-signature ": _bad_signature_bytes,  # a well-formed signature over other bytes
    "unknown-key": lambda k: sign_command(body(), k.stranger),
    "expired": lambda k: sign_command(body(issued=NOW - 61), k.operator),
    "from-the-future": lambda k: sign_command(body(issued=NOW + 301), k.operator),
    "not-for-this-device": lambda k: sign_command(body(target={"device": "cam-2"}), k.operator),
    "not-for-this-device ": lambda k: sign_command(body(target={"group": "yard"}), k.operator),
    "malformed: not JSON": lambda k: b"\x00{not json",
    "malformed: not UTF-8": lambda k: b"\xff\xfe{}",
    "malformed: not a JSON object": lambda k: b"[1, 2]",
    "malformed: id": lambda k: sign_command(body(id="has space"), k.operator),
    "malformed: type": lambda k: sign_command(body("Ping!"), k.operator),
    "malformed: target": lambda k: sign_command(body(target={"all": False}), k.operator),
    "malformed: args": lambda k: sign_command(body(args=[1]), k.operator),
    "malformed: issued_at": lambda k: sign_command(body(issued_at="yesterday"), k.operator),
    "malformed: expires_at not after issued_at": lambda k: sign_command(body(expires_at=NOW), k.operator),
    "malformed: unknown key 'extra'": lambda k: sign_command(body(extra=1), k.operator),
    "malformed: v (expected 1)": lambda k: sign_command(body(v=2), k.operator),
    "malformed: duplicate key": lambda k: sign_command(body(), k.operator).replace(b'{"args"', b'{"args":{},"args"', 1),
    "malformed: NaN is not JSON": lambda k: sign_command(body(), k.operator).replace(b'"args":{}', b'"args":NaN'),
    "malformed: sig": lambda k: json.dumps({**body(), "sig": "yes"}).encode(),
    "malformed: sig.alg (expected ed25519)": lambda k: json.dumps(
        {**body(), "sig": {"alg": "rsa", "key_id": "0" * 16, "signature": ""}}
    ).encode(),
    "malformed: sig.signature": lambda k: json.dumps(
        {**body(), "sig": {"alg": "ed25519", "key_id": "0" * 16, "signature": "AAAA"}}
    ).encode(),
    "malformed: larger than 65536 bytes": lambda k: sign_command(body(args={"pad": "x" * 70_000}), k.operator),
}


@pytest.mark.parametrize("reason", sorted(REFUSALS))
def test_each_refusal_carries_its_reason_and_the_id(reason: str, keys: Keys, tmp_path: Path) -> None:
    raw = REFUSALS[reason](keys)
    exc = refusal(raw, keys, ReplayState(tmp_path))
    assert exc.reason == reason.strip()
    if reason.startswith("malformed"):  # an id is reported only when the message was readable enough
        assert exc.command_id in (None, _id_of(raw)) and (reason != "malformed: id" or exc.command_id is None)
    else:
        assert exc.command_id == _id_of(raw) is not None


def _id_of(raw: bytes) -> str | None:
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc.get("id") if isinstance(doc, dict) else None


def test_replayed_stale_and_unknown_type_need_state_and_handlers(keys: Keys, tmp_path: Path) -> None:
    state = ReplayState(tmp_path)
    first = sign_command(body(issued=NOW - 10), keys.operator)
    state.accept(parse(first, keys, state))
    assert refusal(first, keys, state).reason == "replayed"
    assert refusal(sign_command(body(issued=NOW - 11), keys.operator), keys, state).reason == "stale"
    assert parse(sign_command(body(issued=NOW - 10), keys.operator), keys, state).issued_at == NOW - 10  # not older
    raw = sign_command(body("model.deploy"), keys.operator)
    assert refusal(raw, keys, state, known_types={"ping"}).reason == "unknown-type"


def test_clock_skew_allowance_is_honoured(keys: Keys, tmp_path: Path) -> None:
    state = ReplayState(tmp_path)
    assert parse(sign_command(body(issued=NOW + 299), keys.operator), keys, state).type == "ping"
    exc = refusal(sign_command(body(issued=NOW + 31), keys.operator), keys, state, max_skew_s=30)
    assert exc.reason == "from-the-future"


def test_version_field_and_lone_surrogates(keys: Keys, tmp_path: Path) -> None:
    state = ReplayState(tmp_path)
    assert parse(sign_command(body(v=1), keys.operator), keys, state).type == "ping"
    raw = sign_command(body(), keys.operator).replace(b'"args":{}', b'"args":{"s":"\\ud800"}')
    assert refusal(raw, keys, state).reason == "malformed: not canonical JSON"  # no signer can write that


def test_a_group_command_does_not_reach_a_device_without_a_group(keys: Keys, tmp_path: Path) -> None:
    raw = sign_command(body(target={"group": GROUP}), keys.operator)
    assert refusal(raw, keys, ReplayState(tmp_path), group="").reason == "not-for-this-device"


# --- replay state ---------------------------------------------------------------------------------


def test_replay_state_survives_a_restart(keys: Keys, tmp_path: Path) -> None:
    state = ReplayState(tmp_path)
    cmd = parse(sign_command(body(issued=NOW - 5), keys.operator), keys, state)
    state.accept(cmd)
    state.finish(cmd.id, {"id": cmd.id, "status": "ok", "result": {"pong": 1}})
    again = ReplayState(tmp_path)  # a new process reading the same state dir
    assert again.seen(cmd.id) and again.final_ack(cmd.id) == {"id": cmd.id, "status": "ok", "result": {"pong": 1}}
    assert again.newest_accepted == NOW - 5
    assert refusal(cmd.raw, keys, again).reason == "replayed"
    assert refusal(sign_command(body(issued=NOW - 6), keys.operator), keys, again).reason == "stale"
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]  # no temporary files left behind


def test_forgotten_ids_stay_refused(keys: Keys, tmp_path: Path) -> None:
    state = ReplayState(tmp_path, max_ids=2, reorder_window_s=100.0)
    cmds = [parse(sign_command(body(issued=NOW - 50 + i), keys.operator), keys, state) for i in range(3)]
    for cmd in cmds:
        state.accept(cmd)
    assert not state.seen(cmds[0].id)
    assert refusal(cmds[0].raw, keys, state).reason == "stale"  # inside the window, but its id was forgotten
    late = sign_command(body(issued=NOW - 48.5), keys.operator)  # reordered, within the window, never seen
    assert parse(late, keys, state).issued_at == NOW - 48.5
    old = sign_command(body(issued=NOW - 200, expires_at=NOW + 60), keys.operator)
    assert refusal(old, keys, state).reason == "stale"


def test_an_unreadable_state_file_refuses_everything_issued_before_it_was_found(keys: Keys, tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text('{"v": 1, "seen": [')
    state = ReplayState(tmp_path, clock=lambda: NOW)
    assert (tmp_path / f"{STATE_FILE}.corrupt").exists()
    assert refusal(sign_command(body(issued=NOW - 1), keys.operator), keys, state).reason == "stale"
    assert parse(sign_command(body(issued=NOW + 1), keys.operator), keys, state).type == "ping"
    assert json.loads((tmp_path / STATE_FILE).read_text())["newest_accepted"] == NOW


@pytest.mark.parametrize("text", ['{"v": 1, "newest_accepted": NaN, "floor": 0, "seen": []}', "[]", "\x00"])
def test_a_state_file_that_is_not_ours_counts_as_unreadable(text: str, tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text(text)
    assert ReplayState(tmp_path, clock=lambda: NOW).is_stale(NOW - 1)


def test_a_huge_result_is_not_kept_in_the_state_file(keys: Keys, tmp_path: Path) -> None:
    state = ReplayState(tmp_path)
    cmd = parse(sign_command(body(), keys.operator), keys, state)
    state.accept(cmd)
    state.finish(cmd.id, {"status": "ok", "result": {"blob": "x" * 100_000}})
    assert (tmp_path / STATE_FILE).stat().st_size < 20_000
    assert "omitted" in ReplayState(tmp_path).final_ack(cmd.id)["result"]  # type: ignore[index]


# --- the channel ------------------------------------------------------------------------------------


class _Handle:
    def wait(self, timeout: float) -> bool:
        return True


@dataclass
class LoopLink:
    """An in-memory link: records publishes, delivers to subscribed handlers by exact topic."""

    published: list[tuple[str, bytes]] = field(default_factory=list)
    subscribed: dict[str, Callable[[Any], None]] = field(default_factory=dict)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> _Handle:
        self.published.append((topic, payload))
        return _Handle()

    def subscribe(self, topic_filter: str, handler: Callable[[Any], None], *, qos: int = 1) -> None:
        self.subscribed[topic_filter] = handler

    def acks(self) -> list[dict[str, Any]]:
        return [json.loads(p) for t, p in self.published if t.endswith("/cmd/ack")]


@dataclass(frozen=True)
class _Msg:
    topic: str
    payload: bytes


def channel(keys: Keys, state_dir: Path, handlers: dict[str, Any], link: LoopLink | None = None) -> CommandChannel:
    return CommandChannel(
        link or LoopLink(),
        fleet=FLEET,
        device=DEVICE,
        group=GROUP,
        trusted_keys=[keys.public],
        state_dir=state_dir,
        handlers=handlers,
        clock=lambda: NOW,
    )


def test_a_command_runs_once_and_a_repeat_gets_the_same_ack(keys: Keys, tmp_path: Path) -> None:
    runs: list[str] = []

    def count(cmd: Command) -> dict[str, Any]:
        runs.append(cmd.id)
        return {"n": len(runs)}

    link = LoopLink()
    ch = channel(keys, tmp_path, {"ping": count}, link)
    raw = sign_command(body(), keys.operator)
    (ack,) = ch.process(raw)
    assert ack["status"] == "ok" and ack["result"] == {"n": 1} and ack["device"] == DEVICE and ack["type"] == "ping"
    assert ch.process(raw) == [ack]
    restarted = channel(keys, tmp_path, {"ping": count}, link)  # same state dir: the id is still known
    assert restarted.process(raw) == [ack]
    assert runs == [ack["id"]]
    assert link.acks() == [ack, ack, ack]
    assert all(t == f"edge/{FLEET}/{DEVICE}/cmd/ack" for t, _ in link.published)


def test_an_id_accepted_but_never_finished_is_refused_as_replayed(keys: Keys, tmp_path: Path) -> None:
    raw = sign_command(body(), keys.operator)
    ReplayState(tmp_path).accept(parse(raw, keys, ReplayState(tmp_path)))  # the process died while running it
    (ack,) = channel(keys, tmp_path, {"ping": ping_handler()}).process(raw)
    assert (ack["status"], ack["reason"]) == ("refused", "replayed")


def test_refusals_are_acked_and_the_channel_keeps_answering(keys: Keys, tmp_path: Path) -> None:
    link = LoopLink()
    ch = channel(keys, tmp_path, {"ping": ping_handler()}, link)
    for raw in (b"", b"{", json.dumps(body()).encode(), sign_command(body(), keys.stranger)):
        (ack,) = ch.process(raw)
        assert ack["status"] == "refused" and ack["reason"]
    (ack,) = ch.process(sign_command(body("ping"), keys.operator))
    assert ack["status"] == "ok" and set(ack["result"]) == {"pong", "uptime_s"}
    assert ch.counts["refused"] == 4 and ch.counts["ok"] == 1


def test_unsigned_refusal_names_the_type_when_it_can(keys: Keys, tmp_path: Path) -> None:
    (ack,) = channel(keys, tmp_path, {}).process(json.dumps(body("status")).encode())
    assert (ack["type"], ack["reason"]) == ("status", "unsigned")


def test_a_raising_handler_is_an_error_ack_and_not_the_end(keys: Keys, tmp_path: Path) -> None:
    def broken(cmd: Command) -> dict[str, Any]:
        raise RuntimeError("disk on fire")

    def not_a_dict(cmd: Command) -> dict[str, Any]:
        return [1, 2]  # type: ignore[return-value]

    ch = channel(keys, tmp_path, {"status": broken, "ping": ping_handler(), "odd": not_a_dict})
    (ack,) = ch.process(sign_command(body("status"), keys.operator))
    assert ack["status"] == "error" and ack["reason"] == "RuntimeError: disk on fire"
    (ack,) = ch.process(sign_command(body("odd"), keys.operator))
    assert ack["status"] == "error" and "not a JSON object" in ack["reason"]
    (ack,) = ch.process(sign_command(body("ping"), keys.operator))
    assert ack["status"] == "ok"


def test_long_running_types_are_accepted_first(keys: Keys, tmp_path: Path) -> None:
    order: list[str] = []
    link = LoopLink()

    def deploy(cmd: Command) -> dict[str, Any]:
        order.append(f"run after {len(link.acks())} ack(s)")
        return {"deployed": cmd.args["version"]}

    ch = channel(keys, tmp_path, {"ping": ping_handler()}, link)
    raw = sign_command(body("model.deploy", args={"version": "2"}), keys.operator)
    (ack,) = ch.process(raw)
    assert (ack["status"], ack["reason"]) == ("refused", "unknown-type")  # a placeholder until the hook is set
    ch.handlers["model.deploy"] = deploy
    accepted, final = ch.process(raw)  # refused ids are not recorded: the same command runs once plugged in
    assert [accepted["status"], final["status"]] == ["accepted", "ok"] and final["result"] == {"deployed": "2"}
    assert order == ["run after 2 ack(s)"]


def test_restart_happens_after_the_ack_and_never_on_a_repeat(keys: Keys, tmp_path: Path) -> None:
    link = LoopLink()
    restarts: list[int] = []
    ch = channel(keys, tmp_path, {"service.restart": RestartHandler(lambda: restarts.append(len(link.acks())))}, link)
    raw = sign_command(body("service.restart"), keys.operator)
    (final,) = ch.process(raw)
    assert (final["status"], final["result"]) == ("ok", {"restarting": True})
    assert restarts == [1]  # the ack was out before the restart was requested
    assert ch.process(raw) == [final] and restarts == [1]


def test_the_worker_thread_handles_subscribed_topics_and_stops_on_close(keys: Keys, tmp_path: Path) -> None:
    link = LoopLink()
    ch = channel(keys, tmp_path, {"ping": ping_handler()}, link)
    ch.start()
    try:
        assert sorted(link.subscribed) == sorted(
            [f"edge/{FLEET}/{DEVICE}/cmd", f"edge/{FLEET}/group/{GROUP}/cmd", f"edge/{FLEET}/all/cmd"]
        )
        assert any(t.name == "edge-commands" and t.daemon for t in threading.enumerate())
        for i, target in enumerate(({"device": DEVICE}, {"group": GROUP}, {"all": True})):
            topic = sorted(link.subscribed)[i]
            link.subscribed[topic](_Msg(topic, sign_command(body(target=target), keys.operator)))
        deadline = time.monotonic() + 5
        while len(link.acks()) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [a["status"] for a in link.acks()] == ["ok"] * 3
    finally:
        started = time.monotonic()
        ch.close()
    assert time.monotonic() - started < 1.0
    assert not any(t.name == "edge-commands" for t in threading.enumerate())


# --- hypothesis: nothing but a Command or a CommandRefused, whatever arrives ---------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
FIELDS = st.sampled_from(["id", "type", "issued_at", "expires_at", "target", "args", "sig", "v", "other"])
HYP = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _outcome(raw: bytes, keys: Keys, state: ReplayState) -> Command | CommandRefused:
    try:
        return parse(raw, keys, state)
    except CommandRefused as exc:
        assert exc.reason and len(exc.reason) < 100
        return exc


@HYP
@given(raw=st.binary(max_size=512))
def test_arbitrary_bytes_are_refused_cleanly(raw: bytes, keys: Keys, tmp_path: Path) -> None:
    assert isinstance(_outcome(raw, keys, ReplayState(tmp_path)), CommandRefused)


@HYP
@given(doc=st.dictionaries(FIELDS, JSON, max_size=9))
def test_arbitrary_json_objects_are_refused_cleanly(doc: dict[str, Any], keys: Keys, tmp_path: Path) -> None:
    raw = json.dumps(doc).encode()
    assert isinstance(_outcome(raw, keys, ReplayState(tmp_path)), CommandRefused)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=256) | st.dictionaries(FIELDS, JSON, max_size=9).map(lambda d: json.dumps(d).encode()))
def test_the_channel_answers_any_payload_with_one_refusal(raw: bytes, keys: Keys, tmp_path: Path) -> None:
    link = LoopLink()
    acks = channel(keys, tmp_path, {"ping": ping_handler()}, link).process(raw)
    assert len(acks) == 1 and acks[0]["status"] == "refused" and link.acks() == acks


MUTATIONS = st.one_of(
    st.tuples(st.just("set"), FIELDS, JSON),
    st.tuples(st.just("drop"), FIELDS, st.none()),
    st.tuples(st.just("sig"), st.sampled_from(["alg", "key_id", "signature", "extra"]), JSON),
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
)


@HYP
@given(mutation=MUTATIONS)
def test_a_mutated_signed_command_is_never_accepted_with_other_content(
    mutation: tuple[str, Any, Any], keys: Keys, tmp_path: Path
) -> None:
    original = body(args={"key": "a", "n": [1, 2.5]})
    raw = sign_command(original, keys.operator)
    kind, where, what = mutation
    if kind == "flip":
        data = bytearray(raw)
        data[where % len(data)] ^= what
        mutated = bytes(data)
    else:
        doc = json.loads(raw)
        if kind == "set":
            doc[where] = what
        elif kind == "drop":
            doc.pop(where, None)
        else:
            doc["sig"][where] = what
        mutated = json.dumps(doc).encode()
    outcome = _outcome(mutated, keys, ReplayState(tmp_path))
    if isinstance(outcome, Command):  # only a change that leaves the signed content alone may pass
        assert canonical(json.loads(outcome.raw)) == canonical(original)


# --- built-in handlers ------------------------------------------------------------------------------


def _cmd(ctype: str, args: dict[str, Any]) -> Command:
    return Command("c1", ctype, NOW, NOW + 60, {"all": True}, args, "0" * 16, b"")


def _config(tmp_path: Path) -> ServiceConfig:
    return ServiceConfig(bundle="/b", trusted_keys=("/k.pub",), state_dir=str(tmp_path))


def test_config_set_validates_persists_and_applies(tmp_path: Path) -> None:
    applied: list[tuple[ServiceConfig, str]] = []
    handler = config_set_handler(lambda: _config(tmp_path), tmp_path, apply=lambda c, k: bool(applied.append((c, k))))
    result = handler(_cmd("config.set", {"key": "health.interval_s", "value": 5}))
    assert result == {"key": "health.interval_s", "value": 5, "applied_live": False, "restart_needed": True}
    assert read_overrides(tmp_path) == {"health": {"interval_s": 5}}
    assert applied[0][0].health.interval_s == 5.0 and applied[0][1] == "health.interval_s"
    live = config_set_handler(lambda: _config(tmp_path), tmp_path, apply=lambda c, k: True)
    assert live(_cmd("config.set", {"key": "log-level", "value": "debug"}))["applied_live"] is True
    assert read_overrides(tmp_path) == {"health": {"interval_s": 5}, "log_level": "debug"}
    merged = merge_overrides({"health": {"interval_s": 10.0, "min_fps": 1.0}}, read_overrides(tmp_path))
    assert merged == {"health": {"interval_s": 5, "min_fps": 1.0}, "log_level": "debug"}


@pytest.mark.parametrize(
    ("args", "named"),
    [
        ({"key": "health.bogus", "value": 1}, "health.bogus"),
        ({"key": "health.interval_s", "value": "often"}, "health.interval_s"),
        ({"key": "threads.inference", "value": 999}, "threads.inference"),
        ({"key": "nosuch", "value": 1}, "nosuch"),
        ({"key": "nosuch.key", "value": 1}, "nosuch.key"),
        ({"key": "health", "value": {}}, "health"),
        ({"key": "trusted_keys", "value": ["/evil.pub"]}, "trusted_keys"),
        ({"key": "a.b.c", "value": 1}, "args.key"),
        ({"key": "health.interval_s"}, "args.value"),
        ({"key": "health.interval_s", "value": 1, "x": 2}, "args.x"),
    ],
)
def test_config_set_refuses_a_bad_key_or_value_naming_it(args: dict[str, Any], named: str, tmp_path: Path) -> None:
    handler = config_set_handler(lambda: _config(tmp_path), tmp_path)
    with pytest.raises(CommandError) as info:
        handler(_cmd("config.set", args))
    assert named in str(info.value)
    assert not (tmp_path / OVERRIDE_FILE).exists()


def test_config_set_checks_against_earlier_remote_settings(tmp_path: Path) -> None:
    handler = config_set_handler(lambda: _config(tmp_path), tmp_path)
    handler(_cmd("config.set", {"key": "logbook.soft_cap_mb", "value": 400}))
    with pytest.raises(CommandError, match="hard_cap_mb"):  # 300 < the soft cap set a moment ago
        handler(_cmd("config.set", {"key": "logbook.hard_cap_mb", "value": 300}))
    assert read_overrides(tmp_path) == {"logbook": {"soft_cap_mb": 400}}


def test_a_damaged_override_file_is_named(tmp_path: Path) -> None:
    (tmp_path / OVERRIDE_FILE).write_text("[1]")
    with pytest.raises(ConfigError, match=OVERRIDE_FILE):
        read_overrides(tmp_path)


def test_config_set_through_the_channel_acks_error_naming_the_key(keys: Keys, tmp_path: Path) -> None:
    ch = channel(keys, tmp_path, {"config.set": config_set_handler(lambda: _config(tmp_path), tmp_path)})
    (ack,) = ch.process(sign_command(body("config.set", args={"key": "http.port", "value": -1}), keys.operator))
    assert ack["status"] == "error" and "http.port" in ack["reason"]


def test_ping_and_status_handlers() -> None:
    result = ping_handler(started_monotonic=time.monotonic() - 2, clock=lambda: NOW)(_cmd("ping", {}))
    assert result["pong"] == NOW and 2 <= result["uptime_s"] < 60
    assert status_handler(lambda: {"model": "m"})(_cmd("status", {})) == {"model": "m"}


def test_logs_request_publishes_a_logbook_slice_in_chunks(tmp_path: Path) -> None:
    sent: list[bytes] = []

    def publish(payload: bytes) -> _Handle:
        sent.append(payload)
        return _Handle()

    with Logbook(LogbookConfig(path=tmp_path / "log.sqlite"), device_id=DEVICE) as book:
        for i in range(50):
            book.record_event("tick", f"event {i} " + "x" * 200, ts=NOW + i)
        book.record_metric("temp", 50.0, ts=NOW + 100)
        book.flush()
        handler = logs_handler(book.export, publish, chunk_bytes=2000)
        result = handler(_cmd("logs.request", {"since": NOW + 10, "table": "events", "limit": 30}))
        chunks = [json.loads(p) for p in sent]
        assert result == {
            "table": "events",
            "since": NOW + 10,
            "rows": 30,
            "chunks": len(chunks),
            "truncated": True,
            "acked": True,
        }
        rows = [r for c in chunks for r in c["rows"]]
        assert [r["message"].split()[1] for r in rows] == [str(i) for i in range(10, 40)]
        assert len(chunks) > 1 and all(c["chunks"] == len(chunks) and c["id"] == "c1" for c in chunks)
        assert [c["chunk"] for c in chunks] == list(range(len(chunks)))
        sent.clear()
        assert handler(_cmd("logs.request", {"since": NOW + 1000}))["rows"] == 0
        assert json.loads(sent[0])["rows"] == []
        with pytest.raises(CommandError, match=r"args\.table"):
            handler(_cmd("logs.request", {"table": "secrets"}))
        with pytest.raises(CommandError, match=r"args\.limit"):
            handler(_cmd("logs.request", {"limit": 0}))
