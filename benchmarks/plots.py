"""PNG plots where a picture reads better than a table (threading curve, fleet scale curve, compression bars).

Drawn from the results (``benchmarks.json``'s data) with matplotlib's Agg backend into
``<output>/benchmarks/plots/``; :func:`write_plots` returns each benchmark's plot paths relative to
the output directory, which ``BENCHMARKS.md`` links. Without matplotlib (it is in the ``dev`` extra)
no plot is drawn and the tables say it all.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["PLOT_DIR", "write_plots"]

log = logging.getLogger(__name__)

PLOT_DIR = Path("benchmarks") / "plots"


def _figs(data: Mapping[str, Any], bench: str) -> list[Mapping[str, Any]]:
    return [f for f in data["figures"].values() if f["benchmark"] == bench and f["value"] is not None]


def _threads(data: Mapping[str, Any], plt: Any, path: Path) -> bool:
    figs = sorted(_figs(data, "threads"), key=lambda f: f["config"]["threads_requested"])
    if not figs:
        return False
    k = [f["config"]["threads_requested"] for f in figs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label, marker in (("subject", "thread plan", "o"), ("baseline", "onnxruntime defaults", "s")):
        a.plot(k, [f[key]["spread"]["median"] for f in figs], marker=marker, label=label)
    for key, label, marker, color in (
        ("plan", "thread plan", "o", "tab:blue"),
        ("defaults", "defaults", "s", "tab:orange"),
    ):
        b.plot(k, [f["config"]["p95_ms"][key] for f in figs], marker=marker, color=color, label=f"{label} p95")
        b.plot(
            k,
            [f["config"]["p50_ms"][key] for f in figs],
            marker=marker,
            color=color,
            linestyle="--",
            label=f"{label} p50",
        )
    a.set(xlabel="inference threads requested", ylabel="inferences/s (median)", title="Throughput", ylim=(0, None))
    b.set(xlabel="inference threads requested", ylabel="ms per inference", title="Latency", ylim=(0, None))
    for ax in (a, b):
        ax.set_xticks(k)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Threading with logbook and sync busy (host timings, not a device's)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def _fleet(data: Mapping[str, Any], plt: Any, path: Path) -> bool:
    tables = data["benchmarks"].get("fleet_scale", {}).get("tables", [])
    if not tables or not tables[0]["rows"]:
        return False
    cols, rows = tables[0]["columns"], tables[0]["rows"]
    n = [r[0] for r in rows]
    p95 = [r[cols.index("ack p95 ms (median)")] for r in rows]
    rate = [r[cols.index("ingest records/s")] for r in rows]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4))
    a.plot(n, p95, marker="o")
    b.plot(n, rate, marker="o", color="tab:green")
    for col, label in (("broker CPU, commands", "Mosquitto"), ("device processes CPU, commands", "simulated devices")):
        c.plot(n, [r[cols.index(col)] for r in rows], marker="o", label=label)
    a.set(xscale="log", yscale="log", xlabel="simulated devices", ylabel="ms", title="Command ack latency p95")
    b.set(xscale="log", xlabel="simulated devices", ylabel="records/s", title="Ingest rate", ylim=(0, None))
    c.set(xscale="log", xlabel="simulated devices", ylabel="cores busy", title="CPU during the commands")
    c.legend()
    for ax in (a, b, c):
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("One Mosquitto on this machine (broker, devices and ingest share its cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def _compression(data: Mapping[str, Any], plt: Any, path: Path) -> bool:
    figs = {f["key"].split(".", 1)[1]: f["value"]["median"] for f in _figs(data, "compression")}
    models = [m for m in ("digits", "ppocr_det") if any(k.startswith(m) for k in figs)]
    if not models:
        return False
    variants = ("s8s8", "u8s8", "fp16")
    titles = {"digits": "digits CNN", "ppocr_det": "PP-OCRv4 det"}
    metrics = (("size", "size ÷ FP32"), ("latency", "host latency ÷ FP32"), ("agreement", "agreement with FP32"))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.5), squeeze=False)
    width = 0.27
    for ax, model in zip(axes[0], models, strict=True):
        for i, (metric, label) in enumerate(metrics):
            values = [figs.get(f"{model}_{v}_{metric}", 0.0) for v in variants]
            bars = ax.bar([x + (i - 1) * width for x in range(len(variants))], values, width, label=label)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(variants)), ["INT8 S8S8", "INT8 U8S8", "FP16"])
        ax.set(title=titles.get(model, model), ylabel="ratio to FP32")
        ax.grid(alpha=0.3, axis="y")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=9)
    fig.suptitle("Compression against FP32 (host latency, not a device's)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=100)
    return True


_PLOTS: dict[str, tuple[str, Callable[[Mapping[str, Any], Any, Path], bool]]] = {
    "threads": ("threads.png", _threads),
    "fleet_scale": ("fleet_scale.png", _fleet),
    "compression": ("compression.png", _compression),
}


def write_plots(data: Mapping[str, Any], out_dir: Path) -> dict[str, list[str]]:
    """Draw the plots the results allow; ``{benchmark: [path relative to out_dir]}``."""
    if importlib.util.find_spec("matplotlib") is None:
        log.warning("matplotlib is not installed (pip install -e '.[dev]'): no plots drawn")
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = out_dir / PLOT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[str]] = {}
    for bench, (name, draw) in _PLOTS.items():
        if bench not in data["benchmarks"]:
            continue
        try:
            if draw(data, plt, folder / name):
                written[bench] = [str(PLOT_DIR / name)]
        finally:
            plt.close("all")
    return written
