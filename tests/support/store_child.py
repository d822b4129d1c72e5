"""A process that commits (and compacts) snapshots until it is killed.

    python -m tests.support.store_child STORE {ingest|compact} SIZE

It opens the store, continues the job from its acknowledged seq, prints ``ready SEQ``, then
forever commits the next snapshot and prints its seq once ``commit_snapshot`` has returned
(the "acked" set: the server would ack exactly then). In ``compact`` mode it also compacts
after every commit (with a policy that makes it due every third commit) and runs retention
every fifth, between lines ``c`` and ``C``. The test SIGKILLs it at a random moment.
"""

from __future__ import annotations

import sys

from server.store import CompactionPolicy, RetentionPolicy, SQLiteStore
from tests.support.store_states import DEVICE, JOB, snapshot_for


def main() -> None:
    path, mode, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = SQLiteStore(
        path,
        compaction=CompactionPolicy(delta_ratio=1e9, max_deltas=2),
        retention=RetentionPolicy(keep_baselines=2, orphan_grace_s=0.0),
    )
    store.record_birth(DEVICE, JOB, spec={"kind": "test"}, model_hash="m0", codec_version=0)
    job = store.get_job(JOB)
    assert job is not None
    seq = job.seq or 0  # seq 1 is a full snapshot (store_states.is_full)
    out = sys.stdout
    out.write(f"ready {seq}\n")
    out.flush()
    while True:
        seq += 1
        base_seq, payload, h, full = snapshot_for(seq, size)
        store.commit_snapshot(DEVICE, JOB, seq, base_seq, 1, payload, h, full, step=seq)
        out.write(f"{seq}\n")
        out.flush()
        if mode == "compact":
            out.write("c\n")  # compaction (and retention) under way
            out.flush()
            store.compact(JOB)
            if seq % 5 == 0:
                store.retain()
            out.write("C\n")
            out.flush()


if __name__ == "__main__":
    main()
