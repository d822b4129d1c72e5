"""The agent's main loop: one device running one or more jobs, steps taken round-robin.

    agent = Agent([JobSpec.load("gen.toml")], AgentOptions(device="gw-17",
                  broker="mqtt://broker:1883", journal_dir=Path("/var/lib/edge-resume/journal")))
    code = agent.run()        # until every job is finished, or agent.stop() (SIGTERM)

Per job a :class:`JobRunner` glues together the job (:mod:`edge_agent.jobs`), its journal
(:mod:`edge_agent.journal`), its protocol session (:class:`~edge_agent.protocol.AgentJobSession`)
and its policies (:mod:`edge_agent.policy`). The :class:`Agent` owns the one MQTT link
(:mod:`edge_agent.transport`) and the loop: take a step of each runnable job, let each job's
policy snapshot it, hand what arrives to the sessions, heartbeat, and sleep only when no job
can step.

The rules it keeps (docs/protocol.md section 6, docs/agent.md):

* A session's items are carried out **in order**, the journal before the network: an
  ``Offered`` snapshot is journaled (its seq, its payload, the local copy) before its chunks
  are published; an ``Acked`` state is journaled as the delta base before anything encoded
  on it; ``TakenOver``/``Stopped``/``Completed`` are journaled before the job is dropped.
  A journal write that fails stops the agent (exit 1): it restarts from its journal.
* On start each job resumes from its newest local snapshot, so a crash costs at most one
  snapshot interval of recomputation, and its session is rebuilt from the journal (epoch,
  next seq, acknowledged state, the transfer in flight, which is queried again).
* The job keeps computing while offline; the journal carries its state. A job the server
  owns (or cancelled) is stopped for good and nothing more is sent for it.
* A local snapshot always holds the job's full state, derivable entries included, so a
  restart recomputes nothing beyond the interval; what travels leaves them out unless the
  KV policy says the link can afford them.

This module never decides protocol questions (the session does), never writes a file
format of its own (the journal does; outputs are written with numpy), and keeps the policy
arithmetic in :mod:`edge_agent.policy`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge_agent.codec import FORMAT_VERSION as CODEC_VERSION
from edge_agent.codec import apply_delta, encode_delta
from edge_agent.errors import (
    EdgeResumeError,
    JobError,
    JournalError,
    RemoteProtocolError,
    TransportError,
)
from edge_agent.jobs import Job, JobSpec, create_job
from edge_agent.journal import Journal
from edge_agent.policy import KvPolicy, LinkCapacity, OverheadBudget, SnapshotPolicy, StepRate
from edge_agent.protocol import (
    DEFAULT_MAX_MESSAGE,
    DEFAULT_PREFIX,
    Ack,
    Acked,
    AckedState,
    AgentConfig,
    AgentDevice,
    AgentItem,
    AgentJobSession,
    Completed,
    HandoverRequested,
    Ignored,
    Incoming,
    JobIdentity,
    NeedsFull,
    Offered,
    Outgoing,
    PendingSnapshot,
    Rejected,
    Snap,
    Stopped,
    Synced,
    TakenOver,
    TopicNamespace,
    TransferAbandoned,
    encode,
)
from edge_agent.ratelimit import Priority, kbps_to_bytes_per_s
from edge_agent.transport import (
    Connected,
    Disconnected,
    Message,
    PublishTicket,
    TLSOptions,
    Transport,
    TransportConfig,
    Will,
    publish_packet_size,
)

__all__ = ["Agent", "AgentOptions", "JobProgress", "JobRunner", "LinkLike", "restore_state"]

log = logging.getLogger("edge_agent.runner")


def _event(level: int, event: str, message: str, **fields: Any) -> None:
    """A log record with a machine-readable ``event`` name and fields (the JSON log format
    prints them; the text format prints the message)."""
    log.log(level, message, extra={"event": event, "fields": fields})


# ---------------------------------------------------------------------------------------------
# Options.


@dataclass(frozen=True)
class AgentOptions:
    """Everything the agent needs besides its job files (the CLI builds it; see docs/agent.md
    for each option's command-line flag, environment variable and config key)."""

    device: str
    broker: str
    journal_dir: Path
    username: str | None = None
    password: str | None = None
    tls: TLSOptions | None = None
    prefix: str = DEFAULT_PREFIX
    max_kbps: float | None = None
    max_message: int = DEFAULT_MAX_MESSAGE
    heartbeat_interval: float = 10.0
    codec_level: str | None = None
    protocol: str = "auto"
    keepalive: int = 30
    reconnect_max: float = 60.0
    reply_timeout: float = 10.0
    #: seconds to wait, after SIGTERM, for the final snapshot's ack before exiting
    shutdown_grace: float = 10.0
    #: seconds to wait, once every job is done, for the server to confirm completion
    completion_timeout: float = 300.0
    #: where to write ``<job id>.npz`` with a job's outputs when it finishes (None: nowhere)
    outputs_dir: Path | None = None
    #: the share of the link the KV policy lets snapshots use
    kv_utilization: float = 0.5
    session: str = field(default_factory=lambda: uuid.uuid4().hex[:16])

    def codec_options(self) -> dict[str, Any]:
        return {} if self.codec_level is None else {"level": self.codec_level}

    def agent_config(self) -> AgentConfig:
        return AgentConfig(
            max_message=self.max_message,
            timeout_floor=self.reply_timeout,
            timeout_max=max(self.reply_timeout, 300.0),
            codec_options=self.codec_options(),
        )


class LinkLike(Protocol):
    """What the agent needs of its MQTT link (:class:`edge_agent.transport.Transport`)."""

    def start(self) -> Any: ...
    def subscribe_nowait(self, filters: Sequence[tuple[str, int]], qos: int = 1) -> Any: ...
    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
        priority: Priority = Priority.CONTROL,
    ) -> PublishTicket: ...  # fmt: skip
    def get(self, timeout: float | None = None) -> Message | Connected | Disconnected | None: ...
    def link_rate(self) -> float | None: ...
    def close(
        self, timeout: float = 5.0, *, drain: bool = True, send_will: bool = False
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class JobProgress:
    """One job's progress, for the progress line and the logs."""

    job: str
    step: int
    total: int
    phase: str  # running, finishing, handing-over, done, fenced, released, stopped
    next_seq: int | None
    acked_seq: int | None
    acked_step: int | None
    in_flight: int | None
    kv: bool | None  # whether derivable entries travel (None: the job has none)


def _derivable_nbytes(state: Mapping[str, Any], keys: Iterable[str]) -> int:
    total = 0
    for k in keys:
        v = state.get(k)
        if isinstance(v, np.ndarray):
            total += int(v.nbytes)
    return total


def _spec_digest(spec: JobSpec) -> str:
    """sha256 of the job's identity (its spec as the BIRTH carries it, hashes pinned)."""
    text = json.dumps(spec.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _write_outputs(folder: Path, job: str, outputs: Mapping[str, np.ndarray]) -> Path:
    """``folder/<job>.npz``, atomically (temp file, fsync, rename, fsync the folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{job}.npz"
    fd, tmp = tempfile.mkstemp(prefix=f".{job}.", suffix=".npz.tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **dict(outputs))  # type: ignore[arg-type]
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final


# ---------------------------------------------------------------------------------------------
# One job.


class JobRunner:
    """One job: the job itself, its journal, its protocol session and its policies.

    Build with :meth:`open`; the agent calls :meth:`try_step`, :meth:`maintain`,
    :meth:`on_connected`, :meth:`on_disconnected`, :meth:`receive` and, on SIGTERM,
    :meth:`final_snapshot`. Items the session returns are carried out in order by
    :meth:`carry_out`."""

    def __init__(
        self,
        spec: JobSpec,
        journal: Journal,
        job: Job | None,
        session: AgentJobSession | None,
        *,
        options: AgentOptions,
        link: LinkCapacity,
        publish: Callable[[Outgoing], PublishTicket | None],
        cancel: Callable[[PublishTicket], None],
        drain_rate: Callable[[], float | None],
        now: float,
    ) -> None:
        self.spec = spec
        self.id = spec.id
        self.journal = journal
        self.job = job
        self.session = session
        self.options = options
        self._codec = options.codec_options()
        self._link = link
        self._publish = publish
        self._cancel = cancel
        self._drain_rate = drain_rate
        meta = journal.meta
        self.phase = "running" if meta.status == "running" and job is not None else meta.status
        acked = journal.acked
        self.acked_step: int | None = None if acked is None else acked.step
        step = job.step if job is not None else 0
        budget = None
        if spec.overhead_budget > 0:
            budget = OverheadBudget(spec.overhead_budget, spec.max_lag_seconds)
        self.snapshots = SnapshotPolicy.for_job(
            spec.every_steps, spec.every_seconds, step=step, acked_step=self.acked_step, now=now,
            overhead=budget,
        )  # fmt: skip
        self.kv = KvPolicy(spec.kv, utilization=options.kv_utilization)
        self.step_rate = StepRate()
        self.step_rate.observe(step, now)
        self.handover_requested = False
        self._next_step_at = now
        self._tickets: dict[tuple[int, int], PublishTicket] = {}  # (seq, chunk): a chunk
        self._control: list[PublishTicket] = []  # BIRTH, QUERY, DONE, RELEASE not yet sent
        self._offered_at: dict[int, tuple[float, int]] = {}  # seq -> (when, payload bytes)
        self._local_state_for_offer: Mapping[str, Any] | None = None
        self._offer_kv = False  # whether the snapshot being offered carries derivable entries
        self._last_full_size = 0
        self._transfer_seconds: float | None = None
        self.finished_at: float | None = None
        #: whether the link speaks MQTT 5 (topic aliases): set by the agent on connecting
        self.mqtt5 = True
        # what each send costs besides its payload (overhead budget): seq -> bytes so far
        self._send_cost: dict[int, int] = {}
        self._send_steps: dict[int, int] = {}  # seq -> steps since its base (full: since 0)
        self._send_full: dict[int, bool] = {}
        self._reply_cost = 0  # the last ACK's bytes on the link, framing included
        self._holding = False

    # -- building it from the journal ----------------------------------------------------------

    @classmethod
    def open(
        cls,
        spec: JobSpec,
        agent: AgentDevice,
        *,
        options: AgentOptions,
        link: LinkCapacity,
        publish: Callable[[Outgoing], PublishTicket | None],
        cancel: Callable[[PublishTicket], None],
        drain_rate: Callable[[], float | None],
        now: float,
    ) -> JobRunner:
        """Open (or create) the job's journal; unless the journal says the job is over,
        build the job, restore it from the newest local snapshot and rebuild its session
        (epoch, next seq, acknowledged state, the transfer in flight)."""
        journal = Journal.open_or_create(
            options.journal_dir, spec.id, device=options.device, info={"kind": spec.kind}
        )
        try:
            meta = journal.meta
            if meta.status != "running":
                _event(
                    logging.WARNING, "job-over", f"job {spec.id} is {meta.status} in the journal; "
                    "not running it", job=spec.id, status=meta.status, owner=meta.owner,
                    epoch=meta.epoch,
                )  # fmt: skip
                return cls(
                    spec, journal, None, None, options=options, link=link, publish=publish,
                    cancel=cancel, drain_rate=drain_rate, now=now,
                )  # fmt: skip
            job = create_job(spec)
            digest = _spec_digest(job.spec)
            info = dict(meta.info)
            if info.get("spec_sha256", digest) != digest:
                raise JournalError(
                    f"job {spec.id}: the job file or its model changed since the job started "
                    f"(journal {journal.path})",
                    hint="a job id names one job: give a changed job a new id, or move its "
                    "journal aside to start over",
                )
            if (info.get("total_steps"), info.get("spec_sha256")) != (job.total_steps, digest):
                info.update(kind=spec.kind, total_steps=job.total_steps, spec_sha256=digest)
                journal.update(info=info)
            restored_from = None
            payload = journal.read_local()
            if payload is None and journal.acked is not None:
                payload = journal.read_acked()  # (derivable entries, if absent, are rebuilt)
            if payload is not None:
                job.restore(apply_delta(None, payload))
                restored_from = journal.meta.local_seq or journal.meta.acked_seq
            acked = None
            if journal.acked is not None:
                raw = journal.read_acked()
                assert raw is not None
                ref = journal.acked
                acked = AckedState(ref.seq, ref.state_hash, apply_delta(None, raw))
            pending = cls._pending_from(journal, acked)
            session = AgentJobSession(
                agent,
                spec.id,
                JobIdentity(
                    job.spec.to_dict(), f"sha256:{job.model_hash}", CODEC_VERSION, job.total_steps
                ),
                epoch=meta.epoch,
                next_seq=journal.next_seq,
                acked=acked,
                pending=pending,
                derivable=job.derivable,
                config=options.agent_config(),
                step=job.step,
            )
            session.set_link_rate(link.rate())
            _event(
                logging.INFO, "job-open",
                f"job {spec.id}: {'resumed at step ' + str(job.step) if restored_from else 'new'}"
                f" of {job.total_steps}",
                job=spec.id, kind=spec.kind, step=job.step, total=job.total_steps,
                restored_seq=restored_from, acked_seq=None if acked is None else acked.seq,
                pending_seq=None if pending is None else pending.seq, epoch=meta.epoch,
            )  # fmt: skip
            return cls(
                spec, journal, job, session, options=options, link=link, publish=publish,
                cancel=cancel, drain_rate=drain_rate, now=now,
            )  # fmt: skip
        except BaseException:
            journal.close()
            raise

    @staticmethod
    def _pending_from(journal: Journal, acked: AckedState | None) -> PendingSnapshot | None:
        """The journaled transfer as the session's pending snapshot, or None (and the
        transfer dropped) when it cannot be resumed: its payload or step was not kept, or
        its base is not the acknowledged state."""
        t = journal.transfer
        if t is None:
            return None
        step: int | None = None
        info = journal.meta.info.get("transfer")
        if isinstance(info, list) and len(info) == 2 and info[0] == t.seq:
            step = int(info[1])
        payload = journal.read_transfer_payload()
        full = t.base_seq is None and t.state_hash is not None
        if payload is None and full and journal.holds(t.seq, t.state_hash or b""):
            payload = journal.read_snapshot(t.seq)  # a full transfer is its own local snapshot
        base_ok = t.base_seq is None or (acked is not None and acked.seq == t.base_seq)
        if step is None or payload is None or t.state_hash is None or not base_ok:
            journal.end_transfer()
            return None
        return PendingSnapshot(t.seq, t.base_seq, t.state_hash, step, payload)

    # -- what the agent reads ------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Still in the agent's hands (running, finishing or handing over)."""
        return self.phase in ("running", "finishing", "handing-over")

    @property
    def runnable(self) -> bool:
        """Whether a step may be taken now (pacing aside)."""
        return (
            self.phase == "running"
            and self.job is not None
            and not self.job.done
            and not self.handover_requested
        )

    def progress(self) -> JobProgress:
        j, s = self.job, self.session
        meta = self.journal.meta
        step = j.step if j is not None else (meta.local.step if meta.local else 0)
        total = j.total_steps if j is not None else int(meta.info.get("total_steps", step) or 0)
        kv = None if j is None or not j.derivable else self.kv.last.include
        return JobProgress(
            self.id, step, total, self.phase,
            None if s is None else s.next_seq,
            None if s is None or s.closed else s.acked_seq,
            self.acked_step,
            None if s is None else s.in_flight_seq,
            kv,
        )  # fmt: skip

    def heartbeat_entry(self) -> tuple[int, int | None] | None:
        if not self.running or self.job is None or self.session is None:
            return None
        return self.job.step, self.session.acked_seq

    def wake_at(self) -> float | None:
        """When this job next needs the loop (None: only when something arrives). A
        snapshot needs a step of progress, and the loop checks the policy after every step
        and every message, so only the session's timers and the pace are waited for."""
        if not self.running or self.session is None:
            return None
        times = [] if self.session.next_deadline is None else [self.session.next_deadline]
        if self.runnable:
            times.append(self._next_step_at)
        return min(times) if times else None

    # -- steps and snapshots -------------------------------------------------------------------

    def try_step(self, now: float) -> bool:
        """Take one step if the job may step now (pacing: ``[runtime] min_step_seconds``)."""
        if not self.runnable or now < self._next_step_at:
            return False
        assert self.job is not None
        self.job.run_step()
        self._next_step_at = now + self.spec.min_step_seconds
        return True

    def maintain(self, now: float) -> None:
        """Everything but stepping: a hand-over or the end of the job, due snapshots,
        the session's timers."""
        if not self.running or self.job is None or self.session is None:
            return
        job, s = self.job, self.session
        self.step_rate.observe(job.step, now)
        if self.handover_requested and self.phase == "running":
            self._hand_over(now)
        elif self.phase == "running" and job.done:
            self._finish(now)
        if not self.running:
            return
        self.carry_out(s.tick(now), now)
        if self.phase != "running" or s.closed:
            return
        if s.can_offer and self.snapshots.send_due(job.step, now):
            self._holding = False
            self.offer(now)
        else:
            if self.snapshots.held and not self._holding:
                self._holding = True
                b = self.snapshots.overhead
                assert b is not None
                need = b.min_steps()
                _event(logging.INFO, "send-held", f"job {self.id}: holding the next send back "
                       f"until it covers {need or 0:.0f} steps (a send costs {b.cost or 0:.0f} "
                       f"bytes besides its payload; budget {b.budget:.0%}, at most "
                       f"{b.max_lag_seconds:g} s)", job=self.id, min_steps=round(need or 0),
                       cost=round(b.cost or 0), budget=b.budget)  # fmt: skip
            if self.snapshots.local_due(job.step, now):
                self.local_snapshot(now)

    def _state(self) -> dict[str, Any]:
        assert self.job is not None
        return self.job.state()

    def local_snapshot(self, now: float, state: Mapping[str, Any] | None = None) -> None:
        """Write the job's full state to the journal at a seq of its own (never sent)."""
        assert self.job is not None and self.session is not None
        if state is None:
            state = self._state()
        payload = encode_delta(None, state, **self._codec)
        seq = self.session.reserve_seq()
        self.journal.write_snapshot(seq, self.job.step, payload)
        self._last_full_size = len(payload)
        self.journal.add_counters(local_snapshots=1)
        self.snapshots.took_local(self.job.step, now)
        _event(logging.DEBUG, "local-snapshot", f"job {self.id}: local snapshot {seq}",
               job=self.id, seq=seq, step=self.job.step, bytes=len(payload))  # fmt: skip

    def offer(self, now: float) -> None:
        """Offer the job's current state to the server (the session is ready and nothing is
        in flight), journaling it first; derivable entries travel if the KV policy says so."""
        job, s = self.job, self.session
        assert job is not None and s is not None
        state = self._state()
        include = False
        derivable_now = 0
        if job.derivable:
            include_before = self.kv.last.include
            derivable_now = _derivable_nbytes(state, job.derivable)
            seconds, steps = self.snapshots.expected_interval(
                self.step_rate.rate(), self._transfer_seconds
            )
            decision = self.kv.decide(
                step=job.step, derivable_bytes=derivable_now, link_rate=self._link.rate(),
                interval_s=seconds, steps_per_interval=steps,
            )  # fmt: skip
            if decision.include != include_before:
                _event(logging.INFO, "kv-switch", f"job {self.id}: derivable entries "
                       f"{'on' if decision.include else 'off'}: {decision.reason}", job=self.id,
                       include=decision.include, estimate=round(decision.estimate),
                       budget=round(decision.budget))  # fmt: skip
            include = decision.include
        stripped = bool(job.derivable) and not include and any(k in state for k in job.derivable)
        base = s.acked
        base_derivable = 0 if base is None else _derivable_nbytes(base.state, job.derivable)
        if stripped:
            self.local_snapshot(now, state)  # the full state, derivable entries included
            self._local_state_for_offer = None
        else:
            self._local_state_for_offer = state  # written at the offer's own seq
        self._offer_kv = include and bool(job.derivable)
        try:
            items = s.offer(state, job.step, now, include_derivable=include)
            offered = next((i for i in items if isinstance(i, Offered)), None)
            self.carry_out(items, now)
        finally:
            self._local_state_for_offer = None
        self.snapshots.sent(job.step, now)
        if offered is not None and job.derivable:
            carried = 0
            if include:
                carried = derivable_now - base_derivable if base_derivable else derivable_now
            self.kv.observe(
                step=job.step, base_step=None if offered.base_seq is None else self.acked_step,
                payload_bytes=offered.size, included=include, derivable_raw=carried,
            )  # fmt: skip

    def _finish(self, now: float) -> None:
        """The job is done: its final local snapshot and outputs, then the session's
        ``finish`` (final snapshot, DONE, confirmation)."""
        assert self.job is not None and self.session is not None
        self.phase = "finishing"
        self.finished_at = now
        state = self._state()
        local = self.journal.local
        if local is None or local.step != self.job.step:
            self.local_snapshot(now, state)
        if self.options.outputs_dir is not None:
            try:
                path = _write_outputs(self.options.outputs_dir, self.id, self.job.outputs())
            except OSError as exc:  # the outputs are in the journal and on the server too
                _event(logging.ERROR, "outputs-failed", f"job {self.id}: cannot write its "
                       f"outputs: {exc}", job=self.id)  # fmt: skip
            else:
                _event(logging.INFO, "outputs", f"job {self.id}: outputs written to {path}",
                       job=self.id, path=str(path))  # fmt: skip
        _event(logging.INFO, "job-done", f"job {self.id}: done at step {self.job.step}; "
               "sending the final state", job=self.id, step=self.job.step)  # fmt: skip
        self.carry_out(self.session.finish(state, self.job.step, now), now)

    def _hand_over(self, now: float) -> None:
        """A live hand-over: the current step is finished; snapshot and hand the full state
        (derivable entries included) to the server."""
        assert self.job is not None and self.session is not None
        self.phase = "handing-over"
        state = self._state()
        local = self.journal.local
        if local is None or local.step != self.job.step:
            self.local_snapshot(now, state)
        _event(logging.INFO, "handover", f"job {self.id}: handing over at step {self.job.step}",
               job=self.id, step=self.job.step)  # fmt: skip
        self.carry_out(self.session.hand_over(state, self.job.step, now), now)

    def final_snapshot(self, now: float, *, offer: bool) -> None:
        """On SIGTERM: a local snapshot of the current step (unless the journal has it) and,
        when the session can take one, an offer of it."""
        if self.phase != "running" or self.job is None or self.session is None:
            return
        step = self.job.step
        if offer and self.session.can_offer and (self.acked_step is None or step > self.acked_step):
            self.offer(now)
            return
        local = self.journal.local
        if local is None or local.step != step:
            self.local_snapshot(now)

    # -- the link ------------------------------------------------------------------------------

    def on_connected(self, now: float) -> None:
        if self.session is not None and self.running and self.job is not None:
            self.carry_out(self.session.connected(now, step=self.job.step), now)

    def on_disconnected(self, now: float) -> None:
        """Take back what is still queued for this job: after the reconnect the session
        sends a new BIRTH, asks the server what it is missing and sends only that (a stale
        QUERY or DONE from before the drop would only cross what the server says then)."""
        self._cancel_queued()
        if self.session is not None:
            self.carry_out(self.session.disconnected(now), now)

    def receive(self, incoming: Incoming, now: float) -> None:
        if self.session is not None:
            if isinstance(incoming.message, Ack):  # what it cost, for the overhead budget
                topic = self.session.namespace.ack(self.session.device, self.id)
                self._reply_cost = _wire_cost(topic, len(encode(incoming.message)), qos=0,
                                              v5=self.mqtt5, alias=False)  # fmt: skip
            self.carry_out(self.session.receive(incoming, now), now)

    # -- carrying out the session's items, in order ----------------------------------------------

    def carry_out(self, items: list[AgentItem], now: float) -> None:
        for n, item in enumerate(items):
            if isinstance(item, Outgoing):
                self._send(item)
            elif isinstance(item, Offered):
                count = sum(
                    1 for o in items[n + 1 :] if isinstance(o, Outgoing) and o.seq == item.seq
                )
                self._offered(item, count, now)
            elif isinstance(item, Acked):
                self._acked(item, now)
            elif isinstance(item, NeedsFull):
                self.journal.clear_acked()
                self.acked_step = None
                self.snapshots.force_send()
                _event(logging.INFO, "needs-full", f"job {self.id}: next snapshot is full "
                       f"({item.reason})", job=self.id, reason=item.reason)  # fmt: skip
            elif isinstance(item, TransferAbandoned):
                self._drop_transfer(item.seq)
                _event(logging.INFO, "abandoned", f"job {self.id}: snapshot {item.seq} "
                       f"abandoned ({item.reason})", job=self.id, seq=item.seq)  # fmt: skip
            elif isinstance(item, HandoverRequested):
                self.handover_requested = True
                _event(logging.INFO, "handover-requested", f"job {self.id}: the server asks "
                       "for a hand-over", job=self.id, epoch=item.epoch)  # fmt: skip
            elif isinstance(item, TakenOver):
                status = "released" if item.handed_over else "fenced"
                epoch = max(item.epoch, self.journal.meta.epoch)
                self.journal.update(epoch=epoch, owner="server", status=status)
                self._close(status)
                _event(logging.WARNING, "taken-over", f"job {self.id}: the server owns it "
                       f"(epoch {item.epoch}); stopped", job=self.id, epoch=item.epoch,
                       handed_over=item.handed_over, via=item.via,
                       step=None if self.job is None else self.job.step)  # fmt: skip
            elif isinstance(item, Stopped):
                self.journal.update(status="fenced")
                self._close("stopped")
                _event(logging.WARNING, "stopped", f"job {self.id}: stopped by the server",
                       job=self.id, epoch=item.epoch)  # fmt: skip
            elif isinstance(item, Completed):
                self.journal.update(status="done")
                self._close("done")
                _event(logging.INFO, "completed", f"job {self.id}: completed (seq {item.seq}, "
                       f"step {item.step})", job=self.id, seq=item.seq, step=item.step)  # fmt: skip
            elif isinstance(item, Synced):
                _event(logging.INFO, "synced", f"job {self.id}: synced (server at seq "
                       f"{item.server_seq})", job=self.id, server_seq=item.server_seq,
                       adopted=item.adopted)  # fmt: skip
            elif isinstance(item, Rejected):
                _event(logging.ERROR, "rejected", f"job {self.id}: the server refused "
                       f"{item.seq or 'a message'} ({item.reason})", job=self.id, seq=item.seq,
                       reason=item.reason)  # fmt: skip
            elif isinstance(item, Ignored):
                _event(logging.DEBUG, "ignored", f"job {self.id}: ignored a {item.message.TYPE}:"
                       f" {item.reason}", job=self.id)  # fmt: skip

    def _send(self, out: Outgoing) -> None:
        ticket = self._publish(out)
        if ticket is None:
            return
        if isinstance(out.message, Snap):  # all but the chunk's data: the send's fixed cost
            cost = _wire_cost(out.topic, len(out.payload), qos=out.qos, v5=self.mqtt5,
                              alias=self.mqtt5) - len(out.message.data)  # fmt: skip
            self._send_cost[out.message.seq] = self._send_cost.get(out.message.seq, 0) + cost
        if out.seq is not None and out.chunk is not None:
            old = self._tickets.pop((out.seq, out.chunk), None)
            if old is not None:
                self._cancel(old)  # a resend of a chunk still queued: send it once
            self._tickets[(out.seq, out.chunk)] = ticket
        else:
            self._control = [t for t in self._control if not t.done()]
            self._control.append(ticket)

    def _cancel_queued(self) -> None:
        for ticket in [*self._tickets.values(), *self._control]:
            self._cancel(ticket)
        self._tickets.clear()
        self._control.clear()

    def _offered(self, ev: Offered, count: int, now: float) -> None:
        """Journal an offered snapshot before its chunks go out: the local copy (when what is
        sent is the job's full state), the step, then the transfer with its payload."""
        j = self.journal
        local_here = self._local_state_for_offer is not None and not ev.final
        if local_here:
            assert self._local_state_for_offer is not None
            full = (
                ev.payload
                if ev.base_seq is None
                else encode_delta(None, self._local_state_for_offer, **self._codec)
            )
            j.write_snapshot(ev.seq, ev.step, full, state_hash=ev.state_hash)
            self._last_full_size = len(full)
            self._local_state_for_offer = None
        j.update(info={**j.meta.info, "transfer": [ev.seq, ev.step]})
        if local_here and ev.base_seq is None:  # the snapshot file holds these very bytes
            j.begin_transfer(ev.seq, base_seq=None, count=count, size=ev.size,
                             state_hash=ev.state_hash)  # fmt: skip
        else:
            j.begin_transfer(ev.seq, base_seq=ev.base_seq, count=count, payload=ev.payload,
                             state_hash=ev.state_hash)  # fmt: skip
        j.add_counters(snapshots_sent=1, bytes_sent=ev.size, bytes_full=self._last_full_size)
        self._offered_at[ev.seq] = (now, ev.size)
        self._send_steps[ev.seq] = (
            ev.step if ev.base_seq is None or self.acked_step is None else ev.step - self.acked_step
        )
        self._send_full[ev.seq] = ev.base_seq is None
        kv = self.phase == "handing-over" if ev.final else self._offer_kv
        _event(logging.INFO, "offered", f"job {self.id}: snapshot {ev.seq} "
               f"({'full' if ev.base_seq is None else 'delta on ' + str(ev.base_seq)}, "
               f"{ev.size} bytes, step {ev.step})", job=self.id, seq=ev.seq, base_seq=ev.base_seq,
               step=ev.step, bytes=ev.size, chunks=count, final=ev.final, kv=kv)  # fmt: skip

    def _acked(self, ev: Acked, now: float) -> None:
        """The server holds ``ev.seq``: journal it as the delta base (record only, when the
        snapshot is on disk) before anything encoded on it goes out."""
        j = self.journal
        if j.holds(ev.seq, ev.state_hash):
            j.mark_acked(ev.seq, ev.state_hash)
        else:
            full = encode_delta(None, ev.state, **self._codec)
            j.mark_acked(ev.seq, ev.state_hash, payload=full, step=ev.step)
        self.acked_step = ev.step
        j.add_counters(snapshots_acked=1)
        for key in [k for k in self._tickets if k[0] <= ev.seq]:
            del self._tickets[key]
        sent = self._offered_at.pop(ev.seq, None)
        for seq in [q for q in self._offered_at if q < ev.seq]:
            del self._offered_at[seq]
        steps = self._send_steps.pop(ev.seq, None)
        cost = self._send_cost.pop(ev.seq, 0) + self._reply_cost
        for seq in [q for q in self._send_steps if q < ev.seq]:
            del self._send_steps[seq]
        for seq in [q for q in self._send_cost if q < ev.seq]:
            del self._send_cost[seq]
        for seq in [q for q in self._send_full if q <= ev.seq]:
            del self._send_full[seq]
        budget = self.snapshots.overhead
        if sent is not None and budget is not None:
            budget.round_trip = now - sent[0]
            if steps is not None:
                was_full = self._send_full.get(ev.seq, False)
                budget.observe(steps=steps, payload_bytes=sent[1], cost_bytes=cost, full=was_full)
        if sent is not None:
            seconds = now - sent[0]
            self._transfer_seconds = seconds
            self._link.observe_transfer(sent[1], seconds, self._drain_rate())
            if self.session is not None:
                self.session.set_link_rate(self._link.rate())
        lag = None if self.job is None else self.job.step - ev.step
        _event(logging.INFO, "acked", f"job {self.id}: snapshot {ev.seq} acknowledged "
               f"(step {ev.step}, {lag} steps behind)", job=self.id, seq=ev.seq, step=ev.step,
               lag=lag, cost=cost)  # fmt: skip

    def _drop_transfer(self, seq: int) -> None:
        for key in [k for k in self._tickets if k[0] == seq]:
            self._cancel(self._tickets.pop(key))
        self._offered_at.pop(seq, None)
        self._send_cost.pop(seq, None)
        self._send_steps.pop(seq, None)
        self._send_full.pop(seq, None)
        t = self.journal.transfer
        if t is not None and t.seq == seq:
            self.journal.end_transfer()

    def _close(self, phase: str) -> None:
        self.phase = phase
        self._cancel_queued()  # nothing more goes out for this job

    def close(self) -> None:
        self.journal.close()


# ---------------------------------------------------------------------------------------------
# The agent.


class Agent:
    """One device running one or more jobs over one MQTT link (see the module docstring).

    ``link`` replaces the MQTT transport (tests); ``clock`` is a monotonic clock in
    seconds. :meth:`run` returns the process exit code: 0 when every job is finished (done,
    or owned by the server) or after a clean stop, 1 on a fatal error."""

    def __init__(
        self,
        specs: Sequence[JobSpec],
        options: AgentOptions,
        *,
        link: LinkLike | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_progress: Callable[[list[JobProgress], bool], None] | None = None,
    ) -> None:
        ids = [s.id for s in specs]
        if len(set(ids)) != len(ids):
            raise JobError(f"job ids must be distinct, got {ids}")
        if not specs:
            raise JobError("no job to run")
        self.specs = list(specs)
        self.options = options
        self.namespace = TopicNamespace(options.prefix)
        self.device = AgentDevice(options.device, options.session, self.namespace)
        self._mono = clock
        self._origin = time.time() - clock()  # messages carry wall-clock-anchored times
        self._link: LinkLike | None = link
        self._link_given = link is not None
        cap = None if options.max_kbps is None else kbps_to_bytes_per_s(options.max_kbps)
        self.capacity = LinkCapacity(cap)
        self.runners: dict[str, JobRunner] = {}
        self.connected = False
        self._stop = 0  # stop requests (SIGTERM/SIGINT): 1 = graceful, 2+ = at once
        self._next_hb: float | None = None
        self._last_publish: float | None = None  # when a message last went to the server
        self._on_progress = on_progress
        self._next_progress = 0.0
        self._fatal: EdgeResumeError | None = None

    def now(self) -> float:
        """Seconds, monotonic, anchored to the wall clock at start."""
        return self._origin + self._mono()

    def stop(self) -> None:
        """Ask for a clean stop (safe from a signal handler): final snapshots, then exit.
        A second call stops without waiting for acknowledgements."""
        self._stop += 1

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        try:
            self._open_jobs()
        except EdgeResumeError as exc:
            _event(logging.ERROR, "fatal", f"cannot start: {exc}", error=type(exc).__name__)
            self._close_journals()
            return 1
        if not any(r.running for r in self.runners.values()):
            _event(logging.INFO, "nothing-to-do", "no job left to run")
            self._close_journals()
            return 0
        try:
            self._start_link()
            return self._loop()
        except EdgeResumeError as exc:
            _event(logging.ERROR, "fatal", f"stopping: {exc}", error=type(exc).__name__)
            return 1
        finally:
            self._shutdown_link()
            self._close_journals()

    def _loop(self) -> int:
        runners = list(self.runners.values())
        while True:
            now = self.now()
            self._drain(0.0)
            if self._fatal is not None:
                self._stop_jobs(offer=False)
                raise self._fatal
            if self._stop:
                return self._graceful_stop()
            stepped = False
            for r in runners:  # one step of each runnable job: round-robin
                stepped |= r.try_step(now)
            now = self.now()
            for r in runners:
                r.maintain(now)
            self._heartbeat(now)
            self._report(now, force=False)
            active = [r for r in runners if r.running]
            if not active:
                self._report(now, force=True)
                _event(logging.INFO, "all-done", "every job is finished",
                       jobs={r.id: r.phase for r in runners})  # fmt: skip
                return 0
            if all(r.phase == "finishing" for r in active) and self._completion_overdue(now):
                self._report(now, force=True)
                _event(logging.WARNING, "completion-timeout", "the server did not confirm "
                       "completion in time; the journal keeps the final state for the next "
                       "start", jobs=[r.id for r in active])  # fmt: skip
                return 0
            if not stepped:
                self._drain(self._idle_wait(now))

    def _completion_overdue(self, now: float) -> bool:
        last = max((r.finished_at or now) for r in self.runners.values() if r.running)
        return now - last > self.options.completion_timeout

    def _idle_wait(self, now: float) -> float:
        times = [t for r in self.runners.values() if (t := r.wake_at()) is not None]
        if self._next_hb is not None and self.connected:
            times.append(self._next_hb)
        wait = (min(times) - now) if times else 1.0
        return min(1.0, max(0.0, wait))

    def _graceful_stop(self) -> int:
        """SIGTERM/SIGINT: a final local snapshot of each job, offered when connected (once
        the snapshot in flight, if any, settles); wait (bounded) for the acknowledgements;
        exit 0."""
        _event(logging.INFO, "stopping", "stop requested: final snapshots")
        self._stop_jobs(offer=self.connected)
        deadline = self.now() + self.options.shutdown_grace
        while self._stop < 2 and self.connected and self.now() < deadline:
            waiting = [
                r for r in self.runners.values()
                if r.running and r.session is not None and r.session.in_flight_seq is not None
            ]  # fmt: skip
            if not waiting:
                break
            self._drain(0.1)
            for r in waiting:
                if r.session is not None:
                    r.carry_out(r.session.tick(self.now()), self.now())
            if self.connected:  # a snapshot that settled makes room for the final state
                self._stop_jobs(offer=True)
        self._report(self.now(), force=True)
        for r in self.runners.values():
            if r.running:
                r.journal.flush()
        _event(logging.INFO, "stopped", "stopped cleanly")
        return 0

    def _stop_jobs(self, *, offer: bool) -> None:
        now = self.now()
        for r in self.runners.values():
            try:
                r.final_snapshot(now, offer=offer)
            except EdgeResumeError as exc:
                _event(logging.ERROR, "final-snapshot-failed", f"job {r.id}: {exc}", job=r.id)

    # -- jobs ------------------------------------------------------------------------------------

    def _open_jobs(self) -> None:
        try:
            Path(self.options.journal_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JournalError(f"cannot create the journal folder: {exc}") from exc
        now = self.now()
        for spec in self.specs:
            self.runners[spec.id] = JobRunner.open(
                spec, self.device, options=self.options, link=self.capacity,
                publish=self._publish, cancel=self._cancel, drain_rate=self._drain_rate, now=now,
            )  # fmt: skip

    def _close_journals(self) -> None:
        for r in self.runners.values():
            try:
                r.close()
            except EdgeResumeError as exc:
                _event(logging.ERROR, "journal-close-failed", f"job {r.id}: {exc}", job=r.id)

    # -- the link --------------------------------------------------------------------------------

    def _start_link(self) -> None:
        now = self.now()
        if self._link is None:
            o = self.options
            will = self.device.will(now)
            self._link = Transport(
                TransportConfig(
                    broker=o.broker, client_id=o.device, username=o.username,
                    password=o.password, tls=o.tls,
                    will=Will(will.topic, will.payload, will.qos, will.retain),
                    protocol=o.protocol,  # type: ignore[arg-type]
                    keepalive=o.keepalive, max_kbps=o.max_kbps, backoff_max=o.reconnect_max,
                )
            )  # fmt: skip
        subs = [(s.filter, s.qos) for s in self.device.subscriptions()]
        self._link.subscribe_nowait(subs)  # before start: every Connected comes after SUBACK
        self._link.start()
        _event(logging.INFO, "starting", f"device {self.options.device}: connecting to "
               f"{self.options.broker}", device=self.options.device, broker=self.options.broker,
               session=self.options.session, jobs=list(self.runners))  # fmt: skip

    def _shutdown_link(self) -> None:
        link, self._link = self._link, None
        if link is None:
            return
        try:  # a clean disconnect that still publishes our offline status (the will)
            link.close(timeout=min(5.0, self.options.shutdown_grace), send_will=True)
        except EdgeResumeError as exc:
            _event(logging.WARNING, "close-failed", f"closing the link: {exc}")

    def _publish(self, out: Outgoing) -> PublishTicket | None:
        if self._link is None:
            return None
        self._last_publish = self.now()
        try:
            return self._link.publish(
                out.topic, out.payload, qos=out.qos, retain=out.retain,
                priority=Priority(int(out.priority)),
            )  # fmt: skip
        except TransportError as exc:
            # the session resends what matters (QUERY/NEED, BIRTH, DONE) after its timeout
            _event(logging.WARNING, "publish-failed", f"cannot publish a {out.type}: {exc}",
                   type=out.type)  # fmt: skip
            return None

    @staticmethod
    def _cancel(ticket: PublishTicket) -> None:
        ticket.cancel()

    def _drain_rate(self) -> float | None:
        return None if self._link is None else self._link.link_rate()

    def _drain(self, timeout: float) -> None:
        """Handle everything the link has for us; wait up to ``timeout`` for the first."""
        if self._link is None:
            return
        ev = self._link.get(timeout=timeout) if timeout > 0 else self._link.get(timeout=0)
        while ev is not None:
            self._handle(ev)
            ev = self._link.get(timeout=0)

    def _handle(self, ev: Message | Connected | Disconnected) -> None:
        now = self.now()
        if isinstance(ev, Connected):
            self.connected = True
            _event(logging.INFO, "connected", f"connected (MQTT {ev.protocol}, session "
                   f"{'kept' if ev.session_present else 'new'})", protocol=ev.protocol,
                   session_present=ev.session_present)  # fmt: skip
            self._publish(self.device.online(now))
            self._next_hb = now + self.options.heartbeat_interval
            for r in self.runners.values():
                r.mqtt5 = ev.protocol == "5"
                r.on_connected(now)
        elif isinstance(ev, Disconnected):
            self.connected = False
            _event(logging.WARNING, "disconnected", f"disconnected: {ev.reason}",
                   reason=ev.reason, rc=ev.rc, fatal=ev.fatal)  # fmt: skip
            for r in self.runners.values():
                r.on_disconnected(now)
            if ev.fatal:
                self._fatal = ev.error or TransportError(f"the link failed for good: {ev.reason}")
        else:
            try:
                incoming = self.device.route(ev.topic, ev.payload)
            except RemoteProtocolError as exc:
                _event(logging.WARNING, "dropped", f"dropped a message on {ev.topic}: {exc}",
                       topic=ev.topic)  # fmt: skip
                return
            runner = self.runners.get(incoming.topic.job or "")
            if runner is None:
                _event(logging.DEBUG, "no-such-job", f"a message for job {incoming.topic.job}, "
                       "which this agent does not run", topic=ev.topic)  # fmt: skip
                return
            runner.receive(incoming, now)

    def _heartbeat(self, now: float) -> None:
        """A heartbeat once no message went to the server for a whole interval: any message
        proves the device alive to the server (docs/protocol.md 4.6), so one that went out
        since the last heartbeat stands in for the next."""
        if not self.connected or self._next_hb is None or now < self._next_hb:
            return
        interval = self.options.heartbeat_interval
        if self._last_publish is not None and self._last_publish > self._next_hb - interval:
            self._next_hb = self._last_publish + interval
            return
        self._next_hb = now + interval
        jobs = {r.id: e for r in self.runners.values() if (e := r.heartbeat_entry()) is not None}
        self._publish(self.device.heartbeat(now, jobs))

    # -- progress --------------------------------------------------------------------------------

    def progress(self) -> list[JobProgress]:
        return [r.progress() for r in self.runners.values()]

    def _report(self, now: float, *, force: bool) -> None:
        if self._on_progress is None or (not force and now < self._next_progress):
            return
        self._next_progress = now + 0.2
        self._on_progress(self.progress(), self.connected)


_PUBACK_BYTES = 4  # an MQTT PUBACK with the success reason code left out


def _wire_cost(topic: str, payload_len: int, *, qos: int, v5: bool, alias: bool) -> int:
    """What an MQTT PUBLISH of ``payload_len`` bytes takes on the link, its PUBACK included
    (an alias-only topic under MQTT 5, as the transport sends a topic it has sent before)."""
    topic_len = 0 if alias else len(topic.encode("utf-8"))
    size = publish_packet_size(topic_len, payload_len, qos, v5=v5, properties_len=3 if alias else 0)
    return size + (_PUBACK_BYTES if qos else 0)


def restore_state(journal: Journal) -> dict[str, Any] | None:
    """The newest local state of a journal (for tools and tests), or None."""
    payload = journal.read_local()
    return None if payload is None else apply_delta(None, payload)
