"""CPU topology and the thread plan: which cores run inference, which run I/O, one thread budget for all.

Reading (:func:`read_topology`). Per-core maximum clocks come from sysfs cpufreq ``cpuinfo_max_freq``
(never ``scaling_max_freq``: a governor or an operator may have capped it), the core type from the
``/proc/cpuinfo`` "CPU part" (decoded to a name such as ``cortex-a76``; x86 keeps its "model name"), and
the physical clusters from ``topology/cluster_id``, ``topology/physical_package_id`` and the cpufreq policy
each core belongs to. Missing or unreadable files never raise: an unknown clock is 0, an unknown part None.
On the live system (root ``/``) only the cores in ``os.sched_getaffinity(0)`` count, so a container's
cpuset or ``taskset`` shrinks the plan and nothing ever lands on a core the process may not use.

Speed classes (``Topology.clusters``): cores of one part whose maximum clocks lie within 10 % of each
other, fastest first. The tolerance keeps binned clusters of one core type together (RK3588 A76 pairs
can be binned a few % apart; Intel "favoured cores" boost ~100 MHz higher). When any core's clock is
unknown (VMs, kernels without a cpufreq driver) clocks are ignored: cores group by part only and the
classes are ordered by core class (Cortex-X > big > in-order little).

Policy (:func:`plan_threads`); the plan never uses a core outside the topology's (allowed) cores:

* big.LITTLE (two or more speed classes): inference on every class but the slowest (RK3588: the four
  A76; S922X: the four A73), intra-op threads = their number; the I/O threads (logbook writer, MQTT)
  run on the slowest class.
* Same clock everywhere but two or more physical clusters of at least two cores (Jetson Orin: cpu0-3
  and cpu4-5, all A78AE at one clock): inference on every cluster but the smallest, I/O on the smallest.
  On a two-cluster chip the intra-op threads then share one L3 instead of synchronising across
  clusters, and I/O gets a cluster of its own.
* Uniform with 4 or more cores (Raspberry Pi, Jetson Nano): inference on all cores but the lowest one,
  I/O on that one (cpu0, which by default also takes most interrupts on these boards). Without the reserve the
  SQLite writer or the MQTT thread preempts an intra-op thread now and then, and since every operator
  waits for its slowest thread the whole inference stalls for that time slice.
* Uniform with 3 or fewer cores, or ``reserve_io_core=False``: every core runs inference and I/O shares
  them. Nothing is pinned, so the scheduler can move an inference thread away from a busy I/O thread.

``requested`` > 0 sets the intra-op thread count, clipped to the allowed cores: the first cores of the
default inference set, then the remaining cores fastest first. OpenCV gets 1 thread: preprocessing is
one small resize/convert per frame in the same loop as inference, and an OpenCV pool would only compete
with the intra-op threads. BLAS/OpenMP get 1 for the same reason (onnxruntime runs its own pool).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Core",
    "ThreadPlan",
    "Topology",
    "apply_budget",
    "parse_cpuinfo",
    "pin_current_thread",
    "plan_threads",
    "read_topology",
]

log = logging.getLogger(__name__)

_SYSFS = "sys/devices/system/cpu"
_MAX_CPUS = 4096  # core numbers at or above this are treated as garbage
_MAX_KHZ = 100_000_000  # 100 GHz: anything above is not a clock
_SAME_SPEED = 0.9  # cores of one part within 10 % of the fastest belong to one speed class
_BLAS_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_LITTLE, _BIG, _PRIME = 0, 1, 2

# (implementer, part) -> (name, class). Part numbers from the Arm TRMs as listed in Linux
# arch/arm64/include/asm/cputype.h; classes: in-order little, big, Cortex-X/Neoverse-V prime.
_PARTS: dict[tuple[str, str], tuple[str, int]] = {
    ("0x41", "0xb76"): ("arm1176", _LITTLE), ("0x41", "0xc05"): ("cortex-a5", _LITTLE),
    ("0x41", "0xc07"): ("cortex-a7", _LITTLE), ("0x41", "0xc08"): ("cortex-a8", _LITTLE),
    ("0x41", "0xc09"): ("cortex-a9", _BIG), ("0x41", "0xc0d"): ("cortex-a17", _BIG),
    ("0x41", "0xc0e"): ("cortex-a17", _BIG), ("0x41", "0xc0f"): ("cortex-a15", _BIG),
    ("0x41", "0xd01"): ("cortex-a32", _LITTLE), ("0x41", "0xd02"): ("cortex-a34", _LITTLE),
    ("0x41", "0xd03"): ("cortex-a53", _LITTLE), ("0x41", "0xd04"): ("cortex-a35", _LITTLE),
    ("0x41", "0xd05"): ("cortex-a55", _LITTLE), ("0x41", "0xd06"): ("cortex-a65", _LITTLE),
    ("0x41", "0xd07"): ("cortex-a57", _BIG), ("0x41", "0xd08"): ("cortex-a72", _BIG),
    ("0x41", "0xd09"): ("cortex-a73", _BIG), ("0x41", "0xd0a"): ("cortex-a75", _BIG),
    ("0x41", "0xd0b"): ("cortex-a76", _BIG), ("0x41", "0xd0c"): ("neoverse-n1", _BIG),
    ("0x41", "0xd0d"): ("cortex-a77", _BIG), ("0x41", "0xd0e"): ("cortex-a76ae", _BIG),
    ("0x41", "0xd40"): ("neoverse-v1", _PRIME), ("0x41", "0xd41"): ("cortex-a78", _BIG),
    ("0x41", "0xd42"): ("cortex-a78ae", _BIG), ("0x41", "0xd43"): ("cortex-a65ae", _LITTLE),
    ("0x41", "0xd44"): ("cortex-x1", _PRIME), ("0x41", "0xd46"): ("cortex-a510", _LITTLE),
    ("0x41", "0xd47"): ("cortex-a710", _BIG), ("0x41", "0xd48"): ("cortex-x2", _PRIME),
    ("0x41", "0xd49"): ("neoverse-n2", _BIG), ("0x41", "0xd4a"): ("neoverse-e1", _LITTLE),
    ("0x41", "0xd4b"): ("cortex-a78c", _BIG), ("0x41", "0xd4c"): ("cortex-x1c", _PRIME),
    ("0x41", "0xd4d"): ("cortex-a715", _BIG), ("0x41", "0xd4e"): ("cortex-x3", _PRIME),
    ("0x41", "0xd4f"): ("neoverse-v2", _PRIME), ("0x41", "0xd80"): ("cortex-a520", _LITTLE),
    ("0x41", "0xd81"): ("cortex-a720", _BIG), ("0x41", "0xd82"): ("cortex-x4", _PRIME),
    ("0x41", "0xd84"): ("neoverse-v3", _PRIME), ("0x41", "0xd85"): ("cortex-x925", _PRIME),
    ("0x41", "0xd87"): ("cortex-a725", _BIG), ("0x41", "0xd8e"): ("neoverse-n3", _BIG),
    ("0x48", "0xd01"): ("tsv110", _BIG),  # HiSilicon Kunpeng 920
    ("0x4e", "0x000"): ("denver", _BIG), ("0x4e", "0x003"): ("denver2", _BIG),
    ("0x4e", "0x004"): ("carmel", _BIG),  # NVIDIA Jetson Xavier
    ("0x51", "0x800"): ("kryo-2xx-gold", _BIG), ("0x51", "0x801"): ("kryo-2xx-silver", _LITTLE),
    ("0x51", "0x802"): ("kryo-3xx-gold", _BIG), ("0x51", "0x803"): ("kryo-3xx-silver", _LITTLE),
    ("0x51", "0x804"): ("kryo-4xx-gold", _BIG), ("0x51", "0x805"): ("kryo-4xx-silver", _LITTLE),
}  # fmt: skip
_CLASS = {name: cls for name, cls in _PARTS.values()}


@dataclass(frozen=True)
class Core:
    """One logical CPU: its number, maximum clock (kHz, 0 = unknown), CPU part and core name."""

    id: int
    max_khz: int
    part: str | None  # /proc/cpuinfo "CPU part", normalised ("0xd08"); None on x86 or when unknown
    model: str  # "cortex-a72" from the part table, else the "model name" line, else "unknown"


@dataclass(frozen=True)
class Topology:
    """The cores this process may use, grouped into speed classes (fastest first) and physical clusters."""

    cores: tuple[Core, ...]
    clusters: tuple[tuple[int, ...], ...]  # speed classes: same part, same max clock (±10 %), fastest first
    source: str  # what it was read from, for logs and `status`
    domains: tuple[tuple[int, ...], ...] = ()  # physical clusters (cluster/package id, cpufreq policy)

    @property
    def is_big_little(self) -> bool:
        """True when the cores come in two or more speed classes."""
        return len(self.clusters) > 1

    @property
    def big(self) -> tuple[int, ...]:
        """Cores of every speed class but the slowest (all cores on a uniform CPU), fastest first."""
        if not self.is_big_little:
            return tuple(c for cl in self.clusters for c in cl)
        return tuple(c for cl in self.clusters[:-1] for c in cl)

    @property
    def little(self) -> tuple[int, ...]:
        """Cores of the slowest speed class on big.LITTLE; () on a uniform CPU."""
        return self.clusters[-1] if self.is_big_little else ()

    def core(self, cpu: int) -> Core:
        """The :class:`Core` numbered ``cpu`` (KeyError when it is not in this topology)."""
        for c in self.cores:
            if c.id == cpu:
                return c
        raise KeyError(cpu)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready summary for `status` and logs."""
        return {
            "cores": [
                {"id": c.id, "model": c.model, "part": c.part, "max_mhz": round(c.max_khz / 1000)} for c in self.cores
            ],
            "clusters": [list(cl) for cl in self.clusters],
            "domains": [list(d) for d in self.domains],
            "source": self.source,
        }


@dataclass(frozen=True)
class ThreadPlan:
    """Where inference and I/O threads run and how many threads each library may start.

    ``mode`` is "big.LITTLE", "clusters", "reserve" or "shared" (I/O shares the inference cores).
    """

    inference_cores: tuple[int, ...]
    intra_op_threads: int
    io_cores: tuple[int, ...]
    opencv_threads: int
    blas_threads: int
    reason: str
    mode: str = "shared"

    @property
    def pinned(self) -> bool:
        """True when inference and I/O have cores of their own (then pinning pays off)."""
        return bool(self.inference_cores) and set(self.inference_cores).isdisjoint(self.io_cores)

    def engine_pin(self) -> tuple[int, ...]:
        """Cores for ``EngineOptions.pin_cores``; () when I/O shares the cores (let the OS balance).

        onnxruntime pins its pool threads to ``[1:]``; the thread that calls ``run()`` is intra-op
        thread 0, so pin it to ``[0]`` with :func:`pin_current_thread`.
        """
        return self.inference_cores[: self.intra_op_threads] if self.pinned else ()

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready copy for `status` and logs."""
        return {
            "mode": self.mode,
            "inference_cores": list(self.inference_cores),
            "intra_op_threads": self.intra_op_threads,
            "io_cores": list(self.io_cores),
            "opencv_threads": self.opencv_threads,
            "blas_threads": self.blas_threads,
            "engine_pin": list(self.engine_pin()),
            "reason": self.reason,
        }


def parse_cpuinfo(text: str) -> dict[int, dict[str, str]]:
    """``/proc/cpuinfo`` as {processor: {key: value}}; never raises.

    Lines outside a processor block (the "Processor : ARMv7 ..." header and the shared CPU part block
    of old 32-bit ARM kernels, the Hardware/Serial trailer) apply to every processor that lacks them.
    Text with no "processor : N" line but CPU fields (old uniprocessor kernels) is processor 0.
    """
    return _merge(*_parse_blocks(text))


def _merge(per: dict[int, dict[str, str]], common: dict[str, str]) -> dict[int, dict[str, str]]:
    if not per:
        return {0: dict(common)} if any(k in common for k in ("CPU part", "model name", "Processor")) else {}
    return {n: {**common, **fields} for n, fields in sorted(per.items())}


def _parse_blocks(text: str) -> tuple[dict[int, dict[str, str]], dict[str, str]]:
    per: dict[int, dict[str, str]] = {}
    common: dict[str, str] = {}
    current: dict[str, str] | None = None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if not line.strip():
                current = None  # a blank line ends a processor block
            continue
        key, value = " ".join(key.split()), value.strip()
        if key == "processor":
            number = _int(value)
            if number is not None and 0 <= number < _MAX_CPUS:
                current = per.setdefault(number, {})
                continue
        (common if current is None else current).setdefault(key, value)
    return per, common


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:  # also the >4300-digit guard of int()
        return None


def _hex(text: str | None, width: int) -> str | None:
    """Normalise "0xD08" / "0xd08 " to "0xd08"; None when it is not a hex number."""
    if text is None or not re.fullmatch(r"0[xX][0-9a-fA-F]{1,8}", text.strip()):
        return None
    return f"0x{int(text.strip(), 16):0{width}x}"


def _identity(info: dict[str, str]) -> tuple[str | None, str]:
    """(normalised CPU part, core name) for one processor's fields."""
    part = _hex(info.get("CPU part"), 3)
    implementer = _hex(info.get("CPU implementer"), 2)
    if part is not None and implementer is not None and (implementer, part) in _PARTS:
        return part, _PARTS[implementer, part][0]
    named = info.get("model name") or info.get("Processor") or ""
    named = " ".join(named.split())[:80]
    if named:
        return part, named
    return part, f"{implementer or '?'}/{part}" if part else "unknown"


def _read(path: Path, limit: int = 1 << 16) -> str | None:
    try:
        with open(path, "rb") as fh:
            return fh.read(limit).decode("utf-8", "replace")
    except (OSError, ValueError):
        return None


def _cpu_list(text: str | None) -> list[int]:
    """A kernel CPU list ("0-3,6") as numbers; [] when the text is not one."""
    if not text or not text.strip():
        return []
    cpus: set[int] = set()
    for item in text.strip().split(","):
        lo, sep, hi = item.partition("-")
        first, last = _int(lo), _int(hi) if sep else _int(lo)
        if first is None or last is None or not 0 <= first <= last < _MAX_CPUS:
            return []
        cpus.update(range(first, last + 1))
    return sorted(cpus)


def _listdir(path: Path, pattern: str) -> list[tuple[int, str]]:
    try:
        names = os.listdir(path)
    except (OSError, ValueError):
        return []
    found = (re.fullmatch(pattern, n) for n in names)
    return sorted((int(m.group(1)), m.group(0)) for m in found if m and int(m.group(1)) < _MAX_CPUS)


def _cpufreq(sysfs: Path, cpu: int, policies: dict[int, Path]) -> tuple[int, int]:
    """(cpuinfo_max_freq in kHz or 0, frequency-domain key or -1) for one core."""
    own = sysfs / f"cpu{cpu}" / "cpufreq"
    where = own if os.path.isdir(own) else policies.get(cpu)
    if where is None:
        return 0, -1
    khz = _int(_read(where / "cpuinfo_max_freq")) or 0
    members = _cpu_list(_read(where / "related_cpus")) or _cpu_list(_read(where / "affected_cpus"))
    return (khz if 0 < khz < _MAX_KHZ else 0), (members[0] if cpu in members else -1)


def _policies(sysfs: Path) -> dict[int, Path]:
    """Which cpufreq/policyN directory each core belongs to (by related_cpus)."""
    owner: dict[int, Path] = {}
    for _, name in _listdir(sysfs / "cpufreq", r"policy([0-9]{1,5})"):
        where = sysfs / "cpufreq" / name
        for cpu in _cpu_list(_read(where / "related_cpus")) or _cpu_list(_read(where / "affected_cpus")):
            owner.setdefault(cpu, where)
    return owner


def _online(sysfs: Path, cpuinfo: dict[int, dict[str, str]]) -> tuple[list[int], str]:
    for name in ("online", "possible"):
        cpus = _cpu_list(_read(sysfs / name))
        if cpus:
            return cpus, name
    dirs = [n for n, _ in _listdir(sysfs, r"cpu([0-9]{1,5})")]
    if dirs:
        return dirs, "cpuN directories"
    return sorted(cpuinfo), "/proc/cpuinfo"


def _allowed(allowed: Iterable[int] | None, live: bool) -> set[int]:
    """The cores the plan may use: ``allowed`` ∩ this process's affinity on the live system; empty = any."""
    mask = set(os.sched_getaffinity(0)) if live and hasattr(os, "sched_getaffinity") else set()
    given = {int(c) for c in allowed if 0 <= int(c) < _MAX_CPUS} if allowed is not None else set()
    if given and mask:
        return (given & mask) or mask
    return given or mask


def read_topology(root: Path = Path("/"), *, allowed: Iterable[int] | None = None) -> Topology:
    """Read the cores under ``root`` (``/`` or a recorded tree) into a :class:`Topology`; never raises.

    Only online cores that are in ``allowed`` count; at ``/`` the process's own affinity mask limits
    them too. Missing files give unknown values, not errors.
    """
    root = Path(root)
    sysfs = root / _SYSFS
    live = Path(os.path.abspath(root)) == Path("/")
    per, common = _parse_blocks(_read(root / "proc" / "cpuinfo", 1 << 22) or "")
    cpuinfo = _merge(per, common)
    ids, listed_by = _online(sysfs, cpuinfo)
    permitted = _allowed(allowed, live)
    if permitted:
        ids = [c for c in ids if c in permitted] or sorted(permitted)
    ids = ids or [0]
    policies = _policies(sysfs)
    cores: list[Core] = []
    keys: dict[int, tuple[int, int, int]] = {}
    for cpu in ids:
        khz, domain = _cpufreq(sysfs, cpu, policies)
        part, model = _identity(cpuinfo.get(cpu, common))
        cores.append(Core(cpu, khz, part, model))
        topo = sysfs / f"cpu{cpu}" / "topology"
        cluster, package = _int(_read(topo / "cluster_id")), _int(_read(topo / "physical_package_id"))
        keys[cpu] = (-1 if cluster is None else cluster, -1 if package is None else package, domain)
    source = (
        f"{root}: cores {_cpus(ids)} ({listed_by}{', affinity' if permitted else ''}); "
        f"cpufreq {sum(c.max_khz > 0 for c in cores)}/{len(cores)}; "
        f"CPU part {sum(c.part is not None for c in cores)}/{len(cores)}"
    )
    return Topology(tuple(cores), _speed_classes(cores), source, _group(keys))


def _speed_classes(cores: Sequence[Core]) -> tuple[tuple[int, ...], ...]:
    use_clock = all(c.max_khz > 0 for c in cores)
    kinds: dict[tuple[str | None, str], list[Core]] = {}
    for c in cores:
        kinds.setdefault((c.part, c.model), []).append(c)
    groups: list[list[Core]] = []
    for members in kinds.values():
        start = len(groups)
        for c in sorted(members, key=lambda c: (-c.max_khz, c.id)):
            if len(groups) > start and (not use_clock or c.max_khz >= _SAME_SPEED * groups[-1][0].max_khz):
                groups[-1].append(c)
            else:
                groups.append([c])

    def rank(g: list[Core]) -> tuple[int, int, int, int]:
        clock = g[0].max_khz if use_clock else 0
        return clock, _CLASS.get(g[0].model, _BIG), len(g), -min(c.id for c in g)

    groups.sort(key=rank, reverse=True)
    return tuple(tuple(sorted(c.id for c in g)) for g in groups)


def _group(keys: dict[int, tuple[int, int, int]]) -> tuple[tuple[int, ...], ...]:
    groups: dict[tuple[int, int, int], list[int]] = {}
    for cpu in sorted(keys):
        groups.setdefault(keys[cpu], []).append(cpu)
    return tuple(tuple(g) for g in groups.values())


def _cpus(cpus: Iterable[int]) -> str:
    """Kernel-style list: [0, 1, 2, 3, 6] -> "0-3,6"."""
    runs: list[list[int]] = []
    for c in sorted(set(cpus)):
        if runs and runs[-1][1] == c - 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _describe(topo: Topology, cpus: Sequence[int], *, clock: bool = True) -> str:
    """ "4×cortex-a76 @2.4 GHz (cpu4-7)"."""
    models: dict[str, list[Core]] = {}
    for cpu in cpus:
        core = topo.core(cpu)
        models.setdefault(core.model, []).append(core)
    text = []
    for model, cores in models.items():
        khz = max(c.max_khz for c in cores)
        text.append(f"{len(cores)}×{model}" + (f" @{khz / 1e6:.3g} GHz" if clock and khz else ""))
    return f"{' + '.join(text)} (cpu{_cpus(cpus)})"


def _default_split(topo: Topology, order: list[int], reserve: bool | None) -> tuple[list[int], list[int], str, str]:
    """(inference cores, I/O cores, mode, label) before any requested count."""
    if topo.is_big_little:
        return list(topo.big), list(topo.little), "big.LITTLE", "big.LITTLE"
    present = set(order)
    domains = [d for d in (tuple(c for c in d if c in present) for d in topo.domains) if d]
    if reserve is not False and len(domains) > 1 and all(len(d) > 1 for d in domains):
        smallest = min(domains, key=lambda d: (len(d), -d[0]))  # ties: the higher-numbered cluster
        return [c for c in order if c not in smallest], list(smallest), "clusters", f"{len(domains)} clusters"
    if len(order) > 1 and (reserve if reserve is not None else len(order) >= 4):
        first = min(order)
        return [c for c in order if c != first], [first], "reserve", "uniform"
    return list(order), list(order), "shared", "uniform"


def plan_threads(topo: Topology, *, requested: int = 0, reserve_io_core: bool | None = None) -> ThreadPlan:
    """Plan inference and I/O threads for ``topo`` by the policy in the module docstring.

    ``requested`` > 0 overrides the intra-op thread count (clipped to the topology's cores);
    ``reserve_io_core`` None = the default for the core count, True/False forces it on uniform CPUs.
    """
    ids = [c.id for c in topo.cores]
    if not ids:
        raise ValueError("plan_threads: the topology has no cores")
    listed = [c for cl in topo.clusters for c in cl if c in set(ids)]
    order = list(dict.fromkeys(listed + ids))  # fastest first; cores missing from clusters last
    infer, io, mode, label = _default_split(topo, order, reserve_io_core)
    note = ""
    if requested > 0:
        count = min(requested, len(order))
        infer = list(dict.fromkeys(infer + order))[:count]
        io = [c for c in io if c not in infer]
        note = f"; {requested} threads requested" + (f", clipped to {count} allowed cores" if count < requested else "")
    if not io or not set(io).isdisjoint(infer):
        why = "reserve_io_core=False" if reserve_io_core is False else f"only {len(order)} cores"
        why = "the requested threads use every core" if requested > 0 and not io else why
        io, mode = sorted(order), "shared"
        reason = f"{label}: {_describe(topo, infer)} for inference, I/O shares them ({why}){note}"
    else:
        reason = f"{label}: {_describe(topo, infer)} for inference, {_describe(topo, io, clock=False)} for I/O{note}"
    return ThreadPlan(tuple(infer), len(infer), tuple(io), 1, 1, reason, mode)


def apply_budget(plan: ThreadPlan) -> None:
    """Hand OpenCV and BLAS/OpenMP their share of ``plan``.

    OpenCV: ``cv2.setNumThreads(plan.opencv_threads)`` when cv2 is loaded, else ``OPENCV_FOR_THREADS_NUM``
    so it starts with that budget whenever the first image arrives (OpenCV is not imported here).
    BLAS/OpenMP: ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` and ``MKL_NUM_THREADS`` are set to
    ``plan.blas_threads`` only when unset; a value the operator exported (systemd ``Environment=``)
    wins and is logged. Those libraries read the variables when they load, so this reaches child
    processes and libraries loaded later, not a BLAS this process has already loaded.
    """
    for name in _BLAS_ENV:
        current = os.environ.get(name)
        if current is None:
            os.environ[name] = str(plan.blas_threads)
        elif current != str(plan.blas_threads):
            log.info("%s=%s set by the environment; keeping it (plan says %d)", name, current, plan.blas_threads)
    # OpenCV costs ~15 MB resident: do not import it just to set its thread count. When it is
    # already loaded, set it now; otherwise OPENCV_FOR_THREADS_NUM makes it start with the budget.
    cv2 = sys.modules.get("cv2")
    if cv2 is not None:
        cv2.setNumThreads(plan.opencv_threads)
    else:
        os.environ.setdefault("OPENCV_FOR_THREADS_NUM", str(plan.opencv_threads))


def pin_current_thread(cores: Sequence[int]) -> bool:
    """Restrict the calling thread (only that thread, on Linux) to ``cores``; False when not possible.

    Threads started afterwards by this thread inherit the mask (onnxruntime's pool included), so pin
    I/O threads from their own ``run()`` to ``plan.io_cores``, not from the inference thread.
    """
    if not cores or not hasattr(os, "sched_setaffinity") or not all(0 <= c < _MAX_CPUS for c in cores):
        return False
    try:
        os.sched_setaffinity(0, cores)
    except (OSError, ValueError, OverflowError, TypeError) as exc:
        log.debug("cannot pin thread to cores %s: %s", list(cores), exc)
        return False
    return True
