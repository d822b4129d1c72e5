"""Jobs: the step/state/restore contract, the job file, and the built-in kinds.

``JobSpec`` (``spec``) parses job files; ``Job`` and the kind registry live in ``base``;
``generate`` and ``batch`` are the built-in kinds, imported only when used (they pull in
onnxruntime). See ``docs/jobs.md``. This package never touches the network or the journal.
"""

from edge_agent.jobs.base import (
    ENTRY_POINT_GROUP,
    Job,
    available_kinds,
    create_job,
    file_sha256,
    load_job,
    load_job_class,
    register,
    unregister,
)
from edge_agent.jobs.spec import JobSpec

__all__ = [
    "ENTRY_POINT_GROUP",
    "Job",
    "JobSpec",
    "available_kinds",
    "create_job",
    "file_sha256",
    "load_job",
    "load_job_class",
    "register",
    "unregister",
]
