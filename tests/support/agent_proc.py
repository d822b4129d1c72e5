"""The edge agent as a separate process (``python -m edge_agent.cli run ...``), as a gateway
runs it: without the server's dependencies (``tests/support/blocker`` comes first on its
PYTHONPATH), with its own journal folder, SIGKILLed or SIGTERMed by the test.

Also: job files for the tiny demo models, and reading a job's durable progress from its
journal (read-only, safe while the agent runs).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from edge_agent.journal import Journal

REPO = Path(__file__).resolve().parents[2]
BLOCKER = Path(__file__).resolve().parent / "blocker"


def write_job(folder: Path, job_id: str, kind: str, model: Path, **sections: Any) -> Path:
    """A job file ``folder/<job_id>.toml``; ``sections`` maps a table name to its keys."""
    lines = ["[job]", f'id = "{job_id}"', f'kind = "{kind}"', f'model = "{model}"']
    for table, keys in sections.items():
        lines.append(f"\n[{table}]")
        for k, v in keys.items():
            lines.append(f"{k} = {_toml(v)}")
    path = folder / f"{job_id}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    return repr(v)


def local_step(journal_dir: Path, job: str) -> int:
    """The step of the job's newest local snapshot (0 when there is none or no journal)."""
    try:
        with Journal.open(journal_dir, job, readonly=True) as j:
            return 0 if j.local is None else j.local.step
    except Exception:  # not created yet, or a record being replaced: no progress known
        return 0


def journal_meta(journal_dir: Path, job: str) -> Any:
    with Journal.open(journal_dir, job, readonly=True) as j:
        return j.meta


class AgentProcess:
    """One ``edge-agent run`` process at a time; :meth:`start` again after a kill."""

    def __init__(
        self,
        workdir: Path,
        jobs: list[Path],
        broker_url: str,
        *,
        device: str = "gw-1",
        extra: list[str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.jobs = jobs
        self.broker_url = broker_url
        self.device = device
        self.extra = list(extra or [])
        self.journal = workdir / "journal"
        self.outputs = workdir / "outputs"
        self.blocked_log = workdir / "blocked-imports.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.logs: list[Path] = []

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(BLOCKER), str(REPO)])
        env["EDGE_TEST_BLOCKED_LOG"] = str(self.blocked_log)
        for k in [k for k in env if k.startswith("EDGE_AGENT_")]:
            del env[k]
        return env

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "edge_agent.cli", "run", *map(str, self.jobs),
            "--device", self.device, "--broker", self.broker_url,
            "--journal", str(self.journal), "--outputs", str(self.outputs),
            "--log-format", "json", "--log-level", "info", "--heartbeat", "0.5",
            "--reconnect-max", "1", "--reply-timeout", "2", "--shutdown-grace", "10",
            "--completion-timeout", "60", *self.extra,
        ]  # fmt: skip

    def start(self) -> AgentProcess:
        assert self.proc is None or self.proc.poll() is not None
        self.runs += 1
        log = self.workdir / f"agent-{self.runs}.log"
        self.logs.append(log)
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(
                self.command(), env=self.env(), cwd=self.workdir, stdout=fh, stderr=fh
            )
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        """Fail at once (with the log's tail) if the agent exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(
                f"the agent exited with {self.proc.returncode}:\n{self.log_tail()}"
            )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"the agent did not exit within {timeout}s:\n{self.log_tail()}"
            ) from None

    def stop(self) -> None:
        if self.alive:
            self.kill()

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def blocked_imports(self) -> list[str]:
        if not self.blocked_log.exists():
            return []
        return self.blocked_log.read_text().split()
