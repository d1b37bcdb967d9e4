"""The benchmarks cannot rot: `python -m benchmarks --quick` writes every figure, and the harness's arithmetic holds."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import BENCHMARKS as REGISTRY
from benchmarks.harness import Figure, Goal, Measure, Report, Spread, Table, alternate, merge, ratios, render_markdown
from tests.conftest import REPO

_COMPRESSION = {
    f"compression.{model}_{variant}_{what}"
    for model in ("digits", "ppocr_det")
    for variant in ("s8s8", "u8s8", "fp16")
    for what in ("size", "latency", "agreement")
}
FIGURES = {
    *(f"serve_overhead.{m}{s}" for m in ("digits", "mid_cnn", "ppocr_det") for s in ("", "_image")),
    *_COMPRESSION,
    "threads.k1",
    "threads.k2",
    "logbook.default",
    "logbook.synchronous_full",
    "logbook.durable",
    "logbook.durable_full",
    "sync.plain",
    "sync.compressed",
    "cold_start.digits_warm_cache",
    "cold_start.digits_empty_cache",
    "cold_start.ppocr_det_warm_cache",
    "cold_start.ppocr_det_empty_cache",
    "memory.idle_existing_logbook",
    "memory.idle_fresh_logbook",
    "memory.loaded_existing_logbook",
    "fleet_scale.ack_p95_n4",
    "fleet_scale.ingest_n4",
}
MINE = [  # the benchmarks whose figures this file knows; others in the registry are checked generically
    "serve_overhead",
    "compression",
    "threads",
    "logbook",
    "sync",
    "cold_start",
    "memory",
    "fleet_scale",
    "emulation",
]
PLOTS = ("threads.png", "fleet_scale.png", "compression.png")
MACHINE = ("cpu_model", "logical_cores", "python", "onnxruntime", "numpy", "kernel")


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    return []


def _check_spread(spread: dict[str, Any] | None, what: str) -> None:
    if spread is None:  # figures without a baseline/subject pair (agreement) have no measures
        return
    assert spread["n"] >= 1 and len(spread["values"]) == spread["n"], what
    assert all(math.isfinite(x) for x in (spread["median"], spread["low"], spread["high"], *spread["values"])), what
    assert spread["low"] <= spread["median"] <= spread["high"], what


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench")
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "-o", str(out)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert "wrote" in res.stdout
    return out, json.loads((out / "benchmarks.json").read_text()), (out / "BENCHMARKS.md").read_text()


def test_quick_run_writes_every_figure_with_finite_numbers(quick_run):
    _, data, markdown = quick_run
    assert data["configuration"] == "quick"
    assert list(data["benchmarks"]) == list(REGISTRY)  # every registered benchmark ran, in order
    assert set(MINE) <= set(REGISTRY)
    assert {k for k in data["figures"] if k.split(".")[0] in MINE} == FIGURES
    for name in set(REGISTRY) - set(MINE) - {"emulation"}:  # e.g. updates: at least one figure of its own
        assert any(k.startswith(f"{name}.") for k in data["figures"]), name
    for key, fig in data["figures"].items():
        assert fig["label"] in markdown, key
        if fig["skipped"]:
            # only the optional PP-OCRv4 model may be missing, and never in CI
            assert "ppocr_det" in key and importlib.util.find_spec("rapidocr_onnxruntime") is None
            assert os.environ.get("CI") != "true", fig["skipped"]
            continue
        _check_spread(fig["value"], key)
        _check_spread(fig["baseline"] and fig["baseline"]["spread"], key)
        _check_spread(fig["subject"] and fig["subject"]["spread"], key)
        if fig["goal"] is not None:
            assert fig["passed"] == Goal(fig["goal"]["op"], fig["goal"]["target"]).met(fig["value"]["median"])
        if fig["kind"] == "ratio":
            assert fig["value"]["low"] > 0, key  # a ratio of rates, sizes or times is positive
    assert all(math.isfinite(x) for x in _numbers(data))


def test_figures_are_what_they_claim(quick_run):
    _, data, _ = quick_run
    figs = data["figures"]
    for key in ("serve_overhead.digits", "serve_overhead.mid_cnn"):
        fig = figs[key]
        assert fig["kind"] == "ratio" and fig["goal"] == {"op": ">=", "target": 0.95}
        assert fig["baseline"]["unit"] == fig["subject"]["unit"] == "inferences/s"
        median_ratio = fig["subject"]["spread"]["median"] / fig["baseline"]["spread"]["median"]
        assert fig["value"]["low"] * 0.5 <= median_ratio <= fig["value"]["high"] * 2  # per-repeat pairs, same scale
        assert fig["config"]["intra_op_threads"] >= 1 and fig["config"]["items_per_run"] >= 1
        assert fig["config"]["input"] == "tensor"
        image = figs[f"{key}_image"]
        assert image["goal"] is None and image["config"]["input"] == "image"
        assert image["baseline"] == fig["baseline"]  # one bare loop, timed alongside both subjects
    for key in ("memory.idle_existing_logbook", "memory.idle_fresh_logbook"):
        fig = figs[key]
        assert fig["kind"] == "difference" and fig["unit"] == "MiB" and fig["goal"]["op"] == "<="
        assert fig["subject"]["spread"]["median"] > 0 and fig["baseline"]["spread"]["median"] > 0
        assert fig["config"]["serve_modules"] > fig["config"]["bare_modules"]
    tables = {t["title"] for b in data["benchmarks"].values() for t in b["tables"]}
    assert any("where a served item's time goes" in t and "digits" in t for t in tables)
    assert any(t.startswith("Attribution") for t in tables)


def test_subjects_did_the_work_they_are_timed_for(quick_run):
    _, data, _ = quick_run
    figs = data["figures"]
    sync = figs["serve_overhead.digits"]["config"]["sync"]  # sync really ran beside the serve loop
    assert sync["records_acked"] > 0 and sync["pending_after_drain"] == 0 and sync["connected"]
    for k in ("k1", "k2"):
        cfg = figs[f"threads.{k}"]["config"]
        assert cfg["plan"]["intra_op_threads"] >= 1 and cfg["records_synced"] > 0
        assert set(cfg["p95_ms"]) == {"plan", "defaults"}
    assert figs["logbook.durable"]["config"]["durable"] is True
    assert figs["logbook.default"]["config"]["records_per_run"] >= 20
    for case in ("plain", "compressed"):
        assert figs[f"sync.{case}"]["config"]["batches"] >= 1
    assert figs["sync.compressed"]["config"]["mean_batch_bytes"] < figs["sync.plain"]["config"]["mean_batch_bytes"]
    size = figs["compression.digits_s8s8_size"]["value"]["median"]
    assert 0 < size < 1  # INT8 weights are smaller than FP32 ones
    assert 0 <= figs["compression.digits_fp16_agreement"]["value"]["median"] <= 1
    for key in ("fleet_scale.ack_p95_n4", "fleet_scale.ingest_n4"):
        cfg = figs[key]["config"]
        assert cfg["online"] == cfg["n"] == 4 and min(cfg["answered"]) == 4 and cfg["stored"] == cfg["records"]


def test_plots_are_written_and_linked_and_emulation_shows_no_timings(quick_run):
    out, data, markdown = quick_run
    for name in PLOTS:
        png = out / "benchmarks" / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"(benchmarks/plots/{name})" in markdown
    emulation = data["benchmarks"]["emulation"]
    assert emulation["figures"] == []  # correctness only: nothing measured under qemu is reported
    listed = {row[0] for row in emulation["tables"][0]["rows"]}
    assert "tests/arm64/test_parity.py" in listed
    assert "not device timings" in markdown


def test_markdown_has_the_machine_and_a_method_for_each_benchmark(quick_run):
    _, data, markdown = quick_run
    for key in MACHINE:
        assert data["machine"][key], key
        assert f"| {key} |" in markdown
    for bench in data["benchmarks"].values():
        assert bench["seconds"] >= 0 and "commit" in bench and "dirty" in bench
        assert f"## {bench['title']}" in markdown
        assert bench["method"] and f"*Method.* {bench['method']}" in markdown
    assert "| figure | goal | measured | min–max | result |" in markdown


# --- the harness's arithmetic, without processes -------------------------------------------------


def test_alternate_rotates_the_order_and_pairs_by_repeat():
    calls: list[str] = []

    def make(name: str, value: float):
        return lambda: calls.append(name) or value

    out = alternate({"a": make("a", 2.0), "b": make("b", 1.0)}, 4)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert out == {"a": [2.0] * 4, "b": [1.0] * 4}
    assert ratios(out["b"], out["a"]) == [0.5] * 4


def test_spread_is_median_and_min_max_and_refuses_non_finite():
    s = Spread.of([3.0, 1.0, 2.0, 10.0])
    assert (s.median, s.low, s.high, s.n) == (2.5, 1.0, 10.0, 4)
    with pytest.raises(ValueError, match="finite"):
        Spread.of([1.0, float("nan")])
    with pytest.raises(ValueError, match="finite"):
        Spread.of([])


def _report(name: str, value: float) -> Report:
    spread = Spread.of([value, value + 0.01])
    fig = Figure(
        f"{name}.case",
        f"{name} case",
        "ratio",
        "",
        spread,
        Goal(">=", 0.95),
        Measure("base", "x/s", spread),
        Measure("subject", "x/s", spread),
    )
    return Report(name, name.title(), "method text", (fig,), (Table("t", ("a", "b"), (("row", 1.5),)),))


def test_rerunning_one_benchmark_keeps_the_others_only_on_the_same_machine():
    machine = {"cpu_model": "cpu", "logical_cores": 2, "python": "3", "onnxruntime": "1", "numpy": "2", "kernel": "k"}
    meta = {"seconds": 1.0, "load_before": [0.1, 0.1, 0.1], "load_after": [0.2, 0.2, 0.2]}
    first = merge(None, machine, [(_report("memory", 0.5), meta)], quick=False, command="c")
    both = merge(first, machine, [(_report("serve_overhead", 0.97), meta)], quick=False, command="c")
    assert list(both["benchmarks"]) == ["serve_overhead", "memory"]  # the registry's order
    assert set(both["figures"]) == {"memory.case", "serve_overhead.case"}
    assert both["figures"]["serve_overhead.case"]["passed"] is True
    assert both["figures"]["memory.case"]["passed"] is False
    moved = {**machine, "cpu_model": "other"}
    elsewhere = merge(first, moved, [(_report("serve_overhead", 1.0), meta)], quick=False, command="c")
    assert set(elsewhere["figures"]) == {"serve_overhead.case"}
    quick = merge(first, machine, [(_report("serve_overhead", 1.0), meta)], quick=True, command="c")
    assert set(quick["figures"]) == {"serve_overhead.case"}
    md = render_markdown(both)
    assert "**pass**" in md and "**miss**" in md and "| row | 1.500 |" in md and "*Method.* method text" in md
