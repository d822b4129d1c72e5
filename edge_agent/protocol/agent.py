"""The agent end of the protocol: one :class:`AgentJobSession` per job, sans-IO.

A session is fed what happens (``connected``, ``disconnected``, ``receive``, ``tick``) and
asked to do things (``offer``, ``finish``, ``hand_over``); every call returns a list of
*items*, in the order the caller must carry them out: :class:`~.topics.Outgoing` messages to
publish and events (:class:`Offered`, :class:`Acked`, :class:`TakenOver`, ...) to act on.
The caller owns the clock (``now``, seconds), the MQTT client, the journal and the job; the
session owns the protocol: seq numbers, the acknowledged base, stop-and-wait, timeouts,
resends, SYNC reconciliation, epochs and fencing (docs/protocol.md section 4).

Rules (the state machine keeps them; the tests check them):

1. A delta is encoded only against the acknowledged base: the state the server acked with
   the same seq *and* hash (invariant 1). An ack for anything else is ignored.
2. At most one snapshot is in flight. :meth:`AgentJobSession.offer` refuses while one is
   (check :attr:`~AgentJobSession.can_offer`); the caller coalesces, it never queues.
3. Items are carried out in order. An :class:`Offered` comes before the chunks it announces:
   journal it (at least ``next_seq``) before publishing them, so a seq is never reused. An
   :class:`Acked` comes before anything encoded against it: journal it as the acknowledged
   state before publishing what follows. A caller that cannot journal stops, and rebuilds
   the session from its journal.
4. Once the server owns the job at an epoch >= ours (a CTL, a SYNC or a ``fenced`` nack says
   so), the session emits :class:`TakenOver` and never returns another item for that job.
5. Besides the payload in flight, the session holds one state: the acknowledged base. On an
   ack it rebuilds the new base with ``apply_delta(base, payload)`` rather than keeping the
   offered state alive. The final state of ``finish``/``hand_over`` is held by reference
   until it is settled (the job is stopped then, so it is the job's own state).

This module owns the agent's protocol logic. It never touches a socket, a file, a thread or
a clock, and it never decides *when* to snapshot (that is the runner's policy).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from edge_agent.codec import apply_delta, encode_delta, read_header
from edge_agent.errors import CodecError, Fenced, LocalProtocolError, TopicMismatch
from edge_agent.protocol.chunking import DEFAULT_MAX_MESSAGE, ChunkPlan, snap_overhead
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
    is_valid_id,
)
from edge_agent.protocol.topics import (
    Incoming,
    Outgoing,
    Priority,
    Subscription,
    TopicKind,
    TopicNamespace,
    Will,
    decode_incoming,
)
from edge_agent.state import State, state_hash

__all__ = [
    "Acked",
    "AckedState",
    "AgentConfig",
    "AgentDevice",
    "AgentEvent",
    "AgentItem",
    "AgentJobSession",
    "Completed",
    "HandoverRequested",
    "Ignored",
    "JobIdentity",
    "NeedsFull",
    "Offered",
    "PendingSnapshot",
    "Phase",
    "Rejected",
    "Stopped",
    "Synced",
    "TakenOver",
    "TransferAbandoned",
]


# ---------------------------------------------------------------------------------------------
# Inputs the caller builds (from the job and from its journal).


@dataclass(frozen=True, slots=True)
class JobIdentity:
    """What a BIRTH says about the job besides its progress."""

    spec: Mapping[str, Any]  # the job file, as plain values
    model_hash: str  # e.g. "sha256:..." (printable ASCII, no spaces)
    codec_version: int
    total_steps: int | None = None


@dataclass(frozen=True, slots=True)
class AckedState:
    """The acknowledged base: the state the server acked as ``seq`` with ``hash``."""

    seq: int
    hash: bytes
    state: State


@dataclass(frozen=True, slots=True)
class PendingSnapshot:
    """A snapshot offered and not yet settled, as journaled (to resume it after a restart).
    ``base_seq`` is None for a full snapshot, else the acknowledged seq it was encoded on."""

    seq: int
    base_seq: int | None
    state_hash: bytes
    step: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Timeouts (seconds), sizes and codec options of an agent session."""

    #: Largest MQTT payload sent, header included.
    max_message: int = DEFAULT_MAX_MESSAGE
    #: Shortest wait for a reply (SYNC, ack, need); also the first back-off step.
    timeout_floor: float = 10.0
    #: Longest wait between two retries (back-off doubles from the floor up to this).
    timeout_max: float = 300.0
    #: The ack timeout is floor + factor * bytes / link rate.
    ack_timeout_factor: float = 2.0
    #: Link rate (bytes/s) assumed until the caller passes a measured one (64 kbit/s).
    default_link_rate: float = 8000.0
    #: Keyword options for ``encode_delta`` (e.g. ``level``).
    codec_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 < self.timeout_floor <= self.timeout_max:
            raise LocalProtocolError("need 0 < timeout_floor <= timeout_max")
        if not (self.ack_timeout_factor > 0 and self.default_link_rate > 0):
            raise LocalProtocolError("ack_timeout_factor and default_link_rate must be > 0")


# ---------------------------------------------------------------------------------------------
# Events the session returns, interleaved with Outgoing messages.


@dataclass(frozen=True, slots=True)
class Offered:
    """A snapshot was encoded as ``seq``; its chunks follow. Journal before publishing them:
    at least ``next_seq = seq + 1``; ideally the payload too (a :class:`PendingSnapshot`), so
    that a restart resumes the transfer instead of starting over."""

    seq: int
    base_seq: int | None
    state_hash: bytes
    step: int
    size: int
    payload: bytes
    final: bool

    def pending(self) -> PendingSnapshot:
        return PendingSnapshot(self.seq, self.base_seq, self.state_hash, self.step, self.payload)


@dataclass(frozen=True, slots=True)
class Acked:
    """The server holds ``seq`` (``state_hash``): it is the new acknowledged base. Journal
    ``state`` as the acknowledged state (and drop the pending snapshot) before publishing
    anything that follows."""

    seq: int
    state_hash: bytes
    step: int
    state: State

    def acked_state(self) -> AckedState:
        return AckedState(self.seq, self.state_hash, self.state)


@dataclass(frozen=True, slots=True)
class Synced:
    """The server answered the birth: its epoch and current state; ``adopted`` when that is
    the snapshot this agent had in flight."""

    epoch: int
    server_seq: int | None
    server_hash: bytes | None
    adopted: bool


@dataclass(frozen=True, slots=True)
class NeedsFull:
    """The server does not hold our base: the next snapshot is full. Offer one soon."""

    reason: str


@dataclass(frozen=True, slots=True)
class TransferAbandoned:
    """Snapshot ``seq`` will not be completed: drop its queued chunks and its journal entry."""

    seq: int
    reason: str


@dataclass(frozen=True, slots=True)
class HandoverRequested:
    """The server asks for a live hand-over: finish the current step, stop computing, then
    call :meth:`AgentJobSession.hand_over` with the job's state."""

    epoch: int


@dataclass(frozen=True, slots=True)
class TakenOver:
    """The server owns the job at ``epoch``: stop it, journal it as fenced; this session
    sends nothing more. ``handed_over`` when it followed our own RELEASE. ``via``: the
    message that said so (the retained ``ctl``, a ``sync`` answering our BIRTH, or a
    ``nack`` fenced answering something we sent)."""

    epoch: int
    handed_over: bool
    via: Literal["ctl", "sync", "nack"] = "ctl"


@dataclass(frozen=True, slots=True)
class Completed:
    """The server confirmed the job's completion (after ``finish``): journal it; done."""

    seq: int
    step: int


@dataclass(frozen=True, slots=True)
class Stopped:
    """The server asked the agent to stop the job (CTL ``stop``): stop it; this session sends
    nothing more."""

    epoch: int


@dataclass(frozen=True, slots=True)
class Rejected:
    """The server refused our message ``seq`` (0: none in particular) for ``reason``
    (``too-large`` or ``invalid``): log it; nothing is retried for it."""

    seq: int
    reason: str


@dataclass(frozen=True, slots=True)
class Ignored:
    """A message from the server that this session will not act on (another job's, a stale
    epoch...): log it."""

    message: Message
    reason: str


AgentEvent: TypeAlias = (
    Offered
    | Acked
    | Synced
    | NeedsFull
    | TransferAbandoned
    | HandoverRequested
    | TakenOver
    | Completed
    | Stopped
    | Rejected
    | Ignored
)
AgentItem: TypeAlias = Outgoing | AgentEvent


class Phase(enum.Enum):
    """Where the session is (docs/protocol.md 4.1)."""

    DISCONNECTED = "disconnected"  # no link: nothing is sent, timers are off
    SYNCING = "syncing"  # BIRTH sent, waiting for the SYNC; no snapshot may start
    READY = "ready"  # synced: snapshots, queries, DONE/RELEASE flow
    CLOSED = "closed"  # taken over, stopped or completed: nothing more, ever


# ---------------------------------------------------------------------------------------------
# Device-wide messages.


@dataclass(frozen=True, slots=True)
class AgentDevice:
    """Device-wide messages of one agent process: subscriptions, will, STATUS, HB, and routing
    of what arrives. ``session`` identifies this process's run (e.g. a random hex string)."""

    device: str
    session: str
    namespace: TopicNamespace = field(default_factory=TopicNamespace)

    def __post_init__(self) -> None:
        Status(self.device, True, self.session, 0)  # validates both ids

    def subscriptions(self) -> tuple[Subscription, ...]:
        return self.namespace.device_subscriptions(self.device)

    def will(self, now: float) -> Will:
        return self.namespace.will(self.device, self.session, _ms(now))

    def online(self, now: float) -> Outgoing:
        return self.namespace.outgoing(Status(self.device, True, self.session, _ms(now)))

    def heartbeat(self, now: float, jobs: Mapping[str, tuple[int, int | None]]) -> Outgoing:
        """``jobs``: job id → (step, acknowledged seq or None)."""
        return self.namespace.outgoing(Heartbeat(self.device, self.session, _ms(now), dict(jobs)))

    def route(self, topic: str, payload: bytes | bytearray | memoryview) -> Incoming:
        """Decode a received MQTT message for this device (see ``decode_incoming``); raises a
        RemoteProtocolError for anything that is not a valid ``ack``/``ctl`` message of ours."""
        incoming = decode_incoming(self.namespace, topic, payload)
        if incoming.topic.device != self.device or incoming.topic.kind not in (
            TopicKind.ACK, TopicKind.CTL,
        ):  # fmt: skip
            raise TopicMismatch(f"an agent for {self.device!r} does not take topic {topic!r}")
        return incoming


def _ms(now: float) -> int:
    return max(0, int(now * 1000))


# ---------------------------------------------------------------------------------------------
# The session.


@dataclass(slots=True)
class _InFlight:
    seq: int
    base_seq: int | None
    state_hash: bytes
    step: int
    payload: bytes
    plan: ChunkPlan
    final: bool

    @property
    def priority(self) -> Priority:
        return Priority.FULL if self.base_seq is None else Priority.DELTA


@dataclass(slots=True)
class _Final:
    kind: Literal["done", "handover"]
    state: State
    step: int
    include_derivable: bool
    hash: bytes
    sent: bool = False  # DONE/RELEASE sent on this connection, waiting for what settles it
    sent_ever: bool = False  # DONE/RELEASE sent at least once


class AgentJobSession:
    """The agent end of one job (docs/protocol.md section 4).

    Build it from the journal: the job's ``epoch``, ``next_seq``, acknowledged state and,
    if one was journaled, the pending snapshot. A fresh job starts with the defaults."""

    def __init__(
        self,
        agent: AgentDevice,
        job: str,
        identity: JobIdentity,
        *,
        epoch: int = 1,
        next_seq: int = 1,
        acked: AckedState | None = None,
        pending: PendingSnapshot | None = None,
        derivable: Iterable[str] = (),
        config: AgentConfig | None = None,
        step: int = 0,
    ) -> None:
        if not is_valid_id(job):
            raise LocalProtocolError(f"job id {job!r} is not valid")
        if epoch < 1 or next_seq < 1:
            raise LocalProtocolError("epoch and next_seq start at 1")
        if acked is not None and acked.seq >= next_seq:
            raise LocalProtocolError(f"next_seq {next_seq} is not above acked seq {acked.seq}")
        self.agent = agent
        self.device = agent.device
        self.namespace = agent.namespace
        self.job = job
        self.identity = identity
        self.config = config or AgentConfig()
        self.derivable = frozenset(derivable)
        self._epoch = epoch
        self._next_seq = next_seq
        self._acked = acked
        self._step = step
        self._phase = Phase.DISCONNECTED
        self._in_flight: _InFlight | None = None
        self._final: _Final | None = None
        self._handover_requested = False
        self._deadline: float | None = None
        self._attempts = 0
        self._link_rate: float | None = None
        self._taken_over_epoch: int | None = None
        try:
            self._birth(0.0)  # the job's identity must make a valid BIRTH: fail early
        except LocalProtocolError as exc:
            raise LocalProtocolError(
                f"job {job}: {exc}", hint="spec: plain values only (str keys; no dates)"
            ) from None
        self._deadline = None
        if pending is not None:
            if pending.seq >= next_seq:
                raise LocalProtocolError(f"next_seq {next_seq} is not above pending {pending.seq}")
            if pending.base_seq is not None and (acked is None or acked.seq != pending.base_seq):
                raise LocalProtocolError(
                    f"pending snapshot {pending.seq} was encoded on {pending.base_seq}, which is "
                    "not the acknowledged state given",
                    hint="journal Acked before Offered; or drop the pending snapshot",
                )
            self._in_flight = self._make_in_flight(
                pending.seq, pending.base_seq, pending.state_hash, pending.step, pending.payload,
                final=False,
            )  # fmt: skip

    # -- what the caller may read -----------------------------------------------------------

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def acked(self) -> AckedState | None:
        """The acknowledged base (None: unknown, the next snapshot is full)."""
        return self._acked

    @property
    def acked_seq(self) -> int | None:
        return None if self._acked is None else self._acked.seq

    @property
    def acked_hash(self) -> bytes | None:
        return None if self._acked is None else self._acked.hash

    @property
    def in_flight_seq(self) -> int | None:
        return None if self._in_flight is None else self._in_flight.seq

    @property
    def closed(self) -> bool:
        return self._phase is Phase.CLOSED

    @property
    def can_offer(self) -> bool:
        """Whether :meth:`offer` would start a snapshot now: synced, none in flight, and not
        finishing."""
        return self._phase is Phase.READY and self._in_flight is None and self._final is None

    @property
    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has something to do (None: not until something happens)."""
        return self._deadline

    def set_link_rate(self, bytes_per_second: float | None) -> None:
        """The measured uplink rate, for ack timeouts (None: fall back to the default)."""
        if bytes_per_second is not None and not bytes_per_second > 0:
            raise LocalProtocolError("a link rate is > 0 bytes/s")
        self._link_rate = bytes_per_second

    # -- events from the link ---------------------------------------------------------------

    def connected(self, now: float, *, step: int | None = None) -> list[AgentItem]:
        """The link is up and the ``ack``/``ctl`` subscriptions are acknowledged (retained CTLs
        already delivered). Sends the BIRTH; snapshots wait for the SYNC."""
        if self.closed:
            return []
        if step is not None:
            self._step = step
        self._phase = Phase.SYNCING
        self._attempts = 0
        return [self._birth(now)]

    def disconnected(self, now: float) -> list[AgentItem]:
        """The link is down: nothing more is sent until :meth:`connected`. The snapshot in
        flight is kept; after reconnecting it is queried, and only missing chunks resent."""
        if not self.closed:
            self._phase = Phase.DISCONNECTED
            self._deadline = None
        return []

    def receive(self, incoming: Incoming, now: float) -> list[AgentItem]:
        """A message from the server on this job's ``ack`` or ``ctl`` topic."""
        if self.closed:
            return []
        msg = incoming.message
        t = incoming.topic
        if (t.device, t.job) != (self.device, self.job) or t.kind not in (
            TopicKind.ACK, TopicKind.CTL,
        ):  # fmt: skip
            return [Ignored(msg, f"not for this job's ack/ctl topics: {t}")]
        birth_deadline = self._deadline if self._phase is Phase.SYNCING else None
        if isinstance(msg, Ctl):
            items = self._on_ctl(msg, now)
        elif isinstance(msg, Sync):
            items = self._on_sync(msg, now)
        elif isinstance(msg, Ack):
            items = self._on_ack(msg, now)
        elif isinstance(msg, Nack):
            items = self._on_nack(msg, now)
        elif isinstance(msg, Need):
            items = self._on_need(msg, now)
        else:
            items = [Ignored(msg, f"an agent does not take {msg.TYPE} messages")]
        if self._phase is Phase.SYNCING and self._deadline is None:
            # Still waiting for the SYNC: an ack or nack of the transfer in flight settled
            # that transfer (and cleared its timer), not the BIRTH, which may have been lost
            # (sent before the server's subscriptions were back): keep retrying it.
            self._deadline = birth_deadline if birth_deadline is not None else now
        return items

    def tick(self, now: float) -> list[AgentItem]:
        """Time passed: retries whatever waited past its deadline (BIRTH, QUERY, DONE/RELEASE)."""
        if self._deadline is None or now < self._deadline or self._phase in (
            Phase.CLOSED, Phase.DISCONNECTED,
        ):  # fmt: skip
            return []
        self._attempts += 1
        if self._phase is Phase.SYNCING:
            return [self._birth(now)]
        if self._in_flight is not None:
            f = self._in_flight
            self._deadline = now + self._backoff()
            return [self._out(Query(self.device, self.job, self._epoch, f.seq, f.plan.count))]
        if self._final is not None and self._final.sent:
            return [self._final_message(now)]
        self._deadline = None
        return []

    # -- what the caller asks ---------------------------------------------------------------

    def reserve_seq(self) -> int:
        """A seq for a snapshot the caller keeps locally and never sends (the runner's
        journal snapshots while offline or while a transfer is in flight share the job's
        seq space). Every later snapshot's seq is above it. Raises once the session is
        closed."""
        self._require_open("reserve a seq")
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def offer(
        self, state: State, step: int, now: float, *, include_derivable: bool = False
    ) -> list[AgentItem]:
        """Start a snapshot of ``state`` (the job at ``step``): a delta against the acknowledged
        base, or a full snapshot when there is none. Derivable entries are left out unless
        ``include_derivable``. Raises LocalProtocolError unless :attr:`can_offer`."""
        self._require_open("offer")
        if not self.can_offer:
            raise LocalProtocolError(
                f"job {self.job}: cannot offer a snapshot while {self._why_not()}",
                hint="check can_offer first; coalesce, do not queue (invariant 6)",
            )
        self._step = step
        return self._send_snapshot(state, step, now, include_derivable, final=False)

    def finish(self, state: State, step: int, now: float) -> list[AgentItem]:
        """The job is done: send ``state`` as the final snapshot (after the one in flight, if
        any), then DONE; :class:`Completed` when the server confirms."""
        return self._set_final("done", state, step, now, include_derivable=False)

    def hand_over(
        self, state: State, step: int, now: float, *, include_derivable: bool = True
    ) -> list[AgentItem]:
        """Live hand-over: send ``state`` as the final snapshot, derivable entries included (so
        the server recomputes nothing), then RELEASE; :class:`TakenOver` follows."""
        return self._set_final("handover", state, step, now, include_derivable=include_derivable)

    # -- internals: building messages ------------------------------------------------------

    def _out(self, msg: Message, priority: Priority = Priority.CONTROL) -> Outgoing:
        return self.namespace.outgoing(msg, priority)

    def _birth(self, now: float) -> Outgoing:
        self._deadline = now + self._backoff()
        a = self._acked
        i = self.identity
        return self._out(
            Birth(
                self.device, self.job, self._epoch, self.agent.session, dict(i.spec), i.model_hash,
                i.codec_version, None if a is None else a.seq, None if a is None else a.hash,
                self._step, i.total_steps,
            )
        )  # fmt: skip

    def _backoff(self) -> float:
        c = self.config
        return float(min(c.timeout_max, c.timeout_floor * 2 ** min(self._attempts, 30)))

    def _transfer_time(self, nbytes: int) -> float:
        rate = self._link_rate or self.config.default_link_rate
        return self.config.ack_timeout_factor * nbytes / rate

    def _make_in_flight(
        self, seq: int, base_seq: int | None, h: bytes, step: int, payload: bytes, *, final: bool
    ) -> _InFlight:
        over = snap_overhead(self._epoch, seq, base_seq, step, len(payload))
        plan = ChunkPlan.fit(len(payload), over, self.config.max_message)
        return _InFlight(seq, base_seq, h, step, payload, plan, final)

    def _chunks(self, f: _InFlight, indexes: Iterable[int]) -> list[AgentItem]:
        view = memoryview(f.payload)
        out: list[AgentItem] = []
        for i in indexes:
            a, b = f.plan.span(i)
            snap = Snap(
                self.device, self.job, self._epoch, f.seq, f.base_seq, f.step, i, f.plan.count,
                f.plan.size, view[a:b],
            )  # fmt: skip
            out.append(self._out(snap, f.priority))
        return out

    def _send_snapshot(
        self, state: State, step: int, now: float, include_derivable: bool, *, final: bool
    ) -> list[AgentItem]:
        sent = self._strip(state, include_derivable)
        base = self._acked
        payload = encode_delta(
            None if base is None else base.state, sent, **self.config.codec_options
        )
        header = read_header(payload)
        seq = self._next_seq
        f = self._make_in_flight(
            seq, None if base is None else base.seq, header.state_hash, step, payload, final=final
        )
        self._next_seq += 1
        self._in_flight = f
        self._attempts = 0
        self._deadline = now + self.config.timeout_floor + self._transfer_time(len(payload))
        items: list[AgentItem] = [
            Offered(seq, f.base_seq, f.state_hash, step, len(payload), payload, final)
        ]
        items += self._chunks(f, range(f.plan.count))
        return items

    def _strip(self, state: State, include_derivable: bool) -> State:
        if include_derivable or not self.derivable.intersection(state.keys()):
            return state
        return {k: v for k, v in state.items() if k not in self.derivable}

    def _final_message(self, now: float) -> Outgoing:
        fin, a = self._final, self._acked
        assert fin is not None and a is not None
        fin.sent = fin.sent_ever = True
        self._deadline = now + self._backoff()
        cls = Done if fin.kind == "done" else Release
        return self._out(cls(self.device, self.job, self._epoch, a.seq, fin.step))

    # -- internals: state changes ----------------------------------------------------------

    def _require_open(self, what: str) -> None:
        if self._phase is Phase.CLOSED:
            if self._taken_over_epoch is not None:
                raise Fenced(
                    f"job {self.job} is owned by the server since epoch {self._taken_over_epoch}; "
                    f"cannot {what}",
                    hint="stop the job: the server owns it",
                )
            raise LocalProtocolError(
                f"job {self.job} is closed (completed or stopped); cannot {what}"
            )

    def _why_not(self) -> str:
        if self._phase is not Phase.READY:
            return f"{self._phase.value} (not synced with the server)"
        if self._final is not None:
            return "finishing"
        return f"snapshot {self.in_flight_seq} is in flight"

    def _set_final(
        self,
        kind: Literal["done", "handover"],
        state: State,
        step: int,
        now: float,
        *,
        include_derivable: bool,
    ) -> list[AgentItem]:
        self._require_open("done" if kind == "done" else "hand over")
        if self._final is not None:
            raise LocalProtocolError(f"job {self.job} is already finishing ({self._final.kind})")
        self._step = step
        h = state_hash(self._strip(state, include_derivable))
        self._final = _Final(kind, state, step, include_derivable, h)
        return self._advance(now)

    def _advance(self, now: float) -> list[AgentItem]:
        """Start what is due once nothing is in flight: the final snapshot, or DONE/RELEASE."""
        fin = self._final
        if self._phase is not Phase.READY or self._in_flight is not None or fin is None or fin.sent:
            return []
        if self._acked is not None and self._acked.hash == fin.hash:
            self._attempts = 0
            return [self._final_message(now)]
        return self._send_snapshot(fin.state, fin.step, now, fin.include_derivable, final=True)

    def _close(self) -> list[AgentItem]:
        items: list[AgentItem] = []
        if self._in_flight is not None:
            items.append(TransferAbandoned(self._in_flight.seq, "the job is closed"))
        self._phase = Phase.CLOSED
        self._in_flight = None
        self._final = None
        self._acked = None  # nothing is encoded any more; let the state go
        self._deadline = None
        return items

    def _taken_over(self, epoch: int, via: Literal["ctl", "sync", "nack"]) -> list[AgentItem]:
        fin = self._final
        handed = fin is not None and fin.kind == "handover" and fin.sent_ever
        self._taken_over_epoch = epoch
        return [*self._close(), TakenOver(epoch, handed, via)]

    def _abandon(self, reason: str) -> list[AgentItem]:
        f = self._in_flight
        if f is None:
            return []
        self._in_flight = None
        self._deadline = None
        return [TransferAbandoned(f.seq, reason)]

    def _forget_base(self, reason: str) -> list[AgentItem]:
        had = self._acked is not None
        self._acked = None
        return [NeedsFull(reason)] if had else []

    def _adopt_in_flight(self) -> list[AgentItem]:
        """The server holds our in-flight snapshot: it becomes the acknowledged base."""
        f = self._in_flight
        assert f is not None
        self._in_flight = None
        self._deadline = None
        self._attempts = 0
        base = None if f.base_seq is None or self._acked is None else self._acked.state
        try:
            state = apply_delta(base, f.payload)
        except CodecError as exc:  # our own payload: only a codec bug gets here
            return self._forget_base(f"could not rebuild acked snapshot {f.seq}: {exc}")
        self._acked = AckedState(f.seq, f.state_hash, state)
        return [Acked(f.seq, f.state_hash, f.step, state)]

    # -- internals: handlers ---------------------------------------------------------------

    def _on_ctl(self, msg: Ctl, now: float) -> list[AgentItem]:
        if msg.owner == "server":
            if msg.epoch >= self._epoch:
                return self._taken_over(msg.epoch, "ctl")
            return [Ignored(msg, f"server ownership at old epoch {msg.epoch} < {self._epoch}")]
        if msg.epoch != self._epoch:
            return [Ignored(msg, f"edge ownership at epoch {msg.epoch}, ours is {self._epoch}")]
        if msg.request == "handover":
            if self._handover_requested:
                return []
            self._handover_requested = True
            return [HandoverRequested(msg.epoch)]
        if msg.request == "stop":
            fin = self._final
            if fin is not None and fin.kind == "done":
                seq = self._acked.seq if self._acked is not None else 0
                step = fin.step
                return [*self._close(), Completed(seq, step)]
            return [*self._close(), Stopped(msg.epoch)]
        return []

    def _on_sync(self, msg: Sync, now: float) -> list[AgentItem]:
        if msg.owner == "server" and msg.epoch >= self._epoch:
            return self._taken_over(msg.epoch, "sync")
        if self._phase is not Phase.SYNCING:
            return []  # a late duplicate: the first SYNC after the birth settled things
        if msg.owner == "server" or msg.epoch != self._epoch:
            return [Ignored(msg, f"SYNC at epoch {msg.epoch} ({msg.owner}), ours {self._epoch}")]
        if msg.seq is not None:
            self._next_seq = max(self._next_seq, msg.seq + 1)
        items: list[AgentItem] = []
        server = (msg.seq, msg.hash)
        a, f = self._acked, self._in_flight
        adopted = False
        if a is not None and (a.seq, a.hash) == server:
            pass
        elif f is not None and (f.seq, f.state_hash) == server:
            items += self._adopt_in_flight()
            adopted = True
        elif a is not None:
            items += self._forget_base(f"the server holds {msg.seq}, not our acked {a.seq}")
        f = self._in_flight
        if f is not None:
            if f.base_seq is not None and (self._acked is None or self._acked.seq != f.base_seq):
                items += self._abandon("the server does not hold its base")
            elif msg.seq is not None and f.seq <= msg.seq:
                items += self._abandon(f"the server is past it, at {msg.seq}")
        self._phase = Phase.READY
        self._attempts = 0
        self._deadline = None
        if self._final is not None:
            self._final.sent = False  # DONE/RELEASE is sent again on this connection
        items.insert(0, Synced(msg.epoch, msg.seq, msg.hash, adopted))
        f = self._in_flight
        if f is not None:  # resume the interrupted transfer: ask what is missing
            self._deadline = now + self._backoff()
            items.append(self._out(Query(self.device, self.job, self._epoch, f.seq, f.plan.count)))
        items += self._advance(now)
        return items

    def _on_ack(self, msg: Ack, now: float) -> list[AgentItem]:
        f = self._in_flight
        if msg.epoch != self._epoch or f is None or (msg.seq, msg.hash) != (f.seq, f.state_hash):
            return []  # a duplicate, a late ack, or one for something we never sent: ignore
        items = self._adopt_in_flight()
        return items + self._advance(now)

    def _on_nack(self, msg: Nack, now: float) -> list[AgentItem]:
        if msg.reason == "fenced":
            if msg.epoch > self._epoch:
                return self._taken_over(msg.epoch, "nack")
            return [Ignored(msg, f"fenced at epoch {msg.epoch}, not above ours {self._epoch}")]
        f, fin, a = self._in_flight, self._final, self._acked
        about_in_flight = f is not None and msg.seq == f.seq
        about_final = fin is not None and fin.sent_ever and a is not None and msg.seq == a.seq
        if msg.seq == 0 and msg.reason == "invalid":
            return [Rejected(0, msg.reason)]
        if not (about_in_flight or about_final):
            return []  # about a snapshot we already gave up: ignore
        have = (msg.have_seq, msg.have_hash)
        if msg.reason == "base" and f is not None and have == (f.seq, f.state_hash):
            return self._adopt_in_flight() + self._advance(now)  # it holds ours after all
        items: list[AgentItem] = []
        if about_in_flight:
            items += self._abandon(f"nack {msg.reason}")
        if fin is not None:
            fin.sent = False
            self._deadline = None
        if msg.have_seq is not None:
            self._next_seq = max(self._next_seq, msg.have_seq + 1)
        if msg.reason == "base" and a is not None and have == (a.seq, a.hash):
            pass  # the server holds our base: keep it; the next snapshot is a delta again
        elif msg.reason in ("base", "corrupt", "hash"):
            items += self._forget_base(f"nack {msg.reason} for {msg.seq}")
        elif msg.reason == "unknown":
            items += self._forget_base(f"the server has no birth for job {self.job}")
            if self._phase is Phase.READY:
                self._phase = Phase.SYNCING
                self._attempts = 0
                items.append(self._birth(now))
            return items
        else:  # too-large, invalid: retrying the same would fail the same way
            items.append(Rejected(msg.seq, msg.reason))
            if about_final or (about_in_flight and f is not None and f.final):
                self._final = None  # the final snapshot cannot be delivered; the caller decides
        return items + self._advance(now)

    def _on_need(self, msg: Need, now: float) -> list[AgentItem]:
        f = self._in_flight
        if self._phase is not Phase.READY or f is None or msg.seq != f.seq:
            return []
        count = f.plan.count
        indexes = [i for a, b in msg.missing for i in range(a, min(b, count))]
        self._attempts = 0
        nbytes = sum(f.plan.span(i)[1] - f.plan.span(i)[0] for i in indexes)
        self._deadline = now + self.config.timeout_floor + self._transfer_time(nbytes)
        return self._chunks(f, indexes)
