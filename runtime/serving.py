"""The models one service serves: the store's active version booted with fallbacks, hot swaps, candidates on trial.

:class:`Models` owns the model store (``<state>/models``), the serving :class:`~runtime.shadow.ModelSlot`,
the rollout ledger (``<state>/rollout.sqlite``) and the :class:`~runtime.deploy.Deployer`, and is the
deployer's host. At start (:meth:`Models.boot`): a rollout caught ``activating`` is settled, the
store counts the start (crash loops revert, event ``model.crash_loop``), then the active version
is loaded — if it fails, the previous one, then the factory bundle (the config's ``bundle``, which
also seeds an empty store and is stored again when the config names another one): never nothing.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.durable import write_atomic
from runtime.errors import EdgeError
from runtime.shadow import ModelSlot, SharedModel, Trial

__all__ = ["FACTORY_FILE", "Models", "feeds_for"]

log = logging.getLogger(__name__)

FACTORY_FILE = "factory.json"  # in the state dir: which config bundle was stored last (path, size, mtime)


def feeds_for(model: Any, item: Any) -> dict[str, Any]:
    """``item`` preprocessed for ``model`` (images through the manifest's preprocessing)."""
    if item.kind == "image":
        out: dict[str, Any] = model.tensor_from_image(item.data)
    else:
        out = model.tensor_from_array(item.data, source=item.ref)
    return out


class Models:
    """Store, slot, ledger and deployer of one service; ``load(bundle)`` verifies, loads and warms a model."""

    def __init__(
        self,
        cfg: Any,
        *,
        load: Callable[[str | Path], Any],
        trusted_keys: list[Any],
        event: Callable[..., None],
        on_swap: Callable[[], None] = lambda: None,
    ) -> None:
        from runtime.deploy import Deployer
        from runtime.rollout import LEDGER_FILE, Ledger
        from runtime.store import ModelStore

        self.cfg = cfg
        self._load, self._event, self._on_swap = load, event, on_swap
        self.trusted_keys = trusted_keys
        self.slot = ModelSlot()
        self.trial: Trial | None = None
        self.serving_since = time.monotonic()
        self.factory = str(cfg.bundle)
        self.store = ModelStore.from_config(cfg)
        self.ledger = Ledger(Path(cfg.state_dir) / LEDGER_FILE)
        self.deployer = Deployer(
            self,
            store=self.store,
            ledger=self.ledger,
            state_dir=Path(cfg.state_dir),
            trusted_keys=trusted_keys,
            defaults=cfg.rollout,
            fleet=cfg.fleet,
        )

    # --- the deployer's host --------------------------------------------------------------------

    def load(self, bundle: str | Path) -> Any:
        """Verify, load and warm up ``bundle`` (nothing serves it yet)."""
        return self._load(bundle)

    def serving(self) -> Any:
        """The model new requests go to."""
        return self.slot.current

    def promote(self, candidate: SharedModel) -> None:
        """Hot swap: new requests go to ``candidate`` now; the old model closes after its last request."""
        new = candidate.model
        self.slot.install(candidate)
        self.serving_since = time.monotonic()
        self._on_swap()
        self._event("model.activated", f"serving {new.name} {new.version}", name=new.name, version=new.version)

    def start_trial(self, candidate: SharedModel, stage: str, shadow_share: float, canary_share: float) -> Trial:
        """Put ``candidate`` on trial beside the serving model (shadow or canary)."""
        serving = self.slot.current
        kind = (serving or candidate.model).manifest.postprocess.kind
        self.trial = Trial(
            candidate,
            stage=stage,
            kind=kind,
            shadow_share=shadow_share,
            canary_share=canary_share,
            feeds_of=feeds_for,
            run_active=self.run_active,
            queue_size=self.cfg.rollout.shadow_queue,
        )
        return self.trial

    def stop_trial(self) -> None:
        """Every request goes to the serving model again."""
        self.trial = None

    def event(self, kind: str, message: str, *, level: str = "info", **data: Any) -> None:
        """Record a logbook event."""
        self._event(kind, message, level=level, **data)

    def run_active(self, item: Any) -> Any:
        """Run ``item`` on the serving model (off the serving path: the canary comparison)."""
        with self.slot.borrow() as model:
            return model.run(feeds_for(model, item), ref=item.ref)

    # --- lifecycle ------------------------------------------------------------------------------

    def boot(self) -> None:
        """Settle a rollout caught activating, count this start, load and serve a model (EdgeError if none loads)."""
        m = self.cfg.models
        self.deployer.recover()
        decision = self.store.boot(crash_limit=m.crash_limit, window_s=m.crash_window_s)
        if decision.reverted_from is not None:
            bad = decision.reverted_from
            self._event("model.crash_loop", decision.reason, level="error", name=bad.name, version=bad.version)
        self.promote(SharedModel(self._boot_model()))

    def _boot_model(self) -> Any:
        if self.store.active() is None or self._factory_changed():
            try:
                model = self.load(self.factory)  # a bad factory bundle with an empty store: BundleError, exit 2
            except EdgeError as exc:
                if self.store.active() is None:
                    raise
                self._event("model.refused", f"refused the config's bundle {self.factory}: {exc}", level="error")
            else:
                self._seed(self.factory)
                return model
        failed: set[tuple[str, str]] = set()
        while (active := self.store.active()) is not None and active.key not in failed:
            try:
                return self.load(active.path)
            except EdgeError as exc:
                failed.add(active.key)
                self._event("model.refused", f"cannot load {active.name} {active.version}: {exc}", level="error")
                prev = self.store.previous()
                if prev is None or prev.key in failed:
                    break
                self.store.rollback(reason=f"cannot load {active.name} {active.version}: {exc}")
        stored = self._seed(self.factory)
        if stored.key in failed:
            raise EdgeError(f"no model can be loaded (tried {', '.join(' '.join(k) for k in sorted(failed))})")
        return self.load(stored.path)

    def _seed(self, bundle: str) -> Any:
        """``bundle`` (the config's) into the store, active and good; remembered in ``factory.json``."""
        stored = self.store.add(Path(bundle), trusted_keys=self.trusted_keys, source="factory")
        self.store.activate(stored.name, stored.version)
        self.store.mark_good()
        write_atomic(Path(self.cfg.state_dir) / FACTORY_FILE, json.dumps(_stamp(bundle)).encode())
        self.factory = bundle
        return stored

    def _factory_changed(self) -> bool:
        try:
            seen = json.loads((Path(self.cfg.state_dir) / FACTORY_FILE).read_text())
        except (OSError, ValueError):
            return False  # seeded before factory.json existed, or by hand: the store decides
        return bool(seen != _stamp(self.factory))

    def reload(self, config_bundle: str | None) -> None:
        """SIGHUP: a new config bundle is stored and activated; else follow the store's active pointer."""
        if config_bundle is not None and config_bundle != self.factory:
            try:
                model = self.load(config_bundle)
            except EdgeError as exc:
                self._refused(config_bundle, exc)
                return
            try:
                self._seed(config_bundle)
            except EdgeError as exc:
                model.close()
                self._refused(config_bundle, exc)
                return
            self.promote(SharedModel(model))
            return
        active, serving = self.store.active(), self.slot.current
        if active is not None and (serving is None or active.key != (serving.name, serving.version)):
            self.swap(active.path)

    def swap(self, bundle: str | Path) -> bool:
        """Load ``bundle`` beside the serving model and switch to it; on any failure keep serving the old one."""
        try:
            new = self.load(bundle)
        except EdgeError as exc:
            self._refused(bundle, exc)
            return False
        self.promote(SharedModel(new))
        return True

    def _refused(self, bundle: str | Path, exc: Exception) -> None:
        log.error("refused bundle %s: %s", bundle, exc)
        self._event("model.refused", f"refused bundle {bundle}: {exc}", level="error", bundle=str(bundle))

    def mark_good_if_due(self) -> None:
        """Mark the active version good once it has served ``models.good_after_s`` in this process."""
        active, serving = self.store.active(), self.slot.current
        if active is None or serving is None or self.store.is_good():
            return
        if (serving.name, serving.version) != active.key:
            return
        if time.monotonic() - self.serving_since >= self.cfg.models.good_after_s:
            self.store.mark_good()
            label = f"{active.name} {active.version}"
            self._event("model.good", f"{label} marked good", name=active.name, version=active.version)

    def close(self) -> None:
        """Stop the rollout thread, release the models (once idle) and close the ledger."""
        self.deployer.close()
        self.slot.close()
        self.ledger.close()


def _stamp(bundle: str) -> dict[str, Any]:
    try:
        st = os.stat(bundle)
    except OSError:
        return {"bundle": bundle}
    return {"bundle": bundle, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
