"""The batch job on real ORT sessions: stateful (GRU) and stateless, interrupted and resumed."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_agent import models
from edge_agent.errors import DatasetMismatch, JobError, JobSpecError
from edge_agent.jobs import JobSpec, file_sha256
from edge_agent.jobs.batch import BatchJob, pair_by_convention
from edge_agent.state import state_hash, validate_state

F = models.GRU_FEATURES


def mlp_model(path: Path, *, outputs: tuple[str, ...] = ("y",), extra_input: bool = False) -> Path:
    """A stateless model: y = tanh(x @ W) (x [batch, 8], y [batch, 3]); optionally more."""
    w = np.random.default_rng(3).standard_normal((F, 3)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Tanh", ["xw"], [outputs[0]]),
    ]
    for extra in outputs[1:]:
        nodes.append(helper.make_node("Identity", ["xw"], [extra]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", F])]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", F]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        inputs,
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["batch", 3]) for o in outputs],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def make_spec(model: Path, dataset: Path, **params: Any) -> JobSpec:
    p = {"dataset": str(dataset), "batch_size": 7, **params}
    return JobSpec.from_dict(
        {
            "job": {"id": "b-1", "kind": "batch", "model": str(model)},
            "params": {k: v for k, v in p.items() if v is not None},
        }
    )


@pytest.fixture
def series(tmp_path: Path) -> Path:
    path = tmp_path / "series.npy"
    np.save(path, np.random.default_rng(0).standard_normal((103, F)).astype(np.float32))
    return path


def interrupted_equals_uninterrupted(spec: JobSpec, cuts: tuple[int, ...]) -> BatchJob:
    ref = BatchJob(spec)
    states = {0: ref.state()}
    while not ref.done:
        ref.run_step()
        states[ref.step] = ref.state()
    for k in cuts:
        job = BatchJob(spec)
        job.run(max_steps=k)
        st = job.state()
        validate_state(st)
        assert state_hash(st) == state_hash(states[k])
        wire = {
            key: (
                np.frombuffer(v.tobytes(), v.dtype).reshape(v.shape)
                if isinstance(v, np.ndarray)
                else v
            )
            for key, v in st.items()
        }
        fresh = BatchJob(spec)
        fresh.restore(wire)
        fresh.run()
        assert state_hash(fresh.state()) == state_hash(states[ref.total_steps])
        np.testing.assert_array_equal(fresh.outputs()["results"], ref.outputs()["results"])
    return ref


def test_stateful_gru_interrupted_run_is_identical(
    tiny_models: dict[str, Path], series: Path
) -> None:
    spec = make_spec(tiny_models[models.GRU], series)
    ref = interrupted_equals_uninterrupted(spec, cuts=(0, 1, 5, 14))
    assert ref.total_steps == 15  # ceil(103 / 7)
    assert ref.state_pairs == {"h": "h_out"}  # paired by name
    results = ref.outputs()["results"]
    assert results.shape == (103, 1) and results.dtype == np.float32
    st = ref.state()
    assert st["cursor"] == 103 and st["recurrent.h"].shape == (1, 1, models.GRU_HIDDEN)

    # the same numbers as a plain loop over the rows carrying h by hand
    sess = ort.InferenceSession(str(tiny_models[models.GRU]), providers=["CPUExecutionProvider"])
    data = np.load(series)
    h = np.zeros((1, 1, models.GRU_HIDDEN), np.float32)
    expected = []
    for r in range(data.shape[0]):
        score, h = sess.run(["score", "h_out"], {"x": data[r : r + 1], "h": h})
        expected.append(score)
    np.testing.assert_allclose(results, np.concatenate(expected), rtol=0, atol=1e-6)
    np.testing.assert_allclose(st["recurrent.h"], h, rtol=0, atol=1e-6)


def test_stateful_items_layout(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """A [time, streams, features] dataset: each item is one batch of 3 streams."""
    path = tmp_path / "streams.npz"
    data = np.random.default_rng(1).standard_normal((40, 3, F)).astype(np.float32)
    np.savez(path, other=np.zeros(2), streams=data)
    spec = make_spec(
        tiny_models[models.GRU], path, array="streams", batch_size=6, state_map={"h": "h_out"}
    )
    ref = interrupted_equals_uninterrupted(spec, cuts=(3,))
    assert ref.mode == "items"
    assert ref.outputs()["results"].shape == (40, 3, 1)
    assert ref.state()["recurrent.h"].shape == (1, 3, models.GRU_HIDDEN)


def test_stateless_rows_in_one_call_per_step(tmp_path: Path, series: Path) -> None:
    model = mlp_model(tmp_path / "mlp.onnx")
    spec = make_spec(model, series, batch_size=10)
    ref = interrupted_equals_uninterrupted(spec, cuts=(2, 10))
    assert not ref.state_pairs and not ref._per_row
    assert ref.state().keys() == {"step", "cursor", "results"}
    w = numpy_helper.to_array(onnx.load(model).graph.initializer[0])
    np.testing.assert_allclose(
        ref.outputs()["results"], np.tanh(np.load(series) @ w), rtol=0, atol=1e-5
    )


def test_outputs_grow_by_position(tiny_models: dict[str, Path], series: Path) -> None:
    job = BatchJob(make_spec(tiny_models[models.GRU], series, batch_size=10))
    assert job.outputs()["results"].shape == (0, 1)
    job.run_step()
    first = job.outputs()["results"]
    assert first.shape == (10, 1)
    job.run(max_steps=3)
    later = job.outputs()["results"]
    assert later.shape == (40, 1)
    np.testing.assert_array_equal(later[:10], first)  # earlier rows never change
    job.run()
    assert job.outputs()["results"].shape == (103, 1) and job.done
    with pytest.raises(JobError, match="is done"):
        job.run_step()


def test_dataset_hash_is_pinned_and_verified(tiny_models: dict[str, Path], series: Path) -> None:
    job = BatchJob(make_spec(tiny_models[models.GRU], series))
    born = job.spec.to_dict()
    assert born["params"]["dataset_hash"] == file_sha256(series)
    assert born["job"]["model_hash"] == file_sha256(tiny_models[models.GRU])
    BatchJob(JobSpec.from_dict(born))  # the server side builds the same job
    np.save(series, np.ones((103, F), np.float32))
    with pytest.raises(DatasetMismatch, match="was born with"):
        BatchJob(JobSpec.from_dict(born))


def test_state_shapes_override(tiny_models: dict[str, Path], series: Path) -> None:
    job = BatchJob(
        make_spec(tiny_models[models.GRU], series, state_shapes={"h": [1, 1, models.GRU_HIDDEN]})
    )
    assert job.state()["recurrent.h"].shape == (1, 1, models.GRU_HIDDEN)
    with pytest.raises(JobSpecError, match="does not fit"):
        BatchJob(make_spec(tiny_models[models.GRU], series, state_shapes={"h": [1, 1, 5]}))
    with pytest.raises(JobSpecError, match="not a state input"):
        BatchJob(make_spec(tiny_models[models.GRU], series, state_shapes={"x": [1, 8]}))


def test_pairing_by_convention() -> None:
    assert pair_by_convention(
        ["x", "h", "past_conv", "past.c", "past_key_values.0.key", "lonely"],
        ["y", "h_out", "present_conv", "present.c", "present.0.key"],
    ) == {
        "h": "h_out",
        "past_conv": "present_conv",
        "past.c": "present.c",
        "past_key_values.0.key": "present.0.key",
    }


@pytest.mark.parametrize(
    ("params", "error", "message"),
    [
        ({"dataset": None}, JobSpecError, "dataset .* is missing"),
        ({"batch_size": 0}, JobSpecError, "batch_size must be"),
        ({"batch_size": "7"}, JobSpecError, "batch_size must be"),
        ({"dataset_hash": "abc"}, JobSpecError, "is not a sha256"),
        ({"dataset_hash": "0" * 64}, DatasetMismatch, "was born with"),
        ({"array": "x"}, JobSpecError, "only for .npz"),
        ({"state_map": {"h": "nope"}}, JobSpecError, "no output 'nope'"),
        ({"state_map": {"q": "h_out"}}, JobSpecError, "no input 'q'"),
        ({"state_map": {"h": 3}}, JobSpecError, "state_map must be"),
        ({"state_map": {}}, JobSpecError, "exactly one data input"),
        ({"input": "h"}, JobSpecError, "paired as state"),
        ({"input": "nope"}, JobSpecError, "no input 'nope'"),
        ({"output": "h_out"}, JobSpecError, "not a non-state output"),
        ({"workers": 2}, JobSpecError, "'workers' is not a batch parameter"),
        ({"state_shapes": {"h": [1, -1, 32]}}, JobSpecError, "state_shapes must be"),
    ],
)
def test_bad_params_are_refused(
    tiny_models: dict[str, Path],
    series: Path,
    params: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    spec = make_spec(tiny_models[models.GRU], series)
    p = {**spec.params, **params}
    with pytest.raises(error, match=message):
        BatchJob(spec.replace(params={k: v for k, v in p.items() if v is not None}))


def test_bad_datasets_are_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    gru = tiny_models[models.GRU]
    cases: list[tuple[str, Any, dict[str, Any], str]] = [
        ("d.npy", np.zeros((5, F), np.float64), {}, "takes float32"),
        ("d.npy", np.zeros((5, F + 1), np.float32), {}, "expects"),
        ("d.npy", np.zeros((5,), np.float32), {}, "does not fit"),
        ("d.npy", np.float32(1.0), {}, "at least one axis"),
        ("d.npz", {"a": np.zeros((5, F), np.float32), "b": np.zeros(1)}, {}, "holds 2 arrays"),
        ("d.npz", {"a": np.zeros((5, F), np.float32)}, {"array": "b"}, "has no array 'b'"),
        ("d.csv", None, {}, "not a .npy or .npz"),
    ]
    for name, content, params, message in cases:
        path = tmp_path / name
        if isinstance(content, dict):
            np.savez(path, **content)
        elif content is None:
            path.write_text("1,2,3\n")
        else:
            np.save(path, content)
        with pytest.raises(JobSpecError, match=message):
            BatchJob(make_spec(gru, path, **params))
    corrupt = tmp_path / "corrupt.npy"
    corrupt.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(JobError, match="cannot read the dataset"):
        BatchJob(make_spec(gru, corrupt))
    pickled = tmp_path / "obj.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(JobError, match="cannot read the dataset"):
        BatchJob(make_spec(gru, pickled))
    with pytest.raises(JobSpecError, match="is not a file"):
        BatchJob(make_spec(gru, tmp_path / "missing.npy"))


def test_model_shape_problems(tmp_path: Path, series: Path) -> None:
    two_out = mlp_model(tmp_path / "two.onnx", outputs=("y", "logit"))
    with pytest.raises(JobSpecError, match="2 non-state outputs"):
        BatchJob(make_spec(two_out, series))
    job = BatchJob(make_spec(two_out, series, output="logit"))
    job.run_step()
    assert job.outputs()["results"].shape == (7, 3)
    two_in = mlp_model(tmp_path / "in2.onnx", extra_input=True)
    with pytest.raises(JobSpecError, match="exactly one data input"):
        BatchJob(make_spec(two_in, series))


def test_bad_states_are_refused_and_change_nothing(
    tiny_models: dict[str, Path], series: Path
) -> None:
    spec = make_spec(tiny_models[models.GRU], series)
    src = BatchJob(spec)
    src.run(max_steps=4)
    good = src.state()
    job = BatchJob(spec)
    job.run(max_steps=2)
    before = state_hash(job.state())
    rng = random.Random(11)
    for _ in range(100):
        st = dict(good)
        choice = rng.randrange(6)
        if choice == 0:
            del st[rng.choice(sorted(st))]
        elif choice == 1:
            st[rng.choice([*sorted(st), "extra"])] = rng.choice(["junk", None, 2.5])
        elif choice == 2:
            st["step"] = rng.choice([-1, 99, st["step"] + 1, True])
        elif choice == 3:
            st["cursor"] = st["cursor"] + rng.choice([-1, 1, 7])
        elif choice == 4:
            r = st["results"]
            st["results"] = rng.choice([r[:-1], r.astype(np.float64), r[:, 0], r.T])
        else:
            h = st["recurrent.h"]
            st["recurrent.h"] = rng.choice(
                [h[0], h.astype(np.float16), np.zeros((1, 1, 3), np.float32)]
            )
        with pytest.raises(JobError):
            job.restore(st)
        assert state_hash(job.state()) == before
    job.restore(good)
    assert job.step == 4
