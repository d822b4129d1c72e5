"""A job's outputs, read straight from a state: what the ingest stores when a device's job
completes (DONE), keyed by position.

    arrays = outputs_from_state(spec, state)    # {"tokens": int64[n]} / {"results": [rows, ...]}
    store.put_outputs(job, 0, arrays, epoch=epoch)

For the built-in kinds the entries are read directly, the same way the job classes'
``outputs()`` compute them (docs/jobs.md), without building the job: that would open the
model with onnxruntime and, for ``generate`` without its KV cache, replay every model call to
rebuild a cache that reading the outputs does not need.

* ``generate``: ``{"tokens": tokens[prompt_len:]}``, position i = generated token i;
* ``batch``: ``{"results": results}``, position r = dataset row r.

Another kind (a plug-in) is read by its job class when the class defines a static or class
method ``outputs_from_state(state) -> dict[str, ndarray]``; otherwise None is returned and
the ingest records the completion without outputs (a worker that can build the job may store
them with ``Job.outputs()``).

This module owns that mapping. It never writes to the store.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from edge_agent.errors import JobError

__all__ = ["OUTPUT_READERS", "job_kind", "outputs_from_state"]


def _generate(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    tokens, p = state.get("tokens"), state.get("prompt_len")
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 1 or type(p) is not int:
        raise JobError("a generate state needs 'tokens' (1-D) and 'prompt_len' (int)")
    if not 0 <= p <= tokens.size:
        raise JobError(f"prompt_len {p} is outside the {tokens.size} tokens")
    return {"tokens": np.ascontiguousarray(tokens[p:])}


def _batch(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    results = state.get("results")
    if not isinstance(results, np.ndarray) or results.ndim < 1:
        raise JobError("a batch state needs 'results' (an array with a row axis)")
    return {"results": results}


#: kind -> reader of a complete state
OUTPUT_READERS: dict[str, Callable[[Mapping[str, Any]], dict[str, np.ndarray]]] = {
    "generate": _generate,
    "batch": _batch,
}


def job_kind(spec: Mapping[str, Any]) -> str | None:
    """The ``[job] kind`` of a spec in the job file's layout (a BIRTH's ``spec``)."""
    job = spec.get("job")
    kind = job.get("kind") if isinstance(job, Mapping) else None
    return kind if isinstance(kind, str) else None


def outputs_from_state(
    spec: Mapping[str, Any], state: Mapping[str, Any]
) -> dict[str, np.ndarray] | None:
    """The job's outputs by position, or None for a kind this server cannot read without
    running the job. Raises JobError for a state that does not fit its kind."""
    kind = job_kind(spec)
    if kind is None:
        return None
    reader = OUTPUT_READERS.get(kind)
    if reader is not None:
        return reader(state)
    try:
        from edge_agent.jobs import load_job_class

        cls = load_job_class(kind)
    except JobError:
        return None
    custom = getattr(cls, "outputs_from_state", None)
    if custom is None:
        return None
    out = custom(state)
    return {str(k): np.asarray(v) for k, v in dict(out).items()}
