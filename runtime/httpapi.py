"""The local HTTP endpoint of `edge-runtime serve`: other programs on the device ask it for inferences.

Routes::

    POST /v1/infer    body: an encoded image (image/png, image/jpeg, image/bmp) or a .npy
                      (application/x-npy); application/octet-stream or no type is sniffed
                      → 200 {...what infer returned, "request_id": "..."}
    GET  /healthz     → 200 {"ok": true, ...} or 503 {"ok": false, "error", "status", ...} when health()
                      says "ok": false (or raises)
    GET  /v1/status   → 200 status() (plus this endpoint's counters under "http")

Every error is JSON ``{"error": "<reason>", "status": N}``: 400 undecodable body, 404 unknown route,
405 wrong method (with ``Allow``), 408 body not sent in time, 411 no Content-Length (chunked bodies
are refused), 413 body over ``max_body_bytes`` (answered from the headers, before reading the body),
415 unsupported Content-Type, 422 an :class:`~runtime.errors.InputError` from ``infer``, 429 over the
rate limit (one token bucket for ``/v1/infer``, ``Retry-After`` in seconds), 500 when ``infer`` raises
anything else (the traceback goes to the log, never to the client).

The server binds to loopback only unless ``allow_remote=True``; it speaks HTTP/1.1 with one request
per connection. ``infer`` runs on the request threads (``edge-http-request``), possibly concurrently.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import socket
import socketserver
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, cast
from urllib.parse import urlsplit

import numpy as np

from runtime.errors import ConfigError, EdgeError, InputError
from runtime.sources import Item, ItemKind, decode_item

__all__ = ["HttpEndpoint"]

log = logging.getLogger(__name__)

_ROUTES: dict[str, tuple[str, ...]] = {"/v1/infer": ("POST",), "/healthz": ("GET",), "/v1/status": ("GET",)}
_CONTENT_KINDS: dict[str, ItemKind | Literal["auto"]] = {
    "image/png": "image",
    "image/jpeg": "image",
    "image/jpg": "image",
    "image/bmp": "image",
    "image/x-ms-bmp": "image",
    "application/x-npy": "tensor",
    "application/octet-stream": "auto",
}
_LINGER_S = 1.0  # after an early error, read and drop what the client still sends for this long at most
_LINGER_BYTES = 1 << 20


class _TokenBucket:
    """``rate`` tokens per second, up to ``burst`` saved; ``take()`` returns 0 or the seconds to wait."""

    def __init__(self, rate: float, burst: int):
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> float:
        if self.rate <= 0:
            return 0.0
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return 0.0
            return (1.0 - self._tokens) / self.rate


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class _HttpError(Exception):
    """An error response decided while handling a request."""

    def __init__(self, status: int, reason: str, headers: Mapping[str, str] | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = dict(headers or {})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "edge-runtime"
    sys_version = ""

    @property
    def endpoint(self) -> HttpEndpoint:
        return cast(_Server, self.server).endpoint

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.endpoint.timeout_s)  # for headers and body alike
        self._body_pending = False

    def handle(self) -> None:
        super().handle()
        if self._body_pending:
            self._linger()

    def _linger(self) -> None:
        """Drain what the client still sends after an early error, so closing does not reset the connection
        and destroy the response before the client has read it."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            deadline, drained = time.monotonic() + _LINGER_S, 0
            while drained < _LINGER_BYTES and (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(min(left, 0.2))
                chunk = self.connection.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass

    def handle_expect_100(self) -> bool:
        """Invite the body (``100 Continue``) only when it will be read; otherwise the final answer comes at once."""
        length = self.headers.get("Content-Length", "").strip()
        wanted = urlsplit(self.path).path == "/v1/infer" and self.command == "POST"
        if wanted and length.isdigit() and int(length) <= self.endpoint.max_body_bytes:
            return super().handle_expect_100()
        return True

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol-level errors from the stdlib (bad request line, unknown verb…) as JSON too."""
        reason = message or HTTPStatus(code).phrase
        self._send_json(code, {"error": reason, "status": code})

    def _send_json(self, status: int, payload: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> None:
        try:
            body = json.dumps(payload, default=_json_default, separators=(",", ":")).encode()
        except (TypeError, ValueError):
            log.exception("response for %s is not JSON serialisable", self.path)
            status, headers = 500, {}
            body = json.dumps({"error": "result is not JSON serialisable; see the device log", "status": 500}).encode()
        self.endpoint._count(status)  # before the client can see the response (and ask for the counters)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _dispatch(self) -> None:
        self._body_pending = "Content-Length" in self.headers or "Transfer-Encoding" in self.headers
        path = urlsplit(self.path).path
        try:
            allowed = _ROUTES.get(path)
            if allowed is None:
                raise _HttpError(404, f"no route {path}; try POST /v1/infer, GET /healthz or GET /v1/status")
            if self.command not in allowed:
                raise _HttpError(405, f"{path} accepts {', '.join(allowed)}", {"Allow": ", ".join(allowed)})
            if path == "/v1/infer":
                status, payload, headers = self._infer()
            elif path == "/healthz":
                status, payload, headers = self._health()
            else:
                status, payload, headers = 200, self._status(), {}
        except _HttpError as err:
            status, payload, headers = err.status, {"error": err.reason, "status": err.status}, err.headers
        self._send_json(status, payload, headers)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _dispatch

    def _infer(self) -> tuple[int, dict[str, Any], dict[str, str]]:
        ep = self.endpoint
        wait = ep._bucket.take()
        if wait > 0:
            retry = max(1, math.ceil(wait))
            raise _HttpError(
                429, f"over the rate limit of {ep._bucket.rate:g}/s; retry later", {"Retry-After": str(retry)}
            )
        length = self._content_length()
        if length > ep.max_body_bytes:
            raise _HttpError(413, f"body of {length} bytes is over the limit of {ep.max_body_bytes} bytes")
        ctype = (self.headers.get("Content-Type") or "application/octet-stream").split(";")[0].strip().lower()
        kind = _CONTENT_KINDS.get(ctype)
        if kind is None:
            raise _HttpError(415, f"Content-Type {ctype} is not accepted; send {', '.join(_CONTENT_KINDS)}")
        request_id = uuid.uuid4().hex
        try:
            item = decode_item(self._read_body(length), ref=f"http:{request_id}", kind=kind)
        except InputError as exc:
            raise _HttpError(400, str(exc)) from None
        result = ep._run(item, request_id)
        return 200, {**result, "request_id": request_id}, {"X-Request-Id": request_id}

    def _content_length(self) -> int:
        values = self.headers.get_all("Content-Length") or []
        if not values:
            if "Transfer-Encoding" in self.headers:
                raise _HttpError(411, "chunked bodies are not accepted; send Content-Length")
            raise _HttpError(411, "Content-Length is required")
        if len(set(values)) != 1 or not values[0].strip().isdigit():
            raise _HttpError(400, f"bad Content-Length {', '.join(values)!r}")
        return int(values[0])

    def _read_body(self, length: int) -> bytes:
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            raise _HttpError(408, f"body not received within {self.endpoint.timeout_s:g} s") from None
        self._body_pending = False
        if len(body) < length:
            raise _HttpError(400, f"body ended after {len(body)} of {length} bytes")
        return body

    def _health(self) -> tuple[int, dict[str, Any], dict[str, str]]:
        check = self.endpoint._health
        try:
            info = dict(check()) if check is not None else {}
        except Exception:  # a failing probe is an unhealthy service, not a crashed endpoint
            log.exception("health check raised")
            info = {"ok": False, "error": "health check failed; see the device log"}
        if info.get("ok", True):
            return 200, {**info, "ok": True}, {}
        return 503, {**info, "ok": False, "error": str(info.get("error") or "not healthy"), "status": 503}, {}

    def _status(self) -> dict[str, Any]:
        ep = self.endpoint
        try:
            info = dict(ep._status()) if ep._status is not None else {}
        except Exception:
            log.exception("status callback raised")
            raise _HttpError(500, "status failed; see the device log") from None
        info.setdefault("http", ep.stats())
        return info


class _Server(ThreadingHTTPServer):
    """One daemon thread per connection, tracked so ``close()`` can end them."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], endpoint: HttpEndpoint):
        self.endpoint = endpoint
        self._conns: dict[threading.Thread, socket.socket] = {}
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn); a device may have no resolver
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._serve_one, args=(request, client_address), name="edge-http-request", daemon=True
        )
        with self._conns_lock:
            self._conns[thread] = request
        thread.start()

    def _serve_one(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._conns_lock:
                self._conns.pop(threading.current_thread(), None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s failed", client_address, exc_info=True)

    def end_connections(self, timeout: float) -> list[threading.Thread]:
        """Shut the open connections down (unblocking reads), wait up to ``timeout``; return stragglers."""
        with self._conns_lock:
            conns = dict(self._conns)
        for conn in conns.values():
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for thread in conns:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [t for t in conns if t.is_alive()]


class _Server6(_Server):
    address_family = socket.AF_INET6


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HttpEndpoint:
    """Local inference endpoint; ``start()`` serves in a background thread, ``close()`` stops it."""

    def __init__(
        self,
        infer: Callable[[Item], Mapping[str, Any]],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_body_bytes: int = 8 * 1024 * 1024,
        rate_limit_per_s: float = 50.0,
        burst: int = 20,
        health: Callable[[], Mapping[str, Any]] | None = None,
        status: Callable[[], Mapping[str, Any]] | None = None,
        allow_remote: bool = False,
        timeout_s: float = 10.0,
    ):
        if not allow_remote and not _is_loopback(host):
            raise ConfigError(
                f"{host!r} is not a loopback address; the endpoint serves this device only "
                "(use 127.0.0.1 or ::1, or pass allow_remote=True deliberately)",
                key="http.host",
            )
        if max_body_bytes < 1:
            raise ConfigError(f"expected a positive size, got {max_body_bytes}", key="http.max_body_kb")
        if burst < 1:
            raise ConfigError(f"expected at least 1, got {burst}", key="http.burst")
        self.host = "127.0.0.1" if host == "localhost" else host
        self.max_body_bytes = max_body_bytes
        self.timeout_s = timeout_s
        self._requested_port = port
        self._infer = infer
        self._health = health
        self._status = status
        self._bucket = _TokenBucket(rate_limit_per_s, burst)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._responses: Counter[int] = Counter()
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        """The bound port (the requested one before ``start()``)."""
        return int(self._server.server_address[1]) if self._server is not None else self._requested_port

    def start(self) -> None:
        """Bind and serve in the ``edge-http`` thread; a busy port raises :class:`EdgeError`."""
        if self._server is not None:
            return
        cls = _Server6 if ":" in self.host else _Server
        try:
            self._server = cls((self.host, self._requested_port), self)
        except OSError as exc:
            raise EdgeError(
                f"HTTP endpoint cannot listen on {self.host}:{self._requested_port} ({exc}); "
                "free the port or set [http] port"
            ) from exc
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="edge-http", daemon=True
        )
        self._thread.start()
        log.info("HTTP endpoint on http://%s:%d", self.host if ":" not in self.host else f"[{self.host}]", self.port)

    def close(self) -> None:
        """Stop serving, end open connections and join the threads (about a second at most)."""
        server, thread = self._server, self._thread
        if server is None:
            return
        if thread is not None:
            server.shutdown()
            thread.join(timeout=1.0)
        server.server_close()
        stragglers = server.end_connections(timeout=1.0)
        if stragglers:
            log.warning("%d HTTP request(s) still inside infer() at shutdown", len(stragglers))
        self._server = self._thread = None

    def _run(self, item: Item, request_id: str) -> dict[str, Any]:
        try:
            result = dict(self._infer(item))
        except InputError as exc:
            raise _HttpError(422, str(exc)) from None
        except Exception:  # any failure inside infer is a 500 with a short reason; the traceback stays in the log
            log.exception("inference failed for HTTP request %s", request_id)
            raise _HttpError(500, f"inference failed; see the device log for request {request_id}") from None
        return result

    def _count(self, status: int) -> None:
        with self._lock:
            self._responses[status] += 1

    def stats(self) -> dict[str, Any]:
        """Counters for ``status``: responses by status code, the port and the limits."""
        with self._lock:
            responses = {str(k): v for k, v in sorted(self._responses.items())}
        return {
            "port": self.port,
            "requests": sum(responses.values()),
            "responses": responses,
            "rate_limit_per_s": self._bucket.rate,
            "max_body_bytes": self.max_body_bytes,
        }

    def __enter__(self) -> HttpEndpoint:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
