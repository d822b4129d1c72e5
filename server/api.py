"""The resume API: FastAPI over the store and the resume worker (OpenAPI at ``/docs``).

    app = create_app(store, token="s3cret", resumer=worker, liveness=liveness)
    server = ApiServer(app, host="127.0.0.1", port=8080).start()     # uvicorn in a thread
    ...
    server.stop()

Routes (docs/server.md has curl examples for each):

* ``GET /healthz`` (no auth): the process is up, and what its roles report.
* ``GET /metrics`` (no auth): Prometheus text exposition (``server.metrics``).
* ``GET /`` (also ``/status``) and ``GET /static/{name}`` (no auth): the status page, static
  files from ``server/static/`` (no secrets in them: the page asks for the token and sends it
  on its own requests to ``/v1``).
* ``GET /v1/devices``: devices with online state, last seen, their jobs.
* ``GET /v1/jobs``: jobs with status, progress, seq, owner, epoch, bytes received vs full
  size, last snapshot age, resume.
* ``GET /v1/jobs/{job_id}``: one job, its snapshot chain and status history.
* ``POST /v1/jobs/{job_id}/resume``: resume on the server (idempotent: 202 with a new resume,
  200 with the one already under way).
* ``POST /v1/jobs/{job_id}/handover``: a live hand-over from an online device.
* ``GET /v1/jobs/{job_id}/outputs``: outputs by position as JSON; ``.../outputs/{name}.npy``:
  one output as a raw ``.npy`` file.

Every ``/v1`` route needs ``Authorization: Bearer <token>``; the token is compared in
constant time, and a missing or wrong one gets 401 with ``WWW-Authenticate: Bearer``.

The worker is reached only through :class:`server.control.Resumer`; without one (a process
not running the worker role) the resume and hand-over routes answer 503.

This module owns the HTTP surface. It never changes a job's owner or epoch itself and holds
no protocol logic.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import logging
import math
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from edge_agent.errors import (
    EdgeResumeError,
    Fenced,
    JobError,
    ProtocolError,
    StoreError,
)
from edge_agent.protocol.messages import is_valid_id
from server import metrics
from server.control import Resumer, ResumeStatus
from server.liveness import Liveness
from server.outputs import job_kind
from server.store import JobRecord, SnapshotRecord, Store

__all__ = ["ApiServer", "create_app"]

log = logging.getLogger("server.api")

API_VERSION = "1"

STATIC_DIR = Path(__file__).resolve().parent / "static"
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
# The status page loads nothing from elsewhere and runs no inline script: an injected
# string can neither run nor phone home (the page only ever writes text into the DOM).
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "Cache-Control": "no-cache",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}


# ---------------------------------------------------------------------------------------------
# Response models (they make the OpenAPI document at /docs).


class ResumeModel(BaseModel):
    job_id: str
    phase: str = Field(description="queued, claiming, replaying, rebuilding, running, "
                       "completed, failed or handover-requested")  # fmt: skip
    attempt: int
    epoch: int | None
    requested_at: float
    first_step_at: float | None
    finished_at: float | None
    error: str | None
    start_step: int | None = Field(
        default=None,
        description="the step of the state the run started from (the acknowledged state's)",
    )
    rebuilt: list[str] = Field(
        default_factory=list,
        description="derivable entries recomputed on the server because the device had not "
        "sent them (a generate job's KV cache); empty when nothing was rebuilt",
    )

    @classmethod
    def of(cls, r: ResumeStatus | None) -> ResumeModel | None:
        if r is None:
            return None
        return cls(
            job_id=r.job_id,
            phase=r.phase,
            attempt=r.attempt,
            epoch=r.epoch,
            requested_at=r.requested_at,
            first_step_at=r.first_step_at,
            finished_at=r.finished_at,
            error=r.error,
            start_step=r.start_step,
            rebuilt=list(r.rebuilt),
        )


class DeviceModel(BaseModel):
    device: str
    online: bool
    online_since: float = Field(description="when `online` last changed (Unix seconds)")
    first_seen: float
    last_seen: float
    last_seen_age_s: float = Field(description="seconds since `last_seen`, by the server's clock")
    jobs: list[str]


class ProgressModel(BaseModel):
    step: int = Field(description="the step of the acknowledged state")
    total_steps: int | None
    fraction: float | None
    device_step: int | None = Field(
        None, description="the step the device reported in its newest heartbeat"
    )


class JobModel(BaseModel):
    job: str
    device: str
    kind: str | None
    status: str
    status_at: float
    status_age_s: float = Field(description="seconds in this status, by the server's clock")
    owner: str
    epoch: int
    seq: int | None = Field(description="the acknowledged snapshot's seq")
    state_hash: str | None
    progress: ProgressModel
    bytes_received: int = Field(description="snapshot payload bytes committed over the job's life")
    full_size: int = Field(description="the size of the newest acknowledged state")
    snapshots: int
    last_snapshot_at: float | None
    last_snapshot_age_s: float | None = Field(
        description="seconds since the acknowledged snapshot was committed (server's clock)"
    )
    attempts: int
    born_at: float
    births: int
    resume: ResumeModel | None


class SnapshotModel(BaseModel):
    seq: int
    base_seq: int | None
    epoch: int
    kind: str
    state_hash: str
    size: int
    received_size: int
    full_size: int
    committed_at: float


class StatusChangeModel(BaseModel):
    at: float
    status: str
    detail: str


class JobDetailModel(JobModel):
    spec: dict[str, Any]
    model_hash: str
    codec_version: int
    chain: list[SnapshotModel] = Field(description="the snapshots that replay to the state")
    snapshots_held: list[SnapshotModel] = Field(description="every snapshot the store holds")
    history: list[StatusChangeModel]
    outputs: dict[str, int] = Field(description="output name -> positions stored")


class OutputModel(BaseModel):
    dtype: str
    shape: list[int] = Field(description="shape of the rows returned (positions first)")
    start: int
    stop: int
    values: list[Any]


class OutputsModel(BaseModel):
    job: str
    status: str
    complete: bool = Field(description="the job is completed: no more outputs will come")
    outputs: dict[str, OutputModel]


class ResumeRequest(BaseModel):
    reason: str = "api"


class HealthModel(BaseModel):
    status: str
    version: str
    roles: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Helpers.


def _job_model(
    rec: JobRecord,
    now: float,
    last: SnapshotRecord | None,
    resume: ResumeStatus | None,
    device_step: int | None,
) -> dict[str, Any]:
    total = rec.total_steps
    fraction = min(1.0, rec.step / total) if total else (1.0 if rec.status == "completed" else None)
    return {
        "job": rec.job,
        "device": rec.device,
        "kind": job_kind(rec.spec),
        "status": rec.status,
        "status_at": rec.status_at,
        "status_age_s": max(0.0, now - rec.status_at),
        "owner": rec.owner,
        "epoch": rec.epoch,
        "seq": rec.seq,
        "state_hash": rec.state_hash.hex() if rec.state_hash else None,
        "progress": {
            "step": rec.step,
            "total_steps": total,
            "fraction": fraction,
            "device_step": device_step,
        },
        "bytes_received": rec.bytes_received,
        "full_size": rec.full_size,
        "snapshots": rec.snapshots,
        "last_snapshot_at": last.committed_at if last else None,
        "last_snapshot_age_s": max(0.0, now - last.committed_at) if last else None,
        "attempts": rec.attempts,
        "born_at": rec.born_at,
        "births": rec.births,
        "resume": ResumeModel.of(resume),
    }


def _snapshot_model(r: SnapshotRecord) -> SnapshotModel:
    return SnapshotModel(
        seq=r.seq,
        base_seq=r.base_seq,
        epoch=r.epoch,
        kind=r.kind,
        state_hash=r.state_hash.hex(),
        size=r.size,
        received_size=r.received_size,
        full_size=r.full_size,
        committed_at=r.committed_at,
    )


def _jsonable(a: np.ndarray) -> list[Any]:
    if a.dtype.kind in "biuf":
        values: list[Any] = a.tolist()
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            values = _finite(values)
        return values
    if a.dtype.kind == "c":
        return list(_finite(np.stack([a.real, a.imag], axis=-1).tolist()))
    if a.dtype.kind in "SV":
        return [bytes(x).hex() for x in a.reshape(-1)]
    return [str(x) for x in a.reshape(-1)]


def _finite(values: Any) -> Any:
    """NaN/inf are not JSON: give them as strings."""
    if isinstance(values, list):
        return [_finite(v) for v in values]
    if isinstance(values, float) and not math.isfinite(values):
        return str(values)
    return values


def _error(status: int, detail: str, **headers: str) -> HTTPException:
    return HTTPException(status_code=status, detail=detail, headers=headers or None)


# ---------------------------------------------------------------------------------------------
# The app.


def create_app(
    store: Store,
    *,
    token: str,
    resumer: Resumer | None = None,
    liveness: Liveness | None = None,
    health: Callable[[], dict[str, Any]] | None = None,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """The API over ``store``. ``token``: the bearer token (required, non-empty).
    ``resumer``: the worker (None: resume/hand-over answer 503). ``liveness``: adds
    device-reported steps. ``health``: extra facts for ``/healthz`` (roles' states)."""
    if not token:
        raise ValueError("the API needs a non-empty bearer token")
    expected = token.encode("utf-8")
    bearer = HTTPBearer(auto_error=False, description="the token from [api] token / token_file")

    def require_token(
        creds: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
    ) -> None:
        if creds is None:
            raise _error(
                401, "missing bearer token", **{"WWW-Authenticate": 'Bearer realm="edge-resume"'}
            )
        if not hmac.compare_digest(creds.credentials.encode("utf-8"), expected):
            raise _error(
                401,
                "invalid bearer token",
                **{"WWW-Authenticate": 'Bearer realm="edge-resume", error="invalid_token"'},
            )

    app = FastAPI(
        title="edge-resume",
        version=API_VERSION,
        description="Resume edge inference jobs on the server: devices, jobs, their snapshot "
        "chains, resumes, live hand-overs and outputs.",
    )
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_token)])

    @app.exception_handler(EdgeResumeError)
    async def _edge_error(request: Request, exc: EdgeResumeError) -> JSONResponse:
        log.error("%s %s failed: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": str(exc)}, status_code=500)

    def job_or_404(job_id: str) -> JobRecord:
        if not is_valid_id(job_id):
            raise _error(404, f"no job {job_id!r} (not a valid job id)")
        rec = store.get_job(job_id)
        if rec is None:
            raise _error(404, f"no job {job_id!r}")
        return rec

    def resume_of(job_id: str) -> ResumeStatus | None:
        if resumer is None:
            return None
        try:
            return resumer.status(job_id)
        except EdgeResumeError as exc:
            log.warning("resume status of %s: %s", job_id, exc)
            return None

    def device_step(job_id: str) -> int | None:
        if liveness is None:
            return None
        s = liveness.device_step(job_id)
        return None if s is None else s[0]

    def chain_of(rec: JobRecord) -> list[SnapshotRecord]:
        return store.chain(rec.job) if rec.seq is not None else []

    def last_snapshot(rec: JobRecord) -> SnapshotRecord | None:
        chain = chain_of(rec)
        return chain[-1] if chain else None

    @app.get("/healthz", response_model=HealthModel, tags=["ops"])
    def healthz() -> dict[str, Any]:
        """Liveness of this process (no auth). ``status`` is ``ok`` or ``degraded`` (a role
        reports a problem, e.g. the MQTT link is down)."""
        roles = health() if health is not None else {}
        ok = all(not isinstance(v, dict) or v.get("ok", True) for v in roles.values())
        return {"status": "ok" if ok else "degraded", "version": API_VERSION, "roles": roles}

    @app.get("/metrics", tags=["ops"], response_class=Response)
    def metrics_text() -> Response:
        """Prometheus text exposition (no auth)."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    static = _static_files(STATIC_DIR)

    def static_response(name: str) -> Response:
        found = static.get(name)
        if found is None:
            raise _error(404, f"no static file {name!r}")
        body, media_type = found
        return Response(body, media_type=media_type, headers=_PAGE_HEADERS)

    @app.get("/", include_in_schema=False, response_class=Response)
    @app.get("/status", include_in_schema=False, response_class=Response)
    def status_page() -> Response:
        """The status page (no auth: it holds no data; it asks for the token)."""
        return static_response("index.html")

    @app.get("/static/{name}", include_in_schema=False, response_class=Response)
    def static_file(name: str) -> Response:
        return static_response(name)

    @v1.get("/devices", response_model=list[DeviceModel], tags=["devices"])
    def list_devices() -> list[dict[str, Any]]:
        """Every device the server has heard from."""
        jobs: dict[str, list[str]] = {}
        for j in store.list_jobs():
            jobs.setdefault(j.device, []).append(j.job)
        now = clock()
        out = []
        for d in store.list_devices():
            live = liveness.device(d.device) if liveness is not None else None
            last_seen = max(d.last_seen, live.last_seen) if live else d.last_seen
            out.append(
                {
                    "device": d.device,
                    "online": live.online if live else d.online,
                    "online_since": live.since if live else d.online_at,
                    "first_seen": d.first_seen,
                    "last_seen": last_seen,
                    "last_seen_age_s": max(0.0, now - last_seen),
                    "jobs": jobs.get(d.device, []),
                }
            )
        return out

    @v1.get("/jobs", response_model=list[JobModel], tags=["jobs"])
    def list_jobs(
        status: str | None = Query(None, description="only jobs in this status"),
        device: str | None = Query(None, description="only this device's jobs"),
    ) -> list[dict[str, Any]]:
        """Every job, with status, progress, seq, owner, epoch, bytes and snapshot age."""
        if device is not None and not is_valid_id(device):
            return []
        now = clock()
        recs = store.list_jobs(device)
        return [
            _job_model(r, now, last_snapshot(r), resume_of(r.job), device_step(r.job))
            for r in recs
            if status is None or r.status == status
        ]

    @v1.get("/jobs/{job_id}", response_model=JobDetailModel, tags=["jobs"])
    def get_job(job_id: str) -> dict[str, Any]:
        """One job: everything in the list, plus its birth, snapshot chain, every snapshot
        held, its status history and how many output positions are stored."""
        rec = job_or_404(job_id)
        chain = chain_of(rec)
        held = store.snapshots(job_id)
        outs = store.get_outputs(job_id)
        body = _job_model(
            rec,
            clock(),
            chain[-1] if chain else None,
            resume_of(job_id),
            device_step(job_id),
        )
        body.update(
            spec=rec.spec,
            model_hash=rec.model_hash,
            codec_version=rec.codec_version,
            chain=[_snapshot_model(r) for r in chain],
            snapshots_held=[_snapshot_model(r) for r in held],
            history=[
                StatusChangeModel(at=h.at, status=h.status, detail=h.detail)
                for h in store.status_history(job_id)
            ],
            outputs={name: int(a.shape[0]) for name, a in outs.items()},
        )
        return body

    def _call(fn: Callable[[], ResumeStatus]) -> ResumeStatus:
        try:
            return fn()
        except (ProtocolError, Fenced, JobError) as exc:
            raise _error(409, str(exc)) from exc
        except StoreError as exc:
            raise _error(404 if "unknown job" in str(exc) else 500, str(exc)) from exc

    @v1.post(
        "/jobs/{job_id}/resume",
        response_model=ResumeModel,
        status_code=202,
        tags=["jobs"],
        responses={
            200: {"description": "a resume of this job is already under way: it is returned"},
            404: {"description": "no such job"},
            409: {"description": "the job is completed, or cannot be resumed now"},
            503: {"description": "no resume worker runs in this process"},
        },
    )
    def resume(
        job_id: str, response: Response, body: ResumeRequest | None = None
    ) -> ResumeModel | None:
        """Resume the job on the server from its newest acknowledged state. Idempotent:
        while a resume is under way, calling again returns it (200) instead of starting
        another."""
        rec = job_or_404(job_id)
        if rec.status == "completed":
            raise _error(409, f"job {job_id} is completed")
        if resumer is None:
            raise _error(503, "no resume worker runs in this process")
        before = resume_of(job_id)
        reason = body.reason if body is not None else "api"
        after = _call(lambda: resumer.request_resume(job_id, reason=reason))
        if before is not None and before.active and before.attempt == after.attempt:
            response.status_code = 200
        return ResumeModel.of(after)

    @v1.post(
        "/jobs/{job_id}/handover",
        response_model=ResumeModel,
        status_code=202,
        tags=["jobs"],
        responses={
            404: {"description": "no such job"},
            409: {"description": "completed, owned by the server, or its device is offline"},
            503: {"description": "no resume worker runs in this process"},
        },
    )
    def handover(job_id: str) -> ResumeModel | None:
        """Live hand-over: the (online) device sends a final snapshot with everything,
        releases the job, and the server runs it on without recomputing anything."""
        rec = job_or_404(job_id)
        if rec.status == "completed":
            raise _error(409, f"job {job_id} is completed")
        if rec.owner != "edge":
            raise _error(409, f"job {job_id} is already owned by the server")
        dev = liveness.device(rec.device) if liveness is not None else None
        online = dev.online if dev is not None else _store_online(store, rec.device)
        if not online:
            raise _error(409, f"device {rec.device} is offline: resume the job instead")
        if resumer is None:
            raise _error(503, "no resume worker runs in this process")
        return ResumeModel.of(_call(lambda: resumer.request_handover(job_id)))

    @v1.get(
        "/jobs/{job_id}/outputs",
        response_model=OutputsModel,
        tags=["outputs"],
        responses={404: {"description": "no such job, or no outputs yet"}},
    )
    def outputs(
        job_id: str,
        start: int = Query(0, ge=0, description="first position"),
        stop: int | None = Query(None, ge=0, description="end position (exclusive)"),
    ) -> dict[str, Any]:
        """The job's outputs by position (row i of each output is position i): for
        ``generate`` the generated ``tokens``, for ``batch`` the ``results`` rows."""
        rec = job_or_404(job_id)
        arrays = _outputs(store, job_id, start, stop)
        return {
            "job": job_id,
            "status": rec.status,
            "complete": rec.status == "completed",
            "outputs": {
                name: {
                    "dtype": a.dtype.str,
                    "shape": list(a.shape),
                    "start": start,
                    "stop": start + int(a.shape[0]),
                    "values": _jsonable(a),
                }
                for name, a in arrays.items()
            },
        }

    @v1.get(
        "/jobs/{job_id}/outputs/{name}.npy",
        tags=["outputs"],
        response_class=Response,
        responses={
            200: {"content": {"application/octet-stream": {}}, "description": "a .npy file"},
            404: {"description": "no such job or output"},
        },
    )
    def output_npy(job_id: str, name: str) -> Response:
        """One output as a NumPy ``.npy`` file (``numpy.load`` reads it)."""
        job_or_404(job_id)
        arrays = _outputs(store, job_id, 0, None)
        if name not in arrays:
            raise _error(404, f"job {job_id} has no output {name!r}")
        buf = io.BytesIO()
        np.save(buf, arrays[name], allow_pickle=False)
        return Response(
            buf.getvalue(),
            media_type="application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{job_id}-{name}.npy"'},
        )

    app.include_router(v1)
    return app


def _static_files(folder: Path) -> dict[str, tuple[bytes, str]]:
    """The status page's files, read once: name -> (bytes, media type). Only plain files
    directly in ``folder`` with a known suffix are served, so no request path can reach
    anything else."""
    out: dict[str, tuple[bytes, str]] = {}
    if not folder.is_dir():
        log.warning("no status page: %s is missing", folder)
        return out
    for path in sorted(folder.iterdir()):
        media_type = _MEDIA_TYPES.get(path.suffix)
        if media_type is not None and path.is_file():
            out[path.name] = (path.read_bytes(), media_type)
    return out


def _store_online(store: Store, device: str) -> bool:
    d = store.get_device(device)
    return bool(d and d.online)


def _outputs(store: Store, job_id: str, start: int, stop: int | None) -> dict[str, np.ndarray]:
    if stop is not None and stop < start:
        raise _error(422, "stop must be >= start")
    try:
        arrays = store.get_outputs(job_id, start, stop)
    except StoreError as exc:
        raise _error(404, str(exc)) from exc
    if not arrays:
        raise _error(404, f"job {job_id} has no outputs yet")
    return arrays


# ---------------------------------------------------------------------------------------------
# Serving.


class ApiServer:
    """uvicorn serving ``app`` in a background thread (no signal handlers of its own: the
    process's owner stops it with :meth:`stop`). ``port`` 0 picks a free port; read
    :attr:`port` after :meth:`start`."""

    def __init__(self, app: FastAPI, *, host: str = "127.0.0.1", port: int = 8080) -> None:
        import uvicorn

        self.host = host
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as exc:
            self._sock.close()
            raise EdgeResumeError(
                f"the API cannot listen on {host}:{port}: {exc.strerror or exc}",
                hint="set [api] port / EDGE_SERVER_API_PORT to a free port",
            ) from exc
        self.port = int(self._sock.getsockname()[1])
        self._server = uvicorn.Server(
            uvicorn.Config(app, log_config=None, access_log=False, lifespan="off")
        )
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ApiServer:
        def run() -> None:
            asyncio.run(self._server.serve(sockets=[self._sock]))

        self._thread = threading.Thread(target=run, name="api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise EdgeResumeError(f"the API on {self.url} did not start")
            if time.monotonic() > deadline:
                raise EdgeResumeError(f"the API on {self.url} did not start in {timeout}s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._sock.close()
