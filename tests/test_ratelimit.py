"""The pacing policies, driven by a fake clock: rate, priorities, no starvation, back-off."""

from __future__ import annotations

import random

import pytest

from edge_agent.ratelimit import (
    Backoff,
    LinkRateEstimator,
    Priority,
    PriorityPacer,
    TokenBucket,
    kbps_to_bytes_per_s,
)

RATE = kbps_to_bytes_per_s(64)  # 8,000 bytes per second


def drain(pacer: PriorityPacer[str], now: float, until: float) -> list[tuple[float, str]]:
    """Release everything the pacer allows between now and until, as a sender would."""
    out = []
    while True:
        d = pacer.delay(now)
        if d is None or now + d > until:
            return out
        now += d
        item = pacer.pop(now)
        assert item is not None, "delay() said an item was ready"
        out.append((now, item))


def test_kbps_are_kilobits() -> None:
    assert kbps_to_bytes_per_s(64) == 8000.0


def test_token_bucket_refills_to_burst_and_goes_into_debt() -> None:
    b = TokenBucket(1000, 500, now=0.0)
    assert b.tokens(0.0) == 0.0
    assert b.tokens(0.3) == pytest.approx(300)
    assert b.tokens(10.0) == 500  # capped at burst
    b.consume(2500, 10.0)
    assert b.tokens(10.0) == -2000
    assert b.wait_time(10.0) == pytest.approx(2.0)
    assert b.wait_time(12.0) == 0.0
    assert b.wait_time(12.0, level=600) == float("inf")  # more than the bucket holds
    with pytest.raises(ValueError):
        TokenBucket(0, 10, now=0.0)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_rate_is_held_within_a_few_percent(seed: int) -> None:
    rng = random.Random(seed)
    pacer: PriorityPacer[str] = PriorityPacer(RATE, now=0.0)
    sizes = [rng.randint(50, 3000) for _ in range(400)]
    for i, size in enumerate(sizes):
        pacer.push(f"m{i}", size, rng.choice([Priority.DELTA, Priority.FULL]))
    released = drain(pacer, 0.0, 1e9)
    assert len(released) == len(sizes)
    by_name = {f"m{i}": s for i, s in enumerate(sizes)}
    times = [t for t, _ in released]
    # the average over the whole run: every byte but the last message's was paid before it left
    total = sum(sizes) - by_name[released[-1][1]]
    assert total / (times[-1] - times[0]) == pytest.approx(RATE, rel=0.03)
    # and no window of 2 s or more carries more than rate * window + one burst + one message
    for i in range(0, len(released), 7):
        for j in range(i + 1, len(released)):
            window = times[j] - times[i]
            if window >= 2.0:
                sent = sum(by_name[n] for _, n in released[i : j + 1])
                assert sent <= RATE * window + 1500 + 3000 + 1e-6
                break


def test_rate_holds_with_idle_gaps_and_the_burst_is_bounded() -> None:
    pacer: PriorityPacer[str] = PriorityPacer(RATE, now=0.0, burst=2000)
    # idle for 10 s: the bucket saves at most its burst
    for i in range(20):
        pacer.push(f"a{i}", 1000, Priority.DELTA)
    released = drain(pacer, 10.0, 1e9)
    in_first_instant = [n for t, n in released if t == 10.0]
    assert len(in_first_instant) == 3  # 2000 saved up: two messages, then one more into debt


def test_priorities_first_and_fifo_within_a_priority() -> None:
    pacer: PriorityPacer[str] = PriorityPacer(None, now=0.0)
    for i in range(3):
        pacer.push(f"full{i}", 100_000, Priority.FULL)
        pacer.push(f"delta{i}", 1000, Priority.DELTA)
        pacer.push(f"ctl{i}", 50, Priority.CONTROL)
    assert pacer.delay(0.0) == 0.0
    order = [pacer.pop(0.0) for _ in range(9)]
    assert order == [
        "ctl0", "ctl1", "ctl2", "delta0", "delta1", "delta2", "full0", "full1", "full2"
    ]  # fmt: skip
    assert pacer.pop(0.0) is None and pacer.delay(0.0) is None


def test_requeued_items_go_back_in_front_of_later_ones() -> None:
    pacer: PriorityPacer[str] = PriorityPacer(None, now=0.0)
    o0 = pacer.push("a", 10, Priority.DELTA)
    pacer.push("b", 10, Priority.DELTA)
    assert pacer.pop(0.0) == "a"
    pacer.push("c", 10, Priority.DELTA)
    pacer.push("a", 10, Priority.DELTA, order=o0)  # a lost connection: a goes back first
    assert [pacer.pop(0.0) for _ in range(3)] == ["a", "b", "c"]


def test_remove_takes_items_out() -> None:
    pacer: PriorityPacer[str] = PriorityPacer(None, now=0.0)
    for name in ["x1", "y1", "x2", "y2"]:
        pacer.push(name, 5, Priority.FULL)
    assert pacer.remove(lambda n: n.startswith("x")) == ["x1", "x2"]
    assert len(pacer) == 2 and pacer.queued_bytes == 10
    assert [pacer.pop(0.0), pacer.pop(0.0)] == ["y1", "y2"]


def test_control_is_not_starved_by_a_big_full_snapshot_chunk() -> None:
    pacer: PriorityPacer[str] = PriorityPacer(RATE, now=0.0)
    pacer.push("full0", 120_000, Priority.FULL)
    pacer.push("full1", 120_000, Priority.FULL)
    assert pacer.pop(0.0) == "full0"  # leaves 15 s of debt on an 8 kB/s link
    assert pacer.pop(0.1) is None
    pacer.push("ctl", 200, Priority.CONTROL)
    pacer.push("delta", 2000, Priority.DELTA)
    assert pacer.delay(0.1) == 0.0
    assert pacer.pop(0.1) == "ctl"  # at once, not after the debt
    # the delta waits for the debt (control included) to be paid, then goes before full1
    wait = pacer.delay(0.1)
    assert wait == pytest.approx((120_000 + 200) / RATE - 0.1, rel=1e-6)
    assert pacer.pop(0.1 + wait) == "delta"


def test_control_latency_stays_low_under_a_flood_and_the_rate_holds() -> None:
    rng = random.Random(5)
    pacer: PriorityPacer[str] = PriorityPacer(RATE, now=0.0)
    pushed_at: dict[str, float] = {}
    sizes: dict[str, int] = {}
    for i in range(30):  # 3.6 MB of full snapshot chunks: 450 s of link time
        pacer.push(f"full{i}", 120_000, Priority.FULL)
        sizes[f"full{i}"] = 120_000
    now, latencies, sent = 0.0, [], 0
    next_ctl = 0.0
    while now < 400.0:
        if now >= next_ctl:  # a heartbeat-like control message every ~2 s
            name = f"ctl{len(pushed_at)}"
            pacer.push(name, rng.randint(40, 400), Priority.CONTROL)
            pushed_at[name] = now
            next_ctl = now + rng.uniform(1.0, 3.0)
        d = pacer.delay(now)
        step = min(d if d is not None else 1.0, next_ctl - now)
        if step > 0:
            now += step
            continue
        item = pacer.pop(now)
        assert item is not None
        if item.startswith("ctl"):
            latencies.append(now - pushed_at[item])
        else:
            sent += sizes[item]
    assert max(latencies) < 1e-9  # control never waits for the bulk's debt
    assert len(latencies) > 100
    # full chunks still drain at the link rate minus the control traffic (within a few %)
    assert sent / 400.0 == pytest.approx(RATE, rel=0.05)


def test_unlimited_pacer_releases_everything_now() -> None:
    pacer: PriorityPacer[str] = PriorityPacer(None, now=0.0)
    for i in range(50):
        pacer.push(str(i), 1_000_000, Priority.FULL)
    assert len(drain(pacer, 0.0, 0.0)) == 50


def test_link_rate_estimator_follows_the_link() -> None:
    est = LinkRateEstimator(half_life=5.0)
    assert est.rate() is None
    now = 0.0
    for _ in range(100):  # 1,000-byte messages at 8 kB/s
        now += 0.125
        est.observe(1000, 0.125, now)
    assert est.rate() == pytest.approx(8000, rel=1e-6)
    now += 3600  # idle for an hour: the estimate stays
    assert est.rate() == pytest.approx(8000, rel=1e-6)
    for _ in range(400):  # the link halves; within 50 s (10 half-lives) the estimate follows
        now += 0.25
        est.observe(1000, 0.25, now)
    assert est.rate() == pytest.approx(4000, rel=0.01)
    est.observe(0, 1.0, now)  # ignored
    assert est.rate() == pytest.approx(4000, rel=0.01)


def test_backoff_is_exponential_with_full_jitter() -> None:
    b = Backoff(0.5, 8.0, rng=random.Random(3))
    ceilings = []
    for _ in range(8):
        c = b.ceiling()
        d = b.next_delay()
        assert 0.0 <= d <= c
        ceilings.append(c)
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]
    b.reset()
    assert b.ceiling() == 0.5 and b.attempt == 0
    # full jitter: delays are spread over the whole range, not clustered at the ceiling
    b2 = Backoff(10.0, 10.0, rng=random.Random(4))
    delays = [b2.next_delay() for _ in range(2000)]
    assert min(delays) < 0.5 and max(delays) > 9.5
    assert sum(delays) / len(delays) == pytest.approx(5.0, rel=0.05)
    b3 = Backoff(1.0, 60.0)
    b3.attempt = 10_000  # a gateway offline for a very long time: no overflow
    assert b3.ceiling() == 60.0
    with pytest.raises(ValueError):
        Backoff(2.0, 1.0)
