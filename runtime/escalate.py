"""Escalation of low-confidence results to a bigger server-side model: MQTT 5 request/response behind a circuit breaker.

When the local top-1 score is under ``threshold``, :class:`Escalator` asks the model served on
``edge/<fleet>/escalate/<model>`` (``toolchain fleet serve-model``) with an MQTT 5 request: the
response topic ``edge/<fleet>/<device>/escalate/resp`` and fresh correlation data ride along as
properties (:meth:`runtime.link.Link.request`). The caller waits at most ``timeout_s`` and keeps the
local result when no answer comes; :func:`apply_escalation` merges the outcome into the record, so the
one logged inference holds both results (``escalation.server`` and the local fields) and says which one
counts (``final``: ``"server"`` or ``"local"``).

Outcomes (``escalation.status``):

- ``answered``: the server's result is in ``server`` (``model``, ``version`` and ``worker`` name it).
- ``timeout``: no answer within ``timeout_s``; a breaker failure.
- ``error``: not connected to the broker or an unreadable answer (breaker failures), an answer saying
  the server could not run the input (not a failure: the server is alive), or an input over the size
  cap (nothing sent); ``reason`` says which.
- ``circuit-open``: the breaker is open, nothing was sent.
- ``unsupported``: the link speaks MQTT 3.1.1, which has no response topic or correlation data;
  nothing is sent and the breaker is left alone.

:class:`CircuitBreaker`: ``closed`` counts consecutive failures; ``failures`` in a row open it; while
``open`` nothing is sent; ``reset_after_s`` later it is ``half-open`` and lets exactly one trial
request through: its success closes the breaker, its failure opens it for another ``reset_after_s``.

Wire format (UTF-8 JSON). Request, at most ``max_request_bytes``::

    {"v": 1, "device": "<id>", "model": "<server model>", "ts": <unix s>, "timeout_ms": 2000,
     "input": {"npy_b64": "<.npy bytes>"} | {"image_b64": "<PNG/JPEG bytes>", "content_type": "image/png"},
     "local": {"model", "version", "top1", "topk"}}

Response: ``{"v": 1, "result": {top1, topk, outputs, latency_ms…}, "model", "version", "worker"}``, or
``{"v": 1, "error": "<why>", "model", "version", "worker"}`` when the server could not run the input.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from runtime.errors import ConfigError, EdgeError
from runtime.link import Message
from runtime.topics import escalate_response_topic, escalate_topic, validate_device, validate_segment

__all__ = [
    "MAX_REQUEST_BYTES",
    "MAX_RESPONSE_BYTES",
    "STATUSES",
    "WIRE_VERSION",
    "CircuitBreaker",
    "EscalationError",
    "EscalationRequest",
    "EscalationResponse",
    "Escalator",
    "apply_escalation",
    "decode_request",
    "decode_response",
    "encode_image",
    "encode_request",
    "encode_response",
]

log = logging.getLogger(__name__)

WIRE_VERSION = 1
MAX_REQUEST_BYTES = 1 << 20  # default cap of one request (the encoded input dominates)
MAX_RESPONSE_BYTES = 4 << 20
STATUSES = ("answered", "timeout", "error", "circuit-open", "unsupported")
BreakerState = Literal["closed", "open", "half-open"]
_NPY_MAGIC = b"\x93NUMPY"
_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"BM", "image/bmp"))
_LOCAL_FIELDS = ("model", "version", "top1", "topk")


class EscalationError(EdgeError, ValueError):
    """An escalation request or response that cannot be decoded or lacks the documented fields."""


class _Requester(Protocol):
    """What the escalator needs from :class:`runtime.link.Link`."""

    @property
    def connected(self) -> bool: ...

    @property
    def protocol_in_use(self) -> str: ...

    def request(
        self, topic: str, payload: bytes, *, response_topic: str, timeout: float, qos: int = 1
    ) -> Message | None: ...


# --- circuit breaker ----------------------------------------------------------------------------


class CircuitBreaker:
    """closed → (``failures`` in a row) → open → (``reset_after_s``) → half-open: one trial → closed or open.

    Thread-safe; ``clock`` is injectable for tests (monotonic seconds).
    """

    def __init__(
        self, failures: int = 3, reset_after_s: float = 30.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not isinstance(failures, int) or isinstance(failures, bool) or failures < 1:
            raise ConfigError(f"expected an integer >= 1, got {failures!r}", key="escalation.breaker_failures")
        if not isinstance(reset_after_s, int | float) or not 0 < reset_after_s < math.inf:
            raise ConfigError(f"expected seconds > 0, got {reset_after_s!r}", key="escalation.breaker_reset_s")
        self.failures = failures
        self.reset_after_s = float(reset_after_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._state: BreakerState = "closed"
        self._consecutive = 0
        self._opened_at = 0.0
        self._trial = False  # a half-open trial is under way
        self.opened = 0  # times it opened
        self.rejected = 0  # requests it stopped

    def _current(self) -> BreakerState:
        """The state now (lock held): an open breaker whose time is up is half-open."""
        if self._state == "open" and self._clock() - self._opened_at >= self.reset_after_s:
            self._state, self._trial = "half-open", False
        return self._state

    @property
    def state(self) -> BreakerState:
        """``closed``, ``open`` or ``half-open``."""
        with self._lock:
            return self._current()

    def retry_in_s(self) -> float:
        """Seconds until an open breaker lets a trial through (0 unless open)."""
        with self._lock:
            if self._current() != "open":
                return 0.0
            return max(0.0, self._opened_at + self.reset_after_s - self._clock())

    def allow(self) -> bool:
        """May a request go out now? Half-open grants one trial; the caller must report its outcome."""
        with self._lock:
            state = self._current()
            if state == "closed":
                return True
            if state == "half-open" and not self._trial:
                self._trial = True
                return True
            self.rejected += 1
            return False

    def record_success(self) -> None:
        """A request was answered: close the breaker and forget past failures."""
        with self._lock:
            if self._state != "closed":
                log.info("escalation circuit closed: the server answers again")
            self._state, self._consecutive, self._trial = "closed", 0, False

    def record_failure(self) -> None:
        """A request failed: count it; open on the ``failures``-th in a row, or at once after a half-open trial."""
        with self._lock:
            self._consecutive += 1
            state = self._current()
            if state == "half-open" or (state == "closed" and self._consecutive >= self.failures):
                self._state, self._opened_at, self._trial = "open", self._clock(), False
                self.opened += 1
                log.warning(
                    "escalation circuit open after %d failure(s) in a row: local results only for %.1f s",
                    self._consecutive,
                    self.reset_after_s,
                )

    def stats(self) -> dict[str, Any]:
        """State and counters for ``status``."""
        with self._lock:
            return {
                "state": self._current(),
                "consecutive_failures": self._consecutive,
                "opened": self.opened,
                "rejected": self.rejected,
            }


# --- wire format --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EscalationRequest:
    """A decoded request: who asks, for which model, the input bytes (``.npy`` or an encoded image)."""

    device: str
    model: str
    kind: Literal["tensor", "image"]
    data: bytes
    content_type: str
    local: dict[str, Any] = field(default_factory=dict)
    timeout_ms: int | None = None


@dataclass(frozen=True)
class EscalationResponse:
    """A decoded response: the server's ``result``, or the ``error`` that kept it from running the input."""

    model: str
    version: str
    result: dict[str, Any] | None = None
    error: str | None = None
    worker: str | None = None


def _json(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _input_field(payload: bytes | np.ndarray) -> dict[str, str]:
    """An array becomes ``.npy`` bytes; bytes are sent as they are (``.npy`` told from images by the magic)."""
    if isinstance(payload, np.ndarray):
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(payload), allow_pickle=False)
        payload = buf.getvalue()
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise TypeError(f"escalation input must be bytes or a numpy array, got {type(payload).__name__}")
    raw = bytes(payload)
    text = base64.b64encode(raw).decode("ascii")
    if raw.startswith(_NPY_MAGIC):
        return {"npy_b64": text}
    ctype = next((c for magic, c in _IMAGE_MAGIC if raw.startswith(magic)), "application/octet-stream")
    return {"image_b64": text, "content_type": ctype}


def encode_request(
    *, device: str, model: str, payload: bytes | np.ndarray, local: Mapping[str, Any], timeout_s: float
) -> bytes:
    """One request body; ``local`` is the local record (only model, version, top1 and topk are sent)."""
    doc = {
        "v": WIRE_VERSION,
        "device": device,
        "model": model,
        "ts": round(time.time(), 3),
        "timeout_ms": max(1, int(timeout_s * 1000)),
        "input": _input_field(payload),
        "local": {k: local[k] for k in _LOCAL_FIELDS if k in local},
    }
    return _json(doc)


def _load(raw: bytes, what: str, max_bytes: int) -> dict[str, Any]:
    if not isinstance(raw, bytes | bytearray) or not raw:
        raise EscalationError(f"empty {what}; expected a JSON object")
    if len(raw) > max_bytes:
        raise EscalationError(f"{what} of {len(raw)} bytes is over the {max_bytes}-byte cap")
    try:
        doc = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise EscalationError(f"{what} is not UTF-8 JSON: {exc.__class__.__name__}") from None
    if not isinstance(doc, dict):
        raise EscalationError(f"{what} must be a JSON object, got {type(doc).__name__}")
    if doc.get("v") != WIRE_VERSION:
        raise EscalationError(f"{what} has version {doc.get('v')!r}; this runtime speaks v{WIRE_VERSION}")
    return doc


def _string(doc: Mapping[str, Any], key: str, what: str, *, limit: int = 256) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise EscalationError(f"{what}: {key!r} must be a non-empty string of at most {limit} characters")
    return value


def _b64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise EscalationError(f"{what}: expected base64 text, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise EscalationError(f"{what}: not valid base64") from None


def decode_request(raw: bytes, *, max_bytes: int = MAX_REQUEST_BYTES) -> EscalationRequest:
    """A received request, its shape checked; EscalationError for anything else (never another exception)."""
    doc = _load(raw, "request", max_bytes)
    try:
        device = validate_device(doc.get("device"), "device")
        model = validate_segment(doc.get("model"), "model")
    except ConfigError as exc:
        raise EscalationError(f"request: {exc}") from None
    inp = doc.get("input")
    if not isinstance(inp, dict) or ("npy_b64" in inp) == ("image_b64" in inp):
        raise EscalationError("request: 'input' must be an object with exactly one of npy_b64, image_b64")
    kind: Literal["tensor", "image"] = "tensor" if "npy_b64" in inp else "image"
    data = _b64(inp["npy_b64"] if kind == "tensor" else inp["image_b64"], "request input")
    if not data:
        raise EscalationError("request: the input is empty")
    ctype = "application/x-npy"
    if kind == "image":
        ctype = _string(inp, "content_type", "request input") if "content_type" in inp else "application/octet-stream"
    local = doc.get("local", {})
    timeout = doc.get("timeout_ms")
    if not isinstance(local, dict):
        raise EscalationError("request: 'local' must be an object")
    if timeout is not None and (not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0):
        raise EscalationError("request: 'timeout_ms' must be a positive integer")
    return EscalationRequest(device, model, kind, data, ctype, local, timeout)


def encode_response(
    result: Mapping[str, Any] | None, *, model: str, version: str, worker: str | None = None, error: str | None = None
) -> bytes:
    """A response body: the server's ``result``, or the ``error`` (give exactly one)."""
    if (result is None) == (error is None):
        raise ValueError("give exactly one of result and error")
    doc: dict[str, Any] = {"v": WIRE_VERSION, "model": model, "version": version}
    doc.update({"result": dict(result)} if result is not None else {"error": error})
    if worker:
        doc["worker"] = worker
    return _json(doc)


def decode_response(raw: bytes, *, max_bytes: int = MAX_RESPONSE_BYTES) -> EscalationResponse:
    """A received response, its shape checked; EscalationError for anything else (never another exception)."""
    doc = _load(raw, "response", max_bytes)
    model, version = _string(doc, "model", "response"), _string(doc, "version", "response")
    worker = doc.get("worker")
    worker = worker if isinstance(worker, str) and len(worker) <= 256 else None
    result, error = doc.get("result"), doc.get("error")
    if isinstance(result, dict) and error is None:
        return EscalationResponse(model, version, result=result, worker=worker)
    if result is None and isinstance(error, str):
        return EscalationResponse(model, version, error=error[:1000] or "unspecified", worker=worker)
    raise EscalationError("response must hold either an object 'result' or a string 'error'")


def encode_image(image: np.ndarray, *, max_bytes: int = MAX_REQUEST_BYTES) -> bytes:
    """A decoded image (BGR/grey uint8, as OpenCV reads it) as PNG, or JPEG (quality 90) if the PNG is too big.

    The server runs its own preprocessing on it, so a bigger model may use another input size.
    """
    import cv2  # deferred: only image inputs need OpenCV

    budget = max_bytes * 3 // 4 - 1024  # base64 grows the bytes by a third; leave room for the JSON around them
    ok, png = cv2.imencode(".png", image)
    if ok and len(png) <= budget:
        return bytes(png.tobytes())
    ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise EscalationError(f"OpenCV cannot encode an image of shape {image.shape} and dtype {image.dtype}")
    return bytes(jpeg.tobytes())


def apply_escalation(record: Mapping[str, Any], escalation: Mapping[str, Any] | None) -> dict[str, Any]:
    """The record with ``escalation`` and ``final`` (``server`` when answered, else ``local``); as is when None."""
    if escalation is None:
        return dict(record)
    final = "server" if escalation.get("status") == "answered" else "local"
    return {**record, "escalation": dict(escalation), "final": final}


# --- the device side ----------------------------------------------------------------------------


class Escalator:
    """Asks the server-side ``model`` when a local result's top-1 score is under ``threshold``.

    :meth:`escalate` blocks the calling (inference) thread for at most ``timeout_s`` plus the
    encoding of the input; it never raises for network trouble, it reports it.
    """

    def __init__(
        self,
        link: _Requester,
        *,
        fleet: str,
        device: str,
        model: str,
        threshold: float,
        timeout_s: float,
        breaker: CircuitBreaker,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(threshold, int | float) or not math.isfinite(threshold):
            raise ConfigError(f"expected a finite number, got {threshold!r}", key="escalation.threshold")
        if not isinstance(timeout_s, int | float) or not 0 < timeout_s <= 3600:
            raise ConfigError(f"expected 0 < seconds <= 3600, got {timeout_s!r}", key="escalation.timeout_s")
        if max_request_bytes < 4096:
            raise ConfigError(
                f"expected at least 4 KiB, got {max_request_bytes} bytes", key="escalation.max_request_kb"
            )
        self.link = link
        self.fleet = validate_segment(fleet, "fleet")
        self.device = validate_device(device)
        self.model = validate_segment(model, "escalation.model")
        self.threshold = float(threshold)
        self.timeout_s = float(timeout_s)
        self.breaker = breaker
        self.max_request_bytes = max_request_bytes
        self.request_topic = escalate_topic(fleet, model)
        self.response_topic = escalate_response_topic(fleet, device)
        self._clock = clock
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(("sent", *STATUSES), 0)

    def wants(self, record: Mapping[str, Any]) -> bool:
        """True when the record has a numeric top-1 score under the threshold (other tasks never escalate)."""
        top1 = record.get("top1")
        score = top1.get("score") if isinstance(top1, Mapping) else None
        if not isinstance(score, int | float) or isinstance(score, bool) or not math.isfinite(score):
            return False
        return score < self.threshold

    def maybe_escalate(self, record: Mapping[str, Any], payload: bytes | np.ndarray) -> dict[str, Any] | None:
        """:meth:`escalate` when :meth:`wants` the record, else None (nothing sent)."""
        return self.escalate(record, payload) if self.wants(record) else None

    def escalate(self, record: Mapping[str, Any], payload: bytes | np.ndarray) -> dict[str, Any]:
        """Ask the server about one input (a tensor, ``.npy`` bytes or encoded image bytes); the escalation block."""
        t0 = self._clock()
        if self.link.protocol_in_use != "mqtt5":
            return self._outcome(t0, "unsupported", reason="MQTT 3.1.1 has no response topic or correlation data")
        if self.breaker.state == "open":
            return self._outcome(t0, "circuit-open", retry_in_s=round(self.breaker.retry_in_s(), 3))
        body = encode_request(
            device=self.device, model=self.model, payload=payload, local=record, timeout_s=self.timeout_s
        )
        if len(body) > self.max_request_bytes:
            reason = f"request of {len(body)} bytes is over the {self.max_request_bytes}-byte cap; nothing sent"
            return self._outcome(t0, "error", reason=reason)
        if not self.breaker.allow():
            return self._outcome(t0, "circuit-open", retry_in_s=round(self.breaker.retry_in_s(), 3))
        healthy = False
        try:
            out, healthy = self._ask(t0, body)
        finally:
            if healthy:
                self.breaker.record_success()
            else:
                self.breaker.record_failure()
        return out

    def _ask(self, t0: float, body: bytes) -> tuple[dict[str, Any], bool]:
        """Send one request; the escalation block and whether the server proved alive."""
        if not self.link.connected:
            return self._outcome(t0, "error", reason="not connected to the broker"), False
        with self._lock:
            self._counts["sent"] += 1
        remaining = self.timeout_s - (self._clock() - t0)
        answer = self.link.request(
            self.request_topic, body, response_topic=self.response_topic, timeout=max(0.0, remaining)
        )
        if answer is None:
            return self._outcome(t0, "timeout", reason=f"no answer within {self.timeout_s:g} s"), False
        try:
            resp = decode_response(answer.payload)
        except EscalationError as exc:
            log.warning("unreadable escalation answer on %s: %s", answer.topic, exc)
            return self._outcome(t0, "error", reason=f"unreadable answer: {exc}"), False
        named = {"model": resp.model, "version": resp.version, **({"worker": resp.worker} if resp.worker else {})}
        if resp.result is None:
            return self._outcome(t0, "error", reason=f"the server could not run it: {resp.error}", **named), True
        return self._outcome(t0, "answered", server=resp.result, **named), True

    def _outcome(self, t0: float, status: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            self._counts[status] += 1
        return {"status": status, **fields, "latency_ms": round((self._clock() - t0) * 1000.0, 3)}

    def stats(self) -> dict[str, Any]:
        """Requests sent, outcomes by status, and the breaker, for ``status``."""
        with self._lock:
            counts = dict(self._counts)
        return {
            "model": self.model,
            "threshold": self.threshold,
            "timeout_s": self.timeout_s,
            **counts,
            "breaker": self.breaker.stats(),
        }
