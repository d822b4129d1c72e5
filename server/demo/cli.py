"""The demo's command line (argparse): options in, report out, exit code.

Exit codes: 0 every check passed; 1 a check failed or a step could not be done (the
report or the message says which); 2 a usage error; 130 interrupted (Ctrl-C, SIGTERM).
This module only parses and prints; the sequence is :mod:`server.demo._run`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from edge_agent.errors import DemoError
from server.demo._brokers import BROKER_KINDS
from server.demo._run import DemoOptions, Interrupted, run_demo

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    d = DemoOptions()
    p = argparse.ArgumentParser(
        prog="python -m server.demo",
        description="Run a generate job on a simulated gateway, cut it off mid-job, resume it "
        "on the server and check that the result is exactly an uninterrupted run's.",
    )
    p.add_argument(
        "--workdir", type=Path, default=None,
        help="work folder (kept afterwards; an earlier demo's is cleared). Default: a "
        "temporary folder, removed afterwards unless the demo fails",
    )  # fmt: skip
    p.add_argument("--tokens", type=int, default=d.tokens, help=f"tokens to generate ({d.tokens})")
    p.add_argument(
        "--cut-at", type=float, default=d.cut_at,
        help=f"cut the device off at this fraction of the tokens ({d.cut_at})",
    )  # fmt: skip
    p.add_argument(
        "--step-seconds", type=float, default=d.step_seconds,
        help=f"the device's pacing per token, seconds ({d.step_seconds})",
    )  # fmt: skip
    p.add_argument(
        "--link-kbps", type=float, default=d.link_kbps,
        help=f"the device's uplink cap in kbit/s, 0 for none ({d.link_kbps:g})",
    )  # fmt: skip
    p.add_argument(
        "--broker", choices=BROKER_KINDS, default=d.broker,
        help="auto: Mosquitto if installed, else the embedded amqtt (MQTT 3.1.1)",
    )  # fmt: skip
    p.add_argument(
        "--keep-running", action="store_true",
        help="after the report, keep broker and server up (status page) until Ctrl-C",
    )  # fmt: skip
    p.add_argument("--report-json", type=Path, default=None, help="also write the report here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(highlight=False)
    if not console.is_terminal:  # a log or a pipe: wide enough for the report's table
        console = Console(highlight=False, width=110)
    options = DemoOptions(
        workdir=args.workdir,
        tokens=args.tokens,
        cut_at=args.cut_at,
        step_seconds=args.step_seconds,
        link_kbps=args.link_kbps,
        broker=args.broker,
        keep_running=args.keep_running,
        report_json=args.report_json,
    )
    try:
        options.check()
    except DemoError as exc:
        print(f"python -m server.demo: error: {exc}", file=sys.stderr)
        return 2
    try:
        report = run_demo(options, console)
    except Interrupted as exc:
        console.print(f"interrupted ({exc}); every process the demo started was stopped")
        return 130
    return 0 if report.ok else 1
