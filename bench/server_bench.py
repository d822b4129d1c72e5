"""The server benchmark: chain replay throughput and the time a resume takes to its first step.

    python -m bench.server_bench                       # 1, 10 and 100 MB states; one table
    python -m bench.server_bench --json out.json       # also the results as JSON
    python -m bench.server_bench --sizes 1,10 --repeat 5
    python -m bench.server_bench --codec-path ../codec # another tree's edge_agent (codec)
    python -m bench.server_bench --only ingest         # 500 devices on one broker (~2-3 min)
    python -m bench.server_bench --only replay,resume

**Replay.** For each size, a KV-cache-like chain as a generating device sends it: a
baseline (the cache at half the final length, plus the tokens, the step and the sampler's
state) and 10 deltas, each growing the cache by 5% of the final length (fp16, 8 layers,
8 heads, head_dim 64: 16 KiB a token). Each chain is encoded once with the codec in use
(not timed), twice: **as sent** (the baseline at the device's default level ``small``) and
**as compacted** (the baseline at ``fast``, as the store's compaction rewrites it:
``CompactionPolicy.baseline_level``); the deltas are the device's either way. Each is
replayed, every run from the payloads to a verified host state:

* ``numpy``: ``edge_agent.codec.apply_delta`` per payload (every state hash checked);
* ``torch cpu``: ``server.replay`` on the CPU (the torch backend when the codec has
  ``decode``; otherwise the numpy fallback plus the move to torch, and the row says so);
* ``torch cuda``: the same on the GPU, including the copy of the final state to the host
  for its hash check; "no GPU" when torch sees none.

Throughput is the final state's bytes over the replay time (GB/s, 1e9 bytes), the median
of ``--repeat`` runs. Torch runs on ``--torch-threads`` CPU threads (default 1, like the
codec benchmark's one core: on a loaded machine torch's thread pool mostly spins).

**Resume.** A ``generate`` job over the tiny decoder, run "on the device" to 1,000 of
1,100 tokens and committed to a fresh SQLite store as a full snapshot and deltas (once
with the KV cache, once without); then the time from ``ResumeWorker.request_resume`` to
the end of the first step the server runs (building the job and its onnxruntime session,
the claim, the replay, rebuilding the cache by replay when it was not sent), median of
``--repeat`` jobs.

**Ingest.** 500 simulated devices on one Mosquitto against the real server ingest in its
own process: snapshots, MQTT messages and MB a second received, ack latency, CPU per
process, the store verified at the end; and the load generators' own ceiling against a
null server. ``bench/ingest_bench.py`` has the details (``--devices``, ``--generators``,
``--window``, ``--rate``, ...; ``--only ingest`` runs just this part).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

LAYERS, HEADS, HEAD_DIM = 8, 8, 64
TOKEN_BYTES = LAYERS * 2 * HEADS * HEAD_DIM * 2  # fp16 K and V of every layer: 16 KiB
DELTAS = 10
MB = 1e6


def kv_chain(size_bytes: float, seed: int = 0) -> list[dict[str, Any]]:
    """States of a growing fp16 KV cache whose last one holds about ``size_bytes``."""
    rng = np.random.default_rng(seed)
    final = max(int(size_bytes // TOKEN_BYTES), 2 * DELTAS)
    start = final // 2
    grow = (final - start) // DELTAS
    caches = {
        f"past_key_values.{i}.{kv}": rng.standard_normal((1, HEADS, start, HEAD_DIM)).astype(
            np.float16
        )
        for i in range(LAYERS)
        for kv in ("key", "value")
    }
    tokens = rng.integers(0, 32000, start).astype(np.int64)
    states = []
    t = start
    for n in range(DELTAS + 1):
        states.append({**caches, "tokens": tokens, "step": t, "rng": bytes([n]) * 37})
        new = {
            k: rng.standard_normal((1, HEADS, grow, HEAD_DIM)).astype(np.float16) for k in caches
        }
        caches = {k: np.concatenate([v, new[k]], axis=2) for k, v in caches.items()}
        tokens = np.concatenate([tokens, rng.integers(0, 32000, grow).astype(np.int64)])
        t += grow
    return states


def encode_chain(states: Sequence[dict[str, Any]], baseline_level: str = "small") -> list[bytes]:
    """The chain as stored: the baseline at ``baseline_level`` ("small", the device's
    default, as a device sends it; "fast", as the store's compaction writes it), then the
    deltas as the device sends them (the codec's default level)."""
    from edge_agent.codec import encode_delta

    out = [encode_delta(None, states[0], level=baseline_level)]  # type: ignore[arg-type]
    out += [encode_delta(a, b) for a, b in itertools.pairwise(states)]
    return out


def _median_time(fn: Any, repeat: int) -> tuple[float, Any]:
    times = []
    result = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def bench_replay(sizes_mb: Sequence[float], repeat: int) -> list[dict[str, Any]]:
    import torch

    from edge_agent.state import state_hash
    from server.replay import replay_payloads

    rows: list[dict[str, Any]] = []
    for mb in sizes_mb:
        states = kv_chain(mb * MB)
        chains = {
            "as sent": encode_chain(states, "small"),
            "as compacted": encode_chain(states, "fast"),
        }
        want = state_hash(states[-1])
        state_bytes = sum(v.nbytes for v in states[-1].values() if isinstance(v, np.ndarray))
        del states

        def run(backend: str, device: str, ps: list[bytes], h: bytes = want) -> Any:
            def once() -> Any:
                r = replay_payloads(ps, backend=backend, device=device)  # type: ignore[arg-type]
                assert r.state_hash == h
                return r

            return once

        targets = [("numpy", "numpy", "cpu"), ("torch cpu", "auto", "cpu")]
        if torch.cuda.is_available():
            run("auto", "cuda", chains["as sent"])()  # warm-up: CUDA context and kernels
            targets.append(("torch cuda", "auto", "cuda"))
        for how, payloads in chains.items():
            chain = {
                "baseline": how,
                "payloads": len(payloads),
                "payload_bytes": sum(map(len, payloads)),
                "state_bytes": state_bytes,
            }
            for label, backend, device in targets:
                secs, r = _median_time(run(backend, device, payloads), repeat)
                rows.append({
                    "measure": f"replay {how}, {label}",
                    "state_mb": round(state_bytes / MB, 2),
                    "backend": r.backend,
                    "device": r.device,
                    "seconds": secs,
                    "gb_per_s": state_bytes / secs / 1e9,
                    **chain,
                })  # fmt: skip
            if not torch.cuda.is_available():
                rows.append({
                    "measure": f"replay {how}, torch cuda",
                    "state_mb": round(state_bytes / MB, 2),
                    "backend": None, "device": None, "seconds": None, "gb_per_s": None,
                    "note": "no GPU", **chain,
                })  # fmt: skip
    return rows


class _StoreControl:
    """Claims by the store's CAS (what the ingest does before publishing the CTL)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def take_over(self, job_id: str, *, reason: str) -> int:
        rec = self.store.get_job(job_id)
        return int(self.store.raise_epoch(job_id, rec.epoch, "server", status="resuming").epoch)

    def request_handover(self, job_id: str) -> None:
        pass

    def finish(self, job_id: str, epoch: int) -> None:
        pass


def bench_resume(repeat: int, done: int = 1000, total: int = 1100) -> list[dict[str, Any]]:
    from edge_agent import codec
    from edge_agent.jobs import load_job
    from edge_agent.models import build_all
    from edge_agent.state import state_nbytes
    from server.store import SQLiteStore
    from server.worker import ResumePolicy, ResumeWorker

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = build_all(root / "models")
        store = SQLiteStore(root / "store")
        try:
            worker = ResumeWorker(
                store,
                _StoreControl(store),
                models_dir=root / "models",
                policy=ResumePolicy(snapshot_every_steps=None, snapshot_every_seconds=None),
                clock=time.perf_counter,
            )
            for kv in (True, False):
                waits = []
                state_size = 0
                for n in range(repeat):
                    job_id = f"gen-{'kv' if kv else 'nokv'}-{n}"
                    jf = root / f"{job_id}.toml"
                    jf.write_text(
                        f'[job]\nid = "{job_id}"\nkind = "generate"\n'
                        f'model = "{models["tiny-decoder.onnx"]}"\n[params]\n'
                        f'prompt = "The gateway said: "\nmax_new_tokens = {total}\n'
                        "temperature = 0.8\ntop_k = 40\nseed = 7\n"
                    )
                    job = load_job(jf)
                    store.record_birth(
                        "gw-1", job_id, spec=job.spec.to_dict(), model_hash=job.model_hash,
                        codec_version=codec.FORMAT_VERSION,
                    )  # fmt: skip
                    acked = None
                    for seq in range(1, 5):  # a baseline and three deltas, like a device
                        job.run(done // 4)
                        st = job.state()
                        if not kv:
                            st = {k: v for k, v in st.items() if k not in job.derivable}
                        p = codec.encode_delta(acked, st)
                        store.commit_snapshot(
                            "gw-1", job_id, seq, None if acked is None else seq - 1, 1, p,
                            codec.read_header(p).state_hash, state_nbytes(st), step=job.step,
                        )  # fmt: skip
                        acked = st
                    state_size = state_nbytes(acked or {})
                    store.set_status(job_id, "offline")
                    requested = worker.request_resume(job_id)
                    worker.run_due()
                    st_ = worker.status(job_id)
                    assert st_ is not None and st_.phase == "completed", st_
                    assert st_.first_step_at is not None
                    waits.append(st_.first_step_at - requested.requested_at)
                rows.append({
                    "measure": "resume to first step, generate "
                    + ("(KV cache sent)" if kv else "(KV rebuilt by replay)"),
                    "state_mb": round(state_size / MB, 3),
                    "tokens_done": done,
                    "seconds": statistics.median(waits),
                    "device": worker.device.type,
                })  # fmt: skip
        finally:
            store.close()
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    head = ("measure", "state", "backend", "median", "")
    lines = []
    for r in rows:
        if r.get("note"):
            value = r["note"]
        elif r.get("gb_per_s") is not None:
            value = f"{r['gb_per_s']:.2f} GB/s ({r['seconds'] * 1e3:.1f} ms)"
        else:
            value = f"{r['seconds'] * 1e3:.0f} ms"
        extra = (
            f"{r['payloads']} payloads, {r['payload_bytes'] / MB:.1f} MB"
            if "payloads" in r
            else f"{r.get('tokens_done', '')} tokens done"
        )
        backend = f"{r.get('backend') or '-'} on {r.get('device') or '-'}"
        lines.append((r["measure"], f"{r['state_mb']:g} MB", backend, value, extra))
    widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*x) for x in lines]
    return "\n".join(out)


PARTS = ("replay", "resume", "ingest")


def main(argv: Sequence[str] | None = None) -> int:
    from bench import ingest_bench

    ap = argparse.ArgumentParser(prog="python -m bench.server_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument(
        "--only",
        default=",".join(PARTS),
        help="comma-separated parts to run: replay, resume, ingest (default: all)",
    )
    ap.add_argument("--sizes", default="1,10,100", help="state sizes in MB (default 1,10,100)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement (median)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    ap.add_argument("--no-resume", action="store_true", help="skip the resume measurement")
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch's CPU threads (default 1: one core, as the other benchmarks; on a shared "
        "machine more threads mostly wait on each other)",
    )
    ap.add_argument(
        "--codec-path",
        type=Path,
        help="measure the edge_agent package of this tree (its edge_agent/ goes first on "
        "sys.path; this tree's server/ stays)",
    )
    ingest_bench.add_arguments(ap.add_argument_group("ingest (bench/ingest_bench.py)"))
    args = ap.parse_args(argv)
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    if not parts or parts - set(PARTS):
        ap.error(f"--only takes a comma-separated subset of {', '.join(PARTS)}")
    if args.no_resume:
        parts.discard("resume")
    sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes or any(s <= 0 for s in sizes) or args.repeat < 1:
        ap.error("sizes must be > 0 and --repeat >= 1")
    scratch = None
    if args.codec_path is not None:
        tree = args.codec_path.resolve()
        if not (tree / "edge_agent" / "codec" / "__init__.py").is_file():
            ap.error(f"--codec-path {tree}: no edge_agent/codec/__init__.py there")
        if "edge_agent" in sys.modules:
            ap.error("edge_agent was already imported")
        scratch = tempfile.TemporaryDirectory()
        (Path(scratch.name) / "edge_agent").symlink_to(tree / "edge_agent")
        sys.path.insert(0, scratch.name)
        for part in ("resume", "ingest"):
            if part in parts:
                print(f"({part} not measured with --codec-path: it needs this tree's packages)")
                parts.discard(part)
    import edge_agent.codec

    rows: list[dict[str, Any]] = []
    meta: dict[str, Any] = {
        "codec_module": edge_agent.codec.__file__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpus": os.cpu_count(),
        "repeat": args.repeat,
        "parts": sorted(parts),
    }
    if parts & {"replay", "resume"}:
        import torch

        from server.replay import plan_backend_available

        if args.torch_threads > 0:
            torch.set_num_threads(args.torch_threads)
        if "replay" in parts:
            rows += bench_replay(sizes, args.repeat)
        if "resume" in parts:
            rows += bench_resume(args.repeat)
        print(_table(rows))
        if "replay" in parts and not torch.cuda.is_available():
            print("no GPU: torch sees no CUDA device (run on a GPU machine for the cuda row)")
        meta.update(
            torch_backend=plan_backend_available(),
            torch=torch.__version__,
            cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            torch_threads=torch.get_num_threads(),
        )
    ingest: dict[str, Any] | None = None
    if "ingest" in parts:
        if rows:
            print()
        try:
            ingest = ingest_bench.run_ingest_bench(ingest_bench.config_from_args(args))
        except KeyboardInterrupt:
            print("interrupted; every process started was stopped", file=sys.stderr)
            return 130
        print(ingest_bench.format_table(ingest))
    if args.json is not None:
        out: dict[str, Any] = {"meta": meta, "results": rows}
        if ingest is not None:
            out["ingest"] = ingest
        args.json.write_text(json.dumps(out, indent=2))
    if scratch is not None:
        scratch.cleanup()
    return 0 if ingest is None or ingest_bench.result_ok(ingest) else 1


if __name__ == "__main__":
    sys.exit(main())
