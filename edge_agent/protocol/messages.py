"""The protocol's messages: one frozen dataclass per type, and their wire form.

    from edge_agent.protocol.messages import Ack, decode, encode

    data = encode(Ack("gw-1", "job-7", epoch=1, seq=12, hash=h))   # bytes for MQTT
    msg = decode(data, "gw-1", "job-7")     # Ack(...) again: device and job from the topic

A message is a msgpack array ``[2, type code, ...fields]`` followed by a 4-byte check
(xxh32 over the topic's ids and the array's bytes, little-endian); docs/protocol.md
section 3 is normative. The device and the job are not in the array: the topic a message
travels on names them, and the check covers them, so a message moved to another device's
or job's topic fails its check.

Rules this module keeps:

* Every field is validated twice over: when a message is built here (a wrong value is a
  :class:`~edge_agent.errors.LocalProtocolError`, our own bug) and when one is decoded (a
  :class:`~edge_agent.errors.RemoteProtocolError` subclass: :class:`MalformedMessage` or
  :class:`UnsupportedMessage`). Both use the same table of field checks, so what we send is
  exactly what we accept.
* Decoding never allocates more than the input's own size: msgpack is unpacked with limits
  and no extension types, the check is verified before unpacking, and nesting is bounded.
* ``bool`` is not an ``int`` here (msgpack keeps them apart, so do we).

This module owns the message types and their encoding. It never looks at topics, sessions,
sockets or clocks.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Final, Literal, TypeAlias

import msgpack
import xxhash

from edge_agent.errors import LocalProtocolError, MalformedMessage, UnsupportedMessage

__all__ = [
    "HASH_SIZE",
    "MAX_CHUNKS",
    "MAX_HB_JOBS",
    "MAX_INT",
    "MAX_NEED_RANGES",
    "MAX_SPEC_DEPTH",
    "PROTOCOL_VERSION",
    "REASONS",
    "TYPE_CODES",
    "Ack",
    "Birth",
    "Ctl",
    "Done",
    "Heartbeat",
    "Message",
    "Nack",
    "Need",
    "Owner",
    "Query",
    "Reason",
    "Release",
    "Request",
    "Snap",
    "Status",
    "Sync",
    "chunk_span",
    "decode",
    "encode",
    "is_valid_id",
]

PROTOCOL_VERSION: Final = 2
#: Largest integer any field may hold (msgpack int64).
MAX_INT: Final = 2**63 - 1
#: State hashes are xxh3-128 digests.
HASH_SIZE: Final = 16
#: Most chunks one transfer may have (with 120 kB chunks: ~125 GB, far past any max_transfer).
MAX_CHUNKS: Final = 1 << 20
#: Most ranges one ``need`` may list; a server with more missing ranges sends the first ones.
MAX_NEED_RANGES: Final = 1024
#: Most jobs one heartbeat may report.
MAX_HB_JOBS: Final = 4096
#: Deepest nesting a birth's ``spec`` map may have.
MAX_SPEC_DEPTH: Final = 32
#: Longest ``session`` and ``model_hash`` strings.
MAX_TEXT: Final = 256

_MAX_STR: Final = 1 << 16  # longest msgpack str decode accepts (spec strings included)
_MAX_ARRAY: Final = 1 << 16
_MAX_MAP: Final = 1 << 14
_CHECK: Final = struct.Struct("<I")

Owner: TypeAlias = Literal["edge", "server"]
Request: TypeAlias = Literal["run", "handover", "stop"]
Reason: TypeAlias = Literal["base", "corrupt", "hash", "fenced", "unknown", "too-large", "invalid"]
REASONS: Final[frozenset[str]] = frozenset(
    ["base", "corrupt", "hash", "fenced", "unknown", "too-large", "invalid"]
)
_OWNERS: Final[frozenset[str]] = frozenset(["edge", "server"])
_REQUESTS: Final[frozenset[str]] = frozenset(["run", "handover", "stop"])

_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_TEXT_RE: Final = re.compile(rf"[\x21-\x7e]{{1,{MAX_TEXT}}}")  # printable ASCII, no space


def is_valid_id(value: object) -> bool:
    """Whether ``value`` is a valid device or job id (``^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$``)."""
    return type(value) is str and _ID_RE.fullmatch(value) is not None


def chunk_span(index: int, count: int, size: int) -> tuple[int, int]:
    """The byte range ``[start, stop)`` of chunk ``index`` when ``size`` bytes are cut into
    ``count`` chunks: ``start = index * size // count`` (docs/protocol.md 3.1). Every chunk is
    non-empty when ``1 <= count <= size``; lengths differ by at most one byte."""
    return index * size // count, (index + 1) * size // count


# ---------------------------------------------------------------------------------------------
# Field checks. Each takes the value and raises _Bad with a short reason; callers add the field
# name and turn _Bad into the right error (local when we build, remote when we decode).


class _Bad(Exception):
    pass


_Check: TypeAlias = Callable[[Any], None]


def _int(lo: int, hi: int = MAX_INT) -> _Check:
    def check(v: Any) -> None:
        if type(v) is not int:
            raise _Bad(f"expected an int, got {type(v).__name__}")
        if not lo <= v <= hi:
            raise _Bad(f"{v} is outside {lo}..{hi}")

    return check


def _optional(inner: _Check) -> _Check:
    def check(v: Any) -> None:
        if v is not None:
            inner(v)

    return check


def _bool(v: Any) -> None:
    if type(v) is not bool:
        raise _Bad(f"expected a bool, got {type(v).__name__}")


def _ident(v: Any) -> None:
    if type(v) is not str:
        raise _Bad(f"expected a str id, got {type(v).__name__}")
    if _ID_RE.fullmatch(v) is None:
        raise _Bad(f"{v[:80]!r} is not a valid id (^[A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}$)")


def _text(v: Any) -> None:
    if type(v) is not str:
        raise _Bad(f"expected a str, got {type(v).__name__}")
    if _TEXT_RE.fullmatch(v) is None:
        raise _Bad(f"{v[:80]!r} is not 1..{MAX_TEXT} printable ASCII characters without spaces")


def _hash(v: Any) -> None:
    if type(v) is not bytes:
        raise _Bad(f"expected {HASH_SIZE} bytes, got {type(v).__name__}")
    if len(v) != HASH_SIZE:
        raise _Bad(f"expected {HASH_SIZE} bytes, got {len(v)}")


def _choice(allowed: frozenset[str]) -> _Check:
    def check(v: Any) -> None:
        if type(v) is not str or v not in allowed:
            raise _Bad(f"{v!r} is not one of {sorted(allowed)}")

    return check


def _data(v: Any) -> None:
    if type(v) is not bytes and type(v) is not memoryview:
        raise _Bad(f"expected bytes, got {type(v).__name__}")


def _plain(v: Any, depth: int) -> None:
    """A msgpack-able plain value (what a job file holds), nested at most MAX_SPEC_DEPTH."""
    if depth > MAX_SPEC_DEPTH:
        raise _Bad(f"nested deeper than {MAX_SPEC_DEPTH}")
    kind = type(v)
    if v is None or kind in (bool, int, float, str, bytes):
        return
    if kind is list:
        for item in v:
            _plain(item, depth + 1)
        return
    if kind is dict:
        for key, item in v.items():
            if type(key) is not str:
                raise _Bad(f"map key {key!r} is not a str")
            _plain(item, depth + 1)
        return
    raise _Bad(f"a {kind.__name__} is not a plain value")


def _spec(v: Any) -> None:
    if type(v) is not dict:
        raise _Bad(f"expected a map, got {type(v).__name__}")
    _plain(v, 0)


def _hb_jobs(v: Any) -> None:
    if type(v) is not dict:
        raise _Bad(f"expected a map, got {type(v).__name__}")
    if len(v) > MAX_HB_JOBS:
        raise _Bad(f"{len(v)} jobs, over {MAX_HB_JOBS}")
    step, acked = _int(0), _optional(_int(1))
    for job, progress in v.items():
        _ident(job)
        if type(progress) not in (list, tuple) or len(progress) < 2:
            raise _Bad(f"job {job!r}: expected [step, acked_seq]")
        step(progress[0])
        acked(progress[1])


def _ranges(v: Any) -> None:
    if type(v) not in (list, tuple):
        raise _Bad(f"expected an array of ranges, got {type(v).__name__}")
    if len(v) > MAX_NEED_RANGES:
        raise _Bad(f"{len(v)} ranges, over {MAX_NEED_RANGES}")
    prev = 0
    for r in v:
        if type(r) not in (list, tuple) or len(r) != 2:
            raise _Bad("a range is [start, stop]")
        start, stop = r
        if type(start) is not int or type(stop) is not int:
            raise _Bad("range bounds are ints")
        if not prev <= start < stop <= MAX_CHUNKS:
            raise _Bad(f"range [{start}, {stop}) is empty, unsorted, overlapping or too large")
        prev = stop


# ---------------------------------------------------------------------------------------------
# The messages.

_EPOCH = _int(1)
_SEQ = _int(1)
_STEP = _int(0)
_TS = _int(0)


class _Message:
    """Shared behaviour: validation on construction against the class's field table."""

    __slots__ = ()
    TYPE: ClassVar[str]
    CHECKS: ClassVar[tuple[_Check, ...]]  # one per field after ``device``, in wire order

    def __post_init__(self) -> None:
        names = [f.name for f in fields(self)]  # type: ignore[arg-type]
        try:
            _ident(getattr(self, names[0]))
        except _Bad as exc:
            raise LocalProtocolError(f"{self.TYPE}.device: {exc}") from None
        for name, check in zip(names[1:], self.CHECKS, strict=True):
            try:
                check(getattr(self, name))
            except _Bad as exc:
                raise LocalProtocolError(f"{self.TYPE}.{name}: {exc}") from None
        self._check_relations(LocalProtocolError)

    def _check_relations(self, error: type[Exception]) -> None:
        """Checks across fields; overridden where a type has any."""


@dataclass(frozen=True, slots=True)
class Status(_Message):
    """Agent → server, retained: the device is online (or offline: the MQTT will)."""

    TYPE: ClassVar[str] = "status"
    CHECKS: ClassVar[tuple[_Check, ...]] = (_bool, _text, _TS)

    device: str
    online: bool
    session: str
    ts: int


@dataclass(frozen=True, slots=True)
class Heartbeat(_Message):
    """Agent → server: the device is alive; per job, its step and acknowledged seq."""

    TYPE: ClassVar[str] = "hb"
    CHECKS: ClassVar[tuple[_Check, ...]] = (_text, _TS, _hb_jobs)

    device: str
    session: str
    ts: int
    jobs: Mapping[str, tuple[int, int | None]]


@dataclass(frozen=True, slots=True)
class Birth(_Message):
    """Agent → server, on every (re)connect: the job, its epoch and what the agent holds."""

    TYPE: ClassVar[str] = "birth"
    CHECKS: ClassVar[tuple[_Check, ...]] = (
        _ident, _EPOCH, _text, _spec, _text, _int(0, 2**32 - 1),
        _optional(_SEQ), _optional(_hash), _STEP, _optional(_int(0)),
    )  # fmt: skip

    device: str
    job: str
    epoch: int
    session: str
    spec: Mapping[str, Any]
    model_hash: str
    codec_version: int
    acked_seq: int | None
    acked_hash: bytes | None
    step: int
    total_steps: int | None

    def _check_relations(self, error: type[Exception]) -> None:
        if (self.acked_seq is None) != (self.acked_hash is None):
            raise error("birth: acked_seq and acked_hash are both nil or both set")


@dataclass(frozen=True, slots=True)
class Snap(_Message):
    """Agent → server: chunk ``index`` of ``count`` of snapshot ``seq`` (``size`` bytes)."""

    TYPE: ClassVar[str] = "snap"
    CHECKS: ClassVar[tuple[_Check, ...]] = (
        _ident, _EPOCH, _SEQ, _optional(_SEQ), _STEP,
        _int(0, MAX_CHUNKS - 1), _int(1, MAX_CHUNKS), _int(1), _data,
    )  # fmt: skip

    device: str
    job: str
    epoch: int
    seq: int
    base_seq: int | None
    step: int
    index: int
    count: int
    size: int
    data: bytes | memoryview

    def _check_relations(self, error: type[Exception]) -> None:
        if self.base_seq is not None and self.base_seq >= self.seq:
            raise error(f"snap: base_seq {self.base_seq} is not below seq {self.seq}")
        if not self.count <= self.size:
            raise error(f"snap: count {self.count} is over size {self.size}")
        if not self.index < self.count:
            raise error(f"snap: index {self.index} is not below count {self.count}")
        start, stop = chunk_span(self.index, self.count, self.size)
        if len(self.data) != stop - start:
            raise error(
                f"snap: chunk {self.index} of {self.count} for {self.size} bytes must hold "
                f"{stop - start} bytes, not {len(self.data)}"
            )


@dataclass(frozen=True, slots=True)
class Query(_Message):
    """Agent → server: what do you hold of snapshot ``seq`` (``count`` chunks)?"""

    TYPE: ClassVar[str] = "query"
    CHECKS: ClassVar[tuple[_Check, ...]] = (_ident, _EPOCH, _SEQ, _int(1, MAX_CHUNKS))

    device: str
    job: str
    epoch: int
    seq: int
    count: int


@dataclass(frozen=True, slots=True)
class Done(_Message):
    """Agent → server: the job finished on the device; ``seq`` is its final snapshot."""

    TYPE: ClassVar[str] = "done"
    CHECKS: ClassVar[tuple[_Check, ...]] = (_ident, _EPOCH, _SEQ, _STEP)

    device: str
    job: str
    epoch: int
    seq: int
    step: int


@dataclass(frozen=True, slots=True)
class Release(_Message):
    """Agent → server, in a live hand-over: ``seq`` is final; the server may take over."""

    TYPE: ClassVar[str] = "release"
    CHECKS: ClassVar[tuple[_Check, ...]] = (_ident, _EPOCH, _SEQ, _STEP)

    device: str
    job: str
    epoch: int
    seq: int
    step: int


@dataclass(frozen=True, slots=True)
class Sync(_Message):
    """Server → agent, the answer to a birth: the job's epoch, owner and current state."""

    TYPE: ClassVar[str] = "sync"
    CHECKS: ClassVar[tuple[_Check, ...]] = (
        _ident, _EPOCH, _choice(_OWNERS), _optional(_SEQ), _optional(_hash),
    )  # fmt: skip

    device: str
    job: str
    epoch: int
    owner: Owner
    seq: int | None
    hash: bytes | None

    def _check_relations(self, error: type[Exception]) -> None:
        if (self.seq is None) != (self.hash is None):
            raise error("sync: seq and hash are both nil or both set")


@dataclass(frozen=True, slots=True)
class Ack(_Message):
    """Server → agent: snapshot ``seq`` is applied, verified and stored; it is the job's
    current state and hashes to ``hash``."""

    TYPE: ClassVar[str] = "ack"
    CHECKS: ClassVar[tuple[_Check, ...]] = (_ident, _EPOCH, _SEQ, _hash)

    device: str
    job: str
    epoch: int
    seq: int
    hash: bytes


@dataclass(frozen=True, slots=True)
class Nack(_Message):
    """Server → agent: snapshot ``seq`` (0: no particular one) was refused for ``reason``;
    ``have_*`` is the server's current state."""

    TYPE: ClassVar[str] = "nack"
    CHECKS: ClassVar[tuple[_Check, ...]] = (
        _ident, _EPOCH, _int(0), _choice(REASONS), _optional(_SEQ), _optional(_hash),
    )  # fmt: skip

    device: str
    job: str
    epoch: int
    seq: int
    reason: Reason
    have_seq: int | None
    have_hash: bytes | None

    def _check_relations(self, error: type[Exception]) -> None:
        if (self.have_seq is None) != (self.have_hash is None):
            raise error("nack: have_seq and have_hash are both nil or both set")


@dataclass(frozen=True, slots=True)
class Need(_Message):
    """Server → agent: of snapshot ``seq``, these chunk ranges ``[start, stop)`` are missing."""

    TYPE: ClassVar[str] = "need"
    CHECKS: ClassVar[tuple[_Check, ...]] = (_ident, _EPOCH, _SEQ, _ranges)

    device: str
    job: str
    epoch: int
    seq: int
    missing: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class Ctl(_Message):
    """Server → agent, retained: who owns the job at ``epoch`` and what it asks of the agent."""

    TYPE: ClassVar[str] = "ctl"
    CHECKS: ClassVar[tuple[_Check, ...]] = (
        _ident,
        _EPOCH,
        _choice(_OWNERS),
        _choice(_REQUESTS),
        _TS,
    )

    device: str
    job: str
    epoch: int
    owner: Owner
    request: Request
    ts: int


Message: TypeAlias = (
    Status | Heartbeat | Birth | Snap | Query | Done | Release | Sync | Ack | Nack | Need | Ctl
)

_CLASSES: Final = (Status, Heartbeat, Birth, Snap, Query, Done, Release, Sync, Ack, Nack, Need, Ctl)
_TYPES: Final[dict[str, type[Any]]] = {cls.TYPE: cls for cls in _CLASSES}

#: The integer code of each message type on the wire (docs/protocol.md section 3).
TYPE_CODES: Final[dict[str, int]] = {
    "status": 1, "hb": 2, "birth": 3, "snap": 4, "query": 5, "done": 6, "release": 7,
    "sync": 8, "ack": 9, "nack": 10, "need": 11, "ctl": 12,
}  # fmt: skip
#: A ``snap`` that is the whole payload (chunk 0 of 1): ``index``, ``count`` and ``size`` are
#: left out (0, 1 and the data's length).
SNAP_WHOLE_CODE: Final = 13
_BY_CODE: Final[dict[int, type[Any]]] = {TYPE_CODES[cls.TYPE]: cls for cls in _CLASSES}
#: Types that travel on a device's own topics (no job): status, hb.
_DEVICE_WIDE: Final = frozenset({Status, Heartbeat})

# Fields whose values are a fixed set of strings travel as their index in that set.
_OWNER_CODES: Final = ("edge", "server")
_REQUEST_CODES: Final = ("run", "handover", "stop")
_REASON_CODES: Final = ("base", "corrupt", "hash", "fenced", "unknown", "too-large", "invalid")
_ENUMS: Final[dict[tuple[type[Any], str], tuple[str, ...]]] = {
    (Sync, "owner"): _OWNER_CODES,
    (Ctl, "owner"): _OWNER_CODES,
    (Ctl, "request"): _REQUEST_CODES,
    (Nack, "reason"): _REASON_CODES,
}


def _wire_fields(cls: type[Any]) -> list[str]:
    """The fields of ``cls`` that travel in the array, in order (not the device, nor the job:
    the topic names them)."""
    return [f.name for f in fields(cls) if f.name not in ("device", "job")]


_WIRE_FIELDS: Final[dict[type[Any], list[str]]] = {cls: _wire_fields(cls) for cls in _CLASSES}
_SNAP_WHOLE_FIELDS: Final = ["epoch", "seq", "base_seq", "step", "data"]


def _ids(device: str, job: str | None) -> bytes:
    """What the check covers besides the array: the topic's device and job."""
    return f"{device}/{job or ''}\n".encode()


def _check(device: str, job: str | None, body: bytes | memoryview) -> int:
    h = xxhash.xxh32(_ids(device, job))
    h.update(body)
    return h.intdigest()


# ---------------------------------------------------------------------------------------------
# Wire form.


def encode(msg: Message) -> bytes:
    """The wire bytes of a message: the msgpack array, then its 4-byte check. A ``snap``
    that carries a whole payload takes the short form (no index, count, size)."""
    cls = type(msg)
    names = _WIRE_FIELDS[cls]
    code = TYPE_CODES[msg.TYPE]
    if isinstance(msg, Snap) and msg.count == 1:
        code, names = SNAP_WHOLE_CODE, _SNAP_WHOLE_FIELDS
    values: list[Any] = [PROTOCOL_VERSION, code]
    for name in names:
        value = getattr(msg, name)
        if isinstance(value, Mapping):
            value = dict(value)
        choices = _ENUMS.get((cls, name))
        if choices is not None:
            value = choices.index(value)
        values.append(value)
    body: bytes = msgpack.packb(values, use_bin_type=True)
    job: str | None = getattr(msg, "job", None)
    return body + _CHECK.pack(_check(msg.device, job, body))


def _unpack(data: bytes | bytearray | memoryview, device: str, job: str | None) -> Any:
    if len(data) < 1 + _CHECK.size:
        raise MalformedMessage(f"a message of {len(data)} bytes is shorter than any message")
    view = memoryview(data)
    body, check = view[: -_CHECK.size], view[-_CHECK.size :]
    if _check(device, job, body) != _CHECK.unpack(check)[0]:
        raise MalformedMessage(
            "the message's check does not match its bytes and topic (corrupted, or sent for "
            "another device or job)"
        )
    try:
        return msgpack.unpackb(
            body,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=min(len(body), _MAX_STR),
            max_bin_len=len(body),
            max_array_len=min(len(body), _MAX_ARRAY),
            max_map_len=min(len(body), _MAX_MAP),
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises ValueError, ExtraData, FormatError, StackError...
        raise MalformedMessage(f"the message is not valid msgpack: {exc}") from exc


def decode(data: bytes | bytearray | memoryview, device: str, job: str | None = None) -> Message:
    """Parse and validate wire bytes received on the topic of ``device`` (and ``job``, for
    a job's topics: None on a device-wide one). Raises :class:`MalformedMessage` (bad check,
    not msgpack, too few fields, a field of the wrong type or out of bounds, a job's message
    without a job) or :class:`UnsupportedMessage` (unknown version or type); never anything
    else."""
    raw = _unpack(data, device, job)
    if type(raw) is not list or len(raw) < 2:
        raise MalformedMessage("a message is an array [version, type, ...]")
    version, code = raw[0], raw[1]
    if type(version) is not int:
        raise MalformedMessage(f"message version {version!r} is not an int")
    if version != PROTOCOL_VERSION:
        raise UnsupportedMessage(
            f"message version {version} is not {PROTOCOL_VERSION}",
            hint="the peer runs another protocol version; upgrade the older side",
        )
    if type(code) is not int:
        raise MalformedMessage(f"message type {code!r} is not an int")
    whole = code == SNAP_WHOLE_CODE
    cls = Snap if whole else _BY_CODE.get(code)
    if cls is None:
        raise UnsupportedMessage(f"unknown message type {code}")
    names = _SNAP_WHOLE_FIELDS if whole else _WIRE_FIELDS[cls]
    kind = cls.TYPE
    if len(raw) < 2 + len(names):
        raise MalformedMessage(f"a {kind} message has {len(names)} fields, this one {len(raw) - 2}")
    kwargs: dict[str, Any] = dict(zip(names, raw[2 : 2 + len(names)], strict=True))
    for name in names:  # extra fields are ignored
        choices = _ENUMS.get((cls, name))
        if choices is not None:
            v = kwargs[name]
            if type(v) is not int or not 0 <= v < len(choices):
                raise MalformedMessage(f"{kind}.{name}: {v!r} is not a code 0..{len(choices) - 1}")
            kwargs[name] = choices[v]
    if cls not in _DEVICE_WIDE:
        if job is None:
            raise MalformedMessage(f"a {kind} message travels on a job's topic")
        kwargs["job"] = job
    if whole:
        data_ = kwargs["data"]
        n = len(data_) if type(data_) in (bytes, memoryview) else 1
        kwargs.update(index=0, count=1, size=n)
    if cls is Heartbeat and type(kwargs["jobs"]) is dict:
        kwargs["jobs"] = {
            j: tuple(p[:2]) if type(p) is list else p for j, p in kwargs["jobs"].items()
        }
    elif cls is Need and type(kwargs["missing"]) is list:
        kwargs["missing"] = tuple(tuple(r) if type(r) is list else r for r in kwargs["missing"])
    try:
        msg = cls(device, **kwargs)
    except LocalProtocolError as exc:  # the same field table validates both directions
        raise MalformedMessage(str(exc)) from None
    return msg
