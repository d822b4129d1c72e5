"""The server's ingest, liveness and job control against a real Mosquitto, with devices
simulated by the real agent protocol sessions over the real transport (one of them in a
process of its own, SIGKILLed so that its MQTT will fires), a real SQLite store, and the
roles wired by server.serve.Server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from edge_agent.protocol import Completed, TakenOver
from server import metrics
from server.config import load_config
from server.control import WorkerContext
from server.serve import Server
from server.store import SQLiteStore
from tests.support.broker import Broker
from tests.support.server_fakes import FakeResumer
from tests.support.sim_device import SimDevice, generate_state

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
TOKEN = "integration-token"


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.02)


def counter(c: object, **labels: str) -> float:
    return float(c.labels(**labels)._value.get())  # type: ignore[attr-defined]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    with SQLiteStore(tmp_path / "store") as s:
        yield s


def start_server(
    broker: Broker, store: SQLiteStore, roles: tuple[str, ...] = ("ingest",), **env: str
) -> tuple[Server, FakeResumer]:
    cfg = load_config(
        env={
            "EDGE_SERVER_BROKER_URL": broker.url,
            "EDGE_SERVER_BROKER_CLIENT_ID": "edge-server-test",
            "EDGE_SERVER_LIVENESS_CHECK_INTERVAL_S": "0.1",
            "EDGE_SERVER_STORE_COMPACT_INTERVAL_S": "0.2",
            "EDGE_SERVER_API_PORT": "0",
            "EDGE_SERVER_API_TOKEN": TOKEN,
            **env,
        }
    )
    fake = FakeResumer(store)
    srv = Server(cfg, roles, store=store, worker_factory=lambda ctx: fake).start()
    if srv.ingest is not None:
        srv.ingest.set_hooks(fake)
        assert srv.ingest_service.connected.wait(10)
    return srv, fake


@pytest.fixture
def server(broker: Broker, store: SQLiteStore) -> Iterator[tuple[Server, FakeResumer]]:
    srv, fake = start_server(broker, store)
    yield srv, fake
    srv.close()


@pytest.fixture
def device(broker: Broker) -> Iterator[SimDevice]:
    dev = SimDevice(broker.url, "gw-1")
    yield dev
    dev.close()


def test_deltas_committed_and_acked_then_a_server_restart(
    broker: Broker, store: SQLiteStore, device: SimDevice
) -> None:
    srv, _ = start_server(broker, store)
    try:
        device.start()
        job = device.add_job("job-1", total_steps=100)
        device.run_to_acked(job, 6, every=2)
        assert job.acked == [1, 2, 3]
        rec = store.get_job("job-1")
        assert rec is not None and (rec.seq, rec.step, rec.device) == (3, 6, "gw-1")
        loaded = store.load_state("job-1")
        assert np.array_equal(loaded.state["tokens"], generate_state(6)["tokens"])
        assert store.snapshots("job-1")[0].kind == "full"
    finally:
        srv.close()
    # the device goes on while the server is down: its snapshot waits in the broker
    job.advance(2)
    assert device.offer(job)
    srv, _ = start_server(broker, store)  # a fresh process: sessions rebuilt from the store
    try:
        device.pump(lambda: len(job.acked) == 4, 20)
        device.run_to_acked(job, 1)
        assert job.acked == [1, 2, 3, 4, 5]
        assert store.get_job("job-1").seq == 5  # type: ignore[union-attr]
        assert store.verify().ok
    finally:
        srv.close()


def test_a_wrong_device_over_mqtt_is_refused(
    broker: Broker, store: SQLiteStore, server: tuple[Server, FakeResumer], device: SimDevice
) -> None:
    device.start()
    job = device.add_job("job-1")
    device.run_to_acked(job, 1)
    refused = counter(metrics.REFUSED, reason="TopicMismatch")
    mallory = SimDevice(broker.url, "gw-2").start()
    try:
        stolen = mallory.add_job("job-1")  # the same job id from another device
        wait_for(lambda: counter(metrics.REFUSED, reason="TopicMismatch") > refused, what="refusal")
        assert stolen.session.phase.name == "SYNCING"  # never answered
    finally:
        mallory.close()
    rec = store.get_job("job-1")
    assert rec is not None and rec.device == "gw-1" and rec.seq == 1
    assert store.list_jobs("gw-2") == []


def test_take_over_fences_the_device(
    store: SQLiteStore, server: tuple[Server, FakeResumer], device: SimDevice
) -> None:
    srv, _ = server
    device.start()
    job = device.add_job("job-1")
    device.run_to_acked(job, 2)
    assert srv.ingest.take_over("job-1", reason="test") == 2  # returns after the PUBACK
    device.pump(lambda: job.closed_by is not None)
    assert isinstance(job.closed_by, TakenOver) and job.closed_by.epoch == 2
    rec = store.get_job("job-1")
    assert rec is not None and (rec.owner, rec.epoch, rec.status) == ("server", 2, "resuming")


def test_live_handover_over_mqtt(
    store: SQLiteStore, server: tuple[Server, FakeResumer], device: SimDevice
) -> None:
    srv, worker = server
    device.start()
    job = device.add_job("job-1")
    device.run_to_acked(job, 2)
    srv.ingest.request_handover("job-1")
    device.pump(lambda: job.handover_requested)
    job.advance(1)
    device.hand_over(job)
    device.pump(lambda: job.closed_by is not None)
    assert isinstance(job.closed_by, TakenOver) and job.closed_by.handed_over
    wait_for(lambda: worker.handed_over == [("job-1", 2)], what="on_handed_over")
    rec = store.get_job("job-1")
    assert rec is not None and (rec.owner, rec.epoch, rec.step) == ("server", 2, 3)
    assert store.status_history("job-1")[-1].detail == "released by the device"


def test_done_over_mqtt_records_outputs(
    store: SQLiteStore, server: tuple[Server, FakeResumer], device: SimDevice
) -> None:
    device.start()
    job = device.add_job("job-1", total_steps=5)
    device.run_to_acked(job, 2)
    job.advance(3)
    device.finish(job)
    device.pump(lambda: job.closed_by is not None)
    assert isinstance(job.closed_by, Completed)
    rec = store.get_job("job-1")
    assert rec is not None and rec.status == "completed" and rec.step == 5
    tokens = store.get_outputs("job-1")["tokens"]
    assert np.array_equal(tokens, generate_state(5)["tokens"][3:])


def test_will_on_agent_kill_marks_device_and_job_offline(
    broker: Broker, store: SQLiteStore, server: tuple[Server, FakeResumer]
) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.support.sim_device_child", broker.url, "gw-9", "job-9"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        dev = store.get_device("gw-9")
        assert dev is not None and dev.online
        killed_at = time.time()
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        if child.stdout:
            child.stdout.close()
    wait_for(lambda: store.get_job("job-9").status == "offline", what="job offline")  # type: ignore[union-attr]
    dev = store.get_device("gw-9")
    assert dev is not None and not dev.online and dev.online_at >= killed_at - 1
    hist = store.status_history("job-9")
    assert [h.status for h in hist] == ["running", "offline"]
    assert hist[1].detail == "status offline (will)" and hist[1].at >= hist[0].at
    srv, _ = server
    assert [j.job for j in srv.liveness.offline_jobs(0)] == ["job-9"]
    assert store.get_job("job-9").seq == 2  # type: ignore[union-attr]


def test_all_roles_in_one_process_over_http(
    broker: Broker, store: SQLiteStore, device: SimDevice
) -> None:
    srv, fake = start_server(broker, store, ("ingest", "worker", "api"))
    try:
        assert srv.worker is fake and srv.control is srv.ingest
        device.start()
        job = device.add_job("job-1")
        device.run_to_acked(job, 2)
        h = {"Authorization": f"Bearer {TOKEN}"}
        url = srv.api.url
        health = httpx.get(f"{url}/healthz").json()
        assert health["status"] == "ok" and health["roles"]["ingest"]["mqtt_connected"]
        jobs = httpx.get(f"{url}/v1/jobs", headers=h).json()
        assert [(j["job"], j["seq"], j["status"]) for j in jobs] == [("job-1", 2, "running")]
        device.heartbeat()
        wait_for(lambda: srv.liveness.device_step("job-1") is not None, what="heartbeat")
        j = httpx.get(f"{url}/v1/jobs/job-1", headers=h).json()
        assert j["progress"]["device_step"] == 2
        r = httpx.post(f"{url}/v1/jobs/job-1/resume", headers=h)
        assert r.status_code == 202 and fake.calls == [("resume", "job-1")]
        devs = httpx.get(f"{url}/v1/devices", headers=h).json()
        assert devs[0]["device"] == "gw-1" and devs[0]["online"] is True
        text = httpx.get(f"{url}/metrics").text
        assert 'edge_resume_messages_in_total{type="snap"}' in text
    finally:
        srv.close()


def test_worker_in_its_own_process_uses_mqtt_job_control(
    broker: Broker, store: SQLiteStore, server: tuple[Server, FakeResumer], device: SimDevice
) -> None:
    """A worker-only process: its own MQTT connection; the ingest process sees the CTL."""
    srv, _ = server
    device.start()
    job = device.add_job("job-1")
    device.run_to_acked(job, 2)
    contexts: list[WorkerContext] = []

    def factory(ctx: WorkerContext) -> FakeResumer:
        contexts.append(ctx)
        return FakeResumer(ctx.store)

    cfg = load_config(
        env={
            "EDGE_SERVER_BROKER_URL": broker.url,
            "EDGE_SERVER_BROKER_CLIENT_ID": "edge-server-test",
        }
    )
    worker_proc = Server(cfg, ("worker",), store=store, worker_factory=factory).start()
    try:
        (ctx,) = contexts
        assert ctx.liveness is None and type(ctx.control).__name__ == "MqttJobControl"
        wait_for(lambda: worker_proc.transport.connected, what="worker's MQTT link")
        assert ctx.control.take_over("job-1", reason="auto") == 2
        device.pump(lambda: job.closed_by is not None)
        assert isinstance(job.closed_by, TakenOver)
        # the ingest dropped its outdated session when the CTL arrived
        wait_for(lambda: srv.ingest.session("job-1") is None, what="session dropped")
        ctx.control.finish("job-1", 2)
        wait_for(lambda: store.get_job("job-1").status == "completed", what="completed")  # type: ignore[union-attr]
    finally:
        worker_proc.close()
