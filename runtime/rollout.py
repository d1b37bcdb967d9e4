"""The model rollout state machine: states, gates judged by a pure function, and its SQLite ledger.

A rollout (id = the ``model.deploy`` command id) moves::

    downloading → verified → shadow → canary → activating → active
         │            │         │        │          │
         └────────────┴─────────┴────────┴──────────┴──→ rolled_back (reason)      refused (before verified)

``immediate`` skips shadow and canary, ``canary`` skips shadow. The ledger
(``<state_dir>/rollout.sqlite``, WAL, ``synchronous=FULL``) keeps one row per rollout and every
transition, so a restart resumes: ``downloading`` fetches again (the ``.part`` file resumes),
``verified`` loads the candidate again, ``shadow``/``canary`` restart that stage's sampling from
zero (the samples lived in memory; the stage's ``max_duration_s`` starts again too), and a rollout
found ``activating`` is finished by the store pointer: moved → ``active``, not moved → ``rolled_back``.
A stage resumed more than :data:`MAX_RESUMES` times (the candidate keeps killing the process) is
rolled back with reason ``crash-loop``.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from runtime.errors import RolloutError

__all__ = [
    "ACTIVE_STATES",
    "LEDGER_FILE",
    "MAX_RESUMES",
    "STATES",
    "TERMINAL",
    "Gates",
    "Ledger",
    "Metrics",
    "Rollout",
    "Verdict",
    "agrees",
    "judge",
    "p95",
]

LEDGER_FILE = "rollout.sqlite"
STATES = ("downloading", "verified", "shadow", "canary", "activating", "active", "rolled_back", "refused")
TERMINAL = frozenset({"active", "rolled_back", "refused"})
ACTIVE_STATES = frozenset(STATES) - TERMINAL
MAX_RESUMES = 3
_NEXT: dict[str, frozenset[str]] = {
    "downloading": frozenset({"verified", "refused", "rolled_back"}),
    "verified": frozenset({"shadow", "canary", "activating", "rolled_back"}),
    "shadow": frozenset({"canary", "rolled_back"}),
    "canary": frozenset({"activating", "rolled_back"}),
    "activating": frozenset({"active", "rolled_back"}),
}
DENSE_THRESHOLD = 0.3  # the threshold runtime.postprocess reports dense coverage at
MIN_IOU = 0.5
MIN_COSINE = 0.9


@dataclass(frozen=True)
class Gates:
    """When a candidate may move on: judged once ``min_samples`` candidate runs exist in a stage."""

    min_samples: int = 30
    max_p95_ratio: float = 1.5  # candidate p95 latency ÷ active p95 latency
    min_agreement: float = 0.9  # share of compared inputs where candidate and active agree
    max_error_rate: float = 0.02  # candidate runs that raised (engine, pre- or post-processing)
    max_duration_s: float = 600.0  # per stage; not enough samples by then → rolled back, reason timeout

    def _validate(self) -> str | None:
        if not 1 <= self.min_samples <= 1_000_000:
            return "min_samples: expected 1..1000000"
        if not (math.isfinite(self.max_p95_ratio) and self.max_p95_ratio > 0):
            return "max_p95_ratio: expected a positive number"
        if not 0.0 <= self.min_agreement <= 1.0:
            return "min_agreement: expected 0..1"
        if not 0.0 <= self.max_error_rate <= 1.0:
            return "max_error_rate: expected 0..1"
        if not 0 < self.max_duration_s <= 7 * 86400:
            return "max_duration_s: expected 0 < s <= 604800"
        return None


@dataclass(frozen=True)
class Metrics:
    """What a stage measured so far: candidate runs, errors, comparisons and both p95 latencies (ms)."""

    samples: int = 0
    errors: int = 0
    compared: int = 0
    agreed: int = 0
    candidate_p95_ms: float | None = None
    active_p95_ms: float | None = None
    dropped: int = 0  # shadow samples not taken because the queue was full

    @property
    def error_rate(self) -> float | None:
        """errors ÷ candidate runs (None before the first run)."""
        return self.errors / self.samples if self.samples else None

    @property
    def agreement(self) -> float | None:
        """agreed ÷ compared (None before the first comparison)."""
        return self.agreed / self.compared if self.compared else None

    @property
    def p95_ratio(self) -> float | None:
        """candidate p95 ÷ active p95 (None until both exist)."""
        c, a = self.candidate_p95_ms, self.active_p95_ms
        return c / a if c is not None and a else None

    def summary(self) -> dict[str, Any]:
        """The ``metrics`` of the final ack and the rollout events."""

        def r(x: float | None) -> float | None:
            return round(x, 4) if x is not None else None

        return {
            "samples": self.samples,
            "errors": self.errors,
            "compared": self.compared,
            "p95_ratio": r(self.p95_ratio),
            "agreement": r(self.agreement),
            "error_rate": r(self.error_rate),
            "candidate_p95_ms": r(self.candidate_p95_ms),
            "active_p95_ms": r(self.active_p95_ms),
            "dropped": self.dropped,
        }


@dataclass(frozen=True)
class Verdict:
    """``wait`` (not enough samples yet), ``pass`` or ``fail`` with a reason (``latency: …``, ``timeout: …``)."""

    decision: Literal["wait", "pass", "fail"]
    reason: str = ""


def judge(gates: Gates, m: Metrics, elapsed_s: float) -> Verdict:
    """The gate decision for one stage after ``elapsed_s`` seconds of it (pure: no clock, no I/O).

    Errors are judged first (a candidate that raises everywhere has nothing to compare), then
    latency, then agreement. A stage with fewer than ``min_samples`` runs waits until
    ``max_duration_s``, then fails with reason ``timeout``.
    """
    if m.samples < gates.min_samples:
        if elapsed_s >= gates.max_duration_s:
            return Verdict("fail", f"timeout: {m.samples} of {gates.min_samples} samples in {elapsed_s:.0f} s")
        return Verdict("wait")
    rate = m.error_rate or 0.0
    if rate > gates.max_error_rate:
        return Verdict("fail", f"errors: error rate {rate:.3f} > {gates.max_error_rate} ({m.errors}/{m.samples})")
    ratio = m.p95_ratio
    if ratio is not None and ratio > gates.max_p95_ratio:
        return Verdict(
            "fail",
            f"latency: p95 {m.candidate_p95_ms:.3f} ms is {ratio:.2f}x the active model's "
            f"{m.active_p95_ms:.3f} ms (max {gates.max_p95_ratio}x)",
        )
    agreement = m.agreement
    if agreement is None:
        if elapsed_s >= gates.max_duration_s:
            return Verdict("fail", "timeout: no output could be compared with the active model")
        return Verdict("wait")
    if agreement < gates.min_agreement:
        return Verdict(
            "fail", f"agreement: {agreement:.3f} < {gates.min_agreement} ({m.agreed}/{m.compared} inputs agree)"
        )
    return Verdict("pass")


def p95(values: Sequence[float]) -> float | None:
    """The 95th percentile (nearest rank, as the service's status reports it); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def agrees(active: Mapping[str, Any], candidate: Mapping[str, Any], outputs: tuple[Any, Any], kind: str) -> bool:
    """Do two results agree? ``kind`` is the manifest's postprocess kind.

    ``classification``: the same top-1 class (the ``top1`` that runtime.postprocess computed).
    ``dense``: IoU of the maps thresholded at :data:`DENSE_THRESHOLD` ≥ :data:`MIN_IOU`.
    Anything else: cosine similarity of the first outputs ≥ :data:`MIN_COSINE`.
    ``outputs`` is (active first output, candidate first output).
    """
    if kind == "classification":
        a, c = active.get("top1"), candidate.get("top1")
        return isinstance(a, Mapping) and isinstance(c, Mapping) and a.get("index") == c.get("index")
    a_out, c_out = (np.asarray(x, dtype=np.float32) for x in outputs)
    if a_out.shape != c_out.shape:
        return False
    if kind == "dense":
        a_map, c_map = a_out > DENSE_THRESHOLD, c_out > DENSE_THRESHOLD
        union = int(np.logical_or(a_map, c_map).sum())
        return union == 0 or int(np.logical_and(a_map, c_map).sum()) / union >= MIN_IOU
    na, nc = float(np.linalg.norm(a_out)), float(np.linalg.norm(c_out))
    if na == 0.0 or nc == 0.0:
        return na == nc
    return float(np.dot(a_out.reshape(-1), c_out.reshape(-1))) / (na * nc) >= MIN_COSINE


@dataclass(frozen=True)
class Rollout:
    """One row of the ledger."""

    id: str
    state: str
    strategy: str
    name: str
    version: str
    spec: dict[str, Any]  # the command's args (bundle, delta, shares) as received
    gates: Gates
    previous: dict[str, Any] | None = None
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    resumes: int = 0
    acked: bool = False
    created: float = 0.0
    updated: float = 0.0
    stage_started: float = 0.0

    @property
    def done(self) -> bool:
        """True in a terminal state."""
        return self.state in TERMINAL

    def outcome(self) -> str:
        """``active``, ``rolled_back`` or ``refused`` (terminal states only)."""
        return self.state

    def to_dict(self) -> dict[str, Any]:
        """The status view of this rollout."""
        return {
            "id": self.id,
            "state": self.state,
            "strategy": self.strategy,
            "name": self.name,
            "version": self.version,
            "previous": self.previous,
            "reason": self.reason,
            "metrics": self.metrics,
            "gates": asdict(self.gates),
            "updated": self.updated,
        }


_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY, state TEXT NOT NULL, strategy TEXT NOT NULL, name TEXT NOT NULL,
    version TEXT NOT NULL, spec TEXT NOT NULL, gates TEXT NOT NULL, previous TEXT, reason TEXT NOT NULL DEFAULT '',
    metrics TEXT NOT NULL DEFAULT '{}', resumes INTEGER NOT NULL DEFAULT 0, acked INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL, updated REAL NOT NULL, stage_started REAL NOT NULL);
CREATE TABLE IF NOT EXISTS transitions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, rollout_id TEXT NOT NULL, from_state TEXT, to_state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '', at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS transitions_rollout ON transitions (rollout_id, seq);
"""


class Ledger:
    """The rollouts and their transitions in ``<state_dir>/rollout.sqlite``; every write is durable."""

    def __init__(self, path: str | Path, *, clock: Any = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise RolloutError(f"cannot open the rollout ledger: {exc}; check the state directory", path=path) from exc

    def close(self) -> None:
        """Close the database (idempotent)."""
        with self._lock:
            self._db.close()

    def _write(self, sql: str, *params: Any, transition: tuple[str, str | None, str, str] | None = None) -> None:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute(sql, params)
                if transition is not None:
                    self._db.execute(
                        "INSERT INTO transitions (rollout_id, from_state, to_state, reason, at) VALUES (?,?,?,?,?)",
                        (*transition, self._clock()),
                    )
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise RolloutError(f"cannot write the rollout ledger: {exc}", path=self.path) from exc

    def create(self, rollout: Rollout) -> Rollout:
        """Insert a new rollout (RolloutError if the id exists)."""
        now = self._clock()
        r = replace(rollout, created=now, updated=now, stage_started=now)
        self._write(
            "INSERT INTO rollouts (id, state, strategy, name, version, spec, gates, previous, reason, metrics,"
            " resumes, acked, created, updated, stage_started) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            r.id,
            r.state,
            r.strategy,
            r.name,
            r.version,
            json.dumps(r.spec),
            json.dumps(asdict(r.gates)),
            json.dumps(r.previous),
            r.reason,
            json.dumps(r.metrics),
            r.resumes,
            int(r.acked),
            r.created,
            r.updated,
            r.stage_started,
            transition=(r.id, None, r.state, r.reason),
        )
        return r

    def move(
        self, rollout_id: str, state: str, *, reason: str = "", metrics: Mapping[str, Any] | None = None
    ) -> Rollout:
        """Go to ``state`` (checked against the allowed moves), starting a new stage clock."""
        current = self.get(rollout_id)
        if state not in _NEXT.get(current.state, frozenset()):
            raise RolloutError(f"rollout {rollout_id}: cannot go from {current.state} to {state}")
        now = self._clock()
        self._write(
            "UPDATE rollouts SET state=?, reason=?, metrics=?, updated=?, stage_started=? WHERE id=?",
            state,
            reason,
            json.dumps(dict(metrics) if metrics is not None else current.metrics),
            now,
            now,
            rollout_id,
            transition=(rollout_id, current.state, state, reason),
        )
        return self.get(rollout_id)

    def update(self, rollout_id: str, **fields: Any) -> Rollout:
        """Set ``metrics``, ``previous``, ``resumes``, ``acked`` or ``stage_started`` without a transition."""
        allowed = {"metrics", "previous", "resumes", "acked", "stage_started", "name", "version"}
        bad = sorted(set(fields) - allowed)
        if bad:
            raise RolloutError(f"rollout {rollout_id}: cannot update {bad[0]}")
        cols = ", ".join(f"{k}=?" for k in fields)
        values = [json.dumps(v) if k in ("metrics", "previous") else v for k, v in fields.items()]
        self._write(f"UPDATE rollouts SET {cols}, updated=? WHERE id=?", *values, self._clock(), rollout_id)
        return self.get(rollout_id)

    def get(self, rollout_id: str) -> Rollout:
        """The rollout with this id (RolloutError if unknown)."""
        found = self.find(rollout_id)
        if found is None:
            raise RolloutError(f"no rollout {rollout_id} in the ledger", path=self.path)
        return found

    def find(self, rollout_id: str) -> Rollout | None:
        """The rollout with this id, or None."""
        rows = self._select("WHERE id=?", rollout_id)
        return rows[0] if rows else None

    def unfinished(self) -> list[Rollout]:
        """Rollouts not in a terminal state, oldest first."""
        marks = ",".join("?" * len(ACTIVE_STATES))
        return self._select(f"WHERE state IN ({marks}) ORDER BY created", *sorted(ACTIVE_STATES))

    def unacked(self) -> list[Rollout]:
        """Finished rollouts whose final ack has not gone out yet, oldest first."""
        marks = ",".join("?" * len(TERMINAL))
        return self._select(f"WHERE acked=0 AND state IN ({marks}) ORDER BY created", *sorted(TERMINAL))

    def latest(self) -> Rollout | None:
        """The most recently created rollout."""
        rows = self._select("ORDER BY created DESC LIMIT 1")
        return rows[0] if rows else None

    def transitions(self, rollout_id: str) -> list[tuple[str | None, str, str]]:
        """(from, to, reason) of every transition of one rollout, in order."""
        with self._lock:
            cur = self._db.execute(
                "SELECT from_state, to_state, reason FROM transitions WHERE rollout_id=? ORDER BY seq", (rollout_id,)
            )
            return [(a, b, c) for a, b, c in cur.fetchall()]

    def _select(self, where: str, *params: Any) -> list[Rollout]:
        cols = "id, state, strategy, name, version, spec, gates, previous, reason, metrics, resumes, acked, created,"
        with self._lock:
            try:
                rows = self._db.execute(
                    f"SELECT {cols} updated, stage_started FROM rollouts {where}", params
                ).fetchall()
            except sqlite3.Error as exc:
                raise RolloutError(f"cannot read the rollout ledger: {exc}", path=self.path) from exc
        return [_row(r) for r in rows]


def _row(r: Sequence[Any]) -> Rollout:
    return Rollout(
        id=r[0],
        state=r[1],
        strategy=r[2],
        name=r[3],
        version=r[4],
        spec=json.loads(r[5]),
        gates=Gates(**json.loads(r[6])),
        previous=json.loads(r[7]) if r[7] else None,
        reason=r[8],
        metrics=json.loads(r[9]),
        resumes=int(r[10]),
        acked=bool(r[11]),
        created=float(r[12]),
        updated=float(r[13]),
        stage_started=float(r[14]),
    )
