"""The shipped broker example (systemd/broker/mosquitto.conf + acl) on a real Mosquitto: TLS, identities, ACL.

The broker runs the example file itself: its listener blocks and security lines are kept, its
ports become free loopback ports and its /etc paths point at certificates made by tests/pki.py.
Device-listener (8883) clients authenticate with client certificates (the recommended default)
or, in the password variant the file documents, with mosquitto_passwd users.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from runtime.link import Link, LinkConfig, Message
from runtime.logbook import Logbook, LogbookConfig
from runtime.sync import Sync, with_will
from tests.broker import Broker
from tests.conftest import REPO, run_cli
from tests.integration.test_runtime import _config, _post, _serve, _stop, _val_files, _wait_status
from tests.pki import CertificateAuthority, Issued

EXAMPLE = REPO / "systemd" / "broker"
FLEET = "f"
# Lines that only fit a real host; everything else in the example runs as shipped (the Broker fixture's
# own defaults come first in its config, and Mosquitto takes the last value of a repeated option).
_HOST_ONLY_KEYS = {"user", "pid_file"}
_MARKER = "# --- per-device blocks ---"
_A_LINES = ("require_certificate true", "use_identity_as_username true")
# (fleet, device, group, escalates): the per-device ACL blocks, as the README's generator writes them.
INVENTORY = [("f", "dev-a", "g1", True), ("f", "dev-b", "g2", False), ("f", "dev-p", "", False)]
SERVICE_INVENTORY = [("default", "dev-1", "g1", False)]


# --- the example, made runnable ------------------------------------------------------------------


def device_blocks(inventory: Iterable[tuple[str, str, str, bool]]) -> str:
    """The per-device ACL part (same output as the awk generator in systemd/broker/README.md)."""
    out = []
    for fleet, device, group, escalates in inventory:
        out.append(f"\nuser {fleet}/{device}")
        if group:
            out.append(f"topic read edge/{fleet}/group/{group}/cmd")
        out.append(f"topic read edge/{fleet}/all/cmd")
        if escalates:
            out.append(f"topic write edge/{fleet}/escalate/+")
    return "\n".join(out) + "\n"


def shipped_acl_head() -> str:
    """The shipped ACL up to its per-device marker, as the README's ``sed '/^# --- per-device blocks ---$/q'``."""
    lines = (EXAMPLE / "acl").read_text().splitlines(keepends=True)
    end = next(i for i, line in enumerate(lines) if line.rstrip("\n") == _MARKER)
    return "".join(lines[: end + 1])


def example_conf(
    paths: Mapping[str, Path | str], *, variant: str = "certificates"
) -> tuple[list[str], list[list[str]]]:
    """The example's global lines and listener blocks, for ``Broker(extra_conf, listeners=…)``.

    ``variant="passwords"`` applies the file's own instructions for (B): uncomment the ``#B `` lines
    and delete the two (A) lines of the device listener.
    """
    blocks: list[list[str]] = [[]]
    for raw in (EXAMPLE / "mosquitto.conf").read_text().splitlines():
        line = raw.strip()
        if variant == "passwords" and line.startswith("#B "):
            line = line[3:]
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        if key == "listener":
            blocks.append([])
            continue
        if key in _HOST_ONLY_KEYS:
            continue
        if value.startswith("/"):
            assert value in paths, f"mosquitto.conf names {value}; map it to a test path"
            line = f"{key} {paths[value]}"
        blocks[-1].append(line)
    head, listeners = blocks[0], blocks[1:]
    assert len(listeners) == 2, "the example has a device listener and a service listener"
    if variant == "passwords":
        for line in _A_LINES:
            assert line in listeners[0], f"the (A) line {line!r} is missing from the device listener"
            listeners[0].remove(line)
    return head, listeners


def example_settings(text: str) -> dict[str, list[str]]:
    """Every ``key value`` line of a config (comments skipped), values per key in order."""
    found: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            found.setdefault(key, []).append(value)
    return found


@dataclass(frozen=True)
class Pki:
    """The test fleet's certificates."""

    ca: CertificateAuthority
    server: Issued
    clients: dict[str, Issued]  # by identity: "f/dev-a", "ingest", "operator", "escalation"…
    rogue: CertificateAuthority  # another CA, trusted by nobody
    crl: Path

    def paths(
        self, root: Path, acl: Path, passwd: Path | None = None, crl: Path | None = None
    ) -> dict[str, Path | str]:
        """What the example's absolute paths become (persistence goes to ``root/data``)."""
        (root / "data").mkdir(exist_ok=True)
        mapping: dict[str, Path | str] = {
            "/var/lib/mosquitto/": f"{root / 'data'}/",  # Mosquitto appends the file name to it as is
            "/etc/mosquitto/certs/ca.crt": self.ca.cert,
            "/etc/mosquitto/certs/server.crt": self.server.cert,
            "/etc/mosquitto/certs/server.key": self.server.key,
            "/etc/mosquitto/certs/ca.crl": crl or self.crl,
            "/etc/mosquitto/edgefleet.acl": acl,
        }
        if passwd is not None:
            mapping["/etc/mosquitto/passwd"] = passwd
        return mapping


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(root / "fleet", "edgefleet fleet CA")
    names = [f"{f}/{d}" for f, d, _, _ in INVENTORY + SERVICE_INVENTORY] + ["ingest", "operator", "escalation"]
    clients = {name: ca.client(name) for name in names}
    rogue = CertificateAuthority(root / "rogue", "rogue CA")
    return Pki(ca, ca.server(), clients, rogue, ca.crl())


def _make_broker(root: Path, pki: Pki, *, variant: str = "certificates", crl: Path | None = None) -> Broker:
    root.mkdir(parents=True, exist_ok=True)
    acl = root / "edgefleet.acl"
    acl.write_text(shipped_acl_head() + device_blocks(INVENTORY + SERVICE_INVENTORY))
    passwd = None
    if variant == "passwords":
        passwd = root / "passwd"
        _passwd(passwd, "f/dev-p", "correct horse", create=True)
        _passwd(passwd, "f/dev-b", "battery staple")
    head, listeners = example_conf(pki.paths(root, acl, passwd, crl), variant=variant)
    anonymous = example_settings((EXAMPLE / "mosquitto.conf").read_text())["allow_anonymous"] != ["false"]
    return Broker(head, listeners=listeners, allow_anonymous=anonymous, persistence=False, directory=root / "run")


def _passwd(path: Path, user: str, password: str, *, create: bool = False) -> None:
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        message = "mosquitto_passwd is missing (it ships with the mosquitto package: apt-get install -y mosquitto)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    subprocess.run([tool, *(["-c"] if create else []), "-b", str(path), user, password], check=True, timeout=30)


@pytest.fixture(scope="module")
def secure(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """The example with client certificates: ports[0] devices (8883), ports[1] services (8884)."""
    with _make_broker(tmp_path_factory.mktemp("secure"), pki) as broker:
        yield broker


# --- clients -------------------------------------------------------------------------------------


def _link_cfg(
    port: int,
    ca: Path,
    cert: Issued | None = None,
    *,
    client_id: str | None = None,
    protocol: str = "mqtt5",
    username: str | None = None,
    password: str | None = None,
    session_expiry_s: int = 0,
) -> LinkConfig:
    return LinkConfig(
        client_id=client_id or f"test-{uuid.uuid4().hex[:10]}",
        port=port,
        protocol=protocol,  # type: ignore[arg-type]
        session_expiry_s=session_expiry_s,
        ca_file=str(ca),
        cert_file=str(cert.cert) if cert else None,
        key_file=str(cert.key) if cert else None,
        username=username,
        password=password,
        reconnect_min_s=0.1,
        reconnect_max_s=0.5,
    )


class Inbox:
    """Messages a Link handler received, with a wait."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.messages: list[Message] = []

    def __call__(self, message: Message) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def topics(self) -> list[str]:
        with self._cond:
            return [m.topic for m in self.messages]

    def wait(self, predicate: Callable[[list[str]], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate([m.topic for m in self.messages]):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True


def _inferences(db: Path, device: str) -> int:
    """Inference rows ingest stored for ``device`` (0 before the database exists)."""
    if not db.exists():
        return 0
    con = sqlite3.connect(db)
    try:
        return int(con.execute("select count(*) from inferences where device = ?", (device,)).fetchone()[0])
    except sqlite3.OperationalError:  # the table is created with the first batch
        return 0
    finally:
        con.close()


def _connected(cfg: LinkConfig, timeout: float = 10.0) -> Link:
    link = Link(cfg)
    link.start()
    if not link.wait_connected(timeout):
        link.stop()
        raise AssertionError(f"{cfg.client_id} could not connect to 127.0.0.1:{cfg.port}")
    return link


@dataclass(frozen=True)
class Attempt:
    """How one plain paho connection attempt ended."""

    connected: bool
    how: str  # the exception from connect(), or the CONNACK/disconnect reason
    elapsed_s: float


def _attempt(
    port: int,
    ca: Path,
    cert: Issued | None = None,
    *,
    username: str | None = None,
    password: str | None = None,
    timeout: float = 5.0,
) -> Attempt:
    """Connect once (MQTT 5, no retries) and report the first outcome; "no answer" if none within ``timeout``."""
    from paho.mqtt.client import Client, MQTTv5
    from paho.mqtt.enums import CallbackAPIVersion

    client = Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"probe-{uuid.uuid4().hex[:8]}",
        protocol=MQTTv5,
        reconnect_on_failure=False,
    )
    client.tls_set(ca_certs=str(ca), certfile=str(cert.cert) if cert else None, keyfile=str(cert.key) if cert else None)
    if username is not None:
        client.username_pw_set(username, password)
    events: queue.Queue[tuple[str, Any]] = queue.Queue()
    client.on_connect = lambda c, u, f, reason, p: events.put(("connack", reason))
    client.on_disconnect = lambda c, u, f, reason, p: events.put(("disconnect", reason))
    start = time.monotonic()
    try:
        client.connect("127.0.0.1", port, keepalive=10)
    except (ssl.SSLError, OSError) as exc:
        return Attempt(False, f"{type(exc).__name__}: {exc}", time.monotonic() - start)
    client.loop_start()
    try:
        kind, reason = events.get(timeout=timeout)
    except queue.Empty:
        return Attempt(False, "no answer", time.monotonic() - start)
    finally:
        client.disconnect()
        client.loop_stop()
    ok = kind == "connack" and not reason.is_failure
    return Attempt(ok, f"{kind}: {reason.getName()} (0x{int(reason.value):02X})", time.monotonic() - start)


def _tls_alert(port: int, ca: Path, cert: Issued | None = None) -> str:
    """The TLS alert the broker answers a handshake with (OpenSSL's reason), or "accepted"."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
    with socket.create_connection(("127.0.0.1", port), timeout=3.0) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.recv(1)  # TLS 1.3 reports a refused client certificate after the client's Finished
        except ssl.SSLError as exc:
            return str(exc.reason)
        except TimeoutError:
            return "accepted"
    return "accepted"


# --- TLS and certificates ------------------------------------------------------------------------


def test_the_example_is_tls_only_with_anonymous_off_and_an_acl():
    settings = example_settings((EXAMPLE / "mosquitto.conf").read_text())
    assert settings["allow_anonymous"] == ["false"] and settings["persistence"] == ["true"]
    assert settings["acl_file"] and "password_file" not in settings  # (A) is the default
    assert len(settings["listener"]) == 2 and len(settings["certfile"]) == 2  # no plain-text listener
    assert settings["require_certificate"] == ["true", "true"]
    assert settings["use_identity_as_username"] == ["true", "true"]
    assert settings["listener"][1].endswith("127.0.0.1"), "the service listener stays off the devices' network"


def test_device_link_with_client_certificate_syncs_to_ingest(secure, pki, tmp_path):
    from toolchain.ingest import Ingest

    ca = pki.ca.cert
    ingest_cfg = _link_cfg(secure.ports[1], ca, pki.clients["ingest"], client_id="ingest-tls", session_expiry_s=600)
    worker = Ingest(tmp_path / "fleet.sqlite", ingest_cfg, FLEET)
    stop, ready = threading.Event(), threading.Event()
    runner = threading.Thread(target=worker.run, args=(stop,), kwargs={"on_ready": ready.set}, daemon=True)
    runner.start()
    logbook = Logbook(LogbookConfig(tmp_path / "logbook.sqlite", flush_interval_s=0.05), device_id="dev-a")
    cfg = _link_cfg(secure.ports[0], ca, pki.clients["f/dev-a"], client_id="edge-f-dev-a", session_expiry_s=600)
    link = Link(with_will(cfg, fleet=FLEET, device="dev-a"))
    sync = Sync(link, logbook, fleet=FLEET, device="dev-a", batch_size=10, status=lambda: {"group": "g1"})
    try:
        assert ready.wait(10), "ingest did not subscribe over TLS"
        for i in range(25):
            logbook.record_inference(model="m", version="1", input_ref=f"x{i}", latency_ms=1.0, result={"top1": i})
        logbook.record_event("boot", "started")
        logbook.flush(10)
        sync.start()
        link.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (logbook.stats()["unsynced"] or worker.stats()["stored"] < 26):
            time.sleep(0.05)
        assert logbook.stats()["unsynced"] == 0 and worker.stats()["stored"] == 26, worker.stats()
        status = run_cli(
            "fleet", "status", "--no-query", "--all", "--json", "--fleet", FLEET,
            "--broker", f"127.0.0.1:{secure.ports[1]}", "--ca", str(ca),
            "--cert", str(pki.clients["operator"].cert), "--key-file", str(pki.clients["operator"].key),
        )  # fmt: skip
        assert status.code == 0, status.err
        row = next(r for r in json.loads(status.out)["devices"] if r["device"] == "dev-a")
        assert row["online"] is True
    finally:
        sync.close()
        link.stop()
        logbook.close()
        stop.set()
        runner.join(10)
    assert _inferences(tmp_path / "fleet.sqlite", "dev-a") == 25


@pytest.mark.parametrize(
    ("who", "alert"),
    [
        ("no certificate", "TLSV13_ALERT_CERTIFICATE_REQUIRED"),
        ("certificate from another CA", "TLSV1_ALERT_UNKNOWN_CA"),
        ("expired certificate", "SSLV3_ALERT_CERTIFICATE_EXPIRED"),
    ],
)
def test_broker_refuses_clients_without_a_valid_certificate(secure, pki, tmp_path, who, alert):
    cert = {
        "no certificate": None,
        "certificate from another CA": pki.rogue.client("f/dev-a", stem=f"rogue-{tmp_path.name}"),
        "expired certificate": pki.ca.client("f/dev-a", stem=f"expired-{tmp_path.name}", expired=True),
    }[who]
    for port in secure.ports:  # devices and services alike
        attempt = _attempt(port, pki.ca.cert, cert)
        assert not attempt.connected, f"{who}: the broker accepted it on {port}"
        assert attempt.how != "no answer" and attempt.elapsed_s < 5, f"{who}: {attempt}"
        assert _tls_alert(port, pki.ca.cert, cert) == alert


# paho-mqtt 2.2 does not close its SSLSocket when do_handshake() raises (Client._ssl_wrap_socket), so a
# failed server verification leaves it to the garbage collector, which warns; nothing else is filtered.
@pytest.mark.filterwarnings("ignore:Exception ignored in. <ssl.SSLSocket:pytest.PytestUnraisableExceptionWarning")
def test_device_refuses_a_broker_its_ca_did_not_sign(secure, pki):
    attempt = _attempt(secure.port, pki.rogue.cert, pki.clients["f/dev-a"])
    assert not attempt.connected and "CERTIFICATE_VERIFY_FAILED" in attempt.how, attempt
    link = Link(_link_cfg(secure.port, pki.rogue.cert, pki.clients["f/dev-a"]))
    link.start()
    try:
        assert not link.wait_connected(1.5)
    finally:
        link.stop()


def test_revoked_certificate_is_refused_after_a_reload_and_the_rotated_one_connects(pki, tmp_path):
    crl = pki.ca.crl(path=tmp_path / "ca.crl")
    old = pki.clients["f/dev-b"]
    with _make_broker(tmp_path / "broker", pki, crl=crl) as broker:
        attached = _connected(_link_cfg(broker.port, pki.ca.cert, old))
        try:
            new = pki.ca.client("f/dev-b", stem="dev-b-rotated")  # same CN, new key: the ACL does not change
            pki.ca.crl([old], path=crl)
            assert broker.pid is not None
            os.kill(broker.pid, signal.SIGHUP)  # `systemctl reload mosquitto`
            deadline = time.monotonic() + 5
            while _tls_alert(broker.port, pki.ca.cert, old) != "SSLV3_ALERT_CERTIFICATE_REVOKED":
                assert time.monotonic() < deadline, "the reload did not pick up the CRL"
                time.sleep(0.1)
            # A connection made before the revocation survives the reload (README: restart the broker) …
            assert attached.connected and attached.connects == 1
            # … until the identity connects with its new key: on 8883 the client id is the identity, so the
            # broker ends the old session, and the revoked key cannot come back.
            assert _attempt(broker.port, pki.ca.cert, new).connected
            deadline = time.monotonic() + 5
            while attached.connected:
                assert time.monotonic() < deadline, "the old connection was not taken over"
                time.sleep(0.05)
            time.sleep(1.0)  # several reconnect attempts (backoff 0.1..0.5 s), each refused
            assert not attached.connected and attached.connects == 1
        finally:
            attached.stop()


def test_an_expired_crl_locks_every_client_out(pki, tmp_path):
    """Why the README renews the CRL on a timer: past its nextUpdate, OpenSSL refuses every certificate."""
    crl = pki.ca.crl(path=tmp_path / "ca.crl", expired=True)
    with _make_broker(tmp_path / "broker", pki, crl=crl) as broker:
        for port, who in ((broker.ports[0], "f/dev-a"), (broker.ports[1], "ingest")):
            assert not _attempt(port, pki.ca.cert, pki.clients[who]).connected, who
            assert _tls_alert(port, pki.ca.cert, pki.clients[who]) == "SSLV3_ALERT_CERTIFICATE_EXPIRED"


# --- the ACL -------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["mqtt5", "mqtt311"])
def test_acl_stops_a_device_publishing_under_another_devices_topics(secure, pki, protocol):
    ca = pki.ca.cert
    watched = Inbox()
    watcher = Link(_link_cfg(secure.ports[1], ca, pki.clients["ingest"]))
    watcher.subscribe("edge/+/+/inferences", watched)
    operator_inbox = Inbox()
    operator = Link(_link_cfg(secure.ports[1], ca, pki.clients["operator"]))
    for topic_filter in ("edge/+/+/status", "edge/+/+/cmd/ack"):
        operator.subscribe(topic_filter, operator_inbox)
    watcher.start()
    operator.start()
    device = _connected(_link_cfg(secure.ports[0], ca, pki.clients["f/dev-a"], protocol=protocol))
    forbidden = [
        "edge/f/dev-b/inferences",  # another device's data
        "edge/g/dev-a/inferences",  # its own name in another fleet
        "edge/f/dev-b/status",  # another device's retained status
        "edge/f/dev-b/cmd/ack",
        "edge/f/dev-b/cmd",  # commands: operators only
        "edge/f/all/cmd",
        "edge/f/group/g1/cmd",
    ]
    try:
        assert watcher.wait_subscribed("edge/+/+/inferences", 10)
        assert all(operator.wait_subscribed(f, 10) for f in ("edge/+/+/status", "edge/+/+/cmd/ack"))
        handles = {t: device.publish(t, b'{"forged": true}', qos=1) for t in forbidden}
        fence = device.publish("edge/f/dev-a/inferences", b'{"own": true}', qos=1)
        own_ack = device.publish("edge/f/dev-a/cmd/ack", b'{"own": true}', qos=1)
        assert fence.wait(10) and own_ack.wait(10)
        for topic, handle in handles.items():
            assert handle.wait(10) is (protocol == "mqtt311"), f"{topic}: {handle}"
            if protocol == "mqtt5":  # PUBACK reason code 0x87; MQTT 3.1.1 has none, the broker drops silently
                assert handle.failed and handle.reason is not None and "0x87" in handle.reason, handle
        assert watched.wait(lambda ts: "edge/f/dev-a/inferences" in ts)
        assert operator_inbox.wait(lambda ts: "edge/f/dev-a/cmd/ack" in ts)
        time.sleep(0.2)  # QoS 1 from one publisher arrives in order; a little slack anyway
        assert watched.topics() == ["edge/f/dev-a/inferences"]
        assert "edge/f/dev-b/status" not in operator_inbox.topics()
        assert "edge/f/dev-b/cmd/ack" not in operator_inbox.topics()
    finally:
        for link in (device, watcher, operator):
            link.stop()


def test_acl_lets_a_device_read_only_its_own_its_groups_and_its_fleets_commands(secure, pki):
    ca = pki.ca.cert
    inbox, requests = Inbox(), Inbox()
    device = Link(_link_cfg(secure.ports[0], ca, pki.clients["f/dev-a"]))
    # It asks for everything; Mosquitto 2.0 grants the subscriptions and filters what it delivers.
    wanted = (
        "edge/f/+/cmd",
        "edge/f/group/+/cmd",
        "edge/f/+/inferences",
        "edge/+/escalate/+",
        "edge/f/+/escalate/resp",
    )
    for topic_filter in wanted:
        device.subscribe(topic_filter, inbox)
    device.start()
    server = Link(_link_cfg(secure.ports[1], ca, pki.clients["escalation"]))
    server.subscribe("edge/+/escalate/+", requests)
    server.start()
    operator = _connected(_link_cfg(secure.ports[1], ca, pki.clients["operator"]))
    other = _connected(_link_cfg(secure.ports[0], ca, pki.clients["f/dev-b"]))
    try:
        assert device.wait_subscribed(wanted[-1], 10) and server.wait_subscribed("edge/+/escalate/+", 10)
        assert device.publish("edge/f/escalate/digits", b"{}").wait(10)  # its ACL block lets dev-a escalate
        assert not other.publish("edge/f/escalate/digits", b"{}").wait(10)  # dev-b's does not
        denied = [
            operator.publish("edge/f/dev-b/cmd", b"{}"),
            operator.publish("edge/f/group/g2/cmd", b"{}"),
            other.publish("edge/f/dev-b/inferences", b"{}"),  # another device's data
            server.publish("edge/f/dev-b/escalate/resp", b"{}"),  # another device's answer
        ]
        allowed = [
            operator.publish("edge/f/dev-a/cmd", b"{}"),
            operator.publish("edge/f/group/g1/cmd", b"{}"),
            operator.publish("edge/f/all/cmd", b"{}"),
            server.publish("edge/f/dev-a/escalate/resp", b"{}"),
        ]
        assert all(h.wait(10) for h in denied + allowed)  # the broker took them: only delivery is filtered
        expected = ["edge/f/dev-a/cmd", "edge/f/group/g1/cmd", "edge/f/all/cmd", "edge/f/dev-a/escalate/resp"]
        assert inbox.wait(lambda ts: set(expected) <= set(ts)), inbox.topics()
        assert requests.wait(lambda ts: ts == ["edge/f/escalate/digits"])
        time.sleep(0.3)
        assert sorted(inbox.topics()) == sorted(expected)  # not even its own escalation request
        assert requests.topics() == ["edge/f/escalate/digits"]
    finally:
        for link in (device, server, operator, other):
            link.stop()


_DIE_WITH_WILLS = """
import os, sys, time
from paho.mqtt.client import Client, MQTTv5
from paho.mqtt.enums import CallbackAPIVersion

port, ca, topic = int(sys.argv[1]), sys.argv[2], sys.argv[3]
clients = []
for cert, key, payload in zip(sys.argv[4::3], sys.argv[5::3], sys.argv[6::3]):
    c = Client(CallbackAPIVersion.VERSION2, client_id=payload, protocol=MQTTv5)
    c.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
    c.will_set(topic, payload.encode(), qos=1, retain=False)
    c.connect("127.0.0.1", port, keepalive=10)
    c.loop_start()
    clients.append(c)
deadline = time.monotonic() + 10
while not all(c.is_connected() for c in clients) and time.monotonic() < deadline:
    time.sleep(0.02)
print("connected" if all(c.is_connected() for c in clients) else "not connected", flush=True)
os._exit(0)  # no DISCONNECT: the broker publishes the last wills
"""


def test_a_last_will_is_published_only_under_the_devices_own_topics(secure, pki, tmp_path):
    watched = Inbox()
    operator = Link(_link_cfg(secure.ports[1], pki.ca.cert, pki.clients["operator"]))
    operator.subscribe("edge/f/+/status", watched)  # retained statuses of earlier tests come too
    operator.start()
    try:
        assert operator.wait_subscribed("edge/f/+/status", 10)
        a, b = pki.clients["f/dev-a"], pki.clients["f/dev-b"]
        args = [str(secure.port), str(pki.ca.cert), "edge/f/dev-b/status"]
        args += [str(b.cert), str(b.key), "own-will", str(a.cert), str(a.key), "forged-by-dev-a"]
        script = tmp_path / "die.py"
        script.write_text(_DIE_WITH_WILLS)
        died = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=30)
        assert died.stdout.strip() == "connected", died.stdout + died.stderr
        assert watched.wait(lambda ts: "edge/f/dev-b/status" in ts)
        time.sleep(0.5)  # the forged will would have come with the same broker pass
        assert [(m.topic, m.payload) for m in watched.messages if not m.retain] == [
            ("edge/f/dev-b/status", b"own-will")
        ]
    finally:
        operator.stop()


def test_use_username_as_clientid_stops_a_device_taking_over_anothers_session(secure, pki):
    ca = pki.ca.cert
    victim = _connected(_link_cfg(secure.ports[0], ca, pki.clients["f/dev-a"], client_id="edge-f-dev-a"))
    thief = _connected(_link_cfg(secure.ports[0], ca, pki.clients["f/dev-b"], client_id="edge-f-dev-a"))
    try:
        time.sleep(1.0)
        assert victim.connected and victim.connects == 1 and thief.connected
    finally:
        thief.stop()
        victim.stop()


# --- per-device passwords (variant B) ----------------------------------------------------------


def test_password_file_users_are_accepted_and_others_refused(pki, tmp_path):
    with _make_broker(tmp_path / "broker", pki, variant="passwords") as broker:
        ca, port = pki.ca.cert, broker.port
        ok = _attempt(port, ca, username="f/dev-p", password="correct horse")
        assert ok.connected, ok
        for username, password in (("f/dev-p", "wrong"), ("f/nobody", "correct horse"), (None, None)):
            attempt = _attempt(port, ca, username=username, password=password)
            assert not attempt.connected and attempt.elapsed_s < 5, (username, attempt)
            # CONNACK 0x86 (bad user name or password) or 0x87 (not authorized; what Mosquitto 2.0.11 sends)
            assert "0x86" in attempt.how or "0x87" in attempt.how, (username, attempt)
        link = _connected(_link_cfg(port, ca, username="f/dev-p", password="correct horse"))
        try:  # the same %u patterns hold for password users
            assert link.publish("edge/f/dev-p/inferences", b"{}").wait(10)
            assert not link.publish("edge/f/dev-b/inferences", b"{}").wait(10)
        finally:
            link.stop()
        assert _attempt(broker.ports[1], ca, pki.clients["ingest"]).connected  # services keep certificates


# --- the whole service ---------------------------------------------------------------------------


def test_edge_runtime_serve_over_tls_syncs_and_obeys_signed_commands(secure, pki, bundle, keys, digits_dirs, tmp_path):
    import cv2

    from toolchain.ingest import Ingest

    ca, dev = pki.ca.cert, pki.clients["default/dev-1"]
    mqtt = {"enabled": True, "port": secure.ports[0], "ca_file": str(ca), "cert_file": str(dev.cert)}
    mqtt |= {"key_file": str(dev.key), "batch_size": 10}
    cfg = _config(
        tmp_path, bundle[0], keys[1], health={"interval_s": 0.3}, logbook={"flush_interval_s": 0.1}, mqtt=mqtt
    )
    cfg.write_text('group = "g1"\n' + cfg.read_text())  # top-level keys go before the first [table]
    worker = Ingest(tmp_path / "fleet.sqlite", _link_cfg(secure.ports[1], ca, pki.clients["ingest"]), "default")
    stop = threading.Event()
    runner = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    runner.start()
    proc = _serve(cfg)
    try:
        status = _wait_status(tmp_path / "state", proc)
        image = cv2.imencode(".png", cv2.imread(str(_val_files(digits_dirs[1], 1)[0]), cv2.IMREAD_GRAYSCALE))[1]
        for _ in range(3):
            assert _post(status["http"]["port"], image.tobytes())[0] == 200
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _inferences(tmp_path / "fleet.sqlite", "dev-1") < 3:
            time.sleep(0.1)
        assert _inferences(tmp_path / "fleet.sqlite", "dev-1") == 3, worker.stats()
        op = pki.clients["operator"]
        fleet = ["--broker", f"127.0.0.1:{secure.ports[1]}", "--fleet", "default", "--key", str(keys[0]), "--json"]
        fleet += ["--ca", str(ca), "--cert", str(op.cert), "--key-file", str(op.key), "--timeout", "15"]
        for target in (["--device", "dev-1"], ["--group", "g1"]):  # its own command topic, then its group's
            ping = run_cli("fleet", "ping", *target, *fleet)
            assert ping.code == 0, ping.out + ping.err
            row = next(r for r in json.loads(ping.out)["devices"] if r["device"] == "dev-1")
            assert row["result"] == "ok", row
    finally:
        code, err = _stop(proc)
        stop.set()
        runner.join(10)
    assert code == 0, err
