"""Security, tested with the real parts: Mosquitto running deploy/mosquitto/mosquitto.conf with
the password file add-user.sh makes, the shipped ACL and make-certs.sh's certificates
(tests/support/deploy_broker.py); the real server (``python -m server.cli serve``) and its
HTTP API; the real edge agent (``python -m edge_agent.cli run``) over TLS.

What each part enforces (docs/server.md, "Security"):

* the broker: passwords (no anonymous clients), the ACL (a device reads and writes only its
  own topics), the client id bound to the user name on the device listener (no session
  takeover), TLS (devices must trust the broker's CA; with mutual TLS the broker must trust
  theirs);
* the server: a message's device and job must be its topic's, and a job belongs to the device
  that first announced it;
* the API: a bearer token on every ``/v1`` route.

Each test has a control that shows the thing refused would have worked through the allowed
path (so a test that sees "nothing" could have seen something).
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.errors import ConnectionRefused, TransportError
from edge_agent.protocol import AgentDevice, AgentJobSession, JobIdentity, Outgoing, TopicNamespace
from edge_agent.transport import (
    Connected,
    Disconnected,
    Message,
    TLSOptions,
    Transport,
    TransportConfig,
)
from tests.support.agent_proc import AgentProcess, write_job
from tests.support.cluster import ServerProcess
from tests.support.deploy_broker import (
    MOSQUITTO,
    DeployBroker,
    DeployInstall,
    install_deploy,
    make_certs,
)
from tests.support.sim_device import SimDevice, generate_spec

pytestmark = pytest.mark.integration

NS = TopicNamespace()
PASSWORDS = {"edge-server": "server-pw-0123", "gw-a": "gw-a-pw-4567", "gw-b": "gw-b-pw-89ab"}
TOKEN = "security-token-0123456789abcdef"
#: Device ids at the edges of what is valid (certificates made for them too: the control for
#: make-certs.sh's refusals).
ODD_IDS = ("A.b_c-9", "x" * 64)
#: How long "nothing arrives" is watched for, after a control message that did arrive.
QUIET = 0.3


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def install(tmp_path_factory: pytest.TempPathFactory) -> DeployInstall:
    """The broker's files as deploy/README.md installs them: users edge-server, gw-a, gw-b
    (add-user.sh), a test CA, the broker's certificate and client certificates for gw-a,
    gw-b and ODD_IDS (make-certs.sh)."""
    return install_deploy(
        tmp_path_factory.mktemp("install"), PASSWORDS, cert_devices=("gw-a", "gw-b", *ODD_IDS)
    )


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another CA, made by make-certs.sh elsewhere, with a certificate for gw-a."""
    out = tmp_path_factory.mktemp("other") / "pki"
    done = make_certs(out, "localhost", "gw-a")
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture
def broker(install: DeployInstall, tmp_path: Path) -> Iterator[DeployBroker]:
    """A fresh broker (no sessions, no retained messages) on the shipped configuration."""
    with DeployBroker(install, tmp_path / "broker") as b:
        yield b


class Deployment:
    """The shipped broker and a real ``edge-server serve`` (all roles) on it, connected as
    deploy/server.toml does: user ``edge-server`` with a password file, on the loopback
    listener."""

    def __init__(self, install: DeployInstall, workdir: Path, models: dict[str, Path]) -> None:
        self.install = install
        self.workdir = workdir
        self.models = models
        self.broker = DeployBroker(install, workdir / "broker").start()
        pw = workdir / "broker-password"
        pw.write_text(PASSWORDS["edge-server"] + "\n")
        self.server = ServerProcess(
            workdir / "server",
            self.broker.plain_url,
            models["tiny-decoder.onnx"].parent,
            token=TOKEN,
            overrides={"broker": {"username": "edge-server", "password_file": str(pw)}},
        )
        try:
            self.server.start()
        except BaseException:
            self.close()
            raise
        self.http = httpx.Client(base_url=self.server.url, timeout=15.0)

    def api(self, method: str, path: str, **kw: Any) -> Any:
        r = self.http.request(method, path, headers={"Authorization": f"Bearer {TOKEN}"}, **kw)
        assert r.status_code == 200, f"{method} {path}: {r.status_code} {r.text[:500]}"
        return r.json()

    def job(self, job_id: str) -> dict[str, Any] | None:
        r = self.http.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {TOKEN}"})
        return r.json() if r.status_code == 200 else None

    def refused(self) -> dict[str, float]:
        """``edge_resume_refused_messages_total`` by reason, from the server's /metrics."""
        text = self.http.get("/metrics").text
        pattern = r'^edge_resume_refused_messages_total\{reason="([^"]+)"\} (\S+)$'
        return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text, re.M)}

    def report(self) -> str:
        return (
            f"--- server ---\n{self.server.log_tail()}\n"
            f"--- mosquitto ---\n{self.broker.log_text()[-3000:]}"
        )

    def close(self) -> None:
        if hasattr(self, "http"):
            self.http.close()
        self.server.stop()
        self.broker.stop()


@pytest.fixture(scope="module")
def deployment(
    install: DeployInstall,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_models: dict[str, Path],
) -> Iterator[Deployment]:
    d = Deployment(install, tmp_path_factory.mktemp("deployment"), tiny_models)
    try:
        yield d
        print(d.report())  # shown by pytest when a test failed
    finally:
        d.close()


def connect(
    url: str,
    user: str | None,
    *,
    client_id: str | None = None,
    password: str | None = None,
    ca: Path | None = None,
    cert: tuple[Path, Path] | None = None,
    persistent: bool = False,
    subscribe: list[str] | None = None,
    wait: bool = True,
) -> Transport:
    """A started Transport (connected unless ``wait`` is False). ``user``'s password from
    PASSWORDS unless ``password`` is given; a clean session unless ``persistent``."""
    tls = None
    if url.startswith("mqtts://"):
        tls = TLSOptions(
            ca_file=None if ca is None else str(ca),
            cert_file=None if cert is None else str(cert[0]),
            key_file=None if cert is None else str(cert[1]),
        )
    t = Transport(
        TransportConfig(
            broker=url,
            client_id=client_id or user or "anonymous",
            username=user,
            password=password if password is not None else PASSWORDS.get(user or ""),
            tls=tls,
            session_expiry=14 * 24 * 3600 if persistent else 0,
            backoff_initial=0.05,
            backoff_max=0.2,
            connect_timeout=5.0,
            retry_refused=False,
        )
    )
    if subscribe:
        t.subscribe_nowait([(f, 1) for f in subscribe])
    t.start()
    if wait:
        try:
            t.wait_connected(10)
        except BaseException:
            t.close(timeout=1)
            raise
    return t


def messages(t: Transport, *, until: Callable[[list[Message]], bool], quiet: float = QUIET,
             timeout: float = 10.0) -> list[Message]:  # fmt: skip
    """The messages ``t`` receives until ``until(received)`` holds, then for ``quiet`` more
    seconds (anything that was going to arrive with them has time to)."""
    got: list[Message] = []
    deadline = time.monotonic() + timeout
    while not until(got):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; got {got}")
        ev = t.get(timeout=0.05)
        if isinstance(ev, Message):
            got.append(ev)
    end = time.monotonic() + quiet
    while (left := end - time.monotonic()) > 0:
        ev = t.get(timeout=left)
        if isinstance(ev, Message):
            got.append(ev)
    return got


def has_topic(topic: str) -> Callable[[list[Message]], bool]:
    return lambda got: any(m.topic == topic for m in got)


def next_event(t: Transport, kind: type, timeout: float) -> Any:
    """The next event of type ``kind`` (others are skipped), or None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ev = t.get(timeout=left)
        if isinstance(ev, kind):
            return ev
    return None


def refusal(t: Transport, timeout: float = 10.0) -> TransportError:
    """The error of ``t``'s first failed connection attempt (it never got connected)."""
    deadline = time.monotonic() + timeout
    while t.last_error is None:
        assert not t.connected, "connected, where a refusal was expected"
        if time.monotonic() > deadline:
            raise AssertionError(f"neither connected nor refused within {timeout}s")
        time.sleep(0.02)
    assert not t.connected
    return t.last_error


def close_all(*ts: Transport) -> None:
    for t in ts:
        t.close(timeout=1)


# ---------------------------------------------------------------------------------------------
# (a) The ACL: a device with valid credentials stays in its own topics


def test_a_device_cannot_publish_to_another_devices_topics(broker: DeployBroker) -> None:
    """gw-a, logged in with its own valid password over TLS, publishes to every kind of
    topic of gw-b (and to the server-to-device topics of its own jobs): each publish is
    refused (MQTT 5 PUBACK "Not authorized") and nothing reaches a subscriber of the whole
    namespace, while gw-a's publishes to its own status, hb and state topics do."""
    server = connect(broker.plain_url, "edge-server", client_id="observer",
                     subscribe=["edge-resume/v1/#"])  # fmt: skip
    gwa = connect(broker.tls_url, "gw-a", ca=broker.install.ca)
    try:
        forbidden = [
            NS.status("gw-b"),
            NS.hb("gw-b"),
            NS.state("gw-b", "job-1"),
            NS.ack("gw-b", "job-1"),
            NS.ctl("gw-b", "job-1"),
            NS.ack("gw-a", "job-1"),  # only the server answers a device
            NS.ctl("gw-a", "job-1"),
            "edge-resume/v1/gw-b",
            "edge-resume/v2/gw-a/hb",
            "$SYS/broker/forged",
        ]
        for topic in forbidden:
            ticket = gwa.publish(topic, b"forged", qos=1, retain=topic.endswith(("ctl", "status")))
            with pytest.raises(TransportError, match="Not authorized"):
                ticket.result(10)
        own = [NS.status("gw-a"), NS.hb("gw-a"), NS.state("gw-a", "job-1")]
        for topic in own:
            gwa.publish(topic, b"mine", qos=1, retain=topic.endswith("status")).result(10)
        got = messages(server, until=lambda g: {m.topic for m in g} >= set(own))
        assert sorted((m.topic, m.payload) for m in got) == sorted((t, b"mine") for t in own)
    finally:
        close_all(gwa, server)
    # nothing retained was left behind by the refused publishes
    late = connect(broker.plain_url, "edge-server", client_id="late",
                   subscribe=["edge-resume/v1/#"])  # fmt: skip
    try:
        got = messages(late, until=has_topic(NS.status("gw-a")))
        assert [m.topic for m in got] == [NS.status("gw-a")]  # the one legitimate retained
    finally:
        close_all(late)


def test_a_device_cannot_read_another_devices_topics(broker: DeployBroker) -> None:
    """gw-a subscribes to gw-b's topics (and to wildcards over everyone's); gw-b and the
    server then publish on every gw-b topic (retained ones before the subscription too).
    gw-a receives none of it, while a message on its own ack topic does arrive, and gw-b's
    own subscription gets everything addressed to gw-b."""
    server = connect(broker.plain_url, "edge-server", client_id="server")
    gwb = connect(broker.tls_url, "gw-b", ca=broker.install.ca,
                  subscribe=[s.filter for s in NS.device_subscriptions("gw-b")])  # fmt: skip
    gwa = None
    try:
        # retained before gw-a subscribes: the server's CTL to gw-b, gw-b's status
        server.publish(NS.ctl("gw-b", "job-1"), b"ctl-before", retain=True).result(10)
        gwb.publish(NS.status("gw-b"), b"status-before", retain=True).result(10)
        spying = [
            "edge-resume/v1/gw-b/+/ack", "edge-resume/v1/gw-b/+/ctl", NS.status("gw-b"),
            NS.hb("gw-b"), "edge-resume/v1/gw-b/+/state", "edge-resume/v1/gw-b/#",
            "edge-resume/v1/+/+/ack", "edge-resume/v1/+/+/ctl", "edge-resume/v1/+/status",
            "edge-resume/v1/#", "#",
        ]  # fmt: skip
        own = NS.ack("gw-a", "job-a")
        gwa = connect(broker.tls_url, "gw-a", ca=broker.install.ca,
                      subscribe=[*spying, "edge-resume/v1/gw-a/+/ack"])  # fmt: skip
        gwb.publish(NS.hb("gw-b"), b"hb").result(10)
        gwb.publish(NS.state("gw-b", "job-1"), b"state").result(10)
        server.publish(NS.ack("gw-b", "job-1"), b"ack").result(10)
        server.publish(NS.ctl("gw-b", "job-1"), b"ctl-after", retain=True).result(10)
        server.publish(own, b"control").result(10)  # the control: gw-a's own topic
        got = messages(gwa, until=has_topic(own))
        # one copy per matching subscription (MQTT 5: overlapping filters each deliver)
        assert {(m.topic, m.payload) for m in got} == {(own, b"control")}
        # what gw-a did not see was really sent to gw-b
        to_b = messages(gwb, until=lambda g: {m.payload for m in g} >= {b"ack", b"ctl-after"})
        assert {m.payload for m in to_b} == {b"ctl-before", b"ack", b"ctl-after"}
    finally:
        close_all(*(t for t in (gwa, gwb, server) if t is not None))


class Thief:
    """A hostile client: paho directly (the Transport would reconnect by itself), one
    connection as ``user`` with another device's ``client_id``, asking for that client id's
    existing session (clean start false) and keeping it ``expiry`` seconds."""

    def __init__(self, port: int, ca: Path, *, user: str, client_id: str, expiry: int) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.client.username_pw_set(user, PASSWORDS[user])
        self.client.tls_set(ca_certs=str(ca))
        self.session_present: bool | None = None
        self.received: list[bytes] = []
        self.gone = False

        def on_connect(c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
            assert not reason.is_failure, reason
            self.session_present = bool(flags.session_present)

        def on_disconnect(c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
            self.gone = True

        def on_message(c: Any, u: Any, msg: Any) -> None:
            self.received.append(bytes(msg.payload))

        self.client.on_connect = on_connect
        self.client.on_disconnect = on_disconnect
        self.client.on_message = on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = expiry
        self.client.connect("127.0.0.1", port, clean_start=False, properties=props)
        self.pump(lambda: self.session_present is not None)

    def pump(self, until: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            if time.monotonic() > deadline:
                raise AssertionError(f"the thief's condition not met within {timeout}s")
            self.client.loop(timeout=0.05)

    def close(self) -> None:
        if not self.gone:
            self.client.disconnect()
            self.pump(lambda: self.gone)


@pytest.mark.parametrize("binding", ["shipped", "removed"])
def test_a_device_cannot_take_over_another_devices_session(
    install: DeployInstall, tmp_path: Path, binding: str
) -> None:
    """gw-a (valid password) connects with gw-b's client id. As shipped
    (``use_username_as_clientid true`` on the device listener) the broker names that
    connection gw-a: gw-b stays connected and keeps receiving; asking for gw-b's session
    finds none; a message queued for gw-b while it was away reaches gw-b when it returns.

    With that line removed (the gap it closes, shown so that this test could fail) the same
    connection kicks gw-b off, gets gw-b's persistent session, and the message queued for
    gw-b never reaches gw-b."""
    shipped = binding == "shipped"
    replace = [] if shipped else [("use_username_as_clientid true\n", "")]
    ca = install.ca
    acks = "edge-resume/v1/gw-b/+/ack"
    with DeployBroker(install, tmp_path / "broker", replace=replace) as b:
        server = connect(b.plain_url, "edge-server", client_id="server")
        gwb = connect(b.tls_url, "gw-b", ca=ca, persistent=True, subscribe=[acks])
        try:
            # 1. gw-b online: gw-a connects as "gw-b"
            thief = Thief(b.tls_port, ca, user="gw-a", client_id="gw-b", expiry=0)
            if shipped:
                server.publish(NS.ack("gw-b", "job-1"), b"while-online").result(10)
                got = messages(gwb, until=has_topic(NS.ack("gw-b", "job-1")))
                assert [m.payload for m in got] == [b"while-online"]
                assert gwb.connected and gwb.stats().disconnects == 0
                assert not thief.gone
            else:
                assert isinstance(next_event(gwb, Disconnected, 10), Disconnected)
                thief.pump(lambda: thief.gone)  # gw-b's reconnection takes it back
                assert next_event(gwb, Connected, 10) is not None
            thief.close()
            # 2. gw-b away (its session kept): a message is queued for it; gw-a connects
            #    as "gw-b" again, asking for the existing session
            gwb.close(timeout=2)
            server.publish(NS.ack("gw-b", "job-2"), b"queued").result(10)
            thief = Thief(b.tls_port, ca, user="gw-a", client_id="gw-b", expiry=3600)
            assert thief.session_present is (not shipped)
            thief.pump(lambda: True)
            thief.close()
            assert thief.received == []  # the ACL still applies to what it inherited
            # 3. gw-b comes back
            gwb = connect(b.tls_url, "gw-b", ca=ca, persistent=True, subscribe=[acks])
            if shipped:
                got = messages(gwb, until=has_topic(NS.ack("gw-b", "job-2")))
                assert [m.payload for m in got] == [b"queued"]
            else:
                server.publish(NS.ack("gw-b", "job-3"), b"later").result(10)
                got = messages(gwb, until=has_topic(NS.ack("gw-b", "job-3")))
                assert [m.payload for m in got] == [b"later"]  # "queued" is lost
        finally:
            close_all(gwb, server)
        log = b.log_text()
    if shipped:
        assert "already connected, closing old connection" not in log
        assert re.search(r"New client connected from \S+ as gw-a \(.*u'gw-a'\)", log)
    else:
        assert "Client gw-b already connected, closing old connection" in log


def test_every_device_listener_binds_the_client_id_to_the_user_name() -> None:
    """Both broker configurations (installed and compose) set ``use_username_as_clientid``
    on the device listener (8883), and not on the server's listener (1883), where several
    server processes log in as ``edge-server`` with their own client ids."""
    for name in ("mosquitto.conf", "compose.conf"):
        blocks: dict[str, list[str]] = {}
        current: list[str] | None = None
        for raw in (MOSQUITTO / name).read_text().splitlines():
            line = raw.strip()
            if line.startswith("listener "):
                current = blocks.setdefault(line.split()[1], [])
            elif line and not line.startswith("#") and current is not None:
                current.append(line)
        assert set(blocks) == {"8883", "1883"}, name
        assert "use_username_as_clientid true" in blocks["8883"], name
        assert not any("use_username_as_clientid" in x for x in blocks["1883"]), name


# ---------------------------------------------------------------------------------------------
# (b) Forged snapshots: the ACL stops them on another device's topic, the server on one's own


def test_a_device_cannot_forge_another_devices_snapshots(deployment: Deployment) -> None:
    """gw-b runs job-b to an acknowledged snapshot. gw-a gets hold of gw-b's next snapshot
    (a valid SNAP for job-b, seq 2, claiming device gw-b) and tries to deliver it:

    * on gw-b's topic: the broker's ACL refuses the publish;
    * on its own topic (``gw-a/job-b/state``, which the ACL allows): the server refuses it
      (MalformedMessage: a message's check covers the device and job of the topic it was
      made for, so it does not verify on another), with no reply;
    * as itself (a BIRTH of job-b claiming gw-a, on its own topic): refused, job-b is gw-b's.

    job-b is unchanged (seq 1, gw-b's), and gw-a hears nothing back. The control: the same
    captured SNAP, published by gw-b on its own topic, is acknowledged (seq 2)."""
    d = deployment
    ca = d.install.ca
    gwb = SimDevice(d.broker.tls_url, "gw-b", username="gw-b", password=PASSWORDS["gw-b"],
                    tls=TLSOptions(ca_file=str(ca))).start()  # fmt: skip
    gwa = None
    try:
        job = gwb.add_job("job-b")
        gwb.run_to_acked(job, 1)
        assert (d.job("job-b") or {}).get("seq") == 1
        # gw-b's next snapshot, captured before it is sent
        job.advance(1)
        gwb.pump(lambda: job.session.can_offer)
        items = job.session.offer(job.state(), job.step, time.time())
        snap = [o for o in items if isinstance(o, Outgoing)]
        assert len(snap) == 1 and snap[0].type == "snap" and snap[0].seq == 2
        assert snap[0].topic == NS.state("gw-b", "job-b")

        gwa = connect(d.broker.tls_url, "gw-a", ca=ca,
                      subscribe=[s.filter for s in NS.device_subscriptions("gw-a")])  # fmt: skip
        before = d.refused()
        # on gw-b's topic: the ACL
        with pytest.raises(TransportError, match="Not authorized"):
            gwa.publish(snap[0].topic, snap[0].payload).result(10)
        # on its own topic: the server
        gwa.publish(NS.state("gw-a", "job-b"), snap[0].payload).result(10)
        # as itself, for gw-b's job
        me = AgentDevice("gw-a", "thief", NS)
        spec = generate_spec("job-b", 50)
        mine = AgentJobSession(me, "job-b", JobIdentity(spec, "sha256:test-model", 1, 50))
        birth = [o for o in mine.connected(time.time(), step=0) if isinstance(o, Outgoing)]
        assert [o.type for o in birth] == ["birth"]
        assert birth[0].topic == NS.state("gw-a", "job-b")
        gwa.publish(birth[0].topic, birth[0].payload).result(10)

        def refusals() -> float:
            now = d.refused()
            return sum(now.values()) - sum(before.values())

        deadline = time.monotonic() + 10
        while refusals() < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        after = d.refused()
        # the moved SNAP fails its check, which binds it to gw-b's topic; the BIRTH's claim
        # on gw-b's job is a topic mismatch
        assert after.get("MalformedMessage", 0) - before.get("MalformedMessage", 0) == 1, after
        assert after.get("TopicMismatch", 0) - before.get("TopicMismatch", 0) == 1, after
        assert refusals() == 2
        assert messages(gwa, until=lambda g: True) == []  # no ack, nack or ctl for gw-a
        rec = d.job("job-b")
        assert rec is not None and (rec["device"], rec["seq"]) == ("gw-b", 1)
        assert all(j["device"] != "gw-a" for j in d.api("GET", "/v1/jobs"))

        # the control: the very same bytes, from gw-b on its own topic, are acknowledged
        gwb.carry_out(job, items)
        gwb.pump(lambda: job.acked == [1, 2])
        rec = d.job("job-b")
        assert rec is not None and (rec["device"], rec["seq"]) == ("gw-b", 2)
    finally:
        gwb.close()
        if gwa is not None:
            gwa.close(timeout=1)


# ---------------------------------------------------------------------------------------------
# (c) The API's bearer token, on the real HTTP server


def test_the_api_refuses_calls_without_the_right_token(deployment: Deployment) -> None:
    """Every ``/v1`` route of the running server (read from its own OpenAPI document)
    answers 401 with ``WWW-Authenticate: Bearer`` to a call with no token, a wrong one, a
    truncated one, the right one in another scheme or in the query string; a refused resume
    changes nothing. The control: the right token gets 200."""
    d = deployment
    gwb = SimDevice(d.broker.tls_url, "gw-b", username="gw-b", password=PASSWORDS["gw-b"],
                    tls=TLSOptions(ca_file=str(d.install.ca))).start()  # fmt: skip
    try:
        job = gwb.add_job("job-api")
        gwb.run_to_acked(job, 1)
    finally:
        gwb.close()
    before = d.job("job-api")
    assert before is not None and before["owner"] == "edge"

    schema = d.http.get("/openapi.json").json()
    routes = [
        (method.upper(), path.replace("{job_id}", "job-api").replace("{name}", "tokens"))
        for path, ops in schema["paths"].items()
        if path.startswith("/v1/")
        for method in ops
    ]
    assert len(routes) >= 6 and ("POST", "/v1/jobs/job-api/resume") in routes
    bad_headers: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": "Bearer"},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
        {"X-Api-Token": TOKEN},
    ]
    for method, path in routes:
        body: dict[str, Any] = {"json": {"reason": "forged"}} if method == "POST" else {}
        for headers in bad_headers:
            r = d.http.request(method, path, headers=headers, **body)
            assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
            assert r.headers["www-authenticate"].startswith("Bearer"), (method, path)
        r = d.http.request(method, path, params={"token": TOKEN}, **body)
        assert r.status_code == 401, (method, path, "query")
    after = d.job("job-api")
    assert after is not None
    # (its status may go offline meanwhile: gw-b left; a resume would make it "resuming")
    assert (after["owner"], after["epoch"], after["resume"]) == ("edge", 1, None)
    assert after["status"] in ("running", "offline")
    # the control: the right token gets through
    r = d.http.get("/v1/jobs", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and any(j["job"] == "job-api" for j in r.json())


# ---------------------------------------------------------------------------------------------
# (d) TLS end to end


def test_tls_end_to_end_agent_broker_server(deployment: Deployment, tmp_path: Path) -> None:
    """The real edge agent (its own process, the server's dependencies blocked) runs a
    generate job on the tiny decoder against the broker's TLS listener with the CA from
    make-certs.sh, user gw-a and a password file; the server acknowledges its snapshots,
    records the job as gw-a's and completes it with its outputs."""
    d = deployment
    pw = tmp_path / "password"
    pw.write_text(PASSWORDS["gw-a"] + "\n")
    spec = write_job(
        tmp_path, "tls-job", "generate", d.models["tiny-decoder.onnx"],
        params={"prompt": "over TLS: ", "max_new_tokens": 24, "seed": 3},
        snapshot={"every_steps": 4},
        link={"kv": "send"},
    )  # fmt: skip
    agent = AgentProcess(
        tmp_path / "agent", [spec], d.broker.tls_url, device="gw-a",
        extra=["--username", "gw-a", "--password-file", str(pw), "--ca-file", str(d.install.ca)],
    )  # fmt: skip
    agent.start()
    try:
        code = agent.wait(60)
        assert code == 0, agent.log_tail()
    finally:
        agent.stop()
    rec = d.job("tls-job")
    assert rec is not None, d.report()
    assert (rec["device"], rec["status"]) == ("gw-a", "completed"), rec
    assert rec["seq"] is not None and rec["seq"] >= 2 and rec["snapshots"] >= 1
    outputs = d.api("GET", "/v1/jobs/tls-job/outputs")
    assert outputs, outputs
    assert agent.blocked_imports() == []
    assert re.search(r"New client connected from \S+ as gw-a \(p5, c0, k\d+, u'gw-a'\)",
                     d.broker.log_text())  # fmt: skip


def test_tls_refuses_a_client_that_does_not_trust_the_brokers_ca(
    broker: DeployBroker, other_pki: Path
) -> None:
    """A device given another CA (made by make-certs.sh elsewhere), or none (the system's
    CAs), refuses the broker's certificate before sending its password; the device listener
    does not speak plain MQTT either. The control: the right CA connects."""
    for ca in (other_pki / "ca.crt", None):
        t = connect(broker.tls_url, "gw-a", ca=ca, wait=False)
        try:
            with pytest.raises(ConnectionRefused, match="certificate failed verification"):
                t.wait_connected(10)
        finally:
            t.close(timeout=1)
    plain = connect(f"mqtt://127.0.0.1:{broker.tls_port}", "gw-a", wait=False)
    try:
        refusal(plain)
    finally:
        plain.close(timeout=1)
    ok = connect(broker.tls_url, "gw-a", ca=broker.install.ca)
    close_all(ok)


def test_mutual_tls_refuses_a_certificate_from_another_ca(
    install: DeployInstall, tmp_path: Path, other_pki: Path
) -> None:
    """The device listener as deploy/README.md describes for client certificates
    (``require_certificate true``, ``use_identity_as_username true``): gw-a's certificate
    from make-certs.sh logs it in as gw-a without a password, and the ACL applies to that
    name. A certificate for gw-a from another CA, or none, is refused."""
    foreign = (other_pki / "gw-a.crt", other_pki / "gw-a.key")
    extra = ["require_certificate true", "use_identity_as_username true"]
    with DeployBroker(install, tmp_path / "broker", device_listener_extra=extra) as b:
        server = connect(b.plain_url, "edge-server", client_id="observer",
                         subscribe=["edge-resume/v1/#"])  # fmt: skip
        try:
            for cert in (foreign, None):
                t = connect(b.tls_url, None, client_id="gw-a", ca=install.ca, cert=cert,
                            wait=False)  # fmt: skip
                try:
                    refusal(t)
                finally:
                    t.close(timeout=1)
            gwa = connect(b.tls_url, None, client_id="anything", ca=install.ca,
                          cert=install.client_cert("gw-a"))  # fmt: skip
            try:
                with pytest.raises(TransportError, match="Not authorized"):
                    gwa.publish(NS.hb("gw-b"), b"forged").result(10)
                gwa.publish(NS.hb("gw-a"), b"mine").result(10)
                got = messages(server, until=has_topic(NS.hb("gw-a")))
                assert [(m.topic, m.payload) for m in got] == [(NS.hb("gw-a"), b"mine")]
            finally:
                gwa.close(timeout=1)
        finally:
            server.close(timeout=1)
        assert "as gw-a (" in b.log_text()  # client id = user name = the certificate's CN


# ---------------------------------------------------------------------------------------------
# make-certs.sh


#: Device ids both scripts refuse: they would change the ACL's topics (``/``, ``+``, ``#``,
#: spaces), are not ids at all, or would take one of the server's MQTT client ids
#: (``edge-server``, ``edge-server-control``, ...) through use_username_as_clientid.
BAD_IDS = ["gw/1", "gw+1", "gw#1", "gw 1", "+", "#", "", "-gw", "gw-1\n", "g" * 65,
           "edge-server-control", "edge-server-ingest-2", "edge-serverX"]  # fmt: skip


@pytest.mark.parametrize("device", [*BAD_IDS, "ca", "server", "edge-server"])
def test_make_certs_refuses_a_device_id_that_is_not_topic_safe(tmp_path: Path, device: str) -> None:
    """A device id that would change the ACL's topics, take a server client id, or
    overwrite the CA's or the broker's files, is refused before anything is written, even
    after a valid one."""
    out = tmp_path / "pki"
    done = make_certs(out, "localhost", "gw-ok", device)
    assert done.returncode == 2, done
    assert "is not a valid device id" in done.stderr
    assert not out.exists()


def test_make_certs_accepts_every_valid_device_id(install: DeployInstall) -> None:
    """The control for the refusals above: ids at the edges of what add-user.sh and the
    protocol accept got certificates (in the ``install`` fixture) with CN = device id."""
    for dev in ("gw-a", *ODD_IDS):
        cert, key = install.client_cert(dev)
        assert key.is_file()
        subject = subprocess.run(
            ["openssl", "x509", "-noout", "-subject", "-nameopt", "RFC2253", "-in", str(cert)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert subject.strip() == f"subject=CN={dev}"


def _add_user(passwd: Path, user: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MOSQUITTO / "add-user.sh"), str(passwd), user, "pw-0123456789"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize("device", BAD_IDS)
def test_add_user_refuses_the_same_device_ids(tmp_path: Path, device: str) -> None:
    """add-user.sh refuses what make-certs.sh refuses, before it writes the password file."""
    passwd = tmp_path / "passwd"
    done = _add_user(passwd, device)
    assert done.returncode == 2, done
    assert "is not a valid device id" in done.stderr
    assert not passwd.exists()


def test_add_user_accepts_the_servers_account_and_valid_ids(tmp_path: Path) -> None:
    """The control: "edge-server" (the server's own account) and ids at the edges of the
    pattern are written to the password file."""
    passwd = tmp_path / "passwd"
    for user in ("edge-server", "gw-a", *ODD_IDS):
        done = _add_user(passwd, user)
        assert done.returncode == 0, done
    users = [line.split(":", 1)[0] for line in passwd.read_text().splitlines()]
    assert users == ["edge-server", "gw-a", *ODD_IDS]
