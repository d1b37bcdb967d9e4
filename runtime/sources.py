"""Inputs for `edge-runtime serve`: a watched directory and a video file or camera, as a stream of items.

Both sources iterate blocking, yield :class:`Item`, and end promptly (within about a second) after
``close()`` is called from any thread.

**Directory** (:class:`DirectorySource`). A file is read when it looks complete: its size and mtime are
unchanged across two consecutive polls ``poll_interval_s`` apart, so a new file waits one to two poll
intervals. A writer that pauses longer than that mid-file can be read early; writers should therefore
write under a hidden name (``.name.tmp``) or in another directory on the same file system and
``rename()`` into the watched one, which is atomic. Hidden files and names not matching ``patterns``
are ignored. Ready files are yielded oldest first (mtime, then name). A processed file is moved to
``done/`` (``after="move"``, the default) or deleted (``"delete"``) when the consumer asks for the next
item, so a crash mid-inference re-processes that file on restart (at-least-once). ``after="keep"`` leaves
files in place and remembers them (name, size and mtime; bounded) for the life of the source only: a
restart processes them again. Undecodable files go to ``failed/`` with the reason logged; the loop goes on.

**Video** (:class:`VideoSource`). A video file, a camera index (``0``, ``"0"``, ``/dev/video0``) or a
stream URL, through OpenCV. ``max_fps`` caps the delivery rate and can be lowered live with
``set_max_fps`` (the rate governor does). When inference falls behind, the consumer gets the freshest
frame and the others are counted as skipped: a live source has a grabber thread (``edge-video``) that
keeps only the latest frame and reconnects with exponential backoff when the device or stream goes
away; a file with ``realtime=True`` plays at its own frame rate against the wall clock and ``grab()``s
past frames that are already late instead of returning them; ``realtime=False`` returns every frame
(offline processing).
"""

from __future__ import annotations

import ast
import hashlib
import logging
import math
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from runtime.errors import ConfigError, InputError

__all__ = ["DirectorySource", "Item", "ItemKind", "Source", "VideoSource", "decode_item"]

log = logging.getLogger(__name__)

ItemKind = Literal["image", "tensor"]
_NPY_MAGIC = b"\x93NUMPY"
_NPY_MAX_HEADER = 10000  # numpy's own limit for headers it parses without allow_pickle
_REMEMBER = 65536  # names (with size and mtime) a directory source keeps to avoid yielding a file twice
_BACKOFF_START_S = 0.5


@dataclass(frozen=True)
class Item:
    """One input: a decoded image or a raw tensor, with where it came from."""

    ref: str  # file path, "video.mp4#frame=120", "camera:0#frame=7", "http:<request id>"
    data: np.ndarray  # BGR/BGRA/grey uint8 as OpenCV decodes it, or the tensor from a .npy
    kind: ItemKind
    ts: float  # time.time() when captured or received
    digest: str | None = None  # sha256 hex of the encoded bytes when known (result-cache key)


class Source(Protocol):
    """What the service loop consumes."""

    def __iter__(self) -> Iterator[Item]:
        """Yield items until the source ends or ``close()`` is called."""
        ...

    def close(self) -> None:
        """Stop iteration and release files, devices and threads."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters for ``status``."""
        ...


def _cv2() -> Any:
    import cv2  # deferred: only image and video inputs need OpenCV

    return cv2


def decode_item(data: bytes, *, ref: str, kind: ItemKind | Literal["auto"] = "auto", ts: float | None = None) -> Item:
    """Decode encoded bytes (PNG/JPEG/BMP/… or ``.npy``) into an :class:`Item`; bad bytes raise :class:`InputError`.

    ``kind="auto"`` treats bytes starting with the ``.npy`` magic as a tensor and anything else as an image.
    """
    if kind == "auto":
        kind = "tensor" if data.startswith(_NPY_MAGIC) else "image"
    array = _decode_npy(data, ref) if kind == "tensor" else _decode_image(data, ref)
    return Item(
        ref=ref,
        data=array,
        kind=kind,
        ts=time.time() if ts is None else ts,
        digest=hashlib.sha256(data).hexdigest(),
    )


def _decode_image(data: bytes, ref: str) -> np.ndarray:
    cv2 = _cv2()
    if not data:
        raise InputError(f"{ref}: empty image")
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise InputError(f"{ref}: not an image OpenCV can decode ({exc.__class__.__name__})") from exc
    if image is None:
        raise InputError(f"{ref}: not an image OpenCV can decode (PNG, JPEG, BMP, …)")
    if image.dtype != np.uint8 and image.dtype.kind == "u":  # 16-bit PNG/TIFF: scale to 8 bits like load_image
        image = (image / (np.iinfo(image.dtype).max / 255.0)).astype(np.uint8)
    return np.asarray(image)


def _decode_npy(data: bytes, ref: str) -> np.ndarray:
    """Parse a ``.npy`` without trusting it: no pickles, and the body must hold exactly the bytes declared."""
    shape, fortran, dtype, offset = _npy_header(data, ref)
    count = math.prod(shape)  # exact: a forged header must not overflow into a plausible size
    body = memoryview(data)[offset:]
    if len(body) != count * dtype.itemsize:
        raise InputError(f"{ref}: .npy header declares {shape} {dtype} but the body holds {len(body)} bytes")
    flat = np.frombuffer(body, dtype=dtype, count=count)
    array = flat.reshape(shape[::-1]).transpose() if fortran else flat.reshape(shape)
    return np.array(array, copy=True)  # writable and independent of the request buffer


def _npy_header(data: bytes, ref: str) -> tuple[tuple[int, ...], bool, np.dtype[Any], int]:
    """(shape, fortran order, dtype, body offset) from a ``.npy`` header (format versions 1 to 3)."""
    version = data[6] if len(data) > 6 and data.startswith(_NPY_MAGIC) else 0
    width = {1: 2, 2: 4, 3: 4}.get(version)
    if width is None:
        raise InputError(f"{ref}: not a .npy array (no NUMPY magic or an unknown format version)")
    size = int.from_bytes(data[8 : 8 + width], "little")
    start = 8 + width
    if size > _NPY_MAX_HEADER or len(data) < start + size:
        raise InputError(f"{ref}: .npy header is truncated or over {_NPY_MAX_HEADER} bytes")
    try:
        header = ast.literal_eval(data[start : start + size].decode("utf-8" if version == 3 else "latin-1"))
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError) as exc:
        raise InputError(f"{ref}: .npy header is not a Python literal ({exc.__class__.__name__})") from exc
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise InputError(f"{ref}: .npy header needs exactly the keys descr, fortran_order and shape")
    shape, fortran, descr = header["shape"], header["fortran_order"], header["descr"]
    if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape):
        raise InputError(f"{ref}: .npy shape {shape!r} is not a tuple of non-negative integers")
    if not isinstance(fortran, bool) or not isinstance(descr, str):
        raise InputError(f"{ref}: .npy header needs a boolean fortran_order and a plain dtype string")
    try:
        dtype = np.dtype(descr)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{ref}: .npy dtype {descr!r} is not understood") from exc
    if dtype.kind not in "biufcSU" or dtype.itemsize == 0:
        raise InputError(f"{ref}: .npy dtype {dtype} is refused; send a numeric (or string) array")
    return shape, fortran, dtype, start + size


class DirectorySource:
    """Yield each complete new file in a watched directory once, oldest first (rules in the module docstring)."""

    def __init__(
        self,
        path: str | Path,
        *,
        patterns: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".npy"),
        poll_interval_s: float = 0.5,
        after: Literal["keep", "move", "delete"] = "move",
        done_dir: str | Path | None = None,
        failed_dir: str | Path | None = None,
    ):
        if after not in ("keep", "move", "delete"):
            raise ConfigError(f"expected keep, move or delete, got {after!r}", key="source.after")
        if not poll_interval_s > 0:
            raise ConfigError(f"expected a positive number of seconds, got {poll_interval_s}", key="poll_interval_s")
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create watched directory {self.path} ({exc})", key="source.path") from exc
        self._patterns = tuple(p.lower() for p in patterns)
        self._poll = poll_interval_s
        self._after = after
        self._done_dir = Path(done_dir) if done_dir is not None else self.path / "done"
        self._failed_dir = Path(failed_dir) if failed_dir is not None else self.path / "failed"
        self._stop = threading.Event()
        self._seen: dict[str, tuple[int, int]] = {}  # name → (size, mtime_ns) at the previous poll
        self._handled: OrderedDict[tuple[str, int, int], None] = OrderedDict()  # kept or unmovable files
        self._unacked: dict[str, tuple[str, tuple[int, int]]] = {}  # delivered, not yet finished
        self._delivered = 0
        self._failed = 0

    def __iter__(self) -> Iterator[Item]:
        while not self._stop.is_set():
            for name, sig in self._scan():
                if self._stop.is_set():
                    return
                item = self._read(name, sig)
                if item is None:
                    continue
                self._delivered += 1
                self._unacked[item.ref] = (name, sig)
                yield item
                # at-least-once: finished when the consumer acks it or comes back for more
                if self._unacked.pop(item.ref, None) is not None:
                    self._finish(name, sig)
            self._stop.wait(self._poll)

    def _scan(self) -> list[tuple[str, tuple[int, int]]]:
        """Names whose size and mtime did not change since the previous poll, oldest first."""
        current: dict[str, tuple[int, int]] = {}
        try:
            with os.scandir(self.path) as entries:
                for entry in entries:
                    if entry.name.startswith(".") or not entry.name.lower().endswith(self._patterns):
                        continue
                    try:
                        if not entry.is_file():
                            continue
                        st = entry.stat()
                    except OSError:  # vanished between listing and stat
                        continue
                    current[entry.name] = (st.st_size, st.st_mtime_ns)
        except OSError as exc:
            log.warning("cannot list watched directory %s (%s); retrying", self.path, exc)
            return []
        ready = [(n, s) for n, s in current.items() if self._seen.get(n) == s and (n, *s) not in self._handled]
        self._seen = current
        return sorted(ready, key=lambda ns: (ns[1][1], ns[0]))

    def _read(self, name: str, sig: tuple[int, int]) -> Item | None:
        path = self.path / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._reject(name, sig, f"unreadable ({exc})")
            return None
        kind: ItemKind = "tensor" if name.lower().endswith(".npy") else "image"
        try:
            return decode_item(data, ref=str(path), kind=kind)
        except InputError as exc:
            self._reject(name, sig, str(exc))
            return None

    def _reject(self, name: str, sig: tuple[int, int], reason: str) -> None:
        self._failed += 1
        log.warning("moving %s to %s: %s", name, self._failed_dir, reason)
        self._relocate(name, sig, self._failed_dir)

    def _finish(self, name: str, sig: tuple[int, int]) -> None:
        self._seen.pop(name, None)
        if self._after == "keep":
            self._remember(name, sig)
        elif self._after == "move":
            self._relocate(name, sig, self._done_dir)
        else:
            try:
                (self.path / name).unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("cannot delete processed file %s (%s); it will not be read again", name, exc)
                self._remember(name, sig)

    def _relocate(self, name: str, sig: tuple[int, int], folder: Path) -> None:
        self._seen.pop(name, None)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.path / name), str(_free_name(folder, name)))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("cannot move %s to %s (%s); it will not be read again", name, folder, exc)
            self._remember(name, sig)

    def _remember(self, name: str, sig: tuple[int, int]) -> None:
        self._handled[(name, *sig)] = None
        if len(self._handled) > _REMEMBER:
            self._handled.popitem(last=False)

    def ack(self, item: Item) -> None:
        """The consumer is done with ``item``: move/delete/remember it now rather than on the next read."""
        entry = self._unacked.pop(item.ref, None)
        if entry is not None:
            self._finish(*entry)

    def close(self) -> None:
        """End iteration (a blocked ``for`` loop returns within one poll interval)."""
        self._stop.set()

    def stats(self) -> dict[str, Any]:
        """Counters for ``status``."""
        return {
            "source": "directory",
            "path": str(self.path),
            "delivered": self._delivered,
            "failed": self._failed,
            "waiting": len(self._seen),
        }

    def __enter__(self) -> DirectorySource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _free_name(folder: Path, name: str) -> Path:
    """``folder/name``, or ``folder/stem-N.suffix`` when that is taken (never overwrite an earlier file)."""
    target = folder / name
    n = 1
    while target.exists():
        target = folder / f"{Path(name).stem}-{n}{Path(name).suffix}"
        n += 1
    return target


def _is_live(uri: str | int) -> bool:
    if isinstance(uri, int):
        return True
    return uri.isdigit() or uri.startswith("/dev/video") or "://" in uri


class VideoSource:
    """Frames from a video file, camera or stream (rules in the module docstring); iterate it once."""

    def __init__(
        self,
        uri: str | int,
        *,
        max_fps: float | None = None,
        loop: bool = False,
        realtime: bool = False,
        live: bool | None = None,
        reconnect_max_s: float = 30.0,
    ):
        self._uri = uri
        self._live = _is_live(uri) if live is None else live
        camera = isinstance(uri, int) or str(uri).isdigit()
        self.name = f"camera:{uri}" if camera else str(uri)
        self._loop = loop
        self._realtime = realtime
        self._reconnect_max = reconnect_max_s
        self._max_fps: float | None = None
        self.set_max_fps(max_fps)
        self._stop = threading.Event()
        self._lock = threading.Lock()  # file mode: the capture, shared by the iterator and close()
        self._cond = threading.Condition()  # live mode: the latest frame
        self._latest: tuple[int, np.ndarray, float] | None = None
        self._thread: threading.Thread | None = None
        self._last_delivery: float | None = None
        self._delivered = 0
        self._skipped = 0
        self._reconnects = 0
        self._fps = 0.0
        self._cap: Any = None
        if not self._live:
            if not Path(str(uri)).is_file():
                raise InputError(f"{uri}: no such video file; check the source path")
            self._cap = self._open()
            if self._cap is None:
                raise InputError(f"{uri}: OpenCV cannot open this video; check the file and its codec")
            fps = float(self._cap.get(_cv2().CAP_PROP_FPS) or 0.0)
            self._fps = fps if 0.0 < fps <= 1000.0 else 0.0
            if realtime and not self._fps:
                log.warning("%s: frame rate unknown; delivering every frame", uri)

    def set_max_fps(self, fps: float | None) -> None:
        """Cap the delivery rate (``None``: no cap); takes effect for the next frame."""
        if fps is not None and not fps > 0:
            raise ConfigError(f"expected a positive frame rate or none, got {fps}", key="max_fps")
        self._max_fps = fps

    def _open(self) -> Any:
        cv2 = _cv2()
        target: str | int = int(self._uri) if isinstance(self._uri, int) or self._uri.isdigit() else self._uri
        cap = cv2.VideoCapture(target)
        if not cap.isOpened():
            cap.release()
            return None
        return cap

    def __iter__(self) -> Iterator[Item]:
        return self._iter_live() if self._live else self._iter_file()

    def _pace(self) -> None:
        """Wait until the frame-rate cap allows the next delivery (re-reading the cap so changes apply live)."""
        while self._last_delivery is not None and self._max_fps is not None:
            remaining = self._last_delivery + 1.0 / self._max_fps - time.monotonic()
            if remaining <= 0 or self._stop.wait(min(remaining, 0.05)):
                return

    def _sleep_until(self, deadline: float) -> None:
        while (remaining := deadline - time.monotonic()) > 0 and not self._stop.wait(min(remaining, 0.05)):
            pass

    def _iter_file(self) -> Iterator[Item]:
        index, t0, passes = 0, 0.0, 0
        try:
            while not self._stop.is_set():
                self._pace()
                late = 0
                if self._realtime and self._fps:
                    if index == 0:
                        t0 = time.monotonic()
                    self._sleep_until(t0 + index / self._fps)  # consumer ahead of the film: wait for it
                    late = max(0, int((time.monotonic() - t0) * self._fps) - index)
                frame, skipped = self._read_file(late)
                self._skipped += skipped
                index += skipped
                if frame is None:
                    if self._stop.is_set() or not self._loop or (index == 0 and passes == 0):
                        return
                    if not self._rewind():
                        return
                    index, passes = 0, passes + 1
                    continue
                yield self._deliver(f"{self.name}#frame={index}", frame, time.time())
                index += 1
        finally:
            self._release()

    def _read_file(self, skip: int) -> tuple[np.ndarray | None, int]:
        """``grab()`` (no decode) past ``skip`` late frames, then read one; ``None`` at the end or when closed."""
        with self._lock:
            if self._cap is None:
                return None, 0
            for done in range(skip):
                if not self._cap.grab():
                    return None, done
            ok, frame = self._cap.read()
        return (frame if ok else None), skip

    def _rewind(self) -> bool:
        with self._lock:
            if self._cap is None:
                return False
            self._cap.release()
            self._cap = self._open()
            return self._cap is not None

    def _deliver(self, ref: str, frame: np.ndarray, ts: float) -> Item:
        self._delivered += 1
        self._last_delivery = time.monotonic()
        return Item(ref=ref, data=frame, kind="image", ts=ts)

    def _iter_live(self) -> Iterator[Item]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._grab_loop, name="edge-video", daemon=True)
            self._thread.start()
        last = 0
        while not self._stop.is_set():
            self._pace()
            with self._cond:
                while not self._stop.is_set() and (self._latest is None or self._latest[0] <= last):
                    self._cond.wait(0.1)
                if self._stop.is_set() or self._latest is None:
                    return
                seq, frame, ts = self._latest
            self._skipped += seq - last - 1
            last = seq
            yield self._deliver(f"{self.name}#frame={seq - 1}", frame, ts)

    def _grab_loop(self) -> None:
        """Keep only the newest frame; reopen with exponential backoff when the device or stream goes away."""
        cap, delay, seq = None, _BACKOFF_START_S, 0
        try:
            while not self._stop.is_set():
                if cap is None:
                    cap = self._open()
                    if cap is None:
                        log.warning("%s: cannot open; retrying in %.1f s", self.name, delay)
                        delay = self._backoff(delay)
                        continue
                ok, frame = cap.read()
                if not ok or frame is None:
                    cap.release()
                    cap = None
                    log.warning("%s: no frame (device gone or stream ended); reconnecting in %.1f s", self.name, delay)
                    delay = self._backoff(delay)
                    continue
                delay = _BACKOFF_START_S
                seq += 1
                with self._cond:
                    self._latest = (seq, frame, time.time())
                    self._cond.notify_all()
        finally:
            if cap is not None:
                cap.release()

    def _backoff(self, delay: float) -> float:
        self._reconnects += 1
        self._stop.wait(delay)
        return min(delay * 2.0, self._reconnect_max)

    def _release(self) -> None:
        with self._lock:
            if self._cap is not None:
                self._cap.release()
                self._cap = None

    def close(self) -> None:
        """Stop iteration, join the grabber thread (up to 1 s) and release the capture."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            if self._thread.is_alive():
                log.warning(
                    "%s: capture still blocked in OpenCV; its thread will exit when the call returns", self.name
                )
        self._release()

    def stats(self) -> dict[str, Any]:
        """Counters for ``status``: frames delivered and skipped, the cap, reconnects."""
        return {
            "source": "video",
            "uri": self.name,
            "live": self._live,
            "realtime": self._live or self._realtime,
            "fps": self._fps or None,
            "max_fps": self._max_fps,
            "delivered": self._delivered,
            "skipped": self._skipped,
            "reconnects": self._reconnects,
        }

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
