"""Small stand-ins for server tests: a publisher that records, a fake resumer, message makers.

These replace only what a unit test does not exercise (the broker, the resume worker);
the store is always a real SQLite store in a temporary folder.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from edge_agent.codec import encode_delta
from edge_agent.errors import LocalProtocolError
from edge_agent.protocol import Birth, Done, Query, Release, Snap, TopicNamespace, decode, encode
from edge_agent.protocol.messages import Message
from edge_agent.protocol.topics import Priority
from edge_agent.state import state_hash
from server.control import ResumeStatus
from server.store import Store
from tests.support.sim_device import generate_spec, generate_state

NS = TopicNamespace()
DEVICE = "gw-1"
JOB = "job-1"


class _Ticket:
    def result(self, timeout: float | None = None) -> None:
        return None


@dataclass
class Sent:
    topic: str
    payload: bytes
    qos: int
    retain: bool

    @property
    def message(self) -> Message:
        levels = self.topic.split("/")  # any prefix: {device}/[{job}/]{kind} end it
        if levels[-1] in ("status", "hb"):
            return decode(self.payload, levels[-2])
        return decode(self.payload, levels[-3], levels[-2])


class RecordingPublisher:
    """A Publisher that records what it is asked to publish (thread-safe)."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []
        self._lock = threading.Lock()

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        priority: Priority = Priority.CONTROL,
    ) -> _Ticket:
        with self._lock:
            self.sent.append(Sent(topic, bytes(payload), qos, retain))
        return _Ticket()

    def take(self) -> list[Message]:
        """The messages published since the last call, decoded."""
        with self._lock:
            sent, self.sent = self.sent, []
        return [s.message for s in sent]

    def take_sent(self) -> list[Sent]:
        with self._lock:
            sent, self.sent = self.sent, []
        return sent


# -- messages an agent would send --------------------------------------------------------------


def birth(
    *,
    device: str = DEVICE,
    job: str = JOB,
    epoch: int = 1,
    total_steps: int = 50,
    session: str = "s1",
    acked: tuple[int, bytes] | None = None,
) -> Birth:
    return Birth(
        device,
        job,
        epoch,
        session,
        generate_spec(job, total_steps),
        "sha256:test-model",
        1,
        acked[0] if acked else None,
        acked[1] if acked else None,
        0,
        total_steps,
    )


def snap(
    seq: int,
    payload: bytes,
    *,
    base_seq: int | None = None,
    step: int = 0,
    device: str = DEVICE,
    job: str = JOB,
    epoch: int = 1,
) -> Snap:
    return Snap(device, job, epoch, seq, base_seq, step, 0, 1, len(payload), payload)


def query(seq: int, *, epoch: int = 1) -> Query:
    return Query(DEVICE, JOB, epoch, seq, 1)


def done(seq: int, step: int, *, epoch: int = 1) -> Done:
    return Done(DEVICE, JOB, epoch, seq, step)


def release(seq: int, step: int, *, epoch: int = 1) -> Release:
    return Release(DEVICE, JOB, epoch, seq, step)


def state_topic(msg: Message, device: str | None = None) -> str:
    return NS.state(device or msg.device, msg.job)  # type: ignore[attr-defined]


def wire(msg: Message) -> bytes:
    return encode(msg)


def forged(msg: Message, **changes: Any) -> Message:
    """``msg`` with fields changed, without the constructor's checks (as a forger would)."""
    try:
        return replace(msg, **changes)  # type: ignore[type-var]
    except LocalProtocolError:  # pragma: no cover
        raise


def chain(steps: list[int]) -> list[tuple[bytes, bytes, dict[str, Any]]]:
    """Payloads for states at ``steps``: the first full, the rest deltas on the previous."""
    out = []
    prev = None
    for st in steps:
        s = generate_state(st)
        out.append((encode_delta(prev, s), state_hash(s), s))
        prev = s
    return out


# -- a resumer ----------------------------------------------------------------------------------


@dataclass
class FakeResumer:
    """Resumer for API tests: requests are recorded, phases set by the test."""

    store: Store
    calls: list[tuple[str, str]] = field(default_factory=list)
    statuses: dict[str, ResumeStatus] = field(default_factory=dict)
    complete_on_request: bool = False
    handed_over: list[tuple[str, int]] = field(default_factory=list)

    def request_resume(self, job_id: str, *, reason: str = "api") -> ResumeStatus:
        self.calls.append(("resume", job_id))
        cur = self.statuses.get(job_id)
        if cur is not None and cur.active:
            return cur
        attempt = (cur.attempt if cur else 0) + 1
        st = ResumeStatus(job_id, "queued", attempt, None, time.time(), None, None, None)
        if self.complete_on_request:
            self.store.set_status(job_id, "completed", detail="fake resumer")
            st = replace(st, phase="completed", finished_at=time.time())
        self.statuses[job_id] = st
        return st

    def request_handover(self, job_id: str) -> ResumeStatus:
        self.calls.append(("handover", job_id))
        st = ResumeStatus(job_id, "handover-requested", 1, None, time.time(), None, None, None)
        self.statuses[job_id] = st
        return st

    def status(self, job_id: str) -> ResumeStatus | None:
        return self.statuses.get(job_id)

    def on_handed_over(self, job_id: str, epoch: int) -> None:
        self.handed_over.append((job_id, epoch))

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass
