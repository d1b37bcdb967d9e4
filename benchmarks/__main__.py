"""`python -m benchmarks [--quick] [--only NAME] [-o DIR]`: run them, write BENCHMARKS.md and benchmarks.json."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks import BENCHMARKS
from benchmarks.harness import JSON_NAME, MARKDOWN_NAME, run

__all__ = ["main"]

REPO = Path(__file__).resolve().parent.parent


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; exit 0 when the benchmarks ran (a missed goal is a result, not a failure)."""
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=f"Run the benchmarks and write {MARKDOWN_NAME} and {JSON_NAME}. "
        "Every figure is a ratio against a baseline measured in the same run.",
    )
    ap.add_argument("--quick", action="store_true", help="tiny configuration (smoke test): fewer, shorter repeats")
    ap.add_argument(
        "--only",
        action="append",
        choices=BENCHMARKS,
        metavar="NAME",
        help=f"run only this benchmark (repeatable; one of {', '.join(BENCHMARKS)}); "
        "the others' results from an earlier run on this machine are kept",
    )
    ap.add_argument("-o", "--output", type=Path, default=REPO, help="where to write the results (default: repo root)")
    args = ap.parse_args(argv)
    # progress from the benchmarks only: the runtime and toolchain log every load, and the benchmarks load many
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("benchmarks").setLevel(logging.INFO)
    names = list(dict.fromkeys(args.only)) if args.only else list(BENCHMARKS)
    command = " ".join(["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])])
    data = run(names, quick=args.quick, out_dir=args.output, command=command)
    for key, fig in data["figures"].items():
        value = fig["value"]
        shown = (
            "skipped" if value is None else f"{value['median']:.3f} (min {value['low']:.3f}, max {value['high']:.3f})"
        )
        verdict = {True: "pass", False: "miss", None: ""}[fig["passed"]]
        print(f"{key}: {shown} {fig['unit']} {verdict}".rstrip())
    print(f"wrote {args.output / MARKDOWN_NAME} and {args.output / JSON_NAME}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
