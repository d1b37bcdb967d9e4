"""The local HTTP endpoint over real sockets on 127.0.0.1: every status code, limits, concurrency, shutdown."""

from __future__ import annotations

import http.client
import io
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import cv2
import numpy as np
import pytest

from runtime.errors import ConfigError, InputError
from runtime.httpapi import HttpEndpoint
from runtime.sources import Item

SECRET = "db-password-hunter2"  # must never reach a client


def _infer(item: Item) -> dict[str, Any]:
    if item.kind == "tensor" and item.data.size == 1:
        value = float(item.data.reshape(-1)[0])
        if value == 13:
            raise RuntimeError(f"engine exploded near {SECRET}")
        if value == 42:
            raise InputError("shape (1,) does not fit input 'x' (1, 8)")
        if value == 7:
            return {"odd": object()}  # not JSON: the endpoint must answer 500, not a broken body
    return {"kind": item.kind, "shape": list(item.data.shape), "mean": np.float32(item.data.mean()), "ref": item.ref}


def _png(h: int = 8, w: int = 10) -> bytes:
    ok, buf = cv2.imencode(".png", np.full((h, w, 3), 200, np.uint8))
    assert ok
    return bytes(buf)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@pytest.fixture
def endpoint() -> Iterator[HttpEndpoint]:
    ep = HttpEndpoint(_infer, rate_limit_per_s=1000.0, burst=1000, max_body_bytes=64 * 1024)
    ep.start()
    yield ep
    ep.close()


def _request(
    ep: HttpEndpoint,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, dict[str, Any], http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", ep.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    assert resp.getheader("Content-Type") == "application/json"
    payload = json.loads(raw) if raw else {}
    if resp.status >= 400 and method != "HEAD":
        assert payload["status"] == resp.status and isinstance(payload["error"], str) and payload["error"]
        if path != "/healthz":  # a 503 from /healthz carries the health details as well
            assert set(payload) == {"error", "status"}
    return resp.status, payload, resp


def _raw(ep: HttpEndpoint, data: bytes, *, shut_write: bool = False, timeout: float = 5.0) -> tuple[int, bytes]:
    """Send raw bytes, read the whole answer; returns (status, body)."""
    with socket.create_connection(("127.0.0.1", ep.port), timeout=timeout) as sock:
        sock.sendall(data)
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_infer_png_npy_and_sniffed_bodies(endpoint: HttpEndpoint) -> None:
    status, payload, resp = _request(endpoint, "POST", "/v1/infer", _png(), {"Content-Type": "image/png"})
    assert status == 200 and payload["kind"] == "image" and payload["shape"] == [8, 10, 3]
    assert payload["mean"] == pytest.approx(200.0) and len(payload["request_id"]) == 32
    assert payload["ref"] == f"http:{payload['request_id']}" and resp.getheader("X-Request-Id") == payload["request_id"]
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    status, payload, _ = _request(endpoint, "POST", "/v1/infer", _npy(arr), {"Content-Type": "application/x-npy"})
    assert status == 200 and payload["kind"] == "tensor" and payload["shape"] == [2, 3]
    for ctype in ("application/octet-stream", None):  # sniffed by magic bytes
        headers = {"Content-Type": ctype} if ctype else {}
        status, payload, _ = _request(endpoint, "POST", "/v1/infer", _npy(arr), headers)
        assert status == 200 and payload["kind"] == "tensor"
        status, payload, _ = _request(endpoint, "POST", "/v1/infer", _png(), headers)
        assert status == 200 and payload["kind"] == "image"


def test_undecodable_body_is_400_with_a_reason(endpoint: HttpEndpoint) -> None:
    status, payload, _ = _request(endpoint, "POST", "/v1/infer", b"GIF89a-ish garbage", {"Content-Type": "image/png"})
    assert status == 400 and "decode" in payload["error"]
    status, payload, _ = _request(endpoint, "POST", "/v1/infer", b"\x93NUMPY\x01\x00junk", {})
    assert status == 400 and ".npy" in payload["error"]


def test_missing_content_length_is_411(endpoint: HttpEndpoint) -> None:
    status, body = _raw(endpoint, b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n\r\n")
    assert status == 411 and json.loads(body)["status"] == 411
    chunked = b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    status, body = _raw(endpoint, chunked)
    assert status == 411 and "chunked" in json.loads(body)["error"]


def test_bad_content_length_is_400(endpoint: HttpEndpoint) -> None:
    status, body = _raw(endpoint, b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n")
    assert status == 400 and "Content-Length" in json.loads(body)["error"]


def test_huge_body_is_413_without_reading_it(endpoint: HttpEndpoint) -> None:
    head = b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 10000000000\r\n\r\n"
    t0 = time.monotonic()
    status, body = _raw(endpoint, head + b"\x89PNG a few bytes", timeout=5.0)
    assert status == 413 and "over the limit" in json.loads(body)["error"]
    assert time.monotonic() - t0 < 2.0
    # http.client too, announcing 10 GB but sending little and keeping the connection open
    conn = http.client.HTTPConnection("127.0.0.1", endpoint.port, timeout=5)
    try:
        conn.putrequest("POST", "/v1/infer")
        conn.putheader("Content-Length", str(10 * 1024**3))
        conn.putheader("Content-Type", "image/png")
        conn.endheaders(b"\x89PNG\r\n\x1a\n")
        t0 = time.monotonic()
        resp = conn.getresponse()
        assert resp.status == 413 and json.loads(resp.read())["status"] == 413
        assert time.monotonic() - t0 < 2.0
    finally:
        conn.close()


def test_expect_100_continue_is_answered_before_the_body(endpoint: HttpEndpoint) -> None:
    big = b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 999999999\r\n\r\n"
    status, body = _raw(endpoint, big)  # refused at once: no "100 Continue" for a body that will not be read
    assert status == 413 and json.loads(body)["status"] == 413
    png = _png()
    head = f"POST /v1/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {len(png)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=5) as sock:
        sock.sendall(head.encode())
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(png)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and b'"kind":"image"' in answer


def test_unsupported_content_type_is_415(endpoint: HttpEndpoint) -> None:
    status, payload, _ = _request(endpoint, "POST", "/v1/infer", b"{}", {"Content-Type": "application/json"})
    assert status == 415 and "application/json" in payload["error"]


def test_unknown_route_404_and_wrong_method_405(endpoint: HttpEndpoint) -> None:
    assert _request(endpoint, "GET", "/v2/nothing")[0] == 404
    status, _, resp = _request(endpoint, "GET", "/v1/infer")
    assert status == 405 and resp.getheader("Allow") == "POST"
    status, _, resp = _request(endpoint, "DELETE", "/healthz")
    assert status == 405 and resp.getheader("Allow") == "GET"
    status, body = _raw(endpoint, b"BREW /v1/infer HTTP/1.1\r\nHost: x\r\n\r\n")  # verb unknown to the stdlib too
    assert status == 501 and json.loads(body)["status"] == 501


def test_input_error_from_infer_is_422_with_its_message(endpoint: HttpEndpoint) -> None:
    status, payload, _ = _request(endpoint, "POST", "/v1/infer", _npy(np.array([42.0])))
    assert status == 422 and "does not fit input 'x'" in payload["error"]


def test_crash_in_infer_is_500_without_leaking_the_traceback(
    endpoint: HttpEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="runtime.httpapi")
    conn = http.client.HTTPConnection("127.0.0.1", endpoint.port, timeout=10)
    try:
        conn.request("POST", "/v1/infer", body=_npy(np.array([13.0])))
        resp = conn.getresponse()
        raw = resp.read().decode()
    finally:
        conn.close()
    assert resp.status == 500 and "see the device log" in json.loads(raw)["error"]
    assert SECRET not in raw and "Traceback" not in raw and "RuntimeError" not in raw
    assert any(r.exc_info and SECRET in str(r.exc_info[1]) for r in caplog.records), "traceback not logged"
    status, payload, _ = _request(endpoint, "POST", "/v1/infer", _npy(np.array([7.0])))
    assert status == 500 and "JSON" in payload["error"]


def test_rate_limit_is_429_with_retry_after() -> None:
    with HttpEndpoint(_infer, rate_limit_per_s=0.5, burst=2) as ep:
        codes = [_request(ep, "POST", "/v1/infer", _png())[0] for _ in range(2)]
        status, payload, resp = _request(ep, "POST", "/v1/infer", _png())
        assert codes == [200, 200] and status == 429 and "rate limit" in payload["error"]
        assert int(resp.getheader("Retry-After") or 0) in (1, 2)
        assert _request(ep, "GET", "/healthz")[0] == 200, "health probes are not rate limited"
        assert ep.stats()["responses"]["429"] == 1


def test_healthz_200_and_503() -> None:
    state = {"ok": True, "model": "digits"}
    with HttpEndpoint(_infer, health=lambda: state) as ep:
        status, payload, _ = _request(ep, "GET", "/healthz")
        assert status == 200 and payload == {"ok": True, "model": "digits"}
        state["ok"] = False
        status, payload, _ = _request(ep, "GET", "/healthz")
        assert status == 503 and payload["ok"] is False and payload["model"] == "digits"
        assert payload["error"] == "not healthy"


def test_healthz_without_a_check_and_when_the_check_raises() -> None:
    with HttpEndpoint(_infer) as ep:
        assert _request(ep, "GET", "/healthz")[:2] == (200, {"ok": True})

    def broken() -> dict[str, Any]:
        raise OSError("sensor gone")

    with HttpEndpoint(_infer, health=broken) as ep:
        status, payload, _ = _request(ep, "GET", "/healthz")
        assert status == 503 and payload["ok"] is False and "sensor" not in json.dumps(payload)


def test_status_route_returns_status_and_http_counters() -> None:
    with HttpEndpoint(_infer, status=lambda: {"model": "digits", "version": "1.0.0"}) as ep:
        _request(ep, "GET", "/nope")
        status, payload, _ = _request(ep, "GET", "/v1/status?verbose=1")
        assert status == 200 and payload["model"] == "digits" and payload["version"] == "1.0.0"
        assert payload["http"]["port"] == ep.port and payload["http"]["responses"]["404"] == 1


def test_concurrent_requests_are_served_in_parallel() -> None:
    barrier = threading.Barrier(4, timeout=5)

    def rendezvous(item: Item) -> dict[str, Any]:
        barrier.wait()  # only returns once 4 requests are inside infer at the same time
        return {"shape": list(item.data.shape)}

    results: list[int] = []
    with HttpEndpoint(rendezvous) as ep:
        threads = [
            threading.Thread(target=lambda: results.append(_request(ep, "POST", "/v1/infer", _png())[0]))
            for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert results == [200] * 4


def test_non_loopback_hosts_are_refused_unless_allowed() -> None:
    for host in ("0.0.0.0", "192.168.1.20", "::", "device.example"):
        with pytest.raises(ConfigError, match="loopback"):
            HttpEndpoint(_infer, host=host)
    HttpEndpoint(_infer, host="0.0.0.0", allow_remote=True)  # accepted when asked for; never started here
    with HttpEndpoint(_infer, host="localhost") as ep:
        assert ep.host == "127.0.0.1" and _request(ep, "GET", "/healthz")[0] == 200


def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    ep = HttpEndpoint(_infer, host="::1")
    try:
        ep.start()
    except Exception as exc:  # a container without an IPv6 loopback
        pytest.skip(f"cannot bind ::1 here: {exc}")
    try:
        conn = http.client.HTTPConnection("::1", ep.port, timeout=5)
        try:
            conn.request("GET", "/healthz")
            assert conn.getresponse().status == 200
        finally:
            conn.close()
    finally:
        ep.close()


def test_close_ends_threads_and_slow_clients_promptly() -> None:
    ep = HttpEndpoint(_infer)
    ep.start()
    port = ep.port
    assert any(t.name == "edge-http" and t.daemon for t in threading.enumerate())
    slow = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        # announce a body and never send it: the request thread sits in recv()
        slow.sendall(b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100\r\n\r\n")
        time.sleep(0.2)
        assert any(t.name == "edge-http-request" for t in threading.enumerate())
        t0 = time.monotonic()
        ep.close()
        assert time.monotonic() - t0 < 1.5
    finally:
        slow.close()
    time.sleep(0.05)
    names = {t.name for t in threading.enumerate()}
    assert "edge-http" not in names and "edge-http-request" not in names
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def test_port_in_use_is_a_clear_error() -> None:
    with HttpEndpoint(_infer) as first:
        second = HttpEndpoint(_infer, port=first.port)
        with pytest.raises(Exception, match="cannot listen"):
            second.start()
        second.close()
