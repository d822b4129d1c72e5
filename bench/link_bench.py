"""The link benchmark: what the agent puts on a 64 kbit/s link, per KV policy.

    python -m bench.link_bench                       # send, recompute, auto: ~2-3 minutes
    python -m bench.link_bench --policies auto --tokens 200 --json -

For each policy it runs, from scratch: a real Mosquitto (tests/support/broker.py), a TCP
proxy that counts every byte between the agent and the broker in both directions
(tests/support/mqtt_proxy.py), the small server end of the integration tests
(tests/support/mini_server.py, SQLite store) connected to the broker directly, and the
agent as a process (``python -m edge_agent.cli run``) with ``--max-kbps`` (default 64)
running a ``generate`` job over the tiny demo decoder (``[link] kv`` = the policy), paced so
that it produces tokens at a steady rate.

Reported per policy:

* **codec bytes**: the payloads the codec produced for the snapshots the agent offered (the
  sizes in its ``offered`` log events): the codec's own output;
* **wire up / down**: TCP payload bytes through the proxy, agent to broker and back: MQTT
  CONNECT/SUBSCRIBE/PINGs, every PUBLISH (snapshot chunks, BIRTH, STATUS, HB, DONE) and
  PUBACK, and what the server sends back (SYNC, ACK, CTL). TCP/IP headers are not counted;
  no TLS (it adds ~30 bytes a record);
* **per snapshot**: wire bytes (both ways) over snapshots offered;
* **overhead**: (wire up + wire down - codec bytes) / codec bytes, the target being <= 10%;
  **steady**: the same for what each further snapshot adds (its chunks' headers and MQTT
  framing, their PUBACKs, the server's ACK, its framing and our PUBACK), i.e. the overhead
  of a long run once the one-off costs (CONNECT, SUBSCRIBE, BIRTH, STATUS, SYNC, DONE, CTL)
  are paid; **link share**: the overhead bytes over what the capped link could carry in the
  run. The proxy parses every MQTT packet it forwards, so a breakdown by packet and message
  type follows the table;
* **lag**: how many steps the server's acknowledged copy is behind the job, over the run:
  rebuilt from the agent's ``acked`` events (each gives the job's step and the acked step at
  that instant; the job steps at a steady pace in between), sampled every 0.1 s from the
  job's start to its last step; median, p95, max.

This module measures and prints; it is a dev tool (it needs the server's store), never
imported by the edge install.
"""

from __future__ import annotations

import argparse
import itertools
import json
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from edge_agent.errors import EdgeResumeError  # noqa: E402
from edge_agent.models import build_all  # noqa: E402
from edge_agent.protocol import Ack, Snap, TopicNamespace, decode_incoming  # noqa: E402
from tests.support.agent_proc import AgentProcess, write_job  # noqa: E402
from tests.support.broker import Broker  # noqa: E402
from tests.support.mini_server import MiniServer, wait_for  # noqa: E402
from tests.support.mqtt_proxy import MqttProxy, read_varint  # noqa: E402

POLICIES = ("send", "recompute", "auto")
_PACKET = {1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 8: "SUBSCRIBE", 9: "SUBACK",
           12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT"}  # fmt: skip


@dataclass
class WireAccount:
    """Bytes through the proxy by direction and kind: an MQTT packet type, or for a PUBLISH
    the protocol message type it carries (its payload and its MQTT framing apart)."""

    bytes: dict[str, int] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)
    namespace: TopicNamespace = field(default_factory=TopicNamespace)
    v5: bool = True  # set from the CONNECT packet
    aliases: dict[tuple[str, int], str] = field(default_factory=dict)  # (direction, alias)
    #: per snapshot seq, what it took besides its data: its chunks' headers, framing and
    #: PUBACKs, the server's ACK for it with its framing and (QoS 1) our PUBACK
    per_seq: dict[int, int] = field(default_factory=dict)

    def add(self, key: str, n: int) -> None:
        self.bytes[key] = self.bytes.get(key, 0) + n
        self.count[key] = self.count.get(key, 0) + 1

    def packet(self, direction: str, pkt: bytes) -> None:
        kind = _PACKET.get(pkt[0] >> 4, f"type{pkt[0] >> 4}")
        if kind == "CONNECT":
            _, i = read_varint(pkt, 1)
            nlen = int.from_bytes(pkt[i : i + 2], "big")
            self.v5 = pkt[i + 2 + nlen] == 5  # the protocol level
        if kind != "PUBLISH":
            self.add(f"{direction} {kind}", len(pkt))
            return
        qos = (pkt[0] >> 1) & 3
        _, i = read_varint(pkt, 1)
        tlen = int.from_bytes(pkt[i : i + 2], "big")
        topic = pkt[i + 2 : i + 2 + tlen].decode("utf-8", "replace")
        i += 2 + tlen + (2 if qos else 0)
        if self.v5:
            plen, i = read_varint(pkt, i)
            props, i = pkt[i : i + plen], i + plen
            alias = _topic_alias(props)
            if alias is not None:
                if topic:
                    self.aliases[direction, alias] = topic
                else:
                    topic = self.aliases.get((direction, alias), "")
        payload = pkt[i:]
        try:  # the payload names neither device nor job: the topic does
            msg = decode_incoming(self.namespace, topic, payload).message
            name = msg.TYPE
        except EdgeResumeError:
            msg, name = None, "other"
        self.add(f"{direction} {name} framing", len(pkt) - len(payload))
        puback = 4 if qos else 0  # the PUBACK that answers it, the other way
        if isinstance(msg, Snap):
            self.add(f"{direction} snap header", len(payload) - len(msg.data))
            self.add(f"{direction} snap data", len(msg.data))
            cost = len(pkt) - len(msg.data) + puback
            self.per_seq[msg.seq] = self.per_seq.get(msg.seq, 0) + cost
        else:
            self.add(f"{direction} {name}", len(payload))
            if isinstance(msg, Ack):
                self.per_seq[msg.seq] = self.per_seq.get(msg.seq, 0) + len(pkt) + puback

    def get(self, key: str) -> int:
        return self.bytes.get(key, 0)

    def n(self, key: str) -> int:
        return self.count.get(key, 0)


def _topic_alias(props: bytes) -> int | None:
    """The Topic Alias (0x23) among a PUBLISH's MQTT 5 properties, if any."""
    j = 0
    while j < len(props):
        ident = props[j]
        j += 1
        if ident == 0x23:
            return int.from_bytes(props[j : j + 2], "big")
        if ident in (0x01,):  # byte
            j += 1
        elif ident in (0x02,):  # four-byte int
            j += 4
        elif ident in (0x0B,):  # varint
            _, j = read_varint(props, j)
        elif ident in (0x03, 0x08, 0x09):  # utf-8 string / binary data
            j += 2 + int.from_bytes(props[j : j + 2], "big")
        elif ident == 0x26:  # user property: a string pair
            j += 2 + int.from_bytes(props[j : j + 2], "big")
            j += 2 + int.from_bytes(props[j : j + 2], "big")
        else:
            return None
    return None


class CountingProxy(MqttProxy):
    """The test proxy, parsing what it forwards into a :class:`WireAccount`."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self.account = WireAccount()

    def _pipe(self, src: socket.socket, dst: socket.socket, counter: str | None = None) -> None:
        direction = "up" if counter == "bytes_up" else "down"
        buf = bytearray()
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
                with self._lock:
                    if counter is not None:
                        setattr(self, counter, getattr(self, counter) + len(data))
                    buf += data
                    while len(buf) >= 2:
                        try:
                            rem, i = read_varint(buf, 1)
                        except IndexError:
                            break
                        if len(buf) < i + rem:
                            break
                        self.account.packet(direction, bytes(buf[: i + rem]))
                        del buf[: i + rem]
        except OSError:
            pass
        finally:
            self._close_pair(src, dst)


@dataclass
class Result:
    policy: str
    tokens: int
    seconds: float
    snapshots: int  # snapshots offered (each one codec payload)
    kv_snapshots: int  # of which carried the KV cache
    codec_bytes: int  # the codec's output: the payloads offered
    wire_up: int
    wire_down: int
    recurring: int  # overhead bytes that come with each snapshot (see steady_overhead)
    lag_median: float
    lag_p95: float
    lag_max: float
    per_snapshot_overheads: list[float] = field(default_factory=list)  # each one's, in order
    breakdown: dict[str, int] = field(default_factory=dict)  # "up snap header": bytes, ...
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def wire(self) -> int:
        return self.wire_up + self.wire_down

    @property
    def per_snapshot(self) -> float:
        return self.wire / max(1, self.snapshots)

    @property
    def overhead(self) -> float:
        """Everything on the wire beyond the codec's output, over the codec's output."""
        return (self.wire - self.codec_bytes) / max(1, self.codec_bytes)

    @property
    def steady_overhead(self) -> float:
        """What each further snapshot adds beyond its payload (its chunks' headers and MQTT
        framing, their PUBACKs, the server's ACK and its PUBACK), over the codec bytes: the
        overhead of a long run, once connecting, BIRTH, SYNC, DONE and the final CTL are paid."""
        return self.recurring / max(1, self.codec_bytes)

    def link_share(self, max_kbps: float) -> float:
        """The overhead's share of what the capped link could carry over the run."""
        return (self.wire - self.codec_bytes) / max(1.0, max_kbps * 125.0 * self.seconds)

    @property
    def per_snapshot_median(self) -> float:
        """The median, over the snapshots between the first (full) and the final one, of each
        one's own overhead over its own payload: what a snapshot costs once the run is under
        way (the first and the final one are in the table's other columns)."""
        xs = self.per_snapshot_overheads
        mid = xs[1:-1] or xs
        return statistics.median(mid) if mid else 0.0

    @property
    def one_off(self) -> int:
        return self.wire - self.codec_bytes - self.recurring


def _ts(rec: dict[str, Any]) -> float:
    return datetime.fromisoformat(rec["ts"].replace("Z", "+00:00")).timestamp()


def lag_samples(events: list[dict[str, Any]], every: float = 0.1) -> list[float]:
    """The server copy's lag in steps, sampled every ``every`` seconds, from the agent's log:
    the job's step grows linearly between the instants the log tells it (job-open at step 0,
    each ``acked`` event: step + lag), the server's step changes at each ack."""
    start = next((_ts(e) for e in events if e.get("event") == "job-open"), None)
    if start is None:
        return []
    points = [(start, 0, 0)]  # t, job step, server step
    for e in events:
        if e.get("event") == "acked" and e.get("lag") is not None:
            points.append((_ts(e), e["step"] + e["lag"], e["step"]))
        elif e.get("event") == "job-done":
            points.append((_ts(e), e["step"], points[-1][2]))
    out = []
    for (t0, j0, s0), (t1, j1, _s1) in itertools.pairwise(points):
        t = t0
        while t < t1:
            j = j0 + (j1 - j0) * (t - t0) / max(1e-9, t1 - t0)
            out.append(max(0.0, j - s0))
            t += every
    return out


def run_one(policy: str, models: dict[str, Path], work: Path, args: argparse.Namespace) -> Result:
    work.mkdir(parents=True, exist_ok=True)
    jid = f"gen-{policy}"
    job = write_job(
        work, jid, "generate", models["tiny-decoder.onnx"],
        params={"prompt": "The gateway said: ", "max_new_tokens": args.tokens,
                "temperature": 0.8, "top_k": 40, "seed": 7},
        snapshot={"every_seconds": args.every_seconds, "overhead_budget": args.overhead_budget,
                  "max_lag_seconds": args.max_lag},
        link={"kv": policy},
        runtime={"min_step_seconds": args.pace},
    )  # fmt: skip
    with (
        Broker(work / "broker") as broker,
        CountingProxy(broker.port) as proxy,
        MiniServer(broker.url, work / "store") as server,
    ):
        agent = AgentProcess(
            work / "agent", [job], f"mqtt://127.0.0.1:{proxy.port}",
            extra=["--max-kbps", str(args.max_kbps), "--heartbeat", str(args.heartbeat),
                   "--completion-timeout", "600", "--log-level", "info"],
        )  # fmt: skip
        t0 = time.monotonic()
        agent.start()
        try:
            rc = agent.wait(args.timeout)
        finally:
            agent.stop()
        seconds = time.monotonic() - t0
        if rc != 0:
            raise RuntimeError(f"{policy}: the agent exited with {rc}:\n{agent.log_tail()}")
        wait_for(lambda: server.completed(jid), 10, "completion")
        with proxy._lock:
            acct = WireAccount(dict(proxy.account.bytes), dict(proxy.account.count))
            per_seq = dict(proxy.account.per_seq)
            wire_up, wire_down = proxy.bytes_up, proxy.bytes_down
    acct.bytes["up CONNECT"] = wire_up - sum(v for k, v in acct.bytes.items() if k[:3] == "up ")
    events = [json.loads(x) for x in agent.log_text().splitlines() if x.startswith("{")]
    offered = [e for e in events if e.get("event") == "offered"]
    codec = sum(e["bytes"] for e in offered)
    # what each snapshot brings besides its payload: its chunks' headers and framing and
    # PUBACKs, and the server's ACK with its framing and our PUBACK
    n_snap, n_ack = acct.n("up snap framing"), acct.n("down ack framing")
    puback_down = acct.get("down PUBACK") / max(1, acct.n("down PUBACK"))
    puback_up = acct.get("up PUBACK") / max(1, acct.n("up PUBACK"))
    recurring = round(
        acct.get("up snap header") + acct.get("up snap framing") + n_snap * puback_down
        + acct.get("down ack") + acct.get("down ack framing") + n_ack * puback_up
    )  # fmt: skip
    lags = lag_samples(events)
    per_snap = [per_seq[e["seq"]] / e["bytes"] for e in offered if e["seq"] in per_seq]
    return Result(
        policy=policy, tokens=args.tokens, seconds=seconds, snapshots=len(offered),
        kv_snapshots=sum(1 for e in offered if e.get("kv")), codec_bytes=codec,
        wire_up=wire_up, wire_down=wire_down, recurring=recurring,
        lag_median=statistics.median(lags) if lags else 0.0, lag_p95=_pct(lags, 0.95),
        lag_max=max(lags, default=0.0), per_snapshot_overheads=per_snap, breakdown=acct.bytes,
        counts=acct.count,
    )  # fmt: skip


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def _size(n: float) -> str:
    return f"{n / 1000:.1f} kB" if n >= 1000 else f"{n:.0f} B"


def table(results: list[Result], args: argparse.Namespace) -> str:
    head = ["kv policy", "snapshots", "codec bytes", "wire up", "wire down", "wire/snapshot",
            "overhead", "steady", "per snapshot", "link share", "lag median", "p95", "max",
            "time"]  # fmt: skip
    rows = [head]
    for r in results:
        rows.append([
            r.policy, f"{r.snapshots} ({r.kv_snapshots} KV)", _size(r.codec_bytes),
            _size(r.wire_up), _size(r.wire_down), _size(r.per_snapshot),
            f"{100 * r.overhead:.1f}%", f"{100 * r.steady_overhead:.1f}%",
            f"{100 * r.per_snapshot_median:.1f}%",
            f"{100 * r.link_share(args.max_kbps):.1f}%",
            f"{r.lag_median:.0f}", f"{r.lag_p95:.0f}", f"{r.lag_max:.0f}", f"{r.seconds:.0f} s",
        ])  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        f"link bench: generate, tiny-decoder, {args.tokens} tokens at one per {args.pace} s, "
        f"snapshot every {args.every_seconds} s (overhead budget {args.overhead_budget:g}, max "
        f"lag {args.max_lag:g} s), --max-kbps {args.max_kbps:g}, heartbeat "
        f"{args.heartbeat:g} s; lag in steps (tokens)",
        "",
    ]
    for i, row in enumerate(rows):
        cells = zip(row, widths, strict=True)
        lines.append(
            "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(cells))
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += ["", "where the overhead goes (bytes; per snapshot where it recurs):"]
    for r in results:
        b = r.breakdown
        per = r.recurring / max(1, r.snapshots)
        lines.append(
            f"  {r.policy}: each snapshot {per:.0f} B (snap header {_avg(r, 'up snap header')}, "
            f"MQTT {_avg(r, 'up snap framing')}, ACK {_avg(r, 'down ack')} + MQTT "
            f"{_avg(r, 'down ack framing')}, PUBACKs); once: {r.one_off} B (CONNECT "
            f"{b.get('up CONNECT', 0)}, BIRTH {b.get('up birth', 0)}, SUBSCRIBE "
            f"{b.get('up SUBSCRIBE', 0)}, STATUS {b.get('up status', 0)}, HB "
            f"{b.get('up hb', 0) + b.get('up hb framing', 0)}, SYNC {b.get('down sync', 0)}, "
            f"CTL {b.get('down ctl', 0)}, DONE {b.get('up done', 0)}, the rest framing)"
        )
    return "\n".join(lines)


def _avg(r: Result, key: str) -> str:
    n = r.counts.get(key, 0)
    return "-" if not n else f"{r.breakdown.get(key, 0) / n:.0f}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated kv policies")
    ap.add_argument("--tokens", type=int, default=4000, help="tokens to generate (default 4000)")
    ap.add_argument("--pace", type=float, default=0.05, help="seconds per token (default 0.05)")
    ap.add_argument("--every-seconds", type=float, default=2.0, help="snapshot interval")
    ap.add_argument(
        "--overhead-budget",
        type=float,
        default=0.10,
        help="the job file's [snapshot] overhead_budget (default 0.10; 0: off)",
    )
    ap.add_argument("--max-lag", type=float, default=60.0,
                    help="the job file's [snapshot] max_lag_seconds (default 60)")  # fmt: skip
    ap.add_argument("--max-kbps", type=float, default=64.0, help="the agent's cap (default 64)")
    ap.add_argument("--heartbeat", type=float, default=10.0, help="agent heartbeat, seconds")
    ap.add_argument("--timeout", type=float, default=600.0, help="per policy, seconds")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-': stdout)")
    args = ap.parse_args(argv)
    policies = [p for p in args.policies.split(",") if p]
    for p in policies:
        if p not in POLICIES:
            ap.error(f"unknown policy {p!r}")
    results = []
    with tempfile.TemporaryDirectory(prefix="link-bench-") as tmp:
        models = build_all(Path(tmp) / "models")
        for p in policies:
            print(f"running kv = {p} ...", file=sys.stderr, flush=True)
            results.append(run_one(p, models, Path(tmp) / p, args))
    print(table(results, args))
    if args.json:
        doc = {
            "settings": vars(args),
            "results": [
                {**asdict(r), "wire": r.wire, "per_snapshot": r.per_snapshot,
                 "overhead": r.overhead, "steady_overhead": r.steady_overhead,
                 "link_share": r.link_share(args.max_kbps),
                 "one_off": r.one_off}
                for r in results
            ],
        }  # fmt: skip
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
