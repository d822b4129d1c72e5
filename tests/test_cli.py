"""edge-agent's command line: options from flags, environment and config file; output
formats; and the edge install's dependency boundary."""

from __future__ import annotations

import ast
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from edge_agent import cli
from edge_agent.cli import OPTIONS, ConfigError, resolve_options
from edge_agent.runner import JobProgress

REPO = Path(__file__).resolve().parents[1]


def given(**kw: Any) -> dict[str, Any]:
    return {o.name: kw.get(o.name) for o in OPTIONS}


def test_command_line_beats_environment_beats_config_file(tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text(
        '[agent]\ndevice = "from-file"\nbroker = "mqtt://file:1883"\nmax_kbps = 64\n'
        'heartbeat = 5\ntls_insecure = true\nprefix = "acme/er"\n'
    )
    env = {"EDGE_AGENT_BROKER": "mqtt://env:1883", "EDGE_AGENT_MAX_KBPS": "128"}
    o = resolve_options("run", given(max_kbps=256.0), env, str(conf))
    assert o["device"] == "from-file"  # only in the file
    assert o["broker"] == "mqtt://env:1883"  # env over file
    assert o["max_kbps"] == 256.0  # flag over env
    assert o["heartbeat"] == 5.0 and o["tls_insecure"] is True and o["prefix"] == "acme/er"
    assert o["max_message"] == 120_000 and o["journal"] == "journal"  # defaults


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[agent]\nmax_kbps = -1\n", "not a number > 0"),
        ("[agent]\nmax_kbps = true\n", "is not a KBPS"),
        ("[agent]\ndevice = 7\n", "is not a string"),
        ("[agent]\nbogus = 1\n", "'bogus' is not a known setting"),
        ("[other]\nx = 1\n", "unknown table or key 'other'"),
        ("[agent\n", "not valid TOML"),
        ('[agent]\nlog_format = "xml"\n', "not one of auto, json, text"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text(text)
    with pytest.raises(ConfigError, match=message):
        resolve_options("run", given(), {}, str(conf))


def test_bad_environment_values_name_the_variable() -> None:
    with pytest.raises(ConfigError, match="EDGE_AGENT_HEARTBEAT"):
        resolve_options("run", given(), {"EDGE_AGENT_HEARTBEAT": "soon"})
    o = resolve_options("run", given(), {"EDGE_AGENT_TLS_INSECURE": "yes"})
    assert o["tls_insecure"] is True


def test_every_option_has_a_flag_an_env_var_and_is_documented() -> None:
    doc = (REPO / "docs" / "agent.md").read_text()
    parser = cli.build_parser()
    run_help = parser._subparsers._group_actions[0].choices["run"].format_help()  # type: ignore[union-attr]
    for o in OPTIONS:
        assert o.cli in run_help or "run" not in o.commands
        assert o.cli in doc and o.env in doc, f"docs/agent.md does not document {o.name}"
    assert "EDGE_AGENT_CONFIG" in doc


def test_run_needs_device_and_broker(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    job = tmp_path / "j.toml"
    job.write_text('[job]\nid = "j"\nkind = "generate"\nmodel = "m.onnx"\n')
    assert cli.main(["run", str(job), "--broker", "mqtt://h:1"]) == 2
    assert "--device is required" in capsys.readouterr().err
    assert cli.main(["run", str(job), "--device", "d", "--broker", "http://h"]) == 2
    assert "scheme 'http'" in capsys.readouterr().err
    args = ["run", str(job), "--device", "d", "--broker", "mqtt://h", "--ca-file", "x"]
    assert cli.main(args) == 2
    assert "need an mqtts://" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["run", str(job), "--max-kbps", "fast"])
    assert e.value.code == 2


def test_password_file(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    o = resolve_options("run", given(device="d", broker="mqtts://h", password_file=str(pw)), {})
    opts = cli._options_for_run(o)
    assert opts.password == "s3cret" and opts.tls is not None and not opts.tls.insecure
    o["password"] = "other"
    with pytest.raises(ConfigError, match="not both"):
        cli._options_for_run(o)


def test_json_logs_carry_the_event_and_its_fields() -> None:
    out = io.StringIO()
    assert cli.setup_logging("json", "info", out) is None
    logging.getLogger("edge_agent.runner").info(
        "job g: acked", extra={"event": "acked", "fields": {"job": "g", "seq": 7}}
    )
    logging.getLogger("edge_agent.runner").debug("hidden")
    (line,) = out.getvalue().splitlines()
    doc = json.loads(line)
    assert (doc["event"], doc["job"], doc["seq"], doc["level"]) == ("acked", "g", 7, "info")
    assert doc["msg"] == "job g: acked" and doc["ts"].endswith("Z")


def test_progress_line_rewrites_itself_and_logs_go_above() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    line = cli.setup_logging("auto", None, out)
    assert line is not None
    rows = [JobProgress("gen-1", 250, 1000, "running", 12, 10, 200, 11, False)]
    line.show(cli.render_progress(rows, True))
    logging.getLogger("edge_agent.runner").warning("link lost")
    logging.getLogger("edge_agent.runner").info("not shown under the bar")
    line.show(cli.render_progress(rows, False))
    line.finish()
    text = out.getvalue()
    assert "\n" not in text.split("link lost")[0]  # nothing scrolled before the warning
    assert "online | gen-1 [####............] 250/1000  25% server@200 no-kv" in text
    assert "\r\x1b[K" in text and "not shown" not in text
    assert text.rstrip("\n").endswith("offline | gen-1 [####............] 250/1000  25% "
                                      "server@200 no-kv")  # fmt: skip


def test_status_table_formatting() -> None:
    rows = [
        {"job": "gen-1", "status": "running", "owner": "edge", "epoch": 1, "step": 500,
         "total_steps": 2000, "seq": 40, "acked_seq": 39, "acked_step": 480, "in_flight": 40,
         "bytes_sent": 12_345, "bytes_full": 2_000_000, "updated": "2026-01-01 00:00:00"},
        {"job": "broken", "error": "checksum mismatch"},
    ]  # fmt: skip
    text = cli.format_status(rows)
    head, gen, broken = text.splitlines()
    assert head.split()[:5] == ["JOB", "STATUS", "OWNER/EPOCH", "PROGRESS", "SEQ"]
    assert gen.split()[:9] == [
        "gen-1", "running", "edge/1", "500/2000", "25%", "40", "39", "(480)", "40",
    ]  # fmt: skip
    assert "12.3 kB" in gen and "2.0 MB" in gen and "99%" in gen
    assert broken.split()[:2] == ["broken", "UNREADABLE"]


def test_status_and_verify_on_an_empty_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["status", "--journal", str(tmp_path)]) == 0
    assert "no job journals" in capsys.readouterr().out
    assert cli.main(["verify", "--journal", str(tmp_path)]) == 0


# -- the edge install's boundary ------------------------------------------------------------

ALLOWED = {"numpy", "onnxruntime", "msgpack", "lz4", "paho-mqtt", "xxhash", "tomli"}
IMPORTABLE = {"numpy", "onnxruntime", "msgpack", "lz4", "paho", "xxhash", "tomli"}


def test_pyproject_base_dependencies_are_exactly_the_edge_install() -> None:
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip() for d in deps}
    assert names == ALLOWED


def test_edge_agent_imports_only_the_edge_install() -> None:
    """Statically: every import in edge_agent/ (except models.py, the build-time model
    builder, which needs onnx) is the standard library, edge_agent, or an allowed package.
    The integration tests prove it dynamically: the agent runs with torch & co. blocked."""
    bad = []
    for path in sorted((REPO / "edge_agent").rglob("*.py")):
        if path.name == "models.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                top = n.split(".")[0]
                if top not in sys.stdlib_module_names and top not in IMPORTABLE | {"edge_agent"}:
                    bad.append(f"{path.relative_to(REPO)}: {n}")
    assert bad == []


def test_the_import_blocker_blocks() -> None:
    import os
    import subprocess

    env = dict(os.environ, PYTHONPATH=f"{REPO / 'tests/support/blocker'}{os.pathsep}{REPO}")
    r = subprocess.run(
        [sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True
    )
    assert r.returncode != 0 and "torch is blocked" in r.stderr
    r = subprocess.run(
        [sys.executable, "-c", "import edge_agent.cli, edge_agent.runner, onnxruntime"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
