"""A simulated edge device for server tests: the real agent protocol sessions
(``AgentDevice``, ``AgentJobSession``) over the real MQTT transport, driven from the test.

    dev = SimDevice(broker.url, "gw-1").start()
    job = dev.add_job("job-1", total_steps=100)
    job.advance(5); dev.offer(job)
    dev.pump(lambda: job.acked_seq == 1)

Its jobs are ``generate``-shaped (``tokens`` with a prompt, ``step``, ``prompt_len``), so a
completed job's outputs can be read by the server. The transport has the device's real MQTT
will (a retained STATUS offline), and optionally credentials and TLS (``username``,
``password``, ``tls``: a broker configured as deploy/ ships it). Nothing here is server code.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_agent.errors import RemoteProtocolError
from edge_agent.protocol import (
    Acked,
    AgentConfig,
    AgentDevice,
    AgentJobSession,
    Completed,
    HandoverRequested,
    JobIdentity,
    Outgoing,
    Stopped,
    TakenOver,
    TopicNamespace,
)
from edge_agent.transport import (
    Connected,
    Message,
    TLSOptions,
    Transport,
    TransportConfig,
    Will,
)

PROMPT = np.array([72, 105, 33], np.int64)  # "Hi!"


def generate_spec(job: str, total_steps: int) -> dict[str, Any]:
    return {
        "job": {"id": job, "kind": "generate", "model": "tiny-decoder.onnx"},
        "params": {"prompt_ids": PROMPT.tolist(), "max_new_tokens": total_steps},
        "snapshot": {"every_steps": 1},
        "link": {"kv": "send"},
        "runtime": {"intra_op_threads": 1, "optimization": "all"},
    }


def generate_state(step: int) -> dict[str, Any]:
    """A deterministic generate-shaped state after ``step`` steps."""
    gen = (np.arange(step, dtype=np.int64) * 7 + 3) % 256
    return {"tokens": np.concatenate([PROMPT, gen]), "step": step, "prompt_len": PROMPT.size}


@dataclass
class SimJob:
    device: SimDevice
    job: str
    session: AgentJobSession
    total_steps: int
    step: int = 0
    acked: list[int] = field(default_factory=list)
    events: list[Any] = field(default_factory=list)
    handover_requested: bool = False
    closed_by: Any = None

    @property
    def acked_seq(self) -> int | None:
        return self.session.acked_seq

    def state(self) -> dict[str, Any]:
        return generate_state(self.step)

    def advance(self, n: int = 1) -> None:
        self.step = min(self.total_steps, self.step + n)


class SimDevice:
    def __init__(
        self,
        url: str,
        device: str,
        *,
        namespace: TopicNamespace | None = None,
        session: str | None = None,
        config: AgentConfig | None = None,
        username: str | None = None,
        password: str | None = None,
        tls: TLSOptions | None = None,
    ) -> None:
        self.namespace = namespace or TopicNamespace()
        self.agent = AgentDevice(device, session or uuid.uuid4().hex[:12], self.namespace)
        self.device = device
        self.config = config or AgentConfig(timeout_floor=1.0, timeout_max=4.0)
        w = self.agent.will(time.time())
        self.transport = Transport(
            TransportConfig(
                broker=url,
                client_id=device,
                username=username,
                password=password,
                tls=tls,
                will=Will(w.topic, w.payload, w.qos, w.retain),
                backoff_initial=0.05,
                backoff_max=0.5,
                connect_timeout=5.0,
                stable_after=0.5,
                keepalive=5,
                seed=1,
            )
        )
        self.transport.subscribe_nowait([(s.filter, s.qos) for s in self.agent.subscriptions()])
        self.jobs: dict[str, SimJob] = {}
        self.connected = False

    def start(self, timeout: float = 10.0) -> SimDevice:
        self.transport.start()
        self.pump(lambda: self.connected, timeout)
        return self

    def close(self) -> None:
        self.transport.close(timeout=2.0)

    def add_job(
        self, job: str, *, total_steps: int = 50, epoch: int = 1, next_seq: int = 1
    ) -> SimJob:
        identity = JobIdentity(generate_spec(job, total_steps), "sha256:test-model", 1, total_steps)
        s = AgentJobSession(
            self.agent, job, identity, epoch=epoch, next_seq=next_seq, config=self.config
        )
        j = SimJob(self, job, s, total_steps)
        self.jobs[job] = j
        if self.connected:
            self.carry_out(j, s.connected(time.time(), step=j.step))
        return j

    # -- driving ---------------------------------------------------------------------------

    def publish(self, out: Outgoing) -> None:
        self.transport.publish(
            out.topic, out.payload, qos=out.qos, retain=out.retain, priority=out.priority
        )

    def carry_out(self, j: SimJob, items: list[Any]) -> None:
        for item in items:
            j.events.append(item)
            if isinstance(item, Outgoing):
                self.publish(item)
            elif isinstance(item, Acked):
                j.acked.append(item.seq)
            elif isinstance(item, HandoverRequested):
                j.handover_requested = True
            elif isinstance(item, (TakenOver, Completed, Stopped)):
                j.closed_by = item

    def offer(self, j: SimJob, *, include_derivable: bool = False) -> bool:
        if not j.session.can_offer:
            return False
        self.carry_out(
            j, j.session.offer(j.state(), j.step, time.time(), include_derivable=include_derivable)
        )
        return True

    def finish(self, j: SimJob) -> None:
        self.carry_out(j, j.session.finish(j.state(), j.step, time.time()))

    def hand_over(self, j: SimJob) -> None:
        self.carry_out(j, j.session.hand_over(j.state(), j.step, time.time()))

    def heartbeat(self) -> None:
        hb = self.agent.heartbeat(
            time.time(), {j.job: (j.step, j.session.acked_seq) for j in self.jobs.values()}
        )
        self.publish(hb)

    def pump(self, until: Callable[[], bool], timeout: float = 10.0) -> None:
        """Handle what arrives (and the sessions' deadlines) until ``until()`` is true."""
        deadline = time.monotonic() + timeout
        while not until():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.device}: condition not met within {timeout}s")
            ev = self.transport.get(timeout=0.05)
            now = time.time()
            if isinstance(ev, Connected):
                self.connected = True
                self.publish(self.agent.online(now))
                for j in self.jobs.values():
                    self.carry_out(j, j.session.connected(now, step=j.step))
            elif isinstance(ev, Message):
                try:
                    incoming = self.agent.route(ev.topic, ev.payload)
                except RemoteProtocolError:
                    continue
                j = self.jobs.get(incoming.topic.job or "")
                if j is not None:
                    self.carry_out(j, j.session.receive(incoming, now))
            elif ev is not None:
                self.connected = False
                for j in self.jobs.values():
                    self.carry_out(j, j.session.disconnected(now))
            for j in self.jobs.values():
                d = j.session.next_deadline
                if d is not None and now >= d:
                    self.carry_out(j, j.session.tick(now))

    def run_to_acked(self, j: SimJob, steps: int, *, every: int = 1, timeout: float = 20.0) -> None:
        """Advance ``steps`` steps, offering a snapshot every ``every`` steps and waiting for
        each to be acknowledged."""
        for _ in range(steps // every):
            j.advance(every)
            self.pump(lambda: j.session.can_offer, timeout)
            before = len(j.acked)
            assert self.offer(j)
            self.pump(lambda b=before: len(j.acked) > b, timeout)
