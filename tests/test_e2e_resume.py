"""End to end, every part a process of its own (issue 4, "Done when"): a real Mosquitto, the
real server (``python -m server.cli serve``: ingest, resume worker, API) and the real agent
(``python -m edge_agent.cli run``), wired by ``tests/support/cluster.py``.

A job is cut at a random point (seeded; ``E2E_SEED`` overrides the seed, and it is printed)
by SIGKILLing its agent, by dropping its link, or by blocking its link (nothing flows, the
sockets stay open) while the agent keeps computing. The server marks it offline, the test
resumes it with ``POST /v1/jobs/{id}/resume``, and its outputs from the API must be those of
an uninterrupted run of the same job in this process, bit for bit. Then the agent comes
back (restarted, or its link restored) and must stand down: it learns the take-over from
the retained CTL, journals the job fenced, sends nothing more for it that the server would
accept, and does not finish it.

Also here: the same with the KV cache recomputed by the server, a stateful ``batch`` job,
a live hand-over, and the server SIGKILLed during ingest and during compaction.
"""

from __future__ import annotations

import os
import random
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.cluster import AgentNode, Cluster, Metrics, reference_run, running_cluster

pytestmark = pytest.mark.integration

STATE_TYPES = ("birth", "snap", "query", "done", "release")


def seeded(name: str) -> random.Random:
    seed = int(os.environ.get("E2E_SEED", zlib.crc32(name.encode())))
    print(f"{name}: seed {seed} (set E2E_SEED to replay)")
    return random.Random(seed)


@pytest.fixture(scope="module")
def shared_cluster(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """One broker and one server for the tests that do not kill them (starting them costs
    seconds); each test has its own device and job ids, and checks metrics as deltas."""
    with running_cluster(tmp_path_factory.mktemp("e2e"), tiny_models) as c:
        yield c


@pytest.fixture
def cluster(shared_cluster: Cluster) -> Iterator[Cluster]:
    """The shared cluster; the agents a test adds are stopped after it, and every log's
    tail is printed (pytest shows it when the test failed)."""
    c = shared_cluster
    c.check()
    before = set(c.agents)
    try:
        yield c
    finally:
        for device in set(c.agents) - before:
            c.agents[device].close()
        print(c.report(200))


def state_messages(m: Metrics) -> float:
    return sum(m.get("edge_resume_messages_in_total", type=t) for t in STATE_TYPES)


def assert_same_outputs(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        have = got[name]
        assert have.shape == want.shape, (name, have.shape, want.shape)
        assert have.dtype == want.dtype, (name, have.dtype, want.dtype)
        assert have.tobytes() == want.tobytes(), f"output {name} differs from the reference"


_REFERENCE: dict[bytes, dict[str, np.ndarray]] = {}


def reference_outputs(job_file: Path) -> dict[str, np.ndarray]:
    """The outputs of the job run uninterrupted in this process (cached by file content)."""
    key = job_file.read_bytes()
    if key not in _REFERENCE:
        _REFERENCE[key] = reference_run(job_file).outputs()
    return _REFERENCE[key]


def check_outputs(c: Cluster, job_id: str, job_file: Path) -> None:
    """The API's outputs (JSON and .npy) are the uninterrupted run's, bit for bit."""
    expected = reference_outputs(job_file)
    assert_same_outputs(c.api.outputs(job_id), expected)
    assert_same_outputs({k: c.api.output_npy(job_id, k) for k in expected}, expected)


def cut(agent: AgentNode, how: str) -> None:
    if how == "kill":
        agent.kill()
    elif how == "drop":
        agent.drop_link()
    elif how == "block":
        agent.block_link()
    else:  # pragma: no cover
        raise ValueError(how)


def come_back(agent: AgentNode, how: str) -> None:
    if how == "kill":
        agent.start()
    else:
        agent.restore_link()


def cut_resume_stand_down(
    c: Cluster,
    job_id: str,
    job_file: Path,
    how: str,
    *,
    lo: int,
    hi: int,
    early: bool,
    extra: list[str] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The scenario of tests 1-3: run, cut at a random acknowledged step in [lo, hi], see
    the job offline, resume it on the server, compare outputs, bring the agent back (as
    soon as the server claimed the job when ``early``, else after it completed) and check
    that it stands down. Returns the resume as the API reported it at the end, and the job
    as the API showed it offline."""
    rng = seeded(f"{job_id}-{how}")
    agent = c.add_agent(f"gw-{job_id}", [job_file], extra=extra).start()
    total = reference_total(job_file)
    mark = rng.randint(lo, hi)
    c.wait_for(lambda: agent.acked_step(job_id) >= mark, 90,
               f"the server to acknowledge step {mark}", check=agent.check_alive)  # fmt: skip
    cut(agent, how)
    cut_at = agent.local_step(job_id)
    acked_at_cut = agent.acked_step(job_id)
    offline = c.wait_status(job_id, "offline", 30)
    assert offline["owner"] == "edge" and offline["epoch"] == 1
    server_step = offline["progress"]["step"]
    assert mark <= acked_at_cut <= server_step < total
    if how != "kill":  # the agent keeps computing while its link is gone
        c.wait_for(lambda: agent.local_step(job_id) > cut_at, 30,
                   "the agent to go on offline", check=agent.check_alive)  # fmt: skip

    before = c.api.metrics()
    resume = c.api.resume(job_id)
    assert resume["phase"] in ("queued", "claiming", "replaying", "rebuilding", "running")
    again = c.api.resume(job_id)  # idempotent: the same resume
    assert again["requested_at"] == resume["requested_at"]
    claimed = c.wait_for(lambda: (d := c.api.job(job_id))["owner"] == "server" and d, 30,
                         "the server to claim the job", check=c.check)  # fmt: skip
    assert claimed["epoch"] == 2
    if early:
        come_back(agent, how)
    done = c.wait_status(job_id, "completed", 60)
    assert done["owner"] == "server" and done["epoch"] == 2
    assert done["progress"]["step"] == total
    r = done["resume"]
    assert r["phase"] == "completed" and r["epoch"] == 2 and r["error"] is None
    # it went on from the newest state the device sent and the server acknowledged (at
    # least what the API showed offline: a snapshot already on its way when the link went
    # may have been committed just after that)
    offered = {e["step"] for e in agent.events("offered", run=1)}
    assert r["start_step"] in offered and r["start_step"] >= server_step, (r, server_step)
    check_outputs(c, job_id, job_file)
    if not early:
        come_back(agent, how)

    # the agent stands down: it learns the take-over, journals it and exits
    c.wait_for(lambda: agent.meta(job_id).status == "fenced", 30,
               "the agent to journal the job fenced")  # fmt: skip
    assert agent.wait(30) == 0, agent.log_tail()
    meta = agent.meta(job_id)
    assert (meta.status, meta.owner, meta.epoch) == ("fenced", "server", 2)
    taken = agent.events("taken-over")
    assert [e["job"] for e in taken] == [job_id] and taken[0]["epoch"] == 2
    assert taken[0]["via"] == "ctl"  # the retained control message told it
    # it did not finish the job, and sent no snapshot after it learned
    assert agent.events("job-done") == [] and agent.events("completed") == []
    assert not (agent.outputs / f"{job_id}.npz").exists()
    assert agent.local_step(job_id) < total
    last_run = agent.events(run=agent.runs)
    after = last_run[[e.get("event") for e in last_run].index("taken-over") + 1 :]
    assert not [e for e in after if e.get("event") in ("offered", "local-snapshot", "job-done")]

    # the server: nothing from the agent after the take-over was accepted
    end = c.api.metrics()
    for kind in ("full", "delta"):
        assert end.get("edge_resume_commits_total", kind=kind) == before.get(
            "edge_resume_commits_total", kind=kind
        ), "the ingest committed a device snapshot after the job was taken over"

    def all_refused() -> bool:
        """Every state message that reached the server after the claim was refused (those
        the agent sent before it learned, e.g. held up by a blocked link; a BIRTH after a
        restart): a message is counted and refused in the same call, so wait for it."""
        m = c.api.metrics()
        sent = state_messages(m) - state_messages(before)
        refused = m.get("edge_resume_refused_messages_total", reason="Fenced") - before.get(
            "edge_resume_refused_messages_total", reason="Fenced"
        )
        return sent == refused

    c.wait_for(all_refused, 10, "every state message after the take-over to be refused")
    final = c.api.job(job_id)
    assert (final["status"], final["owner"], final["epoch"]) == ("completed", "server", 2)
    check_outputs(c, job_id, job_file)  # unchanged by anything the agent did
    assert agent.blocked_imports() == []
    return r, offline


def reference_total(job_file: Path) -> int:
    from edge_agent.jobs import JobSpec, create_job

    return create_job(JobSpec.load(job_file)).total_steps


# ---------------------------------------------------------------------------------------------
# 1. generate, 2,000 tokens, the KV cache sent


@pytest.mark.parametrize(
    ("how", "early"),
    [("kill", True), ("drop", False), ("block", True)],
    ids=["kill", "drop", "block"],
)
def test_generate_cut_resumed_on_the_server(cluster: Cluster, how: str, early: bool) -> None:
    job_id = f"gen-{how}"
    job = cluster.generate_job(job_id, tokens=2000, kv="send")
    # snapshots of up to 2 MB cut into 16 kB messages: a cut lands inside transfers
    r, offline = cut_resume_stand_down(
        cluster, job_id, job, how, lo=300, hi=1400, early=early,
        extra=["--max-message", "16384"],
    )  # fmt: skip
    assert r["rebuilt"] == []  # the cache was in the acknowledged state
    assert offline["full_size"] > 300 * 1024  # (1 KiB a token)


# ---------------------------------------------------------------------------------------------
# 2. generate with the KV cache recomputed by the server instead of sent


@pytest.mark.parametrize(
    ("how", "early"), [("kill", False), ("block", True)], ids=["kill", "block"]
)
def test_generate_without_the_cache_is_rebuilt_on_the_server(
    cluster: Cluster, how: str, early: bool
) -> None:
    job_id = f"gen-rc-{how}"
    job = cluster.generate_job(job_id, tokens=2000, kv="recompute")
    r, offline = cut_resume_stand_down(cluster, job_id, job, how, lo=300, hi=1400, early=early)
    # the device never sent the cache (the server held a few bytes a token) and the server
    # rebuilt it
    assert offline["full_size"] < 32 * 1024
    keys = sorted(f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value"))
    assert r["rebuilt"] == keys


# ---------------------------------------------------------------------------------------------
# 3. batch: the stateful GRU over the dataset


@pytest.mark.parametrize(("how", "early"), [("kill", True), ("drop", False)], ids=["kill", "drop"])
def test_batch_cut_resumed_on_the_server(cluster: Cluster, how: str, early: bool) -> None:
    job_id = f"gru-{how}"
    job = cluster.batch_job(job_id, batch_size=10, pace=0.008)  # 500 steps
    r, _ = cut_resume_stand_down(cluster, job_id, job, how, lo=60, hi=320, early=early)
    assert r["rebuilt"] == []


def test_only_the_taken_job_stands_down(cluster: Cluster) -> None:
    """One agent, two jobs, the link dropped: the server takes one over; when the link
    comes back the agent stops that one for good (not a step more, not a snapshot) and
    finishes the other itself."""
    c = cluster
    gru = c.batch_job("gru-two", pace=0.008)  # 500 steps
    gen = c.generate_job("gen-two", tokens=500, kv="auto", pace=0.012)
    rng = seeded("two-jobs")
    agent = c.add_agent("gw-two", [gru, gen]).start()
    mark = rng.randint(60, 200)
    c.wait_for(lambda: agent.acked_step("gru-two") >= mark, 60,
               f"the server to acknowledge step {mark}", check=agent.check_alive)  # fmt: skip
    agent.drop_link()
    c.wait_status("gru-two", "offline", 30)
    c.wait_status("gen-two", "offline", 30)
    c.api.resume("gru-two")
    c.wait_status("gru-two", "completed", 60)
    check_outputs(c, "gru-two", gru)
    agent.restore_link()
    c.wait_for(lambda: agent.meta("gru-two").status == "fenced", 30,
               "the agent to journal gru-two fenced", check=agent.check_alive)  # fmt: skip
    stopped_at = agent.local_step("gru-two")
    [taken] = agent.events("taken-over")
    assert (taken["job"], taken["via"], taken["epoch"]) == ("gru-two", "ctl", 2)
    # the other job goes on on the device, is snapshotted and completes there
    assert agent.wait(60) == 0, agent.log_tail()
    done = c.wait_status("gen-two", "completed", 30)
    assert (done["owner"], done["epoch"], done["resume"]) == ("edge", 1, None)
    check_outputs(c, "gen-two", gen)
    assert_same_outputs(dict(np.load(agent.outputs / "gen-two.npz")), reference_outputs(gen))
    # the taken job: nothing more after the agent learned, though the agent ran on
    assert agent.local_step("gru-two") == stopped_at < 500
    after = agent.events()
    after = after[after.index(taken) + 1 :]
    assert [e for e in after if e.get("job") == "gru-two"] == []
    assert not (agent.outputs / "gru-two.npz").exists()
    assert agent.meta("gen-two").status == "done"


# ---------------------------------------------------------------------------------------------
# 4. live hand-over of an online job


def test_live_handover_recomputes_nothing(cluster: Cluster) -> None:
    """The device hands its job over while online: a final snapshot with the KV cache (its
    periodic ones left it out), RELEASE, and the server goes on from exactly that step."""
    c = cluster
    job_id = "gen-ho"
    job = c.generate_job(job_id, tokens=2000, kv="recompute")
    rng = seeded(job_id)
    agent = c.add_agent("gw-ho", [job]).start()
    mark = rng.randint(300, 1400)
    c.wait_for(lambda: agent.acked_step(job_id) >= mark, 90,
               f"the server to acknowledge step {mark}", check=agent.check_alive)  # fmt: skip
    running = c.api.job(job_id)
    assert (running["status"], running["owner"], running["epoch"]) == ("running", "edge", 1)
    assert running["full_size"] < 32 * 1024  # snapshots without the cache so far
    before = c.api.metrics()
    r = c.api.handover(job_id)
    assert r["phase"] == "handover-requested"
    done = c.wait_status(job_id, "completed", 60)
    assert agent.wait(30) == 0, agent.log_tail()

    # the device: it stopped after one step, handed over at S, computed nothing more
    [handover] = agent.events("handover")
    step = handover["step"]
    assert mark <= step < 2000
    [taken] = agent.events("taken-over")
    assert taken["handed_over"] is True and taken["epoch"] == 2 and taken["step"] == step
    assert taken["via"] == "ctl"
    final = [e for e in agent.events("offered") if e["final"]]
    assert [(e["step"], e["kv"]) for e in final] == [(step, True)]  # the cache went along
    meta = agent.meta(job_id)
    assert (meta.status, meta.owner, meta.epoch) == ("released", "server", 2)
    assert agent.events("job-done") == [] and not (agent.outputs / f"{job_id}.npz").exists()

    # the server: went on from S (its first step computed S + 1), rebuilt nothing
    res = done["resume"]
    assert (res["phase"], res["epoch"], res["error"]) == ("completed", 2, None)
    assert res["start_step"] == step
    assert res["rebuilt"] == []
    assert res["attempt"] == 1
    detail = c.api.job(job_id)
    history = [(h["status"], h["detail"]) for h in detail["history"]]
    assert ("resuming", "released by the device") in history
    assert ("server-running", f"epoch 2, from step {step}") in history
    assert "offline" not in [h for h, _ in history]  # never offline: a live hand-over
    end = c.api.metrics()

    def delta(name: str, **labels: str) -> float:
        return end.get(name, **labels) - before.get(name, **labels)

    assert delta("edge_resume_takeovers_total", reason="release") == 1
    assert delta("edge_resume_takeovers_total", reason="takeover") == 0
    # the final snapshot (and the periodic one, if one was in flight when asked)
    assert 1 <= delta("edge_resume_commits_total") <= 2
    check_outputs(c, job_id, job)
    # started again, the agent finds the job released in its journal and does not run it
    agent.start()
    assert agent.wait(30) == 0, agent.log_tail()
    assert [e["status"] for e in agent.events("job-over", run=2)] == ["released"]
    assert agent.events("connected", run=2) == []  # nothing left to run: no connection
    assert agent.blocked_imports() == []


# ---------------------------------------------------------------------------------------------
# 5. the server SIGKILLed during ingest and during compaction


def check_store_after_kill(c: Cluster, agent: AgentNode, job_id: str) -> int:
    """With the server dead: ``verify`` passes, and the store holds every state the agent
    was told is acknowledged: the journal's acked seq with its hash, and every seq the
    agent logged as acked is at or below the store's. (An ACK the server published just
    before it died may still reach the agent while this runs: it was stored before it was
    sent, so whatever the journal says, now or later, must be in the store.) Returns the
    store's seq."""
    assert not c.server.alive
    v = c.server.verify()
    assert v.returncode == 0, f"verify after the kill:\n{v.stdout}\n{v.stderr}"
    assert v.stdout.startswith("OK"), v.stdout
    from server.store import SQLiteStore

    with SQLiteStore(c.server.store_path, create=False) as store:
        rec = store.get_job(job_id)
        assert rec is not None and rec.seq is not None
        held = {s.seq: s for s in store.snapshots(job_id)}
        newest = store.load_state(job_id)  # replays, every hash checked
        assert newest.seq == rec.seq and newest.state_hash == rec.state_hash
        acked = agent.acked(job_id)  # the journal, read-only
        assert acked is not None, "nothing was acknowledged before the kill"
        seq, state_hash, step = acked
        assert rec.seq >= seq, f"the store is at seq {rec.seq}, the agent was acked {seq}"
        if rec.seq == seq:  # the acknowledged state is the store's newest
            assert rec.state_hash == state_hash
        if seq in held:  # (a newer commit whose ack the kill swallowed may have folded it)
            assert held[seq].state_hash == state_hash
            assert store.load_state(job_id, seq).state_hash == state_hash
        assert newest.state["step"] >= step
    logged = [e["seq"] for e in agent.events("acked") if e["job"] == job_id]
    assert logged and max(logged) <= rec.seq
    return rec.seq


def acked_seq(agent: AgentNode, job_id: str) -> int:
    a = agent.acked(job_id)
    return 0 if a is None else a[0]


def kill_during_compaction(c: Cluster, job_id: str, timeout: float = 20.0) -> bool:
    """SIGKILL the server as soon as its log shows a compaction of ``job_id`` under way.
    True when the log, read after the kill, ends that compaction unfinished."""
    follower = c.server.follow()
    start, done = f"job {job_id}: compaction check", f"job {job_id}: compaction check done"
    open_check = False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c.check()
        for line in follower.new_lines():
            if done in line:
                open_check = False
            elif start in line:
                open_check = True
        if open_check:
            c.server.kill()
            for line in follower.new_lines():  # what it wrote before it died
                if done in line:
                    open_check = False
                elif start in line:
                    open_check = True
            return open_check
        time.sleep(0.002)
    raise AssertionError(f"no compaction of {job_id} within {timeout}s\n{c.report()}")


def test_server_killed_during_ingest_and_compaction(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    # compaction after every delta (a delta is always > 1% of a baseline), checked often
    config = {"store": {"compact_interval_s": 0.05, "delta_ratio": 0.01, "max_deltas": 1}}
    with running_cluster(tmp_path, tiny_models, server_config=config,
                         server_log_level="debug") as c:  # fmt: skip
        job_id = "gen-srv"
        job = c.generate_job(job_id, tokens=2000, kv="send", pace=0.008, every_steps=40,
                             every_seconds=0.25)  # fmt: skip
        rng = seeded(job_id)
        agent = c.add_agent("gw-1", [job], extra=["--max-message", "16384"]).start()

        # 1. during ingest: right after the agent offered a snapshot, before or while the
        # server applies, stores and acknowledges it
        mark = rng.randint(150, 500)
        c.wait_for(lambda: agent.acked_step(job_id) >= mark, 90,
                   f"the server to acknowledge step {mark}", check=agent.check_alive)  # fmt: skip
        n = len(agent.events("offered"))
        c.wait_for(lambda: len(agent.events("offered")) > n, 30, "a snapshot in flight",
                   check=agent.check_alive, interval=0.002)  # fmt: skip
        time.sleep(rng.uniform(0.0, 0.03))
        c.server.kill()
        seq1 = check_store_after_kill(c, agent, job_id)
        c.server.start()

        # 2. during compaction (a race with the log; tried until a kill lands inside one)
        landed = 0
        for _ in range(6):
            c.wait_for(lambda s=seq1: acked_seq(agent, job_id) > s, 60,  # type: ignore[misc]
                       "an acknowledgement after the restart", check=agent.check_alive)  # fmt: skip
            landed += kill_during_compaction(c, job_id)
            seq1 = check_store_after_kill(c, agent, job_id)
            c.server.start()
            if landed:
                break
        assert landed, "no SIGKILL landed inside a compaction"
        assert agent.local_step(job_id) < 2000, "the job ended before the drill did"

        # 3. the job completes on the device, with the right outputs everywhere
        assert agent.wait(120) == 0, agent.log_tail()
        done = c.wait_status(job_id, "completed", 30)
        assert (done["owner"], done["epoch"], done["progress"]["step"]) == ("edge", 1, 2000)
        check_outputs(c, job_id, job)
        got = dict(np.load(agent.outputs / f"{job_id}.npz"))
        assert_same_outputs(got, reference_outputs(job))
        assert agent.meta(job_id).status == "done"
        assert c.server.terminate() == 0
        v = c.server.verify()
        assert v.returncode == 0 and v.stdout.startswith("OK"), v.stdout + v.stderr
        # after the run: the agent's journal (read-only) names the store's final state
        assert check_store_after_kill(c, agent, job_id) == acked_seq(agent, job_id)
        assert agent.blocked_imports() == []
