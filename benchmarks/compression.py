"""Figure 2: what compression buys — INT8 (S8S8, U8S8) and FP16 against FP32: size, host latency, agreement."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import bundles
from benchmarks.harness import Context, Figure, Measure, Report, Skipped, Spread, Table, alternate, ratios, timed

__all__ = ["MODELS", "NAME", "TITLE", "VARIANTS", "run"]

NAME = "compression"
TITLE = "Compression"
MODELS = ("digits", "ppocr_det")
#: (case, toolchain --quantize, --activation-type, label)
VARIANTS: tuple[tuple[str, str, str | None, str], ...] = (
    ("s8s8", "static", "int8", "INT8 S8S8"),
    ("u8s8", "static", "uint8", "INT8 U8S8"),
    ("fp16", "fp16", None, "FP16"),
)

METHOD = (
    "Each model is built by the toolchain (`toolchain.pipeline.build`, this host's profile, gate not "
    "enforced) four times from the same source: FP32 (`--quantize none`), static INT8 QDQ with signed "
    "activations (S8S8, `--activation-type int8`) and with unsigned activations (U8S8, `uint8`), both "
    "calibrated on the same images (digits: {digits_cal} training images; PP-OCRv4 det: {ocr_cal} text "
    "images), and FP16 (`--quantize fp16`, float32 inputs and outputs kept). **Size** is the bundle's "
    "`model.onnx` bytes ÷ the FP32 model's. **Latency** is the time of N back-to-back `InferenceSession.run` "
    "calls on the same preprocessed input with the runtime's thread count and spinning policy, variant ÷ "
    "FP32, the two loops run alternately over {repeats} repeats (median and min–max of the per-repeat "
    "ratio); host latency on {arch}, not a device's. **Agreement** is the toolchain's validation against "
    "the FP32 reference on held-out inputs: top-1 agreement for the digits classifier ({digits_val} "
    "test images), mean IoU of the thresholded text maps for PP-OCRv4 det ({ocr_val} text images); the "
    "digits table also gives top-1 accuracy on the labels. Main's toolchain as it is at this commit: a "
    "better PP-OCR quantization recipe will change these numbers."
)


def _threads() -> int:
    from runtime.cpu import plan_threads, read_topology

    return plan_threads(read_topology()).intra_op_threads


def _session(model_file: Path, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the runtime's engine
    return ort.InferenceSession(str(model_file), sess_options=so, providers=["CPUExecutionProvider"])


def _feeds(built: bundles.BuiltBundle) -> dict[str, np.ndarray]:
    from runtime.engine import EngineOptions
    from runtime.model import load_model
    from runtime.signing import load_public_key

    model = load_model(built.path, trusted_keys=[load_public_key(built.public_key)], options=EngineOptions())
    try:
        feeds: dict[str, np.ndarray] = model.tensor_from_image(built.image)
        return feeds
    finally:
        model.close()


def _latency(
    ctx: Context, fp32: Path, cand: Path, feeds: dict[str, np.ndarray], repeats: int
) -> dict[str, list[float]]:
    """Per-repeat seconds per inference of the FP32 and the candidate session."""
    threads = _threads()
    sessions = {"fp32": _session(fp32, threads), "cand": _session(cand, threads)}
    calls = {}
    for k, sess in sessions.items():
        sess.run(None, feeds)
        per = timed(functools.partial(sess.run, None, feeds), 3) / 3
        calls[k] = int(min(max(ctx.pick(0.3, 0.02) / max(per, 1e-7), 2), 200_000))
    secs = alternate(
        {k: functools.partial(timed, functools.partial(s.run, None, feeds), calls[k]) for k, s in sessions.items()},
        repeats,
    )
    return {k: [t / calls[k] for t in v] for k, v in secs.items()}


def _figures(ctx: Context, model: str, repeats: int) -> tuple[list[Figure], list[tuple[Any, ...]]]:
    fp32 = bundles.variant(ctx, model, "none", None)
    feeds = _feeds(fp32)
    ref_bytes = fp32.model_file.stat().st_size
    figures: list[Figure] = []
    rows: list[tuple[Any, ...]] = []
    for case, quantize, activation, label in VARIANTS:
        cand = bundles.variant(ctx, model, quantize, activation)
        lat = _latency(ctx, fp32.model_file, cand.model_file, feeds, repeats)
        val = cand.report.get("validation", {})
        size = cand.model_file.stat().st_size / ref_bytes
        name = f"{fp32.label.split(' FP32')[0]} {label}"
        config = {**cand.describe(), "reference_bytes": ref_bytes, "validation": val, "repeats": repeats}
        ms = {k: Spread.of([1000 * t for t in v]) for k, v in lat.items()}
        figures += [
            Figure(
                f"{NAME}.{model}_{case}_size",
                f"{name}: size ÷ FP32 (< 1: smaller)",
                "ratio",
                "",
                Spread.of([size]),
                baseline=Measure("FP32 model.onnx", "bytes", Spread.of([ref_bytes])),
                subject=Measure(f"{label} model.onnx", "bytes", Spread.of([cand.model_file.stat().st_size])),
                config=config,
            ),
            Figure(
                f"{NAME}.{model}_{case}_latency",
                f"{name}: host latency ÷ FP32 (< 1: faster)",
                "ratio",
                "",
                Spread.of(ratios(lat["cand"], lat["fp32"])),
                baseline=Measure("FP32 InferenceSession.run", "ms", ms["fp32"]),
                subject=Measure(f"{label} InferenceSession.run", "ms", ms["cand"]),
                config=config,
            ),
            Figure(
                f"{NAME}.{model}_{case}_agreement",
                f"{name}: agreement with FP32 (1: identical)",
                "ratio",
                "",
                Spread.of([float(val.get("agreement", 0.0))]),
                config=config,
            ),
        ]
        rows.append(
            (
                name,
                cand.precision,
                size,
                ms["fp32"].median,
                ms["cand"].median,
                ms["cand"].median / ms["fp32"].median,
                val.get("agreement"),
                val.get("cosine_mean"),
                val.get("reference_accuracy"),
                val.get("candidate_accuracy"),
            )
        )
    return figures, rows


def _same_loss(figures: list[Figure]) -> list[str]:
    """A note where S8S8 and U8S8 lose the same agreement: the activation type is not what costs accuracy."""
    value = {f.key: f.value.median for f in figures if f.value is not None}
    out = []
    for model in MODELS:
        s8, u8 = value.get(f"{NAME}.{model}_s8s8_agreement"), value.get(f"{NAME}.{model}_u8s8_agreement")
        if s8 is not None and u8 is not None and s8 < 0.99 and abs(s8 - u8) < 0.01:
            out.append(
                f"{model}: S8S8 and U8S8 reach the same agreement ({s8:.4f} vs {u8:.4f}), so the loss comes from "
                "the quantization recipe (which nodes are quantized, calibration), not from the activation type."
            )
    return out


def run(ctx: Context) -> Report:
    """Build every variant of every model and compare it with its FP32 build."""
    repeats = ctx.pick(9, 2)
    figures: list[Figure] = []
    rows: list[tuple[Any, ...]] = []
    notes: list[str] = []
    for model in MODELS:
        try:
            figs, more = _figures(ctx, model, repeats)
        except Skipped as exc:
            notes.append(f"{model}: skipped, {exc}.")
            for case, _, _, _ in VARIANTS:
                for what in ("size", "latency", "agreement"):
                    figures.append(
                        Figure(
                            f"{NAME}.{model}_{case}_{what}",
                            f"{model} {case} {what}",
                            "ratio",
                            "",
                            None,
                            skipped=str(exc),
                        )
                    )
            continue
        figures += figs
        rows += more
    table = Table(
        "Size, host latency and agreement against FP32 (medians)",
        (
            "variant",
            "precision",
            "size ÷ FP32",
            "FP32 ms",
            "variant ms",
            "latency ÷ FP32",
            "agreement",
            "cosine (mean)",
            "FP32 top-1 %",
            "variant top-1 %",
        ),
        tuple(rows),
    )
    notes += _same_loss(figures)
    for row in rows:
        notes.append(f"{row[0]}: {row[2]:.2f}× the FP32 bytes, {row[5]:.2f}× its host latency, agreement {row[6]:.3f}.")
    import platform

    method = METHOD.format(
        digits_cal=ctx.pick(200, 32),
        ocr_cal=ctx.pick(8, 2),
        digits_val=ctx.pick(360, 32),
        ocr_val=ctx.pick(4, 1),
        repeats=repeats,
        arch=platform.machine(),
    )
    return Report(NAME, TITLE, method, tuple(figures), (table,), tuple(notes))
