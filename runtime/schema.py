"""Typed loading of TOML/JSON mappings into frozen dataclasses, with errors naming file and key.

One small ``from_dict`` does it all: unknown keys are rejected, missing required keys are
named, and a value of the wrong type says what was expected::

    rpi5.toml: cpu.threads: expected int, got "four"
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import reprlib
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from runtime.errors import ConfigError

__all__ = ["from_dict", "load_toml", "loads_toml", "to_dict"]

T = TypeVar("T")

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 devices
    import tomli as tomllib


def loads_toml(text: str, *, path: str | Path, error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """Parse TOML text; a syntax error names ``path``."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error(f"invalid TOML: {exc}", path=path) from exc
    except RecursionError as exc:  # tomllib recurses once per nested array or inline table
        raise error("invalid TOML: arrays or tables nested too deeply", path=path) from exc


def load_toml(path: str | Path, error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """Read a TOML file; a missing file or a syntax error names the file."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise error("file not found", path=p) from None
    except OSError as exc:
        raise error(f"cannot read: {exc.strerror}", path=p) from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"not UTF-8 text (byte {exc.start})", path=p) from exc
    return loads_toml(text, path=p, error=error)


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = 60
_REPR.maxother = 60


def _describe(value: object) -> str:
    """A short, one-line rendering of a bad value: strings in double quotes, as TOML writes them."""
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)  # escapes quotes, newlines and control chars
    else:
        text = _REPR.repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return text


def _key_text(key: object) -> str:
    """A key as TOML writes it: bare when it can be, else quoted (``cpu."a b"``, ``""``)."""
    text = str(key)
    return text if _BARE_KEY.fullmatch(text) else json.dumps(text, ensure_ascii=False)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (tuple, list):
        return "list"
    if origin in (dict, Mapping):
        return "table"
    if dataclasses.is_dataclass(tp):
        return "table"
    if tp is type(None):
        return "nothing"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, path: str | None, error: type[ConfigError]) -> Any:
    def fail(expected: str | None = None) -> typing.NoReturn:
        message = f"expected {expected or _type_name(tp)}, got {_describe(value)}"
        raise error(message, path=path, key=key)

    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp) and type(value) in {type(a) for a in get_args(tp)}:
            return value
        fail("one of " + ", ".join(repr(a) for a in get_args(tp)))
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        last: ConfigError | None = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, path, error)
            except ConfigError as exc:
                last = exc
        if len([a for a in args if a is not type(None)]) == 1 and last is not None:
            raise last
        fail()
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            fail()
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                fail(f"list of {len(args)} items")
            pairs = enumerate(zip(value, args, strict=True))
            return tuple(_convert(v, a, f"{key}[{i}]", path, error) for i, (v, a) in pairs)
        item = args[0] if args else Any
        items = [_convert(v, item, f"{key}[{i}]", path, error) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            fail()
        _, vtp = get_args(tp) or (str, Any)
        return {str(k): _convert(v, vtp, f"{key}.{_key_text(k)}", path, error) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            fail()
        return from_dict(tp, value, path=path, prefix=key, error=error)  # type: ignore[arg-type]
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int too large for a float
                fail("finite number")
            if not math.isfinite(number):
                fail("finite number")
            return number
        fail("number")
    if tp is str:
        if isinstance(value, str):
            return value
        fail()
    if tp is type(None):
        if value is None:
            return None
        fail()
    raise TypeError(f"schema type {tp!r} at {key} is not supported")  # programming error


def from_dict(
    cls: type[T],
    data: Mapping[str, Any],
    *,
    path: str | Path | None = None,
    prefix: str = "",
    error: type[ConfigError] = ConfigError,
) -> T:
    """Build the frozen dataclass ``cls`` from ``data``.

    Unknown keys, missing required keys and values of the wrong type raise ``error`` naming
    ``path`` and the dotted key. A dataclass may define ``_validate(self) -> str | None`` for
    cross-field checks; a returned message becomes the error.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    spath = str(path) if path is not None else None
    if not isinstance(data, Mapping):
        raise error(f"expected table, got {_describe(data)}", path=spath, key=prefix or None)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    # TOML keys use dashes or underscores; fields use underscores.
    seen: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for raw_key, value in data.items():
        name = str(raw_key).replace("-", "_")
        dotted = f"{prefix}.{_key_text(raw_key)}" if prefix else _key_text(raw_key)
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise error(f"unknown key (known keys: {known})", path=spath, key=dotted)
        if name in spelled:
            message = f"given twice (also as {spelled[name]!r}); keep one"
            raise error(message, path=spath, key=dotted)
        spelled[name] = str(raw_key)
        seen[name] = _convert(value, hints[name], dotted, spath, error)
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name not in seen and required:
            dotted = f"{prefix}.{name}" if prefix else name
            raise error("required key is missing", path=spath, key=dotted)
    obj = cls(**seen)
    check = getattr(obj, "_validate", None)
    if check is not None:
        problem = check()
        if problem:
            key, _, message = problem.partition(": ") if ": " in problem else ("", "", problem)
            full = f"{prefix}.{key}" if prefix and key else (key or prefix or None)
            raise error(message, path=spath, key=full)
    return obj


def to_dict(obj: Any) -> Any:
    """The plain (JSON/TOML-ready) form of a dataclass tree."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj
