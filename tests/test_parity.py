"""Whole-graph parity against HF transformers (fp32, eager) on tiny checkpoints.

Every checkpoint kind in conftest.CHECKPOINTS is built and held to HF: teacher-forced logits,
chunked cached decoding against HF greedy and against a full recompute, and left padding.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from conftest import (
    CHECKPOINTS,
    assert_close,
    contract_feed,
    max_diff_report,
    ort_session,
)

KINDS = list(CHECKPOINTS)


def hf_logits(oracle, ids: np.ndarray, attention_mask=None, position_ids=None) -> np.ndarray:
    with torch.no_grad():
        out = oracle(
            input_ids=torch.from_numpy(ids),
            attention_mask=None if attention_mask is None else torch.from_numpy(attention_mask),
            position_ids=None if position_ids is None else torch.from_numpy(position_ids),
        )
    return out.logits.float().numpy()


def prompt(vocab: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, size=(batch, length), dtype=np.int64)


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_hf(kind, tiny_checkpoints, built_models):
    _, oracle = tiny_checkpoints(kind)
    session = ort_session(built_models(kind))
    ids = prompt(320, batch=2, length=17)  # 17 > sliding_window 5
    logits = session.run(["logits"], contract_feed(session, ids))[0]
    assert_close(logits, hf_logits(oracle, ids), "tiny_fp32_logits")


@pytest.mark.parametrize("kind", ["hard", "softcap_bias_mqa", "bf16_sharded"])
def test_chunked_cached_decoding_equals_hf_greedy_and_full_recompute(
    kind, tiny_checkpoints, built_models
):
    _, oracle = tiny_checkpoints(kind)
    session = ort_session(built_models(kind))
    ids = prompt(320, batch=1, length=13, seed=1)
    new_tokens = 12
    with torch.no_grad():
        expected = oracle.generate(
            torch.from_numpy(ids),
            attention_mask=torch.ones_like(torch.from_numpy(ids)),
            max_new_tokens=new_tokens,
            do_sample=False,
            min_new_tokens=new_tokens,
        )[0, ids.shape[1] :].tolist()

    # Prefill in uneven chunks (3, 4, then the rest), then one token at a time.
    past, logits, start = None, None, 0
    for end in (3, 7, ids.shape[1]):
        outputs = session.run(None, contract_feed(session, ids[:, start:end], past=past))
        logits, past, start = outputs[0], outputs[1:], end
    tokens = [int(logits[0, -1].argmax())]
    step_logits = [logits[:, -1]]
    for _ in range(new_tokens - 1):
        outputs = session.run(None, contract_feed(session, np.array([[tokens[-1]]]), past=past))
        logits, past = outputs[0], outputs[1:]
        tokens.append(int(logits[0, -1].argmax()))
        step_logits.append(logits[:, -1])
    assert tokens == expected

    # The cached steps equal one full recompute over prompt + generated tokens.
    full_ids = np.concatenate([ids, np.array([tokens[:-1]])], axis=1)
    full = session.run(["logits"], contract_feed(session, full_ids))[0]
    cached = np.stack(step_logits, axis=1)
    assert_close(cached, full[:, ids.shape[1] - 1 :], "tiny_fp32_logits")
    assert past[0].shape[2] == ids.shape[1] + new_tokens - 1


@pytest.mark.parametrize("kind", ["hard", "softcap_bias_mqa"])
def test_left_padding_matches_hf(kind, tiny_checkpoints, built_models):
    """Padding comes from attention_mask: rows with left padding match HF on real positions."""
    _, oracle = tiny_checkpoints(kind)
    session = ort_session(built_models(kind))
    ids = prompt(320, batch=2, length=11, seed=2)
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # row 1: four pads on the left
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    logits = session.run(["logits"], contract_feed(session, ids, mask, positions))[0]
    expected = hf_logits(oracle, ids, mask, positions)
    assert np.isfinite(logits).all(), "fully masked (pad) query rows must not produce NaN"
    assert_close(logits[0], expected[0], "tiny_fp32_logits")
    assert_close(logits[1, 4:], expected[1, 4:], "tiny_fp32_logits")


def test_logits_to_keep_returns_the_last_positions(tiny_checkpoints, built_models):
    session = ort_session(built_models("hard"))
    ids = prompt(320, batch=2, length=9, seed=3)
    full = session.run(["logits"], contract_feed(session, ids))[0]
    for keep in (1, 4):
        feed = contract_feed(session, ids) | {"logits_to_keep": np.array(keep, dtype=np.int64)}
        kept = session.run(["logits"], feed)[0]
        assert kept.shape == (2, keep, 320)
        np.testing.assert_array_equal(
            kept, full[:, -keep:], err_msg=max_diff_report(kept, full[:, -keep:])
        )


def test_graph_contract_and_checker(built_models):
    folder = built_models("hard")
    onnx.checker.check_model(str(folder / "model.onnx"), full_check=True)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    graph = model.graph
    initializer_names = {t.name for t in graph.initializer}
    required = [i.name for i in graph.input if i.name not in initializer_names]
    layers = 4
    assert required == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")
    ]
    assert [o.name for o in graph.output] == ["logits"] + [
        f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")
    ]

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    by_name = {v.name: v for v in [*graph.input, *graph.output]}
    assert dims(by_name["logits"]) == ["batch_size", "sequence_length", 320]
    assert dims(by_name["past_key_values.0.key"]) == ["batch_size", 2, "past_sequence_length", 24]
    assert dims(by_name["present.3.value"]) == ["batch_size", 2, "total_sequence_length", 24]
    # Our functions, in our domain; initializers named by HF module path.
    assert {f.name for f in model.functions} >= {
        "RMSNorm",
        "RotaryEmbedding",
        "GroupQueryAttention",
        "CausalMask",
        "SlidingWindowMask",
    }
    assert "model.layers.0.self_attn.q_proj.weight_t" in initializer_names
    assert "model.layers.3.post_feedforward_layernorm.scale" in initializer_names
    # The tied LM head is the embedding: one [vocab, hidden] matrix in the file.
    vocab_sized = [t.name for t in graph.initializer if 320 in t.dims]
    assert vocab_sized == ["model.embed_tokens.weight"]
    # Weights live in external data beside the graph.
    assert (folder / "model.onnx_data").is_file()
    weights = [t for t in graph.initializer if t.name.endswith(("weight_t", "embed_tokens.weight"))]
    assert weights and all(t.data_location == onnx.TensorProto.EXTERNAL for t in weights)


def test_masks_are_built_once_per_layer_type(built_models):
    model = onnx.load(str(built_models("hard") / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("CausalMask") == 1
    assert ops.count("SlidingWindowMask") == 1
    assert ops.count("RotaryCosSin") == 2  # one cos/sin table per layer type
