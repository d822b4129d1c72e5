"""The Job contract, the onnxruntime session every built-in job uses, and the kind registry.

A job kind is a subclass of :class:`Job`. It is found by name (the ``[job] kind`` of a job
file) with :func:`load_job_class`, which looks, in order, at kinds registered in this
process with :func:`register`, at the entry-point group ``edge_resume.jobs`` of the
installed distributions, and at the built-in kinds (so that a source checkout works
without being installed). ``docs/jobs.md`` documents the contract for plug-in authors.

This module owns the contract, model hashing and verification, the deterministic session
options and the translation of onnxruntime's exceptions into :class:`JobError`. It never
does network I/O and never writes files; onnxruntime is imported on first use only.
"""

from __future__ import annotations

import abc
import hashlib
import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from edge_agent.errors import JobError, JobSpecError, ModelMismatch
from edge_agent.jobs.spec import JobSpec

__all__ = [
    "ENTRY_POINT_GROUP",
    "Job",
    "OrtModel",
    "ProviderSpec",
    "available_kinds",
    "create_job",
    "file_sha256",
    "load_job",
    "load_job_class",
    "register",
    "unregister",
]

ENTRY_POINT_GROUP = "edge_resume.jobs"

#: A provider as onnxruntime takes it: a name, or (name, options).
ProviderSpec = str | tuple[str, dict[str, Any]]

_PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
# Options that keep the CUDA provider deterministic where it has a choice.
_CUDA_OPTIONS = {"cudnn_conv_algo_search": "DEFAULT"}

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint64)": np.uint64,
    "tensor(uint32)": np.uint32,
    "tensor(uint16)": np.uint16,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, lowercase hex. A missing or unreadable file raises JobError."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    except OSError as exc:
        raise JobError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return h.hexdigest()


def _ort_errors() -> tuple[type[BaseException], ...]:
    """onnxruntime's own exception classes (they derive from Exception directly)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as c

    found = [v for v in vars(c).values() if isinstance(v, type) and issubclass(v, Exception)]
    return (*found, RuntimeError, ValueError, TypeError)


class OrtModel:
    """An onnxruntime session with deterministic options, and what a job needs to know of
    its inputs and outputs. ``run`` translates onnxruntime's exceptions into JobError."""

    def __init__(
        self,
        path: Path,
        *,
        intra_op_threads: int = 1,
        optimization: str = "all",
        providers: Sequence[ProviderSpec] | None = None,
    ) -> None:
        import onnxruntime as ort

        self.path = path
        self._errors = _ort_errors()
        so = ort.SessionOptions()
        so.intra_op_num_threads = intra_op_threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.use_deterministic_compute = True
        so.log_severity_level = 3
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
        wanted = _resolve_providers(providers, ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(str(path), so, providers=wanted)
        except self._errors as exc:
            raise JobError(f"onnxruntime cannot load the model {path}: {exc}") from exc
        first = wanted[0] if isinstance(wanted[0], str) else wanted[0][0]
        if self.session.get_providers()[0] != first:
            raise JobError(
                f"onnxruntime did not put {first} first for {path} "
                f"(got {self.session.get_providers()})",
                hint="check the provider's installation (CUDA/cuDNN libraries)",
            )
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = {o.name: o for o in self.session.get_outputs()}
        self.output_names = list(self.outputs)
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.providers: list[str] = list(self.session.get_providers())

    def dtype(self, name: str) -> np.dtype[Any]:
        """The numpy dtype of an input or output tensor."""
        arg = self.inputs.get(name) or self.outputs[name]
        try:
            return np.dtype(_ORT_TYPES[arg.type])
        except KeyError:
            raise JobError(f"{self.path}: {name} has type {arg.type}, not supported") from None

    def shape(self, name: str) -> list[int | str | None]:
        """The declared shape of an input or output: ints, symbolic names or None."""
        arg = self.inputs.get(name) or self.outputs[name]
        return list(arg.shape)

    def run(
        self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        names = list(outputs) if outputs is not None else self.output_names
        try:
            results = self.session.run(names, dict(feeds))
        except self._errors as exc:
            raise JobError(f"onnxruntime failed to run {self.path.name}: {exc}") from exc
        return dict(zip(names, results, strict=True))


def _resolve_providers(
    providers: Sequence[ProviderSpec] | None, available: Sequence[str]
) -> list[ProviderSpec]:
    if providers is None:
        return ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [providers]
    out: list[ProviderSpec] = []
    for p in providers:
        name, options = (p, {}) if isinstance(p, str) else (p[0], dict(p[1]))
        name = _PROVIDER_ALIASES.get(name.lower(), name)
        if name not in available:
            raise JobError(
                f"onnxruntime provider {name} is not available here (available: "
                f"{', '.join(available)})",
                hint="for CUDA install onnxruntime-gpu matching your CUDA version"
                if name == "CUDAExecutionProvider"
                else None,
            )
        if name == "CUDAExecutionProvider":
            options = {**_CUDA_OPTIONS, **options}
        out.append((name, options) if options else name)
    if not out:
        raise JobError("no onnxruntime provider was given")
    if all((q if isinstance(q, str) else q[0]) != "CPUExecutionProvider" for q in out):
        out.append("CPUExecutionProvider")  # fallback for operators the accelerator lacks
    return out


class Job(abc.ABC):
    """One long inference job: a sequence of ``total_steps`` steps over a model.

    The contract (``docs/architecture.md``, "Jobs"):

    * ``run_step()`` does one unit of work and advances ``step`` by one;
    * ``state()`` returns the full state as a new mapping (derivable entries included) whose
      arrays the job never writes into afterwards;
    * ``restore(state)`` continues from a state produced by ``state()`` of the same job
      (entries named in ``derivable`` may be absent and are recomputed); after
      ``restore(s)`` and N steps, ``state()`` equals that of an uninterrupted run after the
      same steps, bit for bit on the same CPU;
    * ``outputs()`` returns the results so far, keyed by position (index i = step i).

    The base class resolves and hashes the model (``model_hash``, refusing a model that
    differs from ``spec.model_hash`` with :class:`ModelMismatch`) and pins that hash into
    ``self.spec``, whose ``to_dict()`` is what a BIRTH message carries.
    """

    kind: ClassVar[str] = ""
    derivable: frozenset[str] = frozenset()

    step: int
    spec: JobSpec
    model_hash: str

    def __init__(self, spec: JobSpec, *, providers: Sequence[ProviderSpec] | None = None) -> None:
        if spec.kind != self.kind:
            raise JobSpecError(
                f"{spec.source}: a {type(self).__name__} runs jobs of kind {self.kind!r}, "
                f"not {spec.kind!r}"
            )
        path = spec.model_path
        if not path.is_file():
            raise JobSpecError(
                f"{spec.source}: [job] model {str(path)!r} is not a file",
                hint="paths are relative to the job file's folder; build the demo models with "
                "`python -m edge_agent.models build models/`",
            )
        self.model_hash = file_sha256(path)
        if spec.model_hash is not None and spec.model_hash != self.model_hash:
            raise ModelMismatch(
                f"model {path} has sha256 {self.model_hash}, but job {spec.id!r} was born with "
                f"{spec.model_hash}",
                hint="use the exact model file the job started with",
            )
        self.spec = spec.replace(model_hash=self.model_hash)
        self.providers = providers
        self.step = 0

    # -- the contract ---------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def total_steps(self) -> int:
        """Steps in the whole job."""

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    @abc.abstractmethod
    def run_step(self) -> None:
        """Do one unit of work. Raises JobError when the job is already done."""

    @abc.abstractmethod
    def state(self) -> dict[str, Any]:
        """The full state (derivable entries included), as a fresh mapping."""

    @abc.abstractmethod
    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``; derivable entries may be absent. Raises JobError for a
        state this job cannot continue from, and then leaves the job unchanged."""

    @abc.abstractmethod
    def outputs(self) -> dict[str, np.ndarray]:
        """Results so far, keyed by position along axis 0 (index i = step i)."""

    # -- helpers --------------------------------------------------------------------------

    def run(self, max_steps: int | None = None) -> int:
        """Run steps until done (or ``max_steps`` more); returns how many were run."""
        n = 0
        while not self.done and (max_steps is None or n < max_steps):
            self.run_step()
            n += 1
        return n

    def open_model(self) -> OrtModel:
        """An onnxruntime session on the job's model with the spec's deterministic options
        and the providers the job was built with."""
        return OrtModel(
            self.spec.model_path,
            intra_op_threads=self.spec.intra_op_threads,
            optimization=self.spec.optimization,
            providers=self.providers,
        )

    def ensure_not_done(self) -> None:
        """Raise JobError if the job is done (``run_step`` calls this first)."""
        if self.done:
            raise JobError(f"job {self.spec.id!r} is done ({self.step}/{self.total_steps} steps)")


# -- the registry -------------------------------------------------------------------------

_BUILTIN: dict[str, str] = {
    "generate": "edge_agent.jobs.generate:GenerateJob",
    "batch": "edge_agent.jobs.batch:BatchJob",
}
_registered: dict[str, type[Job]] = {}

J = TypeVar("J", bound=type[Job])


def register(
    cls: J | None = None, *, kind: str | None = None, replace: bool = False
) -> J | Callable[[J], J]:
    """Register a job class under ``kind`` (default: ``cls.kind``) in this process.

    Usable as ``register(MyJob)`` or as a decorator ``@register``. Registered kinds take
    precedence over entry points. Registering a kind twice needs ``replace=True``.
    """

    def deco(c: J) -> J:
        name = kind or c.kind
        _check_class(c, name, f"register({c.__name__})")
        if name in _registered and _registered[name] is not c and not replace:
            raise JobError(
                f"job kind {name!r} is already registered to {_registered[name].__qualname__}",
                hint="pass replace=True",
            )
        _registered[name] = c
        return c

    return deco(cls) if cls is not None else deco


def unregister(kind: str) -> None:
    """Forget a kind registered with :func:`register` (entry points are not affected)."""
    _registered.pop(kind, None)


def _check_class(cls: object, kind: str, origin: str) -> type[Job]:
    if not (isinstance(cls, type) and issubclass(cls, Job)):
        raise JobError(f"{origin} is {cls!r}, not a subclass of edge_agent.jobs.Job")
    if cls.kind != kind:
        raise JobError(f"{origin}: {cls.__qualname__}.kind is {cls.kind!r}, not {kind!r}")
    if getattr(cls, "__abstractmethods__", None):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise JobError(f"{origin}: {cls.__qualname__} does not implement {missing}")
    return cls


def _entry_points(kind: str) -> list[metadata.EntryPoint]:
    found: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == kind:
            found.setdefault(ep.value, ep)
    return list(found.values())


def load_job_class(kind: str) -> type[Job]:
    """The class for a job kind: registered in-process, else the entry point named ``kind``
    in the group ``edge_resume.jobs``, else a built-in kind. Raises JobError for an unknown
    kind, an ambiguous one (two plug-ins claim it) or one whose plug-in fails to load."""
    if kind in _registered:
        return _registered[kind]
    eps = _entry_points(kind)
    if len(eps) > 1:
        raise JobError(
            f"job kind {kind!r} is claimed by several plug-ins: "
            f"{', '.join(ep.value for ep in eps)}",
            hint="uninstall one of them, or register() the one you want",
        )
    if eps:
        origin = f"entry point {kind} = {eps[0].value!r}"
        try:
            cls = eps[0].load()
        except Exception as exc:  # a plug-in's import can fail in any way
            raise JobError(f"cannot load job kind {kind!r} from {origin}: {exc!r}") from exc
        return _check_class(cls, kind, origin)
    if kind in _BUILTIN:
        module, _, name = _BUILTIN[kind].partition(":")
        return _check_class(getattr(importlib.import_module(module), name), kind, _BUILTIN[kind])
    raise JobError(
        f"unknown job kind {kind!r}",
        hint=f"known kinds: {', '.join(available_kinds()) or 'none'}; a plug-in declares its "
        f"kind as an entry point in the group {ENTRY_POINT_GROUP!r}",
    )


def available_kinds() -> list[str]:
    """Every kind name that :func:`load_job_class` can find (without importing them)."""
    names = set(_registered) | set(_BUILTIN)
    names.update(ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def create_job(spec: JobSpec, *, providers: Sequence[ProviderSpec] | None = None) -> Job:
    """Build the job a spec describes (its kind's class, looked up by name)."""
    return load_job_class(spec.kind)(spec, providers=providers)


def load_job(
    path: str | os.PathLike[str], *, providers: Sequence[ProviderSpec] | None = None
) -> Job:
    """Read a job file and build its job."""
    return create_job(JobSpec.load(path), providers=providers)
