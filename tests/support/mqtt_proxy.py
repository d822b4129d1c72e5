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
"""

from __future__ import annotations

import contextlib
import socket
import threading


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


class MqttProxy:
    def __init__(
        self, upstream_port: int, *, refuse_v5: bool = False, refuse_subscribe: bool = False
    ) -> None:
        self.upstream_port = upstream_port
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
        else:
            down = threading.Thread(target=self._pipe, args=(upstream, client, "bytes_down"))
        down.daemon = True
        down.start()
        self._pipe(client, upstream, "bytes_up")

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
                    i = 1
                    while packet[i] & 0x80:
                        i += 1
                    i += 1 + 2  # remaining length, packet id
                    if level == 5:
                        plen, shift = 0, 0
                        while True:
                            b = packet[i]
                            i += 1
                            plen |= (b & 0x7F) << shift
                            shift += 7
                            if not b & 0x80:
                                break
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
