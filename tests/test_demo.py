"""The demo (``python -m server.demo``, what ``scripts/demo`` runs), end to end and in parts.

End to end, in a reduced size, as a separate process exactly as a user runs it: with
Mosquitto and with the embedded amqtt broker, each checking the exit code, the printed
report and its JSON (identical to an uninterrupted run, the device fenced on its return),
and that no process of the demo is left (every child carries ``EDGE_RESUME_DEMO=<workdir>``
in its environment; the test looks for it in ``/proc``). Ctrl-C in the middle and a server
that dies in the middle must also leave nothing behind, with the right exit codes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_agent.errors import DemoError
from server.demo import DemoOptions
from server.demo._brokers import (
    BUILTIN_BROKER_SETTINGS,
    DEPLOY_CONF,
    mosquitto_binary,
    project_broker_settings,
)
from server.demo._procs import Child, Children
from server.demo._run import MARK_ENV, Demo
from server.demo.cli import main

REPO = Path(__file__).resolve().parents[1]


def _settings(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def demo_processes(workdir: Path) -> list[int]:
    """Processes whose environment marks them as children of the demo run in ``workdir``."""
    mark = f"{MARK_ENV}={workdir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if mark in env and state != "Z":
            found.append(int(entry.name))
    return found


def demo_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    return env


def start_demo(workdir: Path, *args: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "server.demo", "--workdir", str(workdir), *args]
    return subprocess.Popen(
        argv,
        env=demo_env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


# ---------------------------------------------------------------------------------------------
# Parts (no processes of the product)


def test_builtin_broker_settings_are_the_projects() -> None:
    """An installation without the source tree gets the same Mosquitto settings."""
    assert _settings(BUILTIN_BROKER_SETTINGS) == _settings(DEPLOY_CONF.read_text())
    text, origin = project_broker_settings()
    assert text == DEPLOY_CONF.read_text() and origin.startswith("deploy/")


@pytest.mark.parametrize(
    "bad",
    [
        {"tokens": 5},
        {"tokens": 5000},
        {"cut_at": 0.0},
        {"cut_at": 1.0},
        {"step_seconds": -1.0},
        {"step_seconds": float("nan")},
        {"link_kbps": -5.0},
        {"broker": "hivemq"},
    ],
)
def test_bad_options_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(DemoError):
        DemoOptions(**bad).check()  # type: ignore[arg-type]


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--tokens", "3"]) == 2
    assert "--tokens must be" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--broker", "nope"])
    assert exc.value.code == 2


def test_a_foreign_workdir_is_refused_and_left_alone(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("mine")
    report = Demo(DemoOptions(workdir=tmp_path)).run()
    assert not report.ok
    assert "not made by the demo" in report.problems[0]
    assert [p.name for p in tmp_path.iterdir()] == ["precious.txt"]


def test_stop_kills_the_process_group(tmp_path: Path) -> None:
    """A child's own children (grandchildren of the demo) do not outlive it."""
    script = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    children = Children()
    c = children.add(Child("parent", [sys.executable, "-c", script], tmp_path / "c.log"))
    c.start()
    deadline = time.monotonic() + 20
    while not c.log.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    grandchild = int(c.log.read_text().split()[0])
    codes = children.stop_all(timeout=5)
    assert codes["parent"] == -signal.SIGTERM
    deadline = time.monotonic() + 10
    while Path(f"/proc/{grandchild}").exists():
        stat = Path(f"/proc/{grandchild}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            break  # dead; its parent (gone) never reaped it
        assert time.monotonic() < deadline, "the grandchild survived"
        time.sleep(0.05)


def test_children_die_with_a_killed_demo(tmp_path: Path) -> None:
    """SIGKILL to the demo itself (no cleanup code runs): its children get SIGTERM from the
    kernel (parent-death signal) and exit."""
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from server.demo._procs import Child\n"
        f"c = Child('sleeper', [sys.executable, '-c', 'import time; time.sleep(60)'], "
        f"Path({str(tmp_path / 's.log')!r})).start()\n"
        "print(c.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    demo = subprocess.Popen(
        [sys.executable, "-c", script], env=demo_env(), stdout=subprocess.PIPE, text=True
    )
    assert demo.stdout is not None
    pid = int(demo.stdout.readline())
    assert Path(f"/proc/{pid}").exists()
    demo.kill()
    demo.wait(10)
    demo.stdout.close()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists():
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            break
        assert time.monotonic() < deadline, "the child outlived the killed demo"
        time.sleep(0.05)


@pytest.mark.integration
def test_auto_falls_back_to_amqtt_without_mosquitto(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No Mosquitto on the machine: ``auto`` starts the embedded broker, which speaks MQTT
    3.1.1 (retained messages and persistent sessions included) to the project's transport."""
    from edge_agent.transport import Message, Transport, TransportConfig
    from server.demo import _brokers

    monkeypatch.setattr(_brokers, "mosquitto_binary", lambda: None)
    children = Children()
    try:
        handle = _brokers.start_broker("auto", tmp_path, children)
        assert handle.kind == "amqtt" and handle.protocol == "3.1.1"
        pub = Transport(TransportConfig(broker=handle.url, client_id="pub", protocol="3.1.1"))
        pub.start().wait_connected(10)
        pub.publish("t/ctl", b"retained", retain=True).result(10)
        sub = Transport(TransportConfig(broker=handle.url, client_id="sub", protocol="3.1.1"))
        sub.subscribe_nowait([("t/#", 1)])
        sub.start().wait_connected(10)
        deadline = time.monotonic() + 10
        got = None
        while got is None and time.monotonic() < deadline:
            ev = sub.get(timeout=0.2)
            if isinstance(ev, Message):
                got = ev
        assert got is not None and (got.topic, got.payload, got.retain) == (
            "t/ctl",
            b"retained",
            True,
        )
        for t in (pub, sub):
            t.close(timeout=2)
    finally:
        codes = children.stop_all(timeout=10)
    assert codes == {"amqtt": 0}  # it stops cleanly on SIGTERM


# ---------------------------------------------------------------------------------------------
# End to end


SMALL = ("--tokens", "300", "--step-seconds", "0.015", "--cut-at", "0.5")


@pytest.mark.integration
@pytest.mark.parametrize("broker", ["mosquitto", "amqtt"])
def test_demo_end_to_end(tmp_path: Path, broker: str) -> None:
    if broker == "mosquitto":
        assert mosquitto_binary(), "mosquitto is not installed (apt-get install -y mosquitto)"
    work = tmp_path / "work"
    report_file = tmp_path / "report.json"
    proc = start_demo(work, *SMALL, "--broker", broker, "--report-json", str(report_file))
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    # the printed report
    assert re.search(r"identical to an uninterrupted run\s*│\s*yes", out), out
    assert "result: OK" in out
    assert "cut: SIGKILL to the agent" in out
    assert ("Mosquitto" if broker == "mosquitto" else "amqtt") in out
    assert "status page: http://127.0.0.1:" in out and "/#token=" in out
    # the JSON report
    rep = json.loads(report_file.read_text())
    assert rep["ok"] is True and rep["identical"] is True and rep["state_identical"] is True
    assert rep["device_fenced"] is True and rep["problems"] == [] and rep["server_exit"] == 0
    assert rep["tokens"] == 300
    assert 0 < rep["device_tokens"] < 300
    assert rep["device_tokens"] + rep["server_tokens"] == 300
    assert rep["snapshots_sent"] >= 2
    assert 0 < rep["bytes_sent"] < rep["bytes_full"] / 10  # deltas, no KV cache on this link
    assert rep["kv_sent"] is False
    assert 0 < rep["offline_after_s"] <= rep["resume_requested_after_s"]
    assert rep["resume_requested_after_s"] < rep["first_step_after_s"]
    assert rep["first_step_after_s"] <= rep["completed_after_s"]
    assert "token" not in json.dumps(rep).replace("tokens", "")  # no API token in the file
    # the work dir holds what a user would look at; nothing of the demo still runs
    assert (work / "server" / "server.toml").is_file()
    assert (work / "device" / "agent-1.log").is_file()
    assert demo_processes(work) == []


@pytest.mark.integration
def test_ctrl_c_stops_everything(tmp_path: Path) -> None:
    work = tmp_path / "work"
    proc = start_demo(work, "--tokens", "2000", "--step-seconds", "0.05")
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 120
    for line in proc.stdout:  # wait until broker, server and agent all run
        lines.append(line)
        if "edge-agent runs job" in line or time.monotonic() > deadline:
            break
    time.sleep(1.5)
    assert len(demo_processes(work)) >= 3, "".join(lines)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, "".join(lines) + rest
    assert "every process the demo started was stopped" in rest
    assert demo_processes(work) == []


@pytest.mark.integration
def test_a_failure_midway_stops_everything_and_exits_1(tmp_path: Path) -> None:
    """The server dies while the device runs: the demo says so, stops the rest, exits 1."""
    work = tmp_path / "work"
    proc = start_demo(work, "--tokens", "2000", "--step-seconds", "0.05")
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        if "edge-agent runs job" in line:
            break
    servers = [
        pid
        for pid in demo_processes(work)
        if b"server.cli" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(servers) == 1, "".join(lines)
    os.kill(servers[0], signal.SIGKILL)
    rest, _ = proc.communicate(timeout=90)
    assert proc.returncode == 1, "".join(lines) + rest
    assert "demo failed" in rest and "edge-server exited" in rest
    assert f"logs kept in {work}" in rest
    assert demo_processes(work) == []
