"""The ``generate`` job: autoregressive decoding with a KV cache, greedy or seeded sampling.

The model follows the input/output names of Hugging Face Optimum decoder exports:
``input_ids`` [batch, seq], ``attention_mask`` [batch, past+seq] and ``position_ids``
[batch, seq] (both optional), ``past_key_values.{i}.key/value`` [batch, heads, past,
head_dim] in; ``logits`` [batch, seq, vocab] and ``present.{i}.key/value`` out. Batch is 1.

Step 1 feeds the whole prompt in one call (prefill) and picks the first new token; every
later step feeds the previous token against the cache and picks one more. So step k emits
``outputs()["tokens"][k-1]`` and ``total_steps`` is ``max_new_tokens`` (fewer when
``eos_token_id`` is generated: the job then ends at that step).

State entries:

=============================== ======================================================
``tokens``                      int64 [prompt_len + step]: prompt then generated ids
``step``, ``prompt_len``        int
``rng``                         bytes: the sampler's PCG64 state (37 bytes)
``past_key_values.{i}.key``     the KV cache [1, heads, prompt_len + step - 1, head_dim]
``past_key_values.{i}.value``   (0 long at step 0); *derivable*: see :meth:`rebuild`
=============================== ======================================================

The sampler draws from the raw PCG64 stream (``random_raw``), not from numpy's
``Generator`` methods, so a state taken on one numpy version resumes identically on
another. This module owns the decoding loop and the sampler; it does no I/O beyond
loading the model.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edge_agent.errors import JobError, JobSpecError
from edge_agent.jobs.base import Job, ProviderSpec
from edge_agent.jobs.spec import JobSpec

__all__ = ["REBUILD_MODES", "GenerateJob", "pack_rng", "sample_token", "unpack_rng"]

REBUILD_MODES = ("replay", "prefill")
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")
_PARAMS = {
    "prompt",
    "prompt_ids",
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "eos_token_id",
}
_RNG_FORMAT = ">16s16sBI"
RNG_BYTES = struct.calcsize(_RNG_FORMAT)


def pack_rng(bits: np.random.PCG64) -> bytes:
    """A PCG64 bit generator's state as 37 bytes (its 128-bit ints do not fit msgpack)."""
    st = bits.state
    return struct.pack(
        _RNG_FORMAT,
        int(st["state"]["state"]).to_bytes(16, "big"),
        int(st["state"]["inc"]).to_bytes(16, "big"),
        int(st["has_uint32"]),
        int(st["uinteger"]),
    )


def unpack_rng(raw: object) -> np.random.PCG64:
    """The inverse of :func:`pack_rng`. Raises JobError for anything else."""
    if type(raw) is not bytes or len(raw) != RNG_BYTES:
        raise JobError(
            f"state entry 'rng' must be {RNG_BYTES} bytes, not {type(raw).__name__}"
            + (f" of {len(raw)}" if isinstance(raw, bytes) else "")
        )
    s, inc, has32, uint = struct.unpack(_RNG_FORMAT, raw)
    if has32 > 1 or not int.from_bytes(inc, "big") & 1:
        raise JobError("state entry 'rng' does not hold a valid PCG64 state")
    bits = np.random.PCG64()
    bits.state = {
        "bit_generator": "PCG64",
        "state": {"state": int.from_bytes(s, "big"), "inc": int.from_bytes(inc, "big")},
        "has_uint32": has32,
        "uinteger": uint,
    }
    return bits


def sample_token(
    logits: np.ndarray,
    bits: np.random.PCG64,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> int:
    """Pick the next token from a [vocab] logits row.

    ``temperature == 0``: greedy (argmax, lowest id on a tie; ``bits`` is not touched).
    Otherwise: softmax of logits / temperature in float64 over the ``top_k`` most likely ids
    (0: all) and then the smallest prefix whose mass reaches ``top_p``, ordered by logit
    (stable, lowest id first on ties), sampled with one 53-bit uniform from ``bits``.
    """
    if not np.isfinite(logits).all():
        raise JobError("the model produced non-finite logits")
    if temperature == 0.0:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / temperature
    order = np.argsort(-x, kind="stable")
    if 0 < top_k < order.size:
        order = order[:top_k]
    xs = x[order]
    p = np.exp(xs - xs[0])
    p /= p.sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), top_p)) + 1
        order, p = order[:keep], p[:keep]
    cum = np.cumsum(p)
    u = float(int(bits.random_raw()) >> 11) * 2.0**-53
    idx = int(np.searchsorted(cum, u * cum[-1], side="right"))
    return int(order[min(idx, order.size - 1)])


def _int_param(
    params: Mapping[str, Any],
    key: str,
    where: str,
    *,
    default: int | None,
    lo: int,
    hi: int = 2**63 - 1,
) -> int | None:
    value = params.get(key, default)
    if value is None:
        return None
    if type(value) is not int or not lo <= value <= hi:
        raise JobSpecError(f"{where} {key} must be an integer in {lo}..{hi}, not {value!r}")
    return value


def _float_param(
    params: Mapping[str, Any],
    key: str,
    where: str,
    *,
    default: float,
    lo: float,
    hi: float,
    lo_open: bool = False,
) -> float:
    value = params.get(key, default)
    if type(value) not in (int, float):
        raise JobSpecError(f"{where} {key} must be a number, not {value!r}")
    v = float(value)
    if not (lo < v if lo_open else lo <= v) or not v <= hi:
        raise JobSpecError(
            f"{where} {key} must be in {'(' if lo_open else '['}{lo}, {hi}], not {value!r}"
        )
    return v


class GenerateJob(Job):
    """Autoregressive generation over an Optimum-style decoder with a KV cache."""

    kind = "generate"

    def __init__(self, spec: JobSpec, *, providers: Sequence[ProviderSpec] | None = None) -> None:
        super().__init__(spec, providers=providers)
        where = f"{spec.source}: [params]"
        params = spec.params
        unknown = sorted(set(params) - _PARAMS)
        if unknown:
            raise JobSpecError(
                f"{where} {unknown[0]!r} is not a generate parameter",
                hint=f"known: {', '.join(sorted(_PARAMS))}",
            )
        max_new = _int_param(params, "max_new_tokens", where, default=None, lo=1, hi=1 << 40)
        if max_new is None:
            raise JobSpecError(f"{where} max_new_tokens is missing")
        self.max_new_tokens: int = max_new
        self.temperature = _float_param(params, "temperature", where, default=0.0, lo=0.0, hi=1e6)
        self.top_k = _int_param(params, "top_k", where, default=0, lo=0) or 0
        self.top_p = _float_param(params, "top_p", where, default=1.0, lo=0.0, hi=1.0, lo_open=True)
        seed = _int_param(params, "seed", where, default=0, lo=0)
        self.eos_token_id = _int_param(params, "eos_token_id", where, default=None, lo=0)
        prompt, prompt_ids = params.get("prompt"), params.get("prompt_ids")
        if (prompt is None) == (prompt_ids is None):
            raise JobSpecError(f"{where} needs exactly one of prompt (text) and prompt_ids")
        if prompt is not None:
            if type(prompt) is not str or not prompt:
                raise JobSpecError(f"{where} prompt must be a non-empty string")
            ids = list(prompt.encode("utf-8"))  # byte-level tokens
        else:
            if (
                type(prompt_ids) is not list
                or not prompt_ids
                or any(type(t) is not int or t < 0 for t in prompt_ids)
            ):
                raise JobSpecError(f"{where} prompt_ids must be a non-empty list of token ids >= 0")
            ids = list(prompt_ids)
        self.prompt = np.array(ids, dtype=np.int64)

        self.model = self.open_model()
        self._inspect_model(where)
        if self.vocab is not None:
            bad = [t for t in ids if t >= self.vocab]
            if bad:
                raise JobSpecError(
                    f"{where} token id {bad[0]} is outside the model's vocabulary of {self.vocab}"
                )
            if self.eos_token_id is not None and self.eos_token_id >= self.vocab:
                raise JobSpecError(
                    f"{where} eos_token_id {self.eos_token_id} is outside the "
                    f"vocabulary of {self.vocab}"
                )
        # the last generated token is never fed, so the model sees prompt + max_new - 1
        needed = self.prompt.size + self.max_new_tokens - 1
        if self.max_positions is not None and needed > self.max_positions:
            raise JobSpecError(
                f"{where} prompt ({self.prompt.size} tokens) + max_new_tokens "
                f"({self.max_new_tokens}) needs {needed} positions; the model has "
                f"{self.max_positions}"
            )

        self._bits = np.random.PCG64(seed)
        self._tokens = self._token_buffer(self.prompt)
        self._n = int(self.prompt.size)
        self._kv: list[np.ndarray] = self._empty_kv()
        self._stopped = False

    # -- model introspection --------------------------------------------------------------

    def _inspect_model(self, where: str) -> None:
        m = self.model
        layers: dict[int, set[str]] = {}
        for name in m.inputs:
            match = _PAST.fullmatch(name)
            if match:
                layers.setdefault(int(match.group(1)), set()).add(match.group(2))
            elif name not in ("input_ids", "attention_mask", "position_ids"):
                raise JobSpecError(
                    f"{where}: model input {name!r} is not one a generate job can feed",
                    hint="expected input_ids, attention_mask, position_ids and "
                    "past_key_values.N.key/value (an Optimum export without a merged "
                    "use_cache_branch)",
                )
        if "input_ids" not in m.inputs or "logits" not in m.outputs:
            raise JobSpecError(f"{where}: the model needs an input_ids input and a logits output")
        if (
            not layers
            or sorted(layers) != list(range(len(layers)))
            or any(v != {"key", "value"} for v in layers.values())
        ):
            raise JobSpecError(
                f"{where}: the model's past_key_values.N.key/value inputs are "
                "missing or incomplete (a generate job needs a KV-cache model)"
            )
        self.num_layers = len(layers)
        self.kv_inputs = [
            f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")
        ]
        self.kv_outputs = [
            f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")
        ]
        missing = [o for o in self.kv_outputs if o not in m.outputs]
        if missing:
            raise JobSpecError(f"{where}: the model has no output {missing[0]!r}")
        shape = m.shape(self.kv_inputs[0])
        if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
            raise JobSpecError(
                f"{where}: cannot tell heads and head_dim from {self.kv_inputs[0]} shape {shape}"
            )
        self.kv_heads, self.kv_head_dim = shape[1], shape[3]
        self.kv_dtype = m.dtype(self.kv_inputs[0])
        vocab = m.shape("logits")[-1]
        self.vocab: int | None = vocab if isinstance(vocab, int) else None
        mp = m.metadata.get("max_positions")
        self.max_positions: int | None = int(mp) if mp and mp.isdigit() else None
        self._feeds_mask = "attention_mask" in m.inputs
        self._feeds_pos = "position_ids" in m.inputs
        self._outputs = ["logits", *self.kv_outputs]
        self.derivable = frozenset(self.kv_inputs)

    def _token_buffer(self, tokens: np.ndarray) -> np.ndarray:
        cap = min(self.prompt.size + self.max_new_tokens, max(2 * tokens.size, 1024))
        buf = np.zeros(cap, dtype=np.int64)
        buf[: tokens.size] = tokens
        return buf

    def _empty_kv(self) -> list[np.ndarray]:
        shape = (1, self.kv_heads, 0, self.kv_head_dim)
        return [np.zeros(shape, dtype=self.kv_dtype) for _ in self.kv_inputs]

    def _call(
        self, ids: np.ndarray, kv: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One model call: ``ids`` (1-D) after a cache of ``kv``; returns last logits, cache."""
        past = kv[0].shape[2]
        n = ids.size
        feeds: dict[str, np.ndarray] = {"input_ids": ids.reshape(1, n)}
        if self._feeds_mask:
            feeds["attention_mask"] = np.ones((1, past + n), dtype=np.int64)
        if self._feeds_pos:
            feeds["position_ids"] = np.arange(past, past + n, dtype=np.int64).reshape(1, n)
        feeds.update(zip(self.kv_inputs, kv, strict=True))
        out = self.model.run(feeds, self._outputs)
        logits = out["logits"]
        if logits.ndim != 3 or logits.shape[:2] != (1, n):
            raise JobError(
                f"the model returned logits of shape {logits.shape}, expected (1, {n}, vocab)"
            )
        return logits[0, -1], [out[o] for o in self.kv_outputs]

    # -- the contract ---------------------------------------------------------------------

    @property
    def total_steps(self) -> int:
        return self.step if self._stopped else self.max_new_tokens

    def run_step(self) -> None:
        self.ensure_not_done()
        if self.step == 0:
            logits, kv = self._call(self.prompt, self._kv)
        else:
            logits, kv = self._call(self._tokens[self._n - 1 : self._n], self._kv)
        token = sample_token(
            logits, self._bits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p
        )
        if self._n == self._tokens.size:  # grow by doubling, up to what the job can need
            cap = min(2 * self._tokens.size, self.prompt.size + self.max_new_tokens)
            self._tokens = np.concatenate([self._tokens, np.zeros(cap - self._n, np.int64)])
        self._tokens[self._n] = token
        self._n += 1
        self._kv = kv
        self.step += 1
        if self.eos_token_id is not None and token == self.eos_token_id:
            self._stopped = True

    def state(self) -> dict[str, Any]:
        st: dict[str, Any] = {
            "tokens": self._tokens[: self._n].copy(),
            "step": self.step,
            "prompt_len": int(self.prompt.size),
            "rng": pack_rng(self._bits),
        }
        st.update(zip(self.kv_inputs, self._kv, strict=True))  # fresh ORT outputs, never written to
        return st

    def restore(self, state: Mapping[str, Any], *, rebuild: str = "replay") -> None:
        """Continue from ``state``. Without its KV cache (any of the derivable entries
        absent), the cache is rebuilt with ``rebuild`` mode: see :meth:`rebuild`."""
        tokens, step, bits, kv = self._check_state(state)
        if kv is None:
            kv = self._rebuild_kv(tokens, step, rebuild)
        self._tokens = self._token_buffer(tokens)
        self._n = int(tokens.size)
        self._bits = bits
        self._kv = kv
        self.step = step
        self._stopped = bool(
            step and self.eos_token_id is not None and tokens[-1] == self.eos_token_id
        )

    def rebuild(self, state: Mapping[str, Any], mode: str = "replay") -> dict[str, Any]:
        """The full state (with the KV cache) from a state that may lack it.

        ``mode="replay"`` repeats exactly the model calls the job made (the prompt in one
        call, then one call per generated token but the last), so the cache is bit-identical
        to the original on the same CPU and provider. ``mode="prefill"`` computes it in one
        call over all tokens but the last: much faster on a GPU, but other matrix shapes
        may change the last bits, and with them, rarely, a later token.
        """
        tokens, step, bits, kv = self._check_state(state)
        if kv is None:
            kv = self._rebuild_kv(tokens, step, mode)
        out: dict[str, Any] = {
            "tokens": tokens.copy(),
            "step": step,
            "prompt_len": int(self.prompt.size),
            "rng": pack_rng(bits),
        }
        out.update(zip(self.kv_inputs, kv, strict=True))
        return out

    def outputs(self) -> dict[str, np.ndarray]:
        return {"tokens": self._tokens[self.prompt.size : self._n].copy()}

    def text(self) -> str:
        """The generated tokens read as UTF-8 bytes (for byte-level models like tiny-decoder)."""
        gen = self._tokens[self.prompt.size : self._n]
        return bytes(int(t) & 0xFF for t in gen).decode("utf-8", errors="replace")

    # -- restore and rebuild --------------------------------------------------------------

    def _rebuild_kv(self, tokens: np.ndarray, step: int, mode: str) -> list[np.ndarray]:
        if mode not in REBUILD_MODES:
            raise JobError(f"unknown rebuild mode {mode!r}", hint="'replay' or 'prefill'")
        kv = self._empty_kv()
        if step == 0:
            return kv
        p = int(self.prompt.size)
        if mode == "prefill":
            _, kv = self._call(np.ascontiguousarray(tokens[:-1]), kv)
            return kv
        _, kv = self._call(np.ascontiguousarray(tokens[:p]), kv)
        for j in range(p, tokens.size - 1):
            _, kv = self._call(np.ascontiguousarray(tokens[j : j + 1]), kv)
        return kv

    def _check_state(
        self, state: Mapping[str, Any]
    ) -> tuple[np.ndarray, int, np.random.PCG64, list[np.ndarray] | None]:
        if not isinstance(state, Mapping):
            raise JobError(f"a state is a mapping, not a {type(state).__name__}")
        allowed = {"tokens", "step", "prompt_len", "rng", *self.kv_inputs}
        for key in state:
            if key not in allowed:
                raise JobError(f"state entry {key!r} does not belong to a generate job")
        for key in ("tokens", "step", "prompt_len", "rng"):
            if key not in state:
                raise JobError(f"state entry {key!r} is missing")
        step, plen = state["step"], state["prompt_len"]
        if type(step) is not int or not 0 <= step <= self.max_new_tokens:
            raise JobError(f"state step {step!r} is not in 0..{self.max_new_tokens}")
        if type(plen) is not int or plen != self.prompt.size:
            raise JobError(
                f"state prompt_len {plen!r} differs from the job's prompt "
                f"({self.prompt.size} tokens)"
            )
        tokens = state["tokens"]
        if not isinstance(tokens, np.ndarray) or tokens.dtype != np.int64 or tokens.ndim != 1:
            raise JobError("state entry 'tokens' must be a 1-D int64 array")
        if tokens.size != plen + step:
            raise JobError(f"state holds {tokens.size} tokens; prompt_len + step is {plen + step}")
        if not np.array_equal(tokens[:plen], self.prompt):
            raise JobError("the state's tokens do not start with the job's prompt")
        gen = tokens[plen:]
        if gen.size and (gen.min() < 0 or (self.vocab is not None and gen.max() >= self.vocab)):
            raise JobError("the state's tokens hold ids outside the vocabulary")
        if self.eos_token_id is not None and gen.size > 1 and (gen[:-1] == self.eos_token_id).any():
            raise JobError("the state's tokens continue after eos_token_id")
        bits = unpack_rng(state["rng"])
        if not all(k in state for k in self.kv_inputs):
            return tokens, step, bits, None
        want = (1, self.kv_heads, max(plen + step - 1, 0) if step else 0, self.kv_head_dim)
        kv = []
        for key in self.kv_inputs:
            arr = state[key]
            if not isinstance(arr, np.ndarray) or arr.dtype != self.kv_dtype or arr.shape != want:
                got = (
                    f"{arr.dtype} {arr.shape}"
                    if isinstance(arr, np.ndarray)
                    else type(arr).__name__
                )
                raise JobError(f"state entry {key!r} must be {self.kv_dtype} {want}, not {got}")
            kv.append(np.ascontiguousarray(arr))
        return tokens, step, bits, kv
