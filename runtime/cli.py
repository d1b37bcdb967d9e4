"""The `edge-runtime` command: infer, serve, bench, status, log and models on the device."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runtime import __version__
from runtime.errors import ConfigError, EdgeError

__all__ = ["main", "make_parser"]

DEFAULT_CONFIG = "/etc/edge-runtime/config.toml"
DEFAULT_KEYS_DIR = Path("/etc/edge-runtime/keys")


def _trusted_keys(args: argparse.Namespace) -> list[Any]:
    """Keys from --trusted-key, else the config's, else /etc/edge-runtime/keys/*.pub."""
    from runtime.signing import load_public_key

    paths: list[Path] = [Path(k) for k in args.trusted_key or []]
    if not paths and getattr(args, "config", None) and Path(args.config).is_file():
        from runtime.config import load_config

        paths = [Path(k) for k in load_config(args.config).trusted_keys]
    if not paths and DEFAULT_KEYS_DIR.is_dir():
        paths = sorted(DEFAULT_KEYS_DIR.glob("*.pub"))
    if not paths:
        raise ConfigError(
            "no trusted keys: pass --trusted-key FILE.pub (bundles are always verified)", key="--trusted-key"
        )
    return [load_public_key(p) for p in paths]


def engine_options(threads: int = 0, *, reserve_io_core: bool | None = None) -> tuple[Any, dict[str, Any]]:
    """EngineOptions from this machine's thread plan, and the plan as a dict (for status and logs)."""
    from runtime.cpu import apply_budget, plan_threads, read_topology
    from runtime.engine import EngineOptions

    plan = plan_threads(read_topology(), requested=threads, reserve_io_core=reserve_io_core)
    apply_budget(plan)
    opts = EngineOptions(intra_op_threads=plan.intra_op_threads, pin_cores=plan.engine_pin())
    return opts, plan.to_dict()


def cmd_infer(args: argparse.Namespace) -> int:
    from runtime.model import load_model

    opts, plan = engine_options(args.threads)
    logging.getLogger("runtime").info("thread plan: %s", plan.get("reason"))
    model = load_model(Path(args.bundle), trusted_keys=_trusted_keys(args), options=opts)
    failures = 0
    try:
        for item in args.inputs:
            try:
                pred = model.run_file(item, full_outputs=True)
            except EdgeError as exc:
                failures += 1
                print(f"edge-runtime: error: {exc}", file=sys.stderr)
                continue
            if args.json:
                print(json.dumps(pred.to_dict()), flush=True)
            else:
                top = pred.result.get("top1")
                what = f"{top['label']} ({top['score']:.3f})" if top else json.dumps(pred.result.get("outputs"))[:120]
                print(f"{item}: {what}  [{pred.latency_ms:.2f} ms]")
    finally:
        model.close()
    return 2 if failures else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from runtime.bench import benchmark
    from runtime.model import load_model

    opts, plan = engine_options(args.threads)
    model = load_model(Path(args.bundle), trusted_keys=_trusted_keys(args), options=opts)
    try:
        res = benchmark(
            model.bundle.model_path,
            opts,
            backend=model.manifest.backend,
            warmup=args.warmup,
            iterations=args.iterations,
        )
    finally:
        model.close()
    out = {"bundle": args.bundle, "name": model.name, "version": model.version, "thread_plan": plan, **res.__dict__}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{model.name} {model.version} on {res.provider}, {res.threads} thread(s) ({plan.get('reason')})")
        print(
            f"  p50 {res.p50_ms:.3f} ms  p95 {res.p95_ms:.3f} ms  {res.throughput_per_s:.1f}/s  "
            f"peak RSS {res.peak_rss_mb:.1f} MiB  load {res.load_ms:.1f} ms"
        )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from runtime.config import load_config
    from runtime.service import Service

    cfg = load_config(args.config)
    logging.getLogger().setLevel(cfg.log_level.upper())
    return Service(cfg, config_path=Path(args.config)).run(max_items=args.max_items)


def cmd_status(args: argparse.Namespace) -> int:
    from runtime.service import read_status

    status = read_status(Path(args.state_dir) if args.state_dir else None, config=args.config)
    if args.json:
        print(json.dumps(status, indent=2, default=str))
    else:
        for k, v in status.items():
            print(f"{k:>16}: {json.dumps(v, default=str) if isinstance(v, (dict, list)) else v}")
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    from runtime.service import log_command

    return log_command(args)


def _model_store(args: argparse.Namespace) -> tuple[Any, Path]:
    """The model store and state directory named by --state-dir, else by the config."""
    from runtime.store import ModelStore

    if args.state_dir:
        state = Path(args.state_dir)
        return ModelStore(state / "models"), state
    from runtime.config import load_config

    cfg = load_config(args.config)
    return ModelStore.from_config(cfg), cfg.state_path


def _reload_service(state: Path) -> str:
    """SIGHUP the running service (status.json's pid) so it serves the store's active version."""
    import signal

    from runtime.service import STATUS_FILE

    try:
        pid = json.loads((state / STATUS_FILE).read_text()).get("pid")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if isinstance(pid, int) and pid > 0 else b""
    except (OSError, ValueError, AttributeError):
        cmdline = b""
    if b"runtime" not in cmdline or b"serve" not in cmdline:  # none, or a stale pid now someone else's
        return "the service is not running; it serves the active version when it starts"
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return "the service is not running; it serves the active version when it starts"
    except PermissionError:
        return f"not allowed to signal the service (pid {pid}); run as its user or: systemctl reload edge-runtime"
    return f"sent SIGHUP to the service (pid {pid}); it switches to the active version now"


def _models_table(store: Any) -> list[dict[str, Any]]:
    active, previous, good = store.active(), store.previous(), store.is_good()
    rows = []
    for m in store.list():
        is_active = active is not None and m.key == active.key
        is_previous = previous is not None and m.key == previous.key
        rows.append({**m.to_dict(), "active": is_active, "previous": is_previous, "good": is_active and good})
    return rows


def _print_models(rows: list[dict[str, Any]], root: Path) -> None:
    import datetime as dt

    if not rows:
        print(f"no models in {root}")
        return
    print(f"{'NAME':<20} {'VERSION':<12} {'PROFILE':<16} {'SIZE':>10}  {'ADDED (UTC)':<20} STATE")
    for r in rows:
        added = dt.datetime.fromtimestamp(r["added_at"], dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        mark = ("active, good" if r["good"] else "active, not yet good") if r["active"] else ""
        mark = "previous" if r["previous"] else mark
        size = f"{r['size'] / 1024**2:.2f} MiB" if r["size"] >= 1024**2 else f"{r['size'] / 1024:.1f} KiB"
        print(f"{r['name']:<20} {r['version']:<12} {r['profile']:<16} {size:>10}  {added:<20} {mark}")


def cmd_models(args: argparse.Namespace) -> int:
    store, state = _model_store(args)
    if args.action == "list":
        rows = _models_table(store)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            _print_models(rows, store.root)
        return 0
    if args.action == "add":
        m = store.add(Path(args.bundle), trusted_keys=_trusted_keys(args))
        print(
            f"stored {m.name} {m.version} ({m.profile}, sha256 {m.sha256[:16]}…); activate it with: "
            f"edge-runtime models activate {m.name} {m.version}"
        )
        return 0
    if args.action == "activate":
        m = store.activate(args.name, args.version)
        prev = store.previous()
        print(f"active: {m.name} {m.version} (previous: {f'{prev.name} {prev.version}' if prev else 'none'})")
    else:
        to = None
        if args.to:
            current = store.active()
            name = args.name or (current.name if current is not None else None)
            if name is None:
                raise ConfigError("no active model to take the name from; pass --name", key="--name")
            to = (name, args.to)
        m = store.rollback(to, reason="edge-runtime models rollback")
        print(f"active: {m.name} {m.version} (rolled back)")
    print(_reload_service(state))
    return 0


def make_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    ap = argparse.ArgumentParser(prog="edge-runtime", description="edgefleet on-device runtime.")
    ap.add_argument("-V", "--version", action="version", version=f"edge-runtime {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def keys(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--trusted-key",
            action="append",
            metavar="FILE.pub",
            help=f"trusted ed25519 public key (repeatable; default: the config's, else {DEFAULT_KEYS_DIR}/*.pub)",
        )
        p.add_argument("--config", default=DEFAULT_CONFIG, help="service config to take trusted keys from")
        p.add_argument("--threads", type=int, default=0, help="inference threads (0 = the thread plan's choice)")

    i = sub.add_parser("infer", help="run a bundle on image or .npy files", description="Run a bundle on inputs.")
    i.add_argument("--bundle", required=True, help="bundle .tar or directory")
    i.add_argument("inputs", nargs="+", help="image files or .npy tensors")
    i.add_argument("--json", action="store_true", help="one JSON object per input (JSON Lines)")
    keys(i)
    i.set_defaults(func=cmd_infer)

    b = sub.add_parser(
        "bench",
        help="on-device latency, throughput and memory of a bundle",
        description="Benchmark a bundle with this device's thread plan.",
    )
    b.add_argument("--bundle", required=True)
    b.add_argument("--iterations", type=int, default=100)
    b.add_argument("--warmup", type=int, default=10)
    b.add_argument("--json", action="store_true")
    keys(b)
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser("serve", help="run the service (what systemd starts)", description="Run the service.")
    s.add_argument("--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    s.add_argument("--max-items", type=int, default=0, help=argparse.SUPPRESS)  # tests: stop after N inputs
    s.set_defaults(func=cmd_serve)

    st = sub.add_parser(
        "status", help="model, thread plan, logbook and health of this device", description="Show the service's status."
    )
    st.add_argument("--config", default=DEFAULT_CONFIG)
    st.add_argument("--state-dir", help="state directory (default: from the config)")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    lg = sub.add_parser("log", help="read the logbook: tail or export", description="Read the SQLite logbook.")
    lg.add_argument("action", choices=["tail", "export"])
    lg.add_argument("--config", default=DEFAULT_CONFIG)
    lg.add_argument("--db", help="logbook file (default: from the config)")
    lg.add_argument("-n", type=int, default=20, help="rows for tail")
    lg.add_argument("--table", default="inferences", choices=["inferences", "metrics", "events"])
    lg.add_argument("--since", help="export rows newer than this: 1h, 30m, 2d or an ISO time")
    lg.add_argument("--format", default="jsonl", choices=["jsonl", "csv"])
    lg.set_defaults(func=cmd_log)
    _models_parser(sub)
    return ap


def _models_parser(sub: Any) -> None:
    m = sub.add_parser(
        "models",
        help="model versions on this device: list, add, activate, rollback",
        description="The on-device model store (<state_dir>/models). activate and rollback make a running "
        "service switch at once (SIGHUP).",
    )
    actions = m.add_subparsers(dest="action", metavar="ACTION", required=True)

    def where(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", default=DEFAULT_CONFIG, help=f"service config (default {DEFAULT_CONFIG})")
        p.add_argument("--state-dir", help="state directory (default: from the config)")

    ls = actions.add_parser("list", help="versions held, newest first, with active/previous/good markers")
    ls.add_argument("--json", action="store_true", help="a JSON array")
    where(ls)
    ad = actions.add_parser("add", help="verify a bundle and store it (does not activate it)")
    ad.add_argument("bundle", help="bundle .tar or directory")
    ad.add_argument("--trusted-key", action="append", metavar="FILE.pub", help="trusted key (default: the config's)")
    where(ad)
    ac = actions.add_parser("activate", help="make a held version active (crash-loop protection applies)")
    ac.add_argument("name")
    ac.add_argument("version")
    where(ac)
    rb = actions.add_parser("rollback", help="back to the previous version, or --to a held one")
    rb.add_argument("--to", metavar="VERSION", help="a held version (default: the previous one)")
    rb.add_argument("--name", help="model name for --to (default: the active model's)")
    where(rb)
    m.set_defaults(func=cmd_models)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; exit codes: 0 ok, 1 runtime failure, 2 bad config, input or usage."""
    args = make_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO if args.command == "serve" else logging.WARNING
    # journald adds timestamps; keep lines short
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args))
    except EdgeError as exc:
        print(f"edge-runtime: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
