"""Topics: building, parsing (and refusing), subscriptions, the will, incoming checks."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.errors import InvalidTopic, LocalProtocolError, MalformedMessage, TopicMismatch
from edge_agent.protocol import AgentDevice, route
from edge_agent.protocol.messages import Ack, Birth, Ctl, Snap, Status, decode, encode
from edge_agent.protocol.topics import (
    Priority,
    Topic,
    TopicKind,
    TopicNamespace,
    decode_incoming,
)

NS = TopicNamespace()
H = bytes(16)
ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True)


def test_layout_matches_the_spec() -> None:
    assert NS.status("gw-1") == "edge-resume/v1/gw-1/status"
    assert NS.hb("gw-1") == "edge-resume/v1/gw-1/hb"
    assert NS.state("gw-1", "j.7") == "edge-resume/v1/gw-1/j.7/state"
    assert NS.ack("gw-1", "j.7") == "edge-resume/v1/gw-1/j.7/ack"
    assert NS.ctl("gw-1", "j.7") == "edge-resume/v1/gw-1/j.7/ctl"
    assert NS.parse("edge-resume/v1/gw-1/j.7/ack") == Topic("gw-1", "j.7", TopicKind.ACK)
    assert NS.parse("edge-resume/v1/gw-1/status") == Topic("gw-1", None, TopicKind.STATUS)
    assert [(k.qos, k.retained) for k in TopicKind] == [
        (1, True),
        (0, False),
        (1, False),
        (0, False),  # the server's replies: a lost one is asked for again (QUERY, BIRTH)
        (1, True),
    ]


@settings(max_examples=200, deadline=None)
@given(
    ids, ids, st.sampled_from(list(TopicKind)), st.sampled_from(["edge-resume/v1", "a", "x/y/z"])
)
def test_build_then_parse(device: str, job: str, kind: TopicKind, prefix: str) -> None:
    ns = TopicNamespace(prefix)
    t = Topic(device, job if kind.per_job else None, kind)
    assert ns.parse(ns.topic(t)) == t


@pytest.mark.parametrize(
    "topic",
    [
        "edge-resume/v1/gw-1",
        "edge-resume/v1/gw-1/j1/state/x",
        "edge-resume/v1/gw-1/j1/status",  # status is device-wide
        "edge-resume/v1/gw-1/state",  # state is per job
        "edge-resume/v1/gw 1/j1/state",
        "edge-resume/v1/+/j1/state",
        "edge-resume/v1//j1/state",
        "edge-resume/v1/gw-1/j1/nope",
        "edge-resume/v2/gw-1/j1/state",
        "edge-resume/v1gw-1/j1/state",
        "",
    ],
)
def test_foreign_topics_are_refused(topic: str) -> None:
    with pytest.raises(InvalidTopic):
        NS.parse(topic)


@pytest.mark.parametrize("prefix", ["", "/a", "a/", "a//b", "a/+/b", "a/#", "$SYS/x", "a\0b"])
def test_bad_prefixes(prefix: str) -> None:
    with pytest.raises(LocalProtocolError):
        TopicNamespace(prefix)


def test_building_with_bad_ids_is_local() -> None:
    with pytest.raises(LocalProtocolError):
        NS.state("gw/1", "j1")
    with pytest.raises(LocalProtocolError):
        NS.status("+")
    with pytest.raises(LocalProtocolError):
        Topic("gw-1", None, TopicKind.STATE)


def test_subscriptions() -> None:
    assert [(s.filter, s.qos) for s in NS.server_subscriptions()] == [
        ("edge-resume/v1/+/status", 1),
        ("edge-resume/v1/+/hb", 0),
        ("edge-resume/v1/+/+/state", 1),
    ]
    shared = NS.server_subscriptions("ingest")
    assert shared[2].filter == "$share/ingest/edge-resume/v1/+/+/state"
    assert [s.filter for s in NS.device_subscriptions("gw-1")] == [
        "edge-resume/v1/gw-1/+/ack",
        "edge-resume/v1/gw-1/+/ctl",
    ]
    with pytest.raises(LocalProtocolError):
        NS.device_subscriptions("#")


def test_will_is_a_retained_offline_status() -> None:
    w = AgentDevice("gw-1", "run-1").will(12.5)
    assert (w.topic, w.qos, w.retain) == ("edge-resume/v1/gw-1/status", 1, True)
    assert decode(w.payload, "gw-1") == Status("gw-1", False, "run-1", 12500)


def test_outgoing_picks_topic_qos_retain() -> None:
    out = NS.outgoing(Ctl("gw-1", "j1", 2, "server", "run", 0))
    assert (out.topic, out.qos, out.retain, out.type) == (
        "edge-resume/v1/gw-1/j1/ctl",
        1,
        True,
        "ctl",
    )
    snap = NS.outgoing(Snap("gw-1", "j1", 1, 4, None, 0, 0, 1, 1, b"x"), Priority.FULL)
    assert (snap.topic, snap.retain, snap.job, snap.seq, snap.chunk) == (
        "edge-resume/v1/gw-1/j1/state",
        False,
        "j1",
        4,
        0,
    )
    assert Priority.CONTROL < Priority.DELTA < Priority.FULL


def test_decode_incoming_checks_the_topic() -> None:
    ack = encode(Ack("gw-1", "j1", 1, 1, H))
    assert decode_incoming(NS, NS.ack("gw-1", "j1"), ack).message.TYPE == "ack"
    # the payload does not name its device and job; its check covers the topic's, so a
    # message published on another device's or job's topic is refused
    with pytest.raises(MalformedMessage, match="another device or job"):
        decode_incoming(NS, NS.ack("gw-2", "j1"), ack)
    with pytest.raises(MalformedMessage, match="another device or job"):
        decode_incoming(NS, NS.ack("gw-1", "j2"), ack)
    status = encode(Status("gw-1", True, "run-1", 0))
    with pytest.raises(MalformedMessage):  # a device-wide message on a job's topic
        decode_incoming(NS, NS.ack("gw-1", "j1"), status)
    with pytest.raises(TopicMismatch, match="may not travel"):
        decode_incoming(NS, NS.ctl("gw-1", "j1"), ack)
    with pytest.raises(TopicMismatch, match="may not travel"):
        decode_incoming(NS, NS.state("gw-1", "j1"), ack)
    with pytest.raises(MalformedMessage):
        decode_incoming(NS, NS.ack("gw-1", "j1"), ack[:-1])
    with pytest.raises(InvalidTopic):
        decode_incoming(NS, "elsewhere/gw-1/j1/ack", ack)


def test_each_side_routes_only_its_own_kinds() -> None:
    agent = AgentDevice("gw-1", "run-1")
    birth = Birth("gw-1", "j1", 1, "run-1", {}, "m", 0, None, None, 0, None)
    status = encode(Status("gw-1", True, "run-1", 0))
    assert route(NS, NS.state("gw-1", "j1"), encode(birth)).message == birth
    assert route(NS, NS.status("gw-1"), status).message.TYPE == "status"
    with pytest.raises(TopicMismatch):
        route(NS, NS.ack("gw-1", "j1"), encode(Ack("gw-1", "j1", 1, 1, H)))
    with pytest.raises(TopicMismatch):
        agent.route(NS.state("gw-1", "j1"), encode(birth))
    other = encode(Ack("gw-2", "j1", 1, 1, H))
    with pytest.raises(TopicMismatch):
        agent.route(NS.ack("gw-2", "j1"), other)  # valid, but another device's
    assert agent.route(NS.ack("gw-1", "j1"), encode(Ack("gw-1", "j1", 1, 1, H))).topic.job == "j1"


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        NS.prefix = "x"  # type: ignore[misc]
