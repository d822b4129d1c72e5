"""The agent's pure policies: snapshot schedule, link capacity, step rate, KV decisions."""

from __future__ import annotations

import itertools

import pytest

from edge_agent.errors import JobSpecError
from edge_agent.policy import (
    DEFAULT_LINK_RATE,
    KvPolicy,
    LinkCapacity,
    OverheadBudget,
    SnapshotPolicy,
    StepRate,
)

# -- SnapshotPolicy ---------------------------------------------------------------------------


def test_every_n_steps() -> None:
    p = SnapshotPolicy(10, None, step=0, now=0.0)
    assert not p.local_due(9, 1e6) and not p.send_due(9, 1e6)  # time alone never counts
    assert p.local_due(10, 0.0) and p.send_due(10, 0.0)
    p.took_local(10, 0.0)
    assert not p.local_due(15, 0.0) and p.send_due(15, 0.0)  # the send clock runs apart
    p.sent(15, 0.0)
    assert not p.local_due(24, 0.0) and not p.send_due(24, 0.0)
    assert p.local_due(25, 0.0) and p.send_due(25, 0.0)


def test_every_t_seconds_needs_progress() -> None:
    p = SnapshotPolicy(None, 5.0, step=0, now=100.0)
    assert not p.send_due(3, 104.9)
    assert p.send_due(3, 105.0) and p.local_due(3, 105.0)
    assert not p.send_due(0, 1e9)  # no step since the mark: nothing new to snapshot
    p.sent(3, 106.0)
    assert not p.send_due(3, 200.0)  # the same step again: never
    assert p.send_due(4, 111.0)


def test_steps_or_seconds_whichever_first() -> None:
    p = SnapshotPolicy(100, 2.0, step=0, now=0.0)
    assert p.send_due(100, 0.1)  # steps first
    assert p.send_due(1, 2.0)  # seconds first
    assert not p.send_due(99, 1.9)


def test_force_send_ignores_the_schedule_once() -> None:
    p = SnapshotPolicy(10, None, step=0, now=0.0)
    p.sent(10, 0.0)
    assert not p.send_due(10, 0.0)
    p.force_send()
    assert p.send_due(10, 0.0)  # even at the same step: the server lost our base
    p.sent(10, 1.0)
    assert not p.send_due(10, 1.0)


def test_restart_sends_at_once_when_the_server_is_behind() -> None:
    behind = SnapshotPolicy.for_job(50, 10.0, step=340, acked_step=300, now=1000.0)
    assert behind.send_due(341, 1000.0) and not behind.local_due(341, 1000.0)
    caught_up = SnapshotPolicy.for_job(50, 10.0, step=300, acked_step=300, now=1000.0)
    assert not caught_up.send_due(301, 1000.0) and caught_up.send_due(350, 1000.0)
    fresh = SnapshotPolicy.for_job(50, 10.0, step=0, acked_step=None, now=1000.0)
    assert not fresh.send_due(1, 1000.0)
    never_acked = SnapshotPolicy.for_job(None, 10.0, step=30, acked_step=None, now=1000.0)
    assert never_acked.send_due(31, 1000.0)


def test_expected_interval_is_never_shorter_than_a_transfer() -> None:
    p = SnapshotPolicy(100, 10.0, step=0, now=0.0)
    assert p.expected_interval(50.0) == (2.0, 100.0)  # 100 steps at 50/s: 2 s
    assert p.expected_interval(5.0) == (10.0, 50.0)  # seconds first
    assert p.expected_interval(50.0, transfer_seconds=8.0) == (8.0, 400.0)
    assert p.expected_interval(None) == (10.0, 100.0)


@pytest.mark.parametrize(
    ("steps", "seconds"), [(None, None), (0, None), (None, 0.0), (None, float("nan"))]
)
def test_snapshot_policy_refuses_a_bad_schedule(steps: int | None, seconds: float | None) -> None:
    with pytest.raises(JobSpecError):
        SnapshotPolicy(steps, seconds, step=0, now=0.0)


# -- StepRate, LinkCapacity ---------------------------------------------------------------------


# -- OverheadBudget ---------------------------------------------------------------------------


def test_overhead_budget_fits_payload_against_steps() -> None:
    b = OverheadBudget(0.10, 60.0)
    assert b.model() is None and b.min_steps() is None  # nothing measured: never held
    # a payload of 125 bytes + 1 byte a step, a send costing 100 bytes besides it
    b.observe(steps=40, payload_bytes=165, cost_bytes=100)
    assert b.model() == pytest.approx((165 / 2, 165 / 80))  # one point: half of it scales
    # the next send must carry 1,000 bytes (100 at 10%), and make up for this one: the
    # two together carry 200 bytes of cost, so 2,000 bytes of payload
    assert b.min_steps() == pytest.approx((2000 - 165 - 165 / 2) / (165 / 80))
    b.observe(steps=242, payload_bytes=367, cost_bytes=100)
    a, slope = b.model()  # type: ignore[misc]
    assert (a, slope) == pytest.approx((125.0, 1.0))
    assert b.min_steps() == pytest.approx(3000 - 532 - 125)  # catching up with the first two
    b.observe(steps=2343, payload_bytes=2468, cost_bytes=100)
    assert b.total_cost == 300 and b.total_payload == 3000  # 10% so far, exactly
    assert b.min_steps() == pytest.approx(875.0)  # from now on: 1,000 bytes a send
    assert b.cost == pytest.approx(100.0)


def test_a_full_snapshot_stands_in_until_a_delta_is_measured() -> None:
    b = OverheadBudget(0.10, 60.0)
    b.observe(steps=40, payload_bytes=200, cost_bytes=100, full=True)
    assert b.model() == pytest.approx((100.0, 2.5))
    assert b.min_steps() == pytest.approx((2000 - 200 - 100) / 2.5)
    b.observe(steps=100, payload_bytes=225, cost_bytes=100)
    assert b.model() == pytest.approx((112.5, 1.125))  # the deltas' own from now on


def test_overhead_budget_does_not_hold_what_would_not_help() -> None:
    b = OverheadBudget(0.10, 60.0)
    b.observe(steps=10, payload_bytes=5000, cost_bytes=100)  # the payload carries its cost
    b.observe(steps=20, payload_bytes=10000, cost_bytes=100)
    assert b.min_steps() == pytest.approx(2.0)  # well within any schedule: never held
    flat = OverheadBudget(0.10, 60.0)
    flat.observe(steps=10, payload_bytes=300, cost_bytes=100)  # payloads that do not grow
    flat.observe(steps=50, payload_bytes=290, cost_bytes=100)
    assert flat.min_steps() is None  # a longer interval would not lower the share
    big = OverheadBudget(0.10, 60.0)
    big.observe(steps=10, payload_bytes=0, cost_bytes=100)  # ignored: nothing to learn
    big.observe(steps=0, payload_bytes=10, cost_bytes=100)
    assert big.min_steps() is None


@pytest.mark.parametrize(
    ("budget", "lag"), [(0.0, 60.0), (-1.0, 60.0), (0.1, 0.0), (0.1, float("nan"))]
)
def test_overhead_budget_refuses_bad_settings(budget: float, lag: float) -> None:
    with pytest.raises(JobSpecError):
        OverheadBudget(budget, lag)


def test_send_is_held_by_the_budget_until_max_lag() -> None:
    b = OverheadBudget(0.10, 30.0)
    p = SnapshotPolicy(None, 2.0, step=0, now=0.0, overhead=b)
    assert p.send_due(40, 2.0) and not p.held  # nothing measured yet
    p.sent(40, 2.0)
    b.observe(steps=40, payload_bytes=165, cost_bytes=100)
    b.observe(steps=80, payload_bytes=205, cost_bytes=100)  # 125 + 1 a step
    need = 3000 - 370 - 125  # 300 bytes of cost in three sends: 3,000 bytes of payload
    assert b.min_steps() == pytest.approx(need)
    assert not p.send_due(80, 4.0) and p.held  # due on the schedule, held by the budget
    assert not p.local_due(40, 4.0) and p.local_due(80, 4.0)  # local snapshots are not held
    assert not p.send_due(40 + need - 1, 20.0)
    assert p.send_due(40 + need, 20.0) and not p.held
    assert p.send_due(100, 32.0)  # or max_lag_seconds since the last send, whatever the steps
    b.round_trip = 5.0
    assert p.send_due(100, 27.0) and not p.send_due(100, 26.9)  # ...less an offer-to-ack
    p.force_send()
    assert p.send_due(41, 3.0)  # a forced send (NeedsFull) is never held
    # the expected interval follows the budget, up to max_lag_seconds
    assert p.expected_interval(100.0) == pytest.approx((need / 100, need))
    assert p.expected_interval(5.0) == pytest.approx((30.0, 150.0))


def test_step_rate() -> None:
    r = StepRate(half_life=5.0)
    assert r.rate() is None
    for i in range(50):
        r.observe(i * 10, i * 0.5)  # 20 steps/s
    assert r.rate() == pytest.approx(20.0)
    for i in range(50, 150):
        r.observe(500 + (i - 50) * 2, i * 0.5)  # slows to 4 steps/s
    assert r.rate() == pytest.approx(4.0, rel=0.05)


def test_link_capacity_is_bounded_by_the_cap_and_ignores_small_transfers() -> None:
    cap = LinkCapacity(8000.0)
    assert cap.rate() == 8000.0 and not cap.measured  # nothing measured: the cap
    cap.observe_transfer(500, 0.05)  # 10 kB/s, but a 500-byte transfer measures latency
    assert not cap.measured and cap.rate() == 8000.0
    cap.observe_transfer(64_000, 16.0)  # 4 kB/s: the link is slower than the cap
    assert cap.rate() == pytest.approx(4000.0)
    cap.observe_transfer(64_000, 2.0, drain_rate=50_000.0)  # fast readings: still the cap
    assert cap.rate() == 8000.0
    free = LinkCapacity(None)
    assert free.rate() == DEFAULT_LINK_RATE
    free.observe_transfer(1_000_000, 1.0, drain_rate=2_000_000.0)
    assert free.rate() == 2_000_000.0  # the drain reading during the transfer


# -- KvPolicy --------------------------------------------------------------------------------


def decide(p: KvPolicy, step: int, kv_bytes: int, rate: float = 8000.0, steps: float = 100.0):
    return p.decide(
        step=step, derivable_bytes=kv_bytes, link_rate=rate, interval_s=10.0,
        steps_per_interval=steps,
    )  # fmt: skip


def test_send_and_recompute_are_fixed() -> None:
    send, never = KvPolicy("send"), KvPolicy("recompute")
    for step in range(0, 1000, 100):
        assert decide(send, step, step * 1024, rate=1.0).include
        assert not decide(never, step, step * 1024, rate=1e12).include


def test_auto_includes_the_cache_while_the_link_can_carry_it() -> None:
    # 1 KiB of cache per step, 10 steps/s, 100 steps an interval of 10 s: ~100 kB/interval
    p = KvPolicy("auto")
    fast = 100_000.0  # 1 MB per interval at 50%: plenty
    assert decide(p, 100, 100 * 1024, rate=fast).include  # the whole cache fits: switch on
    p.observe(step=100, base_step=None, payload_bytes=100 * 1024 + 900, included=True,
              derivable_raw=100 * 1024)  # fmt: skip
    for step in range(200, 1000, 100):
        d = decide(p, step, step * 1024, rate=fast)
        assert d.include and d.estimate < d.budget
        p.observe(step=step, base_step=step - 100, payload_bytes=100 * 1024 + 900, included=True,
                  derivable_raw=100 * 1024)  # fmt: skip
    # the link drops to 64 kbit/s: 40 kB per interval at 50% cannot carry ~100 kB
    d = decide(p, 1000, 1000 * 1024, rate=8000.0)
    assert not d.include and d.estimate > d.budget and p.on is False
    assert "cannot carry" in d.reason


def test_auto_switches_back_on_only_when_sending_the_whole_cache_fits() -> None:
    p = KvPolicy("auto", min_hold=0)
    decide(p, 100, 100 * 1024, rate=1000.0)  # learn the growth: 1 KiB/step
    for step in range(200, 600, 100):
        d = decide(p, step, step * 1024, rate=1000.0)
        assert not d.include
        p.observe(step=step, base_step=step - 100, payload_bytes=800, included=False,
                  derivable_raw=0)  # fmt: skip
    # steady growth alone (~100 kB/interval) would fit a 300 kB budget, but the whole
    # cache (600 KiB) must go first: stay off
    d = decide(p, 600, 600 * 1024, rate=60_000.0)
    assert not d.include and d.estimate > 600 * 1024
    # a link fast enough for the whole cache, with margin, within two intervals: on
    d = decide(p, 700, 700 * 1024, rate=120_000.0)
    assert d.include and d.estimate <= d.budget * p.switch_on_margin * p.switch_on_intervals


def test_auto_turns_the_cache_on_early_when_its_growth_fits() -> None:
    # 64 kbit/s, 2 s intervals: an 8 kB budget at 50%
    def run(tokens_per_interval: int) -> list[bool]:
        p = KvPolicy("auto")
        out = []
        for n in range(1, 8):
            step = n * tokens_per_interval
            d = p.decide(step=step, derivable_bytes=step * 1024, link_rate=8000.0,
                         interval_s=2.0, steps_per_interval=float(tokens_per_interval))  # fmt: skip
            p.observe(step=step, base_step=step - tokens_per_interval,
                      payload_bytes=(tokens_per_interval * 1024 if d.include else 0) + 40,
                      included=d.include, derivable_raw=tokens_per_interval * 1024)  # fmt: skip
            out.append(d.include)
        return out

    # 4 tokens (4 KiB of cache) an interval: half the budget; the whole cache is small at
    # first: on, and it stays on
    assert run(4) == [True] * 7
    # 16 tokens an interval (16 KiB, twice the budget): never
    assert run(16) == [False] * 7


def test_auto_does_not_flap_around_the_threshold() -> None:
    p = KvPolicy("auto", min_hold=3)
    need = 100 * 1024  # the cache's steady growth per interval (1 KiB/step, 100 steps)
    on_rate = need / (10.0 * p.utilization)  # the rate at which exactly that fits
    assert decide(p, 10, 10 * 1024, rate=1e9).include
    seq = []
    for i, step in enumerate(range(100, 5100, 100)):
        rate = on_rate * (1.05 if i % 2 else 0.95)  # a link wobbling +-5% around the edge
        d = decide(p, step, step * 1024, rate=rate)
        p.observe(step=step, base_step=step - 100, payload_bytes=need + 50 if d.include else 50,
                  included=d.include, derivable_raw=need if d.include else 0)  # fmt: skip
        seq.append(d.include)
    switches = sum(a != b for a, b in itertools.pairwise(seq))
    assert switches <= 1 and not seq[-1]  # off once, and it stays off


def test_auto_holds_after_switching_off() -> None:
    p = KvPolicy("auto", min_hold=3, switch_on_margin=1.0)
    assert decide(p, 10, 10 * 1024, rate=1e9).include
    assert not decide(p, 20, 20 * 1024, rate=1.0).include  # the link collapses: off
    held = [decide(p, 20 + n, (20 + n) * 1024, rate=1e9).include for n in range(1, 5)]
    assert held == [False, False, False, True]  # three snapshots off, whatever the link


def test_auto_learns_the_codecs_ratio_from_payloads() -> None:
    p = KvPolicy("auto")
    decide(p, 100, 100_000, rate=1e9)
    p.observe(step=100, base_step=None, payload_bytes=1_000, included=False, derivable_raw=0)
    p.observe(step=200, base_step=100, payload_bytes=1_000 + 25_000, included=True,
              derivable_raw=100_000)  # fmt: skip
    decide(p, 200, 200_000, rate=1e9)
    steady, whole = p.estimates(100.0, 200_000)
    assert whole == pytest.approx(200_000 * 0.25, rel=0.3)  # a 4:1 codec on the cache
    assert steady < 100 * 1000 * 1.0  # far below the raw growth (1,000 bytes/step)


def test_kv_policy_refuses_unknown_modes() -> None:
    with pytest.raises(JobSpecError, match="kv policy"):
        KvPolicy("sometimes")
    with pytest.raises(ValueError):
        KvPolicy("auto", utilization=0.0)
