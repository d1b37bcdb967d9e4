"""`toolchain fleet serve-model`: a bundle answering devices' escalation requests over MQTT 5 request/response.

Devices whose local result is not confident enough ask a bigger model (:mod:`runtime.escalate`): an
MQTT 5 request on ``edge/<fleet>/escalate/<model>`` carrying a response topic and correlation data.
:class:`ModelServer` subscribes through the shared subscription ``$share/<group>/edge/<fleet>/escalate/<model>``,
so several servers (processes or hosts) in one group split the requests: the broker hands each request
to one member. Its session is clean (session expiry 0): a server that dies leaves the group at once and
requests are not queued for it.

The network thread only checks the envelope and queues the request; one worker thread decodes the
input (``.npy`` through the runtime's own strict reader, images through OpenCV), runs the bundle
through :func:`runtime.model.load_model`'s engine and publishes the response to the request's response
topic with the same correlation data. A request whose response topic is not a device's
``edge/<fleet>/<device>/escalate/resp`` of this fleet, or names another device than the body, gets no
answer (the server must not be made to publish elsewhere); a request the bundle cannot run (bad input,
wrong model name) is answered with ``{"error": …}`` so the device does not wait for its timeout; a full
queue answers ``busy`` at once; a request that already waited longer than its ``timeout_ms`` is dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.errors import EdgeError
from runtime.escalate import MAX_REQUEST_BYTES, EscalationError, decode_request, encode_response
from toolchain.errors import UsageError

if TYPE_CHECKING:
    from runtime.link import Link, LinkConfig, Message
    from runtime.model import LoadedModel

__all__ = ["Answer", "ModelServer", "serve_model_command"]

log = logging.getLogger(__name__)

_COUNTERS = ("requests", "answered", "errors", "busy", "expired", "rejected")


@dataclass(frozen=True)
class Answer:
    """What a request gets: a ``result``, an ``error``, or nothing at all (``dropped``: expired or rejected)."""

    result: dict[str, Any] | None = None
    error: str | None = None
    dropped: str | None = None


@dataclass(frozen=True)
class _Job:
    payload: bytes
    response_topic: str
    device: str
    correlation: bytes
    received: float  # time.monotonic()


class ModelServer:
    """One escalation server: ``run(stop_event)`` answers requests until the event is set."""

    def __init__(
        self,
        model: LoadedModel,
        link_cfg: LinkConfig,
        fleet: str,
        *,
        model_name: str | None = None,
        share_group: str = "escalate",
        max_request_bytes: int = 4 * MAX_REQUEST_BYTES,
        queue_size: int = 64,
    ) -> None:
        from runtime.topics import escalate_topic, shared, validate_segment

        self.model = model
        self.link_cfg = link_cfg
        self.fleet = validate_segment(fleet, "--fleet")
        self.model_name = validate_segment(model_name or model.name, "--model")
        self.share_group = validate_segment(share_group, "--share-group")
        self.topic_filter = shared(escalate_topic(fleet, self.model_name), share_group)
        self.max_request_bytes = max_request_bytes
        self.worker = link_cfg.client_id
        self._queue: queue.Queue[_Job] = queue.Queue(maxsize=queue_size)
        self._link: Link | None = None
        self._lock = threading.Lock()
        self._stats = dict.fromkeys(_COUNTERS, 0)

    def stats(self) -> dict[str, int]:
        """Counters: requests, answered, errors (answered with an error), busy, expired, rejected (no answer)."""
        with self._lock:
            return dict(self._stats)

    def _count(self, key: str) -> None:
        with self._lock:
            self._stats[key] += 1

    # --- requests -----------------------------------------------------------------------------------

    def handle(self, msg: Message) -> None:
        """Network thread: check the envelope and queue the request (or answer ``busy`` when the queue is full)."""
        from runtime.topics import parse_topic

        self._count("requests")
        response_topic = msg.properties.get("response_topic")
        correlation = msg.properties.get("correlation_data")
        info = parse_topic(response_topic)
        if (
            not isinstance(response_topic, str)
            or info is None
            or info.kind != "escalate_resp"
            or info.fleet != self.fleet
            or info.device is None
        ):
            self._count("rejected")
            log.warning(
                "ignored a request on %s: response topic %r is not a device's escalate/resp", msg.topic, response_topic
            )
            return
        if not isinstance(correlation, bytes) or not correlation:
            self._count("rejected")
            log.warning("ignored a request from %s without correlation data", info.device)
            return
        job = _Job(msg.payload, response_topic, info.device, correlation, time.monotonic())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self._count("busy")
            self._reply(job, None, f"busy: {self._queue.maxsize} requests already queued; try again later")

    def answer(self, payload: bytes, *, device: str, waited_s: float = 0.0) -> Answer:
        """The answer to one request body that arrived with ``device``'s response topic ``waited_s`` ago."""
        from runtime.sources import decode_item

        try:
            req = decode_request(payload, max_bytes=self.max_request_bytes)
        except EscalationError as exc:
            return Answer(error=str(exc))
        if req.device != device:  # a device asking on another's behalf gets nothing published anywhere
            return Answer(dropped="rejected")
        if req.model != self.model_name:
            return Answer(error=f"this server runs {self.model_name!r}, not {req.model!r}")
        if req.timeout_ms is not None and waited_s * 1000.0 > req.timeout_ms:
            return Answer(dropped="expired")
        ref = f"escalate:{device}"
        try:
            item = decode_item(req.data, ref=ref, kind=req.kind)
            if item.kind == "image":
                feeds = self.model.tensor_from_image(item.data)
            else:
                feeds = self.model.tensor_from_array(item.data, source=ref)
            pred = self.model.run(feeds, ref=ref)
        except EdgeError as exc:
            return Answer(error=str(exc))
        result = pred.to_dict()
        result.pop("input", None)
        return Answer(result=result)

    def _work(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                job = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                answer = self.answer(job.payload, device=job.device, waited_s=time.monotonic() - job.received)
            except Exception:  # the serving loop's one guarded catch-all: logged with its traceback, answered
                log.exception("failed on a request from %s", job.device)
                answer = Answer(error="internal error in the server; see its log")
            if answer.dropped is not None:
                self._count(answer.dropped)
                log.info("no answer to a request from %s: %s", job.device, answer.dropped)
                continue
            self._count("answered" if answer.result is not None else "errors")
            self._reply(job, answer.result, answer.error)

    def _reply(self, job: _Job, result: dict[str, Any] | None, error: str | None) -> None:
        body = encode_response(
            result, model=self.model_name, version=self.model.version, worker=self.worker, error=error
        )
        link = self._link
        if link is not None:
            props = {"correlation_data": job.correlation, "content_type": "application/json"}
            link.publish(job.response_topic, body, qos=1, properties=props)

    # --- running ------------------------------------------------------------------------------------

    def run(
        self,
        stop_event: threading.Event,
        *,
        connect_timeout: float = 10.0,
        on_ready: Callable[[], None] | None = None,
    ) -> dict[str, int]:
        """Subscribe and answer until ``stop_event`` is set; return :meth:`stats`.

        ``on_ready()`` runs once the broker granted the shared subscription; not being subscribed after
        ``connect_timeout`` is only logged (the link keeps retrying with backoff).
        """
        from runtime.link import Link

        link = Link(self.link_cfg)
        self._link = link
        done = threading.Event()
        worker = threading.Thread(target=self._work, args=(done,), name="serve-model-worker", daemon=True)
        try:
            link.subscribe(self.topic_filter, self.handle, qos=1)
            link.start()
            worker.start()
            if link.wait_subscribed(self.topic_filter, connect_timeout):
                log.info("subscribed to %s", self.topic_filter)
                if on_ready is not None:
                    on_ready()
            else:
                cfg = self.link_cfg
                log.warning("not subscribed at %s:%d after %.0f s; still trying", cfg.host, cfg.port, connect_timeout)
            stop_event.wait()
        finally:
            done.set()
            if worker.is_alive():
                worker.join(timeout=5.0)
            link.stop()
            self._link = None
        return self.stats()


def _load(args: argparse.Namespace) -> LoadedModel:
    from runtime.engine import EngineOptions
    from runtime.model import load_model
    from runtime.signing import load_public_key

    if not Path(args.bundle).exists():
        raise UsageError(f"bundle not found: {args.bundle}", flag="--bundle")
    for key in args.trusted_key:
        if not Path(key).is_file():
            raise UsageError(f"public key not found: {key}", flag="--trusted-key")
    threads = args.threads or min(4, os.cpu_count() or 1)
    keys = [load_public_key(Path(k)) for k in args.trusted_key]
    return load_model(Path(args.bundle), trusted_keys=keys, options=EngineOptions(intra_op_threads=threads))


def serve_model_command(args: argparse.Namespace, fleet: str, link_config: Callable[..., LinkConfig]) -> int:
    """`toolchain fleet serve-model`: load and verify the bundle, answer requests until SIGTERM/SIGINT."""
    if args.threads < 0 or args.max_request_kb < 4 or args.queue < 1:
        raise UsageError("must be positive (--max-request-kb at least 4)", flag="--threads/--max-request-kb/--queue")
    model = _load(args)
    host = socket.gethostname().split(".")[0][:24] or "host"
    name = args.model or model.name
    client_id = args.client_id or f"serve-{name[:32]}-{host}-{os.getpid()}"
    cfg = link_config(args, client_id, session_expiry_s=0, protocol="mqtt5")
    stop = threading.Event()

    def _stop(signum: int, frame: Any) -> None:
        stop.set()

    def _ready() -> None:
        print(
            f"serve-model: {model.name} {model.version} answering {server.topic_filter} as {client_id}; "
            "SIGTERM or Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )

    try:
        server = ModelServer(
            model,
            cfg,
            fleet,
            model_name=name,
            share_group=args.share_group,
            max_request_bytes=args.max_request_kb * 1024,
            queue_size=args.queue,
        )
        previous = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            stats = server.run(stop, connect_timeout=args.connect_timeout, on_ready=_ready)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        with contextlib.suppress(EdgeError):
            model.close()
    if args.json:
        json.dump({"model": name, "version": model.version, "worker": client_id, **stats}, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(
            f"serve-model: {stats['requests']} request(s): answered {stats['answered']}, errors {stats['errors']}, "
            f"busy {stats['busy']}, expired {stats['expired']}, rejected {stats['rejected']}"
        )
    return 0
