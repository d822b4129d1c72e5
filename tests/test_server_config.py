"""server.config: defaults < file < environment < flags, types checked, secrets from files."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.errors import ConfigError
from server.config import ServerConfig, load_config, parse_roles


def test_defaults() -> None:
    cfg = load_config(env={})
    assert cfg == ServerConfig()
    assert cfg.broker.url == "mqtt://127.0.0.1:1883" and cfg.api.port == 8080
    assert cfg.api_token() is None and cfg.api_url() == "http://127.0.0.1:8080"


def test_file_env_and_overrides_in_order(tmp_path: Path) -> None:
    f = tmp_path / "server.toml"
    f.write_text(
        """
[broker]
url = "mqtts://broker.example:8883"
share_group = "ingest"
topic_prefix = "plant/er"

[store]
path = "/var/lib/er"

[api]
port = 9000
token = "from-file"

[liveness]
heartbeat_timeout_s = 45

[worker]
auto_resume_s = 120
models_dir = "/models"
gpu_prefill = true
"""
    )
    env = {
        "EDGE_SERVER_API_PORT": "9100",
        "EDGE_SERVER_LIVENESS_HEARTBEAT_TIMEOUT_S": "60.5",
        "EDGE_SERVER_BROKER_INSECURE": "yes",
        "EDGE_SERVER_WORKER_DATA_DIR": "/data",
        "EDGE_SERVER_WORKER_REBUILD": "prefill",
        "UNRELATED": "x",
    }
    cfg = load_config(f, env=env, overrides={"api.port": 9200, "store.path": None})
    assert cfg.broker.url == "mqtts://broker.example:8883" and cfg.broker.insecure is True
    assert cfg.broker.share_group == "ingest" and cfg.broker.topic_prefix == "plant/er"
    assert cfg.store.path == "/var/lib/er"  # a None override changes nothing
    assert cfg.api.port == 9200
    assert cfg.liveness.heartbeat_timeout_s == 60.5
    assert cfg.worker.auto_resume_s == 120.0 and cfg.worker.models_dir == "/models"
    assert cfg.worker.data_dir == "/data"
    assert dict(cfg.worker.options) == {"gpu_prefill": True, "rebuild": "prefill"}
    assert cfg.api_token() == "from-file"
    assert cfg.source == str(f)


def test_token_and_password_files(tmp_path: Path) -> None:
    tok = tmp_path / "token"
    tok.write_text("  s3cret\n")
    pw = tmp_path / "pw"
    pw.write_text("hunter2")
    cfg = load_config(
        env={
            "EDGE_SERVER_API_TOKEN_FILE": str(tok),
            "EDGE_SERVER_BROKER_PASSWORD_FILE": str(pw),
            "EDGE_SERVER_BROKER_USERNAME": "edge-server",
        }
    )
    assert cfg.api_token() == "s3cret" and cfg.broker_password() == "hunter2"
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(env={"EDGE_SERVER_API_TOKEN_FILE": str(tmp_path / "nope")}).api_token()
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(env={"EDGE_SERVER_API_TOKEN_FILE": str(tmp_path / "empty")}).api_token()


@pytest.mark.parametrize(
    ("text", "env", "match"),
    [
        ("[nope]\nx = 1\n", {}, "unknown section"),
        ("[api]\nprot = 1\n", {}, "unknown key"),
        ("[api]\nport = 'x'\n", {}, "must be an integer"),
        ("[api]\nport = true\n", {}, "must be an integer"),
        ("[broker]\ninsecure = 1\n", {}, "true or false"),
        ("[api]\nport = 70000\n", {}, "0..65535"),
        ("[broker]\nurl = 'http://x'\n", {}, "mqtt://"),
        ("[broker]\ntopic_prefix = 'a/#'\n", {}, "topic_prefix"),
        ("[broker]\nshare_group = 'a b'\n", {}, "share_group"),
        ("[ingest]\npartitions = 0\n", {}, "partitions"),
        ("", {"EDGE_SERVER_API_PORT": "eighty"}, "EDGE_SERVER_API_PORT"),
        ("", {"EDGE_SERVER_NOPE": "1"}, "names no configuration key"),
        ("", {"EDGE_SERVER_LIVENESS_HEARTBEAT_TIMEOUT_S": "0"}, "heartbeat_timeout_s"),
        ("not toml [", {}, "not valid TOML"),
    ],
)
def test_bad_configuration_is_refused(tmp_path: Path, text: str, env: dict, match: str) -> None:
    f = tmp_path / "server.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(f, env=env)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config("/nonexistent/server.toml", env={})


def test_roles() -> None:
    assert parse_roles("api, ingest") == ("ingest", "api")
    assert parse_roles("ingest,worker,api") == ("ingest", "worker", "api")
    for bad in ("", "ingest,web", ","):
        with pytest.raises(ConfigError):
            parse_roles(bad)


def test_api_url_for_wildcard_and_ipv6() -> None:
    assert load_config(env={"EDGE_SERVER_API_HOST": "0.0.0.0"}).api_url() == (
        "http://127.0.0.1:8080"
    )
    assert load_config(env={"EDGE_SERVER_API_HOST": "::1"}).api_url() == "http://[::1]:8080"
    url = load_config(env={"EDGE_SERVER_API_URL": "https://er.example/"}).api_url()
    assert url == "https://er.example"
