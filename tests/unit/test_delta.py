"""Delta bundles: toolchain.delta makes them from real toolchain bundles, runtime.delta applies them or refuses."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.delta import HEADER, DeltaHeader, apply_delta, read_header
from runtime.errors import DeltaError
from tests.conftest import run_cli
from toolchain.delta import diff_bundles, make_delta
from toolchain.errors import UsageError


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def head_changed(model: Any) -> Any:
    """The same network with only the classifier head's weights changed (what retraining the head does)."""
    import torch

    with torch.no_grad():
        head = model[-1]
        head.weight.add_(torch.randn_like(head.weight) * 0.05)
        head.bias.add_(0.01)
    return model


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> dict[str, Path]:
    """Two digits CNN bundles for rpi4 (INT8, built by the toolchain) that differ only in the head."""
    import torch

    from runtime.profile import load_profile
    from toolchain.examples import digits_cnn, digits_split, write_digit_images
    from toolchain.pipeline import BuildRequest, build

    root = tmp_path_factory.mktemp("delta")
    split = digits_split()
    calib = write_digit_images(split.train_images[:64], split.train_labels[:64], root / "calib")
    torch.manual_seed(0)
    model = digits_cnn().eval()
    out: dict[str, Path] = {}
    for version, net in (("1.0.0", model), ("1.1.0", head_changed(model))):
        weights = root / f"{version}.pt"
        torch.save(net.state_dict(), weights)
        res = build(
            BuildRequest(
                model="toolchain.examples:digits_cnn",
                weights=weights,
                input_shapes=((1, 1, 8, 8),),
                profile=load_profile("rpi4"),
                output_dir=root / version,
                key=keys[0],
                calibration=str(calib),
                validation=str(calib),
                name="digits",
                version=version,
                bench_iterations=0,
                enforce_gate=False,
            )
        )
        assert res.bundle is not None
        out[version] = res.bundle
    return out


@pytest.fixture(scope="module")
def delta(bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("delta-out") / "1.0.0-1.1.0.delta"
    diff_bundles(bundles["1.0.0"], bundles["1.1.0"], out)
    return out


def test_round_trip_rebuilds_the_signed_bundle_bit_for_bit(
    bundles: dict[str, Path], delta: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    from runtime.bundle import open_bundle
    from runtime.signing import load_public_key

    new = bundles["1.1.0"]
    out = apply_delta(bundles["1.0.0"], delta, tmp_path / "rebuilt.tar", expected_sha256=_sha(new))
    assert out.read_bytes() == new.read_bytes()
    with open_bundle(out, trusted_keys=[load_public_key(keys[1])]) as opened:  # signature and file hashes
        assert opened.manifest.version == "1.1.0"
    header = read_header(delta.read_bytes())
    assert (header.base_sha256, header.result_sha256) == (_sha(bundles["1.0.0"]), _sha(new))
    assert delta.stat().st_size < 0.2 * new.stat().st_size  # only the head changed: the goal of issue 5


def test_wrong_base_is_refused(bundles: dict[str, Path], delta: Path, tmp_path: Path) -> None:
    with pytest.raises(DeltaError, match="wrong base"):
        apply_delta(bundles["1.1.0"], delta, tmp_path / "out.tar", expected_sha256=_sha(bundles["1.1.0"]))
    assert not (tmp_path / "out.tar").exists()


@pytest.mark.parametrize("keep", [10, HEADER.size + 20, -40])
def test_truncated_delta_is_refused(bundles: dict[str, Path], delta: Path, tmp_path: Path, keep: int) -> None:
    cut = tmp_path / "cut.delta"
    cut.write_bytes(delta.read_bytes()[:keep])
    with pytest.raises(DeltaError, match=r"truncated|corrupt"):
        apply_delta(bundles["1.0.0"], cut, tmp_path / "out.tar", expected_sha256=_sha(bundles["1.1.0"]))
    assert not (tmp_path / "out.tar").exists()


def test_a_corrupted_byte_is_refused(bundles: dict[str, Path], delta: Path, tmp_path: Path) -> None:
    data = bytearray(delta.read_bytes())
    middle = HEADER.size + (len(data) - HEADER.size) // 2
    data[middle] ^= 0x5A
    bad = tmp_path / "bad.delta"
    bad.write_bytes(bytes(data))
    with pytest.raises(DeltaError):
        apply_delta(bundles["1.0.0"], bad, tmp_path / "out.tar", expected_sha256=_sha(bundles["1.1.0"]))
    assert not (tmp_path / "out.tar").exists()


def test_result_hash_mismatch_is_refused(bundles: dict[str, Path], delta: Path, tmp_path: Path) -> None:
    wanted = _sha(bundles["1.1.0"])
    with pytest.raises(DeltaError, match="deploy expects"):  # the delta makes another bundle than the deploy says
        apply_delta(bundles["1.0.0"], delta, tmp_path / "out.tar", expected_sha256="0" * 64)
    # a header that lies about the result: decompression works, the result's hash gives it away
    header = read_header(delta.read_bytes())
    forged = DeltaHeader(header.base_sha256, header.base_size, "e" * 64, header.result_size)
    lying = tmp_path / "lying.delta"
    lying.write_bytes(forged.pack() + delta.read_bytes()[HEADER.size :])
    with pytest.raises(DeltaError, match=f"result is .* sha256 {wanted}"):
        apply_delta(bundles["1.0.0"], lying, tmp_path / "out.tar", expected_sha256="e" * 64)
    assert not (tmp_path / "out.tar").exists()


def test_bad_magic_and_unknown_version(tmp_path: Path) -> None:
    good = DeltaHeader("a" * 64, 1, "b" * 64, 2).pack()
    with pytest.raises(DeltaError, match="magic"):
        read_header(b"XXXXXX" + good[6:])
    with pytest.raises(DeltaError, match="version 9"):
        read_header(DeltaHeader("a" * 64, 1, "b" * 64, 2, version=9).pack())


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_arbitrary_bytes_give_a_header_or_a_delta_error(tmp_path: Path, blob: bytes) -> None:
    base = tmp_path / "base"
    base.write_bytes(b"base bytes")
    delta = tmp_path / "x.delta"
    for data in (blob, DeltaHeader(hashlib.sha256(b"base bytes").hexdigest(), 10, "c" * 64, 5).pack() + blob):
        delta.write_bytes(data)
        with pytest.raises(DeltaError):
            apply_delta(base, delta, tmp_path / "out", expected_sha256="c" * 64)


def test_make_delta_of_arbitrary_bytes_round_trips(tmp_path: Path) -> None:
    old, new = b"x" * 5000 + bytes(range(256)) * 20, b"y" * 100 + b"x" * 5000 + bytes(range(256)) * 19
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "d").write_bytes(make_delta(old, new))
    sha = hashlib.sha256(new).hexdigest()
    assert apply_delta(tmp_path / "old", tmp_path / "d", tmp_path / "new", expected_sha256=sha).read_bytes() == new


def _fake_bundle(path: Path, name: str, profile: str) -> Path:
    manifest = json.dumps({"name": name, "version": "1.0.0", "profile": {"name": profile}}).encode()
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    return path


def test_diff_refuses_another_model_or_profile_unless_forced(bundles: dict[str, Path], tmp_path: Path) -> None:
    old = bundles["1.0.0"]
    for name, profile in (("other", "rpi4"), ("digits", "rpi5")):
        other = _fake_bundle(tmp_path / f"{name}-{profile}.tar", name, profile)
        out = tmp_path / f"{name}-{profile}.delta"
        with pytest.raises(UsageError, match="--force"):
            diff_bundles(old, other, out)
        assert not out.exists()
        info = diff_bundles(old, other, out, force=True)
        assert info.new["name"] == name and info.new["profile"] == profile


def test_cli_bundle_diff_prints_sizes_and_ratio(bundles: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "d.delta"
    cli = run_cli("bundle", "diff", str(bundles["1.0.0"]), str(bundles["1.1.0"]), "-o", str(out), "--json")
    assert cli.code == 0, cli.err
    doc = json.loads(cli.out)
    assert doc["delta_size"] == out.stat().st_size and doc["new_size"] == bundles["1.1.0"].stat().st_size
    assert doc["ratio"] == pytest.approx(doc["delta_size"] / doc["new_size"], abs=1e-4)
    assert doc["old"]["version"] == "1.0.0" and doc["new"]["version"] == "1.1.0"
    other = _fake_bundle(tmp_path / "other.tar", "other", "rpi4")
    refused = run_cli("bundle", "diff", str(bundles["1.0.0"]), str(other), "-o", str(tmp_path / "x.delta"))
    assert refused.code == 2 and "--force" in refused.err and not (tmp_path / "x.delta").exists()
    text = run_cli("bundle", "diff", str(bundles["1.0.0"]), str(bundles["1.1.0"]), "-o", str(out))
    assert text.code == 0 and "% of the new bundle" in text.out
