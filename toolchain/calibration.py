"""Calibration and validation sets: folders of images or tensors, ``.npz`` files and user readers.

One loader serves both roles, so the candidate is validated on tensors made exactly the way the
calibration tensors were, with the device's own preprocessing (:mod:`runtime.preprocess`).

Accepted sources (``load_dataset(source, ...)``):

* a folder of images (``.png``, ``.jpg``…) and/or ``.npy`` tensors, one sample per file;
* a folder of ``.npz`` files, one sample per file, keyed by input name (multi-input models);
* a folder of class sub-folders ``root/<label>/...`` of the above: sorted folder names are the
  label indices;
* one ``.npz`` file holding one array per input name (or a single array for a single-input
  model) whose first axis is the sample axis, optional integer ``labels`` (or ``y``) and optional
  ``label_names``;
* ``package.module:function``: a function returning an iterable of feed dicts, arrays
  (single-input models) or ``(feeds, label)`` tuples.

Files are visited in sorted order and hidden files are ignored, so a set always yields the same
samples in the same order; ``limit`` picks a seeded, sorted subset.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import InputError
from runtime.manifest import Preprocess, TensorSpec
from runtime.preprocess import IMAGE_SUFFIXES, fit_rank, image_to_tensor, load_image
from toolchain.errors import DatasetError

__all__ = ["Dataset", "DatasetReader", "Sample", "load_dataset"]

_TENSOR_SUFFIXES = (".npy", ".npz")
_LABEL_KEYS = ("labels", "y")
_RESERVED_KEYS = (*_LABEL_KEYS, "label_names")
_READER_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class Sample:
    """One model input set: input name -> array with a batch axis of 1."""

    feeds: dict[str, np.ndarray]
    label: int | None
    source: str  # the file it came from, ``file.npz[17]`` for a row of an .npz file


@dataclass(frozen=True)
class Dataset:
    """A loaded calibration or validation set."""

    root: str
    samples: tuple[Sample, ...]
    label_names: tuple[str, ...]  # sorted class folder names, or from the .npz; () when unknown

    @property
    def labeled(self) -> bool:
        """True when every sample carries a label."""
        return bool(self.samples) and all(s.label is not None for s in self.samples)

    def __len__(self) -> int:
        return len(self.samples)


class DatasetReader:
    """ONNX Runtime's ``CalibrationDataReader`` shape over samples: ``get_next()``, ``rewind()``.

    ``progress(done, total)`` is called with the number of samples consumed so far each time
    that number changes (0 first, ``total`` last), so a caller can draw a bar.
    """

    def __init__(
        self,
        samples: Dataset | Sequence[Sample],
        *,
        progress: Callable[[int, int], None] | None = None,
    ):
        self._samples = tuple(samples.samples if isinstance(samples, Dataset) else samples)
        self._progress = progress
        self._index = 0
        self._reported = -1

    def __len__(self) -> int:
        return len(self._samples)

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next sample's feeds, or ``None`` when the set is exhausted."""
        self._report()
        if self._index >= len(self._samples):
            return None
        sample = self._samples[self._index]
        self._index += 1
        return dict(sample.feeds)

    def rewind(self) -> None:
        """Start again from the first sample."""
        self._index = 0
        self._reported = -1

    def _report(self) -> None:
        if self._progress is not None and self._index != self._reported:
            self._reported = self._index
            self._progress(self._index, len(self._samples))


def load_dataset(
    source: str | Path,
    inputs: Sequence[TensorSpec],
    preprocess: Preprocess,
    *,
    limit: int | None = None,
    role: str = "calibration",
    seed: int = 0,
) -> Dataset:
    """Load a calibration/validation set for a model with ``inputs``; see the module docstring.

    ``limit`` keeps at most that many samples, chosen with ``seed`` and kept in sorted order
    (a user reader is cut after its first ``limit`` items instead). Every problem is a
    :class:`~toolchain.errors.DatasetError` naming the file or folder.
    """
    if not inputs:
        raise DatasetError(f"the model has no inputs to feed a {role} set")
    if limit is not None and limit < 1:
        raise DatasetError(f"{role} sample limit must be at least 1, got {limit}")
    ctx = _Context(tuple(inputs), preprocess, role)
    text = str(source)
    path = Path(source)
    if not path.exists() and _READER_SPEC.match(text):
        return _from_reader(text, ctx, limit)
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise DatasetError(
                f"a {role} set is a folder, an .npz file or package.module:function, not a single file",
                path=path,
            )
        return _from_npz(path, ctx, limit, seed)
    if not path.is_dir():
        raise DatasetError(
            f"{role} set not found: expected a folder of images or .npy files, an .npz file, "
            "or package.module:function",
            path=path,
        )
    return _from_folder(path, ctx, limit, seed)


@dataclass(frozen=True)
class _Context:
    inputs: tuple[TensorSpec, ...]
    preprocess: Preprocess
    role: str

    @property
    def names(self) -> str:
        return ", ".join(repr(t.name) for t in self.inputs)

    def fail(self, message: str, source: str | Path) -> DatasetError:
        return DatasetError(f"{self.role} set: {message}", path=source)


def _visible(folder: Path, ctx: _Context) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        raise ctx.fail(f"cannot list the folder ({exc.strerror})", folder) from exc


def _is_sample_file(path: Path) -> bool:
    suffix = path.suffix.lower()
    return path.is_file() and (suffix in IMAGE_SUFFIXES or suffix in _TENSOR_SUFFIXES)


def _pick(count: int, limit: int | None, seed: int) -> list[int]:
    """Indices of a seeded subset of ``range(count)``, in increasing order."""
    if limit is None or limit >= count:
        return list(range(count))
    chosen = np.random.default_rng(seed).choice(count, size=limit, replace=False)
    return sorted(int(i) for i in chosen)


def _from_folder(root: Path, ctx: _Context, limit: int | None, seed: int) -> Dataset:
    entries = _visible(root, ctx)
    files = [p for p in entries if _is_sample_file(p)]
    classes = [p for p in entries if p.is_dir()]
    if files and classes:
        raise ctx.fail(
            "holds both sample files and sub-folders; put every sample in a class sub-folder "
            "(root/<label>/...) or keep all of them at the top level",
            root,
        )
    labels: list[int | None]
    if classes:
        items = [(p, i) for i, c in enumerate(classes) for p in _visible(c, ctx) if _is_sample_file(p)]
        files, labels = [p for p, _ in items], [i for _, i in items]
        label_names = tuple(c.name for c in classes)
    else:
        labels, label_names = [None] * len(files), ()
    if not files:
        looked = ", ".join(IMAGE_SUFFIXES)
        where = " or its class sub-folders" if classes else ""
        raise ctx.fail(
            f"no images or .npy/.npz files in the folder{where} (looked for {looked}, .npy, .npz)",
            root,
        )
    keep = _pick(len(files), limit, seed)
    samples = tuple(Sample(_load_file(files[i], ctx), labels[i], str(files[i])) for i in keep)
    return Dataset(str(root), samples, label_names)


def _load_file(path: Path, ctx: _Context) -> dict[str, np.ndarray]:
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with _open_npz(path, ctx) as data:
            arrays = {k: data[k] for k in data.files if k not in _RESERVED_KEYS}
        return _feeds_from_mapping(arrays, ctx, str(path), row=None)
    if len(ctx.inputs) > 1:
        kind = ".npy file" if suffix == ".npy" else "image"
        raise ctx.fail(
            f"an {kind} feeds one input but the model has {len(ctx.inputs)} ({ctx.names}); "
            "use one .npz file per sample keyed by input name",
            path,
        )
    tensor = ctx.inputs[0]
    try:
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            arr = image_to_tensor(load_image(path), ctx.preprocess, tensor)
    except InputError as exc:
        raise ctx.fail(_reason(exc, path), path) from exc
    except (ValueError, OSError) as exc:
        what = "a readable .npy array" if suffix == ".npy" else "a readable image"
        raise ctx.fail(f"not {what} ({exc})", path) from exc
    return {tensor.name: _fit(arr, tensor, ctx, str(path))}


def _reason(exc: Exception, source: str | Path) -> str:
    """The message of ``exc`` without a leading ``source: `` (the DatasetError adds it back)."""
    text = str(exc)
    prefix = f"{source}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def _fit(arr: Any, tensor: TensorSpec, ctx: _Context, source: str) -> np.ndarray:
    """Check one array against a model input and give it a batch axis of exactly 1."""
    if not isinstance(arr, np.ndarray):
        raise ctx.fail(f"expected a numpy array for input {tensor.name!r}, got {type(arr).__name__}", source)
    try:
        out = fit_rank(arr, tensor, source=source)
    except (InputError, ValueError, TypeError) as exc:
        # ValueError/TypeError: a dtype numpy cannot cast to the input's (strings into float32…)
        raise ctx.fail(_reason(exc, source), source) from exc
    if out.ndim and out.shape[0] != 1:
        raise ctx.fail(
            f"shape {tuple(arr.shape)} holds {out.shape[0]} samples for input {tensor.name!r}; "
            "keep one sample per file (or use one .npz file whose first axis is the sample axis)",
            source,
        )
    return out


def _feeds_from_mapping(
    arrays: Mapping[str, Any], ctx: _Context, source: str, *, row: int | None
) -> dict[str, np.ndarray]:
    """Feeds from arrays keyed by input name; a single-input model accepts any single key."""
    feeds: dict[str, np.ndarray] = {}
    for tensor in ctx.inputs:
        if tensor.name in arrays:
            arr = arrays[tensor.name]
        elif len(ctx.inputs) == 1 and len(arrays) == 1:
            arr = next(iter(arrays.values()))
        else:
            have = ", ".join(repr(k) for k in arrays) or "nothing"
            raise ctx.fail(
                f"no array for input {tensor.name!r} (has {have}; the model needs {ctx.names})",
                source,
            )
        feeds[tensor.name] = _fit(
            arr if row is None else arr[row],
            tensor,
            ctx,
            source if row is None else f"{source}[{row}]",
        )
    return feeds


@contextmanager
def _open_npz(path: Path, ctx: _Context) -> Iterator[Any]:
    try:
        data: Any = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ctx.fail(f"not a readable .npz file ({exc})", path) from exc
    if not hasattr(data, "files"):
        raise ctx.fail("expected an .npz archive of arrays, found a single .npy array", path)
    try:
        yield data
    finally:
        data.close()


def _from_npz(path: Path, ctx: _Context, limit: int | None, seed: int) -> Dataset:
    with _open_npz(path, ctx) as data:
        try:
            arrays = {k: data[k] for k in data.files}
        except (ValueError, OSError) as exc:  # object arrays need pickle, which is refused
            raise ctx.fail(f"cannot read an array ({exc}); save plain numeric arrays", path) from exc
    label_key = next((k for k in _LABEL_KEYS if k in arrays), None)
    names = _npz_label_names(arrays.get("label_names"), ctx, path)
    tensors = {k: v for k, v in arrays.items() if k not in _RESERVED_KEYS}
    if not tensors:
        raise ctx.fail(f"no input arrays in this .npz (the model needs {ctx.names})", path)
    lengths = {k: (v.shape[0] if v.ndim else 0) for k, v in tensors.items()}
    count = next(iter(lengths.values()))
    if len(set(lengths.values())) > 1:
        raise ctx.fail(f"arrays disagree on the number of samples (first axis): {lengths}", path)
    if count == 0:
        raise ctx.fail("the arrays hold no samples (first axis is empty)", path)
    labels = _npz_labels(arrays[label_key], label_key, count, names, ctx, path) if label_key else None
    samples = tuple(
        Sample(
            _feeds_from_mapping(tensors, ctx, str(path), row=i),
            None if labels is None else labels[i],
            f"{path}[{i}]",
        )
        for i in _pick(count, limit, seed)
    )
    return Dataset(str(path), samples, names)


def _npz_label_names(arr: np.ndarray | None, ctx: _Context, path: Path) -> tuple[str, ...]:
    if arr is None:
        return ()
    if arr.ndim != 1 or arr.dtype.kind not in "US":
        raise ctx.fail(f"label_names must be a 1-D string array, got {arr.dtype} of shape {arr.shape}", path)
    return tuple(str(n) for n in arr.tolist())


def _npz_labels(arr: np.ndarray, key: str, count: int, names: tuple[str, ...], ctx: _Context, path: Path) -> list[int]:
    if arr.dtype.kind not in "iu" or arr.ndim != 1:
        raise ctx.fail(
            f"{key!r} must be a 1-D integer array of class indices, got {arr.dtype} of shape {arr.shape}",
            path,
        )
    if arr.shape[0] != count:
        raise ctx.fail(f"{key!r} has {arr.shape[0]} labels for {count} samples", path)
    if count and int(arr.min()) < 0:
        raise ctx.fail(f"{key!r} holds negative class indices", path)
    if names and count and int(arr.max()) >= len(names):
        raise ctx.fail(
            f"{key!r} holds class index {int(arr.max())} but label_names has {len(names)} names",
            path,
        )
    return [int(v) for v in arr.tolist()]


def _from_reader(spec: str, ctx: _Context, limit: int | None) -> Dataset:
    items = _call_reader(spec, ctx)
    samples: list[Sample] = []
    for i, item in enumerate(_guarded(items, spec, ctx)):
        if limit is not None and i >= limit:
            break
        source = f"{spec}[{i}]"
        feeds, label = item if isinstance(item, tuple) and len(item) == 2 else (item, None)
        if isinstance(feeds, np.ndarray) and len(ctx.inputs) == 1:
            feeds = {ctx.inputs[0].name: feeds}
        if not isinstance(feeds, Mapping):
            raise ctx.fail(
                f"item {i} is a {type(feeds).__name__}; yield feed dicts (input name -> array) "
                "or (feeds, label) tuples",
                spec,
            )
        extra = sorted(set(feeds) - {t.name for t in ctx.inputs})
        if extra:
            raise ctx.fail(f"item {i} feeds unknown inputs {extra} (the model has {ctx.names})", spec)
        if label is not None and (isinstance(label, bool) or not isinstance(label, (int, np.integer))):
            raise ctx.fail(f"item {i} has label {label!r}; labels are integer class indices", spec)
        samples.append(Sample(_feeds_from_mapping(feeds, ctx, source, row=None), _label(label), source))
    if not samples:
        raise ctx.fail("the reader yielded no samples", spec)
    labeled = [s.label is not None for s in samples]
    if any(labeled) and not all(labeled):
        raise ctx.fail("some items carry a label and some do not; label all of them or none", spec)
    return Dataset(spec, tuple(samples), ())


def _label(value: int | np.integer[Any] | None) -> int | None:
    return None if value is None else int(value)


def _call_reader(spec: str, ctx: _Context) -> Iterable[Any]:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # user code: a syntax error or failing import is the user's to fix
        raise ctx.fail(f"cannot import reader module {module_name!r} ({type(exc).__name__}: {exc})", spec) from exc
    func = getattr(module, attr, None)
    if not callable(func):
        raise ctx.fail(f"module {module_name!r} has no function {attr!r}", spec)
    try:
        items = func()
    except Exception as exc:  # user code
        raise ctx.fail(f"reader raised {type(exc).__name__}: {exc}", spec) from exc
    if not isinstance(items, Iterable):
        raise ctx.fail(f"reader returned a {type(items).__name__}, expected an iterable of feed dicts", spec)
    return items


def _guarded(items: Iterable[Any], spec: str, ctx: _Context) -> Iterator[Any]:
    """Iterate a user reader, turning its exceptions into DatasetError."""
    iterator = iter(items)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except Exception as exc:  # user code
            raise ctx.fail(f"reader raised {type(exc).__name__}: {exc}", spec) from exc
        yield item
