"""The tiny demo models: deterministic builds and real transformer / GRU behaviour in ORT."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edge_agent import models
from edge_agent.errors import JobError

REPO = Path(__file__).resolve().parents[1]
HEADS, HEAD_DIM, LAYERS = models.DEC_HEADS, models.DEC_HEAD_DIM, models.DEC_LAYERS


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def decoder(tiny_models: dict[str, Path]) -> ort.InferenceSession:
    return _session(tiny_models[models.DECODER])


def _empty_past(batch: int = 1) -> list[np.ndarray]:
    return [np.zeros((batch, HEADS, 0, HEAD_DIM), np.float32) for _ in range(2 * LAYERS)]


def _run(
    sess: ort.InferenceSession,
    ids: list[int],
    past: list[np.ndarray],
    mask: np.ndarray | None = None,
    pos: np.ndarray | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    p = past[0].shape[2]
    n = len(ids)
    feeds = {
        "input_ids": np.array([ids], np.int64),
        "attention_mask": np.ones((1, p + n), np.int64) if mask is None else mask,
        "position_ids": np.arange(p, p + n, dtype=np.int64)[None] if pos is None else pos,
    }
    for i in range(LAYERS):
        feeds[f"past_key_values.{i}.key"] = past[2 * i]
        feeds[f"past_key_values.{i}.value"] = past[2 * i + 1]
    out = sess.run(None, feeds)
    return out[0], out[1:]


def test_build_is_byte_identical_across_runs_and_processes(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    again = models.build_all(tmp_path / "a")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "12345"}
    proc = subprocess.run(
        [sys.executable, "-m", "edge_agent.models", "build", str(tmp_path / "b")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    for name in models.ARTIFACTS:
        first = tiny_models[name].read_bytes()
        assert again[name].read_bytes() == first
        assert (tmp_path / "b" / name).read_bytes() == first
        assert first == models._BUILDERS[name]()
        assert name in proc.stdout
    assert tiny_models[models.DECODER].stat().st_size < 2_000_000
    assert not list((tmp_path / "a").glob(".*.tmp"))  # atomic writes leave no temp files


def test_unknown_model_name_and_missing_onnx(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(JobError, match="no model named"):
        models.build_model("huge.onnx", tmp_path)
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(JobError, match="pip install onnx"):
        models.build_model(models.GRU, tmp_path)
    assert models.main(["build", str(tmp_path), "--only", models.GRU]) == 1
    # the dataset needs no onnx
    assert models.main(["build", str(tmp_path), "--only", models.SENSORS]) == 0
    data = np.load(tmp_path / models.SENSORS)
    assert data.shape == (models.SENSORS_ROWS, models.GRU_FEATURES) and data.dtype == np.float32
    assert 0.3 < float(data.std()) < 3.0


def test_decoder_interface_follows_optimum_names(decoder: ort.InferenceSession) -> None:
    ins = {i.name: i for i in decoder.get_inputs()}
    outs = {o.name: o for o in decoder.get_outputs()}
    assert list(ins)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert ins["input_ids"].type == "tensor(int64)"
    for i in range(LAYERS):
        for kv in ("key", "value"):
            assert ins[f"past_key_values.{i}.{kv}"].shape[1::2] == [HEADS, HEAD_DIM]
            assert f"present.{i}.{kv}" in outs
    assert outs["logits"].shape[-1] == 256
    meta = decoder.get_modelmeta().custom_metadata_map
    assert meta["max_positions"] == "4096"


def test_decoding_after_prefill_matches_one_longer_prefill(decoder: ort.InferenceSession) -> None:
    ids = list(b"edge gateways keep the work")
    full, _ = _run(decoder, ids, _empty_past())
    # prefill n tokens, then decode one: same logits as one prefill of n+1
    head, past = _run(decoder, ids[:-1], _empty_past())
    last, present = _run(decoder, ids[-1:], past)
    np.testing.assert_allclose(last[0, -1], full[0, -1], rtol=0, atol=1e-4)
    np.testing.assert_allclose(head[0], full[0, :-1], rtol=0, atol=1e-5)
    assert present[0].shape == (1, HEADS, len(ids), HEAD_DIM)
    # a chunk of several tokens against a non-empty past (seq > 1 and past > 0 together)
    _, past = _run(decoder, ids[:10], _empty_past())
    rest, _ = _run(decoder, ids[10:], past)
    np.testing.assert_allclose(rest[0], full[0, 10:], rtol=0, atol=1e-4)
    # the logits are not trivially equal across positions (attention really mixes context)
    assert np.abs(full[0, 5] - full[0, 6]).max() > 0.1


def test_attention_is_causal_and_honours_the_mask(decoder: ort.InferenceSession) -> None:
    ids = list(b"abcdefgh")
    base, _ = _run(decoder, ids, _empty_past())
    changed, _ = _run(decoder, [*ids[:5], ord("Z"), *ids[6:]], _empty_past())
    np.testing.assert_array_equal(base[0, :5], changed[0, :5])  # the future is invisible
    assert np.abs(base[0, 5:] - changed[0, 5:]).max() > 1e-3
    # left padding: two junk tokens masked out, positions shifted, same logits for the rest
    padded = [7, 9, *ids]
    mask = np.array([[0, 0] + [1] * len(ids)], np.int64)
    pos = np.array([[0, 0, *range(len(ids))]], np.int64)
    out, _ = _run(decoder, padded, _empty_past(), mask=mask, pos=pos)
    np.testing.assert_allclose(out[0, 2:], base[0], rtol=0, atol=1e-4)


def test_positions_reach_4096(decoder: ort.InferenceSession) -> None:
    logits, _ = _run(decoder, [65, 66], _empty_past(), pos=np.array([[4094, 4095]], np.int64))
    assert np.isfinite(logits).all()


def test_greedy_generation_does_not_collapse(decoder: ort.InferenceSession) -> None:
    logits, past = _run(decoder, list(b"Once upon a time"), _empty_past())
    tokens = []
    for _ in range(64):
        tokens.append(int(np.argmax(logits[0, -1])))
        logits, past = _run(decoder, tokens[-1:], past)
    assert len(set(tokens)) >= 12, tokens
    assert max(tokens.count(t) for t in set(tokens)) < 0.6 * len(tokens), tokens
    assert len(set(tokens[32:])) >= 6, tokens  # still varied later on


def test_gru_is_a_stateful_streaming_model(tiny_models: dict[str, Path]) -> None:
    sess = _session(tiny_models[models.GRU])
    assert [i.name for i in sess.get_inputs()] == ["x", "h"]
    assert sorted(o.name for o in sess.get_outputs()) == ["h_out", "score"]
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((6, 3, models.GRU_FEATURES)).astype(np.float32)
    h = np.zeros((1, 3, models.GRU_HIDDEN), np.float32)
    scores = []
    for x in xs:
        score, h_new = sess.run(["score", "h_out"], {"x": x, "h": h})
        assert h_new.shape == h.shape and not np.array_equal(h_new, h)
        assert score.shape == (3, 1) and ((score > 0) & (score < 1)).all()
        scores.append(score)
        h = h_new
    # the state matters: the same input with another state gives another score
    again, _ = sess.run(["score", "h_out"], {"x": xs[-1], "h": np.zeros_like(h)})
    assert np.abs(again - scores[-1]).max() > 1e-4
