"""The server's MQTT ingest: runs the protocol's server end for every job and carries out
what it asks, in order (docs/protocol.md section 6.2).

    ingest = Ingest(store, transport, liveness=liveness)         # transport: a Publisher
    ingest.handle(topic, payload)                                 # one received message
    epoch = ingest.take_over("job-7", reason="api")               # JobControl, for the worker
    service = IngestService(ingest, transport, liveness); service.register(); ...; service.start()

:class:`Ingest` holds one :class:`~edge_agent.protocol.server.ServerJobSession` per job,
rebuilt from the store's record on first use (epoch, owner, acknowledged seq and hash,
completion), and carries out the session's effects in order:

* ``RecordBirth`` -> ``store.record_birth`` (a job first seen at a later epoch is raised to it);
* ``Commit`` -> ``commit.apply(base)`` (apply + verify) -> ``store.commit_snapshot`` (durable)
  -> ``session.commit_succeeded`` -> publish the ACK. A payload that does not apply or verify
  gets ``commit_failed`` -> NACK, and the last good state stays. A store that refuses
  (``Fenced``: the epoch was raised elsewhere) or fails gets no reply, and the session is
  rebuilt from the store;
* ``RecordOwnership`` -> ``store.raise_epoch`` (a durable compare-and-set) before the CTL after it;
* ``RecordCompleted`` -> the outputs read from the final state (``server.outputs``: ``tokens``
  after the prompt for ``generate``, ``results`` rows for ``batch``) are stored by position,
  then the job is recorded ``completed``, then the retained CTL ``stop`` is published;
* ``Refused`` -> counted (``edge_resume_refused_messages_total{reason}``) and logged.

A job's messages are handled one at a time (a striped lock per job; :class:`IngestService`
also sends every message of one job to the same thread). Base states for deltas come from a
bounded LRU (:class:`StateCache`), or are replayed from the store on a miss.

Epochs raised elsewhere (a worker in another process with its own
:class:`~server.control.MqttJobControl`) are noticed two ways: the ingest subscribes to
``{prefix}/+/+/ctl`` and drops its cached session when a CTL shows a newer epoch, owner or
completion; and a commit the store fences drops the session too. The next message rebuilds it.

:class:`IngestService` is the threaded adapter over :class:`edge_agent.transport.Transport`:
subscriptions (optionally an MQTT 5 shared-subscription group), a dispatcher, partition
threads, heartbeat-timeout checks and a maintenance thread (compaction, retention).

This module owns carrying out the server session's effects. It holds no protocol logic (the
session decides) and never runs a job.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.errors import (
    CodecError,
    EdgeResumeError,
    Fenced,
    JobError,
    LocalProtocolError,
    MalformedMessage,
    PayloadCorrupt,
    RemoteProtocolError,
    StoreCorrupt,
    StoreError,
    TransportError,
    UnsupportedMessage,
)
from edge_agent.protocol.chunking import DEFAULT_MAX_TRANSFER
from edge_agent.protocol.messages import Birth, Ctl, Nack
from edge_agent.protocol.server import (
    Commit,
    RecordBirth,
    RecordCompleted,
    RecordOwnership,
    Refused,
    ServerEffect,
    ServerJobSession,
    route,
)
from edge_agent.protocol.topics import (
    Outgoing,
    Topic,
    TopicKind,
    TopicNamespace,
    decode_incoming,
)
from edge_agent.state import State, state_nbytes
from server import metrics
from server.control import (
    Publisher,
    PublishTicketLike,
    WorkerHooks,
    ctl_outgoing,
    publish_outgoing,
)
from server.liveness import Liveness, record_job_event
from server.outputs import outputs_from_state
from server.store import JobRecord, Store

__all__ = ["Ingest", "IngestService", "StateCache"]

log = logging.getLogger("server.ingest")

_STRIPES = 64


class _Abort(Exception):
    """Internal: an effect could not be carried out; nothing after it is."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


# ---------------------------------------------------------------------------------------------
# States in memory.


class StateCache:
    """Acknowledged states by job, least recently used evicted first, bounded by total array
    bytes and by count. Thread-safe. States are values: nobody mutates one it got here."""

    def __init__(self, max_bytes: int, max_jobs: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self.max_jobs = max(0, int(max_jobs))
        self._items: OrderedDict[str, tuple[bytes, State, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def get(self, job: str, state_hash: bytes | None) -> State | None:
        """The job's cached state if it is the one with ``state_hash``."""
        with self._lock:
            item = self._items.get(job)
            if item is None or state_hash is None or item[0] != state_hash:
                return None
            self._items.move_to_end(job)
            return item[1]

    def put(self, job: str, state_hash: bytes, state: State) -> None:
        size = _state_memory(state)
        with self._lock:
            self._drop(job)
            if size > self.max_bytes or self.max_jobs == 0:
                return
            self._items[job] = (state_hash, state, size)
            self._bytes += size
            while self._items and (
                self._bytes > self.max_bytes or len(self._items) > self.max_jobs
            ):
                oldest = next(iter(self._items))
                self._drop(oldest)

    def drop(self, job: str) -> None:
        with self._lock:
            self._drop(job)

    def _drop(self, job: str) -> None:
        item = self._items.pop(job, None)
        if item is not None:
            self._bytes -= item[2]


def _state_memory(state: State) -> int:
    return sum(int(v.nbytes) if isinstance(v, np.ndarray) else 64 for v in state.values())


# ---------------------------------------------------------------------------------------------
# The ingest.


@dataclass
class _Outcome:
    """What a batch of effects left to do once the job's lock is released."""

    tickets: list[tuple[Outgoing, PublishTicketLike]]
    handed_over: int | None = None  # the epoch of a completed live hand-over


class Ingest:
    """The server end of the protocol for every job (see the module docstring).

    ``publisher``: anything with ``Transport.publish``'s signature. ``hooks``: the worker's
    :class:`~server.control.WorkerHooks` (set later with :meth:`set_hooks`). ``clock``: seconds
    since the Unix epoch. Implements :class:`~server.control.JobControl`."""

    def __init__(
        self,
        store: Store,
        publisher: Publisher,
        *,
        namespace: TopicNamespace | None = None,
        liveness: Liveness | None = None,
        hooks: WorkerHooks | None = None,
        clock: Callable[[], float] = time.time,
        max_transfer: int = DEFAULT_MAX_TRANSFER,
        state_cache_bytes: int = 512 << 20,
        state_cache_jobs: int = 4096,
        max_sessions: int = 100_000,
        puback_timeout: float = 30.0,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.namespace = namespace or TopicNamespace()
        self.liveness = liveness
        self.clock = clock
        self.max_transfer = max_transfer
        self.max_sessions = max_sessions
        self.puback_timeout = puback_timeout
        self.states = StateCache(state_cache_bytes, state_cache_jobs)
        self._hooks = hooks
        self._sessions: OrderedDict[str, ServerJobSession] = OrderedDict()
        self._sessions_lock = threading.Lock()
        self._locks = [threading.RLock() for _ in range(_STRIPES)]
        self._dirty: set[str] = set()
        self._dirty_lock = threading.Lock()
        self._callbacks = ThreadPoolExecutor(1, thread_name_prefix="ingest-callbacks")

    def set_hooks(self, hooks: WorkerHooks | None) -> None:
        """The worker to tell about completed live hand-overs."""
        self._hooks = hooks

    def close(self) -> None:
        """Wait for pending worker callbacks and stop their thread."""
        self._callbacks.shutdown(wait=True)

    # -- sessions ----------------------------------------------------------------------------

    def _lock(self, job: str) -> threading.RLock:
        return self._locks[zlib.crc32(job.encode()) % _STRIPES]

    def session(self, job: str) -> ServerJobSession | None:
        """The job's cached session, if any (read-only use: tests, the API)."""
        with self._sessions_lock:
            return self._sessions.get(job)

    def _cached(self, job: str) -> ServerJobSession | None:
        with self._sessions_lock:
            s = self._sessions.get(job)
            if s is not None:
                self._sessions.move_to_end(job)
            return s

    def _load(self, job: str, device: str | None) -> ServerJobSession | None:
        """The job's session: cached, else rebuilt from the store, else (with ``device``) a
        new one for a job not seen yet. Call with the job's lock held."""
        s = self._cached(job)
        if s is not None:
            return s
        rec = self.store.get_job(job)
        if rec is not None:
            s = self._from_record(rec)
        elif device is not None:
            s = ServerJobSession(
                device, job, namespace=self.namespace, max_transfer=self.max_transfer
            )
        else:
            return None
        with self._sessions_lock:
            self._sessions[job] = s
            self._evict()
        return s

    def _evict(self) -> None:
        over = len(self._sessions) - self.max_sessions
        if over <= 0:
            return
        for job in list(self._sessions):  # oldest first; keep transfers in progress
            if over <= 0:
                break
            s = self._sessions[job]
            if s.transfer_bytes == 0 and s.pending_commit is None:
                del self._sessions[job]  # a holder of its lock keeps using it; the store is
                # durable, so the next load rebuilds the same session
                over -= 1

    def _from_record(self, rec: JobRecord) -> ServerJobSession:
        birth = Birth(
            rec.device,
            rec.job,
            rec.epoch,
            rec.session or "restored",
            rec.spec,
            rec.model_hash,
            rec.codec_version,
            rec.seq,
            rec.state_hash,
            rec.step,
            rec.total_steps,
        )
        current = (rec.seq, rec.state_hash) if rec.seq is not None and rec.state_hash else None
        return ServerJobSession(
            rec.device,
            rec.job,
            namespace=self.namespace,
            birth=birth,
            epoch=rec.epoch,
            owner=rec.owner,
            current=current,
            step=rec.step,
            completed=rec.status == "completed",
            max_transfer=self.max_transfer,
        )

    def drop_session(self, job: str) -> None:
        """Forget the job's session (and cached state); the next use rebuilds it from the
        store."""
        with self._sessions_lock:
            self._sessions.pop(job, None)
        self.states.drop(job)

    # -- messages ----------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes, now: float | None = None) -> None:
        """One message received on a subscription. Never raises: what is refused is counted
        and logged; what fails is logged and the job's session rebuilt from the store."""
        t = self.clock() if now is None else now
        try:
            self._handle(topic, payload, t)
        except Exception:  # a bug must not stop the ingest; the session is rebuilt
            log.exception("ingest failed on a message on %r", topic[:200])
            metrics.INGEST_ERRORS.labels(what="bug").inc()
            with contextlib.suppress(Exception):
                self.drop_session(self.namespace.parse(topic).job or "")

    def _handle(self, topic: str, payload: bytes, now: float) -> None:
        try:
            parsed: Topic | None = self.namespace.parse(topic)
        except RemoteProtocolError:
            parsed = None
        if parsed is not None and parsed.kind is TopicKind.CTL:
            self._count_in("ctl", payload)
            self._on_ctl(topic, payload)
            return
        try:
            incoming = route(self.namespace, topic, payload)
        except RemoteProtocolError as exc:
            self._count_in("invalid", payload)
            self._refused(None, exc, topic)
            if (
                parsed is not None
                and parsed.kind is TopicKind.STATE
                and parsed.job
                and isinstance(exc, (MalformedMessage, UnsupportedMessage))
            ):  # undecodable: nack invalid; a device/job/type mismatch gets no reply
                self._reply_invalid(parsed, exc, now)
            return
        msg, t = incoming.message, incoming.topic
        self._count_in(msg.TYPE, payload)
        if t.kind is not TopicKind.STATE:
            if self.liveness is not None:
                self.liveness.on_message(msg, now)
            return
        if self.liveness is not None:
            self.liveness.seen(t.device, now)
        assert t.job is not None
        with self._lock(t.job):
            s = self._load(t.job, t.device)
            assert s is not None
            try:
                outcome = self._carry_out(s, s.receive(incoming, now), now)
            except _Abort as exc:
                self._failed(s.job, exc.cause)
                return
        self._after(s.job, outcome)

    def _reply_invalid(self, t: Topic, exc: RemoteProtocolError, now: float) -> None:
        """``nack invalid`` for an undecodable message on a known job's own device topic."""
        assert t.job is not None
        with self._lock(t.job):
            s = self._load(t.job, None)
            if s is None or not s.born or s.device != t.device:
                return  # an unknown job, or another device's: no reply
            try:
                outcome = self._carry_out(s, s.receive_invalid(exc), now)
            except _Abort as abort:
                self._failed(s.job, abort.cause)
                return
        self._after(s.job, outcome)

    def _count_in(self, kind: str, payload: bytes) -> None:
        metrics.MESSAGES_IN.labels(type=kind).inc()
        metrics.BYTES_IN.labels(type=kind).inc(len(payload))

    def _refused(self, message: Any, error: EdgeResumeError, where: str) -> None:
        metrics.REFUSED.labels(reason=type(error).__name__).inc()
        log.info("refused %s on %s: %s", getattr(message, "TYPE", "a message"), where[:200], error)

    def _failed(self, job: str, cause: BaseException) -> None:
        what = "fenced" if isinstance(cause, Fenced) else type(cause).__name__
        log.warning("job %s: %s; rebuilding its session from the store", job, cause)
        metrics.INGEST_ERRORS.labels(what=what).inc()
        self.drop_session(job)

    def _on_ctl(self, topic: str, payload: bytes) -> None:
        """A retained CTL (ours, or another process's): drop a cached session it outdates."""
        try:
            incoming = decode_incoming(self.namespace, topic, payload)
        except RemoteProtocolError as exc:
            self._refused(None, exc, topic)
            return
        msg = incoming.message
        assert isinstance(msg, Ctl)
        with self._lock(msg.job):
            s = self._cached(msg.job)
            if s is None or s.device != msg.device or msg.epoch < s.epoch:
                return
            if (
                msg.epoch > s.epoch
                or msg.owner != s.owner
                or (msg.request == "stop" and not s.completed)
            ):
                log.info(
                    "job %s: a CTL at epoch %d (%s, %s) outdates the session at %d; rebuilding",
                    msg.job, msg.epoch, msg.owner, msg.request, s.epoch,
                )  # fmt: skip
                self.drop_session(msg.job)

    # -- carrying out effects ----------------------------------------------------------------

    def _carry_out(
        self,
        s: ServerJobSession,
        effects: Sequence[ServerEffect],
        now: float,
        *,
        claim: str | None = None,
    ) -> _Outcome:
        """Carry out ``effects`` in order with the job's lock held. Raises _Abort (after
        which nothing more is done) when a record could not be made durable."""
        out = _Outcome([])
        for e in effects:
            if isinstance(e, Outgoing):
                ticket = self._publish(e)
                if ticket is not None:
                    out.tickets.append((e, ticket))
            elif isinstance(e, Commit):
                more = self._carry_out(s, self._commit(s, e), now)
                out.tickets += more.tickets
            elif isinstance(e, RecordBirth):
                self._guard(self._record_birth, s, e)
            elif isinstance(e, RecordOwnership):
                self._guard(self._record_ownership, s, e, claim)
                if e.reason == "release":
                    out.handed_over = e.epoch
            elif isinstance(e, RecordCompleted):
                self._guard(self._record_completed, s, e)
            elif isinstance(e, Refused):
                self._refused(e.message, e.error, f"job {s.job}")
            else:  # pragma: no cover - the session's effect types are closed
                raise LocalProtocolError(f"unknown effect {e!r}")
        return out

    @staticmethod
    def _guard(fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except EdgeResumeError as exc:
            raise _Abort(exc) from exc

    def _publish(self, out: Outgoing) -> PublishTicketLike | None:
        if out.type == "ack":
            metrics.ACKS.inc()
        elif out.type == "nack":
            nack = out.message
            assert isinstance(nack, Nack)
            metrics.NACKS.labels(reason=nack.reason).inc()
        try:
            return publish_outgoing(self.publisher, out)
        except TransportError as exc:  # the agent's retry will ask again
            log.warning("cannot publish %s to %s: %s", out.type, out.topic, exc)
            metrics.INGEST_ERRORS.labels(what="publish").inc()
            return None

    def _record_birth(self, s: ServerJobSession, e: RecordBirth) -> None:
        b = e.birth
        rec = self.store.record_birth(
            b.device,
            b.job,
            spec=dict(b.spec),
            model_hash=b.model_hash,
            codec_version=b.codec_version,
            session=b.session,
        )
        while rec.epoch < e.epoch and rec.owner == "edge":  # first seen at a later epoch
            rec = self.store.raise_epoch(b.job, rec.epoch, "edge")
        if (rec.epoch, rec.owner) != (e.epoch, e.owner):
            raise StoreError(
                f"job {b.job}: the store holds epoch {rec.epoch} ({rec.owner}), the session "
                f"{e.epoch} ({e.owner})"
            )
        if b.total_steps is not None and rec.total_steps != b.total_steps:
            self.store.set_progress(b.job, rec.step, b.total_steps)
        record_job_event(self.store, b.job, "device-online", detail="birth")

    def _record_ownership(self, s: ServerJobSession, e: RecordOwnership, claim: str | None) -> None:
        detail = "released by the device" if e.reason == "release" else f"claimed: {claim}"
        self.store.raise_epoch(s.job, e.epoch - 1, e.owner, status="resuming", detail=detail)
        metrics.TAKEOVERS.labels(reason=e.reason).inc()
        metrics.JOB_TRANSITIONS.labels(status="resuming").inc()

    def _record_completed(self, s: ServerJobSession, e: RecordCompleted) -> None:
        rec = self.store.get_job(s.job)
        if rec is None:
            raise StoreError(f"job {s.job} vanished from the store")
        state = self.states.get(s.job, s.current_hash)
        if state is None:
            state = self.store.load_state(s.job, e.seq).state
        try:
            outs = outputs_from_state(rec.spec, state)
        except JobError as exc:
            log.error("job %s completed, but its outputs cannot be read: %s", s.job, exc)
            metrics.INGEST_ERRORS.labels(what="outputs").inc()
            outs = None
        if outs:
            self.store.put_outputs(s.job, 0, outs, epoch=s.epoch)
        self.store.set_progress(s.job, e.step, rec.total_steps)
        done = record_job_event(
            self.store,
            s.job,
            "completed",
            detail=f"done on the device (seq {e.seq}, step {e.step})",
        )
        if done is not None:
            metrics.COMPLETIONS.labels(where="edge").inc()

    def _commit(self, s: ServerJobSession, c: Commit) -> list[ServerEffect]:
        started = time.perf_counter()
        kind = "full" if c.full else "delta"
        had_state = s.current_seq is not None
        try:
            base = None if c.full else self._base_state(s)
            new = c.apply(base)
            self.store.commit_snapshot(
                s.device,
                s.job,
                c.seq,
                c.base_seq,
                c.epoch,
                c.payload,
                c.state_hash,
                state_nbytes(new),
                step=c.step,
            )
        except CodecError as exc:
            metrics.COMMIT_FAILURES.labels(reason="codec").inc()
            log.info("job %s: snapshot %d refused: %s", s.job, c.seq, exc)
            return s.commit_failed(c.seq, exc)
        except EdgeResumeError as exc:
            fenced = isinstance(exc, Fenced)
            metrics.COMMIT_FAILURES.labels(reason="fenced" if fenced else "store").inc()
            s.commit_failed(c.seq, exc)  # no reply: the agent's QUERY finds it missing
            raise _Abort(exc) from exc
        self.states.put(s.job, c.state_hash, new)
        metrics.COMMITS.labels(kind=kind).inc()
        metrics.COMMIT_BYTES.labels(kind=kind).inc(len(c.payload))
        if c.full and had_state:
            metrics.RESYNCS.inc()
        metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
        with self._dirty_lock:
            self._dirty.add(s.job)
        return s.commit_succeeded(c.seq)

    def _base_state(self, s: ServerJobSession) -> State:
        state = self.states.get(s.job, s.current_hash)
        if state is not None:
            metrics.STATE_CACHE.labels(result="hit").inc()
            return state
        metrics.STATE_CACHE.labels(result="miss").inc()
        try:
            loaded = self.store.load_state(s.job)
        except StoreCorrupt as exc:  # a full snapshot heals it: ask for one
            log.error("job %s: the stored chain is damaged (%s); asking for a full one", s.job, exc)
            raise PayloadCorrupt(f"the server cannot read its base state: {exc}") from exc
        if (loaded.seq, loaded.state_hash) != (s.current_seq, s.current_hash):
            raise StoreError(
                f"job {s.job}: the store's acknowledged state is seq {loaded.seq}, the "
                f"session's {s.current_seq}"
            )
        self.states.put(s.job, loaded.state_hash, loaded.state)
        return loaded.state

    def _after(self, job: str, outcome: _Outcome) -> None:
        """Once the lock is released: tell the worker about a completed hand-over, after the
        broker acknowledged the CTL announcing it."""
        if outcome.handed_over is None:
            return
        hooks, epoch = self._hooks, outcome.handed_over
        ctl_tickets = [t for o, t in outcome.tickets if o.type == "ctl"]

        def notify() -> None:
            for ticket in ctl_tickets:
                try:
                    ticket.result(self.puback_timeout)
                except TransportError as exc:
                    log.warning("job %s: the take-over CTL is not acknowledged yet: %s", job, exc)
            if hooks is None:
                log.info("job %s was handed over at epoch %d; no worker here", job, epoch)
                return
            try:
                hooks.on_handed_over(job, epoch)
            except Exception:
                log.exception("the worker's on_handed_over(%s, %d) failed", job, epoch)

        try:
            self._callbacks.submit(notify)
        except RuntimeError:  # shut down
            log.warning("job %s handed over at epoch %d while shutting down", job, epoch)

    # -- JobControl ----------------------------------------------------------------------------

    def _known(self, job_id: str) -> ServerJobSession:
        s = self._load(job_id, None)
        if s is None or not s.born:
            raise StoreError(f"unknown job {job_id!r}")
        rec = self.store.get_job(job_id)
        if rec is None:
            raise StoreError(f"unknown job {job_id!r}")
        if (rec.epoch, rec.owner, rec.status == "completed") != (s.epoch, s.owner, s.completed):
            self.drop_session(job_id)  # moved elsewhere: start from the store's record
            s = self._load(job_id, None)
            assert s is not None
        return s

    def take_over(self, job_id: str, *, reason: str) -> int:
        now = self.clock()
        with self._lock(job_id):
            s = self._known(job_id)
            if s.completed:
                raise LocalProtocolError(f"job {job_id} is completed; nothing to take over")
            if s.owner == "edge":
                try:
                    outcome = self._carry_out(s, s.take_over(now), now, claim=reason)
                except _Abort as exc:
                    self._failed(job_id, exc.cause)
                    raise exc.cause from None
                epoch = s.epoch
            else:  # a new attempt on a job the server owns: a new epoch fences the old one
                try:
                    rec = self.store.raise_epoch(
                        job_id, s.epoch, "server", status="resuming", detail=f"claimed: {reason}"
                    )
                except EdgeResumeError as exc:
                    self._failed(job_id, exc)
                    raise
                metrics.TAKEOVERS.labels(reason="reclaim").inc()
                self.drop_session(job_id)
                s = self._from_record(rec)
                with self._sessions_lock:
                    self._sessions[job_id] = s
                epoch = rec.epoch
                ctl = s.retained_ctl(now)
                assert ctl is not None
                ticket = self._publish(ctl)
                outcome = _Outcome([(ctl, ticket)] if ticket is not None else [])
        if not outcome.tickets:
            raise TransportError(f"job {job_id}: the take-over CTL could not be published")
        for _, ticket in outcome.tickets:
            ticket.result(self.puback_timeout)
        return epoch

    def request_handover(self, job_id: str) -> None:
        now = self.clock()
        with self._lock(job_id):
            s = self._known(job_id)
            if s.completed or s.owner != "edge":
                raise LocalProtocolError(
                    f"job {job_id} is {'completed' if s.completed else 'owned by the server'}: "
                    "no hand-over"
                )
            outcome = self._carry_out(s, s.request_handover(now), now)
        for _, ticket in outcome.tickets:
            ticket.result(self.puback_timeout)

    def finish(self, job_id: str, epoch: int) -> None:
        now = self.clock()
        with self._lock(job_id):
            rec = self.store.get_job(job_id)
            if rec is None:
                raise StoreError(f"unknown job {job_id!r}")
            if rec.epoch != epoch or rec.owner != "server":
                raise Fenced(
                    f"job {job_id} is at epoch {rec.epoch} owned by the {rec.owner}, not {epoch}",
                    hint="a newer claim exists; do not record this attempt's completion",
                )
            if rec.status != "completed":
                self.store.set_status(job_id, "completed", detail="finished on the server")
                metrics.COMPLETIONS.labels(where="server").inc()
                metrics.JOB_TRANSITIONS.labels(status="completed").inc()
            self.drop_session(job_id)
            self._publish(
                ctl_outgoing(self.namespace, rec.device, job_id, epoch, "server", "stop", now)
            )

    # -- start-up and maintenance ----------------------------------------------------------

    def republish_retained(self, now: float | None = None) -> int:
        """Publish the retained CTL of every job that has one (server-owned: ``run``;
        completed: ``stop``), healing a broker that lost its retained messages. Returns how
        many were published."""
        t = self.clock() if now is None else now
        n = 0
        for rec in self.store.list_jobs():
            if rec.status == "completed":
                out = ctl_outgoing(
                    self.namespace, rec.device, rec.job, rec.epoch, rec.owner, "stop", t
                )
            elif rec.owner == "server":
                out = ctl_outgoing(
                    self.namespace, rec.device, rec.job, rec.epoch, "server", "run", t
                )
            else:
                continue
            if self._publish(out) is not None:
                n += 1
        return n

    def take_dirty(self) -> list[str]:
        """Jobs committed to since the last call (for compaction)."""
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, set()
        return sorted(dirty)

    def maintain(self, *, retain: bool = False) -> None:
        """Compact the jobs committed to since the last call; with ``retain``, also apply
        retention and collect orphans. Errors are logged, never raised."""
        for job in self.take_dirty():
            try:
                log.debug("job %s: compaction check", job)
                result = self.store.compact(job)
                log.debug(
                    "job %s: compaction check done: %s (%s)",
                    job, "compacted" if result.compacted else "not compacted", result.reason,
                )  # fmt: skip
            except EdgeResumeError as exc:
                log.warning("compaction of job %s failed: %s", job, exc)
                metrics.INGEST_ERRORS.labels(what="compaction").inc()
        if retain:
            try:
                self.store.retain()
            except EdgeResumeError as exc:
                log.warning("retention failed: %s", exc)
                metrics.INGEST_ERRORS.labels(what="retention").inc()


# ---------------------------------------------------------------------------------------------
# The threaded adapter over the transport.


class IngestService:
    """Runs an :class:`Ingest` over a :class:`~edge_agent.transport.Transport`.

    Threads: a dispatcher reading the transport (STATUS and heartbeats are handled there),
    ``partitions`` threads applying snapshots (all of a job's messages go to the same one,
    so they stay in order), and a maintenance thread (compaction, retention). The dispatcher
    also applies heartbeat timeouts every ``check_interval`` seconds.

    Call :meth:`register` before the transport is started (so that every ``Connected``
    comes after the SUBACK), then :meth:`start`; :meth:`close` stops the threads (the
    transport belongs to the caller)."""

    def __init__(
        self,
        ingest: Ingest,
        transport: Any,
        *,
        share_group: str | None = None,
        partitions: int = 2,
        check_interval: float = 1.0,
        compact_interval: float = 5.0,
        retain_interval: float = 600.0,
    ) -> None:
        self.ingest = ingest
        self.transport = transport
        self.share_group = share_group
        self.partitions = max(1, int(partitions))
        self.check_interval = check_interval
        self.compact_interval = compact_interval
        self.retain_interval = retain_interval
        self.connected = threading.Event()
        self.fatal: BaseException | None = None
        self._stop = threading.Event()
        self._queues: list[queue.Queue[tuple[str, bytes] | None]] = [
            queue.Queue() for _ in range(self.partitions)
        ]
        self._threads: list[threading.Thread] = []
        self._republished = False

    def subscriptions(self) -> list[tuple[str, int]]:
        ns = self.ingest.namespace
        subs = [(s.filter, s.qos) for s in ns.server_subscriptions(self.share_group)]
        # CTLs are read by every ingest process (never shared): epochs raised elsewhere
        subs.append((f"{ns.prefix}/+/+/{TopicKind.CTL.value}", 1))
        return subs

    def register(self) -> None:
        """Register the subscriptions with the transport (before it starts)."""
        self.transport.subscribe_nowait(self.subscriptions())

    def start(self) -> None:
        if self.ingest.liveness is not None:
            self.ingest.liveness.restore()
        for i, q in enumerate(self._queues):
            t = threading.Thread(target=self._partition, args=(q,), name=f"ingest-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        for target, name in ((self._dispatch, "ingest-dispatch"), (self._maintain, "ingest-maint")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        for q in self._queues:
            q.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))
        self.ingest.close()

    def backlog(self) -> int:
        """Messages waiting in the partitions' queues."""
        return sum(q.qsize() for q in self._queues)

    def _route(self, topic: str) -> int | None:
        """The partition of a job's message; None for device-wide or unparsable topics."""
        try:
            t = self.ingest.namespace.parse(topic)
        except RemoteProtocolError:
            return None
        if t.job is None:
            return None
        return zlib.crc32(t.job.encode()) % self.partitions

    def _dispatch(self) -> None:
        from edge_agent.transport import Connected, Disconnected, Message

        next_check = time.monotonic() + self.check_interval
        while not self._stop.is_set():
            ev = self.transport.get(timeout=min(0.25, self.check_interval))
            if isinstance(ev, Message):
                p = self._route(ev.topic)
                if p is None:
                    self.ingest.handle(ev.topic, ev.payload)
                else:
                    self._queues[p].put((ev.topic, ev.payload))
            elif isinstance(ev, Connected):
                self.connected.set()
                if not self._republished:
                    self._republished = True
                    try:
                        n = self.ingest.republish_retained()
                        log.info("connected; republished %d retained control messages", n)
                    except EdgeResumeError as exc:
                        log.error("cannot republish retained control messages: %s", exc)
            elif isinstance(ev, Disconnected):
                self.connected.clear()
                if ev.fatal:
                    self.fatal = ev.error
                    log.error("the ingest's MQTT link failed for good: %s", ev.error)
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + self.check_interval
                if self.ingest.liveness is not None:
                    try:
                        self.ingest.liveness.check()
                    except Exception:
                        log.exception("liveness check failed")

    def _partition(self, q: queue.Queue[tuple[str, bytes] | None]) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            self.ingest.handle(*item)

    def _maintain(self) -> None:
        next_retain = time.monotonic() + self.retain_interval
        while not self._stop.wait(self.compact_interval):
            retain = time.monotonic() >= next_retain
            if retain:
                next_retain = time.monotonic() + self.retain_interval
            self.ingest.maintain(retain=retain)
