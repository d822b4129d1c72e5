"""The resume worker: takes a job over from its device and finishes it on the server.

    worker = ResumeWorker(store, control, models_dir="/srv/edge-resume/models")
    worker.start()                                   # worker thread(s); recovers server-owned jobs
    worker.request_resume("gen-001")                 # idempotent; ResumeStatus
    worker.poll_auto(now, {"gen-002": offline_since})   # the auto-resume policy
    worker.stop()

One resume is a sequence of attempts; each attempt (``docs/worker.md``):

1. **Preflight** (nothing changes hands yet): the job's birth spec from the store, its model
   (and dataset) found in ``models_dir`` (``data_dir``) by file name, their sha256 checked
   against the ones the birth pinned (ModelMismatch / DatasetMismatch), the job built.
2. **Claim**: ``control.take_over`` raises the epoch durably with owner ``server`` and
   publishes the retained CTL, before anything else (invariant 4). After a live hand-over
   the ingest has already done this and the worker uses the epoch it was given.
3. **Replay** the acknowledged chain, read *after* the claim (until then the device could
   still add to it), with torch (``server.replay``) on CUDA when there is one; the final
   state hash is checked.
4. **Restore**: derivable entries that were not sent (a generate job's KV cache) are
   rebuilt: replaying the job's own model calls (bit-identical on the CPU) or in one prefill
   pass (the default on a GPU).
5. **Run** to the end with onnxruntime (the CUDA provider when present; on a GPU the KV
   cache stays in torch tensors bound with IOBinding, ``server.iobinding``). Outputs are
   stored by position stamped with the epoch (exactly-once: ``Store.put_outputs``);
   progress periodically; snapshots of the server's run are committed at the new epoch,
   so a worker that dies resumes from the newest one.
6. **Finish**: outputs, the final snapshot, ``control.finish`` (retained CTL stop), status
   ``completed``.

A failed attempt is retried after an exponential back-off with full jitter, up to
``ResumePolicy.max_attempts``; errors that a retry cannot fix (a different model, a bad
spec, an output conflict, another owner) fail the resume at once.

This module owns the resume lifecycle and its policy. It never publishes MQTT itself (the
``JobControl`` does), never applies a payload except through ``server.replay``, and never
writes a job's outputs or snapshots without the epoch it claimed.
"""

from __future__ import annotations

import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from edge_agent import codec
from edge_agent.errors import (
    DatasetMismatch,
    EdgeResumeError,
    Fenced,
    JobError,
    JobSpecError,
    LocalProtocolError,
    ModelMismatch,
    OutputConflict,
    ResumeError,
    StoreError,
)
from edge_agent.jobs import Job, JobSpec, create_job
from edge_agent.state import state_nbytes
from server import metrics
from server.control import JobControl, ResumeStatus
from server.store import JobRecord, Store

if TYPE_CHECKING:  # torch is imported on first use (see ResumeWorker.device)
    import torch

    from server.replay import ReplayResult

__all__ = ["LAZY_IMPORTS", "PHASES", "ResumePolicy", "ResumeWorker", "create_worker"]

#: what the worker imports on first use, not at start (``edge-server serve`` checks that
#: they are installed before it starts the role)
LAZY_IMPORTS = ("torch",)

log = logging.getLogger("edge_resume.worker")

PHASES = (
    "queued",
    "claiming",
    "replaying",
    "rebuilding",
    "running",
    "completed",
    "failed",
    "handover-requested",
)
_FINAL = ("completed", "failed")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
#: errors a retry cannot fix: the resume fails at once
_PERMANENT = (
    ModelMismatch,
    DatasetMismatch,
    JobSpecError,
    OutputConflict,
    ResumeError,
    Fenced,
    LocalProtocolError,  # the control refuses: a completed job, a hand-over of a server job
)


@dataclass(frozen=True)
class ResumePolicy:
    """How the worker resumes jobs (docs/worker.md, "Policy").

    ``auto_resume_after``: seconds a job's device must have been offline before
    :meth:`ResumeWorker.poll_auto` resumes it (None: only on request). A job file's
    ``[server] auto_resume_after`` overrides it for that job.
    ``max_attempts``, ``backoff_base``, ``backoff_max``: attempt n + 1 starts a random
    time in [0, min(backoff_max, backoff_base * 2 ** (n - 1))] seconds after attempt n
    failed ("full jitter").
    ``rebuild``: how a KV cache that was not sent is rebuilt: "replay" (the job's own calls,
    bit-identical on the CPU), "prefill" (one call; fast on a GPU, last bits may differ),
    "auto" (prefill on CUDA, replay on the CPU).
    ``io_binding``: run generate jobs with the cache bound as torch tensors: "auto" (on
    CUDA with the CUDA provider), "always", "never".
    ``progress_every_steps``: store progress and new outputs this often.
    ``snapshot_every_steps`` / ``snapshot_every_seconds``: commit a snapshot of the run this
    often (either; None disables that trigger). ``snapshot_derivable``: include derivable
    entries (the KV cache) in those snapshots, so a restarted worker recomputes nothing.
    """

    auto_resume_after: float | None = None
    max_attempts: int = 5
    backoff_base: float = 5.0
    backoff_max: float = 300.0
    rebuild: Literal["auto", "replay", "prefill"] = "auto"
    io_binding: Literal["auto", "always", "never"] = "auto"
    progress_every_steps: int = 50
    snapshot_every_steps: int | None = 500
    snapshot_every_seconds: float | None = 60.0
    snapshot_derivable: bool = True

    def __post_init__(self) -> None:
        def bad(what: str) -> ResumeError:
            return ResumeError(f"ResumePolicy: {what}")

        if self.auto_resume_after is not None and not self.auto_resume_after >= 0:
            raise bad("auto_resume_after must be >= 0 seconds or None")
        if type(self.max_attempts) is not int or self.max_attempts < 1:
            raise bad("max_attempts must be an integer >= 1")
        if not (0 <= self.backoff_base <= self.backoff_max) or not math.isfinite(self.backoff_max):
            raise bad("need 0 <= backoff_base <= backoff_max < inf")
        if self.rebuild not in ("auto", "replay", "prefill"):
            raise bad("rebuild must be 'auto', 'replay' or 'prefill'")
        if self.io_binding not in ("auto", "always", "never"):
            raise bad("io_binding must be 'auto', 'always' or 'never'")
        if type(self.progress_every_steps) is not int or self.progress_every_steps < 1:
            raise bad("progress_every_steps must be an integer >= 1")
        if self.snapshot_every_steps is not None and (
            type(self.snapshot_every_steps) is not int or self.snapshot_every_steps < 1
        ):
            raise bad("snapshot_every_steps must be an integer >= 1 or None")
        if self.snapshot_every_seconds is not None and not self.snapshot_every_seconds > 0:
            raise bad("snapshot_every_seconds must be > 0 or None")

    def backoff(self, failures: int, rng: random.Random) -> float:
        """Seconds to wait after the ``failures``-th failed attempt (full jitter)."""
        cap = min(self.backoff_max, self.backoff_base * 2.0 ** max(failures - 1, 0))
        return rng.uniform(0.0, cap)


@dataclass
class _Resume:
    """One job's resume in this process (guarded by the worker's lock)."""

    job_id: str
    reason: str
    requested_at: float
    phase: str = "queued"
    attempt: int = 0
    epoch: int | None = None
    first_step_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    due: float = 0.0
    running: bool = False
    handed_over: int | None = None  # epoch the ingest took the job over at (live hand-over)
    start_step: int | None = None  # the step the attempt's run started from
    rebuilt: tuple[str, ...] = ()  # derivable entries the attempt recomputed
    history: list[str] = field(default_factory=list)

    def status(self) -> ResumeStatus:
        return ResumeStatus(
            job_id=self.job_id,
            phase=self.phase,
            attempt=self.attempt,
            epoch=self.epoch,
            requested_at=self.requested_at,
            first_step_at=self.first_step_at,
            finished_at=self.finished_at,
            error=self.error,
            start_step=self.start_step,
            rebuilt=self.rebuilt,
        )


class _Stopped(Exception):
    """The worker is stopping: the attempt ends after a snapshot, to be recovered later."""


@dataclass
class _Acked:
    """The newest state of the job the store holds, as this attempt knows it."""

    seq: int | None
    state_hash: bytes | None
    state: dict[str, Any] | None
    step: int


def _file_name(path: str) -> str:
    """The last component of a path written on any system (the device's job file)."""
    return re.split(r"[\\/]", path)[-1]


def _default_providers() -> list[str] | None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider"]
    return None


class ResumeWorker:
    """Resumes jobs on the server (implements ``server.control.Resumer``).

    ``store``: the server's store. ``control``: the ingest's ``JobControl`` (claims,
    hand-over requests, the final CTL). ``models_dir`` / ``data_dir`` (default:
    ``models_dir``): where the job's model and dataset files are found, by file name.
    ``torch_device``: where replay (and, on CUDA, the KV cache) lives; default CUDA when
    torch sees a GPU. ``providers``: onnxruntime providers for the jobs; default the CUDA
    provider when onnxruntime has it, else the CPU. ``clock``: seconds (``time.time``).
    ``rng``: for the back-off jitter. ``workers``: threads running resumes in parallel.
    ``torch_threads``: sets torch's CPU thread pool (process-wide) for CPU replays.
    ``auto_poll_s``: how often the started worker applies the auto-resume policy to the
    jobs the store shows offline (None: only when :meth:`poll_auto` is called).
    """

    def __init__(
        self,
        store: Store,
        control: JobControl,
        *,
        models_dir: str | Path,
        data_dir: str | Path | None = None,
        torch_device: Any = None,
        providers: list[Any] | None = None,
        policy: ResumePolicy | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        workers: int = 1,
        torch_threads: int | None = None,
        auto_poll_s: float | None = 5.0,
    ) -> None:
        if workers < 1:
            raise ResumeError("a worker needs at least one thread")
        self.store = store
        self.control = control
        self.models_dir = Path(models_dir)
        self.data_dir = Path(data_dir) if data_dir is not None else self.models_dir
        self._torch_device = torch_device
        self._torch_threads = torch_threads
        self._device: torch.device | None = None
        self._device_lock = threading.Lock()
        self.providers = providers if providers is not None else _default_providers()
        self.policy = policy or ResumePolicy()
        self.clock = clock
        self.rng = rng or random.Random()
        self.workers = workers
        self.auto_poll_s = auto_poll_s
        self._cond = threading.Condition()
        self._resumes: dict[str, _Resume] = {}
        self._threads: list[threading.Thread] = []
        self._stopping = False

    @property
    def device(self) -> torch.device:
        """Where replay (and, on CUDA, the KV cache) lives. Resolving it imports torch
        (seconds): it happens on first use, or in the background once :meth:`start` has
        run, so that a restarted server takes snapshots again without waiting for torch."""
        with self._device_lock:
            if self._device is None:
                import torch

                from server.replay import default_device

                if self._torch_threads is not None:  # process-wide: one CPU thread pool
                    torch.set_num_threads(self._torch_threads)
                self._device = default_device(self._torch_device)
            return self._device

    # -- Resumer --------------------------------------------------------------------------

    def request_resume(self, job_id: str, *, reason: str = "api") -> ResumeStatus:
        """Start resuming ``job_id`` (or return the resume already under way: idempotent).
        A failed resume is started anew; a completed job returns its completed status.
        Raises StoreError ("unknown job") for a job the store does not know."""
        with self._cond:
            r = self._resumes.get(job_id)
            if r is not None and r.phase not in ("failed", "handover-requested"):
                return r.status()
            rec = self._job(job_id)
            now = self.clock()
            if rec.status == "completed":
                done = _Resume(job_id, reason, now, phase="completed", epoch=rec.epoch)
                done.finished_at = rec.status_at
                self._resumes[job_id] = done
                return done.status()
            r = _Resume(job_id, reason, now, due=now)
            self._resumes[job_id] = r
            self._cond.notify_all()
            log.info("job %s: resume requested (%s)", job_id, reason)
            return r.status()

    def request_handover(self, job_id: str) -> ResumeStatus:
        """Ask the job's (online) device to hand the job over: it sends a final snapshot
        with everything (derivable entries too) and releases the job; the ingest takes it
        over and calls :meth:`on_handed_over`. A job the server already owns is resumed.
        Errors of ``control.request_handover`` (the CTL not published) propagate."""
        with self._cond:
            r = self._resumes.get(job_id)
            if r is not None and r.phase not in _FINAL:
                return r.status()
            rec = self._job(job_id)
            handover = rec.status != "completed" and rec.owner == "edge"
            if handover:
                r = _Resume(job_id, "handover", self.clock(), phase="handover-requested")
                r.due = math.inf  # runs once the ingest reports the take-over
                self._resumes[job_id] = r
        if not handover:
            return self.request_resume(job_id, reason="handover")
        assert r is not None
        try:
            self.control.request_handover(job_id)  # may wait for the broker: not under the lock
        except BaseException:
            with self._cond:
                if self._resumes.get(job_id) is r and r.phase == "handover-requested":
                    del self._resumes[job_id]
            raise
        log.info("job %s: hand-over requested", job_id)
        return r.status()

    def on_handed_over(self, job_id: str, epoch: int) -> None:
        """The ingest took the job over after the device's RELEASE, at ``epoch``: run it
        from the acknowledged state (which the device sent complete), without a claim.
        Called from the ingest's thread: it only queues the work, and never raises."""
        with self._cond:
            now = self.clock()
            r = self._resumes.get(job_id)
            if r is None or r.phase in _FINAL:
                r = _Resume(job_id, "handover", now)
                self._resumes[job_id] = r
            r.handed_over = epoch
            if not r.running:
                r.phase = "queued"
                r.due = now
            self._cond.notify_all()
            log.info("job %s: handed over at epoch %d", job_id, epoch)

    def status(self, job_id: str) -> ResumeStatus | None:
        with self._cond:
            r = self._resumes.get(job_id)
            return None if r is None else r.status()

    # -- policy ---------------------------------------------------------------------------

    def poll_auto(self, now: float, offline_jobs: Mapping[str, float]) -> list[ResumeStatus]:
        """Resume the jobs whose device has been offline long enough. ``offline_jobs``:
        job id -> when its device went offline (the ``now`` clock). The delay is the job
        file's ``[server] auto_resume_after`` or the policy's ``auto_resume_after``. A job
        whose automatic resume failed is not retried automatically again."""
        started = []
        for job_id, since in offline_jobs.items():
            with self._cond:
                r = self._resumes.get(job_id)
                if r is not None and (r.phase not in _FINAL or r.reason == "auto"):
                    continue
            rec = self.store.get_job(job_id)
            if rec is None or rec.owner != "edge" or rec.status in _FINAL:
                continue
            after = self.auto_resume_after(rec)
            if after is None or now - since < after:
                continue
            started.append(self.request_resume(job_id, reason="auto"))
        return started

    def auto_resume_after(self, rec: JobRecord) -> float | None:
        """The job's auto-resume delay: its job file's, else the server's."""
        table = rec.spec.get("server")
        if isinstance(table, Mapping):
            value: object = table.get("auto_resume_after")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                seconds = float(value)
                if math.isfinite(seconds) and seconds >= 0:
                    return seconds
        return self.policy.auto_resume_after

    # -- threads --------------------------------------------------------------------------

    def start(self, *, recover: bool = True) -> None:
        """Start the worker threads; with ``recover``, first queue the jobs a previous
        worker owned and did not finish (it was killed, or stopped)."""
        if self._threads:
            return
        if recover:
            self.recover()
        self._stopping = False
        warm = threading.Thread(target=lambda: self.device, name="resume-torch-import", daemon=True)
        warm.start()
        self._threads.append(warm)
        for i in range(self.workers):
            t = threading.Thread(target=self._loop, name=f"resume-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        if self.auto_poll_s is not None:
            t = threading.Thread(target=self._auto_loop, name="resume-auto", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the threads. A running job stops after its current step, with a snapshot;
        it stays owned by the server and is recovered by the next ``start()``."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)
        self._threads = []

    def close(self) -> None:
        """:meth:`stop` (the name ``edge-server serve`` calls)."""
        self.stop()

    def offline_jobs(self) -> dict[str, float]:
        """Jobs their device owns that the store shows ``offline``, and since when."""
        return {
            r.job: r.status_at
            for r in self.store.list_jobs()
            if r.status == "offline" and r.owner == "edge"
        }

    def _auto_loop(self) -> None:
        assert self.auto_poll_s is not None
        while True:
            deadline = time.monotonic() + self.auto_poll_s
            with self._cond:
                while not self._stopping and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
                if self._stopping:
                    return
            try:
                self.poll_auto(self.clock(), self.offline_jobs())
            except EdgeResumeError as exc:  # a store hiccup: try again next time
                log.warning("auto-resume poll failed: %s", exc)

    def recover(self) -> list[ResumeStatus]:
        """Queue every job the server owns that is not finished (a worker died with it)."""
        out = []
        for rec in self.store.list_jobs():
            if rec.owner == "server" and rec.status in ("resuming", "server-running"):
                out.append(self.request_resume(rec.job, reason="recover"))
        return out

    def wait(self, job_id: str, timeout: float | None = None) -> ResumeStatus | None:
        """Block until the job's resume is completed or failed (or ``timeout`` seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                r = self._resumes.get(job_id)
                if r is None or (r.phase in _FINAL and not r.running):
                    return None if r is None else r.status()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return r.status()
                self._cond.wait(0.5 if left is None else min(left, 0.5))

    def run_due(self, now: float | None = None) -> int:
        """Run, in the calling thread, every attempt due at ``now`` (default: the clock);
        returns how many ran. For embedding without threads, and for tests."""
        n = 0
        while True:
            r = self._take_due(self.clock() if now is None else now)
            if r is None:
                return n
            self._run(r)
            n += 1

    def _take_due(self, now: float) -> _Resume | None:
        with self._cond:
            due = [r for r in self._resumes.values() if r.phase == "queued" and not r.running]
            due = [r for r in due if r.due <= now]
            if not due:
                return None
            r = min(due, key=lambda x: x.due)
            r.running = True
            return r

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
            r = self._take_due(self.clock())
            if r is None:
                with self._cond:
                    if self._stopping:
                        return
                    waiting = [
                        x.due
                        for x in self._resumes.values()
                        if x.phase == "queued" and not x.running
                    ]
                    delay = min(waiting) - self.clock() if waiting else 1.0
                    self._cond.wait(min(max(delay, 0.01), 1.0))
                continue
            self._run(r)

    # -- one attempt ----------------------------------------------------------------------

    def _job(self, job_id: str) -> JobRecord:
        rec = self.store.get_job(job_id)
        if rec is None:
            raise StoreError(f"unknown job {job_id!r}", hint="the server has no birth for it")
        return rec

    def _set(self, r: _Resume, **changes: Any) -> None:
        with self._cond:
            for k, v in changes.items():
                setattr(r, k, v)
            self._cond.notify_all()

    def _run(self, r: _Resume) -> None:
        self._set(
            r, attempt=r.attempt + 1, phase="claiming", error=None, start_step=None, rebuilt=()
        )
        try:
            self._attempt(r)
        except _Stopped:
            metrics.RESUMES.labels("stopped").inc()
            self._set(r, phase="queued", due=self.clock())
        except Exception as exc:  # the worker's seam: every failure ends this attempt
            self._attempt_failed(r, exc)
        finally:
            self._set(r, running=False)

    def _attempt_failed(self, r: _Resume, exc: Exception) -> None:
        err = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, EdgeResumeError):
            log.exception("job %s: attempt %d failed unexpectedly", r.job_id, r.attempt)
        if isinstance(exc, Fenced) and r.handed_over is not None:
            # the ingest took the job over (a RELEASE) while this attempt ran: go again
            self._set(r, phase="queued", due=self.clock(), error=err)
            return
        now = self.clock()
        if isinstance(exc, _PERMANENT) or r.attempt >= self.policy.max_attempts:
            outcome = "fenced" if isinstance(exc, Fenced) else "failed"
            metrics.RESUMES.labels(outcome).inc()
            log.error("job %s: resume failed after %d attempt(s): %s", r.job_id, r.attempt, err)
            self._set(r, phase="failed", finished_at=now, error=err)
            # the job's status says failed only when the server holds it (a claim was made);
            # refused before any claim, the job stays its device's. Fenced: another owner.
            if r.epoch is not None and not isinstance(exc, Fenced):
                try:
                    self.store.set_status(r.job_id, "failed", detail=f"resume: {err}"[:2000])
                except StoreError as store_exc:
                    log.error("job %s: cannot record the failure: %s", r.job_id, store_exc)
            return
        delay = self.policy.backoff(r.attempt, self.rng)
        metrics.RESUMES.labels("retry").inc()
        log.warning(
            "job %s: attempt %d failed (%s); retry in %.1f s", r.job_id, r.attempt, err, delay
        )
        self._set(r, phase="queued", due=now + delay, error=err)

    def _spec(self, rec: JobRecord) -> JobSpec:
        """The birth's spec with the model (and dataset) resolved in our folders."""
        spec = JobSpec.from_dict(rec.spec, base_dir=self.models_dir, source=f"job {rec.job}")
        if spec.model_hash is None:
            if not _SHA256.fullmatch(rec.model_hash):
                raise ResumeError(
                    f"job {rec.job}: its birth pins no model sha256; refusing an unverified model"
                )
            spec = spec.replace(model_hash=rec.model_hash.lower())
        elif _SHA256.fullmatch(rec.model_hash) and rec.model_hash.lower() != spec.model_hash:
            raise ModelMismatch(f"job {rec.job}: its birth names two different model hashes")
        name = _file_name(spec.model)
        model = self.models_dir / name
        if not model.is_file():
            raise JobError(
                f"job {rec.job}: model {name!r} is not in {self.models_dir}",
                hint="copy the job's model file there (the same file: its sha256 is checked)",
            )
        spec = spec.replace(model=str(model.resolve()))
        dataset = spec.params.get("dataset")
        if isinstance(dataset, str):
            data = self.data_dir / _file_name(dataset)
            if not data.is_file():
                raise JobError(
                    f"job {rec.job}: dataset {data.name!r} is not in {self.data_dir}",
                    hint="copy the job's dataset there (its sha256 is checked)",
                )
            spec = spec.with_params(dataset=str(data.resolve()))
        return spec

    def _rebuild_mode(self) -> str:
        if self.policy.rebuild != "auto":
            return self.policy.rebuild
        return "prefill" if self.device.type == "cuda" else "replay"

    def _binds(self, job: Job) -> bool:
        from server.iobinding import can_bind

        if self.policy.io_binding == "never" or not can_bind(job):
            return False
        if self.policy.io_binding == "always":
            return True
        providers = getattr(getattr(job, "model", None), "providers", [])
        return self.device.type == "cuda" and "CUDAExecutionProvider" in providers

    def _attempt(self, r: _Resume) -> None:
        job_id = r.job_id
        rec = self._job(job_id)
        if rec.status == "completed" and r.handed_over is None:
            self._set(r, phase="completed", finished_at=self.clock(), epoch=rec.epoch)
            return
        # 1. preflight: nothing changes hands if the model or the spec is wrong
        job = create_job(self._spec(rec), providers=self.providers)
        # 2. claim, before anything runs
        with self._cond:
            handed, r.handed_over = r.handed_over, None
        epoch = handed if handed is not None else self.control.take_over(job_id, reason=r.reason)
        self._set(r, epoch=epoch)
        n = self.store.add_attempt(job_id)
        self.store.set_status(
            job_id, "resuming", detail=f"attempt {n} ({r.reason}) at epoch {epoch}"
        )
        # 3. replay what the store holds now (the device can add nothing after the claim)
        rec = self._job(job_id)
        binds = self._binds(job)
        result: ReplayResult | None = None
        if rec.seq is not None:
            self._set(r, phase="replaying")
            from server.replay import replay_job

            result = replay_job(self.store, job_id, device=self.device, keep_device=binds)
            metrics.REPLAY_SECONDS.labels(result.backend, result.device).observe(result.seconds)
            metrics.REPLAY_BYTES.inc(result.payload_bytes)
            log.info(
                "job %s: replayed %d payloads (%d bytes of state) in %.3f s (%s on %s)",
                job_id, result.payloads, result.state_bytes, result.seconds, result.backend,
                result.device,
            )  # fmt: skip
        # 4. restore (rebuilding what was not sent)
        runner = self._restore(r, job, result, binds)
        self._set(r, start_step=runner.step)
        log.info(
            "job %s: attempt %d at epoch %d starts from step %d%s",
            job_id, r.attempt, epoch, runner.step,
            f" (rebuilt {', '.join(r.rebuilt)})" if r.rebuilt else " (nothing rebuilt)",
        )  # fmt: skip
        acked = _Acked(
            rec.seq,
            rec.state_hash,
            None if result is None else result.state,
            runner.step,
        )
        # 5. run
        self._set(r, phase="running")
        self._run_job(r, rec, runner, epoch, acked)

    def _restore(self, r: _Resume, job: Job, result: ReplayResult | None, binds: bool) -> Any:
        mode = self._rebuild_mode()
        if result is None:  # never snapshotted: the job starts from its first step
            state: dict[str, Any] = {}
            missing = True
        else:
            state = result.state
            absent = tuple(sorted(k for k in job.derivable if k not in state))
            missing = bool(absent)
            if absent:  # what the device did not send is recomputed here: say so
                self._set(r, rebuilt=absent)
        if binds:
            import torch

            from server.iobinding import BoundGenerate

            if result is None:
                state = job.state()
            if missing:
                self._set(r, phase="rebuilding")
            kv = None
            if not missing and result is not None and result.device_state is not None:
                kv = [result.device_state[k].tensor() for k in job.kv_inputs]  # type: ignore[attr-defined]
            return BoundGenerate(
                job,  # type: ignore[arg-type]
                state,
                kv=kv,
                device=torch.device(self.device),
                rebuild=mode,
            )
        if result is None:
            return job
        if missing and job.derivable:
            self._set(r, phase="rebuilding")
            rebuild = getattr(job, "rebuild", None)
            if mode == "prefill" and rebuild is not None:
                job.restore(rebuild(state, mode="prefill"))
                return job
        job.restore(state)  # a missing cache is rebuilt by replaying the job's calls
        return job

    def _run_job(self, r: _Resume, rec: JobRecord, runner: Any, epoch: int, acked: _Acked) -> None:
        p = self.policy
        job_id = r.job_id
        flushed: dict[str, int] = {}
        last_progress = runner.step
        last_snap_step = runner.step
        last_snap_at = self.clock()
        first = True
        while not runner.done:
            if self._stopping:
                self._flush_outputs(job_id, runner, epoch, flushed)
                self._snapshot(rec, runner, epoch, acked)
                raise _Stopped()
            runner.run_step()
            metrics.RESUME_STEPS.inc()
            if first:
                first = False
                now = self.clock()
                self._set(r, first_step_at=now)
                metrics.RESUME_SECONDS.observe(max(now - r.requested_at, 0.0))
                self.store.set_status(
                    job_id, "server-running", detail=f"epoch {epoch}, from step {runner.step - 1}"
                )
            if runner.step - last_progress >= p.progress_every_steps:
                self._flush_outputs(job_id, runner, epoch, flushed)
                self.store.set_progress(job_id, runner.step, runner.total_steps)
                last_progress = runner.step
            due_steps = (
                p.snapshot_every_steps is not None
                and runner.step - last_snap_step >= p.snapshot_every_steps
            )
            due_time = (
                p.snapshot_every_seconds is not None
                and self.clock() - last_snap_at >= p.snapshot_every_seconds
            )
            if (due_steps or due_time) and not runner.done:
                self._flush_outputs(job_id, runner, epoch, flushed)
                self._snapshot(rec, runner, epoch, acked)
                last_snap_step, last_snap_at = runner.step, self.clock()
        # 6. finish: outputs, the final state, the CTL, the status
        self._flush_outputs(job_id, runner, epoch, flushed)
        self._snapshot(rec, runner, epoch, acked)
        self.store.set_progress(job_id, runner.step, runner.total_steps)
        self.control.finish(job_id, epoch)
        self.store.set_status(job_id, "completed", detail=f"on the server at epoch {epoch}")
        metrics.RESUMES.labels("completed").inc()
        self._set(r, phase="completed", finished_at=self.clock())
        log.info("job %s: completed on the server (%d steps)", job_id, runner.step)

    def _flush_outputs(self, job_id: str, runner: Any, epoch: int, flushed: dict[str, int]) -> None:
        """Store the output positions not stored yet by this attempt (the store skips
        positions it holds with the same bytes: exactly-once)."""
        for name, arr in runner.outputs().items():
            start = flushed.get(name, 0)
            if arr.shape[0] > start:
                self.store.put_outputs(job_id, start, {name: arr[start:]}, epoch=epoch)
                flushed[name] = int(arr.shape[0])

    def _snapshot(self, rec: JobRecord, runner: Any, epoch: int, acked: _Acked) -> None:
        """Commit the run's state at ``epoch`` (a delta against the acknowledged state)."""
        if acked.seq is not None and acked.step == runner.step:
            return  # nothing new since the acknowledged state
        st = runner.state()
        if not self.policy.snapshot_derivable:
            st = {k: v for k, v in st.items() if k not in runner.derivable}
        now = self.store.get_job(rec.job)
        if now is None:
            raise ResumeError(f"job {rec.job} vanished from the store")
        same = acked.state is not None and now.seq == acked.seq
        base = acked.state if same else None
        payload = codec.encode_delta(base, st)
        seq = (now.seq or 0) + 1
        state_hash = codec.read_header(payload).state_hash
        self.store.commit_snapshot(
            rec.device, rec.job, seq, now.seq if same else None, epoch, payload, state_hash,
            state_nbytes(st), step=runner.step,
        )  # fmt: skip
        acked.seq, acked.state_hash, acked.state, acked.step = seq, state_hash, st, runner.step
        try:
            self.store.compact(rec.job)
        except StoreError as exc:  # maintenance: the snapshot itself is committed
            log.warning("job %s: compaction failed: %s", rec.job, exc)


def create_worker(ctx: Any) -> ResumeWorker:
    """Build the worker ``edge-server serve`` runs, from its context: ``ctx.store``,
    ``ctx.control``, ``ctx.clock`` and the ``[worker]`` settings ``ctx.config.worker``:
    ``models_dir`` (required), ``data_dir``, ``auto_resume_s``, ``max_attempts``,
    ``retry_initial_s``, ``retry_max_s``, ``device`` ("auto", "cpu", "cuda", "cuda:N"), and
    in ``options`` any :class:`ResumePolicy` field (``rebuild``, ``io_binding``,
    ``snapshot_every_steps``, ...) and ``workers``, ``torch_threads``, ``auto_poll_s``."""
    cfg = ctx.config.worker
    models_dir = getattr(cfg, "models_dir", None)
    if not models_dir:
        raise ResumeError(
            "the resume worker needs [worker] models_dir (where the jobs' models are)",
            hint="set it in the server's config or EDGE_SERVER_WORKER_MODELS_DIR",
        )
    options = dict(getattr(cfg, "options", None) or {})
    fields = set(ResumePolicy.__dataclass_fields__)
    policy_args = {k: options.pop(k) for k in list(options) if k in fields}
    auto = getattr(cfg, "auto_resume_s", None)
    policy = ResumePolicy(
        auto_resume_after=auto,
        max_attempts=getattr(cfg, "max_attempts", 5),
        backoff_base=getattr(cfg, "retry_initial_s", 5.0),
        backoff_max=getattr(cfg, "retry_max_s", 300.0),
        **policy_args,
    )
    extra = {k: options.pop(k) for k in ("workers", "torch_threads", "auto_poll_s") if k in options}
    if options:
        raise ResumeError(f"unknown [worker] options: {', '.join(sorted(options))}")
    device = getattr(cfg, "device", "auto")
    return ResumeWorker(
        ctx.store,
        ctx.control,
        models_dir=models_dir,
        data_dir=getattr(cfg, "data_dir", None),
        torch_device=None if device in (None, "auto") else device,
        policy=policy,
        clock=getattr(ctx, "clock", time.time),
        **extra,
    )
