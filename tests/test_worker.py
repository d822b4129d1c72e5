"""The resume worker with a real SQLite store, real onnxruntime sessions and the tiny
models: a job snapshotted by a device run is finished on the server with exactly the
outputs of an uninterrupted run; claims come first; retries back off; mismatched models
are refused; a live hand-over recomputes nothing."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from edge_agent.errors import ResumeError, StoreError
from edge_agent.jobs.generate import GenerateJob
from server.control import Resumer, ResumeStatus
from server.store import SQLiteStore
from server.worker import ResumePolicy, ResumeWorker, create_worker
from tests.support.device_jobs import (
    StoreControl,
    batch_job_file,
    device_run,
    generate_job_file,
    server_models,
    uninterrupted,
)


class FakeClock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    with SQLiteStore(tmp_path / "store") as s:
        yield s


@pytest.fixture
def models(tiny_models: dict[str, Path], tmp_path: Path) -> Path:
    return server_models(tiny_models, tmp_path / "server-models")


def make_worker(store: SQLiteStore, control: StoreControl, models: Path, **kw: Any) -> ResumeWorker:
    policy = kw.pop("policy", ResumePolicy(snapshot_every_steps=100, progress_every_steps=25))
    return ResumeWorker(store, control, models_dir=models, torch_device="cpu", policy=policy, **kw)


def stored_outputs(store: SQLiteStore, job: str) -> dict[str, np.ndarray]:
    return store.get_outputs(job)


def assert_outputs_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert got[k].tobytes() == want[k].tobytes(), k


def test_worker_implements_the_resumer_protocol(store: SQLiteStore, models: Path) -> None:
    w: Resumer = make_worker(store, StoreControl(store), models)
    assert w.status("nope") is None
    with pytest.raises(StoreError, match="unknown job"):
        w.request_resume("nope")


def test_the_device_is_resolved_lazily_and_warmed_up_by_start(
    store: SQLiteStore, models: Path
) -> None:
    """Building a worker does not touch torch (a restarted server is ready sooner); start()
    resolves the device in the background, and a resume would wait for it."""
    w = make_worker(store, StoreControl(store), models, auto_poll_s=None)
    assert w._device is None
    w.start(recover=False)
    try:
        warm = next(t for t in w._threads if t.name == "resume-torch-import")
        warm.join(30)
        assert w._device is not None and w._device.type == "cpu"
        assert w.device is w._device  # resolved once
    finally:
        w.stop()


@pytest.mark.parametrize("kv", [True, False], ids=["kv-sent", "kv-rebuilt"])
def test_generate_resumed_equals_uninterrupted(
    store: SQLiteStore, models: Path, tiny_models: dict[str, Path], tmp_path: Path, kv: bool
) -> None:
    jf = generate_job_file(tmp_path / "device", tiny_models["tiny-decoder.onnx"], tokens=300)
    device_run(store, jf, steps=130, every=40, kv=kv)
    acked = store.get_job("gen-1")
    assert acked is not None and 0 < acked.step < 300
    control = StoreControl(store)
    w = make_worker(store, control, models)
    st = w.request_resume("gen-1")
    assert st.phase == "queued" and st.attempt == 0
    assert st.start_step is None and st.rebuilt == ()
    assert w.run_due() == 1
    done = w.status("gen-1")
    assert done is not None and done.phase == "completed", done
    assert done.epoch == 2 and done.first_step_at is not None and done.error is None
    # it says where it started and what it had to recompute
    assert done.start_step == acked.step
    kv_keys = tuple(sorted(f"past_key_values.{i}.{x}" for i in (0, 1) for x in ("key", "value")))
    assert done.rebuilt == (() if kv else kv_keys)
    assert_outputs_equal(stored_outputs(store, "gen-1"), uninterrupted(jf))
    rec = store.get_job("gen-1")
    assert rec is not None
    assert (rec.owner, rec.epoch, rec.status, rec.step, rec.attempts) == (
        "server", 2, "completed", 300, 1,
    )  # fmt: skip
    statuses = [c.status for c in store.status_history("gen-1")]
    assert statuses[-3:] == ["resuming", "server-running", "completed"]
    assert [c[0] for c in control.calls] == ["take_over", "finish"]
    assert control.calls[1] == ("finish", "gen-1", 2)
    # the server's own snapshots are at the new epoch and replay to the final state
    snaps = store.snapshots("gen-1")
    assert snaps[-1].epoch == 2 and rec.seq == snaps[-1].seq
    assert store.load_state("gen-1").state["step"] == 300
    assert store.verify().ok


def test_generate_through_io_binding_on_cpu_equals_uninterrupted(
    store: SQLiteStore, models: Path, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """The GPU path's plumbing (replayed tensors kept on the device, bound by address),
    run on the CPU device with the CPU provider: bit-identical."""
    jf = generate_job_file(tmp_path / "device", tiny_models["tiny-decoder.onnx"], tokens=200)
    device_run(store, jf, steps=90, every=30, kv=True)
    policy = ResumePolicy(io_binding="always", snapshot_every_steps=50)
    w = make_worker(store, StoreControl(store), models, policy=policy)
    w.request_resume("gen-1")
    w.run_due()
    assert w.status("gen-1").phase == "completed"  # type: ignore[union-attr]
    assert_outputs_equal(stored_outputs(store, "gen-1"), uninterrupted(jf))
    assert store.load_state("gen-1").state["step"] == 200


def test_batch_resumed_equals_uninterrupted(
    store: SQLiteStore, models: Path, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    jf = batch_job_file(
        tmp_path / "device", tiny_models["tiny-gru.onnx"], tiny_models["sensors.npy"],
        batch_size=250,
    )  # fmt: skip
    device_run(store, jf, steps=7, every=3, kv=True)
    w = make_worker(store, StoreControl(store), models)
    w.request_resume("batch-1")
    w.run_due()
    assert w.status("batch-1").phase == "completed"  # type: ignore[union-attr]
    want = uninterrupted(jf)
    assert want["results"].shape[0] == 5000
    assert_outputs_equal(stored_outputs(store, "batch-1"), want)


def test_a_job_never_snapshotted_runs_from_its_first_step(
    store: SQLiteStore, models: Path, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    jf = generate_job_file(tmp_path / "device", tiny_models["tiny-decoder.onnx"], tokens=60)
    device_run(store, jf, steps=0, every=1, kv=True)  # a birth, no snapshot
    w = make_worker(store, StoreControl(store), models)
    w.request_resume("gen-1")
    w.run_due()
    st = w.status("gen-1")
    assert st is not None and st.phase == "completed"
    assert (st.start_step, st.rebuilt) == (0, ())  # nothing to rebuild at step 0
    assert_outputs_equal(stored_outputs(store, "gen-1"), uninterrupted(jf))


def test_take_over_comes_before_the_first_step(
    store: SQLiteStore,
    models: Path,
    tiny_models: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    jf = generate_job_file(tmp_path / "device", tiny_models["tiny-decoder.onnx"], tokens=80)
    device_run(store, jf, steps=20, every=10, kv=False)
    events: list[Any] = []
    real_step = GenerateJob.run_step
    real_rebuild = GenerateJob._rebuild_kv

    def step(self: GenerateJob) -> None:
        events.append(("step", self.step))
        real_step(self)

    def rebuild(self: GenerateJob, *a: Any, **k: Any) -> Any:
        events.append(("rebuild",))
        return real_rebuild(self, *a, **k)

    monkeypatch.setattr(GenerateJob, "run_step", step)
    monkeypatch.setattr(GenerateJob, "_rebuild_kv", rebuild)
    control = StoreControl(store, events=events)
    w = make_worker(store, control, models)
    w.request_resume("gen-1", reason="test")
    w.run_due()
    kinds = [e[0] for e in events]
    assert kinds[0] == "take_over", kinds[:3]
    assert kinds.index("rebuild") < kinds.index("step")
    assert events[kinds.index("step")] == ("step", 20)  # resumed from the stored step
    assert kinds[-1] == "finish" and kinds.count("take_over") == 1
    assert control.calls[0] == ("take_over", "gen-1", "test")


def test_a_second_request_returns_the_running_resume(
    store: SQLiteStore, models: Path, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    jf = generate_job_file(tmp_path / "device", tiny_models["tiny-decoder.onnx"], tokens=50)
    device_run(store, jf, steps=10, every=10, kv=True)
    clock = FakeClock()
    control = StoreControl(store)
    w = make_worker(store, control, models, clock=clock)
    first = w.request_resume("gen-1")
    clock.t += 5
    second = w.request_resume("gen-1", reason="api-again")
    assert second == first  # same resume: same request time, same attempt
    w.run_due()
    assert [c[0] for c in control.calls].count("take_over") == 1
    done = w.request_resume("gen-1")
    assert done.phase == "completed" and done.requested_at == first.requested_at
    assert w.run_due() == 0
    # a worker that did not run it sees the store's completed job and runs nothing
    other = make_worker(store, control, models)
    again = other.request_resume("gen-1")
    assert again.phase == "completed" and other.run_due() == 0
    assert [c[0] for c in control.calls].count("take_over") == 1


def test_a_model_with_another_hash_is_refused_before_anything_runs(
    store: SQLiteStore,
    models: Path,
    tiny_models: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    jf = generate_job_file(tmp_path / "device", tiny_models["tiny-decoder.onnx"], tokens=50)
    device_run(store, jf, steps=10, every=10, kv=True)
    (models / "tiny-decoder.onnx").write_bytes(tiny_models["tiny-gru.onnx"].read_bytes())
    steps: list[int] = []
    monkeypatch.setattr(GenerateJob, "run_step", lambda self: steps.append(self.step))
    control = StoreControl(store)
    w = make_worker(store, control, models)
    w.request_resume("gen-1")
    w.run_due()
    st = w.status("gen-1")
    assert st is not None and st.phase == "failed" and st.attempt == 1
    assert st.error is not None and st.error.startswith("ModelMismatch")
    assert steps == [] and control.calls == []  # refused before the claim: no step, no fence
    rec = store.get_job("gen-1")  # the job stays its device's, untouched
    assert rec is not None and (rec.status, rec.owner, rec.epoch) == ("offline", "edge", 1)
    assert store.get_outputs("gen-1") == {}


def test_a_missing_model_file_is_a_clear_error(
    store: SQLiteStore, models: Path, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    jf = generate_job_file(tmp_path / "device", tiny_models["tiny-decoder.onnx"], tokens=20)
    device_run(store, jf, steps=5, every=5, kv=True)
    (models / "tiny-decoder.onnx").unlink()
    w = make_worker(store, StoreControl(store), models, policy=ResumePolicy(max_attempts=1))
    w.request_resume("gen-1")
    w.run_due()
    st = w.status("gen-1")
    assert st is not None and st.phase == "failed"
    assert "model 'tiny-decoder.onnx' is not in" in (st.error or "")


def test_retries_back_off_with_full_jitter_then_fail(
    store: SQLiteStore, models: Path, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    jf = generate_job_file(tmp_path / "device", tiny_models["tiny-decoder.onnx"], tokens=30)
    device_run(store, jf, steps=5, every=5, kv=True)
    clock = FakeClock()
    policy = ResumePolicy(max_attempts=4, backoff_base=10.0, backoff_max=25.0)
    control = StoreControl(store, fail_take_over=100)
    w = make_worker(store, control, models, policy=policy, clock=clock, rng=random.Random(3))
    w.request_resume("gen-1")
    expect = random.Random(3)
    for attempt in range(1, 5):
        assert w.run_due() == 1
        st = w.status("gen-1")
        assert st is not None and st.attempt == attempt
        assert st.error is not None and "TransportTimeout" in st.error
        if attempt == 4:
            assert st.phase == "failed"
            break
        assert st.phase == "queued"
        cap = min(25.0, 10.0 * 2 ** (attempt - 1))
        delay = w._resumes["gen-1"].due - clock.t
        assert delay == pytest.approx(expect.uniform(0.0, cap)) and 0 <= delay <= cap
        assert w.run_due() == 0  # not due yet
        clock.t += delay
    assert w.run_due() == 0  # failed: no more attempts
    assert [c[0] for c in control.calls] == ["take_over"] * 4
    rec = store.get_job("gen-1")  # no claim ever succeeded: still the device's
    assert rec is not None and rec.status == "offline" and rec.owner == "edge"


def test_a_retry_succeeds_after_injected_failures(
    store: SQLiteStore, models: Path, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    jf = generate_job_file(tmp_path / "device", tiny_models["tiny-decoder.onnx"], tokens=40)
    device_run(store, jf, steps=15, every=5, kv=False)
    clock = FakeClock()
    control = StoreControl(store, fail_take_over=2)
    w = make_worker(
        store, control, models, clock=clock, policy=ResumePolicy(backoff_base=1.0, max_attempts=3)
    )
    w.request_resume("gen-1")
    for _ in range(3):
        clock.t += 10.0
        w.run_due()
    st = w.status("gen-1")
    assert st is not None and st.phase == "completed" and st.attempt == 3
    assert_outputs_equal(stored_outputs(store, "gen-1"), uninterrupted(jf))


def test_every_attempt_claims_a_new_epoch(
    store: SQLiteStore,
    models: Path,
    tiny_models: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An attempt that dies mid-run (here: onnxruntime fails once) is fenced by the next
    one, which resumes from the server's newest snapshot; outputs stay exactly-once."""
    jf = generate_job_file(tmp_path / "device", tiny_models["tiny-decoder.onnx"], tokens=260)
    device_run(store, jf, steps=30, every=30, kv=True)
    real = GenerateJob.run_step
    boom = {"at": 170}

    def step(self: GenerateJob) -> None:
        if self.step == boom["at"]:
            boom["at"] = -1
            from edge_agent.errors import JobError

            raise JobError("injected: onnxruntime failed")
        real(self)

    monkeypatch.setattr(GenerateJob, "run_step", step)
    clock = FakeClock()
    control = StoreControl(store)
    w = make_worker(store, control, models, clock=clock, policy=ResumePolicy(
        snapshot_every_steps=50, progress_every_steps=10, backoff_base=1.0))  # fmt: skip
    w.request_resume("gen-1")
    w.run_due()
    st = w.status("gen-1")
    assert st is not None and st.phase == "queued" and "injected" in (st.error or "")
    snaps = store.snapshots("gen-1")
    assert snaps[-1].epoch == 2 and store.load_state("gen-1").state["step"] == 130
    assert store.get_job("gen-1").step == 170  # type: ignore[union-attr]  # progress
    clock.t += 5
    w.run_due()
    st = w.status("gen-1")
    assert st is not None and st.phase == "completed" and st.epoch == 3
    assert_outputs_equal(stored_outputs(store, "gen-1"), uninterrupted(jf))


def test_poll_auto_per_job_and_server_wide(
    store: SQLiteStore, models: Path, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    dev = tmp_path / "device"
    model = tiny_models["tiny-decoder.onnx"]
    extra = "\n[server]\nauto_resume_after = 30\n"
    a = generate_job_file(dev, model, job_id="a", tokens=10, extra=extra)
    b = generate_job_file(dev, model, job_id="b", tokens=10)
    for jf in (a, b):
        device_run(store, jf, steps=2, every=2, kv=True)
    control = StoreControl(store)
    w = make_worker(store, control, models, policy=ResumePolicy(auto_resume_after=120))
    offline = {"a": 1000.0, "b": 1000.0}
    assert w.poll_auto(1029.0, offline) == []
    started = w.poll_auto(1030.0, offline)
    assert [s.job_id for s in started] == ["a"]
    assert w.poll_auto(1100.0, offline) == []  # a is under way, b not due
    assert [s.job_id for s in w.poll_auto(1120.0, offline)] == ["b"]
    w.run_due()
    assert {w.status(j).phase for j in "ab"} == {"completed"}  # type: ignore[union-attr]
    assert w.poll_auto(5000.0, offline) == []  # completed jobs are not resumed again
    off = make_worker(store, control, models)  # no server-wide setting
    assert off.auto_resume_after(store.get_job("b")) is None  # type: ignore[arg-type]
    assert off.auto_resume_after(store.get_job("a")) == 30.0  # type: ignore[arg-type]


def test_live_hand_over_recomputes_nothing(
    store: SQLiteStore,
    models: Path,
    tiny_models: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    jf = generate_job_file(tmp_path / "device", tiny_models["tiny-decoder.onnx"], tokens=150)
    device_run(store, jf, steps=40, every=20, kv=False, offline=False)  # online, cache kept
    control = StoreControl(store)
    w = make_worker(store, control, models)
    st = w.request_handover("gen-1")
    assert st.phase == "handover-requested" and control.calls == [("request_handover", "gen-1")]
    assert w.request_handover("gen-1") == st  # idempotent
    assert w.run_due() == 0  # waits for the device's release
    # the agent finishes its step and sends its final snapshot with everything (the KV
    # cache too); the ingest acks it, gets the RELEASE, takes the job over, tells the worker
    from edge_agent import codec
    from edge_agent.jobs import load_job
    from edge_agent.state import state_nbytes

    dev = load_job(jf)
    dev.run(41)
    full = dev.state()
    prev = store.load_state("gen-1")
    payload = codec.encode_delta(prev.state, full)
    store.commit_snapshot(
        "gw-1", "gen-1", prev.seq + 1, prev.seq, 1, payload,
        codec.read_header(payload).state_hash, state_nbytes(full), step=41,
    )  # fmt: skip
    rec = store.get_job("gen-1")
    assert rec is not None
    new = store.raise_epoch("gen-1", rec.epoch, "server", status="resuming", detail="release")
    rebuilt: list[int] = []
    monkeypatch.setattr(GenerateJob, "_rebuild_kv", lambda *a, **k: rebuilt.append(1))
    w.on_handed_over("gen-1", new.epoch)
    w.run_due()
    st = w.status("gen-1")
    assert st is not None and st.phase == "completed" and st.epoch == 2
    assert rebuilt == []
    assert st.start_step == 41 and st.rebuilt == ()  # from the released step, nothing rebuilt
    assert [c[0] for c in control.calls] == ["request_handover", "finish"]  # no take_over
    assert_outputs_equal(stored_outputs(store, "gen-1"), uninterrupted(jf))


def test_threads_recover_a_server_owned_job(
    store: SQLiteStore, models: Path, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """A job the server owned when its worker went away is picked up by start()."""
    jf = generate_job_file(tmp_path / "device", tiny_models["tiny-decoder.onnx"], tokens=120)
    device_run(store, jf, steps=30, every=30, kv=True)
    rec = store.get_job("gen-1")
    assert rec is not None
    store.raise_epoch("gen-1", rec.epoch, "server", status="server-running")  # a lost worker
    control = StoreControl(store)
    w = make_worker(store, control, models, workers=2)
    w.start()
    try:
        st = w.wait("gen-1", timeout=120)
    finally:
        w.stop()
    assert st is not None and st.phase == "completed", st
    assert control.calls[0] == ("take_over", "gen-1", "recover") and st.epoch == 3
    assert_outputs_equal(stored_outputs(store, "gen-1"), uninterrupted(jf))


def test_policy_is_validated() -> None:
    for bad in (
        {"max_attempts": 0},
        {"backoff_base": 5.0, "backoff_max": 1.0},
        {"rebuild": "fast"},
        {"io_binding": "maybe"},
        {"snapshot_every_steps": 0},
        {"snapshot_every_seconds": 0.0},
        {"auto_resume_after": -1.0},
        {"progress_every_steps": 0},
    ):
        with pytest.raises(ResumeError):
            ResumePolicy(**bad)
    p = ResumePolicy(backoff_base=2.0, backoff_max=100.0)
    rng = random.Random(0)
    assert all(0 <= p.backoff(n, rng) <= min(100.0, 2.0 * 2 ** (n - 1)) for n in range(1, 20))


def test_status_is_a_frozen_value(store: SQLiteStore, models: Path) -> None:
    st = ResumeStatus("j", "queued", 0, None, 1.0, None, None, None)
    with pytest.raises(AttributeError):
        st.phase = "failed"  # type: ignore[misc]


def test_an_output_conflict_fails_the_resume_once_claimed(
    store: SQLiteStore, models: Path, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """Outputs are exactly-once: a position already stored with other bytes is never
    overwritten; the resume fails at once (a retry would conflict again)."""
    jf = generate_job_file(tmp_path / "device", tiny_models["tiny-decoder.onnx"], tokens=60)
    device_run(store, jf, steps=20, every=20, kv=True)
    want = uninterrupted(jf)["tokens"]
    store.put_outputs("gen-1", 5, {"tokens": (want[5:6] + 1) % 256})
    control = StoreControl(store)
    w = make_worker(store, control, models)
    w.request_resume("gen-1")
    w.run_due()
    st = w.status("gen-1")
    assert st is not None and st.phase == "failed" and st.attempt == 1
    assert (st.error or "").startswith("OutputConflict")
    rec = store.get_job("gen-1")
    assert rec is not None and (rec.status, rec.owner) == ("failed", "server")
    assert store.get_outputs("gen-1", 5, 6)["tokens"][0] == (want[5] + 1) % 256
    assert [c[0] for c in control.calls] == ["take_over"]


def test_started_worker_applies_the_auto_resume_policy_itself(
    store: SQLiteStore, models: Path, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    extra = "\n[server]\nauto_resume_after = 0\n"
    jf = generate_job_file(
        tmp_path / "device", tiny_models["tiny-decoder.onnx"], tokens=40, extra=extra
    )
    device_run(store, jf, steps=10, every=10, kv=True)  # and the device went offline
    control = StoreControl(store)
    w = make_worker(store, control, models, auto_poll_s=0.05)
    assert w.offline_jobs().keys() == {"gen-1"}
    w.start()
    try:
        deadline = time.monotonic() + 120
        while (st := w.status("gen-1")) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        st = w.wait("gen-1", timeout=120)
    finally:
        w.close()
    assert st is not None and st.phase == "completed"
    assert control.calls[0] == ("take_over", "gen-1", "auto")
    assert w.offline_jobs() == {}


def test_create_worker_from_the_servers_config(store: SQLiteStore, models: Path) -> None:
    def ctx(**worker: Any) -> Any:
        cfg = SimpleNamespace(
            models_dir=str(models), data_dir=None, auto_resume_s=60.0, max_attempts=2,
            retry_initial_s=1.5, retry_max_s=9.0, device="cpu", options={},
        )  # fmt: skip
        for k, v in worker.items():
            setattr(cfg, k, v)
        return SimpleNamespace(
            config=SimpleNamespace(worker=cfg), store=store, control=StoreControl(store),
            liveness=None, clock=FakeClock(),
        )  # fmt: skip

    w = create_worker(ctx(options={"rebuild": "prefill", "workers": 2, "auto_poll_s": None}))
    p = w.policy
    assert (p.auto_resume_after, p.max_attempts, p.backoff_base, p.backoff_max) == (
        60.0, 2, 1.5, 9.0,
    )  # fmt: skip
    assert p.rebuild == "prefill" and w.workers == 2 and w.auto_poll_s is None
    assert w.device.type == "cpu" and w.data_dir == models
    with pytest.raises(ResumeError, match="unknown"):
        create_worker(ctx(options={"colour": "blue"}))
    with pytest.raises(ResumeError, match="models_dir"):
        create_worker(ctx(models_dir=None))
    w.start()
    w.close()  # what serve calls
