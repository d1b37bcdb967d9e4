"""The `toolchain` command: profiles, build, inspect, keygen, sign, verify, bundle diff, demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runtime.errors import EdgeError
from toolchain import __version__
from toolchain.errors import KeyFileError, ToolchainError, UsageError
from toolchain.fleet_cli import add_fleet_parser

__all__ = ["default_key_path", "main"]

log = logging.getLogger("toolchain")


def default_key_path() -> Path:
    """``$EDGEFLEET_SIGNING_KEY`` or ``~/.config/edgefleet/keys/fleet.key``."""
    env = os.environ.get("EDGEFLEET_SIGNING_KEY")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "edgefleet" / "keys" / "fleet.key"


def _print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


# --- profiles -------------------------------------------------------------------------------


def cmd_profiles(args: argparse.Namespace) -> int:
    from runtime.profile import builtin_profile_names, load_profile
    from toolchain import report

    if args.action == "list":
        profiles = [load_profile(n) for n in builtin_profile_names()]
        if args.json:
            _print_json([p.to_dict() for p in profiles])
        else:
            report.print_profiles(profiles)
        return 0
    if not args.profile:
        raise UsageError(
            "name a profile or a .toml path, e.g. `toolchain profiles show rpi4`",
            flag="profiles show",
        )
    prof = load_profile(args.profile)
    if args.json:
        _print_json(prof.to_dict() | {"digest": prof.digest})
    else:
        report.print_profile(prof)
    return 0


# --- build ----------------------------------------------------------------------------------


def _floats(text: str | None, flag: str) -> tuple[float, ...]:
    if not text:
        return ()
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"expected comma-separated numbers, got {text!r}", flag=flag) from None


def _preprocess(args: argparse.Namespace) -> Any:
    from runtime.manifest import Preprocess

    if not any([args.mean, args.std, args.color, args.layout, args.scale is not None, args.resize]):
        return None
    fields: dict[str, Any] = {"kind": "image"}
    if args.mean:
        fields["mean"] = _floats(args.mean, "--mean")
    if args.std:
        fields["std"] = _floats(args.std, "--std")
        if any(v == 0 for v in fields["std"]):
            raise UsageError("values must be non-zero", flag="--std")
    if args.color:
        fields["color"] = args.color
    if args.layout:
        fields["layout"] = args.layout
    if args.scale is not None:
        fields["scale"] = args.scale
    if args.resize:
        from toolchain.load import parse_shape

        hw = parse_shape(args.resize)
        if len(hw) != 2:
            raise UsageError("expected HEIGHT,WIDTH", flag="--resize")
        fields["resize"] = hw
    return Preprocess(**fields)


def _labels(path: str | None) -> tuple[str, ...]:
    if not path:
        return ()
    p = Path(path)
    try:
        return tuple(line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip())
    except OSError as exc:
        raise UsageError(f"cannot read labels file {p}: {exc.strerror}", flag="--labels") from exc


def _signing_key(arg: str | None) -> Path:
    from runtime.signing import generate_keypair

    if arg:
        path = Path(arg)
        if not path.is_file():
            raise KeyFileError("signing key not found (create one with `toolchain keygen -o DIR`)", path=path)
        return path
    path = default_key_path()
    if not path.is_file():
        generate_keypair(path.parent, path.stem)
        print(
            f"toolchain: created signing key {path} (public key {path.with_suffix('.pub')}: "
            "give it to your devices as a trusted key)",
            file=sys.stderr,
        )
    return path


def cmd_build(args: argparse.Namespace) -> int:
    from runtime.profile import load_profile
    from toolchain import report
    from toolchain.errors import GateError
    from toolchain.load import parse_shape
    from toolchain.pipeline import BuildRequest, build
    from toolchain.progress import NullProgress, RichProgress

    if args.search_budget <= 0:
        raise UsageError("expected a positive number of seconds", flag="--search-budget")
    if args.prune_amount is not None and not 0 <= args.prune_amount < 1:
        raise UsageError("expected a fraction in [0, 1)", flag="--prune-amount")
    if args.version:
        from runtime.manifest import _SEMVER

        if not _SEMVER.fullmatch(args.version):
            raise UsageError(f"expected a semantic version like 1.2.0, got {args.version!r}", flag="--version")
    profile = load_profile(args.profile)
    shapes = tuple(parse_shape(s) for s in args.input_shape) if args.input_shape else None
    req = BuildRequest(
        model=args.model,
        profile=profile,
        output_dir=Path(args.output),
        key=_signing_key(args.key),
        weights=Path(args.weights) if args.weights else None,
        input_shapes=shapes,
        calibration=args.calibration,
        validation=args.validation,
        name=args.name,
        version=args.version or "1.0.0",
        parent_version=args.parent_version,
        quantize=args.quantize,
        activation_type=args.activation_type,
        calibration_method=args.calibration_method,
        per_channel=False if args.no_per_channel else None,
        prune=args.prune,
        prune_amount=args.prune_amount,
        opset=args.opset,
        preprocess=_preprocess(args),
        labels=_labels(args.labels),
        bench_iterations=args.bench_iterations,
        enforce_gate=not args.allow_gate_failure,
        keep_work=args.keep_work,
        backend=args.backend,
        metric=args.metric,
        search=args.search,
        search_budget=args.search_budget,
        train=args.train,
    )
    progress = NullProgress() if args.quiet else RichProgress()
    try:
        result = build(req, progress)
    except GateError as exc:
        if args.json:
            _print_json(exc.report)
        elif exc.report:
            report.print_build(exc.report)
        raise
    if args.json:
        _print_json(result.report)
    else:
        report.print_build(result.report)
        print(f"report: {result.report_path}")
    return 0


# --- bundles and keys -------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    from toolchain import bundle, report

    info = bundle.inspect_bundle(Path(args.bundle))
    if args.json:
        _print_json(info)
    else:
        report.print_inspect(info)
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from runtime.signing import generate_keypair

    priv, pub = generate_keypair(Path(args.output), args.name, overwrite=args.force)
    print(f"private key: {priv} (keep it secret; signs bundles and commands)")
    print(f"public key:  {pub} (install on devices as a trusted key)")
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from toolchain import bundle
    from toolchain.pipeline import _load_key

    out = bundle.sign_bundle(Path(args.bundle), _load_key(Path(args.key)))
    print(f"signed {out}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from runtime.signing import load_public_key
    from toolchain import bundle

    keys = []
    for k in args.key:
        try:
            keys.append(load_public_key(Path(k)))
        except EdgeError as exc:
            raise KeyFileError(str(exc)) from exc
    res = bundle.verify_bundle(Path(args.bundle), keys)
    if args.json:
        _print_json(res.to_dict())
    else:
        print(f"OK: {res.name} {res.version} signed by key {res.key_id}; {len(res.files)} file(s) match the manifest")
    return 0


def cmd_bundle_diff(args: argparse.Namespace) -> int:
    from toolchain.delta import diff_bundles

    info = diff_bundles(Path(args.old), Path(args.new), Path(args.output), force=args.force, level=args.level)
    if args.json:
        _print_json(info.to_dict())
    else:
        print(
            f"{info.path}: {info.delta_size} bytes = {info.ratio:.1%} of the new bundle ({info.new_size} bytes; "
            f"old {info.old_size} bytes); applied and checked against {info.new_sha256[:12]}"
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from toolchain.demo import run_demo

    return run_demo(Path(args.output), profile=args.profile, json_out=args.json, quiet=args.quiet)


# --- parser ---------------------------------------------------------------------------------


def _build_parser(sub: Any) -> None:
    b = sub.add_parser(
        "build",
        help="turn a model into a validated, signed bundle for a device profile",
        description="Load, prune, export, quantize, validate against FP32, benchmark and sign.",
    )
    b.add_argument(
        "model",
        help="model.onnx | model.pt2 (torch.export) | TorchScript .pt | package.module:factory | model.tflite",
    )
    b.add_argument(
        "--profile",
        required=True,
        help="profile name (see `toolchain profiles list`) or path to a .toml",
    )
    b.add_argument("-o", "--output", default="dist", help="output directory (default: dist/)")
    b.add_argument(
        "--backend",
        choices=["onnx", "tflite", "both"],
        help="engine the bundle targets (default: the profile's backend); both = build, validate and compare "
        "both candidates and bundle the profile's preferred one if it passes the gate, else the other",
    )
    b.add_argument("--weights", help="state_dict file for a module:factory model")
    b.add_argument("--input-shape", action="append", metavar="N,C,H,W", help="input shape (repeat per input)")
    b.add_argument("--calibration", metavar="DIR|FILE.npz|module:function", help="calibration samples")
    b.add_argument(
        "--validation",
        metavar="DIR|FILE.npz|module:function",
        help="validation samples (class sub-folders give labels)",
    )
    b.add_argument("--name", help="bundle name (default: from the model)")
    b.add_argument("--version", help="bundle version, semver (default 1.0.0)")
    b.add_argument("--parent-version", help="version this one replaces")
    b.add_argument(
        "--quantize",
        choices=["static", "dynamic", "fp16", "none"],
        help="override the profile's recipe",
    )
    b.add_argument("--activation-type", choices=["int8", "uint8"], help="int8 = S8S8 (ARM), uint8 = U8S8 (x86)")
    b.add_argument("--calibration-method", choices=["minmax", "entropy", "percentile"])
    b.add_argument("--no-per-channel", action="store_true", help="per-tensor weight scales")
    b.add_argument("--prune", choices=["none", "magnitude", "structured"], help="PyTorch inputs only")
    b.add_argument("--prune-amount", type=float, metavar="FRACTION")
    b.add_argument("--opset", type=int, help="override the profile's ONNX opset")
    b.add_argument("--mean", help="per-channel mean after scaling, e.g. 0.485,0.456,0.406")
    b.add_argument("--std", help="per-channel std, e.g. 0.229,0.224,0.225")
    b.add_argument("--scale", type=float, help="pixel scale before mean/std (default 1/255)")
    b.add_argument("--color", choices=["rgb", "bgr", "gray"])
    b.add_argument("--layout", choices=["NCHW", "NHWC"])
    b.add_argument("--resize", metavar="H,W", help="resize images to H,W (default: the model's input size)")
    b.add_argument("--labels", metavar="FILE", help="class names, one per line")
    b.add_argument(
        "--key",
        help="ed25519 signing key (default: $EDGEFLEET_SIGNING_KEY or "
        "~/.config/edgefleet/keys/fleet.key, created if missing)",
    )
    b.add_argument("--bench-iterations", type=int, default=50, help="host benchmark runs per model (0 = skip)")
    b.add_argument(
        "--allow-gate-failure",
        action="store_true",
        help="pack the bundle even if the gate fails (marked in the manifest)",
    )
    b.add_argument(
        "--metric",
        metavar="NAME|module:function",
        help="gate metric: classification, dense, embedding, detection, generic, or your "
        "module:function(reference, candidate) -> float (default: from the output shape)",
    )
    b.add_argument(
        "--search",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="search calibration/recipe variants and mixed precision when the recipe fails the gate (default: on)",
    )
    b.add_argument(
        "--search-budget", type=float, default=600.0, metavar="SECONDS", help="time budget of the search (default 600)"
    )
    b.add_argument(
        "--train",
        metavar="module:function",
        help="PyTorch inputs: a function returning a DataLoader of (inputs, labels) for "
        "quantization-aware training when post-training quantization fails the gate",
    )
    b.add_argument("--keep-work", action="store_true", help="keep intermediate files")
    b.add_argument("--json", action="store_true", help="print the report as JSON")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    b.set_defaults(func=cmd_build)


def _bundle_parser(sub: Any) -> None:
    bp = sub.add_parser(
        "bundle",
        help="work with built bundles (diff)",
        description="Work with built bundles: `bundle diff` makes a delta from one version to the next.",
    )
    bsub = bp.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)
    d = bsub.add_parser(
        "diff",
        help="make a delta bundle from OLD to NEW (zstd patch-from)",
        description="Write a delta that turns bundle OLD into bundle NEW on a device holding OLD. "
        "It is applied and checked before it is written; prints the sizes and the ratio.",
    )
    d.add_argument("old", metavar="OLD", help="the bundle the devices hold")
    d.add_argument("new", metavar="NEW", help="the bundle to deliver")
    d.add_argument("-o", "--output", required=True, metavar="DELTA", help="where to write the delta")
    d.add_argument("--force", action="store_true", help="diff even if OLD and NEW differ in name or profile")
    d.add_argument("--level", type=int, default=19, help="zstd level 1..22 (default 19)")
    d.add_argument("--json", action="store_true", help="print sizes and hashes as JSON")
    d.set_defaults(func=cmd_bundle_diff)


def make_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    ap = argparse.ArgumentParser(
        prog="toolchain",
        description="edgefleet host toolchain: build, sign and inspect model bundles.",
    )
    ap.add_argument("-V", "--version", action="version", version=f"edgefleet toolchain {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("profiles", help="list or show device profiles", description="List or show device profiles.")
    p.add_argument("action", choices=["list", "show"])
    p.add_argument("profile", nargs="?", help="name or .toml path (for show)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_profiles)

    _build_parser(sub)

    i = sub.add_parser(
        "inspect",
        help="show a bundle's manifest, files and signature",
        description="Show a bundle's manifest, files and signature (no key needed).",
    )
    i.add_argument("bundle")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    k = sub.add_parser(
        "keygen",
        help="create an ed25519 key pair",
        description="Create NAME.key (private, 0600) and NAME.pub.",
    )
    k.add_argument("-o", "--output", required=True, help="directory for the key files")
    k.add_argument("--name", default="fleet", help="file stem (default: fleet)")
    k.add_argument("--force", action="store_true", help="overwrite existing key files")
    k.set_defaults(func=cmd_keygen)

    s = sub.add_parser(
        "sign",
        help="(re-)sign a bundle with a private key",
        description="Re-sign a bundle in place.",
    )
    s.add_argument("bundle")
    s.add_argument("--key", required=True, help="private key file")
    s.set_defaults(func=cmd_sign)

    v = sub.add_parser(
        "verify",
        help="verify a bundle's signature and file hashes",
        description="Verify signature and every file hash.",
    )
    v.add_argument("bundle")
    v.add_argument("--key", action="append", required=True, help="trusted public key (repeatable)")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_verify)

    d = sub.add_parser(
        "demo",
        help="train the digits CNN and build it end to end (offline)",
        description="Train a small CNN on scikit-learn's digits, build a bundle and show the report.",
    )
    d.add_argument("-o", "--output", default="demo-out", help="working directory (default: demo-out/)")
    d.add_argument("--profile", default="rpi4")
    d.add_argument("--json", action="store_true")
    d.add_argument("-q", "--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    _bundle_parser(sub)
    add_fleet_parser(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 failure, 2 bad input)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (ToolchainError, EdgeError) as exc:
        print(f"toolchain: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("toolchain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
