"""Fleet rollout: which bundle each device gets, the canary share first, then the rest; stop and roll back on failure.

:func:`load_offers` reads each bundle's manifest (without trusting it: the devices verify) and keys
it by the profile it was built for. :func:`plan_rollout` matches the targeted devices' retained
status (``"profile"``) with those bundles: devices without a bundle for their profile, offline or
unknown ones, and ones already running the version are *skipped* and reported. The canary is
``ceil(share × n)`` devices of every profile (at least one each), so every bundle is tried before
the rest of the fleet gets it; the rest follow in waves.

:class:`Rollout` sends ``model.deploy`` to one device per command (each gets its profile's bundle),
all of a phase at once, and waits for their final acks. An ack's ``result.outcome`` is the
device's verdict: ``active`` succeeded; ``rolled_back`` (a gate failed), ``refused``, ``error`` and
``timeout`` (no final ack) are failures. When the failures pass ``max_failures`` the rollout stops,
the devices it made active are sent ``model.rollback`` to the version they ran before, and the
devices of later phases are never sent anything.

:func:`add_deltas` pairs each bundle with the one it replaces (``--delta-from``, same model and
profile) and writes a delta beside the new bundle (``<new>.from-<old version>.delta``); a device
whose status says it runs that old version gets the delta in its command too, applies it to the
bundle it holds and falls back to the full bundle if anything is off.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from toolchain.errors import ToolchainError, UsageError

if TYPE_CHECKING:
    from toolchain.fleet import Ack, DeviceStatus, Fleet

__all__ = [
    "GATE_KEYS",
    "GOOD",
    "STRATEGIES",
    "VIAS",
    "Assignment",
    "DeltaOffer",
    "DeviceResult",
    "Limit",
    "Offer",
    "Plan",
    "Progress",
    "Rollout",
    "RolloutReport",
    "Skip",
    "add_deltas",
    "check_gates",
    "load_offers",
    "outcome_of",
    "parse_limit",
    "parse_share",
    "plan_rollout",
    "require_devices",
]

log = logging.getLogger(__name__)

STRATEGIES = ("shadow", "canary", "immediate")
VIAS = ("file", "http", "mqtt")
#: ``model.deploy`` gates (judged on the device) and the per-device traffic shares, as --gates KEY=VALUE.
GATE_KEYS = frozenset({"min_samples", "max_p95_ratio", "min_agreement", "max_error_rate", "max_duration_s"})
_SHARE_KEYS = frozenset({"canary_share", "shadow_share"})
_MAX_WORKERS = 128

Via = Literal["file", "http", "mqtt"]


# --- input --------------------------------------------------------------------------------------


def parse_share(text: str, flag: str) -> float:
    """``10%`` or ``0.1`` → 0.1; UsageError naming ``flag`` unless 0 < share <= 1."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100.0 if raw.endswith("%") else float(raw)
    except ValueError:
        raise UsageError(f"expected a share like 10% or 0.1, got {text!r}", flag=flag) from None
    if not 0.0 < value <= 1.0 or math.isnan(value):
        raise UsageError(f"expected a share in (0, 100%], got {text!r}", flag=flag)
    return value


@dataclass(frozen=True)
class Limit:
    """How many failures a rollout tolerates: a count, or a share of the devices sent so far."""

    count: int | None = 0
    share: float | None = None

    def exceeded(self, failures: int, sent: int) -> bool:
        """True when ``failures`` out of ``sent`` is more than allowed."""
        if self.share is not None:
            return failures > self.share * sent
        return failures > (self.count or 0)

    def __str__(self) -> str:
        return f"{self.share:.0%}" if self.share is not None else str(self.count)


def parse_limit(text: str) -> Limit:
    """``0``, ``2`` (devices) or ``5%`` (of the devices sent so far) → :class:`Limit`."""
    if text.strip().endswith("%"):
        try:
            share = float(text.strip()[:-1]) / 100.0
        except ValueError:
            raise UsageError(f"expected a count or a percentage, got {text!r}", flag="--max-failures") from None
        if not 0.0 <= share < 1.0:
            raise UsageError(f"expected 0% <= share < 100%, got {text!r}", flag="--max-failures")
        return Limit(count=None, share=share)
    try:
        count = int(text)
    except ValueError:
        raise UsageError(f"expected a count or a percentage, got {text!r}", flag="--max-failures") from None
    if count < 0:
        raise UsageError(f"expected a count >= 0, got {text!r}", flag="--max-failures")
    return Limit(count=count)


def check_gates(gates: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
    """Split --gates into (gates, traffic shares); UsageError for an unknown key or a non-number."""
    out: dict[str, Any] = {}
    shares: dict[str, float] = {}
    for key, value in gates.items():
        if key not in GATE_KEYS | _SHARE_KEYS:
            known = ", ".join(sorted(GATE_KEYS | _SHARE_KEYS))
            raise UsageError(f"unknown gate {key!r}; expected one of {known}", flag="--gates")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise UsageError(f"{key}: expected a number >= 0, got {value!r}", flag="--gates")
        if key in _SHARE_KEYS:
            shares[key] = parse_share(str(value), f"--gates {key}")
        elif key == "min_samples":
            if int(value) != value:
                raise UsageError(f"min_samples: expected a whole number, got {value!r}", flag="--gates")
            out[key] = int(value)
        else:
            out[key] = float(value)
    return out, shares


@dataclass(frozen=True)
class DeltaOffer:
    """A delta that turns the bundle a device holds (``base``) into the offered one."""

    path: Path
    sha256: str
    size: int
    url: str
    base: dict[str, str]  # name, version, sha256 of the bundle it applies to

    def wire(self) -> dict[str, Any]:
        """The ``delta`` object of ``model.deploy``."""
        return {"url": self.url, "sha256": self.sha256, "size": self.size, "from": dict(self.base)}


@dataclass(frozen=True)
class Offer:
    """One bundle as offered to the devices of its profile (with a delta for those on ``delta.base``)."""

    path: Path
    name: str
    version: str
    profile: str
    sha256: str
    size: int
    url: str
    delta: DeltaOffer | None = None

    def wire(self) -> dict[str, Any]:
        """The ``bundle`` object of ``model.deploy``."""
        return {
            "url": self.url,
            "sha256": self.sha256,
            "size": self.size,
            "name": self.name,
            "version": self.version,
            "profile": self.profile,
        }

    def delta_for(self, model: str | None, version: str | None) -> DeltaOffer | None:
        """The delta when a device running ``model`` ``version`` can apply it, else None."""
        base = self.delta.base if self.delta is not None else None
        return self.delta if base is not None and (model, version) == (base["name"], base["version"]) else None


def _url(path: Path, sha256: str, via: Via, base_url: str | None) -> str:
    if via == "file":
        return path.resolve().as_uri()
    if via == "mqtt":
        return f"mqtt://{sha256}"
    if not base_url or urllib.parse.urlsplit(base_url).scheme not in ("http", "https"):
        raise UsageError("--via http needs the http(s) URL the bundles are served under", flag="--base-url")
    return base_url.rstrip("/") + "/" + urllib.parse.quote(path.name)


def _offer(path: Path, via: Via, base_url: str | None, *, flag: str = "--bundle") -> Offer:
    from runtime.errors import EdgeError
    from toolchain.bundle import inspect_bundle

    if path.is_dir():
        raise UsageError(f"{path} is a directory; deploy sends a bundle .tar (toolchain build writes one)", flag=flag)
    if not path.is_file():
        raise UsageError(f"{path}: not found", flag=flag)
    try:
        info = inspect_bundle(path)
    except EdgeError as exc:
        raise UsageError(f"{path}: not a readable bundle ({exc})", flag=flag) from exc
    manifest = info["manifest"]
    return Offer(
        path=path,
        name=manifest["name"],
        version=manifest["version"],
        profile=manifest["profile"]["name"],
        sha256=info["sha256"],
        size=info["size"],
        url=_url(path, info["sha256"], via, base_url),
    )


def load_offers(paths: Sequence[Path], *, via: Via = "file", base_url: str | None = None) -> dict[str, Offer]:
    """Profile → bundle; UsageError for a missing file, two bundles for one profile, or different model names."""
    if not paths:
        raise UsageError("name at least one bundle", flag="--bundle")
    offers: dict[str, Offer] = {}
    for path in paths:
        offer = _offer(Path(path), via, base_url)
        if offer.profile in offers:
            other = offers[offer.profile].path
            raise UsageError(f"{other} and {path} are both built for {offer.profile}; give one", flag="--bundle")
        offers[offer.profile] = offer
    names = sorted({o.name for o in offers.values()})
    if len(names) > 1:
        raise UsageError(
            f"the bundles are of different models ({', '.join(names)}); deploy one model at a time", flag="--bundle"
        )
    return offers


def add_deltas(
    offers: Mapping[str, Offer], olds: Sequence[Path], *, via: Via = "file", base_url: str | None = None
) -> dict[str, Offer]:
    """``offers`` with a delta from each of ``olds`` (the bundles devices run now) to its profile's new bundle.

    The delta is written beside the new bundle as ``<new>.from-<old version>.delta`` (served and
    published the way the bundle is). UsageError (``--delta-from``) for an old bundle no offer matches
    by model and profile, or of the offered version; a delta not smaller than its bundle is dropped.
    """
    from toolchain.delta import diff_bundles

    out = dict(offers)
    seen: set[str] = set()
    for raw in olds:
        old = _offer(Path(raw), via, base_url, flag="--delta-from")
        new = out.get(old.profile)
        if new is None or new.name != old.name:
            raise UsageError(
                f"{old.path} is {old.name} for {old.profile}; no --bundle of that model for that profile",
                flag="--delta-from",
            )
        if old.profile in seen:
            raise UsageError(f"two old bundles for {old.profile}; give one", flag="--delta-from")
        seen.add(old.profile)
        if old.version == new.version:
            raise UsageError(f"{old.path} is the offered version {new.version} itself", flag="--delta-from")
        out_path = new.path.with_name(f"{new.path.stem}.from-{old.version}.delta")
        try:
            info = diff_bundles(old.path, new.path, out_path)
        except OSError as exc:
            raise ToolchainError(
                f"cannot write the delta {out_path}: {exc.strerror}; it goes beside the bundle"
            ) from exc
        if info.delta_size >= new.size:
            log.warning("the delta from %s is not smaller than %s; devices get the full bundle", old.path, new.path)
            continue
        sha = hashlib.sha256(info.path.read_bytes()).hexdigest()
        delta = DeltaOffer(
            path=info.path,
            sha256=sha,
            size=info.delta_size,
            url=_url(info.path, sha, via, base_url),
            base={"name": old.name, "version": old.version, "sha256": old.sha256},
        )
        out[old.profile] = replace(new, delta=delta)
    return out


# --- plan ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Skip:
    """A targeted device that gets nothing, and why."""

    device: str
    profile: str | None
    reason: str
    current: bool = False  # it already runs the version: nothing to do, not a failure
    version: str | None = None  # what its status says it runs


@dataclass(frozen=True)
class Assignment:
    """A device, the bundle for its profile, and what it runs now."""

    device: str
    profile: str
    offer: Offer
    model: str | None
    version: str | None


@dataclass(frozen=True)
class Plan:
    """Phases in order (``canary``, ``wave 1``…) and the skipped devices."""

    phases: tuple[tuple[str, tuple[Assignment, ...]], ...]
    skipped: tuple[Skip, ...]

    @property
    def assignments(self) -> list[Assignment]:
        """Every device that will be sent a command, phase by phase."""
        return [a for _, phase in self.phases for a in phase]


def _selected(
    statuses: Mapping[str, DeviceStatus], devices: Sequence[str], group: str | None
) -> tuple[list[DeviceStatus], list[Skip]]:
    if devices:
        chosen, skipped = [], []
        for d in dict.fromkeys(devices):
            st = statuses.get(d)
            if st is None:
                skipped.append(Skip(d, None, "unknown: no retained status from this device"))
            else:
                chosen.append(st)
        return chosen, skipped
    return [s for s in statuses.values() if group is None or s.group == group], []


def _skip(st: DeviceStatus, offers: Mapping[str, Offer]) -> Skip | None:
    if not st.online:
        return Skip(st.device, st.profile, "offline", version=st.version)
    if st.profile is None:
        return Skip(st.device, None, "its status names no profile", version=st.version)
    offer = offers.get(st.profile)
    if offer is None:
        return Skip(st.device, st.profile, f"no bundle for profile {st.profile}", version=st.version)
    if (st.model, st.version) == (offer.name, offer.version):
        return Skip(st.device, st.profile, f"already runs {offer.name} {offer.version}", True, st.version)
    return None


def plan_rollout(
    statuses: Mapping[str, DeviceStatus],
    offers: Mapping[str, Offer],
    *,
    devices: Sequence[str] = (),
    group: str | None = None,
    canary: float = 0.1,
    wave: int = 0,
) -> Plan:
    """Canary (per profile ``ceil(canary × n)``, at least 1) then the rest in waves of ``wave`` (0: one wave)."""
    chosen, skipped = _selected(statuses, devices, group)
    by_profile: dict[str, list[Assignment]] = {}
    for st in sorted(chosen, key=lambda s: s.device):
        skip = _skip(st, offers)
        if skip is not None:
            skipped.append(skip)
            continue
        assert st.profile is not None
        offer = offers[st.profile]
        by_profile.setdefault(st.profile, []).append(Assignment(st.device, st.profile, offer, st.model, st.version))
    first: list[Assignment] = []
    rest: list[Assignment] = []
    for members in by_profile.values():
        k = max(1, math.ceil(canary * len(members)))
        first += members[:k]
        rest += members[k:]
    rest.sort(key=lambda a: a.device)
    size = wave if wave > 0 else max(1, len(rest))
    waves = [tuple(rest[i : i + size]) for i in range(0, len(rest), size)]
    phases = [("canary", tuple(sorted(first, key=lambda a: a.device)))] if first else []
    phases += [(f"wave {i + 1}", w) for i, w in enumerate(waves)]
    return Plan(tuple(phases), tuple(sorted(skipped, key=lambda s: s.device)))


# --- outcomes -----------------------------------------------------------------------------------

#: Outcomes that count as success (``accepted``: sent without --wait-healthy and taken by the device).
GOOD = frozenset({"active", "accepted"})


def outcome_of(ack: Ack | None, *, waited: bool) -> tuple[str, str | None, dict[str, Any]]:
    """(outcome, reason, result) of a device's last ack for ``model.deploy``."""
    if ack is None:
        return "timeout", "no ack", {}
    result = dict(ack.result) if isinstance(ack.result, Mapping) else {}
    if not ack.final:
        if waited or ack.status != "accepted":
            return "timeout", f"no final ack (last: {ack.status})", result
        return "accepted", None, result
    outcome = result.get("outcome")
    reason = ack.reason or (result.get("reason") if isinstance(result.get("reason"), str) else None)
    if outcome in ("active", "rolled_back", "refused"):
        return str(outcome), reason or None, result
    if ack.status in ("refused", "error"):
        return ack.status, reason, result
    return "error", "the final ack carries no outcome", result


@dataclass
class DeviceResult:
    """What happened on one device: its deploy outcome and, if the rollout stopped, the rollback sent to it."""

    device: str
    profile: str | None
    phase: str | None
    outcome: str  # active, rolled_back, refused, error, timeout, accepted, up_to_date, skipped, not_sent
    reason: str | None = None
    from_version: str | None = None
    to_version: str | None = None
    state: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    rollback: str | None = None  # ok / refused / error / timeout when the operator sent model.rollback
    rollback_reason: str | None = None
    elapsed_s: float | None = None

    @property
    def version_now(self) -> str | None:
        """The version the device should be running after the rollout."""
        if self.outcome == "active" and self.rollback != "ok":
            return self.to_version
        return self.from_version

    def to_dict(self) -> dict[str, Any]:
        """JSON row."""
        return {
            "device": self.device,
            "profile": self.profile,
            "phase": self.phase,
            "outcome": self.outcome,
            "reason": self.reason,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "version_now": self.version_now,
            "state": self.state,
            "metrics": self.metrics,
            "rollback": self.rollback,
            "rollback_reason": self.rollback_reason,
            "elapsed_s": None if self.elapsed_s is None else round(self.elapsed_s, 3),
        }


# --- the driver ---------------------------------------------------------------------------------

#: ``progress(event, phase, count_or_result)``: ("phase", name, n devices), ("device", name, DeviceResult),
#: ("rollback", "rollback", n devices) — the CLI draws bars from it.
Progress = Callable[[str, str, Any], None]


@dataclass
class RolloutReport:
    """The plan, every device's result, and whether (and why) the rollout stopped."""

    plan: Plan
    offers: Mapping[str, Offer]
    results: dict[str, DeviceResult]
    stopped: bool = False
    stop_reason: str | None = None
    elapsed_s: float = 0.0
    waited: bool = True

    @property
    def ok(self) -> bool:
        """Not stopped, and every device sent a command ended active (accepted without waiting)."""
        done = [r for r in self.results.values() if r.outcome not in ("skipped", "not_sent")]
        return not self.stopped and bool(done) and all(r.outcome in GOOD or r.outcome == "up_to_date" for r in done)

    def counts(self) -> dict[str, int]:
        """Devices per outcome."""
        out: dict[str, int] = {}
        for r in self.results.values():
            out[r.outcome] = out.get(r.outcome, 0) + 1
        return dict(sorted(out.items()))

    def to_dict(self) -> dict[str, Any]:
        """What ``--json`` prints."""
        return {
            "ok": self.ok,
            "stopped": self.stopped,
            "stop_reason": self.stop_reason,
            "waited": self.waited,
            "elapsed_s": round(self.elapsed_s, 3),
            "bundles": [
                {
                    "path": str(o.path),
                    **o.wire(),
                    "delta": {"path": str(o.delta.path), **o.delta.wire()} if o.delta is not None else None,
                }
                for o in self.offers.values()
            ],
            "phases": [{"name": name, "devices": [a.device for a in phase]} for name, phase in self.plan.phases],
            "skipped": [
                {"device": s.device, "profile": s.profile, "version": s.version, "reason": s.reason}
                for s in self.plan.skipped
            ],
            "devices": [r.to_dict() for r in sorted(self.results.values(), key=lambda r: r.device)],
            "summary": self.counts(),
        }


class Rollout:
    """Drives a :class:`Plan` through a connected :class:`~toolchain.fleet.Fleet` (see the module docstring)."""

    def __init__(
        self,
        fleet: Fleet,
        plan: Plan,
        offers: Mapping[str, Offer],
        *,
        strategy: str = "shadow",
        gates: Mapping[str, Any] | None = None,
        shares: Mapping[str, float] | None = None,
        wait_healthy: bool = True,
        timeout_s: float = 900.0,
        accept_timeout_s: float = 10.0,
        ttl_s: float = 300.0,
        max_failures: Limit | None = None,
        rollback_on_stop: bool = True,
        progress: Progress | None = None,
    ) -> None:
        if strategy not in STRATEGIES:
            raise UsageError(f"expected one of {', '.join(STRATEGIES)}, got {strategy!r}", flag="--strategy")
        if timeout_s <= 0 or accept_timeout_s <= 0 or ttl_s <= 0:
            raise UsageError("must be a positive number of seconds", flag="--timeout/--ttl")
        self.fleet, self.plan, self.offers = fleet, plan, offers
        self.strategy = strategy
        self.gates, self.shares = dict(gates or {}), dict(shares or {})
        self.wait_healthy = wait_healthy
        self.timeout_s = timeout_s if wait_healthy else min(timeout_s, accept_timeout_s)
        self.ttl_s = ttl_s
        self.limit = max_failures or Limit()
        self.rollback_on_stop = rollback_on_stop
        self._progress = progress or (lambda event, phase, value: None)

    def args_for(self, a: Assignment) -> dict[str, Any]:
        """The ``model.deploy`` arguments for one device."""
        args: dict[str, Any] = {"bundle": a.offer.wire(), "strategy": self.strategy, **self.shares}
        delta = a.offer.delta_for(a.model, a.version)
        if delta is not None:
            args["delta"] = delta.wire()
        if self.gates:
            args["gates"] = dict(self.gates)
        return args

    def run(self) -> RolloutReport:
        """Every phase in turn until one fails past the limit; then roll the activated devices back."""
        started = time.monotonic()
        report = RolloutReport(self.plan, self.offers, {}, waited=self.wait_healthy)
        for s in self.plan.skipped:
            outcome = "up_to_date" if s.current else "skipped"
            report.results[s.device] = DeviceResult(s.device, s.profile, None, outcome, s.reason, s.version)
        sent = failures = 0
        for name, phase in self.plan.phases:
            if report.stopped:
                for a in phase:
                    report.results[a.device] = self._result(
                        a, None, "not_sent", "the rollout stopped before this phase"
                    )
                continue
            self._progress("phase", name, len(phase))
            for r in self._send_phase(name, phase):
                report.results[r.device] = r
            sent += len(phase)
            failed = [r for r in report.results.values() if r.phase == name and r.outcome not in GOOD]
            failures += len(failed)
            if self.limit.exceeded(failures, sent):
                report.stopped = True
                report.stop_reason = (
                    f"{failures} of {sent} device(s) failed by the end of the {name} (at most {self.limit} allowed): "
                    + ", ".join(f"{r.device} {r.outcome}" for r in failed[:5])
                    + (" …" if len(failed) > 5 else "")
                )
        if report.stopped and self.rollback_on_stop:
            self._roll_back([r for r in report.results.values() if r.outcome == "active"])
        report.elapsed_s = time.monotonic() - started
        return report

    def _result(self, a: Assignment, phase: str | None, outcome: str, reason: str | None) -> DeviceResult:
        return DeviceResult(a.device, a.profile, phase, outcome, reason, a.version, a.offer.version)

    def _send_one(self, phase: str, a: Assignment) -> DeviceResult:
        from toolchain.fleet import Target

        t0 = time.monotonic()
        out = self.fleet.send(
            "model.deploy",
            self.args_for(a),
            Target(device=a.device),
            expect=[a.device],
            timeout=self.timeout_s,
            ttl_s=self.ttl_s,
        )
        outcome, reason, result = outcome_of(out.acks.get(a.device), waited=self.wait_healthy)
        if not out.published:
            outcome, reason = "error", f"the broker did not take the command: {out.publish_error}"
        r = self._result(a, phase, outcome, reason)
        r.state = result.get("state") if isinstance(result.get("state"), str) else None
        r.metrics = dict(result["metrics"]) if isinstance(result.get("metrics"), Mapping) else {}
        r.elapsed_s = time.monotonic() - t0
        return r

    def _send_phase(self, name: str, phase: Iterable[Assignment]) -> list[DeviceResult]:
        jobs = list(phase)
        results: list[DeviceResult] = []
        with ThreadPoolExecutor(max_workers=max(1, min(_MAX_WORKERS, len(jobs)))) as pool:
            futures = [pool.submit(self._send_one, name, a) for a in jobs]
            for fut in as_completed(futures):
                r = fut.result()
                results.append(r)
                self._progress("device", name, r)
        return results

    def _rollback_one(self, r: DeviceResult, model: str | None) -> None:
        from toolchain.fleet import Target

        args = {"version": r.from_version, **({"name": model} if model else {})} if r.from_version else {}
        out = self.fleet.send(
            "model.rollback", args, Target(device=r.device), expect=[r.device], timeout=min(self.timeout_s, 120.0)
        )
        ack = out.acks.get(r.device)
        if ack is None or not ack.final:
            r.rollback, r.rollback_reason = "timeout", "no final ack to model.rollback"
        else:
            r.rollback, r.rollback_reason = ack.status, ack.reason
        self._progress("device", "rollback", r)

    def _roll_back(self, activated: list[DeviceResult]) -> None:
        if not activated:
            return
        self._progress("phase", "rollback", len(activated))
        models = {a.device: a.model for a in self.plan.assignments}
        with ThreadPoolExecutor(max_workers=max(1, min(_MAX_WORKERS, len(activated)))) as pool:
            for fut in as_completed([pool.submit(self._rollback_one, r, models.get(r.device)) for r in activated]):
                fut.result()


def require_devices(plan: Plan) -> None:
    """ToolchainError when the plan sends nothing (none targeted, or every one skipped and not up to date)."""
    if plan.assignments or (plan.skipped and all(s.current for s in plan.skipped)):
        return
    if not plan.skipped:
        raise ToolchainError("no device matches the target; check --device/--group/--all and --fleet")
    why = "; ".join(f"{s.device}: {s.reason}" for s in plan.skipped[:5]) + (" …" if len(plan.skipped) > 5 else "")
    raise ToolchainError(f"nothing to deploy: every targeted device is skipped ({why})")
