"""Crash-loop rollback with real `edge-runtime serve` processes restarted the way systemd's Restart= does.

A version that kills the process as soon as it is loaded (``EDGE_TEST_CRASH_VERSION``) is activated
on a running service through `edge-runtime models activate` (SIGHUP); after ``crash_limit`` deaths
the next start serves the previous version again, marks it good and logs why.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.conftest import REPO, run_cli

CRASH_LIMIT = 3


def _second_version(bundle: Path, key: Path, out: Path, version: str) -> Path:
    """The same model re-packed and signed as another version (what a retrained model would be)."""
    from runtime.bundle import open_bundle
    from toolchain.bundle import pack

    with open_bundle(bundle, trusted_keys=None, verify_signature=False) as b:
        manifest = b.manifest.with_changes(version=version, parent_version=b.manifest.version)
        files = {f.path: b.path(f.path) for f in b.manifest.files}
        return pack(files, manifest, key, out)


def _config(tmp_path: Path, bundle: Path, key: Path) -> Path:
    lines = [
        f'bundle = "{bundle}"',
        f'trusted_keys = ["{key}"]',
        f'state_dir = "{tmp_path / "state"}"',
        'device_id = "crashy"',
        "warmup_runs = 1",
        "[source]",
        'kind = "directory"',
        f'path = "{tmp_path / "inbox"}"',
        "[http]",
        "enabled = false",
        "[health]",
        "interval_s = 0.2",
        "[logbook]",
        "flush_interval_s = 0.1",
        "[models]",
        f"crash_limit = {CRASH_LIMIT}",
        "crash_window_s = 600",
        "good_after_s = 600",  # nothing gets marked good by surviving during the test
    ]
    cfg = tmp_path / "config.toml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def _serve(cfg: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "EDGE_TEST_CRASH_VERSION": "1.1.0"}
    with open(log, "ab") as err:  # a file, not a pipe: nobody reads while it runs
        return subprocess.Popen(
            [sys.executable, "-m", "runtime", "serve", "--config", str(cfg), *extra],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def _wait_serving(state: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"serve exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            status = json.loads((state / "status.json").read_text())
        except (OSError, ValueError):
            status = {}
        if status.get("pid") == proc.pid and status.get("model"):
            return status
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"serve did not write its status in {timeout} s:\n{log.read_text()[-3000:]}")


def _drop_input(inbox: Path, digits_dirs: tuple[Path, Path], name: str) -> None:
    src = sorted(digits_dirs[1].rglob("*.png"))[0]
    shutil.copy(src, inbox / f".{name}.tmp")
    os.replace(inbox / f".{name}.tmp", inbox / f"{name}.png")  # appears whole


def _systemd_restarts(cfg: Path, log: Path, limit: int) -> list[int]:
    """Start `serve --max-items 1` again after every SIGKILL death (Restart=on-failure); the exit codes."""
    codes: list[int] = []
    for _ in range(limit):
        proc = _serve(cfg, log, "--max-items", "1")
        try:
            codes.append(proc.wait(timeout=120))
        finally:
            proc.kill()
            proc.wait()
        if codes[-1] != -signal.SIGKILL:
            break
    return codes


def test_a_version_that_kills_the_service_is_reverted_after_crash_limit_deaths(
    bundle: tuple[Path, Any], keys: tuple[Path, Path], digits_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    factory, _ = bundle
    priv, pub = keys
    new = _second_version(factory, priv, tmp_path / "digits-1.1.0.tar", "1.1.0")
    cfg, state, inbox, log = (
        _config(tmp_path, factory, pub),
        tmp_path / "state",
        tmp_path / "inbox",
        tmp_path / "serve.log",
    )
    inbox.mkdir()
    added = run_cli("edge-runtime", "models", "add", str(new), "--config", str(cfg))
    assert added.code == 0 and "stored digits 1.1.0" in added.out, added.err

    # the service seeds the factory model (1.0.0) and serves it
    first = _serve(cfg, log)
    try:
        status = _wait_serving(state, first, log)
        assert status["model"]["version"] == "1.0.0"
        act = run_cli("edge-runtime", "models", "activate", "digits", "1.1.0", "--config", str(cfg))
        assert act.code == 0 and f"sent SIGHUP to the service (pid {first.pid})" in act.out, act.out + act.err
        _drop_input(inbox, digits_dirs, "after-activate")  # the source loop takes the reload with its next item
        assert first.wait(timeout=60) == -signal.SIGKILL  # 1.1.0 loaded: death 1
    finally:
        first.kill()
        first.wait()

    codes = _systemd_restarts(cfg, log, limit=CRASH_LIMIT + 3)
    # starts 1 and 2 of the not-yet-good 1.1.0 die (deaths 2 and 3); start 3 reverts and serves 1.0.0
    assert codes == [-signal.SIGKILL] * (CRASH_LIMIT - 1) + [0], log.read_text()[-3000:]

    rows = json.loads(run_cli("edge-runtime", "models", "list", "--json", "--config", str(cfg)).out)
    marks = {r["version"]: (r["active"], r["good"]) for r in rows}
    assert marks == {"1.0.0": (True, True), "1.1.0": (False, False)}
    pointer = json.loads((state / "models" / "ACTIVE").read_text())
    assert pointer["rolled_back_from"] == {"name": "digits", "version": "1.1.0"}

    db = str(state / "logbook.sqlite")
    exported = run_cli("edge-runtime", "log", "export", "--db", db)
    assert exported.code == 0, exported.err
    records = [json.loads(line) for line in exported.out.splitlines()]
    inferences = [r for r in records if r["table"] == "inferences"]
    assert [(r["model_version"], Path(r["input_ref"]).name) for r in inferences] == [("1.0.0", "after-activate.png")]
    crash_events = [r for r in records if r["table"] == "events" and r.get("kind") == "model.crash_loop"]
    assert len(crash_events) == 1, [r.get("kind") for r in records if r["table"] == "events"]
    assert f"{CRASH_LIMIT} starts of digits 1.1.0" in json.dumps(crash_events[0])
    assert "reverted to digits 1.0.0" in json.dumps(crash_events[0])


def test_an_activation_while_stopped_reverts_on_the_crash_limit_th_start(
    bundle: tuple[Path, Any], keys: tuple[Path, Path], digits_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    factory, _ = bundle
    priv, pub = keys
    new = _second_version(factory, priv, tmp_path / "digits-1.1.0.tar", "1.1.0")
    cfg, inbox, log = _config(tmp_path, factory, pub), tmp_path / "inbox", tmp_path / "serve.log"
    inbox.mkdir()
    _drop_input(inbox, digits_dirs, "seed")
    assert _systemd_restarts(cfg, log, limit=1) == [0]  # seeds 1.0.0 (good), infers once, exits
    assert run_cli("edge-runtime", "models", "add", str(new), "--config", str(cfg)).code == 0
    act = run_cli("edge-runtime", "models", "activate", "digits", "1.1.0", "--config", str(cfg))
    assert act.code == 0 and "not running" in act.out
    _drop_input(inbox, digits_dirs, "later")
    codes = _systemd_restarts(cfg, log, limit=CRASH_LIMIT + 3)
    # no death before the first start: starts 1 and 2 die, start 3 (the crash_limit-th) reverts
    assert codes == [-signal.SIGKILL] * (CRASH_LIMIT - 1) + [0], log.read_text()[-3000:]
    status = run_cli("edge-runtime", "models", "list", "--config", str(cfg))
    assert "active, good" in status.out and "1.0.0" in status.out
