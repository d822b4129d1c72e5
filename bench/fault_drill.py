"""The fault drill: randomized end-to-end scenarios, every part a real process.

    python -m bench.fault_drill                        # 20 scenarios, seed 1
    python -m bench.fault_drill --scenarios 5 --seed 7 --json drill.json
    python -m bench.fault_drill --replay 123456789     # one scenario again, by its seed

Each scenario starts a fresh deployment (``tests/support/cluster.py``: a real Mosquitto,
``edge-server serve`` on a SQLite store, the agent as ``edge-agent run`` behind a TCP proxy
that forwards whole MQTT packets) and runs one job on the agent: a ``generate`` job on the
tiny decoder with its KV cache sent (snapshots cut into 16 kB messages) or recomputed by the
server, or a stateful ``batch`` job (the tiny GRU). Its seed draws the job, whether the
server auto-resumes offline jobs, and 1-3 faults at random moments (the first one's kind is
the seed modulo 7, so that a run of 20 puts every kind first at least twice):

==================  ===========================================================================
``kill-agent``      SIGKILL the agent; start it again after a random pause, or leave it dead
                    (the server must resume the job: auto-resume, or ``POST /v1/jobs/{id}/resume``
                    as an operator would, once the API shows it offline)
``kill-server``     SIGKILL ``edge-server serve``; start it again on the same store after a pause
``kill-broker``     SIGKILL Mosquitto; start it again on the same port and persistence folder
``link-drop``       the agent's link cut (connections closed, new ones refused) for a random span
``link-block``      the agent's link black-holed (nothing flows, sockets stay open) for a span
``corrupt``         bytes flipped in the payload of one PUBLISH in flight: a state message from
                    the agent (snapshot chunk, birth, query, done) or a reply to it (ack, nack,
                    sync, need)
``duplicate``       one such PUBLISH delivered twice
==================  ===========================================================================

Then it waits for the job to complete (on the device or on the server; an agent left dead is
started again at the end and must stand down) and checks:

* **identical**: the outputs from the API (JSON and ``.npy``) are bit for bit those of an
  uninterrupted run of the same job file in this process (and so is the agent's ``.npz``,
  which it must have written when it finished the job);
* **state lost**: the number of violations of "an acknowledged state is never lost": with
  the server stopped, ``edge-server verify`` passes; the store's acknowledged seq is at or
  above every seq the agent logged as acknowledged, and holds the journal's acknowledged
  seq with the same hash when it still keeps it; every resume on the server started at or
  above every step the device was told is acknowledged; the acknowledged step never went
  backwards (in the agent's log, or in the API polled every 0.2 s during the scenario);
* **recovery**: from the end of the last fault (a killed process started again, the link
  restored, the damaged message delivered; for an agent left dead, the kill) to the job's
  next progress: the next snapshot acknowledged to the agent, the server's first resumed
  step, a step stored by the server's run, or the completion. None (``-``) when the job
  completed before the last fault ended (the server finished it while the link was down).

A table row per scenario and a summary row follow. A failed scenario keeps its folder (every
process's log) and names it. The exit status is 0 only if every scenario completed with
identical outputs and no state lost.

This module measures and prints; it is a dev tool, never imported by the edge install.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import random
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support.cluster import ApiClient, Cluster, reference_run  # noqa: E402

FAULTS = (
    "kill-agent",
    "kill-server",
    "kill-broker",
    "link-drop",
    "link-block",
    "corrupt",
    "duplicate",
)
JOB_ID = "drill-job"
DEVICE = "gw-drill"


# ---------------------------------------------------------------------------------------------
# Jobs.


@dataclass(frozen=True)
class JobConfig:
    name: str
    kind: str  # "generate" or "batch"
    kv: str = "send"
    tokens: int = 1600
    pace: float = 0.005
    extra: tuple[str, ...] = ()

    def write(self, c: Cluster) -> Path:
        if self.kind == "batch":
            return c.batch_job(JOB_ID, batch_size=10, pace=self.pace)
        return c.generate_job(
            JOB_ID, tokens=self.tokens, kv=self.kv, pace=self.pace, overhead_budget=None
        )  # the job file's default budget, as a gateway runs it


JOBS = {
    "gen-send": JobConfig(
        "gen-send", "generate", kv="send", tokens=1600, extra=("--max-message", "16384")
    ),
    "gen-recompute": JobConfig("gen-recompute", "generate", kv="recompute", tokens=1600),
    "batch": JobConfig("batch", "batch", pace=0.016),  # 500 steps
}


_REFERENCE: dict[bytes, tuple[int, dict[str, np.ndarray]]] = {}


def reference(job_file: Path) -> tuple[int, dict[str, np.ndarray]]:
    """(steps, outputs) of the job run uninterrupted in this process, cached by the file."""
    key = job_file.read_bytes()
    if key not in _REFERENCE:
        job = reference_run(job_file)
        _REFERENCE[key] = (job.step, job.outputs())
    return _REFERENCE[key]


def same_outputs(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> str | None:
    """None when identical (names, dtypes, shapes, bytes); else what differs."""
    if sorted(got) != sorted(want):
        return f"outputs {sorted(got)} != {sorted(want)}"
    for name, w in want.items():
        h = got[name]
        if h.dtype != w.dtype or h.shape != w.shape:
            return f"{name}: {h.dtype}{h.shape} != {w.dtype}{w.shape}"
        if h.tobytes() != w.tobytes():
            first = int(np.argmax(h.reshape(-1) != w.reshape(-1))) if h.size else 0
            return f"{name}: differs (first at flat index {first})"
    return None


# ---------------------------------------------------------------------------------------------
# Plans.


@dataclass(frozen=True)
class FaultSpec:
    kind: str
    pause: float  # seconds before it (after the previous fault's end)
    span: float = 0.0  # how long a process stays dead / the link stays cut
    restart: bool = True  # kill-agent: start it again (else leave it dead)
    direction: str = "up"  # corrupt / duplicate: "up" (from the agent) or "down"
    seed: int = 0

    def label(self) -> str:
        if self.kind == "kill-agent":
            return f"kill-agent({self.span:.1f}s)" if self.restart else "kill-agent(dead)"
        if self.kind in ("corrupt", "duplicate"):
            return f"{self.kind}({'state' if self.direction == 'up' else 'ack'})"
        return f"{self.kind}({self.span:.1f}s)"


@dataclass(frozen=True)
class Plan:
    seed: int
    job: str
    auto_resume_s: float | None
    first_at: float  # fraction of the job's steps before the first fault
    faults: tuple[FaultSpec, ...]


def draw_fault(rng: random.Random, kind: str) -> FaultSpec:
    pause = rng.uniform(0.2, 1.5)
    if kind == "kill-agent":
        restart = rng.random() < 0.6
        return FaultSpec(kind, pause, rng.uniform(0.1, 2.0), restart=restart)
    if kind in ("kill-server", "kill-broker"):
        return FaultSpec(kind, pause, rng.uniform(0.1, 2.0))
    if kind in ("link-drop", "link-block"):
        return FaultSpec(kind, pause, rng.uniform(0.3, 4.5))
    direction = "up" if rng.random() < 0.65 else "down"
    return FaultSpec(kind, pause, direction=direction, seed=rng.randrange(2**31))


def draw_plan(seed: int, kinds: Sequence[str] | None = None, job: str | None = None) -> Plan:
    """The scenario a seed stands for; ``kinds`` / ``job`` fix the faults / the job (the
    timings still come from the seed)."""
    rng = random.Random(seed)
    job_name = rng.choice(sorted(JOBS))
    auto = rng.choice([None, 1.0, 2.5])
    first_at = rng.uniform(0.05, 0.3)
    if kinds is None:  # the first fault's kind is the seed's residue: see scenario_seeds
        kinds = [FAULTS[seed % len(FAULTS)]]
        kinds += [rng.choice(FAULTS) for _ in range(rng.randint(0, 2))]
    faults = tuple(draw_fault(rng, k) for k in kinds)
    return Plan(seed, job or job_name, auto, first_at, faults)


# ---------------------------------------------------------------------------------------------
# Observing.


def event_time(rec: dict[str, Any]) -> float:
    """The wall-clock time (time.time) of an agent JSON log record."""
    ts = datetime.strptime(str(rec["ts"]), "%Y-%m-%dT%H:%M:%S.%fZ")
    return ts.replace(tzinfo=timezone.utc).timestamp()


@dataclass
class Sample:
    at: float
    status: str
    owner: str
    epoch: int
    seq: int | None
    step: int


class Monitor:
    """Polls the API's view of the job every ``interval`` seconds (while the server
    answers), to see the acknowledged step move and never go back."""

    def __init__(self, api: ApiClient, job_id: str, interval: float = 0.2) -> None:
        self.api, self.job_id, self.interval = api, job_id, interval
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Monitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):
                doc = self.api.try_job(self.job_id)
                if doc is not None:
                    self.samples.append(
                        Sample(time.time(), str(doc["status"]), str(doc["owner"]),
                               int(doc["epoch"]), doc["seq"], int(doc["progress"]["step"]))
                    )  # fmt: skip

    def regressions(self) -> list[str]:
        out = []
        prev: Sample | None = None
        for s in self.samples:
            if prev is not None and (s.step < prev.step or (s.seq or 0) < (prev.seq or 0)):
                out.append(
                    f"API: acknowledged step/seq went back from {prev.step}/{prev.seq} to "
                    f"{s.step}/{s.seq}"
                )
            prev = s
        return out

    def server_progress_after(self, t: float) -> float | None:
        """When the API first showed the server's own run (owner ``server``) further than
        at ``t``. (A step the device sent is not counted here: a snapshot in flight when
        the device died may still be committed after its death; the device's progress is
        its ``acked`` events.)"""
        before = [s.step for s in self.samples if s.at <= t]
        base = before[-1] if before else None
        for s in self.samples:
            if s.at > t and base is not None and s.step > base and s.owner == "server":
                return s.at
        return None


# ---------------------------------------------------------------------------------------------
# A scenario.


@dataclass
class Fault:
    kind: str
    label: str
    start: float
    end: float
    detail: str = ""


@dataclass
class Result:
    id: int
    seed: int
    job: str
    auto_resume_s: float | None
    faults: list[Fault] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    completed: bool = False
    where: str = "-"
    identical: bool = False
    identical_detail: str = ""
    state_lost: int = 0
    lost_detail: list[str] = field(default_factory=list)
    recovery_s: float | None = None
    wall_s: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # seconds: start, faults, ...
    error: str | None = None
    workdir: str = ""

    @property
    def ok(self) -> bool:
        return self.completed and self.identical and self.state_lost == 0 and not self.error


class Scenario:
    def __init__(self, sid: int, plan: Plan, workdir: Path, models: dict[str, Path],
                 log: Callable[[str], None] = print) -> None:  # fmt: skip
        self.sid, self.plan, self.workdir, self.models, self.log = sid, plan, workdir, models, log
        self.rng = random.Random(plan.seed ^ 0x5EED)
        self.cfg = JOBS[plan.job]
        self.result = Result(sid, plan.seed, plan.job, plan.auto_resume_s,
                             workdir=str(workdir))  # fmt: skip
        self.left_dead = False  # the agent was killed and left dead
        self.last_resume_post = 0.0

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> Result:
        t0 = time.monotonic()
        r = self.result
        config: dict[str, dict[str, Any]] = {"store": {"max_deltas": 4}}
        if self.plan.auto_resume_s is not None:
            config["worker"] = {"auto_resume_s": self.plan.auto_resume_s}
        c = self.c = Cluster(self.workdir, self.models, server_config=config)
        monitor: Monitor | None = None
        mark = t0

        def phase(name: str) -> None:
            nonlocal mark
            now = time.monotonic()
            r.phases[name] = round(now - mark, 2)
            mark = now

        try:
            c.start()
            job_file = self.job_file = self.cfg.write(c)
            self.total, self.expected = reference(job_file)
            phase("start")
            self.agent = c.add_agent(DEVICE, [job_file], extra=list(self.cfg.extra),
                                     packets=True).start()  # fmt: skip
            monitor = self.monitor = Monitor(c.api, JOB_ID).start()
            self.inject_faults()
            phase("faults")
            self.finish()
            phase("finish")
            monitor.stop()
            self.check()
            phase("check")
        except Exception as exc:  # a scenario that breaks is a failed scenario, not a crash
            r.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            with contextlib.suppress(Exception):
                (self.workdir / "failure.txt").write_text(f"{exc}\n\n{c.report(200)}")
        finally:
            if monitor is not None:
                monitor.stop()
            c.close()
            r.wall_s = time.monotonic() - t0
            phase("close")
        return r

    def status(self) -> dict[str, Any] | None:
        return self.c.api.try_job(JOB_ID)

    def is_completed(self) -> bool:
        doc = self.status()
        return doc is not None and doc["status"] == "completed"

    def inject_faults(self) -> None:
        c, agent, plan = self.c, self.agent, self.plan
        mark = max(1, int(plan.first_at * self.total))
        c.wait_for(lambda: agent.local_step(JOB_ID) >= mark, 60,
                   f"the agent to reach step {mark}", check=agent.check_alive)  # fmt: skip
        for i, spec in enumerate(plan.faults):
            if i > 0:
                time.sleep(spec.pause)
            if self.is_completed():
                self.result.skipped += [f.label() for f in plan.faults[i:]]
                return
            fault = self.inject(spec)
            if fault is None:
                self.result.skipped.append(spec.label())
            else:
                self.result.faults.append(fault)
                self.log(f"  [{self.sid}] {fault.label} {fault.detail}".rstrip())

    def inject(self, spec: FaultSpec) -> Fault | None:
        c, agent = self.c, self.agent
        kind = spec.kind
        start = time.time()
        detail = ""
        if kind != "kill-server" and kind != "kill-broker" and not agent.alive:
            return None  # nothing to hit: the agent is dead or stood down
        end: float | None = None  # a process restarted: when it was started again
        if kind == "kill-agent":
            step = agent.local_step(JOB_ID)
            agent.kill()
            detail = f"at local step {step}"
            if spec.restart:
                time.sleep(spec.span)
                end = time.time()
                agent.start()
            else:
                self.left_dead = True
                end = time.time()
                self.resume_if_needed(wait_offline=True)
        elif kind == "kill-server":
            c.server.kill()
            time.sleep(spec.span)
            end = time.time()
            c.server.start(wait=False)  # the next fault may land while it starts
        elif kind == "kill-broker":
            c.broker.kill()
            time.sleep(spec.span)
            end = time.time()
            c.broker.start()
        elif kind == "link-drop":
            agent.drop_link()
            time.sleep(spec.span)
            agent.restore_link()
        elif kind == "link-block":
            agent.block_link()
            time.sleep(spec.span)
            agent.restore_link()
        else:
            suffix = "/state" if spec.direction == "up" else "/ack"
            inj = agent.inject(kind, spec.direction, suffix, seed=spec.seed)
            if not inj.done.wait(5.0):
                agent.proxy.disarm(inj)
                return None
            assert inj.at is not None
            start = inj.at
            detail = f"{inj.topic} ({inj.size} B)"
            if inj.flipped:
                detail += f" bytes {inj.flipped}"
            return Fault(kind, spec.label(), start, inj.at, detail)
        return Fault(kind, spec.label(), start, time.time() if end is None else end, detail)

    def resume_if_needed(self, *, wait_offline: bool = False) -> None:
        """An operator's move for a job whose device is dead and no auto-resume configured:
        once the API shows it offline, ``POST /v1/jobs/{id}/resume`` (idempotent)."""
        if self.plan.auto_resume_s is not None:
            return
        if wait_offline:
            with contextlib.suppress(AssertionError):
                self.c.wait_for(lambda: (self.status() or {}).get("status") == "offline", 20,
                                "the job offline")  # fmt: skip
        doc = self.status()
        due = time.monotonic() - self.last_resume_post > 3.0
        if doc is not None and doc["status"] in ("offline", "failed") and due:
            self.last_resume_post = time.monotonic()
            with contextlib.suppress(Exception):
                self.c.api.resume(JOB_ID, reason="fault drill: device dead")

    def finish(self) -> None:
        """Wait for the job to complete; restart an agent left dead (it must stand down)."""
        c, agent, r = self.c, self.agent, self.result

        def done() -> bool:
            if self.left_dead:
                self.resume_if_needed()
            return self.is_completed()

        c.wait_for(done, 150, "the job to complete", check=c.check, interval=0.1)
        doc = c.api.job(JOB_ID)
        r.completed = True
        r.where = str(doc["owner"])
        if self.left_dead:  # back from the dead: it must learn the job is not its own
            agent.start()
        if agent.alive:
            rc = agent.wait(90)
            if rc != 0:
                raise AssertionError(f"the agent exited with {rc}")
        meta = agent.meta(JOB_ID)
        if r.where == "edge" and meta.status != "done":
            raise AssertionError(f"completed on the edge but journaled {meta.status}")
        if r.where == "server" and meta.status not in ("fenced", "released"):
            raise AssertionError(f"completed on the server but the agent journaled {meta.status}")

    # -- the checks --------------------------------------------------------------------------

    def check(self) -> None:
        c, agent, r = self.c, self.agent, self.result
        problems = [
            same_outputs(c.api.outputs(JOB_ID), self.expected),
            same_outputs({k: c.api.output_npy(JOB_ID, k) for k in self.expected}, self.expected),
        ]
        # the device's own copy: required when it finished the job; it may also have one
        # when it finished offline before it could learn of a take-over (the server's run
        # is then the job's; the device's copy must still be the same)
        npz = agent.outputs / f"{JOB_ID}.npz"
        if r.where == "edge" or npz.exists():
            with np.load(npz) as got:
                problems.append(same_outputs(dict(got), self.expected))
        found = [p for p in problems if p]
        r.identical = not found
        r.identical_detail = "; ".join(found)
        doc = c.api.job(JOB_ID)
        lost = self.lost_state(doc)
        r.state_lost = len(lost)
        r.lost_detail = lost
        r.recovery_s = self.recovery(doc)

    def lost_state(self, doc: dict[str, Any]) -> list[str]:
        c, agent = self.c, self.agent
        lost = list(self.monitor.regressions())
        acks = [e for e in agent.events("acked") if e.get("job") == JOB_ID]
        steps = [int(e["step"]) for e in acks]
        for a, b in itertools.pairwise(steps):
            if b < a:
                lost.append(f"agent: acknowledged step went back from {a} to {b}")
        max_step = max(steps, default=0)
        max_seq = max((int(e["seq"]) for e in acks), default=0)
        for h in doc["history"]:  # every resume starts at or above what the device was told
            m = re.match(r"epoch (\d+), from step (\d+)", str(h.get("detail") or ""))
            if h["status"] == "server-running" and m and int(m.group(2)) < max_step:
                lost.append(f"a resume at epoch {m.group(1)} started from step {m.group(2)}, "
                            f"below step {max_step} acknowledged to the device")  # fmt: skip
        if int(doc["progress"]["step"]) != self.total:
            lost.append(f"the job completed at step {doc['progress']['step']} of {self.total}")
        rc = c.server.terminate()
        if rc != 0:
            lost.append(f"the server exited with {rc} on SIGTERM")
        v = c.server.verify()
        if v.returncode != 0 or not v.stdout.startswith("OK"):
            lost.append(f"edge-server verify: {(v.stdout + v.stderr).strip()[:300]}")
        from server.store import SQLiteStore

        with SQLiteStore(c.server.store_path, create=False) as store:
            rec = store.get_job(JOB_ID)
            if rec is None or rec.seq is None:
                return [*lost, "the store holds no state for the job"]
            if rec.seq < max_seq:
                lost.append(f"the store is at seq {rec.seq}, the agent was acked {max_seq}")
            held = {s.seq: s for s in store.snapshots(JOB_ID)}
            acked = agent.acked(JOB_ID)
            if acked is not None:
                seq, state_hash, _ = acked
                if seq in held and held[seq].state_hash != state_hash:
                    lost.append(f"seq {seq}: the store's hash differs from the journal's")
            newest = store.load_state(JOB_ID)  # replays the chain, every hash checked
            if newest.state_hash != rec.state_hash:
                lost.append("the store's newest state does not replay to its hash")
        return lost

    def recovery(self, doc: dict[str, Any]) -> float | None:
        if not self.result.faults:
            return None
        end = self.result.faults[-1].end
        times = [event_time(e) for e in self.agent.events("acked") if e.get("job") == JOB_ID]
        times += [float(h["at"]) for h in doc["history"]
                  if h["status"] in ("server-running", "completed")]  # fmt: skip
        if (t := self.monitor.server_progress_after(end)) is not None:
            times.append(t)
        after = [t for t in times if t >= end]
        return round(min(after) - end, 3) if after else None


# ---------------------------------------------------------------------------------------------
# The drill.


def scenario_seeds(seed: int, n: int) -> list[int]:
    """``n`` scenario seeds drawn from ``seed``; the i-th is i modulo the number of fault
    kinds, so that every kind comes first in turn (20 scenarios: each kind 2-3 times as
    the first fault, and at random after it)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        s = rng.randrange(len(FAULTS), 2**31)
        out.append(s - s % len(FAULTS) + i % len(FAULTS))
    return out


def run_drill(
    seeds: Sequence[int],
    *,
    workdir: Path,
    models: dict[str, Path] | None = None,
    keep: bool = False,
    log: Callable[[str], None] = print,
    plans: Sequence[Plan] | None = None,
) -> list[Result]:
    """Run one scenario per seed (or per plan) in ``workdir``; a passing scenario's folder
    is removed unless ``keep``."""
    from edge_agent.models import build_all

    if models is None:
        models = build_all(workdir / "models")
    plans = list(plans) if plans is not None else [draw_plan(s) for s in seeds]
    results = []
    for i, plan in enumerate(plans, 1):
        folder = workdir / f"scenario-{i:02d}-{plan.seed}"
        faults = ", ".join(f.label() for f in plan.faults)
        log(f"scenario {i}/{len(plans)}: seed {plan.seed}, {plan.job}, "
            f"auto-resume {plan.auto_resume_s}, faults {faults}")  # fmt: skip
        r = Scenario(i, plan, folder, models, log).run()
        results.append(r)
        line = (f"  -> {'ok' if r.ok else 'FAILED'}: completed on {r.where}, identical "
                f"{r.identical}, state lost {r.state_lost}, recovery {r.recovery_s}, "
                f"{r.wall_s:.1f}s {r.phases}")  # fmt: skip
        if not r.ok:
            why = [r.error or "", r.identical_detail, *r.lost_detail]
            line += f"\n     {'; '.join(w for w in why if w)} (logs: {folder})"
        log(line)
        if r.ok and not keep:
            shutil.rmtree(folder, ignore_errors=True)
    return results


def summary(results: Sequence[Result]) -> dict[str, Any]:
    rec = [r.recovery_s for r in results if r.recovery_s is not None]
    return {
        "scenarios": len(results),
        "faults_injected": sum(len(r.faults) for r in results),
        "jobs_completed": sum(r.completed for r in results),
        "outputs_identical": sum(r.identical for r in results),
        "state_lost": sum(r.state_lost for r in results),
        "median_recovery_s": round(statistics.median(rec), 2) if rec else None,
        "by_fault": {k: sum(f.kind == k for r in results for f in r.faults) for k in FAULTS},
    }


def table(results: Sequence[Result]) -> str:
    head = ["id", "seed", "job", "auto", "faults", "completed on", "identical", "state lost",
            "recovery s", "wall s"]  # fmt: skip
    rows = []
    for r in results:
        faults = ", ".join(f.label for f in r.faults) or "-"
        if r.skipped:
            faults += f" (skipped: {', '.join(r.skipped)})"
        rows.append([
            str(r.id), str(r.seed), r.job,
            "-" if r.auto_resume_s is None else f"{r.auto_resume_s:g}s",
            faults, r.where if r.completed else "NOT COMPLETED",
            "yes" if r.identical else "NO", str(r.state_lost),
            "-" if r.recovery_s is None else f"{r.recovery_s:.2f}", f"{r.wall_s:.1f}",
        ])  # fmt: skip
    s = summary(results)
    med = "-" if s["median_recovery_s"] is None else f"{s['median_recovery_s']:.2f} s"
    n = s["scenarios"]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        "| scenarios | faults injected | jobs completed | outputs identical | state lost | "
        "median recovery time |",
        "|---|---|---|---|---|---|",
        f"| {n} | {s['faults_injected']} | {s['jobs_completed']} of {n} | "
        f"{s['outputs_identical']} of {n} | {s['state_lost']} | {med} |",
        "",
        "faults by kind: " + ", ".join(f"{k} {v}" for k, v in s["by_fault"].items()),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fault_drill", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--scenarios", type=int, default=20, help="how many (default 20)")
    ap.add_argument("--seed", type=int, default=1, help="draws the scenarios' seeds (default 1)")
    ap.add_argument("--replay", type=int, nargs="+", metavar="SEED",
                    help="run these scenario seeds (from a table) instead")  # fmt: skip
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON ('-': stdout)")
    ap.add_argument("--workdir", type=Path, help="where scenarios run (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep every scenario's folder")
    args = ap.parse_args(argv)
    seeds = args.replay or scenario_seeds(args.seed, args.scenarios)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fault-drill-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"fault drill: {len(seeds)} scenarios (seed {args.seed}) in {workdir}", flush=True)
    t0 = time.monotonic()
    results = run_drill(seeds, workdir=workdir, keep=args.keep,
                        log=lambda m: print(m, flush=True))  # fmt: skip
    print()
    print(table(results))
    print(f"\ntotal {time.monotonic() - t0:.0f} s")
    if args.json:
        doc = {"seed": args.seed, "summary": summary(results),
               "scenarios": [asdict(r) for r in results]}  # fmt: skip
        text = json.dumps(doc, indent=2, default=str)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    ok = all(r.ok for r in results)
    if ok and not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
