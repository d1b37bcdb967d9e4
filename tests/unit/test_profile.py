"""Device profiles: the seven shipped files, loading by name and path, errors, parser robustness."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.errors import ConfigError, ProfileError
from runtime.profile import (
    KNOWN_PROVIDERS,
    Budgets,
    CpuCluster,
    CpuSpec,
    DeviceProfile,
    ExportSpec,
    IsaFeatures,
    PruningSpec,
    QuantizationSpec,
    RuntimeSpec,
    builtin_profile_names,
    load_profile,
    parse_profile,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

FUZZ = settings(max_examples=200, deadline=None)


class Board(NamedTuple):
    """What each shipped profile must say, taken from the board captures its comment cites."""

    arch: str
    memory_mb: int
    core_count: int
    big_cores: tuple[int, ...]
    threads: int
    max_mhz: int
    accelerator: str
    capture: str | None  # board folder the file's header comment must cite


BOARDS = {
    "rpi3": Board("aarch64", 1024, 4, (0, 1, 2, 3), 4, 1200, "none", "boards/rpi3/"),
    "rpi4": Board("aarch64", 4096, 4, (0, 1, 2, 3), 4, 1500, "none", "boards/rpi4/"),
    "rpi5": Board("aarch64", 8192, 4, (0, 1, 2, 3), 4, 2400, "none", "boards/rpi5/"),
    "jetson-nano": Board("aarch64", 4096, 4, (0, 1, 2, 3), 4, 1479, "tensorrt", "boards/jetson_nano/"),
    "jetson-orin-nano": Board("aarch64", 8192, 6, (0, 1, 2, 3), 4, 1510, "tensorrt", "boards/jetson_orin/"),
    "generic-arm64": Board("aarch64", 1024, 4, (0, 1, 2, 3), 4, 0, "none", "boards/"),
    "x86-64": Board("x86_64", 16384, 4, (0, 1, 2, 3), 4, 0, "none", None),
}
ARM = [n for n, b in BOARDS.items() if b.arch == "aarch64"]
JETSONS = ["jetson-nano", "jetson-orin-nano"]


def _shipped_dict(name: str) -> dict[str, Any]:
    """A fresh plain form of a shipped profile, safe to mutate."""
    return load_profile(name).to_dict()


def _shipped_text(name: str) -> str:
    return (resources.files("device_profiles") / f"{name}.toml").read_text(encoding="utf-8")


def _write(tmp_path: Path, filename: str, text: str) -> Path:
    path = tmp_path / filename
    path.write_text(text, encoding="utf-8")
    return path


def _load_edited(tmp_path: Path, old: str, new: str, *, base: str = "rpi5") -> DeviceProfile:
    """Load a copy of a shipped profile (as ``<base>.toml``) with ``old`` replaced by ``new``."""
    text = _shipped_text(base)
    assert old in text, f"test setup: {old!r} not in {base}.toml"
    return load_profile(_write(tmp_path, f"{base}.toml", text.replace(old, new, 1)))


def _toml(data: dict[str, Any]) -> str:
    """A TOML document for a plain mapping (inline tables): proves the to_dict form is TOML-able."""

    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(f"{v!r} has no TOML form")

    return "".join(f"{k} = {value(v)}\n" for k, v in data.items())


# ---------------------------------------------------------------- shipped profiles


def test_builtin_profile_names_are_the_seven_shipped_files() -> None:
    assert builtin_profile_names() == sorted(BOARDS)


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_shipped_profile_matches_its_board(name: str) -> None:
    board = BOARDS[name]
    profile = load_profile(name)
    assert profile.name == name
    assert profile.arch == board.arch
    assert profile.memory_mb == board.memory_mb
    assert profile.cpu.core_count == board.core_count
    assert profile.cpu.big_cores == board.big_cores
    assert profile.cpu.inference_threads == board.threads
    assert max(c.max_mhz for c in profile.cpu.cluster) == board.max_mhz
    assert profile.accelerator == board.accelerator
    assert profile.export.opset == 17
    assert profile.description


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_shipped_file_stem_is_its_name_and_header_cites_a_capture(name: str) -> None:
    text = _shipped_text(name)
    assert tomllib.loads(text)["name"] == name
    header = text.split("\nname =", 1)[0]
    assert header.startswith("#")
    if BOARDS[name].capture:
        assert BOARDS[name].capture in header


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_budgets_are_realistic_for_the_board(name: str) -> None:
    profile = load_profile(name)
    budgets = profile.budgets
    assert budgets.max_model_mb <= profile.memory_mb / 10  # room for the arena and a shadow model
    assert budgets.max_accuracy_drop == 1.0
    assert 0.97 <= budgets.min_agreement <= 1.0
    assert 0 < budgets.latency_ms_p95 <= 300


def test_faster_boards_get_tighter_latency_budgets() -> None:
    latency = {n: load_profile(n).budgets.latency_ms_p95 for n in BOARDS}
    assert latency["rpi3"] > latency["rpi4"] > latency["rpi5"]
    assert latency["jetson-nano"] > latency["jetson-orin-nano"]
    assert latency["generic-arm64"] >= latency["rpi3"]


@pytest.mark.parametrize("name", [n for n in ARM if n not in JETSONS])
def test_arm_cpu_boards_quantize_static_qdq_s8s8_per_channel(name: str) -> None:
    q = load_profile(name).quantization
    assert (q.mode, q.format, q.activation_type, q.weight_type) == ("static", "qdq", "int8", "int8")
    assert q.per_channel and not q.reduce_range


def test_x86_host_quantizes_u8s8_for_avx2() -> None:
    profile = load_profile("x86-64")
    q = profile.quantization
    recipe = (q.mode, q.format, q.activation_type, q.weight_type)
    assert recipe == ("static", "qdq", "uint8", "int8")
    assert q.per_channel
    assert q.reduce_range  # no VNNI assumed: 7-bit weights avoid vpmaddubsw saturation
    assert profile.isa.avx2 and not profile.isa.avx512_vnni and not profile.isa.neon


@pytest.mark.parametrize("name", JETSONS)
def test_jetsons_run_fp16_on_tensorrt_then_cuda_then_cpu(name: str) -> None:
    profile = load_profile(name)
    assert profile.quantization.mode == "fp16"
    assert profile.execution_providers == (
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    )


def test_isa_features_follow_the_captured_cpu_flags() -> None:
    isa = {n: load_profile(n).isa for n in BOARDS}
    for name in ARM:
        assert isa[name].neon and not isa[name].avx2, name
        assert not isa[name].i8mm, name  # no capture lists i8mm
    assert isa["rpi5"].dotprod and isa["rpi5"].fp16  # asimddp, fphp/asimdhp
    assert isa["jetson-orin-nano"].dotprod and isa["jetson-orin-nano"].fp16
    for name in ("rpi3", "rpi4", "jetson-nano", "generic-arm64"):
        assert not isa[name].dotprod and not isa[name].fp16, name


def test_orin_keeps_its_two_core_cluster_for_io() -> None:
    cpu = load_profile("jetson-orin-nano").cpu
    assert [c.cores for c in cpu.cluster] == [(0, 1, 2, 3), (4, 5)]
    assert {c.model for c in cpu.cluster} == {"cortex-a78ae"}


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_to_dict_parses_back_to_the_same_profile(name: str) -> None:
    profile = load_profile(name)
    assert parse_profile(profile.to_dict()) == profile
    assert parse_profile(json.loads(json.dumps(profile.to_dict()))) == profile
    assert parse_profile(tomllib.loads(_toml(profile.to_dict()))) == profile


# ---------------------------------------------------------------- digest


def test_digest_is_stable_and_independent_of_key_order() -> None:
    a, b = load_profile("rpi4"), load_profile("rpi4")
    assert a is not b
    assert re.fullmatch(r"[0-9a-f]{64}", a.digest)
    assert a.digest == b.digest
    reordered = dict(reversed(list(a.to_dict().items())))
    assert parse_profile(reordered).digest == a.digest


def test_digest_changes_when_any_value_changes() -> None:
    base = load_profile("rpi4")
    changed = [
        dataclasses.replace(base, memory_mb=2048),
        dataclasses.replace(base, budgets=dataclasses.replace(base.budgets, latency_ms_p95=99.0)),
        dataclasses.replace(base, cpu=dataclasses.replace(base.cpu, threads=2)),
        dataclasses.replace(base, description=base.description + "."),
    ]
    digests = {base.digest, *(p.digest for p in changed)}
    assert len(digests) == 1 + len(changed)


def test_every_shipped_profile_has_its_own_digest() -> None:
    assert len({load_profile(n).digest for n in BOARDS}) == len(BOARDS)


# ---------------------------------------------------------------- user profiles by path

LAB_BOARD = """\
name = "lab-board"
arch = "aarch64"
memory_mb = 4096

[[cpu.cluster]]
cores = [0, 1, 2, 3]
kind = "little"
model = "cortex-a55"
max_mhz = 1800

[[cpu.cluster]]
cores = [4, 5, 6, 7]
kind = "big"
model = "cortex-a76"
max-mhz = 2400
"""


def test_user_profile_by_path_gets_defaults_and_its_big_cluster(tmp_path: Path) -> None:
    path = _write(tmp_path, "lab-board.toml", LAB_BOARD)
    profile = load_profile(path)
    assert profile.name == "lab-board"
    assert profile.cpu.big_cores == (4, 5, 6, 7)
    assert profile.cpu.inference_threads == 4
    assert profile.cpu.cluster[1].max_mhz == 2400  # dashed keys map to fields
    assert profile.quantization == QuantizationSpec()
    assert profile.execution_providers == ("CPUExecutionProvider",)
    assert load_profile(str(path)) == profile


def test_relative_path_errors_name_the_file_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, "lab.toml", LAB_BOARD.replace("memory_mb = 4096", "memory_mb = 4.5"))
    with pytest.raises(ProfileError) as info:
        load_profile("lab.toml")
    assert str(info.value) == "lab.toml: memory_mb: expected int, got 4.5"


def test_a_name_is_never_shadowed_by_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rpi4").mkdir()
    _write(tmp_path, "rpi5", "garbage")
    assert load_profile("rpi4").name == "rpi4"
    assert load_profile("rpi5").name == "rpi5"


# ---------------------------------------------------------------- errors


def test_wrong_type_names_file_key_expected_type_and_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, "rpi5.toml", _shipped_text("rpi5").replace("threads = 0", 'threads = "four"'))
    with pytest.raises(ProfileError) as info:
        load_profile("rpi5.toml")
    assert str(info.value) == 'rpi5.toml: cpu.threads: expected int, got "four"'
    assert (info.value.path, info.value.key) == ("rpi5.toml", "cpu.threads")


def test_profile_error_is_a_config_error_with_exit_code_2(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _load_edited(tmp_path, 'arch = "aarch64"', 'arch = "arm64"')
    assert isinstance(info.value, ProfileError)
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    ("old", "new", "key", "words"),
    [
        ('name = "rpi5"', 'name = "rpi5"\ncolour = "red"', "colour", "unknown key (known keys: "),
        ("max_mhz = 2400", "max_mhz = 2400\nspeed = 3", "cpu.cluster[0].speed", "unknown key"),
        ("[runtime]", "[runtime]\nspin = true", "runtime.spin", "unknown key"),
        ("memory_mb = 8192\n", "", "memory_mb", "required key is missing"),
        ("cores = [0, 1, 2, 3]\n", "", "cpu.cluster[0].cores", "required key is missing"),
        ('arch = "aarch64"', 'arch = "arm64"', "arch", "expected one of 'aarch64', 'armv7l'"),
        ('kind = "uniform"', 'kind = "huge"', "cpu.cluster[0].kind", "expected one of 'big'"),
        ("cores = [0, 1, 2, 3]", 'cores = [0, "1"]', "cpu.cluster[0].cores[1]", 'got "1"'),
        ("neon = true", "neon = 1", "isa.neon", "expected bool, got 1"),
        ("max_model_mb = 400.0", "max_model_mb = nan", "budgets.max_model_mb", "finite number"),
        ("max_model_mb = 400.0", "max_model_mb = -1", "budgets.max_model_mb", "positive"),
        (
            "max_model_mb = 400.0",
            "max_model_mb = 1" + "0" * 400,
            "budgets.max_model_mb",
            "expected finite number, got 1000",
        ),
        ("opset = 17", "opset = 9", "export.opset", "expected 11..23"),
        ("cores = [0, 1, 2, 3]", "cores = [0, 0]", "cpu.cluster[0].cores", "listed twice"),
        ("threads = 0", "threads = 5", "cpu.threads", "expected 0..4"),
        ("neon = true", "avx2 = true", "isa", "x86 features"),
        (
            '["CPUExecutionProvider"]',
            '["CPUExecutionProvider", "XnnpackExecutionProvider"]',
            "execution_providers",
            "last fallback",
        ),
        (
            '["CPUExecutionProvider"]',
            '["CUDAExecutionProvider", "CPUExecutionProvider"]',
            "execution_providers",
            "accelerator is 'none'",
        ),
        (
            '["CPUExecutionProvider"]',
            '["NpuExecutionProvider", "CPUExecutionProvider"]',
            "execution_providers",
            "unknown provider 'NpuExecutionProvider'",
        ),
        ('method = "none"', 'method = "magnitude"', "pruning.amount", "amount is 0"),
        ('name = "rpi5"', 'name = "Rpi 5"', "name", "lower-case"),
        (
            "pin_threads = true",
            "pin_threads = true\npin-threads = false",
            "runtime.pin-threads",
            "given twice",
        ),
        ("[[cpu.cluster]]", "[cpu.cluster]", "cpu.cluster", "expected list"),
    ],
)
def test_bad_value_names_file_and_dotted_key(tmp_path: Path, old: str, new: str, key: str, words: str) -> None:
    with pytest.raises(ProfileError) as info:
        _load_edited(tmp_path, old, new)
    message = str(info.value)
    assert info.value.key == key
    assert message.startswith(f"{tmp_path / 'rpi5.toml'}: {key}: ")
    assert words in message


@pytest.mark.parametrize(
    ("raw", "shown"),
    [('"" = 1', '""'), ('"a b" = 1', '"a b"'), ('"cpu.threads" = 1', '"cpu.threads"')],
)
def test_odd_unknown_keys_are_quoted_as_toml_writes_them(tmp_path: Path, raw: str, shown: str) -> None:
    with pytest.raises(ProfileError) as info:
        _load_edited(tmp_path, 'name = "rpi5"', f'name = "rpi5"\n{raw}')
    assert info.value.key == shown
    assert f"rpi5.toml: {shown}: unknown key" in str(info.value)


def test_value_in_error_is_one_line_and_short(tmp_path: Path) -> None:
    with pytest.raises(ProfileError) as info:
        _load_edited(tmp_path, "threads = 0", 'threads = "a\\nb' + "x" * 200 + '"')
    message = str(info.value)
    assert "\n" not in message
    assert message.endswith('got "a\\nb' + "x" * 52 + "...")


def test_invalid_toml_syntax_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "broken.toml", 'name = "broken"\narch = \n')
    with pytest.raises(ProfileError, match=r"broken\.toml: invalid TOML: .*line 2"):
        load_profile(path)


def test_deeply_nested_toml_is_a_profile_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "deep.toml", "a = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ProfileError, match=r"deep\.toml: invalid TOML: .*nested too deeply"):
        load_profile(path)


def test_non_utf8_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('description = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ProfileError, match=r"latin1\.toml: not UTF-8 text \(byte 18\)"):
        load_profile(path)


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert str(info.value) == f"{path}: file not found"


def test_directory_given_as_profile_is_a_profile_error(tmp_path: Path) -> None:
    directory = tmp_path / "dir.toml"
    directory.mkdir()
    with pytest.raises(ProfileError, match=r"dir\.toml: cannot read"):
        load_profile(directory)


def test_unknown_profile_name_lists_the_known_ones() -> None:
    with pytest.raises(ProfileError) as info:
        load_profile("rpi9")
    message = str(info.value)
    assert message.startswith("unknown profile 'rpi9' (known: ")
    for name in BOARDS:
        assert name in message
    assert "path to a .toml file" in message


@pytest.mark.parametrize("text", ["Bad Name!", "rpi4\n", "", "../rpi4"])
def test_text_that_is_neither_name_nor_path_is_refused(text: str) -> None:
    with pytest.raises(ProfileError):
        load_profile(text)


def test_name_with_a_trailing_newline_is_refused() -> None:
    data = _shipped_dict("rpi4") | {"name": "rpi4\n"}
    with pytest.raises(ProfileError, match="name: use 1-64 lower-case"):
        parse_profile(data)


@pytest.mark.parametrize("data", [[], "rpi4", None, 3])
def test_parse_profile_wants_a_table(data: object) -> None:
    with pytest.raises(ProfileError, match="expected a TOML table"):
        parse_profile(data)


# ---------------------------------------------------------------- hypothesis


def _field_names() -> list[str]:
    classes = [DeviceProfile, CpuSpec, CpuCluster, IsaFeatures, QuantizationSpec]
    classes += [PruningSpec, ExportSpec, Budgets, RuntimeSpec]
    names = {f.name for cls in classes for f in dataclasses.fields(cls)}
    return sorted(names | {n.replace("_", "-") for n in names})


FIELD_NAMES = _field_names()
KEYS = st.sampled_from(FIELD_NAMES) | st.text(max_size=10)
SCALARS = (
    st.booleans()
    | st.integers()
    | st.sampled_from([-1, 0, 2**63, -(2**63) - 1, 10**400])  # tomllib decodes any int size
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["aarch64", "x86_64", "uniform", "big", "static", "int8", "none"])
    | st.sampled_from(KNOWN_PROVIDERS)
    | st.datetimes()
    | st.dates()
    | st.times()
)
TOML_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(KEYS, children, max_size=5),
    max_leaves=25,
)


def _paths(tree: object, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a decoded TOML tree: dict keys and list indices, depth first."""
    found = [prefix]
    if isinstance(tree, dict):
        for k, v in tree.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            found += _paths(v, (*prefix, i))
    return found


def _at(tree: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        tree = tree[part]
    return tree


def _mutate(data: st.DataObject, tree: dict[str, Any]) -> None:
    """Drop a key, change a value (often its type), or add an unknown key somewhere in ``tree``."""
    path = data.draw(st.sampled_from(_paths(tree)))
    op = data.draw(st.sampled_from(["drop", "retype", "set", "add"]))
    if op == "add" or not path:
        node = _at(tree, path)
        if isinstance(node, dict):
            node[data.draw(KEYS)] = data.draw(TOML_VALUES)
        return
    parent, last = _at(tree, path[:-1]), path[-1]
    if op == "drop":
        del parent[last]
    else:
        parent[last] = data.draw(SCALARS if op == "retype" else TOML_VALUES)


def _parse_or_profile_error(candidate: object) -> None:
    try:
        profile = parse_profile(candidate, path="fuzz.toml")
    except ProfileError as exc:
        assert str(exc).startswith("fuzz.toml: ")
    else:
        assert isinstance(profile, DeviceProfile)
        assert parse_profile(profile.to_dict()) == profile


@FUZZ
@given(st.dictionaries(KEYS, TOML_VALUES, max_size=8))
def test_arbitrary_tables_give_a_profile_or_a_profile_error(candidate: dict[str, Any]) -> None:
    _parse_or_profile_error(candidate)


@FUZZ
@given(st.data())
def test_mutated_shipped_profiles_give_a_profile_or_a_profile_error(data: st.DataObject) -> None:
    tree = _shipped_dict(data.draw(st.sampled_from(sorted(BOARDS))))
    for _ in range(data.draw(st.integers(1, 3))):
        _mutate(data, tree)
    _parse_or_profile_error(tree)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("profile-fuzz")


SHIPPED_LINES = sorted({line for n in BOARDS for line in _shipped_text(n).splitlines()})
TOMLISH = st.lists(st.sampled_from(SHIPPED_LINES) | st.text(max_size=15), max_size=60).map("\n".join)


def _load_or_profile_error(path: Path) -> None:
    try:
        profile = load_profile(path)
    except ProfileError as exc:
        assert str(path) in str(exc)
    else:
        assert isinstance(profile, DeviceProfile)


@FUZZ
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode) | TOMLISH.map(str.encode))
def test_arbitrary_file_contents_give_a_profile_or_a_profile_error(fuzz_dir: Path, content: bytes) -> None:
    path = fuzz_dir / "fuzz.toml"
    path.write_bytes(content)
    _load_or_profile_error(path)


@st.composite
def valid_profiles(draw: st.DrawFn) -> dict[str, Any]:
    """Decoded TOML of a profile that must validate, every key spelled out."""
    arch = draw(st.sampled_from(["aarch64", "armv7l", "x86_64"]))
    cores = draw(st.lists(st.integers(0, 1023), min_size=1, max_size=12, unique=True))
    n = draw(st.integers(1, min(3, len(cores))))
    inner = st.integers(1, max(1, len(cores) - 1))
    cuts = sorted(draw(st.lists(inner, min_size=n - 1, max_size=n - 1, unique=True)))
    groups = [cores[a:b] for a, b in zip([0, *cuts], [*cuts, len(cores)], strict=True)]
    text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=30)
    clusters = [
        {
            "cores": g,
            "kind": draw(st.sampled_from(["big", "little", "uniform"])),
            "model": draw(text),
            "max_mhz": draw(st.integers(0, 10_000)),
        }
        for g in groups
    ]
    arm = arch != "x86_64"
    accelerator = draw(st.sampled_from(["none", "cuda", "tensorrt"]))
    extra = [p for p in KNOWN_PROVIDERS if p != "CPUExecutionProvider"]
    if accelerator == "none":
        gpu = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        extra = [p for p in extra if p not in gpu]
    providers = draw(st.lists(st.sampled_from(extra), unique=True, max_size=3))
    method = draw(st.sampled_from(["none", "magnitude", "structured"]))
    fraction = st.floats(0.0, 1.0, exclude_max=True, exclude_min=method != "none")
    positive = st.floats(0.0, 1e6, exclude_min=True)
    return {
        "name": draw(st.from_regex(r"[a-z0-9][a-z0-9._-]{0,63}", fullmatch=True)),
        "arch": arch,
        "cpu": {"cluster": clusters, "threads": draw(st.integers(0, len(cores)))},
        "memory_mb": draw(st.integers(16, 1_048_576)),
        "description": draw(text),
        "isa": {
            "neon": arm and draw(st.booleans()),
            "dotprod": arm and draw(st.booleans()),
            "i8mm": arm and draw(st.booleans()),
            "fp16": draw(st.booleans()),
            "avx2": not arm and draw(st.booleans()),
            "avx512_vnni": not arm and draw(st.booleans()),
        },
        "accelerator": accelerator,
        "backend": draw(st.sampled_from(["onnxruntime", "tflite"])),
        "execution_providers": [*providers, "CPUExecutionProvider"],
        "quantization": {
            "mode": draw(st.sampled_from(["static", "dynamic", "fp16", "none"])),
            "format": draw(st.sampled_from(["qdq", "qoperator"])),
            "activation_type": draw(st.sampled_from(["int8", "uint8"])),
            "weight_type": draw(st.sampled_from(["int8", "uint8"])),
            "per_channel": draw(st.booleans()),
            "reduce_range": draw(st.booleans()),
            "calibration_method": draw(st.sampled_from(["minmax", "entropy", "percentile"])),
            "calibration_samples": draw(st.integers(1, 100_000)),
        },
        "pruning": {"method": method, "amount": draw(fraction)},
        "export": {
            "opset": draw(st.integers(11, 23)),
            "static_shapes": draw(st.booleans()),
            "simplify": draw(st.booleans()),
        },
        "budgets": {
            "max_model_mb": draw(positive),
            "latency_ms_p95": draw(positive),
            "max_accuracy_drop": draw(st.floats(0.0, 100.0)),
            "min_agreement": draw(st.floats(0.0, 1.0)),
            "min_cosine": draw(st.floats(-1.0, 1.0)),
        },
        "runtime": {
            "inter_op_threads": draw(st.integers(1, 64)),
            "spinning": draw(st.booleans()),
            "pin_threads": draw(st.booleans()),
            "optimized_model_cache": draw(st.booleans()),
        },
    }


@FUZZ
@given(valid_profiles())
def test_valid_profiles_round_trip_through_to_dict_and_toml(data: dict[str, Any]) -> None:
    profile = parse_profile(data)
    assert profile.to_dict() == data  # nothing dropped, renamed or coerced
    assert parse_profile(profile.to_dict()) == profile
    again = parse_profile(tomllib.loads(_toml(profile.to_dict())))
    assert again == profile
    assert again.digest == profile.digest
