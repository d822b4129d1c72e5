"""The link benchmark's own arithmetic: the packet parser of its counting proxy and the lag
reconstruction (the benchmark itself runs for minutes: `python -m bench.link_bench`)."""

from __future__ import annotations

import pytest

from bench.link_bench import WireAccount, lag_samples
from edge_agent.protocol import Ack, Snap, TopicNamespace, encode
from edge_agent.transport import publish_packet_size

NS = TopicNamespace()


def publish(topic: str, payload: bytes, *, alias: bool = False, setup: bool = False) -> bytes:
    """An MQTT 5 QoS 1 PUBLISH packet: with ``alias``, an alias-only one (empty topic + the
    alias property); with ``setup``, the topic and the alias property (a new alias)."""
    t = b"" if alias else topic.encode()
    props = b"\x23\x00\x01" if alias or setup else b""
    body = len(t).to_bytes(2, "big") + t + b"\x00\x07" + bytes([len(props)]) + props + payload
    rem, n = len(body), bytearray()
    while True:
        b = rem & 0x7F
        rem >>= 7
        n.append(b | (0x80 if rem else 0))
        if not rem:
            break
    return bytes([0x32]) + bytes(n) + body


def test_the_account_splits_a_publish_into_framing_header_and_data() -> None:
    snap = Snap("gw-1", "j", 1, 5, 4, 100, 0, 1, 300, bytes(300))
    payload = encode(snap)
    acct = WireAccount()
    first = publish(NS.state("gw-1", "j"), payload, setup=True)  # sets alias 1 up
    acct.packet("up", first)
    acct.bytes.clear()
    acct.count.clear()
    pkt = publish(NS.state("gw-1", "j"), payload, alias=True)  # the topic is the alias's
    acct.packet("up", pkt)
    assert acct.get("up snap data") == 300
    assert acct.get("up snap header") == len(payload) - 300
    assert acct.get("up snap framing") == len(pkt) - len(payload)
    # the framing is what the transport's own size formula says for an alias-only PUBLISH
    assert len(pkt) == publish_packet_size(0, len(payload), 1, v5=True, properties_len=3)
    ack = encode(Ack("gw-1", "j", 1, 5, bytes(16)))
    acct.packet("down", publish(NS.ack("gw-1", "j"), ack))
    assert acct.get("down ack") == len(ack) and acct.n("down ack framing") == 1
    acct.packet("down", b"\x40\x02\x00\x07")  # PUBACK
    acct.packet("up", publish("x/y", b"not a protocol message"))
    # a payload under a topic it was not made for is not a protocol message
    acct.packet("up", publish(NS.state("gw-2", "j"), payload))
    assert acct.n("up other framing") == 2 and acct.n("up snap data") == 1
    assert acct.get("down PUBACK") == 4
    # per snapshot: its chunk's header and framing, the broker's PUBACK, the server's ACK
    # for it with its framing (QoS 1 here: and our PUBACK)
    ack_pkt = publish(NS.ack("gw-1", "j"), ack)
    assert acct.per_seq[5] == (len(first) - 300 + 4) + (len(pkt) - 300 + 4) + len(ack_pkt) + 4


def test_lag_is_rebuilt_from_the_acks() -> None:
    ts = "2026-01-01T00:00:{:06.3f}Z".format
    events = [
        {"event": "job-open", "ts": ts(0.0), "step": 0},
        {"event": "acked", "ts": ts(2.0), "step": 15, "lag": 5},  # job at 20, server at 15
        {"event": "acked", "ts": ts(4.0), "step": 38, "lag": 2},  # job at 40, server at 38
        {"event": "job-done", "ts": ts(5.0), "step": 50},
    ]
    lags = lag_samples(events, every=1.0)
    # 0-2 s: server at 0, job 0 -> 20; 2-4 s: server at 15, job 20 -> 40; 4-5 s: server at
    # 38, job 40 -> 50
    assert lags == pytest.approx([0, 10, 5, 15, 2])
