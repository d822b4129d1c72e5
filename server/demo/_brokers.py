"""The demo's MQTT broker: Mosquitto with the project's configuration when its binary is
installed, otherwise an embedded amqtt broker (pure Python, MQTT 3.1.1 only).

Mosquitto gets ``deploy/mosquitto/edge-resume.conf`` (persistence, session expiry, queue
depths, packet size) from the source tree, or the same settings built in when the package
was installed without it, plus one anonymous listener on 127.0.0.1 and a free port. The
demo's broker is for this machine only: no TLS, no passwords (``deploy/README.md`` has the
production set-up).

amqtt runs as a child process (``python -m server.demo._amqtt``). It speaks MQTT 3.1.1
only, and it does not answer an MQTT 5 CONNECT that carries properties (it waits for bytes
that never come), so the agent's and the server's ``auto`` fall-back never gets the refusal
it waits for: the demo tells both to speak 3.1.1 to it.

This module starts brokers. It holds no protocol logic and never touches a system-wide
broker (it always starts its own, on its own port).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edge_agent.errors import DemoError
from server.demo._amqtt import READY_LINE
from server.demo._procs import Child, Children, free_port, wait_listening

__all__ = [
    "BROKER_KINDS",
    "BUILTIN_BROKER_SETTINGS",
    "BrokerHandle",
    "amqtt_available",
    "mosquitto_binary",
    "project_broker_settings",
    "start_broker",
]

BROKER_KINDS = ("auto", "mosquitto", "amqtt")
DEPLOY_CONF = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "edge-resume.conf"

# The settings of deploy/mosquitto/edge-resume.conf, for an installation without the source
# tree (tests/test_demo.py checks that they are the same).
BUILTIN_BROKER_SETTINGS = """\
persistence true
autosave_interval 5
autosave_on_changes false
persistent_client_expiration 14d
max_queued_messages 10000
max_inflight_messages 32
max_packet_size 1048576
retain_available true
set_tcp_nodelay true
"""


@dataclass(frozen=True)
class BrokerHandle:
    """A running broker: what it is, where, and the MQTT version clients must speak."""

    kind: str  # "mosquitto" or "amqtt"
    description: str  # for the report, e.g. "Mosquitto 2.0.18 (deploy/mosquitto/...)"
    port: int
    protocol: str  # "auto" (MQTT 5, falling back to 3.1.1) or "3.1.1"
    child: Child

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


def mosquitto_binary() -> str | None:
    """The Mosquitto binary on PATH or in /usr/sbin (Debian's package puts it there)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


def amqtt_available() -> bool:
    return importlib.util.find_spec("amqtt") is not None


def project_broker_settings() -> tuple[str, str]:
    """(settings text, where they came from): the source tree's edge-resume.conf, else the
    built-in copy."""
    try:
        return DEPLOY_CONF.read_text(), "deploy/mosquitto/edge-resume.conf"
    except OSError:
        return BUILTIN_BROKER_SETTINGS, "built-in copy of deploy/mosquitto/edge-resume.conf"


def _mosquitto_version(binary: str) -> str:
    try:
        out = subprocess.run(
            [binary, "-h"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "Mosquitto"
    for line in out.splitlines():
        if line.startswith("mosquitto version"):
            return "Mosquitto " + line.split()[2]
    return "Mosquitto"


def _start_mosquitto(
    binary: str, workdir: Path, children: Children, env: Mapping[str, str] | None
) -> BrokerHandle:
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    port = free_port()
    settings, origin = project_broker_settings()
    conf = workdir / "mosquitto.conf"
    lines = [
        "# written by the edge-resume demo: the project's settings, one local listener",
        settings,
        f"persistence_location {data}/",
        f"log_dest file {workdir / 'mosquitto.log'}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages true",
        "per_listener_settings false",
        "allow_anonymous true",
        # as root, Mosquitto would switch to the mosquitto user, which cannot write here
        *(["user root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
        f"listener {port} 127.0.0.1",
    ]
    conf.write_text("\n".join(lines) + "\n")
    child = children.add(Child("mosquitto", [binary, "-c", str(conf)], workdir / "stdout.log"))
    child.start(env=env)
    wait_listening(port, child, 15.0)
    return BrokerHandle(
        "mosquitto", f"{_mosquitto_version(binary)} with {origin}", port, "auto", child
    )


def _start_amqtt(workdir: Path, children: Children, env: Mapping[str, str] | None) -> BrokerHandle:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [sys.executable, "-m", "server.demo._amqtt", "--port", str(port)]
    child = children.add(Child("amqtt", argv, workdir / "amqtt.log"))
    child.start(env=env)
    _wait_log(child, READY_LINE, 30.0)  # not a TCP probe: amqtt logs an error for each
    try:
        from importlib.metadata import version

        desc = f"amqtt {version('amqtt')} (embedded, MQTT 3.1.1)"
    except Exception:
        desc = "amqtt (embedded, MQTT 3.1.1)"
    return BrokerHandle("amqtt", desc, port, "3.1.1", child)


def _wait_log(child: Child, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        child.check_alive()
        try:
            if text in child.log.read_text(errors="replace"):
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise DemoError(f"{child.name} did not start within {timeout:.0f} s:\n{child.tail()}")


def start_broker(
    kind: str, workdir: Path, children: Children, env: Mapping[str, str] | None = None
) -> BrokerHandle:
    """Start a broker of ``kind`` (``auto``: Mosquitto if installed, else amqtt) as a child
    process with ``env``."""
    if kind not in BROKER_KINDS:
        raise DemoError(f"unknown broker {kind!r}", hint=f"one of {', '.join(BROKER_KINDS)}")
    binary = mosquitto_binary()
    if kind == "mosquitto" or (kind == "auto" and binary is not None):
        if binary is None:
            raise DemoError(
                "mosquitto is not installed", hint="apt-get install mosquitto, or --broker amqtt"
            )
        return _start_mosquitto(binary, workdir, children, env)
    if not amqtt_available():
        raise DemoError(
            "no MQTT broker: mosquitto is not installed and neither is amqtt",
            hint='apt-get install mosquitto, or pip install "edge-resume[dev]" (amqtt)',
        )
    return _start_amqtt(workdir, children, env)
