"""Mosquitto exactly as deploy/ installs it, on free ports, for security tests.

    inst = install_deploy(tmp / "install", {"edge-server": "pw0", "gw-a": "pw1"},
                          cert_devices=("gw-a",))        # add-user.sh + make-certs.sh
    with DeployBroker(inst, tmp / "broker") as b:        # deploy/mosquitto/mosquitto.conf
        b.tls_url, b.plain_url                           # mqtts://127.0.0.1:N, mqtt://...

:func:`install_deploy` lays the files out as deploy/README.md section 1 says, under a
temporary root instead of ``/``: ``edge-resume.conf`` in ``etc/edge-resume/mosquitto/conf.d``,
the ``acl`` next to the configuration, a password file made by ``deploy/mosquitto/add-user.sh``
and certificates made by ``deploy/tls/make-certs.sh``. It is slow-ish (RSA keys), so a test
module makes one and starts as many brokers on it as it needs.

:class:`DeployBroker` runs ``deploy/mosquitto/mosquitto.conf`` with only what cannot work in a
test rewritten (:func:`rewrite_config` fails if one of those lines is gone): the
``/etc/edge-resume/`` and ``/var/lib/edge-resume/`` paths (into the installation and the
broker's own work folder), ``log_dest syslog`` (a file), and the two listeners' ports (free
ports on 127.0.0.1). Everything else (``allow_anonymous false``, the password file, the ACL,
``use_username_as_clientid``, TLS settings) is the file as shipped. ``device_listener_extra``
adds lines to the device (TLS) listener (e.g. mutual TLS: ``require_certificate true``);
``replace`` changes more lines (a test showing what a setting prevents removes it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.broker import free_port, mosquitto_binary

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
MOSQUITTO = DEPLOY / "mosquitto"
MAKE_CERTS = DEPLOY / "tls" / "make-certs.sh"
ADD_USER = MOSQUITTO / "add-user.sh"

#: The device listener and the server's loopback listener, as deploy/mosquitto/mosquitto.conf
#: writes them.
DEVICE_LISTENER = "listener 8883\n"
SERVER_LISTENER = "listener 1883 127.0.0.1\n"


def rewrite_config(text: str, replacements: Sequence[tuple[str, str]]) -> str:
    """``text`` with each ``old`` replaced by ``new``; an ``old`` that is not there is an
    error (the config changed: the test must follow). As root, adds ``user root`` (Mosquitto
    would otherwise switch to its own user, which cannot read the test's private files)."""
    for old, new in replacements:
        if old not in text:
            raise AssertionError(f"{old!r} is not in the config any more")
        text = text.replace(old, new)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        text += "\nuser root\n"
    return text


class MosquittoProcess:
    """``mosquitto -c CONF``; :meth:`wait` until ``port`` listens (or the process died)."""

    def __init__(self, conf: Path, log: Path) -> None:
        self.conf = conf
        self.log = log
        self.proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def wait(self, port: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise AssertionError(f"mosquitto exited: {err}\n{self.log_text()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise AssertionError(f"mosquitto did not listen on {port} within {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stderr:
            self.proc.stderr.close()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass(frozen=True)
class DeployInstall:
    """The broker's files as deploy/README.md installs them, under ``root``."""

    root: Path
    passwords: Mapping[str, str]
    cert_devices: tuple[str, ...]

    @property
    def etc(self) -> Path:
        return self.root / "etc" / "edge-resume"

    @property
    def tls(self) -> Path:
        return self.etc / "tls"

    @property
    def ca(self) -> Path:
        return self.tls / "ca.crt"

    def client_cert(self, device: str) -> tuple[Path, Path]:
        """(certificate, key) that make-certs.sh issued to ``device`` (CN = device id)."""
        assert device in self.cert_devices, f"no certificate was made for {device}"
        return self.tls / f"{device}.crt", self.tls / f"{device}.key"


def make_certs(out: Path, host: str, *devices: str) -> subprocess.CompletedProcess[str]:
    """``deploy/tls/make-certs.sh OUT HOST DEVICE...`` (not checked: the caller looks at it)."""
    return subprocess.run(
        [str(MAKE_CERTS), str(out), host, *devices],
        capture_output=True,
        text=True,
        timeout=120,
    )


def install_deploy(
    root: Path, passwords: Mapping[str, str], *, cert_devices: Sequence[str] = ()
) -> DeployInstall:
    """Install the broker's files under ``root`` as deploy/README.md section 1 does: users
    from ``passwords`` (user -> password) with add-user.sh, a test CA and the broker's
    certificate for ``localhost`` (and a client certificate per ``cert_devices``) with
    make-certs.sh."""
    inst = DeployInstall(root, dict(passwords), tuple(cert_devices))
    conf_d = inst.etc / "mosquitto" / "conf.d"
    conf_d.mkdir(parents=True)
    shutil.copy(MOSQUITTO / "edge-resume.conf", conf_d)
    shutil.copy(MOSQUITTO / "acl", inst.etc / "mosquitto")
    for user, password in passwords.items():
        subprocess.run(
            [str(ADD_USER), str(inst.etc / "mosquitto" / "passwd"), user, password],
            check=True,
            capture_output=True,
            timeout=60,
        )
    done = make_certs(inst.tls, "localhost", *cert_devices)
    if done.returncode != 0:
        raise AssertionError(f"make-certs.sh failed: {done.stderr}")
    return inst


class DeployBroker:
    """deploy/mosquitto/mosquitto.conf on free ports over the files of ``install`` (see the
    module docstring); ``tls_port`` is the device listener (8883 in production),
    ``plain_port`` the server's loopback listener (1883)."""

    def __init__(
        self,
        install: DeployInstall,
        workdir: Path,
        *,
        device_listener_extra: Sequence[str] = (),
        replace: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.install = install
        self.workdir = Path(workdir)
        self.tls_port = free_port()
        self.plain_port = free_port()
        self.device_listener_extra = list(device_listener_extra)
        self.replace = list(replace)
        self.conf = self.workdir / "mosquitto.conf"
        self.log = self.workdir / "mosquitto.log"
        self.process: MosquittoProcess | None = None

    def config_text(self) -> str:
        var = self.workdir / "var" / "lib" / "edge-resume"
        device_listener = f"listener {self.tls_port} 127.0.0.1\n" + "".join(
            line + "\n" for line in self.device_listener_extra
        )
        return rewrite_config(
            (MOSQUITTO / "mosquitto.conf").read_text(),
            [
                ("/etc/edge-resume/", f"{self.install.etc}/"),
                ("/var/lib/edge-resume/", f"{var}/"),
                ("log_dest syslog", f"log_dest file {self.log}"),
                (DEVICE_LISTENER, device_listener),
                (SERVER_LISTENER, f"listener {self.plain_port} 127.0.0.1\n"),
                *self.replace,
            ],
        )

    def start(self) -> DeployBroker:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "var" / "lib" / "edge-resume" / "mosquitto").mkdir(
            parents=True, exist_ok=True
        )
        self.conf.write_text(self.config_text())
        self.process = MosquittoProcess(self.conf, self.log)
        self.process.wait(self.tls_port)
        self.process.wait(self.plain_port)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    @property
    def tls_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.tls_port}"

    @property
    def plain_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.plain_port}"

    def __enter__(self) -> DeployBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
