"""Both protocol ends wired together over a fake MQTT link, for tests (like h11's
ConnectionPair).

* :class:`FakeLink`: a broker between one agent and one server. The agent's side of it drops,
  duplicates, delays (so reorders), corrupts (raw bytes, or the data of a ``snap`` inside a
  valid envelope) and replays messages, and the agent disconnects and reconnects; retained
  messages are redelivered on (re)subscribe, like a broker does. The server's own link to
  the broker is reliable. Everything is driven by one seeded ``random.Random``.
* :class:`ToyJob`: a job whose state changes in every way the codec cares about: arrays that
  grow (along two axes), arrays changed in place (on copies), sparse byte changes, scalars,
  plain values, keys added and removed, a derivable entry.
* :class:`AgentSide` / :class:`ServerSide`: minimal adapters, the way the runner and the ingest
  are meant to drive the sessions (items and effects carried out in order, a journal, a store).
* :class:`Pair`: all of it, one ``round()`` at a time, with :meth:`Pair.check` asserting the
  invariants after every round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_agent.errors import (
    EdgeResumeError,
    RemoteProtocolError,
    StoreError,
)
from edge_agent.protocol import (
    Acked,
    AckedState,
    AgentConfig,
    AgentDevice,
    AgentJobSession,
    Commit,
    Completed,
    HandoverRequested,
    JobIdentity,
    Offered,
    Outgoing,
    PendingSnapshot,
    RecordBirth,
    RecordCompleted,
    RecordOwnership,
    Refused,
    ServerJobSession,
    Snap,
    TakenOver,
    TopicKind,
    TopicNamespace,
    TransferAbandoned,
    decode,
    encode,
    route,
)
from edge_agent.protocol.agent import Stopped
from edge_agent.state import State, state_hash

DEVICE = "gw-1"
JOB = "job-1"


# ---------------------------------------------------------------------------------------------
# The job.


class ToyJob:
    """A deterministic job whose state changes in every codec-relevant way."""

    derivable = frozenset({"kv"})

    def __init__(self, seed: int, total_steps: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.step = 0
        self.total_steps = total_steps
        self._state: dict[str, Any] = {
            "tokens": np.zeros(0, np.int32),
            "kv": np.zeros((2, 0, 4), np.float16),  # derivable: grows along axis 1
            "h": self.rng.standard_normal(16).astype(np.float32),
            "grid": np.zeros((0, 3), np.float64),  # grows along axis 0
            "counter": np.int64(0),
            "meta": {"name": "toy", "steps": 0, "tags": ["a"]},
            "big": self.rng.integers(0, 255, 1500, dtype=np.uint8),
            "empty": np.zeros((0,), np.complex64),
        }

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    def state(self) -> dict[str, Any]:
        return dict(self._state)

    def run_step(self) -> None:
        assert not self.done
        s = dict(self._state)  # arrays are replaced, never written in place
        n = self.step + 1
        rng = self.rng
        s["tokens"] = np.concatenate([s["tokens"], np.array([rng.integers(0, 50000)], np.int32)])
        s["kv"] = np.concatenate(
            [s["kv"], rng.standard_normal((2, 1, 4)).astype(np.float16)], axis=1
        )
        h = s["h"].copy()
        h.reshape(-1)[rng.integers(0, h.size)] += 1.0
        s["h"] = h
        if n % 3 == 0:
            s["grid"] = np.concatenate([s["grid"], rng.standard_normal((1, 3))], axis=0)
        if n % 5 == 0:
            big = s["big"].copy()
            big[rng.integers(0, big.size, 4)] ^= 0x5A
            s["big"] = big
        if n % 17 == 0:
            s["h"] = s["h"].reshape(4, 4) if s["h"].ndim == 1 else s["h"].reshape(16)
        s["counter"] = np.int64(n)
        s["meta"] = {**s["meta"], "steps": n}
        if n % 7 == 0:
            s[f"extra{n}"] = np.arange(n % 5, dtype=np.float64)
        extras = sorted(k for k in s if k.startswith("extra"))
        if n % 11 == 0 and extras:
            del s[extras[0]]
        if n % 13 == 0:
            s["meta"] = {**s["meta"], "tags": [*s["meta"]["tags"], f"t{n}"]}
        self._state = s
        self.step = n


def sent_state(state: State, include_derivable: bool) -> State:
    if include_derivable:
        return state
    return {k: v for k, v in state.items() if k not in ToyJob.derivable}


# ---------------------------------------------------------------------------------------------
# The link.


@dataclass
class Faults:
    """Probabilities per message on the agent's link (both directions), and per round."""

    drop: float = 0.0
    duplicate: float = 0.0
    max_delay: float = 0.0  # seconds; random delays reorder messages
    corrupt: float = 0.0  # flip raw bytes (the envelope check catches it)
    corrupt_data: float = 0.0  # flip a byte of a snap's data inside a valid envelope
    replay: float = 0.0  # re-send a random old message
    disconnect: float = 0.0  # per round, while connected
    reconnect: float = 0.0  # per round, while disconnected
    agent_crash: float = 0.0  # per round: the agent process dies at a random item
    server_restart: float = 0.0  # per round: the server session is rebuilt from its store
    store_failure: float = 0.0  # per commit: the store refuses the write
    foreign: float = 0.0  # per round: another device sends on (or as) this job

    @classmethod
    def none(cls) -> Faults:
        return cls()

    @classmethod
    def chaos(cls, rng: random.Random) -> Faults:
        """Random but heavy faults, different for every seed."""
        return cls(
            drop=rng.uniform(0.0, 0.3),
            duplicate=rng.uniform(0.0, 0.2),
            max_delay=rng.choice([0.0, 1.0, 4.0, 12.0]),
            corrupt=rng.uniform(0.0, 0.1),
            corrupt_data=rng.uniform(0.0, 0.05),
            replay=rng.uniform(0.0, 0.05),
            disconnect=rng.uniform(0.0, 0.05),
            reconnect=rng.uniform(0.1, 0.5),
            agent_crash=rng.uniform(0.0, 0.02),
            server_restart=rng.uniform(0.0, 0.02),
            store_failure=rng.uniform(0.0, 0.05),
            foreign=rng.uniform(0.0, 0.05),
        )


@dataclass(order=True)
class _InTransit:
    at: float
    order: int
    to_agent: bool = field(compare=False)
    topic: str = field(compare=False)
    payload: bytes = field(compare=False)


class FakeLink:
    def __init__(self, rng: random.Random, faults: Faults) -> None:
        self.rng = rng
        self.faults = faults
        self.agent_connected = False
        self.retained: dict[str, bytes] = {}
        self._queue: list[_InTransit] = []
        self._order = 0
        self.history: list[tuple[bool, str, bytes]] = []  # every message sent, for replays
        self.stats: dict[str, int] = {}

    def _count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    def _schedule(self, now: float, to_agent: bool, topic: str, payload: bytes) -> None:
        f, rng = self.faults, self.rng
        if rng.random() < f.drop:
            self._count("dropped")
            return
        copies = 2 if rng.random() < f.duplicate else 1
        for _ in range(copies):
            data = payload
            if rng.random() < f.corrupt:
                buf = bytearray(data)
                for _ in range(rng.randint(1, 3)):
                    buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
                data = bytes(buf)
                self._count("corrupted")
            elif rng.random() < f.corrupt_data:
                data = self._corrupt_data(topic, data)
            self._order += 1
            at = now + (rng.uniform(0, f.max_delay) if f.max_delay else 0.0)
            self._queue.append(_InTransit(at, self._order, to_agent, topic, data))

    def _corrupt_data(self, topic: str, data: bytes) -> bytes:
        t = TopicNamespace().parse(topic)
        msg = decode(data, t.device, t.job)
        if not isinstance(msg, Snap):
            return data
        buf = bytearray(msg.data)
        buf[self.rng.randrange(len(buf))] ^= 0xFF
        self._count("corrupted_data")
        return encode(dataclasses.replace(msg, data=bytes(buf)))

    def publish_from_agent(self, out: Outgoing, now: float) -> None:
        if not self.agent_connected:
            self._count("lost_offline")
            return
        self.history.append((False, out.topic, out.payload))
        if out.retain:
            self.retained[out.topic] = out.payload
        self._schedule(now, False, out.topic, out.payload)

    def publish_from_server(self, out: Outgoing, now: float) -> None:
        self.history.append((True, out.topic, out.payload))
        if out.retain:
            self.retained[out.topic] = out.payload  # the server's own link is reliable
        if self.agent_connected:
            self._schedule(now, True, out.topic, out.payload)

    def replay_one(self, now: float) -> None:
        if self.history:
            to_agent, topic, payload = self.rng.choice(self.history)
            self._count("replayed")
            self._order += 1
            self._queue.append(_InTransit(now, self._order, to_agent, topic, payload))

    def inject_foreign(self, now: float, namespace: TopicNamespace) -> None:
        """Another device ("mallory") sends one of the agent's old messages as its own, on the
        agent's topic or on its own topic for the same job id."""
        mine = [(t, p) for to_agent, t, p in self.history if not to_agent]
        if not mine:
            return
        topic, payload = self.rng.choice(mine)
        t = namespace.parse(topic)
        msg = decode(payload, t.device, t.job)
        forged = encode(dataclasses.replace(msg, device="mallory"))
        if self.rng.random() < 0.5:
            topic = topic.replace(f"/{DEVICE}/", "/mallory/")
        self._count("foreign")
        self._order += 1
        self._queue.append(_InTransit(now, self._order, False, topic, forged))

    def due(self, now: float) -> list[_InTransit]:
        self._queue.sort()
        i = 0
        while i < len(self._queue) and self._queue[i].at <= now:
            i += 1
        out, self._queue = self._queue[:i], self._queue[i:]
        return out

    def drop_in_flight_to_agent(self) -> None:
        """The agent's connection broke: what the broker had not delivered yet is lost."""
        self._queue = [m for m in self._queue if not m.to_agent]

    @property
    def idle(self) -> bool:
        return not self._queue


# ---------------------------------------------------------------------------------------------
# The two adapters.


@dataclass
class Journal:
    """The agent's durable record, written in the order the items come (as the runner must)."""

    epoch: int = 1
    next_seq: int = 1
    acked: AckedState | None = None
    pending: PendingSnapshot | None = None
    fenced_at: int | None = None
    completed: bool = False
    stopped: bool = False


class AgentSide:
    """The runner's part: a job, a journal, one session, and the snapshot policy."""

    def __init__(self, pair: Pair, job: ToyJob, config: AgentConfig, every: int) -> None:
        self.pair = pair
        self.job = job
        self.config = config
        self.every = every  # offer every N steps (when the session can)
        self.journal = Journal()
        self.generation = 0
        self.session = self._new_session()
        self.closed_by: Any = None  # the event that closed the session
        self.handover_requested = False
        self.handing_over = False
        self.finishing = False
        self.sent_after_close = 0
        self.handover_hashes: list[bytes] = []  # states passed to hand_over
        self.released_generation = 0  # the agent generation that last sent RELEASE
        self.include_derivable_p = 0.2  # how often a snapshot carries the derivable entries
        self.offer_hashes: dict[bytes, State] = {}  # every state the agent really offered
        self.acked_events: list[tuple[int, bytes]] = []
        self.events: list[Any] = []

    def _new_session(self) -> AgentJobSession:
        self.generation += 1
        j = self.journal
        agent = AgentDevice(DEVICE, f"run{self.generation}", self.pair.namespace)
        return AgentJobSession(
            agent,
            JOB,
            JobIdentity(
                {"kind": "toy", "steps": self.job.total_steps},
                "sha256:toy",
                0,
                self.job.total_steps,
            ),
            epoch=j.epoch,
            next_seq=j.next_seq,
            acked=j.acked,
            pending=j.pending,
            derivable=ToyJob.derivable,
            config=self.config,
            step=self.job.step,
        )

    @property
    def stopped(self) -> bool:
        j = self.journal
        return j.fenced_at is not None or j.completed or j.stopped

    def crash_and_restart(self) -> None:
        """The agent process dies (between items; see :meth:`carry_out`) and restarts from its
        journal: a new session; the job goes on from where it was (its own local snapshot)."""
        self.pair.link.agent_connected = False
        self.pair.link.drop_in_flight_to_agent()
        if self.stopped:
            return
        self.session = self._new_session()
        self.handover_requested = self.handing_over = self.finishing = False

    def carry_out(self, items: Iterable[Any], now: float, crash_at: int | None = None) -> None:
        """Carry out a session's items in order; with ``crash_at``, die before item number
        ``crash_at`` (so nothing after it happens)."""
        for n, item in enumerate(items):
            if crash_at is not None and n == crash_at:
                self.pair.link.stats["crash_mid_items"] = (
                    self.pair.link.stats.get("crash_mid_items", 0) + 1
                )
                self.crash_and_restart()
                return
            self.events.append(item)
            j = self.journal
            if isinstance(item, Outgoing):
                if self.closed_by is not None:
                    self.sent_after_close += 1
                assert item.job in (None, JOB)
                if item.type == "release":
                    self.released_generation = self.generation
                self.pair.link.publish_from_agent(item, now)
            elif isinstance(item, Offered):
                j.next_seq = item.seq + 1
                j.pending = item.pending()
            elif isinstance(item, Acked):
                j.acked = item.acked_state()
                if j.pending is not None and j.pending.seq == item.seq:
                    j.pending = None
                self.acked_events.append((item.seq, item.state_hash))
            elif isinstance(item, TransferAbandoned):
                if j.pending is not None and j.pending.seq == item.seq:
                    j.pending = None
            elif isinstance(item, TakenOver):
                j.fenced_at = item.epoch
                self.closed_by = item
            elif isinstance(item, Completed):
                j.completed = True
                self.closed_by = item
            elif isinstance(item, Stopped):
                j.stopped = True
                self.closed_by = item
            elif isinstance(item, HandoverRequested):
                self.handover_requested = True

    def connect(self, now: float) -> None:
        link = self.pair.link
        link.agent_connected = True
        if self.stopped:
            return
        # Subscribing delivers the retained CTL first (spec 4.1: wait for the SUBACK).
        ctl = link.retained.get(self.pair.namespace.ctl(DEVICE, JOB))
        if ctl is not None:
            self.deliver(self.pair.namespace.ctl(DEVICE, JOB), ctl, now)
        if not self.stopped:
            self.carry_out(self.session.connected(now, step=self.job.step), now)

    def disconnect(self, now: float) -> None:
        self.pair.link.agent_connected = False
        self.pair.link.drop_in_flight_to_agent()
        if not self.stopped:
            self.carry_out(self.session.disconnected(now), now)

    def deliver(self, topic: str, payload: bytes, now: float) -> None:
        if self.stopped:
            return
        try:
            incoming = self.session.agent.route(topic, payload)
        except RemoteProtocolError:
            self.pair.link._count("agent_refused")
            return
        self.carry_out(self.session.receive(incoming, now), now, self._maybe_crash())

    def _maybe_crash(self) -> int | None:
        rng = self.pair.rng
        if rng.random() < self.pair.link.faults.agent_crash:
            return rng.randint(0, 6)
        return None

    def offer_hash(self, state: State, include_derivable: bool) -> bytes:
        sent = sent_state(state, include_derivable)
        h = state_hash(sent)
        self.offer_hashes[h] = sent
        return h

    def act(self, now: float, *, steps: bool) -> None:
        """One round of the runner: step the job, then do what the policy and session say."""
        if self.stopped:
            return
        s = self.session
        if self.handover_requested and not self.handing_over:
            self.handing_over = True
            state = self.job.state()
            self.handover_hashes.append(self.offer_hash(state, True))
            self.carry_out(s.hand_over(state, self.job.step, now), now, self._maybe_crash())
            return
        if self.handing_over or self.finishing:
            self.carry_out(s.tick(now), now, self._maybe_crash())
            return
        if steps and not self.job.done:
            self.job.run_step()
        if self.job.done:
            self.finishing = True
            state = self.job.state()
            self.offer_hash(state, False)
            self.carry_out(s.finish(state, self.job.step, now), now, self._maybe_crash())
            return
        self.carry_out(s.tick(now), now, self._maybe_crash())
        if self.stopped or not s.can_offer:
            return
        want = self.job.step % self.every == 0 if steps else True
        state = self.job.state()
        include = self.pair.rng.random() < self.include_derivable_p
        if want and (s.acked_hash != state_hash(sent_state(state, include))):
            h = self.offer_hash(state, include)
            items = s.offer(state, self.job.step, now, include_derivable=include)
            offered = [i for i in items if isinstance(i, Offered)]
            assert len(offered) == 1 and offered[0].state_hash == h, "the session's hash lies"
            self.carry_out(items, now, self._maybe_crash())


class ServerSide:
    """The ingest's part: a store (states by hash, the job record) and one session."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self.states: dict[bytes, State] = {}
        self.record: dict[str, Any] = {
            "birth": None,
            "epoch": 1,
            "owner": "edge",
            "current": None,
            "step": 0,
            "completed": False,
        }
        self.history: list[tuple[int, bytes]] = []  # every commit, in order
        self.session = self._from_store()
        self.refused: list[Any] = []
        self.takeover_at: tuple[int, bytes] | None = None  # current state when taken over
        self.owner_changes: list[RecordOwnership] = []

    def _from_store(self) -> ServerJobSession:
        r = self.record
        return ServerJobSession(
            DEVICE,
            JOB,
            namespace=self.pair.namespace,
            birth=r["birth"],
            epoch=r["epoch"],
            owner=r["owner"],
            current=r["current"],
            step=r["step"],
            completed=r["completed"],
            max_transfer=1 << 20,
        )

    def restart(self) -> None:
        assert self.session.pending_commit is None
        self.session = self._from_store()
        self.pair.link._count("server_restarts")

    def deliver(self, topic: str, payload: bytes, now: float) -> None:
        try:
            incoming = route(self.pair.namespace, topic, payload)
        except RemoteProtocolError as exc:
            self.pair.link._count("server_refused")
            t = None
            with contextlib.suppress(RemoteProtocolError):
                t = self.pair.namespace.parse(topic)
            if t is not None and t.kind is TopicKind.STATE and t.job == JOB:
                self.carry_out(self.session.receive_invalid(exc), now)
            return
        if incoming.topic.kind is not TopicKind.STATE:
            return  # status / hb: liveness, not this harness's business
        self.carry_out(self.session.receive(incoming, now), now)

    def carry_out(self, effects: Iterable[Any], now: float) -> None:
        for e in effects:
            if isinstance(e, Outgoing):
                self.pair.link.publish_from_server(e, now)
            elif isinstance(e, RecordBirth):
                self.record.update(birth=e.birth, epoch=e.epoch, owner=e.owner)
            elif isinstance(e, RecordOwnership):
                self.record.update(epoch=e.epoch, owner=e.owner)
                self.owner_changes.append(e)
                if self.takeover_at is None:
                    self.takeover_at = self.record["current"]
            elif isinstance(e, RecordCompleted):
                self.record.update(completed=True)
            elif isinstance(e, Refused):
                self.refused.append(e)
            elif isinstance(e, Commit):
                self.carry_out(self._commit(e), now)
            else:
                raise AssertionError(f"unknown effect {e!r}")

    def _commit(self, c: Commit) -> list[Any]:
        s = self.session
        assert self.takeover_at is None, "a commit after the takeover"
        try:
            if self.pair.rng.random() < self.pair.link.faults.store_failure:
                raise StoreError("the disk is full (simulated)")
            base = None if c.full else self.states[s.current_hash]  # type: ignore[index]
            new = c.apply(base)
        except EdgeResumeError as exc:
            return s.commit_failed(c.seq, exc)
        h = state_hash(new)
        assert h == c.state_hash
        assert h in self.pair.agent.offer_hashes, "the server would hold a state never offered"
        self.states[h] = new  # "durably"
        self.record.update(current=(c.seq, h), step=c.step)
        self.history.append((c.seq, h))
        return s.commit_succeeded(c.seq)


# ---------------------------------------------------------------------------------------------
# The pair.


class Pair:
    """One agent and one server over a :class:`FakeLink`, advanced one round at a time."""

    def __init__(
        self,
        seed: int,
        *,
        faults: Faults | None = None,
        total_steps: int = 10**9,
        every: int = 2,
        dt: float = 0.5,
        config: AgentConfig | None = None,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.namespace = TopicNamespace()
        self.link = FakeLink(self.rng, faults or Faults.none())
        self.now = 1000.0
        self.dt = dt
        self.config = config or AgentConfig(
            max_message=900, timeout_floor=2.0, timeout_max=16.0, default_link_rate=50_000.0
        )
        self.agent = AgentSide(self, ToyJob(seed, total_steps), self.config, every)
        self.server = ServerSide(self)
        self.rounds = 0
        self.last_server_step = 0
        self.agent.connect(self.now)

    def round(self, *, steps: bool = True, faults: bool = True) -> None:
        self.rounds += 1
        self.now += self.dt
        f, rng, link = self.link.faults, self.rng, self.link
        if faults:
            if link.agent_connected and rng.random() < f.disconnect:
                self.agent.disconnect(self.now)
            elif not link.agent_connected and rng.random() < f.reconnect:
                self.agent.connect(self.now)
            if rng.random() < f.agent_crash:
                self.agent.crash_and_restart()
            if rng.random() < f.server_restart:
                self.server.restart()
            if rng.random() < f.replay:
                link.replay_one(self.now)
            if rng.random() < f.foreign:
                link.inject_foreign(self.now, self.namespace)
        self.agent.act(self.now, steps=steps)
        for m in link.due(self.now):
            if m.to_agent:
                if link.agent_connected:
                    self.agent.deliver(m.topic, m.payload, self.now)
            else:
                self.server.deliver(m.topic, m.payload, self.now)
        self.check()

    def heal(self) -> None:
        """Faults stop; the agent reconnects (resubscribing: retained CTLs are redelivered)."""
        self.link.faults = Faults.none()
        if self.link.agent_connected:
            self.agent.disconnect(self.now)
        self.agent.connect(self.now)

    def run_until(self, done: Callable[[], bool], limit: int, **kw: bool) -> int:
        """Rounds until ``done()``; fails after ``limit`` rounds."""
        for n in range(limit):
            if done():
                return n
            self.round(**kw)
        assert done(), f"seed {self.seed}: not done after {limit} rounds"
        return limit

    # -- invariants -------------------------------------------------------------------------

    def check(self) -> None:
        s, a = self.server, self.agent
        cur = s.session.current_hash
        if cur is not None:
            assert cur in a.offer_hashes, "server state is not a state the agent offered"
            assert state_hash(s.states[cur]) == cur
            assert s.record["current"] == (s.session.current_seq, cur)
        seqs = [q for q, _ in s.history]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), "commits out of order"
        committed = set(s.history)
        for ack in a.acked_events:
            assert ack in committed, f"agent took {ack} as acked; the server never committed it"
        acked = None if a.stopped else a.session.acked
        if acked is not None:
            assert (acked.seq, acked.hash) in committed
            assert state_hash(acked.state) == acked.hash, "the agent's base is not what it says"
        assert s.session.step >= self.last_server_step, "the server's copy went back in steps"
        self.last_server_step = s.session.step
        if s.takeover_at is not None:
            assert s.record["current"] == s.takeover_at, "state changed after the takeover"
        assert a.sent_after_close == 0, "the agent sent something after it was closed"
