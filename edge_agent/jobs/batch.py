"""The ``batch`` job: a model over a dataset file, optionally stateful, results appended.

The dataset is an ``.npy`` file, or one named array of an ``.npz`` file, that both the
gateway and the server can read; its sha256 is pinned into the spec as
``params.dataset_hash`` (and verified when the job file or the BIRTH already has one).

How rows meet the model (``D`` = the dataset's rank, ``R`` = the data input's rank):

* ``R == D`` (*rows*): the dataset's axis 0 is the model's batch axis. A stateless model
  gets each step's ``batch_size`` rows in one call; a stateful model gets them one call
  per row (``data[r:r+1]``), since consecutive rows are consecutive time steps.
* ``R == D - 1`` (*items*): each ``data[r]`` is one whole model input (e.g. a
  [time, streams, features] dataset for a model over [streams, features]); one call
  per item, ``batch_size`` items per step.

A stateful model's state inputs are paired with state outputs by ``params.state_map``
(``{h = "h_out"}``) or, without one, by name: ``X`` with ``X_out``, ``past_*`` with
``present_*``, ``past_key_values.*`` with ``present.*``. State starts as zeros
(symbolic dims: the batch size where the dim's name is the data input's batch dim name,
else 0; or ``params.state_shapes``).

State entries: ``step``, ``cursor`` (rows done), ``results`` (the output rows so far,
growing along axis 0; row i comes from dataset row i), ``recurrent.{input}`` (each state
tensor). Nothing is derivable. This module owns the batching loop; its only I/O is
reading the model and the dataset.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import DatasetMismatch, JobError, JobSpecError
from edge_agent.jobs.base import Job, ProviderSpec, file_sha256
from edge_agent.jobs.spec import HASH_PATTERN, JobSpec

__all__ = ["BatchJob", "pair_by_convention"]

_PARAMS = {
    "dataset",
    "array",
    "dataset_hash",
    "batch_size",
    "input",
    "output",
    "state_map",
    "state_shapes",
}
RECURRENT = "recurrent."


def pair_by_convention(inputs: Sequence[str], outputs: Sequence[str]) -> dict[str, str]:
    """State pairs by name: ``X`` ↔ ``X_out``, ``past_X`` ↔ ``present_X``,
    ``past.X`` ↔ ``present.X``, ``past_key_values.X`` ↔ ``present.X``."""
    outs = set(outputs)
    pairs: dict[str, str] = {}
    for name in inputs:
        candidates = [f"{name}_out"]
        for past, present in (
            ("past_key_values.", "present."),
            ("past_", "present_"),
            ("past.", "present."),
        ):
            if name.startswith(past):
                candidates.append(present + name[len(past) :])
        for cand in candidates:
            if cand in outs:
                pairs[name] = cand
                break
    return pairs


def _load_dataset(path: Path, array: str | None, where: str) -> np.ndarray:
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            if array is not None:
                raise JobSpecError(f"{where} array is only for .npz datasets")
            data = np.load(path, mmap_mode="r", allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                names = list(z.files)
                if array is None:
                    if len(names) != 1:
                        raise JobSpecError(
                            f"{where} the .npz holds {len(names)} arrays; name one "
                            f"with array = ...",
                            hint=f"arrays: {', '.join(names)}",
                        )
                    array = names[0]
                if array not in names:
                    raise JobSpecError(
                        f"{where} the .npz has no array {array!r}",
                        hint=f"arrays: {', '.join(names)}",
                    )
                data = z[array]
        else:
            raise JobSpecError(f"{where} dataset {path.name!r} is not a .npy or .npz file")
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        if isinstance(exc, JobSpecError):
            raise
        raise JobError(f"cannot read the dataset {path}: {exc}") from exc
    if not isinstance(data, np.ndarray) or data.ndim == 0:
        raise JobSpecError(f"{where} the dataset must be an array with at least one axis")
    return data


class BatchJob(Job):
    """A model applied to every row of a dataset, in steps of ``batch_size`` rows."""

    kind = "batch"

    def __init__(self, spec: JobSpec, *, providers: Sequence[ProviderSpec] | None = None) -> None:
        super().__init__(spec, providers=providers)
        where = f"{spec.source}: [params]"
        params = spec.params
        unknown = sorted(set(params) - _PARAMS)
        if unknown:
            raise JobSpecError(
                f"{where} {unknown[0]!r} is not a batch parameter",
                hint=f"known: {', '.join(sorted(_PARAMS))}",
            )
        dataset = params.get("dataset")
        if type(dataset) is not str or not dataset:
            raise JobSpecError(f"{where} dataset (a .npy or .npz path) is missing")
        for key in ("array", "input", "output"):
            if key in params and (type(params[key]) is not str or not params[key]):
                raise JobSpecError(f"{where} {key} must be a non-empty string")
        batch_size = params.get("batch_size", 1)
        if type(batch_size) is not int or not 1 <= batch_size <= 1 << 30:
            raise JobSpecError(f"{where} batch_size must be an integer >= 1, not {batch_size!r}")
        self.batch_size: int = batch_size
        want_hash = params.get("dataset_hash")
        if want_hash is not None and (
            type(want_hash) is not str or not HASH_PATTERN.fullmatch(want_hash)
        ):
            raise JobSpecError(f"{where} dataset_hash {want_hash!r} is not a sha256 (64 hex)")

        path = spec.resolve(dataset)
        if not path.is_file():
            raise JobSpecError(
                f"{where} dataset {str(path)!r} is not a file",
                hint="paths are relative to the job file's folder",
            )
        self.dataset_hash = file_sha256(path)
        if want_hash is not None and want_hash.lower() != self.dataset_hash:
            raise DatasetMismatch(
                f"dataset {path} has sha256 {self.dataset_hash}, but job {spec.id!r} was born "
                f"with {want_hash.lower()}",
                hint="use the exact dataset file the job started with",
            )
        self.spec = self.spec.with_params(dataset_hash=self.dataset_hash)
        self.data = _load_dataset(path, params.get("array"), where)

        self.model = self.open_model()
        self._pair(params, where)
        self._layout(where)
        self._init_state(params.get("state_shapes"), where)
        self.n_rows = int(self.data.shape[0])
        self._results = self._empty_results()
        self._pending: list[np.ndarray] = []
        self._recurrent = {k: v.copy() for k, v in self._zero_state.items()}

    # -- set-up ---------------------------------------------------------------------------

    def _pair(self, params: Mapping[str, Any], where: str) -> None:
        m = self.model
        state_map = params.get("state_map")
        if state_map is not None:
            if not isinstance(state_map, dict) or any(
                type(v) is not str for v in state_map.values()
            ):
                raise JobSpecError(f'{where} state_map must be a table of input = "output"')
            for i, o in state_map.items():
                if i not in m.inputs:
                    raise JobSpecError(
                        f"{where} state_map: the model has no input {i!r}",
                        hint=f"inputs: {', '.join(m.inputs)}",
                    )
                if o not in m.outputs:
                    raise JobSpecError(
                        f"{where} state_map: the model has no output {o!r}",
                        hint=f"outputs: {', '.join(m.outputs)}",
                    )
            if len(set(state_map.values())) != len(state_map):
                raise JobSpecError(f"{where} state_map pairs one output with several inputs")
            pairs = dict(state_map)
        else:
            pairs = pair_by_convention(list(m.inputs), list(m.outputs))
        data_inputs = [n for n in m.inputs if n not in pairs]
        chosen = params.get("input")
        if chosen is not None:
            if chosen not in m.inputs:
                raise JobSpecError(
                    f"{where} the model has no input {chosen!r}",
                    hint=f"inputs: {', '.join(m.inputs)}",
                )
            if chosen in pairs:
                raise JobSpecError(
                    f"{where} input {chosen!r} is paired as state with {pairs[chosen]!r}",
                    hint="set state_map explicitly",
                )
            unfed = [n for n in data_inputs if n != chosen]
        elif len(data_inputs) == 1:
            chosen, unfed = data_inputs[0], []
        else:
            chosen, unfed = None, data_inputs
        if chosen is None or unfed:
            raise JobSpecError(
                f"{where} the model's inputs {', '.join(data_inputs) or '(none)'} are not state "
                "inputs; a batch job feeds exactly one data input",
                hint='pair state inputs with outputs by state_map = {in = "out"} or by '
                "naming them X / X_out",
            )
        self.input_name: str = chosen
        self.state_pairs: dict[str, str] = pairs
        results = [o for o in m.outputs if o not in pairs.values()]
        out = params.get("output")
        if out is not None:
            if out not in results:
                raise JobSpecError(
                    f"{where} output {out!r} is not a non-state output of the model",
                    hint=f"candidates: {', '.join(results)}",
                )
        elif len(results) == 1:
            out = results[0]
        else:
            raise JobSpecError(
                f"{where} the model has {len(results)} non-state outputs; choose "
                f"one with output = ...",
                hint=f"candidates: {', '.join(results)}",
            )
        self.output_name: str = out
        for i, o in pairs.items():
            if m.dtype(i) != m.dtype(o):
                raise JobSpecError(
                    f"{where} state input {i!r} is {m.dtype(i)} but its output "
                    f"{o!r} is {m.dtype(o)}"
                )
        self._run_outputs = [out, *pairs.values()]

    def _layout(self, where: str) -> None:
        m = self.model
        shape = m.shape(self.input_name)
        dtype = m.dtype(self.input_name)
        if self.data.dtype != dtype:
            raise JobSpecError(
                f"{where} the dataset is {self.data.dtype}; model input "
                f"{self.input_name!r} takes {dtype}",
                hint="convert the dataset (e.g. arr.astype(np.float32))",
            )
        if len(shape) == self.data.ndim:
            self.mode = "rows"
            fixed, item = shape[1:], self.data.shape[1:]
        elif len(shape) == self.data.ndim - 1:
            self.mode = "items"
            fixed, item = shape, self.data.shape[1:]
        else:
            raise JobSpecError(
                f"{where} the dataset's shape {self.data.shape} does not fit model "
                f"input {self.input_name!r} of shape {shape}",
                hint="rows: same rank as the input; items: one axis more",
            )
        for want, got in zip(fixed, item, strict=True):
            if isinstance(want, int) and want != got:
                raise JobSpecError(
                    f"{where} the dataset's rows have shape {tuple(item)}; model "
                    f"input {self.input_name!r} expects {shape}"
                )
        batch_dim = shape[0] if shape else None
        self._batch_dim_name = batch_dim if isinstance(batch_dim, str) else None
        if self.mode == "rows":
            self._feed_batch = 1
            if isinstance(batch_dim, int) and batch_dim != 1:
                raise JobSpecError(
                    f"{where} model input {self.input_name!r} has a fixed batch of "
                    f"{batch_dim}; a batch job needs a dynamic batch or 1"
                )
            self._per_row = bool(self.state_pairs) or batch_dim == 1
        else:
            self._feed_batch = int(self.data.shape[1]) if self.data.ndim > 1 else 1
            self._per_row = True

    def _dims(self, shape: Sequence[int | str | None], *, batch: int) -> tuple[int, ...]:
        return tuple(
            d if isinstance(d, int) else (batch if d == self._batch_dim_name and d else 0)
            for d in shape
        )

    def _init_state(self, shapes: object, where: str) -> None:
        if shapes is not None and (
            not isinstance(shapes, dict)
            or any(
                not isinstance(v, list) or any(type(d) is not int or d < 0 for d in v)
                for v in shapes.values()
            )
        ):
            raise JobSpecError(f"{where} state_shapes must be a table of input = [dims >= 0]")
        shapes = shapes or {}
        assert isinstance(shapes, dict)
        for name in shapes:
            if name not in self.state_pairs:
                raise JobSpecError(f"{where} state_shapes names {name!r}, not a state input")
        self._zero_state: dict[str, np.ndarray] = {}
        for name in self.state_pairs:
            declared = self.model.shape(name)
            shape = (
                tuple(shapes[name])
                if name in shapes
                else self._dims(declared, batch=self._feed_batch)
            )
            if len(shape) != len(declared) or any(
                isinstance(d, int) and d != s for d, s in zip(declared, shape, strict=True)
            ):
                raise JobSpecError(
                    f"{where} state_shapes.{name} {list(shape)} does not fit the model's {declared}"
                )
            self._zero_state[name] = np.zeros(shape, dtype=self.model.dtype(name))
        self.state_keys = [RECURRENT + n for n in self.state_pairs]

    def _empty_results(self) -> np.ndarray:
        declared = self.model.shape(self.output_name)
        tail = declared[1:] if self.mode == "rows" else declared
        return np.zeros(
            (0, *self._dims(tail, batch=self._feed_batch)), dtype=self.model.dtype(self.output_name)
        )

    # -- the contract ---------------------------------------------------------------------

    @property
    def total_steps(self) -> int:
        return math.ceil(self.n_rows / self.batch_size)

    @property
    def cursor(self) -> int:
        return min(self.n_rows, self.step * self.batch_size)

    def run_step(self) -> None:
        self.ensure_not_done()
        a = self.cursor
        b = min(self.n_rows, a + self.batch_size)
        recurrent = self._recurrent
        if self._per_row:
            chunks = []
            for r in range(a, b):
                x = self.data[r : r + 1] if self.mode == "rows" else self.data[r]
                out, recurrent = self._call(x, recurrent)
                chunks.append(out if self.mode == "rows" else out[None])
            chunk = np.concatenate(chunks)
        else:
            chunk, recurrent = self._call(self.data[a:b], recurrent)
        if chunk.shape[0] != b - a:
            raise JobError(
                f"output {self.output_name!r} has {chunk.shape[0]} rows for {b - a} input rows"
            )
        self._pending.append(chunk)
        self._recurrent = recurrent
        self.step += 1

    def _call(
        self, x: np.ndarray, recurrent: Mapping[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        feeds = {self.input_name: np.ascontiguousarray(x), **recurrent}
        out = self.model.run(feeds, self._run_outputs)
        return out[self.output_name], {i: out[o] for i, o in self.state_pairs.items()}

    def _flush(self) -> np.ndarray:
        if self._pending:
            parts = ([self._results] if self._results.shape[0] else []) + self._pending
            try:
                self._results = np.concatenate(parts)
            except ValueError as exc:
                raise JobError(
                    f"output {self.output_name!r} changed shape between steps: {exc}"
                ) from exc
            self._pending = []
        return self._results

    def state(self) -> dict[str, Any]:
        st: dict[str, Any] = {"step": self.step, "cursor": self.cursor, "results": self._flush()}
        for name, arr in self._recurrent.items():
            st[RECURRENT + name] = arr  # fresh ORT outputs (or our zeros), never written to
        return st

    def restore(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise JobError(f"a state is a mapping, not a {type(state).__name__}")
        allowed = {"step", "cursor", "results", *self.state_keys}
        for key in state:
            if key not in allowed:
                raise JobError(f"state entry {key!r} does not belong to this batch job")
        for key in allowed:
            if key not in state:
                raise JobError(f"state entry {key!r} is missing")
        step, cursor, results = state["step"], state["cursor"], state["results"]
        if type(step) is not int or not 0 <= step <= self.total_steps:
            raise JobError(f"state step {step!r} is not in 0..{self.total_steps}")
        if type(cursor) is not int or cursor != min(self.n_rows, step * self.batch_size):
            raise JobError(
                f"state cursor {cursor!r} does not match step {step} of "
                f"batch_size {self.batch_size}"
            )
        empty = self._empty_results()
        if (
            not isinstance(results, np.ndarray)
            or results.dtype != empty.dtype
            or results.ndim != empty.ndim
            or results.shape[0] != cursor
            or (
                cursor
                and any(
                    d and d != g for d, g in zip(empty.shape[1:], results.shape[1:], strict=True)
                )
            )
        ):
            got = (
                f"{results.dtype} {results.shape}"
                if isinstance(results, np.ndarray)
                else type(results).__name__
            )
            raise JobError(
                f"state entry 'results' must be {empty.dtype} with {cursor} rows and "
                f"rank {empty.ndim}, not {got}"
            )
        recurrent = {}
        for name, zero in self._zero_state.items():
            arr = state[RECURRENT + name]
            declared = self.model.shape(name)
            if (
                not isinstance(arr, np.ndarray)
                or arr.dtype != zero.dtype
                or arr.ndim != zero.ndim
                or any(
                    isinstance(d, int) and d != g for d, g in zip(declared, arr.shape, strict=True)
                )
            ):
                got = (
                    f"{arr.dtype} {arr.shape}"
                    if isinstance(arr, np.ndarray)
                    else type(arr).__name__
                )
                raise JobError(
                    f"state entry {RECURRENT + name!r} must be {zero.dtype} shaped "
                    f"like {declared}, not {got}"
                )
            recurrent[name] = np.ascontiguousarray(arr)
        self._results = np.ascontiguousarray(results)
        self._pending = []
        self._recurrent = recurrent
        self.step = step

    def outputs(self) -> dict[str, np.ndarray]:
        return {"results": self._flush()}
