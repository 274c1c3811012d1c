"""The Gemma 3 building blocks as onnxscript functions in our own ``gemma_onnx`` domain.

Each becomes a model-local ONNX function: standard ONNX inside, so any runtime can run it, and a
named boundary that a later lowering can swap for a fused kernel. Docstrings give the reference
semantics in numpy terms; ``tests/test_functions.py`` holds each one to that reference.

Shape letters: B batch, S new tokens, T past + new tokens, H query heads, K KV heads,
G = H // K query heads per KV head, D head_dim, E hidden size.
"""

from __future__ import annotations

import onnx
from onnxscript import BOOL, FLOAT, INT64, script
from onnxscript import opset18 as op
from onnxscript.values import Opset

DOMAIN = "gemma_onnx"
gemma = Opset(DOMAIN, 1)

# Masked attention scores take float32's lowest value rather than -inf, as HF's eager path does:
# a fully masked row (a left-padding query) then softmaxes to a finite uniform row, not NaN, so
# no NaN enters the padding slots' keys and values, where probs @ V would spread it (0 * NaN).
_MASKED = -3.4028234663852886e38


@script(gemma)
def RMSNorm(x, scale, epsilon: float):
    """``x * rsqrt(mean(x**2, -1) + epsilon) * scale``, computed in float32, cast back to x's type.

    ``scale`` is float32 ``1 + w`` (Gemma's offset weight, added at build time in float32 as HF's
    ``Gemma3RMSNorm`` does); the cast back happens after the multiply (HF PR #29402).
    """
    xf = op.Cast(x, to=FLOAT.dtype)
    mean_sq = op.ReduceMean(op.Mul(xf, xf), [-1], keepdims=1)
    eps = op.Constant(value_float=epsilon)
    inv_rms = op.Reciprocal(op.Sqrt(op.Add(mean_sq, eps)))
    return op.CastLike(op.Mul(op.Mul(xf, inv_rms), scale), x)


@script(gemma)
def RotaryCosSin(position_ids: INT64, inv_freq: FLOAT):
    """``angles = position_ids[..., None] * inv_freq``; returns ``cos, sin`` of
    ``concat(angles, angles)``: float32 ``[B, S, D]``, shared by every layer of one type."""
    positions = op.Unsqueeze(op.Cast(position_ids, to=FLOAT.dtype), [-1])  # [B, S, 1]
    angles = op.Mul(positions, inv_freq)  # [B, S, D/2]
    emb = op.Concat(angles, angles, axis=-1)  # [B, S, D]
    return op.Cos(emb), op.Sin(emb)


@script(gemma)
def RotaryCache(position_ids: INT64, inv_freq: FLOAT):
    """The step's RoPE tables in the layout of ORT's fused ``RotaryEmbedding`` kernel: float32
    ``cos, sin`` of ``angles = position_ids[..., None] * inv_freq`` flattened to ``[B*S, D/2]``
    (one row per new token; the kernel duplicates the half itself), and int64 ``rows`` ``[B, S]``,
    the row of each token (``arange(B*S)``), passed as the kernel's position ids."""
    positions = op.Reshape(op.Cast(position_ids, to=FLOAT.dtype), op.Constant(value_ints=[-1, 1]))
    angles = op.Mul(positions, inv_freq)  # [B*S, D/2]
    count = op.Size(position_ids)
    rows = op.Range(op.Constant(value_int=0), count, op.Constant(value_int=1))
    return op.Cos(angles), op.Sin(angles), op.Reshape(rows, op.Shape(position_ids))


@script(gemma)
def RotaryEmbedding(x, cos: FLOAT, sin: FLOAT):
    """``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = concat(-x2, x1)`` (HF's
    non-interleaved RoPE). x ``[B, heads, S, D]``; cos/sin ``[B, S, D]`` cast to x's type first."""
    cos4 = op.Unsqueeze(op.CastLike(cos, x), [1])  # [B, 1, S, D]
    sin4 = op.Unsqueeze(op.CastLike(sin, x), [1])
    x1, x2 = op.Split(x, axis=-1, num_outputs=2)  # [B, heads, S, D/2] each
    rotated = op.Concat(op.Neg(x2), x1, axis=-1)
    return op.Add(op.Mul(x, cos4), op.Mul(rotated, sin4))


@script(gemma)
def CausalMask(attention_mask: INT64, input_ids: INT64):
    """Boolean ``[B, 1, S, T]``: query i (at slot ``T - S + i``) sees slot j iff ``j <= T - S + i``
    and ``attention_mask[b, j] == 1``. The new tokens are the last S of the T slots."""
    total = op.Squeeze(op.Shape(attention_mask, start=1, end=2))  # T
    new = op.Squeeze(op.Shape(input_ids, start=1, end=2))  # S
    kv_idx = op.Range(op.Constant(value_int=0), total, op.Constant(value_int=1))  # [T]
    q_idx = op.Range(op.Sub(total, new), total, op.Constant(value_int=1))  # [S]
    causal = op.LessOrEqual(op.Unsqueeze(kv_idx, [0]), op.Unsqueeze(q_idx, [1]))  # [S, T]
    keep = op.Unsqueeze(op.Cast(attention_mask, to=BOOL.dtype), [1, 2])  # [B, 1, 1, T]
    return op.And(op.Unsqueeze(causal, [0, 1]), keep)


@script(gemma)
def SlidingWindowMask(attention_mask: INT64, input_ids: INT64, window: int):
    """``CausalMask`` and also ``j > (T - S + i) - window``: each query sees at most ``window``
    slots, itself included (HF's ``sliding_window_overlay``)."""
    total = op.Squeeze(op.Shape(attention_mask, start=1, end=2))
    new = op.Squeeze(op.Shape(input_ids, start=1, end=2))
    kv_idx = op.Range(op.Constant(value_int=0), total, op.Constant(value_int=1))  # [T]
    q_idx = op.Range(op.Sub(total, new), total, op.Constant(value_int=1))  # [S]
    lowest = op.Sub(q_idx, op.Constant(value_int=window))  # [S]
    in_window = op.Greater(op.Unsqueeze(kv_idx, [0]), op.Unsqueeze(lowest, [1]))  # [S, T]
    return op.And(CausalMask(attention_mask, input_ids), op.Unsqueeze(in_window, [0, 1]))


@script(gemma)
def GroupQueryAttention(query, key, value, mask: BOOL, scale: float):
    """``softmax(where(mask, query @ key.T * scale, lowest)) @ value``, each KV head serving
    G query heads.

    query ``[B, H, S, D]``; key/value ``[B, K, T, D]``; mask ``[B, 1, S, T]``. Returns
    ``[B, S, H * D]``. Softmax runs in float32 as in HF's eager path. Query heads are grouped by
    a reshape, so the KV heads are never copied G times.
    """
    batch = op.Shape(query, start=0, end=1)
    kv_heads = op.Shape(key, start=1, end=2)
    head_dim = op.Shape(query, start=3, end=4)
    minus_one = op.Constant(value_ints=[-1])
    grouped = op.Reshape(query, op.Concat(batch, kv_heads, minus_one, head_dim, axis=0))
    scores = op.MatMul(grouped, op.Transpose(key, perm=[0, 1, 3, 2]))  # [B, K, G*S, T]
    scores = op.Mul(op.Cast(scores, to=FLOAT.dtype), op.Constant(value_float=scale))
    per_head = op.Reshape(scores, op.Concat(op.Shape(query, start=0, end=3), minus_one, axis=0))
    masked = op.Where(mask, per_head, op.Constant(value_float=_MASKED))  # [B, H, S, T]
    probs = op.CastLike(op.Softmax(masked, axis=-1), query)
    probs = op.Reshape(probs, op.Shape(scores))  # [B, K, G*S, T]
    context = op.Reshape(op.MatMul(probs, value), op.Shape(query))  # [B, H, S, D]
    merged = op.Concat(batch, op.Shape(query, start=2, end=3), minus_one, axis=0)  # [B, S, -1]
    return op.Reshape(op.Transpose(context, perm=[0, 2, 1, 3]), merged)


@script(gemma)
def GeluTanhMLP(x, gate_weight, up_weight, down_weight):
    """``down(gelu_tanh(x @ gate) * (x @ up))``, gelu in its tanh form (HF ``gelu_pytorch_tanh``):
    ``0.5 * g * (1 + tanh(sqrt(2 / pi) * (g + 0.044715 * g**3)))``. Weights are ``[in, out]``."""
    gate = op.MatMul(x, gate_weight)
    up = op.MatMul(x, up_weight)
    half = op.CastLike(op.Constant(value_float=0.5), gate)
    one = op.CastLike(op.Constant(value_float=1.0), gate)
    coeff = op.CastLike(op.Constant(value_float=0.044715), gate)
    sqrt_2_over_pi = op.CastLike(op.Constant(value_float=0.7978845608028654), gate)
    inner = op.Mul(sqrt_2_over_pi, op.Add(gate, op.Mul(coeff, op.Mul(op.Mul(gate, gate), gate))))
    gelu = op.Mul(op.Mul(half, gate), op.Add(one, op.Tanh(inner)))
    return op.MatMul(op.Mul(gelu, up), down_weight)


ALL_FUNCTIONS = (
    RMSNorm,
    RotaryCosSin,
    RotaryCache,
    RotaryEmbedding,
    CausalMask,
    SlidingWindowMask,
    GroupQueryAttention,
    GeluTanhMLP,
)


def function_protos(opset: int = 18) -> list[onnx.FunctionProto]:
    """The FunctionProtos a model using this domain must carry, importing the model's default
    opset (18, or 21 for block-quantized DequantizeLinear): the ops they use have the same
    semantics in both, later versions only admit more types."""
    protos = []
    for fn in ALL_FUNCTIONS:
        proto = fn.to_function_proto()
        for entry in proto.opset_import:
            if entry.domain == "":
                entry.version = opset
        protos.append(proto)
    return protos
