"""The demo's child processes: start each in a session of its own with its output in a log
file, stop them in reverse order, and leave none behind.

Every child is started with ``start_new_session=True`` (Ctrl-C in the terminal reaches the
demo only, which then stops its children in order) and, on Linux, with a parent-death
signal (``PR_SET_PDEATHSIG``): if the demo itself is killed, the kernel sends its children
SIGTERM. Stopping a child sends the signal to its whole process group and waits; whatever
is left after the grace period gets SIGKILL.

This module owns process life cycles. It knows nothing of brokers, servers or agents.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from edge_agent.errors import DemoError

__all__ = ["Child", "Children", "free_port", "wait_listening"]

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:  # pragma: no cover - runs in the child
    """In the child, before exec: SIGTERM when the demo dies (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the demo died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Child:
    """One process the demo started: its command, log file and ``Popen``."""

    def __init__(self, name: str, argv: Sequence[str], log: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at: float | None = None

    def start(self, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> Child:
        if self.alive:
            raise DemoError(f"{self.name} is already running (pid {self.pid})")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        parent = os.getpid()
        preexec = (lambda: _die_with_parent(parent)) if sys.platform == "linux" else None
        with open(self.log, "ab") as fh:
            try:
                self.proc = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    env=None if env is None else dict(env),
                    cwd=cwd,
                    start_new_session=True,
                    # between fork and exec: only a prctl (the demo itself runs no threads
                    # that could hold a lock the child needs)
                    preexec_fn=preexec,
                )
            except OSError as exc:
                raise DemoError(f"cannot start {self.name} ({self.argv[0]}): {exc}") from exc
        self.started_at = time.monotonic()
        return self

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def check_alive(self, grace: float = 0.0) -> None:
        """Raise :class:`DemoError` (with the log's tail) if the process has exited, or
        exits within ``grace`` seconds (a process that was just killed may not be reaped
        yet when its sockets already answer with a reset)."""
        if self.proc is not None and grace > 0:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        if self.proc is not None and self.proc.poll() is not None:
            raise DemoError(f"{self.name} exited with code {self.proc.returncode}:\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL to the process (a power cut: no chance to save or say goodbye)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._reap_group()

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM to the process group, wait up to ``timeout``, then SIGKILL what is left.
        Returns the exit code (None if it never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(10)
        self._reap_group()
        return self.proc.returncode

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit by itself; DemoError after ``timeout``."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise DemoError(
                f"{self.name} did not exit within {timeout:.0f} s:\n{self.tail()}"
            ) from None

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def _reap_group(self) -> None:
        """Anything still in the child's process group (a grandchild) gets SIGKILL."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return f"(no log at {self.log})"
        return "\n".join(text.splitlines()[-lines:])


class Children:
    """Every process the demo started; :meth:`stop_all` stops them newest first."""

    def __init__(self) -> None:
        self._all: list[Child] = []

    def add(self, child: Child) -> Child:
        self._all.append(child)
        return child

    def __iter__(self) -> Iterator[Child]:
        return iter(list(self._all))

    def stop_all(self, timeout: float = 15.0) -> dict[str, int | None]:
        """Stop every child (newest first); returns name -> exit code. Never raises."""
        codes: dict[str, int | None] = {}
        for child in reversed(self._all):
            try:
                codes[child.name] = child.stop(timeout)
            except Exception:  # keep stopping the others
                codes[child.name] = None
        return codes

    def pids(self) -> list[int]:
        return [c.pid for c in self._all if c.pid is not None]


def wait_listening(port: int, child: Child, timeout: float) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:``port``, failing early
    (with the log) if ``child`` exits."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        child.check_alive()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise DemoError(f"{child.name} did not listen on port {port} within {timeout:.0f} s")
