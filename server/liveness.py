"""Device liveness and job status transitions.

Two layers, in the sans-IO style of the protocol:

* :class:`LivenessTracker` is pure: it is told what arrived (a STATUS, a heartbeat, any other
  message) and asked to ``check(now)``; it returns :class:`DeviceTransition` values (a device
  went online or offline, when and why). No clock, store or thread inside; ``now`` (seconds)
  is an argument. :func:`next_job_status` is the job status table, also pure.
* :class:`Liveness` is the adapter the ingest drives: it feeds the tracker with the
  injected clock, writes device records and job status transitions (with timestamps and a
  detail) to the store, and keeps the ``devices online`` gauge.

The rules (docs/server.md, "Liveness"):

1. A retained STATUS(online) makes a device online; STATUS(offline) (its MQTT will, or a
   clean goodbye) makes it offline, unless the STATUS names another session than the
   newest one the device announced (a stale will of a connection it already replaced).
2. Any message from the device (heartbeat, birth, snapshot, ...) proves it is online and
   restarts its timer; a heartbeat's session becomes the device's session.
3. A device from which nothing arrived for ``heartbeat_timeout`` seconds is offline.
4. Job statuses follow devices: a device going offline moves its ``running`` jobs to
   ``offline``; a device coming back moves its ``offline`` jobs it still owns back to
   ``running``. The worker's claim moves a job to ``resuming``, its first step to
   ``server-running``, its end to ``completed`` or ``failed``; a DONE from the device moves
   it to ``completed``. Every move is a compare-and-set on the store's status
   (``set_status(..., expect=...)``), so a claim made concurrently (even in another process)
   is never overwritten by a late ``offline``.

This module owns liveness decisions and the job status table. It never publishes MQTT
messages and never changes a job's owner or epoch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from edge_agent.errors import EdgeResumeError
from edge_agent.protocol.messages import Heartbeat, Message, Status
from server import metrics
from server.store import JobRecord, JobStatus, Store

__all__ = [
    "JOB_EVENTS",
    "DeviceLive",
    "DeviceTransition",
    "JobEvent",
    "Liveness",
    "LivenessTracker",
    "next_job_status",
    "offline_jobs",
    "record_job_event",
]

log = logging.getLogger("server.liveness")

JobEvent = Literal[
    "device-offline",  # the device went offline
    "device-online",  # the device came back (and still owns the job)
    "claimed",  # a worker raised the epoch for the server
    "started",  # the worker ran the first resumed step
    "completed",  # the job finished (on the device or the server)
    "failed",  # the worker gave up on this attempt
]

#: event -> (statuses it applies to, the status it leads to)
JOB_EVENTS: dict[str, tuple[frozenset[JobStatus], JobStatus]] = {
    "device-offline": (frozenset({"running"}), "offline"),
    "device-online": (frozenset({"offline"}), "running"),
    "claimed": (
        frozenset({"running", "offline", "failed", "resuming", "server-running"}),
        "resuming",
    ),
    "started": (frozenset({"resuming"}), "server-running"),
    "completed": (frozenset({"running", "offline", "resuming", "server-running"}), "completed"),
    "failed": (frozenset({"resuming", "server-running"}), "failed"),
}


def next_job_status(current: JobStatus, event: str) -> JobStatus | None:
    """The status ``event`` moves a job in ``current`` to, or None if it does not apply."""
    rule = JOB_EVENTS.get(event)
    if rule is None:
        raise ValueError(f"unknown job event {event!r}")
    allowed, target = rule
    return target if current in allowed and current != target else None


# ---------------------------------------------------------------------------------------------
# The pure tracker.


@dataclass(frozen=True, slots=True)
class DeviceLive:
    """What the tracker knows of one device."""

    device: str
    online: bool
    since: float  # when ``online`` last changed
    last_seen: float  # the newest message (or restore time)
    session: str | None  # the newest session the device announced
    reason: str  # why it is in its current state


@dataclass(frozen=True, slots=True)
class DeviceTransition:
    """A device went online (``online=True``) or offline, at ``at``, because of ``reason``."""

    device: str
    online: bool
    at: float
    reason: str


class LivenessTracker:
    """Online/offline per device from STATUS, heartbeats and timeouts (pure; see the
    module docstring for the rules). Not thread-safe: :class:`Liveness` serialises calls."""

    def __init__(self, heartbeat_timeout: float) -> None:
        if not heartbeat_timeout > 0:
            raise ValueError(f"heartbeat_timeout must be > 0, not {heartbeat_timeout}")
        self.heartbeat_timeout = float(heartbeat_timeout)
        self._devices: dict[str, DeviceLive] = {}

    def get(self, device: str) -> DeviceLive | None:
        return self._devices.get(device)

    def devices(self) -> list[DeviceLive]:
        return sorted(self._devices.values(), key=lambda d: d.device)

    @property
    def online_count(self) -> int:
        return sum(1 for d in self._devices.values() if d.online)

    def restore(self, device: str, online: bool, now: float) -> None:
        """Seed a device from the store at start-up. An online device gets a full timeout
        from ``now`` to show itself (its retained STATUS usually arrives first)."""
        self._devices[device] = DeviceLive(device, online, now, now, None, "restored")

    def _set(self, d: DeviceLive, **changes: object) -> DeviceLive:
        from dataclasses import replace

        new = replace(d, **changes)  # type: ignore[arg-type]
        self._devices[d.device] = new
        return new

    def on_status(
        self, device: str, online: bool, session: str, now: float
    ) -> DeviceTransition | None:
        d = self._devices.get(device)
        if d is None:
            reason = "status online" if online else "status offline (will)"
            self._devices[device] = DeviceLive(device, online, now, now, session, reason)
            return DeviceTransition(device, online, now, reason)
        if online:
            d = self._set(d, last_seen=max(d.last_seen, now), session=session)
            if d.online:
                return None
            self._set(d, online=True, since=now, reason="status online")
            return DeviceTransition(device, True, now, "status online")
        if d.session is not None and session != d.session:
            return None  # a stale will of a connection the device already replaced
        if not d.online:
            return None
        self._set(d, online=False, since=now, reason="status offline (will)")
        return DeviceTransition(device, False, now, "status offline (will)")

    def on_seen(
        self, device: str, now: float, session: str | None = None
    ) -> DeviceTransition | None:
        """Any message from ``device`` (``session``: a heartbeat's session)."""
        d = self._devices.get(device)
        if d is None:
            self._devices[device] = DeviceLive(device, True, now, now, session, "message")
            return DeviceTransition(device, True, now, "message")
        d = self._set(d, last_seen=max(d.last_seen, now), session=session if session else d.session)
        if d.online:
            return None
        self._set(d, online=True, since=now, reason="message")
        return DeviceTransition(device, True, now, "message")

    def check(self, now: float) -> list[DeviceTransition]:
        """Devices whose last message is older than the timeout go offline."""
        out = []
        for d in list(self._devices.values()):
            if d.online and now - d.last_seen > self.heartbeat_timeout:
                reason = f"no message for {self.heartbeat_timeout:g}s"
                self._set(d, online=False, since=now, reason=reason)
                out.append(DeviceTransition(d.device, False, now, reason))
        return out


# ---------------------------------------------------------------------------------------------
# Store-backed helpers (usable without a Liveness, e.g. by a worker in its own process).


def record_job_event(store: Store, job: str, event: str, *, detail: str = "") -> JobRecord | None:
    """Apply a job event as a compare-and-set on the store's status. Returns the new record
    if the status moved, None if the event did not apply to the job's status."""
    allowed, target = JOB_EVENTS[event]
    rec = store.get_job(job)
    if rec is None or rec.status not in allowed or rec.status == target:
        return None
    new = store.set_status(job, target, detail=detail or event, expect=allowed)
    if new.status != target or new.status == rec.status:
        return None
    metrics.JOB_TRANSITIONS.labels(status=target).inc()
    return new


def offline_jobs(store: Store, older_than: float, *, now: float | None = None) -> list[JobRecord]:
    """Jobs their device still owns that have been ``offline`` for more than ``older_than``
    seconds (by the store's status timestamps): the auto-resume policy's candidates."""
    t = time.time() if now is None else now
    return [
        r
        for r in store.list_jobs()
        if r.status == "offline" and r.owner == "edge" and t - r.status_at > older_than
    ]


# ---------------------------------------------------------------------------------------------
# The adapter.


class Liveness:
    """Drives a :class:`LivenessTracker` with a clock and records what it decides.

    Thread-safe. ``touch_interval`` bounds how often a device's ``last_seen`` is written to
    the store (every message would cost a durable write); the tracker's in-memory value is
    exact. ``clock`` gives seconds since the Unix epoch."""

    def __init__(
        self,
        store: Store,
        *,
        heartbeat_timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
        touch_interval: float | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.tracker = LivenessTracker(heartbeat_timeout)
        self.touch_interval = (
            heartbeat_timeout / 3 if touch_interval is None else float(touch_interval)
        )
        self._lock = threading.RLock()
        self._touched: dict[str, float] = {}
        self._job_steps: dict[str, tuple[int, int | None, float]] = {}

    @property
    def heartbeat_timeout(self) -> float:
        return self.tracker.heartbeat_timeout

    def restore(self) -> None:
        """Seed the tracker from the store's device records (call once at start-up)."""
        now = self.clock()
        with self._lock:
            for d in self.store.list_devices():
                self.tracker.restore(d.device, d.online, now)
            metrics.DEVICES_ONLINE.set(self.tracker.online_count)

    # -- inputs ------------------------------------------------------------------------------

    def on_message(self, msg: Message, now: float | None = None) -> None:
        """A STATUS or heartbeat (anything else counts as :meth:`seen`)."""
        t = self.clock() if now is None else now
        with self._lock:
            if isinstance(msg, Status):
                tr = self.tracker.on_status(msg.device, msg.online, msg.session, t)
            elif isinstance(msg, Heartbeat):
                tr = self.tracker.on_seen(msg.device, t, msg.session)
                for job, (step, acked) in msg.jobs.items():
                    self._job_steps[job] = (step, acked, t)
            else:
                tr = self.tracker.on_seen(msg.device, t)
            self._apply([tr] if tr else [], t)
            self._touch(msg.device, t)

    def seen(self, device: str, now: float | None = None) -> None:
        t = self.clock() if now is None else now
        with self._lock:
            tr = self.tracker.on_seen(device, t)
            self._apply([tr] if tr else [], t)
            self._touch(device, t)

    def check(self, now: float | None = None) -> list[DeviceTransition]:
        """Apply heartbeat timeouts (the ingest calls this about once a second)."""
        t = self.clock() if now is None else now
        with self._lock:
            trs = self.tracker.check(t)
            self._apply(trs, t)
            for d in self.tracker.devices():
                self._touch(d.device, t)
            return trs

    # -- reading -------------------------------------------------------------------------------

    def device(self, device: str) -> DeviceLive | None:
        with self._lock:
            return self.tracker.get(device)

    def devices(self) -> list[DeviceLive]:
        with self._lock:
            return self.tracker.devices()

    def device_step(self, job: str) -> tuple[int, int | None, float] | None:
        """The job's (step, acked seq, when) from its device's newest heartbeat."""
        with self._lock:
            return self._job_steps.get(job)

    def offline_jobs(self, older_than: float, now: float | None = None) -> list[JobRecord]:
        """See :func:`offline_jobs` (with this liveness's clock)."""
        return offline_jobs(self.store, older_than, now=self.clock() if now is None else now)

    def job_event(self, job: str, event: str, *, detail: str = "") -> JobRecord | None:
        """See :func:`record_job_event`."""
        return record_job_event(self.store, job, event, detail=detail)

    # -- recording -----------------------------------------------------------------------------

    def _apply(self, transitions: Iterable[DeviceTransition], now: float) -> None:
        changed = False
        for tr in transitions:
            changed = True
            log.info(
                "device %s is %s (%s)", tr.device, "online" if tr.online else "offline", tr.reason
            )
            try:
                self.store.set_device_online(tr.device, tr.online)
                self._touched[tr.device] = now
                event = "device-online" if tr.online else "device-offline"
                for rec in self.store.list_jobs(tr.device):
                    if tr.online and rec.owner != "edge":
                        continue
                    record_job_event(self.store, rec.job, event, detail=tr.reason)
            except EdgeResumeError:
                log.exception("cannot record that device %s is %s", tr.device, tr.online)
                metrics.INGEST_ERRORS.labels(what="liveness").inc()
        if changed:  # counting is O(devices): not on every message, only when one moved
            metrics.DEVICES_ONLINE.set(self.tracker.online_count)

    def _touch(self, device: str, now: float) -> None:
        """Write the device's ``last_seen`` if the last write is older than the interval."""
        d = self.tracker.get(device)
        if d is None or not d.online:
            return
        last = self._touched.get(device)
        if last is not None and (now - last < self.touch_interval or d.last_seen <= last):
            return  # written recently, or nothing arrived since
        self._touched[device] = now
        try:
            self.store.touch_device(device)
        except EdgeResumeError:
            log.exception("cannot record that device %s was seen", device)
            metrics.INGEST_ERRORS.labels(what="liveness").inc()
