"""Sources for `serve`: a real watched directory and real video files written with OpenCV (no mocks)."""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.errors import ConfigError, InputError
from runtime.sources import DirectorySource, Item, VideoSource, decode_item

POLL = 0.05


def _png(value: int, size: tuple[int, int] = (12, 16)) -> bytes:
    ok, buf = cv2.imencode(".png", np.full((*size, 3), value, np.uint8))
    assert ok
    return bytes(buf)


def _drop(folder: Path, name: str, data: bytes) -> Path:
    """Write the way writers should: under a hidden name, then rename into the watched directory."""
    tmp = folder / f".{name}.part"
    tmp.write_bytes(data)
    os.replace(tmp, folder / name)
    return folder / name


class _Consumer:
    """Iterates a source on a thread, handing items to the test through a queue."""

    def __init__(self, source: DirectorySource | VideoSource, delay: float = 0.0):
        self.source = source
        self.items: queue.Queue[Item] = queue.Queue()
        self._delay = delay
        self.thread = threading.Thread(target=self._run, name="test-consumer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for item in self.source:
            self.items.put(item)
            if self._delay:
                time.sleep(self._delay)

    def take(self, n: int, timeout: float = 5.0) -> list[Item]:
        return [self.items.get(timeout=timeout) for _ in range(n)]

    def stop(self) -> float:
        t0 = time.monotonic()
        self.source.close()
        self.thread.join(timeout=3.0)
        assert not self.thread.is_alive(), "iteration did not end after close()"
        return time.monotonic() - t0


# --- decoding -------------------------------------------------------------------------------------


def test_decode_item_reads_images_and_npy_with_digest() -> None:
    data = _png(77)
    item = decode_item(data, ref="x.png")
    assert item.kind == "image" and item.data.shape == (12, 16, 3) and int(item.data[0, 0, 0]) == 77
    assert item.digest == hashlib.sha256(data).hexdigest()
    buf = io.BytesIO()
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    np.save(buf, arr)
    tensor = decode_item(buf.getvalue(), ref="t.npy")
    assert tensor.kind == "tensor" and tensor.data.flags.writeable
    np.testing.assert_array_equal(tensor.data, arr)
    fortran = io.BytesIO()
    np.save(fortran, np.asfortranarray(arr))
    np.testing.assert_array_equal(decode_item(fortran.getvalue(), ref="f.npy").data, arr)


def test_decode_item_refuses_a_npy_whose_header_lies_about_its_size() -> None:
    buf = io.BytesIO()
    np.save(buf, np.zeros(4, np.float64))
    forged = buf.getvalue().replace(b"'shape': (4,), ", b"'shape': (99999999999,), ")
    with pytest.raises(InputError, match="declares"):
        decode_item(forged, ref="forged.npy")
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="refused"):
        decode_item(obj.getvalue(), ref="obj.npy")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(["auto", "image", "tensor"]))
def test_decode_item_gives_an_item_or_an_input_error(data: bytes, kind: str) -> None:
    try:
        item = decode_item(data, ref="fuzz", kind=kind)  # type: ignore[arg-type]
    except InputError:
        return
    assert isinstance(item.data, np.ndarray)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=120), st.binary(max_size=64))
def test_decode_item_survives_arbitrary_npy_headers(header: str, body: bytes) -> None:
    raw = header.encode("latin1", "replace")
    pad = 16 - (10 + len(raw) + 1) % 16
    blob = b"\x93NUMPY\x01\x00" + (len(raw) + pad + 1).to_bytes(2, "little") + raw + b" " * pad + b"\n" + body
    try:
        decode_item(blob, ref="fuzz.npy")
    except InputError:
        pass


# --- directory ------------------------------------------------------------------------------------


def test_directory_yields_each_file_once_oldest_first(tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    for i, name in enumerate(["c.png", "a.png", "b.png"]):  # mtime order differs from name order
        path = _drop(inbox, name, _png(10 * (i + 1)))
        os.utime(path, ns=(1_000_000_000 * (i + 1), 1_000_000_000 * (i + 1)))
    consumer = _Consumer(DirectorySource(inbox, poll_interval_s=POLL, after="keep"))
    try:
        first = consumer.take(3)
        assert [Path(i.ref).name for i in first] == ["c.png", "a.png", "b.png"]
        assert [int(i.data[0, 0, 0]) for i in first] == [10, 20, 30]
        _drop(inbox, "d.png", _png(40))
        (later,) = consumer.take(1)
        assert Path(later.ref).name == "d.png"
        time.sleep(6 * POLL)
        assert consumer.items.empty(), "a kept file was yielded twice"
    finally:
        consumer.stop()
    assert sorted(p.name for p in inbox.iterdir()) == ["a.png", "b.png", "c.png", "d.png"]
    assert consumer.source.stats()["delivered"] == 4


def test_directory_ignores_hidden_and_unlisted_files(tmp_path: Path) -> None:
    (tmp_path / ".partial.png").write_bytes(_png(1))
    (tmp_path / "notes.txt").write_text("hello")
    buf = io.BytesIO()
    np.save(buf, np.ones((2, 2), np.int64))
    _drop(tmp_path, "x.npy", buf.getvalue())
    consumer = _Consumer(DirectorySource(tmp_path, poll_interval_s=POLL))
    try:
        (item,) = consumer.take(1)
        assert item.kind == "tensor" and item.data.sum() == 4
        time.sleep(6 * POLL)
        assert consumer.items.empty()
    finally:
        consumer.stop()
    assert (tmp_path / ".partial.png").exists() and (tmp_path / "notes.txt").exists()


def test_a_file_still_being_written_is_not_read_early(tmp_path: Path) -> None:
    poll = 0.25
    data = _png(99, size=(120, 160))
    consumer = _Consumer(DirectorySource(tmp_path, poll_interval_s=poll))
    try:
        with open(tmp_path / "slow.png", "wb") as fh:  # written in place, the way writers should not
            step = max(1, len(data) // 60)
            for start in range(0, len(data), step):
                fh.write(data[start : start + step])
                fh.flush()
                time.sleep(0.01)
                assert consumer.items.empty(), "read while the size was still growing"
        (item,) = consumer.take(1)
    finally:
        consumer.stop()
    assert item.digest == hashlib.sha256(data).hexdigest()
    assert not (tmp_path / "failed").exists()


def test_undecodable_file_goes_to_failed_and_the_loop_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="runtime.sources")
    _drop(tmp_path, "bad.png", b"this is not a png")
    consumer = _Consumer(DirectorySource(tmp_path, poll_interval_s=POLL))
    try:
        time.sleep(4 * POLL)
        _drop(tmp_path, "good.png", _png(5))
        (item,) = consumer.take(1)
        assert Path(item.ref).name == "good.png"
    finally:
        consumer.stop()
    assert (tmp_path / "failed" / "bad.png").read_bytes() == b"this is not a png"
    assert any("bad.png" in r.getMessage() and "decode" in r.getMessage() for r in caplog.records)
    assert consumer.source.stats()["failed"] == 1


def test_move_happens_when_the_consumer_asks_for_more(tmp_path: Path) -> None:
    _drop(tmp_path, "one.png", _png(1))
    source = DirectorySource(tmp_path, poll_interval_s=POLL)
    it = iter(source)
    item = next(it)
    assert (tmp_path / "one.png").exists(), "moved before the consumer was done with it"
    _drop(tmp_path, "two.png", _png(2))
    assert Path(next(it).ref).name == "two.png"
    assert (tmp_path / "done" / "one.png").exists() and not (tmp_path / "one.png").exists()
    assert Path(item.ref).name == "one.png"
    _drop(tmp_path, "one.png", _png(3))  # same name again: the earlier done file is not overwritten
    assert Path(next(it).ref).name == "one.png"
    source.close()
    assert list(it) == []
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == ["one-1.png", "one.png", "two.png"]


def test_delete_removes_processed_files(tmp_path: Path) -> None:
    for name in ("a.png", "b.png"):
        _drop(tmp_path, name, _png(1))
    consumer = _Consumer(DirectorySource(tmp_path, poll_interval_s=POLL, after="delete"))
    try:
        consumer.take(2)
        deadline = time.monotonic() + 3
        while (tmp_path / "b.png").exists() and time.monotonic() < deadline:
            time.sleep(POLL)
    finally:
        consumer.stop()
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()
    assert not (tmp_path / "done").exists()


def test_keep_reprocesses_after_a_restart(tmp_path: Path) -> None:
    _drop(tmp_path, "a.png", _png(1))
    for _ in range(2):  # documented: "keep" remembers only for the life of the source
        with DirectorySource(tmp_path, poll_interval_s=POLL, after="keep") as source:
            assert Path(next(iter(source)).ref).name == "a.png"


def test_close_ends_a_blocked_iteration_promptly(tmp_path: Path) -> None:
    consumer = _Consumer(DirectorySource(tmp_path, poll_interval_s=0.5))
    time.sleep(0.3)
    assert consumer.stop() < 1.0


def test_directory_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="after"):
        DirectorySource(tmp_path, after="archive")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="poll_interval_s"):
        DirectorySource(tmp_path, poll_interval_s=0)


# --- video ----------------------------------------------------------------------------------------

FRAMES = 60
FPS = 30.0


def _frame_value(i: int) -> int:
    return (i * 4) % 256


def _index_of(frame: np.ndarray) -> int:
    """The frame number painted into a test frame (MJPG keeps flat colours within a few levels)."""
    return round(float(frame.mean()) / 4)


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("video") / "count.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (64, 48))
    assert writer.isOpened(), "this OpenCV build cannot write MJPG/.avi"
    for i in range(FRAMES):
        writer.write(np.full((48, 64, 3), _frame_value(i), np.uint8))
    writer.release()
    return path


def _frame_numbers(items: list[Item]) -> list[int]:
    return [int(i.ref.rsplit("#frame=", 1)[1]) for i in items]


def test_offline_video_delivers_every_frame_in_order(video: Path) -> None:
    with VideoSource(str(video), realtime=False) as source:
        items = list(source)
        stats = source.stats()
    assert _frame_numbers(items) == list(range(FRAMES))
    assert [_index_of(i.data) for i in items] == list(range(FRAMES))
    assert stats["delivered"] == FRAMES and stats["skipped"] == 0 and stats["fps"] == pytest.approx(FPS)


def test_realtime_video_skips_frames_for_a_slow_consumer(video: Path) -> None:
    items: list[Item] = []
    with VideoSource(str(video), realtime=True) as source:
        for item in source:
            items.append(item)
            time.sleep(0.1)  # inference three times slower than the film
        stats = source.stats()
    numbers = _frame_numbers(items)
    assert numbers == sorted(set(numbers)), "frame numbers must increase"
    assert max(b - a for a, b in itertools.pairwise(numbers)) >= 2, "no frame was skipped"
    assert 8 <= len(items) <= 40, len(items)
    assert [_index_of(i.data) for i in items] == numbers, "the frame delivered is not the one named"
    assert stats["delivered"] + stats["skipped"] <= FRAMES and stats["skipped"] >= FRAMES // 3


def test_realtime_video_with_a_fast_consumer_plays_at_the_film_rate(video: Path) -> None:
    t0 = time.monotonic()
    with VideoSource(str(video), realtime=True) as source:
        n = sum(1 for _ in source)
    elapsed = time.monotonic() - t0
    assert elapsed >= (FRAMES - 1) / FPS * 0.9, "played faster than the film"
    assert n >= FRAMES * 0.6  # a busy CI box may still drop a few


def _count_for(it: Iterator[Item], seconds: float) -> int:
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        next(it)
        n += 1
    return n


def test_max_fps_caps_delivery_and_can_change_live(video: Path) -> None:
    with VideoSource(str(video), max_fps=10.0, loop=True) as source:
        it = iter(source)
        slow = _count_for(it, 1.0)
        source.set_max_fps(60.0)
        fast = _count_for(it, 1.0)
        source.set_max_fps(None)
        uncapped = _count_for(it, 0.3)
        it.close()
    assert 6 <= slow <= 12, slow
    assert 30 <= fast <= 62, fast
    assert uncapped > fast * 0.3 * 1.5, (uncapped, fast)
    with pytest.raises(ConfigError, match="max_fps"):
        source.set_max_fps(0)


def test_loop_restarts_the_file(video: Path) -> None:
    with VideoSource(str(video), loop=True) as source:
        it = iter(source)
        items = [next(it) for _ in range(FRAMES + 5)]
        it.close()
    assert _frame_numbers(items) == [*range(FRAMES), *range(5)]


def test_missing_or_unreadable_video_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such video"):
        VideoSource(str(tmp_path / "nope.avi"))
    (tmp_path / "junk.avi").write_bytes(b"not a video at all" * 10)
    with pytest.raises(InputError, match="cannot open"):
        VideoSource(str(tmp_path / "junk.avi"))


def test_live_source_keeps_only_the_latest_frame_and_reconnects(video: Path) -> None:
    # a file read as a live stream: the grabber decodes as fast as it can, hits the end ("device gone")
    # and reopens it with backoff, so this exercises the camera path without a camera
    source = VideoSource(str(video), live=True)
    consumer = _Consumer(source, delay=0.02)
    try:
        time.sleep(1.6)
        assert any(t.name == "edge-video" and t.daemon for t in threading.enumerate())
    finally:
        consumer.stop()
    items = list(consumer.items.queue)
    numbers = _frame_numbers(items)
    assert items and numbers == sorted(set(numbers))
    stats = source.stats()
    assert stats["skipped"] > 0 and stats["reconnects"] >= 1
    assert stats["delivered"] == len(items)
    time.sleep(0.05)
    assert not any(t.name == "edge-video" for t in threading.enumerate()), "grabber thread left running"


def test_missing_camera_retries_and_closes_promptly() -> None:
    source = VideoSource(97)  # no such device: opening fails, the grabber backs off and retries
    assert source.name == "camera:97"
    consumer = _Consumer(source)
    time.sleep(0.8)
    assert consumer.stop() < 1.5
    assert consumer.items.empty() and source.stats()["reconnects"] >= 1
    assert not any(t.name == "edge-video" for t in threading.enumerate())
