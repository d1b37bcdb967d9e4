"""The digits CNN built end to end for ARM and x86 profiles: accuracy, size, signature, reproducibility."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from runtime.bundle import open_bundle
from runtime.errors import IntegrityError, SignatureError
from runtime.signing import load_public_key
from tests.conftest import run_cli


@pytest.fixture(scope="module", params=["rpi4", "x86-64"])
def built(request, digits_model, digits_dirs, keys, tmp_path_factory):
    """`toolchain build` through the real CLI, once per profile."""
    _, weights, torch_acc = digits_model
    calib, val = digits_dirs
    out = tmp_path_factory.mktemp(f"dist-{request.param}")
    res = run_cli(
        "build",
        "toolchain.examples:digits_cnn",
        "--weights",
        str(weights),
        "--input-shape",
        "1,1,8,8",
        "--profile",
        request.param,
        "--calibration",
        str(calib),
        "--validation",
        str(val),
        "--name",
        "digits",
        "--key",
        str(keys[0]),
        "-o",
        str(out),
        "--json",
        "--bench-iterations",
        "20",
    )
    assert res.code == 0, res.err
    report = json.loads(res.out)
    return request.param, report, Path(report["bundle"]), torch_acc


def test_int8_accuracy_within_one_point_of_fp32(built):
    profile, report, _, torch_acc = built
    val = report["validation"]
    assert report["precision"] == ("int8-s8s8" if profile == "rpi4" else "int8-u8s8")
    assert val["labeled"] and val["samples"] == 360
    # the FP32 reference through onnxruntime equals what torch measured on the same held-out split
    assert val["reference_accuracy"] == pytest.approx(torch_acc, abs=0.3)
    assert abs(val["reference_accuracy"] - val["candidate_accuracy"]) <= 1.0
    assert report["gate"]["passed"] is True


def test_int8_model_at_most_030_of_fp32_size(built):
    _, report, bundle, _ = built
    assert report["size"]["ratio"] <= 0.30
    with tarfile.open(bundle) as tar:
        model = tar.getmember("model.onnx")
    assert model.size == report["size"]["candidate_bytes"]


def test_bundle_verifies_and_records_the_build(built, keys, tmp_path):
    profile, _report, bundle, _ = built
    res = run_cli("verify", str(bundle), "--key", str(keys[1]))
    assert res.code == 0 and "OK: digits 1.0.0" in res.out
    with open_bundle(bundle, trusted_keys=[load_public_key(keys[1])]) as b:
        m = b.manifest
        assert m.profile.name == profile and m.task == "classification"
        assert m.postprocess.labels == tuple(str(i) for i in range(10)) and m.postprocess.softmax
        assert m.preprocess.kind == "image" and m.preprocess.color == "gray"
        assert m.validation["gate"]["passed"] is True
        assert m.inputs[0].shape == (1, 1, 8, 8)


def test_tampered_bundle_fails_verification(built, keys, tmp_path):
    _, _, bundle, _ = built
    # flip one byte inside the model member, keep the tar well-formed
    with tarfile.open(bundle) as tar:
        member = tar.getmember("model.onnx")
        offset = member.offset_data + member.size // 2
    data = bytearray(bundle.read_bytes())
    data[offset] ^= 0xFF
    bad = tmp_path / "tampered.tar"
    bad.write_bytes(bytes(data))
    res = run_cli("verify", str(bad), "--key", str(keys[1]))
    assert res.code == 2 and "model.onnx" in res.err and "Traceback" not in res.err
    with pytest.raises(IntegrityError):
        open_bundle(bad, trusted_keys=[load_public_key(keys[1])]).cleanup()


def test_wrong_key_fails_verification(built, tmp_path):
    from runtime.signing import generate_keypair

    _, _, bundle, _ = built
    _, other_pub = generate_keypair(tmp_path, "other")
    res = run_cli("verify", str(bundle), "--key", str(other_pub))
    assert res.code == 2 and "not among the trusted keys" in res.err
    with pytest.raises(SignatureError):
        open_bundle(bundle, trusted_keys=[load_public_key(other_pub)]).cleanup()


def test_inspect_shows_manifest(built):
    _, report, bundle, _ = built
    res = run_cli("inspect", str(bundle), "--json")
    assert res.code == 0, res.err
    info = json.loads(res.out)
    assert info["manifest"]["files"][0]["sha256"] == report["model_sha256"]
    human = run_cli("inspect", str(bundle))
    assert human.code == 0 and "digits" in human.out and "model.onnx" in human.out


def test_rebuild_gives_identical_model_bytes(digits_model, digits_dirs, keys, tmp_path):
    """Reproducible: the same inputs give the same model bytes and manifest file hashes."""
    from runtime.profile import load_profile
    from toolchain.pipeline import BuildRequest, build

    _, weights, _ = digits_model
    calib, val = digits_dirs
    hashes = []
    for i in range(2):
        req = BuildRequest(
            model="toolchain.examples:digits_cnn",
            weights=weights,
            input_shapes=((1, 1, 8, 8),),
            profile=load_profile("rpi4"),
            output_dir=tmp_path / f"o{i}",
            key=keys[0],
            calibration=str(calib),
            validation=str(val),
            bench_iterations=0,
        )
        res = build(req)
        with tarfile.open(res.bundle) as tar:
            manifest = json.loads(tar.extractfile("manifest.json").read())
            model = tar.extractfile("model.onnx").read()
        hashes.append((manifest["files"], model))
    assert hashes[0] == hashes[1]
