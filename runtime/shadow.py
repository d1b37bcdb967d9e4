"""A candidate model on trial beside the serving one, and the hot-swappable slot that serves models.

:class:`ModelSlot` hands out the serving model with a reader count (:meth:`ModelSlot.borrow`);
:meth:`ModelSlot.install` switches new requests to another model at once, and the old one is
closed only when its last in-flight request has finished, so a swap fails or drops nothing.

:class:`Trial` holds a candidate during a rollout. In ``shadow`` it runs on a deterministic share
of the served inputs (the very feeds the active model got) on its own thread, fed by a bounded
queue: when the queue is full the sample is dropped (and counted), serving never waits. Its
results are compared with the active model's and never served. In ``canary`` a deterministic share
of requests is served by the candidate (the service calls :meth:`Trial.take_canary`); the active
model then runs the same input on the trial thread, when the queue has room, so agreement keeps
being measured. Every exception of the candidate — engine, pre- or post-processing — is an error.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from runtime.rollout import Metrics, agrees, p95

__all__ = ["ModelSlot", "SharedModel", "Trial"]

log = logging.getLogger(__name__)

_WINDOW = 4096


class SharedModel:
    """A model with a reader count: closed once it is retired and its last reader has released it."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._readers = 0
        self._retired = False
        self._closed = False
        self._lock = threading.Lock()

    @property
    def closed(self) -> bool:
        """True once the model was closed."""
        return self._closed

    @property
    def readers(self) -> int:
        """Requests running on this model right now."""
        return self._readers

    def acquire(self) -> bool:
        """Count one more reader; False (nothing counted) once the model is retired."""
        with self._lock:
            if self._retired:
                return False
            self._readers += 1
            return True

    def release(self) -> None:
        """One reader less; the last one out of a retired model closes it."""
        with self._lock:
            self._readers -= 1
            close = self._retired and self._readers == 0 and not self._closed
            self._closed = self._closed or close
        if close:
            self._close()

    def retire(self) -> None:
        """No new readers; close now if none is left, else when the last one releases."""
        with self._lock:
            self._retired = True
            close = self._readers == 0 and not self._closed
            self._closed = self._closed or close
        if close:
            self._close()

    def _close(self) -> None:
        try:
            self.model.close()
        except Exception:  # a model that fails to close must not fail the request that released it
            log.exception("closing %s failed", getattr(self.model, "name", "a model"))


class ModelSlot:
    """The serving model; ``borrow()`` for each request, ``install()`` to hot-swap."""

    def __init__(self, model: Any = None) -> None:
        self._lock = threading.Lock()
        self._ref: SharedModel | None = SharedModel(model) if model is not None else None

    @property
    def current(self) -> Any:
        """The model new requests get (None when empty); do not run it without ``borrow()``."""
        ref = self._ref
        return ref.model if ref is not None else None

    @contextlib.contextmanager
    def borrow(self) -> Iterator[Any]:
        """The serving model, kept open until the ``with`` block ends (None when the slot is empty)."""
        with self._lock:
            ref = self._ref
            if ref is not None and not ref.acquire():  # cannot happen: a retired ref left the slot first
                ref = None
        try:
            yield ref.model if ref is not None else None
        finally:
            if ref is not None:
                ref.release()

    def install(self, new: SharedModel | Any) -> Any:
        """Serve ``new`` (a model or a SharedModel) from now on; the old model is closed once idle. Returns it."""
        ref = new if isinstance(new, SharedModel) else SharedModel(new)
        with self._lock:
            old, self._ref = self._ref, ref
        if old is None:
            return None
        old.retire()
        return old.model

    def close(self) -> None:
        """Empty the slot; the model is closed when its last request has finished."""
        with self._lock:
            old, self._ref = self._ref, None
        if old is not None:
            old.retire()


class _Share:
    """Deterministic sampling: exactly ⌊n·share⌋ of the first n calls say yes, evenly spread."""

    def __init__(self, share: float) -> None:
        self.share = share
        self._n = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            n = self._n
            self._n += 1
        return int((n + 1) * self.share) > int(n * self.share)


class Trial:
    """A candidate (``SharedModel``) on trial; ``run_active(item) -> Prediction`` runs the serving model.

    ``feeds_of(model, item)`` preprocesses an input for a model (the service's own rule). ``kind``
    is the manifest's postprocess kind used to compare results (:func:`runtime.rollout.agrees`).
    """

    def __init__(
        self,
        candidate: SharedModel,
        *,
        stage: str,
        kind: str,
        shadow_share: float,
        canary_share: float,
        feeds_of: Callable[[Any, Any], dict[str, Any]],
        run_active: Callable[[Any], Any],
        queue_size: int = 8,
    ) -> None:
        self.candidate = candidate
        self.kind = kind
        self.feeds_of = feeds_of
        self.run_active = run_active
        self._shadow = _Share(shadow_share)
        self._canary = _Share(canary_share)
        self._queue: queue.Queue[tuple[str, Any, Any] | None] = queue.Queue(maxsize=max(1, queue_size))
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.stage = stage
        self._reset()
        self._thread = threading.Thread(target=self._work, name="edge-trial", daemon=True)
        self._thread.start()

    def _reset(self) -> None:
        self._cand_ms: deque[float] = deque(maxlen=_WINDOW)
        self._active_ms: deque[float] = deque(maxlen=_WINDOW)
        self._samples = self._errors = self._compared = self._agreed = self._dropped = 0

    def set_stage(self, stage: str) -> None:
        """Move to ``shadow`` or ``canary``; the counters start again from zero."""
        with self._lock:
            self.stage = stage
            self._reset()

    def metrics(self) -> Metrics:
        """What this stage measured so far."""
        with self._lock:
            return Metrics(
                samples=self._samples,
                errors=self._errors,
                compared=self._compared,
                agreed=self._agreed,
                candidate_p95_ms=p95(list(self._cand_ms)),
                active_p95_ms=p95(list(self._active_ms)),
                dropped=self._dropped,
            )

    # --- called by the serving threads ----------------------------------------------------------

    def served(self, feeds: Mapping[str, Any], pred: Any) -> None:
        """The active model served an input: count its latency; in shadow, maybe queue it for the candidate."""
        with self._lock:
            self._active_ms.append(pred.latency_ms)
            shadow = self.stage == "shadow"
        if shadow and self._shadow.take():
            self._offer(("shadow", feeds, pred))

    def take_canary(self) -> bool:
        """In canary: should the candidate serve this request?"""
        return self.stage == "canary" and self._canary.take()

    def canary_result(self, item: Any, pred: Any | None) -> None:
        """The candidate served ``item`` (``pred``) or raised (None); the active model runs it later to compare."""
        with self._lock:
            self._samples += 1
            if pred is None:
                self._errors += 1
            else:
                self._cand_ms.append(pred.latency_ms)
        if pred is not None:
            self._offer(("canary", item, pred))

    def _offer(self, job: tuple[str, Any, Any]) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self._lock:
                self._dropped += 1

    # --- the trial thread -----------------------------------------------------------------------

    def _work(self) -> None:
        while not self._stopped.is_set():
            try:
                job = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if job is None:
                return
            stage, payload, pred = job
            if stage != self.stage:  # queued before a stage change: it belongs to the old counters
                continue
            if stage == "shadow":
                self._shadow_run(payload, pred)
            else:
                self._compare_canary(payload, pred)

    def _shadow_run(self, feeds: Mapping[str, Any], active: Any) -> None:
        if not self.candidate.acquire():
            return
        try:
            cand = self.candidate.model.run(feeds, ref="shadow")
        except Exception as exc:  # any failure of the candidate is an error sample, never a crash
            log.debug("candidate raised in shadow: %s", exc)
            cand = None
        finally:
            self.candidate.release()
        with self._lock:
            self._samples += 1
            if cand is None:
                self._errors += 1
                return
            self._cand_ms.append(cand.latency_ms)
        self._compare(active, cand)

    def _compare_canary(self, item: Any, cand: Any) -> None:
        try:
            active = self.run_active(item)
        except Exception:  # the active model's own failure says nothing about the candidate
            log.debug("active model raised while checking a canary result", exc_info=True)
            return
        self._compare(active, cand)

    def _compare(self, active: Any, cand: Any) -> None:
        try:
            same = agrees(active.result, cand.result, (active.outputs[0], cand.outputs[0]), self.kind)
        except (IndexError, ValueError, TypeError):
            same = False
        with self._lock:
            self._compared += 1
            self._agreed += int(same)

    def stop(self) -> None:
        """Stop the trial thread (waits for the sample it is running); the candidate stays open."""
        self._stopped.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        if self._thread is not threading.current_thread():
            self._thread.join(10.0)
