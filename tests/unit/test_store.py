"""The on-device model store: verified adds, immutable versions, the atomic pointer, collection, crash loops.

Host-free (runtime, numpy, cryptography only): it also runs inside the emulated arm64 root, so bundles
are packed here with ``runtime.signing`` and ``tarfile`` in the bundle format ``runtime.bundle`` reads.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.bundle import open_bundle
from runtime.errors import ConfigError, IntegrityError, SignatureError, StoreError
from runtime.manifest import FileEntry, Manifest, ProfileRef, TensorSpec
from runtime.signing import generate_keypair, load_private_key, load_public_key, sign_manifest
from runtime.store import ACTIVE_FILE, BOOT_FILE, ModelStore, StoredModel, crash_injection
from tests.conftest import REPO, run_cli

# --- bundles packed without the toolchain --------------------------------------------------------------


def make_bundle(
    out: Path,
    key: Path | None,
    *,
    name: str = "digits",
    version: str = "1.0.0",
    payload: bytes = b"model-bytes",
    profile: str = "rpi4",
    tamper: bool = False,
) -> Path:
    """A bundle tar signed with ``key`` (unsigned when None); ``tamper`` changes the model after signing."""
    entry = FileEntry("model.onnx", hashlib.sha256(payload).hexdigest(), len(payload))
    manifest = Manifest(
        name=name,
        version=version,
        created="2026-01-01T00:00:00Z",
        profile=ProfileRef(name=profile, digest="0" * 64, arch="aarch64"),
        backend="onnxruntime",
        model="model.onnx",
        files=(entry,),
        inputs=(TensorSpec("x", "float32", (1, 4), "NC"),),
        outputs=(TensorSpec("y", "float32", (1, 2), "NC"),),
    )
    manifest_bytes = manifest.to_json()
    members = {"manifest.json": manifest_bytes, "model.onnx": payload[:-1] + b"X" if tamper else payload}
    if key is not None:
        members["manifest.sig"] = sign_manifest(manifest_bytes, load_private_key(key))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel, data in members.items():
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


@pytest.fixture(scope="module")
def kp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("store-keys")
    priv, pub = generate_keypair(d)
    other, other_pub = generate_keypair(d, "other")
    return {"priv": priv, "pub": pub, "other": other, "other_pub": other_pub}


@pytest.fixture()
def trusted(kp: dict[str, Path]) -> list[Any]:
    return [load_public_key(kp["pub"])]


@pytest.fixture()
def bundles(tmp_path: Path, kp: dict[str, Path]) -> dict[str, Path]:
    """Four signed versions of one model, with distinct bytes."""
    return {
        v: make_bundle(tmp_path / "src" / f"digits-{v}.tar", kp["priv"], version=v, payload=f"w{v}".encode() * 50)
        for v in ("1.0.0", "1.1.0", "1.2.0", "1.3.0")
    }


def _store_with(root: Path, bundles: dict[str, Path], trusted: list[Any], *versions: str, keep: int = 3) -> ModelStore:
    store = ModelStore(root, keep=keep)
    for v in versions:
        store.add(bundles[v], trusted_keys=trusted)
    return store


def _hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".") and p.name != ".lock")


# --- adding and reading ---------------------------------------------------------------------------------


def test_add_verifies_and_stores_the_bundle_as_received(tmp_path: Path, bundles: dict[str, Path], trusted: Any) -> None:
    store = ModelStore(tmp_path / "models")
    m = store.add(bundles["1.0.0"], trusted_keys=trusted, source="file:///x")
    raw = bundles["1.0.0"].read_bytes()
    assert (m.name, m.version, m.profile, m.size) == ("digits", "1.0.0", "rpi4", len(raw))
    assert m.sha256 == hashlib.sha256(raw).hexdigest() and m.path.read_bytes() == raw
    assert m.path == tmp_path / "models" / "digits" / "1.0.0" / "bundle.tar"
    meta = json.loads((m.path.parent / "meta.json").read_text())
    assert meta["sha256"] == m.sha256 and meta["source"] == "file:///x"
    assert store.get("digits", "1.0.0") == m and store.active() is None and not store.is_good()
    assert _hidden(tmp_path / "models") == []  # the staging directory is gone
    with open_bundle(m.path, trusted_keys=trusted) as b:  # what landed verifies on its own
        assert b.manifest.version == "1.0.0"


def test_a_bundle_directory_is_stored_as_a_verifiable_tar(
    tmp_path: Path, bundles: dict[str, Path], trusted: Any
) -> None:
    src = tmp_path / "dir-bundle"
    src.mkdir()
    with tarfile.open(bundles["1.1.0"]) as tar:  # by hand: bookworm's Python 3.11.2 lacks extraction filters
        for info in tar.getmembers():
            fh = tar.extractfile(info)
            assert fh is not None
            (src / info.name).write_bytes(fh.read())
    m = ModelStore(tmp_path / "models").add(src, trusted_keys=trusted)
    assert m.version == "1.1.0" and tarfile.is_tarfile(m.path)
    with open_bundle(m.path, trusted_keys=trusted) as b:
        assert b.model_path.read_bytes() == b"w1.1.0" * 50


def test_list_is_newest_first_and_get_names_what_is_held(
    tmp_path: Path, bundles: dict[str, Path], trusted: Any
) -> None:
    store = _store_with(tmp_path / "m", bundles, trusted, "1.0.0", "1.2.0", "1.1.0")
    assert [m.version for m in store.list()] == ["1.1.0", "1.2.0", "1.0.0"]
    with pytest.raises(StoreError, match=r"digits 9\.9\.9 is not in the store .*digits 1\.1\.0"):
        store.get("digits", "9.9.9")
    with pytest.raises(StoreError, match="not a model name"):
        store.get("../etc", "1.0.0")


@pytest.mark.parametrize("case", ["tampered", "unsigned", "untrusted", "missing", "not-a-tar"])
def test_add_refuses_what_does_not_verify(tmp_path: Path, kp: dict[str, Path], trusted: Any, case: str) -> None:
    src = tmp_path / "bad.tar"
    if case == "tampered":
        make_bundle(src, kp["priv"], tamper=True)
    elif case == "unsigned":
        make_bundle(src, None)
    elif case == "untrusted":
        make_bundle(src, kp["other"])
    elif case == "not-a-tar":
        src.write_bytes(b"definitely not a tar" * 100)
    store = ModelStore(tmp_path / "models")
    with pytest.raises(StoreError, match=r"refused: .*bad\.tar: ") as info:
        store.add(src, trusted_keys=trusted)
    if case == "tampered":
        assert isinstance(info.value.__cause__, IntegrityError)
    if case in ("unsigned", "untrusted"):
        assert isinstance(info.value.__cause__, SignatureError)
    assert "staging" not in str(info.value)  # the error names the bundle given, not the staged copy
    assert store.list() == [] and _hidden(tmp_path / "models") == []


def test_versions_are_immutable(tmp_path: Path, kp: dict[str, Path], bundles: dict[str, Path], trusted: Any) -> None:
    store = ModelStore(tmp_path / "models")
    first = store.add(bundles["1.0.0"], trusted_keys=trusted)
    assert store.add(bundles["1.0.0"], trusted_keys=trusted) == first  # same bytes again: a no-op
    other = make_bundle(tmp_path / "other.tar", kp["priv"], version="1.0.0", payload=b"retrained")
    with pytest.raises(StoreError, match="immutable"):
        store.add(other, trusted_keys=trusted)
    assert store.get("digits", "1.0.0").path.read_bytes() == bundles["1.0.0"].read_bytes()
    for f in first.path.parent.iterdir():
        assert f.stat().st_mode & 0o222 == 0, f  # read-only on disk


def test_concurrent_adds_of_one_bundle_store_it_once(tmp_path: Path, bundles: dict[str, Path], trusted: Any) -> None:
    store = ModelStore(tmp_path / "models")
    results: list[StoredModel] = []
    errors: list[BaseException] = []

    def add() -> None:
        try:
            results.append(store.add(bundles["1.2.0"], trusted_keys=trusted))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=add) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 6 and len(set(results)) == 1
    assert [m.version for m in store.list()] == ["1.2.0"] and _hidden(tmp_path / "models") == []


def test_threads_switching_one_store_keep_the_pointer_whole(
    tmp_path: Path, bundles: dict[str, Path], trusted: Any
) -> None:
    store = _store_with(tmp_path / "m", bundles, trusted, "1.0.0", "1.1.0", "1.2.0")
    store.activate("digits", "1.0.0")
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(15):
                store.activate("digits", ("1.0.0", "1.1.0", "1.2.0")[(i + j) % 3])
                if j % 3 == 0:
                    store.mark_good()
                store.boot(crash_limit=1000, window_s=60)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    ptr = json.loads((tmp_path / "m" / ACTIVE_FILE).read_text())
    active, prev = store.active(), store.previous()
    assert active is not None and active.version == ptr["version"]
    assert prev is None or prev.key != active.key
    assert len(store.list()) == 3 and _hidden(tmp_path / "m") == []


# --- the pointer ----------------------------------------------------------------------------------------


def test_activate_keeps_previous_and_starts_not_good(tmp_path: Path, bundles: dict[str, Path], trusted: Any) -> None:
    store = _store_with(tmp_path / "m", bundles, trusted, "1.0.0", "1.1.0")
    assert store.activate("digits", "1.0.0").version == "1.0.0"
    assert store.previous() is None and not store.is_good()
    store.mark_good()
    assert store.is_good()
    store.activate("digits", "1.1.0")
    active, prev = store.active(), store.previous()
    assert active is not None and prev is not None
    assert (active.version, prev.version, store.is_good()) == ("1.1.0", "1.0.0", False)
    ptr = json.loads((tmp_path / "m" / ACTIVE_FILE).read_text())
    assert ptr["previous"] == {"name": "digits", "version": "1.0.0"} and ptr["good"] is False
    with pytest.raises(StoreError, match="not in the store"):
        store.activate("digits", "7.0.0")
    assert store.active() == active  # a refused activation changes nothing


def test_previous_stays_a_version_that_served_well(tmp_path: Path, bundles: dict[str, Path], trusted: Any) -> None:
    store = _store_with(tmp_path / "m", bundles, trusted, "1.0.0", "1.1.0", "1.2.0")
    store.activate("digits", "1.0.0")
    store.mark_good()
    store.activate("digits", "1.1.0")  # not yet good…
    store.activate("digits", "1.2.0")  # …so 1.0.0, not 1.1.0, is what a crash loop returns to
    prev = store.previous()
    assert prev is not None and prev.version == "1.0.0"
    store.mark_good()
    store.activate("digits", "1.1.0")
    prev = store.previous()
    assert prev is not None and prev.version == "1.2.0"


def test_rollback_to_previous_and_to_a_named_version(tmp_path: Path, bundles: dict[str, Path], trusted: Any) -> None:
    store = _store_with(tmp_path / "m", bundles, trusted, "1.0.0", "1.1.0", "1.2.0")
    with pytest.raises(StoreError, match="no previous version"):
        store.rollback()
    store.activate("digits", "1.0.0")
    store.mark_good()
    store.activate("digits", "1.1.0")
    back = store.rollback()
    assert back.version == "1.0.0" and store.is_good() and store.previous() is None
    ptr = json.loads((tmp_path / "m" / ACTIVE_FILE).read_text())
    assert ptr["rolled_back_from"] == {"name": "digits", "version": "1.1.0"}
    with pytest.raises(StoreError, match=r"no previous version.*--to"):
        store.rollback()
    store.activate("digits", "1.2.0")
    store.mark_good()
    named = store.rollback(("digits", "1.1.0"))
    prev = store.previous()
    assert named.version == "1.1.0" and prev is not None and prev.version == "1.0.0"
    with pytest.raises(StoreError, match="already the active version"):
        store.rollback(("digits", "1.1.0"))


def test_collect_keeps_k_versions_and_never_active_or_previous(
    tmp_path: Path, bundles: dict[str, Path], trusted: Any
) -> None:
    store = _store_with(tmp_path / "m", bundles, trusted, "1.0.0", "1.1.0", "1.2.0", "1.3.0", keep=2)
    store.activate("digits", "1.0.0")  # collects: active 1.0.0 + the newest other one
    assert [m.version for m in store.list()] == ["1.3.0", "1.0.0"]
    store.mark_good()
    store.add(bundles["1.1.0"], trusted_keys=trusted)
    assert [m.version for m in store.collect(protect=[("digits", "1.1.0")])] == ["1.3.0"]
    assert {m.version for m in store.list()} == {"1.0.0", "1.1.0"}
    store.activate("digits", "1.1.0")  # active 1.1.0, previous 1.0.0: both kept although keep=2 is full
    store.add(bundles["1.2.0"], trusted_keys=trusted)
    removed = store.collect()
    assert [m.version for m in removed] == ["1.2.0"]
    assert {m.version for m in store.list()} == {"1.0.0", "1.1.0"}
    assert not (tmp_path / "m" / "digits" / "1.2.0").exists() and _hidden(tmp_path / "m") == []


def test_a_damaged_pointer_reads_as_no_active_model(tmp_path: Path, bundles: dict[str, Path], trusted: Any) -> None:
    store = _store_with(tmp_path / "m", bundles, trusted, "1.0.0")
    (tmp_path / "m" / ACTIVE_FILE).write_text('{"name": "digits", "vers')
    assert store.active() is None and store.previous() is None and not store.is_good()
    decision = store.boot(crash_limit=3, window_s=60)
    assert decision.model is None and "no active model" in decision.reason
    store.activate("digits", "1.0.0")  # seeding again repairs it
    active = store.active()
    assert active is not None and active.version == "1.0.0"


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_arbitrary_pointer_and_boot_files_give_a_decision_not_a_crash(tmp_path: Path, raw: bytes) -> None:
    root = tmp_path / "fuzz"
    root.mkdir(exist_ok=True)
    (root / ACTIVE_FILE).write_bytes(raw)
    (root / BOOT_FILE).write_bytes(raw)
    store = ModelStore(root)
    assert store.active() is None  # nothing is held, whatever the pointer says
    assert store.boot(crash_limit=2, window_s=10, now=5.0).model is None


# --- crash loops ----------------------------------------------------------------------------------------


def _boot(root: Path, now: float, *, limit: int = 3, window: float = 600) -> Any:
    """One process start: a fresh store object, as a restarted service would open."""
    return ModelStore(root).boot(crash_limit=limit, window_s=window, now=now)


def test_boot_reverts_on_the_nth_start_within_the_window(
    tmp_path: Path, bundles: dict[str, Path], trusted: Any
) -> None:
    root = tmp_path / "m"
    store = _store_with(root, bundles, trusted, "1.0.0", "1.1.0")
    store.activate("digits", "1.0.0")
    store.mark_good()
    assert _boot(root, 0.0).reason == "digits 1.0.0 is marked good"
    store.activate("digits", "1.1.0")
    first, second = _boot(root, 1000.0), _boot(root, 1010.0)
    assert (first.starts, second.starts) == (1, 2) and not first.reverted and not second.reverted
    assert first.model is not None and first.model.version == "1.1.0"
    third = _boot(root, 1020.0)
    assert third.reverted and third.model is not None and third.reverted_from is not None
    assert (third.model.version, third.reverted_from.version) == ("1.0.0", "1.1.0")
    assert (
        "crash loop" in third.reason and "digits 1.1.0" in third.reason and "reverted to digits 1.0.0" in third.reason
    )
    active = store.active()
    assert active is not None and active.version == "1.0.0" and store.is_good()
    assert not (root / BOOT_FILE).exists()
    assert _boot(root, 1030.0).reason == "digits 1.0.0 is marked good"  # and it stays there


def test_starts_outside_the_window_do_not_add_up(tmp_path: Path, bundles: dict[str, Path], trusted: Any) -> None:
    root = tmp_path / "m"
    store = _store_with(root, bundles, trusted, "1.0.0", "1.1.0")
    store.activate("digits", "1.0.0")
    store.mark_good()
    store.activate("digits", "1.1.0")
    decisions = [_boot(root, t, window=100) for t in (0.0, 150.0, 300.0, 450.0, 500.0)]
    assert [d.starts for d in decisions[:4]] == [1, 1, 1, 1] and not any(d.reverted for d in decisions[:4])
    assert decisions[4].starts == 2  # 450 and 500 are within 100 s
    assert _boot(root, 520.0, window=100).reverted


def test_mark_good_and_reactivation_reset_the_count(tmp_path: Path, bundles: dict[str, Path], trusted: Any) -> None:
    root = tmp_path / "m"
    store = _store_with(root, bundles, trusted, "1.0.0", "1.1.0", "1.2.0")
    store.activate("digits", "1.0.0")
    store.mark_good()
    store.activate("digits", "1.1.0")
    _boot(root, 0.0)
    _boot(root, 1.0)
    store.mark_good()  # it survived good_after_s: crashes from now on are not a new version's fault
    assert not _boot(root, 2.0).reverted and not (root / BOOT_FILE).exists()
    store.activate("digits", "1.2.0")
    _boot(root, 3.0)
    _boot(root, 4.0)
    store.activate("digits", "1.0.0")
    store.activate("digits", "1.2.0")  # a new activation of the same version counts afresh
    assert _boot(root, 5.0).starts == 1


def test_a_crash_loop_without_previous_is_reported_and_keeps_the_model(
    tmp_path: Path, bundles: dict[str, Path], trusted: Any
) -> None:
    root = tmp_path / "m"
    store = _store_with(root, bundles, trusted, "1.0.0")
    store.activate("digits", "1.0.0")
    decisions = [_boot(root, float(t), limit=2) for t in range(3)]
    last = decisions[-1]
    assert not last.reverted and last.model is not None and last.model.version == "1.0.0"
    assert "no previous version to revert to" in last.reason and last.starts >= 2


def test_boot_with_an_empty_store(tmp_path: Path) -> None:
    decision = ModelStore(tmp_path / "m").boot(crash_limit=3, window_s=600)
    assert decision.model is None and decision.reverted_from is None and "no active model" in decision.reason
    with pytest.raises(StoreError, match="no active model"):
        ModelStore(tmp_path / "m").mark_good()


# --- kill -9 --------------------------------------------------------------------------------------------

_FLIPPER = """
import sys
from runtime.store import ModelStore
store = ModelStore(sys.argv[1])
print("ready", flush=True)
while True:
    for v in ("1.0.0", "1.1.0"):
        store.activate("digits", v)
"""

_SLOW_ADD = """
import sys, time
import runtime.store as s
from runtime.signing import load_public_key
real = s.open_bundle
def slow(*args, **kwargs):
    b = real(*args, **kwargs)
    print("verified", flush=True)
    time.sleep(120)
    return b
s.open_bundle = slow
s.ModelStore(sys.argv[1]).add(sys.argv[2], trusted_keys=[load_public_key(sys.argv[3])])
"""


def _child(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, env=env)


def test_kill_9_during_activation_leaves_the_old_or_the_new_pointer(
    tmp_path: Path, bundles: dict[str, Path], trusted: Any
) -> None:
    root = tmp_path / "m"
    store = _store_with(root, bundles, trusted, "1.0.0", "1.1.0")
    store.activate("digits", "1.0.0")
    for delay in (0.05, 0.13, 0.21, 0.34, 0.55):
        with _child(_FLIPPER, str(root)) as proc:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        ptr = json.loads((root / ACTIVE_FILE).read_text())  # always whole JSON
        assert ptr["version"] in ("1.0.0", "1.1.0") and ptr["name"] == "digits"
        reopened = ModelStore(root)  # cleans the temp file a kill may have left
        active = reopened.active()
        assert active is not None and active.version == ptr["version"]
        assert _hidden(root) == []


def test_kill_9_during_add_never_lists_a_half_copied_version(
    tmp_path: Path, kp: dict[str, Path], bundles: dict[str, Path], trusted: Any
) -> None:
    root = tmp_path / "m"
    ModelStore(root)
    with _child(_SLOW_ADD, str(root), str(bundles["1.3.0"]), str(kp["pub"])) as proc:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "verified"
        staged = [p for p in root.iterdir() if p.name.startswith(".staging-")]
        assert staged and (staged[0] / "bundle.tar").is_file()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    store = ModelStore(root)
    assert store.list() == [] and _hidden(root) == []
    assert store.add(bundles["1.3.0"], trusted_keys=trusted).version == "1.3.0"  # and it can be added again


# --- fault injection, config, CLI -----------------------------------------------------------------------


def test_crash_injection_names_the_version_and_kills_only_for_it() -> None:
    assert crash_injection({}) is None and crash_injection({"EDGE_TEST_CRASH_VERSION": " 1.1.0 "}) == "1.1.0"
    code = "import sys\nfrom runtime.store import inject_crash\ninject_crash('1.1.0', sys.argv[1])\nprint('alive')"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    spared = subprocess.run([sys.executable, "-c", code, "1.0.0"], env=env, capture_output=True, text=True)
    killed = subprocess.run([sys.executable, "-c", code, "1.1.0"], env=env, capture_output=True, text=True)
    assert spared.returncode == 0 and spared.stdout.strip() == "alive"
    assert killed.returncode == -signal.SIGKILL and killed.stdout == ""


def test_models_config_section_is_validated(tmp_path: Path, kp: dict[str, Path]) -> None:
    from runtime.config import load_config

    cfg_path = tmp_path / "config.toml"
    base = f'bundle = "b.tar"\ntrusted_keys = ["{kp["pub"]}"]\n'
    cfg_path.write_text(base + "[models]\nkeep = 5\ncrash_window_s = 60\n")
    cfg = load_config(cfg_path, env={})
    assert (cfg.models.keep, cfg.models.crash_limit, cfg.models.crash_window_s, cfg.models.good_after_s) == (
        5,
        3,
        60.0,
        120.0,
    )
    for bad, key in (("keep = 0", "models.keep"), ("crash_limit = -1", "models.crash_limit"), ("x = 1", "models.x")):
        cfg_path.write_text(base + f"[models]\n{bad}\n")
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(cfg_path, env={})


def test_models_cli_list_activate_rollback(tmp_path: Path, bundles: dict[str, Path], kp: dict[str, Path]) -> None:
    state = str(tmp_path / "state")
    assert "no models in" in run_cli("edge-runtime", "models", "list", "--state-dir", state).out
    for v in ("1.0.0", "1.1.0"):
        res = run_cli(
            "edge-runtime", "models", "add", str(bundles[v]), "--trusted-key", str(kp["pub"]), "--state-dir", state
        )
        assert res.code == 0 and f"stored digits {v}" in res.out, res.err
    bad = run_cli(
        "edge-runtime",
        "models",
        "add",
        str(bundles["1.2.0"]),
        "--trusted-key",
        str(kp["other_pub"]),
        "--state-dir",
        state,
    )
    assert bad.code == 1 and "not among the trusted keys" in bad.err and "Traceback" not in bad.err
    act = run_cli("edge-runtime", "models", "activate", "digits", "1.0.0", "--state-dir", state)
    assert act.code == 0 and "active: digits 1.0.0" in act.out and "not running" in act.out
    run_cli("edge-runtime", "models", "activate", "digits", "1.1.0", "--state-dir", state)
    rows = json.loads(run_cli("edge-runtime", "models", "list", "--json", "--state-dir", state).out)
    marks = {r["version"]: (r["active"], r["previous"], r["good"]) for r in rows}
    assert marks == {"1.1.0": (True, False, False), "1.0.0": (False, True, False)}
    text = run_cli("edge-runtime", "models", "list", "--state-dir", state).out
    assert "active, not yet good" in text and "previous" in text and "rpi4" in text
    back = run_cli("edge-runtime", "models", "rollback", "--state-dir", state)
    assert back.code == 0 and "active: digits 1.0.0 (rolled back)" in back.out
    to = run_cli("edge-runtime", "models", "rollback", "--to", "1.1.0", "--state-dir", state)
    assert to.code == 0 and "active: digits 1.1.0" in to.out
    missing = run_cli("edge-runtime", "models", "activate", "digits", "3.0.0", "--state-dir", state)
    assert missing.code == 1 and "digits 3.0.0 is not in the store" in missing.err
    assert run_cli("edge-runtime", "models", "--help").code == 0


_HUP_WAITER = """
import signal, sys, time
from pathlib import Path
signal.signal(signal.SIGHUP, lambda *_: (Path(sys.argv[1]).write_text("hup"), sys.exit(0)))
print("ready", flush=True)
time.sleep(60)
"""


def test_activate_signals_a_running_service(tmp_path: Path, bundles: dict[str, Path], trusted: Any) -> None:
    state = tmp_path / "state"
    _store_with(state / "models", bundles, trusted, "1.0.0", "1.1.0").activate("digits", "1.0.0")
    marker = tmp_path / "hup"
    # a stand-in for `edge-runtime serve`: its command line reads like the service's
    with subprocess.Popen(
        [sys.executable, "-c", _HUP_WAITER, str(marker), "edge-runtime", "serve"], stdout=subprocess.PIPE, text=True
    ) as waiter:
        assert waiter.stdout is not None and waiter.stdout.readline().strip() == "ready"
        (state / "status.json").write_text(json.dumps({"pid": waiter.pid}))
        res = run_cli("edge-runtime", "models", "activate", "digits", "1.1.0", "--state-dir", str(state))
        if waiter.poll() is None and not marker.exists():
            waiter.kill()
        assert res.code == 0 and f"sent SIGHUP to the service (pid {waiter.pid})" in res.out
        assert waiter.wait(timeout=10) == 0 and marker.read_text() == "hup"
    (state / "status.json").write_text(json.dumps({"pid": os.getpid() + 10**6}))  # stale: no such process
    res = run_cli("edge-runtime", "models", "rollback", "--state-dir", str(state))
    assert res.code == 0 and "not running" in res.out
    with subprocess.Popen(["sleep", "30"]) as other:  # a stale pid reused by another program: left alone
        (state / "status.json").write_text(json.dumps({"pid": other.pid}))
        res = run_cli("edge-runtime", "models", "activate", "digits", "1.1.0", "--state-dir", str(state))
        alive = other.poll() is None
        other.kill()
    assert res.code == 0 and "not running" in res.out and alive
