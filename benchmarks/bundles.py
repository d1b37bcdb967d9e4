"""The models the benchmarks serve, built once per run through the toolchain, and the service configs for them.

Three points on the curve of overhead against model cost: the digits CNN (INT8, ~0.03 ms per
inference: fixed per-item costs dominate), a mid-size CNN at 224×224 (FP32, milliseconds) and the
PP-OCRv4 text detector at 640×640 (FP32, ~100 ms; from ``rapidocr-onnxruntime``). Each is a signed
bundle built for this host's profile and also extracted, so bare-onnxruntime baselines load the very
``model.onnx`` the service runs. The quick (smoke) configuration uses smaller inputs and less training.
"""

from __future__ import annotations

import importlib.util
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import Context, Skipped

__all__ = [
    "BuiltBundle",
    "digits",
    "host_profile",
    "mid_cnn",
    "mid_cnn_module",
    "ppocr_det",
    "ppocr_model",
    "service_config",
    "text_image",
    "variant",
]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BuiltBundle:
    """A bundle the service loads, the model file the baselines load, and an input image for both."""

    key: str  # the figure's case key
    label: str
    path: Path  # the signed bundle (.tar)
    public_key: Path
    model_file: Path  # the bundle's model.onnx, extracted
    image: np.ndarray  # a decoded image, as a source hands it to the service
    input_shape: tuple[int, ...]
    precision: str
    profile: str
    report: dict[str, Any] = field(default_factory=dict)  # the toolchain's build report (validation, size)

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts for a figure's ``config``."""
        return {
            "model": self.key,
            "input_shape": list(self.input_shape),
            "precision": self.precision,
            "profile": self.profile,
            "model_bytes": self.model_file.stat().st_size,
            "image_shape": list(self.image.shape),
        }


def host_profile() -> str:
    """The shipped device profile for the machine the benchmarks run on."""
    return "x86-64" if platform.machine() in ("x86_64", "AMD64") else "generic-arm64"


def _keys(ctx: Context) -> tuple[Path, Path]:
    from runtime.signing import generate_keypair

    pair: tuple[Path, Path] = ctx.once("keys", lambda: generate_keypair(ctx.work / "keys", "bench"))
    return pair


def _build(ctx: Context, key: str, label: str, image: np.ndarray, tag: str = "", **request: Any) -> BuiltBundle:
    """Build, sign and extract one bundle; ``tag`` keeps variants of one model apart on disk."""
    from runtime.bundle import open_bundle
    from runtime.profile import load_profile
    from runtime.signing import load_public_key
    from toolchain.pipeline import BuildRequest, build

    private, public = _keys(ctx)
    profile = host_profile()
    res = build(
        BuildRequest(
            profile=load_profile(profile),
            output_dir=ctx.work / "dist" / (tag or key),
            key=private,
            name=key,
            bench_iterations=0,
            enforce_gate=False,  # the benchmarks measure speed and memory, not accuracy
            search=False,  # the profile's plain recipe: the accuracy search is measured by its own test
            **request,
        )
    )
    assert res.bundle is not None
    extracted = open_bundle(
        res.bundle, trusted_keys=[load_public_key(public)], dest=ctx.work / "extracted" / (tag or key)
    )
    shape = tuple(int(d) for d in extracted.manifest.inputs[0].shape)
    return BuiltBundle(
        key=key,
        label=label.format(shape="×".join(map(str, shape)), precision=res.report["precision"].upper()),
        path=res.bundle,
        public_key=public,
        model_file=extracted.model_path,
        image=np.ascontiguousarray(image),
        input_shape=shape,
        precision=res.report["precision"],
        profile=profile,
        report=res.report,
    )


def text_image(size: int, seed: int = 0) -> np.ndarray:
    """A decoded BGR image with lines of printed text (what a text detector is for), ``size``×``size``.

    ``seed`` 0 is the benchmarks' fixed input; other seeds vary the words, fonts and placement.
    """
    import cv2

    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 255, np.uint8)
    scale = size / 640
    for i in range(12):
        y = int((40 + i * 50) * scale)
        text = f"edgefleet line {i}: 0123456789" if seed == 0 else f"{rng.integers(10**6)} sample {seed}-{i} text"
        font = 0 if seed == 0 else int(rng.choice([0, 2, 3, 4]))
        x = int((20 if seed == 0 else rng.integers(5, 120)) * scale)
        cv2.putText(img, text, (x, y), font, 1.1 * scale, (20, 20, 20), 2)
    return img


def digits(ctx: Context) -> BuiltBundle:
    """The digits CNN trained on scikit-learn's digits and quantized to INT8 with real calibration images."""
    return ctx.once("bundle:digits", lambda: variant(ctx, "digits", "static", None))


def _digits_request(ctx: Context) -> tuple[np.ndarray, dict[str, Any]]:
    """(an input image, the build request's model fields) for the digits CNN, trained once per run."""

    def make() -> tuple[np.ndarray, dict[str, Any]]:
        import torch

        from toolchain.examples import digits_split, train_digits_cnn, write_digit_images

        split = digits_split()
        model, _ = train_digits_cnn(split, epochs=ctx.pick(30, 3))
        weights = ctx.work / "digits.pt"
        torch.save(model.state_dict(), weights)
        n_cal, n_val = ctx.pick(200, 32), ctx.pick(360, 32)
        root = ctx.work / "digits"
        calib = write_digit_images(split.train_images[:n_cal], split.train_labels[:n_cal], root / "calib")
        val = write_digit_images(split.test_images[:n_val], split.test_labels[:n_val], root / "val")
        request = {
            "model": "toolchain.examples:digits_cnn",
            "weights": weights,
            "input_shapes": ((1, 1, 8, 8),),
            "calibration": str(calib),
            "validation": str(val),
        }
        return split.test_images[0], request

    made: tuple[np.ndarray, dict[str, Any]] = ctx.once("inputs:digits", make)
    return made


def _ppocr_request(ctx: Context) -> tuple[np.ndarray, dict[str, Any]]:
    """(a text image, the build request's model fields) for PP-OCRv4 det: text images to calibrate and validate."""
    from runtime.manifest import Preprocess

    source = ppocr_model()
    size = ctx.pick(640, 160)

    def make() -> tuple[np.ndarray, dict[str, Any]]:
        import cv2

        root = ctx.work / "ppocr"
        for kind, count, offset in (("calib", ctx.pick(8, 2), 0), ("val", ctx.pick(4, 1), 100)):
            (root / kind).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                cv2.imwrite(str(root / kind / f"text{i}.png"), text_image(size, seed=offset + i))
        request = {
            "model": str(source),
            "input_shapes": ((1, 3, size, size),),
            "calibration": str(root / "calib"),
            "validation": str(root / "val"),
            "preprocess": Preprocess(kind="image", color="bgr", mean=_IMAGENET_MEAN, std=_IMAGENET_STD),
        }
        return text_image(size), request

    made: tuple[np.ndarray, dict[str, Any]] = ctx.once("inputs:ppocr_det", make)
    return made


_LABELS = {"digits": "digits CNN {precision} {shape}", "ppocr_det": "PP-OCRv4 det {precision} {shape}"}


def variant(ctx: Context, model: str, quantize: str, activation_type: str | None) -> BuiltBundle:
    """``model`` ("digits" or "ppocr_det") built with the toolchain as ``quantize`` (static/fp16/none), once per run.

    ``activation_type`` "int8" is S8S8, "uint8" U8S8, None the host profile's choice.
    """
    key = f"{model}-{quantize}-{activation_type or 'profile'}"

    def make() -> BuiltBundle:
        image, request = _digits_request(ctx) if model == "digits" else _ppocr_request(ctx)
        if quantize == "none":
            request = {k: v for k, v in request.items() if k != "calibration"}
        return _build(
            ctx, model, _LABELS[model], image, tag=key, quantize=quantize, activation_type=activation_type, **request
        )

    return ctx.once(f"bundle:{key}", make)


def mid_cnn_module() -> Any:
    """A mid-size image classifier (5 conv blocks, ~0.2 GMAC at 224×224): the middle of the overhead curve."""
    import torch
    from torch import nn

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layers = [*block(3, 32), *block(32, 64), *block(64, 128), *block(128, 256), *block(256, 256)]
        module = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 1000))
    return module.eval()


def mid_cnn(ctx: Context) -> BuiltBundle:
    """:func:`mid_cnn_module` exported and bundled in FP32 for this host."""
    size = ctx.pick(224, 64)

    def make() -> BuiltBundle:
        return _build(
            ctx,
            "mid_cnn",
            "mid-size CNN {precision} {shape}",
            text_image(size),
            model="benchmarks.bundles:mid_cnn_module",
            input_shapes=((1, 3, size, size),),
            quantize="none",
        )

    return ctx.once("bundle:mid_cnn", make)


def ppocr_model() -> Path:
    """The PP-OCRv4 detector shipped in ``rapidocr-onnxruntime``; :class:`Skipped` when it is not installed."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise Skipped("rapidocr-onnxruntime is not installed (pip install --no-deps rapidocr-onnxruntime)")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "ch_PP-OCRv4_det_infer.onnx"
    if not path.is_file():
        raise Skipped(f"{path} is missing from the rapidocr-onnxruntime install")
    return path


def ppocr_det(ctx: Context) -> BuiltBundle:
    """PP-OCRv4 det (FP32, static 1×3×640×640) bundled for this host, with a text image to detect."""
    return ctx.once("bundle:ppocr_det", lambda: variant(ctx, "ppocr_det", "none", None))


def service_config(
    folder: Path,
    bundle: BuiltBundle,
    *,
    state_dir: Path,
    cache_dir: Path | None = None,
    logbook_path: Path | None = None,
    http: bool = False,
    http_port: int = 0,
    mqtt: tuple[str, int] | None = None,
    threads: int = 0,
    extra: tuple[str, ...] = (),
) -> Path:
    """Write a `serve` config for ``bundle``: no source, HTTP off or on port 0, default logbook flushing.

    ``http_port`` > 0 fixes the endpoint's port and lifts its rate limit (the benchmark is the only
    client); ``mqtt`` (host, port) turns sync and the command channel on; ``threads`` > 0 requests that many
    inference threads from the thread plan; ``extra`` lines are appended (more TOML sections).
    """
    folder.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"bundle = {json.dumps(str(bundle.path))}",
        f"trusted_keys = [{json.dumps(str(bundle.public_key))}]",
        f"state_dir = {json.dumps(str(state_dir))}",
        'device_id = "bench"',
        'fleet = "bench"',
    ]
    if cache_dir is not None:
        lines.append(f"cache_dir = {json.dumps(str(cache_dir))}")
    lines += ["[http]", f"enabled = {'true' if http else 'false'}", f"port = {http_port}"]
    if http_port:
        lines += ["rate_limit_per_s = 100000.0", "burst = 100000"]
    if logbook_path is not None:
        lines += ["[logbook]", f"path = {json.dumps(str(logbook_path))}"]
    if mqtt is not None:
        lines += ["[mqtt]", "enabled = true", f"host = {json.dumps(mqtt[0])}", f"port = {mqtt[1]}"]
    if threads:
        lines += ["[threads]", f"inference = {threads}"]
    lines += list(extra)
    path = folder / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path
