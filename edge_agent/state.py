"""The state model: what a job's state may hold, its canonical form and its hash.

A *state* is a mapping from ``str`` keys to values of three kinds:

* **array**: a ``numpy.ndarray`` of a supported dtype, any shape (zero-size included),
  any memory layout (non-contiguous input is accepted; its canonical bytes are C order);
* **scalar**: a numpy scalar (``numpy.generic``) of a supported dtype;
* **plain**: a msgpack-able value: ``None``, ``bool``, ``int`` (-2**63 .. 2**64-1),
  ``float``, ``str``, ``bytes``, and ``list``/``dict`` of these (dict keys ``str`` or
  ``int``), nested at most :data:`MAX_PLAIN_DEPTH` deep. Tuples are refused, not silently
  turned into lists, so that a round trip gives back exactly what went in.

Supported dtypes: ``bool``, ``int8..int64``, ``uint8..uint64``, ``float16/32/64`` and
``complex64/128``, in either byte order (the byte order is part of the dtype and survives
a round trip). ``longdouble`` is refused: its padding bytes are not portable.

The **state hash** is an xxh3-128 over a canonical form built from per-entry digests (a
Merkle form, so that a receiver can verify per entry and an encoder can tell an
unchanged entry by its digest alone). ``docs/wire-format.md`` specifies it byte for byte.

This module owns validation, the canonical form and hashing. It does no I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Union

import msgpack
import numpy as np
import numpy.typing as npt
import xxhash

from edge_agent.errors import StateError

__all__ = [
    "KIND_ARRAY",
    "KIND_PLAIN",
    "KIND_SCALAR",
    "MAX_KEY_BYTES",
    "MAX_PLAIN_DEPTH",
    "SUPPORTED_DTYPES",
    "EntryDigest",
    "HashedState",
    "State",
    "Value",
    "canonical_plain",
    "check_dtype",
    "check_key",
    "check_plain",
    "entry_digest",
    "state_digests",
    "state_hash",
    "state_hash_from_digests",
    "state_nbytes",
    "validate_state",
]

Value = Union[
    "npt.NDArray[Any]", np.generic, None, bool, int, float, str, bytes, list[Any], dict[Any, Any]
]
State = Mapping[str, Any]

MAX_KEY_BYTES = 1024
MAX_PLAIN_DEPTH = 32

#: dtype.str values a state may hold (both byte orders for multi-byte types).
SUPPORTED_DTYPES: frozenset[str] = frozenset(
    ["|b1", "|i1", "|u1"]
    + [
        f"{order}{kind}{size}"
        for order in "<>"
        for kind, size in [
            ("i", 2),
            ("i", 4),
            ("i", 8),
            ("u", 2),
            ("u", 4),
            ("u", 8),
            ("f", 2),
            ("f", 4),
            ("f", 8),
            ("c", 8),
            ("c", 16),
        ]
    ]
)

KIND_ARRAY = 0x41  # "A"
KIND_SCALAR = 0x53  # "S"
KIND_PLAIN = 0x50  # "P"

_STATE_MAGIC = b"ERS1"


def check_dtype(dtype: np.dtype[Any], where: str) -> str:
    """Return the canonical dtype string, or raise StateError for an unsupported dtype."""
    s: str = dtype.str
    if s not in SUPPORTED_DTYPES or dtype.fields is not None or dtype.subdtype is not None:
        raise StateError(
            f"{where}: dtype {dtype} ({s!r}) is not supported",
            hint="use bool, (u)int8..64, float16/32/64 or complex64/128",
        )
    return s


def _check_key(key: object) -> bytes:
    if not isinstance(key, str):
        raise StateError(f"state key {key!r} is a {type(key).__name__}, not a str")
    try:
        raw = key.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise StateError(f"state key {key!r} is not valid UTF-8") from exc
    if len(raw) > MAX_KEY_BYTES:
        raise StateError(f"state key {key[:40]!r}... is {len(raw)} bytes, over {MAX_KEY_BYTES}")
    return raw


def _check_plain(value: object, where: str, depth: int = 0) -> None:
    if depth > MAX_PLAIN_DEPTH:
        raise StateError(f"{where}: nested deeper than {MAX_PLAIN_DEPTH}")
    kind = type(value)  # exact types: a subclass (numpy.float64, IntEnum) would not round-trip
    if value is None or kind in (bool, str, bytes, float):
        return
    if isinstance(value, int) and kind is int:
        if not -(2**63) <= value < 2**64:
            raise StateError(f"{where}: int {value} does not fit in 64 bits")
        return
    if isinstance(value, list) and kind is list:
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, dict) and kind is dict:
        for k, item in value.items():
            if type(k) not in (str, int):
                raise StateError(f"{where}: dict key {k!r} is not a str or int")
            _check_plain(k, f"{where} key", depth + 1)
            _check_plain(item, f"{where}[{k!r}]", depth + 1)
        return
    raise StateError(
        f"{where}: a {type(value).__name__} cannot be part of a state",
        hint="use numpy arrays, numpy scalars, or None/bool/int/float/str/bytes/list/dict",
    )


def check_key(key: object) -> None:
    """Raise StateError unless ``key`` may name an entry (a str of at most MAX_KEY_BYTES)."""
    _check_key(key)


def check_plain(value: object, where: str = "value") -> None:
    """Raise StateError unless ``value`` is a plain value a state may hold."""
    _check_plain(value, where)


def _sort_plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_sort_plain(v) for v in value]
    if isinstance(value, dict):
        items = [(msgpack.packb(k, use_bin_type=True), k, _sort_plain(v)) for k, v in value.items()]
        items.sort(key=lambda kv: kv[0])
        return {k: v for _, k, v in items}
    return value


def canonical_plain(value: Any) -> bytes:
    """The canonical msgpack bytes of a plain value: dict keys sorted by their packed bytes,
    floats always as float64, bytes as bin, str as str."""
    return msgpack.packb(_sort_plain(value), use_bin_type=True, use_single_float=False)  # type: ignore[no-any-return]


def _array_bytes(arr: npt.NDArray[Any]) -> memoryview:
    """The canonical (C-order) bytes of an array, without a copy when it is contiguous."""
    c = np.ascontiguousarray(arr)
    return c.reshape(-1).view(np.uint8).data


@dataclass(frozen=True, slots=True)
class EntryDigest:
    """What the canonical form records of one entry: its kind, dtype, shape and data hash."""

    kind: int
    dtype: str
    shape: tuple[int, ...]
    data_hash: bytes  # xxh3-128, 16 bytes, big-endian digest

    @property
    def nbytes(self) -> int:
        """Bytes of array or scalar data (0 for a plain value)."""
        if self.kind == KIND_PLAIN:
            return 0
        n = int(self.dtype[2:])  # the item size: "<f4" -> 4, "|b1" -> 1, ">c16" -> 16
        for d in self.shape:
            n *= d
        return n

    def record(self, key: bytes) -> bytes:
        parts = [struct.pack("<I", len(key)), key, bytes([self.kind])]
        if self.kind in (KIND_ARRAY, KIND_SCALAR):
            d = self.dtype.encode("ascii")
            parts += [bytes([len(d)]), d]
        if self.kind == KIND_ARRAY:
            parts.append(struct.pack(f"<B{len(self.shape)}Q", len(self.shape), *self.shape))
        parts.append(self.data_hash)
        return b"".join(parts)


def entry_digest(key: str, value: object) -> EntryDigest:
    """Validate one entry and return its digest. Raises StateError for a bad value."""
    _check_key(key)
    if isinstance(value, np.ndarray):
        dt = check_dtype(value.dtype, f"entry {key!r}")
        return EntryDigest(
            KIND_ARRAY,
            dt,
            tuple(int(n) for n in value.shape),
            xxhash.xxh3_128_digest(_array_bytes(value)),
        )
    if isinstance(value, np.generic):
        dt = check_dtype(value.dtype, f"entry {key!r}")
        raw = np.asarray(value).reshape(1).view(np.uint8).tobytes()
        return EntryDigest(KIND_SCALAR, dt, (), xxhash.xxh3_128_digest(raw))
    _check_plain(value, f"entry {key!r}")
    return EntryDigest(KIND_PLAIN, "", (), xxhash.xxh3_128_digest(canonical_plain(value)))


def state_digests(state: State) -> dict[str, EntryDigest]:
    """Digest of every entry of a state (validating it).

    For a :class:`HashedState` this is its cached digests (no hashing)."""
    if isinstance(state, HashedState):
        return dict(state.digests)
    if not isinstance(state, Mapping):
        raise StateError(f"a state is a mapping of str to values, not a {type(state).__name__}")
    return {key: entry_digest(key, value) for key, value in state.items()}


class HashedState(dict[str, Any]):
    """A state (a plain ``dict``) that remembers its entry digests once computed.

    Hashing a state is the one pass over its data that encoding an unchanged state
    cannot avoid; a ``HashedState`` lets a state that is used again (the agent's
    acknowledged base, the server's current state) skip it. ``apply_delta`` returns one.

    Assigning or deleting keys drops the cache. Mutating an array *in place* cannot be
    seen and leaves the cache stale: states are values (docs/architecture.md), so code
    that holds a state never writes into its arrays.
    """

    __slots__ = ("_digests", "_hash")

    def __init__(
        self, state: State | None = None, *, digests: Mapping[str, EntryDigest] | None = None
    ) -> None:
        super().__init__(state if state is not None else {})
        if digests is not None and set(digests) != set(self):
            raise StateError("HashedState: the digests given do not cover the state's keys")
        self._digests: dict[str, EntryDigest] | None = (
            dict(digests) if digests is not None else None
        )
        self._hash: bytes | None = None

    @property
    def digests(self) -> Mapping[str, EntryDigest]:
        """Every entry's digest (computed, validating the state, on first use)."""
        if self._digests is None:
            self._digests = {key: entry_digest(key, value) for key, value in self.items()}
        return self._digests

    @property
    def state_hash(self) -> bytes:
        """The state hash (16 bytes), computed once."""
        if self._hash is None:
            self._hash = state_hash_from_digests(self.digests)
        return self._hash

    def __setitem__(self, key: str, value: Any) -> None:
        self._digests = self._hash = None
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self._digests = self._hash = None
        super().__delitem__(key)

    def __ior__(self, other: Any) -> HashedState:  # type: ignore[override,misc]
        self._digests = self._hash = None
        super().__ior__(other)
        return self

    def clear(self) -> None:
        self._digests = self._hash = None
        super().clear()

    def pop(self, *args: Any) -> Any:
        self._digests = self._hash = None
        return super().pop(*args)

    def popitem(self) -> tuple[str, Any]:
        self._digests = self._hash = None
        return super().popitem()

    def setdefault(self, key: str, default: Any = None) -> Any:
        self._digests = self._hash = None
        return super().setdefault(key, default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._digests = self._hash = None
        super().update(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return (HashedState, (dict(self),))


def _sorted_records(digests: Mapping[str, EntryDigest]) -> Iterator[bytes]:
    keyed = sorted((key.encode("utf-8"), d) for key, d in digests.items())
    for kb, d in keyed:
        yield d.record(kb)


def state_hash_from_digests(digests: Mapping[str, EntryDigest]) -> bytes:
    """The state hash (16 bytes) from per-entry digests."""
    h = xxhash.xxh3_128()
    h.update(_STATE_MAGIC)
    h.update(struct.pack("<I", len(digests)))
    for rec in _sorted_records(digests):
        h.update(rec)
    return h.digest()


def state_hash(state: State) -> bytes:
    """The xxh3-128 hash (16 bytes) of a state's canonical form. Validates the state."""
    return state_hash_from_digests(state_digests(state))


def validate_state(state: State) -> None:
    """Raise StateError unless ``state`` is a valid state."""
    state_digests(state)


def state_nbytes(state: State) -> int:
    """The size of a state's canonical data: array and scalar bytes plus packed plain values."""
    total = 0
    for value in state.values():
        if isinstance(value, (np.ndarray, np.generic)):
            total += int(value.nbytes)
        else:
            total += len(canonical_plain(value))
    return total
