"""The agent's main loop in one process, over an in-memory link with the protocol's server
end behind it: the order of journal writes and publishes, offline work, restarts from the
journal, take-overs and the KV policy's plumbing. (tests/test_agent_integration.py runs the
same agent as a process against Mosquitto.)"""

from __future__ import annotations

import itertools
import queue
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.errors import JobError
from edge_agent.jobs import JobSpec, create_job
from edge_agent.journal import Journal
from edge_agent.protocol import (
    Commit,
    Ctl,
    Done,
    Outgoing,
    RecordOwnership,
    ServerJobSession,
    Snap,
    TopicKind,
    TopicNamespace,
    decode,
    route,
)
from edge_agent.runner import Agent, AgentOptions, JobProgress
from edge_agent.transport import Connected, Message
from tests.support.agent_proc import write_job

NS = TopicNamespace()
PROMPT = "Once upon a time"


class Crash(BaseException):
    """Stands for a kill -9 at a publish (not an EdgeResumeError: nothing handles it)."""


class FakeTicket:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> bool:
        self.cancelled = True
        return True

    def done(self) -> bool:  # delivered at once (or never, offline: the agent resends)
        return True


class FakeLink:
    """A broker and the server end in memory. What the agent publishes goes to a
    ServerJobSession at once (when online); what the server answers waits in the agent's
    queue. ``hook(msg)`` sees every decoded agent message before it is delivered."""

    def __init__(self, *, online: bool = True, hook: Callable[[Any], None] | None = None):
        self.online = online
        self.hook = hook
        self.q: queue.Queue[Any] = queue.Queue()
        self.sessions: dict[str, ServerJobSession] = {}
        self.states: dict[str, dict[str, Any]] = {}
        self.sent: list[Any] = []  # every decoded agent message
        self.closed = False

    # LinkLike
    def start(self) -> FakeLink:
        if self.online:
            self.q.put(Connected("5", False, 10, 100, None))
        return self

    def subscribe_nowait(self, filters: Any, qos: int = 1) -> None:
        pass

    def publish(self, topic: str, payload: bytes, **kw: Any) -> FakeTicket:
        t = NS.parse(topic)
        msg = decode(payload, t.device, t.job)
        self.sent.append(msg)
        if self.hook is not None:
            self.hook(msg)
        if self.online:
            incoming = route(NS, topic, payload)
            if incoming.topic.kind is TopicKind.STATE:
                job = incoming.topic.job
                assert job is not None
                s = self.sessions.setdefault(job, ServerJobSession("gw-1", job, namespace=NS))
                self.carry_out(s, s.receive(incoming, 0.0))
        return FakeTicket()

    def get(self, timeout: float | None = None) -> Any:
        try:
            return self.q.get(timeout=timeout) if timeout else self.q.get_nowait()
        except queue.Empty:
            return None

    def link_rate(self) -> float | None:
        return None

    def close(self, timeout: float = 5.0, *, drain: bool = True, send_will: bool = False) -> None:
        self.closed = True

    # the server end
    def carry_out(self, s: ServerJobSession, effects: list[Any]) -> None:
        for e in effects:
            if isinstance(e, Outgoing):
                self.q.put(Message(e.topic, e.payload, 1, e.retain))
            elif isinstance(e, Commit):
                new = e.apply(None if e.full else self.states[s.job])
                self.states[s.job] = new
                self.carry_out(s, s.commit_succeeded(e.seq))
            elif isinstance(e, RecordOwnership):
                pass

    def take_over(self, job: str) -> None:
        s = self.sessions[job]
        self.carry_out(s, s.take_over(0.0))


def options(tmp_path: Path, **kw: Any) -> AgentOptions:
    kw.setdefault("completion_timeout", 5.0)
    kw.setdefault("heartbeat_interval", 0.05)
    return AgentOptions(device="gw-1", broker="mqtt://unused", journal_dir=tmp_path / "j", **kw)


@pytest.fixture
def gen(tiny_models: dict[str, Path], tmp_path: Path) -> Iterator[Callable[..., JobSpec]]:
    def make(job_id: str = "g1", tokens: int = 120, kv: str = "auto", **snapshot: Any) -> JobSpec:
        path = write_job(
            tmp_path, job_id, "generate", tiny_models["tiny-decoder.onnx"],
            params={"prompt": PROMPT, "max_new_tokens": tokens, "temperature": 0.7,
                    "seed": 3},
            # the overhead budget is off unless a test asks: they count snapshots
            snapshot={"overhead_budget": 0, **(snapshot or {"every_steps": 10})},
            link={"kv": kv},
        )  # fmt: skip
        return JobSpec.load(path)

    yield make


def expected_tokens(spec: JobSpec, steps: int | None = None) -> np.ndarray:
    job = create_job(spec)
    job.run(steps)
    return np.asarray(job.state()["tokens"])


def meta(tmp_path: Path, job: str) -> Any:
    with Journal.open(tmp_path / "j", job, readonly=True) as j:
        return j.meta


# ---------------------------------------------------------------------------------------------


def test_every_snapshot_is_journaled_before_it_is_published(
    gen: Callable[..., JobSpec], tmp_path: Path
) -> None:
    spec = gen(kv="recompute")
    checked = {"snap": 0, "delta": 0, "done": 0}

    def hook(msg: Any) -> None:
        if isinstance(msg, (Snap, Done)):
            m = meta(tmp_path, "g1")
            assert m.next_seq > msg.seq, "a seq went out before it was journaled"
        if isinstance(msg, Snap):
            checked["snap"] += 1
            assert m.transfer is not None and m.transfer.seq == msg.seq
            if msg.base_seq is not None:  # encoded on the journaled acknowledged state
                checked["delta"] += 1
                assert m.acked_seq == msg.base_seq
        if isinstance(msg, Done):
            checked["done"] += 1
            assert m.acked_seq == msg.seq and m.acked.step == 120

    link = FakeLink(hook=hook)
    assert Agent([spec], options(tmp_path), link=link).run() == 0
    assert checked["snap"] >= 10 and checked["delta"] >= 9 and checked["done"] >= 1
    m = meta(tmp_path, "g1")
    assert (m.status, m.acked.step, m.local.step) == ("done", 120, 120)
    np.testing.assert_array_equal(link.states["g1"]["tokens"], expected_tokens(spec))
    assert not any(k.startswith("past_key_values") for k in link.states["g1"])  # recompute
    assert link.closed


def test_kv_auto_sends_the_cache_only_when_the_link_can_carry_it(
    gen: Callable[..., JobSpec], tmp_path: Path
) -> None:
    spec = gen(kv="auto", every_steps=20)
    slow = FakeLink()  # nothing measured, no cap: 64 kbit/s assumed, a fast job: no room
    assert Agent([spec], options(tmp_path / "slow", max_kbps=64), link=slow).run() == 0
    fast = FakeLink()  # a 1 Gbit/s cap: the cache fits
    assert Agent([spec], options(tmp_path / "fast", max_kbps=1e6), link=fast).run() == 0
    sent_kv = [
        any(k.startswith("past_key_values") for k in s)
        for s in (slow.states["g1"], fast.states["g1"])
    ]
    # the final state never carries derivable entries (DONE); look at what the snaps held
    slow_sizes = [m.size for m in slow.sent if isinstance(m, Snap) and m.index == 0]
    fast_sizes = [m.size for m in fast.sent if isinstance(m, Snap) and m.index == 0]
    assert sent_kv == [False, False]
    assert max(fast_sizes[:-1]) > 20 * max(slow_sizes[:-1])  # KiB of cache vs bytes of tokens
    np.testing.assert_array_equal(fast.states["g1"]["tokens"], expected_tokens(spec))


def test_offline_the_job_runs_to_the_end_and_finishes_on_the_next_start(
    gen: Callable[..., JobSpec], tmp_path: Path
) -> None:
    spec = gen(tokens=80)
    dark = FakeLink(online=False)
    assert Agent([spec], options(tmp_path, completion_timeout=0.2), link=dark).run() == 0
    m = meta(tmp_path, "g1")
    assert (m.status, m.local.step, m.acked_seq) == ("running", 80, None)
    local_snaps = m.counters.get("local_snapshots", 0)
    assert local_snaps >= 8  # every 10 steps, while nothing could be sent
    assert not [x for x in dark.sent if isinstance(x, Snap)]
    # the next start: restored at the end, it only has to send the final state
    link = FakeLink()
    assert Agent([spec], options(tmp_path), link=link).run() == 0
    assert meta(tmp_path, "g1").status == "done"
    snaps = [x for x in link.sent if isinstance(x, Snap)]
    assert {s.step for s in snaps} == {80}
    np.testing.assert_array_equal(link.states["g1"]["tokens"], expected_tokens(spec))


@pytest.mark.parametrize("crash_at", [1, 4])  # a full first snapshot, a later delta
def test_a_crash_mid_transfer_resumes_that_transfer(
    gen: Callable[..., JobSpec], tmp_path: Path, crash_at: int
) -> None:
    spec = gen(kv="send", tokens=60)
    n = {"snap": 0}
    crashed: dict[str, Any] = {}

    def hook(msg: Any) -> None:
        if isinstance(msg, Snap):
            n["snap"] += 1
            if n["snap"] == crash_at:
                crashed.update(seq=msg.seq, base=msg.base_seq, step=msg.step)
                raise Crash

    before = FakeLink(hook=hook)
    with pytest.raises(Crash):
        Agent([spec], options(tmp_path), link=before).run()
    m = meta(tmp_path, "g1")
    assert m.transfer is not None and m.transfer.seq == crashed["seq"]
    link = FakeLink()  # the same server (its replies in flight are lost with the agent)
    link.sessions, link.states = before.sessions, before.states
    assert Agent([spec], options(tmp_path), link=link).run() == 0
    # the restarted agent asked about that transfer, then sent it (the server had no chunk)
    queries = [x for x in link.sent if type(x).__name__ == "Query"]
    assert queries and queries[0].seq == crashed["seq"]
    first = next(x for x in link.sent if isinstance(x, Snap))
    assert (first.seq, first.base_seq, first.step) == (
        crashed["seq"], crashed["base"], crashed["step"],
    )  # fmt: skip
    np.testing.assert_array_equal(link.states["g1"]["tokens"], expected_tokens(spec))


def test_a_take_over_stops_the_job_and_nothing_more_is_sent(
    gen: Callable[..., JobSpec], tmp_path: Path
) -> None:
    spec = gen(tokens=400)
    after: list[Any] = []
    link: FakeLink

    def hook(msg: Any) -> None:
        if getattr(msg, "job", None) == "g1":
            with Journal.open(tmp_path / "j", "g1", readonly=True) as j:
                if j.meta.status == "fenced":
                    after.append(msg)
            acks = link.sessions.get("g1")
            if acks is not None and acks.current_seq is not None and acks.owner == "edge":
                link.take_over("g1")  # once the server holds something: take it

    link = FakeLink(hook=hook)
    assert Agent([spec], options(tmp_path), link=link).run() == 0
    assert after == []
    m = meta(tmp_path, "g1")
    assert (m.status, m.owner, m.epoch) == ("fenced", "server", 2)
    assert m.local.step < 400  # stopped, not finished
    # a restart does not run it again, and publishes nothing at all
    again = FakeLink()
    assert Agent([spec], options(tmp_path), link=again).run() == 0
    assert again.sent == [] and not again.closed  # the link was not even started


def test_ctl_is_honoured_even_before_the_sync(gen: Callable[..., JobSpec], tmp_path: Path) -> None:
    spec = gen(tokens=50)
    link = FakeLink()
    ctl = NS.outgoing(Ctl("gw-1", "g1", 3, "server", "run", 0))
    link.q.put(Message(ctl.topic, ctl.payload, 1, True))  # retained, seen on connect
    assert Agent([spec], options(tmp_path), link=link).run() == 0
    assert [type(x).__name__ for x in link.sent if getattr(x, "job", None) == "g1"] in (
        [], ["Birth"],
    )  # fmt: skip
    m = meta(tmp_path, "g1")
    assert (m.status, m.owner, m.epoch) == ("fenced", "server", 3)


def test_progress_reports_and_heartbeats(gen: Callable[..., JobSpec], tmp_path: Path) -> None:
    # one snapshot at the end: in between, nothing but heartbeats goes to the server
    spec = gen(tokens=300, every_seconds=1000.0)
    seen: list[list[JobProgress]] = []
    link = FakeLink()
    agent = Agent([spec], options(tmp_path), link=link, on_progress=lambda r, c: seen.append(r))
    assert agent.run() == 0
    assert seen and seen[-1][0].phase == "done" and seen[-1][0].step == 300
    assert seen[-1][0].total == 300 and seen[-1][0].acked_step == 300
    hbs = [x for x in link.sent if type(x).__name__ == "Heartbeat"]
    assert hbs and all(set(h.jobs) <= {"g1"} for h in hbs)


def test_a_heartbeat_is_skipped_while_other_messages_go_out(
    gen: Callable[..., JobSpec], tmp_path: Path
) -> None:
    t = [0.0]
    link = FakeLink(online=False)
    agent = Agent([gen()], options(tmp_path, heartbeat_interval=10.0), link=link,
                  clock=lambda: t[0])  # fmt: skip
    agent._link = link  # connected by hand: only the heartbeat logic runs
    o = agent.now()  # the agent's times are anchored to the wall clock
    agent.connected, agent._next_hb = True, o + 10.0

    def heartbeats() -> int:
        return sum(1 for m in link.sent if type(m).__name__ == "Heartbeat")

    t[0] = 5.0
    agent._publish(agent.device.online(o + 5.0))  # any message proves the device alive
    t[0] = 10.0
    agent._heartbeat(o + 10.0)
    assert heartbeats() == 0  # something went out within the interval: no heartbeat
    agent._heartbeat(o + 14.9)
    assert heartbeats() == 0
    t[0] = 15.0
    agent._heartbeat(o + 15.0)
    assert heartbeats() == 1  # a whole interval of silence: a heartbeat
    agent._heartbeat(o + 24.9)
    assert heartbeats() == 1
    t[0] = 25.0
    agent._heartbeat(o + 25.0)
    assert heartbeats() == 2


def test_the_overhead_budget_holds_small_sends_back(
    gen: Callable[..., JobSpec], tmp_path: Path
) -> None:
    """kv = recompute: a send carries tokens (a byte or so each) and a ~125-byte codec
    header, and costs ~100 bytes besides; on a schedule of every 10 steps the budget holds
    sends back until they carry ~10x their cost, and the server still ends with the job's
    exact state."""
    counts = {}
    for budget in (0, 0.1):
        spec = gen(f"b{int(budget * 100)}", tokens=3000, kv="recompute", every_steps=10,
                   overhead_budget=budget, max_lag_seconds=3600.0)  # fmt: skip
        link = FakeLink()
        agent = Agent([spec], options(tmp_path / str(budget)), link=link)
        assert agent.run() == 0
        snaps = [m for m in link.sent if isinstance(m, Snap)]
        counts[budget] = len(snaps)
        got = link.states[spec.id]["tokens"]
        assert np.array_equal(got, expected_tokens(spec))
        b = agent.runners[spec.id].snapshots.overhead
        if budget:
            assert b is not None and b.cost is not None and 40 < b.cost < 200
            steps = [s.step for s in snaps]
            gaps = [y - x for x, y in itertools.pairwise(steps)]
            assert max(gaps) > 1000  # held back well past the 10-step schedule
            # together the sends stay near the budget: their costs over their payloads
            assert b.total_cost < 0.15 * b.total_payload
        else:
            assert b is None
    assert counts[0.1] * 5 < counts[0]


def test_two_jobs_take_turns(gen: Callable[..., JobSpec], tmp_path: Path) -> None:
    a, b = gen("ja", tokens=60), gen("jb", tokens=90)
    order: list[str] = []
    link = FakeLink(hook=lambda m: order.append(m.job) if isinstance(m, Snap) else None)
    assert Agent([a, b], options(tmp_path), link=link).run() == 0
    for spec in (a, b):
        np.testing.assert_array_equal(link.states[spec.id]["tokens"], expected_tokens(spec))
    first_b = order.index("jb")
    assert "ja" in order[first_b:]  # interleaved, not one after the other


def test_bad_setups_are_refused(gen: Callable[..., JobSpec], tmp_path: Path) -> None:
    with pytest.raises(JobError, match="distinct"):
        Agent([gen("x"), gen("x")], options(tmp_path))
    with pytest.raises(JobError, match="no job"):
        Agent([], options(tmp_path))
    # a journal of another device: exit code 1, nothing sent
    spec = gen("mine")
    Journal.create(tmp_path / "j", "mine", device="someone-else").close()
    link = FakeLink()
    assert Agent([spec], options(tmp_path), link=link).run() == 1
    assert link.sent == []


def test_a_changed_job_file_is_refused(gen: Callable[..., JobSpec], tmp_path: Path) -> None:
    spec = gen(tokens=30)
    assert (
        Agent([spec], options(tmp_path, completion_timeout=0.1), link=FakeLink(online=False)).run()
        == 0
    )
    changed = spec.replace(params={**spec.params, "seed": 4})
    link = FakeLink()
    assert Agent([changed], options(tmp_path), link=link).run() == 1
    assert link.sent == []
    paced = spec.replace(min_step_seconds=0.001)  # pacing is not the job's identity
    assert Agent([paced], options(tmp_path), link=FakeLink()).run() == 0
