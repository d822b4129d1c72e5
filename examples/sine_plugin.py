"""A user-defined job kind, as a plug-in author would write it (docs/jobs.md walks through it).

``sine`` runs the tiny GRU over a sine sweep it generates itself (so it needs no dataset
file), one sample per step, and keeps the GRU's hidden state and the scores in its state.
Install it by declaring, in the plug-in package's pyproject.toml::

    [project.entry-points."edge_resume.jobs"]
    sine = "sine_plugin:SineJob"

or, in one process, with ``edge_agent.jobs.register(SineJob)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edge_agent.errors import JobError, JobSpecError
from edge_agent.jobs import Job, JobSpec
from edge_agent.jobs.base import ProviderSpec

HIDDEN = 32


class SineJob(Job):
    kind = "sine"  # the name job files use in [job] kind
    derivable = frozenset()  # nothing here can be recomputed more cheaply than sent

    def __init__(self, spec: JobSpec, *, providers: Sequence[ProviderSpec] | None = None) -> None:
        super().__init__(spec, providers=providers)  # finds, hashes and verifies the model
        samples = spec.params.get("samples", 1000)
        if type(samples) is not int or samples < 1:
            raise JobSpecError(f"{spec.source}: [params] samples must be an integer >= 1")
        self.samples = samples
        self.model = self.open_model()  # deterministic session options from the spec
        self._h = np.zeros((1, 1, HIDDEN), np.float32)
        self._scores = np.zeros((0, 1), np.float32)

    @property
    def total_steps(self) -> int:
        return self.samples

    def run_step(self) -> None:
        self.ensure_not_done()
        t = np.float32(self.step)
        x = np.sin(np.float32(0.01) * t * np.arange(1, 9, dtype=np.float32)).reshape(1, 8)
        out = self.model.run({"x": x, "h": self._h}, ["score", "h_out"])
        self._h = out["h_out"]  # a new array: the one handed out by state() never changes
        self._scores = np.concatenate([self._scores, out["score"]])
        self.step += 1

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "h": self._h, "scores": self._scores}

    def restore(self, state: Mapping[str, Any]) -> None:
        step, h, scores = state.get("step"), state.get("h"), state.get("scores")
        if type(step) is not int or not 0 <= step <= self.samples:
            raise JobError(f"state step {step!r} is not in 0..{self.samples}")
        if not isinstance(h, np.ndarray) or h.shape != (1, 1, HIDDEN) or h.dtype != np.float32:
            raise JobError("state entry 'h' must be float32 [1, 1, 32]")
        if (
            not isinstance(scores, np.ndarray)
            or scores.shape != (step, 1)
            or scores.dtype != np.float32
        ):
            raise JobError(f"state entry 'scores' must be float32 [{step}, 1]")
        self.step, self._h, self._scores = step, h, scores  # validated first: all or nothing

    def outputs(self) -> dict[str, np.ndarray]:
        return {"scores": self._scores}
