"""`edge-runtime serve`: wires model store, rollouts, thread plan, logbook, sources, HTTP endpoint, health, systemd."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from runtime.config import ServiceConfig
from runtime.durable import write_atomic
from runtime.errors import ConfigError, EdgeError, InputError
from runtime.serving import Models, feeds_for
from runtime.shadow import Trial

__all__ = ["Service", "log_command", "parse_since", "read_status"]

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"


class _Stats:
    """Rolling throughput and latency for STATUS and status.json."""

    def __init__(self, window: int = 256):
        self.latencies: deque[float] = deque(maxlen=window)
        self.stamps: deque[float] = deque(maxlen=window)
        self.total = 0
        self.failed = 0
        self.consecutive_failures = 0
        self.lock = threading.Lock()

    def ok(self, latency_ms: float) -> None:
        with self.lock:
            self.latencies.append(latency_ms)
            self.stamps.append(time.monotonic())
            self.total += 1
            self.consecutive_failures = 0

    def fail(self) -> int:
        with self.lock:
            self.failed += 1
            self.consecutive_failures += 1
            return self.consecutive_failures

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            lat = sorted(self.latencies)
            span = (self.stamps[-1] - self.stamps[0]) if len(self.stamps) > 1 else 0.0
            rate = (len(self.stamps) - 1) / span if span > 0 else 0.0
            p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else None
            return {
                "inferences": self.total,
                "failed": self.failed,
                "throughput_per_s": round(rate, 2),
                "latency_p95_ms": round(p95, 3) if p95 is not None else None,
            }


class Service:
    """The long-running device service. ``run()`` returns the process exit code."""

    def __init__(self, config: ServiceConfig, *, config_path: Path | None = None):
        self.cfg = config
        self.config_path = config_path
        self.liveness: Any = None
        self._options: Any = None
        self._busy_since: float | None = None
        self._reload = threading.Event()
        self._restart_requested = False
        self._stall_after = _test_stall()  # read once: not on the inference path
        self.link: Any = None
        self.sync: Any = None
        self.commands: Any = None
        self.escalator: Any = None
        self.stats = _Stats()
        self.stop_event = threading.Event()
        self.models: Models | None = None
        self._crash_version: str | None = None
        self.plan: dict[str, Any] = {}
        self.logbook: Any = None
        self.source: Any = None
        self.http: Any = None
        self.cache: Any = None
        self.smoother: Any = None
        self.health_snapshot: dict[str, Any] = {}
        self._io_cores: tuple[int, ...] = ()

    @property
    def model(self) -> Any:
        """The model new requests go to (None before ``open()``)."""
        return self.models.slot.current if self.models is not None else None

    # --- start-up ------------------------------------------------------------------------------

    def _trusted(self) -> list[Any]:
        from runtime.signing import load_public_key

        return [load_public_key(Path(k)) for k in self.cfg.trusted_keys]

    def _engine_options(self) -> Any:
        from runtime.cpu import apply_budget, pin_current_thread, plan_threads, read_topology
        from runtime.engine import EngineOptions

        reserve = {"auto": None, "yes": True, "no": False}[self.cfg.threads.reserve_io_core]
        plan = plan_threads(read_topology(), requested=self.cfg.threads.inference, reserve_io_core=reserve)
        apply_budget(plan)
        self.plan = plan.to_dict()
        self._io_cores = plan.io_cores
        # onnxruntime pins its pool threads to engine_pin()[1:]; the calling thread takes the first core
        own = plan.engine_pin()[:1] or plan.inference_cores
        if own:
            pin_current_thread(own)
        log.info("thread plan: %s", plan.reason)
        return EngineOptions(
            intra_op_threads=plan.intra_op_threads, pin_cores=plan.engine_pin(), cache_dir=self.cfg.cache_path
        )

    def load(self, bundle: str | Path) -> Any:
        """Verify and load a bundle (does not replace the serving model)."""
        from runtime.model import load_model
        from runtime.store import inject_crash

        model = load_model(
            Path(bundle), trusted_keys=self._trusted(), options=self._options, providers=self.cfg.providers or None
        )
        inject_crash(self._crash_version, model.version)
        model.warmup(self.cfg.warmup_runs)
        return model

    def swap(self, bundle: str | Path) -> bool:
        """Load ``bundle`` beside the serving model and switch to it; on any failure keep serving the old one."""
        assert self.models is not None, "open() first"
        return self.models.swap(bundle)

    def _clear_cache(self) -> None:
        if self.cache is not None:
            self.cache.clear()  # cached results belong to the old model

    def _open_logbook(self) -> Any:
        from runtime.logbook import Logbook, LogbookConfig

        lb = self.cfg.logbook
        return Logbook(
            LogbookConfig(
                path=self.cfg.logbook_path,
                flush_interval_s=lb.flush_interval_s,
                durable=lb.durable,
                soft_cap_mb=lb.soft_cap_mb,
                hard_cap_mb=lb.hard_cap_mb,
                outbox=self.cfg.mqtt.enabled,
            ),
            device_id=self.cfg.device,
        )

    def _open_source(self) -> Any:
        src = self.cfg.source
        if src.kind == "directory":
            from runtime.sources import DirectorySource

            return DirectorySource(Path(src.path), after=src.after)
        if src.kind in ("video", "camera"):
            from runtime.sources import VideoSource

            uri: str | int = src.path if src.kind == "video" else src.camera
            return VideoSource(uri, max_fps=src.max_fps, realtime=src.realtime)
        return None

    def _event(self, kind: str, message: str, *, level: str = "info", **data: Any) -> None:
        if self.logbook is not None:
            self.logbook.record_event(kind, message, data=data, level=level)

    # --- inference -----------------------------------------------------------------------------

    def infer_item(self, item: Any) -> dict[str, Any]:
        """Preprocess, run, post-process, log one item; the HTTP endpoint and the source loop both call it."""
        if self.cache is not None and item.digest:
            hit = self.cache.get(item.digest)
            if hit is not None:
                return {**hit, "cached": True}
        self._busy_since = time.monotonic()
        try:
            models = self.models
            assert models is not None, "open() first"
            trial = models.trial
            if trial is not None and trial.take_canary():
                served = self._canary(trial, item)
                if served is not None:
                    return served
            with models.slot.borrow() as model:
                return self._infer(model, item, trial)
        finally:
            self._busy_since = None

    def _canary(self, trial: Trial, item: Any) -> dict[str, Any] | None:
        """Serve ``item`` with the candidate; None (the active model serves it) when the candidate raised."""
        if not trial.candidate.acquire():
            return None
        try:
            model = trial.candidate.model
            try:
                feeds = feeds_for(model, item)
                pred = model.run(feeds, ref=item.ref)
            except Exception as exc:  # the candidate's failure is counted against it, never served
                log.debug("canary candidate raised on %s: %s", item.ref, exc)
                trial.canary_result(item, None)
                return None
            trial.canary_result(item, pred)
            return self._record(model, item, pred, feeds, canary=True)
        finally:
            trial.candidate.release()

    def _infer(self, model: Any, item: Any, trial: Trial | None = None) -> dict[str, Any]:
        if self._stall_after and self.stats.total >= self._stall_after:
            log.warning("EDGE_TEST_STALL_AFTER reached: stalling the inference loop (fault injection)")
            self.stop_event.wait()
        feeds = feeds_for(model, item)
        pred = model.run(feeds, ref=item.ref)
        if trial is not None:
            trial.served(feeds, pred)
        return self._record(model, item, pred, feeds)

    def _record(self, model: Any, item: Any, pred: Any, feeds: Any, *, canary: bool = False) -> dict[str, Any]:
        record = pred.to_dict()
        if self.smoother is not None and "topk" in record and pred.outputs and "#frame=" in item.ref:
            pp = model.manifest.postprocess
            record["smoothed"] = self.smoother.update(
                pred.outputs[0].reshape(-1), softmax=pp.softmax, labels=pp.labels
            ).to_dict()
        record.update(model=model.name, version=model.version)
        if canary:
            record["canary"] = True
        escalator = self.escalator
        if escalator is not None and escalator.wants(record):
            record = self._escalate(escalator, record, item, feeds)
        self.logbook.record_inference(
            model=model.name,
            version=model.version,
            input_ref=item.ref,
            latency_ms=pred.latency_ms,
            result=record,
            input_digest=item.digest,
        )
        self.stats.ok(pred.latency_ms)
        if self.cache is not None and item.digest:
            self.cache.put(item.digest, record)
        out: dict[str, Any] = record
        return out

    def _escalate(self, escalator: Any, record: dict[str, Any], item: Any, feeds: dict[str, Any]) -> dict[str, Any]:
        """Ask the server-side model (at most ``escalation.timeout_s``); the record gets both results."""
        from runtime.escalate import apply_escalation, encode_image

        # images go as they are (PNG, JPEG when large): the server preprocesses for its own, bigger model
        if item.kind == "image":
            payload: Any = encode_image(item.data, max_bytes=escalator.max_request_bytes)
        else:
            payload = next(iter(feeds.values()))
        out: dict[str, Any] = apply_escalation(record, escalator.escalate(record, payload))
        return out

    def _alive(self) -> bool:
        """The loop is alive unless an inference has been running longer than the stall limit."""
        busy = self._busy_since
        return busy is None or time.monotonic() - busy < self.cfg.watchdog.stall_after_s

    def _source_loop(self, max_items: int) -> int:
        done = 0
        for item in self.source:
            if self._reload.is_set():
                self._do_reload()
            if self.stop_event.is_set():
                break
            ack = getattr(self.source, "ack", None)
            try:
                self.infer_item(item)
                if ack is not None:
                    ack(item)
            except InputError as exc:
                log.warning("skipped %s: %s", item.ref, exc)
                self._event("input.rejected", str(exc), level="warning", input=item.ref)
                if ack is not None:
                    ack(item)
            except Exception as exc:  # the one guarded catch-all: log, count, give up after N in a row
                n = self.stats.fail()
                log.exception("inference failed on %s (%d in a row)", item.ref, n)
                if n >= self.cfg.max_consecutive_failures:
                    self._event("service.failing", f"{n} consecutive failures, exiting", level="error")
                    return 1
                del exc
            done += 1
            if max_items and done >= max_items:
                break
        return 0

    # --- running -------------------------------------------------------------------------------

    def open(self) -> None:
        """Plan threads, open the logbook, verify, load and warm up the bundle (no sources, no network).

        ``run()`` calls it first; benchmarks and embedders call ``open()`` … ``infer_item()`` … ``close()``.
        """
        from runtime.store import crash_injection

        self._options = self._engine_options()
        self.logbook = self._open_logbook()
        self._event("service.starting", f"edge-runtime starting on {self.cfg.device}", plan=self.plan)
        self._crash_version = crash_injection()
        self.models = Models(
            self.cfg, load=self.load, trusted_keys=self._trusted(), event=self._event, on_swap=self._clear_cache
        )
        try:
            self.models.boot()
        except EdgeError as exc:
            self._event("model.refused", f"cannot serve {self.cfg.bundle}: {exc}", level="error")
            raise

    def close(self) -> None:
        """Stop every part and release the model (idempotent)."""
        self._shutdown()

    def run(self, max_items: int = 0) -> int:
        """Start everything, serve until SIGTERM (or ``max_items`` inputs), stop cleanly; returns the exit code."""
        from runtime.notify import Notifier, WatchdogKeeper

        notifier = Notifier.from_env(unset=True)
        self._install_signals()
        keeper = None
        try:
            self.open()
            self._start_extras()
            if self.cfg.mqtt.enabled:
                self._start_mqtt()
            threading.Thread(target=self._resume_rollouts, name="edge-rollout-resume", daemon=True).start()
            self._pin_io_threads()
            notifier.ready(self._status_line())
            interval = notifier.watchdog_interval or 1.0
            keeper = WatchdogKeeper(notifier, self._alive, interval)
            keeper.start()
            rc = self._source_loop(max_items) if self.source is not None else self._idle_loop(max_items)
            notifier.stopping()
            if self._restart_requested:
                log.info("restart requested by a fleet command: exiting 1 so systemd starts a fresh process")
                return 1
            return rc
        finally:
            if keeper is not None:
                keeper.stop()
            self._shutdown()

    def _start_extras(self) -> None:
        from runtime.resultcache import ResultCache
        from runtime.smoothing import TemporalSmoother

        if self.cfg.cache.size:
            self.cache = ResultCache(self.cfg.cache.size)
        if self.cfg.source.smoothing_window:
            self.smoother = TemporalSmoother(self.cfg.source.smoothing_window)
        self.source = self._open_source()
        if self.cfg.http.enabled:
            from runtime.httpapi import HttpEndpoint

            h = self.cfg.http
            self.http = HttpEndpoint(
                self.infer_item,
                host=h.host,
                port=h.port,
                max_body_bytes=h.max_body_kb * 1024,
                rate_limit_per_s=h.rate_limit_per_s,
                burst=h.burst,
                health=self._healthz,
                status=self.status,
            )
            self.http.start()
            log.info("local endpoint on http://%s:%d", h.host, self.http.port)
        t = threading.Thread(target=self._health_loop, name="edge-health", daemon=True)
        t.start()
        threading.Thread(target=self._good_loop, name="edge-good", daemon=True).start()

    def _good_loop(self) -> None:
        """Mark the active version good once it has served ``models.good_after_s`` without the process dying."""
        assert self.models is not None
        while not self.stop_event.wait(min(0.5, max(0.05, self.cfg.models.good_after_s / 4))):
            self.models.mark_good_if_due()

    def _start_mqtt(self) -> None:
        """Store-and-forward sync of the logbook and the signed command channel over one MQTT link."""
        from runtime.command_handlers import builtin_handlers, logs_publisher
        from runtime.commands import CommandChannel
        from runtime.link import Link, LinkConfig
        from runtime.signing import load_public_key
        from runtime.sync import Sync, with_will

        m, cfg = self.cfg.mqtt, self.cfg
        password = None
        if m.password_file:
            try:
                password = Path(m.password_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    f"cannot read the MQTT password file: {exc.strerror}; check its path and that the service's "
                    "group can read it",
                    key="mqtt.password_file",
                ) from exc
        link_cfg = LinkConfig(
            client_id=f"edge-{cfg.fleet}-{cfg.device}",
            host=m.host,
            port=m.port,
            protocol=m.protocol,
            keepalive_s=m.keepalive_s,
            username=m.username or None,
            password=password,
            ca_file=m.ca_file or None,
            cert_file=m.cert_file or None,
            key_file=m.key_file or None,
        )
        self.link = Link(with_will(link_cfg, fleet=cfg.fleet, device=cfg.device))
        self.sync = Sync(
            self.link,
            self.logbook,
            fleet=cfg.fleet,
            device=cfg.device,
            batch_size=m.batch_size,
            linger_s=m.linger_ms / 1000,
            compress=m.compress,
            status=self._birth,
        )
        operator = [load_public_key(Path(k)) for k in (m.operator_keys or cfg.trusted_keys)]
        handlers = builtin_handlers(
            status=self.status,
            current_config=lambda: self.cfg,
            state_dir=cfg.state_dir,
            export=self.logbook.export,
            publish_logs=logs_publisher(self.link, cfg.fleet, cfg.device),
            request_restart=self._request_restart,
            apply_config=self._apply_config,
        )
        assert self.models is not None, "open() first"
        deployer = self.models.deployer
        handlers["model.deploy"] = deployer.deploy
        handlers["model.rollback"] = deployer.rollback
        self.commands = CommandChannel(
            self.link,
            fleet=cfg.fleet,
            device=cfg.device,
            group=cfg.group,
            trusted_keys=operator,
            state_dir=cfg.state_dir,
            handlers=handlers,
        )
        deployer.link, deployer.finish = self.link, self._final_ack
        e = cfg.escalation
        if e.enabled:
            from runtime.escalate import CircuitBreaker, Escalator

            self.escalator = Escalator(
                self.link,
                fleet=cfg.fleet,
                device=cfg.device,
                model=e.model or self.model.name,
                threshold=e.threshold,
                timeout_s=e.timeout_s,
                breaker=CircuitBreaker(e.breaker_failures, e.breaker_reset_s),
                max_request_bytes=e.max_request_kb * 1024,
            )
        self.sync.start()
        self.commands.start()
        self.link.start()
        log.info("MQTT: %s:%d as %s (fleet %s)", m.host, m.port, link_cfg.client_id, cfg.fleet)

    def _final_ack(self, rollout: Any) -> bool:
        """Send a finished rollout's final ``model.deploy`` ack (once); False when the channel is not up."""
        if self.commands is None:
            return False
        from runtime.deploy import Deployer

        status, result = Deployer.final_ack(rollout)
        reason = rollout.reason if status != "ok" else None
        sent = self.commands.complete(
            rollout.id, "model.deploy", status=status, result=result, reason=reason, wait_s=10
        )
        if sent is None:  # stored by an earlier run that died before the ledger knew it went out
            sent = self.commands.resend(rollout.id, wait_s=10)
        return bool(sent)

    def _resume_rollouts(self) -> None:
        """Owed final acks and an unfinished rollout of an earlier run carry on (off the main thread)."""
        assert self.models is not None
        if self.commands is not None:
            for command_id, ctype in self.commands.state.pending().items():
                if ctype == "model.deploy" and self.models.ledger.find(command_id) is not None:
                    continue  # the ledger has it: resume() or the rollout thread sends the ack
                reason = "interrupted: the device restarted before the command ran; send it again with a new id"
                self.commands.complete(command_id, ctype, status="error", reason=reason, wait_s=10)
        self.models.deployer.resume()

    def _birth(self) -> dict[str, Any]:
        """What the retained status topic says about this device while it is online."""
        m = self.model
        return {
            "group": self.cfg.group,
            "profile": m.manifest.profile.name if m else None,
            "model": m.name if m else None,
            "version": m.version if m else None,
            "temp_c": self.health_snapshot.get("temp_c"),
            "pid": os.getpid(),
            "rollout": self._rollout_brief(),
        }

    def _rollout_brief(self) -> dict[str, Any] | None:
        status = self.models.deployer.status() if self.models is not None else None
        if status is None:
            return None
        return {k: status[k] for k in ("id", "state", "name", "version", "reason")}

    def _request_restart(self) -> None:
        self._restart_requested = True
        self.stop_event.set()
        if self.source is not None:
            self.source.close()

    def _apply_config(self, new: ServiceConfig, key: str) -> bool:
        """Take a `config.set` change live where the running parts allow it; False = needs a restart."""
        live = {
            "health.interval_s",
            "health.temp_limit_c",
            "health.min_fps",
            "source.max_fps",
            "watchdog.stall_after_s",
            "log_level",
            "max_consecutive_failures",
        }
        self.cfg = new
        if key == "source.max_fps" and self.source is not None and hasattr(self.source, "set_max_fps"):
            self.source.set_max_fps(new.source.max_fps)
        if key == "log_level":
            logging.getLogger().setLevel(new.log_level.upper())
        self._event("config.changed", f"{key} set by a fleet command", key=key, live=key in live)
        return key in live

    def _pin_io_threads(self) -> None:
        """Move every thread but this one (the inference loop) to the plan's I/O cores."""
        if not self._io_cores or not hasattr(os, "sched_setaffinity"):
            return
        me = threading.current_thread()
        for t in threading.enumerate():
            if t is not me and t.native_id is not None:
                try:
                    os.sched_setaffinity(t.native_id, self._io_cores)
                except OSError as exc:
                    log.debug("cannot pin %s: %s", t.name, exc)

    def _idle_loop(self, max_items: int) -> int:
        while not self.stop_event.wait(0.5):
            if self._reload.is_set():
                self._do_reload()
            if max_items and self.stats.total >= max_items:
                break
        return 0

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def stop(signum: int, _frame: Any) -> None:
            log.info("signal %d: stopping", signum)
            self.stop_event.set()
            if self.source is not None:
                self.source.close()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())

    def _do_reload(self) -> None:
        """SIGHUP: a new config ``bundle`` is stored and activated; else follow the store's active pointer.

        ``edge-runtime models activate|rollback`` move the pointer and send SIGHUP. A bundle or version
        that fails verification or loading is refused (``model.refused``) and the old model keeps serving.
        """
        from runtime.config import load_config

        self._reload.clear()
        bundle = None
        if self.config_path is not None:
            try:
                bundle = load_config(self.config_path).bundle
            except EdgeError as exc:
                self._event("config.refused", f"reload refused: {exc}", level="error")
                return
        if self.models is not None:
            self.models.reload(bundle)

    # --- health, status ------------------------------------------------------------------------

    def _health_loop(self) -> None:
        from runtime.health import RateGovernor, read_health

        governor = RateGovernor(
            self.cfg.source.max_fps, min_fps=self.cfg.health.min_fps, temp_limit_c=self.cfg.health.temp_limit_c
        )
        while not self.stop_event.is_set():
            try:
                health = read_health()
                self.health_snapshot = dict(health.to_dict())
                snap = self.stats.snapshot()
                for name in ("cpu_percent", "mem_percent", "rss_mb", "temp_c"):
                    value = self.health_snapshot.get(name)
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        self.logbook.record_metric(f"health.{name}", float(value))
                self.logbook.record_metric("serve.throughput_per_s", float(snap["throughput_per_s"]))
                if self.source is not None and hasattr(self.source, "set_max_fps"):
                    lat = snap["latency_p95_ms"]
                    decision = governor.tick(health, latency_s=lat / 1000 if lat else None)
                    if decision.reason:
                        self.source.set_max_fps(decision.fps)
                        self._event("rate.changed", decision.reason, fps=decision.fps)
                self._write_status()
            except Exception:  # health must never take the service down; it is logged and retried
                log.exception("health check failed")
            self.stop_event.wait(self.cfg.health.interval_s)

    def _healthz(self) -> dict[str, Any]:
        return {"ok": self.model is not None and self._alive(), "model": self.model.name if self.model else None}

    def _status_line(self) -> str:
        snap = self.stats.snapshot()
        m = self.model
        name = f"{m.name} {m.version}" if m is not None else "no model"
        p95 = f"{snap['latency_p95_ms']} ms" if snap["latency_p95_ms"] is not None else "n/a"
        return f"{name} · {snap['throughput_per_s']}/s · p95 {p95} · {snap['inferences']} done"

    def status(self) -> dict[str, Any]:
        """What `edge-runtime status` and `/v1/status` show."""
        m = self.model
        out: dict[str, Any] = {
            "device": self.cfg.device,
            "fleet": self.cfg.fleet,
            "pid": os.getpid(),
            "updated": time.time(),
            "model": {
                "name": m.name,
                "version": m.version,
                "precision": m.manifest.precision,
                "backend": m.manifest.backend,
                "provider": m.engine.provider,
                "profile": m.manifest.profile.name,
            }
            if m is not None
            else None,
            "profile": m.manifest.profile.name if m is not None else None,
            "rollout": self.models.deployer.status() if self.models is not None else None,
            "thread_plan": self.plan,
            "serve": self.stats.snapshot(),
            "health": self.health_snapshot,
            "logbook": str(self.cfg.logbook_path),
        }
        if self.cache is not None:
            out["cache"] = self.cache.stats()
        if self.source is not None:
            out["source"] = self.source.stats()
        if self.http is not None:
            out["http"] = {"port": self.http.port, **self.http.stats()}
        if self.escalator is not None:
            out["escalation"] = self.escalator.stats()
        return out

    def _write_status(self) -> None:
        """Snapshot the status for `edge-runtime status`; the health thread and shutdown may race here."""
        path = self.cfg.state_path / STATUS_FILE
        try:
            write_atomic(path, json.dumps(self.status(), default=str).encode(), durable=False)
        except OSError as exc:  # a status snapshot is advisory: never let it stop the service
            log.warning("could not write %s: %s", path, exc)

    def _shutdown(self) -> None:
        self.stop_event.set()
        for part in (self.http, self.source, self.commands):
            if part is not None:
                part.close()
        if self.models is not None:
            self.models.deployer.close()  # an unfinished rollout stays in the ledger and resumes next start
        if self.sync is not None:
            self.sync.close()  # publishes the offline status itself
        if self.link is not None:
            self.link.stop()
        if self.logbook is not None:
            with contextlib.suppress(EdgeError):
                self._write_status()
            self._event("service.stopped", "edge-runtime stopped")
            self.logbook.close()
            self.logbook = None
        if self.models is not None:
            self.models.close()
            self.models = None


def _test_stall() -> int:
    """Fault injection for tests only: EDGE_TEST_STALL_AFTER=N stalls the loop after N inferences."""
    value = os.environ.get("EDGE_TEST_STALL_AFTER", "")
    return int(value) if value.isdigit() else 0


def read_status(state_dir: Path | None, *, config: str | None) -> dict[str, Any]:
    """The running service's status file plus logbook numbers; says when the service is not running."""
    import psutil

    from runtime.logbook import open_readonly

    cfg = None
    if state_dir is None:
        from runtime.config import load_config

        cfg = load_config(config or "/etc/edge-runtime/config.toml")
        state_dir = cfg.state_path
    path = state_dir / STATUS_FILE
    status: dict[str, Any] = {}
    if path.is_file():
        status = json.loads(path.read_text())
        pid = status.get("pid")
        status["running"] = isinstance(pid, int) and psutil.pid_exists(pid)
        status["age_s"] = round(time.time() - float(status.get("updated", 0)), 1)
    else:
        status["running"] = False
    db = Path(status.get("logbook") or (cfg.logbook_path if cfg else state_dir / "logbook.sqlite"))
    if db.is_file():
        try:
            status["logbook_stats"] = open_readonly(db).stats()
        except EdgeError as exc:
            status["logbook_stats"] = {"error": str(exc)}
    return status


def parse_since(text: str) -> float:
    """``1h``, ``30m``, ``2d``, ``45s`` or an ISO time → a Unix timestamp."""
    import datetime as dt
    import re

    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if m:
        return time.time() - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(f"expected 1h, 30m, 2d or an ISO time, got {text!r}", key="--since") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def log_command(args: Any) -> int:
    """`edge-runtime log tail|export`."""
    import csv
    import sys

    from runtime.logbook import open_readonly

    if args.db:
        db = Path(args.db)
    else:
        from runtime.config import load_config

        db = load_config(args.config).logbook_path
    if not db.is_file():
        raise ConfigError(f"no logbook at {db}", key="--db")
    reader = open_readonly(db)
    if args.action == "tail":
        rows: Any = reader.tail(args.n, table=args.table)
    else:
        rows = reader.export(since=parse_since(args.since) if args.since else None)
    if args.format == "jsonl":
        for row in rows:
            sys.stdout.write(json.dumps(row, default=str) + "\n")
    else:
        writer = None
        for row in rows:
            flat = {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()}
            if writer is None:
                writer = csv.DictWriter(sys.stdout, fieldnames=list(flat), extrasaction="ignore")
                writer.writeheader()
            writer.writerow(flat)
    return 0
