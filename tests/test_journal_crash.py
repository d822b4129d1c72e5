"""Kill -9 a process at random instants while it writes to a journal, then reopen it.

After every kill: at most three snapshot files and one transfer file exist (temporary files
included); the journal opens and verifies; its newest local snapshot and its acknowledged
state are either the last ones the child finished writing or the one it was writing, and
decode to exactly that state; never a torn or mixed one.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_agent.codec import apply_delta
from edge_agent.journal import Journal, verify_journal
from edge_agent.state import state_hash
from tests.support.journal_child import state

REPO = Path(__file__).resolve().parents[1]
ITERATIONS = 36


def _spawn(root: Path) -> tuple[subprocess.Popen[str], list[str], threading.Event]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.journal_child", str(root), "job-1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                lines.append(line.strip())
                if line.strip() == "ready":
                    ready.set()
        except (OSError, ValueError):  # the test closed the pipe after the kill
            pass

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines, ready


def _last(lines: list[str], prefix: str) -> int | None:
    found = [int(ln.split()[-1]) for ln in lines if ln.startswith(prefix)]
    return found[-1] if found else None


def _allowed(lines: list[str], kind: str, before: int | None) -> set[int | None]:
    """The values a field may have after the kill: the last completed one, or the one
    being written when the kill came (begun but not done)."""
    done = _last(lines, f"done {kind}")
    begun = _last(lines, f"begin {kind}")
    last = done if done is not None else before
    allowed = {last}
    if begun is not None and begun != done:
        allowed.add(begun)
    return allowed


@pytest.mark.slow
def test_kill9_at_random_instants_never_leaves_a_torn_journal(tmp_path: Path) -> None:
    rng = random.Random(20240607)
    root = tmp_path / "journal"
    local_before: int | None = None
    acked_before: int | None = None
    kills_mid_write = 0
    for it in range(ITERATIONS):
        proc, lines, ready = _spawn(root)
        try:
            if it % 6 == 5:  # sometimes kill during start-up / open / clean-up
                time.sleep(rng.uniform(0.0, 0.3))
            else:
                assert ready.wait(30), (
                    f"child did not start: {proc.stderr.read() if proc.stderr else ''}"
                )
                time.sleep(rng.uniform(0.0, 0.08))
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        time.sleep(0.02)  # let the pump thread read the pipe to its end
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
        if proc.stdout:
            proc.stdout.close()

        job_dir = root / "job-1"
        if not (job_dir / "meta").exists():
            continue  # killed before the journal was created
        names = os.listdir(job_dir)
        snaps = [n for n in names if n.startswith(("snap-", ".snap-"))]
        xfers = [n for n in names if n.startswith(("xfer-", ".xfer-"))]
        assert len(snaps) <= 3, names
        assert len(xfers) <= 1, names
        if lines and lines[-1].startswith("begin"):
            kills_mid_write += 1

        with Journal.open(root, "job-1") as j:
            report = j.verify(deep=True)
            assert report.ok, report.problems
            local = j.local
            acked = j.acked
            local_seq = None if local is None else local.seq
            acked_seq = None if acked is None else acked.seq
            assert local_seq in _allowed(lines, "snap", local_before), (lines[-6:], local_seq)
            assert acked_seq in _allowed(lines, "ack", acked_before), (lines[-6:], acked_seq)
            if local is not None:
                got = apply_delta(None, j.read_local() or b"")
                assert state_hash(got) == state_hash(state(local.seq))
                assert local.step == local.seq * 10
            if acked is not None:
                got = apply_delta(None, j.read_acked() or b"")
                assert state_hash(got) == state_hash(state(acked.seq))
            t = j.transfer
            if t is not None and t.file is not None:
                base = None if t.base_seq is None else apply_delta(None, j.read_acked() or b"")
                got = apply_delta(base, j.read_transfer_payload() or b"")
                assert state_hash(got) == state_hash(state(t.seq))
            # after a writer's open nothing unreferenced is left
            assert j.verify().unreferenced == ()
            local_before, acked_before = local_seq, acked_seq
    assert local_before is not None and local_before > 10
    assert acked_before is not None
    assert kills_mid_write >= 5, "the kills should land in the middle of journal calls"


@pytest.mark.slow
def test_readers_never_see_a_false_alarm_while_the_writer_runs(tmp_path: Path) -> None:
    """`edge-agent status` / `verify` read a journal a live agent is changing."""
    root = tmp_path / "journal"
    proc, lines, ready = _spawn(root)
    try:
        assert ready.wait(30)
        verified = 0
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            [report] = verify_journal(root, "job-1")
            assert report.ok, report.problems
            verified += 1
            with Journal.open(root, "job-1", readonly=True) as j:
                m = j.meta
                assert m.local_seq is None or m.snapshot(m.local_seq) is not None
    finally:
        proc.kill()
        proc.wait(10)
        for f in (proc.stdout, proc.stderr):
            if f:
                f.close()
    assert verified > 5
    assert len([ln for ln in lines if ln.startswith("done snap")]) > 20
