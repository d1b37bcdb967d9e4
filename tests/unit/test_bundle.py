"""The bundle contract: ed25519 keys, reproducible packing, safe extraction, integrity."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import assume as hypothesis_assume
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.bundle import Bundle, open_bundle, peek_bundle
from runtime.errors import (
    BundleError,
    IntegrityError,
    ManifestError,
    SignatureError,
    UnsafeArchiveError,
)
from runtime.manifest import Manifest, ProfileRef, TensorSpec, parse_manifest
from runtime.signing import (
    Ed25519PrivateKey,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    sign_manifest,
    verify_manifest,
)
from toolchain import bundle as tb
from toolchain.errors import KeyFileError, UsageError

MODEL_BYTES = bytes(range(256)) * 12 + b"tail"
LABELS = b"cat\ndog\n"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    priv, pub = generate_keypair(d)
    other_priv, other_pub = generate_keypair(d, "other")
    return {"priv": priv, "pub": pub, "other_priv": other_priv, "other_pub": other_pub}


def _sources(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.onnx").write_bytes(MODEL_BYTES)
    (root / "labels.txt").write_bytes(LABELS)
    return {"model.onnx": root / "model.onnx", "meta/labels.txt": root / "labels.txt"}


def _manifest(files: dict[str, Path], **changes: object) -> Manifest:
    m = Manifest(
        name="tiny",
        version="1.0.0",
        created="2024-01-01T00:00:00Z",
        profile=ProfileRef(name="rpi4", digest="0" * 64, arch="aarch64"),
        backend="onnxruntime",
        model="model.onnx",
        files=(
            tb.file_entry(files["model.onnx"], "model.onnx"),
            tb.file_entry(files["meta/labels.txt"], "meta/labels.txt", role="labels"),
        ),
        inputs=(TensorSpec("x", "float32", (1, 3), "NC"),),
        outputs=(TensorSpec("y", "float32", (1, 2), "NC"),),
    )
    return m.with_changes(**changes) if changes else m


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Path]) -> Path:
    """A good signed tar, shared read-only by the tests (copy it before tampering)."""
    d = tmp_path_factory.mktemp("packed")
    files = _sources(d / "src")
    return tb.pack(files, _manifest(files), keys["priv"], d / "tiny-1.0.0.tar")


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory, packed: Path, keys: dict[str, Path]) -> Path:
    """The same bundle as a directory (read-only; copy before tampering)."""
    dest = tmp_path_factory.mktemp("dirbundle") / "tiny"
    open_bundle(packed, trusted_keys=[load_public_key(keys["pub"])], dest=dest)
    return dest


@pytest.fixture(scope="module")
def pub(keys: dict[str, Path]) -> list:
    return [load_public_key(keys["pub"])]


def _copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _craft_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _reg(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


# ---------------------------------------------------------------- keys and signatures


def test_keygen_private_key_is_0600_and_loads(tmp_path: Path) -> None:
    priv, pub = generate_keypair(tmp_path / "k")
    assert (priv.name, pub.name) == ("fleet.key", "fleet.pub")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    private, public = load_private_key(priv), load_public_key(pub)
    assert key_id(private) == key_id(public)
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_id(public) == hashlib.sha256(raw).hexdigest()[:16]


def test_keygen_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    priv, pub = generate_keypair(tmp_path)
    before = priv.read_bytes()
    with pytest.raises(SignatureError, match=r"fleet\.key: already exists"):
        generate_keypair(tmp_path)
    assert priv.read_bytes() == before
    pub.unlink()  # only the public half missing: still refused, naming the private key
    with pytest.raises(SignatureError, match=r"fleet\.key"):
        generate_keypair(tmp_path)
    with pytest.raises(KeyFileError, match="already exists") as info:
        tb.generate_keypair(tmp_path)
    assert info.value.path == str(priv)
    generate_keypair(tmp_path, overwrite=True)
    assert priv.read_bytes() != before
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600


def test_key_loading_errors_name_file_and_problem(tmp_path: Path, keys: dict[str, Path]) -> None:
    with pytest.raises(SignatureError, match=r"nope\.key: key file not found"):
        load_private_key(tmp_path / "nope.key")
    (tmp_path / "junk.pem").write_bytes(b"hello")
    with pytest.raises(SignatureError, match=r"junk\.pem: not a PEM key file"):
        load_public_key(tmp_path / "junk.pem")
    with pytest.raises(SignatureError, match="is a public key"):
        load_private_key(keys["pub"])
    with pytest.raises(SignatureError, match="is a private key"):
        load_public_key(keys["priv"])
    ec_key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ec.key").write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(SignatureError, match=r"ec\.key: is a .*not an ed25519 key"):
        load_private_key(tmp_path / "ec.key")
    with pytest.raises(KeyFileError, match="key file not found") as info:
        tb.load_private_key(tmp_path / "nope.key")
    assert info.value.path == str(tmp_path / "nope.key")
    assert info.value.exit_code == 2


def test_signature_is_deterministic_and_verifies(keys: dict[str, Path]) -> None:
    private = load_private_key(keys["priv"])
    sig = sign_manifest(b"{}\n", private)
    assert sig == sign_manifest(b"{}\n", private)
    doc = json.loads(sig)
    assert doc["algorithm"] == "ed25519" and doc["key_id"] == key_id(private)
    assert verify_manifest(b"{}\n", sig, [load_public_key(keys["pub"])]) == key_id(private)
    with pytest.raises(SignatureError, match=r"does not match manifest\.json"):
        verify_manifest(b"{ }\n", sig, [load_public_key(keys["pub"])])


# ---------------------------------------------------------------- pack / verify round trip


def test_pack_verify_round_trip(packed: Path, keys: dict[str, Path], pub: list) -> None:
    result = tb.verify_bundle(packed, [keys["pub"]])
    assert (result.name, result.version) == ("tiny", "1.0.0")
    assert result.key_id == key_id(pub[0])
    assert result.files == ("model.onnx", "meta/labels.txt")
    assert json.loads(json.dumps(result.to_dict()))["files"] == list(result.files)
    with open_bundle(packed, trusted_keys=pub) as bundle:
        root = bundle.root
        assert bundle.model_path.read_bytes() == MODEL_BYTES
        assert bundle.path("meta/labels.txt").read_bytes() == LABELS
        assert bundle.manifest_bytes == (root / "manifest.json").read_bytes()
        assert parse_manifest(bundle.manifest_bytes) == bundle.manifest
        with pytest.raises(KeyError):
            bundle.path("unlisted.bin")
    assert not root.exists(), "the temporary extraction directory is removed on exit"


def test_tar_layout_is_fixed(packed: Path) -> None:
    with tarfile.open(packed) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [
        "manifest.json",
        "manifest.sig",
        "meta/labels.txt",
        "model.onnx",
    ]
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
        assert m.isreg() and not m.pax_headers


def test_pack_is_reproducible(tmp_path: Path, keys: dict[str, Path], packed: Path) -> None:
    files = _sources(tmp_path / "a")
    manifest = _manifest(files)
    first = tb.pack(files, manifest, keys["priv"], tmp_path / "one.tar")
    # Different file times, permissions and output location must not leak into the tar.
    for p in files.values():
        os.utime(p, (1_700_000_000, 1_700_000_000))
        p.chmod(0o600)
    second = tb.pack(files, manifest, keys["priv"], tmp_path / "sub" / "two.tar")
    assert first.read_bytes() == second.read_bytes() == packed.read_bytes()
    assert not list(tmp_path.glob(".*.tmp")), "no temporary files left behind"


def test_source_date_epoch_sets_mtime(tmp_path: Path, keys: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    files = _sources(tmp_path / "src")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    out = tb.pack(files, _manifest(files), keys["priv"], tmp_path / "b.tar")
    with tarfile.open(out) as tar:
        assert {m.mtime for m in tar.getmembers()} == {1_700_000_000}
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(UsageError, match="SOURCE_DATE_EPOCH"):
        tb.pack(files, _manifest(files), keys["priv"], tmp_path / "c.tar")
    assert not (tmp_path / "c.tar").exists()


def test_pack_refuses_files_that_do_not_match_the_manifest(tmp_path: Path, keys: dict[str, Path]) -> None:
    files = _sources(tmp_path / "src")
    manifest = _manifest(files)
    files["model.onnx"].write_bytes(MODEL_BYTES[:-1] + b"!")
    with pytest.raises(IntegrityError, match=r"model\.onnx .*does not match its manifest entry"):
        tb.pack(files, manifest, keys["priv"], tmp_path / "x.tar")
    with pytest.raises(IntegrityError, match=r"extra\.bin is not listed"):
        tb.pack({**files, "extra.bin": files["model.onnx"]}, manifest, keys["priv"], tmp_path / "x.tar")
    with pytest.raises(IntegrityError, match=r"meta/labels\.txt is listed .* no file was given"):
        tb.pack({"model.onnx": files["model.onnx"]}, manifest, keys["priv"], tmp_path / "x.tar")
    with pytest.raises(ManifestError, match="version"):
        tb.pack(files, manifest.with_changes(version="one"), keys["priv"], tmp_path / "x.tar")
    assert not (tmp_path / "x.tar").exists()


def test_sign_bundle_resigns_tar_in_place_reproducibly(tmp_path: Path, packed: Path, keys: dict[str, Path]) -> None:
    target = tmp_path / "b.tar"
    shutil.copyfile(packed, target)
    tb.sign_bundle(target, keys["other_priv"])
    other_id = key_id(load_public_key(keys["other_pub"]))
    assert tb.verify_bundle(target, [keys["other_pub"]]).key_id == other_id
    with pytest.raises(SignatureError, match=f"signed by key {other_id}"):
        tb.verify_bundle(target, [keys["pub"]])
    tb.sign_bundle(target, keys["priv"])  # back to the original key: the original bytes again
    assert target.read_bytes() == packed.read_bytes()


def test_sign_bundle_directory_and_refuses_inconsistent_bundle(
    tmp_path: Path, bundle_dir: Path, keys: dict[str, Path]
) -> None:
    d = _copy_dir(bundle_dir, tmp_path / "d")
    tb.sign_bundle(d, keys["other_priv"])
    assert tb.verify_bundle(d, [keys["other_pub"]]).key_id == key_id(load_public_key(keys["other_pub"]))
    (d / "model.onnx").write_bytes(b"different")
    with pytest.raises(IntegrityError, match=r"model\.onnx"):
        tb.sign_bundle(d, keys["priv"])


def test_inspect_reports_without_trust(packed: Path, bundle_dir: Path, pub: list) -> None:
    info = tb.inspect_bundle(packed)
    assert json.loads(json.dumps(info)) == info
    assert info["kind"] == "tar"
    assert info["sha256"] == hashlib.sha256(packed.read_bytes()).hexdigest()
    assert info["manifest"]["name"] == "tiny"
    assert info["signature"] == {"present": True, "key_id": key_id(pub[0]), "error": None}
    assert [(f["path"], f["size"], f["size_ok"]) for f in info["files"]] == [
        ("model.onnx", len(MODEL_BYTES), True),
        ("meta/labels.txt", len(LABELS), True),
    ]
    assert info["unlisted"] == []
    text = tb.render_inspect(info)
    assert "tiny 1.0.0" in text and key_id(pub[0]) in text
    dir_info = tb.inspect_bundle(bundle_dir)
    assert dir_info["kind"] == "directory" and dir_info["files"] == info["files"]


def test_inspect_shows_unsigned_and_unlisted(tmp_path: Path, bundle_dir: Path) -> None:
    d = _copy_dir(bundle_dir, tmp_path / "d")
    (d / "manifest.sig").unlink()
    (d / "model.onnx").write_bytes(b"short")
    (d / "stray.bin").write_bytes(b"?")
    info = tb.inspect_bundle(d)
    assert info["signature"]["present"] is False
    assert info["files"][0]["stored_size"] == 5 and not info["files"][0]["size_ok"]
    assert info["unlisted"] == ["stray.bin"]
    assert "UNLISTED" in tb.render_inspect(info) and "unsigned" in tb.render_inspect(info)


# ---------------------------------------------------------------- tampering


def _flip_member_byte(tar_path: Path, member: str) -> None:
    with tarfile.open(tar_path) as tar:
        offset = tar.getmember(member).offset_data
    data = bytearray(tar_path.read_bytes())
    data[offset + 7] ^= 0x01
    tar_path.write_bytes(bytes(data))


def test_flipped_model_byte_in_tar_is_integrity_error(tmp_path: Path, packed: Path, pub: list) -> None:
    target = tmp_path / "t.tar"
    shutil.copyfile(packed, target)
    _flip_member_byte(target, "model.onnx")
    dest = tmp_path / "dest"
    with pytest.raises(IntegrityError, match=r"model\.onnx sha256"):
        open_bundle(target, trusted_keys=pub, dest=dest)
    assert not dest.exists(), "a failed open leaves nothing extracted"


def test_edited_manifest_is_signature_error(tmp_path: Path, packed: Path, pub: list) -> None:
    target = tmp_path / "t.tar"
    shutil.copyfile(packed, target)
    with tarfile.open(target) as tar:
        info = tar.getmember("manifest.json")
        original = tar.extractfile(info).read()  # type: ignore[union-attr]
    edited = original.replace(b'"1.0.0"', b'"9.0.0"')
    assert len(edited) == len(original) and edited != original
    data = target.read_bytes().replace(original, edited)
    target.write_bytes(data)
    with pytest.raises(SignatureError, match=r"does not match manifest\.json"):
        open_bundle(target, trusted_keys=pub)


def test_signature_by_untrusted_key_names_it(
    tmp_path: Path, bundle_dir: Path, keys: dict[str, Path], pub: list
) -> None:
    d = _copy_dir(bundle_dir, tmp_path / "d")
    other = load_private_key(keys["other_priv"])
    (d / "manifest.sig").write_bytes(sign_manifest((d / "manifest.json").read_bytes(), other))
    with pytest.raises(SignatureError) as info:
        open_bundle(d, trusted_keys=pub)
    message = str(info.value)
    assert f"signed by key {key_id(other)}" in message
    assert "not among the trusted keys" in message and key_id(pub[0]) in message


def test_missing_signature(tmp_path: Path, bundle_dir: Path, pub: list) -> None:
    d = _copy_dir(bundle_dir, tmp_path / "d")
    (d / "manifest.sig").unlink()
    with pytest.raises(SignatureError, match=r"manifest\.sig is missing"):
        open_bundle(d, trusted_keys=pub)
    opened = open_bundle(d, trusted_keys=None, verify_signature=False)
    assert opened.key_id is None and opened.manifest.name == "tiny"


def test_no_trusted_keys_is_a_clear_error(bundle_dir: Path) -> None:
    with pytest.raises(SignatureError, match="no trusted keys configured"):
        open_bundle(bundle_dir, trusted_keys=[])
    with pytest.raises(UsageError, match="at least one trusted public key"):
        tb.verify_bundle(bundle_dir, [])


def test_missing_model_and_unlisted_file(tmp_path: Path, bundle_dir: Path, pub: list) -> None:
    d = _copy_dir(bundle_dir, tmp_path / "d")
    (d / "model.onnx").unlink()
    with pytest.raises(IntegrityError, match=r"model\.onnx is listed in manifest\.json but"):
        open_bundle(d, trusted_keys=pub)
    d2 = _copy_dir(bundle_dir, tmp_path / "d2")
    (d2 / "meta" / "extra.so").write_bytes(b"payload")
    with pytest.raises(IntegrityError, match=r"meta/extra\.so is not listed"):
        open_bundle(d2, trusted_keys=pub)


def test_missing_manifest(tmp_path: Path, pub: list) -> None:
    tar = _craft_tar(tmp_path / "m.tar", [_reg("model.onnx", MODEL_BYTES)])
    with pytest.raises(ManifestError, match=r"manifest\.json is missing"):
        open_bundle(tar, trusted_keys=pub)


# ---------------------------------------------------------------- unsafe archives


UNSAFE = {
    "absolute": lambda out: [_reg(f"{out}/abs-escape.txt")],
    "dotdot": lambda out: [_reg("../escape.txt")],
    "inner-dotdot": lambda out: [_reg("a/../../inner-escape.txt")],
    "symlink": lambda out: [_special("link", tarfile.SYMTYPE, str(out)), _reg("link/evil.txt")],
    "hardlink": lambda out: [_special("hard", tarfile.LNKTYPE, f"{out}/target.txt")],
    "chardev": lambda out: [_special("null", tarfile.CHRTYPE)],
    "fifo": lambda out: [_special("pipe", tarfile.FIFOTYPE)],
    "duplicate": lambda out: [_reg("model.onnx", b"a"), _reg("model.onnx", b"b")],
    "file-and-dir": lambda out: [_reg("a/b", b"1"), _reg("a", b"2")],
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_archive_is_refused_and_nothing_escapes(
    tmp_path: Path, case: str, keys: dict[str, Path], pub: list
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target.txt").write_bytes(b"keep")
    sandbox = tmp_path / "sandbox"
    dest = sandbox / "dest"
    dest.mkdir(parents=True)
    first = [_reg("manifest.json", b"{}"), _reg("manifest.sig", b"{}")]
    tar = _craft_tar(tmp_path / f"{case}.tar", first + UNSAFE[case](outside))
    with pytest.raises(UnsafeArchiveError, match="member "):
        open_bundle(tar, trusted_keys=pub, dest=dest)
    assert _tree(sandbox) == {"dest"} and _tree(dest) == set(), "nothing extracted"
    assert _tree(outside) == {"target.txt"} and (outside / "target.txt").read_bytes() == b"keep"
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "inner-escape.txt").exists()
    with pytest.raises(UnsafeArchiveError):
        peek_bundle(tar)


def test_tar_bomb_limit(tmp_path: Path, packed: Path, pub: list) -> None:
    with pytest.raises(UnsafeArchiveError, match="more than 1000 bytes"):
        open_bundle(packed, trusted_keys=pub, max_bytes=1000)
    assert open_bundle(packed, trusted_keys=pub, max_bytes=10_000, dest=tmp_path / "ok").key_id


def test_dest_must_be_new_or_empty(tmp_path: Path, packed: Path, pub: list) -> None:
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "old.txt").write_bytes(b"old")
    with pytest.raises(BundleError, match="must be a new or empty directory"):
        open_bundle(packed, trusted_keys=pub, dest=dest)
    assert _tree(dest) == {"old.txt"}


def test_compressed_or_garbage_file_is_bundle_error(tmp_path: Path, pub: list) -> None:
    garbage = tmp_path / "g.tar"
    garbage.write_bytes(b"\x1f\x8b" + b"\x00" * 600)
    with pytest.raises(BundleError, match="not a readable plain tar"):
        open_bundle(garbage, trusted_keys=pub)
    with pytest.raises(BundleError, match="not found"):
        open_bundle(tmp_path / "missing.tar", trusted_keys=pub)


# ---------------------------------------------------------------- directory bundles


def test_directory_bundle_works_like_a_tar(tmp_path: Path, bundle_dir: Path, packed: Path, pub: list) -> None:
    in_place = open_bundle(bundle_dir, trusted_keys=pub)
    assert in_place.root == bundle_dir and not in_place.temporary
    with open_bundle(packed, trusted_keys=pub) as from_tar:
        assert in_place.manifest == from_tar.manifest and in_place.key_id == from_tar.key_id
    copy = open_bundle(bundle_dir, trusted_keys=pub, dest=tmp_path / "copy")
    assert copy.model_path.read_bytes() == MODEL_BYTES
    in_place.cleanup()  # not temporary: a no-op
    assert bundle_dir.exists()


def test_tar_made_by_ordinary_tools_opens(tmp_path: Path, bundle_dir: Path, pub: list) -> None:
    # `tar -C dir -cf b.tar .` style: "./" prefixes, directory entries, real owners and times.
    out = tmp_path / "plain.tar"
    with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(bundle_dir, arcname=".")
    with tarfile.open(out) as tar:
        assert "./meta" in tar.getnames()
    with open_bundle(out, trusted_keys=pub) as bundle:
        assert bundle.model_path.read_bytes() == MODEL_BYTES
    assert tb.inspect_bundle(out)["unlisted"] == []


def test_directory_bundle_refuses_symlinks_and_fifos(tmp_path: Path, bundle_dir: Path, pub: list) -> None:
    d = _copy_dir(bundle_dir, tmp_path / "d")
    (d / "model.onnx").unlink()
    (d / "model.onnx").symlink_to(bundle_dir / "model.onnx")
    with pytest.raises(UnsafeArchiveError, match="symlink"):
        open_bundle(d, trusted_keys=pub)
    d2 = _copy_dir(bundle_dir, tmp_path / "d2")
    os.mkfifo(d2 / "pipe")
    with pytest.raises(UnsafeArchiveError, match="not a regular file"):
        open_bundle(d2, trusted_keys=pub)


# ---------------------------------------------------------------- hypothesis: outside input


@pytest.fixture(scope="module")
def fuzz_base(bundle_dir: Path, keys: dict[str, Path]) -> tuple[Path, Ed25519PrivateKey, list]:
    return bundle_dir, load_private_key(keys["priv"]), [load_public_key(keys["pub"])]


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=16,
)


@settings(max_examples=200, deadline=None)
@given(
    raw=st.binary(max_size=600),
    whole=_JSON,
    field=st.sampled_from(
        [
            "name",
            "version",
            "files",
            "inputs",
            "outputs",
            "model",
            "profile",
            "preprocess",
            "postprocess",
            "format_version",
            "backend",
            "validation",
            "parent_version",
            "bogus",
        ]
    ),
    value=_JSON,
    drop=st.booleans(),
    mode=st.sampled_from(["raw", "json", "field"]),
)
def test_any_signed_manifest_gives_manifest_error_or_bundle(
    fuzz_base: tuple[Path, Ed25519PrivateKey, list],
    raw: bytes,
    whole: object,
    field: str,
    value: object,
    drop: bool,
    mode: str,
) -> None:
    base, private, trusted = fuzz_base
    if mode == "raw":
        data = raw
    elif mode == "json":
        data = json.dumps(whole).encode()
    else:
        doc = json.loads((base / "manifest.json").read_bytes())
        if drop:
            doc.pop(field, None)
        else:
            doc[field] = value
        data = json.dumps(doc).encode()
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        d = _copy_dir(base, Path(tmp) / "b")
        (d / "manifest.json").write_bytes(data)
        (d / "manifest.sig").write_bytes(sign_manifest(data, private))
        try:
            bundle = open_bundle(d, trusted_keys=trusted)
        except ManifestError:
            return
        except IntegrityError:
            parse_manifest(data)  # only a manifest that parses gets as far as the files
            return
        assert isinstance(bundle, Bundle) and bundle.manifest == parse_manifest(data)


@settings(max_examples=200, deadline=None)
@given(
    raw=st.binary(max_size=300),
    field=st.sampled_from(["algorithm", "key_id", "signature", "extra"]),
    value=_JSON,
    drop=st.booleans(),
    mode=st.sampled_from(["raw", "field", "flip"]),
    flip=st.integers(0, 87),
)
def test_any_signature_bytes_give_signature_error(
    fuzz_base: tuple[Path, Ed25519PrivateKey, list],
    raw: bytes,
    field: str,
    value: object,
    drop: bool,
    mode: str,
    flip: int,
) -> None:
    base, _, trusted = fuzz_base
    manifest_bytes = (base / "manifest.json").read_bytes()
    good = json.loads((base / "manifest.sig").read_bytes())
    doc = dict(good)
    if mode == "raw":
        sig = raw
    elif mode == "field":
        if drop:
            doc.pop(field, None)
        else:
            doc[field] = value
        sig = json.dumps(doc).encode()
    else:  # one character of the base64 signature changed
        chars = list(doc["signature"])
        i = flip % len(chars)
        chars[i] = "A" if chars[i] != "A" else "B"
        doc["signature"] = "".join(chars)
        sig = json.dumps(doc).encode()
    hypothesis_assume(mode == "raw" or doc != good)
    with pytest.raises(SignatureError):
        verify_manifest(manifest_bytes, sig, trusted)
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        d = _copy_dir(base, Path(tmp) / "b")
        (d / "manifest.sig").write_bytes(sig)
        with pytest.raises(SignatureError):
            open_bundle(d, trusted_keys=trusted)


@settings(max_examples=250, deadline=None)
@given(
    raw=st.binary(max_size=2048),
    edits=st.lists(st.tuples(st.integers(0, 8191), st.integers(0, 255)), max_size=6),
    cut=st.none() | st.integers(0, 12_000),
    mode=st.sampled_from(["raw", "mutate"]),
)
def test_any_bundle_file_gives_bundle_error_or_bundle(
    packed: Path,
    pub: list,
    raw: bytes,
    edits: list[tuple[int, int]],
    cut: int | None,
    mode: str,
) -> None:
    if mode == "raw":
        data = raw
    else:
        buf = bytearray(packed.read_bytes())
        for index, byte in edits:
            buf[index % len(buf)] = byte
        data = bytes(buf[:cut] if cut is not None else buf)
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        path = Path(tmp) / "b.tar"
        path.write_bytes(data)
        dest = Path(tmp) / "dest"
        try:
            bundle = open_bundle(path, trusted_keys=pub, dest=dest)
        except BundleError:
            assert not dest.exists(), "a refused bundle leaves nothing behind"
            return
        assert bundle.model_path.read_bytes() == MODEL_BYTES
