"""server.api over real HTTP: uvicorn on a free port in a thread, an httpx client, a real
SQLite store filled through the store's interface, and a fake Resumer (the worker is reached
only through that interface)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from edge_agent.codec import encode_delta
from edge_agent.state import state_hash, state_nbytes
from server import metrics
from server.api import ApiServer, create_app
from server.liveness import Liveness
from server.store import SQLiteStore
from tests.support.server_fakes import FakeResumer
from tests.support.sim_device import generate_spec, generate_state

pytestmark = pytest.mark.integration

TOKEN = "t0ken-for-tests"


def fill(store: SQLiteStore) -> None:
    """gw-1 runs job-1 (3 snapshots) and job-2 (none); gw-2's job-3 is completed."""
    for dev, job in (("gw-1", "job-1"), ("gw-1", "job-2"), ("gw-2", "job-3")):
        store.record_birth(
            dev, job, spec=generate_spec(job, 10), model_hash="sha256:m", codec_version=1
        )
        store.set_progress(job, 0, 10)
    prev = None
    for seq, step in enumerate((2, 4, 6), start=1):
        s = generate_state(step)
        payload = encode_delta(prev, s)
        store.commit_snapshot(
            "gw-1",
            "job-1",
            seq,
            None if prev is None else seq - 1,
            1,
            payload,
            state_hash(s),
            state_nbytes(s),
            step=step,
        )
        prev = s
    store.put_outputs("job-3", 0, {"tokens": np.arange(10, dtype=np.int64)})
    store.set_status("job-3", "completed", detail="done")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    with SQLiteStore(tmp_path / "store") as s:
        fill(s)
        yield s


@pytest.fixture
def resumer(store: SQLiteStore) -> FakeResumer:
    return FakeResumer(store)


@pytest.fixture
def liveness(store: SQLiteStore) -> Liveness:
    lv = Liveness(store, heartbeat_timeout=60)
    lv.seen("gw-1")
    return lv


@pytest.fixture
def api(store: SQLiteStore, resumer: FakeResumer, liveness: Liveness) -> Iterator[httpx.Client]:
    app = create_app(
        store,
        token=TOKEN,
        resumer=resumer,
        liveness=liveness,
        health=lambda: {"ingest": {"ok": True, "mqtt_connected": True}},
    )
    server = ApiServer(app, host="127.0.0.1", port=0).start()
    try:
        with httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
        ) as client:
            yield client
    finally:
        server.stop()


def test_auth_is_required_on_every_v1_route(api: httpx.Client) -> None:
    base = str(api.base_url)
    routes = [
        ("GET", "/v1/devices"),
        ("GET", "/v1/jobs"),
        ("GET", "/v1/jobs/job-1"),
        ("POST", "/v1/jobs/job-1/resume"),
        ("POST", "/v1/jobs/job-1/handover"),
        ("GET", "/v1/jobs/job-3/outputs"),
        ("GET", "/v1/jobs/job-3/outputs/tokens.npy"),
    ]
    with httpx.Client(base_url=base, timeout=10) as anon:
        for method, path in routes:
            r = anon.request(method, path)
            assert r.status_code == 401, (method, path)
            assert r.headers["www-authenticate"].startswith("Bearer")
            for header in ("Bearer wrong", f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN):
                r = anon.request(method, path, headers={"Authorization": header})
                assert r.status_code == 401, (method, path, header)
        # health, metrics and the OpenAPI document need no token
        assert anon.get("/healthz").status_code == 200
        assert anon.get("/metrics").status_code == 200
        doc = anon.get("/openapi.json").json()
        assert "/v1/jobs/{job_id}/resume" in doc["paths"]
        assert anon.get("/docs").status_code == 200


def test_healthz_and_metrics(api: httpx.Client) -> None:
    h = api.get("/healthz").json()
    assert h["status"] == "ok" and h["roles"]["ingest"]["mqtt_connected"] is True
    metrics.COMMITS.labels(kind="delta").inc(0)
    metrics.NACKS.labels(reason="corrupt").inc(0)
    metrics.REFUSED.labels(reason="TopicMismatch").inc(0)
    metrics.MESSAGES_IN.labels(type="snap").inc(0)
    metrics.BYTES_IN.labels(type="snap").inc(0)
    metrics.REPLAY_SECONDS.labels(backend="torch", device="cpu").observe(0.0)
    r = api.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in (
        "edge_resume_messages_in_total",
        "edge_resume_bytes_in_total",
        "edge_resume_nacks_total",
        "edge_resume_resyncs_total",
        "edge_resume_refused_messages_total",
        "edge_resume_commits_total",
        "edge_resume_replay_seconds_bucket",
        "edge_resume_resume_seconds_bucket",
        "edge_resume_devices_online",
    ):
        assert name in text, name


def test_devices(api: httpx.Client) -> None:
    devs = {d["device"]: d for d in api.get("/v1/devices").json()}
    assert set(devs) == {"gw-1", "gw-2"}
    assert devs["gw-1"]["online"] is True and devs["gw-1"]["jobs"] == ["job-1", "job-2"]
    assert devs["gw-2"]["online"] is False and devs["gw-2"]["jobs"] == ["job-3"]
    for d in devs.values():
        assert d["first_seen"] <= d["last_seen"]


def test_jobs_list_shape_and_filters(api: httpx.Client) -> None:
    jobs = {j["job"]: j for j in api.get("/v1/jobs").json()}
    assert set(jobs) == {"job-1", "job-2", "job-3"}
    j = jobs["job-1"]
    assert (j["device"], j["kind"], j["status"], j["owner"], j["epoch"], j["seq"]) == (
        "gw-1", "generate", "running", "edge", 1, 3,
    )  # fmt: skip
    assert j["progress"] == {"step": 6, "total_steps": 10, "fraction": 0.6, "device_step": None}
    assert j["bytes_received"] > 0 and j["full_size"] == state_nbytes(generate_state(6))
    assert j["snapshots"] == 3 and j["last_snapshot_age_s"] >= 0
    assert len(j["state_hash"]) == 32 and j["resume"] is None
    assert jobs["job-2"]["seq"] is None and jobs["job-2"]["last_snapshot_at"] is None
    assert [j["job"] for j in api.get("/v1/jobs", params={"status": "completed"}).json()] == [
        "job-3"
    ]
    assert [j["job"] for j in api.get("/v1/jobs", params={"device": "gw-2"}).json()] == ["job-3"]
    assert api.get("/v1/jobs", params={"device": "bad id!"}).json() == []


def test_job_detail(api: httpx.Client, store: SQLiteStore) -> None:
    d = api.get("/v1/jobs/job-1").json()
    assert [s["seq"] for s in d["chain"]] == [1, 2, 3]
    assert [s["kind"] for s in d["chain"]] == ["full", "delta", "delta"]
    assert d["chain"][1]["base_seq"] == 1 and d["chain"][2]["epoch"] == 1
    assert [s["seq"] for s in d["snapshots_held"]] == [1, 2, 3]
    assert [h["status"] for h in d["history"]] == ["running"]
    assert d["spec"]["job"]["kind"] == "generate" and d["model_hash"] == "sha256:m"
    assert d["outputs"] == {}
    d3 = api.get("/v1/jobs/job-3").json()
    assert d3["outputs"] == {"tokens": 10}
    assert [h["status"] for h in d3["history"]] == ["running", "completed"]
    assert api.get("/v1/jobs/nope").status_code == 404
    assert api.get("/v1/jobs/bad%20id").status_code == 404


def test_resume_is_idempotent(api: httpx.Client, resumer: FakeResumer) -> None:
    r1 = api.post("/v1/jobs/job-1/resume", json={"reason": "test"})
    assert r1.status_code == 202
    body = r1.json()
    assert (body["job_id"], body["phase"], body["attempt"]) == ("job-1", "queued", 1)
    r2 = api.post("/v1/jobs/job-1/resume")
    assert r2.status_code == 200 and r2.json() == body  # the running resume, not a new one
    assert api.get("/v1/jobs/job-1").json()["resume"]["attempt"] == 1
    assert api.get("/v1/jobs").json()[0]["resume"]["phase"] == "queued"
    assert resumer.calls == [("resume", "job-1"), ("resume", "job-1")]
    # a finished (failed) resume: the next request starts attempt 2
    from dataclasses import replace

    resumer.statuses["job-1"] = replace(resumer.statuses["job-1"], phase="failed", error="x")
    r3 = api.post("/v1/jobs/job-1/resume")
    assert r3.status_code == 202 and r3.json()["attempt"] == 2


def test_resume_and_handover_refusals(api: httpx.Client, store: SQLiteStore) -> None:
    assert api.post("/v1/jobs/nope/resume").status_code == 404
    r = api.post("/v1/jobs/job-3/resume")
    assert r.status_code == 409 and "completed" in r.json()["detail"]
    assert api.post("/v1/jobs/nope/handover").status_code == 404
    assert api.post("/v1/jobs/job-3/handover").status_code == 409
    store.set_device_online("gw-1", True)
    r = api.post("/v1/jobs/job-2/handover")
    assert r.status_code == 202 and r.json()["phase"] == "handover-requested"
    store.raise_epoch("job-1", 1, "server", status="resuming")
    r = api.post("/v1/jobs/job-1/handover")
    assert r.status_code == 409 and "owned by the server" in r.json()["detail"]


def test_handover_of_an_offline_device_is_refused(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "s") as store:
        fill(store)
        app = create_app(store, token=TOKEN, resumer=FakeResumer(store))
        server = ApiServer(app, port=0).start()
        try:
            h = {"Authorization": f"Bearer {TOKEN}"}
            r = httpx.post(f"{server.url}/v1/jobs/job-1/handover", headers=h)
            assert r.status_code == 409 and "offline" in r.json()["detail"]
        finally:
            server.stop()


def test_without_a_worker_resume_is_503(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "s") as store:
        fill(store)
        store.set_device_online("gw-1", True)
        server = ApiServer(create_app(store, token=TOKEN), port=0).start()
        try:
            h = {"Authorization": f"Bearer {TOKEN}"}
            assert httpx.post(f"{server.url}/v1/jobs/job-1/resume", headers=h).status_code == 503
            assert httpx.post(f"{server.url}/v1/jobs/job-1/handover", headers=h).status_code == 503
            assert httpx.get(f"{server.url}/v1/jobs", headers=h).json()[0]["resume"] is None
        finally:
            server.stop()


def test_outputs_json_and_npy(api: httpx.Client, store: SQLiteStore) -> None:
    o = api.get("/v1/jobs/job-3/outputs").json()
    assert o["complete"] is True and o["status"] == "completed"
    t = o["outputs"]["tokens"]
    assert (t["dtype"], t["shape"], t["start"], t["stop"]) == ("<i8", [10], 0, 10)
    assert t["values"] == list(range(10))
    part = api.get("/v1/jobs/job-3/outputs", params={"start": 4, "stop": 7}).json()
    assert part["outputs"]["tokens"]["values"] == [4, 5, 6]
    assert part["outputs"]["tokens"]["start"] == 4
    r = api.get("/v1/jobs/job-3/outputs/tokens.npy")
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    arr = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert arr.dtype == np.int64 and np.array_equal(arr, np.arange(10))
    assert api.get("/v1/jobs/job-3/outputs/nope.npy").status_code == 404
    assert api.get("/v1/jobs/job-1/outputs").status_code == 404  # none yet
    assert api.get("/v1/jobs/job-3/outputs", params={"start": 5, "stop": 20}).status_code == 404
    assert api.get("/v1/jobs/job-3/outputs", params={"start": 5, "stop": 2}).status_code == 422
    # float rows (a batch job's results) with NaN come back as JSON-safe values
    store.put_outputs("job-1", 0, {"results": np.array([[1.5, np.nan]], np.float32)})
    res = api.get("/v1/jobs/job-1/outputs").json()["outputs"]["results"]
    assert res["shape"] == [1, 2] and res["values"] == [[1.5, "nan"]]


def test_a_store_error_is_a_500_with_its_message(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "s") as store:
        fill(store)
        server = ApiServer(create_app(store, token=TOKEN), port=0).start()
        try:
            store.close()  # every store call now raises StoreError
            r = httpx.get(
                f"{server.url}/v1/jobs", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
            )
            assert r.status_code == 500 and "closed" in r.json()["detail"]
        finally:
            server.stop()


def test_empty_token_is_refused(store: SQLiteStore) -> None:
    with pytest.raises(ValueError):
        create_app(store, token="")
