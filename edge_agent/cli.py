"""``edge-agent``: the command line of the edge agent (argparse: the edge install carries no
CLI framework).

    edge-agent run JOB.toml [JOB.toml ...] --device ID --broker mqtt://host:1883 [options]
    edge-agent status [--journal DIR] [--json]
    edge-agent verify [--journal DIR] [--deep] [--job ID]

Every option of ``run`` can also come from an environment variable (``EDGE_AGENT_`` and
the option's name in capitals, e.g. ``EDGE_AGENT_MAX_KBPS``) or from the ``[agent]`` table
of a config file (``--config agent.toml``, key ``max_kbps``). The command line wins over
the environment, which wins over the config file. docs/agent.md lists them all.

On a terminal ``run`` shows one progress line, rewritten in place (and warnings above it);
otherwise it writes structured logs, one JSON object per line, to stderr.

This module owns argument parsing, configuration, logging set-up and output formatting; the
agent itself is :mod:`edge_agent.runner`. It imports nothing outside the edge install.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from edge_agent.errors import ConfigError, EdgeResumeError
from edge_agent.journal import Journal, list_jobs, verify_journal
from edge_agent.protocol import DEFAULT_MAX_MESSAGE, DEFAULT_PREFIX, TopicNamespace

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = ["OPTIONS", "ConfigError", "Option", "main", "resolve_options"]

ENV_PREFIX = "EDGE_AGENT_"
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


# ---------------------------------------------------------------------------------------------
# Options: one table drives argparse, the environment and the config file.


def _positive_float(v: str) -> float:
    x = float(v)
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{v!r} is not a number > 0")
    return x


def _nonneg_float(v: str) -> float:
    x = float(v)
    if not (math.isfinite(x) and x >= 0):
        raise ValueError(f"{v!r} is not a number >= 0")
    return x


def _positive_int(v: str) -> int:
    x = int(v)
    if x < 1:
        raise ValueError(f"{v!r} is not an integer >= 1")
    return x


def _fraction(v: str) -> float:
    x = float(v)
    if not 0 < x <= 1:
        raise ValueError(f"{v!r} is not in (0, 1]")
    return x


def _boolean(v: str) -> bool:
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{v!r} is not a boolean (true/false)")


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(v: str) -> str:
        if v not in choices:
            raise ValueError(f"{v!r} is not one of {', '.join(choices)}")
        return v

    parse.choices = choices  # type: ignore[attr-defined]
    return parse


@dataclass(frozen=True)
class Option:
    """One setting: its name (config key; ``EDGE_AGENT_<NAME>``; ``--name-with-dashes``),
    how a string becomes its value, its default and its help."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    metavar: str | None = None
    commands: tuple[str, ...] = ("run",)
    flag: bool = False  # a switch on the command line (true when given)

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def cli(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option("device", str, None, "this gateway's device id (also the MQTT client id)", "ID"),
    Option("broker", str, None, "mqtt://host[:1883] or mqtts://host[:8883] (TLS)", "URL"),
    Option("username", str, None, "MQTT user name", "NAME"),
    Option("password", str, None, "MQTT password (prefer --password-file)", "SECRET"),
    Option("password_file", str, None, "read the MQTT password from this file", "PATH"),
    Option(
        "ca_file", str, None, "CA certificates to verify the broker (default: the system's)", "PATH"
    ),
    Option("cert_file", str, None, "client certificate (mutual TLS)", "PATH"),
    Option("key_file", str, None, "the client certificate's private key", "PATH"),
    Option(
        "tls_insecure",
        _boolean,
        False,
        "do not verify the broker's certificate (labs only)",
        flag=True,
    ),
    Option(
        "journal",
        str,
        "journal",
        "the journal folder (one sub-folder per job)",
        "DIR",
        commands=("run", "status", "verify"),
    ),
    Option("prefix", str, DEFAULT_PREFIX, "MQTT topic prefix", "PREFIX"),
    Option("max_kbps", _positive_float, None, "uplink bandwidth cap, kbit/s", "KBPS"),
    Option(
        "max_message",
        _positive_int,
        DEFAULT_MAX_MESSAGE,
        "largest MQTT payload sent, bytes (AWS IoT Core: 128 KB)",
        "BYTES",
    ),
    Option("heartbeat", _positive_float, 10.0, "seconds between heartbeats", "SECONDS"),
    Option(
        "log_format",
        _choice("auto", "json", "text"),
        "auto",
        "auto: a progress line on a terminal, JSON lines otherwise",
        "FORMAT",
    ),
    Option(
        "log_level",
        _choice("debug", "info", "warning", "error"),
        None,
        "default: info (warning under the progress line)",
        "LEVEL",
    ),
    Option(
        "codec_level", str, None, "codec level passed to encode_delta (e.g. fast, small)", "LEVEL"
    ),
    Option(
        "protocol",
        _choice("auto", "5", "3.1.1"),
        "auto",
        "MQTT version (auto: 5, falling back to 3.1.1)",
        "VERSION",
    ),
    Option("keepalive", _positive_int, 30, "MQTT keep-alive, seconds", "SECONDS"),
    Option(
        "reconnect_max",
        _positive_float,
        60.0,
        "longest wait between reconnect attempts, seconds",
        "SECONDS",
    ),
    Option(
        "reply_timeout",
        _positive_float,
        10.0,
        "shortest wait for a reply from the server before asking again, seconds",
        "SECONDS",
    ),
    Option(
        "shutdown_grace",
        _nonneg_float,
        10.0,
        "on SIGTERM, how long to wait for the final snapshot's acknowledgement, seconds",
        "SECONDS",
    ),
    Option(
        "completion_timeout",
        _nonneg_float,
        300.0,
        "when every job is done, how long to wait for the server to confirm, seconds",
        "SECONDS",
    ),
    Option(
        "outputs",
        str,
        None,
        "write <job id>.npz with each job's outputs here when it finishes",
        "DIR",
    ),
    Option(
        "kv_utilization",
        _fraction,
        0.5,
        "share of the link that kv = auto lets snapshots use",
        "FRACTION",
    ),
)
_BY_NAME = {o.name: o for o in OPTIONS}


def _read_config(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML: {exc}") from exc
    extra = set(doc) - {"agent"}
    if extra:
        raise ConfigError(
            f"config file {path}: unknown table or key {sorted(extra)[0]!r}",
            hint="settings go in an [agent] table",
        )
    table = doc.get("agent", {})
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [agent] must be a table")
    for key in table:
        if key not in _BY_NAME:
            raise ConfigError(
                f"config file {path}: [agent] {key!r} is not a known setting",
                hint=f"known: {', '.join(sorted(_BY_NAME))}",
            )
    return table


def _coerce(opt: Option, value: Any, where: str) -> Any:
    """A value from the environment (a string) or the config file (a TOML value)."""
    try:
        if opt.parse is str:
            if not isinstance(value, str):
                raise ValueError(f"{value!r} is not a string")
            return value
        if isinstance(value, bool):
            if opt.parse is _boolean:
                return value
            raise ValueError(f"{value!r} is not a {opt.metavar or 'value'}")
        if not isinstance(value, (str, int, float)):
            raise ValueError(f"{value!r} is not a {opt.metavar or 'value'}")
        return opt.parse(str(value))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def resolve_options(
    command: str,
    cli: Mapping[str, Any],
    env: Mapping[str, str],
    config_path: str | None = None,
) -> dict[str, Any]:
    """Every option of ``command``: from the command line (``cli``: values given, None for
    not given), else the environment, else the config file, else the default."""
    config = _read_config(config_path) if config_path else {}
    out: dict[str, Any] = {}
    for opt in OPTIONS:
        if command not in opt.commands:
            continue
        if cli.get(opt.name) is not None:
            out[opt.name] = cli[opt.name]
        elif opt.env in env:
            out[opt.name] = _coerce(opt, env[opt.env], f"environment variable {opt.env}")
        elif opt.name in config:
            out[opt.name] = _coerce(
                opt, config[opt.name], f"config file {config_path}: [agent] {opt.name}"
            )
        else:
            out[opt.name] = opt.default
    return out


# ---------------------------------------------------------------------------------------------
# The parser.


def _argtype(opt: Option) -> Callable[[str], Any]:
    def parse(v: str) -> Any:
        try:
            return opt.parse(v)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = opt.name
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-agent",
        description="Run long ONNX inference jobs on a gateway and keep the server's copy of "
        "their state current over a slow, flaky link.",
        epilog="Options also come from EDGE_AGENT_<NAME> environment variables and from the "
        "[agent] table of --config; see docs/agent.md.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cmds = {
        "run": sub.add_parser(
            "run", help="run jobs", description="Run jobs (until they finish or SIGTERM)."
        ),
        "status": sub.add_parser("status", help="show each job's progress from its journal"),
        "verify": sub.add_parser("verify", help="check the journal's integrity (exit 1 if not)"),
    }
    cmds["run"].add_argument("jobs", nargs="+", metavar="JOB.toml", help="job files")
    for name, cp in cmds.items():
        cp.add_argument(
            "--config",
            metavar="PATH",
            default=None,
            help="config file with an [agent] table (env EDGE_AGENT_CONFIG)",
        )
        for opt in OPTIONS:
            if name not in opt.commands:
                continue
            help_ = f"{opt.help} (env {opt.env}" + (
                f"; default {opt.default})" if opt.default is not None else ")"
            )
            if opt.flag:
                cp.add_argument(
                    opt.cli,
                    dest=opt.name,
                    action="store_const",
                    const=True,
                    default=None,
                    help=help_,
                )
            else:
                choices = getattr(opt.parse, "choices", None)
                cp.add_argument(
                    opt.cli,
                    dest=opt.name,
                    type=_argtype(opt),
                    default=None,
                    metavar=opt.metavar,
                    choices=choices,
                    help=help_,
                )
    cmds["status"].add_argument("--json", action="store_true", help="one JSON object per job")
    cmds["verify"].add_argument(
        "--deep", action="store_true", help="also decode every snapshot and re-hash its state"
    )
    cmds["verify"].add_argument("--job", metavar="ID", default=None, help="only this job")
    return p


# ---------------------------------------------------------------------------------------------
# Logging and the progress line.


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, event, msg and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", None) or "log",
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for k, v in fields.items():
                doc.setdefault(k, v)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, separators=(",", ":"))


class ProgressLine:
    """A single status line rewritten in place on a terminal (stdlib only); log records are
    printed above it."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._line = ""

    def _clear(self) -> None:
        if self._line:
            self.stream.write("\r\x1b[K")

    def show(self, text: str) -> None:
        width = max(20, shutil.get_terminal_size((100, 20)).columns - 1)
        text = text[:width]
        self._clear()
        self.stream.write(text)
        self.stream.flush()
        self._line = text

    def write_above(self, text: str) -> None:
        self._clear()
        self.stream.write(text + "\n")
        if self._line:
            self.stream.write(self._line)
        self.stream.flush()

    def finish(self) -> None:
        if self._line:
            self.stream.write("\n")
            self.stream.flush()
            self._line = ""


class _AboveProgress(logging.Handler):
    def __init__(self, line: ProgressLine) -> None:
        super().__init__()
        self.line = line

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.line.write_above(self.format(record))
        except Exception:  # a logging handler must not raise
            self.handleError(record)


def _bar(done: int, total: int, width: int = 16) -> str:
    frac = 0.0 if total <= 0 else min(1.0, done / total)
    full = int(frac * width)
    return "#" * full + "." * (width - full)


def render_progress(rows: Sequence[Any], connected: bool) -> str:
    """The progress line: link state, then per job a bar, step/total, seq and acked step."""
    parts = ["online" if connected else "offline"]
    for r in rows:
        pct = 100.0 * r.step / r.total if r.total else 0.0
        acked = "-" if r.acked_step is None else str(r.acked_step)
        kv = "" if r.kv is None else (" kv" if r.kv else " no-kv")
        state = "" if r.phase == "running" else f" {r.phase}"
        parts.append(
            f"{r.job} [{_bar(r.step, r.total)}] {r.step}/{r.total} {pct:3.0f}% "
            f"server@{acked}{kv}{state}"
        )
    return " | ".join(parts)


def setup_logging(fmt: str, level: str | None, stream: TextIO) -> ProgressLine | None:
    """Logging to ``stream``: JSON lines, plain text, or text above a progress line
    (``auto`` on a terminal). Returns the progress line when there is one."""
    if fmt == "auto":
        fmt = "progress" if stream.isatty() else "json"
    root = logging.getLogger("edge_agent")
    for h in list(root.handlers):
        root.removeHandler(h)
    root.propagate = False
    line: ProgressLine | None = None
    handler: logging.Handler
    if fmt == "json":
        handler = logging.StreamHandler(stream)
        handler.setFormatter(JsonFormatter())
    elif fmt == "progress":
        line = ProgressLine(stream)
        handler = _AboveProgress(line)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    else:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root.addHandler(handler)
    default = "warning" if line is not None else "info"
    root.setLevel((level or default).upper())
    return line


# ---------------------------------------------------------------------------------------------
# Commands.


def _fail(message: str) -> int:
    sys.stderr.write(f"edge-agent: error: {message}\n")
    return EXIT_USAGE


def _options_for_run(o: Mapping[str, Any]) -> Any:
    from edge_agent.runner import AgentOptions
    from edge_agent.transport import TLSOptions, parse_broker_url

    for key in ("device", "broker"):
        if not o.get(key):
            opt = _BY_NAME[key]
            raise ConfigError(f"{opt.cli} is required (or {opt.env}, or [agent] {key})")
    url = parse_broker_url(o["broker"])
    password = o["password"]
    if o["password_file"]:
        if password:
            raise ConfigError("give --password or --password-file, not both")
        try:
            password = Path(o["password_file"]).read_text().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"cannot read the password file: {exc.strerror or exc}") from exc
    tls_given = any(o[k] for k in ("ca_file", "cert_file", "key_file", "tls_insecure"))
    if tls_given and not url.tls:
        raise ConfigError("TLS options need an mqtts:// broker URL")
    tls = None
    if url.tls:
        tls = TLSOptions(
            ca_file=o["ca_file"],
            cert_file=o["cert_file"],
            key_file=o["key_file"],
            insecure=bool(o["tls_insecure"]),
        )
    TopicNamespace(o["prefix"])  # validates the prefix
    return AgentOptions(
        device=o["device"],
        broker=o["broker"],
        journal_dir=Path(o["journal"]),
        username=o["username"],
        password=password,
        tls=tls,
        prefix=o["prefix"],
        max_kbps=o["max_kbps"],
        max_message=o["max_message"],
        heartbeat_interval=o["heartbeat"],
        codec_level=o["codec_level"],
        protocol=o["protocol"],
        keepalive=o["keepalive"],
        reconnect_max=o["reconnect_max"],
        reply_timeout=o["reply_timeout"],
        shutdown_grace=o["shutdown_grace"],
        completion_timeout=o["completion_timeout"],
        outputs_dir=Path(o["outputs"]) if o["outputs"] else None,
        kv_utilization=o["kv_utilization"],
    )


def cmd_run(args: argparse.Namespace, o: Mapping[str, Any]) -> int:
    from edge_agent.jobs import JobSpec
    from edge_agent.runner import Agent

    try:
        options = _options_for_run(o)
        specs = [JobSpec.load(p) for p in args.jobs]
    except EdgeResumeError as exc:
        return _fail(str(exc))
    line = setup_logging(o["log_format"], o["log_level"], sys.stderr)

    def show(rows: list[Any], connected: bool) -> None:
        if line is not None:
            line.show(render_progress(rows, connected))

    try:
        agent = Agent(specs, options, on_progress=show if line is not None else None)
    except EdgeResumeError as exc:
        return _fail(str(exc))

    def on_signal(signum: int, frame: object) -> None:
        agent.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return agent.run()
    finally:
        if line is not None:
            line.finish()


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def job_status(root: str, job: str) -> dict[str, Any]:
    """One job's status from its journal (read-only)."""
    with Journal.open(root, job, readonly=True) as j:
        m = j.meta
        c = j.counters
        local = m.local
        acked = m.acked
        total = m.info.get("total_steps")
        return {
            "job": m.job,
            "device": m.device,
            "status": m.status,
            "owner": m.owner,
            "epoch": m.epoch,
            "step": None if local is None else local.step,
            "total_steps": total if isinstance(total, int) else None,
            "seq": m.next_seq - 1,
            "acked_seq": m.acked_seq,
            "acked_step": None if acked is None else acked.step,
            "in_flight": None if m.transfer is None else m.transfer.seq,
            "bytes_sent": c.get("bytes_sent", 0),
            "bytes_full": c.get("bytes_full", 0),
            "snapshots_sent": c.get("snapshots_sent", 0),
            "snapshots_acked": c.get("snapshots_acked", 0),
            "updated": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.updated_ms / 1000)),
        }


def format_status(rows: Sequence[Mapping[str, Any]]) -> str:
    """A readable table, one line per job."""
    head = [
        "JOB",
        "STATUS",
        "OWNER/EPOCH",
        "PROGRESS",
        "SEQ",
        "ACKED (STEP)",
        "IN FLIGHT",
        "SENT",
        "FULL",
        "SAVED",
        "UPDATED",
    ]
    table = [head]
    for r in rows:
        if "error" in r:
            table.append([r["job"], "UNREADABLE", r["error"]] + [""] * (len(head) - 3))
            continue
        step, total = r["step"], r["total_steps"]
        if step is None:
            prog = "-"
        elif total:
            prog = f"{step}/{total} {100 * step / total:.0f}%"
        else:
            prog = str(step)
        acked = "-" if r["acked_seq"] is None else f"{r['acked_seq']} ({r['acked_step']})"
        saved = "-"
        if r["bytes_full"]:  # (a delta may cost a few bytes more than the state whole)
            saved = f"{max(0.0, 100 * (1 - r['bytes_sent'] / r['bytes_full'])):.0f}%"
        table.append(
            [
                r["job"],
                r["status"],
                f"{r['owner']}/{r['epoch']}",
                prog,
                str(r["seq"]),
                acked,
                "-" if r["in_flight"] is None else str(r["in_flight"]),
                _size(r["bytes_sent"]),
                _size(r["bytes_full"]),
                saved,
                r["updated"],
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table
    )


def cmd_status(args: argparse.Namespace, o: Mapping[str, Any]) -> int:
    root = o["journal"]
    jobs = list_jobs(root)
    rows: list[dict[str, Any]] = []
    for job in jobs:
        try:
            rows.append(job_status(root, job))
        except EdgeResumeError as exc:
            rows.append({"job": job, "error": str(exc)})
    if args.json:
        for r in rows:
            print(json.dumps(r, default=str))
    elif not rows:
        print(f"no job journals in {root}")
    else:
        print(format_status(rows))
    return EXIT_ERROR if any("error" in r for r in rows) else EXIT_OK


def cmd_verify(args: argparse.Namespace, o: Mapping[str, Any]) -> int:
    root = o["journal"]
    if args.job is None and not list_jobs(root):
        print(f"no job journals in {root}")
        return EXIT_OK
    reports = verify_journal(root, args.job, deep=args.deep)
    bad = 0
    for rep in reports:
        if rep.ok:
            print(
                f"OK       {rep.job}: {len(rep.checked)} files, {rep.bytes_on_disk} bytes "
                f"(local {rep.local_seq}, acked {rep.acked_seq}, in flight "
                f"{rep.transfer_seq})"
            )
        else:
            bad += 1
            print(f"PROBLEM  {rep.job}: {rep.path}")
            for p in rep.problems:
                print(f"         {p}")
        for u in rep.unreferenced:
            print(f"         note: unreferenced file {u} (removed on the next start)")
    print(f"{len(reports) - bad} of {len(reports)} journals OK" + (" (deep)" if args.deep else ""))
    return EXIT_ERROR if bad else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli = {o.name: getattr(args, o.name, None) for o in OPTIONS}
    config = args.config or os.environ.get(ENV_PREFIX + "CONFIG")
    try:
        o = resolve_options(args.command, cli, os.environ, config)
    except EdgeResumeError as exc:
        return _fail(str(exc))
    if args.command == "run":
        return cmd_run(args, o)
    if args.command == "status":
        return cmd_status(args, o)
    return cmd_verify(args, o)


if __name__ == "__main__":
    sys.exit(main())
