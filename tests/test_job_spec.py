"""Job files: parsing, every validation error, the dict form a BIRTH carries, fuzzing."""

from __future__ import annotations

import contextlib
import datetime
import random
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.errors import JobSpecError
from edge_agent.jobs import JobSpec
from edge_agent.jobs.spec import DEFAULT_EVERY_SECONDS

REPO = Path(__file__).resolve().parents[1]

FULL = """
[job]
id = "gen-001"
kind = "generate"
model = "../models/tiny-decoder.onnx"
model_hash = "ABCDEF0123456789abcdef0123456789ABCDEF0123456789abcdef0123456789"

[params]
prompt = "hello"
max_new_tokens = 10
nested = { a = [1, 2.5, "x", true], b = { c = [] } }

[snapshot]
every_steps = 50
every_seconds = 2

[link]
kv = "recompute"

[runtime]
intra_op_threads = 2
optimization = "basic"
"""


def test_full_job_file(tmp_path: Path) -> None:
    (tmp_path / "jobs").mkdir()
    path = tmp_path / "jobs" / "g.toml"
    path.write_text(FULL)
    spec = JobSpec.load(path)
    assert (spec.id, spec.kind, spec.model) == (
        "gen-001",
        "generate",
        "../models/tiny-decoder.onnx",
    )
    assert spec.model_hash == FULL.split('model_hash = "')[1][:64].lower()
    assert spec.params["nested"] == {"a": [1, 2.5, "x", True], "b": {"c": []}}
    assert (spec.every_steps, spec.every_seconds) == (50, 2.0)
    assert isinstance(spec.every_seconds, float)
    assert spec.kv == "recompute"
    assert (spec.intra_op_threads, spec.optimization) == (2, "basic")
    assert spec.base_dir == (tmp_path / "jobs").resolve()
    assert spec.model_path == (tmp_path / "jobs").resolve() / "../models/tiny-decoder.onnx"
    assert spec.source == str(path)


def test_defaults() -> None:
    spec = JobSpec.from_toml('[job]\nid = "a"\nkind = "batch"\nmodel = "/abs/m.onnx"\n')
    assert spec.params == {} and spec.model_hash is None
    assert (spec.every_steps, spec.every_seconds) == (None, DEFAULT_EVERY_SECONDS)
    assert spec.kv == "auto" and spec.intra_op_threads == 1 and spec.optimization == "all"
    assert spec.model_path == Path("/abs/m.onnx")
    only_steps = JobSpec.from_toml(
        '[job]\nid = "a"\nkind = "b"\nmodel = "m"\n[snapshot]\nevery_steps = 5\n'
    )
    assert (only_steps.every_steps, only_steps.every_seconds) == (5, None)


def test_examples_parse() -> None:
    found = sorted((REPO / "examples").glob("*.toml"))
    assert {p.name for p in found} >= {"generate.toml", "batch.toml"}
    for path in found:
        spec = JobSpec.load(path)
        assert spec.model_path.name.endswith(".onnx")
        assert spec.model_path.resolve().parent == (REPO / "models").resolve()


def test_dict_round_trip_through_msgpack(tmp_path: Path) -> None:
    spec = JobSpec.from_toml(FULL, base_dir=tmp_path)
    wire = msgpack.unpackb(msgpack.packb(spec.to_dict(), use_bin_type=True), raw=False)
    back = JobSpec.from_dict(wire, base_dir=tmp_path)
    assert back == spec
    assert back.to_dict() == spec.to_dict()
    changed = spec.with_params(dataset_hash="f" * 64)
    assert changed.params["dataset_hash"] == "f" * 64 and "dataset_hash" not in spec.params
    assert spec.to_dict()["params"] is not spec.params  # a copy: editing it changes nothing


GOOD: dict[str, Any] = {"job": {"id": "j", "kind": "generate", "model": "m.onnx"}}


def _with(section: str, key: str | None, value: Any) -> dict[str, Any]:
    doc = {k: dict(v) for k, v in GOOD.items()}
    if key is None:
        doc[section] = value
    else:
        doc.setdefault(section, {})[key] = value
    return doc


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([1, 2], "is a table, not a list"),
        ({}, r"the \[job\] table is missing"),
        ({"jobs": {}}, "unknown section or key 'jobs'"),
        (_with("job", None, "x"), r"\[job\] must be a table"),
        ({"job": {"kind": "g", "model": "m"}}, r"\[job\] id is missing"),
        ({"job": {"id": "a", "model": "m"}}, r"\[job\] kind is missing"),
        ({"job": {"id": "a", "kind": "g"}}, r"\[job\] model is missing"),
        (_with("job", "extra", 1), r"\[job\] 'extra' is not a known key"),
        (_with("job", "id", ""), "is not a valid job id"),
        (_with("job", "id", "-lead"), "is not a valid job id"),
        (_with("job", "id", "a" * 65), "is not a valid job id"),
        (_with("job", "id", "a b"), "is not a valid job id"),
        (_with("job", "id", "a/b"), "is not a valid job id"),
        (_with("job", "id", "été"), "is not a valid job id"),
        (_with("job", "id", "ok\n"), "is not a valid job id"),
        (_with("job", "id", 5), "is not a valid job id"),
        (_with("job", "kind", "9lives"), "is not a valid job kind"),
        (_with("job", "kind", ["generate"]), "is not a valid job kind"),
        (_with("job", "model", ""), "must be a non-empty string"),
        (_with("job", "model", 3), "must be a non-empty string"),
        (_with("job", "model", "a\x00b"), "not a usable file path"),
        (_with("job", "model_hash", "abc"), "is not a sha256"),
        (_with("job", "model_hash", "g" * 64), "is not a sha256"),
        (_with("params", None, [1]), r"\[params\] must be a table"),
        (_with("params", "when", datetime.date(2024, 1, 1)), "a date is not allowed"),
        (_with("params", "big", 2**64), "does not fit in 64 bits"),
        (_with("params", "k", {1: 2}), "key 1 is not a string"),
        (_with("params", "k", (1, 2)), "a tuple is not allowed"),
        (_with("snapshot", "every_steps", 0), "every_steps must be an integer >= 1"),
        (_with("snapshot", "every_steps", 1.5), "every_steps must be an integer >= 1"),
        (_with("snapshot", "every_steps", True), "every_steps must be an integer >= 1"),
        (_with("snapshot", "every_seconds", 0), "every_seconds must be a number > 0"),
        (_with("snapshot", "every_seconds", float("inf")), "every_seconds must be a number > 0"),
        (_with("snapshot", "every_seconds", float("nan")), "every_seconds must be a number > 0"),
        (_with("snapshot", "every_seconds", "10s"), "every_seconds must be a number > 0"),
        (_with("snapshot", "every_minutes", 1), r"\[snapshot\] 'every_minutes' is not a known key"),
        (_with("snapshot", "overhead_budget", -0.1), "overhead_budget must be a number 0..100"),
        (_with("snapshot", "overhead_budget", 101), "overhead_budget must be a number 0..100"),
        (_with("snapshot", "overhead_budget", float("nan")), "overhead_budget must be a number"),
        (_with("snapshot", "overhead_budget", True), "overhead_budget must be a number"),
        (_with("snapshot", "overhead_budget", "10%"), "overhead_budget must be a number"),
        (_with("snapshot", "max_lag_seconds", 0), "max_lag_seconds must be a number of seconds"),
        (_with("snapshot", "max_lag_seconds", -5), "max_lag_seconds must be a number of seconds"),
        (_with("snapshot", "max_lag_seconds", float("inf")), "max_lag_seconds must be a number"),
        (_with("snapshot", "max_lag_seconds", 1e9), "max_lag_seconds must be a number"),
        (_with("snapshot", "max_lag_seconds", False), "max_lag_seconds must be a number"),
        (_with("snapshot", "max_lag", 60), r"\[snapshot\] 'max_lag' is not a known key"),
        (_with("link", "kv", "sometimes"), "kv must be one of send, recompute, auto"),
        (_with("link", "kv", ["send"]), "kv must be one of"),
        (_with("link", "max_kbps", 64), r"\[link\] 'max_kbps' is not a known key"),
        (_with("runtime", "intra_op_threads", -1), "intra_op_threads must be an integer"),
        (_with("runtime", "intra_op_threads", "1"), "intra_op_threads must be an integer"),
        (_with("runtime", "optimization", "max"), "optimization must be one of"),
        (_with("runtime", "min_step_seconds", -0.1), "min_step_seconds must be a number"),
        (_with("runtime", "min_step_seconds", float("nan")), "min_step_seconds must be"),
        (_with("runtime", "min_step_seconds", 1e9), "min_step_seconds must be a number"),
        (_with("runtime", "min_step_seconds", True), "min_step_seconds must be a number"),
        (_with("runtime", "min_step_seconds", "1s"), "min_step_seconds must be a number"),
    ],
)
def test_invalid_specs_name_the_field(doc: Any, message: str) -> None:
    with pytest.raises(JobSpecError, match=message):
        JobSpec.from_dict(doc, source="t.toml")


def test_params_depth_is_bounded() -> None:
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    with pytest.raises(JobSpecError, match="nested deeper"):
        JobSpec.from_dict(_with("params", "deep", deep))


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(JobSpecError, match="cannot read job file"):
        JobSpec.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('[job]\nid = "a\n')
    with pytest.raises(JobSpecError, match=r"bad\.toml: not valid TOML"):
        JobSpec.load(bad)
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'[job]\nid = "\xe9"\n')
    with pytest.raises(JobSpecError, match="not UTF-8"):
        JobSpec.load(latin)
    huge = tmp_path / "huge.toml"
    huge.write_bytes(b"#" * (1 << 20) + b"\n")
    with pytest.raises(JobSpecError, match="over 1048576"):
        JobSpec.load(huge)
    dup = tmp_path / "dup.toml"
    dup.write_text('[job]\nid = "a"\nid = "b"\n')
    with pytest.raises(JobSpecError, match="not valid TOML"):
        JobSpec.load(dup)


def test_ids_at_the_limits() -> None:
    for good in ("a", "A" * 64, "0.9_x-y", "job-2024.06.11"):
        assert JobSpec.from_dict(_with("job", "id", good)).id == good


# -- fuzz: a BIRTH's spec map comes from the network ---------------------------------------

plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=4),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=6) | st.integers(), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(doc=plain)
def test_from_dict_on_arbitrary_values_only_raises_job_spec_error(doc: Any) -> None:
    with contextlib.suppress(JobSpecError):
        JobSpec.from_dict(doc)


@settings(max_examples=300, deadline=None)
@given(
    section=st.sampled_from(["job", "params", "snapshot", "link", "runtime", "other"]),
    key=st.sampled_from(
        [
            "id",
            "kind",
            "model",
            "model_hash",
            "every_steps",
            "every_seconds",
            "overhead_budget",
            "max_lag_seconds",
            "kv",
            "intra_op_threads",
            "optimization",
            "x",
        ]
    ),
    value=plain,
)
def test_from_dict_on_mutated_specs(section: str, key: str, value: Any) -> None:
    doc = JobSpec.from_toml(FULL).to_dict()
    doc.setdefault(section, {})[key] = value
    try:
        spec = JobSpec.from_dict(doc)
    except JobSpecError:
        return
    assert JobSpec.from_dict(spec.to_dict()) == spec  # whatever is accepted round-trips


def test_seeded_byte_mutations_of_a_packed_spec() -> None:
    packed = msgpack.packb(JobSpec.from_toml(FULL).to_dict(), use_bin_type=True)
    rng = random.Random(3)
    accepted = 0
    for _ in range(500):
        data = bytearray(packed)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            doc = msgpack.unpackb(bytes(data), raw=False, strict_map_key=False)
        except (ValueError, TypeError):
            continue  # the protocol layer refuses undecodable bytes before they get here
        try:
            JobSpec.from_dict(doc)
            accepted += 1
        except JobSpecError:
            pass
    assert accepted < 500


def test_min_step_seconds_paces_the_edge_only() -> None:
    base = JobSpec.from_toml(FULL)
    assert base.min_step_seconds == 0.0
    paced = JobSpec.from_dict(_with("runtime", "min_step_seconds", 0.02))
    assert paced.min_step_seconds == 0.02
    # not the job's identity: a paced job's BIRTH is the unpaced one's
    assert "min_step_seconds" not in paced.to_dict()["runtime"]
    assert paced.to_dict() == JobSpec.from_dict(GOOD).to_dict()
    assert paced == JobSpec.from_dict(GOOD)


def test_overhead_budget_and_max_lag_are_edge_side_settings() -> None:
    base = JobSpec.from_dict(GOOD)
    assert (base.overhead_budget, base.max_lag_seconds) == (0.10, 60.0)
    doc = _with("snapshot", "overhead_budget", 0.25)
    doc["snapshot"]["max_lag_seconds"] = 120
    tuned = JobSpec.from_dict(doc)
    assert (tuned.overhead_budget, tuned.max_lag_seconds) == (0.25, 120.0)
    assert isinstance(tuned.max_lag_seconds, float)
    off = JobSpec.from_dict(_with("snapshot", "overhead_budget", 0))
    assert off.overhead_budget == 0.0  # 0: sends follow the schedule alone
    # they change when snapshots are sent, never what the job computes: not the job's
    # identity, not in the BIRTH (so changing them keeps the job's id valid)
    assert "overhead_budget" not in tuned.to_dict()["snapshot"]
    assert "max_lag_seconds" not in tuned.to_dict()["snapshot"]
    assert tuned == base and tuned.to_dict() == base.to_dict()
