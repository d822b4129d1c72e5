"""The codec benchmark: our delta codec against byte-level delta tools on real trajectories.

    python -m bench.codec_bench                  # every trajectory, a few minutes
    python -m bench.codec_bench --quick          # a smoke test, seconds
    python -m bench.codec_bench --json out.json --trajectories kv-fp16,beam4

Each trajectory (``bench.trajectories``) is sent the way the agent sends it: the first
snapshot whole, then every snapshot as a delta against the one before. Every method sees the
same snapshots in the same run; for each we measure the total payload bytes, the encode and
apply (decode) times, and check that the receiver ends up with exactly the sender's state.

Methods:

* ``ours small`` (the codec's default) and ``ours fast``: ``edge_agent.codec.encode_delta``
  / ``apply_delta`` in this process, on the states themselves. The receiver applies each
  payload to *its own* previous result, as the server does.
* ``full+lz4``: every snapshot whole, an LZ4 frame (``lz4.frame``, default level) of the
  flat serialization below.
* ``zstd -3 --patch-from``, ``zstd -19 --patch-from --long=N`` and ``xdelta3 -9``: the
  command-line tools on files holding the flat serialization (the first snapshot: plain
  ``zstd -3`` / ``zstd -19 --long=N`` / ``xdelta3 -9 -e``). ``--single-thread`` is passed to
  zstd (one core; it is also zstd's advice for the best ``--patch-from`` ratio). A tool
  that is not installed is skipped with a message; the rest of the benchmark runs.

The flat serialization, the same for every peer (:func:`flatten`): ``b"ERFLAT1\\0"``,
u32 entry count, then for each key in sorted order (by UTF-8 bytes): u32 key length, the
key, a kind byte; for ``A`` (array) and ``S`` (numpy scalar): u8 dtype-string length, the
numpy dtype string (``<f4``), u8 ndim, ndim x u64 shape, u64 byte count, the C-order bytes;
for ``P`` (plain value): u64 length and ``edge_agent.state.canonical_plain`` (msgpack).
All integers little-endian. Building or parsing it is not timed for any peer, which favours
the peers: our codec's times include all of its work from the state to the bytes and back.

Timing. Every timed operation runs up to ``--repeat`` times (default 3; fewer once the runs
of that operation have taken ``--budget`` seconds) and the best run counts. A peer's process
start-up is excluded: before each trajectory, each command (encode and decode, first and
delta form) is run ``5`` times on the smallest input every tool accepts (a 1-byte base and
a 1-byte target: zstd aborts on an empty one with ``--patch-from``), the median is taken as
its start-up time and subtracted from every measurement of that command (floored at 0).
Apply throughput is the sum of the resulting states' bytes (the flat serialization's size,
the same figure for every method) over the total apply time.

This module measures and prints; it owns no codec logic. It is a dev tool (needs torch,
``rich`` when available, and the CLI tools), never imported by the edge install.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import lz4.frame
import numpy as np

if __package__ in (None, ""):  # run as a script: python bench/codec_bench.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.trajectories import Trajectory, build, names

T = TypeVar("T")

OURS_SMALL = "ours small"
OURS_FAST = "ours fast"
FULL_LZ4 = "full+lz4"
ZSTD3 = "zstd -3 --patch-from"
ZSTD19 = "zstd -19 --patch-from --long"
XDELTA = "xdelta3 -9"
METHODS = [OURS_SMALL, OURS_FAST, FULL_LZ4, ZSTD3, ZSTD19, XDELTA]
BYTE_PEERS = [ZSTD3, ZSTD19, XDELTA]  # the byte-level delta tools
DEFAULT = OURS_SMALL  # the codec's default setting, which the targets are about

STARTUP_RUNS = 5
APPLY_TARGET_GBS = 1.0
SCAN_TARGET_GBS = 1.0

# ---------------------------------------------------------------------------------------
# The flat serialization every peer works on
# ---------------------------------------------------------------------------------------

FLAT_MAGIC = b"ERFLAT1\0"


def flatten(state: Mapping[str, Any]) -> bytes:
    """The flat byte serialization of a state (see the module docstring)."""
    from edge_agent.state import canonical_plain  # late: --codec-path decides which tree

    parts: list[Any] = [FLAT_MAGIC, struct.pack("<I", len(state))]
    for key in sorted(state, key=lambda k: k.encode("utf-8")):
        value = state[key]
        kb = key.encode("utf-8")
        parts += [struct.pack("<I", len(kb)), kb]
        if isinstance(value, (np.ndarray, np.generic)):
            kind = b"A" if isinstance(value, np.ndarray) else b"S"
            arr = np.ascontiguousarray(value)
            d = arr.dtype.str.encode("ascii")
            parts += [
                kind,
                bytes([len(d)]),
                d,
                struct.pack(f"<B{arr.ndim}Q", arr.ndim, *arr.shape),
                struct.pack("<Q", arr.nbytes),
                arr.reshape(-1).view(np.uint8).data,
            ]
        else:
            packed = canonical_plain(value)
            parts += [b"P", struct.pack("<Q", len(packed)), packed]
    return b"".join(parts)


# ---------------------------------------------------------------------------------------
# Exact comparison of states
# ---------------------------------------------------------------------------------------


def _plain_equal(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)  # NaN-safe, -0.0 distinct
    if isinstance(a, list):
        return len(a) == len(b) and all(_plain_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return set(a) == set(b) and all(_plain_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def state_difference(got: Mapping[str, Any], want: Mapping[str, Any]) -> str | None:
    """None when ``got`` is exactly ``want`` (keys, kinds, dtypes, shapes, bytes, plain
    values with their types); otherwise what differs first."""
    if set(got) != set(want):
        return (
            f"keys differ: missing {sorted(set(want) - set(got))}, "
            f"extra {sorted(set(got) - set(want))}"
        )
    for key, w in want.items():
        g = got[key]
        if isinstance(w, (np.ndarray, np.generic)):
            if type(g) is not type(w) and not (
                isinstance(g, np.ndarray) and isinstance(w, np.ndarray)
            ):
                return f"{key}: a {type(g).__name__}, expected a {type(w).__name__}"
            if g.dtype.str != w.dtype.str or g.shape != w.shape:
                return f"{key}: {g.dtype.str}{g.shape}, expected {w.dtype.str}{w.shape}"
            gb = np.ascontiguousarray(g).reshape(-1).view(np.uint8)
            wb = np.ascontiguousarray(w).reshape(-1).view(np.uint8)
            if not np.array_equal(gb, wb):
                return f"{key}: bytes differ"
        elif not _plain_equal(g, w):
            return f"{key}: plain value differs: {g!r:.60} != {w!r:.60}"
    return None


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------


@dataclass
class Timer:
    """Best of up to ``repeat`` runs, stopping once ``budget`` seconds have been spent."""

    repeat: int = 3
    budget: float = 1.0

    def best(self, fn: Callable[[], T]) -> tuple[T, float]:
        best = math.inf
        spent = 0.0
        result: Any = None
        for _ in range(max(1, self.repeat)):
            t0 = time.perf_counter()
            result = fn()
            dt = time.perf_counter() - t0
            best = min(best, dt)
            spent += dt
            if spent >= self.budget:
                break
        return result, best


# ---------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------


@dataclass
class MethodResult:
    name: str
    bytes: list[int] = field(default_factory=list)
    encode_s: list[float] = field(default_factory=list)
    apply_s: list[float] = field(default_factory=list)
    roundtrip: bool = True
    error: str | None = None
    skipped: str | None = None  # why the method did not run (a tool is missing)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes)

    @property
    def encode_total(self) -> float:
        return sum(self.encode_s)

    @property
    def apply_total(self) -> float:
        return sum(self.apply_s)

    @property
    def encode_median_ms(self) -> float:
        return statistics.median(self.encode_s) * 1e3 if self.encode_s else math.nan

    def apply_gbs(self, raw_total: int) -> float:
        t = self.apply_total
        return raw_total / t / 1e9 if t > 0 else math.inf

    @property
    def ok(self) -> bool:
        return self.skipped is None and self.error is None and self.roundtrip

    def fail(self, message: str) -> None:
        self.roundtrip = False
        if self.error is None:
            self.error = message


@dataclass
class TrajectoryResult:
    name: str
    description: str
    raw_bytes: list[int]
    methods: dict[str, MethodResult]
    zstd_long: int = 0  # the N of zstd -19's --long=N on this trajectory

    @property
    def raw_total(self) -> int:
        return sum(self.raw_bytes)

    def best_peer_bytes(self, among: Sequence[str] = BYTE_PEERS) -> int | None:
        sizes = [
            self.methods[m].total_bytes for m in among if m in self.methods and self.methods[m].ok
        ]
        return min(sizes) if sizes else None


# ---------------------------------------------------------------------------------------
# Our codec and full+LZ4 (in process)
# ---------------------------------------------------------------------------------------


def run_ours(traj: Trajectory, level: str, name: str, timer: Timer) -> MethodResult:
    from edge_agent.codec import apply_delta, encode_delta

    res = MethodResult(name)
    received: dict[str, Any] | None = None
    for i, cur in enumerate(traj.states):
        base = traj.states[i - 1] if i else None
        try:
            payload, t_enc = timer.best(partial(encode_delta, base, cur, level=level))
            out, t_app = timer.best(partial(apply_delta, received, payload))
        except Exception as exc:  # a codec bug is a result to report, not a crash
            res.fail(f"snapshot {i}: {type(exc).__name__}: {exc}")
            return res
        res.bytes.append(len(payload))
        res.encode_s.append(t_enc)
        res.apply_s.append(t_app)
        diff = state_difference(out, cur)
        if diff is not None:
            res.fail(f"snapshot {i}: {diff}")
            received = dict(cur)  # carry on from the right state to keep measuring
        else:
            received = out
    return res


def run_full_lz4(flats: Sequence[bytes], timer: Timer) -> MethodResult:
    res = MethodResult(FULL_LZ4)
    for i, flat in enumerate(flats):
        payload, t_enc = timer.best(partial(lz4.frame.compress, flat))
        out, t_app = timer.best(partial(lz4.frame.decompress, payload))
        res.bytes.append(len(payload))
        res.encode_s.append(t_enc)
        res.apply_s.append(t_app)
        if out != flat:
            res.fail(f"snapshot {i}: decompressed bytes differ")
    return res


# ---------------------------------------------------------------------------------------
# Command-line peers
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CliPeer:
    """A delta tool run as a process. ``encode(base, target, out)`` and
    ``decode(base, payload, out)`` give argument lists; ``base`` is None for the first
    snapshot."""

    name: str
    tool: str
    encode: Callable[[Path | None, Path, Path], list[str]]
    decode: Callable[[Path | None, Path, Path], list[str]]


def zstd_peer(name: str, level: int, long_log: int | None) -> CliPeer:
    long = [f"--long={long_log}"] if long_log else []

    def enc(base: Path | None, target: Path, out: Path) -> list[str]:
        patch = [f"--patch-from={base}"] if base is not None else []
        return [
            "zstd",
            "-q",
            "-f",
            "--single-thread",
            f"-{level}",
            *long,
            *patch,
            str(target),
            "-o",
            str(out),
        ]

    def dec(base: Path | None, payload: Path, out: Path) -> list[str]:
        patch = [f"--patch-from={base}"] if base is not None else []
        return ["zstd", "-q", "-d", "-f", *long, *patch, str(payload), "-o", str(out)]

    return CliPeer(name, "zstd", enc, dec)


def xdelta_peer() -> CliPeer:
    def enc(base: Path | None, target: Path, out: Path) -> list[str]:
        src = ["-s", str(base)] if base is not None else []
        return ["xdelta3", "-9", "-e", "-f", *src, str(target), str(out)]

    def dec(base: Path | None, payload: Path, out: Path) -> list[str]:
        src = ["-s", str(base)] if base is not None else []
        return ["xdelta3", "-d", "-f", *src, str(payload), str(out)]

    return CliPeer(XDELTA, "xdelta3", enc, dec)


def long_log_for(flats: Sequence[bytes]) -> int:
    """``--long=N``: a window covering the largest snapshot twice over (base and target)."""
    biggest = max((len(f) for f in flats), default=1)
    return max(20, min(30, (2 * biggest).bit_length()))


def cli_peers(flats: Sequence[bytes]) -> list[CliPeer]:
    return [zstd_peer(ZSTD3, 3, None), zstd_peer(ZSTD19, 19, long_log_for(flats)), xdelta_peer()]


class CliError(Exception):
    """A peer's command failed (it is reported in the table, not raised further)."""


def _run(args: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
        raise CliError(f"{' '.join(args[:3])}... exited {proc.returncode}: {' '.join(tail)}")
    return dt


def measure_startup(peer: CliPeer, work: Path) -> dict[str, float]:
    """Median time of each of the peer's four commands on a 1-byte base and target."""
    base, target = work / "su_base", work / "su_target"
    base.write_bytes(b"x")
    target.write_bytes(b"y")
    out, dec = work / "su_out", work / "su_dec"
    result = {}
    for form, b in (("first", None), ("delta", base)):
        enc_times, dec_times = [], []
        for _ in range(STARTUP_RUNS):
            enc_times.append(_run(peer.encode(b, target, out)))
            dec_times.append(_run(peer.decode(b, out, dec)))
        result[f"encode_{form}"] = statistics.median(enc_times)
        result[f"decode_{form}"] = statistics.median(dec_times)
    return result


def run_cli(
    peer: CliPeer, flats: Sequence[bytes], timer: Timer, work: Path, startup: dict[str, float]
) -> MethodResult:
    res = MethodResult(peer.name)
    sbase, target, payload = work / "base", work / "target", work / "payload"
    rbase, decoded = work / "rbase", work / "decoded"
    for i, flat in enumerate(flats):
        form = "first" if i == 0 else "delta"
        if i:
            sbase.write_bytes(flats[i - 1])
        target.write_bytes(flat)
        enc_args = peer.encode(sbase if i else None, target, payload)
        dec_args = peer.decode(rbase if i else None, payload, decoded)
        try:
            _, t_enc = timer.best(partial(_run, enc_args))
            _, t_dec = timer.best(partial(_run, dec_args))
        except CliError as exc:
            res.fail(f"snapshot {i}: {exc}")
            return res
        res.bytes.append(payload.stat().st_size)
        res.encode_s.append(max(0.0, t_enc - startup[f"encode_{form}"]))
        res.apply_s.append(max(0.0, t_dec - startup[f"decode_{form}"]))
        if decoded.read_bytes() != flat:
            res.fail(f"snapshot {i}: decoded bytes differ")
            rbase.write_bytes(flat)
        else:
            decoded.replace(rbase)  # the receiver's state is what it decoded
    return res


def tool_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for tool, args in (("zstd", ["zstd", "--version"]), ("xdelta3", ["xdelta3", "-V"])):
        if shutil.which(tool) is None:
            out[tool] = None
            continue
        proc = subprocess.run(args, capture_output=True, check=False)
        text = (proc.stdout + proc.stderr).decode("utf-8", "replace").strip().splitlines()
        out[tool] = text[0] if text else "unknown version"
    return out


def _workdir() -> Path:
    shm = Path("/dev/shm")
    where = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="codec-bench-", dir=where))


# ---------------------------------------------------------------------------------------
# The "unchanged state" scan rate
# ---------------------------------------------------------------------------------------


def scan_state(total_mib: int, seed: int = 0) -> dict[str, Any]:
    """A state of ``total_mib`` MiB in 4 MiB arrays (fp32 weights, fp16 caches) and a few
    small entries."""
    rng = np.random.default_rng(seed)
    state: dict[str, Any] = {"cursor": 12345, "config": {"name": "scan", "layers": 16}}
    for i in range(max(1, total_mib // 4)):
        if i % 2:
            state[f"layer.{i}.cache"] = rng.standard_normal((2048, 1024), np.float32).astype(
                np.float16
            )
        else:
            state[f"layer.{i}.weight"] = rng.standard_normal((1024, 1024), np.float32)
    return state


def measure_scan(total_mib: int, levels: Sequence[tuple[str, str]], timer: Timer) -> dict[str, Any]:
    """Encode a state against an equal copy of itself (new array objects, same bytes)."""
    from edge_agent.codec import apply_delta, encode_delta

    base = scan_state(total_mib)
    new = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in base.items()}
    nbytes = sum(v.nbytes for v in base.values() if isinstance(v, np.ndarray))
    out: dict[str, Any] = {"state_bytes": nbytes, "levels": {}}
    for name, level in levels:
        entry: dict[str, Any] = {}
        try:
            payload, t = timer.best(partial(encode_delta, base, new, level=level))
            diff = state_difference(apply_delta(base, payload), new)
            entry = {
                "seconds": t,
                "gbs": nbytes / t / 1e9,
                "payload_bytes": len(payload),
                "roundtrip": diff is None,
                "error": diff,
            }
        except Exception as exc:
            entry = {
                "seconds": None,
                "gbs": None,
                "payload_bytes": None,
                "roundtrip": False,
                "error": f"{type(exc).__name__}: {exc}",
            }
        out["levels"][name] = entry
    return out


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


def run_trajectory(
    traj: Trajectory, timer: Timer, log: Callable[[str], None]
) -> tuple[TrajectoryResult, dict[str, dict[str, float]]]:
    flats = [flatten(s) for s in traj.states]
    methods: dict[str, MethodResult] = {}
    t0 = time.perf_counter()
    gc.collect()
    gc.disable()
    startups: dict[str, dict[str, float]] = {}
    try:
        methods[OURS_SMALL] = run_ours(traj, "small", OURS_SMALL, timer)
        methods[OURS_FAST] = run_ours(traj, "fast", OURS_FAST, timer)
        methods[FULL_LZ4] = run_full_lz4(flats, timer)
        work = _workdir()
        try:
            for peer in cli_peers(flats):
                if shutil.which(peer.tool) is None:
                    methods[peer.name] = MethodResult(
                        peer.name,
                        roundtrip=False,
                        skipped=f"`{peer.tool}` is not installed "
                        f"(apt-get install -y {peer.tool}); skipped",
                    )
                    continue
                try:
                    startups[peer.name] = measure_startup(peer, work)
                except CliError as exc:
                    methods[peer.name] = MethodResult(
                        peer.name, roundtrip=False, error=f"start-up probe failed: {exc}"
                    )
                    continue
                methods[peer.name] = run_cli(peer, flats, timer, work, startups[peer.name])
        finally:
            shutil.rmtree(work, ignore_errors=True)
    finally:
        gc.enable()
    log(
        f"  {traj.name}: {len(traj.states)} snapshots, {sum(map(len, flats)) / 1e6:.1f} MB raw,"
        f" measured in {time.perf_counter() - t0:.1f} s"
    )
    result = TrajectoryResult(
        traj.name, traj.description, [len(f) for f in flats], methods, long_log_for(flats)
    )
    return result, startups


def verdict(results: Sequence[TrajectoryResult], scan: Mapping[str, Any] | None) -> dict[str, Any]:
    """The issue's targets for the default setting, per trajectory and for the scan."""
    rows = []
    for tr in results:
        ours = tr.methods[DEFAULT]
        best_slow = tr.best_peer_bytes([ZSTD19, XDELTA])
        z3 = tr.methods.get(ZSTD3)
        gbs = ours.apply_gbs(tr.raw_total) if ours.ok else None
        row = {
            "trajectory": tr.name,
            "roundtrip": ours.ok,
            "bytes": ours.total_bytes if ours.ok else None,
            "bytes_limit": best_slow,
            "bytes_ok": (ours.ok and best_slow is not None and ours.total_bytes <= best_slow),
            "encode_s": ours.encode_total if ours.ok else None,
            "encode_limit_s": z3.encode_total if z3 is not None and z3.ok else None,
            "encode_ok": (
                ours.ok and z3 is not None and z3.ok and ours.encode_total < z3.encode_total
            ),
            "apply_gbs": gbs,
            "apply_ok": gbs is not None and gbs >= APPLY_TARGET_GBS,
        }
        row["all_ok"] = row["bytes_ok"] and row["encode_ok"] and row["apply_ok"]
        rows.append(row)
    scan_gbs = None
    if scan is not None:
        scan_gbs = scan["levels"].get(DEFAULT, {}).get("gbs")
    scan_ok = scan_gbs is not None and scan_gbs >= SCAN_TARGET_GBS
    return {
        "rows": rows,
        "scan_gbs": scan_gbs,
        "scan_ok": scan_ok if scan is not None else None,
        "all_ok": all(r["all_ok"] for r in rows) and (scan is None or scan_ok),
    }


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------

COLUMNS = [
    "trajectory",
    "method",
    "bytes",
    "ratio",
    "vs best peer",
    "enc med ms",
    "enc total s",
    "apply total s",
    "apply GB/s",
    "round trip",
]


def table_rows(results: Sequence[TrajectoryResult]) -> list[list[str]]:
    rows = []
    for tr in results:
        best = tr.best_peer_bytes()
        rows.append(
            [
                tr.name,
                "(raw)",
                f"{tr.raw_total:,}",
                "1.0",
                "",
                "",
                "",
                "",
                "",
                f"{len(tr.raw_bytes)} snapshots",
            ]
        )
        for name in METHODS:
            m = tr.methods.get(name)
            if m is None:
                continue
            if m.skipped is not None:
                rows.append([tr.name, name, "skipped", "", "", "", "", "", "", m.skipped])
                continue
            if m.error is not None and not m.bytes:
                rows.append([tr.name, name, "failed", "", "", "", "", "", "", m.error[:60]])
                continue
            vs = "" if best is None or not m.ok else f"{(m.total_bytes / best - 1) * 100:+.1f}%"
            rows.append(
                [
                    tr.name,
                    name,
                    f"{m.total_bytes:,}",
                    f"{tr.raw_total / max(1, m.total_bytes):.1f}",
                    vs,
                    f"{m.encode_median_ms:.2f}",
                    f"{m.encode_total:.3f}",
                    f"{m.apply_total:.3f}",
                    _gbs_cell(m.apply_gbs(tr.raw_total)),
                    "exact" if m.ok else f"FAILED: {(m.error or '')[:50]}",
                ]
            )
    return rows


def _gbs_cell(gbs: float) -> str:
    return "inf*" if math.isinf(gbs) else f"{gbs:.2f}"


def _fmt_bool(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "NO")


def verdict_rows(v: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for r in v["rows"]:
        b = (
            "n/a"
            if r["bytes_limit"] is None or r["bytes"] is None
            else f"{r['bytes']:,} <= {r['bytes_limit']:,}: {_fmt_bool(r['bytes_ok'])}"
        )
        e = (
            "n/a"
            if r["encode_limit_s"] is None or r["encode_s"] is None
            else f"{r['encode_s']:.3f} < {r['encode_limit_s']:.3f}: {_fmt_bool(r['encode_ok'])}"
        )
        a = (
            "n/a"
            if r["apply_gbs"] is None
            else f"{r['apply_gbs']:.2f} >= {APPLY_TARGET_GBS:g}: {_fmt_bool(r['apply_ok'])}"
        )
        rows.append([r["trajectory"], b, e, a, "MET" if r["all_ok"] else "MISSED"])
    return rows


VERDICT_COLUMNS = [
    "trajectory",
    "bytes <= min(zstd -19, xdelta3 -9)",
    "encode s < zstd -3 --patch-from",
    "apply GB/s",
    "targets",
]


def _plain_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [
        max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)
    ]
    right = {i for i, c in enumerate(columns) if c not in ("trajectory", "method", "round trip")}

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    lines = [title, fmt(columns), "  ".join("-" * w for w in widths)]
    last = None
    for r in rows:
        if last is not None and r[0] != last:
            lines.append("")
        last = r[0]
        lines.append(fmt(r))
    return "\n".join(lines)


class Printer:
    """Prints with rich when it is installed, as plain text otherwise."""

    def __init__(self, plain: bool) -> None:
        self.console: Any = None
        if not plain:
            try:
                from rich.console import Console

                width = shutil.get_terminal_size((170, 40)).columns
                self.console = Console(width=max(width, 170), highlight=False)
            except ImportError:
                self.console = None

    def line(self, text: str = "") -> None:
        if self.console is not None:
            self.console.print(text, markup=False)
        else:
            print(text)
        sys.stdout.flush()

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        if self.console is None:
            print(_plain_table(title, columns, rows))
            return
        from rich.table import Table

        t = Table(title=title, title_justify="left")
        for c in columns:
            left = c in ("trajectory", "method", "round trip") or c == columns[1]
            t.add_column(c, justify="left" if left else "right", no_wrap=True)
        last = None
        for r in rows:
            if last is not None and r[0] != last:
                t.add_section()
            last = r[0]
            t.add_row(*r)
        self.console.print(t)


def report(
    p: Printer,
    results: Sequence[TrajectoryResult],
    v: Mapping[str, Any],
    scan: Mapping[str, Any] | None,
    startups: Mapping[str, Mapping[str, dict[str, float]]],
) -> None:
    p.line()
    p.table(
        "Codec benchmark: full first snapshot, then deltas against the previous one",
        COLUMNS,
        table_rows(results),
    )
    p.line(
        "ratio = raw bytes / bytes; vs best peer = bytes against the smallest of zstd -3, "
        "zstd -19 and xdelta3 -9 on that trajectory."
    )
    p.line("inf* = total apply time 0 once start-up is subtracted (below start-up noise).")
    p.line(
        "Times: best of up to --repeat runs per snapshot. Peers' process start-up excluded: "
        "median of their command on a 1-byte input, subtracted:"
    )
    seen: dict[str, dict[str, list[float]]] = {}
    for per_traj in startups.values():
        for peer, st in per_traj.items():
            for cmd, t in st.items():
                seen.setdefault(peer, {}).setdefault(cmd, []).append(t * 1e3)
    for peer, cmds in seen.items():
        p.line(
            f"  {peer} (ms, range over trajectories): "
            + ", ".join(f"{cmd} {min(ts):.1f}-{max(ts):.1f}" for cmd, ts in cmds.items())
        )
    p.line(
        "zstd -19 window: --long="
        + ", ".join(f"{tr.zstd_long} ({tr.name})" for tr in results)
        + "; zstd runs with --single-thread."
    )
    if scan is not None:
        parts = []
        for name, e in scan["levels"].items():
            parts.append(
                f"{name} {e['gbs']:.2f} GB/s"
                if e["gbs"] is not None
                else f"{name} failed ({e['error']})"
            )
        p.line(
            f"Encode of an unchanged state ({scan['state_bytes'] / 2**20:.0f} MiB, new "
            f"arrays with equal bytes): " + ", ".join(parts)
        )
    p.line()
    p.table(
        f"Verdict: the issue's targets for the default setting ({DEFAULT})",
        VERDICT_COLUMNS,
        verdict_rows(v),
    )
    if scan is not None:
        p.line(
            f"unchanged-state scan >= {SCAN_TARGET_GBS:g} GB/s: "
            + ("n/a" if v["scan_gbs"] is None else f"{v['scan_gbs']:.2f} GB/s: ")
            + _fmt_bool(v["scan_ok"])
        )
    p.line("ALL TARGETS MET" if v["all_ok"] else "TARGETS MISSED (see rows marked NO)")


def to_json(
    results: Sequence[TrajectoryResult],
    v: Mapping[str, Any],
    scan: Mapping[str, Any] | None,
    startups: Mapping[str, Any],
    meta: Mapping[str, Any],
) -> dict[str, Any]:
    trajs = []
    for tr in results:
        ms = {}
        for name, m in tr.methods.items():
            ms[name] = {
                "skipped": m.skipped,
                "error": m.error,
                "roundtrip": m.ok,
                "bytes": m.bytes,
                "encode_s": m.encode_s,
                "apply_s": m.apply_s,
                "total_bytes": m.total_bytes,
                "encode_total_s": m.encode_total,
                "encode_median_ms": None if not m.encode_s else m.encode_median_ms,
                "apply_total_s": m.apply_total,
                "apply_gbs": (
                    m.apply_gbs(tr.raw_total)
                    if m.apply_s and not math.isinf(m.apply_gbs(tr.raw_total))
                    else None
                ),
            }
        trajs.append(
            {
                "name": tr.name,
                "description": tr.description,
                "snapshots": len(tr.raw_bytes),
                "zstd_long": tr.zstd_long,
                "raw_bytes": tr.raw_bytes,
                "raw_total": tr.raw_total,
                "best_peer_bytes": tr.best_peer_bytes(),
                "methods": ms,
                "startup_s": startups.get(tr.name, {}),
            }
        )
    return {"meta": dict(meta), "trajectories": trajs, "scan": scan, "verdict": dict(v)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.codec_bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="small trajectories and a 16 MiB scan state (a smoke test)",
    )
    ap.add_argument(
        "--trajectories",
        default=",".join(names()),
        help=f"comma-separated subset (default: all of {','.join(names())})",
    )
    ap.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per operation (best counts)")
    ap.add_argument(
        "--budget",
        type=float,
        default=1.0,
        help="stop repeating an operation once its runs took this many seconds",
    )
    ap.add_argument(
        "--scan-mib",
        type=int,
        default=None,
        help="size of the unchanged-state scan (default 64, 16 with --quick; 0: skip)",
    )
    ap.add_argument(
        "--codec-path",
        type=Path,
        help="measure the edge_agent package under this directory (put first on sys.path; "
        "needed with `python -m`, which puts the current directory before PYTHONPATH)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plain", action="store_true", help="plain-text table even if rich is there")
    ap.add_argument(
        "--strict", action="store_true", help="exit with status 2 when a target is missed"
    )
    args = ap.parse_args(argv)

    chosen = [t.strip() for t in args.trajectories.split(",") if t.strip()]
    unknown = [t for t in chosen if t not in names()]
    if unknown:
        ap.error(f"unknown trajectories {unknown}; known: {', '.join(names())}")
    scan_mib = args.scan_mib if args.scan_mib is not None else (16 if args.quick else 64)

    if args.codec_path is not None:
        tree = args.codec_path.resolve()
        if not (tree / "edge_agent" / "codec" / "__init__.py").is_file():
            ap.error(f"--codec-path {tree}: no edge_agent/codec/__init__.py there")
        loaded = sys.modules.get("edge_agent")
        if loaded is not None and not str(loaded.__file__).startswith(str(tree)):
            ap.error(f"edge_agent was already imported from {loaded.__file__}")
        sys.path.insert(0, str(tree))

    import edge_agent.codec

    p = Printer(args.plain)
    versions = tool_versions()
    meta = {
        "codec_module": edge_agent.codec.__file__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "tools": versions,
        "quick": args.quick,
        "repeat": args.repeat,
        "budget_s": args.budget,
        "seed": args.seed,
    }
    p.line(f"codec: {edge_agent.codec.__file__}")
    for tool, ver in versions.items():
        p.line(
            f"{tool}: {ver}"
            if ver
            else f"{tool}: NOT INSTALLED, its rows are skipped (apt-get install -y {tool})"
        )

    timer = Timer(args.repeat, args.budget)
    results: list[TrajectoryResult] = []
    startups: dict[str, dict[str, dict[str, float]]] = {}
    t_start = time.perf_counter()
    for name in chosen:
        t0 = time.perf_counter()
        traj = build(name, quick=args.quick, seed=args.seed)
        p.line(f"built {name} in {time.perf_counter() - t0:.1f} s")
        res, st = run_trajectory(traj, timer, p.line)
        results.append(res)
        startups[name] = st
        del traj

    scan = None
    if scan_mib > 0:
        scan = measure_scan(scan_mib, [(OURS_SMALL, "small"), (OURS_FAST, "fast")], timer)
    v = verdict(results, scan)
    report(p, results, v, scan, startups)
    p.line(f"total time {time.perf_counter() - t_start:.0f} s")

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(to_json(results, v, scan, startups, meta), indent=1))
        p.line(f"results written to {args.json}")

    broken = [
        f"{tr.name}/{m.name}"
        for tr in results
        for m in tr.methods.values()
        if m.skipped is None and not m.ok
    ]
    if scan is not None:
        broken += [f"scan/{n}" for n, e in scan["levels"].items() if not e["roundtrip"]]
    if broken:
        p.line("ROUND TRIP FAILED: " + ", ".join(broken))
        return 1
    if args.strict and not v["all_ok"]:
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
