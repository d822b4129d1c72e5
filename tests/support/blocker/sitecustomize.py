"""Put this folder first on PYTHONPATH to run a process as a gateway would: without the
server's dependencies. Importing torch, fastapi, typer, rich, click, uvicorn, starlette,
pydantic or onnx (a build-time tool) raises ImportError, and every attempt is appended to the
file named by ``EDGE_TEST_BLOCKED_LOG`` (so that an attempt some library swallowed still
shows)."""

from __future__ import annotations

import os
import sys

BLOCKED = frozenset(
    {"torch", "fastapi", "typer", "rich", "click", "uvicorn", "starlette", "pydantic", "onnx"}
)


class _Blocker:
    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name.partition(".")[0] in BLOCKED:
            log = os.environ.get("EDGE_TEST_BLOCKED_LOG")
            if log:
                with open(log, "a") as fh:
                    fh.write(name + "\n")
            raise ImportError(f"{name} is blocked: the edge install does not have it")
        return None


sys.meta_path.insert(0, _Blocker())  # type: ignore[arg-type]
