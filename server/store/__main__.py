"""``python -m server.store verify PATH``: check a whole store; exit 0 if it is sound.

Exit status: 0 no problems, 1 problems found (listed), 2 the store could not be opened.
``edge-server verify`` calls :func:`main`. This module only parses arguments and prints.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from edge_agent.errors import StoreError
from server.store import verify_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.store")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="re-read, re-hash and replay everything in a store")
    v.add_argument("path", help="the store folder (holding store.sqlite3 and blobs/)")
    args = parser.parse_args(argv)
    try:
        report = verify_path(args.path)
    except StoreError as exc:
        print(f"cannot verify {args.path}: {exc}", file=sys.stderr)
        return 2
    print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
