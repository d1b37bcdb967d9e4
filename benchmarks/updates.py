"""Model updates: delta ÷ full bundle bytes, the hot-swap pause under load, and time to roll back.

The digits CNN is trained, then changed two ways: only its classifier head retrained (every other
layer frozen) and fully fine-tuned (every layer trained further). All three are built by the
toolchain for rpi4 (INT8 S8S8, the same calibration images) and the deltas from the original to
each are made with :func:`toolchain.delta.diff_bundles` (zstd patch-from), each applied once to check it.
The sizes are exact, so one repeat is the measurement; the spread is the same number.

The same three bundles are then served by an in-process :class:`runtime.service.Service` while a
client thread calls ``Service.infer_item`` back to back: the worst gap between requests while the
service hot-swaps to another version ÷ the median gap without a swap; the time from a failing
canary gate to the first request served by the previous model alone; and the time from a
crash-loop decision at start (``ModelStore.boot`` reverting) to the first inference on the previous
version — both also ÷ one inference's median latency measured in the same run.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import itertools
import json
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import Context, Figure, Goal, Measure, Report, Spread, Table, differences, ratios

__all__ = ["GOAL", "NAME", "ROLLBACK_GOAL_MS", "TITLE", "run"]

NAME = "updates"
TITLE = "Model updates: delta bundles, hot swap, rollback"
GOAL = Goal("<=", 0.2)
ROLLBACK_GOAL_MS = Goal("<=", 1000.0)  # issue 5: a failing gate to the previous model serving, < 1 s on the host
_PROFILE = "rpi4"
_VERSIONS = {"base": "1.0.0", "head": "1.1.0", "full": "2.0.0"}
_CRASH_LIMIT = 3
_WAIT_S = 60.0


@dataclass(frozen=True)
class _Built:
    """The three signed bundles, their torch test accuracies, the key that verifies them, the test images."""

    bundles: dict[str, Path]
    accuracy: dict[str, float]
    public_key: Path
    images: Any  # the digits test split, 8×8 grey uint8, as a source hands them to the service


def _train(model: Any, split: Any, *, head_only: bool, epochs: int, seed: int = 1) -> tuple[Any, float]:
    """A copy of ``model`` trained further: only the last layer (``head_only``) or all of it."""
    import numpy as np
    import torch

    net = copy.deepcopy(model)
    trainable = list(net[-1].parameters()) if head_only else list(net.parameters())
    for p in net.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    torch.manual_seed(seed)
    x = torch.from_numpy(split.train_images.astype(np.float32)[:, None] / 255.0)
    y = torch.from_numpy(split.train_labels)
    opt = torch.optim.Adam(trainable, lr=1e-3)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()  # type: ignore[no-untyped-call]
            opt.step()
    net.eval()
    with torch.no_grad():
        xt = torch.from_numpy(split.test_images.astype(np.float32)[:, None] / 255.0)
        acc = float((net(xt).argmax(1).numpy() == split.test_labels).mean() * 100)
    return net, acc


def _bundles(ctx: Context) -> _Built:
    """The original ("base"), head-retrained ("head") and fully fine-tuned ("full") digits CNN built for rpi4."""
    import torch

    from runtime.profile import load_profile
    from runtime.signing import generate_keypair
    from toolchain.examples import digits_split, train_digits_cnn, write_digit_images
    from toolchain.pipeline import BuildRequest, build

    root = ctx.work / NAME
    split = digits_split()
    base, acc = train_digits_cnn(split, epochs=ctx.pick(30, 3))
    nets = {"base": (base, acc)}
    nets["head"] = _train(base, split, head_only=True, epochs=ctx.pick(10, 1))
    nets["full"] = _train(base, split, head_only=False, epochs=ctx.pick(10, 1))
    private, public = generate_keypair(root / "keys", "bench")
    n_cal = ctx.pick(200, 32)
    calib = write_digit_images(split.train_images[:n_cal], split.train_labels[:n_cal], root / "calib")
    val = write_digit_images(split.test_images[:n_cal], split.test_labels[:n_cal], root / "val")
    paths: dict[str, Path] = {}
    for key, version in _VERSIONS.items():
        weights = root / f"{key}.pt"
        torch.save(nets[key][0].state_dict(), weights)
        res = build(
            BuildRequest(
                model="toolchain.examples:digits_cnn",
                weights=weights,
                input_shapes=((1, 1, 8, 8),),
                profile=load_profile(_PROFILE),
                output_dir=root / key,
                key=private,
                calibration=str(calib),
                validation=str(val),
                name="digits",
                version=version,
                bench_iterations=0,
                enforce_gate=False,  # sizes and timings are measured here, not accuracy
                search=False,  # the plain recipe: one build per version, no accuracy search
            )
        )
        assert res.bundle is not None
        paths[key] = res.bundle
    return _Built(paths, {k: a for k, (_, a) in nets.items()}, public, split.test_images)


def _gzip_delta_ratio(old: Path, new: Path) -> float:
    """What the delta would be if bundles were gzip'd tars (mtime 0): delta ÷ gzip'd new bundle."""
    from toolchain.delta import make_delta

    old_gz, new_gz = (gzip.compress(p.read_bytes(), compresslevel=9, mtime=0) for p in (old, new))
    return len(make_delta(old_gz, new_gz)) / len(new_gz)


def _figure(case: str, label: str, info: Any, goal: Goal | None, config: dict[str, Any]) -> Figure:
    return Figure(
        key=f"{NAME}.{case}",
        label=label,
        kind="ratio",
        unit="",
        value=Spread.of([info.ratio]),
        goal=goal,
        baseline=Measure("full bundle", "bytes", Spread.of([info.new_size])),
        subject=Measure("delta from the previous version", "bytes", Spread.of([info.delta_size])),
        config=config,
    )


def _deltas(ctx: Context, built: _Built) -> tuple[list[Figure], Table]:
    """Diff, apply and compare the head-retrained and fully fine-tuned bundles with the original."""
    import zstandard

    from runtime.delta import apply_delta
    from toolchain.delta import diff_bundles

    base = built.bundles["base"]
    figures: list[Figure] = []
    rows: list[tuple[Any, ...]] = []
    cases = (
        ("delta_head_retrained", "Delta ÷ full bundle, classifier head retrained (digits INT8, rpi4)", "head", GOAL),
        ("delta_fully_finetuned", "Delta ÷ full bundle, every layer fine-tuned (digits INT8, rpi4)", "full", None),
    )
    for case, label, key, goal in cases:
        new = built.bundles[key]
        info = diff_bundles(base, new, ctx.work / NAME / f"{key}.delta")
        t0 = time.perf_counter()
        apply_delta(base, info.path, ctx.work / NAME / f"{key}.rebuilt.tar", expected_sha256=info.new_sha256)
        apply_ms = (time.perf_counter() - t0) * 1000
        alone = len(zstandard.ZstdCompressor(level=19).compress(new.read_bytes())) / info.new_size
        gz = _gzip_delta_ratio(base, new)
        config = {"profile": _PROFILE, "bundle_bytes": info.new_size, "delta_bytes": info.delta_size}
        config |= {"zstd19_alone_ratio": round(alone, 4), "gzip_tar_delta_ratio": round(gz, 4)}
        figures.append(_figure(case, label, info, goal, config))
        same = hashlib.sha256(base.read_bytes()).hexdigest() == info.new_sha256
        accuracy = f"{built.accuracy['base']:.1f} → {built.accuracy[key]:.1f}" + (" (identical bundle)" if same else "")
        ratios_ = (f"{info.ratio:.3f}", f"{alone:.3f}", f"{gz:.3f}", f"{apply_ms:.1f}")
        rows.append((key, info.new_size, info.delta_size, *ratios_, accuracy))
    table = Table(
        "Delta sizes (bytes) and what they are compared with",
        (
            "update",
            "full bundle",
            "delta",
            "delta ÷ full",
            "zstd -19 alone ÷ full",
            "delta ÷ full if bundles were .tar.gz",
            "apply (ms)",
            "torch accuracy %",
        ),
        tuple(rows),
    )
    return figures, table


# --- serving while the model changes -------------------------------------------------------------


def _config(folder: Path, built: _Built, *, canary_share: float = 0.1) -> Path:
    """A `serve` config for the original bundle: no source, HTTP or MQTT; nothing is marked good by time."""
    state = folder / "state"
    state.mkdir(parents=True, exist_ok=True)
    lines = [
        f"bundle = {json.dumps(str(built.bundles['base']))}",
        f"trusted_keys = [{json.dumps(str(built.public_key))}]",
        f"state_dir = {json.dumps(str(state))}",
        'device_id = "bench"',
        'fleet = "bench"',
        "[http]",
        "enabled = false",
        "[models]",
        f"crash_limit = {_CRASH_LIMIT}",
        "good_after_s = 3600.0",
        "[rollout]",
        f"canary_share = {canary_share}",
    ]
    path = folder / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _items(images: Sequence[Any]) -> list[Any]:
    from runtime.sources import Item

    return [Item(ref=f"bench:digit{i}", data=img, kind="image", ts=time.time()) for i, img in enumerate(images)]


class _Client:
    """A thread calling ``Service.infer_item`` back to back: each call's (start, end, version, canary), failures."""

    def __init__(self, svc: Any, items: Sequence[Any]) -> None:
        self.svc, self.items = svc, list(items)
        self.calls: list[tuple[float, float, str, bool]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-client", daemon=True)

    def __enter__(self) -> _Client:
        self._thread.start()
        while not self.calls and not self.failures and self._thread.is_alive():
            time.sleep(0.001)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30.0)

    def _loop(self) -> None:
        for item in itertools.cycle(self.items):
            if self._stop.is_set():
                return
            t0 = time.perf_counter()
            try:
                out = self.svc.infer_item(item)
            except Exception as exc:  # a failed request is a result here: counted and reported
                self.failures.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            self.calls.append((t0, time.perf_counter(), str(out["version"]), bool(out.get("canary"))))


def _gaps(ends: Sequence[float], a: float, b: float, *, overlapping: bool) -> list[float]:
    """Gaps between consecutive completions inside [a, b], or (``overlapping``) any part of which is in it."""
    if overlapping:
        return [e1 - e0 for e0, e1 in itertools.pairwise(ends) if e1 > a and e0 < b]
    return [e1 - e0 for e0, e1 in itertools.pairwise(ends) if e0 >= a and e1 <= b]


def _hot_swap(ctx: Context, built: _Built, repeats: int) -> tuple[Figure, tuple[tuple[Any, ...], ...]]:
    """Swap between two versions under a back-to-back client; the worst gap during a swap ÷ the median gap."""
    from benchmarks.serve_overhead import served

    window = ctx.pick(0.3, 0.1)
    targets = [("head", built.bundles["head"]), ("base", built.bundles["base"])]
    rows: dict[str, list[float]] = {k: [] for k in ("median", "quiet_worst", "pause", "swap")}
    wrong = 0
    with served(_config(ctx.work / NAME / "hot_swap", built)) as svc, _Client(svc, _items(built.images[:1])) as cl:
        time.sleep(window)  # both paths warm before the first measured window
        for r in range(repeats):
            key, path = targets[r % 2]
            a0 = time.perf_counter()
            time.sleep(window)
            b0 = a = time.perf_counter()
            if not svc.swap(path):
                raise RuntimeError(f"the service refused to swap to {path} (see its model.refused event)")
            b = time.perf_counter()
            time.sleep(0.05)  # a few requests after the swap: the gap that straddles its end is counted
            calls = list(cl.calls)
            ends = [c[1] for c in calls]
            quiet, during = _gaps(ends, a0, b0, overlapping=False), _gaps(ends, a, b, overlapping=True)
            same_length = _gaps(ends, max(a0, b0 - (b - a)), b0, overlapping=True)  # just before, no swap
            wrong += sum(1 for c in calls if c[0] > b and c[2] != _VERSIONS[key])
            rows["median"].append(statistics.median(quiet) * 1000)
            rows["quiet_worst"].append(max(same_length) * 1000)
            rows["pause"].append(max(during) * 1000)
            rows["swap"].append((b - a) * 1000)
        served_n, failed = len(cl.calls), len(cl.failures)
    label = "Hot swap under load (digits INT8): worst gap between requests during a swap ÷ median gap without one"
    fig = Figure(
        key=f"{NAME}.hot_swap_pause",
        label=label,
        kind="ratio",
        unit="",
        value=Spread.of(ratios(rows["pause"], rows["median"])),
        baseline=Measure("median gap between requests, no swap", "ms", Spread.of(rows["median"])),
        subject=Measure("worst gap between requests during a swap", "ms", Spread.of(rows["pause"])),
        config={
            "requests": served_n,
            "failed_requests": failed,
            "failures": sorted(set(cl.failures))[:3],
            "wrong_version_after_swap": wrong,
            "swap_ms": Spread.of(rows["swap"]).median,
            "worst_gap_without_swap_ms": Spread.of(rows["quiet_worst"]).median,  # as long a window, just before
            "window_s": window,
            "repeats": repeats,
        },
    )
    row = ("hot swap: worst gap during Service.swap", *_ms(rows["pause"]), *_ms(rows["median"]))
    before = ("no swap: worst gap in as long a window just before it", *_ms(rows["quiet_worst"]), *_ms(rows["median"]))
    return fig, (row, before)


def _ms(values: Sequence[float]) -> tuple[float, float, float]:
    s = Spread.of(values)
    return s.median, s.low, s.high


# --- time to roll back ---------------------------------------------------------------------------


def _disagreeing(svc: Any, built: _Built) -> tuple[str, list[int]]:
    """The candidate (head or full) that disagrees with the original on most test images, and those images."""
    from runtime.serving import feeds_for

    def top1(model: Any) -> list[int]:
        preds = (model.run(feeds_for(model, it), ref=it.ref).to_dict() for it in _items(built.images))
        return [int(p["top1"]["index"]) for p in preds]

    base = top1(svc.model)
    found: dict[str, list[int]] = {}
    for key in ("full", "head"):
        model = svc.load(built.bundles[key])
        try:
            found[key] = [i for i, (a, b) in enumerate(zip(base, top1(model), strict=True)) if a != b]
        finally:
            model.close()
    key = max(found, key=lambda k: len(found[k]))
    return key, found[key]


def _command(rollout_id: str, args: dict[str, Any]) -> Any:
    """A ``model.deploy`` as the command channel hands it to the handler once its signature checked out."""
    from runtime.commands import Command

    now = time.time()
    return Command(rollout_id, "model.deploy", now, now + 600, {"device": "bench"}, args, "bench", b"")


def _deploy_args(path: Path, key: str, gates: dict[str, Any]) -> dict[str, Any]:
    bundle = {
        "url": path.as_uri(),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "size": path.stat().st_size,
    }
    bundle |= {"name": "digits", "version": _VERSIONS[key], "profile": _PROFILE}
    return {"bundle": bundle, "strategy": "canary", "gates": gates, "canary_share": 0.5}


def _wait_done(ledger: Any, rollout_id: str) -> Any:
    deadline = time.monotonic() + _WAIT_S
    while not (r := ledger.get(rollout_id)).done:
        if time.monotonic() > deadline:
            raise RuntimeError(f"rollout {rollout_id} still {r.state} after {_WAIT_S:.0f} s")
        time.sleep(0.01)
    return r


def _one_gate(svc: Any, items: list[Any], args: dict[str, Any], rid: str, fails: list[float]) -> dict[str, Any]:
    """One canary rollout that fails its gate under a back-to-back client; the times around its end."""
    fails.clear()
    with _Client(svc, items) as client:
        time.sleep(0.05)  # old-model requests to time one inference by
        t_deploy = time.perf_counter()
        svc.models.deployer.deploy(_command(rid, args))
        r = _wait_done(svc.models.ledger, rid)
        time.sleep(0.05)
    if r.state != "rolled_back" or not fails:
        raise RuntimeError(f"rollout {rid} ended {r.state} ({r.reason}); the benchmark needs a failing gate")
    calls, verdict = list(client.calls), fails[0]
    last_canary = max((c[0] for c in calls if c[3]), default=verdict)
    first_old = next(c for c in calls if c[0] > max(last_canary, verdict))
    after = [c for c in calls if c[0] > last_canary]
    return {
        "rollback_ms": (first_old[1] - verdict) * 1000,
        "inference_ms": statistics.median(c[1] - c[0] for c in calls if c[1] < t_deploy) * 1000,
        "detach_ms": float(r.metrics.get("rollback_ms", 0.0)),
        "canary_served": sum(1 for c in calls if c[3]),
        "wrong_after": sum(1 for c in after if c[2] != _VERSIONS["base"] or c[3]),
        "failed": len(client.failures),
        "reason": r.reason,
    }


def _gate_rollback(ctx: Context, built: _Built, repeats: int) -> dict[str, Any]:
    """Canary rollouts of a candidate that disagrees with the serving model; the gate fails every time."""
    import runtime.deploy as deploy
    from benchmarks.serve_overhead import served
    from runtime.rollout import judge as real

    fails: list[float] = []

    def judged(gates: Any, m: Any, elapsed_s: float) -> Any:  # the real verdict, stamped when it says fail
        verdict = real(gates, m, elapsed_s)
        if verdict.decision == "fail":
            fails.append(time.perf_counter())
        return verdict

    runs: list[dict[str, Any]] = []
    with served(_config(ctx.work / NAME / "gate", built, canary_share=0.5)) as svc:
        key, picks = _disagreeing(svc, built)
        gate = "agreement" if picks else "latency"  # no disagreeing image: a latency gate nobody can meet fails
        items = _items([built.images[i] for i in picks[:64]] if picks else built.images[:8])
        gates = {"min_samples": ctx.pick(30, 10), "max_p95_ratio": 100.0 if picks else 0.01}
        gates |= {"min_agreement": 0.9, "max_error_rate": 0.5, "max_duration_s": _WAIT_S}
        args = _deploy_args(built.bundles[key], key, gates)
        deploy.__dict__["judge"] = judged  # the deployer's own name for it: instrumented, not replaced
        try:
            runs = [_one_gate(svc, items, args, f"bench-gate-{r}", fails) for r in range(repeats)]
        finally:
            deploy.__dict__["judge"] = real
    return {"runs": runs, "candidate": key, "gate": gate, "inputs": len(items), "gates": gates}


def _crash_start(ctx: Context, built: _Built, r: int, n: int) -> dict[str, float | str]:
    """A start that finds a not-yet-good version after two crashed starts: revert, load, first inference."""
    from benchmarks.serve_overhead import served
    from runtime.logbook import open_readonly
    from runtime.signing import load_public_key
    from runtime.store import ModelStore

    folder = ctx.work / NAME / f"crash{r}"
    config = _config(folder, built)
    store = ModelStore(folder / "state" / "models")
    for key in ("base", "head"):
        held = store.add(built.bundles[key], trusted_keys=[load_public_key(built.public_key)], source="bench")
        store.activate(held.name, held.version)
        if key == "base":
            store.mark_good()
    for _ in range(_CRASH_LIMIT - 1):  # the starts that crashed before this one
        store.boot(crash_limit=_CRASH_LIMIT, window_s=600.0)
    item = _items(built.images[:1])[0]
    with served(config) as svc:
        ready = time.time()
        version = svc.infer_item(item)["version"]
        first = time.time()
        lat = []
        for _ in range(n):
            t0 = time.perf_counter()
            svc.infer_item(item)
            lat.append(time.perf_counter() - t0)
        svc.logbook.flush(10.0)
        events = open_readonly(svc.cfg.logbook_path).tail(50, table="events")
    decided = next((e["ts"] for e in events if e["kind"] == "model.crash_loop"), None)
    if decided is None or version != _VERSIONS["base"]:
        raise RuntimeError(f"no crash-loop revert at start (event found: {decided is not None}, served {version})")
    return {
        "rollback_ms": (first - decided) * 1000,
        "ready_ms": (ready - decided) * 1000,
        "inference_ms": statistics.median(lat) * 1000,
    }


def _rollback_figures(ctx: Context, built: _Built, repeats: int) -> tuple[list[Figure], list[tuple[Any, ...]]]:
    gate = _gate_rollback(ctx, built, repeats)
    runs = gate["runs"]
    back = [g["rollback_ms"] for g in runs]
    one = [g["inference_ms"] for g in runs]
    config = {k: gate[k] for k in ("candidate", "gate", "inputs", "gates")}
    config |= {
        "reason": runs[0]["reason"],
        "failed_on": sorted({g["reason"].split(":")[0] for g in runs}),  # the gate of every repeat
        "failed_requests": sum(g["failed"] for g in runs),
        "wrong_after_rollback": sum(g["wrong_after"] for g in runs),
        "canary_served_median": statistics.median(g["canary_served"] for g in runs),
        "detach_ms": Spread.of([g["detach_ms"] for g in runs]).median,
        "repeats": repeats,
    }
    what = "failing canary gate → first request on the previous model alone"
    base = Measure("one inference (Service.infer_item), median", "ms", Spread.of(one))
    subject = Measure(what, "ms", Spread.of(back))
    crashes = [_crash_start(ctx, built, r, ctx.pick(200, 20)) for r in range(ctx.pick(7, 2))]
    c_back = [float(c["rollback_ms"]) for c in crashes]
    c_one = [float(c["inference_ms"]) for c in crashes]
    c_ready = [float(c["ready_ms"]) for c in crashes]
    figures = [
        Figure(
            f"{NAME}.rollback_gate",
            f"Time to roll back, {what} ÷ one inference",
            "ratio",
            "",
            Spread.of(ratios(back, one)),
            None,
            base,
            subject,
            config,
        ),
        Figure(
            f"{NAME}.rollback_gate_ms",
            f"Time to roll back, {what}, beyond one inference",
            "difference",
            "ms",
            Spread.of(differences(back, one)),
            ROLLBACK_GOAL_MS,
            base,
            subject,
            config,
        ),
        Figure(
            f"{NAME}.rollback_crash_loop",
            "Time to roll back, crash-loop revert at start → first inference on the previous version ÷ one inference",
            "ratio",
            "",
            Spread.of(ratios(c_back, c_one)),
            None,
            Measure("one inference (Service.infer_item), median", "ms", Spread.of(c_one)),
            Measure("crash-loop decision → first inference on the previous version", "ms", Spread.of(c_back)),
            {"crash_limit": _CRASH_LIMIT, "ready_ms": Spread.of(c_ready).median, "repeats": len(crashes)},
        ),
    ]
    rows = [
        (f"gate ({gate['gate']}): {what}", *_ms(back), *_ms(one)),
        (
            "gate: verdict → trial detached (the deployer's own rollback_ms)",
            *_ms([g["detach_ms"] for g in runs]),
            None,
            None,
            None,
        ),
        ("crash loop: decision → READY (previous version verified, loaded, warmed up)", *_ms(c_ready), *_ms(c_one)),
        ("crash loop: decision → first inference on the previous version", *_ms(c_back), *_ms(c_one)),
    ]
    return figures, rows


METHOD = (
    "The digits CNN is trained, then its classifier head alone is retrained with every other layer frozen, "
    "and separately every layer is fine-tuned. The three are built by the toolchain for rpi4 (INT8 S8S8, "
    "same calibration set), and `toolchain bundle diff` makes the deltas from the original (zstd patch-from: "
    "the old bundle as a raw-content dictionary, long-distance matching, a window over both). Bundles are "
    "plain tars with sorted members and fixed mtimes, so unchanged tensors line up byte for byte; the table "
    "also shows what gzip'd bundles would give (every byte after the first change differs, nothing to match). "
    "The same bundles are then served by a `Service` opened in-process as `serve` opens it (thread plan, "
    "logbook, model store, rollout ledger; no source, HTTP or MQTT), while a client thread calls "
    "`Service.infer_item` back to back and stamps every call. Hot swap: each of {repeats} repeats times a "
    "{window} s window without a swap, then `Service.swap` (the SIGHUP path: verify, load and warm up the other "
    "version beside the serving one, switch, close the old one after its last request) alternately to the "
    "head-retrained and the original version; the figure is the worst gap between two completed requests "
    "overlapping the swap ÷ the median gap of the window before it. Gate rollback: a `model.deploy` (strategy "
    "canary, half the requests to the candidate) of the candidate that disagrees with the original on the most "
    "test images is handed to the real deployer with only those images as inputs, so the agreement gate fails; "
    "the real `judge` is wrapped to stamp the first failing verdict, and the time runs to the completion of the "
    "first request that started after the last candidate-served request (every later one is served by the "
    "previous version). Crash loop: the store is left with a not-yet-good version after {crashes} crashed "
    "starts (`ModelStore.boot` counted), and the next `Service.open` reverts; the time runs from the "
    "`model.crash_loop` event to the first inference, on the previous version. Both are ÷ the median of one "
    "`infer_item` timed in the same service."
)


def run(ctx: Context) -> Report:
    """Build the three bundles; delta sizes, then hot swap and rollback times on the same bundles."""
    built = _bundles(ctx)
    repeats = ctx.pick(11, 3)
    figures, delta_table = _deltas(ctx, built)
    swap, swap_rows = _hot_swap(ctx, built, repeats)
    rollback, rollback_rows = _rollback_figures(ctx, built, repeats)
    figures += [swap, *rollback]
    times = Table(
        "Swap and rollback times (ms; median and min–max over the repeats) against one inference",
        ("what", "median", "min", "max", "one inference (median)", "min", "max"),
        (*swap_rows, *rollback_rows),
    )
    gate = rollback[0].config
    notes = (
        "The head-retrained delta is small because static INT8 quantization calibrates each layer on the same "
        "images: frozen layers get the same weights and the same scales, so their bytes are identical.",
        f"Hot swap: {swap.config['failed_requests']} failed requests out of {swap.config['requests']:,} served "
        f"across {swap.config['repeats']} swaps ({swap.config['wrong_version_after_swap']} served by the old "
        f"version after a swap returned). A swap (verify, load, warm up) took {swap.config['swap_ms']:.0f} ms "
        "(median) while the old model kept serving; the worst gap in a window as long, just before the swap, "
        f"was {swap.config['worst_gap_without_swap_ms']:.2f} ms: what is left of the pause is the loading "
        "thread sharing the GIL and the cores with the serving thread, and the machine's own noise.",
        f"Gate rollback: the {gate['candidate']} candidate was rolled back by its "
        f"{' / '.join(gate['failed_on'])} gate in every repeat (first: {gate['reason']}); "
        f"{gate['failed_requests']} failed requests, {gate['wrong_after_rollback']} requests "
        "served by the candidate or another version after the rollback.",
    )
    method = METHOD.format(repeats=repeats, window=ctx.pick(0.3, 0.1), crashes=_CRASH_LIMIT - 1)
    return Report(NAME, TITLE, method, tuple(figures), (delta_table, times), notes)
