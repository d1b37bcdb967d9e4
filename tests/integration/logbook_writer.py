"""Logs records until killed; for each record_* call that returned, prints ``seq monotonic-time`` and flushes.

Run by ``test_logbook_crash.py`` as ``python logbook_writer.py DB [--durable] [--flush-interval S] [--rate N]``;
it prints ``ready`` once the logbook is open. ``--rate`` paces the calls (records per second) so that
commits come from the flush timer rather than from full batches. CLOCK_MONOTONIC is system-wide on Linux, so the test
can compare these times with the moment it sent SIGKILL.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from runtime.logbook import Logbook, LogbookConfig


def main() -> None:
    """Write inferences, metrics and events in turn, forever."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("db", type=Path)
    parser.add_argument("--durable", action="store_true")
    parser.add_argument("--flush-interval", type=float, default=0.2)
    parser.add_argument("--rate", type=float, default=0.0, help="records per second; 0 = as fast as possible")
    args = parser.parse_args()
    config = LogbookConfig(args.db, flush_interval_s=args.flush_interval, durable=args.durable)
    logbook = Logbook(config, device_id="crash-test")
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    start = time.monotonic()
    for i in range(sys.maxsize):
        if args.rate:
            time.sleep(max(0.0, start + i / args.rate - time.monotonic()))
        if i % 3 == 0:
            seq = logbook.record_inference(
                model="digits", version="1.0.0", input_ref=f"frame-{i}", latency_ms=1.5, result={"top1": i % 10}
            )
        elif i % 3 == 1:
            seq = logbook.record_metric("frames", float(i), labels={"source": "camera"})
        else:
            seq = logbook.record_event("tick", f"record {i}", data={"i": i})
        out.write(f"{seq} {time.monotonic():.6f}\n")
        out.flush()


if __name__ == "__main__":
    main()
