"""``edge-server serve``: build the roles a process runs, start them in order, stop them cleanly.

    srv = Server(load_config("server.toml"), roles=("ingest", "worker", "api"))
    srv.start()
    srv.wait()              # until SIGTERM/SIGINT (run()) or stop()
    srv.close()

Roles:

* ``ingest``: the MQTT ingest (:mod:`server.ingest`) with liveness (:mod:`server.liveness`);
  it is the worker's :class:`~server.control.JobControl` when both run here.
* ``worker``: ``server.worker.create_worker(WorkerContext)`` (imported only when the role
  runs; a missing module is a clear error). Without the ingest role, its JobControl is an
  :class:`~server.control.MqttJobControl` with an MQTT connection of its own.
* ``api``: the HTTP API (:mod:`server.api`) in a uvicorn thread; it needs the token.

Start order: store, MQTT transport (subscriptions registered first), ingest, worker, API.
Stop order: API, worker, ingest, transport (delivering what it accepted, up to a few
seconds), store. A role that fails to start stops the ones already started.

This module owns wiring and lifecycle. It holds no protocol, storage or HTTP logic.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from edge_agent.errors import ConfigError, EdgeResumeError
from edge_agent.protocol.topics import TopicNamespace
from server.config import ROLES, ServerConfig
from server.control import JobControl, MqttJobControl, WorkerContext, WorkerRole
from server.store import CompactionPolicy, RetentionPolicy, SQLiteStore, Store

__all__ = ["Server", "load_worker_factory", "make_transport"]

log = logging.getLogger("server.serve")

WORKER_MODULE = "server.worker"
WORKER_FACTORY = "create_worker"


def load_worker_factory() -> Callable[[WorkerContext], WorkerRole]:
    """``server.worker.create_worker``, or a ConfigError saying why it is not there."""
    try:
        module = importlib.import_module(WORKER_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name not in (WORKER_MODULE, "server"):
            raise ConfigError(
                f"the worker role cannot start: {WORKER_MODULE} needs {exc.name!r}",
                hint='install the server extra: pip install "edge-resume[server]"',
            ) from exc
        raise ConfigError(
            f"the worker role needs {WORKER_MODULE}, which this installation does not have",
            hint="run with --roles ingest,api (no server-side resumes), or update edge-resume",
        ) from exc
    factory = getattr(module, WORKER_FACTORY, None)
    if not callable(factory):
        raise ConfigError(f"{WORKER_MODULE} has no {WORKER_FACTORY}(ctx) function")
    # the worker imports torch on first use (seconds): check now that it is there at all
    for needed in getattr(module, "LAZY_IMPORTS", ()):
        if importlib.util.find_spec(needed) is None:
            raise ConfigError(
                f"the worker role cannot start: {WORKER_MODULE} needs {needed!r}",
                hint='install the server extra: pip install "edge-resume[server]"',
            )
    return factory  # type: ignore[no-any-return]


def make_transport(config: ServerConfig, suffix: str = "") -> Any:
    """The server's MQTT connection: its own client id, credentials/TLS, no will."""
    from edge_agent.transport import TLSOptions, Transport, TransportConfig

    b = config.broker
    tls = None
    if b.url.startswith("mqtts://"):
        tls = TLSOptions(
            ca_file=b.ca_file, cert_file=b.cert_file, key_file=b.key_file, insecure=b.insecure
        )
    return Transport(
        TransportConfig(
            broker=b.url,
            client_id=b.client_id + suffix,
            username=b.username,
            password=config.broker_password(),
            tls=tls,
            will=None,
            protocol=b.protocol,  # type: ignore[arg-type]
            keepalive=b.keepalive,
            max_inflight=256,
            max_inflight_bytes=8 << 20,
            max_queued_bytes=256 << 20,
            retry_refused=False,
        )
    )


class Server:
    """The roles of one ``edge-server serve`` process (see the module docstring)."""

    def __init__(
        self,
        config: ServerConfig,
        roles: Sequence[str] = ROLES,
        *,
        store: Store | None = None,
        worker_factory: Callable[[WorkerContext], WorkerRole] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        bad = [r for r in roles if r not in ROLES]
        if bad or not roles:
            raise ConfigError(f"unknown roles {bad}" if bad else "no roles to run")
        self.config = config
        self.roles = tuple(r for r in ROLES if r in roles)
        self.clock = clock
        self.namespace = TopicNamespace(config.broker.topic_prefix)
        self._store = store
        self._own_store = store is None
        self._worker_factory = worker_factory
        self._stop = threading.Event()
        self._closers: list[tuple[str, Callable[[], None]]] = []
        self.store: Store | None = None
        self.transport: Any = None
        self.liveness: Any = None
        self.ingest: Any = None
        self.ingest_service: Any = None
        self.control: JobControl | None = None
        self.worker: WorkerRole | None = None
        self.api: Any = None
        self.token: str | None = None
        if "api" in self.roles:
            self.token = config.api_token()
            if not self.token:
                raise ConfigError(
                    "the api role needs a bearer token: set [api] token or token_file "
                    "(or EDGE_SERVER_API_TOKEN / EDGE_SERVER_API_TOKEN_FILE)",
                    hint="make one with: python -c 'import secrets; print(secrets.token_hex(32))'",
                )
        if "worker" in self.roles and self._worker_factory is None:
            self._worker_factory = load_worker_factory()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Server:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        cfg = self.config
        if self._store is None:
            self._store = SQLiteStore(
                cfg.store.path,
                compaction=CompactionPolicy(
                    cfg.store.delta_ratio,
                    cfg.store.max_deltas,
                    "small" if cfg.store.baseline_level == "small" else "fast",
                ),
                retention=RetentionPolicy(cfg.store.keep_baselines, cfg.store.orphan_grace_s),
            )
        self.store = store = self._store
        if self._own_store:
            self._closers.append(("store", store.close))
        needs_mqtt = "ingest" in self.roles or "worker" in self.roles
        if needs_mqtt:
            suffix = "" if "ingest" in self.roles else "-control"
            self.transport = make_transport(cfg, suffix)
            self._closers.append(("mqtt", lambda: self.transport.close(timeout=3.0)))
        if "ingest" in self.roles:
            from server.ingest import Ingest, IngestService
            from server.liveness import Liveness

            self.liveness = Liveness(
                store, heartbeat_timeout=cfg.liveness.heartbeat_timeout_s, clock=self.clock
            )
            self.ingest = Ingest(
                store,
                self.transport,
                namespace=self.namespace,
                liveness=self.liveness,
                clock=self.clock,
                max_transfer=cfg.ingest.max_transfer,
                state_cache_bytes=int(cfg.ingest.state_cache_mb * (1 << 20)),
                state_cache_jobs=cfg.ingest.state_cache_jobs,
                puback_timeout=cfg.broker.puback_timeout_s,
            )
            self.ingest_service = IngestService(
                self.ingest,
                self.transport,
                share_group=cfg.broker.share_group,
                partitions=cfg.ingest.partitions,
                check_interval=cfg.liveness.check_interval_s,
                compact_interval=cfg.store.compact_interval_s,
                retain_interval=cfg.store.retain_interval_s,
            )
            self.ingest_service.register()
            self.control = self.ingest
        elif "worker" in self.roles:
            self.control = MqttJobControl(
                store,
                self.transport,
                namespace=self.namespace,
                clock=self.clock,
                puback_timeout=cfg.broker.puback_timeout_s,
            )
        if self.transport is not None:
            self.transport.start()
        if self.ingest_service is not None:
            self.ingest_service.start()
            self._closers.append(("ingest", self.ingest_service.close))
        if "worker" in self.roles:
            assert self._worker_factory is not None and self.control is not None
            ctx = WorkerContext(
                config=cfg,
                store=store,
                control=self.control,
                liveness=self.liveness,
                clock=self.clock,
            )
            self.worker = self._worker_factory(ctx)
            self.worker.start()
            self._closers.append(("worker", self.worker.close))
            if self.ingest is not None:
                self.ingest.set_hooks(self.worker)
        if "api" in self.roles:
            from server.api import ApiServer, create_app

            assert self.token is not None
            app = create_app(
                store,
                token=self.token,
                resumer=self.worker,
                liveness=self.liveness,
                health=self.health,
                clock=self.clock,
            )
            self.api = ApiServer(app, host=cfg.api.host, port=cfg.api.port).start()
            self._closers.append(("api", self.api.stop))
            log.info(
                "API on %s (status page at %s/, OpenAPI at %s/docs)",
                self.api.url, self.api.url, self.api.url,
            )  # fmt: skip
        log.info("serving roles %s (pid %d on %s)", ",".join(self.roles), os.getpid(), _host())

    def health(self) -> dict[str, Any]:
        """What each role reports, for ``/healthz``."""
        out: dict[str, Any] = {}
        if self.ingest_service is not None:
            svc = self.ingest_service
            out["ingest"] = {
                "ok": svc.connected.is_set() and svc.fatal is None,
                "mqtt_connected": svc.connected.is_set(),
                "backlog": svc.backlog(),
                "error": None if svc.fatal is None else str(svc.fatal),
            }
        if "worker" in self.roles:
            connected = self.transport is not None and bool(self.transport.connected)
            out["worker"] = {"ok": connected, "mqtt_connected": connected}
        if "api" in self.roles:
            out["api"] = {"ok": True}
        return out

    def stop(self) -> None:
        """Ask :meth:`wait` to return."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stop.wait(timeout)

    def close(self) -> None:
        """Stop the roles in reverse start order; errors are logged, not raised."""
        while self._closers:
            name, closer = self._closers.pop()
            try:
                closer()
            except Exception:
                log.exception("stopping %s failed", name)
        log.info("stopped")

    def run(self) -> None:
        """Start, serve until SIGTERM or SIGINT, then close."""
        previous: dict[signal.Signals, Any] = {}

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("signal %d: shutting down", signum)
            self.stop()

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, on_signal)
        try:
            self.start()
            while not self.wait(1.0):
                svc = self.ingest_service
                if svc is not None and svc.fatal is not None:
                    raise EdgeResumeError(f"the MQTT link failed for good: {svc.fatal}")
        finally:
            self.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _host() -> str:
    try:
        return socket.gethostname()
    except OSError:  # pragma: no cover
        return "?"
