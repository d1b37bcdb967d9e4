"""Atomic file replacement: concurrent writers never fail and a reader never sees a torn file."""

from __future__ import annotations

import threading
from pathlib import Path

from runtime.durable import write_atomic


def test_concurrent_writers_never_collide(tmp_path: Path) -> None:
    target = tmp_path / "status.json"
    errors: list[BaseException] = []
    payloads = [bytes([65 + i]) * 4096 for i in range(4)]

    def writer(data: bytes, durable: bool) -> None:
        try:
            for _ in range(200):
                write_atomic(target, data, durable=durable)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(p, i % 2 == 0)) for i, p in enumerate(payloads)]
    for t in threads:
        t.start()
    seen = set()
    while any(t.is_alive() for t in threads):
        if target.exists():
            seen.add(target.read_bytes())
    for t in threads:
        t.join()
    assert errors == []
    assert seen <= set(payloads)  # whole payloads only, never a mix
    assert target.read_bytes() in payloads
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]  # no temp file left behind


def test_failed_write_leaves_old_content_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "pointer"
    write_atomic(target, b"old")
    target_dir_as_file = tmp_path / "pointer" / "child"  # parent is a file: the write must fail cleanly
    try:
        write_atomic(target_dir_as_file, b"new")
    except OSError:
        pass
    else:  # pragma: no cover - the assert explains
        raise AssertionError("writing below a regular file must fail")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pointer"]
