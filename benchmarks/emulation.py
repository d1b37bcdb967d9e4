"""Section 10: which checks run on arm64 under qemu — for correctness only; no emulated timing is a device timing."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path
from typing import Any

from benchmarks.harness import Context, Report, Table

__all__ = ["NAME", "TITLE", "checks", "run"]

NAME = "emulation"
TITLE = "arm64 under emulation: correctness only"
REPO = Path(__file__).resolve().parent.parent
_TESTS = REPO / "tests" / "arm64"

METHOD = (
    "Listed from the source of `tests/arm64/` (each test module's docstring and its test functions) and, "
    "when this machine has run them, from the harness's stage record in `$EDGEFLEET_CACHE/arm64/stages.json` "
    "(stage names only). These checks run the runtime on emulated Cortex-A57/A72/A76 CPUs (qemu-user) and in a "
    "booted arm64 Debian (qemu-system-aarch64) to prove that it installs, imports, computes the same outputs "
    "and behaves under systemd on arm64. **Emulated timings are not device timings**: qemu translates every "
    "instruction, so no time measured there says anything about a Raspberry Pi or a Jetson, and none is "
    "presented here. Device figures need the device."
)


def checks(folder: Path = _TESTS) -> list[tuple[str, str, str]]:
    """(module, what it checks, its tests) for every ``test_*.py`` under ``folder``."""
    out = []
    for path in sorted(folder.glob("test_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        doc = (ast.get_docstring(tree) or "").strip().splitlines()
        tests = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
        out.append((f"tests/arm64/{path.name}", doc[0] if doc else "", ", ".join(tests)))
    return out


def _stages() -> list[str]:
    """Names of the harness stages this machine has run (their timings are deliberately left out)."""
    cache = Path(os.environ.get("EDGEFLEET_CACHE", Path.home() / ".cache" / "edgefleet")) / "arm64" / "stages.json"
    try:
        data: Any = json.loads(cache.read_text())
    except (OSError, ValueError):
        return []
    return sorted(data) if isinstance(data, dict) else []


def run(ctx: Context) -> Report:
    """A listing, not a measurement: no figures."""
    listed = checks()
    stages = [s for s in _stages() if "on cortex" in s or "emulated" in s]
    tables = [
        Table("Checks that run on arm64 under qemu (correctness only)", ("module", "checks", "tests"), tuple(listed))
    ]
    if stages:
        tables.append(
            Table(
                "Emulated stages this machine has run (names only, no timings)", ("stage",), tuple((s,) for s in stages)
            )
        )
    notes = (
        "Emulated timings are not device timings: none of the figures above was measured under emulation, "
        "and no timing from the emulated runs is presented.",
        f"{len(listed)} test modules; run them with `pytest tests/arm64` (needs root for chroot and binfmt_misc).",
    )
    return Report(NAME, TITLE, METHOD, (), tuple(tables), notes)
