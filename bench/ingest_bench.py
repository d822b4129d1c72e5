"""Ingest throughput: many simulated devices, one Mosquitto, the real server ingest.

    python -m bench.ingest_bench                       # 500 devices, 4 generator processes
    python -m bench.ingest_bench --devices 100 --window 10 --json out.json
    python -m bench.ingest_bench --rate 1              # paced: 1 snapshot/s per device
    python -m bench.server_bench --only ingest         # the same, from the server benchmark

**What runs.** A real Mosquitto (``tests/support/broker.py``'s configuration: the project's
``deploy/mosquitto/edge-resume.conf`` plus a listener on a free port); the real server as
its own process, ``python -m server.cli serve --roles ingest,api`` (the ``api`` role only
serves ``/metrics``, which the benchmark reads the server's own counters from), on a fresh
SQLite store in a temporary folder; and ``--generators`` load-generator processes, each
simulating its share of ``--devices`` devices.

**A simulated device** has its own MQTT connection (MQTT 5, persistent session, the
agent's will), the real ``AgentDevice``/``AgentJobSession`` and one ``generate``-like job
whose state grows: ``tokens`` (int64) and ``past_key_values``, an fp16 KV-like array
``[4, 2, seq, 16]`` (256 bytes a token), plus ``step`` and ``prompt_len``. Each snapshot
appends 1 to ``--max-tokens`` (8) tokens of random data, so deltas are ~0.3-2.3 KB (the
codec's default level); the prompt (16-128 tokens) makes the first, full snapshot 4-33
KB. Devices send a heartbeat every ``--heartbeat`` seconds (10).

**How the generator multiplexes.** One thread per generator process drives all its
devices' paho clients through one ``selectors`` loop (paho's ``loop_read``/``loop_write``/
``loop_misc``): one TCP connection and MQTT session per device, as the broker and the
server would see 500 gateways, but no threads per device. The agent's own transport
(``edge_agent.transport.Transport``) runs two threads per connection and hands every
message across queues; 500 of them (1,000 threads) on two cores would measure the load
generator, not the ingest. What is measured is the server side.

**The runs.** By default: the ingest in a closed loop (its capacity), the ingest paced at
half that (ack latency below saturation), the generators against a null server (their
ceiling), and the ingest core alone; ``--rate R`` replaces the first two with one run paced
at R snapshots a second per device.

**A run.** Set-up: every device connects, subscribes, sends its BIRTH and gets its first,
full snapshot acknowledged. Then each device offers a new snapshot as soon as the previous
one is acknowledged (closed loop: one snapshot in flight per job, as the protocol allows)
or at its paced rate. After ``--warmup``
seconds, a ``--window`` of seconds is measured: the server's counters (messages and bytes
received, commits, acks) and the processes' CPU time are sampled every second; the
devices record every ack's latency (from the publish of a snapshot's last chunk to the ack
arriving). Then the devices stop offering, wait for what is in flight, and report each
job's acknowledged seq and state hash; the server is stopped (SIGTERM) and its store is
opened: ``verify()`` must pass and every job's stored state must be the one its device
last had acknowledged (``load_state`` replays and hashes it).

**The generator's ceiling.** The same generators run once more against a null server: one
paho client with a ``ServerJobSession`` per job that reassembles and acknowledges every
snapshot without applying, verifying or storing it. Its rate is what the generators,
the broker and the protocol alone can do on this machine; the CPU columns say where the
time went.

**The ingest core** (:func:`core_main`): the real ``Ingest`` with liveness and a SQLite
store, fed the same kind of devices' messages directly in one thread (no MQTT, no other
thread), timed around the ingest's own calls: what a snapshot costs the server without
its MQTT client and threads, split into the store's durable commit and apply + verify.

This module owns the benchmark's processes and measurements. It never changes the server's
code or defaults (only its documented ``EDGE_SERVER_*`` variables for the run), and every
process it starts is stopped when it ends, on an error, Ctrl-C, SIGTERM or SIGHUP (on
Linux, children get SIGTERM from the kernel if the benchmark itself is killed).
See docs/benchmarks.md, "The ingest benchmark".
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import json
import os
import platform
import random
import secrets
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MB = 1e6

KV_ROWS, KV_HEADS, KV_DIM = 4, 2, 16  # K and V of 2 layers, 2 heads, head_dim 16: 256 B a token
PROMPT_TOKENS = (16, 128)
TOTAL_STEPS = 1_000_000  # the jobs never finish during a run

__all__ = [
    "IngestBenchConfig",
    "Interrupted",
    "add_arguments",
    "config_from_args",
    "format_table",
    "main",
    "result_ok",
    "run_ingest_bench",
]


# ---------------------------------------------------------------------------------------------
# Processes: started in one place, stopped in one place.


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the child gets SIGTERM if the benchmark dies (even by SIGKILL)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP to the benchmark: unwind and clean up like Ctrl-C."""


class Processes:
    """Every child process of a run; :meth:`stop_all` ends them newest first (generators,
    then the server, then the broker): SIGTERM, then SIGKILL after ``grace`` seconds."""

    def __init__(self, log: TextIO) -> None:
        self.procs: list[tuple[str, subprocess.Popen[Any]]] = []
        self.log = log

    def spawn(self, name: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        kw.setdefault("cwd", REPO)
        if sys.platform.startswith("linux"):
            kw["preexec_fn"] = _die_with_parent
        # its own session: a Ctrl-C reaches only the benchmark, which stops them in order
        proc = subprocess.Popen(list(argv), start_new_session=True, **kw)
        self.procs.append((name, proc))
        self.log.write(f"[ingest-bench] started {name} pid {proc.pid}\n")
        self.log.flush()
        return proc

    def stop(
        self, proc: subprocess.Popen[Any], grace: float = 10.0, *, exits_by: float = 0.0
    ) -> int | None:
        """Wait ``exits_by`` seconds for it to exit by itself, then SIGTERM, then SIGKILL."""
        if exits_by > 0:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(exits_by)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(10)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        return proc.returncode

    def stop_all(self, grace: float = 10.0) -> None:
        while self.procs:
            _, proc = self.procs.pop()
            self.stop(proc, grace)


@contextlib.contextmanager
def _signals_unwind() -> Iterator[None]:
    """SIGTERM/SIGHUP raise :class:`Interrupted` in the main thread, so ``finally`` blocks
    run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(f"signal {signum}")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------------------------
# CPU time from /proc (Linux; None elsewhere).

_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads)."""
    split = proc_cpu_split(pid)
    return None if split is None else split[0] + split[1]


def proc_cpu_split(pid: int) -> tuple[float, float] | None:
    """(user, system) CPU seconds of a process (all its threads)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    return int(fields[11]) / _TCK, int(fields[12]) / _TCK


def machine_cpu() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    v = [int(x) for x in first[1:9]]
    total = sum(v)
    return (total - v[3] - v[4]) / _TCK, total / _TCK


# ---------------------------------------------------------------------------------------------
# A simulated device (inside a generator process).


@dataclass
class _GenJob:
    """A generate-like job's state: tokens and a KV-like fp16 array growing together."""

    rng: np.random.Generator
    prompt_len: int
    tokens: np.ndarray = field(init=False)
    kv: np.ndarray = field(init=False)
    step: int = 0

    def __post_init__(self) -> None:
        self.tokens = self.rng.integers(0, 32000, self.prompt_len).astype(np.int64)
        self.kv = self._kv(self.prompt_len)

    def _kv(self, n: int) -> np.ndarray:
        return self.rng.standard_normal((KV_ROWS, KV_HEADS, n, KV_DIM)).astype(np.float16)

    def advance(self, k: int) -> None:
        self.tokens = np.concatenate([self.tokens, self.rng.integers(0, 32000, k).astype(np.int64)])
        self.kv = np.concatenate([self.kv, self._kv(k)], axis=2)
        self.step += k

    def state(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "past_key_values": self.kv,
            "step": self.step,
            "prompt_len": self.prompt_len,
        }


def job_spec(job: str) -> dict[str, Any]:
    return {
        "job": {"id": job, "kind": "generate", "model": "bench-decoder.onnx"},
        "params": {"prompt": "bench", "max_new_tokens": TOTAL_STEPS},
        "snapshot": {"every_steps": 1},
        "link": {"kv": "send"},
    }


class _Device:
    def __init__(self, gen: _Generator, index: int, device: str, seed: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        from edge_agent.codec import FORMAT_VERSION
        from edge_agent.protocol import AgentConfig, AgentDevice, AgentJobSession, JobIdentity

        self.gen = gen
        self.index = index
        self.device = device
        self.job_id = f"{device}-job"
        self.rng = np.random.default_rng(seed)
        self.job = _GenJob(self.rng, int(self.rng.integers(*PROMPT_TOKENS, endpoint=True)))
        self.agent = AgentDevice(device, secrets.token_hex(6))
        self.session = AgentJobSession(
            self.agent,
            self.job_id,
            JobIdentity(job_spec(self.job_id), "sha256:bench", FORMAT_VERSION, TOTAL_STEPS),
            config=AgentConfig(timeout_floor=10.0),
        )
        self.sent_at: tuple[int, float] | None = None  # (seq, last chunk published, monotonic)
        self.offered: tuple[int, int] | None = None  # (seq, payload bytes) of the newest offer
        self.next_due = 0.0
        self.dead = False
        self.subscribed = False
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv5, userdata=self
        )
        w = self.agent.will(time.time())
        c.will_set(w.topic, w.payload, w.qos, w.retain)
        c.on_connect = _on_connect
        c.on_subscribe = _on_subscribe
        c.on_message = _on_message
        c.on_disconnect = _on_disconnect
        self.client = c
        self.props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        self.props.SessionExpiryInterval = 14 * 86400  # as the agent's transport
        self.sock: Any = None

    def connect(self, host: str, port: int, *, nodelay: bool = False) -> None:
        self.client.connect(host, port, keepalive=60, clean_start=False, properties=self.props)
        self.sock = self.client.socket()
        if nodelay:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _on_connect(c: Any, d: _Device, flags: Any, reason: Any, props: Any) -> None:
    if reason.is_failure:
        d.gen.fail(f"{d.device}: CONNACK {reason}")
        return
    c.subscribe([(s.filter, s.qos) for s in d.agent.subscriptions()])
    d.gen.touched.add(d)


def _on_subscribe(c: Any, d: _Device, mid: int, reasons: Any, props: Any) -> None:
    now = time.time()
    d.subscribed = True
    d.gen.carry_out(d, [d.agent.online(now), *d.session.connected(now, step=d.job.step)])
    d.gen.touched.add(d)


def _on_message(c: Any, d: _Device, msg: Any) -> None:
    from edge_agent.errors import RemoteProtocolError

    now = time.time()
    try:
        incoming = d.agent.route(msg.topic, msg.payload)
    except RemoteProtocolError as exc:
        d.gen.count("dropped")
        d.gen.note(f"{d.device}: dropped {exc}")
        return
    d.gen.carry_out(d, d.session.receive(incoming, now))
    d.gen.touched.add(d)


def _on_disconnect(c: Any, d: _Device, flags: Any, reason: Any, props: Any) -> None:
    if not d.gen.closing:
        d.gen.count("disconnects")
        d.gen.note(f"{d.device}: disconnected ({reason})")
    d.dead = True


@dataclass
class _Window:
    t0: float = float("inf")
    t1: float = float("inf")

    def __contains__(self, t: float) -> bool:
        return self.t0 <= t < self.t1


class _Generator:
    """One load-generator process: its devices, one selectors loop, results on stdout."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.host, self.port = cfg["host"], int(cfg["port"])
        self.rate = cfg.get("rate")  # snapshots/s per device, or None: closed loop
        self.max_tokens = int(cfg.get("max_tokens", 8))
        self.hb_every = float(cfg.get("heartbeat", 10.0))
        self.devices = [
            _Device(self, i, name, cfg["seed"] * 100_003 + i)
            for i, name in enumerate(cfg["devices"])
        ]
        self.touched: set[_Device] = set()
        self.ready_queue: list[_Device] = []  # may offer now (acked or synced)
        self.timers: list[tuple[float, int, str]] = []  # (due, device index, "hb" | "offer")
        self.window = _Window()
        self.running = False
        self.closing = False
        self.counts: dict[str, int] = {}
        self.notes: list[str] = []
        self.latencies: list[float] = []
        self.acks_per_s: dict[int, int] = {}
        self.win = {"acks": 0, "ack_payload_bytes": 0, "published": 0, "published_bytes": 0}
        self.cpu_at: dict[str, float] = {}
        self.errors: list[str] = []

    # -- bookkeeping --------------------------------------------------------------------------

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    def note(self, text: str) -> None:
        if len(self.notes) < 20:
            self.notes.append(text)

    def fail(self, text: str) -> None:
        self.errors.append(text)
        self.note(text)

    # -- carrying out the session's items -----------------------------------------------------

    def carry_out(self, d: _Device, items: Sequence[Any]) -> None:
        from edge_agent.protocol import (
            Acked,
            Completed,
            NeedsFull,
            Offered,
            Outgoing,
            Rejected,
            Stopped,
            Synced,
            TakenOver,
            TransferAbandoned,
        )

        now = time.monotonic()
        snap_seq: int | None = None
        for item in items:
            if isinstance(item, Outgoing):
                d.client.publish(item.topic, item.payload, qos=item.qos, retain=item.retain)
                self.count(f"sent_{item.type}")
                if now in self.window:
                    self.win["published"] += 1
                    self.win["published_bytes"] += len(item.payload)
                if item.type == "snap":
                    snap_seq = item.seq
            elif isinstance(item, Acked):
                self.count("acked")
                t = time.monotonic()
                if d.sent_at is not None and d.sent_at[0] == item.seq:
                    if d.sent_at[1] in self.window:
                        self.latencies.append(t - d.sent_at[1])
                    d.sent_at = None
                if t in self.window:
                    self.win["acks"] += 1
                    if d.offered is not None and d.offered[0] == item.seq:
                        self.win["ack_payload_bytes"] += d.offered[1]
                    sec = int(t - self.window.t0)
                    self.acks_per_s[sec] = self.acks_per_s.get(sec, 0) + 1
                self.ready_queue.append(d)
            elif isinstance(item, Offered):
                d.offered = (item.seq, item.size)
                self.count("offered_bytes", item.size)
            elif isinstance(item, Synced):
                self.ready_queue.append(d)
            elif isinstance(item, (NeedsFull, TransferAbandoned, Rejected)):
                self.count(type(item).__name__)
                self.note(f"{d.device}: {item}")
                self.ready_queue.append(d)
            elif isinstance(item, (TakenOver, Completed, Stopped)):
                self.fail(f"{d.device}: the job was closed: {item}")
        if snap_seq is not None:
            d.sent_at = (snap_seq, time.monotonic())

    def offer(self, d: _Device) -> None:
        s = d.session
        if d.dead or not s.can_offer:
            return
        if s.acked_seq is not None:  # the first (full) snapshot is sent during set-up
            if not self.running:
                return
            now_m = time.monotonic()
            if self.rate and now_m < d.next_due:
                heapq.heappush(self.timers, (d.next_due, d.index, "offer"))
                return
            if self.rate:
                d.next_due = max(d.next_due + 1.0 / self.rate, now_m - 1.0 / self.rate)
            d.job.advance(int(d.rng.integers(1, self.max_tokens, endpoint=True)))
        self.carry_out(d, s.offer(d.job.state(), d.job.step, time.time()))
        self.touched.add(d)

    # -- the loop -----------------------------------------------------------------------------

    def emit(self, obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        self.sel = sel
        stdin = sys.stdin.fileno()
        os.set_blocking(stdin, False)
        sel.register(stdin, selectors.EVENT_READ, None)
        for d in self.devices:
            d.connect(self.host, self.port, nodelay=bool(self.cfg.get("tcp_nodelay")))
            sel.register(d.sock, selectors.EVENT_READ, d)
            heapq.heappush(
                self.timers, (time.monotonic() + random.uniform(0, self.hb_every), d.index, "hb")
            )
        buf = b""
        ready_sent = False
        stop_at: float | None = None
        next_misc = time.monotonic() + 1.0
        setup_deadline = time.monotonic() + float(self.cfg.get("setup_timeout", 120.0))
        while True:
            now_m = time.monotonic()
            timeout = 0.25
            if self.timers:
                timeout = max(0.0, min(timeout, self.timers[0][0] - now_m))
            if self.ready_queue:
                timeout = 0.0
            for key, mask in sel.select(timeout):
                d = key.data
                if d is None:
                    try:
                        chunk = os.read(stdin, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:  # the benchmark is gone
                        return
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        stop_at = self._command(line.decode().split(), stop_at)
                    continue
                if d.dead:
                    continue
                if mask & selectors.EVENT_READ:
                    d.client.loop_read()
                if mask & selectors.EVENT_WRITE and not d.dead:
                    d.client.loop_write()
                self.touched.add(d)
            while self.ready_queue:
                queue, self.ready_queue = self.ready_queue, []
                for d in queue:
                    self.offer(d)
            now_m = time.monotonic()
            while self.timers and self.timers[0][0] <= now_m:
                _, i, kind = heapq.heappop(self.timers)
                d = self.devices[i]
                if d.dead:
                    continue
                if kind == "hb":
                    if d.subscribed:
                        hb = d.agent.heartbeat(
                            time.time(), {d.job_id: (d.job.step, d.session.acked_seq)}
                        )
                        self.carry_out(d, [hb])
                        self.touched.add(d)
                    heapq.heappush(self.timers, (now_m + self.hb_every, i, "hb"))
                else:
                    self.offer(d)
            if now_m >= next_misc:
                next_misc = now_m + 1.0
                now = time.time()
                for d in self.devices:
                    if d.dead:
                        continue
                    d.client.loop_misc()
                    dl = d.session.next_deadline
                    if dl is not None and now >= dl:
                        self.carry_out(d, d.session.tick(now))
                    self.touched.add(d)
            self._flush()
            self._cpu_marks(now_m)
            if not ready_sent:
                if all(d.session.acked_seq is not None for d in self.devices):
                    ready_sent = True
                    self.emit({"event": "ready", "pid": os.getpid()})
                elif time.monotonic() > setup_deadline:
                    waiting = sum(d.session.acked_seq is None for d in self.devices)
                    self.emit({"event": "error", "error": f"{waiting} devices not set up"})
                    return
            if stop_at is not None and (
                time.monotonic() >= stop_at
                or all(d.dead or d.session.in_flight_seq is None for d in self.devices)
            ):
                self.emit({"event": "result", **self.result()})
                self._disconnect_all()
                return

    def _command(self, words: list[str], stop_at: float | None) -> float | None:
        if not words:
            return stop_at
        if words[0] == "go":
            self.window = _Window(float(words[1]), float(words[2]))
            self.running = True
            if self.rate:  # spread the first offers over one interval
                now_m = time.monotonic()
                for d in self.devices:
                    d.next_due = now_m + random.uniform(0, 1.0 / self.rate)
            self.ready_queue.extend(self.devices)
            return stop_at
        if words[0] == "stop":  # stop offering; report once nothing is in flight
            self.running = False
            return time.monotonic() + float(words[1])
        return stop_at

    def _flush(self) -> None:
        import selectors as sl

        for d in self.touched:
            if d.dead:
                with contextlib.suppress(KeyError, ValueError):
                    self.sel.unregister(d.sock)
                continue
            if d.client.want_write():
                d.client.loop_write()
            want = sl.EVENT_READ | (sl.EVENT_WRITE if d.client.want_write() else 0)
            key = self.sel.get_key(d.sock)
            if key.events != want:
                self.sel.modify(d.sock, want, d)
        self.touched.clear()

    def _cpu_marks(self, now_m: float) -> None:
        w = self.window
        if "t0" not in self.cpu_at and now_m >= w.t0:
            self.cpu_at["t0"] = time.process_time()
            self.cpu_at["m0"] = now_m
        if "t1" not in self.cpu_at and now_m >= w.t1:
            self.cpu_at["t1"] = time.process_time()
            self.cpu_at["m1"] = now_m

    def result(self) -> dict[str, Any]:
        cpu = None
        if "t0" in self.cpu_at and "t1" in self.cpu_at:
            cpu = self.cpu_at["t1"] - self.cpu_at["t0"]
        return {
            "pid": os.getpid(),
            "devices": len(self.devices),
            "window": self.win,
            "acks_per_s": {str(k): v for k, v in sorted(self.acks_per_s.items())},
            "latencies": self.latencies,
            "cpu_s": cpu,
            "counts": self.counts,
            "notes": self.notes,
            "errors": self.errors,
            "jobs": {
                d.job_id: {
                    "device": d.device,
                    "acked_seq": d.session.acked_seq,
                    "acked_hash": None
                    if d.session.acked_hash is None
                    else d.session.acked_hash.hex(),
                    "in_flight": d.session.in_flight_seq,
                    "dead": d.dead,
                }
                for d in self.devices
            },
        }

    def _disconnect_all(self) -> None:
        self.closing = True
        for d in self.devices:
            if not d.dead:
                with contextlib.suppress(Exception):
                    d.client.disconnect()  # a clean DISCONNECT: no will
                    d.client.loop_write()

    def close(self) -> None:
        self.closing = True
        for d in self.devices:
            with contextlib.suppress(Exception):
                if d.sock is not None:
                    d.sock.close()


def generator_main() -> int:
    """``python -m bench.ingest_bench _generator``: the config is the first line of stdin."""
    line = b""
    while not line.endswith(b"\n"):  # unbuffered: later commands are read from the fd too
        chunk = os.read(sys.stdin.fileno(), 1)
        if not chunk:
            return 1
        line += chunk
    gen = _Generator(json.loads(line))
    try:
        gen.run()
    except (KeyboardInterrupt, BrokenPipeError):
        return 1
    except Exception as exc:  # tell the benchmark why, then fail
        import traceback

        traceback.print_exc()
        with contextlib.suppress(OSError):
            gen.emit({"event": "error", "error": f"generator failed: {exc!r}"})
        return 1
    finally:
        gen.close()
    return 0


# ---------------------------------------------------------------------------------------------
# The null server (for the generators' ceiling).


def null_server_main(host: str, port: int) -> int:
    """``python -m bench.ingest_bench _null_server HOST PORT``: the protocol's server end with
    no store: every complete snapshot is acknowledged at once (neither applied, verified nor
    stored). Prints its counters as a JSON line for each ``sample`` line on stdin."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from edge_agent.errors import RemoteProtocolError
    from edge_agent.protocol import Commit, Outgoing, ServerJobSession, TopicKind, TopicNamespace
    from edge_agent.protocol import route as route_msg

    ns = TopicNamespace()
    sessions: dict[str, ServerJobSession] = {}
    counts = {"messages": 0, "bytes": 0, "commits": 0, "acks": 0, "refused": 0}
    connected = threading.Event()

    def publish(client: Any, out: Outgoing) -> None:
        client.publish(out.topic, out.payload, qos=out.qos, retain=out.retain)
        if out.type == "ack":
            counts["acks"] += 1

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        counts["messages"] += 1
        counts["bytes"] += len(msg.payload)
        try:
            incoming = route_msg(ns, msg.topic, msg.payload)
        except RemoteProtocolError:
            counts["refused"] += 1
            return
        t = incoming.topic
        if t.kind is not TopicKind.STATE or t.job is None:
            return
        s = sessions.get(t.job)
        if s is None:
            s = sessions[t.job] = ServerJobSession(t.device, t.job, namespace=ns)
        effects = list(s.receive(incoming, time.time()))
        while effects:
            e = effects.pop(0)
            if isinstance(e, Outgoing):
                publish(client, e)
            elif isinstance(e, Commit):
                counts["commits"] += 1
                effects[:0] = s.commit_succeeded(e.seq)

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe([(s.filter, s.qos) for s in ns.server_subscriptions()])

    def on_subscribe(client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        connected.set()
        print(json.dumps({"event": "ready", "pid": os.getpid()}), flush=True)

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-null-server",
                    protocol=mqtt.MQTTv5)  # fmt: skip
    c.on_message, c.on_connect, c.on_subscribe = on_message, on_connect, on_subscribe
    c.connect(host, port, keepalive=30)

    def commands() -> None:
        for line in sys.stdin:
            if line.strip() == "sample":
                print(json.dumps({"event": "sample", **counts}), flush=True)
        c.disconnect()  # stdin closed: the benchmark is done (or gone)

    threading.Thread(target=commands, daemon=True).start()
    with contextlib.suppress(KeyboardInterrupt):
        c.loop_forever()
    return 0


# ---------------------------------------------------------------------------------------------
# The ingest core, in one thread without MQTT (what the server's CPU per snapshot is made of).


class _Ticket:
    def result(self, timeout: float | None = None) -> None:
        return None

    def done(self) -> bool:
        return True


class _Loopback:
    """A Publisher that keeps what the ingest publishes, for the benchmark to deliver."""

    def __init__(self) -> None:
        self.out: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, **kw: Any) -> _Ticket:
        self.out.append((topic, bytes(payload)))
        return _Ticket()


def core_main(devices: int, seconds: float, max_tokens: int, seed: int) -> int:
    """``python -m bench.ingest_bench _core DEVICES SECONDS MAX_TOKENS SEED``: the real
    ``Ingest`` (liveness, SQLite store, compaction) fed the devices' messages directly, in
    this one thread: no MQTT, no other thread. Times only the ingest's calls (``handle`` and
    ``maintain``), round-robin over the devices until ``seconds`` of them; prints a JSON
    line. Where the time goes inside is measured by wrapping the store's commit and the
    codec's apply (this process only)."""
    from edge_agent.codec import FORMAT_VERSION
    from edge_agent.protocol import AgentDevice, AgentJobSession, JobIdentity, Outgoing
    from edge_agent.protocol import server as proto_server
    from server.ingest import Ingest
    from server.liveness import Liveness
    from server.store import SQLiteStore

    parts = {"store_commit": 0.0, "apply": 0.0}

    def timed(fn: Any, part: str) -> Any:
        def wrapper(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                parts[part] += time.perf_counter() - t

        return wrapper

    proto_server.Commit.apply = timed(proto_server.Commit.apply, "apply")  # type: ignore[method-assign]
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="ingest-core-") as tmp:
        store = SQLiteStore(Path(tmp) / "store")
        store.commit_snapshot = timed(store.commit_snapshot, "store_commit")  # type: ignore[method-assign]
        pub = _Loopback()
        ingest = Ingest(store, pub, liveness=Liveness(store, heartbeat_timeout=30.0))
        wall = cpu = maintain = 0.0
        commits = 0
        sims: dict[str, tuple[AgentDevice, AgentJobSession, _GenJob]] = {}

        def handle(topic: str, payload: bytes) -> None:
            nonlocal wall, cpu
            w, c = time.perf_counter(), time.thread_time()
            ingest.handle(topic, payload)
            wall += time.perf_counter() - w
            cpu += time.thread_time() - c

        def deliver(items: Sequence[Any]) -> None:
            queue = [i for i in items if isinstance(i, Outgoing)]
            while queue:
                o = queue.pop(0)
                handle(o.topic, o.payload)
                replies, pub.out = pub.out, []
                for topic, payload in replies:
                    device = topic.split("/")[-3]
                    agent, session, _ = sims[device]
                    got = session.receive(agent.route(topic, payload), time.time())
                    queue += [i for i in got if isinstance(i, Outgoing)]

        for i in range(devices):
            name = f"bench-{i:04d}"
            agent = AgentDevice(name, secrets.token_hex(6))
            job = _GenJob(rng, int(rng.integers(*PROMPT_TOKENS, endpoint=True)))
            session = AgentJobSession(
                agent, f"{name}-job",
                JobIdentity(job_spec(f"{name}-job"), "sha256:bench", FORMAT_VERSION, TOTAL_STEPS),
            )  # fmt: skip
            sims[name] = (agent, session, job)
            now = time.time()
            deliver([agent.online(now), *session.connected(now, step=0)])
            deliver(session.offer(job.state(), job.step, time.time()))  # full, during set-up
        for p in parts:
            parts[p] = 0.0
        wall = cpu = 0.0
        payload_bytes = 0
        while wall + maintain < seconds:
            for agent, session, job in sims.values():
                if not session.can_offer:
                    raise RuntimeError(f"{agent.device}: cannot offer ({session.phase})")
                job.advance(int(rng.integers(1, max_tokens, endpoint=True)))
                items = session.offer(job.state(), job.step, time.time())
                payload_bytes += sum(len(i.payload) for i in items if isinstance(i, Outgoing))
                before = session.acked_seq
                deliver(items)
                if session.acked_seq == before:
                    raise RuntimeError(f"{agent.device}: snapshot not acknowledged")
                commits += 1
                if commits % 1000 == 0:  # the server's maintenance thread, every 5 s
                    t = time.perf_counter()
                    ingest.maintain()
                    maintain += time.perf_counter() - t
        t = time.perf_counter()
        ingest.maintain()
        maintain += time.perf_counter() - t
        report = store.verify()
        held = sum(
            (r := store.get_job(f"{d}-job")) is not None and r.seq == s.acked_seq
            for d, (_, s, _) in sims.items()
        )
        ingest.close()
        store.close()
    print(json.dumps({
        "event": "result", "devices": devices, "commits": commits, "wall_s": wall,
        "cpu_s": cpu, "maintain_s": maintain, "parts_s": parts, "payload_bytes": payload_bytes,
        "verify_ok": report.ok, "jobs_holding_acked": held,
    }), flush=True)  # fmt: skip
    return 0


# ---------------------------------------------------------------------------------------------
# The run, from the benchmark's side.


@dataclass
class IngestBenchConfig:
    devices: int = 500
    generators: int = 4
    warmup: float = 5.0
    window: float = 20.0
    rate: float | None = None  # snapshots/s per device; None: closed loop
    max_tokens: int = 8
    heartbeat: float = 10.0
    partitions: int | None = None  # the server's [ingest] partitions (None: its default)
    ceiling: bool = True
    paced: bool = True  # also a run paced at half the measured capacity
    core_seconds: float = 5.0  # the ingest core alone for this long (0: not measured)
    tcp_nodelay: bool = False  # TCP_NODELAY on the devices and in Mosquitto (not the server)
    drain: float = 20.0
    setup_timeout: float = 120.0
    seed: int = 1
    store_dir: Path | None = None  # where the temporary folder goes (default: the system's)
    py_spy: Path | None = None  # profile the server over the window (collapsed stacks)
    py_spy_bin: str = "py-spy"
    py_spy_args: tuple[str, ...] = ()  # more py-spy options: --idle, --gil, --native
    log: TextIO = field(default_factory=lambda: sys.stderr)


def _metrics(port: int) -> dict[str, float]:
    """The server's counters, summed over labels (``name`` -> value; histograms as
    ``name_sum``/``name_count``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        if name.endswith("_created") or name.endswith("_bucket"):
            continue
        with contextlib.suppress(ValueError):
            out[name] = out.get(name, 0.0) + float(value)
    return out


def _health(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def _read_json_lines(
    procs: Sequence[subprocess.Popen[Any]], want: str, timeout: float
) -> list[dict[str, Any]]:
    """The first ``{"event": want}`` line of each process (an ``error`` line, an exit or the
    time-out raises RuntimeError)."""
    got: dict[int, dict[str, Any]] = {}
    sel = selectors.DefaultSelector()
    bufs: dict[int, bytes] = {}
    for i, p in enumerate(procs):
        assert p.stdout is not None
        sel.register(p.stdout, selectors.EVENT_READ, i)
        bufs[i] = b""
    deadline = time.monotonic() + timeout
    try:
        while len(got) < len(procs):
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{len(procs) - len(got)} processes sent no {want!r} in time")
            for key, _ in sel.select(min(left, 1.0)):
                i = key.data
                chunk = os.read(key.fd, 1 << 20)
                if not chunk:
                    sel.unregister(key.fileobj)
                    if i in got:  # said what we wanted, then exited
                        continue
                    raise RuntimeError(f"process {procs[i].pid} exited before {want!r}")
                bufs[i] += chunk
                while b"\n" in bufs[i] and i not in got:
                    line, bufs[i] = bufs[i].split(b"\n", 1)
                    msg = json.loads(line)
                    if msg.get("event") == "error":
                        raise RuntimeError(f"process {procs[i].pid}: {msg.get('error')}")
                    if msg.get("event") == want:
                        got[i] = msg
    finally:
        sel.close()
    return [got[i] for i in range(len(procs))]


class _NullServerProbe:
    def __init__(self, proc: subprocess.Popen[Any]) -> None:
        self.proc = proc

    def sample(self) -> dict[str, float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"sample\n")
        self.proc.stdin.flush()
        msg = _read_json_lines([self.proc], "sample", 10)[0]
        return {
            "edge_resume_messages_in_total": msg["messages"],
            "edge_resume_bytes_in_total": msg["bytes"],
            "edge_resume_commits_total": msg["commits"],
            "edge_resume_acks_total": msg["acks"],
        }


def _split(devices: int, generators: int) -> list[list[str]]:
    names = [f"bench-{i:04d}" for i in range(devices)]
    k = max(1, min(generators, devices))
    return [names[i::k] for i in range(k)]


def _percentile(xs: Sequence[float], q: float) -> float | None:
    if not xs:
        return None
    return float(np.percentile(np.asarray(xs), q))


def _run_once(cfg: IngestBenchConfig, server: str, rate: float | None) -> dict[str, Any]:
    """One run against ``server`` (``ingest``: the real server; ``null``: the null server),
    each device offering ``rate`` snapshots a second (None: a closed loop)."""
    from tests.support.broker import Broker, free_port, mosquitto_binary

    log = cfg.log
    base = None if cfg.store_dir is None else str(cfg.store_dir)
    with tempfile.TemporaryDirectory(prefix="ingest-bench-", dir=base) as tmp_:
        tmp = Path(tmp_)
        procs = Processes(log)
        server_log = tmp / "server.log"
        try:
            # the broker: the project's configuration on a free port
            broker = Broker(
                tmp / "broker",
                extra=["set_tcp_nodelay true"] if cfg.tcp_nodelay else [],
            )
            broker.write_config()
            mosq = procs.spawn(
                "mosquitto", [mosquitto_binary(), "-c", str(broker.conf)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            _wait_port(broker.port, mosq, 10.0)

            env = {**os.environ, "PYTHONPATH": os.pathsep.join(_pythonpath())}
            api_port = free_port()
            srv: subprocess.Popen[Any]
            probe: Any
            if server == "ingest":
                env.update(
                    EDGE_SERVER_BROKER_URL=broker.url,
                    EDGE_SERVER_STORE_PATH=str(tmp / "store"),
                    EDGE_SERVER_API_PORT=str(api_port),
                    EDGE_SERVER_API_TOKEN=secrets.token_hex(16),
                )
                if cfg.partitions is not None:
                    env["EDGE_SERVER_INGEST_PARTITIONS"] = str(cfg.partitions)
                with server_log.open("wb") as slog:
                    srv = procs.spawn(
                        "server (ingest,api)",
                        [sys.executable, "-m", "server.cli", "serve", "--roles", "ingest,api",
                         "--log-level", "warning"],
                        env=env, stdout=slog, stderr=subprocess.STDOUT,
                    )  # fmt: skip
                _wait_server(api_port, srv, 60.0, server_log)

                def probe() -> dict[str, float]:
                    return _metrics(api_port)

            else:
                with server_log.open("wb") as slog:
                    srv = procs.spawn(
                        "null server",
                        [sys.executable, "-m", "bench.ingest_bench", "_null_server", "127.0.0.1",
                         str(broker.port)],
                        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=slog,
                    )  # fmt: skip
                _read_json_lines([srv], "ready", 30)
                probe = _NullServerProbe(srv).sample

            # the generators: set-up (connect, birth, first full snapshot acknowledged)
            gens = []
            started = time.monotonic()
            for k, names in enumerate(_split(cfg.devices, cfg.generators)):
                with (tmp / f"generator-{k}.log").open("wb") as glog:
                    g = procs.spawn(
                        f"generator {k} ({len(names)} devices)",
                        [sys.executable, "-m", "bench.ingest_bench", "_generator"],
                        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=glog,
                    )  # fmt: skip
                gcfg = {
                    "host": "127.0.0.1", "port": broker.port, "devices": names,
                    "seed": cfg.seed * 1000 + k, "rate": rate, "max_tokens": cfg.max_tokens,
                    "heartbeat": cfg.heartbeat, "setup_timeout": cfg.setup_timeout,
                    "tcp_nodelay": cfg.tcp_nodelay,
                }  # fmt: skip
                assert g.stdin is not None
                g.stdin.write((json.dumps(gcfg) + "\n").encode())
                g.stdin.flush()
                gens.append(g)
            _read_json_lines(gens, "ready", cfg.setup_timeout + 10)
            setup_s = time.monotonic() - started

            # load: warm-up, then the measured window, sampled every second
            now = time.monotonic()
            t0, t1 = now + cfg.warmup, now + cfg.warmup + cfg.window
            for g in gens:
                assert g.stdin is not None
                g.stdin.write(f"go {t0!r} {t1!r}\n".encode())
                g.stdin.flush()
            pids = {"server": srv.pid, "broker": mosq.pid}
            pids.update({f"gen{k}": g.pid for k, g in enumerate(gens)})
            samples = []
            spy = None
            tick = t0
            while tick <= t1 + 1e-9:
                time.sleep(max(0.0, tick - time.monotonic()))
                samples.append(_sample(probe, pids))
                if len(samples) == 1 and server == "ingest" and cfg.py_spy is not None:
                    spy = procs.spawn(
                        "py-spy (server)",
                        [cfg.py_spy_bin, "record", "-p", str(srv.pid), "-d", str(int(cfg.window)),
                         "-r", "100", *cfg.py_spy_args,
                         "--format", "raw", "-o", str(cfg.py_spy)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )  # fmt: skip
                tick += 1.0
            for g in gens:
                assert g.stdin is not None
                g.stdin.write(f"stop {cfg.drain!r}\n".encode())
                g.stdin.flush()
            results = _read_json_lines(gens, "result", cfg.drain + 30)
            for g in gens:
                procs.stop(g, exits_by=10.0)

            out = _summarize(cfg, server, rate, samples, results, setup_s)
            if spy is not None:
                procs.stop(spy, exits_by=15.0)
            if server == "ingest":
                rc = procs.stop(srv, grace=30.0)
                out["server_exit"] = rc
                out["store"] = _check_store(tmp / "store", results)
            else:
                procs.stop(srv)
            out["broker_log_tail"] = _tail(broker.log, 5)
            return out
        except BaseException:
            with contextlib.suppress(OSError):
                for f in [server_log, *sorted(tmp.glob("generator-*.log"))]:
                    if f.exists() and f.stat().st_size:
                        log.write(f"[ingest-bench] {f.name}:\n{_tail(f, 30)}\n")
            raise
        finally:
            procs.stop_all()


def _run_core(cfg: IngestBenchConfig) -> dict[str, Any]:
    """The ingest core in its own process (see :func:`core_main`)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(_pythonpath())}
    procs = Processes(cfg.log)
    try:
        p = procs.spawn(
            "ingest core",
            [sys.executable, "-m", "bench.ingest_bench", "_core", str(cfg.devices),
             repr(cfg.core_seconds), str(cfg.max_tokens), str(cfg.seed)],
            env=env, stdout=subprocess.PIPE,
        )  # fmt: skip
        r = _read_json_lines([p], "result", 120 + 20 * cfg.core_seconds + cfg.devices / 20)[0]
        procs.stop(p, exits_by=10.0)
    finally:
        procs.stop_all()
    n = r["commits"]
    busy = r["wall_s"] + r["maintain_s"]
    return {
        "server": "core",
        "devices": r["devices"],
        "rate": None,
        "commits": n,
        "snapshots_per_s": n / busy,
        "mb_per_s": r["payload_bytes"] / busy / MB,
        "cpu_share": r["cpu_s"] / r["wall_s"],
        "ms_per_snapshot": {
            "wall": r["wall_s"] / n * 1e3,
            "cpu": r["cpu_s"] / n * 1e3,
            "store_commit": r["parts_s"]["store_commit"] / n * 1e3,
            "apply_verify": r["parts_s"]["apply"] / n * 1e3,
            "compaction": r["maintain_s"] / n * 1e3,
        },
        "mean_snapshot_bytes": r["payload_bytes"] / n,
        "verify_ok": r["verify_ok"],
        "jobs_holding_acked": r["jobs_holding_acked"],
        "errors": [],
    }


def _pythonpath() -> list[str]:
    paths = [str(REPO)]
    extra = os.environ.get("PYTHONPATH")
    if extra:
        paths += [p for p in extra.split(os.pathsep) if p and p != str(REPO)]
    return paths


def _tail(path: Path, n: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _wait_port(port: int, proc: subprocess.Popen[Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"mosquitto did not listen on {port} within {timeout}s")


def _wait_server(port: int, proc: subprocess.Popen[Any], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{_tail(log, 30)}")
        h = _health(port)
        if h is not None and h.get("roles", {}).get("ingest", {}).get("mqtt_connected"):
            return
        time.sleep(0.1)
    raise RuntimeError(f"the server was not up within {timeout}s:\n{_tail(log, 30)}")


def _sample(probe: Any, pids: dict[str, int]) -> dict[str, Any]:
    t = time.monotonic()
    counters = probe()
    return {
        "t": t,
        "counters": counters,
        "cpu": {name: proc_cpu(pid) for name, pid in pids.items()},
        "server_cpu_split": proc_cpu_split(pids["server"]),
        "machine": machine_cpu(),
    }


_COUNTERS = {
    "messages": "edge_resume_messages_in_total",
    "bytes": "edge_resume_bytes_in_total",
    "commits": "edge_resume_commits_total",
    "acks": "edge_resume_acks_total",
}


def _summarize(
    cfg: IngestBenchConfig,
    server: str,
    rate: float | None,
    samples: list[dict[str, Any]],
    results: list[dict[str, Any]],
    setup_s: float,
) -> dict[str, Any]:
    first, last = samples[0], samples[-1]
    span = last["t"] - first["t"]

    def delta(name: str, a: dict[str, Any], b: dict[str, Any]) -> float:
        return float(b["counters"].get(name, 0.0) - a["counters"].get(name, 0.0))

    per_s: dict[str, list[float]] = {k: [] for k in _COUNTERS}
    for a, b in itertools.pairwise(samples):
        dt = b["t"] - a["t"]
        for k, name in _COUNTERS.items():
            per_s[k].append(delta(name, a, b) / dt)
    rates = {
        k: {
            "median_per_s": statistics.median(v) if v else None,
            "mean_per_s": delta(_COUNTERS[k], first, last) / span if span > 0 else None,
        }
        for k, v in per_s.items()
    }
    commit_n = delta("edge_resume_commit_seconds_count", first, last)
    commit_mean = (
        delta("edge_resume_commit_seconds_sum", first, last) / commit_n if commit_n else None
    )

    def cpu_share(name: str) -> float | None:
        a, b = first["cpu"].get(name), last["cpu"].get(name)
        return None if a is None or b is None or span <= 0 else (b - a) / span

    server_sys = None
    if first["server_cpu_split"] and last["server_cpu_split"] and span > 0:
        server_sys = (last["server_cpu_split"][1] - first["server_cpu_split"][1]) / span
    gen_names = [n for n in first["cpu"] if n.startswith("gen")]
    gen_cpu = [cpu_share(n) for n in gen_names]
    machine = None
    if first["machine"] and last["machine"]:
        busy = last["machine"][0] - first["machine"][0]
        machine = busy / span if span > 0 else None
    ours = [cpu_share("server"), cpu_share("broker"), *gen_cpu]
    others = None
    if machine is not None and all(x is not None for x in ours):
        others = max(0.0, machine - sum(x for x in ours if x is not None))
    lat = [x for r in results for x in r["latencies"]]
    acks_gen = sum(r["window"]["acks"] for r in results)
    per_gen_s: dict[int, int] = {}
    for r in results:
        for sec, n in r["acks_per_s"].items():
            if int(sec) < cfg.window:
                per_gen_s[int(sec)] = per_gen_s.get(int(sec), 0) + n
    counts: dict[str, int] = {}
    for r in results:
        for k, v in r["counts"].items():
            counts[k] = counts.get(k, 0) + v
    snaps = rates["commits"]["mean_per_s"]
    return {
        "server": server,
        "devices": cfg.devices,
        "generators": len(results),
        "rate": rate,
        "mode": "closed loop" if rate is None else f"paced, {rate:.3g} snapshots/s per device",
        "setup_s": setup_s,
        "window_s": span,
        "snapshots_per_s": rates["commits"],
        "messages_per_s": rates["messages"],
        "mb_per_s": {k: (None if v is None else v / MB) for k, v in rates["bytes"].items()},
        "acks_per_s": rates["acks"],
        "per_second": {k: [round(x, 2) for x in v] for k, v in per_s.items()},
        "acks_seen_by_devices": acks_gen,
        "acks_seen_per_s_median": statistics.median(per_gen_s.values()) if per_gen_s else None,
        "mean_snapshot_bytes": (
            sum(r["window"]["ack_payload_bytes"] for r in results) / acks_gen if acks_gen else None
        ),
        "latency_s": {
            "n": len(lat),
            "p50": _percentile(lat, 50),
            "p95": _percentile(lat, 95),
            "p99": _percentile(lat, 99),
        },
        "server_commit_mean_s": commit_mean,
        "cpu": {
            "server": cpu_share("server"),
            "server_system": server_sys,
            "broker": cpu_share("broker"),
            "generators": sum(x for x in gen_cpu if x is not None) if gen_cpu else None,
            "machine_busy": machine,
            "others": others,
            "cores": os.cpu_count(),
        },
        "cpu_ms_per_snapshot": {
            k: (None if v is None or not snaps else v / snaps * 1e3)
            for k, v in (
                ("server", cpu_share("server")),
                ("broker", cpu_share("broker")),
                ("generators", sum(x for x in gen_cpu if x is not None) if gen_cpu else None),
            )
        },
        "device_counts": counts,
        "errors": [e for r in results for e in r["errors"]],
        "notes": [n for r in results for n in r["notes"]][:20],
        "devices_acked": sum(
            j["acked_seq"] is not None for r in results for j in r["jobs"].values()
        ),
        "min_acked_seq": min(
            (j["acked_seq"] or 0 for r in results for j in r["jobs"].values()), default=0
        ),
        "devices_lost": sum(j["dead"] for r in results for j in r["jobs"].values()),
    }


def _check_store(path: Path, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Open the stopped server's store: verify() and every job's latest acknowledged state."""
    from server.store import SQLiteStore

    jobs = {j: v for r in results for j, v in r["jobs"].items()}
    store = SQLiteStore(path)
    try:
        report = store.verify()
        matched, ahead, problems = 0, 0, []
        for job, want in sorted(jobs.items()):
            rec = store.get_job(job)
            if rec is None:
                problems.append(f"{job}: not in the store")
                continue
            if want["acked_seq"] is None:
                problems.append(f"{job}: the device has nothing acknowledged")
                continue
            if rec.seq == want["in_flight"] and rec.seq is not None and rec.seq > want["acked_seq"]:
                ahead += 1  # committed; its ack had not arrived when the device reported
                continue
            if (
                rec.seq != want["acked_seq"]
                or rec.state_hash is None
                or rec.state_hash.hex() != want["acked_hash"]
            ):
                problems.append(
                    f"{job}: store seq {rec.seq}, device acknowledged {want['acked_seq']}"
                )
                continue
            loaded = store.load_state(job)
            if loaded.state_hash.hex() != want["acked_hash"]:
                problems.append(f"{job}: the stored chain replays to another state")
                continue
            matched += 1
    finally:
        store.close()
    return {
        "verify_ok": report.ok,
        "verify_problems": report.problems[:20],
        "jobs": report.jobs,
        "snapshots": report.snapshots,
        "blobs": report.blobs,
        "blob_bytes": report.blob_bytes,
        "jobs_matching": matched,
        "jobs_ahead": ahead,
        "problems": problems[:20],
        "ok": report.ok and not problems and matched + ahead == len(jobs),
    }


def run_ingest_bench(cfg: IngestBenchConfig) -> dict[str, Any]:
    """The runs: the ingest in a closed loop (its capacity), the ingest paced at half that
    (latency below saturation; ``cfg.paced``), and the null server in a closed loop (the
    generators' ceiling; ``cfg.ceiling``). With ``cfg.rate``, one paced ingest run at that
    rate replaces the first two."""
    with _signals_unwind():
        if cfg.rate is not None:
            runs = [_run_once(cfg, "ingest", cfg.rate)]
        else:
            runs = [_run_once(cfg, "ingest", None)]
            capacity = runs[0]["snapshots_per_s"]["mean_per_s"]
            if cfg.paced and capacity:
                runs.append(_run_once(cfg, "ingest", capacity / 2 / cfg.devices))
        if cfg.ceiling:
            runs.append(_run_once(cfg, "null", None))
        if cfg.core_seconds > 0:
            runs.append(_run_core(cfg))
    meta = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "config": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items() if k != "log"
        },
    }
    return {"meta": meta, "runs": runs}


# ---------------------------------------------------------------------------------------------
# The table.


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _label(r: dict[str, Any]) -> str:
    if r["server"] == "core":
        return "ingest core alone (1 thread, no MQTT)"
    who = "ingest" if r["server"] == "ingest" else "generator ceiling (null server)"
    how = "closed loop" if r["rate"] is None else f"paced {r['rate'] * r['devices']:.0f}/s"
    return f"{who}, {how}"


def format_table(result: dict[str, Any]) -> str:
    """One table: a row per run, then a line of detail per run."""
    head = ("run", "snapshots/s", "msgs/s", "MB/s", "ack p50", "ack p95",
            "CPU % server/broker/gens/other")  # fmt: skip
    rows = []
    for r in result["runs"]:
        if r["server"] == "core":
            rows.append((
                _label(r), f"{r['snapshots_per_s']:.0f}", "-", f"{r['mb_per_s']:.2f}", "-", "-",
                f"{100 * r['cpu_share']:.0f}/-/-/-",
            ))  # fmt: skip
            continue
        c = r["cpu"]
        cpu = "/".join(
            _fmt(None if c[k] is None else 100 * c[k], ".0f")
            for k in ("server", "broker", "generators", "others")
        )
        lat = r["latency_s"]
        rows.append((
            _label(r),
            _fmt(r["snapshots_per_s"]["median_per_s"], ".0f"),
            _fmt(r["messages_per_s"]["median_per_s"], ".0f"),
            _fmt(r["mb_per_s"]["median_per_s"], ".2f"),
            _fmt(None if lat["p50"] is None else lat["p50"] * 1e3, ".0f") + " ms",
            _fmt(None if lat["p95"] is None else lat["p95"] * 1e3, ".0f") + " ms",
            cpu,
        ))  # fmt: skip
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*x).rstrip() for x in rows]
    lines.append("")
    for r in result["runs"]:
        if r["server"] == "core":
            m = r["ms_per_snapshot"]
            lines.append(
                f"{_label(r)}: {r['devices']} jobs, {r['commits']} deltas; per snapshot "
                f"{m['wall']:.2f} ms ({m['cpu']:.2f} ms CPU), of which the store's durable "
                f"commit {m['store_commit']:.2f} ms and apply + verify {m['apply_verify']:.2f} "
                f"ms; compaction {m['compaction']:.2f} ms; store verify "
                f"{'ok' if r['verify_ok'] else 'FAILED'}, {r['jobs_holding_acked']}/"
                f"{r['devices']} jobs hold their latest acknowledged state"
            )
            continue
        ms = r["cpu_ms_per_snapshot"]
        commit = r["server_commit_mean_s"]
        line = (
            f"{_label(r)}: {r['devices']} devices on {r['generators']} generator processes, "
            f"set-up {r['setup_s']:.1f} s, window {r['window_s']:.0f} s; mean delta "
            f"{_fmt(r['mean_snapshot_bytes'], '.0f')} B; CPU ms per snapshot: server "
            f"{_fmt(ms['server'], '.2f')}, broker {_fmt(ms['broker'], '.2f')}, generators "
            f"{_fmt(ms['generators'], '.2f')}"
        )
        if r["server"] == "ingest":
            st = r.get("store", {})
            held = st.get("jobs_matching", 0) + st.get("jobs_ahead", 0)
            line += (
                f"; server commit (apply, verify, store) mean "
                f"{_fmt(None if commit is None else commit * 1e3, '.1f')} ms; store verify "
                f"{'ok' if st.get('verify_ok') else 'FAILED'}, {held}/{r['devices']} jobs hold "
                "their latest acknowledged state"
            )
        lines.append(line)
        if r["errors"]:
            lines.append(f"  ERRORS: {r['errors'][:5]}")
    lines.append(
        "(rates: medians of 1-second samples of the server's counters; ack: from the publish "
        "of a snapshot's last chunk to its ack at the device; CPU: % of one core over the "
        f"window, {os.cpu_count()} cores, 'other' = processes outside the benchmark)"
    )
    return "\n".join(lines)


def result_ok(result: dict[str, Any]) -> bool:
    """Every run free of device errors, every device acknowledged, the store sound."""
    for r in result["runs"]:
        if r["server"] == "core":
            if not r["verify_ok"] or r["jobs_holding_acked"] != r["devices"]:
                return False
            continue
        if r["errors"] or r["devices_lost"] or r["devices_acked"] != r["devices"]:
            return False
        if r["server"] == "ingest" and not r.get("store", {}).get("ok"):
            return False
    return True


def add_arguments(ap: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    ap.add_argument("--devices", type=int, default=500, help="simulated devices (default 500)")
    ap.add_argument("--generators", type=int, default=4, help="generator processes (default 4)")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds before the window (5)")
    ap.add_argument("--window", type=float, default=20.0, help="seconds measured (default 20)")
    ap.add_argument(
        "--rate", type=float, default=None,
        help="snapshots per second per device (default: closed loop, as fast as acks come)",
    )  # fmt: skip
    ap.add_argument("--max-tokens", type=int, default=8, help="tokens per snapshot: 1..N (8)")
    ap.add_argument("--partitions", type=int, default=None, help="the server's partitions")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the null-server run")
    ap.add_argument(
        "--no-paced", action="store_true", help="skip the run paced at half the capacity"
    )
    ap.add_argument(
        "--core-seconds", type=float, default=5.0,
        help="time the ingest core alone (one thread, no MQTT) this long (default 5; 0: skip)",
    )  # fmt: skip
    ap.add_argument(
        "--tcp-nodelay", action="store_true",
        help="TCP_NODELAY on the devices' sockets and set_tcp_nodelay in Mosquitto (default: "
        "as shipped, Nagle on; the server's own connection is never changed)",
    )  # fmt: skip
    ap.add_argument("--store-dir", type=Path, default=None, help="where the temporary store goes")
    ap.add_argument(
        "--py-spy", type=Path, default=None, metavar="FILE",
        help="profile the server over the window with py-spy (collapsed stacks)",
    )  # fmt: skip
    ap.add_argument(
        "--py-spy-args", default="",
        help="more py-spy record options, e.g. '--gil' (only the GIL holder: Python CPU) or "
        "'--idle' (waiting threads too)",
    )  # fmt: skip


def config_from_args(args: argparse.Namespace) -> IngestBenchConfig:
    return IngestBenchConfig(
        devices=args.devices,
        generators=args.generators,
        warmup=args.warmup,
        window=args.window,
        rate=args.rate,
        max_tokens=args.max_tokens,
        partitions=args.partitions,
        ceiling=not args.no_ceiling,
        paced=not args.no_paced,
        core_seconds=args.core_seconds,
        tcp_nodelay=args.tcp_nodelay,
        store_dir=args.store_dir,
        py_spy=args.py_spy,
        py_spy_args=tuple(args.py_spy_args.split()),
        py_spy_bin=shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"),
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_generator"]:
        return generator_main()
    if argv[:1] == ["_null_server"]:
        return null_server_main(argv[1], int(argv[2]))
    if argv[:1] == ["_core"]:
        return core_main(int(argv[1]), float(argv[2]), int(argv[3]), int(argv[4]))
    ap = argparse.ArgumentParser(prog="python -m bench.ingest_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_arguments(ap)
    ap.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    args = ap.parse_args(argv)
    if args.devices < 1 or args.generators < 1 or args.window < 2 or args.warmup < 0:
        ap.error("need --devices >= 1, --generators >= 1, --window >= 2, --warmup >= 0")
    try:
        result = run_ingest_bench(config_from_args(args))
    except KeyboardInterrupt:
        print("interrupted; every process started was stopped", file=sys.stderr)
        return 130
    print(format_table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result_ok(result) else 1


if __name__ == "__main__":
    sys.exit(main())
