"""Job kinds: built-ins, the explicit register() hook, and plug-ins found by entry point."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge_agent import models
from edge_agent.errors import JobError
from edge_agent.jobs import (
    Job,
    JobSpec,
    available_kinds,
    create_job,
    load_job_class,
    register,
    unregister,
)
from edge_agent.jobs.batch import BatchJob
from edge_agent.jobs.generate import GenerateJob
from edge_agent.state import state_hash

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def sine_module(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """examples/sine_plugin.py importable as ``sine_plugin`` (a plug-in's own package)."""
    monkeypatch.syspath_prepend(str(REPO / "examples"))
    import sine_plugin

    yield sine_plugin
    unregister("sine")
    sys.modules.pop("sine_plugin", None)


def fake_distribution(site: Path, name: str, entry_points: str) -> None:
    """An installed distribution (a .dist-info folder) declaring entry points."""
    info = site / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


def sine_spec(tiny_models: dict[str, Path], samples: int = 30) -> JobSpec:
    return JobSpec.from_dict(
        {
            "job": {"id": "s1", "kind": "sine", "model": str(tiny_models[models.GRU])},
            "params": {"samples": samples},
        }
    )


def test_builtin_kinds() -> None:
    assert load_job_class("generate") is GenerateJob
    assert load_job_class("batch") is BatchJob
    assert {"generate", "batch"} <= set(available_kinds())


def test_unknown_kind_is_a_clear_error() -> None:
    with pytest.raises(JobError, match="unknown job kind 'teleport'") as info:
        load_job_class("teleport")
    assert "edge_resume.jobs" in str(info.value) and "generate" in str(info.value)


def test_register_a_user_defined_kind(tiny_models: dict[str, Path], sine_module: object) -> None:
    sine_job = sine_module.SineJob  # type: ignore[attr-defined]
    with pytest.raises(JobError, match="unknown job kind 'sine'"):
        load_job_class("sine")
    register(sine_job)
    assert load_job_class("sine") is sine_job and "sine" in available_kinds()
    register(sine_job)  # the same class again is fine
    with pytest.raises(JobError, match="already registered"):
        register(type("Other", (sine_job,), {}))
    # the contract holds for the plug-in too: interrupted == uninterrupted
    ref = create_job(sine_spec(tiny_models))
    ref.run()
    job = create_job(sine_spec(tiny_models))
    job.run(max_steps=11)
    resumed = create_job(sine_spec(tiny_models))
    resumed.restore(job.state())
    resumed.run()
    assert state_hash(resumed.state()) == state_hash(ref.state())
    assert resumed.outputs()["scores"].shape == (30, 1)
    np.testing.assert_array_equal(resumed.outputs()["scores"], ref.outputs()["scores"])


def test_register_refuses_bad_classes() -> None:
    class NoKind(Job):
        kind = "nokind"

    with pytest.raises(JobError, match="does not implement"):
        register(NoKind)
    with pytest.raises(JobError, match="not a subclass"):
        register(object, kind="x")  # type: ignore[arg-type]
    with pytest.raises(JobError, match="kind is 'generate', not 'gen2'"):
        register(GenerateJob, kind="gen2")


def test_register_as_a_decorator_and_replace(sine_module: object) -> None:
    base = sine_module.SineJob  # type: ignore[attr-defined]

    @register
    class Loud(base):  # type: ignore[valid-type,misc]
        pass

    assert load_job_class("sine") is Loud
    register(base, replace=True)
    assert load_job_class("sine") is base


def test_plugin_found_by_entry_point(
    tiny_models: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    sine_module: object,
) -> None:
    fake_distribution(
        tmp_path / "site",
        "sine_plugin",
        """
        [edge_resume.jobs]
        sine = sine_plugin:SineJob
        broken = no_such_module_anywhere:Thing
        wrongkind = sine_plugin:SineJob
        notajob = sine_plugin:HIDDEN
    """,
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert {"sine", "broken"} <= set(available_kinds())
    cls = load_job_class("sine")
    assert cls is sine_module.SineJob  # type: ignore[attr-defined]
    job = create_job(sine_spec(tiny_models, samples=3))
    job.run()
    assert job.done and job.outputs()["scores"].shape == (3, 1)
    with pytest.raises(JobError, match="cannot load job kind 'broken'"):
        load_job_class("broken")
    with pytest.raises(JobError, match="kind is 'sine', not 'wrongkind'"):
        load_job_class("wrongkind")
    with pytest.raises(JobError, match="not a subclass"):
        load_job_class("notajob")


def test_two_plugins_claiming_one_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sine_module: object
) -> None:
    fake_distribution(
        tmp_path / "site", "plug_a", "[edge_resume.jobs]\nsine = sine_plugin:SineJob\n"
    )
    fake_distribution(tmp_path / "site", "plug_b", "[edge_resume.jobs]\nsine = other:SineJob\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(JobError, match="claimed by several plug-ins"):
        load_job_class("sine")
    register(sine_module.SineJob)  # type: ignore[attr-defined]  # the explicit choice wins
    assert load_job_class("sine") is sine_module.SineJob  # type: ignore[attr-defined]


def test_spec_kind_must_match_the_class(tiny_models: dict[str, Path]) -> None:
    spec = sine_spec(tiny_models).replace(kind="generate")
    with pytest.raises(JobError, match="runs jobs of kind 'batch', not 'generate'"):
        BatchJob(spec)
