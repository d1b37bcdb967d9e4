"""A device-like process: writes records to its logbook, then syncs them over MQTT until none are left.

Run by ``test_sync.py`` as ``python sync_device.py DB --port P [--records N] [--hold] …``. It prints
``written N`` once the records are committed, then ``acked A unsynced U`` about every 50 ms while it
syncs, and ``synced`` once the outbox is empty. Without ``--hold`` it then stops cleanly (offline
status, disconnect) and exits 0; with ``--hold`` it stays connected until SIGTERM, then does the
same. SIGKILL it at any point to test what survives.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from runtime.link import Link, LinkConfig
from runtime.logbook import Logbook, LogbookConfig
from runtime.sync import Sync, with_will


def write_records(logbook: Logbook, n: int) -> None:
    """``n`` records, inferences, metrics and events in turn, each derived from its index."""
    for i in range(n):
        if i % 3 == 0:
            logbook.record_inference(
                model="digits", version="1.0.0", input_ref=f"frame-{i}", latency_ms=1.5, result={"top1": i % 10}
            )
        elif i % 3 == 1:
            logbook.record_metric("frames", float(i), labels={"source": "camera"})
        else:
            logbook.record_event("tick", f"record {i}", data={"i": i})
    logbook.flush(60)


def main() -> int:
    """Write, sync, report progress on stdout; exit 0 after a clean stop."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("db", type=Path)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fleet", default="fleet1")
    parser.add_argument("--device", default="dev1")
    parser.add_argument("--records", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--inflight", type=int, default=8)
    parser.add_argument("--protocol", default="auto")
    parser.add_argument("--compress", action="store_true")
    parser.add_argument("--hold", action="store_true", help="stay connected after syncing, until SIGTERM")
    args = parser.parse_args()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    out = sys.stdout
    logbook = Logbook(LogbookConfig(args.db, flush_interval_s=0.05), device_id=args.device)
    write_records(logbook, args.records)
    print(f"written {args.records}", file=out, flush=True)

    cfg = LinkConfig(
        client_id=args.device, port=args.port, protocol=args.protocol, reconnect_min_s=0.1, reconnect_max_s=1.0
    )
    link = Link(with_will(cfg, fleet=args.fleet, device=args.device))
    status = {"group": "lab", "profile": "x86-64", "model": "digits", "version": "1.0.0"}
    sync = Sync(
        link,
        logbook,
        fleet=args.fleet,
        device=args.device,
        batch_size=args.batch_size,
        max_inflight_batches=args.inflight,
        compress=args.compress,
        status=lambda: status,
        poll_interval_s=0.05,
    )
    sync.start()
    link.start()
    synced = False
    while not stop.wait(0.05):
        unsynced = logbook.stats()["unsynced"]
        print(f"acked {sync.stats()['records_acked']} unsynced {unsynced}", file=out, flush=True)
        if unsynced == 0 and not synced:
            synced = True
            print("synced", file=out, flush=True)
            if not args.hold:
                break
    sync.close()
    link.stop()
    logbook.close()
    print("stopped", file=out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
