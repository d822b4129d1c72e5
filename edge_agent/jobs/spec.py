"""The job file: parse and validate a TOML job description into a :class:`JobSpec`.

A job file names a job, its kind and its model, and carries kind-specific parameters::

    [job]
    id = "gen-001"                       # ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$
    kind = "generate"                    # a registered job kind
    model = "../models/tiny-decoder.onnx"  # relative to the job file's folder
    model_hash = "3bcc..."               # optional sha256 (hex) of the model file

    [params]                             # kind-specific, checked by the job class
    prompt = "Once upon a time"
    max_new_tokens = 1000

    [snapshot]
    every_steps = 50                     # optional
    every_seconds = 30.0                 # optional; 30.0 when neither is given
    overhead_budget = 0.10               # hold sends back while their fixed cost would be
                                         # over this share of the payload (0: never)
    max_lag_seconds = 60.0               # ...but never longer than this since the last send

    [link]
    kv = "auto"                          # "send" | "recompute" | "auto"

    [runtime]
    intra_op_threads = 1                 # onnxruntime threads; 1 = deterministic
    optimization = "all"                 # "disable" | "basic" | "extended" | "all"
    min_step_seconds = 0.0               # pace: a step takes at least this long (demos)

    [server]
    auto_resume_after = 120.0            # optional: the server resumes the job after this
                                         # many seconds offline (overrides its own setting)

A :class:`JobSpec` also travels in the protocol's BIRTH message as a plain dict
(:meth:`JobSpec.to_dict`, the same layout as the file with every default filled in) and is
rebuilt on the server with :meth:`JobSpec.from_dict`, which validates as strictly as the
file parser: a birth comes from the network. The full reference is ``docs/jobs.md``.

This module owns the job file's syntax and the structural checks. It reads the job file
(``JobSpec.load``) and nothing else: it never opens the model or the dataset, and
kind-specific parameters are checked by the job class, not here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.errors import JobSpecError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "DEFAULT_EVERY_SECONDS",
    "DEFAULT_MAX_LAG_SECONDS",
    "DEFAULT_OVERHEAD_BUDGET",
    "ID_PATTERN",
    "KV_POLICIES",
    "MAX_JOB_FILE_BYTES",
    "OPTIMIZATION_LEVELS",
    "JobSpec",
]

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
KIND_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
HASH_PATTERN = re.compile(r"[0-9a-fA-F]{64}")
KV_POLICIES = ("send", "recompute", "auto")
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
DEFAULT_EVERY_SECONDS = 30.0
DEFAULT_OVERHEAD_BUDGET = 0.10
DEFAULT_MAX_LAG_SECONDS = 60.0
MAX_OVERHEAD_BUDGET = 100.0
MAX_LAG_SECONDS = 7 * 86400.0
MAX_JOB_FILE_BYTES = 1 << 20
MAX_PARAM_DEPTH = 16
MAX_PATH_CHARS = 4096
MAX_MIN_STEP_SECONDS = 3600.0

_SECTIONS = {
    "job": {"id", "kind", "model", "model_hash"},
    "params": None,  # free-form, checked by the job class
    "snapshot": {"every_steps", "every_seconds", "overhead_budget", "max_lag_seconds"},
    "link": {"kv"},
    "runtime": {"intra_op_threads", "optimization", "min_step_seconds"},
    "server": {"auto_resume_after"},
}


def _where(source: str, section: str, key: str | None = None) -> str:
    return f"{source}: [{section}]" + (f" {key}" if key else "")


def _check_plain(value: Any, where: str, depth: int = 0) -> None:
    """Parameters must be plain values that survive msgpack and TOML alike."""
    if depth > MAX_PARAM_DEPTH:
        raise JobSpecError(f"{where}: nested deeper than {MAX_PARAM_DEPTH}")
    kind = type(value)
    if kind in (bool, str):
        return
    if kind is int:
        if not -(2**63) <= value < 2**63:
            raise JobSpecError(f"{where}: integer {value} does not fit in 64 bits")
        return
    if kind is float:
        return
    if kind is list:
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]", depth + 1)
        return
    if kind is dict:
        for k, item in value.items():
            if type(k) is not str:
                raise JobSpecError(f"{where}: key {k!r} is not a string")
            _check_plain(item, f"{where}.{k}", depth + 1)
        return
    raise JobSpecError(
        f"{where}: a {type(value).__name__} is not allowed here",
        hint="parameters are strings, numbers, booleans, arrays and tables (no dates)",
    )


def _copy_plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_copy_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy_plain(v) for k, v in value.items()}
    return value


def _check_path(value: object, where: str) -> str:
    if type(value) is not str or not value:
        raise JobSpecError(f"{where} must be a non-empty string (a file path), not {value!r}")
    if "\x00" in value or len(value) > MAX_PATH_CHARS:
        raise JobSpecError(f"{where} is not a usable file path: {value[:80]!r}")
    return value


@dataclass(frozen=True)
class JobSpec:
    """A validated job description. Build it with :meth:`load`, :meth:`from_toml` or
    :meth:`from_dict`; ``dataclasses.replace`` gives a changed copy."""

    id: str
    kind: str
    model: str
    """The model path as written in the job file (relative to ``base_dir`` unless absolute)."""
    params: dict[str, Any] = field(default_factory=dict)
    model_hash: str | None = None
    """sha256 of the model file, lowercase hex; verified when the job is built."""
    every_steps: int | None = None
    every_seconds: float | None = DEFAULT_EVERY_SECONDS
    kv: str = "auto"
    intra_op_threads: int = 1
    optimization: str = "all"
    auto_resume_after: float | None = None
    """``[server] auto_resume_after``: seconds offline after which the server resumes the job
    on its own (None: the server's own setting applies). Read by the server only."""
    min_step_seconds: float = field(default=0.0, compare=False)
    """Pacing: the agent starts a step no sooner than this after the previous one started
    (demos and tests, so that a tiny model's job lasts long enough to be interrupted).
    Edge-side only: it changes when steps run, never what they compute, so it is not part
    of the job's identity (not compared, not in :meth:`to_dict`, i.e. not in the BIRTH)."""
    overhead_budget: float = field(default=DEFAULT_OVERHEAD_BUDGET, compare=False)
    """``[snapshot] overhead_budget``: a send the schedule makes due is held back while its
    fixed cost on the link (headers, framing, the server's ACK) would be over this share of
    its payload (0: never held). Edge-side only, like ``min_step_seconds``: not part of the
    job's identity, not in :meth:`to_dict`."""
    max_lag_seconds: float = field(default=DEFAULT_MAX_LAG_SECONDS, compare=False)
    """``[snapshot] max_lag_seconds``: the longest the overhead budget holds a send back,
    counted from the previous send (it never shortens the schedule). Edge-side only."""
    base_dir: Path = field(default=Path("."), compare=True)
    """The folder relative paths resolve against (the job file's folder). Not serialized."""
    source: str = field(default="job spec", compare=False)
    """Where the spec came from, for error messages. Not serialized."""

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> JobSpec:
        """Read and validate a TOML job file. Relative paths resolve against its folder."""
        p = Path(path)
        try:
            size = p.stat().st_size
            if size > MAX_JOB_FILE_BYTES:
                raise JobSpecError(f"{p}: job file is {size} bytes, over {MAX_JOB_FILE_BYTES}")
            raw = p.read_bytes()
        except OSError as exc:
            raise JobSpecError(f"cannot read job file {p}: {exc.strerror or exc}") from exc
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JobSpecError(
                f"{p}: job file is not UTF-8 ({exc.reason} at byte {exc.start})"
            ) from exc
        return cls.from_toml(text, base_dir=p.resolve().parent, source=str(p))

    @classmethod
    def from_toml(
        cls, text: str, *, base_dir: str | os.PathLike[str] = ".", source: str = "job file"
    ) -> JobSpec:
        """Parse TOML text. ``base_dir`` is where relative paths in it resolve."""
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise JobSpecError(f"{source}: not valid TOML: {exc}") from exc
        return cls.from_dict(doc, base_dir=base_dir, source=source)

    @classmethod
    def from_dict(
        cls, data: object, *, base_dir: str | os.PathLike[str] = ".", source: str = "job spec"
    ) -> JobSpec:
        """Validate a dict in the job file's layout (as :meth:`to_dict` writes it, or as a
        BIRTH message carries it). Anything wrong raises :class:`JobSpecError`."""
        if not isinstance(data, Mapping):
            raise JobSpecError(f"{source}: a job spec is a table, not a {type(data).__name__}")
        for name in data:
            if name not in _SECTIONS:
                raise JobSpecError(
                    f"{source}: unknown section or key {name!r}",
                    hint=f"a job file has the tables {', '.join('[' + s + ']' for s in _SECTIONS)}",
                )
        sections: dict[str, Mapping[str, Any]] = {}
        for name, allowed in _SECTIONS.items():
            table = data.get(name, {})
            if not isinstance(table, Mapping):
                raise JobSpecError(f"{source}: [{name}] must be a table, not {table!r}")
            if allowed is not None:
                for key in table:
                    if key not in allowed:
                        raise JobSpecError(
                            f"{_where(source, name, repr(key))} is not a known key",
                            hint=f"[{name}] takes {', '.join(sorted(allowed))}",
                        )
            sections[name] = table

        job = sections["job"]
        if "job" not in data:
            raise JobSpecError(
                f"{source}: the [job] table is missing", hint="it needs id, kind and model"
            )
        for key in ("id", "kind", "model"):
            if key not in job:
                raise JobSpecError(f"{_where(source, 'job', key)} is missing")
        job_id = job["id"]
        if type(job_id) is not str or not ID_PATTERN.fullmatch(job_id):
            raise JobSpecError(
                f"{_where(source, 'job', 'id')} {job_id!r} is not a valid job id",
                hint="1-64 characters: letters, digits, '_', '.', '-', starting with a letter "
                "or digit",
            )
        kind = job["kind"]
        if type(kind) is not str or not KIND_PATTERN.fullmatch(kind):
            raise JobSpecError(
                f"{_where(source, 'job', 'kind')} {kind!r} is not a valid job kind name",
                hint="e.g. 'generate' or 'batch'",
            )
        model = _check_path(job["model"], _where(source, "job", "model"))
        model_hash = job.get("model_hash")
        if model_hash is not None:
            if type(model_hash) is not str or not HASH_PATTERN.fullmatch(model_hash):
                raise JobSpecError(
                    f"{_where(source, 'job', 'model_hash')} {model_hash!r} is not a sha256",
                    hint="64 hex digits, e.g. from `sha256sum model.onnx`",
                )
            model_hash = model_hash.lower()

        params = sections["params"]
        _check_plain(dict(params), _where(source, "params"))

        snap = sections["snapshot"]
        every_steps = snap.get("every_steps")
        if every_steps is not None and (type(every_steps) is not int or every_steps < 1):
            raise JobSpecError(
                f"{_where(source, 'snapshot', 'every_steps')} must be an integer >= 1, "
                f"not {every_steps!r}"
            )
        every_seconds = snap.get("every_seconds")
        if every_seconds is not None:
            if type(every_seconds) not in (int, float) or not (
                math.isfinite(every_seconds) and every_seconds > 0
            ):
                raise JobSpecError(
                    f"{_where(source, 'snapshot', 'every_seconds')} must be a number > 0, "
                    f"not {every_seconds!r}"
                )
            every_seconds = float(every_seconds)
        if every_steps is None and every_seconds is None:
            every_seconds = DEFAULT_EVERY_SECONDS
        budget = snap.get("overhead_budget", DEFAULT_OVERHEAD_BUDGET)
        if type(budget) not in (int, float) or not (
            math.isfinite(budget) and 0 <= budget <= MAX_OVERHEAD_BUDGET
        ):
            raise JobSpecError(
                f"{_where(source, 'snapshot', 'overhead_budget')} must be a number "
                f"0..{MAX_OVERHEAD_BUDGET:g} (a share of the payload: 0.1 is 10%; 0 turns it "
                f"off), not {budget!r}"
            )
        max_lag = snap.get("max_lag_seconds", DEFAULT_MAX_LAG_SECONDS)
        if type(max_lag) not in (int, float) or not (
            math.isfinite(max_lag) and 0 < max_lag <= MAX_LAG_SECONDS
        ):
            raise JobSpecError(
                f"{_where(source, 'snapshot', 'max_lag_seconds')} must be a number of seconds "
                f"> 0 and <= {MAX_LAG_SECONDS:g}, not {max_lag!r}"
            )

        kv = sections["link"].get("kv", "auto")
        if kv not in KV_POLICIES or type(kv) is not str:
            raise JobSpecError(
                f"{_where(source, 'link', 'kv')} must be one of {', '.join(KV_POLICIES)}, "
                f"not {kv!r}"
            )

        runtime = sections["runtime"]
        threads = runtime.get("intra_op_threads", 1)
        if type(threads) is not int or not 0 <= threads <= 1024:
            raise JobSpecError(
                f"{_where(source, 'runtime', 'intra_op_threads')} must be an integer 0..1024 "
                f"(0: onnxruntime's default), not {threads!r}"
            )
        optimization = runtime.get("optimization", "all")
        if type(optimization) is not str or optimization not in OPTIMIZATION_LEVELS:
            raise JobSpecError(
                f"{_where(source, 'runtime', 'optimization')} must be one of "
                f"{', '.join(OPTIMIZATION_LEVELS)}, not {optimization!r}"
            )

        auto_resume_after = sections["server"].get("auto_resume_after")
        if auto_resume_after is not None:
            if type(auto_resume_after) not in (int, float) or not (
                math.isfinite(auto_resume_after) and auto_resume_after >= 0
            ):
                raise JobSpecError(
                    f"{_where(source, 'server', 'auto_resume_after')} must be a number of "
                    f"seconds >= 0, not {auto_resume_after!r}"
                )
            auto_resume_after = float(auto_resume_after)

        pace = runtime.get("min_step_seconds", 0.0)
        if type(pace) not in (int, float) or not (
            math.isfinite(pace) and 0 <= pace <= MAX_MIN_STEP_SECONDS
        ):
            raise JobSpecError(
                f"{_where(source, 'runtime', 'min_step_seconds')} must be a number of seconds "
                f"0..{MAX_MIN_STEP_SECONDS:g}, not {pace!r}"
            )

        return cls(
            id=job_id,
            kind=kind,
            model=model,
            params=_copy_plain(dict(params)),
            model_hash=model_hash,
            every_steps=every_steps,
            every_seconds=every_seconds,
            kv=kv,
            intra_op_threads=threads,
            optimization=optimization,
            auto_resume_after=auto_resume_after,
            min_step_seconds=float(pace),
            overhead_budget=float(budget),
            max_lag_seconds=float(max_lag),
            base_dir=Path(base_dir),
            source=source,
        )

    # -- use ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The spec as a plain dict in the job file's layout, every default filled in
        (``min_step_seconds``, ``overhead_budget`` and ``max_lag_seconds``, edge-side pacing,
        are left out: they are not the job's identity).
        ``JobSpec.from_dict(spec.to_dict(), base_dir=spec.base_dir) == spec``."""
        job: dict[str, Any] = {"id": self.id, "kind": self.kind, "model": self.model}
        if self.model_hash is not None:
            job["model_hash"] = self.model_hash
        snapshot: dict[str, Any] = {}
        if self.every_steps is not None:
            snapshot["every_steps"] = self.every_steps
        if self.every_seconds is not None:
            snapshot["every_seconds"] = self.every_seconds
        out: dict[str, Any] = {
            "job": job,
            "params": _copy_plain(self.params),
            "snapshot": snapshot,
            "link": {"kv": self.kv},
            "runtime": {
                "intra_op_threads": self.intra_op_threads,
                "optimization": self.optimization,
            },
        }
        if self.auto_resume_after is not None:  # only when set: older births stay the same
            out["server"] = {"auto_resume_after": self.auto_resume_after}
        return out

    def resolve(self, path: str) -> Path:
        """A path from the job file, resolved against ``base_dir`` unless absolute."""
        p = Path(path)
        return p if p.is_absolute() else self.base_dir / p

    @property
    def model_path(self) -> Path:
        return self.resolve(self.model)

    def replace(self, **changes: Any) -> JobSpec:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def with_params(self, **changes: Any) -> JobSpec:
        """A copy whose params have some keys set (a job pins e.g. ``dataset_hash``)."""
        params = _copy_plain(self.params)
        params.update(changes)
        _check_plain(params, _where(self.source, "params"))
        return self.replace(params=params)
