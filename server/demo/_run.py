"""The demo's script: build, start, run, cut, resume, compare, report, clean up.

Everything the demo starts is a real part run as a separate process, the way an operator
would run it: the broker (:mod:`server.demo._brokers`), ``edge-server serve`` (``python -m
server.cli serve --config <workdir>/server/server.toml``) and ``edge-agent run`` (``python
-m edge_agent.cli run``). The demo talks to the server only through its HTTP API, reads the
device's journal (read-only) for what it sent, and computes the uninterrupted reference run
in its own process.

This module owns the demo's sequence and its report. It holds no protocol, storage or
resume logic of its own, and it stops every process it started, whatever happens.
"""

from __future__ import annotations

import io
import json
import math
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from edge_agent.errors import DemoError, EdgeResumeError
from server.demo._brokers import BROKER_KINDS, BrokerHandle, start_broker
from server.demo._procs import Child, Children, free_port

__all__ = ["MARK_ENV", "DemoOptions", "DemoReport", "Interrupted", "child_env", "run_demo"]

MARKER = ".edge-resume-demo"  # a work dir the demo made (and may clear on the next run)
MODEL = "tiny-decoder.onnx"
PROMPT = "The gateway said: "
MAX_TOKENS = 4000  # the tiny decoder has 4,096 positions; the prompt takes some


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs. Defaults take about half a minute on a small machine."""

    workdir: Path | None = None  # None: a temporary folder, removed afterwards (kept on failure)
    tokens: int = 1200  # the generate job's max_new_tokens
    cut_at: float = 0.6  # cut the device off once it has reached this fraction of the tokens
    step_seconds: float = 0.02  # the device's pacing ([runtime] min_step_seconds)
    link_kbps: float = 256.0  # the device's uplink cap (--max-kbps); 0: none
    broker: str = "auto"  # auto | mosquitto | amqtt
    keep_running: bool = False  # after the report, keep everything up until Ctrl-C
    report_json: Path | None = None  # also write the report as JSON here
    device: str = "gw-demo"
    job_id: str = "demo-gen"

    def check(self) -> None:
        if not 10 <= self.tokens <= MAX_TOKENS:
            raise DemoError(f"--tokens must be 10..{MAX_TOKENS}, not {self.tokens}")
        if not 0.05 <= self.cut_at <= 0.95:
            raise DemoError(f"--cut-at must be 0.05..0.95, not {self.cut_at}")
        if not (math.isfinite(self.step_seconds) and 0 <= self.step_seconds <= 1):
            raise DemoError(f"--step-seconds must be 0..1, not {self.step_seconds}")
        if not (math.isfinite(self.link_kbps) and self.link_kbps >= 0):
            raise DemoError(f"--link-kbps must be >= 0, not {self.link_kbps}")
        if self.broker not in BROKER_KINDS:
            raise DemoError(f"--broker must be one of {', '.join(BROKER_KINDS)}")


@dataclass
class DemoReport:
    """What the demo measured. ``ok`` is the verdict (the exit code follows it)."""

    broker: str = ""
    tokens: int = 0
    device_tokens: int = 0  # computed on the device and acknowledged: what the server kept
    device_reached: int = 0  # the device's newest step the server heard of before the cut
    server_tokens: int = 0  # computed by the resumed job on the server
    identical: bool = False  # outputs equal to an uninterrupted run's
    state_identical: bool = False  # the final state's hash equals the uninterrupted run's
    snapshots_sent: int = 0
    bytes_sent: int = 0  # snapshot payload bytes the device offered the server
    bytes_full: int = 0  # full snapshots of the same states (KV cache included) would be
    kv_sent: bool | None = None  # whether the device's snapshots carried the KV cache
    offline_after_s: float | None = None  # cut -> the server marks the device offline
    resume_requested_after_s: float | None = None  # cut -> POST /resume answered
    first_step_after_s: float | None = None  # cut -> the first step run on the server
    completed_after_s: float | None = None  # cut -> the job completed on the server
    resume_phases: list[str] = field(default_factory=list)
    device_fenced: bool = False  # the device came back, learnt the server owns the job, stopped
    server_exit: int | None = None  # the server's exit code after SIGTERM (0: clean)
    stray_processes: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    status_url: str = ""
    workdir: str = ""

    @property
    def ok(self) -> bool:
        return (
            self.identical
            and self.state_identical
            and self.device_fenced
            and not self.problems
            and not self.stray_processes
        )

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        out.pop("status_url")  # it holds the API token
        return out


class Interrupted(Exception):
    """Ctrl-C or SIGTERM while the demo runs."""


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)  # pragma: no cover


def _secs(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


MARK_ENV = "EDGE_RESUME_DEMO"  # set to the work dir in every child's environment


def child_env(workdir: Path) -> dict[str, str]:
    """The environment of the demo's children: this process's, without EDGE_AGENT_* and
    EDGE_SERVER_* settings (a user's own configuration must not change what the demo runs),
    with ``EDGE_RESUME_DEMO=<workdir>`` so that its processes can be found
    (``grep -l EDGE_RESUME_DEMO= /proc/*/environ``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_AGENT_", "EDGE_SERVER_"))}
    env[MARK_ENV] = str(workdir)
    return env


def _toml_str(s: str | Path) -> str:
    return json.dumps(str(s))  # a JSON string is a valid TOML basic string


class Demo:
    """One run of the demo. :meth:`run` returns the report; it never leaves a process."""

    def __init__(self, options: DemoOptions, console: Console | None = None) -> None:
        options.check()
        self.o = options
        self.console = console or Console(highlight=False)
        self.children = Children()
        self.report = DemoReport(tokens=options.tokens)
        self.t0 = time.monotonic()
        self.temp = options.workdir is None
        self.work = Path(options.workdir or tempfile.mkdtemp(prefix="edge-resume-demo-"))
        self.token = secrets.token_hex(16)
        self.http: Any = None
        self.broker: BrokerHandle | None = None
        self.server: Child | None = None
        self.api_url = ""
        self.job_file = self.work / "device" / f"{options.job_id}.toml"
        self.journal = self.work / "device" / "journal"
        self.prepared = False  # the work dir is ours (not refused)

    # -- output ------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        self.console.print(f"[dim]{time.monotonic() - self.t0:5.1f}s[/]  {text}", soft_wrap=True)

    # -- the sequence ------------------------------------------------------------------------

    def run(self) -> DemoReport:
        r = self.report
        r.workdir = str(self.work)
        failed = True
        try:
            self._prepare_workdir()
            self._build_models()
            self._start_broker()
            self._start_server()
            cut_wall = self._run_device_and_cut()
            self._resume(cut_wall)
            self._compare()
            self._device_returns()
            failed = not r.ok
            self._render()
            if self.o.keep_running:
                self._keep_running()
        except (EdgeResumeError, OSError) as exc:  # DemoError, and what a step raised
            r.problems.append(str(exc))
            self.console.print(f"[bold red]demo failed:[/] {exc}")
        finally:
            self._shutdown()
            if self.o.report_json is not None:
                Path(self.o.report_json).write_text(json.dumps(r.to_json(), indent=2) + "\n")
            if r.stray_processes:
                r.problems.append(f"processes left running: {r.stray_processes}")
                failed = True
            if self.temp and not failed:
                shutil.rmtree(self.work, ignore_errors=True)
            elif failed and self.prepared:
                self.console.print(f"logs kept in {self.work}", soft_wrap=True)
        return r

    def _prepare_workdir(self) -> None:
        w = self.work
        if w.exists() and any(w.iterdir()) and not self.temp:
            if not (w / MARKER).exists():
                raise DemoError(
                    f"{w} is not empty and was not made by the demo",
                    hint="give an empty or new folder to --workdir",
                )
            for p in w.iterdir():  # an earlier demo's: start afresh
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        w.mkdir(parents=True, exist_ok=True)
        (w / MARKER).write_text("made by python -m server.demo; cleared by its next run\n")
        self.prepared = True
        self.console.print(f"[bold]edge-resume demo[/]  (work dir {w})", soft_wrap=True)

    def _build_models(self) -> None:
        from edge_agent.models import build_model

        path = build_model(MODEL, self.work / "models")
        self.say(f"built the tiny models: {MODEL} ({_size(path.stat().st_size)})")

    def _start_broker(self) -> None:
        self.broker = start_broker(
            self.o.broker, self.work / "broker", self.children, child_env(self.work)
        )
        self.report.broker = self.broker.description
        self.say(f"broker: {self.broker.description} on 127.0.0.1:{self.broker.port}")

    def _start_server(self) -> None:
        assert self.broker is not None
        import httpx

        d = self.work / "server"
        models = d / "models"  # the server's own copy: the worker finds models by file name
        models.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.work / "models" / MODEL, models / MODEL)
        token_file = d / "api-token"
        token_file.write_text(self.token + "\n")
        token_file.chmod(0o600)
        port = free_port()
        config = d / "server.toml"
        config.write_text(
            "# written by the edge-resume demo: the embedded defaults, on this machine only\n"
            f"[broker]\nurl = {_toml_str(self.broker.url)}\n"
            f'client_id = "edge-server-demo"\nprotocol = {_toml_str(self.broker.protocol)}\n\n'
            f"[store]\npath = {_toml_str(d / 'store')}\n\n"
            f'[api]\nhost = "127.0.0.1"\nport = {port}\n'
            f"token_file = {_toml_str(token_file)}\n\n"
            "[liveness]\nheartbeat_timeout_s = 5.0\ncheck_interval_s = 0.25\n\n"
            f"[worker]\nmodels_dir = {_toml_str(models)}\ntorch_threads = 1\n"
        )
        argv = [sys.executable, "-m", "server.cli", "serve", "--config", str(config)]
        self.server = self.children.add(Child("edge-server", argv, d / "server.log"))
        self.server.start(env=child_env(self.work), cwd=d)
        self.api_url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(
            base_url=self.api_url,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=10.0,
        )
        self._until(self._healthy, 90.0, "the server to report healthy (/healthz)")
        self.report.status_url = f"{self.api_url}/#token={self.token}"
        self.say(f"server: ingest + worker + API at {self.api_url} (store {d / 'store'})")
        self.say(f"status page: {self.report.status_url}")

    def _healthy(self) -> bool:
        try:
            r = self.http.get("/healthz")
        except Exception:
            return False
        return bool(r.status_code == 200 and r.json().get("status") == "ok")

    def _write_job(self) -> None:
        o = self.o
        every = max(10, o.tokens // 25)
        self.job_file.parent.mkdir(parents=True, exist_ok=True)
        self.job_file.write_text(
            f'[job]\nid = "{o.job_id}"\nkind = "generate"\nmodel = "../models/{MODEL}"\n\n'
            f"[params]\nprompt = {_toml_str(PROMPT)}\nmax_new_tokens = {o.tokens}\n"
            "temperature = 0.8\ntop_k = 40\nseed = 7\n\n"
            f"[snapshot]\nevery_steps = {every}\nevery_seconds = 2.0\n"
            # a send on every due snapshot, to show the deltas flow (a real job keeps the
            # default overhead budget, which would hold these small ones back: docs/agent.md)
            "overhead_budget = 0\n\n"
            '[link]\nkv = "auto"\n\n'
            f"[runtime]\nmin_step_seconds = {o.step_seconds}\n"
        )

    def _agent(self, n: int) -> Child:
        assert self.broker is not None
        d = self.job_file.parent
        argv = [
            sys.executable, "-m", "edge_agent.cli", "run", str(self.job_file),
            "--device", self.o.device, "--broker", self.broker.url,
            "--protocol", self.broker.protocol, "--journal", str(self.journal),
            "--outputs", str(d / "outputs"), "--log-format", "json", "--heartbeat", "0.5",
            "--reconnect-max", "2", "--completion-timeout", "30",
        ]  # fmt: skip
        if self.o.link_kbps > 0:
            argv += ["--max-kbps", f"{self.o.link_kbps:g}"]
        return self.children.add(Child(f"edge-agent ({n})", argv, d / f"agent-{n}.log"))

    def _job(self) -> dict[str, Any] | None:
        """The job as the API shows it (None before its BIRTH reached the server)."""
        import httpx

        try:
            r = self.http.get(f"/v1/jobs/{self.o.job_id}")
        except httpx.HTTPError as exc:
            if self.server is not None:
                self.server.check_alive(grace=3.0)  # the likely reason, with its log
            raise DemoError(f"the server's API does not answer: {exc}") from exc
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise DemoError(f"GET /v1/jobs/{self.o.job_id}: {r.status_code} {r.text}")
        return r.json()  # type: ignore[no-any-return]

    def _run_device_and_cut(self) -> float:
        o = self.o
        self._write_job()
        link = f"{o.link_kbps:g} kbit/s uplink" if o.link_kbps > 0 else "no uplink cap"
        self.say(
            f"device {o.device}: edge-agent runs job {o.job_id} (generate, {o.tokens} tokens, "
            f"{o.step_seconds * 1000:g} ms/token, {link})"
        )
        agent = self._agent(1).start(env=child_env(self.work))
        cut_step = max(1, round(o.tokens * o.cut_at))
        budget = o.tokens * o.step_seconds * 4 + 90.0
        job: dict[str, Any] | None = None
        last_print = 0.0

        def reached() -> bool:
            nonlocal job, last_print
            agent.check_alive()
            job = self._job()
            if job is None:
                return False
            p = job["progress"]
            dev = max(p["device_step"] or 0, p["step"])
            now = time.monotonic()
            if now - last_print >= 3.0 and dev > 0:
                last_print = now
                self.say(
                    f"device at step {dev}/{o.tokens}; the server holds step {p['step']} "
                    f"({job['snapshots']} snapshots, {_size(job['bytes_received'])} received)"
                )
            # cut between two snapshots (the device ahead of the server), as a real cut
            # mostly is; a device that happens to stay in step is cut a little later anyway
            ahead = dev > p["step"] or dev >= cut_step + max(1, o.tokens // 10)
            return bool(dev >= cut_step and p["step"] > 0 and ahead and job["status"] == "running")

        self._until(reached, budget, f"the device to reach step {cut_step}", check=False)
        assert job is not None
        self.report.device_reached = max(
            job["progress"]["device_step"] or 0, job["progress"]["step"]
        )
        cut_wall = time.time()
        agent.kill()
        self.say(
            f"[bold]cut:[/] SIGKILL to the agent at step ~{self.report.device_reached} "
            "(a power cut: no final snapshot, no goodbye)"
        )
        return cut_wall

    def _resume(self, cut_wall: float) -> None:
        r = self.report

        def offline() -> bool:
            job = self._job()
            return job is not None and job["status"] == "offline"

        self._until(offline, 20.0, "the server to mark the device offline")
        r.offline_after_s = time.time() - cut_wall
        job = self._job()
        assert job is not None
        r.device_tokens = job["progress"]["step"]
        r.server_tokens = self.o.tokens - r.device_tokens
        how = "its MQTT will" if r.offline_after_s < 4.0 else "heartbeat timeout"
        self.say(
            f"server: device offline after {_secs(r.offline_after_s)} ({how}); it holds step "
            f"{r.device_tokens} (snapshot seq {job['seq']})"
        )
        self._device_counters()
        resp = self.http.post(f"/v1/jobs/{self.o.job_id}/resume", json={"reason": "demo"})
        r.resume_requested_after_s = time.time() - cut_wall
        if resp.status_code not in (200, 202):
            raise DemoError(f"POST /v1/jobs/{self.o.job_id}/resume: {resp.status_code} {resp.text}")
        self.say(f"POST /v1/jobs/{self.o.job_id}/resume -> {resp.status_code}")
        phases: list[str] = []

        def done() -> bool:
            job = self._job()
            res = (job or {}).get("resume") or {}
            phase = res.get("phase")
            if phase and (not phases or phases[-1] != phase):
                phases.append(phase)
            if phase == "failed":
                raise DemoError(f"the resume failed: {res.get('error')}")
            return phase == "completed"

        self._until(done, 120.0, "the resumed job to complete", poll=0.05)
        job = self._job()
        assert job is not None
        res = job["resume"]
        r.resume_phases = phases
        if res.get("first_step_at") is not None:
            r.first_step_after_s = res["first_step_at"] - cut_wall
        if res.get("finished_at") is not None:
            r.completed_after_s = res["finished_at"] - cut_wall
        self.say(
            f"server: resumed ({' -> '.join(phases)}); first step {_secs(r.first_step_after_s)} "
            f"after the cut, completed after {_secs(r.completed_after_s)}"
        )
        if job["status"] != "completed" or job["owner"] != "server":
            r.problems.append(f"the job ended {job['status']}, owned by {job['owner']}")

    def _device_counters(self) -> None:
        """What the device sent, from its journal (read-only) and its log."""
        from edge_agent.cli import job_status

        try:
            st = job_status(str(self.journal), self.o.job_id)
        except EdgeResumeError as exc:
            raise DemoError(f"cannot read the device's journal: {exc}") from exc
        r = self.report
        r.snapshots_sent = int(st["snapshots_sent"])
        r.bytes_sent = int(st["bytes_sent"])
        r.bytes_full = int(st["bytes_full"])
        log = self.job_file.parent / "agent-1.log"
        kv: bool | None = None
        for line in log.read_text(errors="replace").splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict) and ev.get("event") == "offered" and "kv" in ev:
                kv = bool(ev["kv"]) if kv is None else (kv or bool(ev["kv"]))
        r.kv_sent = kv

    def _compare(self) -> None:
        from edge_agent.jobs import load_job
        from edge_agent.state import state_hash

        r = self.report
        resp = self.http.get(f"/v1/jobs/{self.o.job_id}/outputs/tokens.npy")
        if resp.status_code != 200:
            raise DemoError(f"GET outputs/tokens.npy: {resp.status_code} {resp.text}")
        got = np.load(io.BytesIO(resp.content), allow_pickle=False)
        ref_job = load_job(self.job_file)  # the same job, uninterrupted, in this process
        ref_job.run()
        want = ref_job.outputs()["tokens"]
        r.identical = bool(got.dtype == want.dtype and np.array_equal(got, want))
        job = self._job()
        assert job is not None
        full = ref_job.state()
        light = {k: v for k, v in full.items() if k not in ref_job.derivable}
        r.state_identical = job["state_hash"] in (state_hash(full).hex(), state_hash(light).hex())
        same = int(np.sum(got[: len(want)] == want[: len(got)])) if got.ndim == 1 else 0
        self.say(
            f"reference: the same job run uninterrupted here: {same} of {len(want)} tokens equal "
            f"(server has {len(got)}); final state hash "
            f"{'equal' if r.state_identical else 'DIFFERENT'}"
        )

    def _device_returns(self) -> None:
        from edge_agent.cli import job_status

        agent = self._agent(2).start(env=child_env(self.work))
        self.say("device back: edge-agent restarted with the same journal")
        code = agent.wait(60.0)
        st = job_status(str(self.journal), self.o.job_id)
        job = self._job()
        assert job is not None
        self.report.device_fenced = bool(
            code == 0 and st["status"] == "fenced" and job["status"] == "completed"
        )
        self.say(
            f"device: exit {code}, its journal says {st['status']} (owner {st['owner']}, "
            f"epoch {st['epoch']}); the server's job is {job['status']}"
        )

    def _render(self) -> None:
        r = self.report
        t = Table(title="edge-resume demo: report", show_header=False, title_justify="left")
        t.add_column("what", style="bold", no_wrap=True)
        t.add_column("result")
        lost = max(0, r.device_reached - r.device_tokens)
        t.add_row("broker", r.broker)
        t.add_row("job", f"generate, {r.tokens} tokens of {MODEL}, sampled (temperature 0.8)")
        more = f"; {lost}+ computed after that died with it" if lost else ""
        t.add_row(
            "tokens done on the device",
            f"{r.device_tokens} (acknowledged by the server before the cut{more})",
        )
        t.add_row(
            "tokens done on the server", f"{r.server_tokens} (resumed from step {r.device_tokens})"
        )
        t.add_row(
            "identical to an uninterrupted run",
            ("yes" if r.identical else "NO")
            + (
                " (and the final state, bit for bit)"
                if r.state_identical
                else "; final state DIFFERS"
            ),
        )
        pct = 100.0 * r.bytes_sent / r.bytes_full if r.bytes_full else 0.0
        kv = {True: "with the KV cache", False: "KV cache not sent, rebuilt on the server"}
        kv_text = "?" if r.kv_sent is None else kv[r.kv_sent]
        t.add_row(
            "bytes sent vs full snapshots",
            f"{_size(r.bytes_sent)} vs {_size(r.bytes_full)} = {pct:.2f}% "
            f"({r.snapshots_sent} snapshots; {kv_text})",
        )
        t.add_row("cut -> server sees it offline", _secs(r.offline_after_s))
        t.add_row(
            "cut -> resume requested",
            f"{_secs(r.resume_requested_after_s)} (POST /v1/jobs/{self.o.job_id}/resume)",
        )
        t.add_row("cut -> first resumed step", _secs(r.first_step_after_s))
        t.add_row("cut -> job completed", _secs(r.completed_after_s))
        t.add_row(
            "device comes back",
            "learns the server owns the job, stops" if r.device_fenced else "NOT fenced",
        )
        for p in r.problems:
            t.add_row("problem", p)
        self.console.print()
        self.console.print(t)
        verdict = "[bold green]OK[/]" if r.ok else "[bold red]FAILED[/]"
        self.console.print(f"result: {verdict}")

    def _keep_running(self) -> None:
        self.console.print(
            f"\nstill running: status page {self.report.status_url}\n"
            f"API: curl -H 'Authorization: Bearer {self.token}' {self.api_url}/v1/jobs\n"
            "press Ctrl-C to stop everything"
        )
        try:
            while True:
                if self.server is not None:
                    self.server.check_alive()
                time.sleep(0.5)
        except Interrupted:
            self.console.print("stopping")

    def _shutdown(self) -> None:
        saved = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not stop this
                saved[sig] = signal.signal(sig, signal.SIG_IGN)
        try:
            self._stop_children()
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)

    def _stop_children(self) -> None:
        if self.http is not None:
            self.http.close()
        codes = self.children.stop_all()
        if self.server is not None:
            self.report.server_exit = codes.get(self.server.name)
            if self.report.server_exit not in (0, None) and not self.report.problems:
                self.report.problems.append(
                    f"the server exited with {self.report.server_exit} on SIGTERM"
                )
        self.report.stray_processes = [p for p in self.children.pids() if _alive(p)]

    # -- helpers -----------------------------------------------------------------------------

    def _until(
        self,
        cond: Callable[[], bool],
        timeout: float,
        what: str,
        *,
        poll: float = 0.1,
        check: bool = True,
    ) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if check:
                for c in self.children:
                    if c.name in ("mosquitto", "amqtt", "edge-server"):
                        c.check_alive()
            if cond():
                return
            if time.monotonic() > deadline:
                tail = self.server.tail(15) if self.server else ""
                raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")
            time.sleep(poll)


def _alive(pid: int) -> bool:
    """True if ``pid`` still runs (a zombie that is ours does not count: it is reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread (so every ``finally``
    runs and every child is stopped)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_demo(options: DemoOptions, console: Console | None = None) -> DemoReport:
    """Run the demo (see the package docstring); Ctrl-C or SIGTERM stop it cleanly and
    raise :class:`Interrupted` after every process was stopped."""
    demo = Demo(options, console)
    with _signals_interrupt():
        return demo.run()
