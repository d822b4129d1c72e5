"""Both protocol ends over a fake link that drops, duplicates, reorders, delays, corrupts and
replays messages, with disconnects, agent crashes (at any point in a session's item list),
server restarts and store failures: thousands of seeded rounds.

Every round, :meth:`Pair.check` asserts: the server's state is one the agent really offered
(its hash is in the set of states the agent produced) and hashes to what the session says;
commits come in strictly increasing seq and never go back in steps; every ack the agent took
matches a commit; after a takeover the server's state never changes; a closed agent session
never sends again. Once the link heals, the server must catch up within a bounded number of
rounds.

Longer soak runs: EDGE_RESUME_SOAK_SEEDS (default 24) and EDGE_RESUME_SOAK_ROUNDS (default
250) scale every scenario, and EDGE_RESUME_SOAK_SEED0 moves the seeds, e.g.
``EDGE_RESUME_SOAK_SEED0=1000 EDGE_RESUME_SOAK_SEEDS=500 EDGE_RESUME_SOAK_ROUNDS=2000``.
"""

from __future__ import annotations

import os
import random

import pytest

from edge_agent.protocol import HandoverRequested, TakenOver
from edge_agent.protocol.agent import Completed
from edge_agent.state import state_hash
from tests.support.protocol_pair import DEVICE, JOB, Faults, Pair, sent_state

SEED0 = int(os.environ.get("EDGE_RESUME_SOAK_SEED0", "0"))
SEEDS = int(os.environ.get("EDGE_RESUME_SOAK_SEEDS", "24"))
ROUNDS = int(os.environ.get("EDGE_RESUME_SOAK_ROUNDS", "250"))
#: Rounds (0.5 s each) a healed link may take to bring the server up to date: in-transit
#: messages delayed up to 12 s, then birth, sync, query, need, resend, ack, one more offer.
HEAL_LIMIT = 120


def chaos_pair(seed: int, **kw: object) -> Pair:
    return Pair(seed, faults=Faults.chaos(random.Random(seed * 7919 + 1)), **kw)  # type: ignore[arg-type]


def target_hash(pair: Pair) -> bytes:
    return state_hash(sent_state(pair.agent.job.state(), False))


def heal_and_catch_up(pair: Pair) -> int:
    pair.agent.include_derivable_p = 0.0
    pair.heal()
    return pair.run_until(
        lambda: (
            pair.server.session.current_hash == target_hash(pair)
            and pair.agent.session.acked_hash == target_hash(pair)
        ),
        HEAL_LIMIT,
        steps=False,
        faults=False,
    )


@pytest.mark.parametrize("seed", range(SEED0, SEED0 + SEEDS))
def test_chaos_then_heal_catches_up(seed: int) -> None:
    pair = chaos_pair(seed)
    for _ in range(ROUNDS):
        pair.round()
    heal_and_catch_up(pair)
    # the faults really happened, and the protocol really made progress through them
    assert pair.agent.job.step == ROUNDS
    assert len(pair.server.history) >= 1


def test_chaos_exercises_every_path() -> None:
    """Across a few seeds the faults cover every recovery path (so the test above can fail)."""
    stats: dict[str, int] = {}
    reasons: set[str] = set()
    kinds: set[str] = set()
    for seed in range(6):
        pair = chaos_pair(seed)
        pair.link.faults.corrupt_data = 0.05
        pair.link.faults.agent_crash = 0.02
        pair.link.faults.foreign = 0.05
        for _ in range(250):
            pair.round()
        heal_and_catch_up(pair)
        for k, v in pair.link.stats.items():
            stats[k] = stats.get(k, 0) + v
        reasons |= {type(r.error).__name__ for r in pair.server.refused}
        kinds |= {type(e).__name__ for e in pair.agent.events}
    for what in (
        "dropped",
        "corrupted",
        "corrupted_data",
        "replayed",
        "foreign",
        "server_refused",
        "agent_refused",
        "crash_mid_items",
        "server_restarts",
    ):
        assert stats.get(what, 0) > 0, f"no {what} in {stats}"
    assert {"TopicMismatch", "MalformedMessage"} <= reasons, reasons
    assert {"Offered", "Acked", "Synced", "NeedsFull", "TransferAbandoned", "Outgoing"} <= kinds


def test_perfect_link_needs_no_retries() -> None:
    pair = Pair(1)
    for _ in range(200):
        pair.round()
    n = heal_and_catch_up(pair)
    assert n <= 4
    sent = [e for e in pair.agent.events if getattr(e, "type", None) == "query"]
    assert sent == [], "no query on a perfect link"
    assert not pair.server.refused


def test_replayed_and_duplicated_messages_change_nothing() -> None:
    pair = Pair(3)
    for _ in range(120):
        pair.round()
    heal_and_catch_up(pair)
    before = (pair.server.record.copy(), list(pair.server.history), pair.agent.session.acked_seq)
    history = list(pair.link.history)
    random.Random(5).shuffle(history)
    for to_agent, topic, payload in history * 2:
        if to_agent:
            pair.agent.deliver(topic, payload, pair.now)
        else:
            pair.server.deliver(topic, payload, pair.now)
        pair.check()
    for _ in range(10):  # and whatever the replies set off
        pair.round(steps=False, faults=False)
    after = (pair.server.record, pair.server.history, pair.agent.session.acked_seq)
    assert after[1] == before[1] and after[2] == before[2]
    assert after[0]["current"] == before[0]["current"]
    assert after[0]["epoch"] == before[0]["epoch"] and after[0]["owner"] == "edge"


@pytest.mark.parametrize("seed", range(SEED0, SEED0 + max(4, SEEDS // 3)))
def test_takeover_fences_the_agent(seed: int) -> None:
    pair = chaos_pair(seed)
    at = random.Random(seed).randint(20, ROUNDS)
    for _ in range(at):
        pair.round()
    server = pair.server
    server.carry_out(server.session.take_over(pair.now), pair.now)
    assert server.session.owner == "server" and server.session.epoch == 2
    for _ in range(ROUNDS // 2):  # the agent keeps trying; nothing it sends changes anything
        pair.round()
    pair.heal()
    pair.run_until(lambda: pair.agent.stopped, HEAL_LIMIT, faults=False)
    closed = pair.agent.closed_by
    assert isinstance(closed, TakenOver) and closed.epoch == 2 and not closed.handed_over
    assert pair.server.takeover_at == pair.server.record["current"]
    # once stopped it stays silent, even across restarts and reconnects
    sent_before = len(pair.link.history)
    pair.agent.crash_and_restart()
    pair.agent.connect(pair.now)
    for _ in range(40):
        pair.round(faults=False)
    assert [h for h in pair.link.history[sent_before:] if not h[0]] == []


@pytest.mark.parametrize("seed", range(SEED0, SEED0 + max(4, SEEDS // 3)))
def test_live_handover(seed: int) -> None:
    pair = chaos_pair(seed)
    at = random.Random(seed).randint(20, ROUNDS)
    for _ in range(at):
        pair.round()
    server = pair.server
    server.carry_out(server.session.request_handover(pair.now), pair.now)
    for _ in range(ROUNDS // 4):
        pair.round()
    pair.heal()
    pair.run_until(lambda: pair.agent.stopped, HEAL_LIMIT, faults=False)
    closed = pair.agent.closed_by
    assert isinstance(closed, TakenOver), closed
    # handed_over, unless the process that sent RELEASE died and a new one learnt of it later
    assert closed.handed_over or pair.agent.released_generation < pair.agent.generation
    assert any(isinstance(e, HandoverRequested) for e in pair.agent.events)
    # the server holds the final state, derivable entries included: nothing to recompute
    final = server.session.current_hash
    assert final in pair.agent.handover_hashes
    assert "kv" in server.states[final]
    if closed.handed_over:  # the same process: the very state it handed over last
        assert final == pair.agent.handover_hashes[-1]
    assert server.session.owner == "server" and server.owner_changes[-1].reason == "release"


@pytest.mark.parametrize("seed", range(SEED0, SEED0 + max(4, SEEDS // 3)))
def test_job_completes(seed: int) -> None:
    total = random.Random(seed).randint(30, ROUNDS)
    pair = chaos_pair(seed, total_steps=total)
    for _ in range(total + 20):
        pair.round()
    pair.heal()
    pair.run_until(lambda: pair.agent.stopped, HEAL_LIMIT, faults=False)
    assert isinstance(pair.agent.closed_by, Completed), pair.agent.closed_by
    assert pair.server.record["completed"]
    assert pair.server.session.current_hash == target_hash(pair)
    assert pair.server.session.step == total


def test_wrong_device_messages_are_refused() -> None:
    pair = Pair(11, faults=Faults(foreign=1.0))
    for _ in range(60):
        pair.round()
    heal_and_catch_up(pair)
    assert pair.link.stats["foreign"] >= 50
    assert pair.link.stats["server_refused"] > 0  # on the agent's own topic: route() refuses
    refused = [r for r in pair.server.refused if type(r.error).__name__ == "TopicMismatch"]
    assert refused  # on mallory's topic for the same job id: the session refuses
    assert all(d == DEVICE for d in [pair.server.record["birth"].device])
    assert pair.server.record["birth"].job == JOB
