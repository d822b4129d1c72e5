"""The agent's MQTT link: a thin, typed, threaded wrapper over paho-mqtt 2.x.

    t = Transport(TransportConfig(broker="mqtts://broker:8883", client_id="gw-17",
                                  tls=TLSOptions(ca_file="ca.pem"), will=Will(topic, offline)))
    t.start()
    t.wait_connected(timeout=30)
    t.subscribe([(ack_topic, 1), (ctl_topic, 1)])
    ticket = t.publish(topic, payload, priority=Priority.DELTA)
    event = t.get(timeout=1.0)        # Message | Connected | Disconnected | None
    t.close()

What it owns: one broker connection at a time (a fresh paho client per connection, run by
paho's ``loop_start`` thread with paho's own reconnect switched off), the reconnect policy
(exponential back-off with full jitter, in its own manager thread), TLS and authentication,
MQTT 5 with a persistent session and a fall-back to 3.1.1, the outgoing queue with its
bandwidth cap and priorities (:mod:`edge_agent.ratelimit`), topic aliases, and counters.

Delivery semantics (docs/agent-io.md): a message is *accepted* when :meth:`Transport.publish`
returns a ticket. An accepted QoS 1 message is kept in memory and sent, then sent again on
every new connection, until the broker acknowledges it (the ticket is then *delivered*) or
refuses it with a reason code (the ticket fails with :class:`TransportError`), or the
caller cancels it while it is still queued, or the transport is closed. Nothing is kept
across a process restart: the journal and the protocol carry state, not messages.

paho's return codes, reason codes and exceptions become :class:`TransportError` (and its
subclasses) at one seam: :func:`_seam`, :func:`_rc_error` and :func:`_reason_error`.

This module never decides what to send (no protocol logic), never runs user code in paho's
callbacks (they only post events to the manager thread), and never lets paho reconnect.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import queue
import random
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.errors import ConnectionRefused, TransportError, TransportTimeout
from edge_agent.ratelimit import (
    Backoff,
    LinkRateEstimator,
    Priority,
    PriorityPacer,
    kbps_to_bytes_per_s,
)

__all__ = [
    "BrokerURL",
    "Connected",
    "Disconnected",
    "Incoming",
    "Message",
    "Priority",
    "PublishTicket",
    "TLSOptions",
    "Transport",
    "TransportConfig",
    "TransportStats",
    "Will",
    "parse_broker_url",
    "publish_packet_size",
]

log = logging.getLogger("edge_agent.transport")

# CONNACK reason codes (MQTT 5 values; paho maps 3.1.1 return codes onto them)
_UNSUPPORTED_PROTOCOL = 0x84
#: refusals worth retrying with back-off; every other refusal is permanent
_TRANSIENT_REFUSALS = frozenset({0x80, 0x83, 0x88, 0x89, 0x97, 0x9C, 0x9D, 0x9F})
_ALIAS_PROPERTY_BYTES = 3  # identifier byte + two-byte alias


# --------------------------------------------------------------------------- options


@dataclass(frozen=True, slots=True)
class BrokerURL:
    """A parsed ``mqtt://host:port`` (plain TCP) or ``mqtts://host:port`` (TLS) URL."""

    host: str
    port: int
    tls: bool


def parse_broker_url(url: str) -> BrokerURL:
    """Parse ``mqtt://host[:port]`` (default 1883) or ``mqtts://host[:port]`` (default 8883)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise TransportError(f"broker URL {url!r} is not valid: {exc}") from exc
    if parts.scheme not in ("mqtt", "mqtts"):
        raise TransportError(
            f"broker URL {url!r} has scheme {parts.scheme!r}",
            hint="use mqtt://host:port or mqtts://host:port (TLS)",
        )
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.username:
        raise TransportError(
            f"broker URL {url!r} must be scheme://host[:port] only",
            hint="credentials go in the username/password options, not in the URL",
        )
    tls = parts.scheme == "mqtts"
    return BrokerURL(parts.hostname, port or (8883 if tls else 1883), tls)


@dataclass(frozen=True, slots=True)
class Will:
    """The message the broker publishes for us when the connection drops uncleanly."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class TLSOptions:
    """TLS settings. ``ca_file`` None uses the system's CAs. ``cert_file``/``key_file`` give
    a client certificate (mutual TLS). ``insecure`` turns off ALL verification of the
    broker's certificate and name: for a lab only, and only when asked for explicitly."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    key_password: str | None = None
    insecure: bool = False


@dataclass(frozen=True, slots=True)
class TransportConfig:
    """Everything a :class:`Transport` needs. Times are seconds, sizes bytes."""

    broker: str
    client_id: str
    username: str | None = None
    password: str | None = None
    tls: TLSOptions | None = None  # for mqtts:// URLs; None there means TLSOptions()
    will: Will | None = None
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    keepalive: int = 30
    session_expiry: int = 14 * 24 * 3600  # MQTT 5 Session Expiry Interval
    max_kbps: float | None = None  # bandwidth cap in kbit/s (1 kbit = 1000 bits)
    topic_aliases: bool = True
    connect_timeout: float = 15.0  # TCP + TLS + CONNACK (+ SUBACK of the re-subscription)
    backoff_initial: float = 0.5
    backoff_max: float = 60.0
    stable_after: float = 10.0  # a connection up this long resets the back-off
    max_inflight: int = 16  # unacknowledged messages on the wire
    max_inflight_bytes: int = 256 * 1024
    max_queued_bytes: int = 64 * 1024 * 1024  # accepted but not yet delivered
    retry_refused: bool = False  # keep retrying after a permanent refusal (bad password ...)
    seed: int | None = None  # seeds the back-off jitter (tests)


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Message:
    """A message received on a subscription."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True, slots=True)
class Connected:
    """The link is up: subscribed again, sending. ``session_present``: the broker kept our
    session (and the QoS 1 messages queued for us while we were away)."""

    protocol: str  # "5" or "3.1.1"
    session_present: bool
    topic_alias_max: int
    receive_max: int
    max_packet_size: int | None


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The link went down. ``fatal``: the transport gave up (see ``error``)."""

    reason: str
    rc: int | None = None
    fatal: bool = False
    error: TransportError | None = None


Incoming = Message | Connected | Disconnected


@dataclass(frozen=True, slots=True)
class TransportStats:
    """Counters since the transport was made. ``bytes_published`` estimates MQTT PUBLISH
    packet bytes (fixed header, topic or alias, packet id, properties, payload), resends
    included; TCP/TLS framing is not counted."""

    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    published: int = 0
    delivered: int = 0
    failed: int = 0
    cancelled: int = 0
    requeued: int = 0
    bytes_published: int = 0
    payload_bytes: int = 0
    topic_bytes: int = 0
    alias_hits: int = 0
    received: int = 0
    bytes_received: int = 0
    queued: int = 0
    queued_bytes: int = 0
    inflight: int = 0
    protocol: str | None = None


def _varint_len(n: int) -> int:
    size = 1
    while n >= 128:
        n >>= 7
        size += 1
    return size


def publish_packet_size(
    topic_len: int, payload_len: int, qos: int, *, v5: bool, properties_len: int = 0
) -> int:
    """Bytes of an MQTT PUBLISH packet: fixed header, topic (2 + len; 2 for an alias-only
    publish), packet id (QoS > 0), properties (MQTT 5) and payload."""
    remaining = 2 + topic_len + (2 if qos else 0) + payload_len
    if v5:
        remaining += _varint_len(properties_len) + properties_len
    return 1 + _varint_len(remaining) + remaining


# --------------------------------------------------------------------------- the seam


@contextlib.contextmanager
def _seam(what: str) -> Iterator[None]:
    """Translate exceptions from paho, ssl and the socket layer, most specific first."""
    try:
        yield
    except TransportError:
        raise
    except ssl.SSLCertVerificationError as exc:
        raise ConnectionRefused(
            f"{what}: the broker's certificate failed verification: {exc.verify_message}",
            hint="check the CA file and that the broker's certificate names this host",
        ) from exc
    except ssl.SSLError as exc:
        raise TransportError(f"{what}: TLS error: {exc.reason or exc}") from exc
    except TimeoutError as exc:
        raise TransportTimeout(f"{what}: timed out") from exc
    except OSError as exc:
        raise TransportError(f"{what}: {exc.strerror or exc}", rc=exc.errno) from exc
    except ValueError as exc:  # paho's argument checks (topic, qos, payload size)
        raise TransportError(f"{what}: {exc}") from exc


def _rc_error(what: str, rc: int) -> TransportError:
    """paho's MQTT_ERR_* return code as an exception."""
    return TransportError(f"{what}: {mqtt.error_string(rc)!s}", rc=int(rc))


def _reason_error(what: str, reason: ReasonCode) -> TransportError:
    """An MQTT reason code (CONNACK, PUBACK, SUBACK, DISCONNECT) as an exception."""
    value = int(reason.value)
    name = reason.getName()
    if reason.packetType == PacketTypes.CONNACK and value not in _TRANSIENT_REFUSALS:
        return ConnectionRefused(f"{what}: the broker refused: {name}", rc=value, hint=_hint(value))
    return TransportError(f"{what}: {name} (reason code 0x{value:02x})", rc=value)


def _hint(value: int) -> str | None:
    return {
        0x84: "the broker does not speak this MQTT version; try protocol='auto' or '3.1.1'",
        0x85: "the broker refused the client id; device ids must be unique and allowed",
        0x86: "check the username and password",
        0x87: "the broker's ACL does not allow this client",
    }.get(value)


class _TLSContext(ssl.SSLContext):
    """An SSLContext that remembers the sockets it wraps, so that a connection attempt that
    fails inside paho (a refused certificate, a handshake cut short) can close its socket."""

    opened: list[ssl.SSLSocket]

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        sock = super().wrap_socket(*args, **kwargs)
        self.opened.append(sock)
        return sock

    def close_opened(self, keep: object = None) -> None:
        opened, self.opened = self.opened, []
        for sock in opened:
            if sock is not keep:
                with contextlib.suppress(OSError):
                    sock.close()


def _ssl_context(tls: TLSOptions) -> _TLSContext:
    with _seam("TLS set-up"):
        try:
            ctx = _TLSContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies certificates and host names
            ctx.opened = []
            if tls.ca_file is None:
                ctx.load_default_certs()
            else:
                ctx.load_verify_locations(cafile=tls.ca_file)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if tls.cert_file:
                ctx.load_cert_chain(tls.cert_file, tls.key_file, password=tls.key_password)
        except FileNotFoundError as exc:
            raise TransportError(f"TLS set-up: {exc.filename} does not exist") from exc
        if tls.insecure:
            log.warning("TLS verification of the broker is OFF (insecure=True)")
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
    return ctx


# --------------------------------------------------------------------------- tickets


class _State(enum.Enum):
    QUEUED = "queued"
    SENDING = "sending"
    DELIVERED = "delivered"
    FAILED = "failed"
    CANCELLED = "cancelled"


class PublishTicket:
    """What :meth:`Transport.publish` returns: the fate of one accepted message."""

    def __init__(self, transport: Transport, topic: str, qos: int, priority: Priority, size: int):
        self.topic = topic
        self.qos = qos
        self.priority = priority
        self.size = size  # estimated packet bytes with the full topic
        self._transport = transport
        self._state = _State.QUEUED
        self._error: TransportError | None = None
        self._done = threading.Event()

    @property
    def state(self) -> str:
        """queued, sending, delivered, failed or cancelled."""
        return self._state.value

    def done(self) -> bool:
        """Delivered, failed or cancelled."""
        return self._done.is_set()

    @property
    def error(self) -> TransportError | None:
        return self._error

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the message is delivered; True if it was, False on timeout. Raises
        the ticket's TransportError if it failed or was cancelled."""
        if not self._done.wait(timeout):
            return False
        if self._error is not None:
            raise self._error
        return True

    def result(self, timeout: float | None = None) -> None:
        """Like :meth:`wait`, but a timeout raises :class:`TransportTimeout`."""
        if not self.wait(timeout):
            raise TransportTimeout(f"publish to {self.topic!r} not delivered within {timeout}s")

    def cancel(self) -> bool:
        """Take the message back if it has not been handed to the network yet (a newer
        snapshot replaces an older one). True if it was taken back."""
        return self._transport._cancel(self)

    def __repr__(self) -> str:
        return f"PublishTicket({self.topic!r}, {self.state})"


@dataclass(slots=True)
class _Out:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    ticket: PublishTicket
    order: int = 0
    accepted_at: float = 0.0  # when the manager queued it
    sent_at: float = 0.0
    packet_bytes: int = 0  # estimate with the full topic: what the pacer charges
    wire_bytes: int = 0  # as last sent (topic alias or not)


# --------------------------------------------------------------------------- a connection


class _Aliases:
    """Topic aliases of one connection (MQTT 5): topic -> alias, least recently used first."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self._by_topic: OrderedDict[str, int] = OrderedDict()

    def resolve(self, topic: str) -> tuple[str, int | None, bool]:
        """(topic to send, alias or None, whether the mapping is new and must be recorded)."""
        if self.maximum <= 0:
            return topic, None, False
        alias = self._by_topic.get(topic)
        if alias is not None:
            return "", alias, False
        if len(self._by_topic) < self.maximum:
            return topic, len(self._by_topic) + 1, True
        _, reused = next(iter(self._by_topic.items()))  # the least recently used alias
        return topic, reused, True

    def record(self, topic: str, alias: int, new: bool) -> None:
        if new:
            for old, a in list(self._by_topic.items()):
                if a == alias:
                    del self._by_topic[old]
            self._by_topic[topic] = alias
        self._by_topic.move_to_end(topic)


@dataclass(eq=False)
class _Conn:
    id: int
    client: mqtt.Client
    v5: bool
    phase: str = "connecting"  # connecting -> subscribing -> ready -> down
    deadline: float = 0.0
    up_since: float | None = None
    session_present: bool = False
    aliases: _Aliases = field(default_factory=lambda: _Aliases(0))
    receive_max: int = 65535
    max_packet: int | None = None
    inflight: dict[int, _Out] = field(default_factory=dict)
    inflight_bytes: int = 0
    last_ack_at: float = 0.0
    sub_mid: int | None = None
    subs: dict[int, tuple[list[str], Future[list[int]]]] = field(default_factory=dict)


# --------------------------------------------------------------------------- the transport


class Transport:
    """The MQTT link of one agent (see the module docstring).

    Thread-safe: any thread may publish, subscribe, read events or close. Internally a
    manager thread owns every piece of state; paho's callbacks only post events to it.
    """

    def __init__(
        self, config: TransportConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.url = parse_broker_url(config.broker)
        if not config.client_id:
            raise TransportError("the client id (the device id) must not be empty")
        if config.protocol not in ("auto", "5", "3.1.1"):
            raise TransportError(f"protocol {config.protocol!r} is not auto, 5 or 3.1.1")
        if config.max_kbps is not None and not config.max_kbps > 0:
            raise TransportError(f"max_kbps must be > 0 (or None: no cap), not {config.max_kbps}")
        if config.will is not None and config.will.qos not in (0, 1, 2):
            raise TransportError(f"will QoS {config.will.qos} is not 0, 1 or 2")
        tls = config.tls if config.tls is not None else (TLSOptions() if self.url.tls else None)
        if tls is not None and not self.url.tls:
            raise TransportError("TLS options given for an mqtt:// URL", hint="use mqtts://")
        self._ssl = _ssl_context(tls) if tls is not None else None
        self._clock = clock
        self._v5 = config.protocol != "3.1.1"
        rate = kbps_to_bytes_per_s(config.max_kbps) if config.max_kbps is not None else None
        self._pacer: PriorityPacer[_Out] = PriorityPacer(rate, now=clock())
        self._backoff = Backoff(
            config.backoff_initial, config.backoff_max, rng=random.Random(config.seed)
        )
        self._rate = LinkRateEstimator()
        self._events: queue.SimpleQueue[tuple[str, int, Any]] = queue.SimpleQueue()
        self._incoming: queue.Queue[Incoming] = queue.Queue()
        self._lock = threading.Lock()  # tickets' states, counters, queued bytes
        self._cv = threading.Condition(self._lock)  # connected / fatal / closed changes
        self._stats: dict[str, Any] = {f: 0 for f in TransportStats.__dataclass_fields__}
        self._stats["protocol"] = None
        self._queued_bytes = 0
        self._subs: OrderedDict[str, int] = OrderedDict()  # filter -> qos, kept across links
        self._sub_waiters: list[tuple[list[str], Future[list[int]]]] = []
        self._conn: _Conn | None = None
        self._conn_ids = 0
        self._retry_at: float | None = None
        self._ready = False
        self._fatal: TransportError | None = None
        self._closing: tuple[float, bool, bool] | None = None  # deadline, drain, send_will
        self._close_requested = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._connected_event: Connected | None = None
        self.last_error: TransportError | None = None

    # ----------------------------------------------------------------- public API

    def start(self) -> Transport:
        """Start connecting in the background; returns at once."""
        with self._lock:
            if self._thread is not None:
                return self
            if self._closed:
                raise TransportError("the transport is closed")
            self._retry_at = self._clock()
            self._thread = threading.Thread(
                target=self._run, name=f"edge-transport-{self.config.client_id}", daemon=True
            )
            self._thread.start()
        return self

    def wait_connected(self, timeout: float | None = None) -> Connected:
        """Block until the link is up (connected and subscribed). Raises ConnectionRefused
        (or the transport's fatal error) or TransportTimeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while not self._ready:
                if self._fatal is not None:
                    raise self._fatal
                if self._closed:
                    raise TransportError("the transport is closed")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    last = f" (last error: {self.last_error})" if self.last_error else ""
                    raise TransportTimeout(f"not connected to {self.config.broker}{last}")
                self._cv.wait(left)
            assert self._connected_event is not None
            return self._connected_event

    @property
    def connected(self) -> bool:
        """Whether the link is up now (connected, subscribed, sending)."""
        return self._ready

    @property
    def protocol(self) -> str:
        """The MQTT version in use (or to be tried next): "5" or "3.1.1"."""
        return "5" if self._v5 else "3.1.1"

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        priority: Priority = Priority.CONTROL,
    ) -> PublishTicket:
        """Accept a message for sending (see the module docstring for what that promises).
        Raises TransportError when the topic or QoS is invalid, when more than
        ``max_queued_bytes`` are waiting, or when the transport is closed or has failed."""
        if not isinstance(topic, str) or not topic or "+" in topic or "#" in topic:
            raise TransportError(f"cannot publish to topic {topic!r}")
        if len(topic.encode("utf-8")) > 65535:
            raise TransportError("topic is longer than 65,535 bytes")
        if qos not in (0, 1):
            raise TransportError(f"QoS {qos} is not supported (0 or 1)")
        payload = bytes(payload)
        size = publish_packet_size(len(topic.encode("utf-8")), len(payload), qos, v5=self._v5)
        ticket = PublishTicket(self, topic, qos, Priority(priority), size)
        out = _Out(topic, payload, qos, retain, ticket, packet_bytes=size)
        with self._lock:
            if self._fatal is not None:
                raise self._fatal
            if self._closed or self._close_requested:
                raise TransportError("the transport is closed")
            if self._queued_bytes + size > self.config.max_queued_bytes:
                raise TransportError(
                    f"{self._queued_bytes} bytes are waiting to be sent; "
                    f"{size} more would pass max_queued_bytes",
                    hint="send state, not messages: replace queued snapshots instead",
                )
            self._queued_bytes += size
            # posted under the lock: the manager's shutdown, which takes it, sees it
            self._post("publish", 0, out)
        return ticket

    def subscribe(
        self, filters: str | Sequence[tuple[str, int]], qos: int = 1, *, timeout: float = 30.0
    ) -> list[int]:
        """Subscribe (now and on every reconnect) and wait for the SUBACK; returns the
        granted QoS per filter. Raises TransportError with the reason code of a refused
        filter, or TransportTimeout."""
        if self._thread is None:
            raise TransportError(
                "subscribe() waits for the broker: start() the transport first",
                hint="subscribe_nowait() registers filters before start()",
            )
        pairs = self._filters(filters, qos)
        fut = self.subscribe_nowait(pairs)
        try:
            return fut.result(timeout)
        except TimeoutError as exc:  # concurrent.futures.TimeoutError is TimeoutError (3.11)
            raise TransportTimeout(
                f"no SUBACK for {[f for f, _ in pairs]} within {timeout}s"
            ) from exc

    def subscribe_nowait(
        self, filters: str | Sequence[tuple[str, int]], qos: int = 1
    ) -> Future[list[int]]:
        """Register filters without waiting: they are subscribed on every connection before
        :class:`Connected` is reported (so registering them before :meth:`start` makes every
        Connected, the first included, come after the SUBACK). The future resolves with
        the granted QoS per filter, or fails with TransportError."""
        pairs = self._filters(filters, qos)
        fut: Future[list[int]] = Future()
        if not pairs:
            fut.set_result([])
            return fut
        with self._lock:
            if self._fatal is not None:
                raise self._fatal
            if self._closed or self._close_requested:
                raise TransportError("the transport is closed")
            self._post("subscribe", 0, (pairs, fut))
        return fut

    @staticmethod
    def _filters(filters: str | Sequence[tuple[str, int]], qos: int) -> list[tuple[str, int]]:
        pairs = [(filters, qos)] if isinstance(filters, str) else list(filters)
        for f, q in pairs:
            if not isinstance(f, str) or not f or q not in (0, 1):
                raise TransportError(f"cannot subscribe to {f!r} with QoS {q}")
        return pairs

    def get(self, timeout: float | None = None) -> Incoming | None:
        """The next received message or link event; None after ``timeout`` seconds."""
        try:
            return self._incoming.get(timeout=timeout)
        except queue.Empty:
            return None

    @property
    def incoming(self) -> queue.Queue[Incoming]:
        """The queue :meth:`get` reads (for callers that select over several queues)."""
        return self._incoming

    def stats(self) -> TransportStats:
        """A snapshot of the counters."""
        with self._lock:
            return TransportStats(**self._stats)

    def link_rate(self) -> float | None:
        """Estimated bytes per second the link drains while busy (None: not measured yet)."""
        with self._lock:
            return self._rate.rate()

    def close(self, timeout: float = 5.0, *, drain: bool = True, send_will: bool = False) -> None:
        """Stop. With ``drain``, first wait up to ``timeout`` for accepted messages to be
        delivered. ``send_will`` asks the broker to publish the will anyway (MQTT 5 reason
        0x04; under 3.1.1 the will is published as an ordinary message first). Messages not
        delivered by then fail with TransportError."""
        with self._cv:
            thread = self._thread
            if self._closed or self._close_requested:
                pass
            elif thread is None:
                self._closed = True
                self._cv.notify_all()
            else:
                self._close_requested = True
                self._post("close", 0, (self._clock() + timeout, drain, send_will))
        if thread is None:
            self._fail_events(TransportError("the transport was closed before it started"))
        else:
            thread.join(timeout + self.config.connect_timeout + 5.0)

    def __enter__(self) -> Transport:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- paho callbacks
    # (paho's thread: they post an event and return; nothing else)

    def _post(self, kind: str, conn_id: int, data: Any) -> None:
        self._events.put((kind, conn_id, data))

    def _callbacks(self, client: mqtt.Client, cid: int) -> None:
        def on_connect(c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
            self._post("connack", cid, (flags.session_present, reason, props))

        def on_disconnect(c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
            self._post("disconnect", cid, (flags.is_disconnect_packet_from_server, reason))

        def on_publish(c: Any, u: Any, mid: int, reason: Any, props: Any) -> None:
            self._post("puback", cid, (mid, reason))

        def on_subscribe(c: Any, u: Any, mid: int, reasons: Any, props: Any) -> None:
            self._post("suback", cid, (mid, reasons))

        def on_message(c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
            self._post(
                "message", cid, Message(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain))
            )

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_publish = on_publish
        client.on_subscribe = on_subscribe
        client.on_message = on_message

    # ----------------------------------------------------------------- manager thread

    def _run(self) -> None:
        try:
            while True:
                try:
                    ev = self._events.get(timeout=self._next_wakeup())
                except queue.Empty:
                    ev = None
                while ev is not None:
                    self._handle(*ev)
                    try:
                        ev = self._events.get_nowait()
                    except queue.Empty:
                        ev = None
                if self._tick():
                    break
        except Exception as exc:  # a bug here must not hang the agent silently
            log.exception("transport manager thread failed")
            self._set_fatal(TransportError(f"transport manager failed: {exc!r}"))
        finally:
            self._shutdown()

    def _next_wakeup(self) -> float:
        now = self._clock()
        waits = [1.0]
        c = self._conn
        if c is None and self._retry_at is not None:
            waits.append(self._retry_at - now)
        if c is not None and c.phase in ("connecting", "subscribing"):
            waits.append(c.deadline - now)
        if c is not None and c.phase == "ready" and self._window_open(c):
            d = self._pacer.delay(now)
            if d is not None:
                waits.append(d)
        if self._closing is not None:
            waits.append(self._closing[0] - now)
        return max(0.0, min(waits))

    def _tick(self) -> bool:
        """Time-driven work; True when the manager should stop."""
        now = self._clock()
        c = self._conn
        if self._closing is not None:
            deadline, drain, send_will = self._closing
            empty = not len(self._pacer) and not (c and c.inflight)
            if not drain or empty or now >= deadline or self._fatal is not None:
                self._disconnect(send_will)
                return True
        if self._fatal is not None:
            return False
        if c is None:
            if self._retry_at is not None and now >= self._retry_at:
                self._attempt()
        elif c.phase in ("connecting", "subscribing") and now >= c.deadline:
            if c.phase == "connecting" and self.config.protocol == "auto":
                # Some 3.1.1-only brokers (amqtt) never answer an MQTT 5 CONNECT instead of
                # refusing it: after a silent CONNACK timeout, try the other version next.
                self._v5 = not c.v5
                log.warning(
                    "%s did not answer an MQTT %s CONNECT; trying %s next",
                    self.config.broker,
                    "5" if c.v5 else "3.1.1",
                    "3.1.1" if c.v5 else "5",
                )
            self._drop(
                c,
                TransportTimeout(
                    f"no {'CONNACK' if c.phase == 'connecting' else 'SUBACK'} "
                    f"within {self.config.connect_timeout}s"
                ),
            )
        elif c.phase == "ready":
            self._pump(c, now)
        return False

    def _handle(self, kind: str, cid: int, data: Any) -> None:
        if kind == "publish":
            out: _Out = data
            out.accepted_at = self._clock()
            out.order = self._pacer.push(out, out.packet_bytes, out.ticket.priority)
            self._set_queued()
            return
        if kind == "cancel":
            self._set_queued()  # drops cancelled messages from the queue
            return
        if kind == "subscribe":
            pairs, fut = data
            for f, q in pairs:
                self._subs[f] = q
            c = self._conn
            if c is not None and c.phase in ("subscribing", "ready"):
                self._send_subscribe(c, pairs, fut)
            else:
                self._sub_waiters.append(([f for f, _ in pairs], fut))
            return
        if kind == "close":
            self._closing = data
            return
        c = self._conn
        if c is None or c.id != cid:
            if kind == "message":  # late but real: deliver it
                self._deliver(data)
            return  # an event of a connection we already dropped
        if kind == "connack":
            self._on_connack(c, *data)
        elif kind == "suback":
            self._on_suback(c, *data)
        elif kind == "puback":
            self._on_puback(c, *data)
        elif kind == "message":
            self._deliver(data)
        elif kind == "disconnect":
            from_broker, reason = data
            if from_broker and reason is not None:
                self._drop(c, _reason_error("the broker closed the connection", reason))
            else:
                self._drop(c, TransportError("connection lost"))

    # ----------------------------------------------------------------- connecting

    def _attempt(self) -> None:
        cfg = self.config
        self._retry_at = None
        self._conn_ids += 1
        cid = self._conn_ids
        v5 = self._v5
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else False,
            reconnect_on_failure=False,
        )
        client.max_inflight_messages_set(0)  # we keep the window ourselves
        client.max_queued_messages_set(0)
        client.connect_timeout = cfg.connect_timeout
        self._callbacks(client, cid)
        conn = _Conn(cid, client, v5, deadline=self._clock() + cfg.connect_timeout)
        try:
            with _seam(f"connect to {cfg.broker}"):
                if cfg.username is not None:
                    client.username_pw_set(cfg.username, cfg.password)
                if cfg.will is not None:
                    w = cfg.will
                    client.will_set(w.topic, w.payload, w.qos, w.retain)
                if self._ssl is not None:
                    client.tls_set_context(self._ssl)
                if v5:
                    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                    props.SessionExpiryInterval = cfg.session_expiry
                    rc = client.connect(
                        self.url.host,
                        self.url.port,
                        cfg.keepalive,
                        clean_start=False,
                        properties=props,
                    )
                else:
                    rc = client.connect(self.url.host, self.url.port, cfg.keepalive)
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    raise _rc_error(f"connect to {cfg.broker}", rc)
                rc = client.loop_start()
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    raise _rc_error("start paho's network thread", rc)
        except TransportError as exc:
            self._close_conn(conn)
            if self._ssl is not None:
                self._ssl.close_opened()
            self._connect_failed(exc)
            return
        if self._ssl is not None:
            self._ssl.opened = []  # the client's own socket: paho closes it
        self._conn = conn

    def _connect_failed(self, exc: TransportError) -> None:
        self.last_error = exc
        with self._lock:
            self._stats["connect_failures"] += 1
        if isinstance(exc, ConnectionRefused) and not self.config.retry_refused:
            log.error("giving up on %s: %s", self.config.broker, exc)
            self._set_fatal(exc)
            return
        delay = self._backoff.next_delay()
        log.info("cannot connect to %s (%s); retrying in %.1fs", self.config.broker, exc, delay)
        self._retry_at = self._clock() + delay

    def _on_connack(self, c: _Conn, session_present: bool, reason: ReasonCode, props: Any) -> None:
        if reason.is_failure:
            if (
                int(reason.value) == _UNSUPPORTED_PROTOCOL
                and c.v5
                and self.config.protocol == "auto"
            ):
                log.warning("%s does not speak MQTT 5; falling back to 3.1.1", self.config.broker)
                self._v5 = False
                self._close_conn(c)
                self._retry_at = self._clock()  # at once, no back-off
                return
            self._close_conn(c)
            self._connect_failed(_reason_error(f"connect to {self.config.broker}", reason))
            return
        c.session_present = bool(session_present)
        if c.v5 and props is not None:
            alias_max = int(getattr(props, "TopicAliasMaximum", 0) or 0)
            c.aliases = _Aliases(alias_max if self.config.topic_aliases else 0)
            c.receive_max = int(getattr(props, "ReceiveMaximum", 65535) or 65535)
            mps = getattr(props, "MaximumPacketSize", None)
            c.max_packet = int(mps) if mps else None
        c.up_since = self._clock()
        with self._lock:
            self._stats["connects"] += 1
            self._stats["protocol"] = "5" if c.v5 else "3.1.1"
        if self._subs:
            c.phase = "subscribing"
            c.deadline = self._clock() + self.config.connect_timeout
            pairs = list(self._subs.items())
            self._send_subscribe(c, pairs, None)
        else:
            self._become_ready(c)

    def _send_subscribe(
        self, c: _Conn, pairs: list[tuple[str, int]], fut: Future[list[int]] | None
    ) -> None:
        try:
            with _seam("subscribe"):
                rc, mid = c.client.subscribe(pairs)
            if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
                raise _rc_error("subscribe", rc)
        except TransportError as exc:
            if fut is not None:
                self._sub_waiters.append(([f for f, _ in pairs], fut))
            self._drop(c, exc)
            return
        if fut is None:
            c.sub_mid = mid
        c.subs[mid] = ([f for f, _ in pairs], fut if fut is not None else Future())

    def _on_suback(self, c: _Conn, mid: int, reasons: list[ReasonCode]) -> None:
        entry = c.subs.pop(mid, None)
        if entry is None:
            return
        filters, fut = entry
        granted: dict[str, int | TransportError] = {}
        for f, r in zip(filters, reasons, strict=False):
            if r.is_failure:
                granted[f] = _reason_error(f"subscribe to {f!r}", r)
                self._subs.pop(f, None)  # refused: not again on reconnect
            else:
                granted[f] = int(r.value)
        self._resolve_sub(fut, filters, granted)
        if mid == c.sub_mid:
            c.sub_mid = None
            waiters, self._sub_waiters = self._sub_waiters, []
            for wf, wfut in waiters:
                self._resolve_sub(wfut, wf, granted)
            if c.phase == "subscribing":
                self._become_ready(c)

    @staticmethod
    def _resolve_sub(
        fut: Future[list[int]], filters: list[str], granted: dict[str, int | TransportError]
    ) -> None:
        if fut.done():
            return
        out: list[int] = []
        for f in filters:
            g = granted.get(f)
            if isinstance(g, TransportError):
                fut.set_exception(g)
                return
            if g is None:
                fut.set_exception(TransportError(f"no SUBACK entry for {f!r}"))
                return
            out.append(g)
        fut.set_result(out)

    def _become_ready(self, c: _Conn) -> None:
        c.phase = "ready"
        c.last_ack_at = self._clock()
        ev = Connected(
            protocol="5" if c.v5 else "3.1.1",
            session_present=c.session_present,
            topic_alias_max=c.aliases.maximum,
            receive_max=c.receive_max,
            max_packet_size=c.max_packet,
        )
        log.info(
            "connected to %s (MQTT %s, session %s)",
            self.config.broker,
            ev.protocol,
            "kept" if c.session_present else "new",
        )
        with self._cv:
            self._connected_event = ev
            self._ready = True
            self._cv.notify_all()
        self._incoming.put(ev)

    # ----------------------------------------------------------------- sending

    def _window_open(self, c: _Conn) -> bool:
        limit = max(1, min(self.config.max_inflight, c.receive_max))
        if len(c.inflight) >= limit:
            return False
        return not c.inflight or c.inflight_bytes < self.config.max_inflight_bytes

    def _pump(self, c: _Conn, now: float) -> None:
        while c.phase == "ready" and self._window_open(c):
            out = self._pacer.pop(now)
            if out is None:
                break
            with self._lock:
                if out.ticket._state is not _State.QUEUED:
                    continue  # cancelled while queued
                out.ticket._state = _State.SENDING
            if not self._send(c, out, now):
                break
        self._set_queued()

    def _send(self, c: _Conn, out: _Out, now: float) -> bool:
        """Hand one message to paho; False when the link is going down."""
        send_topic, alias, new = (out.topic, None, False)
        if c.v5:
            send_topic, alias, new = c.aliases.resolve(out.topic)
        props = None
        if alias is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.TopicAlias = alias
        wire_topic = len(send_topic.encode("utf-8"))
        size = publish_packet_size(
            wire_topic,
            len(out.payload),
            out.qos,
            v5=c.v5,
            properties_len=_ALIAS_PROPERTY_BYTES if alias is not None else 0,
        )
        if c.max_packet is not None and size > c.max_packet:
            self._finish(
                out,
                TransportError(
                    f"a {size}-byte message is over the broker's maximum packet size "
                    f"{c.max_packet}",
                    hint="split snapshots into smaller chunks",
                ),
            )
            return True
        try:
            with _seam(f"publish to {out.topic!r}"):
                info = c.client.publish(send_topic, out.payload, out.qos, out.retain, props)
        except TransportError as exc:
            self._finish(out, exc)
            return True
        if info.rc == mqtt.MQTT_ERR_NO_CONN:
            self._requeue([out])  # the link is going down; its disconnect event follows
            return False
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self._finish(out, _rc_error(f"publish to {out.topic!r}", info.rc))
            return True
        if alias is not None:
            c.aliases.record(out.topic, alias, new)
        out.sent_at = now
        out.wire_bytes = size
        c.inflight[info.mid] = out
        c.inflight_bytes += size
        with self._lock:
            s = self._stats
            s["published"] += 1
            s["bytes_published"] += size
            s["payload_bytes"] += len(out.payload)
            s["topic_bytes"] += 2 + wire_topic
            s["alias_hits"] += 1 if alias is not None and not send_topic else 0
        return True

    def _on_puback(self, c: _Conn, mid: int, reason: ReasonCode | None) -> None:
        out = c.inflight.pop(mid, None)
        if out is None:
            return
        now = self._clock()
        c.inflight_bytes -= out.wire_bytes
        if reason is not None and reason.is_failure:
            self._finish(out, _reason_error(f"publish to {out.topic!r}", reason))
            return
        if out.qos:
            # the link (cap included) worked on it from when it was queued, or from the
            # previous acknowledgement if that came later: drain time while backlogged
            start = max(out.accepted_at, c.last_ack_at)
            with self._lock:
                self._rate.observe(out.packet_bytes, now - start, now)
            c.last_ack_at = now
        self._finish(out, None)
        self._set_queued()

    def _finish(self, out: _Out, error: TransportError | None) -> None:
        t = out.ticket
        with self._lock:
            if t._done.is_set():
                return
            t._error = error
            t._state = _State.FAILED if error else _State.DELIVERED
            self._queued_bytes -= out.packet_bytes
            self._stats["failed" if error else "delivered"] += 1
        t._done.set()

    def _requeue(self, outs: list[_Out]) -> None:
        for out in sorted(outs, key=lambda o: o.order):
            with self._lock:
                if out.ticket._state is not _State.SENDING:
                    continue
                out.ticket._state = _State.QUEUED
                self._stats["requeued"] += 1
            self._pacer.push(out, out.packet_bytes, out.ticket.priority, order=out.order)
        self._set_queued()

    def _cancel(self, ticket: PublishTicket) -> bool:
        with self._lock:
            if ticket._state is not _State.QUEUED:
                return False
            ticket._state = _State.CANCELLED
            ticket._error = TransportError(f"publish to {ticket.topic!r} was cancelled")
            self._queued_bytes -= ticket.size
            self._stats["cancelled"] += 1
        ticket._done.set()
        self._post("cancel", 0, None)
        return True

    def _set_queued(self) -> None:
        # cancelled items leave the pacer lazily (when popped); count only live ones
        self._pacer.remove(lambda o: o.ticket._state is _State.CANCELLED)
        c = self._conn
        with self._lock:
            self._stats["queued"] = len(self._pacer)
            self._stats["queued_bytes"] = self._pacer.queued_bytes
            self._stats["inflight"] = len(c.inflight) if c else 0

    def _deliver(self, msg: Message) -> None:
        with self._lock:
            self._stats["received"] += 1
            self._stats["bytes_received"] += len(msg.payload)
        self._incoming.put(msg)

    # ----------------------------------------------------------------- going down

    def _close_conn(self, c: _Conn) -> None:
        """Stop paho's thread and close the socket of ``c`` (no events, no requeue)."""
        c.phase = "down"
        with contextlib.suppress(Exception):
            c.client.disconnect()
        with contextlib.suppress(Exception):
            c.client.loop_stop()
        if self._conn is c:
            self._conn = None

    def _drop(self, c: _Conn, err: TransportError) -> None:
        """The connection ``c`` is gone: put its unacknowledged messages back in the queue
        and schedule the next attempt."""
        was_ready = c.phase == "ready"
        now = self._clock()
        self._close_conn(c)
        self._requeue(list(c.inflight.values()))
        c.inflight.clear()
        c.inflight_bytes = 0
        for filters, fut in c.subs.values():
            if not fut.done():  # resolved by the next connection's re-subscription
                self._sub_waiters.append((filters, fut))
        self.last_error = err
        if was_ready:
            with self._cv:
                self._ready = False
                self._stats["disconnects"] += 1
                self._cv.notify_all()
            self._incoming.put(Disconnected(str(err), err.rc))
            if c.up_since is not None and now - c.up_since >= self.config.stable_after:
                self._backoff.reset()
            delay = self._backoff.next_delay()
            log.warning("lost %s (%s); reconnecting in %.1fs", self.config.broker, err, delay)
            self._retry_at = now + delay
        else:
            self._connect_failed(err)

    def _disconnect(self, send_will: bool) -> None:
        c = self._conn
        if c is None:
            return
        if c.phase == "ready":
            with contextlib.suppress(Exception):
                if send_will and c.v5:
                    c.client.disconnect(
                        reasoncode=ReasonCode(
                            PacketTypes.DISCONNECT, "Disconnect with will message"
                        )
                    )
                else:
                    if send_will and self.config.will is not None:
                        w = self.config.will
                        c.client.publish(w.topic, w.payload, w.qos, w.retain).wait_for_publish(2.0)
                    c.client.disconnect()
        self._close_conn(c)

    def _set_fatal(self, exc: TransportError) -> None:
        with self._cv:
            self._fatal = exc
            self._ready = False
            self._cv.notify_all()
        self._incoming.put(Disconnected(str(exc), exc.rc, fatal=True, error=exc))
        self._fail_all(exc)

    def _fail_all(self, exc: TransportError) -> None:
        for out in self._pacer.remove(lambda o: True):
            self._finish(out, exc)
        c = self._conn
        if c is not None:
            for out in list(c.inflight.values()):
                self._finish(out, exc)
            c.inflight.clear()
        for _, fut in self._sub_waiters:
            if not fut.done():
                fut.set_exception(exc)
        self._sub_waiters = []
        self._set_queued()

    def _shutdown(self) -> None:
        with self._cv:  # from here on nothing new is posted (publish posts under the lock)
            was_ready = self._ready
            self._ready = False
            self._closed = True
            self._cv.notify_all()
        closed = TransportError("the transport was closed before delivery")
        c = self._conn
        if c is not None:
            self._close_conn(c)
            for out in list(c.inflight.values()):
                self._finish(out, closed)
        self._fail_all(closed)
        self._fail_events(closed)
        if was_ready:
            self._incoming.put(Disconnected("closed"))

    def _fail_events(self, exc: TransportError) -> None:
        """Fail the publishes and subscriptions still waiting in the event queue."""
        while True:
            try:
                kind, _, data = self._events.get_nowait()
            except queue.Empty:
                return
            if kind == "publish":
                self._finish(data, exc)
            elif kind == "subscribe" and not data[1].done():
                data[1].set_exception(exc)
