"""server.replay: chains replay exactly like sequential ``apply_delta``, with the torch
backend whenever the codec has ``decode`` (every op kind it emits), and with the numpy
fallback otherwise; broken chains and damaged payloads are refused with typed errors.

The torch backend is also run against a codec tree developed outside this one (the
tensor-aware codec's worktree, or the trees in ``EDGE_RESUME_CODEC_TREES``), in a
subprocess with that tree's ``edge_agent`` ahead on ``sys.path``, when such a tree exists
and imports; that test is only defined then (it is never skipped).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edge_agent import codec
from edge_agent.errors import (
    BaseMismatch,
    CodecError,
    EdgeResumeError,
    StateError,
    StateHashMismatch,
)
from server import replay
from server.replay import DeviceArray, plan_backend_available, replay_job, replay_payloads
from server.store import SQLiteStore
from tests.support import replay_chains
from tests.support.replay_chains import ALL_OPS, assert_same_state, check_chains, payloads

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "support" / "replay_chains.py"


def test_chains_replay_exactly_like_apply_delta() -> None:
    backend = "torch" if plan_backend_available() else "numpy"
    used: set[str] = set()
    seen: set[str] = set()

    def run(ps: list[bytes]) -> dict[str, Any]:
        result = replay_payloads(ps, device="cpu")
        used.add(result.backend)
        return result.state

    for _, kinds in check_chains(run):
        seen |= kinds
    assert used == {backend}
    if plan_backend_available():  # the tensor-aware codec: every op kind was exercised
        assert seen == ALL_OPS


def test_both_backends_agree_and_keep_the_state_on_the_device() -> None:
    chain = replay_chains.chains(seed=5)["growth"]
    ps = payloads(chain)
    want = replay_payloads(ps, backend="numpy")
    assert want.backend == "numpy" and want.device_state is None
    assert_same_state(want.state, chain[-1][0])
    got = replay_payloads(ps, device="cpu", keep_device=True)
    assert_same_state(got.state, want.state)
    assert got.state_hash == want.state_hash == codec.read_header(ps[-1]).state_hash
    assert got.payloads == len(ps) and got.payload_bytes == sum(map(len, ps))
    assert got.state_bytes == sum(
        v.nbytes for v in want.state.values() if isinstance(v, (np.ndarray, np.generic))
    )
    dev = got.device_state
    assert dev is not None and set(dev) == set(want.state)
    kv = dev["past.0.key"]
    assert isinstance(kv, DeviceArray) and kv.shape == want.state["past.0.key"].shape
    t = kv.tensor()
    assert t.dtype == torch.float16 and tuple(t.shape) == kv.shape
    assert t.numpy().tobytes() == want.state["past.0.key"].tobytes()
    assert dev["step"] == want.state["step"] and dev["rng"] == want.state["rng"]


def test_a_broken_chain_is_refused() -> None:
    ps = payloads(replay_chains.chains()["growth"])
    for backend in ("auto", "numpy"):
        with pytest.raises(BaseMismatch):
            replay_payloads(ps[1:], backend=backend)  # type: ignore[arg-type]
        with pytest.raises(BaseMismatch):
            replay_payloads([ps[0], ps[2]], backend=backend)  # type: ignore[arg-type]
        with pytest.raises(StateHashMismatch):
            replay_payloads(ps, backend=backend, expected_hash=bytes(16))  # type: ignore[arg-type]
    with pytest.raises(CodecError):
        replay_payloads([])


def test_the_torch_backend_needs_a_codec_with_decode() -> None:
    ps = payloads(replay_chains.chains()["growth"])[:1]
    if plan_backend_available():
        assert replay_payloads(ps, backend="torch").backend == "torch"
    else:
        with pytest.raises(CodecError, match="decode"):
            replay_payloads(ps, backend="torch")


def test_damaged_payloads_raise_codec_errors_only() -> None:
    """Seeded mutation: flipped bytes, truncations, swapped payloads; every outcome is
    either the exact state or an error from the CodecError tree."""
    chain = replay_chains.chains(seed=2)["xor"]
    ps = payloads(chain)
    want = replay_payloads(ps, backend="numpy").state
    rng = random.Random(7)
    refused = 0
    for _ in range(150):
        bad = [bytearray(p) for p in ps]
        i = rng.randrange(len(bad))
        how = rng.random()
        if how < 0.6:
            for _ in range(rng.randint(1, 4)):
                j = rng.randrange(len(bad[i]))
                bad[i][j] ^= 1 << rng.randrange(8)
        elif how < 0.9:
            bad[i] = bad[i][: rng.randrange(len(bad[i]))]
        else:
            k = rng.randrange(len(bad))
            bad[i], bad[k] = bad[k], bad[i]
        try:
            got = replay_payloads([bytes(b) for b in bad], device="cpu").state
        except CodecError:
            refused += 1
            continue
        assert_same_state(got, want)  # a mutation that changed nothing (a swap with itself)
    assert refused > 100


def test_replay_job_from_the_store(tmp_path: Path) -> None:
    chain = replay_chains.chains(seed=1)["views"]
    ps = payloads(chain)
    with SQLiteStore(tmp_path / "store") as store:
        store.record_birth("gw-1", "j", spec={"x": 1}, model_hash="m", codec_version=0)
        for seq, p in enumerate(ps, 1):
            head = codec.read_header(p)
            store.commit_snapshot(
                "gw-1", "j", seq, None if seq == 1 else seq - 1, 1, p, head.state_hash, 1
            )
        got = replay_job(store, "j", device="cpu")
        assert_same_state(got.state, store.load_state("j").state)
        assert got.payloads == len(ps)
        older = replay_job(store, "j", 2, backend="numpy")
        assert_same_state(older.state, chain[1][0])
        store.compact("j", force=True)
        again = replay_job(store, "j")
        assert again.payloads == 1 and again.state_hash == got.state_hash


# -- casts: torch on the device, numpy where torch would differ ---------------------------


def _cast_allowed(src: np.dtype[Any], dst: np.dtype[Any]) -> bool:
    """The codec's CAST rule (docs/wire-format.md): byte order, numpy-safe, f8->f4, f4->f2."""
    if src == dst:
        return False
    if src.kind == dst.kind and src.itemsize == dst.itemsize:
        return True
    if np.can_cast(src, dst, casting="safe"):
        return True
    return src.kind == "f" and dst.kind == "f" and (src.itemsize, dst.itemsize) in ((8, 4), (4, 2))


def _values(dt: np.dtype[Any], rng: np.random.Generator, nan: bool) -> np.ndarray:
    n = 64
    if dt.kind == "b":
        return rng.integers(0, 2, n).astype(dt)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        a = rng.integers(info.min, info.max, n, dtype=dt.newbyteorder("=")).astype(dt)
        a[:2] = [info.min, info.max]
        return a
    base = dt if dt.kind == "f" else np.dtype(f"f{dt.itemsize // 2}")
    info = np.finfo(base)
    x = (rng.standard_normal(n) * 1e3).astype(base.newbyteorder("="))
    x[:6] = [0.0, -0.0, np.inf, -np.inf, info.tiny / 4, info.max]
    if nan:
        x[7] = np.nan
        x[8] = -np.nan
    if dt.kind == "c":
        c = np.empty(n, dt.newbyteorder("="))
        c.real, c.imag = x, x[::-1]
        return c.astype(dt)
    return x.astype(dt)


DTYPES = [np.dtype(s) for s in sorted(replay._TORCH)] + [
    np.dtype(f">{s}") for s in ("i2", "u4", "i8", "f2", "f4", "f8", "c8", "c16")
]


@pytest.mark.parametrize("nan", [False, True], ids=["finite", "nan"])
def test_every_allowed_cast_is_bit_identical_to_numpy(
    nan: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(11)
    cpu = torch.device("cpu")
    pairs = 0
    on_host: list[str] = []
    upload = replay._upload
    for src in DTYPES:
        a = _values(src, rng, nan).reshape(8, 8)
        dev = replay.to_device({"a": a}, cpu)["a"]
        monkeypatch.setattr(
            replay, "_upload", lambda x, d: on_host.append(x.dtype.str) or upload(x, d)
        )
        for dst in DTYPES:
            if not _cast_allowed(src, dst):
                continue
            pairs += 1
            got = replay._cast(dev, dst, cpu)
            with np.errstate(all="ignore"):
                want = a.astype(dst)
            assert got.dtype == dst and got.shape == want.shape
            assert got.numpy().tobytes() == want.tobytes(), (src.str, dst.str)
        monkeypatch.setattr(replay, "_upload", upload)
    assert pairs > 60
    # only casts of float data holding a NaN go through numpy on the host
    assert (len(on_host) > 0) == nan


def test_device_array_views() -> None:
    a = np.arange(12, dtype=">i4").reshape(3, 4)
    d = replay.to_device({"a": a, "s": np.float32(2), "p": [1]}, "cpu")
    assert isinstance(d["a"], DeviceArray) and d["s"] == np.float32(2) and d["p"] == [1]
    assert d["a"].numpy().tobytes() == a.tobytes() and d["a"].numpy().dtype == a.dtype
    with pytest.raises(StateError, match="no torch equivalent"):
        d["a"].tensor()
    host = replay.to_host(d)
    assert host["a"].dtype.str == ">i4" and np.array_equal(host["a"], a)
    assert replay.default_device().type in ("cpu", "cuda")
    assert replay.default_device("cpu") == torch.device("cpu")


# -- the tensor-aware codec from another tree ----------------------------------------------


def _codec_trees() -> Iterator[Path]:
    raw = os.environ.get("EDGE_RESUME_CODEC_TREES")
    candidates = raw.split(os.pathsep) if raw else [str(ROOT.parent / "codec")]
    for c in candidates:
        tree = Path(c).resolve()
        if tree != ROOT and (tree / "edge_agent" / "codec" / "__init__.py").is_file():
            yield tree


def _env_for(tree: Path, scratch: Path) -> dict[str, str]:
    """Only the tree's ``edge_agent`` goes ahead on the path (its other packages, a
    ``server`` or ``tests`` of its own, must not shadow this tree's)."""
    scratch.mkdir(parents=True, exist_ok=True)
    link = scratch / "edge_agent"
    if not link.exists():
        link.symlink_to(tree / "edge_agent", target_is_directory=True)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(scratch), str(ROOT)])}


def _importable(tree: Path) -> bool:
    probe = "import edge_agent.codec as c, server.replay as r; assert r.plan_backend_available()"
    with tempfile.TemporaryDirectory() as scratch:
        try:
            proc = subprocess.run(
                [sys.executable, "-c", probe],
                env=_env_for(tree, Path(scratch)),
                cwd=scratch,
                capture_output=True,
                timeout=120,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
    return proc.returncode == 0


EXTERNAL = [t for t in _codec_trees() if _importable(t)]

if EXTERNAL:

    @pytest.mark.parametrize("tree", EXTERNAL, ids=[t.name for t in EXTERNAL])
    def test_torch_backend_against_the_tensor_aware_codec(tree: Path, tmp_path: Path) -> None:
        env = _env_for(tree, tmp_path / "path")
        proc = subprocess.run(
            [sys.executable, "-W", "error", str(SCRIPT)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lines = proc.stdout.splitlines()
        assert set(replay_chains.chains()) == {ln.split(":")[0] for ln in lines[:-1]}
        assert all(": torch ok" in ln for ln in lines[:-1]), proc.stdout
        assert set(lines[-1].split()[1:]) == ALL_OPS, lines[-1]


def test_errors_are_from_the_tree() -> None:
    assert issubclass(StateHashMismatch, EdgeResumeError) and issubclass(BaseMismatch, CodecError)
