"""The topic contract (API v1): names, inbound parsing and which reply topics are allowed."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edged import domain
from edged.domain import WEARER_PATTERN, is_valid_wearer, sanitize_node_id
from edged.mqtt.errors import ErrorCode, ProtocolError
from edged.mqtt.topics import Inbound, Topics

T = Topics(prefix="edged", node="ward3-pi")


def test_subscriptions_are_the_three_inbound_filters_at_qos_1() -> None:
    assert T.subscriptions() == [
        ("edged/v1/+/vitals", 1),
        ("edged/v1/+/query", 1),
        ("edged/v1/+/cancel", 1),
    ]


def test_outbound_topic_names() -> None:
    assert T.advice("w1") == "edged/v1/w1/advice"
    assert T.error("w1") == "edged/v1/w1/error"
    assert T.alert("w1") == "edged/v1/w1/alert"
    assert T.status() == "edged/v1/_node/ward3-pi/status"
    assert T.node_error() == "edged/v1/_node/ward3-pi/error"
    assert Topics.stream("edged/v1/w1/advice") == "edged/v1/w1/advice/stream"


def test_multi_level_prefix() -> None:
    t = Topics(prefix="hospital/ward3", node="n1")
    assert t.subscriptions()[1] == ("hospital/ward3/v1/+/query", 1)
    assert t.parse("hospital/ward3/v1/w1/query") == Inbound("w1", "query")
    assert t.status() == "hospital/ward3/v1/_node/n1/status"


@pytest.mark.parametrize(
    "topic, expected",
    [
        ("edged/v1/w1/vitals", Inbound("w1", "vitals")),
        ("edged/v1/w1/query", Inbound("w1", "query")),
        ("edged/v1/w1/cancel", Inbound("w1", "cancel")),
        ("edged/v1/W_1-a/query", Inbound("W_1-a", "query")),
        ("edged/v1/7/query", Inbound("7", "query")),
        ("edged/v1/" + "a" * 64 + "/query", Inbound("a" * 64, "query")),
    ],
)
def test_parse_accepts_inbound_topics(topic: str, expected: Inbound) -> None:
    assert T.parse(topic) == expected


@pytest.mark.parametrize(
    "wearer",
    [
        "a" * 65,
        "_node",
        "_w1",
        "-w1",
        "",
        "w 1",
        "w.1",
        "wé",
        "wearer\u0661",  # an Arabic-Indic digit: not [0-9]
        "w1\n",
        "w1\x00",
    ],
)
def test_parse_rejects_invalid_wearers_naming_value_and_pattern(wearer: str) -> None:
    with pytest.raises(ProtocolError) as info:
        T.parse(f"edged/v1/{wearer}/vitals")
    err = info.value
    assert err.code is ErrorCode.INVALID_WEARER
    assert WEARER_PATTERN in err.message
    assert repr(wearer)[:20] in err.message
    assert err.id is None


@pytest.mark.parametrize(
    "topic",
    [
        "edged/v2/w1/vitals",
        "edged/v1/w1/advice",
        "edged/v1/w1/vitals/extra",
        "edged/v1/w1/x/query",
        "edged/v1/w1",
        "other/v1/w1/query",
        "edged/v1//",
        "edgedx/v1/w1/query",
        "",
    ],
)
def test_parse_rejects_topics_that_are_not_ours(topic: str) -> None:
    with pytest.raises(ProtocolError) as info:
        T.parse(topic)
    assert info.value.code is ErrorCode.INVALID_SCHEMA
    assert info.value.field is None


def test_parse_error_cuts_a_long_wearer_in_its_message() -> None:
    with pytest.raises(ProtocolError) as info:
        T.parse("edged/v1/" + "x" * 5000 + "/query")
    assert len(info.value.message) < 200


@pytest.mark.parametrize(
    "topic, allow_foreign, allowed",
    [
        ("edged/v1/w1/replies", False, True),
        ("edged/v1/w1/advice", False, True),
        ("edged/v1/w1/a/b/c", False, True),
        ("edged/v1/w1", False, False),  # the wearer level itself is not *under* it
        ("edged/v1/w1/", False, False),
        ("edged/v1/w2/replies", False, False),
        ("edged/v1/w10/replies", False, False),
        ("edged/v1/w2/replies", True, True),
        ("clinic/inbox/42", False, False),
        ("clinic/inbox/42", True, True),
        ("edged/v1/w1/+", False, False),
        ("edged/v1/w1/#", False, False),
        ("edged/v1/w1/a+b", True, False),
        ("clinic/#", True, False),
        ("edged/v1/w1//x", False, False),
        ("/edged/v1/w1/x", True, False),
        ("edged/v1/w1/x\x00", False, False),
        ("edged/v1/w1/\ud800", False, False),
        ("edged/v1/w1/é", False, True),
        ("$SYS/broker", True, False),
        ("edged/v1/_node/ward3-pi/status", True, False),
        ("edged/v1/_node/other/error", True, False),
        ("edged/v1/_node", True, False),
        # Our own inbound topics would feed the reply back in as a request.
        ("edged/v1/w1/query", False, False),
        ("edged/v1/w1/vitals", False, False),
        ("edged/v1/w1/cancel", False, False),
        ("edged/v1/w2/query", True, False),
        ("edged/v1/w1/query/x", False, True),
        ("", True, False),
        ("edged/v1/w1/" + "x" * (1024 - 12), False, True),
        ("edged/v1/w1/" + "x" * (1025 - 12), False, False),
    ],
)
def test_reply_allowed(topic: str, allow_foreign: bool, allowed: bool) -> None:
    assert T.reply_allowed("w1", topic, allow_foreign) is allowed


def test_reply_allowed_refuses_non_strings() -> None:
    assert T.reply_allowed("w1", None, True) is False  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("ward3.pi.local", "ward3-pi-local"),
        ("ward3-pi", "ward3-pi"),
        ("raspberrypi", "raspberrypi"),
        ("jetson_nano", "jetson_nano"),
        ("a..b", "a-b"),
        ("-host-", "host"),
        ("_host_", "host"),
        (".local.", "local"),
        ("bücher", "bucher"),
        ("host name (1)", "host-name-1"),
        ("x" * 100, "x" * 64),
        ("x" * 63 + ".y", "x" * 63),
    ],
)
def test_sanitize_node_id(name: str, expected: str) -> None:
    assert sanitize_node_id(name) == expected


@pytest.mark.parametrize("name", ["", "---", "日本", "..."])
def test_sanitize_node_id_falls_back_to_a_hash_never_empty(name: str) -> None:
    node = sanitize_node_id(name)
    assert re.fullmatch(r"node-[0-9a-f]{8}", node)
    assert node == sanitize_node_id(name)


def test_sanitize_node_id_fallbacks_differ_between_hosts() -> None:
    assert sanitize_node_id("日本") != sanitize_node_id("中国")


@given(st.text())
def test_sanitize_node_id_always_matches_the_wearer_pattern(name: str) -> None:
    assert is_valid_wearer(sanitize_node_id(name))


def test_default_node_is_the_sanitised_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(domain.socket, "gethostname", lambda: "ward3.pi.local")
    assert Topics().node == "ward3-pi-local"
    assert Topics().status() == "edged/v1/_node/ward3-pi-local/status"


@pytest.mark.parametrize(
    "prefix", ["", "a//b", "/edged", "edged/", "ed+ged", "ed#", "$SYS", "\x00"]
)
def test_bad_prefix_is_a_config_error(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        Topics(prefix=prefix, node="n1")


@pytest.mark.parametrize("node", ["", "_n", "n.1", "n" * 65])
def test_bad_node_is_a_config_error(node: str) -> None:
    with pytest.raises(ValueError, match="node"):
        Topics(node=node)


def test_node_level_never_collides_with_a_wearer() -> None:
    assert not is_valid_wearer("_node")
