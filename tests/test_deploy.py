"""deploy/: what an operator installs must fit the real programs.

* ``deploy/agent.toml`` and ``deploy/server.toml`` load through the real config loaders;
* the systemd units' command lines parse with the real CLIs, and their paths agree with the
  config files (state folders, config paths, credentials, stop timeouts);
* ``deploy/compose.yaml`` parses; after ``compose-secrets.sh`` every file it mounts exists;
  its server environment loads through the server's config loader; the Dockerfile copies
  what exists and serves the port compose publishes;
* the broker configurations (``mosquitto.conf`` installed as deploy/README.md says, and
  ``compose.conf`` with exactly the files compose mounts) start a real Mosquitto with the
  generated passwords, certificates and ACL: the server user and a device over TLS get in,
  a wrong password does not, the ACL keeps a device to its own topics, and another device
  connecting with its client id does not take its connection over (tests/test_security.py
  tests security in depth).

Docker itself is not run (no engine here); ``systemd-analyze verify`` is not run by the tests
(docs say how to run it).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from edge_agent.cli import OPTIONS, build_parser, resolve_options
from edge_agent.errors import ConnectionRefused, TransportError
from edge_agent.transport import Message, TLSOptions, Transport, TransportConfig
from server.cli import app
from server.config import load_config
from server.worker import ResumePolicy
from tests.support.broker import free_port
from tests.support.deploy_broker import (
    DeployBroker,
    MosquittoProcess,
    install_deploy,
    rewrite_config,
)

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
UNITS = DEPLOY / "systemd"


def unit_file(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file: section -> key -> values (keys may repeat)."""
    out: dict[str, dict[str, list[str]]] = {}
    section: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = out.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"{path}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not key=value: {line!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return out


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit[section][key]
    assert len(values) == 1, f"[{section}] {key} given {len(values)} times"
    return values[0]


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|min)?", value)
    assert m, value
    return float(m.group(1)) * (60 if m.group(2) == "min" else 1)


def env_of(unit: dict[str, dict[str, list[str]]]) -> dict[str, str]:
    env = {}
    for item in unit["Service"].get("Environment", []):
        for pair in shlex.split(item):
            k, _, v = pair.partition("=")
            env[k] = v
    return env


# ---------------------------------------------------------------------------------------------
# Config files


def test_agent_toml_loads_through_the_agents_config_loader() -> None:
    opts = resolve_options("run", {}, {}, str(DEPLOY / "agent.toml"))
    assert opts["device"] == opts["username"] == "gw-0001"
    assert opts["broker"].startswith("mqtts://")
    assert opts["journal"] == "/var/lib/edge-agent/journal"
    assert opts["max_kbps"] == 256 and opts["log_format"] == "json"
    # every key in the file is a real option (the loader refuses others: this is the proof)
    text = (DEPLOY / "agent.toml").read_text()
    keys = re.findall(r"^([a-z_]+) = ", text, re.M)
    assert keys and set(keys) <= {o.name for o in OPTIONS}


def test_server_toml_loads_through_the_servers_config_loader() -> None:
    cfg = load_config(DEPLOY / "server.toml", env={})
    assert cfg.store.path == "/var/lib/edge-server/store"
    assert cfg.api.token_file == "/etc/edge-resume/api-token"
    assert cfg.broker.password_file == "/etc/edge-resume/broker-password"
    assert cfg.liveness.heartbeat_timeout_s == 90.0
    # [worker] keys the loader does not know go to the worker: they must be ones it takes
    policy = set(ResumePolicy.__dataclass_fields__)
    assert set(cfg.worker.options) <= policy | {"workers", "torch_threads", "auto_poll_s"}
    assert cfg.worker.options == {"torch_threads": 2}
    # three agent heartbeats (agent.toml) fit in the server's timeout
    agent = resolve_options("run", {}, {}, str(DEPLOY / "agent.toml"))
    assert cfg.liveness.heartbeat_timeout_s >= 3 * agent["heartbeat"]


def test_the_config_files_every_key_is_checked(tmp_path: Path) -> None:
    """A typo in either file is refused by the loaders (so the tests above prove the keys)."""
    from edge_agent.errors import ConfigError

    path = tmp_path / "bad.toml"
    text = (DEPLOY / "server.toml").read_text()
    path.write_text(text.replace("heartbeat_timeout_s", "heartbeat_timeout"))
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(path, env={})
    path.write_text((DEPLOY / "agent.toml").read_text().replace("max_kbps", "max_kbit"))
    with pytest.raises(ConfigError, match="not a known setting"):
        resolve_options("run", {}, {}, str(path))


# ---------------------------------------------------------------------------------------------
# systemd units


def test_the_agent_unit_runs_the_real_cli_with_the_config() -> None:
    u = unit_file(UNITS / "edge-agent.service")
    sh, dash_c, script = shlex.split(one(u, "Service", "ExecStart"))
    assert (sh, dash_c) == ("/bin/sh", "-c")
    argv = shlex.split(script)
    assert argv[0] == "exec" and argv[1].endswith("/bin/edge-agent")
    args = build_parser().parse_args(argv[2:])
    assert args.command == "run"
    assert args.jobs == ["/etc/edge-resume/jobs/*.toml"]
    assert args.config == "/etc/edge-resume/agent.toml"
    assert one(u, "Unit", "ConditionDirectoryNotEmpty") == "/etc/edge-resume/jobs"
    s = {k: v[-1] for k, v in u["Service"].items()}
    assert s["Restart"] == "always" and s["KillSignal"] == "SIGTERM"
    assert s["RestartPreventExitStatus"] == "2"  # a config error: do not loop
    agent = resolve_options("run", {}, {}, str(DEPLOY / "agent.toml"))
    assert seconds(s["TimeoutStopSec"]) > agent["shutdown_grace"] + 10
    # the journal is in the unit's state folder; the password comes as a credential
    assert s["DynamicUser"] == "yes" and s["NoNewPrivileges"] == "yes"
    assert s["ProtectSystem"] == "strict"
    assert agent["journal"].startswith(f"/var/lib/{s['StateDirectory']}/")
    assert agent["outputs"].startswith(f"/var/lib/{s['StateDirectory']}/")
    cred_name, _, cred_path = s["LoadCredential"].partition(":")
    assert cred_path == "/etc/edge-resume/password"
    env = env_of(u)
    assert env == {"EDGE_AGENT_PASSWORD_FILE": f"%d/{cred_name}"}
    assert set(env) <= {o.env for o in OPTIONS}


def test_the_server_unit_runs_the_real_cli_with_the_config() -> None:
    u = unit_file(UNITS / "edge-server.service")
    argv = shlex.split(one(u, "Service", "ExecStart"))
    assert argv[0].endswith("/bin/edge-server")
    assert argv[1] == "serve"
    group = typer.main.get_command(app)
    serve = group.commands["serve"]  # type: ignore[attr-defined]
    sctx = serve.make_context("serve", argv[2:])
    assert str(sctx.params["config"]) == "/etc/edge-resume/server.toml"
    assert sctx.params["roles"] == "ingest,worker,api"
    s = {k: v[-1] for k, v in u["Service"].items()}
    assert s["Restart"] == "always" and s["KillSignal"] == "SIGTERM"
    assert seconds(s["TimeoutStopSec"]) >= 60
    assert s["User"] == "edge-resume" and s["NoNewPrivileges"] == "yes"
    cfg = load_config(DEPLOY / "server.toml", env={})
    assert cfg.store.path.startswith(f"/var/lib/{s['StateDirectory']}/")
    assert "After" in u["Unit"] and "mosquitto.service" in u["Unit"]["After"][0]


def test_the_mosquitto_drop_in_runs_the_installed_config() -> None:
    u = unit_file(UNITS / "mosquitto.service.d" / "edge-resume.conf")
    starts = u["Service"]["ExecStart"]
    assert starts[0] == ""  # clears Debian's ExecStart before replacing it
    argv = shlex.split(starts[1])
    assert argv[1:] == ["-c", "/etc/edge-resume/mosquitto/mosquitto.conf"]
    conf = (DEPLOY / "mosquitto" / "mosquitto.conf").read_text()
    assert "mosquitto.conf acl /etc/edge-resume/mosquitto/" in conf  # where README installs it
    persistence = re.search(r"^persistence_location (\S+)", conf, re.M)
    assert persistence is not None
    made = [shlex.split(c)[-1] for c in u["Service"]["ExecStartPre"] if "mkdir" in c]
    assert made == [persistence.group(1).rstrip("/")]


# ---------------------------------------------------------------------------------------------
# Compose and the Dockerfile


def compose() -> dict[str, Any]:
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for v in service.get("volumes", []):
        source, target = v.split(":")[:2]
        if source.startswith(("./", "../", "/")):
            out.append((source, target))
    return out


@pytest.fixture(scope="module")
def secrets_deploy(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, dict[str, str]]]:
    """A copy of deploy/ after ``compose-secrets.sh localhost gw-1 gw-2`` (the devices'
    passwords)."""
    root = tmp_path_factory.mktemp("compose")
    deploy = root / "deploy"
    shutil.copytree(DEPLOY, deploy, ignore=shutil.ignore_patterns("secrets", "*.onnx"))
    out = subprocess.run(
        [str(deploy / "compose-secrets.sh"), "localhost", "gw-1", "gw-2"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    pws = dict(re.findall(r"^password for (gw-[12]): (\S+)$", out, re.M))
    assert set(pws) == {"gw-1", "gw-2"}, out
    yield deploy, pws


def test_compose_mounts_only_files_that_exist(secrets_deploy: tuple[Path, dict[str, str]]) -> None:
    deploy, _ = secrets_deploy
    doc = compose()
    assert set(doc["services"]) == {"broker", "server"}
    assert doc["services"]["broker"]["image"] == "eclipse-mosquitto:2"
    for name, svc in doc["services"].items():
        for source, target in bind_mounts(svc):
            assert (deploy / source).exists(), f"{name}: {source} -> {target} does not exist"
    for name, secret in doc["secrets"].items():
        assert (deploy / secret["file"]).is_file(), name
    build = doc["services"]["server"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    # named volumes are declared
    for svc in doc["services"].values():
        for v in svc.get("volumes", []):
            source = v.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in doc["volumes"]
    # the CA's key and the devices' keys stay out of every container
    mounted = [deploy / s for svc in doc["services"].values() for s, _ in bind_mounts(svc)]
    for key in (deploy / "secrets" / "pki").glob("*.key"):
        assert not any(key == m or m in key.parents for m in mounted), key


def test_the_compose_broker_config_names_only_mounted_files() -> None:
    doc = compose()
    targets = [t for _, t in bind_mounts(doc["services"]["broker"])]
    targets += [v.split(":")[1] for v in doc["services"]["broker"]["volumes"]]
    conf = (DEPLOY / "mosquitto" / "compose.conf").read_text()
    paths = re.findall(r"^\w+ (/mosquitto/\S+)", conf, re.M)
    assert len(paths) >= 7
    for p in (x.rstrip("/") for x in paths):  # a mounted path, inside one, or holding one
        assert any(p == t or p.startswith(t + "/") or t.startswith(p + "/") for t in targets), p


def test_the_compose_server_environment_loads_through_the_config_loader() -> None:
    svc = compose()["services"]["server"]
    env = {k: str(v) for k, v in svc["environment"].items()}
    cfg = load_config(env=env)
    assert cfg.broker.url == "mqtt://broker:1883"
    assert cfg.api.host == "0.0.0.0"
    secrets = {f"/run/secrets/{s}" for s in svc["secrets"]}
    assert {cfg.api.token_file, cfg.broker.password_file} == secrets
    published = svc["ports"][0].rsplit(":", 1)[1]
    assert int(published) == cfg.api.port
    mounts = {t: s for s, t in bind_mounts(svc)}
    assert cfg.worker.models_dir in mounts
    stores = [v.split(":")[1] for v in svc["volumes"] if not v.startswith(".")]
    assert any(cfg.store.path.startswith(t + "/") for t in stores)


def test_the_dockerfile_copies_what_exists_and_serves_the_api() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    copies = re.findall(r"^COPY (.+) \S+$", text, re.M)
    assert copies
    sources = [s for line in copies for s in line.split()]
    for s in sources:
        assert (REPO / s).exists(), s
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for s in sources:  # the ignore file lets each one through
        assert f"!{s}" in ignore or f"!{s}/**" in ignore, s
    assert 'ENTRYPOINT ["edge-server"]' in text and 'CMD ["serve"]' in text
    assert "EXPOSE 8080" in text and "/healthz" in text
    assert re.search(r"^USER edge-resume$", text, re.M)
    assert "torch==$TORCH_VERSION" in text and "ARG TORCH_VERSION=2.13.0" in text


# ---------------------------------------------------------------------------------------------
# The broker configurations on a real Mosquitto


def client(url: str, cid: str, *, user: str, password: str, ca: Path | None = None) -> Transport:
    tls = TLSOptions(ca_file=str(ca)) if ca is not None else None
    t = Transport(
        TransportConfig(
            broker=url, client_id=cid, username=user, password=password, tls=tls,
            retry_refused=False,
        )
    )  # fmt: skip
    return t.start()


def first_message(t: Transport, timeout: float) -> Message | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = t.get(timeout=0.1)
        if isinstance(ev, Message):
            return ev
    return None


def check_broker(plain: int, tls: int, server_pw: str, gw1_pw: str, gw2_pw: str, ca: Path) -> None:
    """The server user on the plain listener, gw-1 over TLS; a wrong password is refused;
    the ACL keeps gw-1 to its own topics; gw-2 connecting with gw-1's client id does not
    take gw-1's connection over (tests/test_security.py has the details)."""
    server = client(f"mqtt://127.0.0.1:{plain}", "edge-server", user="edge-server",
                    password=server_pw)  # fmt: skip
    gw1 = client(f"mqtts://127.0.0.1:{tls}", "gw-1", user="gw-1", password=gw1_pw, ca=ca)
    bad = client(f"mqtts://127.0.0.1:{tls}", "gw-1b", user="gw-1", password="wrong", ca=ca)
    intruder = None
    try:
        server.wait_connected(10)
        gw1.wait_connected(10)
        with pytest.raises(ConnectionRefused):
            bad.wait_connected(10)
        server.subscribe("edge-resume/v1/#")
        with pytest.raises(TransportError, match="Not authorized"):  # not gw-1's topic
            gw1.publish("edge-resume/v1/gw-2/hb", b"forged").result(10)
        intruder = client(f"mqtts://127.0.0.1:{tls}", "gw-1", user="gw-2", password=gw2_pw,
                          ca=ca)  # fmt: skip
        intruder.wait_connected(10)
        gw1.publish("edge-resume/v1/gw-1/hb", b"mine").result(10)
        got = first_message(server, 5)
        assert got is not None and (got.topic, got.payload) == ("edge-resume/v1/gw-1/hb", b"mine")
        assert first_message(server, 0.5) is None
        assert gw1.connected and gw1.stats().disconnects == 0  # not kicked off by gw-2
    finally:
        for t in (server, gw1, bad, intruder):
            if t is not None:
                t.close(timeout=2)


@pytest.mark.integration
def test_mosquitto_conf_installed_as_documented_works(tmp_path: Path) -> None:
    """deploy/mosquitto/mosquitto.conf under /etc/edge-resume (here: a temporary root), with
    add-user.sh's password file and make-certs.sh's certificates
    (tests/support/deploy_broker.py)."""
    inst = install_deploy(
        tmp_path / "root", {"edge-server": "srv-pw", "gw-1": "gw1-pw", "gw-2": "gw2-pw"}
    )
    with DeployBroker(inst, tmp_path / "broker") as b:
        check_broker(b.plain_port, b.tls_port, "srv-pw", "gw1-pw", "gw2-pw", inst.ca)


@pytest.mark.integration
def test_compose_broker_config_with_the_mounted_files_works(
    tmp_path: Path, secrets_deploy: tuple[Path, dict[str, str]]
) -> None:
    """compose.conf with exactly the files compose.yaml mounts (placed where the container
    would see them, under a temporary root), made by compose-secrets.sh."""
    deploy, pws = secrets_deploy
    root = tmp_path / "container"
    for source, target in bind_mounts(compose()["services"]["broker"]):
        dest = root / target.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        src = deploy / source
        if src.is_dir():
            shutil.copytree(src, dest)
        else:
            shutil.copy(src, dest)
    (root / "mosquitto/data").mkdir(parents=True)
    tls, plain = free_port(), free_port()
    conf_path = root / "mosquitto/config/mosquitto.conf"
    conf = rewrite_config(
        conf_path.read_text(),
        [
            ("/mosquitto/", f"{root}/mosquitto/"),
            ("log_dest stdout", f"log_dest file {root}/mosquitto.log"),
            ("listener 8883\n", f"listener {tls} 127.0.0.1\n"),
            ("listener 1883\n", f"listener {plain} 127.0.0.1\n"),
        ],
    )
    conf_path.write_text(conf)
    server_pw = (deploy / "secrets/broker-password").read_text().strip()
    broker = MosquittoProcess(conf_path, root / "mosquitto.log")
    try:
        broker.wait(tls)
        ca = deploy / "secrets/tls/ca.crt"
        check_broker(plain, tls, server_pw, pws["gw-1"], pws["gw-2"], ca)
    finally:
        broker.stop()
