"""Messages: round trips, strict validation both ways, and fuzzing of the decoder (hypothesis
plus tens of thousands of seeded mutations, of raw bytes and of the msgpack structure with a
valid check, so that the field validation itself is fuzzed)."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import struct
from typing import Any

import msgpack
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.errors import (
    LocalProtocolError,
    MalformedMessage,
    RemoteProtocolError,
    UnsupportedMessage,
)
from edge_agent.protocol.messages import (
    MAX_CHUNKS,
    MAX_INT,
    MAX_NEED_RANGES,
    MAX_SPEC_DEPTH,
    PROTOCOL_VERSION,
    SNAP_WHOLE_CODE,
    TYPE_CODES,
    Ack,
    Birth,
    Ctl,
    Done,
    Heartbeat,
    Message,
    Nack,
    Need,
    Query,
    Release,
    Snap,
    Status,
    Sync,
    chunk_span,
    decode,
    encode,
    is_valid_id,
)

H = bytes(range(16))
H2 = bytes(range(1, 17))

# -- strategies -------------------------------------------------------------------------------

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True)
texts = st.from_regex(r"[\x21-\x7e]{1,60}", fullmatch=True)
hashes = st.binary(min_size=16, max_size=16)
epochs = st.integers(1, MAX_INT)
seqs = st.integers(1, MAX_INT)
steps = st.integers(0, MAX_INT)
plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=12,
)
specs = st.dictionaries(st.text(max_size=10), plain, max_size=5)


@st.composite
def snaps(draw: Any) -> Snap:
    size = draw(st.integers(1, 3000))
    count = draw(st.integers(1, min(size, 40)))
    index = draw(st.integers(0, count - 1))
    a, b = chunk_span(index, count, size)
    seq = draw(seqs)
    base = draw(st.none() | st.integers(1, max(1, seq - 1)))
    if base is not None and base >= seq:
        base = None
    return Snap(
        draw(ids),
        draw(ids),
        draw(epochs),
        seq,
        base,
        draw(steps),
        index,
        count,
        size,
        draw(st.binary(min_size=b - a, max_size=b - a)),
    )


@st.composite
def ranges(draw: Any) -> tuple[tuple[int, int], ...]:
    cuts = sorted(set(draw(st.lists(st.integers(0, MAX_CHUNKS), max_size=20))))
    pairs = list(zip(cuts[::2], cuts[1::2], strict=False))
    return tuple((a, b) for a, b in pairs if a < b)


def both_or_none(values: Any, hs: Any = hashes) -> Any:
    return st.one_of(st.tuples(st.none(), st.none()), st.tuples(values, hs))


@st.composite
def births(draw: Any) -> Birth:
    acked_seq, acked_hash = draw(both_or_none(seqs))
    return Birth(
        draw(ids),
        draw(ids),
        draw(epochs),
        draw(texts),
        draw(specs),
        draw(texts),
        draw(st.integers(0, 2**32 - 1)),
        acked_seq,
        acked_hash,
        draw(steps),
        draw(st.none() | steps),
    )


@st.composite
def syncs(draw: Any) -> Sync:
    seq, h = draw(both_or_none(seqs))
    return Sync(
        draw(ids), draw(ids), draw(epochs), draw(st.sampled_from(["edge", "server"])), seq, h
    )


@st.composite
def nacks(draw: Any) -> Nack:
    seq, h = draw(both_or_none(seqs))
    reason = draw(
        st.sampled_from(["base", "corrupt", "hash", "fenced", "unknown", "too-large", "invalid"])
    )
    return Nack(draw(ids), draw(ids), draw(epochs), draw(st.integers(0, MAX_INT)), reason, seq, h)


messages = st.one_of(
    st.builds(Status, ids, st.booleans(), texts, steps),
    st.builds(
        Heartbeat,
        ids,
        texts,
        steps,
        st.dictionaries(ids, st.tuples(steps, st.none() | seqs), max_size=5),
    ),
    births(),
    snaps(),
    st.builds(Query, ids, ids, epochs, seqs, st.integers(1, MAX_CHUNKS)),
    st.builds(Done, ids, ids, epochs, seqs, steps),
    st.builds(Release, ids, ids, epochs, seqs, steps),
    syncs(),
    st.builds(Ack, ids, ids, epochs, seqs, hashes),
    nacks(),
    st.builds(Need, ids, ids, epochs, seqs, ranges()),
    st.builds(
        Ctl,
        ids,
        ids,
        epochs,
        st.sampled_from(["edge", "server"]),
        st.sampled_from(["run", "handover", "stop"]),
        steps,
    ),
)


def samples() -> list[Message]:
    """One valid message of every type, for the seeded fuzzers."""
    return [
        Status("gw-1", True, "run-1", 1_700_000_000_000),
        Heartbeat("gw-1", "run-1", 5, {"j1": (3, None), "j2": (40, 2)}),
        Birth(
            "gw-1",
            "j1",
            1,
            "run-1",
            {"model": "m.onnx", "params": {"n": [1, 2.5, None]}},
            "sha256:abc",
            3,
            4,
            H,
            99,
            1000,
        ),
        Snap("gw-1", "j1", 2, 7, 6, 99, 1, 3, 10, b"\x00\x01\x02"),
        Query("gw-1", "j1", 2, 7, 3),
        Done("gw-1", "j1", 2, 7, 1000),
        Release("gw-1", "j1", 2, 7, 1000),
        Sync("gw-1", "j1", 2, "edge", 6, H),
        Ack("gw-1", "j1", 2, 7, H2),
        Nack("gw-1", "j1", 2, 7, "base", 6, H),
        Need("gw-1", "j1", 2, 7, ((0, 1), (2, 3))),
        Ctl("gw-1", "j1", 3, "server", "run", 5),
    ]


def where_of(msg: Message) -> tuple[str, str | None]:
    """The topic ids a message travels under: its device and, for a job's message, its job."""
    return msg.device, getattr(msg, "job", None)


def check_of(body: bytes, device: str = "gw-1", job: str | None = "j1") -> bytes:
    """The 4-byte check: xxh32 over ``device/job\\n`` and the array's bytes."""
    return struct.pack("<I", xxhash.xxh32_intdigest(f"{device}/{job or ''}\n".encode() + body))


def seal(values: Any, device: str = "gw-1", job: str | None = "j1") -> bytes:
    body = msgpack.packb(values, use_bin_type=True)
    return body + check_of(body, device, job)


def fields_of(msg: Message) -> list[Any]:
    return [getattr(msg, f.name) for f in dataclasses.fields(msg)]


def wire_values(msg: Message) -> list[Any]:
    return msgpack.unpackb(encode(msg)[:-4], raw=False, strict_map_key=False)  # type: ignore[no-any-return]


# -- round trips ------------------------------------------------------------------------------


@settings(max_examples=600, deadline=None)
@given(messages)
def test_round_trip(msg: Message) -> None:
    data = encode(msg)
    assert decode(data, *where_of(msg)) == msg
    assert decode(bytearray(data), *where_of(msg)) == msg
    assert decode(memoryview(data), *where_of(msg)) == msg


def test_every_type_round_trips_and_has_the_documented_layout() -> None:
    assert PROTOCOL_VERSION == 2
    for msg in samples():
        data = encode(msg)
        assert decode(data, *where_of(msg)) == msg
        raw = wire_values(msg)
        assert raw[:2] == [2, TYPE_CODES[msg.TYPE]]
        # the topic names the device and the job: the payload does not repeat them
        assert b"gw-1" not in data
        if not isinstance(msg, Heartbeat):  # a heartbeat's map names its jobs
            assert b"j1" not in data
    assert sorted(TYPE_CODES.values()) == list(range(1, 13)) and SNAP_WHOLE_CODE == 13


def test_enumerated_fields_travel_as_codes() -> None:
    assert wire_values(Ctl("gw-1", "j1", 3, "server", "stop", 5))[3:5] == [1, 2]
    assert wire_values(Sync("gw-1", "j1", 2, "edge", None, None))[3] == 0
    assert wire_values(Nack("gw-1", "j1", 2, 7, "invalid", None, None))[4] == 6


def test_a_whole_payload_snap_takes_the_short_form() -> None:
    whole = Snap("gw-1", "j1", 2, 7, 6, 300, 0, 1, 5, b"abcde")
    assert wire_values(whole) == [2, SNAP_WHOLE_CODE, 2, 7, 6, 300, b"abcde"]
    assert decode(encode(whole), "gw-1", "j1") == whole
    long_form = seal([2, TYPE_CODES["snap"], 2, 7, 6, 300, 0, 1, 5, b"abcde"])
    assert decode(long_form, "gw-1", "j1") == whole  # the long form is valid too
    assert len(encode(whole)) == len(long_form) - 3
    with pytest.raises(MalformedMessage):  # a whole payload is at least one byte
        decode(seal([2, SNAP_WHOLE_CODE, 2, 7, 6, 300, b""]), "gw-1", "j1")
    with pytest.raises(MalformedMessage):
        decode(seal([2, SNAP_WHOLE_CODE, 2, 7, 6, 300, "abc"]), "gw-1", "j1")


def test_a_message_is_bound_to_its_topic_ids() -> None:
    """The check covers the topic's device and job: a message published under another
    device's or job's topic than it was made for is refused, so a device cannot pass off a
    message as another's even where the broker's ACL would let it through."""
    ack = encode(Ack("gw-1", "j1", 2, 7, H))
    assert decode(ack, "gw-1", "j1") == Ack("gw-1", "j1", 2, 7, H)
    for device, job in [("gw-2", "j1"), ("gw-1", "j2"), ("gw-1", None), ("gw-1j", "1")]:
        with pytest.raises(MalformedMessage, match="another device or job"):
            decode(ack, device, job)
    status = encode(Status("gw-1", True, "run-1", 0))
    with pytest.raises(MalformedMessage):
        decode(status, "gw-1", "j1")
    with pytest.raises(MalformedMessage, match="job's topic"):  # a job's message, no job
        decode(seal([2, TYPE_CODES["ack"], 2, 7, H], "gw-1", None), "gw-1", None)
    with pytest.raises(MalformedMessage, match="not a valid id"):
        decode(seal([2, TYPE_CODES["ack"], 2, 7, H], "gw+1", "j1"), "gw+1", "j1")
    with pytest.raises(MalformedMessage, match="not a valid id"):
        decode(seal([2, TYPE_CODES["ack"], 2, 7, H], "gw-1", "j 1"), "gw-1", "j 1")


def test_snap_data_from_a_memoryview_is_sent_as_bin() -> None:
    payload = b"0123456789"
    snap = Snap("gw-1", "j1", 1, 1, None, 0, 1, 3, 10, memoryview(payload)[3:6])
    back = decode(encode(snap), "gw-1", "j1")
    assert isinstance(back, Snap) and back.data == b"345" and type(back.data) is bytes


def test_extra_trailing_fields_are_ignored() -> None:
    for msg in samples():
        raw = wire_values(msg)
        assert decode(seal([*raw, "future", 1, None], *where_of(msg)), *where_of(msg)) == msg


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("index", "value", "why"),
    [
        (2, True, "bool is not an int"),
        (2, 0, "epoch starts at 1"),
        (2, 2**63, "over int64"),
        (3, -1, "negative seq"),
        (4, 6.0, "a float base_seq"),
        (4, 7, "base_seq not below seq"),
        (6, 3, "index == count"),
        (7, 11, "count > size"),
        (8, 0, "size 0"),
        (9, b"\x00\x01", "data shorter than its span"),
        (9, "abc", "data as str"),
    ],
)
def test_snap_fields_are_checked(index: int, value: Any, why: str) -> None:
    raw = wire_values(samples()[3])
    raw[index] = value
    with pytest.raises(MalformedMessage):
        decode(seal(raw), "gw-1", "j1")


@pytest.mark.parametrize(
    ("device", "job"),
    [("gw-1", "j1\n"), ("gw-1", "-j1"), ("gw-1", "j" * 65), ("gw-1", "j/1"), ("gw+1", "j1")],
)
def test_ids_from_the_topic_are_checked(device: str, job: str) -> None:
    raw = wire_values(samples()[3])
    with pytest.raises(MalformedMessage):
        decode(seal(raw, device, job), device, job)


@pytest.mark.parametrize(
    ("sample", "index", "value"),
    [
        (0, 2, 1),  # online: an int is not a bool
        (0, 3, "run 1"),  # session with a space
        (0, 3, ""),  # empty session
        (1, 4, {"j1": [3]}),  # hb progress too short
        (1, 4, {"j 1": [3, None]}),  # hb job id invalid
        (1, 4, {"j1": [3, 0]}),  # hb acked seq 0
        (1, 4, {"j1": [True, None]}),
        (2, 4, []),  # spec not a map
        (2, 7, None),  # acked_seq nil while acked_hash is set
        (2, 8, H[:15]),  # a 15-byte hash
        (2, 8, "x" * 16),  # a hash as str
        (2, 6, 2**32),  # codec_version out of range
        (2, 5, "sha256 abc"),  # model_hash with a space
        (2, 10, -1),  # total_steps negative
        (7, 3, "edge"),  # sync owner as a str, not its code
        (7, 3, 2),  # sync owner code unknown
        (7, 3, True),  # a bool is not a code
        (7, 4, None),  # sync seq nil, hash set
        (9, 4, "base"),  # nack reason as a str
        (9, 4, 7),  # nack reason code unknown
        (9, 4, -1),
        (9, 3, -1),  # nack seq negative
        (10, 4, [[2, 3], [0, 1]]),  # need ranges unsorted
        (10, 4, [[0, 2], [1, 3]]),  # overlapping
        (10, 4, [[1, 1]]),  # empty range
        (10, 4, [[0, MAX_CHUNKS + 1]]),  # past MAX_CHUNKS
        (10, 4, [[0, 1, 2]]),  # not a pair
        (10, 4, [[i * 2, i * 2 + 1] for i in range(MAX_NEED_RANGES + 1)]),
        (11, 4, 3),  # ctl request code unknown
        (11, 3, 2),  # ctl owner code unknown
        (11, 5, -5),  # ctl ts negative
    ],
)
def test_fields_are_checked(sample: int, index: int, value: Any) -> None:
    msg = samples()[sample]
    raw = wire_values(msg)
    raw[index] = value
    with pytest.raises(MalformedMessage):
        decode(seal(raw, *where_of(msg)), *where_of(msg))


def test_spec_depth_limit_is_exact() -> None:
    def nested(n: int) -> Any:
        v: Any = 1
        for _ in range(n):
            v = [v]
        return v

    raw = wire_values(samples()[2])
    raw[4] = {"a": nested(MAX_SPEC_DEPTH - 1)}
    assert isinstance(decode(seal(raw), "gw-1", "j1"), Birth)
    raw[4] = {"a": nested(MAX_SPEC_DEPTH)}
    with pytest.raises(MalformedMessage, match="nested"):
        decode(seal(raw), "gw-1", "j1")


def test_unknown_version_and_type() -> None:
    raw = wire_values(samples()[0])
    for version in (1, 3):
        with pytest.raises(UnsupportedMessage, match=f"version {version}"):
            decode(seal([version, *raw[1:]], "gw-1", None), "gw-1")
    for code in (0, 14, 99):
        with pytest.raises(UnsupportedMessage, match=r"unknown message type"):
            decode(seal([2, code, *raw[2:]], "gw-1", None), "gw-1")
    for bad in (["2", *raw[1:]], [True, *raw[1:]], [2, "status", *raw[2:]], [2, True, *raw[2:]]):
        with pytest.raises(MalformedMessage):
            decode(seal(bad, "gw-1", None), "gw-1")


def test_too_few_fields_and_not_an_array() -> None:
    for msg in samples():
        raw = wire_values(msg)
        with pytest.raises(MalformedMessage):
            decode(seal(raw[:-1], *where_of(msg)), *where_of(msg))
    for value in [{}, 1, "snap", [], [2], [2, 9], None]:
        with pytest.raises(MalformedMessage):
            decode(seal(value), "gw-1", "j1")


def test_check_and_framing() -> None:
    data = encode(samples()[8])
    with pytest.raises(MalformedMessage, match="check"):
        decode(data[:-1] + bytes([data[-1] ^ 1]), "gw-1", "j1")
    with pytest.raises(MalformedMessage, match="check"):
        decode(data[:10] + data[11:], "gw-1", "j1")
    for short in [b"", b"\x90", b"\x90\x00\x00\x00"]:
        with pytest.raises(MalformedMessage):
            decode(short, "gw-1", "j1")
    body = data[:-4] + b"\x00"  # extra data after the array, with a valid check
    with pytest.raises(MalformedMessage, match="msgpack"):
        decode(body + check_of(body), "gw-1", "j1")


def test_announced_sizes_are_bounded_before_allocating() -> None:
    # an array32 / map32 / bin32 / str32 header claiming 4 G elements in a 20-byte message
    for head in [
        b"\xdd\xff\xff\xff\xff",
        b"\xdf\xff\xff\xff\xff",
        b"\xc6\xff\xff\xff\xff",
        b"\xdb\xff\xff\xff\xff",
    ]:
        body = b"\x94\x02\x04" + head + b"\x00" * 8
        with pytest.raises(MalformedMessage):
            decode(body + check_of(body), "gw-1", "j1")
    # msgpack extension types (the timestamp included) are refused
    raw = wire_values(samples()[0])
    for ext in [msgpack.ExtType(5, b"xx"), msgpack.Timestamp(1, 0)]:
        body = msgpack.packb([*raw[:2], ext, *raw[3:]], use_bin_type=True)
        with pytest.raises(MalformedMessage):
            decode(body + check_of(body, "gw-1", None), "gw-1")
    # deep nesting in the spec map is refused by msgpack or by the depth check
    deep = b"\x91" * 5000 + b"\x01"
    body = b"\x9c\x02\x03\x01\xa1s\x81\xa1a" + deep
    with pytest.raises(MalformedMessage):
        decode(body + check_of(body), "gw-1", "j1")


def test_building_an_invalid_message_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError, match=r"snap\.index"):
        Snap("gw-1", "j1", 1, 2, None, 0, -1, 1, 1, b"x")
    with pytest.raises(LocalProtocolError, match="device"):
        Ack("gw 1", "j1", 1, 1, H)
    with pytest.raises(LocalProtocolError, match="hash"):
        Ack("gw-1", "j1", 1, 1, b"short")
    with pytest.raises(LocalProtocolError):
        Sync("gw-1", "j1", 1, "edge", 3, None)
    with pytest.raises(LocalProtocolError, match="must hold"):
        Snap("gw-1", "j1", 1, 2, None, 0, 0, 2, 10, b"x" * 6)
    with pytest.raises(LocalProtocolError):
        Status("gw-1", 1, "s", 0)  # type: ignore[arg-type]


def test_ids() -> None:
    assert is_valid_id("a") and is_valid_id("A9_.-" + "x" * 59)
    for bad in ["", "a" * 65, "_a", ".a", "a b", "a\n", "a/b", "a+", "a#", "é", 5, None]:
        assert not is_valid_id(bad)


def test_chunk_spans_tile_the_payload() -> None:
    for size in [1, 2, 3, 9, 10, 97, 1000]:
        for count in range(1, min(size, 40) + 1):
            spans = [chunk_span(i, count, size) for i in range(count)]
            assert spans[0][0] == 0 and spans[-1][1] == size
            assert all(a < b for a, b in spans)  # never empty
            assert all(spans[i][1] == spans[i + 1][0] for i in range(count - 1))
            assert max(b - a for a, b in spans) == -(-size // count)


# -- fuzzing ----------------------------------------------------------------------------------


def decode_or_refuse(data: bytes, device: str = "gw-1", job: str | None = "j1") -> Message | None:
    """Decode must return a valid message or raise a RemoteProtocolError, nothing else."""
    try:
        msg = decode(data, device, job)
    except (MalformedMessage, UnsupportedMessage):
        return None
    assert decode(encode(msg), *where_of(msg)) == msg  # what it accepts is a valid message
    return msg


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        if op == 0 and buf:
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == 2:
            del buf[rng.randrange(len(buf) + 1) :]
        elif op == 3:
            pos = rng.randrange(len(buf) + 1)
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif buf:
            pos = rng.randrange(len(buf))
            del buf[pos : pos + rng.randint(1, 8)]
    return bytes(buf)


ODD_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2**63 - 1,
    2**63,
    2**64 - 1,
    -(2**63),
    1.5,
    float("nan"),
    "",
    "x",
    "gw-1",
    "j1",
    "edge",
    2,
    6,
    13,
    "server",
    "run",
    "base",
    "x" * 70,
    b"",
    b"x" * 16,
    b"x" * 15,
    [],
    [0, 1],
    [[0, 1]],
    {},
    {"a": 1},
    {"j1": [1, None]},
    {1: 2},
]


def mutate_value(rng: random.Random, value: Any) -> Any:
    if type(value) is int and rng.random() < 0.5:
        return value + rng.choice([-1, 1, -(2**32), 2**62, 2**63])
    if type(value) in (bytes, str) and value and rng.random() < 0.5:
        return value[: rng.randrange(len(value))]
    if type(value) is list and value and rng.random() < 0.5:
        copy = list(value)
        copy[rng.randrange(len(copy))] = mutate_value(rng, copy[rng.randrange(len(copy))])
        return copy
    return rng.choice(ODD_VALUES)


def mutate_structure(rng: random.Random, raw: list[Any]) -> list[Any]:
    raw = list(raw)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(4)
        if op == 0 or not raw:
            raw.append(rng.choice(ODD_VALUES))
        elif op == 1:
            del raw[rng.randrange(len(raw)) :]
        else:
            i = rng.randrange(len(raw))
            raw[i] = mutate_value(rng, raw[i])
    return raw


def test_seeded_mutation_fuzz() -> None:
    """40,000 mutated messages: half with raw byte damage (the check must catch it), half with
    a damaged structure and a valid check (the field validation must catch it)."""
    rng = random.Random(20240601)
    base = samples()
    encoded = [encode(m) for m in base]
    raws = [wire_values(m) for m in base]
    accepted = caught_by_check = 0
    for n in range(20_000):
        data = mutate_bytes(rng, encoded[n % len(encoded)])
        if data == encoded[n % len(encoded)]:
            continue  # the mutation happened to change nothing
        try:
            decode(data, *where_of(base[n % len(base)]))
            accepted += 1
        except MalformedMessage as exc:
            caught_by_check += "check" in str(exc)
    assert accepted == 0  # damaged bytes never pass as a message (xxh32: 1 in 4 billion)
    assert caught_by_check > 15_000  # the check catches most; framing catches the rest
    outcomes: dict[str, int] = {}
    for n in range(20_000):
        raw = mutate_structure(rng, raws[n % len(raws)])
        where = where_of(base[n % len(base)])
        try:
            data = seal(raw, *where)
        except (TypeError, ValueError, OverflowError):
            continue  # not even packable
        msg = decode_or_refuse(data, *where)
        key = "accepted" if msg is not None else "refused"
        outcomes[key] = outcomes.get(key, 0) + 1
    assert outcomes["refused"] > 10_000 and outcomes.get("accepted", 0) > 100


@settings(max_examples=400, deadline=None)
@given(messages, st.randoms(use_true_random=False))
def test_hypothesis_structure_fuzz(msg: Message, rnd: random.Random) -> None:
    raw = mutate_structure(rnd, wire_values(msg))
    try:
        data = seal(raw, *where_of(msg))
    except (TypeError, ValueError, OverflowError):
        return
    decode_or_refuse(data, *where_of(msg))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_with_a_valid_check(body: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode(body + check_of(body), "gw-1", "j1")
    with contextlib.suppress(RemoteProtocolError):
        decode(body + check_of(body, "gw-1", None), "gw-1")


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats()
        | st.text(max_size=10)
        | st.binary(max_size=20),
        lambda kids: (
            st.lists(kids, max_size=12) | st.dictionaries(st.text(max_size=5), kids, max_size=4)
        ),
        max_leaves=30,
    )
)
def test_arbitrary_msgpack_values(value: Any) -> None:
    for prefix in ([], [2], [2, 4], [2, 13, 1, 2], [2, 3, 1], [2, 2, "s", 1]):
        decode_or_refuse(seal([*prefix, value] if prefix else value))
        decode_or_refuse(seal([*prefix, value] if prefix else value, "gw-1", None), "gw-1", None)
