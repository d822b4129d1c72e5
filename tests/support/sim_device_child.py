"""A simulated device in its own process, to be SIGKILLed (its MQTT will then fires).

``python -m tests.support.sim_device_child BROKER_URL DEVICE JOB`` connects with the
device's real will, births JOB, gets two snapshots acknowledged, prints ``ready`` and waits
to be killed (answering what arrives meanwhile).
"""

from __future__ import annotations

import sys

from tests.support.sim_device import SimDevice


def main(url: str, device: str, job: str) -> None:
    dev = SimDevice(url, device).start()
    j = dev.add_job(job, total_steps=100)
    dev.run_to_acked(j, 2)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    dev.pump(lambda: False, timeout=600)


if __name__ == "__main__":
    main(*sys.argv[1:4])
