"""The codec benchmark's harness: it runs end to end, every method round-trips, the table
has every row, and its round-trip check can actually fail. No timed assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import codec_bench
from bench.codec_bench import METHODS, flatten, run_ours, state_difference
from bench.trajectories import build, names
from edge_agent.state import state_hash

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["kv-fp16", "structural"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench") / "results.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.codec_bench",
            "--quick",
            "--plain",
            "--repeat",
            "1",
            "--scan-mib",
            "4",
            "--trajectories",
            ",".join(QUICK),
            "--json",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, json.loads(out.read_text())


def test_every_method_round_trips(quick_run: tuple[str, dict[str, Any]]) -> None:
    _, data = quick_run
    assert [t["name"] for t in data["trajectories"]] == QUICK
    for traj in data["trajectories"]:
        assert set(traj["methods"]) == set(METHODS)
        n = traj["snapshots"]
        assert n >= 3 and len(traj["raw_bytes"]) == n
        for name, m in traj["methods"].items():
            if m["skipped"] is not None:  # a CLI tool that is not installed here
                assert name not in ("ours small", "ours fast", "full+lz4")
                assert "not installed" in m["skipped"]
                continue
            assert m["error"] is None, (traj["name"], name, m["error"])
            assert m["roundtrip"] is True
            assert len(m["bytes"]) == len(m["encode_s"]) == len(m["apply_s"]) == n
            assert all(b > 0 for b in m["bytes"])
            assert m["total_bytes"] == sum(m["bytes"])
    for level in data["scan"]["levels"].values():
        assert level["roundtrip"] is True and level["gbs"] > 0


def test_table_has_every_row(quick_run: tuple[str, dict[str, Any]]) -> None:
    stdout, data = quick_run
    lines = stdout.splitlines()
    for traj in QUICK:
        for method in ["(raw)", *METHODS]:
            rows = [ln for ln in lines if ln.startswith(traj + " ") and f" {method} " in ln]
            assert len(rows) == 1, (traj, method)
        verdict = [
            ln for ln in lines if ln.startswith(traj + " ") and ln.endswith(("MET", "MISSED"))
        ]
        assert len(verdict) == 1, traj
    assert {r["trajectory"] for r in data["verdict"]["rows"]} == set(QUICK)
    assert "start-up excluded" in stdout


def test_round_trip_check_catches_differences() -> None:
    a = {
        "x": np.arange(6, dtype=np.float32).reshape(2, 3),
        "n": 1,
        "s": np.int32(4),
        "p": {"a": [1.0, "b"]},
    }
    assert state_difference(dict(a), a) is None
    flipped = a["x"].copy()
    flipped.reshape(-1).view(np.uint8)[5] ^= 1
    assert "bytes differ" in str(state_difference({**a, "x": flipped}, a))
    assert state_difference({**a, "x": a["x"].astype(np.float64)}, a) is not None
    assert state_difference({**a, "x": a["x"].reshape(3, 2)}, a) is not None
    assert state_difference({**a, "n": True}, a) is not None  # bool is not int
    assert state_difference({**a, "n": 1.0}, a) is not None
    assert state_difference({**a, "s": np.int64(4)}, a) is not None
    assert state_difference({**a, "p": {"a": [1.0, "c"]}}, a) is not None
    assert "keys differ" in str(state_difference({k: v for k, v in a.items() if k != "n"}, a))


def test_flat_serialization_separates_states() -> None:
    base = {"x": np.zeros((2, 3), np.float32), "y": [1, 2]}
    assert flatten(base) == flatten(dict(reversed(list(base.items()))))  # sorted keys
    assert flatten(base) != flatten({**base, "x": np.zeros((3, 2), np.float32)})
    assert flatten(base) != flatten({**base, "x": np.zeros((2, 3), np.int32)})
    assert len(flatten(base)) > 24 + 8  # data plus headers


def test_a_broken_codec_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    import edge_agent.codec

    real = edge_agent.codec.apply_delta

    def drop_a_key(base: Any, payload: bytes) -> dict[str, Any]:
        out = real(base, payload)
        out.pop(sorted(out)[0])
        return out

    monkeypatch.setattr(edge_agent.codec, "apply_delta", drop_a_key)
    traj = build("kv-fp16", quick=True)
    res = run_ours(traj, "small", "ours small", codec_bench.Timer(1, 0.0))
    assert not res.ok and res.error is not None and "keys differ" in res.error


@pytest.mark.parametrize("name", names())
def test_trajectories_are_deterministic_and_valid(name: str) -> None:
    one, two = build(name, quick=True), build(name, quick=True)
    assert len(one.states) >= 3
    assert [state_hash(s) for s in one.states] == [state_hash(s) for s in two.states]
    assert len({state_hash(s) for s in one.states}) == len(one.states)  # every snapshot moves


def test_codec_path_must_hold_a_codec(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        codec_bench.main(["--codec-path", str(tmp_path), "--quick"])
    assert exc.value.code == 2
