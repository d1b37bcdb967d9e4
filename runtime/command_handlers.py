"""The built-in fleet command handlers and the remote settings ``config.set`` keeps.

:func:`builtin_handlers` wires them to the service's callables: ``ping``, ``status``, ``config.set``,
``logs.request`` (chunks on ``edge/<fleet>/<device>/logs``) and ``service.restart``; the command
channel (:mod:`runtime.commands`) checks every command before a handler sees it. ``config.set``
persists into ``<state_dir>/config.override.json``: a JSON object shaped like config.toml holding only
the keys set remotely (``{"health": {"interval_s": 5}}``), laid over the file with
:func:`merge_overrides` when the config is loaded.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime import topics
from runtime.commands import AckHandle, Command, CommandLink, Handler
from runtime.durable import write_atomic
from runtime.errors import CommandError, ConfigError
from runtime.schema import from_dict, to_dict

if TYPE_CHECKING:
    from runtime.config import ServiceConfig

__all__ = [
    "LOCKED_KEYS",
    "OVERRIDE_FILE",
    "RestartHandler",
    "builtin_handlers",
    "config_set_handler",
    "logs_handler",
    "logs_publisher",
    "merge_overrides",
    "ping_handler",
    "read_overrides",
    "status_handler",
]

log = logging.getLogger(__name__)

OVERRIDE_FILE = "config.override.json"
#: Settings only an edit of config.toml on the device may change.
LOCKED_KEYS = frozenset({"bundle", "trusted_keys", "device_id", "fleet", "state_dir", "cache_dir", "logbook.path"})
_MAX_APPLY_ERROR = 200


def ping_handler(*, started_monotonic: float | None = None, clock: Callable[[], float] = time.time) -> Handler:
    """``ping`` → ``{"pong": <device time>, "uptime_s": …}`` (uptime since ``started_monotonic``, default now)."""
    start = time.monotonic() if started_monotonic is None else started_monotonic

    def ping(cmd: Command) -> dict[str, Any]:
        return {"pong": clock(), "uptime_s": round(time.monotonic() - start, 3)}

    return ping


def status_handler(status: Callable[[], Mapping[str, Any]]) -> Handler:
    """``status`` → whatever ``status()`` reports (the service's status dict)."""

    def status_cmd(cmd: Command) -> dict[str, Any]:
        return dict(status())

    return status_cmd


class RestartHandler:
    """``service.restart``: acks ``ok``, then (after the PUBACK) calls ``request_restart``.

    ``request_restart`` should make the service exit non-zero so systemd starts it again. A repeated
    delivery of the same command only re-sends the ack, so it cannot restart-loop the device.
    """

    def __init__(self, request_restart: Callable[[], None]) -> None:
        self._request_restart = request_restart

    def __call__(self, cmd: Command) -> dict[str, Any]:
        """Accept the restart; it happens in :meth:`after_ack`."""
        return {"restarting": True}

    def after_ack(self, cmd: Command) -> None:
        """Called by the channel once the ``ok`` ack is out."""
        log.warning("restarting on command %s", cmd.id)
        self._request_restart()


def read_overrides(state_dir: str | Path) -> dict[str, Any]:
    """The settings ``config.set`` persisted (``{}`` when none); a damaged file is a ConfigError naming it."""
    path = Path(state_dir) / OVERRIDE_FILE
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path=path) from exc
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"not JSON ({exc}); delete it to drop the remote settings", path=path) from exc
    if not isinstance(doc, dict):
        raise ConfigError("expected a JSON object; delete it to drop the remote settings", path=path)
    return doc


def merge_overrides(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` laid over it, section by section (neither argument is changed)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_overrides(merged[key], value)
        else:
            merged[key] = value
    return merged


def _config_key(args: Mapping[str, Any]) -> tuple[list[str], Any]:
    extra = sorted(set(args) - {"key", "value"})
    if extra:
        raise CommandError(f"args.{extra[0][:40]}: unknown argument; config.set takes key and value")
    key = args.get("key")
    if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64})?", key):
        raise CommandError("args.key: expected 'section.key' or a top-level 'key'")
    key = key.replace("-", "_")
    if key in LOCKED_KEYS:
        raise CommandError(f"{key}: cannot be changed remotely; edit config.toml on the device")
    if "value" not in args:
        raise CommandError(f"args.value: missing (the new value of {key})")
    return key.split("."), args["value"]


def _with(doc: Mapping[str, Any], parts: list[str], value: Any) -> dict[str, Any]:
    out = dict(doc)
    if len(parts) == 1:
        out[parts[0]] = value
    else:
        out[parts[0]] = {**out.get(parts[0], {}), parts[1]: value}
    return out


def config_set_handler(
    current: Callable[[], ServiceConfig],
    state_dir: str | Path,
    *,
    apply: Callable[[ServiceConfig, str], bool] | None = None,
) -> Handler:
    """``config.set`` with args ``{"key": "section.key", "value": …}``: validate, persist, apply live if possible.

    The new value is checked with the service's own schema on the current config (with earlier
    remote settings) — a bad key or value is an ``error`` ack naming the key — then kept in
    ``<state_dir>/config.override.json``. ``apply(new_config, key)`` returns True when the change took
    effect without a restart. Keys in ``LOCKED_KEYS`` are refused.
    """
    from runtime.config import ServiceConfig

    def config_set(cmd: Command) -> dict[str, Any]:
        parts, value = _config_key(cmd.args)
        key = ".".join(parts)
        overrides = read_overrides(state_dir)
        base = merge_overrides(to_dict(current()), overrides)
        if len(parts) == 1 and isinstance(base.get(key), Mapping):
            raise CommandError(f"{key}: is a section; set one of its keys ({key}.<name>)")
        if len(parts) == 2 and not isinstance(base.get(parts[0]), Mapping):
            raise CommandError(f"{key}: unknown key ({parts[0]} is not a section)")
        try:
            new = from_dict(ServiceConfig, _with(base, parts, value))
        except ConfigError as exc:
            raise CommandError(str(exc)) from exc
        path = Path(state_dir) / OVERRIDE_FILE
        try:
            write_atomic(path, json.dumps(_with(overrides, parts, value), indent=2, sort_keys=True).encode())
        except OSError as exc:
            raise CommandError(f"cannot write {path}: {exc.strerror}") from exc
        live, problem = False, None
        if apply is not None:
            try:
                live = bool(apply(new, key))
            except Exception as exc:  # persisted already: report, and let a restart pick it up
                log.exception("applying %s live failed", key)
                problem = f"{type(exc).__name__}: {exc}"[:_MAX_APPLY_ERROR]
        log.info("config.set %s (command %s): applied live=%s", key, cmd.id, live)
        result = {"key": key, "value": value, "applied_live": live, "restart_needed": not live}
        return result if problem is None else {**result, "apply_error": problem}

    return config_set


_LOG_TABLES = ("events", "inferences", "metrics")


def _logs_args(args: Mapping[str, Any], max_rows: int) -> tuple[float, str, int]:
    extra = sorted(set(args) - {"since", "table", "limit"})
    if extra:
        raise CommandError(f"args.{extra[0][:40]}: unknown argument; logs.request takes since, table, limit")
    since, table, limit = args.get("since", 0.0), args.get("table", "events"), args.get("limit", 1000)
    if isinstance(since, bool) or not isinstance(since, (int, float)) or not math.isfinite(since):
        raise CommandError("args.since: expected a unix time in seconds")
    if table not in _LOG_TABLES:
        raise CommandError(f"args.table: expected one of {', '.join(_LOG_TABLES)}")
    if type(limit) is not int or not 1 <= limit <= max_rows:
        raise CommandError(f"args.limit: expected an integer 1..{max_rows}")
    return float(since), table, limit


def _chunks(rows: list[dict[str, Any]], chunk_bytes: int) -> list[list[dict[str, Any]]]:
    chunks: list[list[dict[str, Any]]] = [[]]
    size = 0
    for row in rows:
        n = len(json.dumps(row, default=str))
        if chunks[-1] and size + n > chunk_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(row)
        size += n + 1
    return chunks


def logs_handler(
    export: Callable[..., Iterable[Mapping[str, Any]]],
    publish: Callable[[bytes], AckHandle],
    *,
    max_rows: int = 10_000,
    chunk_bytes: int = 32 * 1024,
    wait_s: float = 5.0,
) -> Handler:
    """``logs.request`` with args ``{"since": ts, "table": "events", "limit": N}``: publish that slice in chunks.

    ``export(since=…, tables=(table,))`` is ``Logbook.export``; ``publish(payload)`` sends one chunk
    (:func:`logs_publisher`). Each chunk is ``{"v": 1, "id": <command id>, "table", "chunk": i, "chunks": n,
    "rows": […]}`` (at least one chunk, even when empty). The result counts rows and chunks and says
    whether every chunk was PUBACKed within ``wait_s``.
    """

    def logs(cmd: Command) -> dict[str, Any]:
        since, table, limit = _logs_args(cmd.args, max_rows)
        rows: list[dict[str, Any]] = []
        for row in export(since=since, tables=(table,)):
            if len(rows) > limit:
                break
            rows.append({k: v for k, v in row.items() if k != "table"})
        truncated = len(rows) > limit
        chunks = _chunks(rows[:limit], chunk_bytes)
        handles = []
        for i, part in enumerate(chunks):
            doc = {"v": 1, "id": cmd.id, "table": table, "chunk": i, "chunks": len(chunks), "rows": part}
            handles.append(publish(json.dumps(doc, default=str).encode()))
        deadline = time.monotonic() + wait_s
        acked = all(h.wait(max(0.0, deadline - time.monotonic())) for h in handles)
        n = min(len(rows), limit)
        return {
            "table": table,
            "since": since,
            "rows": n,
            "chunks": len(chunks),
            "truncated": truncated,
            "acked": acked,
        }

    return logs


def logs_publisher(link: CommandLink, fleet: str, device: str) -> Callable[[bytes], AckHandle]:
    """Publishes one ``logs.request`` chunk to ``edge/<fleet>/<device>/logs`` at QoS 1."""
    topic = topics.logs_topic(fleet, device)

    def publish(payload: bytes) -> AckHandle:
        return link.publish(topic, payload, qos=1)

    return publish


def builtin_handlers(
    *,
    status: Callable[[], Mapping[str, Any]],
    current_config: Callable[[], ServiceConfig],
    state_dir: str | Path,
    export: Callable[..., Iterable[Mapping[str, Any]]],
    publish_logs: Callable[[bytes], AckHandle],
    request_restart: Callable[[], None],
    apply_config: Callable[[ServiceConfig, str], bool] | None = None,
    started_monotonic: float | None = None,
) -> dict[str, Handler]:
    """ping, status, config.set, logs.request and service.restart, wired to the service's callables.

    ``model.deploy`` / ``model.rollback`` are not here: the service plugs in :mod:`runtime.deploy`'s handlers.
    """
    return {
        "ping": ping_handler(started_monotonic=started_monotonic),
        "status": status_handler(status),
        "config.set": config_set_handler(current_config, state_dir, apply=apply_config),
        "logs.request": logs_handler(export, publish_logs),
        "service.restart": RestartHandler(request_restart),
    }
