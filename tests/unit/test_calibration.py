"""Calibration/validation sets: every source kind, deterministic subsets, and every error."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.datasets import load_digits

from runtime.errors import InputError
from runtime.manifest import Preprocess, TensorSpec
from runtime.preprocess import IMAGE_SUFFIXES, image_to_tensor
from toolchain.calibration import Dataset, DatasetReader, Sample, load_dataset
from toolchain.errors import DatasetError

IMAGE_IN = (TensorSpec("image", "float32", (1, 1, 32, 32), "NCHW"),)
GRAY = Preprocess(kind="image", color="gray", layout="NCHW", scale=1 / 255)
TENSOR = Preprocess(kind="tensor")
VECTOR_IN = (TensorSpec("x", "float32", ("batch", 4), "NC"),)
TWO_IN = (
    TensorSpec("a", "float32", (1, 3), "NC"),
    TensorSpec("b", "int64", (1, 2), "NC"),
)


def _digits(count: int) -> tuple[list[np.ndarray], list[int]]:
    """Real scans: sklearn's 8x8 digits (0..16) as 32x32 uint8 images."""
    digits = load_digits()
    images = [
        cv2.resize(
            np.clip(digits.images[i] * 16, 0, 255).astype(np.uint8),
            (32, 32),
            interpolation=cv2.INTER_NEAREST,
        )
        for i in range(count)
    ]
    return images, [int(t) for t in digits.target[:count]]


def _write_images(folder: Path, images: list[np.ndarray], suffix: str = ".png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        path = folder / f"img_{i:03d}{suffix}"
        assert cv2.imwrite(str(path), img)
        paths.append(path)
    return paths


# --- sources ---------------------------------------------------------------------------------


def test_image_folder_uses_runtime_preprocessing(tmp_path: Path) -> None:
    images, _ = _digits(5)
    paths = _write_images(tmp_path / "calib", images)
    ds = load_dataset(tmp_path / "calib", IMAGE_IN, GRAY)
    assert isinstance(ds, Dataset)
    assert [s.source for s in ds.samples] == [str(p) for p in paths]
    assert ds.root == str(tmp_path / "calib")
    assert not ds.labeled and ds.label_names == ()
    for sample, img in zip(ds.samples, images, strict=True):
        feed = sample.feeds["image"]
        assert feed.shape == (1, 1, 32, 32) and feed.dtype == np.float32
        np.testing.assert_array_equal(feed, image_to_tensor(img, GRAY, IMAGE_IN[0]))
        assert sample.label is None


def test_images_are_resized_to_the_model_input(tmp_path: Path) -> None:
    images, _ = _digits(2)
    _write_images(tmp_path / "calib", images, ".jpg")
    small = (TensorSpec("image", "float32", (1, 1, 16, 16), "NCHW"),)
    ds = load_dataset(tmp_path / "calib", small, GRAY)
    assert [s.feeds["image"].shape for s in ds.samples] == [(1, 1, 16, 16)] * 2


def test_hidden_and_unrelated_files_are_ignored(tmp_path: Path) -> None:
    images, _ = _digits(3)
    _write_images(tmp_path / "calib", images)
    (tmp_path / "calib" / ".DS_Store").write_bytes(b"\x00junk")
    (tmp_path / "calib" / ".hidden.png").write_bytes(b"not an image")
    (tmp_path / "calib" / "README.txt").write_text("notes")
    (tmp_path / "calib" / ".cache").mkdir()
    ds = load_dataset(tmp_path / "calib", IMAGE_IN, GRAY)
    assert len(ds) == 3


def test_npy_folder_with_and_without_batch_axis(tmp_path: Path) -> None:
    folder = tmp_path / "tensors"
    folder.mkdir()
    rng = np.random.default_rng(0)
    a = rng.standard_normal(4).astype(np.float64)  # no batch axis, other dtype: cast to float32
    b = rng.standard_normal((1, 4)).astype(np.float32)
    np.save(folder / "b.npy", b)
    np.save(folder / "a.npy", a)
    ds = load_dataset(folder, VECTOR_IN, TENSOR)
    assert [Path(s.source).name for s in ds.samples] == ["a.npy", "b.npy"]  # sorted order
    np.testing.assert_array_equal(ds.samples[0].feeds["x"], a[None].astype(np.float32))
    np.testing.assert_array_equal(ds.samples[1].feeds["x"], b)
    assert all(s.feeds["x"].dtype == np.float32 for s in ds.samples)


def test_npz_file_with_labels_and_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 4)).astype(np.float32)
    labels = np.array([0, 1, 2, 1, 0, 2])
    path = tmp_path / "val.npz"
    np.savez(path, x=x, labels=labels, label_names=np.array(["cat", "dog", "eel"]))
    ds = load_dataset(path, VECTOR_IN, TENSOR, role="validation")
    assert ds.labeled and ds.label_names == ("cat", "dog", "eel")
    assert [s.label for s in ds.samples] == labels.tolist()
    assert [s.source for s in ds.samples] == [f"{path}[{i}]" for i in range(6)]
    for i, s in enumerate(ds.samples):
        np.testing.assert_array_equal(s.feeds["x"], x[i : i + 1])


def test_npz_single_array_any_key_and_y_labels(tmp_path: Path) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = tmp_path / "set.npz"
    np.savez(path, arr_0=x, y=np.array([2, 0, 1], dtype=np.uint8))
    ds = load_dataset(path, VECTOR_IN, TENSOR)
    assert [s.label for s in ds.samples] == [2, 0, 1]
    assert ds.label_names == ()
    np.testing.assert_array_equal(ds.samples[2].feeds["x"], x[2:3])


def test_npz_multi_input_keyed_by_name(tmp_path: Path) -> None:
    path = tmp_path / "multi.npz"
    np.savez(path, a=np.ones((5, 3)), b=np.arange(10).reshape(5, 2))
    ds = load_dataset(path, TWO_IN, TENSOR)
    assert len(ds) == 5
    assert ds.samples[4].feeds["b"].dtype == np.int64
    np.testing.assert_array_equal(ds.samples[4].feeds["b"], [[8, 9]])
    assert ds.samples[0].feeds["a"].shape == (1, 3)


def test_folder_of_npz_samples_for_multi_input_model(tmp_path: Path) -> None:
    folder = tmp_path / "samples"
    folder.mkdir()
    for i in range(3):
        np.savez(folder / f"s{i}.npz", a=np.full(3, i, np.float32), b=np.array([[i, i]]))
    ds = load_dataset(folder, TWO_IN, TENSOR)
    assert [int(s.feeds["a"][0, 0]) for s in ds.samples] == [0, 1, 2]
    assert ds.samples[1].feeds["b"].shape == (1, 2)


def test_class_sub_folders_give_sorted_labels(tmp_path: Path) -> None:
    images, targets = _digits(9)
    root = tmp_path / "val"
    for img, target in zip(images, targets, strict=True):
        folder = root / f"digit_{target}"
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{len(list(folder.iterdir()))}.png"), img)
    np.save(root / "digit_0" / "extra.npy", np.zeros((1, 32, 32), np.float32))  # npy mixes in
    (root / "zzz_empty").mkdir()  # an empty class keeps its index
    ds = load_dataset(root, IMAGE_IN, GRAY, role="validation")
    names = [*sorted({f"digit_{t}" for t in targets}), "zzz_empty"]
    assert ds.label_names == tuple(names)
    assert ds.labeled
    for sample in ds.samples:
        assert ds.label_names[sample.label] == Path(sample.source).parent.name
    assert len(ds) == len(images) + 1


def _write_reader(tmp_path: Path, name: str, body: str, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / f"{name}.py").write_text("import numpy as np\n\n" + body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def test_user_reader_of_feed_dicts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = _write_reader(
        tmp_path,
        "my_reader_dicts",
        "def samples():\n    for i in range(4):\n        yield {'x': np.full(4, i, dtype=np.float32)}\n",
        monkeypatch,
    )
    ds = load_dataset(f"{mod}:samples", VECTOR_IN, TENSOR)
    assert [float(s.feeds["x"][0, 0]) for s in ds.samples] == [0.0, 1.0, 2.0, 3.0]
    assert ds.samples[1].source == f"{mod}:samples[1]"
    assert not ds.labeled


def test_user_reader_of_labeled_tuples_with_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = _write_reader(
        tmp_path,
        "my_reader_tuples",
        "def samples():\n"
        "    i = 0\n"
        "    while True:  # endless: the limit must stop it\n"
        "        yield np.full((1, 4), i, dtype=np.float32), np.int64(i % 3)\n"
        "        i += 1\n",
        monkeypatch,
    )
    ds = load_dataset(f"{mod}:samples", VECTOR_IN, TENSOR, limit=5)
    assert ds.labeled
    assert [s.label for s in ds.samples] == [0, 1, 2, 0, 1]
    assert all(type(s.label) is int for s in ds.samples)


# --- limit -----------------------------------------------------------------------------------


def test_limit_is_a_deterministic_sorted_subset(tmp_path: Path) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(30):
        np.save(folder / f"{i:02d}.npy", np.full(4, i, np.float32))
    first = load_dataset(folder, VECTOR_IN, TENSOR, limit=7)
    again = load_dataset(folder, VECTOR_IN, TENSOR, limit=7)
    other = load_dataset(folder, VECTOR_IN, TENSOR, limit=7, seed=1)
    sources = [s.source for s in first.samples]
    assert len(sources) == 7
    assert sources == [s.source for s in again.samples]
    assert sources == sorted(sources)
    assert sources != [s.source for s in other.samples]
    assert sources != sorted(str(p) for p in folder.iterdir())[:7]  # spread, not the first seven
    assert len(load_dataset(folder, VECTOR_IN, TENSOR, limit=100)) == 30


def test_limit_on_npz_rows_keeps_labels_aligned(tmp_path: Path) -> None:
    path = tmp_path / "rows.npz"
    np.savez(path, x=np.arange(80, dtype=np.float32).reshape(20, 4), labels=np.arange(20) % 5)
    ds = load_dataset(path, VECTOR_IN, TENSOR, limit=6, seed=3)
    assert len(ds) == 6
    for s in ds.samples:
        row = int(s.feeds["x"][0, 0]) // 4
        assert s.source == f"{path}[{row}]" and s.label == row % 5


# --- reader ----------------------------------------------------------------------------------


def test_dataset_reader_shape_rewind_and_progress() -> None:
    samples = tuple(Sample({"x": np.full((1, 4), i, np.float32)}, None, f"s{i}") for i in range(3))
    seen: list[tuple[int, int]] = []
    reader = DatasetReader(Dataset("mem", samples, ()), progress=lambda d, t: seen.append((d, t)))
    assert len(reader) == 3
    got = []
    while (feeds := reader.get_next()) is not None:
        got.append(float(feeds["x"][0, 0]))
    assert got == [0.0, 1.0, 2.0]
    assert reader.get_next() is None
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3)]
    reader.rewind()
    first = reader.get_next()
    assert first is not None and float(first["x"][0, 0]) == 0.0
    assert seen[-1] == (0, 3)  # a rewound reader restarts the count


# --- errors ----------------------------------------------------------------------------------


def _error(source: object, inputs=VECTOR_IN, preprocess=TENSOR, **kw: object) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        load_dataset(source, inputs, preprocess, **kw)  # type: ignore[arg-type]
    assert info.value.exit_code == 2
    return info.value


def test_missing_folder(tmp_path: Path) -> None:
    err = _error(tmp_path / "nope", role="validation")
    assert str(tmp_path / "nope") in str(err) and err.path == str(tmp_path / "nope")
    assert "validation set not found" in str(err)


def test_empty_folder_lists_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "calib").mkdir()
    (tmp_path / "calib" / "notes.txt").write_text("x")
    err = _error(tmp_path / "calib")
    text = str(err)
    assert str(tmp_path / "calib") in text and "calibration set" in text
    assert "no images or .npy" in text
    assert all(suffix in text for suffix in (*IMAGE_SUFFIXES, ".npy"))


def test_single_non_npz_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "one.npy"
    np.save(path, np.zeros(4))
    err = _error(path)
    assert str(path) in str(err) and "folder" in str(err)


def test_unreadable_image_translates_input_error(tmp_path: Path) -> None:
    images, _ = _digits(2)
    _write_images(tmp_path / "calib", images)
    bad = tmp_path / "calib" / "img_001.png"
    bad.write_bytes(b"\x89PNG truncated")
    err = _error(tmp_path / "calib", IMAGE_IN, GRAY)
    assert err.path == str(bad) and str(err).count(str(bad)) == 1
    assert "decode" in str(err) and "calibration set" in str(err)
    assert isinstance(err.__cause__, InputError)


def test_corrupt_npy(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.npy").write_bytes(b"garbage")
    err = _error(tmp_path / "d")
    assert str(tmp_path / "d" / "x.npy") in str(err) and ".npy" in str(err)


def test_wrong_shape_names_file_and_input(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    np.save(tmp_path / "d" / "x.npy", np.zeros((3, 3), np.float32))
    err = _error(tmp_path / "d", role="validation")
    text = str(err)
    assert str(tmp_path / "d" / "x.npy") in text and "'x'" in text and "validation set" in text
    assert isinstance(err.__cause__, InputError)


def test_npy_holding_many_samples_is_refused(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    np.save(tmp_path / "d" / "batch.npy", np.zeros((4, 4), np.float32))
    err = _error(tmp_path / "d")
    assert "4 samples" in str(err) and "one sample per file" in str(err)


def test_image_for_a_non_image_input(tmp_path: Path) -> None:
    images, _ = _digits(1)
    _write_images(tmp_path / "calib", images)
    err = _error(tmp_path / "calib", VECTOR_IN, GRAY)
    assert "4-D" in str(err) and str(tmp_path / "calib" / "img_000.png") in str(err)


def test_npz_missing_input_key(tmp_path: Path) -> None:
    path = tmp_path / "multi.npz"
    np.savez(path, a=np.ones((5, 3)), c=np.ones((5, 2)))
    err = _error(path, TWO_IN)
    assert str(path) in str(err) and "'b'" in str(err) and "'c'" in str(err)


def test_npy_for_a_multi_input_model(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    np.save(tmp_path / "d" / "x.npy", np.zeros(3, np.float32))
    err = _error(tmp_path / "d", TWO_IN)
    assert ".npz" in str(err) and "2" in str(err)


@pytest.mark.parametrize(
    ("labels", "extra", "needle"),
    [
        (np.array([0, 1]), {}, "2 labels for 3 samples"),
        (np.array([0.0, 1.0, 1.0]), {}, "integer"),
        (np.array([0, -1, 1]), {}, "negative"),
        (np.array([0, 1, 5]), {"label_names": np.array(["a", "b"])}, "class index 5"),
    ],
)
def test_npz_inconsistent_labels(tmp_path: Path, labels: np.ndarray, extra: dict[str, np.ndarray], needle: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.zeros((3, 4), np.float32), labels=labels, **extra)
    err = _error(path)
    assert str(path) in str(err) and needle in str(err)


def test_npz_arrays_disagree_on_sample_count(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, a=np.ones((5, 3)), b=np.ones((4, 2)))
    assert "first axis" in str(_error(path, TWO_IN))


def test_files_mixed_with_class_folders(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    (root / "cat").mkdir(parents=True)
    np.save(root / "cat" / "a.npy", np.zeros(4, np.float32))
    np.save(root / "b.npy", np.zeros(4, np.float32))
    assert "sub-folder" in str(_error(root))


def test_reader_import_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    err = _error("no_such_module_xyz:samples")
    assert "no_such_module_xyz:samples" in str(err) and "cannot import" in str(err)
    assert isinstance(err.__cause__, ImportError)
    mod = _write_reader(tmp_path, "my_reader_broken", "def samples(:\n", monkeypatch)
    err = _error(f"{mod}:samples")
    assert isinstance(err.__cause__, SyntaxError)


def test_reader_missing_function_and_bad_items(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = _write_reader(
        tmp_path,
        "my_reader_bad",
        "def strings():\n    return ['a', 'b']\n"
        "def boom():\n    yield {'x': np.zeros(4)}\n    raise RuntimeError('disk gone')\n"
        "def unknown():\n    return [{'x': np.zeros(4), 'z': np.zeros(1)}]\n"
        "def nothing():\n    return []\n",
        monkeypatch,
    )
    assert "no function 'missing'" in str(_error(f"{mod}:missing"))
    assert "feed dicts" in str(_error(f"{mod}:strings"))
    err = _error(f"{mod}:boom")
    assert "disk gone" in str(err) and isinstance(err.__cause__, RuntimeError)
    assert "'z'" in str(_error(f"{mod}:unknown"))
    assert "no samples" in str(_error(f"{mod}:nothing"))


def test_bad_limit() -> None:
    assert "at least 1" in str(_error("whatever", limit=0))
