"""`toolchain demo`: the main job end to end, offline, on the embedded digits example."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from runtime.profile import load_profile
from toolchain.errors import ToolchainError
from toolchain.examples import digits_split, train_digits_cnn, write_digit_images

__all__ = ["run_demo", "run_on_device"]


def run_demo(out: Path, *, profile: str = "rpi4", json_out: bool = False, quiet: bool = False) -> int:
    """Train the digits CNN, write real image folders, build a signed bundle for ``profile``, show the report."""
    import torch

    from runtime.signing import generate_keypair
    from toolchain import report
    from toolchain.pipeline import BuildRequest, build
    from toolchain.progress import NullProgress, RichProgress

    progress = NullProgress() if quiet or json_out else RichProgress()
    prof = load_profile(profile)
    out.mkdir(parents=True, exist_ok=True)
    progress.step("training a CNN on scikit-learn's handwritten digits (1,437 train / 360 held-out)")
    split = digits_split()
    model, acc = train_digits_cnn(split)
    weights = out / "digits.pt"
    torch.save(model.state_dict(), weights)
    calib = write_digit_images(split.train_images[:200], split.train_labels[:200], out / "data" / "calib")
    val = write_digit_images(split.test_images, split.test_labels, out / "data" / "val")
    key = out / "keys" / "fleet.key"
    if not key.is_file():
        generate_keypair(key.parent, "fleet")
    req = BuildRequest(
        model="toolchain.examples:digits_cnn",
        weights=weights,
        input_shapes=((1, 1, 8, 8),),
        profile=prof,
        output_dir=out / "dist",
        key=key,
        calibration=str(calib),
        validation=str(val),
        name="digits",
    )
    result = build(req, progress)
    assert result.bundle is not None
    progress.step("running the bundle with edge-runtime serve (offline: SQLite logbook, no broker)")
    pub = key.with_suffix(".pub")
    rows, config, db = run_on_device(out, result.bundle, pub, split.test_images[:10], split.test_labels[:10])
    result.report["demo"] = {
        "torch_test_accuracy": acc,
        "weights": str(weights),
        "public_key": str(pub),
        "config": str(config),
        "logbook": str(db),
        "results": rows,
    }
    if json_out:
        json.dump(result.report, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return 0
    report.print_build(result.report)
    print(f"report: {result.report_path}")
    _print_results(rows)
    print(f"logbook: {db}")
    print("try:")
    print(
        f"  edge-runtime infer --bundle {result.bundle} --trusted-key {pub} --json {out / 'data' / 'val' / '3'}/*.png"
    )
    print(f"  edge-runtime log tail --db {db}")
    print(f"  toolchain verify {result.bundle} --key {pub}")
    return 0


def run_on_device(
    out: Path, bundle: Path, public_key: Path, images: np.ndarray, labels: np.ndarray
) -> tuple[list[dict[str, object]], Path, Path]:
    """Serve ``images`` from a watched folder with the real service, offline; return what it logged."""
    import cv2

    from runtime.logbook import open_readonly

    inbox, state = out / "inbox", out / "state"
    for d in (inbox, state):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    truth = {}
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        name = f"digit-{i:02d}.png"
        cv2.imwrite(str(inbox / name), img)
        truth[name] = int(lab)
    config = out / "config.toml"
    config.write_text(
        f'bundle = "{bundle.resolve()}"\ntrusted_keys = ["{public_key.resolve()}"]\n'
        f'state_dir = "{state.resolve()}"\ndevice_id = "demo-device"\n\n'
        f'[source]\nkind = "directory"\npath = "{inbox.resolve()}"\n\n[http]\nenabled = false\n'
    )
    cmd = [sys.executable, "-m", "runtime", "serve", "--config", str(config), "--max-items", str(len(truth))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise ToolchainError(f"edge-runtime serve failed ({proc.returncode}): {proc.stderr[-2000:]}")
    db = state / "logbook.sqlite"
    rows: list[dict[str, object]] = []
    for rec in sorted(open_readonly(db).tail(len(truth)), key=lambda r: str(r["input_ref"])):
        name = Path(str(rec["input_ref"])).name
        top1 = rec["result"]["top1"]
        rows.append(
            {
                "input": name,
                "true": truth.get(name),
                "top1": top1["label"],
                "score": top1["score"],
                "latency_ms": rec["latency_ms"],
                "seq": rec["seq"],
            }
        )
    return rows, config, db


def _print_results(rows: list[dict[str, object]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="edge-runtime serve results (read back from the SQLite logbook)")
    for col in ("seq", "input", "true", "top-1", "score", "latency"):
        t.add_column(col)
    for r in rows:
        ok = "green" if str(r["true"]) == str(r["top1"]) else "red"
        t.add_row(
            str(r["seq"]),
            str(r["input"]),
            str(r["true"]),
            f"[{ok}]{r['top1']}[/]",
            f"{float(str(r['score'])):.3f}",
            f"{float(str(r['latency_ms'])):.3f} ms",
        )
    con = Console()
    if not con.is_terminal:
        con = Console(width=140)
    con.print(t)
