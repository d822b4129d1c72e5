"""The MQTT transport against a real Mosquitto (tests/support/broker.py), plus its pure parts.

Broker faults are real: Mosquitto SIGKILLed and restarted on the same port, a client
process SIGKILLed, a TCP proxy that cuts the link or plays an MQTT 3.1.1-only broker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.errors import ConnectionRefused, TransportError, TransportTimeout
from edge_agent.ratelimit import Priority
from edge_agent.transport import (
    BrokerURL,
    Connected,
    Disconnected,
    Message,
    TLSOptions,
    Transport,
    TransportConfig,
    Will,
    _Aliases,
    parse_broker_url,
    publish_packet_size,
)
from tests.support.broker import Broker, free_port
from tests.support.mqtt_proxy import MqttProxy
from tests.support.tls import PKI, make_pki

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def config(url: str, client_id: str = "dev-1", **kw: Any) -> TransportConfig:
    """Test defaults: quick back-off and time-outs, seeded jitter."""
    base: dict[str, Any] = {
        "backoff_initial": 0.05,
        "backoff_max": 0.5,
        "connect_timeout": 5.0,
        "stable_after": 0.5,
        "seed": 1,
    }
    base.update(kw)
    return TransportConfig(broker=url, client_id=client_id, **base)


@pytest.fixture
def make() -> Iterator[Callable[..., Transport]]:
    """Make transports that are closed at the end of the test."""
    made: list[Transport] = []

    def factory(url: str, client_id: str = "dev-1", *, start: bool = True, **kw: Any) -> Transport:
        t = Transport(config(url, client_id, **kw))
        made.append(t)
        return t.start() if start else t

    yield factory
    for t in made:
        t.close(timeout=1.0)


def messages(t: Transport, n: int, timeout: float = 10.0) -> list[Message]:
    """The next ``n`` messages (link events skipped)."""
    out: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        ev = t.get(max(0.0, deadline - time.monotonic()))
        if ev is None:
            raise AssertionError(f"got {len(out)} of {n} messages: {out[-3:]}")
        if isinstance(ev, Message):
            out.append(ev)
    return out


def next_event(t: Transport, kind: type, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        ev = t.get(max(0.0, deadline - time.monotonic()))
        if ev is None:
            raise AssertionError(f"no {kind.__name__} within {timeout}s")
        if isinstance(ev, kind):
            return ev


# ------------------------------------------------------------------ pure parts


def test_broker_urls() -> None:
    assert parse_broker_url("mqtt://gw.example:1884") == BrokerURL("gw.example", 1884, False)
    u = parse_broker_url("mqtts://broker")
    assert (u.host, u.port, u.tls) == ("broker", 8883, True)
    assert parse_broker_url("mqtt://10.0.0.1").port == 1883
    for bad in [
        "http://x",
        "broker:1883",
        "mqtt://",
        "mqtt://u:p@host",
        "mqtt://h:99999",
        "mqtt://h/x",
    ]:
        with pytest.raises(TransportError):
            parse_broker_url(bad)


def _paho_packet(topic: str, payload: bytes, qos: int, v5: bool, alias: int | None) -> bytes:
    """The bytes paho itself puts on the wire for a PUBLISH (its socket replaced)."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
    captured: list[bytes] = []
    c._sock = object()  # type: ignore[assignment]
    c._packet_queue = lambda command, packet, mid, qos, info=None: captured.append(bytes(packet))  # type: ignore[method-assign]
    props = None
    if alias is not None:
        props = Properties(PacketTypes.PUBLISH)
        props.TopicAlias = alias
    c._send_publish(1, topic.encode(), payload, qos, False, False, None, props)
    c._sock = None
    return captured[0]


@pytest.mark.parametrize(
    ("topic", "size", "qos", "v5", "alias"),
    [
        ("edge-resume/v1/gw-1/job-1/state", 30, 1, True, None),
        ("edge-resume/v1/gw-1/job-1/state", 30, 1, True, 3),
        ("", 30, 1, True, 3),
        ("edge-resume/v1/gw-1/hb", 12, 0, True, None),
        ("edge-resume/v1/gw-1/job-1/state", 120_000, 1, False, None),
        ("t", 2_000_000, 1, True, 1),
        ("t", 100, 0, False, None),
    ],
)
def test_packet_size_estimate_matches_paho(
    topic: str, size: int, qos: int, v5: bool, alias: int | None
) -> None:
    wire = _paho_packet(topic, b"x" * size, qos, v5, alias)
    est = publish_packet_size(
        len(topic), size, qos, v5=v5, properties_len=3 if alias is not None else 0
    )
    assert est == len(wire)


def test_topic_aliases_are_assigned_reused_and_recycled() -> None:
    a = _Aliases(2)
    assert a.resolve("a") == ("a", 1, True)
    a.record("a", 1, True)
    assert a.resolve("a") == ("", 1, False)
    a.record("a", 1, False)
    assert a.resolve("b") == ("b", 2, True)
    a.record("b", 2, True)
    a.record("a", 1, False)  # a used again: b is now the least recently used
    assert a.resolve("c") == ("c", 2, True)  # b's alias goes to c (topic + alias re-maps it)
    a.record("c", 2, True)
    assert a.resolve("b") == ("b", 1, True)
    assert a.resolve("c") == ("", 2, False)
    assert _Aliases(0).resolve("a") == ("a", None, False)


def test_bad_options_are_refused_before_connecting(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="scheme"):
        Transport(config("tcp://127.0.0.1:1883"))
    with pytest.raises(TransportError, match="does not exist"):
        Transport(config("mqtts://127.0.0.1:8883", tls=TLSOptions(ca_file=str(tmp_path / "no"))))
    with pytest.raises(TransportError, match="mqtts"):
        Transport(config("mqtt://127.0.0.1:1883", tls=TLSOptions()))
    t = Transport(config("mqtt://127.0.0.1:1"))
    for topic in ["", "a/+/b", "a/#"]:
        with pytest.raises(TransportError, match="cannot publish"):
            t.publish(topic, b"x")
    with pytest.raises(TransportError, match="QoS"):
        t.publish("a", b"x", qos=2)
    t.close()
    with pytest.raises(TransportError, match="closed"):
        t.publish("a", b"x")


# ------------------------------------------------------------------ against Mosquitto


def test_publish_subscribe_round_trip(broker: Broker, make: Callable[..., Transport]) -> None:
    t = make(broker.url)
    ev = t.wait_connected(10)
    assert ev.protocol == "5" and ev.topic_alias_max == 10 and ev.max_packet_size == 1048576
    assert next_event(t, Connected) == ev  # the same event reaches the queue
    assert t.subscribe([("er/dev-1/#", 1)]) == [1]
    tickets = [
        t.publish("er/dev-1/j/state", b"m%d" % i, priority=Priority.DELTA) for i in range(20)
    ]
    for tk in tickets:
        tk.result(10)
        assert tk.state == "delivered"
    got = messages(t, 20)
    assert [m.payload for m in got] == [b"m%d" % i for i in range(20)]
    assert {m.topic for m in got} == {"er/dev-1/j/state"}
    s = t.stats()
    assert (s.published, s.delivered, s.failed, s.received) == (20, 20, 0, 20)
    assert s.alias_hits == 19  # the first carries the topic, the others the alias only
    assert s.queued == 0 and s.inflight == 0
    # QoS 0 too
    t.publish("er/dev-1/hb", b"hb", qos=0).result(10)
    assert messages(t, 1)[0].payload == b"hb"


def test_will_is_published_retained_when_the_client_is_killed(
    broker: Broker, make: Callable[..., Transport]
) -> None:
    status = "edge-resume/v1/gw-9/status"
    watcher = make(broker.url, "server-1")
    watcher.wait_connected(10)
    watcher.subscribe(status)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.support.transport_child", broker.url, "gw-9", status],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        assert messages(watcher, 1)[0].payload == b"online"
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        if child.stdout:
            child.stdout.close()
    assert messages(watcher, 1)[0].payload == b"offline"
    # and it is retained: a newcomer (the server after a restart) sees it at once
    late = make(broker.url, "server-2")
    late.wait_connected(10)
    late.subscribe(status)
    m = messages(late, 1)[0]
    assert (m.payload, m.retain) == (b"offline", True)


def test_clean_close_sends_no_will_unless_asked(
    broker: Broker, make: Callable[..., Transport]
) -> None:
    watcher = make(broker.url, "server-1")
    watcher.wait_connected(10)
    watcher.subscribe("st/#")
    quiet = make(broker.url, "gw-1", will=Will("st/gw-1", b"offline"))
    quiet.wait_connected(10)
    quiet.close()
    loud = make(broker.url, "gw-2", will=Will("st/gw-2", b"offline"))
    loud.wait_connected(10)
    loud.close(send_will=True)
    m = messages(watcher, 1)[0]
    assert (m.topic, m.payload) == ("st/gw-2", b"offline")
    assert watcher.get(0.5) is None  # nothing from gw-1


def test_broker_killed_and_restarted_nothing_accepted_is_lost(
    broker: Broker, make: Callable[..., Transport]
) -> None:
    t = make(broker.url)
    t.wait_connected(10)
    t.subscribe("loop/#")
    t.publish("loop/a", b"before").result(10)
    assert messages(t, 1)[0].payload == b"before"

    broker.kill()
    assert isinstance(next_event(t, Disconnected), Disconnected)
    assert not t.connected
    # accepted while the broker is down: queued, in three priorities
    tickets = [t.publish("loop/a", b"full%d" % i, priority=Priority.FULL) for i in range(5)] + [
        t.publish("loop/a", b"ctl%d" % i, priority=Priority.CONTROL) for i in range(3)
    ]
    time.sleep(0.3)
    assert not any(tk.done() for tk in tickets)
    assert t.stats().queued == 8

    broker.start()  # same port, empty: its persistence was not saved
    ev = next_event(t, Connected, timeout=15)
    assert ev.session_present is False
    for tk in tickets:
        tk.result(10)
    got = [m.payload for m in messages(t, 8)]
    # re-subscribed before anything was sent; control first, FIFO within a priority
    assert got == [b"ctl0", b"ctl1", b"ctl2"] + [b"full%d" % i for i in range(5)]
    s = t.stats()
    assert s.connects == 2 and s.disconnects == 1 and s.connect_failures >= 1


def test_link_cut_mid_stream_resends_what_was_not_acknowledged(
    broker: Broker, make: Callable[..., Transport]
) -> None:
    receiver = make(broker.url, "server-1")
    receiver.wait_connected(10)
    receiver.subscribe("stream/#")
    with MqttProxy(broker.port) as proxy:
        # a slow link, so that the cut comes while messages are queued and in flight
        t = make(f"mqtt://127.0.0.1:{proxy.port}", max_kbps=400, max_inflight=8)
        t.wait_connected(10)
        tickets = [t.publish("stream/x", b"%04d" % i + b"." * 1000) for i in range(60)]
        while sum(tk.done() for tk in tickets) < 15:
            time.sleep(0.01)
        proxy.cut()
        for tk in tickets:
            tk.result(20)
        assert t.stats().disconnects == 1 and t.stats().requeued >= 1
    seen: list[int] = []
    dups = 0
    while len(seen) < 60:
        seq = int(messages(receiver, 1)[0].payload[:4])
        if seq in seen:  # QoS 1: a message in flight at the cut may come twice
            dups += 1
        else:
            seen.append(seq)
    assert seen == list(range(60))  # every accepted message, in order
    assert dups <= t.stats().requeued


def test_persistent_session_keeps_messages_for_an_offline_client(
    broker: Broker, make: Callable[..., Transport]
) -> None:
    agent = make(broker.url, "gw-1")
    agent.wait_connected(10)
    agent.subscribe("acks/gw-1")
    agent.close()  # MQTT 5 session expiry: the broker keeps the session and queues for it
    server = make(broker.url, "server-1")
    server.wait_connected(10)
    for i in range(5):
        server.publish("acks/gw-1", b"ack%d" % i).result(10)
    again = make(broker.url, "gw-1")
    ev = again.wait_connected(10)
    assert ev.session_present is True
    assert [m.payload for m in messages(again, 5)] == [b"ack%d" % i for i in range(5)]


def test_username_and_password(tmp_path: Path, make: Callable[..., Transport]) -> None:
    pw = tmp_path / "passwd"
    pw.write_text("")
    subprocess.run(["mosquitto_passwd", "-b", str(pw), "gw-1", "s3cret"], check=True)
    with Broker(tmp_path / "b", extra=[f"password_file {pw}"], allow_anonymous=False) as b:
        good = make(b.url, "gw-1", username="gw-1", password="s3cret")
        good.wait_connected(10)
        good.subscribe("x")
        good.publish("x", b"ok").result(10)
        assert messages(good, 1)[0].payload == b"ok"

        bad = make(b.url, "gw-2", username="gw-1", password="wrong")
        with pytest.raises(ConnectionRefused) as info:
            bad.wait_connected(10)
        assert info.value.rc in (0x86, 0x87)
        assert info.value.hint
        ev = next_event(bad, Disconnected)
        assert ev.fatal and ev.rc == info.value.rc
        time.sleep(0.3)
        assert bad.stats().connect_failures == 1  # gave up: no retry loop against a refusal
        with pytest.raises(ConnectionRefused):
            bad.publish("x", b"nope")
        with pytest.raises(ConnectionRefused):
            bad.subscribe("x")

        anonymous = make(b.url, "gw-3")
        with pytest.raises(ConnectionRefused):
            anonymous.wait_connected(10)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_tls_with_a_test_ca_and_client_certificates(
    tmp_path: Path, pki: PKI, make: Callable[..., Transport]
) -> None:
    tls_port, mtls_port = free_port(), free_port()
    listeners = [
        f"listener {tls_port} 127.0.0.1",
        f"cafile {pki.ca}",
        f"certfile {pki.server_cert}",
        f"keyfile {pki.server_key}",
        f"listener {mtls_port} 127.0.0.1",
        f"cafile {pki.ca}",
        f"certfile {pki.server_cert}",
        f"keyfile {pki.server_key}",
        "require_certificate true",
    ]
    with Broker(tmp_path / "b", listener_extra=listeners):
        t = make(f"mqtts://127.0.0.1:{tls_port}", "gw-1", tls=TLSOptions(ca_file=str(pki.ca)))
        t.wait_connected(10)
        t.subscribe("x")
        t.publish("x", b"over tls").result(10)
        assert messages(t, 1)[0].payload == b"over tls"

        wrong_ca = make(
            f"mqtts://127.0.0.1:{tls_port}", "gw-2", tls=TLSOptions(ca_file=str(pki.other_ca))
        )
        with pytest.raises(ConnectionRefused, match="certificate failed verification"):
            wrong_ca.wait_connected(10)

        lab = make(
            f"mqtts://127.0.0.1:{tls_port}",
            "gw-3",
            tls=TLSOptions(ca_file=str(pki.other_ca), insecure=True),
        )
        lab.wait_connected(10)  # only because insecure=True was asked for

        mutual = make(
            f"mqtts://127.0.0.1:{mtls_port}",
            "gw-4",
            tls=TLSOptions(
                ca_file=str(pki.ca), cert_file=str(pki.client_cert), key_file=str(pki.client_key)
            ),
        )
        mutual.wait_connected(10)
        mutual.publish("x", b"mutual").result(10)
        assert messages(t, 1)[0].payload == b"mutual"

        no_cert = make(
            f"mqtts://127.0.0.1:{mtls_port}", "gw-5", tls=TLSOptions(ca_file=str(pki.ca))
        )
        with pytest.raises(TransportError):
            no_cert.wait_connected(1.5)
        assert not no_cert.connected and no_cert.stats().connects == 0


def test_falls_back_to_mqtt_311_when_the_broker_refuses_5(
    broker: Broker, make: Callable[..., Transport]
) -> None:
    with MqttProxy(broker.port, refuse_v5=True) as old:
        url = f"mqtt://127.0.0.1:{old.port}"
        t = make(url, "gw-1", will=Will("st/gw-1", b"offline"))
        ev = t.wait_connected(10)
        assert ev.protocol == "3.1.1" and t.protocol == "3.1.1"
        assert old.refused_v5 == 1 and old.forwarded == [4]
        t.subscribe("x/#")
        for i in range(3):
            t.publish("x/y", b"v311-%d" % i).result(10)
        assert [m.payload for m in messages(t, 3)] == [b"v311-%d" % i for i in range(3)]
        assert t.stats().alias_hits == 0  # no topic aliases before MQTT 5
        # reconnects stay on 3.1.1 and keep the session (clean_session=False)
        old.cut()
        ev2 = next_event(t, Connected)
        assert ev2.protocol == "3.1.1" and ev2.session_present is True
        assert old.refused_v5 == 1

        forced = make(url, "gw-2", protocol="5")
        with pytest.raises(ConnectionRefused) as info:
            forced.wait_connected(10)
        assert info.value.rc == 0x84
    direct = make(broker.url, "gw-3", protocol="3.1.1")
    assert direct.wait_connected(10).protocol == "3.1.1"


def test_falls_back_to_mqtt_311_when_the_broker_never_answers_5(
    tmp_path: Path, make: Callable[..., Transport]
) -> None:
    """amqtt (the demo's embedded broker) speaks 3.1.1 only and never answers an MQTT 5
    CONNECT at all: after one CONNACK timeout the transport tries 3.1.1 and stays there."""
    port = free_port()
    log = (tmp_path / "amqtt.log").open("w")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.demo._amqtt", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while "amqtt broker ready" not in (tmp_path / "amqtt.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "amqtt did not start"
            time.sleep(0.05)
        t = make(f"mqtt://127.0.0.1:{port}", "gw-1", connect_timeout=1.5)
        ev = t.wait_connected(20)
        assert ev.protocol == "3.1.1" and t.protocol == "3.1.1"
        assert isinstance(t.last_error, TransportTimeout)  # the silent MQTT 5 attempt
        t.subscribe("x/#")
        t.publish("x/y", b"over 3.1.1").result(10)
        assert messages(t, 1)[0].payload == b"over 3.1.1"
        t.close(timeout=1.0)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise
        finally:
            log.close()


def test_topic_aliases_save_bytes_and_respect_the_broker_maximum(
    tmp_path: Path, make: Callable[..., Transport]
) -> None:
    topic = "edge-resume/v1/gateway-0042/llama-job-7/state"
    with Broker(tmp_path / "b", listener_extra=["max_topic_alias 2"]) as b:
        sink = make(b.url, "server-1")
        sink.wait_connected(10)
        sink.subscribe("edge-resume/#")
        with_alias = make(b.url, "gw-1")
        assert with_alias.wait_connected(10).topic_alias_max == 2
        without = make(b.url, "gw-2", topic_aliases=False)
        without.wait_connected(10)
        for t in (with_alias, without):
            for i in range(50):
                t.publish(topic, b"%02d" % i + b"." * 30).result(10)
        got = messages(sink, 100)
        assert all(m.topic == topic for m in got)
        a, n = with_alias.stats(), without.stats()
        assert a.alias_hits == 49 and n.alias_hits == 0
        # per message: fixed header 2, topic length 2, packet id 2, properties length 1,
        # plus the topic (without aliases) or a 3-byte alias property (after the first)
        assert n.bytes_published - n.payload_bytes == 50 * (7 + len(topic))
        assert a.bytes_published - a.payload_bytes == 49 * 10 + (10 + len(topic))

        # more topics than the broker allows aliases for: the least recently used is re-mapped
        topics = [f"edge-resume/v1/gw-1/job-{k}/state" for k in range(5)]
        for i in range(20):
            with_alias.publish(topics[i % 5], b"%d" % i).result(10)
        got = messages(sink, 20)
        assert [(m.topic, m.payload) for m in got] == [
            (topics[i % 5], b"%d" % i) for i in range(20)
        ]
    with Broker(tmp_path / "b0", listener_extra=["max_topic_alias 0"]) as b0:
        t = make(b0.url, "gw-3")
        assert t.wait_connected(10).topic_alias_max == 0
        t.publish(topic, b"x").result(10)
        t.publish(topic, b"x").result(10)
        assert t.stats().alias_hits == 0


def test_rate_cap_holds_and_control_overtakes_bulk(
    broker: Broker, make: Callable[..., Transport]
) -> None:
    t = make(broker.url, "gw-1", max_kbps=64)  # 8,000 bytes/s
    t.wait_connected(10)
    t.subscribe("cap/#")
    n = 28
    tickets = [
        t.publish("cap/bulk", b"%03d" % i + b"." * 997, priority=Priority.FULL) for i in range(n)
    ]
    time.sleep(0.5)
    sent_before = sum(tk.done() for tk in tickets)
    ctl = t.publish("cap/ctl", b"control", priority=Priority.CONTROL)
    arrivals: list[tuple[float, Message]] = []
    deadline = time.monotonic() + 30
    while len(arrivals) < n + 1 and time.monotonic() < deadline:
        ev = t.get(1.0)
        if isinstance(ev, Message):
            arrivals.append((time.monotonic(), ev))
    assert len(arrivals) == n + 1
    order = [m.payload[:3] for _, m in arrivals]
    # the control message overtook the bulk queued before it: only what was already on
    # the wire (acknowledged, or released and in flight) arrived first
    assert sent_before < n - 10
    assert order.index(b"con") <= sent_before + 2
    ctl.result(1)
    bulk = [(ts, m) for ts, m in arrivals if m.topic == "cap/bulk"]
    assert [m.payload[:3] for _, m in bulk] == [b"%03d" % i for i in range(n)]
    sizes = [tk.size for tk in tickets]
    # from the 4th arrival on (the first ones may ride on the bucket's small burst): every
    # message but the last, and the control message, were paid for in between
    elapsed = bulk[-1][0] - bulk[3][0]
    rate = (sum(sizes[3:-1]) + ctl.size) / elapsed
    assert 8000 * 0.90 < rate < 8000 * 1.10, rate
    est = t.link_rate()
    assert est is not None and 8000 * 0.5 < est < 8000 * 1.5


def test_cancel_takes_back_only_what_was_not_sent(
    broker: Broker, make: Callable[..., Transport]
) -> None:
    t = make(broker.url, "gw-1", max_kbps=64)
    t.wait_connected(10)
    t.subscribe("c/#")
    first = t.publish("c/x", b"a" * 4000, priority=Priority.FULL)
    first.result(10)
    queued = [t.publish("c/x", b"%d" % i + b"b" * 4000, priority=Priority.FULL) for i in range(4)]
    assert queued[3].cancel() is True
    assert queued[3].state == "cancelled" and queued[3].done()
    with pytest.raises(TransportError, match="cancelled"):
        queued[3].wait(0)
    assert first.cancel() is False  # delivered already
    for tk in queued[:3]:
        tk.result(15)
    got = messages(t, 4, timeout=15)
    assert [m.payload[:1] for m in got[1:]] == [b"0", b"1", b"2"]
    assert t.get(0.5) is None
    assert t.stats().cancelled == 1


def test_a_message_over_the_broker_maximum_fails_alone(
    broker: Broker, make: Callable[..., Transport]
) -> None:
    t = make(broker.url)
    t.wait_connected(10)
    big = t.publish("big/x", b"x" * (1024 * 1024 + 1))
    with pytest.raises(TransportError, match="maximum packet size") as info:
        big.wait(10)
    assert info.value is big.error
    t.publish("big/x", b"small").result(10)  # the link is still up
    assert t.stats().disconnects == 0


def test_refusals_by_reason_code_and_timeouts(
    tmp_path: Path, make: Callable[..., Transport]
) -> None:
    acl = tmp_path / "acl"
    acl.write_text("pattern readwrite mine/%c/#\n")
    with Broker(tmp_path / "b", extra=[f"acl_file {acl}"]) as b:
        with MqttProxy(b.port, refuse_subscribe=True) as proxy:
            r = make(f"mqtt://127.0.0.1:{proxy.port}", "gw-9")
            r.wait_connected(10)
            with pytest.raises(TransportError) as info:
                r.subscribe("mine/gw-9/#")
            assert info.value.rc == 0x87  # not authorized, from the SUBACK
            proxy.cut()  # a refused filter is not subscribed again after a reconnect
            assert next_event(r, Connected)
        t = make(b.url, "gw-1")
        t.wait_connected(10)
        assert t.subscribe("mine/gw-1/#") == [1]
        ticket = t.publish("theirs/x", b"no")
        with pytest.raises(TransportError) as pinfo:
            ticket.wait(10)
        assert pinfo.value.rc == 0x87  # the PUBACK's reason code
    never = Transport(config("mqtt://127.0.0.1:1"))
    never.start()
    with pytest.raises(TransportTimeout):
        never.subscribe("x", timeout=0.3)
    with pytest.raises(TransportTimeout, match="not connected"):
        never.wait_connected(0.2)
    never.close(timeout=0.2)


def test_filters_registered_before_start_are_subscribed_before_connected(
    broker: Broker, make: Callable[..., Transport]
) -> None:
    server = make(broker.url, "server-1")
    server.wait_connected(10)
    server.publish("ctl/gw-1/job-1", b"owner=server epoch=2", retain=True).result(10)
    agent = make(broker.url, "gw-1", start=False)
    with pytest.raises(TransportError, match="start"):
        agent.subscribe("ctl/gw-1/#")
    fut = agent.subscribe_nowait([("ctl/gw-1/#", 1), ("ack/gw-1/#", 1)])
    agent.start()
    first = agent.get(10)
    assert isinstance(first, Connected)
    assert fut.result(1) == [1, 1]  # the SUBACK came before Connected was reported
    m = messages(agent, 1)[0]
    assert (m.topic, m.payload, m.retain) == ("ctl/gw-1/job-1", b"owner=server epoch=2", True)
