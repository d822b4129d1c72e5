"""A small, honest server end for the agent's integration tests and the link benchmark.

It is what ``server/ingest.py`` does, cut to the bone: :mod:`edge_agent.transport` to a real
Mosquitto, one :class:`~edge_agent.protocol.ServerJobSession` per job carried out in order
(record before publish, store before ack), a real :class:`server.store.sqlite.SQLiteStore`,
and the server's decisions (``take_over``) on request. It also records what the tests and
the benchmark look at: every agent message per job and type with its arrival time, the
heartbeats with the server copy's step at that moment (lag in steps), and every commit.

Limits, on purpose: sessions live in memory for the harness's life (no rebuild from the
store after a harness restart); one thread handles every message; liveness is only recorded.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.errors import EdgeResumeError, RemoteProtocolError
from edge_agent.protocol import (
    Commit,
    Heartbeat,
    Outgoing,
    RecordBirth,
    RecordCompleted,
    RecordOwnership,
    Refused,
    ServerEffect,
    ServerJobSession,
    Status,
    TopicKind,
    TopicNamespace,
    route,
)
from edge_agent.ratelimit import Priority
from edge_agent.state import state_nbytes
from edge_agent.transport import Connected, Message, Transport, TransportConfig
from server.store.sqlite import SQLiteStore


@dataclass(frozen=True)
class Arrival:
    at: float  # time.monotonic()
    job: str | None
    type: str
    size: int  # MQTT payload bytes


@dataclass(frozen=True)
class LagSample:
    at: float
    job: str
    job_step: int  # the agent's step, from its heartbeat
    server_step: int  # the step of the server's acknowledged copy at that moment


class MiniServer:
    """Start with :meth:`start` (or as a context manager); read its records under ``lock``."""

    def __init__(
        self,
        broker_url: str,
        store_dir: Path,
        *,
        namespace: TopicNamespace | None = None,
        client_id: str = "mini-server",
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.ns = namespace or TopicNamespace()
        self.store = SQLiteStore(store_dir)
        self.transport = Transport(
            TransportConfig(
                broker=broker_url, client_id=client_id, username=username, password=password,
                backoff_initial=0.2, backoff_max=1.0,
            )
        )  # fmt: skip
        self.lock = threading.RLock()
        self.sessions: dict[str, ServerJobSession] = {}
        self.states: dict[str, dict[str, Any]] = {}
        self.arrivals: list[Arrival] = []
        self.commits: list[tuple[float, str, int, int, int]] = []  # at, job, seq, step, bytes
        self.lag: list[LagSample] = []
        self.status: list[tuple[float, str, bool]] = []
        self.refused: list[Refused] = []
        self.published: list[tuple[str | None, str, int]] = []  # job, type, payload bytes
        self.errors: list[str] = []
        self.connects = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mini-server", daemon=True)

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> MiniServer:
        subs = [(s.filter, s.qos) for s in self.ns.server_subscriptions()]
        self.transport.subscribe_nowait(subs)
        self.transport.start()
        self.transport.wait_connected(15)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self.transport.close(timeout=2)
        self.store.close()

    def __enter__(self) -> MiniServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            ev = self.transport.get(timeout=0.1)
            if ev is None:
                continue
            if isinstance(ev, Connected):
                self.connects += 1
                self._republish_ctls()
            elif isinstance(ev, Message):
                try:
                    self._on_message(ev)
                except Exception as exc:  # record, keep serving: the test asserts on it
                    self.errors.append(f"{type(exc).__name__}: {exc}")

    def _republish_ctls(self) -> None:
        """After a broker restart a retained CTL may be gone: publish them again."""
        with self.lock:
            now = time.time()
            for s in self.sessions.values():
                ctl = s.retained_ctl(now)
                if ctl is not None:
                    self._publish(ctl)

    # -- messages ----------------------------------------------------------------------------

    def _on_message(self, ev: Message) -> None:
        now_mono, now = time.monotonic(), time.time()
        try:
            incoming = route(self.ns, ev.topic, ev.payload)
        except RemoteProtocolError as exc:
            self.errors.append(f"refused {ev.topic}: {exc}")
            return
        msg, topic = incoming.message, incoming.topic
        with self.lock:
            self.arrivals.append(Arrival(now_mono, topic.job, msg.TYPE, len(ev.payload)))
            if topic.kind is TopicKind.STATUS:
                assert isinstance(msg, Status)
                self.status.append((now_mono, msg.device, msg.online))
                return
            if topic.kind is TopicKind.HB:
                assert isinstance(msg, Heartbeat)
                for job, (step, _acked) in msg.jobs.items():
                    s = self.sessions.get(job)
                    self.lag.append(LagSample(now_mono, job, step, 0 if s is None else s.step))
                return
            assert topic.job is not None
            s = self.sessions.get(topic.job)
            if s is None:
                s = self.sessions[topic.job] = ServerJobSession(
                    topic.device, topic.job, namespace=self.ns, max_transfer=1 << 30
                )
            self._carry_out(s, s.receive(incoming, now))

    def _publish(self, out: Outgoing) -> None:
        self.published.append((out.job, out.type, len(out.payload)))
        self.transport.publish(
            out.topic, out.payload, qos=out.qos, retain=out.retain,
            priority=Priority(int(out.priority)),
        )  # fmt: skip

    def _carry_out(self, s: ServerJobSession, effects: list[ServerEffect]) -> None:
        for e in effects:
            if isinstance(e, Outgoing):
                self._publish(e)
            elif isinstance(e, RecordBirth):
                b = e.birth
                self.store.record_birth(
                    b.device, b.job, spec=b.spec, model_hash=b.model_hash,
                    codec_version=b.codec_version, session=b.session,
                )  # fmt: skip
            elif isinstance(e, RecordOwnership):
                self.store.raise_epoch(s.job, e.epoch - 1, e.owner, status="server-running")
            elif isinstance(e, RecordCompleted):
                self.store.set_status(s.job, "completed", detail=f"seq {e.seq}")
            elif isinstance(e, Refused):
                self.refused.append(e)
            elif isinstance(e, Commit):
                self._carry_out(s, self._commit(s, e))

    def _commit(self, s: ServerJobSession, c: Commit) -> list[ServerEffect]:
        try:
            new = c.apply(None if c.full else self.states.get(s.job))
            self.store.commit_snapshot(
                s.device, s.job, c.seq, c.base_seq, c.epoch, c.payload, c.state_hash,
                state_nbytes(new), step=c.step,
            )  # fmt: skip
        except EdgeResumeError as exc:
            return s.commit_failed(c.seq, exc)
        self.states[s.job] = new
        self.commits.append((time.monotonic(), s.job, c.seq, c.step, len(c.payload)))
        return s.commit_succeeded(c.seq)

    # -- the server's decisions ----------------------------------------------------------------

    def take_over(self, job: str) -> int:
        """Raise the job's epoch, record owner = server, publish the retained CTL; returns the
        new epoch."""
        with self.lock:
            s = self.sessions[job]
            self._carry_out(s, s.take_over(time.time()))
            return s.epoch

    # -- reading -------------------------------------------------------------------------------

    def server_step(self, job: str) -> int:
        with self.lock:
            s = self.sessions.get(job)
            return 0 if s is None else s.step

    def completed(self, job: str) -> bool:
        with self.lock:
            s = self.sessions.get(job)
            return s is not None and s.completed

    def count(self, job: str, types: tuple[str, ...] | None = None, after: float = 0.0) -> int:
        with self.lock:
            return sum(
                1
                for a in self.arrivals
                if a.job == job and a.at > after and (types is None or a.type in types)
            )

    def by_type(self, job: str) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        with self.lock:
            for a in self.arrivals:
                if a.job == job:
                    out[a.type] += 1
        return dict(out)


def wait_for(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    *,
    interval: float = 0.05,
    check: Callable[[], None] | None = None,
) -> None:
    """Poll ``predicate`` until true; AssertionError naming ``what`` after ``timeout``.
    ``check`` runs on every poll (e.g. fail fast when the agent process died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check is not None:
            check()
        if predicate():
            return
        time.sleep(interval)
    with contextlib.suppress(Exception):
        if predicate():
            return
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
