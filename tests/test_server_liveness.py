"""server.liveness: the pure tracker and job status table, then the store-backed adapter
with an injected clock (timestamps checked). The will of a SIGKILLed agent over a real
broker is in tests/test_server_integration.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.protocol.messages import Heartbeat, Status
from server import metrics
from server.liveness import (
    JOB_EVENTS,
    Liveness,
    LivenessTracker,
    next_job_status,
    offline_jobs,
    record_job_event,
)
from server.store import JOB_STATUSES, SQLiteStore


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


# -- the pure tracker ----------------------------------------------------------------------------


def test_status_online_then_will() -> None:
    tr = LivenessTracker(30)
    t = tr.on_status("gw-1", True, "s1", 100.0)
    assert t is not None and (t.online, t.at) == (True, 100.0)
    assert tr.on_status("gw-1", True, "s1", 101.0) is None  # no change
    t = tr.on_status("gw-1", False, "s1", 150.0)
    assert t is not None and (t.online, t.at, t.reason) == (False, 150.0, "status offline (will)")
    d = tr.get("gw-1")
    assert d is not None and not d.online and d.since == 150.0


def test_a_stale_will_of_a_replaced_connection_is_ignored() -> None:
    tr = LivenessTracker(30)
    tr.on_status("gw-1", True, "new", 100.0)
    assert tr.on_status("gw-1", False, "old", 101.0) is None
    assert tr.get("gw-1").online  # type: ignore[union-attr]
    # a heartbeat's session becomes the device's session
    tr.on_seen("gw-1", 102.0, "newer")
    assert tr.on_status("gw-1", False, "new", 103.0) is None
    assert tr.on_status("gw-1", False, "newer", 104.0) is not None


def test_heartbeat_timeout_and_return() -> None:
    tr = LivenessTracker(30)
    tr.on_seen("gw-1", 0.0, "s")
    assert tr.check(30.0) == []  # exactly the timeout: still online
    (t,) = tr.check(30.5)
    assert (t.device, t.online, t.at) == ("gw-1", False, 30.5) and "no message" in t.reason
    assert tr.check(60.0) == []  # already offline
    t2 = tr.on_seen("gw-1", 61.0)
    assert t2 is not None and t2.online and t2.reason == "message"
    assert tr.online_count == 1


def test_first_contact_and_restore() -> None:
    tr = LivenessTracker(10)
    t = tr.on_status("gw-2", False, "s", 5.0)  # first heard of through its retained will
    assert t is not None and not t.online
    tr.restore("gw-3", True, 100.0)
    assert tr.check(109.0) == [] and len(tr.check(111.0)) == 1
    with pytest.raises(ValueError):
        LivenessTracker(0)


def test_job_status_table() -> None:
    assert next_job_status("running", "device-offline") == "offline"
    assert next_job_status("offline", "device-online") == "running"
    assert next_job_status("resuming", "device-online") is None  # the server claimed it
    assert next_job_status("offline", "claimed") == "resuming"
    assert next_job_status("resuming", "started") == "server-running"
    assert next_job_status("server-running", "completed") == "completed"
    assert next_job_status("server-running", "failed") == "failed"
    assert next_job_status("failed", "claimed") == "resuming"  # a retry
    assert next_job_status("completed", "device-offline") is None
    assert next_job_status("completed", "claimed") is None
    assert next_job_status("running", "device-online") is None
    for allowed, target in JOB_EVENTS.values():
        assert target in JOB_STATUSES and allowed <= set(JOB_STATUSES)
    with pytest.raises(ValueError):
        next_job_status("running", "exploded")


# -- the adapter ---------------------------------------------------------------------------------


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[SQLiteStore]:
    with SQLiteStore(tmp_path / "store", clock=clock) as s:
        yield s


def born(store: SQLiteStore, job: str, device: str = "gw-1") -> None:
    store.record_birth(device, job, spec={"job": {"kind": "x"}}, model_hash="m", codec_version=1)


def test_job_transitions_recorded_with_timestamps(store: SQLiteStore, clock: Clock) -> None:
    lv = Liveness(store, heartbeat_timeout=30, clock=clock)
    born(store, "a")
    born(store, "b")
    lv.on_message(Status("gw-1", True, "s1", 0))
    t0 = clock.t
    clock.advance(10)
    lv.on_message(Status("gw-1", False, "s1", 0))  # the will
    t_off = clock.t
    assert store.get_job("a").status == "offline"  # type: ignore[union-attr]
    dev = store.get_device("gw-1")
    assert dev is not None and not dev.online and dev.online_at == t_off
    # a worker claims job b meanwhile; then the device comes back
    clock.advance(5)
    store.raise_epoch("b", 1, "server", status="resuming", detail="claimed: auto")
    clock.advance(5)
    lv.on_message(Heartbeat("gw-1", "s2", 0, {"a": (3, None)}))
    t_back = clock.t
    hist_a = [(h.status, h.at, h.detail) for h in store.status_history("a")]
    assert hist_a == [
        ("running", t0, "born"),
        ("offline", t_off, "status offline (will)"),
        ("running", t_back, "message"),
    ]
    # b stays with the server: never moved back to running
    assert [h.status for h in store.status_history("b")] == ["running", "offline", "resuming"]
    assert lv.device_step("a") == (3, None, t_back)


def test_heartbeat_timeout_moves_jobs_offline(store: SQLiteStore, clock: Clock) -> None:
    lv = Liveness(store, heartbeat_timeout=30, clock=clock)
    born(store, "a")
    lv.seen("gw-1")
    clock.advance(29)
    assert lv.check() == []
    clock.advance(2)
    (t,) = lv.check()
    assert not t.online and store.get_job("a").status == "offline"  # type: ignore[union-attr]
    assert store.get_job("a").status_at == clock.t  # type: ignore[union-attr]
    assert metrics.DEVICES_ONLINE._value.get() == 0  # type: ignore[attr-defined]


def test_the_online_gauge_follows_transitions_only(store: SQLiteStore, clock: Clock) -> None:
    lv = Liveness(store, heartbeat_timeout=30, clock=clock)
    gauge = metrics.DEVICES_ONLINE._value  # type: ignore[attr-defined]
    for d in ("gw-1", "gw-2", "gw-3"):
        lv.seen(d)
    assert gauge.get() == 3
    gauge.set(-1)  # a message without a transition leaves the gauge alone (not recounted)
    lv.seen("gw-2")
    lv.on_message(Heartbeat("gw-1", "s1", 0, {}))
    assert gauge.get() == -1
    lv.on_message(Status("gw-3", False, "s9", 0))  # the will: a transition, recounted
    assert gauge.get() == 2
    clock.advance(31)
    lv.seen("gw-1")
    lv.check()  # gw-2 timed out
    assert gauge.get() == 1


def test_offline_jobs_for_auto_resume(store: SQLiteStore, clock: Clock) -> None:
    lv = Liveness(store, heartbeat_timeout=5, clock=clock)
    born(store, "a")
    born(store, "b", device="gw-2")
    lv.seen("gw-1")
    lv.seen("gw-2")
    clock.advance(6)
    lv.seen("gw-2")
    lv.check()  # gw-1 timed out
    clock.advance(100)
    assert [j.job for j in lv.offline_jobs(99)] == ["a"]
    assert lv.offline_jobs(101) == []
    assert [j.job for j in offline_jobs(store, 50, now=clock.t)] == ["a"]
    store.raise_epoch("a", 1, "server", status="resuming")
    assert lv.offline_jobs(0) == []  # claimed: no longer a candidate


def test_record_job_event_is_a_compare_and_set(store: SQLiteStore, clock: Clock) -> None:
    born(store, "a")
    assert record_job_event(store, "a", "started") is None  # not resuming
    assert record_job_event(store, "a", "claimed").status == "resuming"  # type: ignore[union-attr]
    assert record_job_event(store, "a", "started").status == "server-running"  # type: ignore[union-attr]
    assert record_job_event(store, "a", "device-offline") is None
    assert record_job_event(store, "a", "completed", detail="done").status == "completed"  # type: ignore[union-attr]
    assert record_job_event(store, "nope", "claimed") is None


def test_restore_from_store_and_touch_interval(
    tmp_path: Path, store: SQLiteStore, clock: Clock
) -> None:
    store.set_device_online("gw-1", True)
    store.set_device_online("gw-2", False)
    lv = Liveness(store, heartbeat_timeout=30, clock=clock, touch_interval=10)
    lv.restore()
    assert lv.device("gw-1").online and not lv.device("gw-2").online  # type: ignore[union-attr]
    clock.advance(1)
    lv.seen("gw-1")
    first = store.get_device("gw-1").last_seen  # type: ignore[union-attr]
    assert first == clock.t
    clock.advance(1)
    lv.seen("gw-1")  # within the touch interval: memory only
    assert store.get_device("gw-1").last_seen == first  # type: ignore[union-attr]
    assert lv.device("gw-1").last_seen == clock.t  # type: ignore[union-attr]
    clock.advance(10)
    lv.check()  # the sweep writes what arrived since
    assert store.get_device("gw-1").last_seen == clock.t  # type: ignore[union-attr]
