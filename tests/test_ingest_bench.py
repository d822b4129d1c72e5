"""The ingest benchmark's harness, end to end at a tiny scale (no timed assertions): a real
Mosquitto, the real server in its own process, generator processes of simulated devices,
the null server; every device acknowledged, the store verified, every process stopped,
also on Ctrl-C and SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.ingest_bench import _check_store, _split, job_spec, proc_cpu
from edge_agent import codec
from server.store import SQLiteStore

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
STARTED = re.compile(r"\[ingest-bench\] started (.+) pid (\d+)")

pytestmark = pytest.mark.integration


def _started(stderr: str) -> dict[int, str]:
    return {int(m.group(2)): m.group(1) for m in STARTED.finditer(stderr)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead; /proc says so
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def _all_gone(pids: dict[int, str], timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [f"{name} ({pid})" for pid, name in pids.items() if _alive(pid)]
        if not alive:
            return []
        time.sleep(0.1)
    return alive


def test_ingest_bench_end_to_end_at_a_tiny_scale(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-m", "bench.ingest_bench", "--devices", "10",
         "--generators", "2", "--warmup", "1", "--window", "3", "--core-seconds", "1",
         "--json", str(out)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert [(r["server"], r["rate"] is None) for r in runs] == [
        ("ingest", True),
        ("ingest", False),
        ("null", True),
        ("core", True),
    ]
    core = runs.pop()
    assert core["verify_ok"] and core["jobs_holding_acked"] == 10 and core["commits"] >= 10
    ms = core["ms_per_snapshot"]
    assert 0 < ms["apply_verify"] < ms["wall"] and 0 < ms["store_commit"] < ms["wall"]
    assert core["snapshots_per_s"] > 0 and 200 < core["mean_snapshot_bytes"] < 4000
    for r in runs:
        assert r["errors"] == [] and r["devices_lost"] == 0
        assert r["devices"] == 10 and r["generators"] == 2
        assert r["devices_acked"] == 10
        assert r["min_acked_seq"] >= 2  # the full snapshot and at least one delta each
        assert r["snapshots_per_s"]["mean_per_s"] > 0
        assert r["messages_per_s"]["mean_per_s"] >= r["snapshots_per_s"]["mean_per_s"] * 0.9
        assert r["mb_per_s"]["mean_per_s"] > 0
        assert r["acks_seen_by_devices"] > 0 and r["latency_s"]["n"] > 0
        assert 0 < r["latency_s"]["p50"] <= r["latency_s"]["p95"]
        assert 200 < r["mean_snapshot_bytes"] < 4000  # deltas of a few hundred B to a few KB
        assert r["device_counts"].get("NeedsFull", 0) == 0
    for r in runs[:2]:
        store = r["store"]
        assert store["ok"] and store["verify_ok"], store
        assert store["jobs"] == 10 and store["problems"] == []
        assert store["jobs_matching"] + store["jobs_ahead"] == 10
        assert r["server_exit"] == 0
        assert r["server_commit_mean_s"] > 0
    # the paced run asked for half the closed loop's rate
    assert runs[1]["rate"] * 10 == pytest.approx(runs[0]["snapshots_per_s"]["mean_per_s"] / 2)
    for label in ("ingest, closed loop", "generator ceiling (null server)", "ingest core alone"):
        assert label in proc.stdout
    started = _started(proc.stderr)
    names = sorted(started.values())
    assert sum(n == "mosquitto" for n in names) == 3
    assert sum(n.startswith("generator") for n in names) == 6
    assert names.count("ingest core") == 1
    assert _all_gone(started) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_stops_every_process(sig: signal.Signals) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.ingest_bench", "--devices", "6", "--generators", "2",
         "--warmup", "1", "--window", "60", "--no-paced", "--no-ceiling"],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    seen = ""
    try:
        deadline = time.monotonic() + 120
        while seen.count("started generator") < 2 and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen += line
        assert seen.count("started generator") == 2, seen
        time.sleep(3)  # inside set-up or the window
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    seen += err
    assert proc.returncode == 130, seen
    assert "every process started was stopped" in err
    started = _started(seen)
    assert len(started) == 4  # mosquitto, the server, two generators
    assert _all_gone(started) == []


def test_the_store_check_finds_a_state_that_is_not_the_acknowledged_one(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "store")
    rng = np.random.default_rng(0)
    hashes = []
    try:
        store.record_birth(
            "bench-0000", "bench-0000-job", spec=job_spec("bench-0000-job"),
            model_hash="sha256:bench", codec_version=codec.FORMAT_VERSION,
        )  # fmt: skip
        prev = None
        for seq in (1, 2):
            state = {"tokens": rng.integers(0, 9, 8 * seq), "step": seq}
            p = codec.encode_delta(prev, state)
            h = codec.read_header(p).state_hash
            store.commit_snapshot(
                "bench-0000", "bench-0000-job", seq, None if prev is None else seq - 1, 1, p,
                h, 64, step=seq,
            )  # fmt: skip
            hashes.append(h)
            prev = state
    finally:
        store.close()

    def result(
        seq: int | None, h: bytes | None, in_flight: int | None = None
    ) -> list[dict[str, Any]]:
        job = {"device": "bench-0000", "acked_seq": seq, "in_flight": in_flight, "dead": False,
               "acked_hash": None if h is None else h.hex()}  # fmt: skip
        return [{"jobs": {"bench-0000-job": job}}]

    good = _check_store(tmp_path / "store", result(2, hashes[1]))
    assert good["ok"] and good["jobs_matching"] == 1 and good["problems"] == []
    behind = _check_store(tmp_path / "store", result(1, hashes[0]))
    assert not behind["ok"] and "store seq 2, device acknowledged 1" in behind["problems"][0]
    ahead = _check_store(tmp_path / "store", result(1, hashes[0], in_flight=2))
    assert ahead["ok"] and ahead["jobs_ahead"] == 1  # committed, its ack still on the way
    wrong = _check_store(tmp_path / "store", result(2, hashes[0]))
    assert not wrong["ok"] and wrong["problems"]
    missing = _check_store(tmp_path / "store", [{"jobs": {"other-job": {"acked_seq": 1}}}])
    assert not missing["ok"] and "not in the store" in missing["problems"][0]


def test_devices_are_split_evenly_over_generators() -> None:
    parts = _split(10, 4)
    assert sorted(n for p in parts for n in p) == [f"bench-{i:04d}" for i in range(10)]
    assert [len(p) for p in parts] == [3, 3, 2, 2]
    assert _split(2, 8) == [["bench-0000"], ["bench-0001"]]


def test_proc_cpu_reads_a_process_cpu_time() -> None:
    t0 = proc_cpu(os.getpid())
    assert t0 is not None  # Linux: /proc/<pid>/stat
    x = 0
    end = time.process_time() + 0.05
    while time.process_time() < end:
        x += 1
    t1 = proc_cpu(os.getpid())
    assert t1 is not None and t1 >= t0
