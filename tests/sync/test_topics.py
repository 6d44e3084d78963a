"""MQTT topic scheme."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync._exceptions import TopicError
from sync.topics import (
    MAX_ID_LEN,
    ParsedTopic,
    device_topic,
    hub_downlink_filter,
    hub_topic,
    hub_uplink_filter,
    parse_topic,
    region_downlink_filter,
    region_state_filter,
    region_uplink_filter,
    validate_id,
)

_ID_CHARS = st.characters(
    codec="utf-8",
    exclude_categories=("Cc", "Cf", "Cs", "Zs", "Zl", "Zp"),
    exclude_characters="/+#$\x00",
)
IDS = st.text(_ID_CHARS, min_size=1, max_size=MAX_ID_LEN)


def test_builders() -> None:
    assert device_topic("eu-1", "dev-9", "up") == "nc/v1/r/eu-1/d/dev-9/up"
    assert device_topic("eu-1", "dev-9", "down") == "nc/v1/r/eu-1/d/dev-9/down"
    assert device_topic("eu-1", "dev-9", "state") == "nc/v1/r/eu-1/d/dev-9/state"
    assert hub_topic("eu-1", "up") == "nc/v1/hub/r/eu-1/up"
    assert hub_topic("eu-1", "down") == "nc/v1/hub/r/eu-1/down"
    assert region_uplink_filter("eu-1") == "nc/v1/r/eu-1/d/+/up"
    assert region_state_filter("eu-1") == "nc/v1/r/eu-1/d/+/state"
    assert region_downlink_filter("eu-1") == "nc/v1/r/eu-1/d/+/down"
    assert hub_uplink_filter() == "nc/v1/hub/r/+/up"
    assert hub_downlink_filter("eu-1") == "nc/v1/hub/r/eu-1/down"


def test_bad_kinds() -> None:
    with pytest.raises(TopicError):
        device_topic("r", "d", "sideways")  # type: ignore[arg-type]
    with pytest.raises(TopicError):
        hub_topic("r", "sideways")  # type: ignore[arg-type]


def test_parse() -> None:
    assert parse_topic("nc/v1/r/eu-1/d/dev-9/state") == ParsedTopic(
        "device", "eu-1", "dev-9", "state"
    )
    assert parse_topic(b"nc/v1/hub/r/eu-1/up") == ParsedTopic("hub", "eu-1", None, "up")
    # A region may be called "hub": the tier is decided by position.
    assert parse_topic("nc/v1/r/hub/d/x/up").tier == "device"


@settings(max_examples=200, deadline=None)
@given(IDS, IDS, st.sampled_from(["up", "down", "state"]))
def test_device_round_trip(region: str, device: str, kind: str) -> None:
    topic = device_topic(region, device, kind)  # type: ignore[arg-type]
    parsed = parse_topic(topic)
    assert (parsed.tier, parsed.region, parsed.device, parsed.kind) == (
        "device",
        region,
        device,
        kind,
    )
    assert parsed.topic == topic
    assert parse_topic(topic.encode()) == parsed


@settings(max_examples=100, deadline=None)
@given(IDS, st.sampled_from(["up", "down"]))
def test_hub_round_trip(region: str, kind: str) -> None:
    topic = hub_topic(region, kind)  # type: ignore[arg-type]
    parsed = parse_topic(topic)
    assert parsed == ParsedTopic("hub", region, None, kind)  # type: ignore[arg-type]
    assert parsed.topic == topic


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("", "empty"),
        (b"", "empty"),
        ("x" * (MAX_ID_LEN + 1), "characters long"),
        ("a#b", "forbidden"),
        ("a+b", "forbidden"),
        ("a/b", "forbidden"),
        ("$SYS", "forbidden"),
        ("a\x00b", "forbidden"),
        ("a b", "whitespace"),
        ("a\tb", "whitespace"),
        ("a\nb", "whitespace"),
        ("\u00a0x", "whitespace"),  # no-break space
        ("x\u2028", "whitespace"),  # line separator
        ("a\x7fb", "control"),
        ("a\u200bb", "control"),  # zero-width space (Cf)
        ("a\u202eb", "control"),  # right-to-left override (Cf)
        ("a\ud800b", "UTF-8"),  # lone surrogate
        (b"a\xffb", "UTF-8"),
        (b"\xc3", "UTF-8"),
        (b"\xed\xa0\x80", "UTF-8"),  # encoded surrogate
        (5, "str or bytes"),
    ],
    ids=repr,
)
def test_bad_ids(bad: object, match: str) -> None:
    with pytest.raises(TopicError, match=match):
        validate_id(bad, what="device")  # type: ignore[arg-type]
    if isinstance(bad, str):
        with pytest.raises(TopicError):
            device_topic("eu-1", bad, "up")
        with pytest.raises(TopicError):
            hub_topic(bad, "up")
        with pytest.raises(TopicError):
            region_uplink_filter(bad)


def test_good_ids() -> None:
    for ok in ("a", "x" * MAX_ID_LEN, "dev_1.eu:a@b", "gerät-ü", "設備", "d-🙂"):
        assert validate_id(ok) == ok
    assert validate_id("gerät".encode()) == "gerät"


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "nc/v1",
        "nc/v2/r/eu/d/x/up",
        "nc/v1/r/eu/d/x/sideways",
        "nc/v1/r/eu/d/+/up",
        "nc/v1/r/eu/d/#",
        "nc/v1/r/eu/d/x/up/extra",
        "nc/v1/r//d/x/up",
        "nc/v1/hub/r/eu/sideways",
        "nc/v1/hub/r/+/up",
        "/nc/v1/hub/r/eu/up",
        "nc/v1/r/eu/x/dev/up",
        b"nc/v1/r/eu/d/\xff/up",
        "nc/v1/r/e u/d/x/up",
        7,
    ],
    ids=repr,
)
def test_parse_rejects(topic: object) -> None:
    with pytest.raises(TopicError):
        parse_topic(topic)  # type: ignore[arg-type]
