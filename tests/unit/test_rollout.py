"""The rollout state machine, its gates, the SQLite ledger and resume, the trial and the hot-swap slot (host-free).

Only the runtime, numpy and sqlite: models on trial here are small Python objects returning real
:class:`runtime.model.Prediction` records, so the sampling, queueing and counting are exercised
without an inference engine; bundles for the store are signed tars with placeholder model bytes.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.commands import CommandChannel, Deferred, make_command, sign_command
from runtime.errors import CommandError, RolloutError
from runtime.model import Prediction
from runtime.rollout import Gates, Ledger, Metrics, Rollout, agrees, judge, p95
from runtime.shadow import ModelSlot, SharedModel, Trial
from runtime.signing import generate_keypair, load_private_key, load_public_key

REPO = Path(__file__).resolve().parents[2]
GATES = Gates(min_samples=10, max_p95_ratio=1.5, min_agreement=0.9, max_error_rate=0.1, max_duration_s=60)


# --- gates ----------------------------------------------------------------------------------------


def _m(samples: int = 10, errors: int = 0, compared: int = 10, agreed: int = 10, cand: float = 1.0, act: float = 1.0):
    return Metrics(samples, errors, compared, agreed, cand, act)


def test_gates_wait_for_samples_then_time_out():
    assert judge(GATES, _m(samples=9), 10).decision == "wait"
    v = judge(GATES, _m(samples=9), 60)
    assert v.decision == "fail" and v.reason.startswith("timeout: 9 of 10 samples")


@pytest.mark.parametrize(
    ("metrics", "reason"),
    [
        (_m(errors=2), "errors"),
        (_m(cand=1.6), "latency"),
        (_m(agreed=8), "agreement"),
        (_m(errors=5, cand=3.0, agreed=0), "errors"),  # errors are judged first
        (_m(cand=3.0, agreed=0), "latency"),  # then latency, then agreement
    ],
)
def test_each_gate_fails_with_its_reason(metrics, reason):
    v = judge(GATES, metrics, 1)
    assert v.decision == "fail" and v.reason.startswith(reason), v


def test_gates_pass_at_the_limits_and_without_a_latency_baseline():
    assert judge(GATES, _m(errors=1, cand=1.5, agreed=9), 1).decision == "pass"
    assert judge(GATES, Metrics(10, 0, 10, 10, 2.0, None), 1).decision == "pass"  # no active p95 yet: no ratio
    assert judge(GATES, Metrics(10, 0, 0, 0, 1.0, 1.0), 1).decision == "wait"  # nothing compared yet
    assert judge(GATES, Metrics(10, 0, 0, 0, 1.0, 1.0), 61).reason.startswith("timeout")


def test_metrics_summary_and_p95():
    m = _m(samples=20, errors=1, compared=19, agreed=18, cand=2.0, act=1.0)
    s = m.summary()
    assert s["p95_ratio"] == 2.0 and s["error_rate"] == 0.05 and s["agreement"] == round(18 / 19, 4)
    assert p95([]) is None and p95([3.0]) == 3.0 and p95([float(i) for i in range(100)]) == 95.0


def test_agreement_rules():
    top = {"top1": {"index": 3}}
    assert agrees(top, {"top1": {"index": 3}}, (None, None), "classification")
    assert not agrees(top, {"top1": {"index": 4}}, (None, None), "classification")
    a = np.zeros((1, 8, 8), np.float32)
    a[0, :4] = 1.0
    b = a.copy()
    b[0, 4] = 1.0  # 32 of 40 pixels overlap
    assert agrees({}, {}, (a, b), "dense")
    assert not agrees({}, {}, (a, 1.0 - a), "dense")
    assert agrees({}, {}, (np.zeros(4), np.zeros(4)), "dense")  # both empty: same
    v = np.array([1.0, 2.0, 3.0])
    assert agrees({}, {}, (v, v * 2), "embedding") and not agrees({}, {}, (v, -v), "none")
    assert not agrees({}, {}, (v, np.ones(4)), "none")  # shapes differ


# --- ledger ---------------------------------------------------------------------------------------


def _rollout(rid: str = "cmd-1", state: str = "downloading", **kw: Any) -> Rollout:
    return Rollout(rid, state, kw.pop("strategy", "shadow"), "digits", "1.1.0", {"bundle": {}}, GATES, **kw)


def test_ledger_moves_persist_and_refuse_illegal_transitions(tmp_path):
    ledger = Ledger(tmp_path / "rollout.sqlite")
    ledger.create(_rollout(previous={"name": "digits", "version": "1.0.0"}))
    for state in ("verified", "shadow", "canary"):
        ledger.move("cmd-1", state)
    with pytest.raises(RolloutError, match="cannot go from canary to verified"):
        ledger.move("cmd-1", "verified")
    with pytest.raises(RolloutError, match="cmd-2"):
        ledger.get("cmd-2")
    ledger.update("cmd-1", metrics={"samples": 4})
    ledger.close()
    again = Ledger(tmp_path / "rollout.sqlite")
    r = again.get("cmd-1")
    assert r.state == "canary" and r.metrics == {"samples": 4} and r.gates == GATES
    assert r.previous == {"name": "digits", "version": "1.0.0"}
    assert [u.id for u in again.unfinished()] == ["cmd-1"] and again.unacked() == []
    again.move("cmd-1", "rolled_back", reason="latency: slow")
    assert again.unfinished() == [] and [u.id for u in again.unacked()] == ["cmd-1"]
    again.update("cmd-1", acked=True)
    assert again.unacked() == []
    assert [t for _, t, _ in again.transitions("cmd-1")] == [
        "downloading",
        "verified",
        "shadow",
        "canary",
        "rolled_back",
    ]
    with pytest.raises(RolloutError, match="rolled_back to active"):
        again.move("cmd-1", "active")


_WRITER = """
import sys, time
from runtime.rollout import Gates, Ledger, Rollout
ledger = Ledger(sys.argv[1])
for i in range(10_000):
    rid = f"r{i}"
    ledger.create(Rollout(rid, "downloading", "shadow", "m", "1.0.0", {}, Gates()))
    ledger.move(rid, "verified")
    ledger.move(rid, "rolled_back", reason="x")
    print(i, flush=True)
"""


def test_ledger_survives_kill_9_of_its_writer(tmp_path):
    db = tmp_path / "rollout.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(db)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for _ in range(5):
        done = int(proc.stdout.readline().split()[0])
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    ledger = Ledger(db)
    rows = {r.id: r for r in ledger.unfinished()} | {r.id: r for r in ledger.unacked()}
    assert all(f"r{i}" in rows and rows[f"r{i}"].state == "rolled_back" for i in range(done + 1))
    for r in rows.values():  # each row's state is the last of its transitions: nothing half-written
        assert ledger.transitions(r.id)[-1][1] == r.state


# --- trial and slot -------------------------------------------------------------------------------


@dataclass
class FakeModel:
    """A Python stand-in with the LoadedModel surface the trial uses; ``answer`` is its top-1 class."""

    name: str
    answer: int = 1
    latency_ms: float = 1.0
    delay_s: float = 0.0
    fail: bool = False
    closed: bool = False
    runs: int = 0
    version: str = "1.0.0"
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, feeds: Any, *, ref: str = "") -> Prediction:
        with self.lock:
            self.runs += 1
        time.sleep(self.delay_s)
        if self.fail:
            raise IndexError("list index out of range")  # what classify raises on an empty output
        out = np.eye(4, dtype=np.float32)[self.answer][None]
        return Prediction(ref, self.latency_ms, {"top1": {"index": self.answer}}, [out])

    def close(self) -> None:
        self.closed = True


def _trial(candidate: FakeModel, active: FakeModel, stage: str = "shadow", **kw: Any) -> Trial:
    return Trial(
        SharedModel(candidate),
        stage=stage,
        kind="classification",
        shadow_share=kw.get("shadow_share", 1.0),
        canary_share=kw.get("canary_share", 0.25),
        feeds_of=lambda model, item: {"x": item},
        run_active=lambda item: active.run({"x": item}),
        queue_size=kw.get("queue_size", 64),
    )


def _until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_shadow_samples_compare_and_count_errors():
    active = FakeModel("a", answer=1)
    good = _trial(FakeModel("c", answer=1, latency_ms=2.0), active, shadow_share=0.5)
    for i in range(40):
        good.served({"x": i}, active.run({"x": i}))
    _until(lambda: good.metrics().samples == 20)  # exactly half, deterministically
    m = good.metrics()
    assert m.agreement == 1.0 and m.p95_ratio == 2.0 and m.errors == 0
    good.stop()
    wrong = _trial(FakeModel("c", answer=2), active)
    broken = _trial(FakeModel("c", fail=True), active)
    for t in (wrong, broken):
        for i in range(10):
            t.served({"x": i}, active.run({"x": i}))
    _until(lambda: wrong.metrics().compared == 10 and broken.metrics().samples == 10)
    assert wrong.metrics().agreement == 0.0
    assert broken.metrics().error_rate == 1.0 and broken.metrics().compared == 0
    wrong.stop()
    broken.stop()


def test_shadow_drops_samples_rather_than_slowing_serving():
    active = FakeModel("a")
    slow = FakeModel("c", delay_s=0.2)
    trial = _trial(slow, active, queue_size=2)
    t0 = time.perf_counter()
    for i in range(50):
        trial.served({"x": i}, active.run({"x": i}))
    assert time.perf_counter() - t0 < 0.2  # serving never waited for the 0.2 s candidate
    assert trial.metrics().dropped >= 45
    trial.stop()
    assert slow.runs <= 4


def test_canary_share_is_deterministic_and_compares_off_thread():
    active = FakeModel("a", answer=1)
    cand = FakeModel("c", answer=1)
    trial = _trial(cand, active, stage="canary", canary_share=0.25)
    taken = [trial.take_canary() for _ in range(100)]
    assert sum(taken) == 25 and taken[:8] == [False, False, False, True] * 2
    for i in range(10):
        trial.canary_result(i, cand.run({"x": i}) if i % 5 else None)
    _until(lambda: trial.metrics().compared == 8)
    m = trial.metrics()
    assert m.samples == 10 and m.errors == 2 and m.agreement == 1.0
    trial.set_stage("shadow")
    assert trial.metrics().samples == 0 and not trial.take_canary()
    trial.stop()


def test_slot_hot_swap_keeps_inflight_requests_on_the_old_model():
    old, new = FakeModel("old"), FakeModel("new")
    slot = ModelSlot(old)
    inside, release = threading.Event(), threading.Event()
    seen: list[str] = []

    def request() -> None:
        with slot.borrow() as m:
            inside.set()
            release.wait(5)
            m.run({})
            seen.append(m.name)

    t = threading.Thread(target=request)
    t.start()
    inside.wait(5)
    assert slot.install(new) is old
    assert not old.closed  # a request is still running on it
    with slot.borrow() as m:
        assert m is new
    release.set()
    t.join(5)
    assert seen == ["old"] and old.closed and not new.closed
    slot.close()
    assert new.closed


def test_shared_model_retired_while_idle_closes_at_once():
    m = FakeModel("c")
    ref = SharedModel(m)
    assert ref.acquire()
    ref.retire()
    assert not m.closed and not ref.acquire()
    ref.release()
    assert m.closed and ref.readers == 0


# --- deferred acks --------------------------------------------------------------------------------


@dataclass
class LoopLink:
    published: list[tuple[str, bytes]] = field(default_factory=list)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> Any:
        self.published.append((topic, payload))
        return self

    def wait(self, timeout: float) -> bool:  # the publish handle: PUBACKed at once
        return True

    def subscribe(self, topic_filter: str, handler: Any, *, qos: int = 1) -> None:
        pass

    def acks(self) -> list[dict[str, Any]]:
        return [json.loads(p) for _, p in self.published]


def test_a_deferred_command_is_acked_accepted_then_finished_once_even_after_a_restart(tmp_path):
    priv, pub = generate_keypair(tmp_path / "k", "op")
    key = load_private_key(priv)

    def open_channel(link: LoopLink) -> CommandChannel:
        handlers = {"model.deploy": lambda cmd: Deferred("later")}
        return CommandChannel(
            link,
            fleet="f",
            device="d",
            group="",
            trusted_keys=[load_public_key(pub)],
            state_dir=tmp_path,
            handlers=handlers,
        )

    link = LoopLink()
    ch = open_channel(link)
    raw = sign_command(make_command("model.deploy", {"device": "d"}, {}, command_id="dep-1"), key)
    assert [a["status"] for a in ch.process(raw)] == ["accepted"]
    assert ch.state.pending() == {"dep-1": "model.deploy"}
    assert [a["status"] for a in ch.process(raw)] == ["accepted"]  # redelivered while running
    link2 = LoopLink()
    restarted = open_channel(link2)  # the process restarted: the deferred id is still owed its ack
    assert restarted.state.pending() == {"dep-1": "model.deploy"}
    sent = restarted.complete("dep-1", "model.deploy", status="error", result={"outcome": "rolled_back"}, reason="x")
    assert sent is True
    (final,) = link2.acks()
    assert final["status"] == "error" and final["result"] == {"outcome": "rolled_back"} and final["reason"] == "x"
    assert restarted.complete("dep-1", "model.deploy") is None and len(link2.acks()) == 1  # once
    assert restarted.resend("dep-1") and link2.acks()[-1] == final  # the stored one, on request
    assert restarted.state.pending() == {}
    assert [a["status"] for a in restarted.process(raw)] == ["error"]  # a repeat re-sends the final ack


# --- store + ledger on restart --------------------------------------------------------------------


def _bundle(tmp: Path, priv: Path, version: str) -> Path:
    """A signed bundle with placeholder model bytes: enough for the store, which verifies but never loads."""
    from runtime.bundle import file_digest
    from runtime.manifest import FileEntry, Manifest, ProfileRef, TensorSpec
    from runtime.signing import sign_manifest

    model = tmp / f"model-{version}.onnx"
    model.write_bytes(b"not really onnx " + version.encode())
    sha, size = file_digest(model)
    manifest = Manifest(
        name="digits",
        version=version,
        created="2024-01-01T00:00:00Z",
        profile=ProfileRef("rpi4", "0" * 64, "aarch64"),
        backend="onnxruntime",
        model="model.onnx",
        files=(FileEntry("model.onnx", sha, size),),
        inputs=(TensorSpec("x", "float32", (1, 4)),),
        outputs=(TensorSpec("y", "float32", (1, 4)),),
    )
    data = manifest.to_json()
    out = tmp / f"digits-{version}.tar"
    with tarfile.open(out, "w") as tar:
        for name, blob in (
            ("manifest.json", data),
            ("manifest.sig", sign_manifest(data, load_private_key(priv))),
            ("model.onnx", model.read_bytes()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return out


class Host:
    """Records the deployer's events; nothing here serves."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def event(self, kind: str, message: str, *, level: str = "info", **data: Any) -> None:
        self.events.append((kind, message))


@pytest.mark.parametrize("moved", [True, False])
def test_a_rollout_caught_activating_follows_the_store_pointer(tmp_path, moved):
    from runtime.config import RolloutSection
    from runtime.deploy import Deployer
    from runtime.store import ModelStore

    priv, pub = generate_keypair(tmp_path / "k", "fleet")
    store = ModelStore(tmp_path / "models")
    trusted = [load_public_key(pub)]
    for v in ("1.0.0", "1.1.0"):
        store.add(_bundle(tmp_path, priv, v), trusted_keys=trusted)
    store.activate("digits", "1.0.0")
    store.mark_good()
    ledger = Ledger(tmp_path / "rollout.sqlite")
    ledger.create(_rollout("dep-1", "downloading"))
    for state in ("verified", "shadow", "canary", "activating"):
        ledger.move("dep-1", state)
    if moved:
        store.activate("digits", "1.1.0")  # the kill came after the pointer moved
    host = Host()
    dep = Deployer(
        host,  # type: ignore[arg-type]
        store=store,
        ledger=ledger,
        state_dir=tmp_path,
        trusted_keys=trusted,
        defaults=RolloutSection(),
    )
    (r,) = dep.recover()
    assert r.state == ("active" if moved else "rolled_back")
    assert host.events == [(f"rollout.{r.state}", r.reason)]
    assert [u.id for u in ledger.unacked()] == ["dep-1"]
    status, result = Deployer.final_ack(r)
    assert status == ("ok" if moved else "error") and result["outcome"] == r.state


# --- model.deploy arguments -----------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
_GOOD = {"bundle": {"url": "file:///b.tar", "sha256": "a" * 64, "size": 10, "name": "d", "version": "1.1.0"}}


def test_deploy_args_defaults_and_errors_name_the_arg():
    from runtime.config import RolloutSection
    from runtime.deploy import parse_deploy

    spec = parse_deploy(_GOOD, RolloutSection(min_samples=7, canary_share=0.3))
    assert spec["strategy"] == "shadow" and spec["gates"]["min_samples"] == 7 and spec["canary_share"] == 0.3
    assert spec["delta"] is None and spec["bundle"]["profile"] == ""
    bad = [
        ({"bundle": {"url": "x"}}, "args.bundle.sha256"),
        ({**_GOOD, "strategy": "yolo"}, "args.strategy"),
        ({**_GOOD, "gates": {"min_agreement": 2}}, "min_agreement"),
        ({**_GOOD, "gates": {"nope": 1}}, "nope"),
        ({**_GOOD, "canary_share": 0}, "args.canary_share"),
        ({**_GOOD, "delta": {"url": "u", "sha256": "b" * 64}}, "args.delta.from"),
        ({**_GOOD, "extra": 1}, "args.extra"),
    ]
    for args, needle in bad:
        with pytest.raises(CommandError, match=re.escape(needle)):
            parse_deploy(args, RolloutSection())


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["bundle", "delta", "strategy", "gates", "canary_share", "x"]), _JSON))
def test_deploy_args_from_anything_parse_or_raise_a_command_error(args):
    from runtime.config import RolloutSection
    from runtime.deploy import parse_deploy

    try:
        spec = parse_deploy(args, RolloutSection())
    except CommandError:
        return
    json.dumps(spec, allow_nan=False)  # what the ledger stores


# --- booting the served model ---------------------------------------------------------------------


def test_boot_seeds_falls_back_and_takes_a_new_factory_bundle(tmp_path):
    from runtime.config import ServiceConfig
    from runtime.errors import EdgeError, EngineError
    from runtime.manifest import parse_manifest
    from runtime.schema import from_dict
    from runtime.serving import Models

    priv, pub = generate_keypair(tmp_path / "k", "fleet")
    factory = _bundle(tmp_path, priv, "1.0.0")
    cfg = from_dict(ServiceConfig, {"bundle": str(factory), "trusted_keys": [str(pub)], "state_dir": str(tmp_path)})
    broken: set[str] = set()
    events: list[str] = []

    def load(path: Any) -> FakeModel:
        with tarfile.open(path) as tar:
            m = parse_manifest(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        if m.version in broken:
            raise EngineError(f"cannot load {m.version}")
        return FakeModel(m.name, version=m.version)

    def boot() -> Models:
        models = Models(cfg, load=load, trusted_keys=[load_public_key(pub)], event=lambda k, *a, **kw: events.append(k))
        models.boot()
        return models

    models = boot()  # an empty store is seeded from the config's bundle
    assert models.serving().version == "1.0.0" and models.store.is_good()
    models.store.add(_bundle(tmp_path, priv, "1.1.0"), trusted_keys=models.trusted_keys)
    models.store.activate("digits", "1.1.0")
    first = models.serving()
    models.reload(None)  # SIGHUP: follow the store pointer
    assert models.serving().version == "1.1.0" and first.closed
    models.close()
    broken.add("1.1.0")
    models = boot()  # the active version no longer loads: the previous one serves, the pointer follows
    assert models.serving().version == "1.0.0" and models.store.active().version == "1.0.0"
    assert "model.refused" in events
    models.close()
    broken.add("1.0.0")
    with pytest.raises(EdgeError, match="no model can be loaded"):
        boot()  # nothing loads at all: an error, not a service without a model
    broken.clear()
    (tmp_path / "new").mkdir()
    newer = _bundle(tmp_path / "new", priv, "1.2.0")
    cfg = from_dict(ServiceConfig, {"bundle": str(newer), "trusted_keys": [str(pub)], "state_dir": str(tmp_path)})
    models = boot()  # the config names another bundle: it is stored and activated
    assert models.serving().version == "1.2.0" and models.store.previous().version == "1.0.0"
    models.close()
