"""A whole edge-resume deployment on one machine, every part a real process of its own.

    with Cluster(tmp_path, tiny_models) as c:            # Mosquitto + edge-server serve
        job = c.generate_job("gen-1", tokens=2000, kv="send")
        agent = c.add_agent("gw-1", [job]).start()        # edge-agent run, behind a TCP proxy
        c.wait_for(lambda: agent.acked_step("gen-1") >= 500, 60, "500 steps on the server")
        agent.kill()                                      # SIGKILL; or agent.drop_link() /
                                                          # agent.block_link() while it runs
        c.wait_for(lambda: c.api.job("gen-1")["status"] == "offline", 20, "offline")
        c.api.resume("gen-1")
        ...
        assert c.api.outputs("gen-1") == reference_outputs(job)   # (numpy comparison)

What runs, each started with ``PYTHONPATH`` set to this tree (never an installed copy):

* **the broker**: Mosquitto with the project's configuration (``tests/support/broker.py``),
  on a free port. ``c.broker.kill()`` / ``.start()`` restart it on the same port.
* **the server**: ``python -m server.cli serve`` with every role (ingest, resume worker,
  API) as ``edge-server serve`` runs them, configured by a TOML file the harness writes
  (``ServerProcess.config``): a SQLite store in the work folder, the models/data folder, a
  bearer token, a short heartbeat timeout, a worker on one torch thread. ``server_config``
  overrides any key (``{"store": {"max_deltas": 1}}``). ``c.server.kill()`` (SIGKILL),
  ``.terminate()`` (SIGTERM, clean stop), ``.start()`` again on the same store and port.
* **agents**: ``python -m edge_agent.cli run JOB.toml ...`` as a gateway runs it (the
  server's dependencies blocked: ``tests/support/agent_proc.py``), each with its own
  journal and its own :class:`~tests.support.mqtt_proxy.MqttProxy` in front of the broker,
  so a test can cut the link while the agent keeps running: ``drop_link()`` (connections
  closed, new ones refused: the broker sees the close and fires the will), ``block_link()``
  (nothing flows either way but every socket stays open: only the heartbeat timeout can
  tell), ``restore_link()``.

Helpers: :class:`ApiClient` (httpx, bearer token: jobs, resume, hand-over, outputs as numpy
arrays, Prometheus metrics), :meth:`Cluster.wait_for` (polls a condition; on a timeout it
fails with what it waited for and the tail of every process's log), job files for the tiny
models, and :func:`reference_run` (the same job uninterrupted, in this process, for
comparing outputs bit for bit).

Every process and proxy the cluster started is stopped by :meth:`Cluster.close` (also on
an exception inside ``with``). :func:`running_cluster` is the context manager a pytest
fixture wants: it starts the cluster and, on the way out, prints :meth:`Cluster.report`
(every log's tail; pytest shows it only when the test failed) and closes it. docs/e2e.md
has a tour.

This module starts, stops and observes processes. It holds no product logic: everything
it checks, it reads from the API, the journals (read-only), the store (read-only, after the
server stopped) or the processes' logs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np

from edge_agent.jobs import Job, JobSpec, create_job
from edge_agent.journal import Journal
from tests.support.agent_proc import AgentProcess, write_job
from tests.support.broker import Broker, free_port
from tests.support.mqtt_proxy import Injection, MqttProxy

__all__ = [
    "PROMPT",
    "AgentNode",
    "ApiClient",
    "Cluster",
    "LogFollower",
    "Metrics",
    "ServerProcess",
    "reference_run",
    "running_cluster",
    "wait_until",
]

REPO = Path(__file__).resolve().parents[2]
PROMPT = "The gateway said: "
T = TypeVar("T")


def wait_until(
    cond: Callable[[], T | None],
    timeout: float,
    what: str,
    *,
    interval: float = 0.02,
    check: Callable[[], None] | None = None,
    report: Callable[[], str] | None = None,
) -> T:
    """Poll ``cond`` until it returns something truthy (returned). ``check`` runs on every
    poll and may raise (e.g. "the agent exited"). On a timeout, AssertionError naming
    ``what``, with ``report()`` (the processes' logs) appended."""
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{report()}" if report is not None else ""
            raise AssertionError(f"timed out after {timeout:g}s waiting for: {what}{extra}")
        time.sleep(interval)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (int, float)):
        return repr(v)
    raise TypeError(f"cannot write {v!r} to TOML")


def _tail(path: Path, n: int) -> str:
    if not path.exists():
        return "(no log)"
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-n:])


class LogFollower:
    """New lines of a growing log file since the last call (for reacting to a log line
    within milliseconds, e.g. to SIGKILL a process in the middle of something it logs)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def new_lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        return [line.decode(errors="replace") for line in lines]


# ---------------------------------------------------------------------------------------------
# The server process.


class ServerProcess:
    """``python -m server.cli serve`` (all roles) on a store in ``workdir``. Start it with
    :meth:`start` (waits until the API answers and the ingest is connected); :meth:`kill`,
    :meth:`terminate` and :meth:`start` again keep the store, the port and the token."""

    def __init__(
        self,
        workdir: Path,
        broker_url: str,
        models_dir: Path,
        *,
        token: str = "e2e-token-0123456789abcdef",
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        log_level: str = "info",
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.store_path = workdir / "store"
        self.token = token
        self.port = free_port()
        self.log_level = log_level
        self.config: dict[str, dict[str, Any]] = {
            "broker": {"url": broker_url, "client_id": "edge-server", "keepalive": 10},
            "store": {"path": str(self.store_path), "compact_interval_s": 0.5},
            "liveness": {"heartbeat_timeout_s": 2.0, "check_interval_s": 0.2},
            "api": {"host": "127.0.0.1", "port": self.port, "token": token},
            "worker": {
                "models_dir": str(models_dir),
                "data_dir": str(models_dir),
                "device": "cpu",
                "max_attempts": 2,
                "retry_initial_s": 0.5,
                "retry_max_s": 1.0,
                "torch_threads": 1,
                "auto_poll_s": 0.5,
            },
        }
        for section, keys in (overrides or {}).items():
            self.config.setdefault(section, {}).update(keys)
        self.config_path = workdir / "server.toml"
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.logs: list[Path] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self) -> None:
        lines = []
        for section, keys in self.config.items():
            lines.append(f"[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in keys.items() if v is not None]
            lines.append("")
        self.config_path.write_text("\n".join(lines))

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_SERVER_")}
        env["PYTHONPATH"] = str(REPO)
        env["OMP_NUM_THREADS"] = "1"
        return env

    def start(self, timeout: float = 60.0, *, wait: bool = True) -> ServerProcess:
        """Start the process; with ``wait`` (the default) return once it is ready (the API
        answers, the ingest and the worker are connected to the broker); else at once
        (:meth:`wait_ready` later)."""
        assert not self.alive, "the server is already running"
        self.write_config()
        self.runs += 1
        log = self.workdir / f"server-{self.runs}.log"
        self.logs.append(log)
        cmd = [
            sys.executable, "-m", "server.cli", "serve", "--config", str(self.config_path),
            "--log-level", self.log_level,
        ]  # fmt: skip
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(
                cmd, env=self.env(), cwd=self.workdir, stdout=fh, stderr=fh
            )
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        wait_until(self._ready, timeout, f"the server (run {self.runs}) to be ready",
                   check=self.check_alive, interval=0.05, report=self.log_tail)  # fmt: skip

    def _ready(self) -> bool:
        try:
            r = httpx.get(f"{self.url}/healthz", timeout=2.0)
        except httpx.HTTPError:
            return False
        if r.status_code != 200:
            return False
        roles = r.json().get("roles", {})
        return bool(roles.get("ingest", {}).get("mqtt_connected")) and bool(
            roles.get("worker", {}).get("mqtt_connected")
        )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(
                f"the server exited with {self.proc.returncode}:\n{self.log_tail()}"
            )

    def kill(self) -> None:
        """SIGKILL: no chance to flush or close anything."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (a clean stop); SIGKILL if it does not exit in ``timeout``."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return int(self.proc.returncode)

    def restart(self) -> ServerProcess:
        self.terminate()
        return self.start()

    def stop(self) -> None:
        if self.alive:
            self.terminate(10.0)

    def verify(self) -> subprocess.CompletedProcess[str]:
        """``python -m server.cli verify STORE`` (run it while the server is stopped)."""
        return subprocess.run(
            [sys.executable, "-m", "server.cli", "verify", str(self.store_path)],
            env=self.env(), cwd=self.workdir, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    def follow(self) -> LogFollower:
        """A follower of the current run's log, from its start."""
        assert self.logs, "the server was never started"
        return LogFollower(self.logs[-1])

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])


# ---------------------------------------------------------------------------------------------
# An agent behind its own link.


class AgentNode(AgentProcess):
    """An ``edge-agent run`` process (:class:`AgentProcess`) whose broker URL is its own TCP
    proxy: the link can be dropped, blocked and restored while the process runs, and the
    process killed and started again behind the same proxy. With ``packets=True`` the proxy
    forwards whole MQTT packets, so messages can be damaged in flight (:meth:`inject`)."""

    def __init__(
        self,
        workdir: Path,
        jobs: list[Path],
        broker_port: int,
        *,
        device: str,
        extra: list[str] | None = None,
        packets: bool = False,
    ) -> None:
        self.proxy = MqttProxy(broker_port, packets=packets).start()
        super().__init__(
            workdir, jobs, f"mqtt://127.0.0.1:{self.proxy.port}", device=device, extra=extra
        )

    def start(self) -> AgentNode:
        super().start()
        return self

    # -- the link ----------------------------------------------------------------------------

    def drop_link(self) -> None:
        """Close the agent's connections and refuse new ones (the broker sees the close)."""
        self.proxy.hold()
        self.proxy.cut()

    def block_link(self) -> None:
        """Stop all traffic both ways; every socket stays open."""
        self.proxy.block()

    def restore_link(self) -> None:
        self.proxy.release()
        self.proxy.unblock()

    def inject(self, action: str, direction: str, topic_suffix: str, *, seed: int = 0) -> Injection:
        """Corrupt or duplicate the next PUBLISH on the agent's link going ``direction``
        (``up`` from the agent, ``down`` to it) whose topic ends with ``topic_suffix``
        (``/state``, ``/ack``, ``/ctl``, ``/hb``): :meth:`MqttProxy.inject`."""
        return self.proxy.inject(action, direction, topic_suffix, seed=seed)

    # -- what it wrote -----------------------------------------------------------------------

    def meta(self, job: str) -> Any:
        """The job's journal metadata record (read-only; safe while the agent runs)."""
        with Journal.open(self.journal, job, readonly=True) as j:
            return j.meta

    def local_step(self, job: str) -> int:
        """The step of the job's newest local snapshot (0 when none or no journal yet)."""
        try:
            meta = self.meta(job)
        except Exception:  # not created yet, or a record being replaced
            return 0
        return 0 if meta.local is None else int(meta.local.step)

    def acked(self, job: str) -> tuple[int, bytes, int] | None:
        """(seq, state hash, step) of the state the server acknowledged, per the journal."""
        try:
            meta = self.meta(job)
        except Exception:
            return None
        a = meta.acked
        return None if a is None else (int(a.seq), bytes(a.state_hash), int(a.step))

    def acked_step(self, job: str) -> int:
        a = self.acked(job)
        return -1 if a is None else a[2]

    def events(self, name: str | None = None, *, run: int | None = None) -> list[dict[str, Any]]:
        """The JSON log records (``event`` == ``name``, if given) of every run, or of run
        ``run`` (1-based)."""
        paths = self.logs if run is None else [self.logs[run - 1]]
        out = []
        for p in paths:
            if not p.exists():
                continue
            for line in p.read_text(errors="replace").splitlines():
                if not line.startswith("{"):
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if name is None or rec.get("event") == name:
                    out.append(rec)
        return out

    def close(self) -> None:
        self.stop()
        self.proxy.stop()


# ---------------------------------------------------------------------------------------------
# The API.


class ApiClient:
    """The server's HTTP API with its bearer token. Methods return the decoded JSON (or
    numpy arrays for outputs) and raise AssertionError on an unexpected status."""

    def __init__(self, base_url: str, token: str) -> None:
        self.http = httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=15.0
        )

    def close(self) -> None:
        self.http.close()

    def call(self, method: str, path: str, *, ok: tuple[int, ...] = (200,), **kw: Any) -> Any:
        r = self.http.request(method, path, **kw)
        if r.status_code not in ok:
            raise AssertionError(f"{method} {path}: {r.status_code} {r.text[:2000]}")
        return r.json()

    def status_of(self, method: str, path: str, **kw: Any) -> int:
        return self.http.request(method, path, **kw).status_code

    def jobs(self) -> list[dict[str, Any]]:
        return self.call("GET", "/v1/jobs")  # type: ignore[no-any-return]

    def job(self, job_id: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/jobs/{job_id}")  # type: ignore[no-any-return]

    def try_job(self, job_id: str) -> dict[str, Any] | None:
        """The job, or None (not known yet, or the API is not reachable)."""
        try:
            r = self.http.get(f"/v1/jobs/{job_id}")
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None

    def devices(self) -> list[dict[str, Any]]:
        return self.call("GET", "/v1/devices")  # type: ignore[no-any-return]

    def resume(self, job_id: str, reason: str = "e2e") -> dict[str, Any]:
        return self.call(  # type: ignore[no-any-return]
            "POST", f"/v1/jobs/{job_id}/resume", ok=(200, 202), json={"reason": reason}
        )

    def handover(self, job_id: str) -> dict[str, Any]:
        return self.call("POST", f"/v1/jobs/{job_id}/handover", ok=(202,))  # type: ignore[no-any-return]

    def outputs(self, job_id: str) -> dict[str, np.ndarray]:
        """``GET /v1/jobs/{id}/outputs`` as arrays (JSON values in the stated dtype)."""
        doc = self.call("GET", f"/v1/jobs/{job_id}/outputs")
        out = {}
        for name, o in doc["outputs"].items():
            values = _unjson(o["values"])
            out[name] = np.array(values, dtype=np.dtype(o["dtype"])).reshape(o["shape"])
        return out

    def outputs_complete(self, job_id: str) -> bool:
        r = self.http.get(f"/v1/jobs/{job_id}/outputs")
        return r.status_code == 200 and bool(r.json().get("complete"))

    def output_npy(self, job_id: str, name: str) -> np.ndarray:
        """``GET /v1/jobs/{id}/outputs/{name}.npy``: the exact bytes."""
        import io

        r = self.http.get(f"/v1/jobs/{job_id}/outputs/{name}.npy")
        if r.status_code != 200:
            raise AssertionError(f"outputs/{name}.npy: {r.status_code} {r.text[:500]}")
        return np.load(io.BytesIO(r.content), allow_pickle=False)  # type: ignore[no-any-return]

    def metrics(self) -> Metrics:
        r = self.http.get("/metrics")
        if r.status_code != 200:
            raise AssertionError(f"/metrics: {r.status_code}")
        return Metrics.parse(r.text)


def _unjson(v: Any) -> Any:
    if isinstance(v, list):
        return [_unjson(x) for x in v]
    if isinstance(v, str):
        return float(v)  # "nan", "inf", "-inf"
    return v


class Metrics:
    """Prometheus samples: ``m.get("edge_resume_commits_total", kind="full")`` sums the
    samples of that name whose labels include the ones given (0.0 when there are none)."""

    def __init__(self, samples: list[tuple[str, dict[str, str], float]]) -> None:
        self.samples = samples

    @classmethod
    def parse(cls, text: str) -> Metrics:
        samples = []
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            name, _, rest = head.partition("{")
            labels: dict[str, str] = {}
            if rest:
                for part in rest.rstrip("}").split(","):
                    if "=" in part:
                        k, _, v = part.partition("=")
                        labels[k.strip()] = v.strip().strip('"')
            samples.append((name, labels, float(value)))
        return cls(samples)

    def get(self, name: str, **labels: str) -> float:
        return sum(
            v
            for n, lab, v in self.samples
            if n == name and all(lab.get(k) == x for k, x in labels.items())
        )


# ---------------------------------------------------------------------------------------------
# Job files and the reference run.


def reference_run(job_file: Path, steps: int | None = None) -> Job:
    """The job run uninterrupted in this process (to the end, or ``steps`` steps)."""
    job = create_job(JobSpec.load(job_file))
    job.run(steps)
    return job


# ---------------------------------------------------------------------------------------------
# The cluster.


class Cluster:
    """Mosquitto, ``edge-server serve`` and any number of agents (see the module docstring).

    ``models``: the ``tiny_models`` fixture's files (their folder is the server's models and
    data folder). ``server_config``: overrides of the server's TOML, by section.
    ``server_log_level``: the server's ``--log-level``."""

    def __init__(
        self,
        workdir: Path,
        models: Mapping[str, Path],
        *,
        server_config: Mapping[str, Mapping[str, Any]] | None = None,
        server_log_level: str = "info",
    ) -> None:
        self.workdir = Path(workdir)
        self.models = dict(models)
        self.models_dir = next(iter(self.models.values())).parent
        self.broker = Broker(self.workdir / "broker")
        self.server = ServerProcess(
            self.workdir / "server",
            self.broker.url,
            self.models_dir,
            overrides=server_config,
            log_level=server_log_level,
        )
        self.api = ApiClient(self.server.url, self.server.token)
        self.agents: dict[str, AgentNode] = {}
        self.jobs_dir = self.workdir / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Cluster:
        try:
            self.broker.start()
            self.server.start()
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process and proxy this cluster started (errors are swallowed, so that
        one failure does not leave the others running)."""
        for agent in self.agents.values():
            with contextlib.suppress(Exception):
                agent.close()
        with contextlib.suppress(Exception):
            self.server.stop()
        with contextlib.suppress(Exception):
            if self.server.alive:
                self.server.kill()
        with contextlib.suppress(Exception):
            self.broker.stop()
        with contextlib.suppress(Exception):
            self.api.close()

    def add_agent(
        self,
        device: str,
        jobs: list[Path],
        *,
        extra: list[str] | None = None,
        packets: bool = False,
    ) -> AgentNode:
        """An agent (not started yet: call ``.start()``) for ``device`` running ``jobs``;
        ``packets``: its proxy forwards whole MQTT packets (needed for ``agent.inject``)."""
        assert device not in self.agents, f"agent {device} exists"
        node = AgentNode(
            self.workdir / f"agent-{device}", jobs, self.broker.port, device=device,
            extra=extra, packets=packets,
        )  # fmt: skip
        self.agents[device] = node
        return node

    # -- observing ---------------------------------------------------------------------------

    def report(self, n: int = 60) -> str:
        """The tail of every process's log, and which are alive."""
        parts = [
            f"--- server (pid {self.server.pid}, alive {self.server.alive}) ---",
            self.server.log_tail(n),
        ]
        for device, a in self.agents.items():
            state = "alive" if a.alive else f"exit {a.proc.returncode if a.proc else None}"
            parts += [f"--- agent {device} ({state}) ---", a.log_tail(n)]
        parts += ["--- mosquitto ---", _tail(self.broker.log, 20)]
        return "\n".join(parts)

    def check(self) -> None:
        """Fail at once if the server or the broker died (a test that kills one on purpose
        waits without this check until it started it again)."""
        self.server.check_alive()
        proc = self.broker.proc
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"mosquitto exited with {proc.returncode}\n{self.report()}")

    def wait_for(
        self,
        cond: Callable[[], T | None],
        timeout: float,
        what: str,
        *,
        check: Callable[[], None] | None = None,
        interval: float = 0.02,
    ) -> T:
        """:func:`wait_until` with every process's log in the failure message."""
        return wait_until(cond, timeout, what, check=check, report=self.report,
                          interval=interval)  # fmt: skip

    def job_status(self, job_id: str) -> str | None:
        doc = self.api.try_job(job_id)
        return None if doc is None else str(doc["status"])

    def wait_status(self, job_id: str, status: str, timeout: float = 30.0) -> dict[str, Any]:
        def cond() -> dict[str, Any] | None:
            doc = self.api.try_job(job_id)
            return doc if doc is not None and doc["status"] == status else None

        return self.wait_for(cond, timeout, f"job {job_id} to be {status}", check=self.check)

    # -- job files ---------------------------------------------------------------------------

    def generate_job(
        self,
        job_id: str,
        *,
        tokens: int = 2000,
        kv: str = "send",
        pace: float = 0.004,
        every_steps: int = 100,
        every_seconds: float = 0.5,
        temperature: float = 0.8,
        seed: int = 11,
        overhead_budget: float | None = 0.0,
    ) -> Path:
        """A ``generate`` job on the tiny decoder (sampled, top-k 40), paced by
        ``[runtime] min_step_seconds``. ``overhead_budget`` is 0 (off) by default, so that
        snapshots keep their schedule (the scenarios cut at an acknowledged step and need
        the server's copy close behind the job); None leaves the job file's default."""
        snapshot: dict[str, float] = {"every_steps": every_steps, "every_seconds": every_seconds}
        if overhead_budget is not None:
            snapshot["overhead_budget"] = overhead_budget
        return write_job(
            self.jobs_dir, job_id, "generate", self.models["tiny-decoder.onnx"],
            params={"prompt": PROMPT, "max_new_tokens": tokens, "temperature": temperature,
                    "top_k": 40, "seed": seed},
            snapshot=snapshot,
            link={"kv": kv},
            runtime={"min_step_seconds": pace},
        )  # fmt: skip

    def batch_job(
        self,
        job_id: str,
        *,
        batch_size: int = 10,
        pace: float = 0.01,
        every_steps: int = 20,
        every_seconds: float = 0.5,
    ) -> Path:
        """A ``batch`` job: the stateful tiny GRU over ``sensors.npy`` (5,000 rows)."""
        return write_job(
            self.jobs_dir, job_id, "batch", self.models["tiny-gru.onnx"],
            params={"dataset": str(self.models["sensors.npy"]), "batch_size": batch_size},
            snapshot={"every_steps": every_steps, "every_seconds": every_seconds},
            runtime={"min_step_seconds": pace},
        )  # fmt: skip


@contextlib.contextmanager
def running_cluster(workdir: Path, models: Mapping[str, Path], **kw: Any) -> Iterator[Cluster]:
    """A started :class:`Cluster`; on leaving, every log's tail is printed (pytest shows it
    for a failed test) and every process stopped."""
    c = Cluster(workdir, models, **kw)
    try:
        c.start()
        yield c
    finally:
        try:
            print(c.report(200))
        finally:
            c.close()
