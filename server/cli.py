"""``edge-server``: the server's command line (typer + rich).

    edge-server serve [--config server.toml] [--roles ingest,worker,api]
    edge-server verify STORE
    edge-server jobs [--status S] [--device D]            # through the HTTP API
    edge-server devices
    edge-server resume JOB [--wait] [--timeout S]
    edge-server handover JOB [--wait]

``jobs``, ``devices``, ``resume`` and ``handover`` talk to a running server's HTTP API with
its bearer token (``--url``/``--token``/``--token-file``, else ``[api]`` from ``--config``
and ``EDGE_SERVER_API_*``); ``jobs --store PATH`` reads a store directly instead.
``python -m server.cli`` is the same program.

Exit status: 0 success; 1 the thing asked about failed (a store with problems, a resume
that failed, a job that is not resumable); 2 usage, configuration or connection errors.

This module only parses arguments, calls the library and prints. It holds no server logic.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from edge_agent.errors import ConfigError, EdgeResumeError, StoreError
from server.config import ServerConfig, load_config, parse_roles

__all__ = ["app", "main"]

app = typer.Typer(
    name="edge-server",
    help="edge-resume server: MQTT ingest, resume worker and HTTP API.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="server.toml")]
UrlOpt = Annotated[
    str | None, typer.Option("--url", help="the API's base URL (default from the config)")
]
TokenOpt = Annotated[str | None, typer.Option("--token", help="the API bearer token")]
TokenFileOpt = Annotated[
    Path | None, typer.Option("--token-file", help="a file holding the API token")
]
WaitOpt = Annotated[bool, typer.Option("--wait", help="wait until the job completes")]
TimeoutOpt = Annotated[float, typer.Option(help="seconds to --wait at most")]
JobArg = Annotated[str, typer.Argument(help="the job id")]


def _fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def _config(path: Path | None, overrides: dict[str, Any] | None = None) -> ServerConfig:
    try:
        return load_config(path, overrides=overrides)
    except ConfigError as exc:
        _fail(str(exc))


# ---------------------------------------------------------------------------------------------
# serve


@app.command()
def serve(
    config: ConfigOpt = None,
    roles: Annotated[
        str, typer.Option("--roles", help="comma-separated: ingest, worker, api")
    ] = "ingest,worker,api",
    broker: Annotated[
        str | None, typer.Option(help="broker URL (mqtt://host:port, mqtts://host:port)")
    ] = None,
    store: Annotated[Path | None, typer.Option(help="store folder")] = None,
    api_host: Annotated[str | None, typer.Option(help="API listen address")] = None,
    api_port: Annotated[int | None, typer.Option(help="API port")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Run the server (all roles in one process by default) until SIGTERM or Ctrl-C."""
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    overrides = {
        "broker.url": broker,
        "store.path": str(store) if store is not None else None,
        "api.host": api_host,
        "api.port": api_port,
    }
    cfg = _config(config, overrides)
    from server.serve import Server

    try:
        srv = Server(cfg, parse_roles(roles))
        srv.run()
    except EdgeResumeError as exc:
        _fail(str(exc), 2 if isinstance(exc, ConfigError) else 1)


# ---------------------------------------------------------------------------------------------
# verify


@app.command()
def verify(store: Annotated[Path, typer.Argument(help="the store folder")]) -> None:
    """Re-read, re-hash and replay everything in a store (0: sound, 1: problems, 2: unreadable)."""
    from server.store import verify_path

    try:
        report = verify_path(str(store))
    except StoreError as exc:
        _fail(f"cannot verify {store}: {exc}")
    out.print(str(report), markup=False)
    raise typer.Exit(0 if report.ok else 1)


# ---------------------------------------------------------------------------------------------
# the API client


class _Client:
    def __init__(self, url: str, token: str | None, timeout: float = 30.0) -> None:
        import httpx

        if not token:
            _fail(
                "no API token: give --token / --token-file, or set [api] token / token_file "
                "(EDGE_SERVER_API_TOKEN / EDGE_SERVER_API_TOKEN_FILE)"
            )
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout
        )

    def request(
        self, method: str, path: str, *, ok: tuple[int, ...] = (200,), json: Any = None
    ) -> tuple[int, Any]:
        """(status, JSON body) of a successful call; prints the error and exits otherwise
        (1 for a 409 Conflict, 2 for everything else)."""
        import httpx

        try:
            r = self._http.request(method, path, json=json)
        except httpx.HTTPError as exc:
            _fail(f"cannot reach the API at {self.url}: {exc}")
        if r.status_code in ok:
            return r.status_code, r.json()
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        if r.status_code == 401:
            _fail(f"the API refused the token (401): {detail}")
        _fail(f"{method} {path}: {r.status_code} {detail}", 1 if r.status_code == 409 else 2)

    def call(self, method: str, path: str, *, ok: tuple[int, ...] = (200,)) -> Any:
        return self.request(method, path, ok=ok)[1]

    def __enter__(self) -> _Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()


def _client(
    config: Path | None, url: str | None, token: str | None, token_file: Path | None
) -> _Client:
    cfg = _config(
        config,
        {
            "api.url": url,
            "api.token": token,
            "api.token_file": str(token_file) if token_file else None,
        },
    )
    try:
        tok = cfg.api_token()
    except ConfigError as exc:
        _fail(str(exc))
    return _Client(cfg.api_url(), tok)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _size(n: int) -> str:
    f = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if f < 1000 or unit == "GB":
            return f"{f:.0f} {unit}" if unit == "B" else f"{f:.1f} {unit}"
        f /= 1000
    return str(n)  # pragma: no cover


def _jobs_table(jobs: list[dict[str, Any]]) -> Table:
    t = Table(title=f"{len(jobs)} job{'s' if len(jobs) != 1 else ''}")
    for col in ("job", "device", "kind", "status", "progress", "seq", "owner", "epoch",
                "received / full", "last snapshot", "resume"):  # fmt: skip
        t.add_column(col, no_wrap=col in ("job", "device", "status"))
    for j in jobs:
        p = j["progress"]
        total = p.get("total_steps")
        prog = f"{p['step']}/{total}" if total else str(p["step"])
        if p.get("fraction") is not None:
            prog += f" ({100 * p['fraction']:.0f}%)"
        resume = j.get("resume")
        t.add_row(
            j["job"],
            j["device"],
            j.get("kind") or "-",
            j["status"],
            prog,
            "-" if j["seq"] is None else str(j["seq"]),
            j["owner"],
            str(j["epoch"]),
            f"{_size(j['bytes_received'])} / {_size(j['full_size'])}",
            _age(j.get("last_snapshot_age_s")),
            f"{resume['phase']} #{resume['attempt']}" if resume else "-",
        )
    return t


@app.command()
def jobs(
    config: ConfigOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
    status: Annotated[str | None, typer.Option(help="only jobs in this status")] = None,
    device: Annotated[str | None, typer.Option(help="only this device's jobs")] = None,
    store: Annotated[Path | None, typer.Option(help="read this store directly (no API)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON, not a table")] = False,
) -> None:
    """List jobs: status, progress, seq, owner, epoch, bytes, last snapshot, resume."""
    if store is not None:
        rows = _jobs_from_store(store, status, device)
    else:
        query = "&".join(f"{k}={v}" for k, v in (("status", status), ("device", device)) if v)
        with _client(config, url, token, token_file) as client:
            rows = client.call("GET", "/v1/jobs" + (f"?{query}" if query else ""))
    if as_json:
        import json

        out.print_json(json.dumps(rows))
    else:
        out.print(_jobs_table(rows))


def _jobs_from_store(path: Path, status: str | None, device: str | None) -> list[dict[str, Any]]:
    from server.api import _job_model
    from server.store import SQLiteStore

    try:
        with SQLiteStore(path, create=False) as s:
            now = time.time()
            rows = []
            for r in s.list_jobs(device):
                if status is None or r.status == status:
                    chain = s.chain(r.job) if r.seq is not None else []
                    row = _job_model(r, now, chain[-1] if chain else None, None, None)
                    row["resume"] = None
                    rows.append(row)
            return rows
    except StoreError as exc:
        _fail(f"cannot read {path}: {exc}")


@app.command()
def devices(
    config: ConfigOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
) -> None:
    """List devices: online, since when, last seen, jobs."""
    with _client(config, url, token, token_file) as client:
        rows = client.call("GET", "/v1/devices")
    t = Table(title=f"{len(rows)} device{'s' if len(rows) != 1 else ''}")
    for col in ("device", "online", "since", "last seen", "jobs"):
        t.add_column(col)
    now = time.time()
    for d in rows:
        t.add_row(
            d["device"],
            "yes" if d["online"] else "no",
            _age(now - d["online_since"]) + " ago",
            _age(now - d["last_seen"]) + " ago",
            ", ".join(d["jobs"]) or "-",
        )
    out.print(t)


def _wait(client: _Client, job: str, timeout: float) -> int:
    """Poll the job until it completes (0) or its resume fails (1); 2 on timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        j = client.call("GET", f"/v1/jobs/{job}")
        r = j.get("resume") or {}
        shown = (j["status"], r.get("phase"), j["progress"]["step"])
        if shown != last:
            out.print(
                f"{job}: status {j['status']}, resume {r.get('phase', '-')}, "
                f"step {j['progress']['step']}/{j['progress']['total_steps'] or '?'}"
            )
            last = shown
        if j["status"] == "completed":
            return 0
        if r.get("phase") == "failed" or (j["status"] == "failed" and not r):
            err.print(f"[red]resume failed:[/] {r.get('error') or j['status']}")
            return 1
        if time.monotonic() > deadline:
            err.print(f"[yellow]still not completed after {timeout:g}s[/]")
            return 2
        time.sleep(1.0)


@app.command()
def resume(
    job: JobArg,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 3600.0,
    reason: Annotated[str, typer.Option(help="recorded with the claim")] = "cli",
    config: ConfigOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
) -> None:
    """Resume a job on the server (idempotent: returns a resume already under way)."""
    with _client(config, url, token, token_file) as client:
        code, s = client.request(
            "POST", f"/v1/jobs/{job}/resume", ok=(200, 202), json={"reason": reason}
        )
        verb = "resuming" if code == 202 else "already resuming"
        out.print(f"{job}: {verb} (attempt {s['attempt']}, phase {s['phase']}, epoch {s['epoch']})")
        status = _wait(client, job, timeout) if wait else 0
    raise typer.Exit(status)


@app.command()
def handover(
    job: JobArg,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 3600.0,
    config: ConfigOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
) -> None:
    """Live hand-over of an online device's job to the server."""
    with _client(config, url, token, token_file) as client:
        s = client.call("POST", f"/v1/jobs/{job}/handover", ok=(200, 202))
        out.print(f"{job}: hand-over requested (attempt {s['attempt']}, phase {s['phase']})")
        status = _wait(client, job, timeout) if wait else 0
    raise typer.Exit(status)


def main() -> None:
    app(prog_name="edge-server")


if __name__ == "__main__":
    main()
