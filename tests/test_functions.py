"""Each onnxscript function, run alone in ONNX Runtime with graph optimizations off, against a
numpy reference written from HF's modeling_gemma3.py semantics."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, ValueInfoProto, helper

from gemma_onnx.builder.functions import DOMAIN, function_protos

_TYPES = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(bool): TensorProto.BOOL,
}


def run_function(name: str, inputs: dict[str, np.ndarray], outputs: int = 1, **attributes):
    """One node calling our function; ORT with every graph optimization off."""
    node = helper.make_node(
        name, list(inputs), [f"out{i}" for i in range(outputs)], domain=DOMAIN, **attributes
    )
    graph = helper.make_graph(
        [node],
        "single",
        [helper.make_tensor_value_info(k, _TYPES[v.dtype], v.shape) for k, v in inputs.items()],
        [ValueInfoProto(name=f"out{i}") for i in range(outputs)],
    )
    model = helper.make_model(
        graph,
        ir_version=8,
        functions=function_protos(),
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)],
    )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, inputs)


rng = np.random.default_rng(0)


def test_rms_norm_matches_reference():
    x = rng.normal(size=(2, 5, 16)).astype(np.float32) * 3
    w = rng.normal(size=16).astype(np.float32)
    scale = (w + 1).astype(np.float32)  # Gemma's (1 + w), added at build time
    (y,) = run_function("RMSNorm", {"x": x, "scale": scale}, epsilon=1e-6)
    x64 = x.astype(np.float64)
    expected = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-6) * (1 + w)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_rms_norm_computes_in_float32_for_half_inputs():
    x = (rng.normal(size=(1, 3, 8)) * 300).astype(np.float16)  # x**2 overflows in fp16
    scale = np.full(8, 1.5, dtype=np.float32)
    (y,) = run_function("RMSNorm", {"x": x, "scale": scale}, epsilon=1e-6)
    x32 = x.astype(np.float32)
    expected = (x32 / np.sqrt((x32**2).mean(-1, keepdims=True) + 1e-6) * 1.5).astype(np.float16)
    assert y.dtype == np.float16 and np.isfinite(y).all()
    np.testing.assert_allclose(y.astype(np.float32), expected.astype(np.float32), rtol=2e-3)


def test_rotary_cos_sin_and_embedding():
    positions = np.array([[0, 1, 2, 7], [3, 4, 5, 6]], dtype=np.int64)
    head_dim = 8
    inv_freq = (1.0 / 50.0 ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)
    cos, sin = run_function(
        "RotaryCosSin", {"position_ids": positions, "inv_freq": inv_freq}, outputs=2
    )
    angles = positions[..., None].astype(np.float64) * inv_freq
    emb = np.concatenate([angles, angles], axis=-1)
    np.testing.assert_allclose(cos, np.cos(emb), atol=1e-6)
    np.testing.assert_allclose(sin, np.sin(emb), atol=1e-6)

    x = rng.normal(size=(2, 3, 4, head_dim)).astype(np.float32)
    (y,) = run_function("RotaryEmbedding", {"x": x, "cos": cos, "sin": sin})
    half = head_dim // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # HF rotate_half
    expected = x * cos[:, None] + rotated * sin[:, None]
    np.testing.assert_allclose(y, expected, atol=1e-6)


def test_rotary_cache_feeds_orts_fused_rotary_like_hf():
    """RotaryCache's rows, through com.microsoft.RotaryEmbedding on [B, S, heads * D], give
    HF's rotate_half RoPE at each token's own position (rows of a batch at different positions)."""
    positions = np.array([[0, 1, 2, 7], [300, 301, 302, 303]], dtype=np.int64)
    heads, head_dim = 3, 8
    inv_freq = (1.0 / 50.0 ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)
    cos, sin, rows = run_function(
        "RotaryCache", {"position_ids": positions, "inv_freq": inv_freq}, outputs=3
    )
    # float32 angles, as HF computes them (at position 300 their rounding shows in cos/sin)
    angles = (positions[..., None].astype(np.float32) * inv_freq).astype(np.float64)
    np.testing.assert_allclose(cos, np.cos(angles).reshape(-1, head_dim // 2), atol=1e-6)
    np.testing.assert_allclose(sin, np.sin(angles).reshape(-1, head_dim // 2), atol=1e-6)
    np.testing.assert_array_equal(rows, np.arange(8).reshape(2, 4))

    node = helper.make_node(
        "RotaryEmbedding", ["x", "rows", "cos", "sin"], ["y"], domain="com.microsoft",
        num_heads=heads, interleaved=0,
    )  # fmt: skip
    names = [("x", TensorProto.FLOAT), ("rows", TensorProto.INT64),
             ("cos", TensorProto.FLOAT), ("sin", TensorProto.FLOAT)]  # fmt: skip
    graph = helper.make_graph(
        [node], "rope", [helper.make_tensor_value_info(n, t, None) for n, t in names],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.normal(size=(2, 4, heads, head_dim)).astype(np.float32)
    (y,) = session.run(None, {"x": x.reshape(2, 4, -1), "rows": rows, "cos": cos, "sin": sin})
    emb = np.concatenate([angles, angles], axis=-1)[:, :, None]  # [B, S, 1, D]
    rotated = np.concatenate([-x[..., head_dim // 2 :], x[..., : head_dim // 2]], axis=-1)
    expected = x * np.cos(emb) + rotated * np.sin(emb)
    np.testing.assert_allclose(y.reshape(x.shape), expected, atol=1e-6)


def reference_mask(attention_mask: np.ndarray, new: int, window: int | None) -> np.ndarray:
    batch, total = attention_mask.shape
    mask = np.zeros((batch, 1, new, total), dtype=bool)
    for b in range(batch):
        for i in range(new):
            q = total - new + i
            for j in range(total):
                allowed = j <= q and attention_mask[b, j] == 1
                if window is not None:
                    allowed = allowed and j > q - window
                mask[b, 0, i, j] = allowed
    return mask


@pytest.mark.parametrize("new", [1, 3, 9])
def test_causal_and_sliding_window_masks(new):
    total = 9
    attention_mask = np.ones((2, total), dtype=np.int64)
    attention_mask[1, :3] = 0  # left padding
    input_ids = np.zeros((2, new), dtype=np.int64)
    feed = {"attention_mask": attention_mask, "input_ids": input_ids}
    (causal,) = run_function("CausalMask", feed)
    np.testing.assert_array_equal(causal, reference_mask(attention_mask, new, None))
    (sliding,) = run_function("SlidingWindowMask", feed, window=4)
    np.testing.assert_array_equal(sliding, reference_mask(attention_mask, new, 4))


def test_group_query_attention_matches_repeat_kv_reference():
    batch, heads, kv_heads, new, total, dim = 2, 6, 2, 3, 7, 8
    q = rng.normal(size=(batch, heads, new, dim)).astype(np.float32)
    k = rng.normal(size=(batch, kv_heads, total, dim)).astype(np.float32)
    v = rng.normal(size=(batch, kv_heads, total, dim)).astype(np.float32)
    attention_mask = np.ones((batch, total), dtype=np.int64)
    attention_mask[0, :2] = 0
    mask = reference_mask(attention_mask, new, 5)
    (y,) = run_function(
        "GroupQueryAttention", {"query": q, "key": k, "value": v, "mask": mask}, scale=0.3
    )
    # HF eager: repeat_kv, scores * scale, additive mask of float32 min, softmax, @ v.
    group = heads // kv_heads
    k_rep, v_rep = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = (q.astype(np.float64) @ k_rep.transpose(0, 1, 3, 2)) * 0.3
    scores = np.where(mask, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = (probs @ v_rep).transpose(0, 2, 1, 3).reshape(batch, new, heads * dim)
    np.testing.assert_allclose(y, expected, atol=1e-5)


def test_group_query_attention_fully_masked_row_is_finite():
    """A left-padding query sees no slot at all. With -inf it would softmax to NaN, and that NaN
    would reach real rows through the next layer's keys and values; here it stays finite."""
    q = rng.normal(size=(1, 2, 2, 4)).astype(np.float32)
    k = rng.normal(size=(1, 1, 2, 4)).astype(np.float32)
    v = rng.normal(size=(1, 1, 2, 4)).astype(np.float32)
    mask = np.array([[[[False, False], [False, True]]]])  # query 0 is padding: sees nothing
    (y,) = run_function(
        "GroupQueryAttention", {"query": q, "key": k, "value": v, "mask": mask}, scale=0.5
    )
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y[0, 1], np.tile(v[0, 0, 1], 2), atol=1e-6)


def test_gelu_tanh_mlp():
    x = rng.normal(size=(2, 3, 8)).astype(np.float32)
    gate, up = (
        rng.normal(size=(8, 12)).astype(np.float32),
        rng.normal(size=(8, 12)).astype(np.float32),
    )
    down = rng.normal(size=(12, 8)).astype(np.float32)
    (y,) = run_function(
        "GeluTanhMLP", {"x": x, "gate_weight": gate, "up_weight": up, "down_weight": down}
    )
    g = x.astype(np.float64) @ gate
    gelu = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))
    np.testing.assert_allclose(y, (gelu * (x @ up)) @ down, rtol=1e-4, atol=1e-4)
