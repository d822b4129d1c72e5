"""A TCP proxy in front of a real broker, for link faults and old-broker behaviour.

* ``refuse_v5=True`` answers an MQTT 5 CONNECT the way an MQTT 3.1.1-only broker must
  (CONNACK with return code 1, "unacceptable protocol version", then close) and forwards
  every other connection: a 3.1.1-only broker with Mosquitto behind it.
* ``hold()`` closes new connections at once until ``release()``; ``cut()`` closes the open
  ones: a link that drops while the broker stays up.
* ``block()`` stops forwarding in both directions until ``unblock()``, while every socket
  stays open (new connections are accepted and wait too): a link that goes silent, as a
  cellular or satellite link does, without either end seeing a close. What was sent meanwhile
  waits in the proxy and the kernel's buffers and is delivered, in order, after
  ``unblock()``, unless an end gives up on the connection first (MQTT keep-alive).
* ``refuse_subscribe=True`` rewrites every SUBACK into a refusal ("not authorized"), which
  Mosquitto 2.0's ACL files never send (they grant and then filter).
* ``bytes_up`` / ``bytes_down`` count the TCP payload bytes forwarded client to broker and
  broker to client (the link benchmark's bytes on the wire).
* ``packets=True`` forwards whole MQTT packets (instead of whatever ``recv`` returns), which
  lets a test damage traffic in flight: ``inject("corrupt" | "duplicate", "up" | "down",
  topic_suffix)`` arms a one-shot fault on the next PUBLISH whose topic ends so: ``corrupt``
  flips bytes of its payload (topic, packet id and framing stay valid, so the broker
  delivers it), ``duplicate`` forwards it twice (the copy with the DUP flag for QoS > 0).
  The returned :class:`Injection` says when it landed and on which topic.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from dataclasses import dataclass, field


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _read_packet(sock: socket.socket) -> bytes | None:
    """One whole MQTT packet (fixed header, remaining length, body), or None at EOF."""
    first = _recv_exact(sock, 1)
    if first is None:
        return None
    header = first
    remaining, shift = 0, 0
    while True:
        b = _recv_exact(sock, 1)
        if b is None:
            return None
        header += b
        remaining |= (b[0] & 0x7F) << shift
        shift += 7
        if not b[0] & 0x80:
            break
    body = _recv_exact(sock, remaining) if remaining else b""
    return None if body is None else header + body


def connect_protocol_level(packet: bytes) -> int:
    """The protocol level of a CONNECT packet (4: MQTT 3.1.1, 5: MQTT 5)."""
    i = 1
    while packet[i] & 0x80:
        i += 1
    i += 1
    name_len = int.from_bytes(packet[i : i + 2], "big")
    return packet[i + 2 + name_len]


def read_varint(buf: bytes | bytearray, i: int) -> tuple[int, int]:
    """An MQTT variable byte integer at ``buf[i]``: (value, the index after it)."""
    value, shift = 0, 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


#: MQTT 5 PUBLISH properties by identifier: how to skip their value
_PROP_FIXED = {0x01: 1, 0x02: 4, 0x23: 2}
_PROP_BINARY = {0x03, 0x08, 0x09}  # two-byte length, then the bytes
_PROP_PAIR = {0x26}  # two strings
_PROP_VARINT = {0x0B}


def parse_publish(packet: bytes, level: int) -> tuple[str, int | None, int]:
    """(topic as sent, its MQTT 5 topic alias or None, offset of the payload) of a
    PUBLISH packet at protocol ``level``. An alias-only PUBLISH has the topic ``""``."""
    _, i = read_varint(packet, 1)
    tlen = int.from_bytes(packet[i : i + 2], "big")
    topic = packet[i + 2 : i + 2 + tlen].decode("utf-8", errors="replace")
    i += 2 + tlen
    if (packet[0] >> 1) & 3:  # QoS > 0: a packet id
        i += 2
    alias = None
    if level == 5:
        plen, i = read_varint(packet, i)
        end = i + plen
        while i < end:
            pid = packet[i]
            i += 1
            if pid == 0x23:
                alias = int.from_bytes(packet[i : i + 2], "big")
            if pid in _PROP_FIXED:
                i += _PROP_FIXED[pid]
            elif pid in _PROP_BINARY:
                i += 2 + int.from_bytes(packet[i : i + 2], "big")
            elif pid in _PROP_PAIR:
                for _ in range(2):
                    i += 2 + int.from_bytes(packet[i : i + 2], "big")
            elif pid in _PROP_VARINT:
                _, i = read_varint(packet, i)
            else:  # unknown: the rest of the properties cannot be read
                i = end
        i = end
    return topic, alias, i


class TopicAliases:
    """One direction of one connection: MQTT 5 topic aliases seen so far."""

    def __init__(self) -> None:
        self.topics: dict[int, str] = {}

    def resolve(self, packet: bytes, level: int) -> tuple[str, int]:
        """(the topic of a PUBLISH, aliases resolved; the payload's offset)."""
        topic, alias, off = parse_publish(packet, level)
        if alias is not None:
            if topic:
                self.topics[alias] = topic
            else:
                topic = self.topics.get(alias, "")
        return topic, off


@dataclass
class Injection:
    """A one-shot fault armed on a proxy (:meth:`MqttProxy.inject`)."""

    action: str  # "corrupt" or "duplicate"
    direction: str  # "up" (client to broker) or "down"
    topic_suffix: str
    seed: int = 0
    landed: bool = False
    at: float | None = None  # time.time() when it was applied
    topic: str | None = None
    size: int = 0  # the payload's size
    flipped: list[int] = field(default_factory=list)  # payload offsets corrupted
    done: threading.Event = field(default_factory=threading.Event)

    def apply(self, packet: bytes, topic: str, off: int) -> list[bytes] | None:
        """The packets to forward instead of the PUBLISH ``packet`` (``topic`` resolved, its
        payload at ``off``), or None when it does not match."""
        if not topic.endswith(self.topic_suffix) or off >= len(packet):
            return None
        self.topic, self.size = topic, len(packet) - off
        if self.action == "duplicate":
            copy = bytes([packet[0] | 0x08]) + packet[1:] if (packet[0] >> 1) & 3 else packet
            out = [packet, copy]
        else:
            rng = random.Random(self.seed)
            data = bytearray(packet)
            for _ in range(rng.randint(1, 4)):
                pos = rng.randrange(off, len(data))
                data[pos] ^= rng.randint(1, 255)
                self.flipped.append(pos - off)
            out = [bytes(data)]
        self.at = time.time()
        self.landed = True
        self.done.set()
        return out


class MqttProxy:
    def __init__(
        self,
        upstream_port: int,
        *,
        refuse_v5: bool = False,
        refuse_subscribe: bool = False,
        packets: bool = False,
    ) -> None:
        self.upstream_port = upstream_port
        self.packets = packets
        self._armed: list[Injection] = []
        self.refuse_v5 = refuse_v5
        self.refuse_subscribe = refuse_subscribe
        self.refused_v5 = 0
        self.forwarded: list[int] = []  # protocol levels of forwarded connections
        self.bytes_up = 0  # client -> broker, CONNECT included
        self.bytes_down = 0  # broker -> client
        self._held = False
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port = int(self._listener.getsockname()[1])
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> MqttProxy:
        self._thread.start()
        return self

    def hold(self) -> None:
        self._held = True

    def release(self) -> None:
        self._held = False

    def block(self) -> None:
        """Stop forwarding (both directions, open connections and new ones); sockets stay open."""
        self._flowing.clear()

    def unblock(self) -> None:
        self._flowing.set()

    def inject(self, action: str, direction: str, topic_suffix: str, *, seed: int = 0) -> Injection:
        """Arm a one-shot ``corrupt`` or ``duplicate`` of the next PUBLISH going ``direction``
        (``up``: client to broker, ``down``) whose topic ends with ``topic_suffix``. Needs
        ``packets=True``."""
        if not self.packets:
            raise RuntimeError("inject() needs MqttProxy(..., packets=True)")
        if action not in ("corrupt", "duplicate") or direction not in ("up", "down"):
            raise ValueError(f"cannot {action} {direction}")
        inj = Injection(action, direction, topic_suffix, seed=seed)
        with self._lock:
            self._armed.append(inj)
        return inj

    def disarm(self, inj: Injection) -> None:
        with self._lock:
            if inj in self._armed:
                self._armed.remove(inj)

    def _injected(
        self, packet: bytes, direction: str, level: int, aliases: TopicAliases
    ) -> list[bytes]:
        if packet[0] >> 4 != 3:  # not a PUBLISH
            return [packet]
        topic, off = aliases.resolve(packet, level)
        with self._lock:
            for inj in self._armed:
                if inj.direction == direction:
                    out = inj.apply(packet, topic, off)
                    if out is not None:
                        self._armed.remove(inj)
                        return out
        return [packet]

    @property
    def blocked(self) -> bool:
        return not self._flowing.is_set()

    def _wait_flowing(self, *socks: socket.socket) -> bool:
        """Wait while blocked; False if the proxy stopped or a socket was cut meanwhile."""
        while not self._flowing.wait(0.05):
            with self._lock:
                gone = self._closed or any(s not in self._socks for s in socks)
            if gone:
                return False
        return not self._closed

    def cut(self) -> None:
        with self._lock:
            socks, self._socks = self._socks, set()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def stop(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self.cut()
        self._thread.join(5)

    def __enter__(self) -> MqttProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._held:
                client.close()
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            connect = _read_packet(client)
            if connect is None or connect[0] >> 4 != 1:
                client.close()
                return
            level = connect_protocol_level(connect)
            if level == 5 and self.refuse_v5:
                self.refused_v5 += 1
                client.sendall(b"\x20\x02\x00\x01")
                client.close()
                return
            with self._lock:
                self._socks.add(client)
            if not self._wait_flowing(client):  # a silent link: the CONNECT waits here
                raise OSError("cut while blocked")
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            upstream.settimeout(None)
        except OSError:
            with self._lock:
                self._socks.discard(client)
            client.close()
            return
        self.forwarded.append(level)
        with self._lock:
            self._socks |= {client, upstream}
            self.bytes_up += len(connect)
        upstream.sendall(connect)
        if self.refuse_subscribe:
            down = threading.Thread(target=self._pipe_refusing, args=(upstream, client, level))
        elif self.packets:
            down = threading.Thread(
                target=self._pipe_packets, args=(upstream, client, "down", level)
            )
        else:
            down = threading.Thread(target=self._pipe, args=(upstream, client, "bytes_down"))
        down.daemon = True
        down.start()
        if self.packets:
            self._pipe_packets(client, upstream, "up", level)
        else:
            self._pipe(client, upstream, "bytes_up")

    def _pipe_packets(
        self, src: socket.socket, dst: socket.socket, direction: str, level: int
    ) -> None:
        """Packet by packet, through the armed injections."""
        counter = "bytes_up" if direction == "up" else "bytes_down"
        aliases = TopicAliases()
        try:
            while True:
                packet = _read_packet(src)
                if packet is None:
                    break
                if not self._wait_flowing(src, dst):
                    break
                for out in self._injected(packet, direction, level, aliases):
                    dst.sendall(out)
                with self._lock:
                    setattr(self, counter, getattr(self, counter) + len(packet))
        except OSError:
            pass
        finally:
            self._close_pair(src, dst)

    def _pipe_refusing(self, src: socket.socket, dst: socket.socket, level: int) -> None:
        """Broker to client, packet by packet, with every SUBACK turned into a refusal."""
        try:
            while True:
                packet = _read_packet(src)
                if packet is None:
                    break
                if not self._wait_flowing(src, dst):
                    break
                if packet[0] >> 4 == 9:  # SUBACK
                    _, i = read_varint(packet, 1)  # remaining length
                    i += 2  # packet id
                    if level == 5:
                        plen, i = read_varint(packet, i)
                        i += plen
                    code = 0x87 if level == 5 else 0x80
                    packet = packet[:i] + bytes([code]) * (len(packet) - i)
                dst.sendall(packet)
        except OSError:
            pass
        finally:
            self._close_pair(src, dst)

    def _pipe(self, src: socket.socket, dst: socket.socket, counter: str | None = None) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not self._wait_flowing(src, dst):
                    break
                dst.sendall(data)
                if counter is not None:
                    with self._lock:
                        setattr(self, counter, getattr(self, counter) + len(data))
        except OSError:
            pass
        finally:
            self._close_pair(src, dst)

    def _close_pair(self, src: socket.socket, dst: socket.socket) -> None:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        with self._lock:
            self._socks.discard(src)
            self._socks.discard(dst)
        src.close()
