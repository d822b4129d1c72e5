"""Build the tiny demo and test ONNX models, deterministically.

``python -m edge_agent.models build OUTDIR`` writes:

* ``tiny-decoder.onnx``: a 2-layer byte-level transformer decoder (d_model 64, 4 heads,
  vocab 256, learned positions for 4096 tokens) with the input and output names of a
  Hugging Face Optimum decoder export with past key values (no merged
  ``use_cache_branch``): ``input_ids``, ``attention_mask``, ``position_ids``,
  ``past_key_values.{i}.key/value`` in; ``logits``, ``present.{i}.key/value`` out.
  Causal self-attention, correct for a prefill of many tokens and for decoding against
  a past cache.
* ``tiny-gru.onnx``: a one-layer GRU streaming model: ``x`` [batch, 8] and ``h``
  [1, batch, 32] in; ``score`` [batch, 1] and ``h_out`` [1, batch, 32] out.
* ``sensors.npy``: a demo dataset for the GRU, float32 [5000, 8] (eight AR(1) channels).
  It needs no ``onnx``.

Every run produces byte-identical files: weights come from the raw output of numpy's
PCG64 bit generator (whose stream numpy guarantees across versions, unlike the
``Generator`` methods), the IR version and opset are pinned, and nothing time- or
machine-dependent goes into the protobuf. Files are written atomically.

This module owns the model builders. It needs the ``onnx`` package, a build-time
dependency only (``pip install onnx``, or the ``dev``/``server`` extras): it is imported
lazily, and the edge agent never imports this module at run time.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import JobError

__all__ = [
    "ARTIFACTS",
    "DECODER",
    "GRU",
    "MODEL_NAMES",
    "SENSORS",
    "build_all",
    "build_model",
    "decoder_model_bytes",
    "gru_model_bytes",
    "main",
    "sensors_bytes",
]

DECODER = "tiny-decoder.onnx"
GRU = "tiny-gru.onnx"
SENSORS = "sensors.npy"
MODEL_NAMES = (DECODER, GRU)
ARTIFACTS = (DECODER, GRU, SENSORS)

OPSET = 17  # LayerNormalization is in the default domain from opset 17
IR_VERSION = 8  # pinned: onnx would otherwise stamp its own newest IR version
PRODUCER = "edge-resume models.py"
PRODUCER_VERSION = "1"

# tiny-decoder hyper-parameters
DEC_LAYERS = 2
DEC_D_MODEL = 64
DEC_HEADS = 4
DEC_HEAD_DIM = DEC_D_MODEL // DEC_HEADS
DEC_MLP = 256
DEC_VOCAB = 256
DEC_MAX_POSITIONS = 4096
DEC_SEED = 20240611

# tiny-gru hyper-parameters
GRU_FEATURES = 8
GRU_HIDDEN = 32
GRU_SEED = 20240612
SENSORS_ROWS = 5000
SENSORS_SEED = 20240613


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - exercised only without onnx
        raise JobError(
            "building the tiny models needs the 'onnx' package, which is not installed",
            hint="pip install onnx  (or pip install 'edge-resume[dev]')",
        ) from exc
    return onnx


class _Weights:
    """Deterministic weights from PCG64's raw 64-bit stream (stable across numpy versions)."""

    def __init__(self, seed: int) -> None:
        self._bits = np.random.PCG64(seed)

    def uniform(self, shape: Sequence[int], std: float) -> np.ndarray:
        n = math.prod(shape)
        raw = self._bits.random_raw(n)
        u = (np.asarray(raw, dtype=np.uint64) >> np.uint64(11)).astype(np.float64) * 2.0**-53
        half_width = std * math.sqrt(3.0)  # uniform(-a, a) has std a / sqrt(3)
        out: np.ndarray = ((u * 2.0 - 1.0) * half_width).astype(np.float32)
        return out.reshape(tuple(shape))


class _Graph:
    """A tiny helper to write ONNX graphs node by node with unique names."""

    def __init__(self, onnx: Any) -> None:
        self.onnx = onnx
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._n = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(self.onnx.numpy_helper.from_array(value, name))
        return name

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        n_out: int = 1,
        out: Sequence[str] | None = None,
        **attrs: Any,
    ) -> Any:
        self._n += 1
        outputs = (
            list(out)
            if out is not None
            else [
                f"{op_type.lower()}_{self._n}" + (f"_{i}" if n_out > 1 else "")
                for i in range(n_out)
            ]
        )
        self.nodes.append(
            self.onnx.helper.make_node(
                op_type, list(inputs), outputs, name=f"{op_type}_{self._n}", **attrs
            )
        )
        return outputs[0] if len(outputs) == 1 else outputs

    def model(
        self, name: str, inputs: list[Any], outputs: list[Any], metadata: dict[str, str]
    ) -> bytes:
        h = self.onnx.helper
        graph = h.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        model = h.make_model(
            graph,
            opset_imports=[h.make_opsetid("", OPSET)],
            producer_name=PRODUCER,
            producer_version=PRODUCER_VERSION,
        )
        model.ir_version = IR_VERSION
        for key in sorted(metadata):
            entry = model.metadata_props.add()
            entry.key, entry.value = key, metadata[key]
        self.onnx.checker.check_model(model)
        data: bytes = model.SerializeToString(deterministic=True)
        return data


def decoder_model_bytes() -> bytes:
    """The serialized tiny-decoder model (same bytes on every call)."""
    onnx = _onnx()
    tp = onnx.TensorProto
    h = onnx.helper
    w = _Weights(DEC_SEED)
    g = _Graph(onnx)
    d, heads, hd, vocab = DEC_D_MODEL, DEC_HEADS, DEC_HEAD_DIM, DEC_VOCAB

    # Scales chosen so that random weights give varied, non-degenerate greedy text: token
    # and position embeddings of similar size, residual branches near unit gain, and a
    # lm_head tied to the token embedding (sharp enough logits to follow the context).
    wte = g.const("wte", w.uniform([vocab, d], 1.0))
    wpe = g.const("wpe", w.uniform([DEC_MAX_POSITIONS, d], 0.7))
    one = g.const("c_one", np.array(1, dtype=np.int64))
    zero = g.const("c_zero", np.array(0, dtype=np.int64))
    ax0 = g.const("c_axes0", np.array([0], dtype=np.int64))
    ax1 = g.const("c_axes1", np.array([1], dtype=np.int64))
    ax12 = g.const("c_axes12", np.array([1, 2], dtype=np.int64))
    split_heads = g.const("c_split_heads", np.array([0, 0, heads, hd], dtype=np.int64))
    merge_heads = g.const("c_merge_heads", np.array([0, 0, d], dtype=np.int64))
    qscale = g.const("c_qscale", np.array(1.0 / math.sqrt(hd), dtype=np.float32))
    neg = g.const("c_neg", np.array(-1.0e9, dtype=np.float32))
    fzero = g.const("c_fzero", np.array(0.0, dtype=np.float32))
    gelu_k = g.const("c_gelu_k", np.array(1.702, dtype=np.float32))

    # Sizes: S = new tokens, T = past + new (from attention_mask), P = T - S.
    s_len = g.op("Gather", [g.op("Shape", ["input_ids"]), one], axis=0)
    t_len = g.op("Gather", [g.op("Shape", ["attention_mask"]), one], axis=0)
    p_len = g.op("Sub", [t_len, s_len])
    q_pos = g.op("Range", [p_len, t_len, one])  # [S] absolute positions of the queries
    k_pos = g.op("Range", [zero, t_len, one])  # [T]
    causal = g.op("LessOrEqual", [g.op("Unsqueeze", [k_pos, ax0]), g.op("Unsqueeze", [q_pos, ax1])])
    pad = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], to=tp.BOOL), ax12])  # [B,1,1,T]
    allowed = g.op("And", [causal, pad])  # [B,1,S,T]
    mask_add = g.op("Where", [allowed, fzero, neg])

    x = g.op(
        "Add",
        [g.op("Gather", [wte, "input_ids"], axis=0), g.op("Gather", [wpe, "position_ids"], axis=0)],
    )

    def layer_norm(inp: str, prefix: str) -> str:
        gamma = g.const(f"{prefix}.weight", 1.0 + w.uniform([d], 0.1))
        beta = g.const(f"{prefix}.bias", w.uniform([d], 0.1))
        out: str = g.op("LayerNormalization", [inp, gamma, beta], axis=-1, epsilon=1e-5)
        return out

    def linear(inp: str, prefix: str, n_in: int, n_out: int, std: float) -> str:
        weight = g.const(f"{prefix}.weight", w.uniform([n_in, n_out], std))
        bias = g.const(f"{prefix}.bias", w.uniform([n_out], 0.02))
        out: str = g.op("Add", [g.op("MatMul", [inp, weight]), bias])
        return out

    for i in range(DEC_LAYERS):
        p = f"layers.{i}"
        hin = layer_norm(x, f"{p}.ln_1")
        heads_of = {}
        for name in ("q", "k", "v"):
            proj = linear(hin, f"{p}.attn.{name}", d, d, 1.0 / math.sqrt(d))
            heads_of[name] = g.op(
                "Transpose", [g.op("Reshape", [proj, split_heads])], perm=[0, 2, 1, 3]
            )  # [B,H,S,hd]
        k_all = g.op(
            "Concat", [f"past_key_values.{i}.key", heads_of["k"]], axis=2, out=[f"present.{i}.key"]
        )
        v_all = g.op(
            "Concat",
            [f"past_key_values.{i}.value", heads_of["v"]],
            axis=2,
            out=[f"present.{i}.value"],
        )
        q = g.op("Mul", [heads_of["q"], qscale])
        scores = g.op("MatMul", [q, g.op("Transpose", [k_all], perm=[0, 1, 3, 2])])  # [B,H,S,T]
        probs = g.op("Softmax", [g.op("Add", [scores, mask_add])], axis=-1)
        attn = g.op("MatMul", [probs, v_all])  # [B,H,S,hd]
        attn = g.op("Reshape", [g.op("Transpose", [attn], perm=[0, 2, 1, 3]), merge_heads])
        x = g.op("Add", [x, linear(attn, f"{p}.attn.out", d, d, 1.0 / math.sqrt(d))])
        hmid = linear(layer_norm(x, f"{p}.ln_2"), f"{p}.mlp.up", d, DEC_MLP, 1.0 / math.sqrt(d))
        act = g.op("Mul", [hmid, g.op("Sigmoid", [g.op("Mul", [hmid, gelu_k])])])  # quick GELU
        x = g.op("Add", [x, linear(act, f"{p}.mlp.down", DEC_MLP, d, 1.0 / math.sqrt(DEC_MLP))])

    final = layer_norm(x, "ln_f")
    lm_head = g.const("lm_head", w.uniform([d, vocab], 0.4))
    # A fixed bias towards printable ASCII (letters and space most), so that the demo's
    # output reads as text-like noise rather than control bytes.
    bias = np.zeros([vocab], dtype=np.float32)
    bias[32:127] = 6.0
    bias[ord("a") : ord("z") + 1] = 9.0
    bias[ord(" ")] = 10.0
    lm_bias = g.const("lm_bias", bias)
    g.op("Add", [g.op("MatMul", [final, lm_head]), lm_bias], out=["logits"])

    f32, i64 = tp.FLOAT, tp.INT64
    kv_in = ["batch_size", heads, "past_sequence_length", hd]
    kv_out = ["batch_size", heads, "total_sequence_length", hd]
    inputs = [
        h.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
        h.make_tensor_value_info("attention_mask", i64, ["batch_size", "total_sequence_length"]),
        h.make_tensor_value_info("position_ids", i64, ["batch_size", "sequence_length"]),
    ]
    outputs = [h.make_tensor_value_info("logits", f32, ["batch_size", "sequence_length", vocab])]
    for i in range(DEC_LAYERS):
        for kind in ("key", "value"):
            inputs.append(h.make_tensor_value_info(f"past_key_values.{i}.{kind}", f32, kv_in))
            outputs.append(h.make_tensor_value_info(f"present.{i}.{kind}", f32, kv_out))
    metadata = {
        "edge_resume.model": "tiny-decoder",
        "max_positions": str(DEC_MAX_POSITIONS),
        "vocab_size": str(vocab),
        "num_layers": str(DEC_LAYERS),
        "num_heads": str(heads),
        "tokenizer": "bytes",
    }
    return g.model("tiny_decoder", inputs, outputs, metadata)


def gru_model_bytes() -> bytes:
    """The serialized tiny-gru model (same bytes on every call)."""
    onnx = _onnx()
    tp = onnx.TensorProto
    h = onnx.helper
    w = _Weights(GRU_SEED)
    g = _Graph(onnx)
    f, hid = GRU_FEATURES, GRU_HIDDEN

    ax0 = g.const("c_axes0", np.array([0], dtype=np.int64))
    wx = g.const("gru.W", w.uniform([1, 3 * hid, f], 1.0 / math.sqrt(f)))
    wh = g.const("gru.R", w.uniform([1, 3 * hid, hid], 1.0 / math.sqrt(hid)))
    bias = g.const("gru.B", w.uniform([1, 6 * hid], 0.1))
    seq = g.op("Unsqueeze", ["x", ax0])  # [1, B, F]: one time step
    _, y_h = g.op(
        "GRU", [seq, wx, wh, bias, "", "h"], n_out=2, hidden_size=hid, linear_before_reset=1
    )
    g.op("Identity", [y_h], out=["h_out"])
    head_w = g.const("head.weight", w.uniform([hid, 1], 1.0 / math.sqrt(hid)))
    head_b = g.const("head.bias", np.zeros([1], dtype=np.float32))
    last = g.op("Squeeze", [y_h, ax0])  # [B, H]
    g.op("Sigmoid", [g.op("Add", [g.op("MatMul", [last, head_w]), head_b])], out=["score"])

    f32 = tp.FLOAT
    inputs = [
        h.make_tensor_value_info("x", f32, ["batch_size", f]),
        h.make_tensor_value_info("h", f32, [1, "batch_size", hid]),
    ]
    outputs = [
        h.make_tensor_value_info("score", f32, ["batch_size", 1]),
        h.make_tensor_value_info("h_out", f32, [1, "batch_size", hid]),
    ]
    metadata = {"edge_resume.model": "tiny-gru", "features": str(f), "hidden": str(hid)}
    return g.model("tiny_gru", inputs, outputs, metadata)


def sensors_bytes() -> bytes:
    """The demo dataset as .npy bytes: x[t] = 0.95 x[t-1] + noise, eight channels.
    Only correctly rounded IEEE operations, so every machine writes the same bytes."""
    w = _Weights(SENSORS_SEED)
    noise = w.uniform([SENSORS_ROWS, GRU_FEATURES], 0.3).astype(np.float64)
    data = np.zeros((SENSORS_ROWS, GRU_FEATURES), dtype=np.float64)
    prev = np.zeros(GRU_FEATURES, dtype=np.float64)
    for t in range(SENSORS_ROWS):
        prev = 0.95 * prev + noise[t]
        data[t] = prev
    buf = io.BytesIO()
    np.lib.format.write_array(buf, data.astype(np.float32), version=(1, 0), allow_pickle=False)
    return buf.getvalue()


_BUILDERS = {DECODER: decoder_model_bytes, GRU: gru_model_bytes, SENSORS: sensors_bytes}


def _write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename, fsync the folder."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def build_model(name: str, outdir: str | os.PathLike[str]) -> Path:
    """Build one artifact (``tiny-decoder.onnx``, ``tiny-gru.onnx`` or ``sensors.npy``)
    into ``outdir``; an identical file already there is left alone."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise JobError(f"no model named {name!r}", hint=f"one of {', '.join(ARTIFACTS)}") from None
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    data = builder()
    if not (path.is_file() and path.read_bytes() == data):
        _write_atomic(path, data)
    return path


def build_all(outdir: str | os.PathLike[str]) -> dict[str, Path]:
    """Build every model and the demo dataset into ``outdir``; returns name → path."""
    return {name: build_model(name, outdir) for name in ARTIFACTS}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edge_agent.models",
        description="Build the tiny demo/test ONNX models deterministically.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="write the models into OUTDIR")
    build.add_argument("outdir", help="folder to write the .onnx files into (created if needed)")
    build.add_argument(
        "--only", choices=ARTIFACTS, action="append", help="build only this file (repeatable)"
    )
    args = parser.parse_args(argv)
    try:
        for name in args.only or ARTIFACTS:
            path = build_model(name, args.outdir)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            print(f"{path}  {path.stat().st_size} bytes  sha256 {digest}")
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
