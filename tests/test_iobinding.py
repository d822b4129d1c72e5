"""server.iobinding on the CPU (CPU tensors, CPU provider): the bound loop makes the same
model calls as the job's own, so it is bit-identical to it on this machine; the same code
binds CUDA tensors on a GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edge_agent.errors import JobError
from edge_agent.jobs import load_job
from edge_agent.jobs.generate import GenerateJob
from server.iobinding import BoundGenerate, can_bind
from tests.support.device_jobs import batch_job_file, generate_job_file

CPU = torch.device("cpu")


@pytest.fixture
def job_file(tiny_models: dict[str, Path], tmp_path: Path) -> Path:
    return generate_job_file(tmp_path, tiny_models["tiny-decoder.onnx"], tokens=120)


def reference(job_file: Path, at: int) -> tuple[dict, GenerateJob]:  # type: ignore[type-arg]
    job = load_job(job_file)
    assert isinstance(job, GenerateJob)
    job.run(at)
    st = job.state()
    job.run()
    return st, job


def assert_same(a: dict, b: dict) -> None:  # type: ignore[type-arg]
    assert set(a) == set(b)
    for k in b:
        assert np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes(), k


@pytest.mark.parametrize("at", [0, 1, 45])
def test_bound_loop_with_the_cache_given_is_bit_identical(job_file: Path, at: int) -> None:
    st, ref = reference(job_file, at)
    job = load_job(job_file)
    assert isinstance(job, GenerateJob) and can_bind(job)
    kv = [torch.from_numpy(st[k]) for k in job.kv_inputs]
    b = BoundGenerate(job, st, kv=kv, device=CPU)
    assert b.step == at and b.total_steps == 120 and not b.done
    while not b.done:
        b.run_step()
    assert_same(b.outputs(), ref.outputs())
    assert_same(b.state(), ref.state())
    with pytest.raises(JobError, match="done"):
        b.run_step()


def test_bound_rebuild_by_replay_is_bit_identical(job_file: Path) -> None:
    st, ref = reference(job_file, 60)
    light = {k: v for k, v in st.items() if not k.startswith("past_key_values")}
    job = load_job(job_file)
    assert isinstance(job, GenerateJob)
    b = BoundGenerate(job, light, kv=None, device=CPU, rebuild="replay")
    assert_same({k: t.numpy() for k, t in zip(job.kv_inputs, b.kv(), strict=True)},
                {k: st[k] for k in job.kv_inputs})  # fmt: skip
    while not b.done:
        b.run_step()
    assert_same(b.state(), ref.state())


def test_bound_rebuild_by_prefill_gives_a_cache_of_the_right_shape(job_file: Path) -> None:
    st, _ = reference(job_file, 30)
    job = load_job(job_file)
    assert isinstance(job, GenerateJob)
    b = BoundGenerate(job, st, kv=None, device=CPU, rebuild="prefill")
    for k, t in zip(job.kv_inputs, b.kv(), strict=True):
        assert tuple(t.shape) == st[k].shape
        assert np.allclose(t.numpy(), st[k], atol=1e-4)  # other shapes, other last bits
    b.run_step()
    assert b.step == 31


def test_bad_states_and_caches_are_refused(job_file: Path, tiny_models: dict[str, Path]) -> None:
    st, _ = reference(job_file, 10)
    job = load_job(job_file)
    assert isinstance(job, GenerateJob)
    kv = [torch.from_numpy(st[k]) for k in job.kv_inputs]
    with pytest.raises(JobError, match="KV tensor"):
        BoundGenerate(job, st, kv=[t[:, :, :-1] for t in kv], device=CPU)
    with pytest.raises(JobError, match="KV tensors for"):
        BoundGenerate(job, st, kv=kv[:1], device=CPU)
    with pytest.raises(JobError, match="step"):
        BoundGenerate(job, {**st, "step": 999}, kv=None, device=CPU)
    with pytest.raises(JobError, match="missing"):
        BoundGenerate(job, {"step": 1}, kv=None, device=CPU)
    with pytest.raises(JobError, match="rebuild mode"):
        BoundGenerate(job, st, kv=None, device=CPU, rebuild="fast")
    bad = st["tokens"].copy()
    bad[0] += 1
    with pytest.raises(JobError, match="prompt"):
        BoundGenerate(job, {**st, "tokens": bad}, kv=None, device=CPU)
    batch = load_job(batch_job_file(
        job_file.parent, tiny_models["tiny-gru.onnx"], tiny_models["sensors.npy"]))  # fmt: skip
    assert not can_bind(batch)
    with pytest.raises(JobError, match="IOBinding"):
        BoundGenerate(batch, {}, kv=None, device=CPU)  # type: ignore[arg-type]
