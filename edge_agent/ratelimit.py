"""Pacing policies for the MQTT link: a token bucket, a priority pacer, a link-rate
estimator and a reconnect back-off.

Everything here is pure: no sockets, threads or clocks. Time comes in as ``now`` (seconds,
any monotonic origin) and randomness as a ``random.Random``, so the transport drives these
classes from its own thread and the tests drive them with a fake clock.

* :class:`TokenBucket` holds a rate in bytes per second. It may go into debt: a message
  larger than the bucket is released when the bucket is not in debt and paid for
  afterwards, so the long-run rate holds whatever the message sizes.
* :class:`PriorityPacer` is an outgoing queue in front of a bucket. It releases the
  highest-priority message the bucket allows, FIFO within a priority
  (control > deltas > full snapshots). Control messages have a bucket of their own and
  never wait for the debt a big snapshot chunk left behind; they are still charged to the
  shared bucket, so bulk traffic pays them back and the overall rate holds.
* :class:`LinkRateEstimator` is an exponentially weighted estimate of the bytes per
  second the link drained while it was busy (what the snapshot policy reads).
* :class:`Backoff` is exponential back-off with full jitter (AWS's "full jitter").

This module must never sleep, read a clock or touch I/O.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Generic, TypeVar

__all__ = [
    "Backoff",
    "LinkRateEstimator",
    "Priority",
    "PriorityPacer",
    "TokenBucket",
    "kbps_to_bytes_per_s",
]

T = TypeVar("T")

#: Tokens within this many bytes of a level count as reaching it (float round-off: a
#: sender that waits exactly wait_time() must find the bucket ready).
_EPS = 1e-6


def kbps_to_bytes_per_s(kbps: float) -> float:
    """Kilobits per second (1 kbit = 1000 bits, as links are sold) to bytes per second."""
    return kbps * 1000.0 / 8.0


class Priority(IntEnum):
    """Send priority of an outgoing message; lower values go first."""

    CONTROL = 0  # status, birth, query, done, release, heartbeats
    DELTA = 1  # chunks of a delta snapshot
    FULL = 2  # chunks of a full snapshot


class TokenBucket:
    """A token bucket in bytes that may go into debt.

    ``tokens`` grows at ``rate`` per second up to ``burst``; :meth:`consume` subtracts a
    message's size even when that takes the bucket below zero. A sender that releases only
    while ``tokens >= 0`` sends at most ``burst + rate * t + largest_message`` bytes in any
    window of ``t`` seconds, and exactly ``rate`` on average while it is backlogged.
    """

    def __init__(self, rate: float, burst: float, *, now: float, tokens: float = 0.0) -> None:
        if not rate > 0 or not math.isfinite(rate):
            raise ValueError(f"rate must be a positive number of bytes per second, not {rate}")
        if not burst >= 0:
            raise ValueError(f"burst must be >= 0, not {burst}")
        self.rate = float(rate)
        self.burst = float(burst)
        self._tokens = min(float(tokens), self.burst)
        self._at = now

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now

    def tokens(self, now: float) -> float:
        """The bytes available at ``now`` (negative while in debt)."""
        self._refill(now)
        return self._tokens

    def consume(self, nbytes: float, now: float) -> None:
        """Charge ``nbytes`` at ``now``; the bucket may go into debt."""
        self._refill(now)
        self._tokens -= nbytes

    def wait_time(self, now: float, level: float = 0.0) -> float:
        """Seconds from ``now`` until the bucket holds at least ``level`` (0.0: already)."""
        have = self.tokens(now)
        if have >= level - _EPS:
            return 0.0
        if level > self.burst:
            return math.inf
        return (level - have) / self.rate


@dataclass(order=True)
class _Queued(Generic[T]):
    priority: int
    order: int
    item: T = field(compare=False)
    size: int = field(compare=False)


class PriorityPacer(Generic[T]):
    """An outgoing queue that releases items only as fast as a byte rate allows.

    ``rate`` is in bytes per second; ``None`` means no cap (items are still released
    highest priority first). ``burst`` is what the shared bucket may save up while idle
    (default a quarter of a second of traffic, at least 1,500 bytes); ``control_burst`` is
    what control messages may send beyond the shared bucket's debt (default one second of
    traffic, at least 4 KiB). The shared bucket starts empty, so a cap holds from the first
    byte.

    Items are ordered by ``(priority, order)``. ``order`` defaults to a counter that grows
    with every push; pass an item's original order back when re-queueing it (after a lost
    connection) and it goes back in front of the items pushed after it.
    """

    def __init__(
        self,
        rate: float | None,
        *,
        now: float,
        burst: float | None = None,
        control_burst: float | None = None,
    ) -> None:
        self.rate = rate
        self._heap: list[_Queued[T]] = []
        self._counter = 0
        self._bytes = 0
        if rate is None:
            self._main: TokenBucket | None = None
            self._control: TokenBucket | None = None
        else:
            b = max(1500.0, rate * 0.25) if burst is None else burst
            cb = max(4096.0, rate * 1.0) if control_burst is None else control_burst
            self._main = TokenBucket(rate, b, now=now, tokens=0.0)
            self._control = TokenBucket(rate, cb, now=now, tokens=cb)

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def queued_bytes(self) -> int:
        """The sum of the sizes of the queued items."""
        return self._bytes

    def next_order(self) -> int:
        """The order the next push without an explicit ``order`` will get."""
        return self._counter

    def push(self, item: T, size: int, priority: int, *, order: int | None = None) -> int:
        """Queue ``item`` of ``size`` bytes; returns its order (FIFO key within a priority)."""
        if size < 0:
            raise ValueError(f"size must be >= 0, not {size}")
        if order is None:
            order = self._counter
        self._counter = max(self._counter, order + 1)
        heapq.heappush(self._heap, _Queued(int(priority), order, item, size))
        self._bytes += size
        return order

    def remove(self, predicate: Callable[[T], bool]) -> list[T]:
        """Take every queued item for which ``predicate`` is true out of the queue."""
        keep: list[_Queued[T]] = []
        gone: list[T] = []
        for q in self._heap:
            if predicate(q.item):
                gone.append(q.item)
            else:
                keep.append(q)
        if gone:
            heapq.heapify(keep)
            self._heap = keep
            self._bytes = sum(q.size for q in keep)
        return gone

    def _eligible(self, q: _Queued[T], now: float) -> bool:
        if self._main is None or self._control is None:
            return True
        if self._main.tokens(now) >= -_EPS:
            return True
        return q.priority == Priority.CONTROL and self._control.tokens(now) >= -_EPS

    def pop(self, now: float) -> T | None:
        """Release the next item if the rate allows it at ``now``, charging its size."""
        if not self._heap:
            return None
        head = self._heap[0]
        if not self._eligible(head, now):
            return None
        heapq.heappop(self._heap)
        self._bytes -= head.size
        if self._main is not None and self._control is not None:
            self._main.consume(head.size, now)
            if head.priority == Priority.CONTROL:
                self._control.consume(head.size, now)
        return head.item

    def delay(self, now: float) -> float | None:
        """Seconds until :meth:`pop` would release something; ``None`` when the queue is empty."""
        if not self._heap:
            return None
        if self._main is None or self._control is None:
            return 0.0
        wait = self._main.wait_time(now)
        if self._heap[0].priority == Priority.CONTROL:
            wait = min(wait, self._control.wait_time(now))
        return wait


class LinkRateEstimator:
    """Bytes per second the link drained while busy, exponentially weighted over time.

    Feed it one observation per delivered message: its size and the time the link spent
    on it (from when it could start — the later of its release and the previous
    delivery — to its acknowledgement). Both sums decay with ``half_life`` seconds of
    wall time, so an idle link keeps its last estimate and a changed link is followed
    within a few half-lives.
    """

    def __init__(self, half_life: float = 10.0) -> None:
        if not half_life > 0:
            raise ValueError(f"half_life must be > 0, not {half_life}")
        self.half_life = half_life
        self._bytes = 0.0
        self._seconds = 0.0
        self._at: float | None = None

    def observe(self, nbytes: int, busy_seconds: float, now: float) -> None:
        """Record ``nbytes`` drained in ``busy_seconds`` of link time, ending at ``now``."""
        if nbytes <= 0 or busy_seconds < 0:
            return
        if self._at is not None and now > self._at:
            decay = 0.5 ** ((now - self._at) / self.half_life)
            self._bytes *= decay
            self._seconds *= decay
        self._at = now if self._at is None else max(self._at, now)
        self._bytes += nbytes
        # a message acknowledged "instantly" still took some link time; 1 ms floor
        self._seconds += max(busy_seconds, 1e-3)

    def rate(self) -> float | None:
        """The estimate in bytes per second, or ``None`` before the first observation."""
        if self._seconds <= 0:
            return None
        return self._bytes / self._seconds


class Backoff:
    """Exponential back-off with full jitter: the n-th delay is uniform in
    ``[0, min(maximum, initial * multiplier ** n))``."""

    def __init__(
        self,
        initial: float = 0.5,
        maximum: float = 60.0,
        *,
        multiplier: float = 2.0,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < initial <= maximum:
            raise ValueError(f"need 0 < initial <= maximum, got {initial}, {maximum}")
        if multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, not {multiplier}")
        self.initial = initial
        self.maximum = maximum
        self.multiplier = multiplier
        self.attempt = 0
        self._rng = rng or random.Random()

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        # cap the exponent so that a gateway offline for a year does not overflow
        return min(self.maximum, self.initial * self.multiplier ** min(self.attempt, 64))

    def next_delay(self) -> float:
        """The next delay in seconds (and count one more attempt)."""
        delay = self._rng.uniform(0.0, self.ceiling())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """Start over from ``initial`` (after a connection that stayed up)."""
        self.attempt = 0
