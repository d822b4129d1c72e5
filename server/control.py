"""The contracts between the server's roles, and job control for a process without ingest.

The roles of ``edge-server serve`` meet only through these interfaces:

* :class:`JobControl` is what the resume worker asks of the MQTT side: take a job over
  (raise its epoch durably, then publish the retained CTL and wait for the broker's PUBACK),
  ask an online device for a live hand-over, and announce that a job finished on the
  server. :class:`server.ingest.Ingest` implements it in the process that runs the ingest
  (it keeps the job's protocol session in step); :class:`MqttJobControl` implements it in a
  worker process of its own (store CAS plus its own MQTT publish; the ingest process sees
  the retained CTL on ``+/+/ctl`` and rebuilds its session from the store).
* :class:`Resumer` is what the HTTP API asks of the worker: request a resume or a hand-over
  (idempotent) and report a job's :class:`ResumeStatus`.
* :class:`WorkerHooks` is what the ingest tells the worker: a live hand-over completed
  (the device RELEASEd its job and the server now owns it at ``epoch``).
* :class:`WorkerRole` is everything ``serve`` needs of a worker, and :class:`WorkerContext`
  what it hands to ``server.worker.create_worker(ctx)`` to build one.

Errors: every method raises only from ``edge_agent.errors``: :class:`Fenced` when another
claimer won (or the caller's epoch is no longer the job's), :class:`StoreError` for an
unknown job, :class:`LocalProtocolError` for a request the job's state does not allow (a
completed job, a hand-over of a job the server owns), :class:`TransportError` /
:class:`TransportTimeout` when the broker did not take the CTL.

This module owns those contracts and :class:`MqttJobControl`. It holds no protocol logic
(the CTL is built from the store's record, as ``ServerJobSession.retained_ctl`` would) and
never runs a job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from edge_agent.errors import Fenced, LocalProtocolError, StoreError
from edge_agent.protocol.messages import Ctl, Owner, Request
from edge_agent.protocol.topics import Outgoing, Priority, TopicNamespace
from server import metrics

if TYPE_CHECKING:
    from server.config import ServerConfig
    from server.liveness import Liveness
    from server.store import JobRecord, Store

__all__ = [
    "RESUME_PHASES",
    "JobControl",
    "MqttJobControl",
    "PublishTicketLike",
    "Publisher",
    "ResumePhase",
    "ResumeStatus",
    "Resumer",
    "WorkerContext",
    "WorkerHooks",
    "WorkerRole",
    "ctl_outgoing",
    "pending_handovers",
]

log = logging.getLogger("server.control")

ResumePhase = Literal[
    "queued",
    "claiming",
    "replaying",
    "rebuilding",
    "running",
    "completed",
    "failed",
    "handover-requested",
]
RESUME_PHASES: tuple[ResumePhase, ...] = (
    "queued",
    "claiming",
    "replaying",
    "rebuilding",
    "running",
    "completed",
    "failed",
    "handover-requested",
)
#: phases after which a new request starts a new attempt
TERMINAL_PHASES: frozenset[str] = frozenset({"completed", "failed"})


@dataclass(frozen=True)
class ResumeStatus:
    """Where one job's server-side resume stands (times: seconds since the Unix epoch)."""

    job_id: str
    phase: str  # one of RESUME_PHASES
    attempt: int
    epoch: int | None
    requested_at: float
    first_step_at: float | None
    finished_at: float | None
    error: str | None
    #: the step of the state the attempt's run started from (the acknowledged state's step,
    #: 0 for a job never snapshotted); None until the attempt has restored it
    start_step: int | None = None
    #: derivable entries the attempt recomputed because the device had not sent them (a
    #: generate job's KV cache under ``[link] kv = "recompute"``); empty: nothing rebuilt
    rebuilt: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        """Still going (not completed or failed)."""
        return self.phase not in TERMINAL_PHASES


class JobControl(Protocol):
    """What the resume worker asks of the MQTT side (see the module docstring)."""

    def take_over(self, job_id: str, *, reason: str) -> int:
        """Claim the job for the server: raise its epoch with owner ``server`` by a durable
        compare-and-set (status ``resuming``), publish the retained CTL ``(epoch, "server",
        "run")`` and wait for the broker's PUBACK. Returns the new epoch. A job the server
        already owns is claimed again at a new epoch (fencing an earlier attempt). Raises
        Fenced if another claimer won, LocalProtocolError for a completed job."""
        ...

    def request_handover(self, job_id: str) -> None:
        """Publish the retained CTL ``(epoch, "edge", "handover")`` for a job its device
        owns; the device's RELEASE then ends in :meth:`WorkerHooks.on_handed_over`."""
        ...

    def finish(self, job_id: str, epoch: int) -> None:
        """The job completed on the server at ``epoch``: record it completed and publish the
        retained CTL ``(epoch, "server", "stop")``. Raises Fenced if ``epoch`` is no longer
        the job's (a newer claim exists). Does not wait for the PUBACK: the transport resends
        it on every new connection, and ``serve`` republishes retained CTLs at start-up."""
        ...


class Resumer(Protocol):
    """What the HTTP API asks of the resume worker."""

    def request_resume(self, job_id: str, *, reason: str = "api") -> ResumeStatus:
        """Start resuming the job on the server, or return the resume already under way."""
        ...

    def request_handover(self, job_id: str) -> ResumeStatus:
        """Ask the job's (online) device for a live hand-over, then run it on the server."""
        ...

    def status(self, job_id: str) -> ResumeStatus | None:
        """The job's newest resume, or None if it has none."""
        ...


class WorkerHooks(Protocol):
    """What the ingest tells the worker. Called from the ingest's own threads: return fast
    (queue the work) and never raise."""

    def on_handed_over(self, job_id: str, epoch: int) -> None:
        """A live hand-over completed: the device released the job, the server owns it at
        ``epoch`` (stored, and the retained CTL acknowledged by the broker). Nothing needs
        recomputing: the acknowledged state holds the derivable entries."""
        ...


@runtime_checkable
class WorkerRole(Protocol):
    """A resume worker as ``edge-server serve`` runs it: :class:`Resumer` for the API,
    :class:`WorkerHooks` for the ingest, plus ``start`` and ``close``."""

    def request_resume(self, job_id: str, *, reason: str = "api") -> ResumeStatus: ...

    def request_handover(self, job_id: str) -> ResumeStatus: ...

    def status(self, job_id: str) -> ResumeStatus | None: ...

    def on_handed_over(self, job_id: str, epoch: int) -> None: ...

    def start(self) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class WorkerContext:
    """What ``serve`` passes to ``server.worker.create_worker(ctx)``.

    ``control`` is the ingest itself when the process runs the ingest role, else a
    :class:`MqttJobControl`; ``liveness`` is None when the process does not run the ingest
    (use ``server.liveness.offline_jobs(store, seconds)`` for the auto-resume policy then).
    ``clock`` gives seconds since the Unix epoch."""

    config: ServerConfig
    store: Store
    control: JobControl
    liveness: Liveness | None
    clock: Callable[[], float] = time.time


# ---------------------------------------------------------------------------------------------
# Publishing.


class PublishTicketLike(Protocol):
    def result(self, timeout: float | None = None) -> None: ...


class Publisher(Protocol):
    """The part of :class:`edge_agent.transport.Transport` the server publishes through."""

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        priority: Priority = Priority.CONTROL,
    ) -> PublishTicketLike: ...


def ctl_outgoing(
    namespace: TopicNamespace,
    device: str,
    job: str,
    epoch: int,
    owner: Owner,
    request: Request,
    now: float,
) -> Outgoing:
    """The retained CTL ``(epoch, owner, request)`` for a job, ready to publish."""
    ts = max(0, int(now * 1000))
    return namespace.outgoing(Ctl(device, job, epoch, owner, request, ts), Priority.CONTROL)


def publish_outgoing(publisher: Publisher, out: Outgoing) -> PublishTicketLike:
    """Publish one Outgoing with its own QoS, retain flag and priority."""
    if out.type == "ctl":
        msg = out.message
        assert isinstance(msg, Ctl)
        metrics.CTL_PUBLISHED.labels(request=msg.request).inc()
    return publisher.publish(
        out.topic, out.payload, qos=out.qos, retain=out.retain, priority=out.priority
    )


def pending_handovers(store: Store) -> list[JobRecord]:
    """Jobs a live hand-over gave to the server that no worker has started yet: owner
    ``server``, status ``resuming``, and the newest history entry says ``released``. A worker
    in a process without the ingest polls this instead of receiving ``on_handed_over``."""
    out = []
    for rec in store.list_jobs():
        if rec.owner != "server" or rec.status != "resuming":
            continue
        hist = store.status_history(rec.job)
        if hist and hist[-1].detail.startswith("released"):
            out.append(rec)
    return out


# ---------------------------------------------------------------------------------------------
# Job control in a process without the ingest.


class MqttJobControl:
    """:class:`JobControl` over the store and an MQTT publisher of this process's own.

    Used by a worker that runs without the ingest role. The order is the protocol's: the
    epoch is raised in the store (a durable compare-and-set) before the CTL announcing it
    is published. The ingest process notices through its ``+/+/ctl`` subscription (and any
    commit the store then fences) and rebuilds the job's session from the store."""

    def __init__(
        self,
        store: Store,
        publisher: Publisher,
        *,
        namespace: TopicNamespace | None = None,
        clock: Callable[[], float] = time.time,
        puback_timeout: float = 30.0,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.namespace = namespace or TopicNamespace()
        self.clock = clock
        self.puback_timeout = puback_timeout

    def _job(self, job_id: str) -> JobRecord:
        rec = self.store.get_job(job_id)
        if rec is None:
            raise StoreError(f"unknown job {job_id!r}")
        return rec

    def take_over(self, job_id: str, *, reason: str) -> int:
        rec = self._job(job_id)
        if rec.status == "completed":
            raise LocalProtocolError(f"job {job_id} is completed; nothing to take over")
        new = self.store.raise_epoch(
            job_id, rec.epoch, "server", status="resuming", detail=f"claimed: {reason}"
        )
        metrics.TAKEOVERS.labels(reason="takeover" if rec.owner == "edge" else "reclaim").inc()
        out = ctl_outgoing(
            self.namespace, rec.device, job_id, new.epoch, "server", "run", self.clock()
        )
        publish_outgoing(self.publisher, out).result(self.puback_timeout)
        return new.epoch

    def request_handover(self, job_id: str) -> None:
        rec = self._job(job_id)
        if rec.status == "completed" or rec.owner != "edge":
            raise LocalProtocolError(
                f"job {job_id} is {rec.status}, owned by the {rec.owner}: no hand-over"
            )
        out = ctl_outgoing(
            self.namespace, rec.device, job_id, rec.epoch, "edge", "handover", self.clock()
        )
        publish_outgoing(self.publisher, out).result(self.puback_timeout)

    def finish(self, job_id: str, epoch: int) -> None:
        rec = self._job(job_id)
        if rec.epoch != epoch or rec.owner != "server":
            raise Fenced(
                f"job {job_id} is at epoch {rec.epoch} owned by the {rec.owner}, not {epoch}",
                hint="a newer claim exists; do not record this attempt's completion",
            )
        if rec.status != "completed":
            self.store.set_status(job_id, "completed", detail="finished on the server")
            metrics.COMPLETIONS.labels(where="server").inc()
            metrics.JOB_TRANSITIONS.labels(status="completed").inc()
        out = ctl_outgoing(
            self.namespace, rec.device, job_id, epoch, "server", "stop", self.clock()
        )
        publish_outgoing(self.publisher, out)
