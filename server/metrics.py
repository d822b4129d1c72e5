"""The server's Prometheus metrics: one registry, every metric object, and the text exporter.

    from server import metrics
    metrics.COMMITS.labels(kind="delta").inc()
    with metrics.REPLAY_SECONDS.time(): ...          # the resume worker
    body, content_type = metrics.render()            # GET /metrics

Every metric lives in :data:`REGISTRY` (not prometheus-client's global default registry), so
that importing this module twice or running several servers in one test process never
collides with other libraries' collectors. Metric objects are module-level: the ingest, the
liveness tracker, the API and the resume worker import and update the same ones. Counters
are exported with the ``_total`` suffix (``edge_resume_commits_total``). docs/server.md
lists them all.

This module owns metric names, help texts, labels and buckets. It never reads the store or
the network; callers decide what to count.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = [
    "ACKS",
    "BYTES_IN",
    "COMMITS",
    "COMMIT_BYTES",
    "COMMIT_FAILURES",
    "COMMIT_SECONDS",
    "COMPLETIONS",
    "CTL_PUBLISHED",
    "DEVICES_ONLINE",
    "INGEST_ERRORS",
    "JOB_TRANSITIONS",
    "MESSAGES_IN",
    "NACKS",
    "REFUSED",
    "REGISTRY",
    "REPLAY_BYTES",
    "REPLAY_SECONDS",
    "RESUMES",
    "RESUME_SECONDS",
    "RESUME_STEPS",
    "RESYNCS",
    "STATE_CACHE",
    "TAKEOVERS",
    "render",
]

REGISTRY = CollectorRegistry(auto_describe=True)

_SIZE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_LONG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)

# -- ingest --------------------------------------------------------------------------------

MESSAGES_IN = Counter(
    "edge_resume_messages_in",
    "MQTT messages received by the ingest, by protocol message type "
    "(status, hb, birth, snap, query, done, release, ctl; 'invalid' if it could not be decoded)",
    ["type"],
    registry=REGISTRY,
)
BYTES_IN = Counter(
    "edge_resume_bytes_in",
    "MQTT payload bytes received by the ingest, by protocol message type",
    ["type"],
    registry=REGISTRY,
)
REFUSED = Counter(
    "edge_resume_refused_messages",
    "Messages refused without changing anything, by the error that refused them "
    "(TopicMismatch: wrong device or job for the topic; Fenced: an older epoch or a job the "
    "server owns; MalformedMessage, InvalidTopic, ChunkRejected, ...)",
    ["reason"],
    registry=REGISTRY,
)
ACKS = Counter("edge_resume_acks", "ACKs published", registry=REGISTRY)
NACKS = Counter(
    "edge_resume_nacks",
    "NACKs published, by reason (base, corrupt, hash, fenced, unknown, too-large, invalid)",
    ["reason"],
    registry=REGISTRY,
)
RESYNCS = Counter(
    "edge_resume_resyncs",
    "Full snapshots committed on top of an acknowledged state: what a broken chain, a failed "
    "hash or a lost agent journal cost (a Sparkplug 'rebirth')",
    registry=REGISTRY,
)
COMMITS = Counter(
    "edge_resume_commits",
    "Snapshots applied, verified and stored durably, by kind (full, delta)",
    ["kind"],
    registry=REGISTRY,
)
COMMIT_BYTES = Counter(
    "edge_resume_commit_bytes",
    "Payload bytes of committed snapshots, by kind (full, delta)",
    ["kind"],
    registry=REGISTRY,
)
COMMIT_FAILURES = Counter(
    "edge_resume_commit_failures",
    "Snapshots that were not committed, by cause (codec: the payload did not apply or verify; "
    "fenced: the job's epoch moved on; store: the store refused or failed)",
    ["reason"],
    registry=REGISTRY,
)
COMMIT_SECONDS = Histogram(
    "edge_resume_commit_seconds",
    "Time from a complete transfer to its durable commit (apply, verify, store)",
    buckets=_SIZE_BUCKETS,
    registry=REGISTRY,
)
STATE_CACHE = Counter(
    "edge_resume_state_cache_lookups",
    "Base-state lookups for a delta: hit (in memory) or miss (replayed from the store)",
    ["result"],
    registry=REGISTRY,
)
TAKEOVERS = Counter(
    "edge_resume_takeovers",
    "Epochs raised to make the server a job's owner, by reason (takeover: a resume claim; "
    "release: a live hand-over; reclaim: a new attempt on a job the server already owns)",
    ["reason"],
    registry=REGISTRY,
)
CTL_PUBLISHED = Counter(
    "edge_resume_ctl_published",
    "Retained control messages published, by request (run, handover, stop)",
    ["request"],
    registry=REGISTRY,
)
COMPLETIONS = Counter(
    "edge_resume_jobs_completed",
    "Jobs recorded completed, by where they finished (edge, server)",
    ["where"],
    registry=REGISTRY,
)
INGEST_ERRORS = Counter(
    "edge_resume_ingest_errors",
    "Effects the ingest could not carry out (the job's session is rebuilt from the store), "
    "by what failed",
    ["what"],
    registry=REGISTRY,
)

# -- liveness ------------------------------------------------------------------------------

DEVICES_ONLINE = Gauge(
    "edge_resume_devices_online", "Devices currently considered online", registry=REGISTRY
)
JOB_TRANSITIONS = Counter(
    "edge_resume_job_transitions",
    "Job status transitions recorded, by the status entered",
    ["status"],
    registry=REGISTRY,
)

# -- the resume worker (observed by server.worker) -----------------------------------------

REPLAY_SECONDS = Histogram(
    "edge_resume_replay_seconds",
    "Resume worker: time to replay a job's stored baseline and deltas into its state",
    ["backend", "device"],
    buckets=_LONG_BUCKETS,
    registry=REGISTRY,
)
REPLAY_BYTES = Counter(
    "edge_resume_replay_bytes",
    "Resume worker: stored payload bytes replayed",
    registry=REGISTRY,
)
RESUME_SECONDS = Histogram(
    "edge_resume_resume_seconds",
    "Resume worker: time from the resume request to the first resumed step",
    buckets=_LONG_BUCKETS,
    registry=REGISTRY,
)
RESUMES = Counter(
    "edge_resume_resumes",
    "Resume worker: resume attempts by outcome (completed, retry, failed, fenced, stopped)",
    ["outcome"],
    registry=REGISTRY,
)
RESUME_STEPS = Counter(
    "edge_resume_resume_steps",
    "Resume worker: job steps run on the server",
    registry=REGISTRY,
)


def render() -> tuple[bytes, str]:
    """The Prometheus text exposition of every metric, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
