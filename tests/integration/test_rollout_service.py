"""Progressive model updates through the whole service: real bundles, a real broker, HTTP load, SIGKILLs.

Variants of the session's digits bundle are re-signed with the fleet key: the same model as a new
version (passes every gate), one with a heavy extra branch (same outputs, slower), one whose
logits go through a fixed random matrix (different weights: disagrees), and one whose output is
empty (its classification post-processing raises).
"""

from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from runtime import topics
from runtime.commands import make_command, sign_command
from runtime.signing import load_private_key
from tests.broker import (
    Broker,
    Collector,
    broker_fixture,  # noqa: F401  (registers the `broker` fixture)
)
from tests.integration.test_commands_broker import Operator
from tests.integration.test_runtime import _config, _post, _serve, _stop, _val_files, _wait_status

FLEET, DEVICE = "default", "dev-1"
GATES = {"min_samples": 15, "max_p95_ratio": 4.0, "min_agreement": 0.9, "max_error_rate": 0.05, "max_duration_s": 60}


# --- bundles ------------------------------------------------------------------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _variant(src: Path, out: Path, key: Path, version: str, change: str = "", profile: str = "") -> Path:
    """``src`` re-signed as ``version``, its ONNX model changed by ``change`` (slow, other, broken)."""
    import onnx
    from onnx import TensorProto, helper

    from runtime.manifest import ProfileRef, parse_manifest
    from toolchain.bundle import file_entry, pack

    work = out.with_suffix(".d")
    work.mkdir(parents=True)
    with tarfile.open(src) as tar:
        tar.extractall(work, filter="data")
    manifest = parse_manifest((work / "manifest.json").read_bytes())
    model_path = work / manifest.model
    if change:
        model = onnx.load(str(model_path))
        g = model.graph
        final = g.output[0].name
        for node in g.node:
            node.output[:] = [f"{o}__orig" if o == final else o for o in node.output]
        src_name = f"{final}__orig"
        rng = np.random.default_rng(7)
        if change == "other":  # a different classifier head: logits through a fixed random matrix
            mix = rng.standard_normal((10, 10)).astype(np.float32)
            g.initializer.append(helper.make_tensor("mix", TensorProto.FLOAT, [10, 10], mix.ravel().tolist()))
            g.node.append(helper.make_node("MatMul", [src_name, "mix"], [final]))
        elif change == "slow":  # a heavy branch whose contribution is multiplied by zero: same outputs
            x = g.input[0].name
            g.initializer.append(helper.make_tensor("flat", TensorProto.INT64, [2], [1, -1]))
            nodes = [helper.make_node("Reshape", [x, "flat"], ["h0"])]
            first = rng.standard_normal((64, 768)).astype(np.float32) * 0.01
            g.initializer.append(helper.make_tensor("w0", TensorProto.FLOAT, [64, 768], first.ravel().tolist()))
            nodes.append(helper.make_node("MatMul", ["h0", "w0"], ["h1"]))
            w = (rng.standard_normal((768, 768)) * 0.01).astype(np.float32)
            g.initializer.append(helper.make_tensor("wh", TensorProto.FLOAT, [768, 768], w.ravel().tolist()))
            for i in range(1, 80):
                nodes.append(helper.make_node("MatMul", [f"h{i}", "wh"], [f"h{i + 1}"]))
            g.initializer.append(helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]))
            nodes += [
                helper.make_node("ReduceSum", ["h80"], ["hs"], keepdims=0),
                helper.make_node("Mul", ["hs", "zero"], ["hz"]),
                helper.make_node("Add", [src_name, "hz"], [final]),
            ]
            g.node.extend(nodes)
        elif change == "broken":  # an empty output: classification post-processing cannot apply
            for name, vals in (("s0", [0]), ("s1", [0]), ("ax", [1])):
                g.initializer.append(helper.make_tensor(name, TensorProto.INT64, [1], vals))
            g.node.append(helper.make_node("Slice", [src_name, "s0", "s1", "ax"], [final]))
        del g.output[0].type.tensor_type.shape.dim[:]
        onnx.save(model, str(model_path))
    files = {f.path: work / f.path for f in manifest.files}
    entries = tuple(file_entry(files[f.path], f.path, role=f.role) for f in manifest.files)
    changes: dict[str, Any] = {"version": version, "files": entries}
    if profile:
        changes["profile"] = ProfileRef(name=profile, digest=manifest.profile.digest, arch=manifest.profile.arch)
    return pack(files, manifest.with_changes(**changes), key, out)


@pytest.fixture(scope="module")
def variants(bundle, keys, tmp_path_factory) -> dict[str, Path]:
    src, _ = bundle
    out = tmp_path_factory.mktemp("variants")
    made = {
        "same": _variant(src, out / "same.tar", keys[0], "1.1.0"),
        "slow": _variant(src, out / "slow.tar", keys[0], "1.2.0", "slow"),
        "other": _variant(src, out / "other.tar", keys[0], "1.3.0", "other"),
        "broken": _variant(src, out / "broken.tar", keys[0], "1.4.0", "broken"),
        "rpi5": _variant(src, out / "rpi5.tar", keys[0], "1.5.0", profile="rpi5"),
    }
    from runtime.signing import generate_keypair

    intruder, _ = generate_keypair(out / "k", "intruder")
    made["unsigned"] = _variant(src, out / "intruder.tar", intruder, "1.6.0")
    return made


# --- the device and the operator ----------------------------------------------------------------


@dataclass
class Device:
    """A running `edge-runtime serve` with MQTT and HTTP, an operator, an ack collector and an HTTP load."""

    tmp: Path
    cfg: Path
    broker: Broker
    key: Path
    image: bytes
    env: dict[str, str] = field(default_factory=dict)
    proc: Any = None
    port: int = 0
    operator: Any = None
    acks: Any = None
    results: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    _load: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    @property
    def state(self) -> Path:
        return self.tmp / "state"

    def start(self, env: dict[str, str] | None = None) -> Device:
        self.proc = _serve(self.cfg, env=env)
        deadline = time.monotonic() + 60
        status = _wait_status(self.state, self.proc)
        while status.get("pid") != self.proc.pid:  # a killed run left its status.json behind
            assert time.monotonic() < deadline, "the service did not write its own status.json"
            time.sleep(0.1)
            status = _wait_status(self.state, self.proc)
        self.port = status["http"]["port"]
        return self

    def wait_online(self, timeout: float = 20.0) -> None:
        """Until the retained status says online (the command channel is subscribed by then)."""
        topic = topics.status_topic(FLEET, DEVICE)
        with Collector(self.broker, topic, client_id=f"st-{time.monotonic_ns()}") as c:
            ok = c.wait(lambda ms: any(json.loads(m.payload or b"{}").get("pid") == self.proc.pid for m in ms), timeout)
        assert ok, "the device never came online"

    def send(self, ctype: str, args: dict[str, Any], command_id: str | None = None) -> str:
        body = make_command(ctype, {"device": DEVICE}, args, ttl_s=600, command_id=command_id)
        raw = sign_command(body, load_private_key(self.key))
        self.operator.send(topics.cmd_topic(FLEET, DEVICE), raw)
        return str(body["id"])

    def deploy(self, path: Path, strategy: str = "shadow", **extra: Any) -> str:
        from runtime.manifest import parse_manifest

        with tarfile.open(path) as tar:
            m = parse_manifest(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        spec = {"url": path.as_uri(), "sha256": _sha(path), "size": path.stat().st_size}
        spec |= {"name": m.name, "version": m.version, "profile": m.profile.name}
        args = {"bundle": {**spec, **extra.pop("bundle", {})}, "strategy": strategy, "gates": GATES, **extra}
        return self.send("model.deploy", args)

    def acks_of(self, command_id: str) -> list[dict[str, Any]]:
        docs = [json.loads(m.payload) for m in self.acks.messages]
        return [d for d in docs if d.get("id") == command_id]

    def final(self, command_id: str, timeout: float = 90.0) -> dict[str, Any]:
        def done(_: Any) -> bool:
            return any(a["status"] != "accepted" for a in self.acks_of(command_id))

        assert self.acks.wait(done, timeout), f"no final ack for {command_id}: {self.acks_of(command_id)}"
        return next(a for a in self.acks_of(command_id) if a["status"] != "accepted")

    def infer(self) -> tuple[int, dict[str, Any]]:
        return _post(self.port, self.image)

    def load(self, workers: int = 3) -> None:
        """Keep POSTing the image from ``workers`` threads until :meth:`stop_load`."""
        self._load.clear()

        def hammer() -> None:
            while not self._load.is_set():
                try:
                    self.results.append(self.infer())
                except OSError as exc:  # a refused or reset connection is a failed request too
                    self.results.append((0, {"error": str(exc)}))

        self._threads = [threading.Thread(target=hammer, daemon=True) for _ in range(workers)]
        for t in self._threads:
            t.start()

    def stop_load(self) -> list[tuple[int, dict[str, Any]]]:
        self._load.set()
        for t in self._threads:
            t.join(30)
        out, self.results = self.results, []
        return out

    def ledger(self, rollout_id: str) -> list[tuple[str | None, str, str]]:
        con = sqlite3.connect(self.state / "rollout.sqlite")
        try:
            q = "SELECT from_state, to_state, reason FROM transitions WHERE rollout_id=? ORDER BY seq"
            return [tuple(r) for r in con.execute(q, (rollout_id,))]  # type: ignore[misc]
        finally:
            con.close()


@pytest.fixture
def device(broker, bundle, keys, digits_dirs, tmp_path) -> Iterator[Device]:
    path, _ = bundle
    cfg = _config(
        tmp_path,
        path,
        keys[1],
        health={"interval_s": 0.3},
        logbook={"flush_interval_s": 0.1},
        mqtt={"enabled": True, "port": broker.port},
        http={"port": 0, "rate_limit_per_s": 100000, "burst": 100000},
        rollout={"canary_share": 0.5},
        models={"good_after_s": 1.0},
    )
    gray = cv2.imread(str(_val_files(digits_dirs[1], 1)[0]), cv2.IMREAD_GRAYSCALE)
    dev = Device(tmp_path, cfg, broker, keys[0], cv2.imencode(".png", gray)[1].tobytes())
    dev.operator = Operator(broker)
    dev.acks = Collector(broker, topics.ack_topic(FLEET, DEVICE), client_id=f"acks-{tmp_path.name}")
    try:
        yield dev
    finally:
        dev.stop_load()
        if dev.proc is not None:
            _stop(dev.proc)
        dev.acks.stop()
        dev.operator.close()


def _ok(results: list[tuple[int, dict[str, Any]]]) -> None:
    failed = [r for r in results if r[0] != 200]
    assert results and not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:3]}"


# --- tests --------------------------------------------------------------------------------------


def test_happy_path_shadow_then_canary_then_active_under_load(device, variants):
    device.start().wait_online()
    device.load()
    cid = device.deploy(variants["same"])
    busy = device.final(device.deploy(variants["other"]), timeout=20)  # one rollout at a time
    assert busy["status"] == "refused" and busy["reason"].startswith("busy"), busy
    final = device.final(cid)
    time.sleep(0.5)  # requests keep flowing across the hot swap
    results = device.stop_load()
    assert final["status"] == "ok", final
    res = final["result"]
    assert res["outcome"] == "active" and res["version"] == "1.1.0", res
    assert res["previous"] == {"name": "digits", "version": "1.0.0"}
    assert res["metrics"]["samples"] >= GATES["min_samples"] and res["metrics"]["agreement"] >= 0.9
    assert [to for _, to, _ in device.ledger(cid)] == [
        "downloading",
        "verified",
        "shadow",
        "canary",
        "activating",
        "active",
    ]
    _ok(results)  # zero failed requests: shadow, canary and the hot swap under load
    versions = [body["version"] for _, body in results]
    assert "1.1.0" in versions and versions[-1] == "1.1.0"
    assert any(body.get("canary") for _, body in results)  # canary requests were served by the candidate
    code, body = device.infer()
    assert code == 200 and body["version"] == "1.1.0"
    status = json.loads((device.state / "status.json").read_text())
    assert status["rollout"]["state"] == "active" and status["profile"] == "rpi4"
    accepted = [a for a in device.acks_of(cid) if a["status"] == "accepted"]
    assert len(accepted) == 1 and len(device.acks_of(cid)) == 2


@pytest.mark.parametrize(
    ("name", "strategy", "reason"),
    [("slow", "shadow", "latency"), ("other", "shadow", "agreement"), ("broken", "canary", "errors")],
)
def test_a_worse_model_is_rolled_back_and_the_old_one_keeps_serving(
    device, variants, name, strategy, reason, record_property
):
    device.start().wait_online()
    device.load()
    cid = device.deploy(variants[name], strategy)
    final = device.final(cid)
    results = device.stop_load()
    assert final["status"] == "error", final
    res = final["result"]
    assert res["outcome"] == "rolled_back" and res["reason"].startswith(reason), res
    _ok(results)
    assert all(body["version"] == "1.0.0" for _, body in results if not body.get("canary"))
    code, body = device.infer()
    assert code == 200 and body["version"] == "1.0.0"
    record_property("rollback_ms", res["metrics"]["rollback_ms"])
    print(f"\n{name}: gate failed ({res['reason']}); previous model alone after {res['metrics']['rollback_ms']} ms")
    assert device.ledger(cid)[-1][1] == "rolled_back"


def test_refusals_keep_the_active_model_serving(device, variants, tmp_path):
    from toolchain.delta import diff_bundles

    device.start().wait_online()
    finals: dict[str, dict[str, Any]] = {}
    corrupt = tmp_path / "corrupt.tar"
    data = bytearray(variants["same"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    # one at a time: a deploy while another runs is refused "busy"
    finals["download"] = device.final(device.deploy(variants["same"], bundle={"url": corrupt.as_uri()}))
    finals["signature"] = device.final(device.deploy(variants["unsigned"]))
    delta = tmp_path / "same.delta"
    old = device.state / "models" / "digits" / "1.0.0" / "bundle.tar"
    diff_bundles(old, variants["same"], delta)
    truncated = tmp_path / "truncated.delta"
    truncated.write_bytes(delta.read_bytes()[: delta.stat().st_size // 2])
    base = {"name": "digits", "version": "1.0.0", "sha256": _sha(old)}
    cid = device.deploy(
        variants["same"],
        delta={"url": truncated.as_uri(), "sha256": _sha(delta), "size": delta.stat().st_size, "from": base},
        bundle={"url": (tmp_path / "missing.tar").as_uri()},
    )
    finals["delta"] = device.final(cid)
    for what, ack in finals.items():
        assert ack["status"] == "refused" and ack["result"]["outcome"] == "refused", (what, ack)
    assert finals["download"]["reason"].startswith("download")
    assert finals["signature"]["reason"].startswith("signature")
    assert finals["delta"]["reason"].startswith("download")  # the delta failed, then the full url too
    wrong = device.deploy(variants["rpi5"])
    ack = device.final(wrong, timeout=20)
    assert ack["status"] == "refused" and ack["reason"].startswith("wrong-profile"), ack
    code, body = device.infer()
    assert code == 200 and body["version"] == "1.0.0"
    con = sqlite3.connect(device.state / "logbook.sqlite")
    try:
        kinds = {r[0] for r in con.execute("SELECT kind FROM events")}
    finally:
        con.close()
    assert {"rollout.downloading", "rollout.refused", "rollout.delta_failed"} <= kinds


def test_a_good_delta_is_applied_instead_of_the_full_bundle(device, variants, tmp_path):
    from toolchain.delta import diff_bundles

    device.start().wait_online()
    old = device.state / "models" / "digits" / "1.0.0" / "bundle.tar"
    delta = tmp_path / "same.delta"
    diff_bundles(old, variants["same"], delta)
    base = {"name": "digits", "version": "1.0.0", "sha256": _sha(old)}
    cid = device.deploy(
        variants["same"],
        "immediate",
        delta={"url": delta.as_uri(), "sha256": _sha(delta), "size": delta.stat().st_size, "from": base},
        bundle={"url": (tmp_path / "not-there.tar").as_uri()},  # only the delta can make it
    )
    final = device.final(cid)
    assert final["status"] == "ok" and final["result"]["version"] == "1.1.0", final
    assert device.infer()[1]["version"] == "1.1.0"


@pytest.mark.parametrize("point", ["downloading", "activating"])
def test_sigkill_during_a_rollout_never_leaves_the_device_without_a_model(device, variants, point):
    device.start(env={"EDGE_TEST_KILL_AT": point}).wait_online()
    cid = device.deploy(variants["same"], "immediate")
    device.proc.communicate(timeout=60)
    assert device.proc.returncode == -signal.SIGKILL
    device.start().wait_online()  # no fault injection this time
    code, body = device.infer()
    assert code == 200 and body["version"] in ("1.0.0", "1.1.0")  # old or new, never none
    final = device.final(cid)
    assert final["status"] == "ok" and final["result"]["outcome"] == "active", final
    states = [to for _, to, _ in device.ledger(cid)]
    assert states[-1] == "active" and states.count("active") == 1
    if point == "activating":
        assert "completed after a restart" in device.ledger(cid)[-1][2]
    assert device.infer()[1]["version"] == "1.1.0"
    time.sleep(1.0)
    finals = [a for a in device.acks_of(cid) if a["status"] != "accepted"]
    assert len(finals) == 1  # the final ack goes out once, even across the restart


def test_model_rollback_command_returns_to_the_previous_version(device, variants):
    device.start().wait_online()
    cid = device.deploy(variants["same"], "immediate")
    assert device.final(cid)["status"] == "ok"
    device.load(workers=2)
    back = device.send("model.rollback", {})
    ack = device.final(back, timeout=30)
    results = device.stop_load()
    assert ack["status"] == "ok" and ack["result"]["active"] == {"name": "digits", "version": "1.0.0"}, ack
    assert ack["result"]["from"] == {"name": "digits", "version": "1.1.0"}
    _ok(results)
    assert device.infer()[1]["version"] == "1.0.0"
