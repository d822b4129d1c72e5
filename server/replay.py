"""Replay a job's stored chain (a baseline payload and the deltas after it) with torch.

    from server.replay import replay_job, replay_payloads

    result = replay_job(store, "job-1")                 # on CUDA when available, else the CPU
    result.state                                         # numpy, on the host, hash verified
    replay_job(store, "job-1", keep_device=True).device_state   # the tensors (IOBinding)

Two backends; ``backend="auto"`` picks the first that applies:

* ``torch``: when the codec has ``decode(payload) -> Plan`` (the tensor-aware codec).
  Each payload is decoded on the host (every check, all decompression), its plan is bound
  to the shapes of the state so far (``Plan.bind``) and its ops run as torch operations on
  the target device: XOR on integer views, concatenation for GROW, ``index_select`` for
  GATHER, byte views for VIEW, conversions for CAST, an indexed XOR for SPARSE, block
  copies for PATCH. An array lives on the device as a :class:`DeviceArray`: its C-order
  bytes in a flat uint8 tensor, with its numpy dtype and shape, so that every dtype of
  ``edge_agent.state`` (both byte orders, unsigned ones) is handled by the same byte-level
  code. Intermediate states are not hashed (that would copy each one to the host): each
  delta must name the previous payload's state as its base, and the final state is copied
  to the host once and its hash checked against the last payload's (and the store's). The
  ingest verified every payload's hash when it committed it (docs/store.md, S2), so the
  final check is there to catch a fault in this backend, and it would.
* ``numpy``: ``edge_agent.codec.apply_delta`` per payload on the host (every hash checked),
  then, with ``keep_device``, the arrays are moved to the device. The fallback while the
  codec has no ``decode``, and the reference the torch backend is tested against.

A cast whose source holds a NaN, or whose dtypes torch cannot convert exactly like numpy,
is done on the host with numpy (NaN payload bits are not preserved alike by every torch
kernel); everything else stays on the device.

This module owns chain replay and the torch form of the codec's ops. It never writes to
the store, never mutates a state, a decoded buffer or a tensor it did not create, and
raises only the ``edge_agent.errors`` tree. Device-specific code is confined to
:func:`default_device`, :func:`_upload` and :meth:`DeviceArray.numpy` (the host copies).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

import edge_agent.codec as codec
import edge_agent.state as state_mod
from edge_agent.errors import (
    BaseMismatch,
    CodecError,
    StateError,
    StateHashMismatch,
    StoreError,
)
from edge_agent.state import EntryDigest, state_hash

__all__ = [
    "Backend",
    "DeviceArray",
    "ReplayResult",
    "default_device",
    "plan_backend_available",
    "replay_job",
    "replay_payloads",
    "to_device",
    "to_host",
]

Backend = Literal["auto", "torch", "numpy"]
Array = npt.NDArray[Any]

_KIND_ARRAY: int = state_mod.KIND_ARRAY
_KIND_SCALAR: int = state_mod.KIND_SCALAR
_KIND_PLAIN: int = state_mod.KIND_PLAIN
_NO_HASH = bytes(16)  # placeholder data hash of an entry the backend did not hash

#: word dtypes for bitwise work on bytes, by width
_WORD = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
#: torch dtypes for numpy's (native byte order) ones
_TORCH: dict[str, torch.dtype] = {
    "b1": torch.bool,
    "i1": torch.int8,
    "u1": torch.uint8,
    "i2": torch.int16,
    "u2": torch.uint16,
    "i4": torch.int32,
    "u4": torch.uint32,
    "i8": torch.int64,
    "u8": torch.uint64,
    "f2": torch.float16,
    "f4": torch.float32,
    "f8": torch.float64,
    "c8": torch.complex64,
    "c16": torch.complex128,
}


#: dtypes whose conversions torch does exactly like numpy (tests/test_replay.py checks every
#: allowed pair on the CPU); on other devices the unsigned 16-64 bit types, which torch
#: supports only partly there, are converted on the host
_CPU_CASTS = frozenset(_TORCH)
_DEVICE_CASTS = _CPU_CASTS - {"u2", "u4", "u8"}


def _decode_fn() -> Callable[[bytes], Any] | None:
    fn = getattr(codec, "decode", None)
    return fn if callable(fn) else None


def plan_backend_available() -> bool:
    """Whether the installed codec exposes ``decode`` (and so the torch backend runs)."""
    return _decode_fn() is not None


def default_device(preferred: str | torch.device | None = None) -> torch.device:
    """``preferred`` if given, else CUDA when torch sees a GPU, else the CPU."""
    if preferred is not None:
        return torch.device(preferred)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _key(dtype: np.dtype[Any]) -> str:
    return f"{dtype.kind}{dtype.itemsize}"


def _width(dtype: np.dtype[Any]) -> int:
    """Byte-swap width: a complex number swaps each of its two components."""
    return dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize


def _prod(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _aligned(t: torch.Tensor, w: int) -> torch.Tensor:
    """``t`` (1-D uint8), copied if its start is not ``w``-aligned (a view of a decoded
    host buffer can start anywhere; fresh tensors are always aligned)."""
    if w > 1 and (t.data_ptr() % w or t.storage_offset() % w):
        return t.clone()
    return t


def _swap(t: torch.Tensor, w: int) -> torch.Tensor:
    """A new byte tensor with every ``w``-byte group reversed (a byte-order change)."""
    if w == 1:
        return t
    return t.view(-1, w).flip(1).reshape(-1)


@dataclass(frozen=True, slots=True, eq=False)
class DeviceArray:
    """An array on a torch device: its C-order bytes (``data``, flat uint8) and the numpy
    ``dtype`` and ``shape`` they hold. Never written to once made."""

    data: torch.Tensor
    dtype: np.dtype[Any]
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(self.data.numel())

    def tensor(self) -> torch.Tensor:
        """The array as a typed, shaped torch tensor (a view: no copy when aligned). For
        native-order dtypes that torch has; raises StateError otherwise."""
        if not self.dtype.isnative or _key(self.dtype) not in _TORCH:
            raise StateError(f"dtype {self.dtype.str} has no torch equivalent")
        t = _aligned(self.data, self.dtype.itemsize)
        return t.view(_TORCH[_key(self.dtype)]).view(self.shape)

    def numpy(self) -> Array:
        """The array on the host: a view of the same memory on the CPU, a copy from a GPU."""
        host = self.data.cpu().numpy()  # [CUDA] device -> host copy; free on the CPU
        return host.view(self.dtype).reshape(self.shape)


@dataclass(frozen=True)
class ReplayResult:
    """A replayed chain: the final state (numpy, host, verified) and how it was made."""

    state: dict[str, Any]
    state_hash: bytes
    backend: str  # "torch" or "numpy"
    device: str
    payloads: int
    payload_bytes: int
    state_bytes: int  # bytes of array and scalar data in the final state
    seconds: float  # decode + apply + the final host copy and hash check
    device_state: dict[str, Any] | None = None  # arrays as DeviceArray (keep_device=True)


# ----------------------------------------------------------------------------- host/device


def _upload(a: Array, device: torch.device) -> torch.Tensor:
    """The C-order bytes of a host array as a flat uint8 tensor on ``device``."""
    b = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    if not b.flags.writeable:  # torch warns on read-only memory; we never write to it
        b = b.copy()
    t = torch.from_numpy(b)
    if device.type != "cpu":
        t = t.to(device)  # [CUDA] host -> device copy
    return t


def _index(a: npt.NDArray[np.int64], device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
    return t if device.type == "cpu" else t.to(device)


def to_device(state: Mapping[str, Any], device: str | torch.device | None = None) -> dict[str, Any]:
    """A host state with its arrays moved to ``device`` as :class:`DeviceArray`s."""
    dev = default_device(device)
    return {
        k: DeviceArray(_upload(v, dev), v.dtype, tuple(int(n) for n in v.shape))
        if isinstance(v, np.ndarray)
        else v
        for k, v in state.items()
    }


def to_host(state: Mapping[str, Any]) -> dict[str, Any]:
    """A device state with its arrays copied to the host (numpy)."""
    return {k: v.numpy() if isinstance(v, DeviceArray) else v for k, v in state.items()}


def _state_bytes(state: Mapping[str, Any]) -> int:
    return sum(int(v.nbytes) for v in state.values() if isinstance(v, (np.ndarray, np.generic)))


# ----------------------------------------------------------------------------- the ops


class _Unsupported(CodecError):
    """An op this backend does not know (a newer codec): the caller falls back to numpy."""


def _cast(src: DeviceArray, dst: np.dtype[Any], device: torch.device) -> DeviceArray:
    s = src.dtype
    if s.kind == dst.kind and s.itemsize == dst.itemsize:  # a byte-order change
        return DeviceArray(_swap(src.data, _width(s)), dst, src.shape)
    native_s, native_d = s.newbyteorder("="), dst.newbyteorder("=")
    castable = _CPU_CASTS if device.type == "cpu" else _DEVICE_CASTS
    if _key(native_s) in castable and _key(native_d) in castable:
        raw = src.data if s.isnative else _swap(src.data, _width(s))
        x = _aligned(raw, s.itemsize).view(_TORCH[_key(native_s)])
        if not (s.kind in "fc" and bool(torch.isnan(x).any())):
            y = x.to(_TORCH[_key(native_d)]).reshape(-1).view(torch.uint8)
            if not dst.isnative:
                y = _swap(y, _width(dst))
            return DeviceArray(y, dst, src.shape)
    # NaNs (payload bits), or dtypes torch lacks: numpy on the host, as the codec does
    with np.errstate(all="ignore"):
        host = src.numpy().astype(dst, order="C")
    return DeviceArray(_upload(host, device), dst, src.shape)


def _dup_roots(dup: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """For GATHER's dup map: the row whose literal cell each tail cell ends up copying."""
    n, k = dup.shape
    cols = np.arange(k)
    root = np.empty((n, k), np.int64)
    for i in range(n):
        d = dup[i]
        r = np.full(k, i, np.int64)
        m = d >= 0
        r[m] = root[d[m], cols[m]]
        root[i] = r
    return root


def _gather(
    op: Any, src: DeviceArray, shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    s = src.shape
    isz = src.dtype.itemsize
    rows = _index(op.rows, device)
    n = len(op.rows)
    if op.axis is None:
        return src.data.view(s[0], _prod(s[1:]) * isz).index_select(0, rows).reshape(-1)
    a = op.axis
    pre, keep, post = _prod(s[1:a]), s[a], _prod(s[a + 1 :]) * isz
    head = src.data.view(s[0], pre, keep, post).index_select(0, rows)  # [n, pre, keep, post]
    k = shape[a] - keep
    if op.dup is None:
        tail = _upload(op.data, device).view(n, k, pre, post)
    else:
        tail = torch.empty((n, k, pre, post), dtype=torch.uint8, device=device)
        if op.data is not None and op.data.size:
            lit = torch.from_numpy(np.ascontiguousarray(op.dup == -1))
            tail[lit.to(device)] = _upload(op.data, device).view(-1, pre, post)
        root = _dup_roots(op.dup)
        if np.any(root != np.arange(n)[:, None]):
            cols = torch.arange(k, device=device).view(1, k)
            tail = tail[_index(root, device), cols]
    return torch.cat([head, tail.permute(0, 2, 1, 3)], dim=2).reshape(-1)


def _xor(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    n = a.numel()
    for w in (8, 4, 2, 1):
        if n % w == 0:
            x, y = _aligned(a, w), _aligned(b, w)
            return torch.bitwise_xor(x.view(_WORD[w]), y.view(_WORD[w])).view(torch.uint8)
    raise AssertionError("unreachable")  # w == 1 always divides


def _sparse(op: Any, src: DeviceArray, device: torch.device) -> torch.Tensor:
    isz = src.dtype.itemsize
    w = min(isz, 8)
    per = isz // w
    out = src.data.clone()
    words = out.view(_WORD[w]).view(-1, per)
    idx = _index(op.index, device)
    vals = _aligned(_upload(op.data, device), w).view(_WORD[w]).view(-1, per)
    words.index_put_((idx,), torch.bitwise_xor(words.index_select(0, idx), vals))
    return out


def _patch(op: Any, src: DeviceArray, device: torch.device) -> torch.Tensor:
    nb, bs = src.nbytes, op.block_size
    out = src.data.clone()
    data = _upload(op.data, device)
    whole = nb // bs
    blocks = op.blocks
    full = blocks[blocks < whole]
    if len(full):
        out[: whole * bs].view(whole, bs).index_copy_(
            0, _index(full, device), data[: len(full) * bs].view(len(full), bs)
        )
    if len(full) < len(blocks):  # the array's last, short block
        out[whole * bs :] = data[len(full) * bs :]
    return out


def _run(step: Any, state: Mapping[str, Any], device: torch.device) -> Any:
    op = step.op
    kind = type(op).__name__
    if kind == "Full":
        return DeviceArray(_upload(op.data, device), op.data.dtype, tuple(op.data.shape))
    if kind in ("Scalar", "Plain"):
        return op.value
    src = state[step.src]
    if kind == "Ref":
        return src
    shape = tuple(int(d) for d in step.shape)
    if kind == "View":
        return DeviceArray(src.data, op.dtype, shape)
    if kind == "Cast":
        return _cast(src, op.dtype, device)
    if kind == "Grow":
        a, s, isz = op.axis, src.shape, src.dtype.itemsize
        outer, inner = _prod(s[:a]), _prod(s[a + 1 :]) * isz
        k = shape[a] - s[a]
        grown = torch.cat(
            [src.data.view(outer, s[a] * inner), _upload(op.data, device).view(outer, k * inner)],
            dim=1,
        )
        return DeviceArray(grown.reshape(-1), src.dtype, shape)
    if kind == "Gather":
        return DeviceArray(_gather(op, src, shape, device), src.dtype, shape)
    if kind == "Xor":
        return DeviceArray(_xor(src.data, _upload(op.data, device)), src.dtype, shape)
    if kind == "Sparse":
        return DeviceArray(_sparse(op, src, device), src.dtype, shape)
    if kind == "Patch":
        return DeviceArray(_patch(op, src, device), src.dtype, shape)
    raise _Unsupported(f"the torch backend does not know the op {kind}")


def _digest(value: Any, ref: EntryDigest | None) -> EntryDigest:
    """What ``Plan.bind`` needs to know of an entry: kind, dtype, shape (not its hash)."""
    if ref is not None:
        return ref
    if isinstance(value, DeviceArray):
        return EntryDigest(_KIND_ARRAY, value.dtype.str, value.shape, _NO_HASH)
    if isinstance(value, np.generic):
        return EntryDigest(_KIND_SCALAR, value.dtype.str, (), _NO_HASH)
    return EntryDigest(_KIND_PLAIN, "", (), _NO_HASH)


_meta_base: type | None = None


def _meta_base_class() -> type:
    """A ``HashedState`` that claims a hash: a base whose entries ``Plan.bind`` can check
    for keys, kinds, dtypes and shapes without hashing (or even reading) their data."""
    global _meta_base
    if _meta_base is None:
        # getattr: the stand-in codec's state module has no HashedState (and no decode)
        hashed: Any = getattr(state_mod, "HashedState")  # noqa: B009

        class _MetaBase(hashed):  # type: ignore[misc]
            __slots__ = ("_claimed",)

            def __init__(
                self, values: Mapping[str, Any], digests: Mapping[str, EntryDigest], claimed: bytes
            ) -> None:
                super().__init__(values, digests=digests)
                self._claimed = claimed

            @property
            def state_hash(self) -> bytes:
                return self._claimed

        _meta_base = _MetaBase
    return _meta_base


def _replay_torch(
    payloads: Sequence[bytes], device: torch.device, decode: Callable[[bytes], Any]
) -> tuple[dict[str, Any], bytes]:
    state: dict[str, Any] = {}
    digests: dict[str, EntryDigest] = {}
    prev: bytes | None = None
    for i, payload in enumerate(payloads):
        plan = decode(payload)
        head = plan.header
        _check_link(i, head.base_hash, prev)
        base = None if head.base_hash is None else _meta_base_class()(state, digests, prev)
        binding = plan.bind(base)
        new: dict[str, Any] = {k: state[k] for k in binding.keep}
        new_digests = {k: digests[k] for k in binding.keep}
        for step in binding.steps:
            value = _run(step, state, device)
            new[step.name] = value
            ref = digests[step.src] if type(step.op).__name__ == "Ref" else None
            new_digests[step.name] = _digest(value, ref)
        state, digests, prev = new, new_digests, head.state_hash
    assert prev is not None
    return state, prev


def _check_link(i: int, base_hash: bytes | None, prev: bytes | None) -> None:
    if i == 0 and base_hash is not None:
        raise BaseMismatch("a chain starts with a full snapshot; payload 0 is a delta")
    if i > 0 and base_hash != prev:
        raise BaseMismatch(
            f"payload {i} was not made against the state payload {i - 1} produces",
            hint="the chain is broken: replay it with the store's load_state to find where",
        )


# ----------------------------------------------------------------------------- entry points


def replay_payloads(
    payloads: Sequence[bytes],
    *,
    device: str | torch.device | None = None,
    backend: Backend = "auto",
    expected_hash: bytes | None = None,
    keep_device: bool = False,
) -> ReplayResult:
    """Replay a chain (a full payload, then deltas each made against the state before it)
    and return the final state, verified against the last payload's state hash and
    ``expected_hash`` (StateHashMismatch otherwise; BaseMismatch for a broken chain).

    ``device``: where the torch backend computes (default: CUDA if available, else the
    CPU). ``keep_device``: also return the state's arrays on the device (for IOBinding).
    """
    if not payloads:
        raise CodecError("a chain has at least one payload")
    dev = default_device(device)
    decode = _decode_fn()
    if backend == "torch" and decode is None:
        raise CodecError(
            "the torch backend needs edge_agent.codec.decode, which this codec lacks",
            hint="use backend='numpy' (or 'auto')",
        )
    t0 = time.perf_counter()
    used = "numpy"
    device_state: dict[str, Any] | None = None
    final: bytes
    if backend != "numpy" and decode is not None:
        try:
            device_state, final = _replay_torch(payloads, dev, decode)
            used = "torch"
        except _Unsupported:
            if backend == "torch":
                raise
    if used == "torch":
        assert device_state is not None
        state = to_host(device_state)  # the one copy to the host
        got = state_hash(state)
        if got != final:
            raise StateHashMismatch(
                f"the torch replay of {len(payloads)} payloads on {dev} does not give the "
                f"state hash the last one names ({got.hex()[:16]}... != {final.hex()[:16]}...)",
                hint="replay with backend='numpy' (every step verified) to find the payload",
            )
    else:
        host: dict[str, Any] | None = None
        for payload in payloads:  # apply_delta checks each base and each result hash
            host = codec.apply_delta(host, payload)
        assert host is not None
        state = dict(host)
        final = codec.read_header(payloads[-1]).state_hash
        if keep_device:
            device_state = to_device(state, dev)
    if expected_hash is not None and final != expected_hash:
        raise StateHashMismatch("the chain's last payload names another state than expected")
    seconds = time.perf_counter() - t0
    return ReplayResult(
        state=state,
        state_hash=final,
        backend=used,
        device=str(dev) if used == "torch" or keep_device else "cpu",
        payloads=len(payloads),
        payload_bytes=sum(len(p) for p in payloads),
        state_bytes=_state_bytes(state),
        seconds=seconds,
        device_state=device_state if keep_device else None,
    )


def replay_job(
    store: Any,
    job: str,
    seq: int | None = None,
    **options: Any,
) -> ReplayResult:
    """Replay the stored chain of ``job`` at ``seq`` (default: the acknowledged state)
    with :func:`replay_payloads` (same options), checked against the store's state hash.
    Retries when a compaction replaces the chain while it is being read."""
    last = None
    for _ in range(3):
        records = store.chain(job, seq)
        try:
            payloads = [store.read_payload(job, r.seq) for r in records]
            return replay_payloads(payloads, expected_hash=records[-1].state_hash, **options)
        except (StoreError, BaseMismatch):
            if records == last or store.chain(job, seq) == records:
                raise
            last = records
    raise StoreError(f"job {job}: its chain kept changing while it was read")
