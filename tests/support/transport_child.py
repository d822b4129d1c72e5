"""A child process for the transport tests: an agent-like client that is SIGKILLed.

``python -m tests.support.transport_child BROKER_URL CLIENT_ID STATUS_TOPIC`` connects with a
retained ``offline`` will on STATUS_TOPIC, publishes a retained ``online`` there, prints
``ready`` once the broker has it, and then waits to be killed.
"""

from __future__ import annotations

import sys
import time

from edge_agent.transport import Transport, TransportConfig, Will


def main(url: str, client_id: str, status_topic: str) -> None:
    config = TransportConfig(
        broker=url, client_id=client_id, will=Will(status_topic, b"offline", qos=1, retain=True)
    )
    t = Transport(config).start()
    t.wait_connected(10)
    t.publish(status_topic, b"online", retain=True).result(10)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    time.sleep(600)


if __name__ == "__main__":
    main(*sys.argv[1:4])
