"""The `toolchain fleet` commands: status, ping, config, send, deploy, rollback (operator side) and ingest."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from toolchain.errors import KeyFileError, ToolchainError, UsageError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from runtime.link import LinkConfig
    from toolchain.fleet import CommandOutcome, Target
    from toolchain.fleet_deploy import DeviceResult, RolloutReport

__all__ = ["add_fleet_parser", "link_config", "parse_assignment", "parse_broker"]

log = logging.getLogger(__name__)

_DEFAULT_BROKER = "127.0.0.1:1883"


# --- parsing ------------------------------------------------------------------------------------


def parse_broker(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST`` (port 1883) or ``[v6]:PORT`` → (host, port); UsageError naming --broker."""
    host, port_text = text, "1883"
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise UsageError(f"unclosed '[' in {text!r}; expected [ADDRESS]:PORT", flag="--broker")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise UsageError(f"expected [ADDRESS]:PORT, got {text!r}", flag="--broker")
            port_text = rest[1:]
    elif ":" in text:
        host, port_text = text.rsplit(":", 1)
    try:
        port = int(port_text)
    except ValueError:
        raise UsageError(f"port must be a number, got {port_text!r} (expected HOST:PORT)", flag="--broker") from None
    if not host or not 0 < port < 65536:
        raise UsageError(f"expected HOST:PORT with a port in 1..65535, got {text!r}", flag="--broker")
    return host, port


def parse_assignment(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` → (key, value); VALUE is JSON when it parses (1.0, true, "x", [1]) and a string otherwise."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"expected KEY=VALUE (e.g. logbook.flush_interval_s=1.0), got {text!r}", flag="config")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def link_config(
    args: argparse.Namespace,
    client_id: str,
    *,
    session_expiry_s: int = 0,
    protocol: Literal["mqtt5", "mqtt311", "auto"] = "auto",
) -> LinkConfig:
    """The broker connection the flags describe."""
    from runtime.link import LinkConfig

    host, port = parse_broker(args.broker)
    for flag, path in (("--ca", args.ca), ("--cert", args.cert), ("--key-file", args.key_file)):
        if path and not Path(path).is_file():
            raise UsageError(f"file not found: {path}", flag=flag)
    if bool(args.cert) != bool(args.key_file):
        raise UsageError("a client certificate needs both --cert and --key-file", flag="--cert/--key-file")
    password = args.password if args.password is not None else os.environ.get("EDGEFLEET_MQTT_PASSWORD")
    return LinkConfig(
        host=host,
        port=port,
        client_id=client_id,
        protocol=protocol,
        session_expiry_s=session_expiry_s,
        username=args.username,
        password=password if args.username else None,
        ca_file=args.ca,
        cert_file=args.cert,
        key_file=args.key_file,
        tls_insecure=args.tls_insecure,
        reconnect_min_s=0.2,
        reconnect_max_s=5.0,
    )


def _target(args: argparse.Namespace, *, default_all: bool = False) -> Target:
    from toolchain.fleet import Target

    if args.device is None and args.group is None and not args.all:
        if not default_all:
            raise UsageError("name the target: --device ID, --group NAME or --all", flag="--device/--group/--all")
        return Target(all=True)
    return Target(device=args.device, group=args.group, all=bool(args.all))


def _signing_key(arg: str | None) -> Ed25519PrivateKey:
    from runtime.errors import SignatureError
    from runtime.signing import load_private_key

    if arg:
        path = Path(arg)
    elif os.environ.get("EDGEFLEET_SIGNING_KEY"):
        path = Path(os.environ["EDGEFLEET_SIGNING_KEY"])
    else:
        from toolchain.cli import default_key_path

        path = default_key_path()
    if not path.is_file():
        raise KeyFileError(
            "operator key not found; pass --key (the private key whose .pub the devices trust) "
            "or set $EDGEFLEET_SIGNING_KEY",
            path=path,
        )
    try:
        return load_private_key(path)
    except SignatureError as exc:
        raise KeyFileError(str(exc)) from exc


def _fleet_name(args: argparse.Namespace) -> str:
    name: str | None = args.fleet or os.environ.get("EDGEFLEET_FLEET")
    if not name:
        raise UsageError("name the fleet (or set $EDGEFLEET_FLEET)", flag="--fleet")
    return name


# --- output -------------------------------------------------------------------------------------


def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "—"
    age = max(0.0, now - ts)
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if age >= size:
            return f"{age / size:.0f}{unit} ago"
    return f"{age:.0f}s ago"


def _print_table(title: str, rows: list[dict[str, Any]], *, rtt: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for name in ("device", "online", "model", "version", "last seen", "temperature"):
        table.add_column(name, justify="right" if name == "temperature" else "left")
    if rtt:
        table.add_column("rtt", justify="right")
    table.add_column("result")
    now = time.time()
    for r in rows:
        online = "—" if r["online"] is None else "yes" if r["online"] else "no"
        result = r["result"] or "—"
        if r["reason"]:
            result = f"{result}: {r['reason']}"
        cells = [
            r["device"],
            online,
            r["model"] or "—",
            r["version"] or "—",
            _ago(r["last_seen"], now),
            "—" if r["temp_c"] is None else f"{r['temp_c']:.1f} °C",
        ]
        if rtt:
            cells.append("—" if r["rtt_ms"] is None else f"{r['rtt_ms']:.1f} ms")
        table.add_row(*cells, result)
    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the table into 80 columns
        console = Console(width=160)
    console.print(table)


def _summary(rows: list[dict[str, Any]], outcome: CommandOutcome | None) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for r in rows:
        if r["result"]:
            counts[r["result"]] = counts.get(r["result"], 0) + 1
    summary: dict[str, Any] = {
        "devices": len(rows),
        "online": sum(1 for r in rows if r["online"]),
        "results": counts,
    }
    if outcome is not None:
        summary |= {
            "expected": len(outcome.expected),
            "acked_ok": sum(1 for a in outcome.acks.values() if a.status == "ok"),
            "timeout": outcome.missing,
            "failed": outcome.failed,
            "elapsed_s": round(outcome.elapsed_s, 3),
            "published": outcome.published,
            "publish_error": outcome.publish_error,
        }
    return summary


def _report(
    args: argparse.Namespace, fleet: str, rows: list[dict[str, Any]], outcome: CommandOutcome | None, *, rtt: bool
) -> int:
    summary = _summary(rows, outcome)
    code = 0 if outcome is None or outcome.ok else 1
    if args.json:
        doc: dict[str, Any] = {"fleet": fleet, "devices": rows, "summary": summary}
        if outcome is not None:
            doc["command"] = {"id": outcome.id, "type": outcome.type, "target": outcome.target.wire()}
        json.dump(doc, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return code
    title = f"fleet {fleet}" + (f" — {outcome.type} ({outcome.id[:8]})" if outcome is not None else "")
    _print_table(title, rows, rtt=rtt)
    line = f"{summary['devices']} device(s), {summary['online']} online"
    if outcome is not None:
        line += f"; {summary['acked_ok']}/{summary['expected']} acked ok in {outcome.elapsed_s:.2f} s"
        if outcome.missing:
            line += f"; no final ack within {args.timeout:g} s: {', '.join(outcome.missing)}"
        if outcome.failed:
            line += f"; failed: {', '.join(outcome.failed)}"
        if not outcome.published:
            line += f"; the broker did not take the command: {outcome.publish_error}"
    print(line)
    return code


# --- commands -----------------------------------------------------------------------------------


def _run_command(args: argparse.Namespace, type: str, cmd_args: Mapping[str, Any], *, rtt: bool = False) -> int:
    from toolchain.fleet import Fleet, operator_client_id, status_rows

    fleet_name = _fleet_name(args)
    target = _target(args, default_all=type == "status")
    key = None if getattr(args, "no_query", False) else _signing_key(args.key)
    if args.timeout <= 0 or args.ttl <= 0:
        raise UsageError("must be a positive number of seconds", flag="--timeout/--ttl")
    cfg = link_config(args, operator_client_id())
    with Fleet(cfg, fleet_name, key=key).connect(timeout=args.connect_timeout) as fleet:
        statuses = fleet.statuses()
        outcome = None
        if key is not None:
            expect = fleet.expected(target, statuses)
            outcome = fleet.send(type, cmd_args, target, expect=expect, timeout=args.timeout, ttl_s=args.ttl)
    rows = status_rows(statuses, target, outcome)
    return _report(args, fleet_name, rows, outcome, rtt=rtt)


def cmd_status(args: argparse.Namespace) -> int:
    """Retained status of every device, refreshed by a `status` command to the online ones."""
    return _run_command(args, "status", {})


def cmd_ping(args: argparse.Namespace) -> int:
    """Round-trip time per device."""
    return _run_command(args, "ping", {}, rtt=True)


def cmd_config(args: argparse.Namespace) -> int:
    """`config.set` of one KEY=VALUE (the device validates, persists and applies it)."""
    key, value = parse_assignment(args.assignment)
    return _run_command(args, "config.set", {"key": key, "value": value})


def cmd_send(args: argparse.Namespace) -> int:
    """Any command type with JSON arguments."""
    try:
        cmd_args = json.loads(args.args) if args.args else {}
    except ValueError as exc:
        raise UsageError(f"not JSON: {exc}", flag="--args") from None
    if not isinstance(cmd_args, dict):
        raise UsageError("expected a JSON object, e.g. '{\"lines\": 100}'", flag="--args")
    return _run_command(args, args.type, cmd_args, rtt=True)


def cmd_rollback(args: argparse.Namespace) -> int:
    """`model.rollback` to the previous version (or --version) on the targets."""
    cmd_args = {k: v for k, v in (("version", args.version), ("name", args.model)) if v}
    if args.model and not args.version:
        raise UsageError("--model names the model of --version; give --version too", flag="--model")
    return _run_command(args, "model.rollback", cmd_args)


def _deploy_progress(console: Any) -> tuple[Any, Callable[[str, str, Any], None]]:
    """A rich progress bar per phase on a terminal; a line per finished phase otherwise."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    live = console.is_terminal
    bars = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )
    tasks: dict[str, Any] = {}
    totals: dict[str, int] = {}
    tally: dict[str, dict[str, int]] = {}

    def progress(event: str, phase: str, value: Any) -> None:
        if event == "phase":
            totals[phase], tally[phase] = value, {}
            if live:
                tasks[phase] = bars.add_task(phase, total=value)
            return
        r: DeviceResult = value
        key = (r.rollback or "?") if phase == "rollback" else r.outcome
        tally[phase][key] = tally[phase].get(key, 0) + 1
        text = f"{phase}: " + ", ".join(f"{n} {k}" for k, n in sorted(tally[phase].items()))
        if live:
            bars.update(tasks[phase], advance=1, description=text)
        elif sum(tally[phase].values()) == totals[phase]:
            console.print(text)

    return (bars if live else contextlib.nullcontext()), progress


def _print_rollout(fleet: str, report: RolloutReport) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fleet {fleet} — model.deploy")
    for name in ("device", "profile", "phase", "from", "to", "outcome", "agreement", "rollback"):
        table.add_column(name)
    for r in sorted(report.results.values(), key=lambda r: r.device):
        agreement = r.metrics.get("agreement")
        outcome = r.outcome + (f": {r.reason}" if r.reason else "")
        rollback = "—" if r.rollback is None else r.rollback + (f": {r.rollback_reason}" if r.rollback_reason else "")
        table.add_row(
            r.device,
            r.profile or "—",
            r.phase or "—",
            r.from_version or "—",
            r.to_version or "—",
            outcome,
            f"{agreement:.2f}" if isinstance(agreement, int | float) else "—",
            rollback,
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=180)
    console.print(table)
    counts = ", ".join(f"{n} {k}" for k, n in report.counts().items())
    print(f"{len(report.results)} device(s) in {report.elapsed_s:.1f} s: {counts}")
    if report.stopped:
        rolled = sum(1 for r in report.results.values() if r.rollback == "ok")
        print(f"rollout STOPPED: {report.stop_reason}; {rolled} activated device(s) rolled back")
    elif not report.ok:
        print("rollout FAILED: not every device ended active (see the outcome column)")


def cmd_deploy(args: argparse.Namespace) -> int:
    """Plan and run a rollout: the canary share of every profile, then the rest (see toolchain.fleet_deploy)."""
    from rich.console import Console

    from toolchain.fleet import Fleet, operator_client_id
    from toolchain.fleet_deploy import (
        Rollout,
        add_deltas,
        check_gates,
        load_offers,
        parse_limit,
        parse_share,
        plan_rollout,
        require_devices,
    )

    fleet_name = _fleet_name(args)
    if not (args.device or args.group or args.all):
        raise UsageError("name the target: --device ID…, --group NAME or --all", flag="--device/--group/--all")
    canary = parse_share(args.canary, "--canary")
    gates, shares = check_gates(dict(parse_assignment(g) for g in args.gates))
    limit = parse_limit(args.max_failures)
    if args.wave < 0:
        raise UsageError("expected a number of devices >= 0", flag="--wave")
    offers = load_offers([Path(b) for b in args.bundle], via=args.via, base_url=args.base_url)
    if args.delta_from:
        offers = add_deltas(offers, [Path(o) for o in args.delta_from], via=args.via, base_url=args.base_url)
    key = _signing_key(args.key)
    cfg = link_config(args, operator_client_id())
    console = Console(stderr=True)
    with Fleet(cfg, fleet_name, key=key).connect(timeout=args.connect_timeout) as fleet:
        plan = plan_rollout(
            fleet.statuses(), offers, devices=args.device or (), group=args.group, canary=canary, wave=args.wave
        )
        require_devices(plan)
        bars, progress = _deploy_progress(console)
        rollout = Rollout(
            fleet, plan, offers, strategy=args.strategy, gates=gates, shares=shares, wait_healthy=args.wait_healthy,
            timeout_s=args.timeout, ttl_s=args.ttl, max_failures=limit, progress=progress,
        )  # fmt: skip
        with _offered(args, fleet_name, offers, keep=not args.wait_healthy), bars:
            report = rollout.run()
    if args.json:
        json.dump({"fleet": fleet_name, **report.to_dict()}, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        _print_rollout(fleet_name, report)
    return 0 if report.ok else 1


@contextlib.contextmanager
def _offered(args: argparse.Namespace, fleet: str, offers: Mapping[str, Any], *, keep: bool) -> Iterator[None]:
    """With --via mqtt: the bundles as retained chunks while the rollout runs (cleared after, unless ``keep``)."""
    if args.via != "mqtt":
        yield
        return
    from runtime.link import Link
    from toolchain.fleet import operator_client_id
    from toolchain.transfer import clear_blob, publish_blob

    link = Link(link_config(args, operator_client_id()))
    link.start()
    try:
        if not link.wait_connected(args.connect_timeout):
            raise ToolchainError(f"cannot connect to the MQTT broker at {args.broker} to publish the bundles")
        files = [o.path for o in offers.values()] + [o.delta.path for o in offers.values() if o.delta is not None]
        blobs = [publish_blob(link, fleet, path) for path in files]
        yield
        if keep:
            print("the bundles stay on the broker as retained blobs (devices may still be fetching)", file=sys.stderr)
        else:
            for blob in blobs:
                clear_blob(link, blob)
    finally:
        link.stop(timeout=2.0)


def cmd_ingest(args: argparse.Namespace) -> int:
    """Consume batches until SIGTERM/SIGINT; print what was received, stored and dropped as duplicates."""
    from toolchain.ingest import Ingest

    fleet_name = _fleet_name(args)
    host = socket.gethostname().split(".")[0] or "host"
    client_id = args.client_id or f"ingest-{host}-{args.share_group}"
    cfg = link_config(args, client_id, session_expiry_s=args.session_expiry, protocol="mqtt5")
    worker = Ingest(args.db, cfg, fleet_name, args.share_group)
    stop = threading.Event()

    def _stop(signum: int, frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}

    def _ready() -> None:
        print(
            f"ingest: subscribed as {client_id} (group {args.share_group}); storing fleet {fleet_name} "
            f"into {args.db}; SIGTERM or Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )

    try:
        stats = worker.run(stop, connect_timeout=args.connect_timeout, on_ready=_ready)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if args.json:
        json.dump(stats, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(
            f"ingest: received {stats['messages']} message(s), {stats['records']} record(s): "
            f"stored {stats['stored']}, duplicates {stats['duplicates']}, rejected {stats['rejected']}"
        )
    return 0


def cmd_serve_model(args: argparse.Namespace) -> int:
    """Answer devices' escalation requests with a bundle until SIGTERM/SIGINT."""
    from toolchain.serve_model import serve_model_command

    return serve_model_command(args, _fleet_name(args), link_config)


# --- parser -------------------------------------------------------------------------------------


def _connection_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("broker")
    g.add_argument("--broker", default=_DEFAULT_BROKER, metavar="HOST:PORT", help=f"default {_DEFAULT_BROKER}")
    g.add_argument("--ca", metavar="FILE", help="CA certificate (PEM): connect with TLS")
    g.add_argument("--cert", metavar="FILE", help="client certificate (PEM)")
    g.add_argument("--key-file", metavar="FILE", help="client certificate's private key (PEM)")
    g.add_argument(
        "--tls-insecure", action="store_true", help="do not check the broker's host name (self-made test certificates)"
    )
    g.add_argument("--username")
    g.add_argument("--password", help="default $EDGEFLEET_MQTT_PASSWORD (keeps it out of `ps`)")
    g.add_argument("--connect-timeout", type=float, default=10.0, metavar="S", help="default 10")
    p.add_argument("--fleet", help="fleet name (default $EDGEFLEET_FLEET)")
    p.add_argument("--json", action="store_true", help="print JSON for machines")


def _command_flags(p: argparse.ArgumentParser) -> None:
    _connection_flags(p)
    t = p.add_mutually_exclusive_group()
    t.add_argument("--device", metavar="ID", help="one device")
    t.add_argument("--group", metavar="G", help="every online device of a group")
    t.add_argument("--all", action="store_true", help="every online device of the fleet")
    p.add_argument(
        "--key",
        help="operator's ed25519 private key (default $EDGEFLEET_SIGNING_KEY or ~/.config/edgefleet/keys/fleet.key)",
    )
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="wait this long for acks (default 10)")
    p.add_argument("--ttl", type=float, default=300.0, metavar="S", help="the command expires after S (default 300)")


def add_fleet_parser(subparsers: Any) -> None:
    """Add `fleet` with its sub-commands to the `toolchain` parser's subparsers."""
    fleet = subparsers.add_parser(
        "fleet",
        help="talk to devices over MQTT: status, ping, config, send; run the ingest worker",
        description="Operator commands (signed with --key, acked by each device) and the ingest worker. "
        "Exit 0 when every targeted device acked ok, 1 when one refused, failed or timed out, 2 for bad usage.",
    )
    sub = fleet.add_subparsers(dest="fleet_command", metavar="COMMAND", required=True)

    s = sub.add_parser(
        "status",
        help="device table from retained status + a status command (default --all)",
        description="Read every device's retained status (online or last will) and send a `status` command "
        "to the online targets; table: device, online, model, version, last seen, temperature, result.",
    )
    _command_flags(s)
    s.add_argument("--no-query", action="store_true", help="only read retained status; send nothing, no key needed")
    s.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "ping", help="round-trip time per device", description="Send `ping`; show each device's round-trip time."
    )
    _command_flags(p)
    p.set_defaults(func=cmd_ping)

    c = sub.add_parser(
        "config",
        help="set one configuration key on the devices (config.set)",
        description="Send `config.set`: each device validates the value against its config schema, persists it "
        "and applies it live where it can.",
    )
    c.add_argument(
        "assignment", metavar="KEY=VALUE", help="e.g. logbook.flush_interval_s=1.0; VALUE is JSON if it parses"
    )
    _command_flags(c)
    c.set_defaults(func=cmd_config)

    d = sub.add_parser(
        "send",
        help="send any command type",
        description="Send any command type (logs.request, service.restart, model.deploy…) with JSON arguments.",
    )
    d.add_argument("type", help="command type, e.g. logs.request, service.restart, model.rollback")
    d.add_argument("--args", metavar="JSON", help="arguments as a JSON object")
    _command_flags(d)
    d.set_defaults(func=cmd_send)

    _add_deploy_parser(sub)
    r = sub.add_parser(
        "rollback",
        help="roll devices back to their previous model version (model.rollback)",
        description="Send `model.rollback`: each device switches to the version it ran before, or to --version "
        "if it still holds it, and acks what it serves now. A rollout still running on the device is cancelled.",
    )
    r.add_argument("--version", help="the version to return to (default: the previous one)")
    r.add_argument("--model", metavar="NAME", help="model name of --version (default: the one it serves)")
    _command_flags(r)
    r.set_defaults(func=cmd_rollback)

    i = sub.add_parser(
        "ingest",
        help="store device inferences, metrics and events in SQLite (runs until SIGTERM)",
        description="Subscribe with an MQTT 5 shared subscription so several workers split the load; "
        "drop duplicates by (device, seq).",
    )
    _connection_flags(i)
    i.add_argument("--db", required=True, metavar="FILE", help="SQLite file (created if missing)")
    i.add_argument("--share-group", default="ingest", help="shared subscription group (default ingest)")
    i.add_argument(
        "--client-id",
        help="stable MQTT client id of this worker (default ingest-<host>-<group>); give each worker on a host its own",
    )
    i.add_argument(
        "--session-expiry",
        type=int,
        default=7 * 86400,
        metavar="S",
        help="how long the broker keeps this worker's queue while it is down (default 7 days)",
    )
    i.set_defaults(func=cmd_ingest)

    m = sub.add_parser(
        "serve-model",
        help="answer devices' escalation requests with a bundle (runs until SIGTERM)",
        description="Serve a bigger model to devices whose local result is not confident enough: MQTT 5 "
        "request/response on edge/<fleet>/escalate/<model> (response topic + correlation data), subscribed "
        "through the shared subscription $share/<group>/... so several servers split the requests.",
    )
    _connection_flags(m)
    m.add_argument("--bundle", required=True, metavar="FILE", help="bundle (.tar or directory) to answer with")
    m.add_argument(
        "--trusted-key",
        required=True,
        action="append",
        metavar="FILE.pub",
        help="ed25519 public key the bundle must be signed by (repeatable)",
    )
    m.add_argument("--model", metavar="NAME", help="model name devices ask for (default: the bundle's name)")
    m.add_argument("--share-group", default="escalate", help="shared subscription group (default escalate)")
    m.add_argument("--client-id", help="MQTT client id (default serve-<model>-<host>-<pid>)")
    m.add_argument("--threads", type=int, default=0, help="inference threads (default: up to 4)")
    m.add_argument(
        "--max-request-kb", type=int, default=4096, metavar="KB", help="larger requests get an error (default 4096)"
    )
    m.add_argument("--queue", type=int, default=64, metavar="N", help="requests waiting beyond N are answered busy")
    m.set_defaults(func=cmd_serve_model)


def _add_deploy_parser(sub: Any) -> None:
    from toolchain.fleet_deploy import STRATEGIES, VIAS

    d = sub.add_parser(
        "deploy",
        help="roll bundles out: each device gets its profile's bundle, the canary share first",
        description="Progressive rollout of `model.deploy`. Each targeted device (its profile read from its retained "
        "status) gets the --bundle built for its profile; devices without one, offline or already on the version "
        "are skipped and listed. The canary share of every profile goes first; with --wait-healthy the rollout "
        "waits for their outcome (active, or rolled_back by a failing gate on the device) and stops after more than "
        "--max-failures failures, rolling back the devices it activated. Exit 0 when every device sent the command "
        "ended active, 1 when the rollout stopped or a device failed, 2 for bad usage.",
    )
    d.add_argument(
        "--bundle", action="append", required=True, metavar="FILE", help="a bundle .tar; repeat for other profiles"
    )
    t = d.add_mutually_exclusive_group()
    t.add_argument("--device", action="append", metavar="ID", help="a device (repeatable)")
    t.add_argument("--group", metavar="G", help="every online device of a group")
    t.add_argument("--all", action="store_true", help="every online device of the fleet")
    d.add_argument(
        "--canary", default="10%", metavar="SHARE", help="share of each profile's devices first (default 10%%)"
    )
    d.add_argument(
        "--wave", type=int, default=0, metavar="N", help="after the canary, N devices at a time (default: all)"
    )
    d.add_argument(
        "--wait-healthy",
        action="store_true",
        help="wait for each phase's outcome before the next (without it, only for the devices to accept)",
    )
    d.add_argument("--strategy", choices=STRATEGIES, default="shadow", help="on-device rollout (default shadow)")
    d.add_argument(
        "--gates",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="device gates: min_samples, max_p95_ratio, min_agreement, max_error_rate, max_duration_s; and the "
        "traffic shares canary_share, shadow_share (default: the device's [rollout] config)",
    )
    d.add_argument(
        "--max-failures", default="0", metavar="N|P%", help="failed devices tolerated before stopping (default 0)"
    )
    d.add_argument(
        "--delta-from",
        action="append",
        default=[],
        metavar="FILE",
        help="the bundle devices run now (repeat per profile): devices on it get a delta "
        "(<bundle>.from-<version>.delta, written beside the bundle) and fall back to the full bundle",
    )
    d.add_argument("--via", choices=VIAS, default="file", help="how devices fetch the bundle (default file://)")
    d.add_argument("--base-url", metavar="URL", help="with --via http: where the bundle files are served")
    d.add_argument(
        "--key",
        help="operator's ed25519 private key (default $EDGEFLEET_SIGNING_KEY or ~/.config/edgefleet/keys/fleet.key)",
    )
    d.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        metavar="S",
        help="wait this long for each device's outcome (default 900)",
    )
    d.add_argument("--ttl", type=float, default=300.0, metavar="S", help="the command expires after S (default 300)")
    _connection_flags(d)
    d.set_defaults(func=cmd_deploy)
