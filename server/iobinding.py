"""A ``generate`` job continued with its KV cache as torch tensors bound to onnxruntime.

On a GPU the replayed KV cache is already on the device (``server.replay`` with
``keep_device=True``). :class:`BoundGenerate` feeds it to the job's onnxruntime session
through IOBinding: the cache tensors are bound as inputs by address, each step's
``present.*`` outputs are written by onnxruntime straight into torch tensors allocated on
the same device, and only the few things the sampler needs cross to the host (the last
logits row, 4 bytes per vocabulary entry) or come from it (the token ids, the attention
mask, the positions). Nothing of the cache is copied per step, and nothing is recomputed
when the cache came with the state.

It does what ``edge_agent.jobs.generate.GenerateJob`` does, with the same model calls
(the same shapes in the same order), the same sampler (``sample_token`` over the job's
PCG64 state) and the same state layout, so ``state()`` and ``outputs()`` can be stored
and resumed from like the job's own. The device is whatever the tensors live on: "cuda"
with the CUDA provider (the production use), or "cpu" with the CPU provider, which is how
the tests check it is bit-identical to the job's own loop on this machine.

This module owns the binding and nothing else: it never touches the store, never writes
into a tensor it was given, and raises JobError (from the job's own checks, or its own for
a state the job cannot continue from).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from edge_agent.errors import JobError
from edge_agent.jobs.generate import (
    REBUILD_MODES,
    GenerateJob,
    pack_rng,
    sample_token,
    unpack_rng,
)

__all__ = ["BoundGenerate", "can_bind"]

_NP_OF_TORCH: dict[torch.dtype, type[np.generic]] = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.float64: np.float64,
}
_TORCH_OF_NP = {np.dtype(v): k for k, v in _NP_OF_TORCH.items()}


def can_bind(job: Any) -> bool:
    """Whether :class:`BoundGenerate` can run this job: a generate job whose vocabulary
    size and KV dtype are fixed in the model."""
    return (
        isinstance(job, GenerateJob)
        and isinstance(job.vocab, int)
        and np.dtype(job.kv_dtype) in _TORCH_OF_NP
    )


class BoundGenerate:
    """The remaining steps of a generate job, with its KV cache kept on ``device``.

    ``state``: the job's state on the host without (or ignoring) its KV entries: tokens,
    step, prompt_len, rng. ``kv``: the cache as typed torch tensors on ``device``, in
    ``job.kv_inputs`` order, never written to; None to rebuild it with ``rebuild``
    ("replay": the job's original calls, bit-identical; "prefill": one call).
    """

    def __init__(
        self,
        job: GenerateJob,
        state: Mapping[str, Any],
        *,
        kv: Sequence[torch.Tensor] | None,
        device: torch.device,
        rebuild: str = "replay",
    ) -> None:
        if not can_bind(job):
            raise JobError("this job cannot run with IOBinding (not a fixed-vocabulary generate)")
        if rebuild not in REBUILD_MODES:
            raise JobError(f"unknown rebuild mode {rebuild!r}", hint="'replay' or 'prefill'")
        self.job = job
        self.device = device
        self.derivable = job.derivable
        self._session = job.model.session
        self._dev_type = "cuda" if device.type == "cuda" else "cpu"
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
            self.device = device
        self._dev_id = device.index or 0
        self._kv_torch = _TORCH_OF_NP[np.dtype(job.kv_dtype)]
        tokens, step, bits = self._check(state)
        self._tokens = tokens
        self._bits = bits
        self.step = step
        eos = job.eos_token_id
        self._stopped = bool(step and eos is not None and int(tokens[-1]) == eos)
        if kv is None:
            self._kv = self._rebuild(rebuild)
        else:
            self._kv = self._check_kv(kv)

    # -- checks ---------------------------------------------------------------------------

    def _check(self, state: Mapping[str, Any]) -> tuple[np.ndarray, int, np.random.PCG64]:
        job = self.job
        for key in ("tokens", "step", "prompt_len", "rng"):
            if key not in state:
                raise JobError(f"state entry {key!r} is missing")
        step, plen, tokens = state["step"], state["prompt_len"], state["tokens"]
        if type(step) is not int or not 0 <= step <= job.max_new_tokens:
            raise JobError(f"state step {step!r} is not in 0..{job.max_new_tokens}")
        if type(plen) is not int or plen != job.prompt.size:
            raise JobError(f"state prompt_len {plen!r} differs from the job's prompt")
        if not isinstance(tokens, np.ndarray) or tokens.dtype != np.int64 or tokens.ndim != 1:
            raise JobError("state entry 'tokens' must be a 1-D int64 array")
        if tokens.size != plen + step or not np.array_equal(tokens[:plen], job.prompt):
            raise JobError("the state's tokens do not fit its step and the job's prompt")
        gen = tokens[plen:]
        if gen.size and (gen.min() < 0 or gen.max() >= job.vocab):
            raise JobError("the state's tokens hold ids outside the vocabulary")
        buf = np.zeros(plen + job.max_new_tokens, np.int64)
        buf[: tokens.size] = tokens
        return buf, step, unpack_rng(state["rng"])

    def _check_kv(self, kv: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        job = self.job
        past = job.prompt.size + self.step - 1 if self.step else 0
        want = (1, job.kv_heads, past, job.kv_head_dim)
        if len(kv) != len(job.kv_inputs):
            raise JobError(f"{len(kv)} KV tensors for {len(job.kv_inputs)} cache inputs")
        out = []
        for name, t in zip(job.kv_inputs, kv, strict=True):
            if tuple(t.shape) != want or t.dtype != self._kv_torch or not self._here(t):
                raise JobError(
                    f"KV tensor {name} is {t.dtype} {tuple(t.shape)} on {t.device}; the job "
                    f"needs {self._kv_torch} {want} on {self.device}"
                )
            out.append(t.contiguous())
        return out

    def _here(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is on our device ("cuda" means the current GPU, as torch puts it)."""
        d = self.device
        if t.device.type != d.type:
            return False
        if d.type != "cuda":
            return True
        want = d.index if d.index is not None else torch.cuda.current_device()
        return t.device.index == want

    # -- model calls ----------------------------------------------------------------------

    def _empty_kv(self) -> list[torch.Tensor]:
        job = self.job
        shape = (1, job.kv_heads, 0, job.kv_head_dim)
        return [torch.empty(shape, dtype=self._kv_torch, device=self.device) for _ in job.kv_inputs]

    def _call(
        self, ids: np.ndarray, kv: Sequence[torch.Tensor]
    ) -> tuple[np.ndarray, list[torch.Tensor]]:
        """One model call with the cache bound by address; returns the last logits row
        (host) and the new cache (fresh tensors on the device)."""
        job = self.job
        past = int(kv[0].shape[2])
        n = int(ids.size)
        io = self._session.io_binding()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, np.int64).reshape(1, n))
        if "attention_mask" in job.model.inputs:
            io.bind_cpu_input("attention_mask", np.ones((1, past + n), np.int64))
        if "position_ids" in job.model.inputs:
            io.bind_cpu_input("position_ids", np.arange(past, past + n, dtype=np.int64)[None])
        np_kv = np.dtype(job.kv_dtype)
        for name, t in zip(job.kv_inputs, kv, strict=True):
            if past == 0:  # an empty cache: no buffer to point at
                io.bind_cpu_input(name, np.zeros(tuple(t.shape), np_kv))
            else:
                io.bind_input(
                    name, self._dev_type, self._dev_id, np_kv, list(t.shape), t.data_ptr()
                )
        assert job.vocab is not None
        logits = torch.empty((1, n, job.vocab), dtype=torch.float32, device=self.device)
        io.bind_output(
            "logits", self._dev_type, self._dev_id, np.float32, list(logits.shape),
            logits.data_ptr(),
        )  # fmt: skip
        shape = (1, job.kv_heads, past + n, job.kv_head_dim)
        present = [torch.empty(shape, dtype=self._kv_torch, device=self.device) for _ in kv]
        for name, t in zip(job.kv_outputs, present, strict=True):
            io.bind_output(name, self._dev_type, self._dev_id, np_kv, list(shape), t.data_ptr())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # [CUDA] torch's writes land before ORT reads
        try:
            io.synchronize_inputs()
            self._session.run_with_iobinding(io)
            io.synchronize_outputs()  # [CUDA] ORT's writes land before torch reads
        except Exception as exc:  # onnxruntime raises its own exception types
            raise JobError(f"onnxruntime failed to run {job.model.path.name}: {exc}") from exc
        last = logits[0, -1].cpu().numpy()  # [CUDA] the one per-step copy: vocab floats
        return last, present

    def _rebuild(self, mode: str) -> list[torch.Tensor]:
        kv = self._empty_kv()
        if self.step == 0:
            return kv
        p = int(self.job.prompt.size)
        n = p + self.step
        toks = self._tokens
        if mode == "prefill":
            _, kv = self._call(toks[: n - 1], kv)
            return kv
        _, kv = self._call(toks[:p], kv)
        for j in range(p, n - 1):
            _, kv = self._call(toks[j : j + 1], kv)
        return kv

    # -- the job contract (what the worker uses) ------------------------------------------

    @property
    def total_steps(self) -> int:
        return self.step if self._stopped else self.job.max_new_tokens

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    def run_step(self) -> None:
        if self.done:
            raise JobError(f"job {self.job.spec.id!r} is done ({self.step} steps)")
        p = int(self.job.prompt.size)
        n = p + self.step
        ids = self._tokens[:p] if self.step == 0 else self._tokens[n - 1 : n]
        logits, kv = self._call(ids, self._kv)
        job = self.job
        token = sample_token(
            logits, self._bits, temperature=job.temperature, top_k=job.top_k, top_p=job.top_p
        )
        self._tokens[n] = token
        self._kv = kv
        self.step += 1
        if job.eos_token_id is not None and token == job.eos_token_id:
            self._stopped = True

    def kv(self) -> list[torch.Tensor]:
        """The cache as it is now (on the device; do not write to it)."""
        return list(self._kv)

    def state(self) -> dict[str, Any]:
        """The job's full state on the host (the cache is copied from the device)."""
        n = int(self.job.prompt.size) + self.step
        st: dict[str, Any] = {
            "tokens": self._tokens[:n].copy(),
            "step": self.step,
            "prompt_len": int(self.job.prompt.size),
            "rng": pack_rng(self._bits),
        }
        for name, t in zip(self.job.kv_inputs, self._kv, strict=True):
            st[name] = t.cpu().numpy().copy()  # [CUDA] device -> host, snapshots only
        return st

    def outputs(self) -> dict[str, np.ndarray]:
        p = int(self.job.prompt.size)
        return {"tokens": self._tokens[p : p + self.step].copy()}
