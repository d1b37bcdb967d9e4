"""CPU topology and thread plans, checked against real board captures in ../shared/boards/.

The captures (each board's SOURCE.md names the upstream repository, path and commit) hold
/proc/cpuinfo dumps and sbc-bench's "CPU sysfs topology" table, but no raw sysfs files: no per-CPU
``cpuinfo_max_freq`` in kHz and no ``topology/*``. So every test derives a sysfs tree in tmp_path
from a topology table (``_sysfs_from_table``, documented there) and pairs it with the board's
real /proc/cpuinfo, read from the shared folder at test time; nothing is copied into the repo.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.cpu import (
    Core,
    ThreadPlan,
    Topology,
    apply_budget,
    parse_cpuinfo,
    pin_current_thread,
    plan_threads,
    read_topology,
)
from tests.conftest import SHARED

BOARDS = SHARED / "boards"
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_ROW = re.compile(r"\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\S.*?)\s*$")


class Row(NamedTuple):
    """One line of sbc-bench's topology table."""

    cpu: int
    package: int  # topology/physical_package_id
    policy: int  # the cpufreq policyN the CPU belongs to
    min_mhz: int
    max_mhz: int
    core_type: str  # "Cortex-A76 / r4p0"


def _table(relpath: str) -> list[Row]:
    rows = []
    for line in (BOARDS / relpath).read_text().splitlines():
        m = _ROW.fullmatch(line)
        if m:
            rows.append(Row(*(int(g) for g in m.groups()[:5]), m.group(6)))
    assert rows, f"{relpath}: no topology rows"
    return rows


def _write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)


def _sysfs_from_table(root: Path, rows: list[Row], *, cpufreq: bool = True) -> None:
    """Derive /sys/devices/system/cpu from a topology table, laid out the way Linux does it.

    ``online`` lists the table's CPUs; ``cpuN/topology/physical_package_id`` = the "cluster" column;
    ``cpufreq/policyP/{cpuinfo_max_freq,cpuinfo_min_freq}`` = the table's MHz × 1000 (the table rounds
    kHz to MHz, so this is the closest value the capture allows), ``related_cpus``/``affected_cpus`` =
    the CPUs whose "cpufreq policy" column is P, and ``cpuN/cpufreq`` a symlink to ``../cpufreq/policyP``.
    No ``topology/cluster_id``: none of the kernels in the captures is recent enough to be sure of it.
    """
    sysfs = root / "sys/devices/system/cpu"
    _write(sysfs / "online", f"0-{max(r.cpu for r in rows)}\n")
    _write(sysfs / "possible", f"0-{max(r.cpu for r in rows)}\n")
    for r in rows:
        _write(sysfs / f"cpu{r.cpu}/topology/physical_package_id", f"{r.package}\n")
        if not cpufreq:
            continue
        policy = sysfs / f"cpufreq/policy{r.policy}"
        members = ",".join(str(x.cpu) for x in rows if x.policy == r.policy)
        for name, value in (
            ("cpuinfo_max_freq", r.max_mhz * 1000),
            ("cpuinfo_min_freq", r.min_mhz * 1000),
            ("related_cpus", members),
            ("affected_cpus", members),
        ):
            _write(policy / name, f"{value}\n")
        (sysfs / f"cpu{r.cpu}/cpufreq").symlink_to(f"../cpufreq/policy{r.policy}")


def _cpuinfo_from_table(rows: list[Row]) -> str:
    """A minimal arm64 /proc/cpuinfo derived from the table's "core type" (only for boards without a capture).

    Cortex-A78AE is MIDR part 0xd42 (the linux-tegra patch quoted in boards/jetson_orin/known_facts.md);
    "r0p1" is CPU variant 0x0, revision 1.
    """
    parts = {"Cortex-A78AE": "0xd42"}
    blocks = []
    for r in rows:
        name, _, rev = (s.strip() for s in r.core_type.partition("/"))
        variant, revision = re.fullmatch(r"r(\d+)p(\d+)", rev).groups()  # type: ignore[union-attr]
        blocks.append(
            f"processor\t: {r.cpu}\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
            f"CPU variant\t: 0x{int(variant):x}\nCPU part\t: {parts[name]}\nCPU revision\t: {revision}\n"
        )
    return "\n".join(blocks)


class Expect(NamedTuple):
    """What a board's topology and default plan must be, worked out by hand from its table."""

    clusters: tuple[tuple[int, ...], ...]
    models: tuple[str, ...]  # per cluster
    max_mhz: tuple[int, ...]  # per cluster
    inference: tuple[int, ...]
    io: tuple[int, ...]
    mode: str


_A53, _A55, _A57, _A72, _A73, _A76, _A78AE = (f"cortex-a{n}" for n in ("53", "55", "57", "72", "73", "76", "78ae"))
_RK3588 = Expect(((4, 5, 6, 7), (0, 1, 2, 3)), (_A76, _A55), (2400, 1800), (4, 5, 6, 7), (0, 1, 2, 3), "big.LITTLE")
CASES = {
    "rpi3/sbcbench_cpu_topology.txt": Expect(((0, 1, 2, 3),), (_A53,), (1200,), (1, 2, 3), (0,), "reserve"),
    "rpi4/sbcbench_cpu_topology.txt": Expect(((0, 1, 2, 3),), (_A72,), (1800,), (1, 2, 3), (0,), "reserve"),
    "rpi4/sbcbench_cpu_topology.4pzj_armv7l.txt": Expect(((0, 1, 2, 3),), (_A72,), (1500,), (1, 2, 3), (0,), "reserve"),
    "rpi5/sbcbench_cpu_topology.txt": Expect(((0, 1, 2, 3),), (_A76,), (2400,), (1, 2, 3), (0,), "reserve"),
    "rpi5/sbcbench_cpu_topology.8-NK.txt": Expect(((0, 1, 2, 3),), (_A76,), (2400,), (1, 2, 3), (0,), "reserve"),
    "jetson_nano/sbcbench_cpu_topology.txt": Expect(((0, 1, 2, 3),), (_A57,), (1479,), (1, 2, 3), (0,), "reserve"),
    "jetson_nano/sbcbench_cpu_topology.3Ufc_nano2gb_oc.txt": Expect(
        ((0, 1, 2, 3),), (_A57,), (2014,), (1, 2, 3), (0,), "reserve"
    ),
    "rk3588/sbcbench_cpu_topology.txt": _RK3588,
    "rk3588/sbcbench_cpu_topology.41BH_rock5b.txt": _RK3588,
    "s922x/sbcbench_cpu_topology.txt": Expect(
        ((2, 3, 4, 5), (0, 1)), (_A73, _A53), (2400, 2016), (2, 3, 4, 5), (0, 1), "big.LITTLE"
    ),
    # Orin: one speed class, but two physical clusters: packages 0/1 in 87lq, cpufreq policies 0/4 in both.
    "jetson_orin/sbcbench_cpu_topology.txt": Expect(
        ((0, 1, 2, 3, 4, 5),), (_A78AE,), (1728,), (0, 1, 2, 3), (4, 5), "clusters"
    ),
    "jetson_orin/sbcbench_cpu_topology.4vy7_orin_nano.txt": Expect(
        ((0, 1, 2, 3, 4, 5),), (_A78AE,), (1510,), (0, 1, 2, 3), (4, 5), "clusters"
    ),
}


def _board_root(tmp: Path, relpath: str, *, cpufreq: bool = True, cpuinfo: str | bytes | None = None) -> Path:
    """A root with the table's derived sysfs and the board's real /proc/cpuinfo (derived only for Orin)."""
    rows = _table(relpath)
    _sysfs_from_table(tmp, rows, cpufreq=cpufreq)
    capture = BOARDS / relpath.split("/")[0] / "proc_cpuinfo.txt"
    if cpuinfo is None:
        cpuinfo = capture.read_text() if capture.is_file() else _cpuinfo_from_table(rows)
    _write(tmp / "proc/cpuinfo", cpuinfo)
    return tmp


def test_every_topology_capture_has_an_expectation() -> None:
    found = {str(p.relative_to(BOARDS)) for p in BOARDS.glob("*/sbcbench_cpu_topology*.txt")}
    assert found == set(CASES)


@pytest.mark.parametrize("relpath", sorted(CASES))
def test_board_topology(relpath: str, tmp_path: Path) -> None:
    want = CASES[relpath]
    topo = read_topology(_board_root(tmp_path, relpath))
    assert topo.clusters == want.clusters
    for cluster, model, mhz in zip(topo.clusters, want.models, want.max_mhz, strict=True):
        assert {topo.core(c).model for c in cluster} == {model}
        assert {round(topo.core(c).max_khz / 1000) for c in cluster} == {mhz}
    assert topo.is_big_little == (len(want.clusters) > 1)
    assert topo.big == want.inference if topo.is_big_little else topo.big == want.clusters[0]
    assert topo.little == (want.io if topo.is_big_little else ())
    # sbc-bench decoded the core type itself: the part table must agree with it on every core.
    for row in _table(relpath):
        assert topo.core(row.cpu).model == row.core_type.split("/")[0].strip().lower()


@pytest.mark.parametrize("relpath", sorted(CASES))
def test_board_plan(relpath: str, tmp_path: Path) -> None:
    want = CASES[relpath]
    plan = plan_threads(read_topology(_board_root(tmp_path, relpath)))
    assert (plan.inference_cores, plan.io_cores, plan.mode) == (want.inference, want.io, want.mode)
    assert plan.intra_op_threads == len(want.inference)
    assert plan.engine_pin() == want.inference
    assert (plan.opencv_threads, plan.blas_threads) == (1, 1)
    assert json.loads(json.dumps(plan.to_dict()))["engine_pin"] == list(want.inference)


def test_reason_names_the_cores(tmp_path: Path) -> None:
    plan = plan_threads(read_topology(_board_root(tmp_path, "rk3588/sbcbench_cpu_topology.txt")))
    assert plan.reason == "big.LITTLE: 4×cortex-a76 @2.4 GHz (cpu4-7) for inference, 4×cortex-a55 (cpu0-3) for I/O"


def test_orin_clusters_come_from_cpufreq_policies_when_packages_say_nothing(tmp_path: Path) -> None:
    """In 4vy7 physical_package_id is 0 for all six CPUs; only the cpufreq policies (0, 4) split them."""
    rows = _table("jetson_orin/sbcbench_cpu_topology.4vy7_orin_nano.txt")
    assert {r.package for r in rows} == {0}
    topo = read_topology(_board_root(tmp_path, "jetson_orin/sbcbench_cpu_topology.4vy7_orin_nano.txt"))
    assert topo.domains == ((0, 1, 2, 3), (4, 5))
    assert plan_threads(topo, reserve_io_core=False).mode == "shared"


def test_orin_without_cpuinfo_still_splits_the_clusters(tmp_path: Path) -> None:
    root = _board_root(tmp_path, "jetson_orin/sbcbench_cpu_topology.txt")
    (root / "proc/cpuinfo").unlink()
    topo = read_topology(root)
    assert {c.model for c in topo.cores} == {"unknown"} and {c.part for c in topo.cores} == {None}
    plan = plan_threads(topo)
    assert (plan.inference_cores, plan.io_cores) == ((0, 1, 2, 3), (4, 5))


@pytest.mark.parametrize(
    ("name", "count", "part", "model_name"),
    [
        ("rpi3/proc_cpuinfo.txt", 4, "0xd03", "ARMv8 Processor rev 4 (v8l)"),
        ("rpi3/proc_cpuinfo.32bit_kernel.pytorch_cpuinfo.txt", 4, "0xd03", "ARMv7 Processor rev 4 (v7l)"),
        ("rpi4/proc_cpuinfo.txt", 4, "0xd08", None),
        ("rpi5/proc_cpuinfo.txt", 4, "0xd0b", None),
        ("jetson_nano/proc_cpuinfo.txt", 4, "0xd07", None),
        ("jetson_nano/extra_jetson_tx1_proc_cpuinfo.pytorch_cpuinfo.txt", 4, "0xd07", None),
        ("s922x/proc_cpuinfo.txt", 6, None, None),
        ("rk3588/proc_cpuinfo.txt", 8, None, None),
    ],
)
def test_parse_cpuinfo_captures(name: str, count: int, part: str | None, model_name: str | None) -> None:
    procs = parse_cpuinfo((BOARDS / name).read_text())
    assert sorted(procs) == list(range(count))
    if part is not None:
        assert {p["CPU part"] for p in procs.values()} == {part}
    assert {p.get("model name") for p in procs.values()} == {model_name}
    assert all(p["CPU implementer"] == "0x41" for p in procs.values())


def test_parse_cpuinfo_mixed_parts_and_trailer() -> None:
    rk = parse_cpuinfo((BOARDS / "rk3588/proc_cpuinfo.txt").read_text())
    assert [rk[n]["CPU part"] for n in range(8)] == ["0xd05"] * 4 + ["0xd0b"] * 4
    pi3 = parse_cpuinfo((BOARDS / "rpi3/proc_cpuinfo.32bit_kernel.pytorch_cpuinfo.txt").read_text())
    assert pi3[3]["Hardware"] == "BCM2709"  # the trailer applies to every processor
    assert pi3[0]["CPU architecture"] == "7"


def test_parse_cpuinfo_old_arm_layout() -> None:
    """Pre-3.8 32-bit ARM kernels print a "Processor" header, per-CPU BogoMIPS and ONE shared part block.

    The text is written here (values made up) in that layout, as the kernel's c_show() printed it.
    """
    text = (
        "Processor\t: ARMv7 Processor rev 5 (v7l)\nprocessor\t: 0\nBogoMIPS\t: 100.00\n\n"
        "processor\t: 1\nBogoMIPS\t: 100.00\n\nFeatures\t: swp half thumb fastmult vfp edsp neon\n"
        "CPU implementer\t: 0x41\nCPU architecture: 7\nCPU variant\t: 0x0\nCPU part\t: 0xc07\n"
        "CPU revision\t: 5\n\nHardware\t: Some board\n"
    )
    procs = parse_cpuinfo(text)
    assert sorted(procs) == [0, 1]
    assert {p["CPU part"] for p in procs.values()} == {"0xc07"}
    assert procs[1]["BogoMIPS"] == "100.00"
    uniprocessor = parse_cpuinfo(
        text.replace("processor\t: 1\nBogoMIPS\t: 100.00\n\n", "").replace("processor\t: 0\n", "")
    )
    assert list(uniprocessor) == [0] and uniprocessor[0]["CPU part"] == "0xc07"


def test_old_layout_topology_names_every_core(tmp_path: Path) -> None:
    rows = _table("rpi3/sbcbench_cpu_topology.txt")
    text = "Processor\t: ARMv7 Processor rev 4 (v7l)\n" + "".join(
        f"processor\t: {r.cpu}\nBogoMIPS\t: 38.40\n\n" for r in rows
    )
    text += "CPU implementer\t: 0x41\nCPU part\t: 0xd03\n"
    topo = read_topology(_board_root(tmp_path, "rpi3/sbcbench_cpu_topology.txt", cpuinfo=text))
    assert {c.model for c in topo.cores} == {"cortex-a53"}


def _x86_root(root: Path, *, cpus: int, max_khz: list[int] | None) -> Path:
    """A tree modelled on this CI machine's real files (read when the test was written).

    /proc/cpuinfo: "model name : Intel(R) Xeon(R) Processor", family 6, model 167, one block per CPU;
    sysfs: ``online`` "0-1", topology/cluster_id = the CPU number (x86 reports the L2 id there, one
    per core), physical_package_id 0, and an empty cpufreq/ (a VM: no cpufreq driver). With
    ``max_khz`` the tree gets intel_pstate-style per-CPU policies instead (an extrapolation for bare metal).
    """
    sysfs = root / "sys/devices/system/cpu"
    _write(sysfs / "online", f"0-{cpus - 1}\n")
    (sysfs / "cpufreq").mkdir(parents=True)
    blocks = []
    for n in range(cpus):
        _write(sysfs / f"cpu{n}/topology/cluster_id", f"{n}\n")
        _write(sysfs / f"cpu{n}/topology/physical_package_id", "0\n")
        blocks.append(
            f"processor\t: {n}\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 167\n"
            f"model name\t: Intel(R) Xeon(R) Processor\nphysical id\t: 0\ncore id\t\t: {n}\n"
            "flags\t\t: fpu vme de pse tsc msr sse sse2 avx avx2 avx512f avx512_vnni\n"
        )
        if max_khz is not None:
            _write(sysfs / f"cpufreq/policy{n}/cpuinfo_max_freq", f"{max_khz[n]}\n")
            _write(sysfs / f"cpufreq/policy{n}/related_cpus", f"{n}\n")
    _write(root / "proc/cpuinfo", "\n".join(blocks) + "\n")
    return root


def test_x86_two_cores_share_everything(tmp_path: Path) -> None:
    topo = read_topology(_x86_root(tmp_path, cpus=2, max_khz=None))
    assert topo.cores == (
        Core(0, 0, None, "Intel(R) Xeon(R) Processor"),
        Core(1, 0, None, "Intel(R) Xeon(R) Processor"),
    )
    assert topo.clusters == ((0, 1),) and not topo.is_big_little
    plan = plan_threads(topo)
    assert (plan.inference_cores, plan.io_cores, plan.mode, plan.engine_pin()) == ((0, 1), (0, 1), "shared", ())
    assert "only 2 cores" in plan.reason


def test_x86_favoured_cores_stay_one_class(tmp_path: Path) -> None:
    """Per-core clusters (L2 ids) are ignored for the split; clocks 2 % apart are one speed class."""
    clocks = [4_700_000, 4_600_000, 4_600_000, 4_700_000, 4_600_000, 4_600_000]
    topo = read_topology(_x86_root(tmp_path, cpus=6, max_khz=clocks))
    assert topo.clusters == ((0, 1, 2, 3, 4, 5),)
    assert len(topo.domains) == 6
    plan = plan_threads(topo)
    assert (plan.inference_cores, plan.io_cores, plan.mode) == ((1, 2, 3, 4, 5), (0,), "reserve")


def test_this_machine() -> None:
    topo = read_topology()
    allowed = os.sched_getaffinity(0)
    assert {c.id for c in topo.cores} == allowed
    plan = plan_threads(topo)
    assert set(plan.inference_cores) <= allowed and set(plan.io_cores) <= allowed
    assert 1 <= plan.intra_op_threads <= len(allowed)


def test_allowed_cores_are_respected(tmp_path: Path) -> None:
    root = _board_root(tmp_path, "rk3588/sbcbench_cpu_topology.txt")
    topo = read_topology(root, allowed=[0, 1, 2, 3, 6, 99])  # taskset -c 0-3,6 (99 is not online)
    assert [c.id for c in topo.cores] == [0, 1, 2, 3, 6]
    assert topo.clusters == ((6,), (0, 1, 2, 3))
    plan = plan_threads(topo)
    assert (plan.inference_cores, plan.intra_op_threads, plan.io_cores) == ((6,), 1, (0, 1, 2, 3))
    littles = plan_threads(read_topology(root, allowed={0, 1}))
    assert (littles.inference_cores, littles.io_cores, littles.mode) == ((0, 1), (0, 1), "shared")
    assert plan_threads(read_topology(root, allowed={4, 5, 6, 7}), requested=16).intra_op_threads == 4


@pytest.mark.parametrize(
    ("requested", "inference", "io", "mode"),
    [
        (2, (4, 5), (0, 1, 2, 3), "big.LITTLE"),
        (6, (4, 5, 6, 7, 0, 1), (2, 3), "big.LITTLE"),
        (99, (4, 5, 6, 7, 0, 1, 2, 3), (0, 1, 2, 3, 4, 5, 6, 7), "shared"),
    ],
)
def test_requested_threads(
    tmp_path: Path, requested: int, inference: tuple[int, ...], io: tuple[int, ...], mode: str
) -> None:
    plan = plan_threads(read_topology(_board_root(tmp_path, "rk3588/sbcbench_cpu_topology.txt")), requested=requested)
    assert (plan.inference_cores, plan.intra_op_threads, plan.io_cores, plan.mode) == (
        inference,
        len(inference),
        io,
        mode,
    )
    assert f"{requested} threads requested" in plan.reason
    assert ("clipped to 8" in plan.reason) == (requested > 8)


def test_reserve_io_core_switch(tmp_path: Path) -> None:
    root = _board_root(tmp_path, "rpi5/sbcbench_cpu_topology.txt")
    shared = plan_threads(read_topology(root), reserve_io_core=False)
    assert (shared.inference_cores, shared.mode, shared.engine_pin()) == ((0, 1, 2, 3), "shared", ())
    three = read_topology(root, allowed={1, 2, 3})
    assert plan_threads(three).mode == "shared"  # 3 cores: no reserve by default
    forced = plan_threads(three, reserve_io_core=True)
    assert (forced.inference_cores, forced.io_cores) == ((2, 3), (1,))
    one = plan_threads(read_topology(root, allowed={2}), reserve_io_core=True)
    assert (one.inference_cores, one.io_cores, one.intra_op_threads) == ((2,), (2,), 1)
    assert plan_threads(read_topology(root), requested=1).inference_cores == (1,)


@pytest.mark.parametrize(
    ("relpath", "clusters", "inference"),
    [
        ("rk3588/sbcbench_cpu_topology.txt", ((4, 5, 6, 7), (0, 1, 2, 3)), (4, 5, 6, 7)),
        ("s922x/sbcbench_cpu_topology.txt", ((2, 3, 4, 5), (0, 1)), (2, 3, 4, 5)),
        ("rpi4/sbcbench_cpu_topology.txt", ((0, 1, 2, 3),), (1, 2, 3)),
    ],
)
def test_no_cpufreq_groups_by_part(
    relpath: str, clusters: tuple[tuple[int, ...], ...], inference: tuple[int, ...], tmp_path: Path
) -> None:
    """VMs and kernels without a cpufreq driver: clocks unknown (0), the CPU part still separates big from little."""
    topo = read_topology(_board_root(tmp_path, relpath, cpufreq=False))
    assert {c.max_khz for c in topo.cores} == {0}
    assert topo.clusters == clusters
    assert plan_threads(topo).inference_cores == inference


def _synthetic_root(root: Path, cores: list[tuple[int, int, str]]) -> Path:
    """A tree from (cpu, max MHz, part) triples: one cpufreq policy per distinct clock, arm64 cpuinfo."""
    policies = {mhz: min(c for c, m, _ in cores if m == mhz) for _, mhz, _ in cores}
    rows = [Row(cpu, 0, policies[mhz], 500, mhz, "synthetic") for cpu, mhz, _ in cores]
    _sysfs_from_table(root, rows)
    text = "".join(f"processor\t: {c}\nCPU implementer\t: 0x41\nCPU part\t: {p}\n\n" for c, _, p in cores)
    _write(root / "proc/cpuinfo", text)
    return root


def test_same_part_at_two_clocks_is_two_speed_classes(tmp_path: Path) -> None:
    """Synthetic (no capture): a Helio-X20-like layout, one core type in a 1.4 GHz and a 1.85 GHz cluster."""
    topo = read_topology(_synthetic_root(tmp_path, [(c, 1400 if c < 4 else 1850, "0xd03") for c in range(8)]))
    assert topo.clusters == ((4, 5, 6, 7), (0, 1, 2, 3))
    assert plan_threads(topo).io_cores == (0, 1, 2, 3)


def test_three_speed_classes_keep_the_slowest_for_io(tmp_path: Path) -> None:
    """Synthetic (no capture): 1×X2 @3.0 + 3×A710 @2.5 + 4×A510 @1.8, the layout of recent phone SoCs."""
    cores = [(c, 1800, "0xd46") for c in range(4)] + [(c, 2500, "0xd47") for c in (4, 5, 6)] + [(7, 3000, "0xd48")]
    topo = read_topology(_synthetic_root(tmp_path, cores))
    assert topo.clusters == ((7,), (4, 5, 6), (0, 1, 2, 3))
    assert (topo.big, topo.little) == ((7, 4, 5, 6), (0, 1, 2, 3))
    plan = plan_threads(topo)
    assert (plan.inference_cores, plan.io_cores) == ((7, 4, 5, 6), (0, 1, 2, 3))
    assert plan.reason.startswith("big.LITTLE: 1×cortex-x2 @3 GHz + 3×cortex-a710 @2.5 GHz (cpu4-7) for inference")


def test_garbage_cpuinfo_gives_unknown_cores(tmp_path: Path) -> None:
    garbage = b"\x00\xff\xfe processor: x\nCPU part : banana\n:::\nprocessor : 99999999\n\x1b[31m"
    topo = read_topology(_board_root(tmp_path, "rpi4/sbcbench_cpu_topology.txt", cpuinfo=garbage))
    assert [c.id for c in topo.cores] == [0, 1, 2, 3]
    assert {(c.part, c.model) for c in topo.cores} == {(None, "unknown")}
    assert {c.max_khz for c in topo.cores} == {1_800_000}


def test_empty_root_still_has_one_core(tmp_path: Path) -> None:
    topo = read_topology(tmp_path)
    assert topo.cores == (Core(0, 0, None, "unknown"),)
    plan = plan_threads(topo)
    assert (plan.inference_cores, plan.intra_op_threads) == ((0,), 1)


def test_plan_rejects_an_empty_topology() -> None:
    with pytest.raises(ValueError, match="no cores"):
        plan_threads(Topology((), (), "test"))


_SYSFS_VALUES = [b"0", b"1", b"0-3", b"4-5", b"0-7\n", b"1800000\n", b"2400000", b"-1", b"", b"0,2-3", b"\xff\xfe"]
_PER_CPU = ("cpufreq/cpuinfo_max_freq", "cpufreq/related_cpus", "topology/cluster_id", "topology/physical_package_id")
_file = st.one_of(st.sampled_from(_SYSFS_VALUES), st.binary(max_size=24), st.none())


@FUZZ
@given(
    cpuinfo=st.one_of(st.text(max_size=400), st.binary(max_size=400)),
    online=_file,
    per_cpu=st.lists(st.tuples(_file, _file, _file, _file, _file), max_size=6),
    allowed=st.one_of(st.none(), st.sets(st.integers(0, 7), max_size=8)),
    requested=st.integers(-2, 20),
    reserve=st.sampled_from([None, True, False]),
)
def test_fuzzed_trees_always_plan_within_allowed_cores(
    cpuinfo: str | bytes,
    online: bytes | None,
    per_cpu: list[tuple[bytes | None, ...]],
    allowed: set[int] | None,
    requested: int,
    reserve: bool | None,
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _write(root / "proc/cpuinfo", cpuinfo)
        sysfs = root / "sys/devices/system/cpu"
        if online is not None:
            _write(sysfs / "online", online)
        for n, files in enumerate(per_cpu):
            paths = [sysfs / f"cpu{n}" / name for name in _PER_CPU] + [sysfs / f"cpufreq/policy{n}/related_cpus"]
            for path, content in zip(paths, files, strict=True):
                if content is not None:
                    _write(path, content)
        topo = read_topology(root, allowed=allowed)
    ids = [c.id for c in topo.cores]
    assert isinstance(topo, Topology) and ids and len(set(ids)) == len(ids)
    if allowed:
        assert set(ids) <= allowed
    assert sorted(c for cl in topo.clusters for c in cl) == sorted(ids)
    plan = plan_threads(topo, requested=requested, reserve_io_core=reserve)
    assert 1 <= plan.intra_op_threads == len(plan.inference_cores) <= len(ids)
    assert set(plan.inference_cores) <= set(ids) and plan.io_cores and set(plan.io_cores) <= set(ids)
    assert set(plan.engine_pin()) <= set(plan.inference_cores)
    assert plan.reason


@FUZZ
@given(st.text(max_size=2000))
def test_parse_cpuinfo_never_raises(text: str) -> None:
    procs = parse_cpuinfo(text)
    assert all(isinstance(n, int) and isinstance(v, dict) for n, v in procs.items())


@pytest.fixture
def cv2_threads() -> Iterator[Any]:
    """OpenCV, with its process-wide thread count restored after the test."""
    cv2 = pytest.importorskip("cv2")
    before = cv2.getNumThreads()
    yield cv2
    cv2.setNumThreads(before)


def test_apply_budget(monkeypatch: pytest.MonkeyPatch, cv2_threads: Any) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")  # an operator's choice wins
    cv2_threads.setNumThreads(4)
    apply_budget(ThreadPlan((1, 2, 3), 3, (0,), 1, 1, "test", "reserve"))
    assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["MKL_NUM_THREADS"] == "1"
    assert os.environ["OPENBLAS_NUM_THREADS"] == "3"
    assert cv2_threads.getNumThreads() == 1


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two allowed cores to see a change")
def test_pin_current_thread_changes_only_the_calling_thread() -> None:
    before = os.sched_getaffinity(0)
    target = max(before)
    seen: dict[str, object] = {}

    def work() -> None:
        seen["pinned"] = pin_current_thread([target])
        seen["mask"] = os.sched_getaffinity(0)
        seen["topology"] = tuple(c.id for c in read_topology().cores)  # taskset-like: only the pinned core

    worker = threading.Thread(target=work, name="edge-test-pin", daemon=True)
    worker.start()
    worker.join(10)
    assert seen == {"pinned": True, "mask": {target}, "topology": (target,)}
    assert os.sched_getaffinity(0) == before


def test_pin_current_thread_refuses_impossible_cores() -> None:
    assert pin_current_thread([]) is False
    assert pin_current_thread([4095]) is False  # not a CPU of this machine: EINVAL
    assert pin_current_thread([-1]) is False


def test_apply_budget_does_not_load_opencv_but_opencv_starts_with_the_budget() -> None:
    """OpenCV costs ~15 MB: the budget reaches it through OPENCV_FOR_THREADS_NUM when it loads later."""
    import subprocess
    import sys

    from tests.conftest import REPO

    code = (
        "import os, sys\n"
        "os.environ.pop('OPENCV_FOR_THREADS_NUM', None)\n"
        "from runtime.cpu import ThreadPlan, apply_budget\n"
        "apply_budget(ThreadPlan((0,), 1, (0,), 1, 1, 'test', 'shared'))\n"
        "assert 'cv2' not in sys.modules\n"
        "import cv2\n"
        "print(cv2.getNumThreads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
