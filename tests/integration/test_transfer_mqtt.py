"""mqtt:// transfers on a real Mosquitto: toolchain.transfer publishes, runtime.download fetches through a real Link.

Covers the happy path with a toolchain-built bundle, resuming across fetch calls from the received-chunk
bitmap, resuming within one fetch across a broker SIGKILL and restart, stray chunks that do not
match the meta, and clearing the retained messages afterwards.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.download import chunks_path, fetch, part_path
from runtime.errors import DownloadError
from runtime.link import Link, LinkConfig, Message
from runtime.topics import blob_filter, blob_topic
from tests.broker import Broker, broker_fixture  # noqa: F401  (registers the `broker` fixture)
from tests.conftest import REPO
from tests.integration.test_mqtt_security import Pki, _link_cfg, example_conf, shipped_acl_head
from tests.pki import CertificateAuthority
from toolchain.transfer import Blob, clear_blob, publish_blob

FLEET = "plant1"
CHUNK = 16 * 1024


def _link(broker: Broker, name: str) -> Link:
    cfg = LinkConfig(
        client_id=f"{name}-{uuid.uuid4().hex[:8]}",
        port=broker.port,
        protocol="mqtt5",
        reconnect_min_s=0.1,
        reconnect_max_s=0.5,
    )
    link = Link(cfg)
    link.start()
    assert link.wait_connected(10), f"{name} could not connect: {broker.log_tail()}"
    return link


@pytest.fixture
def links(broker: Broker) -> Iterator[tuple[Link, Link]]:
    """(operator, device), both connected to the test's broker."""
    operator, device = _link(broker, "operator"), _link(broker, "device")
    try:
        yield operator, device
    finally:
        device.stop()
        operator.stop()


def _blob_file(tmp_path: Path, size: int = 200_000) -> tuple[Path, str]:
    path = tmp_path / "bundle.tar"
    path.write_bytes(os.urandom(size))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _drop_chunks(operator: Link, blob: Blob, indices: range) -> None:
    """Delete some retained chunks, as if the operator had not published them yet."""
    for i in indices:
        assert operator.publish(blob_topic(FLEET, blob.sha256, i), b"", retain=True).wait(10)


def test_a_toolchain_bundle_goes_over_mqtt(links: tuple[Link, Link], bundle, tmp_path: Path) -> None:
    operator, device = links
    path, _report = bundle
    blob = publish_blob(operator, FLEET, path, chunk_size=CHUNK)
    assert blob.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and blob.url == f"mqtt://{blob.sha256}"
    seen: list[tuple[int, int | None]] = []
    dest = fetch(
        blob.url,
        tmp_path / "in" / "bundle.tar",
        sha256=blob.sha256,
        size=blob.size,
        link=device,
        fleet=FLEET,
        progress=lambda d, t: seen.append((d, t)),
        timeout_s=10,
    )
    assert dest.read_bytes() == path.read_bytes()
    assert not part_path(dest).exists() and not chunks_path(dest).exists()
    assert seen[-1] == (blob.size, blob.size)
    assert not device.wait_subscribed(blob_filter(FLEET, blob.sha256), 0)  # unsubscribed when done


def test_a_stalled_fetch_keeps_its_chunks_and_the_next_one_resumes(links: tuple[Link, Link], tmp_path: Path) -> None:
    operator, device = links
    path, sha = _blob_file(tmp_path)
    blob = publish_blob(operator, FLEET, path, chunk_size=CHUNK)
    half = blob.chunks // 2
    _drop_chunks(operator, blob, range(half, blob.chunks))
    dest = tmp_path / "in" / "bundle.tar"
    with pytest.raises(DownloadError, match=rf"no new chunk for 2 s \({half} of {blob.chunks} chunks held") as err:
        fetch(blob.url, dest, sha256=sha, size=blob.size, link=device, fleet=FLEET, timeout_s=2)
    assert err.value.url == blob.url
    assert part_path(dest).exists() and chunks_path(dest).exists()
    publish_blob(operator, FLEET, path, chunk_size=CHUNK)  # now all of it
    seen: list[int] = []
    fetch(blob.url, dest, sha256=sha, size=blob.size, link=device, fleet=FLEET, progress=lambda d, t: seen.append(d))
    assert dest.read_bytes() == path.read_bytes()
    assert seen[0] > half * CHUNK  # the first report already counts the chunks held from the first fetch


def test_the_fetch_survives_a_broker_kill_and_completes(
    broker: Broker, links: tuple[Link, Link], tmp_path: Path
) -> None:
    operator, device = links
    path, sha = _blob_file(tmp_path, 300_000)
    blob = publish_blob(operator, FLEET, path, chunk_size=CHUNK)
    _drop_chunks(operator, blob, range(blob.chunks // 3, blob.chunks))
    seen: list[int] = []
    got_some = threading.Event()

    def progress(done: int, total: int | None) -> None:
        seen.append(done)
        got_some.set()

    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["path"] = fetch(
                blob.url, tmp_path / "in.tar", sha256=sha, link=device, fleet=FLEET, progress=progress, timeout_s=30
            )
        except Exception as exc:  # reported by the assertion below
            result["error"] = exc

    worker = threading.Thread(target=run, name="test-fetch")
    worker.start()
    assert got_some.wait(10), "no chunk arrived before the kill"
    broker.kill()  # mid-transfer: a third held, the rest not even published yet
    connects = device.connects
    broker.start()
    assert device.wait_connected(10) and operator.wait_connected(10)
    publish_blob(operator, FLEET, path, chunk_size=CHUNK)  # the operator offers it again after the outage
    worker.join(40)
    assert not worker.is_alive()
    assert "error" not in result, result.get("error")
    assert Path(str(result["path"])).read_bytes() == path.read_bytes()
    assert device.connects > connects  # it really went through a reconnect
    assert seen == sorted(seen) and seen[-1] == blob.size


def test_stray_chunks_are_skipped_and_do_not_spoil_the_file(links: tuple[Link, Link], tmp_path: Path) -> None:
    operator, device = links
    path, sha = _blob_file(tmp_path, 100_000)
    blob = publish_blob(operator, FLEET, path, chunk_size=CHUNK)
    garbage = os.urandom(CHUNK)
    assert operator.publish(blob_topic(FLEET, sha, 0), garbage, retain=True).wait(10)  # a wrong chunk 0
    assert operator.publish(blob_topic(FLEET, sha, 999), garbage, retain=True).wait(10)  # and one past the end
    dest = tmp_path / "in.tar"
    with pytest.raises(DownloadError, match="chunk 0 did not match"):
        fetch(blob.url, dest, sha256=sha, link=device, fleet=FLEET, timeout_s=2)
    assert operator.publish(blob_topic(FLEET, sha, 0), path.read_bytes()[:CHUNK], retain=True).wait(10)
    fetch(blob.url, dest, sha256=sha, link=device, fleet=FLEET, timeout_s=10)
    assert dest.read_bytes() == path.read_bytes()


def test_clear_blob_removes_every_retained_message(broker: Broker, links: tuple[Link, Link], tmp_path: Path) -> None:
    operator, _device = links
    path, sha = _blob_file(tmp_path, 50_000)
    blob = publish_blob(operator, FLEET, path, chunk_size=CHUNK)
    clear_blob(operator, blob)
    late = _link(broker, "late")  # subscribes after the clear: the broker has nothing retained left
    got: list[Message] = []
    try:
        late.subscribe(blob_filter(FLEET, sha), got.append)
        assert late.wait_subscribed(blob_filter(FLEET, sha), 10)
        time.sleep(0.5)
        assert [m.topic for m in got if m.payload] == []
        with pytest.raises(DownloadError, match="no meta message yet"):
            fetch(blob.url, tmp_path / "x.tar", sha256=sha, link=late, fleet=FLEET, timeout_s=1)
    finally:
        late.stop()


# --- the shipped broker example: who may offer and who may fetch blobs ------------------------------


def _readme_acl_blocks(inventory: str) -> str:
    """The per-device ACL part as the awk generator in systemd/broker/README.md writes it (run as shipped)."""
    import re
    import subprocess

    readme = (REPO / "systemd" / "broker" / "README.md").read_text()
    program = re.search(r"awk -F, '(.*?)' devices\.csv", readme, re.S)
    assert program, "the README's ACL generator moved"
    proc = subprocess.run(["awk", "-F,", program.group(1)], input=inventory, capture_output=True, text=True, check=True)
    return proc.stdout


@pytest.fixture(scope="module")
def pki_blobs(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki-blobs")
    ca = CertificateAuthority(root / "fleet", "edgefleet fleet CA")
    clients = {name: ca.client(name) for name in ("f/dev-a", "f/dev-b", "default/dev-1", "operator")}
    return Pki(ca, ca.server(), clients, CertificateAuthority(root / "rogue", "rogue CA"), ca.crl())


@pytest.fixture(scope="module")
def secure_blobs(pki_blobs: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """The shipped mosquitto.conf + acl, with the per-device part from the README's generator."""
    root = tmp_path_factory.mktemp("secure-blobs")
    acl = root / "edgefleet.acl"
    acl.write_text(shipped_acl_head() + _readme_acl_blocks("f,dev-a,g1,\nf,dev-b,,\ndefault,dev-1,,\n"))
    head, listeners = example_conf(pki_blobs.paths(root, acl))
    with Broker(head, listeners=listeners, allow_anonymous=False, persistence=False, directory=root / "run") as b:
        yield b


def test_the_shipped_acl_lets_operators_offer_and_the_fleets_devices_fetch(
    secure_blobs: Broker, pki_blobs: Pki, tmp_path: Path
) -> None:
    pki, ca = pki_blobs, pki_blobs.ca.cert
    links = {
        who: Link(_link_cfg(port, ca, pki.clients[who]))
        for who, port in (
            ("operator", secure_blobs.ports[1]),
            ("f/dev-a", secure_blobs.ports[0]),
            ("f/dev-b", secure_blobs.ports[0]),
            ("default/dev-1", secure_blobs.ports[0]),
        )
    }
    for link in links.values():
        link.start()
    try:
        assert all(link.wait_connected(10) for link in links.values())
        path, sha = _blob_file(tmp_path, 40_000)
        blob = publish_blob(links["operator"], "f", path, chunk_size=CHUNK)  # PUBACKs all succeeded
        dest = fetch(blob.url, tmp_path / "a.tar", sha256=sha, link=links["f/dev-a"], fleet="f", timeout_s=10)
        assert dest.read_bytes() == path.read_bytes()
        with pytest.raises(DownloadError, match="no meta message yet"):  # another fleet's device gets nothing
            fetch(blob.url, tmp_path / "x.tar", sha256=sha, link=links["default/dev-1"], fleet="f", timeout_s=2)
        forged = links["f/dev-b"].publish(blob_topic("f", sha, 0), b"forged", retain=True)
        assert not forged.wait(10) and forged.reason is not None and "0x87" in forged.reason  # devices only read
    finally:
        for link in links.values():
            link.stop()


def test_unsubscribe_while_offline_also_leaves_the_persistent_session(broker: Broker) -> None:
    from paho.mqtt.client import Client, MQTTv5
    from paho.mqtt.enums import CallbackAPIVersion

    topic_filter = blob_filter(FLEET, "a" * 64)
    device = _link(broker, "device")
    client_id = device.cfg.client_id
    got: list[Message] = []
    device.subscribe(topic_filter, got.append)
    assert device.wait_subscribed(topic_filter, 10)
    broker.stop()  # SIGTERM: the session and its subscription are saved
    deadline = time.monotonic() + 10
    while device.connected and time.monotonic() < deadline:
        time.sleep(0.02)
    device.unsubscribe(topic_filter, got.append)  # offline: the UNSUBSCRIBE has to wait for the connect
    broker.start()
    assert device.wait_connected(10)
    time.sleep(0.5)  # the UNSUBSCRIBE goes out right after the CONNACK
    device.stop()
    # The same session from a bare client: had the broker kept the subscription, this would arrive.
    raw = Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTv5)
    arrived: list[str] = []
    raw.on_message = lambda c, u, m: arrived.append(m.topic)
    raw.connect(broker.host, broker.port, clean_start=False)
    raw.loop_start()
    operator = _link(broker, "operator")
    try:
        assert operator.publish(blob_topic(FLEET, "a" * 64, "meta"), b"{}", retain=False).wait(10)
        time.sleep(0.5)
        assert arrived == [] and got == []
    finally:
        operator.stop()
        raw.disconnect()
        raw.loop_stop()
