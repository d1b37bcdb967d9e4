"""The ``model.deploy`` and ``model.rollback`` commands: argument checks, fetching, and the rollout driver.

``model.deploy`` is acked ``accepted`` at once and finishes later (:class:`runtime.commands.Deferred`):
the :class:`Deployer` runs the rollout on its own thread through the states of :mod:`runtime.rollout`
— fetch (the delta when the store holds its base, falling back to the full bundle on any delta
failure), verify into the store, load the candidate, shadow and canary under the gates, activate —
and sends the final ack ``{"outcome", "state", "reason", "name", "version", "previous", "metrics"}``
when it ends (``ok`` for active, ``error`` for rolled_back, ``refused`` for refused). Every
transition is a logbook event ``rollout.<state>``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from runtime.commands import Command, Deferred
from runtime.errors import (
    BundleError,
    CommandError,
    CommandRefused,
    DeltaError,
    DownloadError,
    EdgeError,
    IntegrityError,
    SignatureError,
    StoreError,
)
from runtime.rollout import MAX_RESUMES, Gates, Ledger, Rollout, judge
from runtime.schema import from_dict
from runtime.shadow import SharedModel, Trial

__all__ = ["STRATEGIES", "Deployer", "parse_deploy"]

log = logging.getLogger(__name__)

STRATEGIES = ("immediate", "shadow", "canary")
_SHA = re.compile(r"[0-9a-f]{64}")
_FIRST_STAGE = {"immediate": "activating", "canary": "canary", "shadow": "shadow"}
_ACK_STATUS = {"active": "ok", "rolled_back": "error", "refused": "refused"}
KILL_ENV = "EDGE_TEST_KILL_AT"  # tests only: "downloading" (after the first bytes) or "activating" (pointer moved)


class _Host(Protocol):
    """What the deployer needs from the service."""

    def load(self, bundle: str | Path) -> Any: ...

    def serving(self) -> Any: ...

    def start_trial(self, candidate: SharedModel, stage: str, shadow_share: float, canary_share: float) -> Trial: ...

    def stop_trial(self) -> None: ...

    def promote(self, candidate: SharedModel) -> None: ...

    def event(self, kind: str, message: str, *, level: str = "info", **data: Any) -> None: ...


def _text(args: Mapping[str, Any], key: str, where: str, *, required: bool = True) -> str:
    value = args.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not 0 < len(value) <= 2048:
        raise CommandError(f"args.{where}{key}: expected a non-empty string")
    return value


def _source(args: Any, where: str, extra: frozenset[str]) -> dict[str, Any]:
    if not isinstance(args, Mapping):
        raise CommandError(f"args.{where.rstrip('.')}: expected an object with url and sha256")
    unknown = sorted(set(args) - {"url", "sha256", "size"} - extra)
    if unknown:
        raise CommandError(f"args.{where}{unknown[0][:40]}: unknown key")
    sha = _text(args, "sha256", where)
    if not _SHA.fullmatch(sha):
        raise CommandError(f"args.{where}sha256: expected 64 lower-case hex digits")
    size = args.get("size")
    if size is not None and (type(size) is not int or size < 0):
        raise CommandError(f"args.{where}size: expected a byte count >= 0")
    return {"url": _text(args, "url", where), "sha256": sha, "size": size}


def parse_deploy(args: Mapping[str, Any], defaults: Any) -> dict[str, Any]:
    """The normalised ``model.deploy`` args (CommandError naming the bad arg); ``defaults`` is ``[rollout]``."""
    unknown = sorted(set(args) - {"bundle", "delta", "strategy", "gates", "canary_share", "shadow_share"})
    if unknown:
        raise CommandError(f"args.{unknown[0][:40]}: unknown argument")
    bundle = _source(args.get("bundle"), "bundle.", frozenset({"name", "version", "profile"}))
    for key in ("name", "version", "profile"):
        bundle[key] = _text(args["bundle"], key, "bundle.", required=False)
    delta = None
    if args.get("delta") is not None:
        delta = _source(args["delta"], "delta.", frozenset({"from"}))
        base = args["delta"].get("from")
        if not isinstance(base, Mapping) or set(base) != {"name", "version", "sha256"}:
            raise CommandError("args.delta.from: expected {name, version, sha256} of the bundle the delta applies to")
        delta["from"] = {k: _text(base, k, "delta.from.") for k in ("name", "version", "sha256")}
    strategy = args.get("strategy", "shadow")
    if strategy not in STRATEGIES:
        raise CommandError(f"args.strategy: expected one of {', '.join(STRATEGIES)}")
    gates_arg = args.get("gates", {})
    if not isinstance(gates_arg, Mapping):
        raise CommandError("args.gates: expected an object")
    base_gates = {k: getattr(defaults, k) for k in asdict(Gates())}
    try:
        gates = from_dict(Gates, {**base_gates, **gates_arg})
    except EdgeError as exc:
        raise CommandError(f"args.gates: {exc}") from exc
    shares = {}
    for key in ("shadow_share", "canary_share"):
        value = args.get(key, getattr(defaults, key))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1 or math.isnan(value):
            raise CommandError(f"args.{key}: expected a number with 0 < share <= 1")
        shares[key] = float(value)
    return {"bundle": bundle, "delta": delta, "strategy": strategy, "gates": asdict(gates), **shares}


class Deployer:
    """Runs one rollout at a time for the service (``host``); ``finish(rollout) -> bool`` sends the final ack."""

    def __init__(
        self,
        host: _Host,
        *,
        store: Any,
        ledger: Ledger,
        state_dir: Path,
        trusted_keys: list[Any],
        defaults: Any,
        fleet: str = "default",
        poll_s: float = 0.05,
    ) -> None:
        self.host, self.store, self.ledger = host, store, ledger
        self.downloads = Path(state_dir) / "downloads"
        self.trusted_keys = trusted_keys
        self.defaults, self.fleet, self.poll_s = defaults, fleet, poll_s
        self.link: Any = None
        self.finish: Callable[[Rollout], bool] | None = None
        self.candidate: SharedModel | None = None
        self.trial: Trial | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._cancel: str | None = None
        self._lock = threading.Lock()
        self._kill_at = os.environ.get(KILL_ENV, "")  # fault injection for tests only; read once

    # --- commands -------------------------------------------------------------------------------

    def deploy(self, cmd: Command) -> dict[str, Any] | Deferred:
        """``model.deploy``: checks now (refusals are synchronous), the rollout itself finishes later."""
        spec = parse_deploy(cmd.args, self.defaults)
        serving = self.host.serving()
        want, have = spec["bundle"]["profile"], serving.manifest.profile.name if serving is not None else ""
        if want and have and want != have:
            raise CommandRefused(f"wrong-profile: the bundle is built for {want}, this device runs {have}", cmd.id)
        b = spec["bundle"]
        if serving is not None and b["name"] == serving.name and b["version"] == serving.version:
            return {
                "outcome": "active",
                "state": "active",
                "reason": "already active",
                "name": b["name"],
                "version": b["version"],
                "previous": None,
                "metrics": {},
            }
        with self._lock:
            running = self.ledger.unfinished()
            if running:
                raise CommandRefused(f"busy: rollout {running[0].id} is {running[0].state}; wait for its outcome")
            previous = {"name": serving.name, "version": serving.version} if serving is not None else None
            r = self.ledger.create(
                Rollout(
                    cmd.id,
                    "downloading",
                    spec["strategy"],
                    b["name"],
                    b["version"],
                    spec,
                    from_dict(Gates, spec["gates"]),
                    previous=previous,
                )
            )
            self._event(r, f"downloading {b['name'] or 'a bundle'} {b['version']} from {b['url']}")
            self._start(r.id)
        return Deferred("rollout started")

    def rollback(self, cmd: Command) -> dict[str, Any]:
        """``model.rollback`` (args ``version``, ``name``: optional): cancels a running rollout, then switches."""
        unknown = sorted(set(cmd.args) - {"name", "version"})
        if unknown:
            raise CommandError(f"args.{unknown[0][:40]}: unknown argument; model.rollback takes name and version")
        version = _text(cmd.args, "version", "", required=False)
        name = _text(cmd.args, "name", "", required=False)
        serving = self.host.serving()
        cancelled = self._cancel_running(f"cancelled by model.rollback {cmd.id}")
        if cancelled and not version:
            return {"active": _ref(serving), "from": cancelled, "cancelled": True}
        try:
            target = self.store.get(name or serving.name, version) if version else self.store.previous()
        except StoreError as exc:
            raise CommandError(str(exc), command_id=cmd.id) from exc
        if target is None:
            raise CommandError("no previous version on this device; name one with args.version", command_id=cmd.id)
        model = self.host.load(target.path)  # EdgeError → error ack, nothing changed
        try:
            self.store.rollback(target.key, reason=f"model.rollback command {cmd.id}")
        except StoreError as exc:
            model.close()
            raise CommandError(str(exc), command_id=cmd.id) from exc
        self.host.promote(SharedModel(model))
        self.host.event(
            "model.rolled_back",
            f"rolled back to {target.name} {target.version}",
            command=cmd.id,
            name=target.name,
            version=target.version,
            previous=_ref(serving),
        )
        return {"active": {"name": target.name, "version": target.version}, "from": _ref(serving)}

    def _cancel_running(self, reason: str) -> dict[str, str] | None:
        thread = self._thread
        running = self.ledger.unfinished()
        if not running or thread is None or not thread.is_alive():
            return None
        self._cancel = reason
        thread.join(30.0)
        self._cancel = None
        return {"name": running[0].name, "version": running[0].version}

    # --- start-up -------------------------------------------------------------------------------

    def recover(self) -> list[Rollout]:
        """At start, before the store boots: finish rollouts caught in ``activating`` by the store pointer."""
        done = []
        active = self.store.active()
        for r in self.ledger.unfinished():
            if r.state != "activating":
                continue
            if active is not None and active.key == (r.name, r.version):
                r = self.ledger.move(r.id, "active", reason="activation completed after a restart")
            else:
                r = self.ledger.move(r.id, "rolled_back", reason="interrupted: restarted before the activation")
            self._event(r, r.reason)
            done.append(r)
        return done

    def resume(self) -> None:
        """Send final acks still owed and carry on with an unfinished rollout (its stage starts again)."""
        for r in self.ledger.unacked():
            self._ack(r)
        for r in self.ledger.unfinished():
            if r.state in ("shadow", "canary"):
                r = self.ledger.update(r.id, resumes=r.resumes + 1)
            log.warning("resuming rollout %s (%s %s) in state %s", r.id, r.name, r.version, r.state)
            self._start(r.id)
            break

    def status(self) -> dict[str, Any] | None:
        """The latest rollout for ``status`` (live metrics while a stage runs)."""
        r = self.ledger.latest()
        if r is None:
            return None
        out = r.to_dict()
        trial = self.trial
        if trial is not None and not r.done:
            out["metrics"] = trial.metrics().summary()
        return out

    def close(self) -> None:
        """Stop the rollout thread; an unfinished rollout stays in the ledger and resumes at the next start."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30.0)
        self._drop_candidate()

    # --- the rollout thread ---------------------------------------------------------------------

    def _start(self, rollout_id: str) -> None:
        self._thread = threading.Thread(target=self._run, args=(rollout_id,), name="edge-rollout", daemon=True)
        self._thread.start()

    def _run(self, rollout_id: str) -> None:
        r = self.ledger.get(rollout_id)
        try:
            if r.state == "downloading":
                r = self._download(r)
            if r.state == "verified":
                r = self._load(r)
            while r.state in ("shadow", "canary") and not self._stop.is_set():
                r = self._stage(r)
            if r.state == "activating" and not self._stop.is_set():
                r = self._activate(r)
        except Exception as exc:  # the rollout must end in a state, never take the service down
            log.exception("rollout %s failed", rollout_id)
            r = self._end(self.ledger.get(rollout_id), "rolled_back", f"internal: {type(exc).__name__}: {exc}")
        if r.state != "active":
            self._drop_candidate()
        if r.done:
            self._ack(r)

    def _download(self, r: Rollout) -> Rollout:
        from runtime.download import fetch

        b = r.spec["bundle"]
        dest = self.downloads / f"{r.id}.tar"
        try:
            path = self._via_delta(r, dest) if r.spec.get("delta") else None
            if path is None:
                path = fetch(
                    b["url"],
                    dest,
                    sha256=b["sha256"],
                    size=b["size"],
                    link=self.link,
                    fleet=self.fleet,
                    progress=self._progress,
                )
            stored = self.store.add(path, trusted_keys=self.trusted_keys, source=b["url"])
        except DownloadError as exc:
            return self._end(r, "refused", f"download: {exc}")
        except (BundleError, StoreError) as exc:
            return self._end(r, "refused", f"{_refusal(exc)}: {exc}")
        with contextlib.suppress(OSError):
            dest.unlink()
        serving = self.host.serving()
        have = serving.manifest.profile.name if serving is not None else stored.profile
        if stored.profile != have:
            return self._end(
                r, "refused", f"wrong-profile: the bundle is built for {stored.profile}, this device runs {have}"
            )
        for key in ("name", "version"):
            if b[key] and b[key] != getattr(stored, key):
                return self._end(
                    r, "refused", f"mismatch: args.bundle.{key} is {b[key]}, the bundle says {getattr(stored, key)}"
                )
        self.ledger.update(r.id, name=stored.name, version=stored.version)
        return self._move(r, "verified", f"{stored.name} {stored.version} verified and stored")

    def _progress(self, done: int, total: int | None) -> None:
        if done > 0:
            self._maybe_kill("downloading")

    def _maybe_kill(self, point: str) -> None:
        if self._kill_at == point:
            log.error("%s=%s: killing this process (fault injection)", KILL_ENV, point)
            os.kill(os.getpid(), signal.SIGKILL)

    def _via_delta(self, r: Rollout, dest: Path) -> Path | None:
        from runtime.delta import apply_delta
        from runtime.download import fetch

        d, b = r.spec["delta"], r.spec["bundle"]
        base = d["from"]
        try:
            old = self.store.get(base["name"], base["version"])
            if old.sha256 != base["sha256"]:
                raise DeltaError(f"the device holds {old.name} {old.version} with sha256 {old.sha256}")
            delta = fetch(
                d["url"],
                self.downloads / f"{r.id}.delta",
                sha256=d["sha256"],
                size=d["size"],
                link=self.link,
                fleet=self.fleet,
            )
            out = apply_delta(old.path, delta, dest, expected_sha256=b["sha256"])
            self.store.add(out, trusted_keys=self.trusted_keys, source=d["url"])  # signature checked here
        except (StoreError, DeltaError, DownloadError, BundleError) as exc:
            self._event(
                r, f"delta failed, fetching the full bundle: {exc}", kind="rollout.delta_failed", level="warning"
            )
            with contextlib.suppress(OSError):
                dest.unlink()
            return None
        with contextlib.suppress(OSError):
            delta.unlink()
        return out

    def _load(self, r: Rollout) -> Rollout:
        if self.candidate is None:
            try:
                stored = self.store.get(r.name, r.version)
                self.candidate = SharedModel(self.host.load(stored.path))
            except EdgeError as exc:
                return self._end(r, "rolled_back", f"load: {exc}")
        if r.state == "verified":
            return self._move(r, _FIRST_STAGE[r.strategy], "")
        return r

    def _stage(self, r: Rollout) -> Rollout:
        if r.resumes > MAX_RESUMES:
            return self._end(r, "rolled_back", f"crash-loop: the service restarted {r.resumes} times during {r.state}")
        r = self._load(r)
        if r.done or self.candidate is None:
            return r
        spec = r.spec
        if self.trial is None:
            self.trial = self.host.start_trial(self.candidate, r.state, spec["shadow_share"], spec["canary_share"])
        else:
            self.trial.set_stage(r.state)
        self._event(r, f"{r.state}: judging {r.name} {r.version} beside the active model")
        started, saved = time.monotonic(), time.monotonic()
        while not self._stop.wait(self.poll_s):
            m = self.trial.metrics()
            verdict = judge(r.gates, m, time.monotonic() - started)
            if self._cancel is not None:
                verdict = verdict.__class__("fail", self._cancel)
            if verdict.decision == "fail":
                return self._end(r, "rolled_back", verdict.reason, metrics=m.summary())
            if verdict.decision == "pass":
                return self._move(r, "canary" if r.state == "shadow" else "activating", "gates met", m.summary())
            if time.monotonic() - saved >= 1.0:
                self.ledger.update(r.id, metrics=m.summary())
                saved = time.monotonic()
        return r

    def _activate(self, r: Rollout) -> Rollout:
        r = self._load(r)
        if r.done or self.candidate is None:
            return r
        self._stop_trial()
        try:
            self.store.activate(r.name, r.version)
        except StoreError as exc:
            return self._end(r, "rolled_back", f"activate: {exc}")
        self._maybe_kill("activating")
        candidate, self.candidate = self.candidate, None
        self.host.promote(candidate)
        return self._end(r, "active", "serving")

    # --- bookkeeping ----------------------------------------------------------------------------

    def _stop_trial(self) -> float:
        """Detach the trial so every request goes to the active model; returns how long that took (ms)."""
        t0 = time.perf_counter()
        trial, self.trial = self.trial, None
        if trial is None:
            return 0.0
        self.host.stop_trial()  # from here on no request reaches the candidate
        took = (time.perf_counter() - t0) * 1000.0
        trial.stop()  # waits for a shadow sample still running on the candidate: nobody waits for it
        return took

    def _drop_candidate(self) -> None:
        self._stop_trial()
        candidate, self.candidate = self.candidate, None
        if candidate is not None:
            candidate.retire()

    def _move(self, r: Rollout, state: str, reason: str, metrics: dict[str, Any] | None = None) -> Rollout:
        r = self.ledger.move(r.id, state, reason=reason, metrics=metrics)
        self._event(r, reason or state)
        return r

    def _end(self, r: Rollout, state: str, reason: str, *, metrics: dict[str, Any] | None = None) -> Rollout:
        metrics = dict(metrics if metrics is not None else r.metrics)
        if state == "rolled_back":
            metrics["rollback_ms"] = round(self._stop_trial(), 3)  # from the failing verdict to the old model alone
        r = self.ledger.move(r.id, state, reason=reason, metrics=metrics)
        level = "info" if state == "active" else "error" if state == "rolled_back" else "warning"
        self._event(r, reason, level=level)
        return r

    def _event(self, r: Rollout, message: str, *, kind: str = "", level: str = "info") -> None:
        data = {"rollout": r.id, "name": r.name, "version": r.version, "reason": r.reason, "metrics": r.metrics}
        self.host.event(kind or f"rollout.{r.state}", message, level=level, **data)

    def _ack(self, r: Rollout) -> None:
        finish = self.finish
        if finish is not None and finish(r):
            self.ledger.update(r.id, acked=True)

    @staticmethod
    def final_ack(r: Rollout) -> tuple[str, dict[str, Any]]:
        """(ack status, result) of a finished rollout."""
        result = {
            "outcome": r.state,
            "state": r.state,
            "reason": r.reason,
            "name": r.name,
            "version": r.version,
            "previous": r.previous,
            "metrics": r.metrics,
        }
        return _ACK_STATUS.get(r.state, "error"), result


def _refusal(exc: Exception) -> str:
    """The reason prefix of a bundle the store refused (the store wraps the bundle's own error)."""
    cause = exc if isinstance(exc, BundleError) else exc.__cause__
    if isinstance(cause, SignatureError):
        return "signature"
    if isinstance(cause, IntegrityError):
        return "integrity"
    return "bundle" if isinstance(cause, BundleError) else "store"


def _ref(model: Any) -> dict[str, str] | None:
    return {"name": model.name, "version": model.version} if model is not None else None
