"""Escalation: the circuit breaker on a fake clock, the wire format, and the escalator's decisions."""

from __future__ import annotations

import base64
import io
import json
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.errors import ConfigError
from runtime.escalate import (
    CircuitBreaker,
    EscalationError,
    Escalator,
    apply_escalation,
    decode_request,
    decode_response,
    encode_image,
    encode_request,
    encode_response,
)
from runtime.link import Message


class FakeClock:
    """Monotonic seconds that move only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- circuit breaker ------------------------------------------------------------------------------


def test_breaker_opens_after_n_failures_in_a_row_only():
    clock = FakeClock()
    b = CircuitBreaker(failures=3, reset_after_s=10, clock=clock)
    b.record_failure()
    b.record_failure()
    b.record_success()  # a success in between resets the count
    b.record_failure()
    b.record_failure()
    assert b.state == "closed" and b.allow()
    b.record_failure()
    assert b.state == "open" and b.stats()["opened"] == 1
    assert not b.allow() and not b.allow()
    assert b.stats()["rejected"] == 2
    assert b.retry_in_s() == pytest.approx(10.0)


def test_breaker_half_opens_after_reset_with_one_trial_that_closes_it():
    clock = FakeClock()
    b = CircuitBreaker(failures=1, reset_after_s=5, clock=clock)
    b.record_failure()
    clock.advance(4.999)
    assert b.state == "open" and not b.allow()
    clock.advance(0.002)
    assert b.state == "half-open" and b.retry_in_s() == 0.0
    assert b.allow()  # the one trial
    assert not b.allow()  # no second request while the trial is out
    b.record_success()
    assert b.state == "closed" and b.allow() and b.allow()
    assert b.stats()["consecutive_failures"] == 0


def test_a_failed_trial_opens_the_breaker_for_another_full_period():
    clock = FakeClock()
    b = CircuitBreaker(failures=2, reset_after_s=5, clock=clock)
    b.record_failure()
    b.record_failure()
    clock.advance(6)
    assert b.allow()
    clock.advance(1.5)  # the trial took a while
    b.record_failure()  # one failure is enough in half-open
    assert b.state == "open" and b.retry_in_s() == pytest.approx(5.0) and b.stats()["opened"] == 2
    clock.advance(5)
    assert b.state == "half-open" and b.allow()


def test_half_open_grants_exactly_one_trial_across_threads():
    clock = FakeClock()
    b = CircuitBreaker(failures=1, reset_after_s=1, clock=clock)
    b.record_failure()
    clock.advance(1)
    grants: list[bool] = []
    barrier = threading.Barrier(8)

    def ask() -> None:
        barrier.wait()
        grants.append(b.allow())

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(grants) == [False] * 7 + [True]


@pytest.mark.parametrize(
    ("failures", "reset", "key"),
    [
        (0, 1.0, "breaker_failures"),
        (True, 1.0, "breaker_failures"),
        (3, 0, "breaker_reset_s"),
        (3, -1, "breaker_reset_s"),
    ],
)
def test_breaker_rejects_bad_settings_naming_the_key(failures, reset, key):
    with pytest.raises(ConfigError, match=key):
        CircuitBreaker(failures, reset)


# --- wire format ----------------------------------------------------------------------------------


def test_a_tensor_request_round_trips_as_npy():
    tensor = np.arange(64, dtype=np.float32).reshape(1, 1, 8, 8)
    local = {"model": "digits", "version": "1.0.0", "top1": {"index": 3, "label": "3", "score": 0.4}, "outputs": {}}
    raw = encode_request(device="dev-1", model="digits-xl", payload=tensor, local=local, timeout_s=1.5)
    req = decode_request(raw)
    assert (req.device, req.model, req.kind, req.timeout_ms) == ("dev-1", "digits-xl", "tensor", 1500)
    np.testing.assert_array_equal(np.load(io.BytesIO(req.data), allow_pickle=False), tensor)
    assert req.local == {k: local[k] for k in ("model", "version", "top1")}  # outputs are not sent


def test_an_image_request_carries_its_content_type():
    image = np.full((12, 10, 3), 200, dtype=np.uint8)
    png = encode_image(image)
    req = decode_request(encode_request(device="d", model="m", payload=png, local={}, timeout_s=1))
    assert req.kind == "image" and req.content_type == "image/png" and req.data == png


def test_encode_image_falls_back_to_jpeg_when_the_png_is_too_big():
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    small = encode_image(noise, max_bytes=64 * 1024)
    assert small.startswith(b"\xff\xd8\xff") and encode_image(noise).startswith(b"\x89PNG")


def test_request_size_cap_and_bad_fields_are_clean_errors():
    raw = encode_request(device="d", model="m", payload=np.zeros(1000, np.float32), local={}, timeout_s=1)
    with pytest.raises(EscalationError, match="cap"):
        decode_request(raw, max_bytes=len(raw) - 1)
    doc = json.loads(raw)
    for change, needle in (
        ({"v": 2}, "version"),
        ({"device": "all"}, "reserved"),
        ({"model": "a/b"}, "model"),
        ({"input": {"npy_b64": "!!"}}, "base64"),
        ({"input": {"npy_b64": "AA==", "image_b64": "AA=="}}, "exactly one"),
        ({"timeout_ms": 0}, "timeout_ms"),
        ({"local": []}, "local"),
    ):
        with pytest.raises(EscalationError, match=needle):
            decode_request(json.dumps({**doc, **change}).encode())


def test_response_round_trip_and_error_answers():
    ok = decode_response(encode_response({"top1": {"score": 0.9}}, model="m", version="2.0.0", worker="w1"))
    assert ok.result == {"top1": {"score": 0.9}} and ok.error is None and (ok.version, ok.worker) == ("2.0.0", "w1")
    bad = decode_response(encode_response(None, model="m", version="2.0.0", error="input does not fit"))
    assert bad.result is None and bad.error == "input does not fit" and bad.worker is None
    with pytest.raises(EscalationError):
        decode_response(b'{"v": 1, "model": "m", "version": "1", "result": {}, "error": "both"}')
    with pytest.raises(ValueError):
        encode_response(None, model="m", version="1")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_fail_cleanly(raw):
    for decode in (decode_request, decode_response):
        try:
            decode(raw)
        except EscalationError:
            pass


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
_request_like = st.fixed_dictionaries(
    {},
    optional={
        "v": st.sampled_from([1, 1, 2, "1", None]),
        "device": st.sampled_from(["dev-1", "", "all", "a/b", 7]) | st.text(max_size=70),
        "model": st.sampled_from(["m", "", "+", None]),
        "input": _json_values
        | st.fixed_dictionaries(
            {},
            optional={
                "npy_b64": st.sampled_from(["AA==", "", "!!", 3]),
                "image_b64": st.sampled_from(["AA==", "", None]),
                "content_type": _json_values,
            },
        ),
        "local": _json_values,
        "timeout_ms": _json_values,
        "result": _json_values,
        "error": _json_values,
        "version": _json_values,
        "worker": _json_values,
    },
)


@settings(max_examples=400, deadline=None)
@given(_request_like)
def test_arbitrary_json_objects_decode_or_fail_cleanly(doc):
    raw = json.dumps(doc).encode()
    for decode in (decode_request, decode_response):
        try:
            decode(raw)
        except EscalationError:
            pass


# --- the escalator, against a scripted link ---------------------------------------------------------


class ScriptedLink:
    """Stands in for runtime.link.Link: answers requests from a script and records what was asked."""

    def __init__(self, answers: list[bytes | None], *, protocol: str = "mqtt5", connected: bool = True) -> None:
        self.answers = answers
        self.protocol_in_use = protocol
        self.connected = connected
        self.sent: list[tuple[str, bytes, str, float]] = []

    def request(
        self, topic: str, payload: bytes, *, response_topic: str, timeout: float, qos: int = 1
    ) -> Message | None:
        self.sent.append((topic, payload, response_topic, timeout))
        answer = self.answers.pop(0) if self.answers else None
        return None if answer is None else Message(response_topic, answer, 1, False, {})


def _escalator(link: ScriptedLink, clock: FakeClock, **kw) -> Escalator:
    defaults = {"model": "big", "threshold": 0.8, "timeout_s": 0.5, "breaker": CircuitBreaker(2, 10, clock=clock)}
    return Escalator(link, fleet="f", device="dev-1", clock=clock, **{**defaults, **kw})


LOW = {"top1": {"index": 1, "label": "1", "score": 0.3}, "model": "digits", "version": "1.0.0"}
HIGH = {"top1": {"index": 1, "label": "1", "score": 0.95}}
TENSOR = np.zeros((1, 1, 8, 8), np.float32)
ANSWER = encode_response({"top1": {"index": 7, "label": "seven", "score": 0.99}}, model="big", version="2.0.0")


def test_only_low_confidence_classifier_results_are_escalated():
    clock = FakeClock()
    link = ScriptedLink([ANSWER])
    esc = _escalator(link, clock)
    assert esc.maybe_escalate(HIGH, TENSOR) is None
    assert esc.maybe_escalate({"dense": {"mean": 0.1}}, TENSOR) is None
    assert esc.maybe_escalate({"top1": {"score": float("nan")}}, TENSOR) is None
    out = esc.maybe_escalate(LOW, TENSOR)
    assert out is not None and out["status"] == "answered" and out["server"]["top1"]["label"] == "seven"
    assert out["version"] == "2.0.0" and out["latency_ms"] >= 0
    topic, body, response_topic, timeout = link.sent[0]
    assert (topic, response_topic) == ("edge/f/escalate/big", "edge/f/dev-1/escalate/resp")
    assert 0 < timeout <= 0.5 and json.loads(body)["local"]["top1"]["score"] == 0.3
    record = apply_escalation(LOW, out)
    assert record["final"] == "server" and record["top1"] == LOW["top1"]  # the local result stays beside it


def test_timeouts_open_the_breaker_and_then_nothing_is_sent_until_the_trial():
    clock = FakeClock()
    link = ScriptedLink([None, None, None, ANSWER])
    esc = _escalator(link, clock)
    assert [esc.escalate(LOW, TENSOR)["status"] for _ in range(2)] == ["timeout", "timeout"]
    blocked = esc.escalate(LOW, TENSOR)
    assert blocked["status"] == "circuit-open" and blocked["retry_in_s"] == pytest.approx(10.0)
    assert apply_escalation(LOW, blocked)["final"] == "local"
    assert len(link.sent) == 2
    clock.advance(10)
    assert esc.escalate(LOW, TENSOR)["status"] == "timeout"  # the trial fails: open again
    assert esc.escalate(LOW, TENSOR)["status"] == "circuit-open" and len(link.sent) == 3
    clock.advance(10)
    assert esc.escalate(LOW, TENSOR)["status"] == "answered" and esc.breaker.state == "closed"
    stats = esc.stats()
    assert (stats["sent"], stats["timeout"], stats["circuit-open"], stats["answered"]) == (4, 3, 2, 1)


def test_mqtt311_is_unsupported_and_leaves_the_breaker_closed():
    clock = FakeClock()
    link = ScriptedLink([], protocol="mqtt311")
    esc = _escalator(link, clock)
    outs = [esc.escalate(LOW, TENSOR) for _ in range(5)]
    assert {o["status"] for o in outs} == {"unsupported"} and not link.sent
    assert esc.breaker.state == "closed" and esc.breaker.stats()["consecutive_failures"] == 0


def test_server_errors_keep_the_breaker_closed_but_garbage_counts_as_failure():
    clock = FakeClock()
    refusal = encode_response(None, model="big", version="2.0.0", error="input does not fit")
    link = ScriptedLink([refusal, refusal, refusal, b"not json", b'{"v": 1}'])
    esc = _escalator(link, clock)
    outs = [esc.escalate(LOW, TENSOR) for _ in range(3)]
    assert all(o["status"] == "error" and "does not fit" in o["reason"] for o in outs)
    assert esc.breaker.state == "closed"
    assert esc.escalate(LOW, TENSOR)["reason"].startswith("unreadable answer")
    esc.escalate(LOW, TENSOR)
    assert esc.breaker.state == "open"


def test_offline_and_oversized_requests_send_nothing():
    clock = FakeClock()
    offline = ScriptedLink([ANSWER], connected=False)
    esc = _escalator(offline, clock)
    out = esc.escalate(LOW, TENSOR)
    assert out["status"] == "error" and "not connected" in out["reason"] and not offline.sent
    link = ScriptedLink([ANSWER])
    small = _escalator(link, clock, max_request_bytes=8192)
    big = small.escalate(LOW, np.zeros((64, 64), np.float32))
    assert big["status"] == "error" and "cap" in big["reason"] and not link.sent
    assert small.breaker.stats()["consecutive_failures"] == 0  # the server is not to blame


@pytest.mark.parametrize(
    ("kw", "key"),
    [({"threshold": float("inf")}, "threshold"), ({"timeout_s": 0}, "timeout_s"), ({"model": "a+b"}, "model")],
)
def test_escalator_rejects_bad_settings_naming_the_key(kw, key):
    clock = FakeClock()
    with pytest.raises(ConfigError, match=key):
        _escalator(ScriptedLink([]), clock, **kw)


def test_request_body_holds_the_input_bytes_unchanged():
    clock = FakeClock()
    link = ScriptedLink([ANSWER])
    png = encode_image(np.zeros((8, 8), np.uint8))
    _escalator(link, clock).escalate(LOW, png)
    doc = json.loads(link.sent[0][1])
    assert base64.b64decode(doc["input"]["image_b64"]) == png and doc["input"]["content_type"] == "image/png"
