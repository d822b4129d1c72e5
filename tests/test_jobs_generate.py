"""The generate job on the real tiny decoder: interrupt / restore gives identical tokens."""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from edge_agent import models
from edge_agent.errors import JobError, JobSpecError, ModelMismatch
from edge_agent.jobs import JobSpec, file_sha256, load_job
from edge_agent.jobs.generate import GenerateJob, pack_rng, sample_token, unpack_rng
from edge_agent.state import state_hash, validate_state


def make_spec(tiny_models: dict[str, Path], **params: Any) -> JobSpec:
    p: dict[str, Any] = {"prompt": "Once upon a time", "max_new_tokens": 40}
    p.update(params)
    p = {k: v for k, v in p.items() if v is not None}
    return JobSpec.from_dict(
        {
            "job": {"id": "gen-1", "kind": "generate", "model": str(tiny_models[models.DECODER])},
            "params": p,
        }
    )


def make_job(tiny_models: dict[str, Path], **params: Any) -> GenerateJob:
    return GenerateJob(make_spec(tiny_models, **params))


def through_the_wire(state: Mapping[str, Any]) -> dict[str, Any]:
    """What a state looks like after a trip through a codec: read-only copies."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, np.ndarray):
            arr = np.frombuffer(v.tobytes(), dtype=v.dtype).reshape(v.shape)
            assert not arr.flags.writeable
            out[k] = arr
        else:
            out[k] = v
    return out


SAMPLED = {"temperature": 0.9, "top_k": 50, "top_p": 0.95, "seed": 1234}


@pytest.mark.parametrize("sampling", [{}, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("keep_kv", [True, False], ids=["with-kv", "kv-rebuilt"])
def test_interrupted_run_gives_identical_tokens_and_state(
    tiny_models: dict[str, Path], sampling: dict[str, Any], keep_kv: bool
) -> None:
    ref = make_job(tiny_models, **sampling)
    ref_states = {}
    while not ref.done:
        ref.run_step()
        ref_states[ref.step] = ref.state()
    assert ref.step == ref.total_steps == 40
    ref_tokens = ref.outputs()["tokens"]
    assert ref_tokens.shape == (40,) and ref_tokens.dtype == np.int64

    for k in (0, 1, 2, 17, 39):
        job = make_job(tiny_models, **sampling)
        job.run(max_steps=k)
        st = through_the_wire(job.state())
        if not keep_kv:
            st = {key: v for key, v in st.items() if key not in job.derivable}
        fresh = make_job(tiny_models, **sampling)
        fresh.restore(st)
        assert fresh.step == k
        full = fresh.state()
        if k:
            assert state_hash(full) == state_hash(ref_states[k])  # the rebuilt cache is exact
        fresh.run()
        np.testing.assert_array_equal(fresh.outputs()["tokens"], ref_tokens)
        assert state_hash(fresh.state()) == state_hash(ref_states[40])


def test_sampling_differs_from_greedy_and_depends_on_the_seed(tiny_models: dict[str, Path]) -> None:
    runs = {}
    for name, params in {"greedy": {}, "a": SAMPLED, "b": {**SAMPLED, "seed": 99}}.items():
        job = make_job(tiny_models, **params)
        job.run()
        runs[name] = job.outputs()["tokens"]
    assert not np.array_equal(runs["greedy"], runs["a"])
    assert not np.array_equal(runs["a"], runs["b"])


def test_state_layout(tiny_models: dict[str, Path]) -> None:
    job = make_job(tiny_models)
    st0 = job.state()
    validate_state(st0)
    assert job.derivable == {
        f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")
    }
    assert st0["past_key_values.0.key"].shape == (1, 4, 0, 16)
    job.run(max_steps=5)
    st = job.state()
    validate_state(st)
    plen = len(b"Once upon a time")
    assert st["prompt_len"] == plen and st["step"] == 5
    assert st["tokens"].shape == (plen + 5,)
    assert st["past_key_values.1.value"].shape == (1, 4, plen + 4, 16)
    assert isinstance(st["rng"], bytes) and len(st["rng"]) == 37
    # outputs are keyed by position: token i came from step i + 1
    np.testing.assert_array_equal(job.outputs()["tokens"], st["tokens"][plen:])
    before = st["tokens"].copy()
    job.run_step()
    np.testing.assert_array_equal(st["tokens"], before)  # handed-out arrays never change


def test_a_long_run_survives_a_kv_less_restore(tiny_models: dict[str, Path]) -> None:
    params = {"max_new_tokens": 1200, **SAMPLED}
    ref = make_job(tiny_models, **params)
    ref.run()
    job = make_job(tiny_models, **params)
    job.run(max_steps=700)
    st = {k: v for k, v in job.state().items() if k not in job.derivable}
    resumed = make_job(tiny_models, **params)
    resumed.restore(st)
    resumed.run()
    assert resumed.step == 1200
    np.testing.assert_array_equal(resumed.outputs()["tokens"], ref.outputs()["tokens"])
    assert len(set(ref.outputs()["tokens"].tolist())) > 20


def test_prefill_rebuild_is_close_to_the_replayed_cache(tiny_models: dict[str, Path]) -> None:
    job = make_job(tiny_models)
    job.run(max_steps=25)
    full = job.state()
    light = {k: v for k, v in full.items() if k not in job.derivable}
    other = make_job(tiny_models)
    replayed = other.rebuild(light)
    prefilled = other.rebuild(light, mode="prefill")
    assert other.step == 0  # rebuild() does not move the job
    for key in job.derivable:
        np.testing.assert_array_equal(replayed[key], full[key])
        np.testing.assert_allclose(prefilled[key], full[key], rtol=0, atol=1e-4)
    other.restore(light, rebuild="prefill")
    assert other.step == 25
    with pytest.raises(JobError, match="rebuild mode"):
        other.rebuild(light, mode="fast")


def test_eos_ends_the_job_early(tiny_models: dict[str, Path]) -> None:
    probe = make_job(tiny_models)
    probe.run()
    tokens = probe.outputs()["tokens"].tolist()
    eos = next(t for t in tokens[3:] if t not in tokens[:3])
    stop_at = tokens.index(eos) + 1
    job = make_job(tiny_models, eos_token_id=eos)
    job.run()
    assert job.done and job.step == job.total_steps == stop_at
    with pytest.raises(JobError, match="is done"):
        job.run_step()
    part = make_job(tiny_models, eos_token_id=eos)
    part.run(max_steps=stop_at - 1)
    again = make_job(tiny_models, eos_token_id=eos)
    again.restore(part.state())
    assert not again.done
    again.run()
    np.testing.assert_array_equal(again.outputs()["tokens"], job.outputs()["tokens"])
    restored_done = make_job(tiny_models, eos_token_id=eos)
    restored_done.restore(job.state())
    assert restored_done.done and restored_done.total_steps == stop_at


def test_prompt_ids_and_text(tiny_models: dict[str, Path]) -> None:
    by_text = make_job(tiny_models, prompt="hi there", max_new_tokens=8)
    by_ids = make_job(tiny_models, prompt=None, prompt_ids=list(b"hi there"), max_new_tokens=8)
    by_text.run()
    by_ids.run()
    np.testing.assert_array_equal(by_text.outputs()["tokens"], by_ids.outputs()["tokens"])
    assert isinstance(by_text.text(), str) and by_text.text()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"max_new_tokens": None}, "max_new_tokens is missing"),
        ({"max_new_tokens": 0}, "max_new_tokens must be"),
        ({"max_new_tokens": True}, "max_new_tokens must be"),
        ({"prompt_ids": [1, 2]}, "exactly one of prompt"),
        ({"prompt": None}, "exactly one of prompt"),
        ({"prompt": ""}, "non-empty string"),
        ({"prompt": None, "prompt_ids": [1, -2]}, "prompt_ids must be"),
        ({"prompt": None, "prompt_ids": [1, 300]}, "outside the model's vocabulary"),
        ({"temperature": -1.0}, "temperature must be"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"top_p": 0.0}, "top_p must be"),
        ({"top_k": -1}, "top_k must be"),
        ({"seed": -5}, "seed must be"),
        ({"eos_token_id": 256}, "eos_token_id 256 is outside"),
        ({"max_new_tokens": 4096}, "needs 4111 positions"),
        ({"beam_width": 4}, "'beam_width' is not a generate parameter"),
    ],
)
def test_bad_params_are_refused(
    tiny_models: dict[str, Path], params: dict[str, Any], message: str
) -> None:
    spec_params = {"prompt": "Once upon a time", "max_new_tokens": 40, **params}
    spec = JobSpec.from_dict(
        {
            "job": {"id": "g", "kind": "generate", "model": str(tiny_models[models.DECODER])},
            "params": {k: v for k, v in spec_params.items() if v is not None},
        }
    )
    with pytest.raises(JobSpecError, match=message):
        GenerateJob(spec)


def test_positions_limit_is_exact(tiny_models: dict[str, Path]) -> None:
    # prompt 16 + 4081 new = 4097 tokens, of which the model sees 4096: allowed
    job = make_job(tiny_models, max_new_tokens=4096 - 16 + 1)
    assert job.total_steps == 4081


def test_model_hash_is_pinned_and_verified(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    job = make_job(tiny_models)
    digest = file_sha256(tiny_models[models.DECODER])
    assert job.model_hash == digest
    assert job.spec.to_dict()["job"]["model_hash"] == digest  # what the BIRTH carries
    born = JobSpec.from_dict(job.spec.to_dict())
    assert GenerateJob(born).model_hash == digest
    wrong = born.replace(model_hash="0" * 64)
    with pytest.raises(ModelMismatch, match="was born with 0000"):
        GenerateJob(wrong)
    with pytest.raises(JobSpecError, match="is not a file"):
        GenerateJob(born.replace(model=str(tmp_path / "nope.onnx")))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(JobError, match="onnxruntime cannot load"):
        GenerateJob(born.replace(model=str(junk), model_hash=None))
    gru = born.replace(model=str(tiny_models[models.GRU]), model_hash=None)
    with pytest.raises(JobSpecError, match="not one a generate job can feed"):
        GenerateJob(gru)


def test_providers_select_cuda_only_when_it_exists(tiny_models: dict[str, Path]) -> None:
    spec = make_spec(tiny_models)
    cpu = GenerateJob(spec, providers=["cpu"])
    assert cpu.model.providers == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():  # pragma: no cover - GPU only
        job = GenerateJob(spec, providers=["cuda"])
        assert job.model.providers[0] == "CUDAExecutionProvider"
    else:
        with pytest.raises(JobError, match="CUDAExecutionProvider is not available"):
            GenerateJob(spec, providers=["cuda"])


def _mutation(state: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """An invalid variant of a valid state (every branch breaks something)."""
    st = dict(state)
    choice = rng.randrange(7)
    if choice == 0:
        del st[rng.choice(["tokens", "step", "prompt_len", "rng"])]
    elif choice == 1:
        st[rng.choice([*sorted(st), "extra"])] = rng.choice(["junk", None, 3, [1]])
    elif choice == 2:
        st["step"] = rng.choice([-1, 10**6, st["step"] + 1, st["step"] - 1, True, 2.0])
    elif choice == 3:
        t = st["tokens"].copy()
        t[rng.randrange(t.size)] = rng.choice([-1, 256, 10**9])
        st["tokens"] = rng.choice([t, t.astype(np.int32), t.reshape(1, -1)])
    elif choice == 4:
        st["rng"] = bytes(rng.randrange(256) for _ in range(rng.choice([0, 5, 36, 38])))
    elif choice == 5:
        k = rng.choice(sorted(k for k in st if k.startswith("past_key_values.")))
        st[k] = rng.choice([st[k][:, :, :-1], st[k].astype(np.float64), st[k][0]])
    else:
        st["prompt_len"] = st["prompt_len"] + rng.choice([-1, 1])
    return st


def test_bad_states_are_refused_and_change_nothing(tiny_models: dict[str, Path]) -> None:
    ref = make_job(tiny_models, **SAMPLED)
    ref.run()
    src = make_job(tiny_models, **SAMPLED)
    src.run(max_steps=12)
    good = src.state()
    job = make_job(tiny_models, **SAMPLED)
    job.run(max_steps=6)
    before = state_hash(job.state())
    rng = random.Random(7)
    for _ in range(150):
        with pytest.raises(JobError):
            job.restore(_mutation(good, rng))
        assert state_hash(job.state()) == before
    with pytest.raises(JobError, match="a mapping"):
        job.restore([1, 2])  # type: ignore[arg-type]
    job.restore(good)
    job.run()
    np.testing.assert_array_equal(job.outputs()["tokens"], ref.outputs()["tokens"])


def test_sampler_and_rng_helpers() -> None:
    bits = np.random.PCG64(5)
    bits.random_raw(3)
    raw = pack_rng(bits)
    copy = unpack_rng(raw)
    assert copy.random_raw(4).tolist() == bits.random_raw(4).tolist()
    for bad in (b"", raw[:-1], b"\x00" * 37, "text"):
        with pytest.raises(JobError):
            unpack_rng(bad)
    logits = np.array([1.0, 5.0, 5.0, -2.0], np.float32)
    assert sample_token(logits, bits) == 1  # greedy: lowest id on a tie
    assert sample_token(logits, bits, temperature=1.0, top_k=1) == 1
    picks = {sample_token(logits, bits, temperature=1.0) for _ in range(200)}
    assert {1, 2} <= picks
    assert {sample_token(logits, bits, temperature=1.0, top_p=0.3) for _ in range(50)} == {1}
    with pytest.raises(JobError, match="non-finite"):
        sample_token(np.array([np.nan, 1.0], np.float32), bits)


def test_job_file_with_relative_model_path(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "jobs").mkdir()
    model = tmp_path / "models" / models.DECODER
    model.parent.mkdir()
    model.write_bytes(tiny_models[models.DECODER].read_bytes())
    job_file = tmp_path / "jobs" / "g.toml"
    job_file.write_text(
        '[job]\nid = "g1"\nkind = "generate"\nmodel = "../models/tiny-decoder.onnx"\n'
        '[params]\nprompt = "x"\nmax_new_tokens = 3\n'
    )
    job = load_job(job_file)
    assert isinstance(job, GenerateJob)
    job.run()
    assert job.outputs()["tokens"].shape == (3,)


def test_example_job_files_run(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """examples/*.toml, with the models built where they expect them (../models/)."""
    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "examples").mkdir()
    (tmp_path / "models").mkdir()
    for path in tiny_models.values():
        (tmp_path / "models" / path.name).write_bytes(path.read_bytes())
    for name, kind in (("generate.toml", "generate"), ("batch.toml", "batch")):
        copy = tmp_path / "examples" / name
        copy.write_text((repo / "examples" / name).read_text())
        job = load_job(copy)
        assert job.kind == kind
        job.run(max_steps=5)
        assert job.step == 5
        validate_state(job.state())
