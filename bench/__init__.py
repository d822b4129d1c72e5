"""Benchmarks that print tables against named peers (dev tools; not part of the edge install).

``bench.trajectories`` builds realistic, deterministic state trajectories from real
computations; ``bench.codec_bench`` measures the codec against byte-level delta tools on them.
``bench.server_bench`` measures replay, resume and (through ``bench.ingest_bench``) the
ingest's throughput with simulated devices on one broker. See ``docs/benchmarks.md``.
"""
