"""A resume worker SIGKILLed in the middle of a job, twice, then restarted: the job
finishes with exactly the outputs of an uninterrupted run, every output position stored
once, every claim at a new epoch, and the store verifies."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from server.store import SQLiteStore
from server.worker import ResumePolicy, ResumeWorker
from tests.support.device_jobs import (
    StoreControl,
    device_run,
    generate_job_file,
    server_models,
    uninterrupted,
)

ROOT = Path(__file__).resolve().parent.parent
TOKENS = 1200


def run_and_kill(root: Path, models: Path, mode: str, rng: random.Random) -> list[str]:
    """Start a worker child, let it commit 1-3 snapshots and run a little more, SIGKILL it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.worker_child", str(root), str(models), "gen-1",
         mode, "0.002"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    want = rng.randint(1, 3)
    try:
        while sum(ln.startswith("snapshot") for ln in lines) < want:
            line = proc.stdout.readline()
            assert line, "the child ended early: " + "".join(lines) + proc.stderr.read()  # type: ignore[union-attr]
            lines.append(line.strip())
        time.sleep(rng.uniform(0.0, 0.15))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines += out.split()
    assert proc.returncode == -signal.SIGKILL, err
    assert not any(ln.startswith("done") for ln in lines)
    return lines


@pytest.mark.slow
def test_killed_worker_restarts_and_finishes_exactly_once(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    root = tmp_path / "store"
    models = server_models(tiny_models, tmp_path / "models")
    jf = generate_job_file(tmp_path / "device", tiny_models["tiny-decoder.onnx"], tokens=TOKENS)
    with SQLiteStore(root) as store:
        device_run(store, jf, steps=150, every=50, kv=False)
    steps_seen = []
    for mode in ("resume", "recover"):
        run_and_kill(root, models, mode, rng)
        with SQLiteStore(root) as store:
            rec = store.get_job("gen-1")
            assert rec is not None and rec.owner == "server" and rec.status == "server-running"
            assert store.verify().ok
            steps_seen.append(store.load_state("gen-1").state["step"])
            assert 150 < steps_seen[-1] < TOKENS
    assert steps_seen[1] > steps_seen[0]  # the second worker went on from the first's snapshot
    with SQLiteStore(root) as store:
        control = StoreControl(store)
        w = ResumeWorker(
            store, control, models_dir=models, torch_device="cpu",
            policy=ResumePolicy(snapshot_every_steps=200),
        )  # fmt: skip
        w.start()
        try:
            st = w.wait("gen-1", timeout=300)
        finally:
            w.stop()
        assert st is not None and st.phase == "completed", st
        assert st.epoch == 4 and control.calls[0] == ("take_over", "gen-1", "recover")
        want = uninterrupted(jf)["tokens"]
        got = store.get_outputs("gen-1")["tokens"]
        assert got.dtype == want.dtype and np.array_equal(got, want)
        assert store.verify().ok
        rec = store.get_job("gen-1")
        assert rec is not None and (rec.status, rec.step, rec.attempts) == ("completed", TOKENS, 3)
    db = sqlite3.connect(root / "store.sqlite3")
    try:
        rows = db.execute(
            "SELECT count(*), count(DISTINCT pos), min(pos), max(pos) FROM outputs WHERE job = ?",
            ("gen-1",),
        ).fetchone()
    finally:
        db.close()
    assert rows == (TOKENS, TOKENS, 0, TOKENS - 1)
