"""An embedded MQTT 3.1.1 broker (amqtt) for the demo on a machine without Mosquitto.

    python -m server.demo._amqtt --port 18830 [--host 127.0.0.1]

Anonymous, in memory, one TCP listener; stops on SIGTERM or SIGINT. amqtt is in the
``dev`` extra. This module only runs the broker; it is not for production (use Mosquitto
or a broker cluster: deploy/README.md, docs/emqx.md).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Sequence

__all__ = ["READY_LINE", "main", "serve"]

READY_LINE = "amqtt broker ready"  # logged once it listens (server.demo waits for it)
SHUTDOWN_TIMEOUT = 3.0  # seconds amqtt gets to close its sessions on SIGTERM


async def serve(host: str, port: int) -> None:
    """Run the broker until SIGTERM or SIGINT."""
    from amqtt.broker import Broker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    logging.getLogger("server.demo.amqtt").warning("%s on %s:%d", READY_LINE, host, port)
    await stop.wait()
    try:
        # amqtt's shutdown can wait on a client that is still connected: bound it
        await asyncio.wait_for(broker.shutdown(), SHUTDOWN_TIMEOUT)
    except Exception as exc:  # a timeout or amqtt's own error: exiting anyway
        logging.getLogger("server.demo.amqtt").warning("amqtt shutdown cut short: %r", exc)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server.demo._amqtt")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
