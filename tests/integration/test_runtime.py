"""`edge-runtime` on bundles built by the toolchain: infer, serve, the local endpoint, sd_notify, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, run_cli


def _val_files(val: Path, n: int | None = None) -> list[Path]:
    files = sorted(val.rglob("*.png"))
    return files[:n] if n else files


def test_infer_json_equals_the_toolchain_validation_run(bundle, keys, digits_dirs):
    from runtime.bundle import open_bundle
    from runtime.engine import EngineOptions
    from runtime.profile import load_profile
    from runtime.signing import load_public_key
    from toolchain.calibration import load_dataset
    from toolchain.validate import run_outputs

    path, report = bundle
    _, val = digits_dirs
    files = _val_files(val)
    res = run_cli(
        "edge-runtime", "infer", "--bundle", str(path), "--trusted-key", str(keys[1]), "--json", *map(str, files)
    )
    assert res.code == 0, res.err
    lines = [json.loads(line) for line in res.out.splitlines()]
    assert [r["input"] for r in lines] == [str(f) for f in files]
    assert all({"input", "latency_ms", "outputs", "top1"} <= set(r) for r in lines)
    assert all(set(r["top1"]) == {"index", "label", "score"} for r in lines)
    # the toolchain's validation run of the same candidate on the same files
    with open_bundle(path, trusted_keys=[load_public_key(keys[1])]) as b:
        ds = load_dataset(val, b.manifest.inputs, b.manifest.preprocess, role="validation")
        opts = EngineOptions.from_profile(load_profile("rpi4"), host_cores=os.cpu_count() or 1)
        expected = run_outputs(b.model_path, [s.feeds for s in ds.samples], opts)
    by_source = {s.source: e for s, e in zip(ds.samples, expected, strict=True)}
    for r in lines:
        got = np.asarray(next(iter(r["outputs"].values())), dtype=np.float32)
        np.testing.assert_allclose(got, by_source[r["input"]], rtol=1e-5, atol=1e-5)
    accuracy = 100 * np.mean([int(r["top1"]["label"]) == int(Path(r["input"]).parent.name) for r in lines])
    assert accuracy == pytest.approx(report["validation"]["candidate_accuracy"], abs=1e-9)


def test_infer_refuses_an_untrusted_bundle(bundle, tmp_path, digits_dirs):
    from runtime.signing import generate_keypair

    path, _ = bundle
    _, other = generate_keypair(tmp_path, "other")
    res = run_cli(
        "edge-runtime",
        "infer",
        "--bundle",
        str(path),
        "--trusted-key",
        str(other),
        str(_val_files(digits_dirs[1], 1)[0]),
    )
    assert res.code == 2 and "not among the trusted keys" in res.err and "Traceback" not in res.err


def test_infer_rejects_a_wrong_input_with_exit_2(bundle, keys, tmp_path):
    bad = tmp_path / "wrong.npy"
    np.save(bad, np.zeros((3, 5), dtype=np.float32))
    res = run_cli("edge-runtime", "infer", "--bundle", str(bundle[0]), "--trusted-key", str(keys[1]), str(bad))
    assert res.code == 2 and "wrong.npy" in res.err and "Traceback" not in res.err


def test_bench_reports_device_numbers(bundle, keys):
    res = run_cli(
        "edge-runtime",
        "bench",
        "--bundle",
        str(bundle[0]),
        "--trusted-key",
        str(keys[1]),
        "--iterations",
        "20",
        "--json",
    )
    assert res.code == 0, res.err
    out = json.loads(res.out)
    assert out["p50_ms"] > 0 and out["p95_ms"] >= out["p50_ms"] and out["thread_plan"]["reason"]


# --- serve ----------------------------------------------------------------------------------------


def _config(tmp_path: Path, bundle: Path, key: Path, **sections: dict) -> Path:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    lines = [
        f'bundle = "{bundle}"',
        f'trusted_keys = ["{key}"]',
        f'state_dir = "{state}"',
        'device_id = "dev-1"',
        "warmup_runs = 1",
    ]
    sections.setdefault("http", {"port": 0})
    for name, values in sections.items():
        lines.append(f"[{name}]")
        for k, v in values.items():
            lines.append(f"{k} = {json.dumps(v)}")
    cfg = tmp_path / "config.toml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def _serve(cfg: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "runtime", "serve", "--config", str(cfg), *extra],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_status(state: Path, proc: subprocess.Popen[str], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    path = state / "status.json"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        if path.is_file():
            try:
                status = json.loads(path.read_text())
            except json.JSONDecodeError:
                status = None
            if status and status.get("http"):
                return status
        time.sleep(0.1)
    raise AssertionError("service did not write status.json")


def _post(port: int, data: bytes, ctype: str = "image/png") -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/infer", data=data, headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read())
        exc.close()
        return exc.code, body


def _stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err


def test_serve_directory_source_logs_what_infer_prints(bundle, keys, digits_dirs, tmp_path):
    path, _ = bundle
    files = _val_files(digits_dirs[1], 12)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i, f in enumerate(files):
        shutil.copy(f, inbox / f"{i:02d}_{f.parent.name}.png")
    cfg = _config(
        tmp_path,
        path,
        keys[1],
        source={"kind": "directory", "path": str(inbox)},
        http={"enabled": False},
        logbook={"flush_interval_s": 0.1},
    )
    proc = _serve(cfg, "--max-items", str(len(files)))
    code, err = _stop_after(proc, 120)
    assert code == 0, err
    infer = run_cli(
        "edge-runtime", "infer", "--bundle", str(path), "--trusted-key", str(keys[1]), "--json", *map(str, files)
    )
    expected = [json.loads(line)["top1"] for line in infer.out.splitlines()]
    db = tmp_path / "state" / "logbook.sqlite"
    rows = run_cli("edge-runtime", "log", "export", "--db", str(db))
    assert rows.code == 0, rows.err
    inferences = [json.loads(x) for x in rows.out.splitlines() if json.loads(x)["table"] == "inferences"]
    assert len(inferences) == len(files)
    got = [r["result"]["top1"] for r in sorted(inferences, key=lambda r: r["input_ref"])]
    assert [g["index"] for g in got] == [e["index"] for e in expected]
    assert [g["score"] for g in got] == pytest.approx([e["score"] for e in expected], rel=1e-5)
    assert not list(inbox.glob("*.png"))  # processed files were moved out of the inbox
    tail = run_cli("edge-runtime", "log", "tail", "--db", str(db), "-n", "3", "--table", "events")
    assert tail.code == 0 and "model.activated" in tail.out


def _stop_after(proc: subprocess.Popen[str], timeout: float) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err


def _tampered_bundles(good: Path, key_dir: Path, out: Path) -> dict[str, Path]:
    """Bad bundles of every kind the runtime must refuse."""
    from runtime.signing import generate_keypair
    from toolchain.bundle import sign_bundle

    out.mkdir()
    with tarfile.open(good) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    bad: dict[str, Path] = {}

    def write(name: str, entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> None:
        p = out / f"{name}.tar"
        with tarfile.open(p, "w") as tar:
            for info, data in entries:
                tar.addfile(info, None if data is None else __import__("io").BytesIO(data))
        bad[name] = p

    def reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        return info, data

    model = bytearray(members["model.onnx"])
    model[len(model) // 2] ^= 0xFF
    write(
        "tampered-file",
        [
            reg("manifest.json", members["manifest.json"]),
            reg("manifest.sig", members["manifest.sig"]),
            reg("model.onnx", bytes(model)),
        ],
    )
    write(
        "missing-model", [reg("manifest.json", members["manifest.json"]), reg("manifest.sig", members["manifest.sig"])]
    )
    write(
        "dotdot-path",
        [
            reg("manifest.json", members["manifest.json"]),
            reg("manifest.sig", members["manifest.sig"]),
            reg("model.onnx", members["model.onnx"]),
            reg("../escape.txt", b"x"),
        ],
    )
    link = tarfile.TarInfo("evil-link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    write(
        "symlink",
        [
            reg("manifest.json", members["manifest.json"]),
            reg("manifest.sig", members["manifest.sig"]),
            reg("model.onnx", members["model.onnx"]),
            (link, None),
        ],
    )
    wrong = out / "wrong-key.tar"
    shutil.copy(good, wrong)
    priv, _ = generate_keypair(key_dir, "intruder")
    sign_bundle(wrong, priv)
    bad["wrong-key"] = wrong
    return bad


def test_bad_bundles_are_refused_and_the_running_model_keeps_serving(bundle, keys, digits_dirs, tmp_path):
    import cv2

    path, _ = bundle
    cfg = _config(tmp_path, path, keys[1], health={"interval_s": 0.2})
    proc = _serve(cfg)
    try:
        status = _wait_status(tmp_path / "state", proc)
        port = status["http"]["port"]
        image = cv2.imencode(".png", cv2.imread(str(_val_files(digits_dirs[1], 1)[0]), cv2.IMREAD_GRAYSCALE))[1]
        code, first = _post(port, image.tobytes())
        assert code == 200 and first["version"] == "1.0.0" and "top1" in first
        for name, bad in _tampered_bundles(path, tmp_path / "k", tmp_path / "bad").items():
            cfg.write_text(cfg.read_text().replace(str(path), str(bad)))
            proc.send_signal(signal.SIGHUP)
            time.sleep(1.0)
            code, again = _post(port, image.tobytes())
            assert code == 200, (name, again)
            assert again["top1"] == first["top1"] and again["version"] == "1.0.0", name
            cfg.write_text(cfg.read_text().replace(str(bad), str(path)))
            assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "bad" / "escape.txt").exists()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            assert resp.status == 200
        code, err = _post(port, b"not an image")
        assert code == 400 and "error" in err
    finally:
        rc, stderr = _stop(proc)
    assert rc == 0, stderr
    events = run_cli("edge-runtime", "log", "export", "--db", str(tmp_path / "state" / "logbook.sqlite"))
    refused = [json.loads(x) for x in events.out.splitlines() if '"model.refused"' in x]
    assert len(refused) == 5, events.out[-2000:]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("[logbook]\nflush_interval = 1\n", "logbook.flush_interval"),
        ('[http]\nport = "eighty"\n', "http.port"),
        ('[source]\nkind = "camera"\nmax_fps = -1\n', "source.max_fps"),
    ],
)
def test_bad_config_exits_2_naming_the_key(bundle, keys, tmp_path, body, needle):
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'bundle = "{bundle[0]}"\ntrusted_keys = ["{keys[1]}"]\nstate_dir = "{tmp_path}"\n{body}')
    res = run_cli("edge-runtime", "serve", "--config", str(cfg))
    assert res.code == 2, res.err
    assert "config.toml" in res.err and needle in res.err and "Traceback" not in res.err


def test_missing_trusted_key_and_bad_bundle_at_start_exit_2(bundle, keys, tmp_path):
    cfg = _config(tmp_path, bundle[0], tmp_path / "nope.pub")
    res = run_cli("edge-runtime", "serve", "--config", str(cfg))
    assert res.code == 2 and "nope.pub" in res.err
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"not a tar at all")
    cfg = _config(tmp_path, broken, keys[1])
    res = run_cli("edge-runtime", "serve", "--config", str(cfg))
    assert res.code == 2 and "broken.tar" in res.err and "Traceback" not in res.err


def _notify_socket(tmp_path: Path) -> tuple[socket.socket, str]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(0.2)
    return sock, path


def _drain(sock: socket.socket, seconds: float) -> list[tuple[float, str]]:
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            out.append((time.monotonic(), sock.recv(4096).decode()))
        except TimeoutError:
            pass
    return out


def test_sd_notify_ready_status_watchdog_and_stall(bundle, keys, digits_dirs, tmp_path):
    path, _ = bundle
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i, f in enumerate(_val_files(digits_dirs[1], 6)):
        shutil.copy(f, inbox / f"{i}.png")
    cfg = _config(
        tmp_path,
        path,
        keys[1],
        source={"kind": "directory", "path": str(inbox)},
        http={"enabled": False},
        watchdog={"stall_after_s": 1.0},
    )
    sock, sock_path = _notify_socket(tmp_path)
    proc = _serve(cfg, env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "400000", "EDGE_TEST_STALL_AFTER": "3"})
    try:
        msgs = _drain(sock, 12.0)
        end = time.monotonic()
    finally:
        _, stderr = _stop(proc)
        sock.close()
    texts = [m for _, m in msgs]
    ready = [m for m in texts if "READY=1" in m]
    assert ready and "STATUS=digits 1.0.0" in ready[0]
    pings = [t for t, m in msgs if "WATCHDOG=1" in m]
    assert len(pings) >= 3, texts
    # after 3 inferences the loop stalls; once the stall passes 1 s the pings stop for good
    assert end - pings[-1] > 2.0, (end - pings[-1], stderr[-3000:])


def test_jetson_bundle_falls_back_from_tensorrt_to_cpu_and_says_so(digits_model, digits_dirs, keys, tmp_path):
    """No GPU here: the Jetson profile's TensorRT → CUDA → CPU order is exercised as fallback only."""
    from runtime.profile import load_profile
    from toolchain.pipeline import BuildRequest, build

    _, weights, _ = digits_model
    res = build(
        BuildRequest(
            model="toolchain.examples:digits_cnn",
            weights=weights,
            input_shapes=((1, 1, 8, 8),),
            profile=load_profile("jetson-nano"),
            output_dir=tmp_path,
            key=keys[0],
            bench_iterations=0,
            validation=str(digits_dirs[1]),
        )
    )
    image = _val_files(digits_dirs[1], 1)[0]
    out = run_cli(
        "edge-runtime", "infer", "--bundle", str(res.bundle), "--trusted-key", str(keys[1]), "--json", str(image)
    )
    assert out.code == 0, out.err
    assert "TensorrtExecutionProvider is not in this onnxruntime build; falling back" in out.err
    assert "CUDAExecutionProvider is not in this onnxruntime build; falling back" in out.err
    assert json.loads(out.out)["top1"]["label"] == image.parent.name


def test_status_and_log_commands(bundle, keys, digits_dirs, tmp_path):
    import cv2

    path, _ = bundle
    cfg = _config(tmp_path, path, keys[1], health={"interval_s": 0.2})
    state = tmp_path / "state"
    proc = _serve(cfg)
    try:
        status = _wait_status(state, proc)
        image = cv2.imencode(".png", cv2.imread(str(_val_files(digits_dirs[1], 1)[0]), cv2.IMREAD_GRAYSCALE))[1]
        for _ in range(5):
            assert _post(status["http"]["port"], image.tobytes())[0] == 200
        time.sleep(0.6)
        live = run_cli("edge-runtime", "status", "--state-dir", str(state), "--json")
        assert live.code == 0, live.err
        info = json.loads(live.out)
        assert info["running"] is True and info["model"]["name"] == "digits" and info["model"]["version"] == "1.0.0"
        assert info["thread_plan"]["reason"] and info["thread_plan"]["intra_op_threads"] >= 1
        assert info["serve"]["inferences"] == 5 and info["health"]["mem_used_mb"] > 0
        human = run_cli("edge-runtime", "status", "--config", str(cfg))
        assert human.code == 0 and "digits" in human.out and "thread_plan" in human.out
    finally:
        rc, err = _stop(proc)
    assert rc == 0, err
    after = json.loads(run_cli("edge-runtime", "status", "--state-dir", str(state), "--json").out)
    assert after["running"] is False and after["logbook_stats"]["rows"]["inferences"] == 5
    db = str(state / "logbook.sqlite")
    csv_out = run_cli("edge-runtime", "log", "export", "--db", db, "--since", "1h", "--format", "csv")
    assert csv_out.code == 0 and csv_out.out.splitlines()[0].startswith(("seq,", "table,"))
    assert len(csv_out.out.splitlines()) > 5
    future = run_cli("edge-runtime", "log", "export", "--db", db, "--since", "2099-01-01T00:00:00")
    assert future.code == 0 and future.out == ""
    bad = run_cli("edge-runtime", "log", "export", "--db", db, "--since", "yesterday")
    assert bad.code == 2 and "--since" in bad.err
    tail = run_cli("edge-runtime", "log", "tail", "--db", db, "-n", "2")
    rows = [json.loads(x) for x in tail.out.splitlines()]
    assert len(rows) == 2 and all(r["result"]["top1"]["label"] for r in rows)


@pytest.mark.parametrize("command", ["infer", "serve", "bench", "status", "log"])
def test_every_runtime_command_has_help(command):
    res = run_cli("edge-runtime", command, "--help")
    assert res.code == 0 and "usage: edge-runtime" in res.out


def test_serve_video_file_with_smoothing(bundle, keys, digits, tmp_path):
    """A video source: every frame of a file (realtime off) is inferred, logged, and smoothed over 3 frames."""
    import cv2

    path, _ = bundle
    video = tmp_path / "digits.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 64))
    frames = [
        cv2.cvtColor(cv2.resize(img, (64, 64), interpolation=cv2.INTER_NEAREST), cv2.COLOR_GRAY2BGR)
        for img in digits.test_images[:12]
    ]
    for f in frames:
        writer.write(f)
    writer.release()
    cfg = _config(
        tmp_path,
        path,
        keys[1],
        http={"enabled": False},
        source={"kind": "video", "path": str(video), "realtime": False, "smoothing_window": 3, "max_fps": 1000},
    )
    code, err = _stop_after(_serve(cfg, "--max-items", "12"), 120)
    assert code == 0, err
    rows = [
        json.loads(x)
        for x in run_cli(
            "edge-runtime", "log", "tail", "--db", str(tmp_path / "state" / "logbook.sqlite"), "-n", "50"
        ).out.splitlines()
    ]
    assert len(rows) == 12 and all("#frame=" in r["input_ref"] for r in rows)
    smoothed = [r["result"]["smoothed"] for r in sorted(rows, key=lambda r: r["seq"])]
    assert [s["frames"] for s in smoothed[:4]] == [1, 2, 3, 3]
    correct = sum(
        int(r["result"]["top1"]["label"]) == int(lab)
        for r, lab in zip(sorted(rows, key=lambda r: r["seq"]), digits.test_labels[:12], strict=True)
    )
    assert correct >= 10  # MJPG compression of upscaled digits costs little accuracy
