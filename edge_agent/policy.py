"""The agent's policies: when a job is snapshotted, whether its derivable entries travel,
and what the uplink can carry.

* :class:`SnapshotPolicy` (the job file's ``[snapshot]``: every N steps and/or T seconds).
  A *local* snapshot (to the journal) is taken whenever one is due: that bounds what a crash
  loses to one interval. A *send* is due on the same schedule, but the runner offers one
  only when the protocol session can (synced, nothing in flight): stop-and-wait, so sends
  never go faster than the link drains. A send that falls due while one is in flight is
  *owed* and is taken, of the newest state, as soon as the session can offer again: newer
  snapshots coalesce, nothing queues (invariant 6).
* :class:`OverheadBudget` (``[snapshot] overhead_budget`` and ``max_lag_seconds``): a send
  costs a fixed number of bytes besides its payload (message headers, MQTT framing, the
  server's ACK); when payloads are small (a job whose state grows a few bytes a step) that
  fixed cost dominates. The budget lengthens the interval between sends until the payload
  it expects is large enough that the measured fixed cost is within ``overhead_budget`` of
  it, but never past ``max_lag_seconds`` since the last send, so the server's copy never
  falls further behind than that.
* :class:`KvPolicy` (``[link] kv``): ``send`` and ``recompute`` are fixed; ``auto`` includes
  the derivable entries (a KV cache) only while the measured link can afford them: the
  bytes the next snapshot would carry with them, estimated from the sizes of previous
  payloads, must fit in ``link rate x interval x utilization``. Turning them back on means
  sending them whole, so that happens only when the whole cache plus the next interval's
  growth fits in a smaller share of the budget (hysteresis), and not within a few
  snapshots of turning them off.
* :class:`LinkCapacity`: the link rate those decisions use. An idle link's drain rate
  under-reads its capacity (a small message measures latency, not bandwidth), so only
  transfers big enough to keep the link busy count, and the result never exceeds the
  bandwidth cap (``--max-kbps``).
* :class:`StepRate`: steps per second, smoothed.

Everything here is pure: no clock (``now`` is passed in, seconds on any monotonic origin),
no I/O, no threads, no protocol or codec calls. It decides; the runner acts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from edge_agent.errors import ConfigError, JobSpecError

__all__ = [
    "DEFAULT_LINK_RATE",
    "DEFAULT_MAX_LAG_SECONDS",
    "DEFAULT_OVERHEAD_BUDGET",
    "KV_MODES",
    "KvDecision",
    "KvPolicy",
    "LinkCapacity",
    "OverheadBudget",
    "SnapshotPolicy",
    "StepRate",
]

KvMode = Literal["send", "recompute", "auto"]
KV_MODES: tuple[KvMode, ...] = ("send", "recompute", "auto")
#: Bytes per second assumed for a link nothing has been measured on and no cap bounds
#: (64 kbit/s: the slow end of what gateways have; a conservative guess).
DEFAULT_LINK_RATE = 8000.0
#: ``[snapshot] overhead_budget``: fixed bytes per send over its payload, at most.
DEFAULT_OVERHEAD_BUDGET = 0.10
#: ``[snapshot] max_lag_seconds``: the longest the budget may hold back a send.
DEFAULT_MAX_LAG_SECONDS = 60.0


def _ewma(old: float | None, sample: float, alpha: float) -> float:
    return sample if old is None else old + alpha * (sample - old)


# ---------------------------------------------------------------------------------------------
# Snapshots.


@dataclass(slots=True)
class _Mark:
    step: int
    at: float


class OverheadBudget:
    """How many steps a send should carry so that its fixed cost stays within ``budget`` of
    its payload (``[snapshot] overhead_budget``; 0.10: at most 10%).

    Fed after each acknowledged send with :meth:`observe`: the steps it covered (since its
    base; for a full snapshot, since the job's start), its payload bytes and its fixed cost,
    measured by the runner from what went out and came back for it (the ``snap`` headers and
    checks, their MQTT framing and PUBACKs, the server's ACK with its framing). It fits
    ``payload ~ a + b x steps`` over the last few deltas (least squares once two differ in
    steps; before that, half the payload constant and half growing with the steps, and the
    next send corrects it; a full snapshot stands in until a delta is measured). The next
    send should carry at least ``cost / budget`` bytes, and, so that the job's sends
    *together* stay within the budget
    (the first ones, and a short final one, cost as much as any), at least ``(all costs so
    far + cost) / budget - all payloads so far``. :meth:`min_steps` turns that into steps:
    None when no send has been measured, when payloads do not grow with steps (a longer
    interval would not help), or when the payload already carries the cost.

    ``max_lag_seconds`` bounds the wait: :class:`SnapshotPolicy` sends anyway once that long
    (less the last offer-to-ack time, so that the copy lands within it) has passed since the
    last send."""

    def __init__(
        self,
        budget: float = DEFAULT_OVERHEAD_BUDGET,
        max_lag_seconds: float = DEFAULT_MAX_LAG_SECONDS,
        *,
        window: int = 8,
    ) -> None:
        if not (math.isfinite(budget) and budget > 0):
            raise JobSpecError(f"overhead_budget must be a number > 0, not {budget!r}")
        if not (math.isfinite(max_lag_seconds) and max_lag_seconds > 0):
            raise JobSpecError(f"max_lag_seconds must be a number > 0, not {max_lag_seconds!r}")
        if window < 2:
            raise ConfigError("the overhead budget's window is at least 2 sends")
        self.budget = budget
        self.max_lag_seconds = max_lag_seconds
        self.window = window
        self._points: list[tuple[int, int]] = []  # (steps, payload bytes) of recent deltas
        self._full: tuple[int, int] | None = None  # the last full snapshot's, until a delta
        self._cost: float | None = None  # fixed bytes per send, smoothed
        self.total_cost = 0  # every send's fixed cost so far
        self.total_payload = 0  # every send's payload so far
        self.round_trip: float = 0.0  # the last offer-to-ack seconds

    def observe(
        self, *, steps: int, payload_bytes: int, cost_bytes: int, full: bool = False
    ) -> None:
        """A send covering ``steps`` steps was acknowledged (``full``: a full snapshot,
        ``steps`` since the job's start): its payload was ``payload_bytes`` and everything
        else it took on the link ``cost_bytes``."""
        if steps < 1 or payload_bytes < 1 or cost_bytes < 0:
            return
        self._cost = _ewma(self._cost, float(cost_bytes), 0.5)
        self.total_cost += cost_bytes
        self.total_payload += payload_bytes
        if full:
            self._full = (steps, payload_bytes)
            return
        self._points.append((steps, payload_bytes))
        del self._points[: -self.window]

    @property
    def cost(self) -> float | None:
        """The fixed bytes per send, as measured (None before any)."""
        return self._cost

    def model(self) -> tuple[float, float] | None:
        """``(a, b)`` of ``payload ~ a + b x steps``, or None before any send."""
        pts = self._points or ([self._full] if self._full is not None else [])
        if not pts:
            return None
        n = len(pts)
        mx = sum(x for x, _ in pts) / n
        my = sum(y for _, y in pts) / n
        sxx = sum((x - mx) ** 2 for x, _ in pts)
        if sxx <= 0:  # one step count so far: say half of it scales (the next send tells)
            return my / 2, my / (2 * mx)
        b = sum((x - mx) * (y - my) for x, y in pts) / sxx
        a = my - b * mx
        if a < 0:  # keep it physical: no negative constant part
            a, b = 0.0, my / mx
        return a, b

    def min_steps(self) -> float | None:
        """The fewest steps a send should cover to keep within the budget (see the class)."""
        m, cost = self.model(), self._cost
        if m is None or cost is None:
            return None
        a, b = m
        want = max(cost / self.budget, (self.total_cost + cost) / self.budget - self.total_payload)
        if b <= 0 or a >= want:
            return None
        return (want - a) / b

    def hold_until(self, sent_at: float) -> float:
        """The instant after which a send is no longer held back (``max_lag_seconds`` after
        the last one, less the time an offer takes to be acknowledged)."""
        return sent_at + max(0.0, self.max_lag_seconds - self.round_trip)


class SnapshotPolicy:
    """Every ``every_steps`` steps and/or ``every_seconds`` seconds, whichever comes first.

    Two clocks run on that schedule: the last *local* snapshot and the last *send*. A
    snapshot is due only when the job has moved since the mark (a step of progress, never
    a repeat of the same step), except a send that :meth:`force_send` asked for (the
    server lost our base: the next one must go, full, even at the same step).

    ``sent_step``/``sent_at`` start the send clock (after a restart: the step the server
    acknowledged and an instant one interval ago, so that newer work is sent at once)."""

    def __init__(
        self,
        every_steps: int | None,
        every_seconds: float | None,
        *,
        step: int,
        now: float,
        sent_step: int | None = None,
        sent_at: float | None = None,
        overhead: OverheadBudget | None = None,
    ) -> None:
        if every_steps is None and every_seconds is None:
            raise JobSpecError("a snapshot policy needs every_steps, every_seconds or both")
        if every_steps is not None and (type(every_steps) is not int or every_steps < 1):
            raise JobSpecError(f"every_steps must be an integer >= 1, not {every_steps!r}")
        if every_seconds is not None and not (math.isfinite(every_seconds) and every_seconds > 0):
            raise JobSpecError(f"every_seconds must be a number > 0, not {every_seconds!r}")
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self._local = _Mark(step, now)
        self._sent = _Mark(
            step if sent_step is None else sent_step, now if sent_at is None else sent_at
        )
        self._forced = False
        self.overhead = overhead
        self.held = False  # the last send_due answer was "due, but held by the budget"

    @classmethod
    def for_job(
        cls,
        every_steps: int | None,
        every_seconds: float | None,
        *,
        step: int,
        acked_step: int | None,
        now: float,
        overhead: OverheadBudget | None = None,
    ) -> SnapshotPolicy:
        """The policy of a job (re)started at ``step`` whose server copy is at ``acked_step``
        (None: the server holds nothing of ours): a restarted job whose server copy is
        behind sends as soon as it can; a fresh one after its first interval."""
        behind = step > 0 and (acked_step is None or acked_step < step)
        sent_at = now - (every_seconds or 0.0) if behind else now
        return cls(
            every_steps,
            every_seconds,
            step=step,
            now=now,
            sent_step=0 if acked_step is None else acked_step,
            sent_at=sent_at,
            overhead=overhead,
        )

    def _due(self, mark: _Mark, step: int, now: float) -> bool:
        if step <= mark.step:
            return False
        if self.every_steps is not None and step - mark.step >= self.every_steps:
            return True
        return self.every_seconds is not None and now - mark.at >= self.every_seconds

    def local_due(self, step: int, now: float) -> bool:
        """Whether a local (journal) snapshot is due at ``step``."""
        return self._due(self._local, step, now)

    def send_due(self, step: int, now: float) -> bool:
        """Whether a send is due (or owed) at ``step``; the runner offers only when the
        session can, so a send due while one is in flight waits for it to settle. With an
        :class:`OverheadBudget`, a send the schedule makes due is held back while it would
        cover fewer steps than the budget asks for, until ``max_lag_seconds``."""
        self.held = False
        if self._forced:
            return True
        if not self._due(self._sent, step, now):
            return False
        b = self.overhead
        if b is None or now >= b.hold_until(self._sent.at):
            return True
        need = b.min_steps()
        if need is None or step - self._sent.step >= need:
            return True
        self.held = True
        return False

    def force_send(self) -> None:
        """The next send is due at once, whatever the step (after a NeedsFull)."""
        self._forced = True

    def took_local(self, step: int, now: float) -> None:
        """A local snapshot of ``step`` was written."""
        self._local = _Mark(step, now)

    def sent(self, step: int, now: float) -> None:
        """A snapshot of ``step`` was offered (its local copy was written too)."""
        self._sent = _Mark(step, now)
        self._local = _Mark(step, now)
        self._forced = False

    def expected_interval(
        self, steps_per_second: float | None, transfer_seconds: float | None = None
    ) -> tuple[float, float]:
        """(seconds, steps) between two sends at this job's pace: the schedule's interval
        (lengthened as the overhead budget asks, up to its ``max_lag_seconds``), but never
        shorter than a transfer takes (stop-and-wait)."""
        rate = steps_per_second if steps_per_second and steps_per_second > 0 else None
        candidates = []
        if self.every_seconds is not None:
            candidates.append(self.every_seconds)
        if self.every_steps is not None and rate is not None:
            candidates.append(self.every_steps / rate)
        seconds = min(candidates) if candidates else 30.0
        b = self.overhead
        need = None if b is None else b.min_steps()
        if b is not None and need is not None and rate is not None:
            seconds = max(seconds, min(need / rate, b.max_lag_seconds))
        if transfer_seconds is not None and transfer_seconds > seconds:
            seconds = transfer_seconds
        steps = seconds * rate if rate is not None else float(self.every_steps or 1)
        return seconds, steps


class StepRate:
    """A job's steps per second, exponentially weighted over time (half-life in seconds)."""

    def __init__(self, half_life: float = 10.0) -> None:
        self.half_life = half_life
        self._steps = 0.0
        self._seconds = 0.0
        self._last: tuple[int, float] | None = None

    def observe(self, step: int, now: float) -> None:
        if self._last is not None:
            s0, t0 = self._last
            dt = now - t0
            if dt > 0 and step >= s0:
                decay = 0.5 ** (dt / self.half_life)
                self._steps = self._steps * decay + (step - s0)
                self._seconds = self._seconds * decay + dt
        self._last = (step, now)

    def rate(self) -> float | None:
        if self._seconds <= 0 or self._steps <= 0:
            return None
        return self._steps / self._seconds


# ---------------------------------------------------------------------------------------------
# The link.


class LinkCapacity:
    """The uplink's rate in bytes per second, for the KV policy and the ack timeouts.

    Samples: whole transfers (payload bytes over offer-to-ack seconds) of at least
    ``min_bytes`` (smaller ones measure latency), and the transport's drain estimate taken
    right after such a transfer (when the link was busy). The rate is the larger of the
    smoothed transfer rate and the latest drain reading, never above ``cap`` (the
    ``--max-kbps`` cap, in bytes per second). Before any sample: the cap, or
    :data:`DEFAULT_LINK_RATE` when there is none."""

    def __init__(
        self, cap: float | None, *, default: float = DEFAULT_LINK_RATE, min_bytes: int = 4096
    ) -> None:
        if cap is not None and not cap > 0:
            raise ConfigError(f"a link cap is > 0 bytes/s, not {cap}")
        self.cap = cap
        self.default = default
        self.min_bytes = min_bytes
        self._transfer: float | None = None
        self._drain: float | None = None

    def observe_transfer(
        self, nbytes: int, seconds: float, drain_rate: float | None = None
    ) -> None:
        """A snapshot of ``nbytes`` took ``seconds`` from offer to ack; ``drain_rate`` is the
        transport's estimate read at that moment."""
        if nbytes < self.min_bytes or not seconds > 0:
            return
        self._transfer = _ewma(self._transfer, nbytes / seconds, 0.3)
        if drain_rate is not None and drain_rate > 0:
            self._drain = drain_rate

    @property
    def measured(self) -> bool:
        return self._transfer is not None

    def rate(self) -> float:
        cap = math.inf if self.cap is None else self.cap
        if self._transfer is None:
            return self.cap if self.cap is not None else self.default
        best = max(self._transfer, self._drain or 0.0)
        return min(cap, best)


# ---------------------------------------------------------------------------------------------
# Derivable entries.


@dataclass(frozen=True, slots=True)
class KvDecision:
    """Whether the next snapshot carries the derivable entries, and why (for the logs):
    ``estimate`` is the bytes that snapshot would take with them (including, when they
    are off, the whole entries that turning them on costs), ``budget`` what the link
    carries in one interval at the utilization target."""

    include: bool
    reason: str
    estimate: float = 0.0
    budget: float = 0.0


class KvPolicy:
    """``[link] kv``: ``send`` always includes the derivable entries, ``recompute`` never,
    ``auto`` while the link can afford them (see the module docstring).

    Feed it every offer with :meth:`observe` (what the payload cost) and ask :meth:`decide`
    before the next one. Estimates, all from observations:

    * ``rest`` bytes per step: payloads without derivable entries, over the steps since
      their base;
    * derivable growth in raw bytes per step: from the state (the runner passes the
      derivable entries' ``nbytes``);
    * the codec's ratio on derivable bytes: from payloads with them, what they added over
      ``rest``, per raw byte (1.0 until measured: float caches barely compress).

    The next snapshot with derivables ~ ``(rest + growth x ratio) x steps``; turning them on
    adds ``total x ratio``. ``utilization`` is the share of the link the snapshots may use.
    Switching on needs the steady cost within ``switch_on_margin x`` the budget, and the
    switching snapshot (the whole entries plus an interval's growth) within that much of
    ``switch_on_intervals`` intervals' budget (it may take a little longer than one
    interval, once); and not within ``min_hold`` snapshots of switching off."""

    def __init__(
        self,
        mode: str,
        *,
        utilization: float = 0.5,
        switch_on_margin: float = 0.7,
        switch_on_intervals: float = 2.0,
        min_hold: int = 3,
    ) -> None:
        if mode not in KV_MODES:
            raise JobSpecError(f"kv policy must be one of {', '.join(KV_MODES)}, not {mode!r}")
        if not (
            0 < utilization <= 1
            and 0 < switch_on_margin <= 1
            and switch_on_intervals >= 1
            and min_hold >= 0
        ):
            raise ConfigError(
                "need 0 < utilization <= 1, 0 < switch_on_margin <= 1, "
                "switch_on_intervals >= 1, min_hold >= 0"
            )
        self.mode = mode
        self.utilization = utilization
        self.switch_on_margin = switch_on_margin
        self.switch_on_intervals = switch_on_intervals
        self.min_hold = min_hold
        self.on = mode == "send"
        self._since_switch = min_hold  # decisions since the last switch
        self._rest_per_step: float | None = None
        self._ratio: float | None = None
        self._growth_per_step: float | None = None
        self._last_total: tuple[int, int] | None = None  # (step, raw derivable bytes)
        self.last: KvDecision = KvDecision(self.on, f"kv = {mode}")

    # -- observations ----------------------------------------------------------------------

    def _growth(self, step: int, derivable_bytes: int) -> None:
        if self._last_total is not None:
            s0, b0 = self._last_total
            if step > s0 and derivable_bytes >= b0:
                self._growth_per_step = _ewma(
                    self._growth_per_step, (derivable_bytes - b0) / (step - s0), 0.5
                )
        if self._last_total is None or step != self._last_total[0]:
            self._last_total = (step, derivable_bytes)

    def observe(
        self,
        *,
        step: int,
        base_step: int | None,
        payload_bytes: int,
        included: bool,
        derivable_raw: int,
    ) -> None:
        """A snapshot of ``step`` was encoded as ``payload_bytes`` against a base at
        ``base_step`` (None: full); ``included`` whether it carried the derivable entries,
        ``derivable_raw`` the raw bytes of them it had to carry (the growth since the base,
        or all of them when the base had none)."""
        steps = max(1, step - (base_step or 0))
        if not included:
            self._rest_per_step = _ewma(self._rest_per_step, payload_bytes / steps, 0.3)
            return
        if derivable_raw <= 0:
            return
        rest = (self._rest_per_step or 0.0) * steps
        ratio = (payload_bytes - rest) / derivable_raw
        self._ratio = _ewma(self._ratio, min(100.0, max(0.05, ratio)), 0.3)

    # -- the decision ----------------------------------------------------------------------

    def estimates(self, steps: float, derivable_bytes: int) -> tuple[float, float]:
        """(bytes of the next snapshot with derivables at their growth, extra bytes of
        sending the derivable entries whole)."""
        ratio = 1.0 if self._ratio is None else self._ratio
        growth = self._growth_per_step or 0.0
        rest = self._rest_per_step or 0.0
        return (rest + growth * ratio) * steps, derivable_bytes * ratio

    def decide(
        self,
        *,
        step: int,
        derivable_bytes: int,
        link_rate: float,
        interval_s: float,
        steps_per_interval: float,
    ) -> KvDecision:
        """Whether the snapshot about to be offered includes the derivable entries.
        ``derivable_bytes``: their raw size in the job's state now; ``link_rate`` in bytes
        per second (:class:`LinkCapacity`); ``interval_s``/``steps_per_interval``: until the
        snapshot after this one (:meth:`SnapshotPolicy.expected_interval`)."""
        self._growth(step, derivable_bytes)
        if self.mode != "auto":
            self.last = KvDecision(self.mode == "send", f"kv = {self.mode}")
            return self.last
        budget = link_rate * interval_s * self.utilization
        steady, whole = self.estimates(steps_per_interval, derivable_bytes)
        self._since_switch += 1
        if self.on:
            if steady <= budget:
                d = KvDecision(True, "fits the link", steady, budget)
            else:
                d = self._switch(False, "the link cannot carry it", steady, budget)
        else:
            cost = steady + whole
            room = budget * self.switch_on_margin
            if self._since_switch <= self.min_hold:
                d = KvDecision(False, "holding after a switch", cost, budget)
            elif steady <= room and cost <= room * self.switch_on_intervals:
                d = self._switch(True, "the link can carry it", cost, budget)
            else:
                d = KvDecision(False, "the link cannot carry it", cost, budget)
        self.last = d
        return d

    def _switch(self, on: bool, reason: str, estimate: float, budget: float) -> KvDecision:
        self.on = on
        self._since_switch = 0
        return KvDecision(on, reason, estimate, budget)
