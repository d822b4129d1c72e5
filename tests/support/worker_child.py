"""A resume worker process for tests/test_worker_crash.py, killed while it runs a job.

    python -m tests.support.worker_child STORE MODELS JOB {resume|recover} DELAY_S

It resumes JOB (``resume``: a new request; ``recover``: the job a killed worker left
owned by the server, as ``ResumeWorker.start`` would find it) with a snapshot every 100
steps, printing ``snapshot SEQ STEP`` once each is committed and ``outputs START STOP``
once each output range is stored. After its first snapshot every step also sleeps
DELAY_S, so that the test's SIGKILL lands in the middle of the run.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from edge_agent.jobs.generate import GenerateJob
from server.store import SQLiteStore
from server.worker import ResumePolicy, ResumeWorker
from tests.support.device_jobs import StoreControl


class PrintingStore(SQLiteStore):
    slow = False

    def commit_snapshot(self, *args: Any, **kwargs: Any) -> Any:
        rec = super().commit_snapshot(*args, **kwargs)
        print(f"snapshot {rec.seq} {kwargs.get('step')}", flush=True)
        PrintingStore.slow = True
        return rec

    def put_outputs(self, job: str, start: int, arrays: Any, **kwargs: Any) -> int:
        n = super().put_outputs(job, start, arrays, **kwargs)
        stop = start + next(iter(arrays.values())).shape[0]
        print(f"outputs {start} {stop}", flush=True)
        return n


def main() -> int:
    root, models, job, mode, delay = sys.argv[1:6]
    real = GenerateJob.run_step

    def step(self: GenerateJob) -> None:
        real(self)
        if PrintingStore.slow:
            time.sleep(float(delay))

    GenerateJob.run_step = step  # type: ignore[method-assign]
    store = PrintingStore(root)
    worker = ResumeWorker(
        store,
        StoreControl(store),
        models_dir=models,
        torch_device="cpu",
        policy=ResumePolicy(snapshot_every_steps=100, progress_every_steps=20),
    )
    if mode == "recover":
        assert [s.job_id for s in worker.recover()] == [job]
    else:
        worker.request_resume(job)
    worker.run_due()
    print(f"done {worker.status(job)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
