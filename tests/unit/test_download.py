"""runtime.download on real sockets: file://, http with Range resume against a local server, the mqtt:// parsers."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime import download
from runtime.download import BlobMeta, chunks_path, fetch, parse_blob_url, part_path
from runtime.errors import DownloadError

DATA = os.urandom(300_000)
SHA = hashlib.sha256(DATA).hexdigest()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    data = DATA
    ignore_range = False
    cut_after: int | None = None  # the first body is cut after this many bytes (the socket closed)
    fail_first = 0  # answer the first N requests with 503
    lie_length: int | None = None  # a Content-Length for another file

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, str | None, int]] = []  # (path, Range header, status sent)
        self.sent = 0  # body bytes written

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/bundle.tar"


class _Handler(BaseHTTPRequestHandler):
    """GET with byte ranges (``bytes=N-``), which SimpleHTTPRequestHandler does not do."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def do_GET(self) -> None:
        srv, rng = self.server, self.headers.get("Range")
        status = self._status(rng)
        srv.requests.append((self.path, rng, status))
        if status in (404, 503):
            self.send_error(status)
            return
        data, start = srv.data, 0
        if status == 416:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(status)
        if status == 206:
            start = int(rng.removeprefix("bytes=").rstrip("-"))  # type: ignore[union-attr]
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        body = data[start:]
        self.send_header("Content-Length", str(srv.lie_length or len(body)))
        self.end_headers()
        if srv.cut_after is not None:
            body, srv.cut_after = body[: srv.cut_after], None
            self.close_connection = True
        self.wfile.write(body)
        srv.sent += len(body)

    def _status(self, rng: str | None) -> int:
        srv = self.server
        if self.path != "/bundle.tar":
            return 404
        if len(srv.requests) < srv.fail_first:
            return 503
        if rng is None or srv.ignore_range:
            return 200
        return 416 if int(rng.removeprefix("bytes=").rstrip("-")) >= len(srv.data) else 206

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, name="test-http", daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "_BACKOFF_MIN_S", 0.01)
    monkeypatch.setattr(download, "_BACKOFF_MAX_S", 0.05)


# --- file:// ---------------------------------------------------------------------------------------


def test_file_url_is_copied_checked_and_renamed(tmp_path: Path) -> None:
    src = tmp_path / "src.tar"
    src.write_bytes(DATA)
    seen: list[tuple[int, int | None]] = []
    dest = tmp_path / "in" / "bundle.tar"
    assert fetch(src.as_uri(), dest, sha256=SHA, size=len(DATA), progress=lambda d, t: seen.append((d, t))) == dest
    assert dest.read_bytes() == DATA and not part_path(dest).exists()
    assert seen[-1] == (len(DATA), len(DATA))
    src.unlink()  # already there with the right content: nothing is read
    assert fetch(src.as_uri(), dest, sha256=SHA) == dest


def test_missing_file_names_the_url(tmp_path: Path) -> None:
    url = (tmp_path / "nope.tar").as_uri()
    with pytest.raises(DownloadError, match=r"nope\.tar") as err:
        fetch(url, tmp_path / "d.tar", sha256=SHA)
    assert err.value.url == url


def test_bad_hash_deletes_the_part_and_names_the_url(tmp_path: Path) -> None:
    src = tmp_path / "src.tar"
    src.write_bytes(DATA)
    dest = tmp_path / "d.tar"
    with pytest.raises(DownloadError, match=r"src\.tar.*deleted") as err:
        fetch(src.as_uri(), dest, sha256="0" * 64)
    assert err.value.url == src.as_uri()
    assert not dest.exists() and not part_path(dest).exists()


@pytest.mark.parametrize(
    ("url", "kwargs", "match"),
    [
        ("ftp://host/x", {}, "unsupported scheme"),
        ("mqtt://" + SHA, {}, "MQTT link"),
        ("mqtt://" + SHA, {"link": object()}, "fleet"),
        ("mqtt://f/" + "1" * 64, {"link": object()}, "names sha256"),
        ("file:///x", {"sha256": "ABC"}, "64 lowercase hex"),
        ("file:///x", {"size": -1}, "size"),
    ],
)
def test_bad_requests_are_refused_before_anything_is_fetched(
    tmp_path: Path, url: str, kwargs: dict[str, object], match: str
) -> None:
    args: dict[str, object] = {"sha256": SHA, **kwargs}
    with pytest.raises(DownloadError, match=match):
        fetch(url, tmp_path / "d.tar", **args)  # type: ignore[arg-type]
    assert not part_path(tmp_path / "d.tar").exists()


# --- http -----------------------------------------------------------------------------------------


def test_http_download(server: _Server, tmp_path: Path) -> None:
    dest = fetch(server.url, tmp_path / "d.tar", sha256=SHA, size=len(DATA))
    assert dest.read_bytes() == DATA
    assert server.requests == [("/bundle.tar", None, 200)]


def test_a_cut_connection_is_resumed_with_a_range_request(server: _Server, tmp_path: Path) -> None:
    server.cut_after = 100_000
    seen: list[int] = []
    dest = fetch(server.url, tmp_path / "d.tar", sha256=SHA, size=len(DATA), progress=lambda d, t: seen.append(d))
    assert dest.read_bytes() == DATA
    assert server.requests == [("/bundle.tar", None, 200), ("/bundle.tar", "bytes=100000-", 206)]
    assert server.sent == len(DATA)  # nothing sent twice
    assert seen == sorted(seen) and seen[-1] == len(DATA)


def test_a_part_left_by_an_earlier_run_is_resumed(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "d.tar"
    part_path(dest).write_bytes(DATA[:123_456])
    fetch(server.url, dest, sha256=SHA, size=len(DATA))
    assert dest.read_bytes() == DATA
    assert server.requests == [("/bundle.tar", "bytes=123456-", 206)]


def test_a_server_ignoring_range_restarts_from_zero(server: _Server, tmp_path: Path) -> None:
    server.ignore_range = True
    dest = tmp_path / "d.tar"
    part_path(dest).write_bytes(b"\xff" * 50_000)  # not even the right bytes: a 200 replaces them all
    fetch(server.url, dest, sha256=SHA, size=len(DATA))
    assert dest.read_bytes() == DATA
    assert server.requests == [("/bundle.tar", "bytes=50000-", 200)]


def test_416_on_a_complete_part_finishes_without_a_body(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "d.tar"
    part_path(dest).write_bytes(DATA)
    fetch(server.url, dest, sha256=SHA)  # size unknown: the server is asked, and says it is all there
    assert dest.read_bytes() == DATA
    assert server.requests == [("/bundle.tar", f"bytes={len(DATA)}-", 416)] and server.sent == 0


def test_5xx_is_retried(server: _Server, tmp_path: Path) -> None:
    server.fail_first = 2
    fetch(server.url, tmp_path / "d.tar", sha256=SHA)
    assert [status for _, _, status in server.requests] == [503, 503, 200]


def test_404_is_not_retried_and_names_the_url(server: _Server, tmp_path: Path) -> None:
    url = server.url.replace("bundle.tar", "gone.tar")
    with pytest.raises(DownloadError, match="404") as err:
        fetch(url, tmp_path / "d.tar", sha256=SHA)
    assert err.value.url == url and url in str(err.value)
    assert len(server.requests) == 1


def test_http_bad_hash_deletes_the_part(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "d.tar"
    with pytest.raises(DownloadError, match="sha256") as err:
        fetch(server.url, dest, sha256="1" * 64, size=len(DATA))
    assert err.value.url == server.url
    assert not part_path(dest).exists() and not dest.exists()


def test_content_length_of_another_file_is_refused(server: _Server, tmp_path: Path) -> None:
    server.lie_length = len(DATA) + 10
    with pytest.raises(DownloadError, match=f"server has {len(DATA) + 10} bytes, the deploy says {len(DATA)}"):
        fetch(server.url, tmp_path / "d.tar", sha256=SHA, size=len(DATA))


def test_retries_are_bounded_and_keep_the_part(tmp_path: Path) -> None:
    srv = _Server()
    url = srv.url
    srv.server_close()  # nobody listens there any more: connection refused, every time
    dest = tmp_path / "d.tar"
    part_path(dest).write_bytes(DATA[:1000])
    with pytest.raises(DownloadError, match=f"gave up after {download.ATTEMPTS} attempts") as err:
        fetch(url, dest, sha256=SHA, timeout_s=2)
    assert err.value.url == url
    assert part_path(dest).read_bytes() == DATA[:1000]  # kept for the next try


# --- mqtt:// pieces that need no broker (the transfer itself: tests/integration/test_transfer_mqtt.py) --


def test_blob_meta_round_trip_and_spans() -> None:
    meta = BlobMeta(SHA, 10, 4, ("a" * 64, "b" * 64, "c" * 64))
    assert BlobMeta.parse(meta.to_json()) == meta
    assert [meta.span(i) for i in range(3)] == [(0, 4), (4, 4), (8, 2)]


@given(st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_blob_meta_parse_gives_a_meta_or_a_value_error(payload: bytes) -> None:
    try:
        meta = BlobMeta.parse(payload)
    except ValueError:
        return
    assert meta.chunks == -(-meta.size // meta.chunk_size)


@given(st.text(max_size=200))
def test_parse_blob_url_gives_a_pair_or_a_download_error(url: str) -> None:
    try:
        fleet, sha = parse_blob_url(url, "f")
    except DownloadError:
        return
    assert len(sha) == 64 and fleet


def test_parse_blob_url_forms() -> None:
    assert parse_blob_url(f"mqtt://{SHA}", "plant1") == ("plant1", SHA)
    assert parse_blob_url(f"mqtt://other/{SHA}", "plant1") == ("other", SHA)
    assert chunks_path(Path("/x/b.tar")) == Path("/x/b.tar.part.chunks")
