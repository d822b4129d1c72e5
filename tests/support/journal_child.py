"""A child process for the journal crash tests.

``python -m tests.support.journal_child ROOT JOB`` opens (or creates) the job's journal and
loops forever: a new local snapshot, sometimes a transfer, sometimes an acknowledgement.
It prints ``begin KIND SEQ`` before each journal call and ``done KIND SEQ`` after it has
returned, flushing each line, so that the parent that SIGKILLs it knows what was complete.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from edge_agent.codec import encode_delta
from edge_agent.journal import Journal
from edge_agent.state import state_hash


def state(seq: int) -> dict[str, Any]:
    """The job state with a given seq; sizes vary so that writes take different times."""
    n = 20_000 + (seq * 7919) % 60_000
    return {"seq": seq, "x": np.arange(n, dtype=np.float32) + np.float32(seq)}


def say(*words: object) -> None:
    sys.stdout.write(" ".join(str(w) for w in words) + "\n")
    sys.stdout.flush()


def main(root: str, job: str) -> None:
    j = Journal.open_or_create(root, job, device="dev-1")
    say("ready")
    while True:
        seq = j.next_seq
        say("begin snap", seq)
        j.write_snapshot(seq, seq * 10, encode_delta(None, state(seq), level="fast"))
        say("done snap", seq)
        t = j.transfer
        if t is None and seq % 3 == 0:
            acked = j.acked
            base = None if acked is None else state(acked.seq)
            payload = encode_delta(base, state(seq), level="small")
            say("begin xfer", seq)
            j.begin_transfer(
                seq, base_seq=None if acked is None else acked.seq, count=3, payload=payload
            )
            say("done xfer", seq)
        elif t is not None and seq % 2 == 0:
            h = state_hash(state(t.seq))
            say("begin ack", t.seq)
            if j.holds(t.seq, h):
                j.mark_acked(t.seq, h)
            else:
                full = encode_delta(None, state(t.seq), level="fast")
                j.mark_acked(t.seq, h, payload=full, step=t.seq * 10)
            say("done ack", t.seq)
        j.add_counters(loops=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
