"""Human summaries of builds, profiles and bundles (rich tables on stdout)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from runtime.profile import DeviceProfile

__all__ = ["print_build", "print_inspect", "print_profile", "print_profiles"]


def _console() -> Any:
    from rich.console import Console

    con = Console()
    if not con.is_terminal:  # piped or captured: do not squeeze tables into 80 columns
        con = Console(width=140)
    return con


def _fmt(v: Any, unit: str = "", digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}{unit}"
    return f"{v}{unit}"


def _num(v: Any) -> str:
    return "—" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def print_build(report: dict[str, Any]) -> None:
    """Reference vs candidate table, gate checks and warnings."""
    from rich.table import Table

    con = _console()
    size = report.get("size", {})
    bench = report.get("benchmark") or {}
    val = report.get("validation", {})
    ref_b, cand_b = bench.get("reference") or {}, bench.get("candidate") or {}
    engine = {"onnxruntime": "ONNX", "tflite": "TFLite"}.get(str(report.get("backend")), "")
    t = Table(
        title=f"{report.get('name')} {report.get('version')} for {report.get('profile')} — "
        f"FP32 reference vs {report.get('precision')} {engine} candidate".replace("  ", " ")
    )
    t.add_column("")
    t.add_column("reference (FP32)", justify="right")
    t.add_column("candidate", justify="right")
    t.add_column("ratio", justify="right")
    rs, cs = size.get("reference_bytes"), size.get("candidate_bytes")
    t.add_row(
        "model size",
        _fmt(rs / 1024 if rs else None, " KiB", 1),
        _fmt(cs / 1024 if cs else None, " KiB", 1),
        _fmt(size.get("ratio"), "×"),
    )
    if bench:
        t.add_row(
            "host latency p50",
            _fmt(ref_b.get("p50_ms"), " ms", 3),
            _fmt(cand_b.get("p50_ms"), " ms", 3),
            _fmt(bench.get("latency_ratio"), "×"),
        )
        t.add_row(
            "host latency p95",
            _fmt(ref_b.get("p95_ms"), " ms", 3),
            _fmt(cand_b.get("p95_ms"), " ms", 3),
            "",
        )
        t.add_row(
            "host throughput",
            _fmt(ref_b.get("throughput_per_s"), "/s", 1),
            _fmt(cand_b.get("throughput_per_s"), "/s", 1),
            "",
        )
        t.add_row(
            "host peak memory",
            _fmt(ref_b.get("peak_rss_mb"), " MiB", 1),
            _fmt(cand_b.get("peak_rss_mb"), " MiB", 1),
            "",
        )
    if val.get("reference_accuracy") is not None:
        t.add_row(
            "top-1 accuracy",
            _fmt(val["reference_accuracy"], " %"),
            _fmt(val["candidate_accuracy"], " %"),
            f"{-val['accuracy_drop']:+.2f} pts",
        )
    t.add_row(f"agreement ({val.get('task')})", "1.00", _fmt(val.get("agreement"), digits=4), "")
    t.add_row(
        "cosine (mean / min)",
        "",
        f"{_fmt(val.get('cosine_mean'), digits=4)} / {_fmt(val.get('cosine_min'), digits=4)}",
        "",
    )
    t.add_row("max |diff|", "", _fmt(val.get("max_abs_diff"), digits=5), "")
    con.print(t)
    if bench:
        con.print(f"[dim]{bench.get('note')}; {bench.get('threads')} thread(s)[/]")
    if report.get("search"):
        _print_search(con, report["search"])
    gate = report.get("gate", {})
    g = Table(title="gate: " + ("[green]PASSED[/]" if gate.get("passed") else "[red]FAILED[/]"))
    for col in ("check", "value", "limit", "result", "note"):
        g.add_column(col)
    for c in gate.get("checks", []):
        result = {True: "[green]pass[/]", False: "[red]FAIL[/]", None: "[yellow]n/a[/]"}[c["passed"]]
        g.add_row(c["name"], _num(c["value"]), _num(c["limit"]), result, c.get("note", ""))
    con.print(g)
    if report.get("candidates"):
        con.print(_candidates_table(report["candidates"]))
    if report.get("choice"):
        con.print(f"bundled: [bold]{report['choice']['backend']}[/] — {report['choice']['reason']}")
    for w in report.get("warnings", []):
        con.print(f"[yellow]warning:[/] {w}")
    if report.get("bundle"):
        con.print(f"bundle: [bold]{report['bundle']}[/]")


def _candidates_table(candidates: dict[str, Any]) -> Any:
    """``--backend both``: the two candidates side by side."""
    from rich.table import Table

    rows = {name: c["summary"] for name, c in candidates.items()}
    t = Table(title="candidates (each against its own FP32 reference)")
    t.add_column("")
    for name in rows:
        t.add_column(name.upper(), justify="right")

    def size(v: Any) -> str:
        return _fmt(v / 1024 if v else None, " KiB", 1)

    fields: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
        ("precision", "precision", str),
        ("model size", "size_bytes", size),
        ("top-1 accuracy", "candidate_accuracy", lambda v: _fmt(v, " %")),
        ("agreement", "agreement", lambda v: _fmt(v, digits=4)),
        ("host latency p50", "p50_ms", lambda v: _fmt(v, " ms", 3)),
        ("host latency p95", "p95_ms", lambda v: _fmt(v, " ms", 3)),
        ("gate", "gate_passed", lambda v: "[green]pass[/]" if v else "[red]FAIL[/]"),
    )
    for label, key, show in fields:
        t.add_row(label, *(show(r.get(key)) for r in rows.values()))
    return t


def _print_search(con: Any, search: dict[str, Any]) -> None:
    """Every search attempt, then the node groups kept in float and why."""
    from rich.table import Table

    t = Table(title=f"search: {len(search['attempts'])} attempts in {search['seconds']:.0f} s")
    for col in ("attempt", "settings", "metric (mean / worst)", "drop", "size", "boundaries", "host p50", "gate"):
        t.add_column(col)
    for a in search["attempts"]:
        st = a["settings"]
        settings = (
            f"{st['calibration_method']}, {'sym' if st['symmetric_activations'] else 'asym'} act, "
            f"{'per-channel' if st['per_channel'] else 'per-tensor'}{', reduce_range' if st['reduce_range'] else ''}"
        )
        if st.get("activation_bits", 8) != 8:
            settings += f", {st['activation_bits']}-bit act"
        if st.get("int16_weight_nodes"):
            settings += f", int16 weights x{st['int16_weight_nodes']}"
        mark = "[bold]*[/] " if a["name"] == search.get("chosen") else ""
        t.add_row(
            mark + a["name"],
            settings,
            f"{a['agreement']:.4f} / {a['agreement_min']:.4f}",
            _fmt(a["accuracy_drop"], " pts"),
            f"{a['size_ratio']:.2f}×",
            str(a["proxy"]["boundaries"]),
            _fmt(a.get("host_p50_ms"), " ms", 1),
            "[green]pass[/]" if a["passed"] else "[red]fail[/]",
        )
    con.print(t)
    if search.get("speed_basis"):
        con.print(f"[dim]fastest passing candidate chosen by {search['speed_basis']}[/]")
    errors = {s["group"]: s["error"] for s in search.get("sensitivity", [])}
    chosen = next((a for a in search["attempts"] if a["name"] == search.get("chosen")), None)
    for group in (chosen or {}).get("float_groups", []):
        con.print(f"  kept in float: {group} — error {errors.get(group, 0):.4f} when quantized alone")
    wide = {s["group"]: s["error"] for s in search.get("weight_sensitivity", [])}
    for group in (chosen or {}).get("int16_weight_groups", []):
        con.print(f"  int16 weights: {group} — error {wide.get(group, 0):.4f} when its weights alone are int8")
    if chosen and chosen["settings"].get("activation_bits", 8) != 8:
        con.print(f"  all activations {chosen['settings']['activation_bits']}-bit; other weights int8")
    for note in search.get("notes", []):
        con.print(f"[yellow]search:[/] {note}")


def print_profiles(profiles: list[DeviceProfile]) -> None:
    """One row per profile."""
    from rich.table import Table

    t = Table(title="device profiles")
    for col in (
        "name",
        "arch",
        "cores",
        "threads",
        "memory",
        "accelerator",
        "backend",
        "quantization",
    ):
        t.add_column(col, no_wrap=True)
    for p in profiles:
        cores = " + ".join(f"{len(c.cores)}×{c.model}" for c in p.cpu.cluster)
        q = p.quantization
        quant = q.mode if q.mode != "static" else f"static {'S8S8' if q.activation_type == 'int8' else 'U8S8'}"
        t.add_row(
            p.name,
            p.arch,
            cores,
            str(p.cpu.inference_threads),
            f"{p.memory_mb} MB",
            p.accelerator,
            p.backend,
            quant,
        )
    _console().print(t)


def print_profile(profile: DeviceProfile) -> None:
    """The profile as TOML-like text."""
    import json

    _console().print_json(json.dumps(profile.to_dict()))


def print_inspect(info: dict[str, Any]) -> None:
    """A bundle's manifest summary and files."""
    from rich.table import Table

    m = info.get("manifest", {})
    con = _console()
    t = Table(title=f"bundle {info.get('path')}", show_header=False)
    t.add_column("field")
    t.add_column("value")
    for k in (
        "name",
        "version",
        "parent_version",
        "created",
        "backend",
        "precision",
        "task",
        "toolchain_version",
    ):
        t.add_row(k, _fmt(m.get(k)))
    prof = m.get("profile", {})
    t.add_row(
        "profile",
        f"{prof.get('name')} ({prof.get('arch')}, digest {str(prof.get('digest'))[:12]}…)",
    )
    for io in ("inputs", "outputs"):
        t.add_row(io, ", ".join(f"{s['name']} {s['dtype']}{list(s['shape'])}" for s in m.get(io, [])))
    sig = info.get("signature") or {}
    t.add_row("signature", f"ed25519 key {sig.get('key_id')}" if sig else "[red]missing[/]")
    gate = (m.get("validation") or {}).get("gate") or {}
    if gate:
        t.add_row("gate", "passed" if gate.get("passed") else "[red]FAILED[/]")
    con.print(t)
    f = Table(title="files")
    for col in ("path", "role", "size", "sha256"):
        f.add_column(col)
    for e in m.get("files", []):
        f.add_row(e["path"], e.get("role", ""), f"{e['size']:,}", e["sha256"][:16] + "…")
    con.print(f)
