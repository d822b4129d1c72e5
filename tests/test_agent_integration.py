"""The edge agent end to end: a real Mosquitto, the agent as a separate process (as a gateway
runs it, with the server's dependencies blocked), real onnxruntime and real journal files,
and a small server end (tests/support/mini_server.py: the protocol's server session over a
real SQLite store).

Faults are real: the broker SIGKILLed and restarted on its port, the agent SIGKILLed and
started again, the link cut by a proxy. Results are compared with an uninterrupted run of
the same job in this process, bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.jobs import JobSpec, create_job
from edge_agent.journal import Journal
from tests.support.agent_proc import AgentProcess, journal_meta, local_step, write_job
from tests.support.broker import Broker, free_port
from tests.support.mini_server import MiniServer, wait_for
from tests.support.mqtt_proxy import MqttProxy
from tests.support.tls import make_pki

pytestmark = pytest.mark.integration

PROMPT = "The gateway said: "


@pytest.fixture
def server(broker: Broker, tmp_path: Path) -> Iterator[MiniServer]:
    with MiniServer(broker.url, tmp_path / "store") as s:
        yield s


def generate_job(
    folder: Path, models: dict[str, Path], job_id: str, tokens: int, **kw: Any
) -> Path:
    return write_job(
        folder, job_id, "generate", models["tiny-decoder.onnx"],
        params={"prompt": PROMPT, "max_new_tokens": tokens, "temperature": 0.8, "top_k": 40,
                "seed": 11},
        snapshot=kw.pop("snapshot", {"every_steps": 40, "every_seconds": 1.0}),
        link={"kv": kw.pop("kv", "auto")},
        runtime={"min_step_seconds": kw.pop("pace", 0.01)},
    )  # fmt: skip


def batch_job(folder: Path, models: dict[str, Path], job_id: str, **kw: Any) -> Path:
    return write_job(
        folder, job_id, "batch", models["tiny-gru.onnx"],
        params={"dataset": str(models["sensors.npy"]), "batch_size": kw.pop("batch_size", 10)},
        snapshot={"every_steps": 20, "every_seconds": 1.0},
        runtime={"min_step_seconds": kw.pop("pace", 0.01)},
    )  # fmt: skip


def uninterrupted(job_file: Path) -> dict[str, np.ndarray]:
    job = create_job(JobSpec.load(job_file))
    job.run()
    return job.outputs()


def chaos(agent: AgentProcess, broker: Broker, job: str, marks: list[int]) -> list[int]:
    """Run the agent through two broker SIGKILLs and two agent SIGKILLs, each once the job's
    journal reaches the next mark in ``marks``. Returns the durable steps the agent was
    killed at."""
    killed_at: list[int] = []
    for n, mark in enumerate(marks):
        wait_for(lambda m=mark: local_step(agent.journal, job) >= m, 90, f"step {mark}",
                 check=agent.check_alive)  # fmt: skip
        if n % 2 == 0:  # the broker dies; the agent keeps computing offline
            broker.kill()
            before = local_step(agent.journal, job)
            wait_for(lambda b=before: local_step(agent.journal, job) > b, 60,
                     "progress while the broker is down", check=agent.check_alive)  # fmt: skip
            broker.start()
        else:  # the agent dies; it resumes from its journal
            killed_at.append(local_step(agent.journal, job))
            agent.kill()
            agent.start()
    return killed_at


def resumed_steps(agent: AgentProcess) -> list[int]:
    out = []
    for line in agent.log_text().splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            if rec.get("event") == "job-open" and rec.get("restored_seq") is not None:
                out.append(rec["step"])
    return out


def assert_clean(agent: AgentProcess, server: MiniServer) -> None:
    assert agent.blocked_imports() == [], "the agent tried to import a server dependency"
    assert server.errors == []


# ---------------------------------------------------------------------------------------------


def test_generate_survives_broker_and_agent_kills(
    tiny_models: dict[str, Path], broker: Broker, server: MiniServer, tmp_path: Path
) -> None:
    job_file = generate_job(tmp_path, tiny_models, "gen-chaos", 1200)
    agent = AgentProcess(tmp_path / "agent", [job_file], broker.url).start()
    try:
        killed_at = chaos(agent, broker, "gen-chaos", [150, 350, 550, 750])
        assert agent.wait(150) == 0, agent.log_tail()
    finally:
        agent.stop()
    expected = uninterrupted(job_file)["tokens"]
    assert len(expected) == 1200
    # the agent's outputs
    got = np.load(agent.outputs / "gen-chaos.npz")["tokens"]
    np.testing.assert_array_equal(got, expected)
    # the server's stored state: the prompt, then exactly the same tokens
    wait_for(lambda: server.completed("gen-chaos"), 30, "the server to record completion")
    stored = server.store.load_state("gen-chaos").state
    prompt = np.frombuffer(PROMPT.encode(), np.uint8).astype(np.int64)
    np.testing.assert_array_equal(stored["tokens"], np.concatenate([prompt, expected]))
    assert stored["step"] == 1200
    assert server.store.get_job("gen-chaos").status == "completed"  # type: ignore[union-attr]
    # each restart resumed from the journal, never from scratch, losing at most an interval
    resumed = resumed_steps(agent)
    assert len(resumed) == 2 and all(r >= k > 0 for r, k in zip(resumed, killed_at, strict=True))
    meta = journal_meta(agent.journal, "gen-chaos")
    assert (meta.status, meta.owner, meta.epoch) == ("done", "edge", 1)
    with Journal.open(agent.journal, "gen-chaos", readonly=True) as j:
        assert j.verify(deep=True).ok
    assert server.connects >= 3  # it saw both broker restarts
    assert_clean(agent, server)


def test_batch_survives_broker_and_agent_kills(
    tiny_models: dict[str, Path], broker: Broker, server: MiniServer, tmp_path: Path
) -> None:
    job_file = batch_job(tmp_path, tiny_models, "gru-chaos")  # 5000 rows / 10 = 500 steps
    agent = AgentProcess(tmp_path / "agent", [job_file], broker.url).start()
    try:
        killed_at = chaos(agent, broker, "gru-chaos", [60, 160, 260, 360])
        assert agent.wait(150) == 0, agent.log_tail()
    finally:
        agent.stop()
    expected = uninterrupted(job_file)["results"]
    assert expected.shape == (5000, 1)
    got = np.load(agent.outputs / "gru-chaos.npz")["results"]
    assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes()  # bit for bit
    wait_for(lambda: server.completed("gru-chaos"), 30, "the server to record completion")
    stored = server.store.load_state("gru-chaos").state
    assert stored["results"].tobytes() == expected.tobytes()
    resumed = resumed_steps(agent)
    assert len(resumed) == 2 and all(r >= k > 0 for r, k in zip(resumed, killed_at, strict=True))
    assert journal_meta(agent.journal, "gru-chaos").status == "done"
    assert_clean(agent, server)


def test_sigterm_takes_a_final_snapshot_and_exits_cleanly(
    tiny_models: dict[str, Path], broker: Broker, server: MiniServer, tmp_path: Path
) -> None:
    # no periodic snapshot would come for a long time: what the journal and the server
    # hold after SIGTERM is the final snapshot
    job_file = generate_job(
        tmp_path, tiny_models, "gen-term", 3000,
        snapshot={"every_steps": 100_000, "every_seconds": 3600.0},
    )  # fmt: skip
    agent = AgentProcess(tmp_path / "agent", [job_file], broker.url).start()
    try:
        wait_for(
            lambda: any(s.job == "gen-term" and s.job_step >= 100 for s in server.lag),
            60, "the agent to be online at step 100", check=agent.check_alive,
        )  # fmt: skip
        assert local_step(agent.journal, "gen-term") == 0  # nothing snapshotted yet
        assert agent.terminate(30) == 0, agent.log_tail()
    finally:
        agent.stop()
    meta = journal_meta(agent.journal, "gen-term")
    assert meta.status == "running" and meta.local is not None
    step = meta.local.step
    assert 100 <= step < 3000
    # offered while connected, and acknowledged before the exit
    assert meta.acked is not None and meta.acked.step == step
    assert server.server_step("gen-term") == step
    # the final state is the uninterrupted run's state at that step
    prompt_len = len(PROMPT.encode())
    stored = server.store.load_state("gen-term").state
    job = create_job(JobSpec.load(job_file))
    job.run(step)
    np.testing.assert_array_equal(stored["tokens"], job.state()["tokens"])
    with Journal.open(agent.journal, "gen-term", readonly=True) as j:
        assert j.verify(deep=True).ok
        assert len(stored["tokens"]) == prompt_len + step
    log = agent.log_text()
    assert '"event":"stopped"' in log and '"event":"fatal"' not in log
    # the will was not needed: the agent said it was going offline (retained STATUS)
    wait_for(lambda: any(not online for _, _, online in server.status), 10, "STATUS offline")
    assert_clean(agent, server)


def test_takeover_stops_that_job_and_only_that_job(
    tiny_models: dict[str, Path], broker: Broker, server: MiniServer, tmp_path: Path
) -> None:
    gen = generate_job(tmp_path, tiny_models, "gen-taken", 3000)
    gru = batch_job(tmp_path, tiny_models, "gru-kept", pace=0.02)
    agent = AgentProcess(tmp_path / "agent", [gen, gru], broker.url).start()
    try:
        wait_for(lambda: server.server_step("gen-taken") > 0, 60, "a first snapshot",
                 check=agent.check_alive)  # fmt: skip
        epoch = server.take_over("gen-taken")
        assert epoch == 2
        wait_for(lambda: journal_meta(agent.journal, "gen-taken").status == "fenced", 30,
                 "the agent to journal the job fenced", check=agent.check_alive)  # fmt: skip
        # from now on: not a single message for the taken job, while the other goes on
        kept = server.server_step("gru-kept")
        sent = server.count("gen-taken")
        wait_for(lambda: server.server_step("gru-kept") >= kept + 60, 60,
                 "the other job to go on", check=agent.check_alive)  # fmt: skip
        assert server.count("gen-taken") == sent
        assert agent.wait(120) == 0, agent.log_tail()
    finally:
        agent.stop()
    meta = journal_meta(agent.journal, "gen-taken")
    assert (meta.status, meta.owner, meta.epoch) == ("fenced", "server", 2)
    assert server.count("gen-taken") == sent
    assert server.completed("gru-kept")
    assert journal_meta(agent.journal, "gru-kept").status == "done"
    assert_clean(agent, server)


def test_takeover_while_offline_is_learned_on_reconnect(
    tiny_models: dict[str, Path], broker: Broker, server: MiniServer, tmp_path: Path
) -> None:
    gen = generate_job(tmp_path, tiny_models, "gen-away", 3000)
    with MqttProxy(broker.port) as proxy:
        url = f"mqtt://127.0.0.1:{proxy.port}"
        agent = AgentProcess(tmp_path / "agent", [gen], url).start()
        try:
            wait_for(lambda: server.server_step("gen-away") > 0, 60, "a first snapshot",
                     check=agent.check_alive)  # fmt: skip
            proxy.hold()
            proxy.cut()  # the gateway's link is gone; the agent keeps computing
            before = local_step(agent.journal, "gen-away")
            wait_for(lambda: local_step(agent.journal, "gen-away") > before + 40, 60,
                     "progress offline", check=agent.check_alive)  # fmt: skip
            assert server.take_over("gen-away") == 2
            taken_at = time.monotonic()
            proxy.release()  # the link is back: the retained CTL says the server owns it
            assert agent.wait(60) == 0, agent.log_tail()
        finally:
            agent.stop()
    meta = journal_meta(agent.journal, "gen-away")
    assert (meta.status, meta.owner, meta.epoch) == ("fenced", "server", 2)
    # after the take-over: no snapshot, query, done or release (a BIRTH may cross the CTL)
    assert server.count("gen-away", ("snap", "query", "done", "release"), after=taken_at) == 0
    assert server.count("gen-away", ("birth",), after=taken_at) <= 1
    # the server's copy is what it held at the take-over
    assert server.store.get_job("gen-away").owner == "server"  # type: ignore[union-attr]
    assert_clean(agent, server)


def test_status_and_verify_commands(
    tiny_models: dict[str, Path], broker: Broker, server: MiniServer, tmp_path: Path
) -> None:
    import subprocess
    import sys

    job_file = generate_job(tmp_path, tiny_models, "gen-cli", 200, pace=0.0)
    agent = AgentProcess(tmp_path / "agent", [job_file], broker.url).start()
    try:
        assert agent.wait(60) == 0, agent.log_tail()
    finally:
        agent.stop()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edge_agent.cli", *args, "--journal", str(agent.journal)],
            env=agent.env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    status = cli("status")
    assert status.returncode == 0, status.stderr
    head, row = status.stdout.splitlines()
    assert head.split()[:4] == ["JOB", "STATUS", "OWNER/EPOCH", "PROGRESS"]
    assert row.split()[:5] == ["gen-cli", "done", "edge/1", "200/200", "100%"]
    doc = json.loads(cli("status", "--json").stdout)
    assert doc["job"] == "gen-cli" and doc["step"] == doc["total_steps"] == 200
    assert 0 < doc["bytes_sent"] < doc["bytes_full"]  # deltas without the KV cache
    assert doc["acked_step"] == 200 and doc["in_flight"] is None

    ok = cli("verify", "--deep")
    assert ok.returncode == 0 and "1 of 1 journals OK (deep)" in ok.stdout, ok.stdout
    # damage one snapshot file: verify names it and fails
    snap = sorted((agent.journal / "gen-cli").glob("snap-*.ers"))[0]
    raw = bytearray(snap.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    snap.write_bytes(bytes(raw))
    bad = cli("verify")
    assert bad.returncode == 1 and snap.name in bad.stdout and "PROBLEM" in bad.stdout
    assert "0 of 1 journals OK" in bad.stdout
    assert agent.blocked_imports() == []


def test_tls_client_certificate_and_password_from_config_and_environment(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """mqtts with a client certificate and a password: settings from a config file and the
    environment, the job file on the command line."""
    pki = make_pki(tmp_path / "pki")
    passwd = tmp_path / "passwd"
    passwd.write_text("")
    for user, pw in (("gw-tls", "s3cret"), ("server", "srv")):
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, pw], check=True)
    tls_port = free_port()
    listener = [f"listener {tls_port} 127.0.0.1", f"cafile {pki.ca}",
                f"certfile {pki.server_cert}", f"keyfile {pki.server_key}",
                "require_certificate true"]  # fmt: skip
    job_file = generate_job(tmp_path, tiny_models, "gen-tls", 60, pace=0.0)
    (tmp_path / "pw").write_text("s3cret\n")
    conf = tmp_path / "agent.toml"
    conf.write_text(
        f'[agent]\ndevice = "gw-tls"\nbroker = "mqtts://127.0.0.1:{tls_port}"\n'
        f'username = "gw-tls"\nca_file = "{pki.ca}"\ncert_file = "{pki.client_cert}"\n'
        f'key_file = "{pki.client_key}"\nmax_kbps = 512\n'
    )
    with (
        Broker(tmp_path / "broker", extra=[f"password_file {passwd}"], allow_anonymous=False,
               listener_extra=listener) as broker,
        MiniServer(broker.url, tmp_path / "store", username="server", password="srv") as srv,
    ):  # fmt: skip
        agent = AgentProcess(tmp_path / "agent", [job_file], "unused")
        env = agent.env()
        env.update(EDGE_AGENT_CONFIG=str(conf), EDGE_AGENT_PASSWORD_FILE=str(tmp_path / "pw"))
        cmd = [c for c in agent.command() if c not in ("--broker", "unused", "--device", "gw-1")]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert srv.completed("gen-tls")
        tokens = np.load(agent.outputs / "gen-tls.npz")["tokens"]
        np.testing.assert_array_equal(tokens, uninterrupted(job_file)["tokens"])
        # a wrong password is refused for good: exit 1, the work kept in the journal
        (tmp_path / "pw").write_text("wrong\n")
        job2 = generate_job(tmp_path, tiny_models, "gen-tls-2", 2000)
        cmd2 = [str(job2) if c == str(job_file) else c for c in cmd]
        proc = subprocess.run(cmd2, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert '"event":"fatal"' in proc.stderr and "not authorized" in proc.stderr.lower()
    assert journal_meta(agent.journal, "gen-tls-2").status == "running"
    assert os.listdir(agent.journal / "gen-tls-2")
