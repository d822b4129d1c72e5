"""Realistic state trajectories for benchmarks and tests: consecutive snapshots of one job.

Each trajectory is built from a real computation (torch on the CPU, numpy), seeded and
deterministic on a given machine: a small transformer decoder generating with a KV cache
(fp32 and fp16), a beam search of width 4 that reorders its cache every step, a GRU over a
synthetic sensor stream, batch inference appending embeddings, sparse online adaptation of
a few MB of weights, and a job whose state changes structure (keys, dtypes, shapes).

A state is a ``dict[str, value]`` as ``edge_agent.state`` defines it (numpy arrays, numpy
scalars, plain values). Snapshots are *values*: no array handed out in one snapshot is ever
written to afterwards, so a trajectory can be kept in memory and encoded pairwise.

This module owns the builders and nothing else: no timing, no I/O, no codec. It needs torch
(the ``server`` extra), which the edge install does not have; it is a dev/bench tool.

    from bench.trajectories import TRAJECTORIES, build
    traj = build("kv-fp16", quick=True)
    for prev, cur in zip(traj.states, traj.states[1:]): ...
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["TRAJECTORIES", "TinyDecoder", "Trajectory", "build", "names"]

State = dict[str, Any]


@dataclass(frozen=True)
class Trajectory:
    """Consecutive snapshots of one job, oldest first."""

    name: str
    description: str
    states: list[State]


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread (deterministic reductions, a fair one-core picture)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _np(t: torch.Tensor) -> np.ndarray:
    """A fresh numpy copy of a tensor (never a view that a later step could write into)."""
    return np.array(t.detach().cpu().numpy(), copy=True)


# --------------------------------------------------------------------------------------
# A small decoder-only transformer with a KV cache (GPT-2 shaped, random weights)
# --------------------------------------------------------------------------------------


class TinyDecoder:
    """A pre-LN decoder-only transformer with random, seeded weights.

    Learned absolute position embeddings, multi-head self-attention with a KV cache,
    a GELU MLP, a final layer norm and an output head. All arithmetic runs in ``dtype``
    (fp16 included: torch supports it on the CPU), so an fp16 cache holds what an fp16
    model really computes. The cache is a list of ``(key, value)`` tensors of shape
    ``[batch, heads, seq, head_dim]``, one pair per layer, as Hugging Face models keep it.
    """

    def __init__(
        self,
        *,
        seed: int,
        vocab: int = 1024,
        d_model: int = 256,
        n_heads: int = 8,
        n_layers: int = 4,
        d_ff: int = 1024,
        max_pos: int = 2048,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        g = torch.Generator().manual_seed(seed)

        def w(*shape: int, std: float) -> torch.Tensor:
            return (torch.randn(*shape, generator=g) * std).to(dtype)

        self.vocab, self.d, self.h, self.hd = vocab, d_model, n_heads, d_model // n_heads
        self.n_layers, self.dtype = n_layers, dtype
        self.tok = w(vocab, d_model, std=1.0)
        self.pos = w(max_pos, d_model, std=1.0)
        s_in, s_ff = 1.0 / math.sqrt(d_model), 1.0 / math.sqrt(d_ff)
        self.layers: list[dict[str, Any]] = [
            {
                "ln1": (torch.ones(d_model, dtype=dtype), w(d_model, std=0.02)),
                "wqkv": w(d_model, 3 * d_model, std=s_in),
                "bqkv": w(3 * d_model, std=0.02),
                "wo": w(d_model, d_model, std=s_in),
                "ln2": (torch.ones(d_model, dtype=dtype), w(d_model, std=0.02)),
                "w1": w(d_model, d_ff, std=s_in),
                "b1": w(d_ff, std=0.02),
                "w2": w(d_ff, d_model, std=s_ff),
                "b2": w(d_model, std=0.02),
            }
            for _ in range(n_layers)
        ]
        self.lnf = (torch.ones(d_model, dtype=dtype), torch.zeros(d_model, dtype=dtype))
        self.head = w(d_model, vocab, std=s_in)

    def _ln(self, x: torch.Tensor, p: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.layer_norm(x, (self.d,), p[0], p[1])

    @torch.no_grad()
    def forward(
        self, tokens: torch.Tensor, cache: list[tuple[torch.Tensor, torch.Tensor]] | None
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Run ``tokens`` ([batch, T] int64) after ``cache``; return fp32 logits
        ([batch, T, vocab]) and the grown cache (new tensors; the old ones are untouched)."""
        b, t = tokens.shape
        past = 0 if cache is None else cache[0][0].shape[2]
        x = self.tok[tokens] + self.pos[past : past + t][None]
        new_cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, lp in enumerate(self.layers):
            qkv = self._ln(x, lp["ln1"]) @ lp["wqkv"] + lp["bqkv"]
            q, k, v = (z.view(b, t, self.h, self.hd).transpose(1, 2) for z in qkv.split(self.d, -1))
            if cache is not None:
                k = torch.cat([cache[i][0], k], dim=2)
                v = torch.cat([cache[i][1], v], dim=2)
            new_cache.append((k, v))
            att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(self.hd))
            if t > 1:
                mask = torch.ones(t, past + t, dtype=torch.bool).tril(past)
                att = att.masked_fill(~mask, float("-inf"))
            y = torch.softmax(att, dim=-1) @ v
            x = x + y.transpose(1, 2).reshape(b, t, self.d) @ lp["wo"]
            hmid = F.gelu(self._ln(x, lp["ln2"]) @ lp["w1"] + lp["b1"])
            x = x + hmid @ lp["w2"] + lp["b2"]
        logits = (self._ln(x, self.lnf) @ self.head).float()
        return logits, new_cache


def _kv_entries(cache: list[tuple[torch.Tensor, torch.Tensor]]) -> State:
    out: State = {}
    for i, (k, v) in enumerate(cache):
        out[f"past_key_values.{i}.key"] = _np(k)
        out[f"past_key_values.{i}.value"] = _np(v)
    return out


def kv_generation(
    *, dtype: torch.dtype, seed: int, prompt_len: int, new_tokens: int, every: int
) -> list[State]:
    """Greedy generation with a KV cache; a snapshot after the prompt and every ``every``
    new tokens. Entries: ``past_key_values.{i}.key/.value`` ([1, heads, seq, head_dim] in
    the model's dtype), ``tokens`` (int64 [1, seq], grows on axis 1), ``step`` (int) and an
    unchanging ``generation_config`` dict."""
    model = TinyDecoder(seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, model.vocab, (1, prompt_len), generator=g)
    config = {"max_new_tokens": new_tokens, "do_sample": False, "dtype": str(dtype)}

    def snap(step: int) -> State:
        return {
            **_kv_entries(cache),
            "tokens": _np(tokens),
            "step": step,
            "generation_config": dict(config),
        }

    logits, cache = model.forward(tokens, None)
    states = [snap(0)]
    for step in range(1, new_tokens + 1):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
        logits, cache = model.forward(nxt, cache)
        if step % every == 0:
            states.append(snap(step))
    return states


def beam_search(*, seed: int, width: int, prompt_len: int, steps: int, every: int) -> list[State]:
    """Beam search of ``width`` beams with the same kind of model. Every step the cache is
    reordered along the batch axis (``cache = cache[beam_idx]``) and then grown by one
    position, as Hugging Face's ``_reorder_cache`` does. Entries: the cache
    ([width, heads, seq, head_dim] fp32), ``sequences`` (int64 [width, seq]),
    ``beam_scores`` (float32 [width]), ``beam_idx`` (int64 [width], the last reorder),
    ``step``."""
    model = TinyDecoder(seed=seed, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randint(0, model.vocab, (1, prompt_len), generator=g)
    logits, cache1 = model.forward(prompt, None)
    cache = [
        (k.expand(width, -1, -1, -1).contiguous(), v.expand(width, -1, -1, -1).contiguous())
        for k, v in cache1
    ]
    sequences = prompt.repeat(width, 1)
    beam_scores = torch.full((width,), -1e9)
    beam_scores[0] = 0.0  # all beams start identical: only the first may expand at first
    beam_idx = torch.arange(width)
    last = logits[:, -1].expand(width, -1)

    def snap(step: int) -> State:
        return {
            **_kv_entries(cache),
            "sequences": _np(sequences),
            "beam_scores": _np(beam_scores.float()),
            "beam_idx": _np(beam_idx),
            "step": step,
        }

    states = [snap(0)]
    for step in range(1, steps + 1):
        logp = torch.log_softmax(last, dim=-1) + beam_scores[:, None]
        top, idx = logp.reshape(-1).topk(width)
        beam_idx = torch.div(idx, model.vocab, rounding_mode="floor")
        tok = idx % model.vocab
        cache = [(k[beam_idx], v[beam_idx]) for k, v in cache]
        sequences = torch.cat([sequences[beam_idx], tok[:, None]], dim=1)
        beam_scores = top
        logits, cache = model.forward(tok[:, None], cache)
        last = logits[:, -1]
        if step % every == 0:
            states.append(snap(step))
    return states


# --------------------------------------------------------------------------------------
# GRU over a synthetic sensor stream
# --------------------------------------------------------------------------------------


def _sensor_stream(rng: np.random.Generator, n: int, channels: int) -> np.ndarray:
    """Sinusoids of assorted periods and phases, noise, spikes and level shifts."""
    t = np.arange(n, dtype=np.float64)[:, None]
    period = rng.uniform(20.0, 400.0, size=channels)
    phase = rng.uniform(0.0, 2 * math.pi, size=channels)
    amp = rng.uniform(0.5, 2.0, size=channels)
    x = amp * np.sin(2 * math.pi * t / period + phase) + 0.1 * rng.standard_normal((n, channels))
    for _ in range(max(1, n // 2000)):  # spikes
        x[rng.integers(n), rng.integers(channels)] += rng.uniform(4.0, 8.0)
    for _ in range(max(1, n // 5000)):  # level shifts
        start = int(rng.integers(n))
        x[start : start + int(rng.integers(50, 500)), rng.integers(channels)] += 3.0
    return x.astype(np.float32)


def gru_stream(
    *,
    seed: int,
    channels: int,
    hidden: int,
    layers: int,
    window: int,
    windows_per_snap: int,
    snaps: int,
) -> list[State]:
    """A GRU predicting the next sample of a sensor stream, window by window. Entries:
    ``gru.h`` (float32 [layers, 1, hidden], changes fully every step), ``errors`` (float32
    [samples, channels], per-sample squared prediction error, grows on axis 0),
    ``window_scores`` (float32 [windows], grows), Welford statistics of the errors
    (``stats.count`` int64 scalar, ``stats.mean`` / ``stats.m2`` float64 [channels]),
    ``cursor`` (int) and an unchanging ``model`` dict."""
    torch.manual_seed(seed)
    gru = torch.nn.GRU(channels, hidden, layers, batch_first=True)
    head = torch.nn.Linear(hidden, channels)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*gru.parameters(), *head.parameters()]:
            bound = 1.0 / math.sqrt(hidden)
            p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
    rng = np.random.default_rng(seed)
    total = snaps * windows_per_snap * window
    stream = _sensor_stream(rng, total + 1, channels)
    h = torch.zeros(layers, 1, hidden)
    errors = np.zeros((0, channels), np.float32)
    window_scores = np.zeros((0,), np.float32)
    count, mean, m2 = np.int64(0), np.zeros(channels), np.zeros(channels)
    cursor = 0
    model = {
        "kind": "gru",
        "channels": channels,
        "hidden": hidden,
        "layers": layers,
        "window": window,
    }

    def snap() -> State:
        return {
            "gru.h": _np(h),
            "errors": errors,
            "window_scores": window_scores,
            "stats.count": count,
            "stats.mean": mean,
            "stats.m2": m2,
            "cursor": cursor,
            "model": dict(model),
        }

    states = [snap()]
    with torch.no_grad():
        for _ in range(snaps):
            for _ in range(windows_per_snap):
                xin = torch.from_numpy(stream[cursor : cursor + window])[None]
                target = stream[cursor + 1 : cursor + window + 1]
                out, h = gru(xin, h)
                err = ((_np(head(out)[0]) - target) ** 2).astype(np.float32)
                # Chan et al.'s parallel Welford merge of this window into the running stats
                nb = err.shape[0]
                mb = err.mean(axis=0, dtype=np.float64)
                m2b = ((err - mb) ** 2).sum(axis=0, dtype=np.float64)
                n_new = count + nb
                delta = mb - mean
                mean = mean + delta * (nb / n_new)
                m2 = m2 + m2b + delta**2 * (count * nb / n_new)
                count = np.int64(n_new)
                std = np.sqrt(m2 / max(int(count) - 1, 1)) + 1e-6
                score = np.float32(np.abs((err - mean) / std).mean())
                errors = np.concatenate([errors, err], axis=0)
                window_scores = np.concatenate([window_scores, [score]]).astype(np.float32)
                cursor += window
            states.append(snap())
    return states


# --------------------------------------------------------------------------------------
# Batch inference appending embeddings
# --------------------------------------------------------------------------------------


def batch_embed(
    *, seed: int, batch: int, snaps: int, dim: int = 384, vocab: int = 8192, doc_len: int = 64
) -> list[State]:
    """A bag-of-tokens encoder (embedding bag, GELU MLP, L2 normalisation) run in batches
    over a synthetic corpus. Entries: ``embeddings`` (float32 [n, dim], grows on axis 0),
    ``doc_ids`` (int64 [n], a shuffled order), ``cursor`` (int), an unchanging ``encoder``
    dict."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.EmbeddingBag(vocab, 256, mode="mean")
    with torch.no_grad():
        emb.weight.copy_(torch.randn(vocab, 256, generator=g))
    w1 = torch.randn(256, 768, generator=g) / 16.0
    w2 = torch.randn(768, dim, generator=g) / math.sqrt(768)
    n = batch * snaps
    order = torch.randperm(n, generator=g)
    # Zipf-like token frequencies, like text
    probs = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    docs = torch.multinomial(probs / probs.sum(), n * doc_len, replacement=True, generator=g)
    docs = docs.view(n, doc_len)
    embeddings = np.zeros((0, dim), np.float32)
    doc_ids = np.zeros((0,), np.int64)
    encoder = {"kind": "bag-mlp", "dim": dim, "vocab": vocab, "batch": batch}
    states: list[State] = [
        {"embeddings": embeddings, "doc_ids": doc_ids, "cursor": 0, "encoder": dict(encoder)}
    ]
    with torch.no_grad():
        for s in range(snaps):
            ids = order[s * batch : (s + 1) * batch]
            z = F.gelu(emb(docs[ids]) @ w1) @ w2
            z = z / z.norm(dim=-1, keepdim=True)
            embeddings = np.concatenate([embeddings, _np(z)], axis=0)
            doc_ids = np.concatenate([doc_ids, _np(ids)])
            states.append(
                {
                    "embeddings": embeddings,
                    "doc_ids": doc_ids,
                    "cursor": (s + 1) * batch,
                    "encoder": dict(encoder),
                }
            )
    return states


# --------------------------------------------------------------------------------------
# Sparse online adaptation of a few MB of weights
# --------------------------------------------------------------------------------------


def sparse_weights(
    *,
    seed: int,
    d_in: int,
    d_hidden: int,
    d_out: int,
    snaps: int,
    steps_per_snap: int,
    keep: float,
) -> list[State]:
    """An MLP adapting online to a drifting teacher with *sparse* SGD steps: each step
    updates only the ``keep`` fraction of entries with the largest gradient (per tensor),
    by a small amount. Entries: ``model.w1/b1/w2/b2`` (float32), ``optimizer.step`` (int),
    ``optimizer.lr`` (float), ``loss_ema`` (float)."""
    g = torch.Generator().manual_seed(seed)
    params = {
        "model.w1": torch.randn(d_in, d_hidden, generator=g) / math.sqrt(d_in),
        "model.b1": torch.zeros(d_hidden),
        "model.w2": torch.randn(d_hidden, d_out, generator=g) / math.sqrt(d_hidden),
        "model.b2": torch.zeros(d_out),
    }
    teacher = torch.randn(d_in, d_out, generator=g) / math.sqrt(d_in)
    lr, step, loss_ema = 1e-3, 0, 0.0

    def snap() -> State:
        return {
            **{k: _np(v) for k, v in params.items()},
            "optimizer.step": step,
            "optimizer.lr": lr,
            "loss_ema": loss_ema,
        }

    states = [snap()]
    for _ in range(snaps):
        for _ in range(steps_per_snap):
            x = torch.randn(64, d_in, generator=g)
            drift = 1.0 + 0.01 * step
            y = torch.tanh(x @ teacher * drift)
            ps = {k: v.clone().requires_grad_(True) for k, v in params.items()}
            pred = F.gelu(x @ ps["model.w1"] + ps["model.b1"]) @ ps["model.w2"] + ps["model.b2"]
            loss = F.mse_loss(pred, y)
            grads = torch.autograd.grad(loss, list(ps.values()))
            with torch.no_grad():
                new = {}
                for k, grad in zip(ps, grads, strict=True):
                    kth = max(1, int(grad.numel() * keep))
                    thresh = grad.abs().reshape(-1).topk(kth).values[-1]
                    mask = grad.abs() >= thresh
                    new[k] = params[k] - lr * grad * mask  # a new tensor: old snapshots stay
                params = new
            step += 1
            loss_ema = 0.9 * loss_ema + 0.1 * float(loss.detach())
        states.append(snap())
    return states


# --------------------------------------------------------------------------------------
# A job whose state changes structure
# --------------------------------------------------------------------------------------


def structural(*, seed: int, n: int, batch: int, kmeans_iters: int, pca_snaps: int) -> list[State]:
    """A three-phase analysis job (features, k-means, PCA) whose state changes shape:

    * features: ``feat`` (float32 [rows, 64]) grows, ``hist`` (int32 [32]) accumulates,
      a temporary ``tmp.batch_mean`` exists, ``log`` (list of str) grows, ``config`` (dict);
    * entering k-means: ``feat`` becomes float16 (a dtype change), ``hist`` is widened to
      int64, ``tmp.batch_mean`` is removed, ``centroids`` and ``assign`` (int32) are added;
      k-means iterations update ``centroids`` densely and ``assign`` sparsely, ``inertia``
      (a list of floats) grows, ``iter`` is a numpy int32 scalar;
      at the second iteration ``feat`` is reshaped to tiles [n/128, 128, 64] (same bytes),
      at the third ``centroids`` is renamed ``model.centroids``;
    * entering PCA: ``feat`` is removed; ``components`` (float64 [8, 64]) is refined by
      power iteration, ``proj`` (float32 [rows, 8]) grows, ``explained`` (numpy float64)
      changes; at the last snapshot ``hist`` is dropped and a ``summary`` dict appears.
    """
    rng = np.random.default_rng(seed)
    k, d = 16, 64
    centers = rng.standard_normal((k, d)) * 2.0
    labels = rng.integers(0, k, size=n)
    data = (centers[labels] + rng.standard_normal((n, d))).astype(np.float32)
    proj_w = (rng.standard_normal((d, d)) / math.sqrt(d)).astype(np.float32)

    states: list[State] = []
    log: list[str] = []
    feat = np.zeros((0, d), np.float32)
    hist = np.zeros(32, np.int32)
    edges = np.linspace(-1.0, 1.0, 33)

    # phase 1: features
    for start in range(0, n, batch):
        rows = np.tanh(data[start : start + batch] @ proj_w)
        feat = np.concatenate([feat, rows], axis=0)
        hist = hist + np.histogram(rows[:, 0], bins=edges)[0].astype(np.int32)
        log = [*log, f"features {start}..{start + len(rows)}"]
        states.append(
            {
                "feat": feat,
                "hist": hist,
                "tmp.batch_mean": rows.mean(axis=0),
                "config": {"phase": "features", "batch": batch, "k": k},
                "log": log,
                "progress": len(feat) / n,
            }
        )

    # phase 2: k-means on fp16 features
    feat16 = feat.astype(np.float16)
    hist64 = hist.astype(np.int64)
    x32 = feat16.astype(np.float32)
    centroids = x32[rng.choice(n, size=k, replace=False)].copy()
    assign = np.zeros(n, np.int32)
    inertia: list[float] = []
    for it in range(kmeans_iters):
        dist = ((x32[:, None, :] - centroids[None]) ** 2).sum(-1)
        assign = dist.argmin(1).astype(np.int32)
        inertia = [*inertia, float(dist.min(1).sum())]
        centroids = np.stack(
            [x32[assign == c].mean(0) if (assign == c).any() else centroids[c] for c in range(k)]
        ).astype(np.float32)
        log = [*log, f"kmeans iter {it} inertia {inertia[-1]:.3f}"]
        feat_v = feat16 if it < 1 else feat16.reshape(n // 128, 128, d)
        st: State = {
            "feat": feat_v,
            "hist": hist64,
            "assign": assign,
            "inertia": inertia,
            "iter": np.int32(it),
            "log": log,
            "config": {"phase": "kmeans", "batch": batch, "k": k},
        }
        st["centroids" if it < 2 else "model.centroids"] = centroids
        states.append(st)

    # phase 3: PCA by block power iteration, projecting batch by batch
    xc = x32 - x32.mean(0)
    cov = (xc.T @ xc / n).astype(np.float64)
    comps = np.linalg.qr(rng.standard_normal((d, 8)))[0]
    proj = np.zeros((0, 8), np.float32)
    total_var = float(np.trace(cov))
    per = max(1, n // pca_snaps)
    for s in range(pca_snaps):
        comps = np.linalg.qr(cov @ comps)[0]
        explained = np.float64(np.trace(comps.T @ cov @ comps) / total_var)
        proj = np.concatenate([proj, (xc[s * per : (s + 1) * per] @ comps).astype(np.float32)])
        log = [*log, f"pca {s} explained {float(explained):.4f}"]
        st = {
            "model.centroids": centroids,
            "assign": assign,
            "inertia": inertia,
            "components": comps.T.copy(),
            "proj": proj,
            "explained": explained,
            "log": log,
            "config": {"phase": "pca", "n_components": 8, "batch": per},
        }
        if s < pca_snaps - 1:
            st["hist"] = hist64
        else:
            st["summary"] = {
                "clusters": np.bincount(assign, minlength=k).tolist(),
                "explained": float(explained),
                "done": True,
            }
        states.append(st)
    return states


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

_Builder = Callable[[bool, int], list[State]]

TRAJECTORIES: dict[str, tuple[str, _Builder]] = {
    "kv-fp32": (
        "transformer decoder (4 layers, d 256, 8 heads) greedy generation, fp32 KV cache",
        lambda q, s: kv_generation(
            dtype=torch.float32, seed=s, prompt_len=32, new_tokens=48 if q else 384, every=16
        ),
    ),
    "kv-fp16": (
        "the same decoder computing in fp16, fp16 KV cache",
        lambda q, s: kv_generation(
            dtype=torch.float16, seed=s, prompt_len=32, new_tokens=48 if q else 384, every=16
        ),
    ),
    "beam4": (
        "beam search of width 4, cache reordered on the batch axis every step",
        lambda q, s: beam_search(seed=s, width=4, prompt_len=24, steps=24 if q else 192, every=8),
    ),
    "gru-stream": (
        "2-layer GRU (hidden 256) over a 32-channel sensor stream, appended errors, Welford",
        lambda q, s: gru_stream(
            seed=s,
            channels=32,
            hidden=256,
            layers=2,
            window=256,
            windows_per_snap=4,
            snaps=4 if q else 30,
        ),
    ),
    "batch-embed": (
        "batch inference of an encoder appending float32 embeddings [N, 384]",
        lambda q, s: batch_embed(seed=s, batch=128, snaps=4 if q else 30),
    ),
    "sparse-weights": (
        "3 MB of fp32 weights, sparse SGD: ~1% of entries per step, 3 steps per snapshot",
        lambda q, s: sparse_weights(
            seed=s,
            d_in=512,
            d_hidden=1024,
            d_out=256,
            snaps=4 if q else 24,
            steps_per_snap=3,
            keep=0.01,
        ),
    ),
    "structural": (
        "3-phase job: keys added/removed/renamed, f32->f16, i32->i64, reshape, plain values",
        lambda q, s: structural(
            seed=s,
            n=2048 if q else 8192,
            batch=1024,
            kmeans_iters=3 if q else 8,
            pca_snaps=2 if q else 8,
        ),
    ),
}


def names() -> list[str]:
    """The trajectory names, in table order."""
    return list(TRAJECTORIES)


def build(name: str, *, quick: bool = False, seed: int = 0) -> Trajectory:
    """Build one trajectory by name (``quick``: a few snapshots only, for smoke tests)."""
    if name not in TRAJECTORIES:
        raise KeyError(f"unknown trajectory {name!r}; known: {', '.join(TRAJECTORIES)}")
    description, builder = TRAJECTORIES[name]
    with _one_thread():
        states = builder(quick, seed)
    return Trajectory(name, description, states)
