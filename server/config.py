"""The server's configuration: a TOML file, ``EDGE_SERVER_*`` environment variables, flags.

    cfg = load_config("server.toml", env=os.environ, overrides={"api.port": 9000})
    cfg.broker.url, cfg.store.path, cfg.api.token, cfg.liveness.heartbeat_timeout_s

Every key has a section and a name (``[api] port``); its environment variable is
``EDGE_SERVER_<SECTION>_<NAME>`` in upper case (``EDGE_SERVER_API_PORT``). Precedence, lowest
first: defaults, the file, the environment, ``overrides`` (the CLI's flags). Unknown keys in
the file and values of the wrong type are a :class:`ConfigError` naming the key and where it
came from. ``[worker]`` keys this module does not know go to ``WorkerConfig.options``
unchecked (the worker reads them); they can be set from the environment as
``EDGE_SERVER_WORKER_<NAME>`` too (a string).

Secrets: ``[broker] password`` and ``[api] token`` may instead be read from a file
(``password_file``, ``token_file``; the file's content, stripped). docs/server.md has the
table of every key.

This module only parses and checks. It opens no connection and creates no file.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "ENV_PREFIX",
    "ROLES",
    "ApiConfig",
    "BrokerConfig",
    "IngestConfig",
    "LivenessConfig",
    "ServerConfig",
    "StoreConfig",
    "WorkerConfig",
    "load_config",
    "parse_roles",
]

ENV_PREFIX = "EDGE_SERVER_"
ROLES = ("ingest", "worker", "api")


@dataclass(frozen=True)
class BrokerConfig:
    url: str = "mqtt://127.0.0.1:1883"
    client_id: str = "edge-server"  # one per process: roles in other processes add a suffix
    username: str | None = None
    password: str | None = None
    password_file: str | None = None
    ca_file: str | None = None  # mqtts:// only; None: the system's CAs
    cert_file: str | None = None  # client certificate (mutual TLS)
    key_file: str | None = None
    insecure: bool = False  # no TLS verification at all (a lab only)
    protocol: str = "auto"  # auto | 5 | 3.1.1
    keepalive: int = 30
    topic_prefix: str = "edge-resume/v1"
    share_group: str | None = None  # MQTT 5 shared subscription group for scale-out
    puback_timeout_s: float = 30.0  # how long a take-over waits for the broker's PUBACK


@dataclass(frozen=True)
class StoreConfig:
    path: str = "./edge-resume-store"
    compact_interval_s: float = 5.0  # compaction of recently committed jobs
    retain_interval_s: float = 600.0  # retention and orphan collection
    delta_ratio: float = 1.0  # compaction policy (docs/store.md)
    max_deltas: int = 32
    baseline_level: str = "fast"  # codec level of compacted baselines: "fast" or "small"
    keep_baselines: int = 1  # retention policy
    orphan_grace_s: float = 600.0


@dataclass(frozen=True)
class IngestConfig:
    max_transfer: int = 1 << 30  # largest snapshot payload accepted (bytes)
    state_cache_mb: float = 512.0  # acknowledged states kept in memory (LRU)
    state_cache_jobs: int = 4096
    partitions: int = 2  # threads applying and storing snapshots (a job always uses one)


@dataclass(frozen=True)
class LivenessConfig:
    heartbeat_timeout_s: float = 30.0  # 3 agent heartbeat intervals
    check_interval_s: float = 1.0


@dataclass(frozen=True)
class ApiConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    token_file: str | None = None
    url: str | None = None  # where the CLI reaches the API; default http://{host}:{port}


@dataclass(frozen=True)
class WorkerConfig:
    models_dir: str | None = None  # where the server finds the jobs' models (by file name)
    data_dir: str | None = None  # where it finds datasets
    auto_resume_s: float | None = None  # resume jobs offline this long; None: only on request
    max_attempts: int = 3
    retry_initial_s: float = 5.0
    retry_max_s: float = 300.0
    device: str = "auto"  # torch device for replay: auto | cpu | cuda | cuda:N
    options: Mapping[str, Any] = field(default_factory=dict)  # other [worker] keys


@dataclass(frozen=True)
class ServerConfig:
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    liveness: LivenessConfig = field(default_factory=LivenessConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    source: str = "defaults"  # where it came from (for messages)

    def api_token(self) -> str | None:
        """The API token: ``[api] token``, else the stripped content of ``token_file``."""
        return _secret(self.api.token, self.api.token_file, "api.token_file")

    def broker_password(self) -> str | None:
        return _secret(self.broker.password, self.broker.password_file, "broker.password_file")

    def api_url(self) -> str:
        if self.api.url:
            return self.api.url.rstrip("/")
        host = self.api.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.api.port}"


_SECTIONS: dict[str, type[Any]] = {
    "broker": BrokerConfig,
    "store": StoreConfig,
    "ingest": IngestConfig,
    "liveness": LivenessConfig,
    "api": ApiConfig,
    "worker": WorkerConfig,
}


def _secret(value: str | None, path: str | None, key: str) -> str | None:
    if value:
        return value
    if not path:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from exc
    if not text:
        raise ConfigError(f"{key}: {path} is empty")
    return text


def _field_types(cls: type[Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` (from TOML, or a str from the environment) to ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            return None
        return _coerce(value, args[0], where)
    from_env = isinstance(value, str)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_env and value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if from_env and value.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where} must be true or false, not {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be an integer, not {value!r}")
        if isinstance(value, int):
            return value
        if from_env:
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where} must be an integer, not {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, not {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if from_env:
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, not {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, not {value!r}")
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover


def parse_roles(text: str) -> tuple[str, ...]:
    """``"ingest,api"`` -> ``("ingest", "api")``; unknown or no roles are a ConfigError."""
    roles = tuple(r.strip() for r in text.split(",") if r.strip())
    bad = [r for r in roles if r not in ROLES]
    if bad or not roles:
        raise ConfigError(
            f"roles {text!r}: {'unknown ' + ', '.join(bad) if bad else 'none given'}",
            hint=f"a comma-separated subset of {', '.join(ROLES)}",
        )
    return tuple(r for r in ROLES if r in roles)


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ServerConfig:
    """Defaults < ``path`` (TOML) < ``env`` (``EDGE_SERVER_*``) < ``overrides``
    (``{"section.key": value}``, None values ignored). See the module docstring."""
    values: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    origin: dict[tuple[str, str], str] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
        for section, table in doc.items():
            if section not in _SECTIONS:
                raise ConfigError(
                    f"{path}: unknown section [{section}]",
                    hint=f"sections: {', '.join(_SECTIONS)}",
                )
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: [{section}] must be a table")
            for key, value in table.items():
                values[section][key] = value
                origin[(section, key)] = f"{path}: [{section}] {key}"
    env = os.environ if env is None else env
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        section, _, key = rest.partition("_")
        if section not in _SECTIONS or not key:
            raise ConfigError(
                f"environment variable {name} names no configuration key",
                hint=f"EDGE_SERVER_<SECTION>_<KEY>, sections: {', '.join(_SECTIONS)}",
            )
        values[section][key] = value
        origin[(section, key)] = f"environment variable {name}"
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        values[section][key] = value
        origin[(section, key)] = f"option {dotted}"
    built: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        types_ = _field_types(cls)
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in values[section].items():
            where = origin[(section, key)]
            if key not in types_ or key == "options":
                if section == "worker":
                    extra[key] = value
                    continue
                known = ", ".join(k for k in types_ if k != "options")
                raise ConfigError(f"{where}: unknown key", hint=f"[{section}] keys: {known}")
            kwargs[key] = _coerce(value, types_[key], where)
        if section == "worker":
            kwargs["options"] = extra
        built[section] = cls(**kwargs)
    cfg = ServerConfig(**built, source=source)
    _validate(cfg)
    return cfg


def _validate(cfg: ServerConfig) -> None:
    b, s, i, lv, a, w = cfg.broker, cfg.store, cfg.ingest, cfg.liveness, cfg.api, cfg.worker
    if b.protocol not in ("auto", "5", "3.1.1"):
        raise ConfigError(f"broker.protocol must be auto, 5 or 3.1.1, not {b.protocol!r}")
    if not b.url.startswith(("mqtt://", "mqtts://")):
        raise ConfigError(f"broker.url {b.url!r} must be mqtt://host:port or mqtts://host:port")
    if not b.client_id:
        raise ConfigError("broker.client_id must not be empty")
    checks: list[tuple[bool, str]] = [
        (b.keepalive >= 5, "broker.keepalive must be >= 5 seconds"),
        (b.puback_timeout_s > 0, "broker.puback_timeout_s must be > 0"),
        (s.compact_interval_s > 0, "store.compact_interval_s must be > 0"),
        (s.retain_interval_s > 0, "store.retain_interval_s must be > 0"),
        (s.delta_ratio > 0, "store.delta_ratio must be > 0"),
        (s.max_deltas >= 1, "store.max_deltas must be >= 1"),
        (s.baseline_level in ("fast", "small"), "store.baseline_level must be fast or small"),
        (s.keep_baselines >= 1, "store.keep_baselines must be >= 1"),
        (s.orphan_grace_s >= 0, "store.orphan_grace_s must be >= 0"),
        (i.max_transfer >= 1, "ingest.max_transfer must be >= 1"),
        (i.state_cache_mb >= 0, "ingest.state_cache_mb must be >= 0"),
        (i.state_cache_jobs >= 0, "ingest.state_cache_jobs must be >= 0"),
        (1 <= i.partitions <= 64, "ingest.partitions must be 1..64"),
        (lv.heartbeat_timeout_s > 0, "liveness.heartbeat_timeout_s must be > 0"),
        (lv.check_interval_s > 0, "liveness.check_interval_s must be > 0"),
        (0 <= a.port <= 65535, "api.port must be 0..65535"),
        (w.auto_resume_s is None or w.auto_resume_s >= 0, "worker.auto_resume_s must be >= 0"),
        (w.max_attempts >= 1, "worker.max_attempts must be >= 1"),
        (w.retry_initial_s > 0 and w.retry_max_s > 0, "worker.retry_*_s must be > 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if b.share_group is not None:
        from edge_agent.protocol.messages import is_valid_id

        if not is_valid_id(b.share_group):
            raise ConfigError(f"broker.share_group {b.share_group!r} is not a valid id")
    from edge_agent.errors import LocalProtocolError
    from edge_agent.protocol.topics import TopicNamespace

    try:
        TopicNamespace(b.topic_prefix)
    except LocalProtocolError as exc:
        raise ConfigError(f"broker.topic_prefix: {exc}") from exc
