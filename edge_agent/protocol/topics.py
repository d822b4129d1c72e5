"""The topic namespace: where each message travels, and what arrives on a topic.

    ns = TopicNamespace()                       # prefix "edge-resume/v1", configurable
    ns.state("gw-1", "job-7")                   # "edge-resume/v1/gw-1/job-7/state"
    ns.parse("edge-resume/v1/gw-1/job-7/ack")   # Topic(device="gw-1", job="job-7", kind=ACK)
    ns.server_subscriptions()                   # what the server subscribes to
    ns.will("gw-1", session, ts)                # the agent's MQTT will: retained STATUS(offline)
    incoming = decode_incoming(ns, topic, payload)   # Incoming(topic, message), checked

Topics and wills are frozen, validated dataclasses. :func:`decode_incoming` is the one place
where a received MQTT message becomes a protocol message: it parses the topic, decodes the
payload and refuses a message whose device, job or type does not fit its topic
(docs/protocol.md section 2).

This module owns topic names, subscriptions and the will. It never touches a socket.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final

from edge_agent.errors import InvalidTopic, LocalProtocolError, TopicMismatch
from edge_agent.protocol.messages import (
    Ack,
    Birth,
    Ctl,
    Done,
    Heartbeat,
    Message,
    Nack,
    Need,
    Query,
    Release,
    Snap,
    Status,
    Sync,
    decode,
    encode,
    is_valid_id,
)

__all__ = [
    "ALLOWED",
    "DEFAULT_PREFIX",
    "Incoming",
    "Outgoing",
    "Priority",
    "Subscription",
    "Topic",
    "TopicKind",
    "TopicNamespace",
    "Will",
    "decode_incoming",
]

DEFAULT_PREFIX: Final = "edge-resume/v1"


class TopicKind(enum.Enum):
    """The last level of a topic; says what travels there (docs/protocol.md section 2)."""

    STATUS = "status"  # {prefix}/{device}/status     agent → server, retained
    HB = "hb"  # {prefix}/{device}/hb                 agent → server
    STATE = "state"  # {prefix}/{device}/{job}/state  agent → server
    ACK = "ack"  # {prefix}/{device}/{job}/ack        server → agent
    CTL = "ctl"  # {prefix}/{device}/{job}/ctl        server → agent, retained

    @property
    def per_job(self) -> bool:
        return self in (TopicKind.STATE, TopicKind.ACK, TopicKind.CTL)

    @property
    def qos(self) -> int:
        """QoS 0 where a lost message is recovered by the protocol (heartbeats; the server's
        replies, which the agent's retries ask for again); QoS 1 elsewhere."""
        return 0 if self in (TopicKind.HB, TopicKind.ACK) else 1

    @property
    def retained(self) -> bool:
        return self in (TopicKind.STATUS, TopicKind.CTL)


#: Which message types may arrive on which kind of topic.
ALLOWED: Final[dict[TopicKind, tuple[type[Message], ...]]] = {
    TopicKind.STATUS: (Status,),
    TopicKind.HB: (Heartbeat,),
    TopicKind.STATE: (Birth, Snap, Query, Done, Release),
    TopicKind.ACK: (Sync, Ack, Nack, Need),
    TopicKind.CTL: (Ctl,),
}

_BY_LEVEL: Final = {k.value: k for k in TopicKind}
_KIND_OF: Final[dict[type[Message], TopicKind]] = {
    cls: kind for kind, classes in ALLOWED.items() for cls in classes
}


class Priority(enum.IntEnum):
    """Send order for a bandwidth-capped queue: lower first (docs/protocol.md section 5)."""

    CONTROL = 0  # status, hb, birth, query, done, release, and everything the server sends
    DELTA = 1  # chunks of a snapshot encoded against an acknowledged base
    FULL = 2  # chunks of a full snapshot


@dataclass(frozen=True, slots=True)
class Topic:
    """A parsed topic: the device, the job (None for device-wide kinds) and the kind."""

    device: str
    job: str | None
    kind: TopicKind

    def __post_init__(self) -> None:
        if not is_valid_id(self.device):
            raise LocalProtocolError(f"device id {self.device!r} is not valid")
        if self.kind.per_job != (self.job is not None):
            raise LocalProtocolError(
                f"a {self.kind.value} topic {'needs' if self.kind.per_job else 'has no'} job"
            )
        if self.job is not None and not is_valid_id(self.job):
            raise LocalProtocolError(f"job id {self.job!r} is not valid")


@dataclass(frozen=True, slots=True)
class Subscription:
    """A topic filter and the QoS to subscribe with."""

    filter: str
    qos: int


@dataclass(frozen=True, slots=True)
class Will:
    """The agent's MQTT will: the broker publishes it (retained) when the link drops."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True, slots=True)
class Incoming:
    """A received message, decoded and checked against the topic it arrived on."""

    topic: Topic
    message: Message


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to publish: the encoded bytes and how to publish them.

    ``job``, ``seq`` and ``chunk`` tag snapshot chunks, so that a send queue can drop the
    queued chunks of a transfer the session abandoned (see ``TransferAbandoned``) or skip a
    chunk already queued. ``message`` is the message the payload encodes (for logs and
    metrics; the payload alone does not name its device and job)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    priority: Priority
    type: str
    job: str | None = None
    seq: int | None = None
    chunk: int | None = None
    message: Message | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class TopicNamespace:
    """Builds and parses the topics under one prefix (default ``edge-resume/v1``).

    The prefix is one or more non-empty levels without wildcards (``+``, ``#``), NUL, or a
    leading ``$`` (reserved by brokers), and without a leading or trailing ``/``."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        p = self.prefix
        if type(p) is not str or not p:
            raise LocalProtocolError("the topic prefix is a non-empty str")
        if p.startswith("$") or any(c in p for c in "+#\0"):
            raise LocalProtocolError(f"the topic prefix {p!r} holds a wildcard, NUL or a '$'")
        if any(level == "" for level in p.split("/")):
            raise LocalProtocolError(f"the topic prefix {p!r} has an empty level")
        if len(p.encode("utf-8")) > 1024:
            raise LocalProtocolError("the topic prefix is over 1024 bytes")

    # -- building ---------------------------------------------------------------------------

    def topic(self, t: Topic) -> str:
        if t.job is None:
            return f"{self.prefix}/{t.device}/{t.kind.value}"
        return f"{self.prefix}/{t.device}/{t.job}/{t.kind.value}"

    def status(self, device: str) -> str:
        return self.topic(Topic(device, None, TopicKind.STATUS))

    def hb(self, device: str) -> str:
        return self.topic(Topic(device, None, TopicKind.HB))

    def state(self, device: str, job: str) -> str:
        return self.topic(Topic(device, job, TopicKind.STATE))

    def ack(self, device: str, job: str) -> str:
        return self.topic(Topic(device, job, TopicKind.ACK))

    def ctl(self, device: str, job: str) -> str:
        return self.topic(Topic(device, job, TopicKind.CTL))

    # -- parsing ----------------------------------------------------------------------------

    def parse(self, topic: str) -> Topic:
        """Parse a topic of this namespace. Raises :class:`InvalidTopic` for any other."""
        head = self.prefix + "/"
        if type(topic) is not str or not topic.startswith(head):
            raise InvalidTopic(f"topic {str(topic)[:200]!r} is not under {head!r}")
        levels = topic[len(head) :].split("/")
        kind = _BY_LEVEL.get(levels[-1])
        if kind is None or len(levels) != (3 if kind.per_job else 2):
            raise InvalidTopic(f"topic {topic[:200]!r} is not a known edge-resume topic")
        device, job = levels[0], levels[1] if kind.per_job else None
        if not is_valid_id(device) or (job is not None and not is_valid_id(job)):
            raise InvalidTopic(f"topic {topic[:200]!r} names an invalid device or job id")
        return Topic(device, job, kind)

    # -- subscriptions and will ------------------------------------------------------------

    def server_subscriptions(self, share_group: str | None = None) -> tuple[Subscription, ...]:
        """What the server subscribes to: every device's status, heartbeats and job state.

        With ``share_group``, MQTT 5 shared subscriptions (``$share/{group}/...``) that spread
        the devices over several server processes. A job's messages must all reach the same
        process (its transfer is reassembled in memory): use a broker strategy that picks the
        subscriber by topic (EMQX ``hash_topic``, HiveMQ's equivalent)."""
        filters = [
            (f"{self.prefix}/+/{TopicKind.STATUS.value}", 1),
            (f"{self.prefix}/+/{TopicKind.HB.value}", 0),
            (f"{self.prefix}/+/+/{TopicKind.STATE.value}", 1),
        ]
        if share_group is not None:
            if not is_valid_id(share_group):
                raise LocalProtocolError(f"share group {share_group!r} is not a valid id")
            filters = [(f"$share/{share_group}/{f}", q) for f, q in filters]
        return tuple(Subscription(f, q) for f, q in filters)

    def device_subscriptions(self, device: str) -> tuple[Subscription, ...]:
        """What an agent subscribes to: the ``ack`` and ``ctl`` topics of all its jobs."""
        if not is_valid_id(device):
            raise LocalProtocolError(f"device id {device!r} is not valid")
        return (
            Subscription(f"{self.prefix}/{device}/+/{TopicKind.ACK.value}", 1),
            Subscription(f"{self.prefix}/{device}/+/{TopicKind.CTL.value}", 1),
        )

    def outgoing(self, msg: Message, priority: Priority = Priority.CONTROL) -> Outgoing:
        """Encode ``msg`` for the topic its type travels on, with that topic's QoS and
        retain flag."""
        kind = _KIND_OF[type(msg)]
        job: str | None = getattr(msg, "job", None)
        topic = self.topic(Topic(msg.device, job, kind))
        seq = chunk = None
        if isinstance(msg, Snap):
            seq, chunk = msg.seq, msg.index
        return Outgoing(
            topic, encode(msg), kind.qos, kind.retained, priority, msg.TYPE, job, seq, chunk,
            msg,
        )  # fmt: skip

    def will(self, device: str, session: str, ts: int) -> Will:
        """The agent's will: a retained STATUS(offline) on its status topic, QoS 1."""
        payload = encode(Status(device, False, session, ts))
        return Will(self.status(device), payload, TopicKind.STATUS.qos, True)


def decode_incoming(
    namespace: TopicNamespace, topic: str, payload: bytes | bytearray | memoryview
) -> Incoming:
    """Turn a received MQTT message into an :class:`Incoming`, or raise a
    :class:`~edge_agent.errors.RemoteProtocolError`: :class:`InvalidTopic`, the decoder's
    :class:`MalformedMessage` / :class:`UnsupportedMessage`, or :class:`TopicMismatch` when
    the message's type does not travel there. The device and the job are the topic's: the
    payload does not repeat them, and its check covers them, so a message published on another
    device's or job's topic than it was made for fails its check."""
    t = namespace.parse(topic)
    msg = decode(payload, t.device, t.job)
    if not isinstance(msg, ALLOWED[t.kind]):
        raise TopicMismatch(f"a {msg.TYPE} message may not travel on a {t.kind.value} topic")
    if msg.device != t.device:
        raise TopicMismatch(
            f"a message from device {msg.device!r} arrived on device {t.device!r}'s topic",
            hint="the broker's ACL should stop this; check deploy/mosquitto",
        )
    job = getattr(msg, "job", None)
    if job != t.job:
        raise TopicMismatch(f"a message for job {job!r} arrived on job {t.job!r}'s topic")
    return Incoming(t, msg)
