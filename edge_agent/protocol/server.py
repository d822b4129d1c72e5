"""The server end of the protocol: one :class:`ServerJobSession` per job, sans-IO.

A session is fed the job's messages (``receive``) and the server's decisions (``take_over``,
``request_handover``); every call returns a list of *effects*, in the order the caller must
carry them out: :class:`~.topics.Outgoing` messages to publish, records to persist
(:class:`RecordBirth`, :class:`RecordOwnership`, :class:`RecordCompleted`), a
:class:`Commit` to apply, verify and store, and :class:`Refused` notes for logs and metrics.

The session holds no state *values*, only their seq and hash: the caller keeps states where
it likes (an LRU, the store) and does the heavy work a :class:`Commit` asks for, then reports
with :meth:`~ServerJobSession.commit_succeeded` or :meth:`~ServerJobSession.commit_failed`;
only then does the session answer ``ack`` (store, then ack) or ``nack``.

Rules (docs/protocol.md section 4; the tests check them):

1. A snapshot is applied only on the current state: its payload's base hash (read from the
   codec header) and its ``base_seq`` must both be the current ones; else ``nack base``.
2. The current state changes only in ``commit_succeeded``, after the caller stored it.
3. Anything from the agent stamped with an older epoch, or sent after the server took the
   job, is answered ``nack fenced`` and changes nothing; a message from another device, or
   for another job, is refused without a reply.
4. Effects are carried out in order; a record effect must be durable before the effects
   after it are carried out (a CTL is published only after the epoch it announces is stored).
   A caller that fails to carry one out drops the session and rebuilds it from its store.
5. One commit at a time: until it is reported, ``receive``, ``take_over`` and
   ``request_handover`` raise LocalProtocolError.

This module owns the server's protocol logic. It never touches a socket, a file, a thread,
a clock or a state's arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from edge_agent.codec import apply_delta, read_header
from edge_agent.errors import (
    BaseMismatch,
    ChunkRejected,
    CodecError,
    EdgeResumeError,
    Fenced,
    LocalProtocolError,
    RemoteProtocolError,
    StateHashMismatch,
    TopicMismatch,
    TransferTooLarge,
)
from edge_agent.protocol.chunking import DEFAULT_MAX_TRANSFER, Reassembly
from edge_agent.protocol.messages import (
    HASH_SIZE,
    Ack,
    Birth,
    Ctl,
    Done,
    Message,
    Nack,
    Need,
    Owner,
    Query,
    Reason,
    Release,
    Request,
    Snap,
    Sync,
    is_valid_id,
)
from edge_agent.protocol.topics import (
    Incoming,
    Outgoing,
    Priority,
    TopicKind,
    TopicNamespace,
    decode_incoming,
)
from edge_agent.state import State, state_hash

__all__ = [
    "Commit",
    "RecordBirth",
    "RecordCompleted",
    "RecordOwnership",
    "Refused",
    "ServerEffect",
    "ServerJobSession",
    "route",
]


# ---------------------------------------------------------------------------------------------
# Effects.


@dataclass(frozen=True, slots=True)
class RecordBirth:
    """Persist the job's record (a new job, or an agent's new session) before what follows."""

    birth: Birth
    epoch: int
    owner: Owner


@dataclass(frozen=True, slots=True)
class Commit:
    """A complete transfer whose base is the current state: apply it to the current state
    (None for a full snapshot), verify, store durably, then call ``commit_succeeded(seq)``;
    on a CodecError call ``commit_failed(seq, error)``. :meth:`apply` does apply + verify."""

    seq: int
    base_seq: int | None
    step: int
    epoch: int
    base_hash: bytes | None
    state_hash: bytes
    payload: bytes

    @property
    def full(self) -> bool:
        return self.base_hash is None

    def apply(self, base: State | None) -> dict[str, Any]:
        """The new state: ``apply_delta(base, payload)``, checked against ``state_hash``.
        Raises a CodecError (:class:`StateHashMismatch` when the hash differs)."""
        new = apply_delta(None if self.full else base, self.payload)
        if state_hash(new) != self.state_hash:
            raise StateHashMismatch(f"snapshot {self.seq} does not hash to what it names")
        return new


@dataclass(frozen=True, slots=True)
class RecordOwnership:
    """Persist the job's new epoch and owner before what follows (the retained CTL)."""

    epoch: int
    owner: Owner
    reason: Literal["takeover", "release"]


@dataclass(frozen=True, slots=True)
class RecordCompleted:
    """Persist that the job completed at ``seq`` before what follows."""

    seq: int
    step: int


@dataclass(frozen=True, slots=True)
class Refused:
    """A message was refused and changed nothing (any reply follows as an Outgoing)."""

    message: Message | None
    error: EdgeResumeError


ServerEffect: TypeAlias = (
    Outgoing | RecordBirth | Commit | RecordOwnership | RecordCompleted | Refused
)


def route(
    namespace: TopicNamespace, topic: str, payload: bytes | bytearray | memoryview
) -> Incoming:
    """Decode a message received by the server (``status``, ``hb`` or ``state`` topics);
    raises a RemoteProtocolError for anything else (see ``decode_incoming``)."""
    incoming = decode_incoming(namespace, topic, payload)
    if incoming.topic.kind not in (TopicKind.STATUS, TopicKind.HB, TopicKind.STATE):
        raise TopicMismatch(f"the server does not take messages on {topic!r}")
    return incoming


# ---------------------------------------------------------------------------------------------
# The session.


class ServerJobSession:
    """The server end of one job. Build it from the store's record of the job (its birth,
    epoch, owner, current seq and hash, completion), or empty for a job not seen yet."""

    def __init__(
        self,
        device: str,
        job: str,
        *,
        namespace: TopicNamespace | None = None,
        birth: Birth | None = None,
        epoch: int = 1,
        owner: Owner = "edge",
        current: tuple[int, bytes] | None = None,
        step: int = 0,
        completed: bool = False,
        max_transfer: int = DEFAULT_MAX_TRANSFER,
    ) -> None:
        if not (is_valid_id(device) and is_valid_id(job)):
            raise LocalProtocolError(f"device {device!r} or job {job!r} is not a valid id")
        if epoch < 1 or owner not in ("edge", "server") or max_transfer < 1:
            raise LocalProtocolError("epoch >= 1, owner edge|server and max_transfer >= 1")
        if current is not None and (current[0] < 1 or len(current[1]) != HASH_SIZE):
            raise LocalProtocolError(f"current must be (seq >= 1, {HASH_SIZE}-byte hash)")
        self.device = device
        self.job = job
        self.namespace = namespace or TopicNamespace()
        self.max_transfer = max_transfer
        self._birth = birth
        self._epoch = epoch
        self._owner: Owner = owner
        self._current = current
        self._step = step
        self._completed = completed
        self._transfer: Reassembly | None = None
        self._pending: Commit | None = None

    # -- what the caller may read -----------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def owner(self) -> Owner:
        return self._owner

    @property
    def born(self) -> bool:
        return self._birth is not None

    @property
    def birth(self) -> Birth | None:
        return self._birth

    @property
    def completed(self) -> bool:
        return self._completed

    @property
    def current_seq(self) -> int | None:
        return None if self._current is None else self._current[0]

    @property
    def current_hash(self) -> bytes | None:
        return None if self._current is None else self._current[1]

    @property
    def step(self) -> int:
        """The step of the current state (as the agent reported it)."""
        return self._step

    @property
    def pending_commit(self) -> Commit | None:
        return self._pending

    @property
    def transfer_seq(self) -> int | None:
        return None if self._transfer is None else self._transfer.seq

    @property
    def transfer_bytes(self) -> int:
        """Bytes held for the incomplete transfer (what this session costs in memory)."""
        return 0 if self._transfer is None else self._transfer.received_bytes

    def drop_transfer(self) -> None:
        """Forget an incomplete transfer (e.g. under memory pressure); the agent's next query
        is answered with every chunk missing."""
        self._transfer = None

    # -- messages from the agent ------------------------------------------------------------

    def receive(self, incoming: Incoming, now: float) -> list[ServerEffect]:
        """A message on this job's ``state`` topic."""
        self._require_no_pending("receive a message")
        msg, t = incoming.message, incoming.topic
        if (
            t.kind is not TopicKind.STATE
            or (t.device, t.job) != (self.device, self.job)
            or msg.device != self.device
            or getattr(msg, "job", None) != self.job
        ):
            err: EdgeResumeError = TopicMismatch(
                f"a {msg.TYPE} from {msg.device!r} on {t} is not for job {self.job!r} of "
                f"device {self.device!r}",
                hint="a job id belongs to the device that gave it birth",
            )
            return [Refused(msg, err)]
        if isinstance(msg, Birth):
            return self._on_birth(msg)
        if not isinstance(msg, (Snap, Query, Done, Release)):
            return [Refused(msg, TopicMismatch(f"a {msg.TYPE} does not travel on a state topic"))]
        if self._owner == "server" or msg.epoch < self._epoch:
            err = Fenced(
                f"job {self.job}: a {msg.TYPE} at epoch {msg.epoch}, the job is at {self._epoch} "
                f"owned by the {self._owner}"
            )
            return [Refused(msg, err), self._nack(msg.seq, "fenced")]
        if self._birth is None:
            err = RemoteProtocolError(f"job {self.job}: a {msg.TYPE} before any birth")
            return [Refused(msg, err), self._nack(msg.seq, "unknown")]
        if msg.epoch > self._epoch:
            err = RemoteProtocolError(
                f"job {self.job}: epoch {msg.epoch} was never issued (at {self._epoch})"
            )
            return [Refused(msg, err), self._nack(msg.seq, "invalid")]
        if isinstance(msg, Snap):
            return self._on_snap(msg)
        if isinstance(msg, Query):
            return self._on_query(msg)
        if isinstance(msg, Done):
            return self._on_done(msg, now)
        return self._on_release(msg, now)

    def receive_invalid(self, error: RemoteProtocolError) -> list[ServerEffect]:
        """A message on this job's ``state`` topic that could not be decoded: ``nack invalid``
        (seq 0), so the agent logs it."""
        return [Refused(None, error), self._nack(0, "invalid")]

    # -- the caller's reports on a Commit ---------------------------------------------------

    def commit_succeeded(self, seq: int) -> list[ServerEffect]:
        """The Commit for ``seq`` was applied, verified and stored durably: ack it."""
        p = self._take_pending(seq)
        self._current = (p.seq, p.state_hash)
        self._step = p.step
        return [self._ack()]

    def commit_failed(self, seq: int, error: BaseException) -> list[ServerEffect]:
        """The Commit for ``seq`` failed; the current state is unchanged. A CodecError is
        answered with the matching nack (``hash``, ``base`` or ``corrupt``); any other error
        (the store failed) gets no answer: the agent's query will find every chunk missing."""
        p = self._take_pending(seq)
        if not isinstance(error, CodecError):
            return []
        reason: Reason = "corrupt"
        if isinstance(error, StateHashMismatch):
            reason = "hash"
        elif isinstance(error, BaseMismatch):
            reason = "base"
        return [Refused(None, error), self._nack(p.seq, reason)]

    # -- the server's decisions -------------------------------------------------------------

    def take_over(self, now: float) -> list[ServerEffect]:
        """Take the job from the edge: raise the epoch, record owner = server, then publish the
        retained CTL. From now on every agent message is fenced. Idempotent."""
        self._require_no_pending("take over")
        if self._owner == "server":
            return [self._ctl("run", now)]
        return self._take_over(now, "takeover")

    def request_handover(self, now: float) -> list[ServerEffect]:
        """Ask an online agent for a live hand-over (CTL ``handover``, same epoch): it sends a
        final snapshot with its derivable entries, then RELEASE, and the server takes over."""
        self._require_no_pending("request a hand-over")
        self._require_takeable()
        if self._owner == "server":
            raise LocalProtocolError(f"job {self.job} is already owned by the server")
        return [self._ctl("handover", now)]

    def retained_ctl(self, now: float) -> Outgoing | None:
        """The CTL the job's retained topic should hold (to republish after a restart), or
        None while the job runs on the edge unasked."""
        if self._owner == "server":
            return self._ctl("run", now)
        if self._completed:
            return self._ctl("stop", now)
        return None

    # -- internals --------------------------------------------------------------------------

    def _require_no_pending(self, what: str) -> None:
        if self._pending is not None:
            raise LocalProtocolError(
                f"job {self.job}: cannot {what} while commit {self._pending.seq} is unreported",
                hint="call commit_succeeded or commit_failed first",
            )

    def _require_takeable(self) -> None:
        if self._birth is None:
            raise LocalProtocolError(f"job {self.job} has no birth; nothing to take over")
        if self._completed:
            raise LocalProtocolError(f"job {self.job} is completed")

    def _take_pending(self, seq: int) -> Commit:
        p = self._pending
        if p is None or p.seq != seq:
            raise LocalProtocolError(f"job {self.job}: no commit {seq} is pending")
        self._pending = None
        return p

    def _take_over(self, now: float, reason: Literal["takeover", "release"]) -> list[ServerEffect]:
        self._require_takeable()
        self._epoch += 1
        self._owner = "server"
        self._transfer = None
        return [RecordOwnership(self._epoch, "server", reason), self._ctl("run", now)]

    def _out(self, msg: Message) -> Outgoing:
        return self.namespace.outgoing(msg, Priority.CONTROL)

    def _ack(self) -> Outgoing:
        assert self._current is not None
        seq, h = self._current
        return self._out(Ack(self.device, self.job, self._epoch, seq, h))

    def _nack(self, seq: int, reason: Reason) -> Outgoing:
        have_seq, have_hash = self._current if self._current is not None else (None, None)
        return self._out(Nack(self.device, self.job, self._epoch, seq, reason, have_seq, have_hash))

    def _ctl(self, request: Request, now: float) -> Outgoing:
        ts = max(0, int(now * 1000))
        return self._out(Ctl(self.device, self.job, self._epoch, self._owner, request, ts))

    def _sync(self) -> Outgoing:
        seq, h = self._current if self._current is not None else (None, None)
        return self._out(Sync(self.device, self.job, self._epoch, self._owner, seq, h))

    def _on_birth(self, msg: Birth) -> list[ServerEffect]:
        if self._birth is None:  # a job not seen before: born at the agent's epoch, edge-owned
            self._birth, self._epoch, self._owner = msg, msg.epoch, "edge"
            return [RecordBirth(msg, self._epoch, self._owner), self._sync()]
        err: EdgeResumeError
        if self._owner == "server" or msg.epoch < self._epoch:
            err = Fenced(f"job {self.job}: birth at epoch {msg.epoch}; the job is at {self._epoch}")
            return [Refused(msg, err), self._sync()]  # the SYNC tells the agent to stop
        if msg.epoch > self._epoch:
            err = RemoteProtocolError(
                f"job {self.job}: birth at epoch {msg.epoch}, never issued (at {self._epoch})"
            )
            return [Refused(msg, err), self._sync()]
        if (msg.spec, msg.model_hash) != (self._birth.spec, self._birth.model_hash):
            err = RemoteProtocolError(
                f"job {self.job}: a birth with another job file or model than the job's",
                hint="a job id names one job; give a changed job a new id",
            )
            return [Refused(msg, err), self._nack(0, "invalid")]
        effects: list[ServerEffect] = []
        if msg != self._birth:
            self._birth = msg
            effects.append(RecordBirth(msg, self._epoch, self._owner))
        return [*effects, self._sync()]

    def _on_snap(self, msg: Snap) -> list[ServerEffect]:
        cur = self._current
        if cur is not None and msg.seq <= cur[0]:
            return [self._ack()] if msg.seq == cur[0] else []  # a duplicate / a late one
        if self._completed:
            err = RemoteProtocolError(f"job {self.job} is completed; snapshot {msg.seq} refused")
            return [Refused(msg, err)]
        t = self._transfer
        if t is not None and msg.seq != t.seq:
            if msg.seq < t.seq:
                return []  # a chunk of a transfer the agent gave up
            t = self._transfer = None  # the agent moved on
        elif t is not None and msg.count != t.count and (msg.size, msg.base_seq, msg.step) == (
            t.size, t.base_seq, t.step,
        ):  # fmt: skip
            t = self._transfer = None  # the same payload cut anew (after an agent restart)
        try:
            if t is None:
                t = Reassembly(msg, max_transfer=self.max_transfer)
            else:
                t.add(msg)
        except TransferTooLarge as exc:
            return [Refused(msg, exc), self._nack(msg.seq, "too-large")]
        except ChunkRejected as exc:
            return [Refused(msg, exc), self._nack(msg.seq, "invalid")]
        self._transfer = t
        if not t.complete:
            return []
        return self._complete(t)

    def _complete(self, t: Reassembly) -> list[ServerEffect]:
        payload = t.payload()
        self._transfer = None
        try:
            header = read_header(payload)
        except CodecError as exc:
            return [Refused(None, exc), self._nack(t.seq, "corrupt")]
        bh, sh = header.base_hash, header.state_hash
        if not (type(sh) is bytes and len(sh) == HASH_SIZE) or not (
            bh is None or (type(bh) is bytes and len(bh) == HASH_SIZE)
        ):
            return [Refused(None, CodecError("a payload header without valid hashes")),
                    self._nack(t.seq, "corrupt")]  # fmt: skip
        if (bh is None) != (t.base_seq is None):
            err = CodecError(f"snapshot {t.seq}: base_seq {t.base_seq} disagrees with its payload")
            return [Refused(None, err), self._nack(t.seq, "corrupt")]
        cur = self._current
        if bh is not None and (cur is None or (t.base_seq, bh) != cur):
            err = BaseMismatch(
                f"snapshot {t.seq} was encoded on {t.base_seq}; the current state is "
                f"{None if cur is None else cur[0]}"
            )
            return [Refused(None, err), self._nack(t.seq, "base")]
        self._pending = Commit(t.seq, t.base_seq, t.step, self._epoch, bh, sh, payload)
        return [self._pending]

    def _on_query(self, msg: Query) -> list[ServerEffect]:
        cur = self._current
        if cur is not None and msg.seq == cur[0]:
            return [self._ack()]
        if cur is not None and msg.seq < cur[0]:
            return [self._nack(msg.seq, "base")]  # we are past it: the agent resyncs
        if self._completed:
            return [Refused(msg, RemoteProtocolError(f"job {self.job} is completed"))]
        t = self._transfer
        if t is not None and t.seq == msg.seq and t.count == msg.count:
            missing = t.missing()
        else:  # nothing of it, or the agent cut it anew (another max_message after a restart)
            if t is not None and t.seq == msg.seq:
                self._transfer = None
            missing = ((0, msg.count),)
        return [self._out(Need(self.device, self.job, self._epoch, msg.seq, missing))]

    def _final_check(self, msg: Done | Release) -> list[ServerEffect] | None:
        cur = self._current
        if cur is not None and msg.seq == cur[0]:
            return None
        if cur is not None and msg.seq < cur[0]:
            return []  # a late duplicate
        return [self._nack(msg.seq, "base")]  # we do not hold that state: send it again

    def _on_done(self, msg: Done, now: float) -> list[ServerEffect]:
        bad = self._final_check(msg)
        if bad is not None:
            return bad
        if self._completed:
            return [self._ctl("stop", now)]  # republished for an agent that missed it
        self._completed = True
        return [RecordCompleted(msg.seq, msg.step), self._ctl("stop", now)]

    def _on_release(self, msg: Release, now: float) -> list[ServerEffect]:
        bad = self._final_check(msg)
        if bad is not None:
            return bad
        if self._completed:
            return [self._ctl("stop", now)]
        return self._take_over(now, "release")
