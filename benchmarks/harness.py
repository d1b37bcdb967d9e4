"""The benchmark runner: machine description, alternating repeated runs, medians and spread, JSON and Markdown.

Every figure is a ratio (or a difference) against a baseline measured in the same run on the same
machine. A benchmark module runs baseline and subject alternately (:func:`alternate`), pairs them by
repeat (:func:`ratios`, :func:`differences`) and reports the median with its min–max
(:class:`Spread`). The runner (:func:`run`) writes ``benchmarks.json`` (every figure, the source of
truth) and renders ``BENCHMARKS.md`` from it; re-running some benchmarks (``--only``) on the same
machine replaces their entries and keeps the others.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

__all__ = [
    "JSON_NAME",
    "MARKDOWN_NAME",
    "Context",
    "Figure",
    "Goal",
    "Measure",
    "Report",
    "Skipped",
    "Spread",
    "Table",
    "alternate",
    "describe_machine",
    "differences",
    "merge",
    "ratios",
    "render_markdown",
    "revision",
    "run",
    "timed",
]

log = logging.getLogger(__name__)

JSON_NAME = "benchmarks.json"
MARKDOWN_NAME = "BENCHMARKS.md"
SCHEMA = 1
_SAME_MACHINE = ("cpu_model", "logical_cores", "python", "onnxruntime", "numpy", "kernel")
T = TypeVar("T")


class Skipped(Exception):
    """Raised by a benchmark that cannot run here (a missing optional model); the reason is reported."""


@dataclass(frozen=True)
class Spread:
    """Median and min–max of the per-repeat values."""

    median: float
    low: float
    high: float
    n: int
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        """Summarize ``values`` (at least one, all finite)."""
        vals = tuple(float(v) for v in values)
        if not vals or not all(math.isfinite(v) for v in vals):
            raise ValueError(f"a spread needs finite values, got {vals}")
        return cls(statistics.median(vals), min(vals), max(vals), len(vals), vals)


@dataclass(frozen=True)
class Goal:
    """What the product promises: ``value op target`` (``>=`` for ratios, ``<=`` for costs)."""

    op: Literal[">=", "<="]
    target: float

    def met(self, value: float) -> bool:
        """Whether ``value`` meets the goal."""
        return value >= self.target if self.op == ">=" else value <= self.target

    def text(self, unit: str = "") -> str:
        """``≥ 0.95`` / ``≤ 25 MiB``."""
        sign = "≥" if self.op == ">=" else "≤"
        return f"{sign} {_fmt(self.target)}{' ' + unit if unit else ''}"


@dataclass(frozen=True)
class Measure:
    """An absolute number behind a figure (baseline or subject), per repeat."""

    label: str
    unit: str
    spread: Spread


@dataclass(frozen=True)
class Figure:
    """One reported number: a ratio or difference of subject against baseline, with its goal."""

    key: str  # "<benchmark>.<case>", stable across runs
    label: str
    kind: Literal["ratio", "difference"]
    unit: str  # "" for ratios
    value: Spread | None
    goal: Goal | None = None
    baseline: Measure | None = None
    subject: Measure | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    skipped: str | None = None

    @property
    def passed(self) -> bool | None:
        """Median meets the goal (None: no goal, or skipped)."""
        if self.goal is None or self.value is None:
            return None
        return self.goal.met(self.value.median)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with ``passed``."""
        out = asdict(self)
        out["config"] = dict(self.config)
        out["passed"] = self.passed
        return out


@dataclass(frozen=True)
class Table:
    """Supporting numbers (a stage split, an attribution) rendered as a Markdown table."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]


@dataclass(frozen=True)
class Report:
    """What one benchmark module returns: its figures, a method paragraph, tables and notes."""

    name: str
    title: str
    method: str
    figures: tuple[Figure, ...]
    tables: tuple[Table, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass
class Context:
    """Shared by the benchmarks of one run: the configuration, a work directory, artifacts built once."""

    quick: bool
    work: Path
    artifacts: dict[str, Any] = field(default_factory=dict)

    def pick(self, full: T, quick: T) -> T:
        """The full or the quick (smoke-test) value of a setting."""
        return quick if self.quick else full

    def once(self, key: str, make: Callable[[], T]) -> T:
        """Build an artifact (a bundle, a key pair) once per run and share it between benchmarks."""
        if key not in self.artifacts:
            self.artifacts[key] = make()
        value: T = self.artifacts[key]
        return value


def timed(fn: Callable[[], object], n: int) -> float:
    """Seconds for ``n`` back-to-back calls of ``fn``."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - t0


def alternate(runs: Mapping[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run every callable once per repeat, rotating the order (A B, B A, A B …) so drift hits all alike."""
    names = list(runs)
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            out[name].append(float(runs[name]()))
    return out


def ratios(subject: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """Per-repeat ``subject / baseline`` (pairs measured back to back)."""
    return [s / b for s, b in zip(subject, baseline, strict=True)]


def differences(subject: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """Per-repeat ``subject - baseline``."""
    return [s - b for s, b in zip(subject, baseline, strict=True)]


# --- machine -----------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    for key in ("model name", "Model", "Hardware", "Processor", "cpu model"):
        if fields.get(key):
            return fields[key]
    part = fields.get("CPU part")
    return f"{platform.machine()} (CPU part {part})" if part else platform.machine()


def _memory_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def describe_machine() -> dict[str, Any]:
    """CPU model, cores, memory, kernel and the versions of Python and the libraries that set the numbers."""
    import sqlite3

    import numpy
    import onnxruntime

    try:
        import cv2

        opencv: str | None = cv2.__version__
    except ImportError:
        opencv = None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "arch": platform.machine(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_mb": _memory_mb(),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "opencv": opencv,
        "sqlite": sqlite3.sqlite_version,
    }


# --- running -----------------------------------------------------------------------------------


def _module(name: str) -> Any:
    from benchmarks import BENCHMARKS

    if name not in BENCHMARKS:
        raise SystemExit(f"benchmarks: unknown benchmark {name!r} (known: {', '.join(BENCHMARKS)})")
    return importlib.import_module(f"benchmarks.{name}")


def run(names: Sequence[str], *, quick: bool, out_dir: Path, command: str = "python -m benchmarks") -> dict[str, Any]:
    """Run the named benchmarks, then write ``benchmarks.json`` and ``BENCHMARKS.md`` into ``out_dir``."""
    modules = [_module(n) for n in names]  # unknown names fail before anything runs
    machine = describe_machine()
    results: list[tuple[Report, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        ctx = Context(quick=quick, work=Path(tmp))
        for mod in modules:
            log.info("running %s%s", mod.NAME, " (quick)" if quick else "")
            source, before, t0 = revision(), _load(), time.monotonic()
            report = mod.run(ctx)
            took = time.monotonic() - t0
            log.info("%s done in %.1f s", mod.NAME, took)
            # other work on the machine shows up as noise in the spread; say how busy it was
            meta = {"seconds": round(took, 1), "load_before": before, "load_after": _load(), **source}
            results.append((report, meta))
    out_dir.mkdir(parents=True, exist_ok=True)
    data = merge(_previous(out_dir / JSON_NAME), machine, results, quick=quick, command=command)
    from benchmarks.plots import write_plots

    for name, paths in write_plots(data, out_dir).items():
        data["benchmarks"][name]["plots"] = paths
    (out_dir / JSON_NAME).write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    (out_dir / MARKDOWN_NAME).write_text(render_markdown(data))
    return data


def revision() -> dict[str, Any]:
    """The source revision measured: git commit and whether the working tree had uncommitted changes."""
    import subprocess

    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            # --no-optional-locks: reading the status must not rewrite the index under a concurrent git
            out = subprocess.run(
                ["git", "--no-optional-locks", *args], cwd=repo, capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def _load() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _previous(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("schema") == SCHEMA else None


def merge(
    old: dict[str, Any] | None,
    machine: dict[str, Any],
    results: Sequence[tuple[Report, dict[str, Any]]],
    *,
    quick: bool,
    command: str,
) -> dict[str, Any]:
    """New results, plus the other benchmarks of a previous run on the same machine and configuration."""
    config = "quick" if quick else "full"
    keep = (
        old is not None
        and old.get("configuration") == config
        and all(old.get("machine", {}).get(k) == machine.get(k) for k in _SAME_MACHINE)
    )
    benchmarks: dict[str, Any] = dict(old["benchmarks"]) if keep and old else {}
    figures: dict[str, Any] = dict(old["figures"]) if keep and old else {}
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    for rep, meta in results:
        for key in benchmarks.get(rep.name, {}).get("figures", []):
            figures.pop(key, None)
        benchmarks[rep.name] = {
            "title": rep.title,
            "measured_at": now,
            **meta,
            "method": rep.method,
            "figures": [f.key for f in rep.figures],
            "tables": [asdict(t) for t in rep.tables],
            "notes": list(rep.notes),
        }
        figures.update({f.key: {"benchmark": rep.name, **f.to_dict()} for f in rep.figures})
    from benchmarks import BENCHMARKS

    order = {name: i for i, name in enumerate(BENCHMARKS)}
    return {
        "schema": SCHEMA,
        "generated": now,
        "command": command,
        "configuration": config,
        "machine": machine,
        "benchmarks": dict(sorted(benchmarks.items(), key=lambda kv: order.get(kv[0], len(order)))),
        "figures": figures,
    }


# --- Markdown ----------------------------------------------------------------------------------


def _fmt(x: Any) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return "—" if x is None else str(x)
    if isinstance(x, int):
        return f"{x:,}"
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    return f"{x:.1f}" if a >= 100 else f"{x:.2f}" if a >= 10 else f"{x:.3f}"


def _md_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(_fmt(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


def _value_cells(fig: Mapping[str, Any]) -> tuple[str, str, str, str]:
    """(goal, median, min–max (n), result) for a figure dict."""
    unit = f" {fig['unit']}" if fig["unit"] else ""
    goal = Goal(fig["goal"]["op"], fig["goal"]["target"]).text(fig["unit"]) if fig["goal"] else "—"
    if fig["skipped"] or fig["value"] is None:
        return goal, "—", "—", f"skipped: {fig['skipped']}"
    v = fig["value"]
    result = "—" if fig["passed"] is None else "**pass**" if fig["passed"] else "**miss**"
    return goal, f"{_fmt(v['median'])}{unit}", f"{_fmt(v['low'])}–{_fmt(v['high'])} (n={v['n']})", result


def _figure_rows(figs: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = []
    for f in figs:
        goal, median, spread, result = _value_cells(f)
        base = f["baseline"]
        subj = f["subject"]
        b = f"{_fmt(base['spread']['median'])} {base['unit']}" if base else "—"
        s = f"{_fmt(subj['spread']['median'])} {subj['unit']}" if subj else "—"
        rows.append((f["label"], b, s, median, spread, goal, result))
    cols = ("case", "baseline (median)", "subject (median)", "measured", "min–max", "goal", "result")
    return _md_table(cols, rows)


def _provenance(name: str, bench: Mapping[str, Any]) -> str:
    text = f"`{name}`, measured {bench['measured_at']}"
    if bench.get("seconds") is not None:
        text += f" in {_fmt(bench['seconds'])} s"
    if bench.get("commit"):
        text += f" at {bench['commit'][:12]}" + (" with uncommitted changes" if bench.get("dirty") else "")
    if bench.get("load_before") and bench.get("load_after"):
        text += f"; 1-minute load average {bench['load_before'][0]} before, {bench['load_after'][0]} after"
    return text + "."


def render_markdown(data: Mapping[str, Any]) -> str:
    """``BENCHMARKS.md`` from the JSON results: machine, summary, then each benchmark with its method."""
    figures: Mapping[str, Any] = data["figures"]
    lines = [
        "# Benchmarks",
        "",
        f"Last written by `{data['command']}` ({data['configuration']} configuration) on {data['generated']}. "
        "Every figure is a ratio or a difference against a baseline measured in the same run on the same "
        "machine, as the median over repeated runs with its min–max; `benchmarks.json` holds every value. "
        "Timings are this machine's, not a device's.",
        "",
        "## Machine",
        "",
        *_md_table(("property", "value"), [(k, v) for k, v in data["machine"].items()]),
        "",
        "## Summary",
        "",
    ]
    summary = []
    for bench in data["benchmarks"].values():  # the registry's order, whatever order the runs came in
        for f in (figures[k] for k in bench["figures"] if k in figures):
            goal, median, spread, result = _value_cells(f)
            summary.append((f"{bench['title']}: {f['label']}", goal, median, spread, result))
    lines += [*_md_table(("figure", "goal", "measured", "min–max", "result"), summary), ""]
    for name, bench in data["benchmarks"].items():
        lines += [f"## {bench['title']}", "", _provenance(name, bench), ""]
        if bench["figures"]:
            lines += [*_figure_rows([figures[k] for k in bench["figures"] if k in figures]), ""]
        lines += [f"![{bench['title']}]({path})\n" for path in bench.get("plots", [])]
        for table in bench["tables"]:
            lines += [f"**{table['title']}**", "", *_md_table(table["columns"], table["rows"]), ""]
        if bench["notes"]:
            lines += [*(f"- {note}" for note in bench["notes"]), ""]
        lines += [f"*Method.* {bench['method']}", ""]
    return "\n".join(lines).rstrip() + "\n"
