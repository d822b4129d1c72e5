"""The job file's ``[server]`` table (read by the resume worker only)."""

from __future__ import annotations

import pytest

from edge_agent.errors import JobSpecError
from edge_agent.jobs import JobSpec

BASE = '[job]\nid = "j"\nkind = "generate"\nmodel = "m.onnx"\n'


def test_auto_resume_after_round_trips_and_is_omitted_when_unset() -> None:
    spec = JobSpec.from_toml(BASE + "[server]\nauto_resume_after = 90\n")
    assert spec.auto_resume_after == 90.0
    d = spec.to_dict()
    assert d["server"] == {"auto_resume_after": 90.0}
    assert JobSpec.from_dict(d) == spec
    plain = JobSpec.from_toml(BASE)
    assert plain.auto_resume_after is None and "server" not in plain.to_dict()


@pytest.mark.parametrize("value", ["-1", '"90"', "true", "nan", "inf"])
def test_bad_auto_resume_after_is_refused(value: str) -> None:
    with pytest.raises(JobSpecError, match="auto_resume_after"):
        JobSpec.from_toml(BASE + f"[server]\nauto_resume_after = {value}\n")


def test_unknown_server_keys_are_refused() -> None:
    with pytest.raises(JobSpecError, match="not a known key"):
        JobSpec.from_toml(BASE + "[server]\nretries = 3\n")
