"""The status page: served by the API (static files, no token inside, a strict CSP), the
read-only fields it needs, and a headless Chromium driving it against a running server.

The browser test runs everything for real: Mosquitto (tests/support/broker.py), the server's
roles as ``edge-server serve`` wires them (ingest, the resume worker, the API on a free port
with uvicorn), a device running a real ``generate`` job on the tiny decoder through the
agent's protocol session over the MQTT transport, and Chromium through Debian's
chromedriver. The page shows the device online and the job's progress; the device's MQTT
will fires; the page shows the job offline; the test clicks Resume; the page shows the job
running on the server, then completed (owner server, epoch 2).

Chromium and chromedriver are required, not optional: without them the test fails and says
what to install (CI installs them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge_agent import codec
from edge_agent.jobs import Job, load_job
from edge_agent.jobs.generate import GenerateJob
from edge_agent.protocol import AgentJobSession, JobIdentity
from server.api import ApiServer, create_app
from server.config import load_config
from server.liveness import Liveness
from server.serve import Server
from server.store import SQLiteStore, Store
from tests.support.broker import Broker
from tests.support.device_jobs import generate_job_file, server_models, uninterrupted
from tests.support.server_fakes import FakeResumer
from tests.support.sim_device import SimDevice, SimJob
from tests.test_server_api import TOKEN as API_TOKEN
from tests.test_server_api import fill

pytestmark = pytest.mark.integration

STATIC = Path(__file__).resolve().parents[1] / "server" / "static"
TOKEN = "status-page-token-0123456789abcdef"


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# ---------------------------------------------------------------------------------------------
# The page as served, and the fields it reads (no browser).


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[httpx.Client, SQLiteStore, FakeClock]]:
    with SQLiteStore(tmp_path / "store") as store:
        fill(store)
        clock = FakeClock(time.time() + 1000.0)
        lv = Liveness(store, heartbeat_timeout=3600, clock=clock)
        lv.seen("gw-1")
        app = create_app(store, token=API_TOKEN, resumer=FakeResumer(store), liveness=lv,
                         clock=clock)  # fmt: skip
        server = ApiServer(app, host="127.0.0.1", port=0).start()
        try:
            with httpx.Client(base_url=server.url, timeout=10) as client:
                yield client, store, clock
        finally:
            server.stop()


def test_the_page_is_served_without_a_token_and_holds_none(
    api: tuple[httpx.Client, SQLiteStore, FakeClock],
) -> None:
    client, _, _ = api
    for path in ("/", "/status"):
        r = client.get(path)
        assert r.status_code == 200, path
        assert r.headers["content-type"] == "text/html; charset=utf-8"
        assert API_TOKEN not in r.text
        assert r.text == (STATIC / "index.html").read_text()
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert "connect-src 'self'" in csp and "form-action 'none'" in csp
        assert r.headers["referrer-policy"] == "no-referrer"
        assert r.headers["x-content-type-options"] == "nosniff"
    js = client.get("/static/status.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert js.content == (STATIC / "status.js").read_bytes()
    css = client.get("/static/status.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    # nothing but the folder's own files: no traversal, no other suffixes, no listing
    for path in (
        "/static/../api.py",
        "/static/%2e%2e/api.py",
        "/static/..%2fapi.py",
        "/static/",
        "/static/nope.js",
        "/static/index.htm",
    ):
        assert client.get(path).status_code == 404, path
    # the page is not part of the API document
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and "/static/{name}" not in paths


def test_the_page_loads_nothing_from_elsewhere() -> None:
    """No CDN, no external fonts or scripts, no inline script or style (the CSP forbids
    them, so they would silently not run)."""
    html = (STATIC / "index.html").read_text()
    for text in (html, (STATIC / "status.js").read_text(), (STATIC / "status.css").read_text()):
        assert "http://" not in text and "https://" not in text and "//cdn" not in text
        assert "@import" not in text
    assert "<script>" not in html and "<style" not in html and " style=" not in html
    assert re.search(r"\son[a-z]+\s*=", html) is None  # no inline event handlers
    assert '<script src="/static/status.js" defer></script>' in html
    # the token goes in the Authorization header only, and the page writes text, not HTML
    js = (STATIC / "status.js").read_text()
    assert "innerHTML" not in js and "document.write" not in js and "eval(" not in js
    assert "localStorage" not in js  # sessionStorage only: gone with the tab


def test_ages_come_from_the_servers_clock(
    api: tuple[httpx.Client, SQLiteStore, FakeClock],
) -> None:
    """The page shows ages computed by the server, so a browser with a wrong clock still
    shows the right ones."""
    client, _, clock = api
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    devices = {d["device"]: d for d in client.get("/v1/devices", headers=auth).json()}
    gw1, gw2 = devices["gw-1"], devices["gw-2"]
    # gw-1 was seen by liveness at the fake clock's time; gw-2 only by the store, long ago
    assert gw1["last_seen_age_s"] == pytest.approx(clock.t - gw1["last_seen"])
    assert gw1["last_seen_age_s"] == pytest.approx(0.0, abs=1e-6)
    assert gw2["last_seen_age_s"] == pytest.approx(clock.t - gw2["last_seen"])
    assert gw2["last_seen_age_s"] > 900
    clock.t += 42.5
    again = {d["device"]: d for d in client.get("/v1/devices", headers=auth).json()}
    assert again["gw-1"]["last_seen_age_s"] == pytest.approx(42.5)

    jobs = {j["job"]: j for j in client.get("/v1/jobs", headers=auth).json()}
    j1 = jobs["job-1"]
    assert j1["status_age_s"] == pytest.approx(clock.t - j1["status_at"])
    assert j1["last_snapshot_age_s"] == pytest.approx(clock.t - j1["last_snapshot_at"])
    assert jobs["job-2"]["last_snapshot_age_s"] is None
    assert jobs["job-3"]["status"] == "completed" and jobs["job-3"]["status_age_s"] > 1000
    detail = client.get("/v1/jobs/job-1", headers=auth).json()
    assert detail["status_age_s"] == pytest.approx(j1["status_age_s"])
    # a store time in the future (another machine's clock) never gives a negative age
    clock.t = 0.0
    for d in client.get("/v1/devices", headers=auth).json():
        assert d["last_seen_age_s"] == 0.0
    for j in client.get("/v1/jobs", headers=auth).json():
        assert j["status_age_s"] == 0.0
        assert j["last_snapshot_age_s"] in (None, 0.0)


# ---------------------------------------------------------------------------------------------
# Headless Chromium against a running server.

BROWSER_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def _find(env: str, candidates: tuple[str, ...]) -> str | None:
    if os.environ.get(env):
        candidates = (os.environ[env],)
    for name in candidates:
        if os.path.isabs(name):
            if os.path.exists(name):
                return name
        elif found := shutil.which(name):
            return found
    return None


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium through the system's chromedriver (never Selenium Manager, which
    would download one). Missing pieces fail the test with what to install."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail('selenium is missing: pip install -e ".[dev]" (or pip install selenium)')
    chromium = _find("EDGE_RESUME_CHROMIUM", ("/usr/bin/chromium", "chromium", "chromium-browser"))
    driver_bin = _find("EDGE_RESUME_CHROMEDRIVER", ("/usr/bin/chromedriver", "chromedriver"))
    if chromium is None or driver_bin is None:
        pytest.fail(
            "the status page test needs Chromium and chromedriver "
            f"(found chromium={chromium}, chromedriver={driver_bin}): "
            "apt-get install -y chromium chromium-driver, or set EDGE_RESUME_CHROMIUM and "
            "EDGE_RESUME_CHROMEDRIVER"
        )
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in BROWSER_FLAGS:
        opts.add_argument(flag)
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    opts.add_argument(f"--user-data-dir={profile}")
    opts.add_argument("--window-size=1280,800")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_bin), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


@dataclass
class RealJob(SimJob):
    """A SimDevice job whose state comes from a real job run with onnxruntime."""

    real: Job | None = None

    def state(self) -> dict[str, Any]:
        assert self.real is not None
        return self.real.state()

    def advance(self, n: int = 1) -> None:
        assert self.real is not None
        self.real.run(n)
        self.step = self.real.step


def add_real_job(dev: SimDevice, job: Job) -> RealJob:
    identity = JobIdentity(
        job.spec.to_dict(), job.model_hash, codec.FORMAT_VERSION, job.total_steps
    )
    s = AgentJobSession(
        dev.agent, job.spec.id, identity, derivable=job.derivable, config=dev.config
    )
    j = RealJob(dev, job.spec.id, s, job.total_steps, real=job)
    dev.jobs[j.job] = j
    if dev.connected:
        dev.carry_out(j, s.connected(time.time(), step=j.step))
    return j


class StepGate:
    """Holds the server's run of ``job`` before its second step until :meth:`release`: the
    first server step has been recorded (status ``server-running``), so the page can be
    seen showing the job running on the server. Armed only once the device has stopped,
    so only the resume worker's steps are held."""

    def __init__(self, store: Store, job: str) -> None:
        self.store, self.job = store, job
        self.armed = False
        self.held = threading.Event()
        self._go = threading.Event()
        self._real = GenerateJob.run_step

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        gate, real = self, self._real

        def run_step(job: GenerateJob) -> None:
            if gate.armed and job.spec.id == gate.job:
                rec = gate.store.get_job(gate.job)
                if rec is not None and rec.status == "server-running":
                    gate.held.set()
                    if not gate._go.wait(30):
                        raise AssertionError("the test never released the server's run")
            real(job)

        monkeypatch.setattr(GenerateJob, "run_step", run_step)

    def release(self) -> None:
        self._go.set()


# Reads what the page shows, as the DOM has it (the visible text of each field).
READ_PAGE = """
const out = {devices: {}, jobs: {}, login: !document.getElementById("login").hidden,
             loginError: document.getElementById("login-error").textContent,
             conn: document.getElementById("conn").textContent};
for (const tr of document.querySelectorAll("#devices tbody tr")) {
  const f = (n) => tr.querySelector(`[data-field="${n}"]`).innerText.trim();
  out.devices[tr.dataset.device] = {state: tr.dataset.state, stateText: f("state"),
                                    lastSeen: f("last-seen"), jobs: f("jobs")};
}
for (const tr of document.querySelectorAll("#jobs tbody tr")) {
  const f = (n) => tr.querySelector(`[data-field="${n}"]`).innerText.trim();
  const bar = tr.querySelector("progress");
  const button = tr.querySelector("button");
  out.jobs[tr.dataset.job] = {
    status: tr.dataset.status, statusText: f("status"), progress: f("progress"),
    barValue: bar.value, barMax: bar.max, owner: f("owner"), seq: f("seq"), bytes: f("bytes"),
    snapshot: f("snapshot"), resume: f("resume"),
    phase: tr.querySelector("[data-value=phase]").dataset.phase,
    buttonEnabled: !button.disabled, buttonLabel: button.getAttribute("aria-label"),
  };
}
return out;
"""


def page_state(driver: Any) -> dict[str, Any]:
    return driver.execute_script(READ_PAGE)  # type: ignore[no-any-return]


def wait_page(
    driver: Any, cond: Callable[[dict[str, Any]], bool], what: str, timeout: float = 20.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        state = page_state(driver)
        if cond(state):
            return state
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the page did not show {what} within {timeout}s; it shows:\n"
                + json.dumps(state, indent=1)
            )
        time.sleep(0.1)


def job_is(job: str, **want: Any) -> Callable[[dict[str, Any]], bool]:
    def cond(s: dict[str, Any]) -> bool:
        j = s["jobs"].get(job)
        return j is not None and all(
            (v(j[k]) if callable(v) else j[k] == v) for k, v in want.items()
        )

    return cond


def console_problems(driver: Any) -> list[str]:
    """Script errors and CSP violations the browser logged. The wrong token's 401s are
    expected; they also show that the log is really being captured."""
    messages = [e.get("message", "") for e in driver.get_log("browser")]
    assert any("401" in m for m in messages), f"no browser log captured: {messages}"
    signs = ("Uncaught", "Content Security Policy", "Refused to")
    return [m for m in messages if any(s in m for s in signs)]


@pytest.mark.slow
def test_the_page_shows_a_job_going_offline_and_being_resumed(
    broker: Broker,
    browser: Any,
    tiny_models: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from selenium.webdriver.common.by import By

    total = 160
    jf = generate_job_file(
        tmp_path / "device", tiny_models["tiny-decoder.onnx"], job_id="gen-17", tokens=total
    )
    cfg = load_config(
        env={
            "EDGE_SERVER_BROKER_URL": broker.url,
            "EDGE_SERVER_BROKER_CLIENT_ID": "edge-server-status-page",
            "EDGE_SERVER_STORE_PATH": str(tmp_path / "store"),
            "EDGE_SERVER_API_PORT": "0",
            "EDGE_SERVER_API_TOKEN": TOKEN,
            "EDGE_SERVER_LIVENESS_CHECK_INTERVAL_S": "0.1",
            "EDGE_SERVER_WORKER_MODELS_DIR": str(server_models(tiny_models, tmp_path / "models")),
            "EDGE_SERVER_WORKER_DEVICE": "cpu",
        }
    )
    srv = Server(cfg).start()  # ingest, the real resume worker, the API: as `serve` wires them
    devices: list[SimDevice] = []
    try:
        assert srv.ingest_service.connected.wait(10)
        assert srv.store is not None and srv.api is not None
        gate = StepGate(srv.store, "gen-17")
        gate.install(monkeypatch)

        # gw-17 runs a real generate job; gw-2 runs another job and stays online throughout
        dev = SimDevice(broker.url, "gw-17").start()
        devices.append(dev)
        job = add_real_job(dev, load_job(jf))
        other = SimDevice(broker.url, "gw-2").start()
        devices.append(other)
        other_job = other.add_job("gen-2", total_steps=400)
        dev.run_to_acked(job, 40, every=10)
        other.run_to_acked(other_job, 150, every=50)

        # the operator opens the page with the token in the fragment
        base = srv.api.url
        browser.get(f"{base}/#token={TOKEN}")
        s = wait_page(browser, job_is("gen-17", status="running"), "gen-17 running")
        assert "token" not in browser.current_url, "the token must leave the address bar"
        assert browser.execute_script("return sessionStorage.getItem('edge-resume.token')") == TOKEN
        assert TOKEN not in browser.page_source
        assert not s["login"]
        assert s["devices"]["gw-17"]["state"] == "online"
        assert s["devices"]["gw-2"]["state"] == "online"
        assert s["jobs"]["gen-17"]["progress"].startswith(f"40 / {total} (25 %)")
        assert (s["jobs"]["gen-17"]["barValue"], s["jobs"]["gen-17"]["barMax"]) == (40, total)
        assert s["jobs"]["gen-17"]["owner"].split() == ["edge", "epoch", "1"]
        assert s["jobs"]["gen-17"]["seq"] == "4"
        assert s["jobs"]["gen-17"]["buttonEnabled"]
        assert s["jobs"]["gen-17"]["buttonLabel"] == "Resume job gen-17"

        # progress moves on the page as the device's snapshots are acknowledged; a
        # heartbeat shows the device ahead of the acknowledged state
        dev.run_to_acked(job, 20, every=10)
        job.advance(5)
        dev.heartbeat()
        s = wait_page(
            browser,
            job_is("gen-17", progress=lambda p: p.startswith(f"60 / {total}") and "65" in p),
            "gen-17 at step 60, the device at 65",
        )
        rec = srv.store.get_job("gen-17")
        assert rec is not None and rec.seq == 6 and rec.full_size > 0
        ratio = f"{rec.bytes_received / rec.full_size:.2f}\u00d7 \u00b7 6 snapshots"
        assert s["jobs"]["gen-17"]["bytes"].endswith(ratio), (s["jobs"]["gen-17"], ratio)

        # the token can be forgotten and typed in again; a wrong one is refused
        browser.find_element(By.ID, "forget").click()
        s = wait_page(browser, lambda s: s["login"], "the token form")
        assert browser.execute_script("return sessionStorage.getItem('edge-resume.token')") is None
        browser.find_element(By.ID, "token").send_keys("not-the-token")
        browser.find_element(By.CSS_SELECTOR, "#login-form button").click()
        wait_page(browser, lambda s: s["login"] and "refused" in s["loginError"], "a refusal")
        browser.save_screenshot(str(tmp_path / "status-token.png"))
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.CSS_SELECTOR, "#login-form button").click()
        wait_page(browser, lambda s: not s["login"] and "gen-17" in s["jobs"], "the jobs again")

        # gw-17 drops off: its MQTT will fires, and the page shows device and job offline
        dev.transport.close(timeout=2.0, send_will=True)
        s = wait_page(
            browser,
            lambda s: (
                s["devices"]["gw-17"]["state"] == "offline"
                and job_is("gen-17", status="offline")(s)
            ),
            "gw-17 and gen-17 offline",
        )
        assert s["devices"]["gw-2"]["state"] == "online"
        assert s["jobs"]["gen-2"]["status"] == "running"
        assert s["jobs"]["gen-17"]["buttonEnabled"]
        browser.save_screenshot(str(tmp_path / "status-offline.png"))

        # the operator clicks Resume: the server claims the job (epoch 2) and runs it
        gate.armed = True
        browser.find_element(By.CSS_SELECTOR, "tr[data-job='gen-17'] button").click()
        s = wait_page(
            browser,
            job_is("gen-17", status="server-running", phase="running", buttonEnabled=False),
            "gen-17 running on the server",
        )
        assert gate.held.is_set()
        assert s["jobs"]["gen-17"]["owner"].split() == ["server", "epoch", "2"]
        assert "resume: running" in s["jobs"]["gen-17"]["resume"]
        browser.save_screenshot(str(tmp_path / "status-resuming.png"))
        gate.release()

        s = wait_page(
            browser,
            job_is("gen-17", status="completed", phase="completed"),
            "gen-17 completed on the server",
            timeout=30,
        )
        j = s["jobs"]["gen-17"]
        assert j["owner"].split() == ["server", "epoch", "2"]
        assert j["progress"].startswith(f"{total} / {total} (100 %)")
        assert not j["buttonEnabled"]
        assert "resume: completed" in j["resume"]
        assert s["jobs"]["gen-2"]["status"] == "running"
        browser.save_screenshot(str(tmp_path / "status-completed.png"))

        # what the page said is what happened: the outputs equal an uninterrupted run
        want = uninterrupted(jf)
        got = srv.store.get_outputs("gen-17")
        assert got["tokens"].tobytes() == want["tokens"].tobytes()
        history = [c.status for c in srv.store.status_history("gen-17")]
        assert history[-4:] == ["offline", "resuming", "server-running", "completed"]

        # a narrow window: rows become labelled cards, nothing overflows sideways
        browser.set_window_size(420, 900)
        layout = browser.execute_script(
            """
            const td = document.querySelector("tr[data-job='gen-17'] td[data-field='status']");
            return {display: getComputedStyle(td).display,
                    label: getComputedStyle(td, "::before").content,
                    overflow: document.documentElement.scrollWidth - window.innerWidth};
            """
        )
        assert layout["display"] == "grid" and layout["label"] == '"Status"', layout
        assert layout["overflow"] <= 0, layout
        browser.save_screenshot(str(tmp_path / "status-narrow.png"))
        assert console_problems(browser) == []
    finally:
        for d in devices:
            d.close()
        srv.close()
