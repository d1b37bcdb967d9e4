"""kill -9 of a process writing the logbook loses no more than promised, and the file reopens and continues."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.logbook import Logbook, LogbookConfig, open_readonly
from tests.conftest import REPO

WRITER = Path(__file__).with_name("logbook_writer.py")
FLUSH_S = 0.2
# Between a record's return and its commit: the flush interval, then the writer thread waking, taking
# the GIL from the busy producer (switch interval 5 ms) and committing one batch (a few ms). 0.25 s
# covers that many times over on a loaded 2-core CI box without hiding a missed flush.
SLACK_S = 0.25
MODES = {
    "batched": [],  # as fast as possible: full batches trigger the commits
    "paced": ["--rate", "1000"],  # 200 records per flush interval, far from a batch: the timer commits
    "durable": ["--durable"],
}


def _run_and_kill(tmp_path: Path, mode: str, seconds: float) -> tuple[list[tuple[int, float]], float]:
    """Start the writer, let it run, SIGKILL it; return (seq, return time) per returned call, and the kill time."""
    db, out_path, err_path = tmp_path / "log.db", tmp_path / "returned.txt", tmp_path / "stderr.txt"
    args = [sys.executable, str(WRITER), str(db), "--flush-interval", str(FLUSH_S), *MODES[mode]]
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 60
        while out_path.stat().st_size < 1000:  # "ready" plus some records
            assert proc.poll() is None, err_path.read_text()
            assert time.monotonic() < deadline, "the writer did not start"
            time.sleep(0.02)
        time.sleep(seconds)
        killed_at = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    returned = []
    for line in out_path.read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) == 2 and len(fields[1].partition(".")[2]) == 6:  # skip a line cut short by the kill
            returned.append((int(fields[0]), float(fields[1])))
    return returned, killed_at


def _stored(db: Path) -> list[int]:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(
            "SELECT seq FROM inferences UNION ALL SELECT seq FROM metrics UNION ALL SELECT seq FROM events"
        )
        return sorted(seq for (seq,) in rows)
    finally:
        conn.close()


@pytest.mark.parametrize("attempt", range(3))
@pytest.mark.parametrize("mode", list(MODES))
def test_kill_9_loses_at_most_one_flush_interval(tmp_path: Path, mode: str, attempt: int) -> None:
    returned, killed_at = _run_and_kill(tmp_path, mode, seconds=1.0 + 0.3 * attempt)
    assert len(returned) > 500, "the writer barely wrote anything"
    stored = _stored(tmp_path / "log.db")
    assert stored == list(range(1, len(stored) + 1))  # commits are whole and in order: no holes
    present = set(stored)
    if mode == "durable":
        lost = [seq for seq, _ in returned if seq not in present]  # returned means committed
    else:
        lost = [seq for seq, t in returned if t < killed_at - FLUSH_S - SLACK_S and seq not in present]
        assert any(t < killed_at - FLUSH_S - SLACK_S for _, t in returned)  # the promise was really tested
    assert not lost, f"{len(lost)} records lost, first {lost[:5]}"

    # The crashed file opens for reading, then for writing, and the sequence continues above what was stored.
    assert open_readonly(tmp_path / "log.db").stats()["last_seq"] >= stored[-1]
    with Logbook(LogbookConfig(tmp_path / "log.db"), device_id="crash-test") as logbook:
        seq = logbook.record_event("restart", "after kill -9")
        logbook.flush()
        assert seq > stored[-1]
        assert logbook.tail(1, table="events")[0]["seq"] == seq
