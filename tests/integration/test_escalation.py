"""Escalation on a real broker: low-confidence results answered by `toolchain fleet serve-model`, and the breaker.

The device side is the runtime's own :class:`~runtime.escalate.Escalator` on a real
:class:`~runtime.link.Link`, next to the real digits bundle (INT8, 1.0.0); the server is a
`toolchain fleet serve-model` process running another build of the same network (FP32, 2.0.0, with
word labels), so an answer from the server cannot be mistaken for the local one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.broker import Broker, Collector, broker_fixture  # noqa: F401  (registers the `broker` fixture)
from tests.conftest import REPO, run_cli
from tests.integration.test_runtime import _val_files

FLEET = "plant"
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
REQUESTS = f"edge/{FLEET}/escalate/digits"
RESPONSES = f"edge/{FLEET}/dev-1/escalate/resp"


@pytest.fixture(scope="module")
def server_bundle(digits_model, digits_dirs, keys, tmp_path_factory):
    """The same digits network built FP32 for x86-64 as version 2.0.0 with word labels: the 'bigger' model."""
    from runtime.profile import load_profile
    from toolchain.pipeline import BuildRequest, build

    _, weights, _ = digits_model
    calib, val = digits_dirs
    res = build(
        BuildRequest(
            model="toolchain.examples:digits_cnn",
            weights=weights,
            input_shapes=((1, 1, 8, 8),),
            profile=load_profile("x86-64"),
            output_dir=tmp_path_factory.mktemp("server-dist"),
            key=keys[0],
            calibration=str(calib),
            validation=str(val),
            name="digits",
            version="2.0.0",
            quantize="none",
            labels=WORDS,
            bench_iterations=0,
        )
    )
    assert res.bundle is not None
    return res.bundle


def _load(path: Path, public_key: Path) -> Any:
    from runtime.engine import EngineOptions
    from runtime.model import load_model
    from runtime.signing import load_public_key

    return load_model(path, trusted_keys=[load_public_key(public_key)], options=EngineOptions())


@pytest.fixture(scope="module")
def local_model(bundle, keys):
    """The device's model: the INT8 digits bundle 1.0.0."""
    model = _load(bundle[0], keys[1])
    yield model
    model.close()


class ServeModel:
    """A `toolchain fleet serve-model` process; ``wait_ready`` waits for its 'answering' line."""

    def __init__(self, broker: Broker, bundle: Path, key: Path, client_id: str) -> None:
        self.client_id = client_id
        args = ["fleet", "serve-model", "--bundle", str(bundle), "--trusted-key", str(key)]
        args += ["--broker", f"127.0.0.1:{broker.port}", "--fleet", FLEET, "--client-id", client_id, "--json"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "toolchain", *args],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.err: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)
            if "answering" in line:
                self._ready.set()

    def wait_ready(self, timeout: float = 60.0) -> ServeModel:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"serve-model did not come up: {''.join(self.err)}")
        return self

    def kill(self) -> None:
        """SIGKILL: no goodbye to the broker beyond the closed socket."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._reader.join(timeout=5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()

    def stop(self) -> dict[str, Any]:
        """SIGTERM, and the counters it prints (--json)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()
        self.proc.wait(timeout=30)
        self.kill()  # closes the pipes
        assert self.proc.returncode == 0, "".join(self.err)
        stats: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return stats


@contextlib.contextmanager
def serving(broker: Broker, bundle: Path, key: Path, client_id: str = "server-a") -> Iterator[ServeModel]:
    server = ServeModel(broker, bundle, key, client_id).wait_ready()
    try:
        yield server
    finally:
        server.kill()


@contextlib.contextmanager
def device_link(broker: Broker, protocol: str = "mqtt5") -> Iterator[Any]:
    from runtime.link import Link, LinkConfig

    link = Link(LinkConfig(client_id=f"edge-{FLEET}-dev-1", port=broker.port, protocol=protocol, session_expiry_s=0))
    link.start()
    try:
        assert link.wait_connected(10)
        yield link
    finally:
        link.stop()


def _escalator(link: Any, *, threshold: float = 1.01, timeout_s: float = 2.0, failures: int = 3, reset_s: float = 30):
    from runtime.escalate import CircuitBreaker, Escalator

    breaker = CircuitBreaker(failures, reset_s)
    return Escalator(
        link, fleet=FLEET, device="dev-1", model="digits", threshold=threshold, timeout_s=timeout_s, breaker=breaker
    )


def _local(model: Any, image: np.ndarray) -> dict[str, Any]:
    """What the service logs for one image before escalation."""
    record: dict[str, Any] = model.run(model.tensor_from_image(image), ref="test").to_dict()
    record.update(model=model.name, version=model.version)
    return record


def _image(digits_dirs: Any, n: int = 0) -> np.ndarray:
    from runtime.preprocess import load_image

    return load_image(_val_files(digits_dirs[1])[n])


def _requests(collector: Collector) -> int:
    return sum(1 for m in collector.messages if m.topic == REQUESTS)


# --- tests ----------------------------------------------------------------------------------------


def test_low_confidence_inputs_get_the_servers_answer(broker, local_model, server_bundle, keys, digits_dirs):
    from runtime.escalate import apply_escalation, encode_image

    digit = _image(digits_dirs)
    blank = np.zeros_like(digit)
    sure, unsure = _local(local_model, digit), _local(local_model, blank)
    assert unsure["top1"]["score"] < sure["top1"]["score"]  # a blank image is no digit the model knows well
    threshold = (unsure["top1"]["score"] + sure["top1"]["score"]) / 2
    server_model = _load(server_bundle, keys[1])
    try:
        expected = server_model.run(server_model.tensor_from_image(blank)).to_dict()["top1"]
    finally:
        server_model.close()
    with (
        Collector(broker, [REQUESTS, RESPONSES], client_id="spy") as spy,
        serving(broker, server_bundle, keys[1]),
        device_link(broker) as link,
    ):
        esc = _escalator(link, threshold=threshold)
        assert esc.maybe_escalate(sure, encode_image(digit)) is None  # confident: nothing is asked
        out = esc.maybe_escalate(unsure, encode_image(blank))
        assert out is not None and out["status"] == "answered", out
        record = apply_escalation(unsure, out)
        assert record["final"] == "server" and record["top1"] == unsure["top1"]  # both results in one record
        server = record["escalation"]
        assert (server["model"], server["version"], server["worker"]) == ("digits", "2.0.0", "server-a")
        assert server["server"]["top1"]["label"] in WORDS
        assert server["server"]["top1"]["index"] == expected["index"]
        assert server["server"]["top1"]["score"] == pytest.approx(expected["score"], abs=1e-5)
        tensor = next(iter(local_model.tensor_from_image(blank).values()))
        as_tensor = esc.escalate(unsure, tensor)  # the preprocessed tensor (npy) instead of the image
        assert as_tensor["status"] == "answered" and as_tensor["server"]["top1"]["index"] == expected["index"]
        assert spy.wait(lambda ms: sum(m.topic == RESPONSES for m in ms) == 2, 5)
        requests = [m for m in spy.messages if m.topic == REQUESTS]
        assert len(requests) == 2
        assert all(
            m.properties.get("ResponseTopic") == RESPONSES and m.properties.get("CorrelationData") for m in requests
        )
        assert json.loads(requests[0].payload)["local"]["top1"] == unsure["top1"]


def test_without_a_server_the_local_answer_comes_within_the_timeout_and_the_breaker_opens(
    broker, local_model, server_bundle, keys, digits_dirs
):
    from runtime.escalate import apply_escalation

    image = _image(digits_dirs)
    record = _local(local_model, image)
    tensor = next(iter(local_model.tensor_from_image(image).values()))
    timeout, reset = 1.0, 3.0
    with Collector(broker, REQUESTS, client_id="spy") as spy, device_link(broker) as link:
        esc = _escalator(link, timeout_s=timeout, failures=3, reset_s=reset)
        server = ServeModel(broker, server_bundle, keys[1], "server-a").wait_ready()
        assert esc.escalate(record, tensor)["status"] == "answered"
        server.kill()
        for _ in range(3):
            t0 = time.monotonic()
            out = esc.escalate(record, tensor)
            elapsed = time.monotonic() - t0
            assert out["status"] == "timeout" and timeout <= elapsed < timeout + 0.75, (out, elapsed)
            kept = apply_escalation(record, out)
            assert kept["final"] == "local" and kept["top1"] == record["top1"]
        assert esc.breaker.state == "open"
        assert spy.wait(lambda ms: len(ms) == 4, 5)
        for _ in range(5):
            t0 = time.monotonic()
            assert esc.escalate(record, tensor)["status"] == "circuit-open"
            assert time.monotonic() - t0 < 0.2
        time.sleep(0.5)
        assert _requests(spy) == 4  # an open breaker publishes nothing
        time.sleep(reset)
        assert esc.breaker.state == "half-open"
        assert esc.escalate(record, tensor)["status"] == "timeout"  # the one trial, still no server
        assert spy.wait(lambda ms: len(ms) == 5, 5)
        assert esc.escalate(record, tensor)["status"] == "circuit-open"
        with serving(broker, server_bundle, keys[1], "server-b"):
            time.sleep(max(0.0, esc.breaker.retry_in_s()))
            back = esc.escalate(record, tensor)
            assert back["status"] == "answered" and back["worker"] == "server-b"
            assert esc.breaker.state == "closed"
        assert _requests(spy) == 6
        stats = esc.stats()
        assert (stats["answered"], stats["timeout"], stats["circuit-open"], stats["sent"]) == (2, 4, 6, 6)
        assert stats["breaker"]["opened"] == 2


def test_two_servers_on_a_shared_subscription_split_the_requests(broker, local_model, server_bundle, keys, digits_dirs):
    image = _image(digits_dirs)
    record = _local(local_model, image)
    tensor = next(iter(local_model.tensor_from_image(image).values()))
    a = ServeModel(broker, server_bundle, keys[1], "server-a")
    b = ServeModel(broker, server_bundle, keys[1], "server-b")
    try:
        a.wait_ready()
        b.wait_ready()
        with Collector(broker, RESPONSES, client_id="spy") as spy, device_link(broker) as link:
            esc = _escalator(link)
            outs = [esc.escalate(record, tensor) for _ in range(20)]
            assert all(o["status"] == "answered" for o in outs), outs
            workers = [o["worker"] for o in outs]
            assert spy.wait(lambda ms: len(ms) >= 20, 5)
            time.sleep(0.3)
            assert len(spy.messages) == 20  # each request answered once, by one member of the group
    finally:
        stats = {"server-a": a.stop(), "server-b": b.stop()}
    assert set(workers) == {"server-a", "server-b"}
    for name, s in stats.items():
        assert s["answered"] == workers.count(name) and s["requests"] == s["answered"]
    assert min(workers.count("server-a"), workers.count("server-b")) >= 5  # Mosquitto deals them round robin


def test_an_mqtt311_link_reports_unsupported_and_sends_nothing(broker, local_model, digits_dirs):
    image = _image(digits_dirs)
    record = _local(local_model, image)
    with Collector(broker, REQUESTS, client_id="spy") as spy, device_link(broker, "mqtt311") as link:
        assert link.protocol_in_use == "mqtt311"
        esc = _escalator(link, failures=1)
        outs = [esc.escalate(record, image.tobytes()) for _ in range(3)]
        assert [o["status"] for o in outs] == ["unsupported"] * 3
        assert esc.breaker.state == "closed"
        time.sleep(0.3)
        assert spy.messages == []


def test_the_server_answers_bad_requests_with_an_error_and_never_publishes_elsewhere(broker, server_bundle, keys):
    from runtime.escalate import decode_response, encode_request

    good_shape = encode_request(
        device="dev-1", model="digits", payload=np.zeros((3, 5), np.float32), local={}, timeout_s=2
    )
    with (
        serving(broker, server_bundle, keys[1]),
        Collector(broker, [f"edge/{FLEET}/all/cmd", f"edge/{FLEET}/dev-2/escalate/resp"], client_id="spy") as spy,
        device_link(broker) as link,
    ):
        for body, needle in ((b"\xff not json", "JSON"), (good_shape, "does not fit"), (b'{"v": 9}', "version")):
            answer = link.request(REQUESTS, body, response_topic=RESPONSES, timeout=5)
            assert answer is not None, needle
            resp = decode_response(answer.payload)
            assert resp.result is None and needle in (resp.error or ""), resp
        # the server must not be made to publish on command topics or on another device's behalf
        assert link.request(REQUESTS, good_shape, response_topic=f"edge/{FLEET}/all/cmd", timeout=1) is None
        assert link.request(REQUESTS, good_shape, response_topic=f"edge/{FLEET}/dev-2/escalate/resp", timeout=1) is None
        time.sleep(0.3)
        assert spy.messages == []


def test_serve_model_refuses_an_untrusted_bundle(bundle, tmp_path):
    from runtime.signing import generate_keypair

    _, other = generate_keypair(tmp_path, "other")
    res = run_cli("fleet", "serve-model", "--bundle", str(bundle[0]), "--trusted-key", str(other), "--fleet", FLEET)
    assert res.code == 2 and "not among the trusted keys" in res.err and "Traceback" not in res.err
    help_ = run_cli("fleet", "serve-model", "--help")
    assert help_.code == 0 and "$share" in help_.out


def test_the_service_escalates_low_confidence_results_and_logs_both(
    broker, bundle, server_bundle, keys, digits_dirs, tmp_path
):
    import cv2

    from runtime.logbook import open_readonly
    from tests.integration.test_runtime import _config, _post, _serve, _stop, _wait_status

    mqtt = {"enabled": True, "port": broker.port}
    escalation = {"enabled": True, "threshold": 1.01, "timeout_s": 1.0, "breaker_failures": 2, "breaker_reset_s": 60}
    cfg = _config(tmp_path, bundle[0], keys[1], logbook={"flush_interval_s": 0.1}, mqtt=mqtt, escalation=escalation)
    cfg.write_text(f'fleet = "{FLEET}"\n' + cfg.read_text())  # top-level keys go before the first [table]
    png = cv2.imencode(".png", _image(digits_dirs))[1].tobytes()
    server = ServeModel(broker, server_bundle, keys[1], "server-a").wait_ready()
    proc = _serve(cfg)
    try:
        port = _wait_status(tmp_path / "state", proc)["http"]["port"]
        code, answered = _post(port, png)
        assert code == 200 and answered["final"] == "server", answered
        esc = answered["escalation"]
        assert esc["status"] == "answered" and esc["version"] == "2.0.0" and esc["server"]["top1"]["label"] in WORDS
        assert answered["top1"]["label"] not in WORDS and answered["version"] == "1.0.0"  # the local result too
        server.kill()
        statuses = []
        for _ in range(3):
            t0 = time.monotonic()
            code, body = _post(port, png)
            assert code == 200 and body["final"] == "local" and time.monotonic() - t0 < 1.0 + 1.0
            statuses.append(body["escalation"]["status"])
        assert statuses == ["timeout", "timeout", "circuit-open"]
    finally:
        server.kill()
        rc, err = _stop(proc)
    assert rc == 0, err
    rows = open_readonly(tmp_path / "state" / "logbook.sqlite").tail(10)
    logged = [r["result"] for r in rows]
    assert [r["escalation"]["status"] for r in logged] == ["answered", "timeout", "timeout", "circuit-open"]
    assert logged[0]["escalation"]["server"]["top1"]["label"] in WORDS and logged[0]["top1"]["label"] not in WORDS
