"""edge-resume's demo: the whole promise on one machine in about half a minute.

    python -m server.demo [--tokens 1200] [--broker auto|mosquitto|amqtt] [--workdir DIR]
                          [--keep-running] [--report-json FILE]

(``scripts/demo`` sets up ``.venv`` first and runs this.) It builds the tiny models, starts
an MQTT broker (Mosquitto with the project's settings when installed, otherwise an embedded
amqtt), ``edge-server serve`` with its embedded defaults (SQLite store, ingest, resume
worker, HTTP API) and ``edge-agent run`` on a ``generate`` job of the tiny decoder, paced
and behind a capped uplink; SIGKILLs the agent mid-job (a power cut); waits for the server
to see the device offline; resumes the job on the server through the HTTP API; compares
the outputs with an uninterrupted run computed in this process; restarts the agent to show
that it learns the server owns the job and stops; and prints a report. Every process it
started is stopped on the way out, on success, failure, Ctrl-C or SIGTERM; exit code 0
only when every check passed. docs/demo.md shows a run.

Python API: :func:`run_demo` (``DemoOptions`` in, ``DemoReport`` out), :func:`main`.

This package drives real processes through their public interfaces (command lines, the
HTTP API, the agent's journal read-only). It must never hold product logic of its own: what
it shows is what an operator would get.
"""

from server.demo._run import DemoOptions, DemoReport, Interrupted, run_demo
from server.demo.cli import main

__all__ = ["DemoOptions", "DemoReport", "Interrupted", "main", "run_demo"]
