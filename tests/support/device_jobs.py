"""A device's side of a job, for the resume worker's tests: job files, a run that commits
its snapshots to a store the way ingest would, a fake ``JobControl`` over the store.

No MQTT here: ``device_run`` commits with ``Store.commit_snapshot`` exactly what the agent
would send (``encode_delta`` against the previous, acknowledged state), with or without the
KV cache; ``StoreControl`` takes jobs over with the store's CAS as the ingest does, and
records every call.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

from edge_agent import codec
from edge_agent.errors import TransportTimeout
from edge_agent.jobs import Job, load_job
from edge_agent.state import state_nbytes
from server.store import Store

DEVICE = "gw-1"


def generate_job_file(
    folder: Path,
    model: Path,
    *,
    job_id: str = "gen-1",
    tokens: int = 300,
    temperature: float = 0.8,
    extra: str = "",
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{job_id}.toml"
    path.write_text(
        f"""[job]
id = "{job_id}"
kind = "generate"
model = "{model}"

[params]
prompt = "The gateway said: "
max_new_tokens = {tokens}
temperature = {temperature}
top_k = 40
seed = 7
{extra}"""
    )
    return path


def batch_job_file(
    folder: Path, model: Path, dataset: Path, *, job_id: str = "batch-1", batch_size: int = 50
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{job_id}.toml"
    path.write_text(
        f"""[job]
id = "{job_id}"
kind = "batch"
model = "{model}"

[params]
dataset = "{dataset}"
batch_size = {batch_size}
"""
    )
    return path


def server_models(tiny_models: dict[str, Path], folder: Path) -> Path:
    """A models folder of the server's own (copies: the worker finds files by name)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, path in tiny_models.items():
        shutil.copyfile(path, folder / name)
    return folder


def device_run(
    store: Store,
    job_file: Path,
    *,
    steps: int,
    every: int,
    kv: bool,
    device: str = DEVICE,
    offline: bool = True,
) -> Job:
    """Run a job "on the device" for ``steps`` steps, committing a snapshot every ``every``
    steps (a full one first, then deltas against the previous one), as an agent and the
    ingest together would. Returns the device's job, stopped at ``steps``."""
    job = load_job(job_file)
    store.record_birth(
        device,
        job.spec.id,
        spec=job.spec.to_dict(),
        model_hash=job.model_hash,
        codec_version=codec.FORMAT_VERSION,
        session="s1",
    )
    acked: dict[str, Any] | None = None
    seq = 0
    while job.step < steps and not job.done:
        job.run(min(every, steps - job.step))
        st = job.state()
        if not kv:
            st = {k: v for k, v in st.items() if k not in job.derivable}
        seq += 1
        payload = codec.encode_delta(acked, st)
        store.commit_snapshot(
            device,
            job.spec.id,
            seq,
            None if acked is None else seq - 1,
            1,
            payload,
            codec.read_header(payload).state_hash,
            state_nbytes(st),
            step=job.step,
        )
        acked = st
    if offline:
        store.set_status(job.spec.id, "offline", detail="test: the device went dark")
    return job


def uninterrupted(job_file: Path) -> dict[str, Any]:
    """The outputs of the same job run from start to end in one go."""
    job = load_job(job_file)
    job.run()
    return job.outputs()


class StoreControl:
    """A ``JobControl`` over the store alone: ``take_over`` is the store's CAS (what the
    ingest does before publishing the CTL). Records every call in ``calls`` (and in
    ``events``, shared with other recorders); fails the first ``fail_take_over`` claims
    with TransportTimeout (a PUBACK that never came)."""

    def __init__(
        self, store: Store, *, fail_take_over: int = 0, events: list[Any] | None = None
    ) -> None:
        self.store = store
        self.fail_take_over = fail_take_over
        self.calls: list[tuple[Any, ...]] = []
        self.events = events if events is not None else []
        self._lock = threading.Lock()

    def _record(self, *call: Any) -> None:
        with self._lock:
            self.calls.append(call)
            self.events.append(call)

    def take_over(self, job_id: str, *, reason: str) -> int:
        self._record("take_over", job_id, reason)
        if self.fail_take_over:
            self.fail_take_over -= 1
            raise TransportTimeout("injected: the retained CTL was not acknowledged")
        rec = self.store.get_job(job_id)
        assert rec is not None
        new = self.store.raise_epoch(job_id, rec.epoch, "server", status="resuming", detail=reason)
        return new.epoch

    def request_handover(self, job_id: str) -> None:
        self._record("request_handover", job_id)

    def finish(self, job_id: str, epoch: int) -> None:
        self._record("finish", job_id, epoch)
