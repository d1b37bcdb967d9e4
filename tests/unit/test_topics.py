"""Topic names: segments validated, parsing never raises, filter matching agrees with paho's matcher."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub

from runtime.errors import ConfigError
from runtime.topics import (
    DATA_TABLES,
    MAX_SEGMENT,
    RESERVED_DEVICE_IDS,
    TopicInfo,
    ack_topic,
    all_cmd_topic,
    cmd_topic,
    cmd_topics,
    data_topic,
    escalate_response_topic,
    escalate_topic,
    fleet_filter,
    group_cmd_topic,
    logs_topic,
    parse_topic,
    shared,
    status_topic,
    topic_matches,
    validate_device,
    validate_filter,
    validate_segment,
)


def _valid(text: str) -> bool:
    try:
        validate_segment(text)
    except ConfigError:
        return False
    return True


segments = st.text(min_size=1, max_size=MAX_SEGMENT).filter(_valid)
devices = segments.filter(lambda s: s not in RESERVED_DEVICE_IDS)
anything = st.one_of(st.text(), st.binary(), st.none(), st.integers(), st.lists(st.text()))


@given(anything)
def test_validate_segment_returns_the_value_or_a_config_error(value: object) -> None:
    try:
        out = validate_segment(value, "mqtt.fleet")
    except ConfigError as exc:
        assert "mqtt.fleet" in str(exc)
        return
    assert out == value and isinstance(out, str)
    assert 0 < len(out) <= MAX_SEGMENT
    assert not set(out) & set("+#/\x00")
    out.encode("utf-8")


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#", "x\x00y", "tab\there", "\ud800", "x" * (MAX_SEGMENT + 1)])
def test_bad_segments_are_refused_naming_the_key(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"mqtt\.device"):
        validate_segment(bad, "mqtt.device")


@pytest.mark.parametrize("reserved", sorted(RESERVED_DEVICE_IDS))
def test_fleet_wide_names_cannot_be_device_ids(reserved: str) -> None:
    with pytest.raises(ConfigError, match="reserved"):
        validate_device(reserved)
    with pytest.raises(ConfigError):
        status_topic("f", reserved)


@given(st.one_of(st.text(max_size=300), anything))
def test_parse_topic_never_raises(topic: object) -> None:
    info = parse_topic(topic)
    assert info is None or isinstance(info, TopicInfo)


_NEAR = ["edge", "f", "d", "all", "group", "cmd", "ack", "escalate", "resp", "status", "metrics", "logs", ""]


@given(st.lists(st.sampled_from(_NEAR), max_size=7))
def test_parse_topic_on_near_misses(levels: list[str]) -> None:
    topic = "/".join(levels)
    info = parse_topic(topic)
    if info is not None:  # whatever parses must be exactly what the builders make
        rebuilt = {
            "status": lambda: status_topic(info.fleet, info.device or ""),
            "logs": lambda: logs_topic(info.fleet, info.device or ""),
            "cmd": lambda: cmd_topic(info.fleet, info.device or ""),
            "ack": lambda: ack_topic(info.fleet, info.device or ""),
            "escalate_resp": lambda: escalate_response_topic(info.fleet, info.device or ""),
            "group_cmd": lambda: group_cmd_topic(info.fleet, info.group or ""),
            "all_cmd": lambda: all_cmd_topic(info.fleet),
            "escalate": lambda: escalate_topic(info.fleet, info.model or ""),
        }.get(info.kind, lambda: data_topic(info.fleet, info.device or "", info.kind))()
        assert rebuilt == topic


@given(segments, devices, segments, segments)
def test_builders_and_parse_round_trip(fleet: str, device: str, group: str, model: str) -> None:
    assert parse_topic(status_topic(fleet, device)) == TopicInfo("status", fleet, device=device)
    for table in DATA_TABLES:
        assert parse_topic(data_topic(fleet, device, table)) == TopicInfo(table, fleet, device=device)  # type: ignore[arg-type]
    assert parse_topic(logs_topic(fleet, device)) == TopicInfo("logs", fleet, device=device)
    assert parse_topic(cmd_topic(fleet, device)) == TopicInfo("cmd", fleet, device=device)
    assert parse_topic(ack_topic(fleet, device)) == TopicInfo("ack", fleet, device=device)
    assert parse_topic(escalate_response_topic(fleet, device)) == TopicInfo("escalate_resp", fleet, device=device)
    assert parse_topic(group_cmd_topic(fleet, group)) == TopicInfo("group_cmd", fleet, group=group)
    assert parse_topic(all_cmd_topic(fleet)) == TopicInfo("all_cmd", fleet)
    assert parse_topic(escalate_topic(fleet, model)) == TopicInfo("escalate", fleet, model=model)
    assert cmd_topics(fleet, device, group) == [
        cmd_topic(fleet, device),
        group_cmd_topic(fleet, group),
        all_cmd_topic(fleet),
    ]
    assert cmd_topics(fleet, device) == [cmd_topic(fleet, device), all_cmd_topic(fleet)]


@given(segments, devices, devices, segments)
def test_fleet_filters_match_their_own_topics_only(fleet: str, device: str, other: str, share: str) -> None:
    for table in DATA_TABLES:
        topic = data_topic(fleet, device, table)
        assert topic_matches(fleet_filter(fleet, table), topic)
        assert topic_matches(shared(fleet_filter(fleet, table), share), topic)
        assert not topic_matches(fleet_filter(fleet, "status"), topic)
    assert topic_matches(fleet_filter(fleet, "cmd/ack"), ack_topic(fleet, device))
    assert topic_matches(cmd_topic(fleet, device), cmd_topic(fleet, other)) == (device == other)
    assert not topic_matches(fleet_filter(fleet, "cmd"), ack_topic(fleet, device))


@given(st.one_of(st.text(max_size=80), anything), st.one_of(st.text(max_size=80), anything))
def test_topic_matches_never_raises(topic_filter: object, topic: object) -> None:
    assert topic_matches(topic_filter, topic) in (True, False)  # type: ignore[arg-type]


@given(anything)
def test_validate_filter_returns_the_value_or_a_config_error(value: object) -> None:
    try:
        assert validate_filter(value) == value
    except ConfigError as exc:
        assert "topic_filter" in str(exc)


_levels = st.sampled_from(["a", "b", "", "$x", "edge"])
_filter_levels = st.sampled_from(["a", "b", "", "$x", "edge", "+"])


@st.composite
def _filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(_filter_levels, min_size=1, max_size=5))
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels)


@given(_filters(), st.lists(_levels, min_size=1, max_size=6).map("/".join))
def test_topic_matches_agrees_with_paho(topic_filter: str, topic: str) -> None:
    assume(topic)  # paho and MQTT: a topic is at least one character
    assert topic_matches(topic_filter, topic) == topic_matches_sub(topic_filter, topic)


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("edge/#", "edge", True),  # '#' includes the parent level
        ("#", "$SYS/broker/uptime", False),  # wildcards at the first level skip $ topics
        ("+/broker/uptime", "$SYS/broker/uptime", False),
        ("$SYS/#", "$SYS/broker/uptime", True),
        ("$share/ingest/edge/f/+/metrics", "edge/f/d/metrics", True),
        ("$share/ingest", "edge", False),  # a share needs a filter
        ("edge/+", "edge/a/b", False),
        ("edge/#/x", "edge/a/x", False),  # invalid filter
        ("edge/a+", "edge/a+", False),
        ("edge/a", "edge/+", False),  # a topic cannot hold wildcards
    ],
)
def test_topic_matches_edge_cases(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


def test_unknown_tables_and_leaves_are_refused() -> None:
    with pytest.raises(ConfigError, match="table"):
        data_topic("f", "d", "secrets")
    with pytest.raises(ConfigError, match="leaf"):
        fleet_filter("f", "#")
    with pytest.raises(ConfigError, match="share_group"):
        shared("edge/f/+/metrics", "a/b")
