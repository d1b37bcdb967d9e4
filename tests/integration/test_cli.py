"""Every toolchain command has help and works from the command line; bad input is one clear line, exit 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import run_cli

COMMANDS = ["profiles", "build", "inspect", "keygen", "sign", "verify", "demo", "fleet"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    res = run_cli(command, "--help")
    assert res.code == 0 and "usage: toolchain" in res.out and len(res.out.splitlines()) > 3


def test_profiles_list_and_show():
    res = run_cli("profiles", "list", "--json")
    assert res.code == 0
    names = [p["name"] for p in json.loads(res.out)]
    assert names == sorted(["generic-arm64", "jetson-nano", "jetson-orin-nano", "rpi3", "rpi4", "rpi5", "x86-64"])
    human = run_cli("profiles", "list")
    assert human.code == 0 and "cortex-a72" in human.out.lower()
    show = run_cli("profiles", "show", "rpi5", "--json")
    assert show.code == 0 and json.loads(show.out)["isa"]["dotprod"] is True


def test_keygen_sign_verify(tmp_path, keys):
    res = run_cli("keygen", "-o", str(tmp_path / "k"))
    assert res.code == 0 and (tmp_path / "k" / "fleet.key").is_file()
    again = run_cli("keygen", "-o", str(tmp_path / "k"))
    assert again.code == 2 and "fleet.key" in again.err and "Traceback" not in again.err


def _one_line_error(res, *needles):
    assert res.code == 2, (res.code, res.err)
    assert "Traceback" not in res.err
    lines = [ln for ln in res.err.splitlines() if ln.startswith("toolchain: error:")]
    assert len(lines) == 1, res.err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_missing_model_file(tmp_path, keys):
    res = run_cli(
        "build",
        str(tmp_path / "nope.onnx"),
        "--profile",
        "rpi4",
        "--key",
        str(keys[0]),
        "-o",
        str(tmp_path),
    )
    _one_line_error(res, "nope.onnx")


def test_corrupt_onnx(tmp_path, keys):
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 100)
    res = run_cli("build", str(bad), "--profile", "rpi4", "--key", str(keys[0]), "-o", str(tmp_path))
    _one_line_error(res, "corrupt.onnx")


def test_unknown_profile(tmp_path, keys):
    res = run_cli("build", "x.onnx", "--profile", "rpi9", "--key", str(keys[0]), "-o", str(tmp_path))
    _one_line_error(res, "rpi9", "rpi4")


def test_bad_toml_key_in_user_profile(tmp_path, keys):
    from importlib import resources

    text = (resources.files("device_profiles") / "rpi4.toml").read_text()
    prof = tmp_path / "myboard.toml"
    prof.write_text(text.replace("[budgets]", "[budgets]\nmax_latency = 3"))
    res = run_cli("build", "x.onnx", "--profile", str(prof), "--key", str(keys[0]), "-o", str(tmp_path))
    _one_line_error(res, "myboard.toml", "budgets.max_latency")


def test_wrong_input_shape(tmp_path, keys, digits_model):
    _, weights, _ = digits_model
    res = run_cli(
        "build",
        "toolchain.examples:digits_cnn",
        "--weights",
        str(weights),
        "--input-shape",
        "1,3,8,8",
        "--profile",
        "rpi4",
        "--key",
        str(keys[0]),
        "-o",
        str(tmp_path),
        "--quantize",
        "none",
    )
    _one_line_error(res, "--input-shape")


def test_empty_calibration_set(tmp_path, keys, digits_model):
    _, weights, _ = digits_model
    empty = tmp_path / "calib"
    empty.mkdir()
    res = run_cli(
        "build",
        "toolchain.examples:digits_cnn",
        "--weights",
        str(weights),
        "--input-shape",
        "1,1,8,8",
        "--profile",
        "rpi4",
        "--calibration",
        str(empty),
        "--key",
        str(keys[0]),
        "-o",
        str(tmp_path),
    )
    _one_line_error(res, "calib")


def test_missing_signing_key(tmp_path):
    res = run_cli(
        "build",
        "x.onnx",
        "--profile",
        "rpi4",
        "--key",
        str(tmp_path / "none.key"),
        "-o",
        str(tmp_path),
    )
    _one_line_error(res, "none.key")


def test_bad_flag_value_exits_2(tmp_path):
    res = run_cli("build", "x.onnx", "--profile", "rpi4", "--quantize", "int3")
    assert res.code == 2 and "--quantize" in res.err and "Traceback" not in res.err


def test_demo_runs_end_to_end(tmp_path):
    """The README's first command (after bootstrap): train, build for rpi4, show the report."""
    res = run_cli("demo", "-o", str(tmp_path / "demo"), "--json")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert report["gate"]["passed"] and report["profile"] == "rpi4"
    assert (tmp_path / "demo" / "dist" / "digits-rpi4-1.0.0.tar").is_file()
    # the bundle then ran under `edge-runtime serve`, offline, and every result is in the SQLite logbook
    demo = report["demo"]
    assert Path(demo["logbook"]).is_file() and len(demo["results"]) == 10
    assert sum(r["true"] == int(r["top1"]) for r in demo["results"]) >= 9
    human = run_cli("demo", "-o", str(tmp_path / "demo2"))
    assert human.code == 0 and "gate: PASSED" in human.out and "bundle:" in human.out
    assert "edge-runtime serve results" in human.out and "logbook:" in human.out


def test_failed_gate_exits_1_with_report_and_no_bundle(tmp_path, keys, digits_model, digits_dirs):
    from importlib import resources

    _, weights, _ = digits_model
    calib, val = digits_dirs
    text = (resources.files("device_profiles") / "rpi4.toml").read_text()
    tight = tmp_path / "tiny-board.toml"
    text = re.sub(r"(?m)^max_model_mb = .*$", "max_model_mb = 0.01", text.replace('name = "rpi4"', 'name = "tiny"'))
    tight.write_text(text)
    out = tmp_path / "dist"
    res = run_cli(
        "build",
        "toolchain.examples:digits_cnn",
        "--weights",
        str(weights),
        "--input-shape",
        "1,1,8,8",
        "--profile",
        str(tight),
        "--calibration",
        str(calib),
        "--validation",
        str(val),
        "--key",
        str(keys[0]),
        "-o",
        str(out),
        "--json",
        "--bench-iterations",
        "0",
    )
    assert res.code == 1, res.err
    assert "validation gate failed" in res.err and "model_size_mb" in res.err and "Traceback" not in res.err
    report = json.loads(res.out)
    assert report["gate"]["passed"] is False and report["bundle"] is None
    assert not list(out.glob("*.tar")) and list(out.glob("*.report.json"))
    forced = run_cli(
        "build",
        "toolchain.examples:digits_cnn",
        "--weights",
        str(weights),
        "--input-shape",
        "1,1,8,8",
        "--profile",
        str(tight),
        "--calibration",
        str(calib),
        "--validation",
        str(val),
        "--key",
        str(keys[0]),
        "-o",
        str(out),
        "--json",
        "--bench-iterations",
        "0",
        "--allow-gate-failure",
    )
    assert forced.code == 0, forced.err
    assert json.loads(forced.out)["gate"]["passed"] is False and list(out.glob("*.tar"))


def test_sign_replaces_the_signature(tmp_path, keys, digits_model, digits_dirs):
    _, weights, _ = digits_model
    res = run_cli(
        "build",
        "toolchain.examples:digits_cnn",
        "--weights",
        str(weights),
        "--input-shape",
        "1,1,8,8",
        "--profile",
        "x86-64",
        "--quantize",
        "none",
        "--key",
        str(keys[0]),
        "-o",
        str(tmp_path),
        "--json",
        "--bench-iterations",
        "0",
        "-q",
    )
    assert res.code == 0, res.err
    bundle = json.loads(res.out)["bundle"]
    new = run_cli("keygen", "-o", str(tmp_path / "k2"))
    assert new.code == 0
    assert run_cli("sign", bundle, "--key", str(tmp_path / "k2" / "fleet.key")).code == 0
    assert run_cli("verify", bundle, "--key", str(tmp_path / "k2" / "fleet.pub")).code == 0
    assert run_cli("verify", bundle, "--key", str(keys[1])).code == 2
