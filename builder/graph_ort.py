"""The ONNX Runtime target: the same decoder, lowered function by function to ORT's fused kernels.

What changes against the portable graph (graph.py), and why:

- ``GroupQueryAttention`` (com.microsoft) replaces our attention function, the Concat of past and
  new KV, and both masks. Its past and present KV share one buffer per layer that the runtime
  binds once (``past_present_share_buffer``): max-length on full-attention layers, window-sized on
  sliding ones (``sliding_window_cache``: the kernel keeps the window's last positions itself, as
  onnxruntime-genai's builder sets it up); causality and the sliding window
  (``local_window_size``) live in the kernel, and padding is per-row lengths (``seqlens_k``), so a
  batch is right-padded.
- ``SimplifiedLayerNormalization`` replaces RMSNorm, and ``SkipSimplifiedLayerNormalization`` fuses
  each residual add with the norm that follows it: the post-attention residual with the
  pre-feedforward norm, and the post-feedforward residual with the next layer's input norm (or the
  final norm).
- q/k/v and gate/up projections are each one MatMul over a concatenated weight; ``FastGelu`` is the
  tanh GELU.
- RoPE is ORT's fused ``RotaryEmbedding`` kernel (com.microsoft) on [B, S, heads * D], fed by our
  ``RotaryCache`` function: cos/sin rows for this step's positions only, and each token's row as
  the kernel's position ids. The q/k norms run on [B, S, heads, D] over the last axis, so neither
  needs a transpose. (GQA's internal rotary would need [max_position, head_dim / 2] tables per
  layer type, 64 MB for Gemma 3 270M, and measured slower here.)

The I/O names are the portable contract's, with two differences the runtime knows about:
``past_key_values.*`` / ``present.*`` are ``[batch, kv_heads, max_sequence_length, head_dim]``
buffers (``sliding_window`` positions, a fixed dim, on sliding layers) bound to the same memory,
and ``attention_mask`` marks each row's valid tokens from the left (right padding).
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir

from gemma_onnx.builder.config import SLIDING
from gemma_onnx.builder.functions import DOMAIN
from gemma_onnx.builder.graph import OPSET, DecoderGraph
from gemma_onnx.builder.quantize import QuantConfig, SharedComputation, int8_rows, matmul_nbits

MS_DOMAIN = "com.microsoft"


class OrtDecoderGraph(DecoderGraph):
    """The decoder for ONNX Runtime's CPU and CUDA providers."""

    TARGET = "ort"
    HEAD_ON_ROWS = False  # MatMul / MatMulNBits: the head writes [B, S', V] into the logits

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Quantized weights use com.microsoft's MatMulNBits here, not opset 21's
        # DequantizeLinear; and ORT registers SimplifiedLayerNormalization up to opset 20.
        self.opset = OPSET
        # Initializers also listed as graph inputs (overridable, so never constant to ORT): the
        # float tied table, which the lookup and the LM head share and prepacking must not copy.
        self.unpacked: list[ir.Value] = []
        # fp16 and bf16 alike keep the residual stream and every norm in float32 here: ORT's
        # fused norms take their weight in their input's type, and a half-precision weight
        # would round Gemma's 1 + w, which HF keeps in float32.
        self.stream_dtype = ir.DataType.FLOAT

    def fused_linear_weight(self, module: str, projections: tuple[str, ...]) -> ir.Value:
        """``[in, sum(out)]``: the transposed projection weights side by side, one MatMul."""
        names = tuple(f"{module}.{p}.weight" for p in projections)
        key = "+".join(names)
        if key in self._values:
            return self._values[key]
        shapes = [self.weights.shape(n) for n in names]
        out_name = (
            f"{module}.{'_'.join(p.removesuffix('_proj') for p in projections)}_proj.weight_t"
        )
        out_shape = (shapes[0][1], sum(s[0] for s in shapes))
        np_dtype = self.np_dtype

        def convert(arrays):
            return np.concatenate([a.T for a in arrays], axis=1).astype(np_dtype)

        lazy = self.weights.lazy(names, out_name, convert, self.ir_dtype, out_shape)
        value = self.tape.initializer(lazy, name=out_name)
        self._values[key] = value
        return value

    # ---- int4 / int8 weights: MatMulNBits and GatherBlockQuantized -------------------------
    def quantized(
        self, hf_names: tuple[str, ...], out_name: str, quant: QuantConfig, rows: bool = False
    ):
        """MatMulNBits initializers (packed, scales[, zero_points]) for x @ W.T, where W is the
        HF [out, in] tensors ``hf_names`` stacked along out: [N, K], which is also the layout
        GatherBlockQuantized reads a table in. With ``rows``, packed is stored as that
        lookup's [N, K * bits / 8] (same bytes). Returns (values, K, N, quant)."""
        key = f"quantized:{out_name}"
        if key in self._values:
            return self._values[key]
        shapes = [self.weights.shape(n) for n in hf_names]
        n, k = sum(s[0] for s in shapes), shapes[0][1]

        def compute():
            arrays = [self.weights.read(name) for name in hf_names]
            table = np.concatenate(arrays, axis=0) if len(arrays) > 1 else arrays[0]  # [N, K]
            if rows and quant.bits == 8 and quant.symmetric:  # only GatherBlockQuantized reads it
                return int8_rows(np.ascontiguousarray(table, np.float32), quant)
            return matmul_nbits(table.T, quant)

        blocks = k // quant.block_size
        packed = (
            (n, k * quant.bits // 8) if rows else (n, blocks, quant.block_size * quant.bits // 8)
        )
        layout = {"packed": (ir.DataType.UINT8, packed), "scales": (ir.DataType.FLOAT, (n, blocks))}
        if not quant.symmetric:
            layout["zero_points"] = (ir.DataType.UINT8, (n, (blocks * quant.bits + 7) // 8))
        shared = SharedComputation(compute, set(layout))
        values = {}
        for part, (dtype, shape) in layout.items():
            name = f"{out_name}.{part}"

            def load(part=part, name=name, shape=shape):
                return ir.Tensor(shared.take(part).reshape(shape), name=name)

            lazy = ir.LazyTensor(load, dtype=dtype, shape=ir.Shape(shape), name=name)
            values[part] = self.tape.initializer(lazy, name=name)
        result = (values, k, n, quant)
        self._values[key] = result
        return result

    def matmul_nbits(self, x: ir.Value, quantized, name: str) -> ir.Value:
        values, k, n, quant = quantized
        inputs = [x, values["packed"], values["scales"]]
        if "zero_points" in values:
            inputs.append(values["zero_points"])
        attributes = {"K": k, "N": n, "bits": quant.bits, "block_size": quant.block_size}
        if quant.accuracy_level:
            attributes["accuracy_level"] = quant.accuracy_level
        return self.op("MatMulNBits", inputs, name, domain=MS_DOMAIN, **attributes)

    def linear(self, x: ir.Value, module: str) -> ir.Value:
        if self.quant is None:
            return super().linear(x, module)
        weights = self.quantized((f"{module}.weight",), f"{module}.weight", self.layer_quant)
        y = self.matmul_nbits(x, weights, module)
        if self.config.attention_bias and f"{module}.bias" in self.weights.tensors:
            y = self.op("Add", [y, self.weight(f"{module}.bias", "bias")], f"{module}.bias_add")
        return y

    def embed(self, input_ids: ir.Value) -> ir.Value:
        """float: the tied table is stored once, transposed ([E, V]), because the LM head's
        one-row MatMul over it runs faster than Gemm(transB=1) over [V, E] (MLAS' GEMV path;
        tools/benchmark.py); the lookup then gathers columns, E strided reads per token.

        Quantized: GatherBlockQuantized over the table :meth:`gather_rows` describes (the LM
        head's own bytes, or the 8-bit copy rescoring reads)."""
        if self.quant is None:
            if not self.config.tie_word_embeddings:
                return super().embed(input_ids)
            table = self.weight("model.embed_tokens.weight", "linear")  # [E, V]
            self.unpacked.append(table)
            columns = self.op("Gather", [table, input_ids], "model.embed_tokens", axis=1)
            rows = self.op("Transpose", [columns], "model.embed_tokens.rows", perm=[1, 2, 0])
            scale = self.const(
                "model.embed_tokens.embed_scale",
                np.array(self.config.embed_scale, dtype=np.float32).astype(self.np_dtype),
            )
            return self.to_stream(self.op("Mul", [rows, scale], "model.embed_tokens.scale"))
        rows = self.gather_rows("model.embed_tokens.weight", input_ids, "model.embed_tokens")
        scale = self.const(
            "model.embed_tokens.embed_scale", np.array(self.config.embed_scale, dtype=np.float32)
        )
        return self.op("Mul", [rows, scale], "model.embed_tokens.scale")

    def head_scores(self, flat: ir.Value) -> ir.Value:
        if self.quant is None:
            if self.config.tie_word_embeddings:  # the [E, V] table embed() stored
                table = self.weight("model.embed_tokens.weight", "linear")
                return self.op("MatMul", [flat, table], "lm_head")
            return super().head_scores(flat)
        head, quant = self.head_name, self.quant.head_quant(self.TARGET, self.config.hidden_size)
        scores = self.matmul_nbits(flat, self.quantized((head,), head, quant), "lm_head")
        count = self.quant.rescore_count(self.TARGET)
        return self.rescore(flat, scores, count) if count else scores

    @property
    def head_name(self) -> str:
        """The HF weight the LM head multiplies by (the embedding, when tied)."""
        tied = self.config.tie_word_embeddings
        return "model.embed_tokens.weight" if tied else "lm_head.weight"

    def gather_rows(self, hf_name: str, index: ir.Value, name: str) -> ir.Value:
        """Rows ``index`` (any shape) of the HF [V, K] table ``hf_name``, dequantized to float32:
        [*index.shape, K], by GatherBlockQuantized at the table's quantization
        (QuantConfig.table_quant).

        Where the LM head's MatMulNBits multiplies by the same quantized table, the rows are
        its bytes read as [V, K * bits / 8] through an alias of MatMulNBits' [V, K / block,
        bytes]: the same bytes in the file, mapped apart by ORT, so the LM head can release its
        copy once prepacked while the lookup faults in only the rows it gathers. (A Reshape
        would share the LM head's copy, which prepacking reads whole: on Gemma 3 270M int4,
        +80 MB resident, and ORT's constant folding copies it once more, +80 MB.) Otherwise
        (the 8-bit copy beside a 4-bit head, an untied embedding) the table is stored as rows.
        """
        quant = self.quant.table_quant(self.TARGET)
        if hf_name == self.head_name and quant is self.quant:
            values, k, n, _ = self.quantized((hf_name,), hf_name, quant)
            base = hf_name.removesuffix(".weight")
            table = self.alias(values["packed"], f"{base}.rows", (n, k * quant.bits // 8))
        else:
            values, *_ = self.quantized((hf_name,), f"{hf_name}.rows{quant.bits}", quant, True)
            table = values["packed"]
        inputs = [table, index, values["scales"]]
        if "zero_points" in values:
            inputs.append(values["zero_points"])
        return self.op(
            "GatherBlockQuantized", inputs, name, domain=MS_DOMAIN,
            bits=quant.bits, block_size=quant.block_size, gather_axis=0, quantize_axis=1,
        )  # fmt: skip

    def rescore(self, hidden: ir.Value, scores: ir.Value, count: int) -> ir.Value:
        """The quantized head's [B, S', V] scores with each position's ``count`` highest
        recomputed in float32: the hidden state [B, S', E] times those rows of the 8-bit table,
        dequantized. The 4-bit head only ranks; the rows decide among its best. On Gemma 3 270M
        int4 the fp32 model's top token is within the head's top 16 at every held-out position
        (README, "Quantization"); the rest of the vocabulary keeps the head's scores."""
        k = self.const(
            "lm_head.rescore_k", np.array([min(count, self.config.vocab_size)], np.int64)
        )
        _, index = self.op_multi(
            "TopK", [scores, k], "lm_head.rescore_top",
            ["lm_head.rescore_top/values", "lm_head.rescore_top/indices"],
            axis=-1, largest=1, sorted=0,
        )  # fmt: skip
        rows = self.gather_rows(self.head_name, index, "lm_head.rescore_rows")  # [B, S', k, E]
        last = self.const("lm_head.rescore_axis", np.array([-1], np.int64))
        column = self.op("Unsqueeze", [hidden, last], "lm_head.rescore_column")  # [B, S', E, 1]
        exact = self.op("MatMul", [rows, column], "lm_head.rescore_dot")  # [B, S', k, 1]
        exact = self.op("Squeeze", [exact, last], "lm_head.rescore_logits")  # [B, S', k]
        return self.op("ScatterElements", [scores, index, exact], "lm_head.rescore", axis=-1)

    def project(self, x: ir.Value, module: str, projections: tuple[str, ...], name: str):
        """x @ [W_a | W_b | ...] (+ biases), one MatMul for several HF projections."""
        if len(projections) == 1:
            return self.linear(x, f"{module}.{projections[0]}")
        if self.quant is not None:
            names = tuple(f"{module}.{p}.weight" for p in projections)
            fused = "_".join(p.removesuffix("_proj") for p in projections)
            weights = self.quantized(names, f"{module}.{fused}_proj.weight", self.layer_quant)
            y = self.matmul_nbits(x, weights, name)
        else:
            y = self.op("MatMul", [x, self.fused_linear_weight(module, projections)], name)
        if self.config.attention_bias and f"{module}.{projections[0]}.bias" in self.weights.tensors:
            biases = [self.weight(f"{module}.{p}.bias", "bias") for p in projections]
            bias = self.op("Concat", biases, f"{name}.bias", axis=0)
            y = self.op("Add", [y, bias], f"{name}.bias_add")
        return y

    # ---- the model, top-down -------------------------------------------------------------
    def build(self) -> ir.Model:
        cfg = self.config
        inputs, past = self.graph_inputs()
        input_ids, attention_mask, position_ids, logits_to_keep = inputs

        hidden = self.embed(input_ids)
        seqlens_k, total_length = self.sequence_lengths(attention_mask)
        rope = self.rotary(position_ids)
        normed, residual = self.norm(hidden, "model.layers.0.input_layernorm"), hidden
        presents = []
        for i, layer_type in enumerate(cfg.layer_types):
            next_norm = (
                f"model.layers.{i + 1}.input_layernorm"
                if i + 1 < cfg.num_hidden_layers
                else "model.norm"
            )
            normed, residual, present = self.decoder_layer_fused(
                i, layer_type, normed, residual, next_norm, seqlens_k, total_length,
                rope[layer_type], past[2 * i], past[2 * i + 1],
            )  # fmt: skip
            presents += present
        logits = self.lm_head_normed(normed, logits_to_keep)
        return self.assemble(
            [input_ids, attention_mask, position_ids, *past, logits_to_keep, *self.unpacked],
            [logits, *presents],
            extra_opsets={MS_DOMAIN: 1},
        )

    def logits_to_keep_input(self) -> ir.Value:
        """A required input here: the runtime binds it every step (IO binding cannot bind an
        overridable initializer), 1 during prefill so a long prompt yields one logits row, and
        none (a large negative value: see lm_head) for the chunks of a prompt before its last."""
        return ir.Value(
            name="logits_to_keep", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([])
        )

    def runtime_metadata(self) -> dict[str, str]:
        """kv_cache 'shared': past and present are one [B, H, max_sequence_length or window, D]
        buffer per tensor, bound to both; padding 'right': each row's tokens start at 0."""
        return {"gemma_onnx.target": "ort", "gemma_onnx.kv_cache": "shared",
                "gemma_onnx.padding": "right", **self.session_metadata()}  # fmt: skip

    def session_metadata(self) -> dict[str, str]:
        """Prepacking on: MatMulNBits needs it for its fast kernels, and MLAS' packed float
        weights run faster on Gemma 3 270M fp32 (A/B through our runtime: prefill +9%, decode
        +4%) at no memory cost, because ORT frees each original once packed. The one weight
        two nodes read, the float tied table, is an overridable initializer
        (``self.unpacked``), which ORT neither prepacks nor folds: one copy in memory
        (prepacking it would add 0.66 GB on the 270M)."""
        return {"gemma_onnx.session_config": json.dumps({"session.disable_prepacking": "0"})}

    def past_sequence_dim(self, layer_type: str) -> str | int:
        """Sliding layers keep a window-sized buffer (GQA's ``sliding_window_cache``: the kernel
        evicts what leaves the window); full-attention layers one of the generation's length."""
        return self.config.sliding_window if layer_type == SLIDING else "max_sequence_length"

    def present_sequence_dim(self, layer_type: str) -> str | int:
        return self.past_sequence_dim(layer_type)

    def sequence_lengths(self, attention_mask: ir.Value) -> tuple[ir.Value, ir.Value]:
        """GQA's per-row ``seqlens_k`` (valid tokens - 1, int32 [B]) and the int32 scalar
        ``total_sequence_length`` (the mask's width), both from the right-padded mask."""
        valid = self.op(
            "ReduceSum", [attention_mask, self.const("axes.last", np.array([1], np.int64))],
            "model.seqlens.count", keepdims=0,
        )  # fmt: skip
        minus_one = self.op("Sub", [valid, self.const("one.int64", np.array(1, np.int64))],
                            "model.seqlens.last")  # fmt: skip
        seqlens_k = self.op("Cast", [minus_one], "model.seqlens_k", to=ir.DataType.INT32)
        width = self.op("Shape", [attention_mask], "model.total_length.shape", start=1, end=2)
        scalar = self.op("Squeeze", [width], "model.total_length.scalar")
        total = self.op("Cast", [scalar], "model.total_sequence_length", to=ir.DataType.INT32)
        return seqlens_k, total

    def norm(self, x: ir.Value, module: str) -> ir.Value:
        return self.op(
            "SimplifiedLayerNormalization", [x, self.weight(f"{module}.weight", "norm")], module,
            axis=-1, epsilon=self.config.rms_norm_eps, stash_type=1,
        )  # fmt: skip

    def skip_norm(self, x: ir.Value, residual: ir.Value, module: str, name: str):
        """(norm(residual + x), residual + x) in one kernel."""
        normed, _, _, total = self.op_multi(
            "SkipSimplifiedLayerNormalization",
            [x, residual, self.weight(f"{module}.weight", "norm")],
            name, [f"{module}/output", f"{name}/mean", f"{name}/inv_std", f"{name}/sum"],
            domain=MS_DOMAIN, epsilon=self.config.rms_norm_eps,
        )  # fmt: skip
        return normed, total

    def decoder_layer_fused(self, i, layer_type, normed, residual, next_norm, seqlens_k,
                            total_length, rope, past_key, past_value):  # fmt: skip
        """x += post_attn_norm(attn(normed)); normed = pre_ff_norm(x);
        x += post_ff_norm(mlp(normed)); normed = next_norm(x)."""
        p = f"model.layers.{i}"
        # `normed` and `residual` are in the residual stream's dtype (float32 in fp16 builds).
        attn_out, present = self.attention_gqa(
            i, layer_type, self.to_compute(normed), seqlens_k, total_length, rope, past_key,
            past_value,
        )  # fmt: skip
        attn_out = self.norm(self.to_stream(attn_out), f"{p}.post_attention_layernorm")
        normed, residual = self.skip_norm(
            attn_out, residual, f"{p}.pre_feedforward_layernorm", f"{p}.attn_residual"
        )
        mlp_out = self.to_stream(self.mlp_fused(self.to_compute(normed), f"{p}.mlp"))
        mlp_out = self.norm(mlp_out, f"{p}.post_feedforward_layernorm")
        normed, residual = self.skip_norm(mlp_out, residual, next_norm, f"{p}.mlp_residual")
        return normed, residual, present

    def rotary(self, position_ids: ir.Value) -> dict[str, tuple[ir.Value, ...]]:
        """Per layer type: (cos, sin, rows) for ORT's RotaryEmbedding, in float32."""
        tables = {}
        for layer_type, prefix, inv_freq in self.inv_freqs():
            tables[layer_type] = self.op_multi(
                "RotaryCache", [position_ids, inv_freq], prefix,
                [f"{prefix}.cos", f"{prefix}.sin", f"{prefix}.rows"], domain=DOMAIN,
            )  # fmt: skip
        return tables

    def heads_norm_rotary(self, x: ir.Value, count: int, module: str, norm: str, rope):
        """[B, S, count * D] -> per-head RMSNorm -> RoPE -> [B, S, count * D] (GQA's layout).
        The norm runs on [B, S, count, D] (its last axis is the head's), so nothing transposes.
        Norm and RoPE compute in float32 (fp16/bf16 builds cast the heads in and out)."""
        dim = self.config.head_dim
        x = self.to_stream(x)
        split = self.const(f"shape.bs_{count}_{dim}", np.array([0, 0, count, dim], np.int64))
        heads = self.op("Reshape", [x, split], f"{module}.{norm}.split_heads")
        heads = self.norm(heads, f"{module}.{norm}")
        merged = self.op(
            "Reshape", [heads, self.const("shape.bsh", np.array([0, 0, -1], np.int64))],
            f"{module}.{norm}.merge_heads",
        )  # fmt: skip
        cos, sin, rows = rope
        rotated = self.op(
            "RotaryEmbedding", [merged, rows, cos, sin], f"{module}.{norm}.rotary",
            domain=MS_DOMAIN, num_heads=count, interleaved=0,
        )  # fmt: skip
        return self.to_compute(rotated)

    def attention_gqa(self, i, layer_type, hidden, seqlens_k, total_length, rope,
                      past_key, past_value):  # fmt: skip
        cfg = self.config
        p = f"model.layers.{i}.self_attn"
        heads, kv_heads, dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv = self.project(hidden, p, ("q_proj", "k_proj", "v_proj"), f"{p}.qkv_proj")
        sizes = self.const(
            f"shape.qkv_split_{heads}_{kv_heads}",
            np.array([heads * dim, kv_heads * dim, kv_heads * dim], np.int64),
        )
        query, key, value = self.op_multi(
            "Split", [qkv, sizes], f"{p}.qkv_split",
            [f"{p}.q_proj/output", f"{p}.k_proj/output", f"{p}.v_proj/output"], axis=-1,
        )  # fmt: skip
        query = self.heads_norm_rotary(query, heads, p, "q_norm", rope)
        key = self.heads_norm_rotary(key, kv_heads, p, "k_norm", rope)
        # HF's window: slot j is visible from query q iff q - window < j <= q (`window` slots,
        # the query's own included); GQA's CPU kernel reads local_window_size the same way
        # (checked against HF in tests/test_ort_target.py).
        # Sliding layers: `sliding_window_cache` makes the past/present buffer window-sized
        # (past_sequence_dim); the kernel still takes absolute lengths and positions and keeps
        # the last `window` slots itself (checked against HF across the window in the tests).
        sliding = {"local_window_size": cfg.sliding_window, "sliding_window_cache": 1}
        context, present_key, present_value = self.op_multi(
            "GroupQueryAttention",
            [query, key, value, past_key, past_value, seqlens_k, total_length],
            f"{p}.attention", [f"{p}.attention/output", f"present.{i}.key", f"present.{i}.value"],
            domain=MS_DOMAIN, num_heads=heads, kv_num_heads=kv_heads, scale=cfg.attn_scale,
            **(sliding if layer_type == SLIDING else {"local_window_size": -1}),
        )  # fmt: skip
        return self.linear(context, f"{p}.o_proj"), [present_key, present_value]

    def mlp_fused(self, hidden: ir.Value, module: str) -> ir.Value:
        gate_up = self.project(hidden, module, ("gate_proj", "up_proj"), f"{module}.gate_up_proj")
        gate, up = self.op_multi(
            "Split", [gate_up], f"{module}.gate_up_split",
            [f"{module}.gate_proj/output", f"{module}.up_proj/output"], axis=-1, num_outputs=2,
        )  # fmt: skip
        gelu = self.op("FastGelu", [gate], f"{module}.act_fn", domain=MS_DOMAIN)
        product = self.op("Mul", [gelu, up], f"{module}.gate_times_up")
        return self.linear(product, f"{module}.down_proj")

    def lm_head_normed(self, normed: ir.Value, logits_to_keep: ir.Value) -> ir.Value:
        """The final norm already ran (fused with the last residual add); slice, then project."""
        return self.lm_head(normed, logits_to_keep, final_norm=False)
