"""The fault drill (``bench/fault_drill.py``) on three fixed scenarios, one fault family
each: damaged messages and a broker crash; the server crashed and the device lost; the link
cut and then black-holed until the server takes the job. Every part is a real process (the
drill builds on ``tests/support/cluster.py``); each scenario must end with the job completed,
outputs bit-identical to an uninterrupted run and no acknowledged state lost. The full
20-scenario drill is ``python -m bench.fault_drill`` (docs/e2e.md, "Fault drill")."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.fault_drill import FaultSpec, Plan, Result, Scenario, table

pytestmark = pytest.mark.integration


def run(plan: Plan, tmp_path: Path, models: dict[str, Path]) -> Result:
    r = Scenario(1, plan, tmp_path / "scenario", models).run()
    print(table([r]))
    for f in r.faults:
        print(f"{f.label}: {f.detail}")
    assert r.error is None, f"{r.error} (logs under {r.workdir})"
    assert r.completed
    assert r.identical, r.identical_detail
    assert r.state_lost == 0, r.lost_detail
    return r


def test_damaged_messages_and_a_broker_crash(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """A snapshot chunk corrupted on its way up, an ack delivered twice, Mosquitto
    SIGKILLed and restarted on its persistence folder: the device finishes the job."""
    plan = Plan(
        seed=101, job="gen-send", auto_resume_s=None, first_at=0.1,
        faults=(
            FaultSpec("corrupt", 0.0, direction="up", seed=5),
            FaultSpec("duplicate", 0.3, direction="down"),
            FaultSpec("kill-broker", 0.3, span=0.5),
        ),
    )  # fmt: skip
    r = run(plan, tmp_path, tiny_models)
    assert [f.kind for f in r.faults] == ["corrupt", "duplicate", "kill-broker"]
    assert r.faults[0].detail.startswith("edge-resume/v1/gw-drill/drill-job/state")
    assert r.faults[1].detail.startswith("edge-resume/v1/gw-drill/drill-job/ack")
    assert r.where == "edge"  # no auto-resume, and nobody asked for one
    assert r.recovery_s is not None  # the device made progress after the broker came back


def test_server_crash_then_the_device_lost(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """The server SIGKILLed while the device streams, then (while it restarts) the device
    SIGKILLed for good: the job is resumed on the server through the API and finished
    there, from a state at least as new as the device was told is acknowledged; the
    device, started again at the end, stands down."""
    plan = Plan(
        seed=202, job="gen-recompute", auto_resume_s=None, first_at=0.15,
        faults=(
            FaultSpec("kill-server", 0.0, span=0.3),
            FaultSpec("kill-agent", 0.5, restart=False),
        ),
    )  # fmt: skip
    r = run(plan, tmp_path, tiny_models)
    assert [f.kind for f in r.faults] == ["kill-server", "kill-agent"]
    assert r.where == "server"
    assert r.recovery_s is not None  # the server's first resumed step


def test_link_cut_then_black_holed(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """A duplicated state message, the link dropped for a second, then black-holed past
    the heartbeat timeout and the auto-resume delay (the server may take the job over
    while the device computes on; either way one of them finishes it, identically)."""
    plan = Plan(
        seed=303, job="batch", auto_resume_s=2.5, first_at=0.1,
        faults=(
            FaultSpec("duplicate", 0.0, direction="up"),
            FaultSpec("link-drop", 0.3, span=1.0),  # shorter than the auto-resume delay
            FaultSpec("link-block", 0.5, span=6.0),
        ),
    )  # fmt: skip
    r = run(plan, tmp_path, tiny_models)
    assert [f.kind for f in r.faults] == ["duplicate", "link-drop", "link-block"]
    assert r.where in ("edge", "server")
    # (no recovery time when the server finished the job while the link was still black)
