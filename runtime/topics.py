"""MQTT topic names of a fleet: building them from validated segments, parsing them back, matching filters.

Every topic starts ``edge/<fleet>/``::

    edge/<fleet>/<device>/status            retained birth ({"online": true, …}) and last will
    edge/<fleet>/<device>/inferences        sync batches, one topic per logbook table
    edge/<fleet>/<device>/metrics
    edge/<fleet>/<device>/events
    edge/<fleet>/<device>/logs              replies to logs.request
    edge/<fleet>/<device>/cmd               commands for this device
    edge/<fleet>/<device>/cmd/ack           its acknowledgements
    edge/<fleet>/<device>/escalate/resp     answers to its escalation requests
    edge/<fleet>/group/<group>/cmd          commands for a group
    edge/<fleet>/all/cmd                    commands for the whole fleet
    edge/<fleet>/escalate/<model>           escalation requests to the server-side model
    edge/<fleet>/blobs/<sha256>/meta        a file offered over MQTT (retained; runtime.download)
    edge/<fleet>/blobs/<sha256>/<index>     its chunks (retained)

A segment (fleet, device, group, model) is 1..64 characters without ``+``, ``#``, ``/``, control
characters or unpaired surrogates. ``all``, ``group``, ``escalate`` and ``blobs`` cannot be device
ids: they would make a device's topics collide with the fleet-wide ones. Ingest workers share the load with
MQTT 5 shared subscriptions (:func:`shared`): ``$share/<group>/edge/<fleet>/+/inferences``.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Literal

from runtime.errors import ConfigError

__all__ = [
    "DATA_TABLES",
    "MAX_SEGMENT",
    "RESERVED_DEVICE_IDS",
    "ROOT",
    "TopicInfo",
    "TopicKind",
    "ack_topic",
    "all_cmd_topic",
    "blob_filter",
    "blob_topic",
    "cmd_topic",
    "cmd_topics",
    "data_topic",
    "escalate_response_topic",
    "escalate_topic",
    "fleet_filter",
    "group_cmd_topic",
    "logs_topic",
    "parse_topic",
    "shared",
    "status_topic",
    "topic_matches",
    "validate_device",
    "validate_filter",
    "validate_segment",
]

ROOT = "edge"
MAX_SEGMENT = 64
DATA_TABLES = ("inferences", "metrics", "events")
RESERVED_DEVICE_IDS = frozenset({"all", "group", "escalate", "blobs"})

TopicKind = Literal[
    "status",
    "inferences",
    "metrics",
    "events",
    "logs",
    "cmd",
    "ack",
    "escalate_resp",
    "group_cmd",
    "all_cmd",
    "escalate",
]
_DEVICE_LEAVES: dict[str, TopicKind] = {
    "status": "status",
    "inferences": "inferences",
    "metrics": "metrics",
    "events": "events",
    "logs": "logs",
    "cmd": "cmd",
}
_MAX_TOPIC_BYTES = 65535  # MQTT's UTF-8 string length limit


@dataclass(frozen=True)
class TopicInfo:
    """What a topic is about: its kind, fleet, and the device, group or model it names (others None)."""

    kind: TopicKind
    fleet: str
    device: str | None = None
    group: str | None = None
    model: str | None = None


def validate_segment(value: object, key: str = "segment") -> str:
    """``value`` if it can be one topic level, else ConfigError naming ``key``."""
    if not isinstance(value, str):
        raise ConfigError(f"expected a string, got {type(value).__name__}", key=key)
    if not value:
        raise ConfigError("must not be empty", key=key)
    if len(value) > MAX_SEGMENT:
        raise ConfigError(f"must be at most {MAX_SEGMENT} characters, got {len(value)}", key=key)
    for ch in value:
        if ch in "+#/":
            raise ConfigError(f"must not contain {ch!r} (MQTT topic separator or wildcard): {value!r}", key=key)
        if unicodedata.category(ch) in ("Cc", "Cs"):
            raise ConfigError(
                f"must not contain control characters or unpaired surrogates (found U+{ord(ch):04X}): {value!r}",
                key=key,
            )
    return value


def validate_device(value: object, key: str = "device") -> str:
    """A device id: a valid segment that is not one of the fleet-wide names (``all``, ``group``, ``escalate``)."""
    device = validate_segment(value, key)
    if device in RESERVED_DEVICE_IDS:
        raise ConfigError(
            f"{device!r} is reserved for fleet-wide topics; choose another device id "
            f"(reserved: {', '.join(sorted(RESERVED_DEVICE_IDS))})",
            key=key,
        )
    return device


def _device_base(fleet: str, device: str) -> str:
    return f"{ROOT}/{validate_segment(fleet, 'fleet')}/{validate_device(device)}"


def status_topic(fleet: str, device: str) -> str:
    """``edge/<fleet>/<device>/status`` (retained birth message and last will)."""
    return f"{_device_base(fleet, device)}/status"


def data_topic(fleet: str, device: str, table: str) -> str:
    """``edge/<fleet>/<device>/<table>`` for one logbook table (inferences, metrics, events)."""
    if table not in DATA_TABLES:
        raise ConfigError(f"unknown table {table!r}; expected one of {', '.join(DATA_TABLES)}", key="table")
    return f"{_device_base(fleet, device)}/{table}"


def logs_topic(fleet: str, device: str) -> str:
    """``edge/<fleet>/<device>/logs`` (replies to logs.request)."""
    return f"{_device_base(fleet, device)}/logs"


def cmd_topic(fleet: str, device: str) -> str:
    """``edge/<fleet>/<device>/cmd``: commands addressed to one device."""
    return f"{_device_base(fleet, device)}/cmd"


def ack_topic(fleet: str, device: str) -> str:
    """``edge/<fleet>/<device>/cmd/ack``: a device's command acknowledgements."""
    return f"{_device_base(fleet, device)}/cmd/ack"


def group_cmd_topic(fleet: str, group: str) -> str:
    """``edge/<fleet>/group/<group>/cmd``."""
    return f"{ROOT}/{validate_segment(fleet, 'fleet')}/group/{validate_segment(group, 'group')}/cmd"


def all_cmd_topic(fleet: str) -> str:
    """``edge/<fleet>/all/cmd``."""
    return f"{ROOT}/{validate_segment(fleet, 'fleet')}/all/cmd"


def cmd_topics(fleet: str, device: str, group: str | None = None) -> list[str]:
    """Every command topic a device subscribes to: its own, its group's (if any), the fleet's."""
    topics = [cmd_topic(fleet, device)]
    if group is not None:
        topics.append(group_cmd_topic(fleet, group))
    topics.append(all_cmd_topic(fleet))
    return topics


def escalate_topic(fleet: str, model: str) -> str:
    """``edge/<fleet>/escalate/<model>``: requests to the server-side model."""
    return f"{ROOT}/{validate_segment(fleet, 'fleet')}/escalate/{validate_segment(model, 'model')}"


def escalate_response_topic(fleet: str, device: str) -> str:
    """``edge/<fleet>/<device>/escalate/resp``: the response topic a device names in its requests."""
    return f"{_device_base(fleet, device)}/escalate/resp"


def blob_topic(fleet: str, sha256: str, part: str | int) -> str:
    """``edge/<fleet>/blobs/<sha256>/<part>``: ``meta`` or a chunk index of a file offered over MQTT."""
    text = str(part)
    if text != "meta" and not (text.isascii() and text.isdigit()):
        raise ConfigError(f'expected "meta" or a chunk index >= 0, got {part!r}', key="part")
    return f"{_blob_base(fleet, sha256)}/{text}"


def blob_filter(fleet: str, sha256: str) -> str:
    """``edge/<fleet>/blobs/<sha256>/#``: a file's meta and every chunk."""
    return f"{_blob_base(fleet, sha256)}/#"


def _blob_base(fleet: str, sha256: str) -> str:
    if not isinstance(sha256, str) or len(sha256) != 64 or set(sha256) - set("0123456789abcdef"):
        raise ConfigError(f"expected 64 lowercase hex digits, got {sha256!r}", key="sha256")
    return f"{ROOT}/{validate_segment(fleet, 'fleet')}/blobs/{sha256}"


def fleet_filter(fleet: str, leaf: str) -> str:
    """``edge/<fleet>/+/<leaf>``: one kind of topic from every device (``leaf`` may be ``cmd/ack``)."""
    leaves = (*_DEVICE_LEAVES, "cmd/ack", "escalate/resp")
    if leaf not in leaves:
        raise ConfigError(f"unknown topic leaf {leaf!r}; expected one of {', '.join(leaves)}", key="leaf")
    return f"{ROOT}/{validate_segment(fleet, 'fleet')}/+/{leaf}"


def shared(topic_filter: str, group: str) -> str:
    """The MQTT 5 shared subscription ``$share/<group>/<filter>``: the broker gives each message to one member."""
    return f"$share/{validate_segment(group, 'share_group')}/{validate_filter(topic_filter)}"


def validate_filter(topic_filter: object, key: str = "topic_filter") -> str:
    """A topic filter (``+`` and ``#`` only as whole levels, ``#`` last), else ConfigError naming ``key``."""
    if not isinstance(topic_filter, str) or not topic_filter:
        raise ConfigError(f"must be a non-empty string, got {topic_filter!r}", key=key)
    if "\x00" in topic_filter or _utf8_len(topic_filter) is None:
        raise ConfigError(f"must be valid UTF-8 without NUL: {topic_filter!r}", key=key)
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ConfigError(f"'#' must be a whole level and the last one: {topic_filter!r}", key=key)
        if "+" in level and level != "+":
            raise ConfigError(f"'+' must be a whole level: {topic_filter!r}", key=key)
    return topic_filter


def _utf8_len(text: str) -> int | None:
    try:
        n = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return None
    return n if n <= _MAX_TOPIC_BYTES else None


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter`` as a broker would; False for an invalid filter or topic.

    ``$share/<group>/`` is stripped from the filter first. Wildcards at the first level do not match
    topics starting with ``$`` (``$SYS/…``), as MQTT requires.
    """
    try:
        if not isinstance(topic, str) or not topic or "+" in topic or "#" in topic or _utf8_len(topic) is None:
            return False
        if isinstance(topic_filter, str) and topic_filter.startswith("$share/"):
            parts = topic_filter.split("/", 2)
            if len(parts) < 3 or not parts[1] or "+" in parts[1] or "#" in parts[1]:
                return False
            topic_filter = parts[2]
        validate_filter(topic_filter)
    except ConfigError:
        return False
    f_levels, t_levels = topic_filter.split("/"), topic.split("/")
    if topic.startswith("$") and f_levels[0] in ("+", "#"):
        return False
    for i, level in enumerate(f_levels):
        if level == "#":
            return True  # also matches the parent level: "a/#" matches "a"
        if i >= len(t_levels) or (level != "+" and level != t_levels[i]):
            return False
    return len(f_levels) == len(t_levels)


def parse_topic(topic: object) -> TopicInfo | None:
    """What a fleet topic is about, or None for anything else (never raises)."""
    if not isinstance(topic, str) or len(topic) > 4 * MAX_SEGMENT + 32:
        return None
    levels = topic.split("/")
    if len(levels) < 4 or levels[0] != ROOT:
        return None
    try:
        for level in levels[1:]:
            validate_segment(level)
    except ConfigError:
        return None
    return _classify(levels[1], levels[2:])


def _classify(fleet: str, rest: list[str]) -> TopicInfo | None:
    head, n = rest[0], len(rest)
    if head == "all":
        return TopicInfo("all_cmd", fleet) if rest == ["all", "cmd"] else None
    if head == "group":
        return TopicInfo("group_cmd", fleet, group=rest[1]) if n == 3 and rest[2] == "cmd" else None
    if head == "escalate":
        return TopicInfo("escalate", fleet, model=rest[1]) if n == 2 else None
    if head == "blobs":  # files offered over MQTT (blob_topic), not a device
        return None
    if n == 2 and rest[1] in _DEVICE_LEAVES:
        return TopicInfo(_DEVICE_LEAVES[rest[1]], fleet, device=head)
    if rest[1:] == ["cmd", "ack"]:
        return TopicInfo("ack", fleet, device=head)
    if rest[1:] == ["escalate", "resp"]:
        return TopicInfo("escalate_resp", fleet, device=head)
    return None
