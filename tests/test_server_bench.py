"""The server benchmark runs end to end and reports every row (no timed assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench.server_bench import DELTAS, encode_chain, kv_chain
from server.replay import replay_payloads

ROOT = Path(__file__).resolve().parent.parent


def test_kv_chain_grows_to_the_size_asked() -> None:
    states = kv_chain(2e6)
    assert len(states) == DELTAS + 1
    last = sum(v.nbytes for v in states[-1].values() if isinstance(v, np.ndarray))
    assert 1.8e6 < last <= 2.0e6
    steps = [s["step"] for s in states]
    assert steps == sorted(steps) and steps[0] * 2 <= steps[-1] + 2 * DELTAS
    got = replay_payloads(encode_chain(states[:3])).state
    assert got["step"] == states[2]["step"]


def test_bench_runs_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-m", "bench.server_bench", "--only", "replay,resume",
         "--sizes", "0.3", "--repeat", "1", "--json", str(out)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
        text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    measures = [r["measure"] for r in data["results"]]
    assert measures == [
        "replay as sent, numpy",
        "replay as sent, torch cpu",
        "replay as sent, torch cuda",
        "replay as compacted, numpy",
        "replay as compacted, torch cpu",
        "replay as compacted, torch cuda",
        "resume to first step, generate (KV cache sent)",
        "resume to first step, generate (KV rebuilt by replay)",
    ]
    for r in data["results"]:
        assert r.get("note") == "no GPU" or r["seconds"] > 0
    assert "replay as sent, torch cuda" in proc.stdout and "GB/s" in proc.stdout
    sent, compacted = (
        next(r for r in data["results"] if r["measure"] == f"replay {how}, numpy")
        for how in ("as sent", "as compacted")
    )
    # the same states; the compacted baseline is LZ4 only, so larger on random fp16
    assert sent["state_bytes"] == compacted["state_bytes"]
    assert compacted["payload_bytes"] > sent["payload_bytes"]
