"""The ``edge-server`` CLI: verify, jobs, devices, resume and handover in-process (typer's
runner) against a real API over HTTP, and ``serve`` as a real process stopped by SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from edge_agent.errors import ConfigError
from server.api import ApiServer, create_app
from server.cli import app
from server.config import load_config
from server.serve import Server
from server.store import SQLiteStore
from tests.support.broker import Broker, free_port
from tests.support.server_fakes import FakeResumer
from tests.test_server_api import TOKEN, fill

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
WIDE = {"COLUMNS": "200"}


@pytest.fixture
def store_path(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "store"
    with SQLiteStore(path) as s:
        fill(s)
    yield path


@pytest.fixture
def api(store_path: Path) -> Iterator[tuple[str, FakeResumer, SQLiteStore]]:
    with SQLiteStore(store_path) as store:
        resumer = FakeResumer(store)
        server = ApiServer(create_app(store, token=TOKEN, resumer=resumer), port=0).start()
        try:
            yield server.url, resumer, store
        finally:
            server.stop()


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    r = runner.invoke(app, list(args), env={**WIDE, **(env or {})})
    return r.exit_code, r.output


def test_verify(store_path: Path, tmp_path: Path) -> None:
    code, text = invoke("verify", str(store_path))
    assert code == 0 and text.startswith("OK: 3 jobs, 3 snapshots")
    blob = next(p for p in (store_path / "blobs").rglob("*") if p.is_file())
    blob.write_bytes(blob.read_bytes()[:-1] + b"\x00")
    code, text = invoke("verify", str(store_path))
    assert code == 1 and "problem:" in text
    code, text = invoke("verify", str(tmp_path / "none"))
    assert code == 2 and "cannot verify" in text


def test_jobs_table_json_and_store(
    api: tuple[str, FakeResumer, SQLiteStore], store_path: Path
) -> None:
    url, _, _ = api
    code, text = invoke("jobs", "--url", url, "--token", TOKEN)
    assert code == 0, text
    assert "3 jobs" in text and "job-1" in text and "6/10 (60%)" in text and "completed" in text
    code, text = invoke("jobs", "--url", url, "--token", TOKEN, "--json", "--status", "completed")
    assert code == 0 and [j["job"] for j in json.loads(text)] == ["job-3"]
    code, text = invoke("jobs", "--store", str(store_path), "--json", "--device", "gw-1")
    assert code == 0 and [j["job"] for j in json.loads(text)] == ["job-1", "job-2"]


def test_token_from_environment_and_refusals(
    api: tuple[str, FakeResumer, SQLiteStore], tmp_path: Path
) -> None:
    url, _, _ = api
    tok = tmp_path / "token"
    tok.write_text(TOKEN + "\n")
    env = {"EDGE_SERVER_API_URL": url, "EDGE_SERVER_API_TOKEN_FILE": str(tok)}
    code, text = invoke("devices", env=env)
    assert code == 0 and "gw-1" in text and "gw-2" in text
    code, text = invoke("jobs", "--url", url, "--token", "wrong")
    assert code == 2 and "refused the token" in text
    code, text = invoke("jobs", "--url", url)
    assert code == 2 and "no API token" in text
    code, text = invoke("jobs", "--url", f"http://127.0.0.1:{free_port()}", "--token", TOKEN)
    assert code == 2 and "cannot reach" in text


def test_resume_idempotent_and_wait(api: tuple[str, FakeResumer, SQLiteStore]) -> None:
    url, resumer, _ = api
    auth = ("--url", url, "--token", TOKEN)
    code, text = invoke("resume", "job-1", *auth)
    assert code == 0 and "job-1: resuming (attempt 1, phase queued" in text
    code, text = invoke("resume", "job-1", *auth)
    assert code == 0 and "already resuming (attempt 1" in text
    code, text = invoke("resume", "job-3", *auth)
    assert code == 1 and "409" in text and "completed" in text
    code, text = invoke("resume", "nope", *auth)
    assert code == 2 and "404" in text
    resumer.complete_on_request = True
    code, text = invoke("resume", "job-2", "--wait", "--timeout", "30", *auth)
    assert code == 0 and "status completed" in text


def test_handover(api: tuple[str, FakeResumer, SQLiteStore]) -> None:
    url, resumer, store = api
    store.set_device_online("gw-1", True)
    code, text = invoke("handover", "job-1", "--url", url, "--token", TOKEN)
    assert code == 0 and "hand-over requested" in text
    assert resumer.calls == [("handover", "job-1")]


def test_worker_role_without_the_worker_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "server.worker", None)
    cfg = load_config(env={"EDGE_SERVER_API_TOKEN": "x"})
    with pytest.raises(ConfigError, match=r"server\.worker"):
        Server(cfg, ("ingest", "worker", "api"))
    with pytest.raises(ConfigError, match="bearer token"):
        Server(load_config(env={}), ("api",))


def test_serve_runs_until_sigterm(broker: Broker, tmp_path: Path) -> None:
    port = free_port()
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        EDGE_SERVER_BROKER_URL=broker.url,
        EDGE_SERVER_STORE_PATH=str(tmp_path / "store"),
        EDGE_SERVER_API_PORT=str(port),
        EDGE_SERVER_API_TOKEN=TOKEN,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--roles", "ingest,api"],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        health = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).json()
                if health["roles"]["ingest"]["mqtt_connected"]:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        assert health is not None and health["status"] == "ok", health
        r = httpx.get(
            f"http://127.0.0.1:{port}/v1/jobs", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert r.status_code == 200 and r.json() == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        stderr = proc.stderr.read() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
    assert "stopped" in stderr
    code, text = invoke("verify", str(tmp_path / "store"))
    assert code == 0, text


def test_serve_reports_a_bad_configuration(tmp_path: Path) -> None:
    bad = tmp_path / "server.toml"
    bad.write_text("[api]\nport = 'x'\n")
    code, text = invoke("serve", "--config", str(bad))
    assert code == 2 and "must be an integer" in text


def test_worker_role_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker imports torch lazily, so the server checks up front that it is there."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    cfg = load_config(env={"EDGE_SERVER_API_TOKEN": "x"})
    with pytest.raises(ConfigError, match=r"server\.worker needs 'torch'"):
        Server(cfg, ("ingest", "worker", "api"))
    Server(cfg, ("ingest", "api"))  # the control: without the worker, torch is not needed


def test_a_server_process_starts_without_importing_torch() -> None:
    """Importing torch takes seconds; a restarted server takes snapshots again before it:
    the worker resolves its device (and imports torch) in the background."""
    code = (
        "import sys\n"
        "from server.serve import Server, load_worker_factory\n"
        "from server.config import load_config\n"
        "Server(load_config(env={'EDGE_SERVER_API_TOKEN': 'x'}), ('ingest', 'worker', 'api'))\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
