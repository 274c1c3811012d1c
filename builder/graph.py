"""Graph assembly: a Gemma 3 text decoder as an ONNX model (onnx_ir), in architecture order.

embed -> (mask, RoPE once per layer type) -> layers -> final norm -> tied LM head.

The graph follows the portable I/O contract of optimum / transformers.js / onnxruntime-genai:
``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key|value`` in;
``logits``, ``present.{i}.key|value`` out. One optional extra, ``logits_to_keep`` (an overridable
initializer, default 0 = every position), lets a runtime ask for the last k positions' logits only,
so a long prefill never materializes [S, vocab] logits; clients that do not know it never see it.

Initializers carry HF module paths. Linear weights are stored transposed (``[in, out]``, suffix
``weight_t``) so each projection is one MatMul; norms store ``1 + w`` in float32 (suffix
``scale``). Weights are ``onnx_ir.LazyTensor``s: nothing is converted until the model is saved.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import ml_dtypes
import numpy as np
import onnx_ir as ir

from gemma_onnx.builder.config import FULL, SLIDING, Gemma3Config
from gemma_onnx.builder.functions import DOMAIN, function_protos
from gemma_onnx.builder.quantize import BITS, QuantConfig, SharedComputation, qdq_weights
from gemma_onnx.builder.weights import Checkpoint
from gemma_onnx.errors import GemmaOnnxError

OPSET = 18  # standard ops only; checked on ONNX Runtime 1.15, 1.17 and 1.32 (README, "Opset")
IR_VERSION = 8
# Quantized portable builds: block-quantized DequantizeLinear and int4 types need opset 21 and
# IR version 10 (ONNX Runtime 1.18+).
QUANTIZED_OPSET, QUANTIZED_IR_VERSION = 21, 10
# Value.meta key of an initializer that is a view of another's bytes: the source's name.
ALIAS_OF = "gemma_onnx.alias_of"

PRECISIONS = {
    "fp32": (ir.DataType.FLOAT, np.dtype(np.float32)),
    "fp16": (ir.DataType.FLOAT16, np.dtype(np.float16)),
    "bf16": (ir.DataType.BFLOAT16, np.dtype(ml_dtypes.bfloat16)),
}


def rope_inv_freq(head_dim: int, theta: float, factor: float) -> np.ndarray:
    """HF's ``1 / theta ** (arange(0, D, 2) / D)``, then ``/ factor`` (linear RoPE), as float32.

    HF evaluates the power in float32 with torch's pow, which is not always correctly rounded;
    we round the float64 result once, so the two can differ by one float32 ulp (6e-8 relative).
    """
    exponents = (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)).astype(
        np.float64
    )
    inv_freq = (1.0 / np.power(float(theta), exponents)).astype(np.float32)
    return (inv_freq / np.float32(factor)).astype(np.float32)


class _WeightConverter:
    """Makes LazyTensors that read checkpoint tensors, convert them and check they are finite."""

    def __init__(self, checkpoint: Checkpoint, dtype: np.dtype):
        self.tensors = checkpoint.tensors
        self.dtype = dtype

    def shape(self, hf_name: str) -> tuple[int, ...]:
        return tuple(self.tensors[hf_name].shape.numpy())

    def read(self, hf_name: str) -> np.ndarray:
        """One tensor as a float32 copy; the memory map is released before returning."""
        source = self.tensors[hf_name]
        raw = source.numpy()
        if not np.isfinite(raw).all():
            raise GemmaOnnxError(f"tensor {hf_name!r} contains NaN or infinite values")
        array = raw.astype(np.float32)  # exact for bf16/fp16 sources; a copy, never a view
        del raw
        source.release()
        return array

    def lazy(
        self,
        hf_names: tuple[str, ...],
        out_name: str,
        convert: Callable[[list[np.ndarray]], np.ndarray],
        dtype: ir.DataType,
        shape: tuple[int, ...],
    ) -> ir.LazyTensor:
        """A tensor computed from ``hf_names`` (float32) only when the model is written."""

        def load() -> ir.Tensor:
            array = np.ascontiguousarray(convert([self.read(name) for name in hf_names]))
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise GemmaOnnxError(
                    f"tensor {hf_names[0]!r} overflows {array.dtype}; build with fp32 or bf16"
                )
            return ir.Tensor(array, name=out_name)

        return ir.LazyTensor(load, dtype=dtype, shape=ir.Shape(shape), name=out_name)


class DecoderGraph:
    """Builds the graph; one method per architectural piece, called top-down by :meth:`build`."""

    TARGET = "portable"  # --target
    # The LM head multiplies [rows, E] (Gemm is 2-D only), and a Reshape restores [B, S', V].
    # Where the head is a MatMul, it takes [B, S', E] and writes the logits itself: the Reshape
    # would copy the whole [B, S', V] into the bound output buffer every step (1 MB on Gemma 3).
    HEAD_ON_ROWS = True

    def __init__(
        self,
        config: Gemma3Config,
        checkpoint: Checkpoint,
        precision: str = "fp32",
        quant: QuantConfig | None = None,
    ):
        if precision not in (*PRECISIONS, *BITS):
            raise GemmaOnnxError(
                f"precision {precision!r} is not supported; choose from "
                f"{', '.join([*PRECISIONS, *BITS])}"
            )
        self.config = config
        # int4/int8 quantize the weights only: activations, KV and norms stay float32.
        self.quant = None
        if precision in BITS:
            self.quant = quant or QuantConfig(bits=BITS[precision])
            if self.quant.bits != BITS[precision]:
                raise GemmaOnnxError(f"precision {precision} needs {BITS[precision]}-bit weights")
            precision = "fp32"
        self.ir_dtype, self.np_dtype = PRECISIONS[precision]
        self.opset = OPSET if self.quant is None else QUANTIZED_OPSET
        # The residual stream's dtype (see to_stream); bf16 has fp32's range.
        fp16 = self.ir_dtype == ir.DataType.FLOAT16
        self.stream_dtype = ir.DataType.FLOAT if fp16 else self.ir_dtype
        self.weights = _WeightConverter(checkpoint, self.np_dtype)
        self.tape = ir.tape.Tape()
        self._values: dict[str, ir.Value] = {}

    # ---- small helpers -------------------------------------------------------------------
    def op(
        self,
        op_type: str,
        inputs,
        name: str,
        out: str | None = None,
        domain: str = "",
        **attributes,
    ) -> ir.Value:
        value = self.tape.op(op_type, inputs, attributes or None, domain=domain, name=name)
        value.name = out or f"{name}/output"
        return value

    def op_multi(
        self, op_type: str, inputs, name: str, outs: list[str], domain: str = "", **attributes
    ) -> list[ir.Value]:
        values = self.tape.op_multi_out(
            op_type, inputs, attributes or None, num_outputs=len(outs), domain=domain, name=name
        )
        for value, out in zip(values, outs, strict=True):
            value.name = out
        return list(values)

    def fn(self, function: str, inputs, name: str, out: str | None = None, **attributes):
        return self.op(function, inputs, name, out, domain=DOMAIN, **attributes)

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        if name not in self._values:
            self._values[name] = self.tape.initializer(ir.tensor(array, name=name), name=name)
        return self._values[name]

    def alias(self, source: ir.Value, name: str, shape: tuple[int, ...]) -> ir.Value:
        """An initializer that reads ``source``'s bytes under another name and ``shape``.

        The export writes it as a second reference to the same range of the external data file
        (see export.py), so the bytes are stored once, and ONNX Runtime maps each reference on
        its own: a kernel that prepacks the source can release its mapping while another
        kernel reads the alias. Serialized any other way, it is an ordinary copy.
        """
        if name not in self._values:
            tensor = source.const_value

            def load():
                return ir.Tensor(tensor.numpy().reshape(shape), name=name)

            lazy = ir.LazyTensor(load, dtype=tensor.dtype, shape=ir.Shape(shape), name=name)
            value = self.tape.initializer(lazy, name=name)
            value.meta[ALIAS_OF] = source.name
            self._values[name] = value
        return self._values[name]

    def weight(self, hf_name: str, kind: str) -> ir.Value:
        """An initializer from a checkpoint tensor. kind: 'embed', 'linear', 'bias' or 'norm'."""
        if hf_name in self._values:
            return self._values[hf_name]
        shape = self.weights.shape(hf_name)
        np_dtype, ir_dtype = self.np_dtype, self.ir_dtype
        if kind == "linear":  # HF [out, in] -> [in, out], so the projection is x @ W
            out_name, out_shape = hf_name.removesuffix(".weight") + ".weight_t", shape[::-1]

            def convert(a):
                return a[0].T.astype(np_dtype)

        elif kind == "norm":  # Gemma3RMSNorm: (1.0 + weight.float()), in float32
            out_name, out_shape = hf_name.removesuffix(".weight") + ".scale", shape
            ir_dtype = ir.DataType.FLOAT

            def convert(a):
                return a[0] + np.float32(1.0)

        else:
            out_name, out_shape = hf_name, shape

            def convert(a):
                return a[0].astype(np_dtype)

        lazy = self.weights.lazy((hf_name,), out_name, convert, ir_dtype, out_shape)
        value = self.tape.initializer(lazy, name=out_name)
        self._values[hf_name] = value
        return value

    # ---- the model, top-down -------------------------------------------------------------
    def build(self) -> ir.Model:
        cfg = self.config
        inputs, past = self.graph_inputs()
        input_ids, attention_mask, position_ids, logits_to_keep = inputs

        hidden = self.embed(input_ids)
        masks = self.masks(attention_mask, input_ids)
        rope = self.rotary(position_ids)
        presents = []
        for i, layer_type in enumerate(cfg.layer_types):
            hidden, present = self.decoder_layer(
                i, hidden, masks[layer_type], rope[layer_type], past[2 * i], past[2 * i + 1]
            )
            presents += present
        logits = self.lm_head(hidden, logits_to_keep)
        return self.assemble(
            [input_ids, attention_mask, position_ids, *past, logits_to_keep], [logits, *presents]
        )

    def assemble(
        self, inputs: list[ir.Value], outputs: list[ir.Value], extra_opsets: dict | None = None
    ) -> ir.Model:
        cfg = self.config
        for index, value in enumerate(outputs[1:]):  # present.{i}.key / .value
            value.dtype = self.ir_dtype
            length = self.present_sequence_dim(cfg.layer_types[index // 2])
            value.shape = ir.Shape(["batch_size", cfg.num_key_value_heads, length, cfg.head_dim])
        graph = ir.Graph(
            inputs=inputs,
            outputs=outputs,
            nodes=self.tape.nodes,
            initializers=self.tape.initializers,
            opset_imports={"": self.opset, DOMAIN: 1, **(extra_opsets or {})},
            name="gemma3_text_decoder",
        )
        model = ir.Model(
            graph,
            ir_version=IR_VERSION if self.opset == OPSET else QUANTIZED_IR_VERSION,
            producer_name="gemma-onnx",
            doc_string="Gemma 3 text decoder built by gemma-onnx from safetensors weights",
        )
        # What a runtime must know to feed the graph (read via InferenceSession.get_modelmeta).
        model.metadata_props.update(self.runtime_metadata())
        for proto in function_protos(self.opset):
            function = ir.serde.deserialize_function(proto)
            model.functions[function.identifier()] = function
        return model

    def runtime_metadata(self) -> dict[str, str]:
        """kv_cache: 'concat' = present is past + new (a new, longer tensor every step);
        padding: where attention_mask puts the 0s of a shorter row."""
        return {"gemma_onnx.target": "portable", "gemma_onnx.kv_cache": "concat",
                "gemma_onnx.padding": "left", **self.session_metadata()}  # fmt: skip

    def session_metadata(self) -> dict[str, str]:
        """ORT session config entries this graph runs best with, as JSON. Prepacking copies
        every constant MatMul/Gemm weight into MLAS's packed layout, the tied [vocab, hidden]
        table too, which the lookup still reads unpacked: a second copy (0.66 GB on Gemma 3
        270M). MatMulNBits, on the contrary, needs its weights prepacked to run its fast
        kernels. (The ORT target keeps the table out of prepacking instead: graph_ort.py.)"""
        prepack = self.quant is not None
        entries = {"session.disable_prepacking": "0" if prepack else "1"}
        return {"gemma_onnx.session_config": json.dumps(entries)}

    def past_sequence_dim(self, layer_type: str) -> str | int:
        return "past_sequence_length"

    def present_sequence_dim(self, layer_type: str) -> str | int:
        return "total_sequence_length"

    def graph_inputs(self) -> tuple[list[ir.Value], list[ir.Value]]:
        cfg = self.config
        kv, dim = cfg.num_key_value_heads, cfg.head_dim
        i64 = ir.TensorType(ir.DataType.INT64)
        input_ids = ir.Value(
            name="input_ids", type=i64, shape=ir.Shape(["batch_size", "sequence_length"])
        )
        attention_mask = ir.Value(
            name="attention_mask", type=i64, shape=ir.Shape(["batch_size", "total_sequence_length"])
        )
        position_ids = ir.Value(
            name="position_ids", type=i64, shape=ir.Shape(["batch_size", "sequence_length"])
        )
        past = [
            ir.Value(
                name=f"past_key_values.{i}.{kind}",
                type=ir.TensorType(self.ir_dtype),
                shape=ir.Shape(["batch_size", kv, self.past_sequence_dim(cfg.layer_types[i]), dim]),
            )
            for i in range(cfg.num_hidden_layers)
            for kind in ("key", "value")
        ]
        return [input_ids, attention_mask, position_ids, self.logits_to_keep_input()], past

    def logits_to_keep_input(self) -> ir.Value:
        """An overridable initializer: an input with a default (0 = all positions), so clients
        may leave it out. ORT's IO binding cannot bind such inputs; session.run can."""
        return self.const("logits_to_keep", np.array(0, dtype=np.int64))

    def embed(self, input_ids: ir.Value) -> ir.Value:
        """Gather, then scale by sqrt(hidden_size) cast to the compute dtype (fp32: 25.2982 for
        hidden 640, bf16: 25.25), as ``Gemma3TextScaledWordEmbedding`` does."""
        table = self.weight("model.embed_tokens.weight", "embed")
        rows = self.op("Gather", [table, input_ids], "model.embed_tokens")  # [B, S, E]
        scale = self.const(
            "model.embed_tokens.embed_scale",
            np.array(self.config.embed_scale, dtype=np.float32).astype(self.np_dtype),
        )
        return self.to_stream(self.op("Mul", [rows, scale], "model.embed_tokens.scale"))

    def to_stream(self, x: ir.Value) -> ir.Value:
        """Into the residual stream's dtype: float32 in fp16 builds, where Gemma 3's residual
        stream outgrows fp16 (270M: 68,398 after layer 7 at <bos>, past fp16's 65,504), and in
        every build of the ORT target (see OrtDecoderGraph)."""
        if self.stream_dtype == self.ir_dtype:
            return x
        return self.op("Cast", [x], f"{x.name}.to_stream", to=self.stream_dtype)

    def to_compute(self, x: ir.Value) -> ir.Value:
        """Out of the residual stream, into the MatMuls' dtype."""
        if self.stream_dtype == self.ir_dtype:
            return x
        return self.op("Cast", [x], f"{x.name}.to_compute", to=self.ir_dtype)

    def masks(self, attention_mask: ir.Value, input_ids: ir.Value) -> dict[str, ir.Value]:
        """One boolean [B, 1, S, T] mask per layer type, built once per forward pass."""
        present = set(self.config.layer_types)
        masks = {}
        if FULL in present:
            masks[FULL] = self.fn("CausalMask", [attention_mask, input_ids], "model.causal_mask")
        if SLIDING in present:
            masks[SLIDING] = self.fn(
                "SlidingWindowMask",
                [attention_mask, input_ids],
                "model.sliding_window_mask",
                window=self.config.sliding_window,
            )
        return masks

    def inv_freqs(self) -> list[tuple[str, str, ir.Value]]:
        """(layer type, name prefix, RoPE inv_freq initializer) per layer type: theta 10k on
        sliding layers, 1M (+ linear scaling) on global ones."""
        out = []
        for layer_type in sorted(set(self.config.layer_types)):
            params = self.config.rope[layer_type]
            prefix = f"model.rotary_emb.{layer_type}"
            inv_freq = self.const(
                f"{prefix}.inv_freq",
                rope_inv_freq(self.config.head_dim, params.theta, params.factor),
            )
            out.append((layer_type, prefix, inv_freq))
        return out

    def rotary(self, position_ids: ir.Value) -> dict[str, tuple[ir.Value, ir.Value]]:
        """cos/sin per layer type, shared by every layer of that type."""
        tables = {}
        for layer_type, prefix, inv_freq in self.inv_freqs():
            tables[layer_type] = tuple(
                self.op_multi(
                    "RotaryCosSin",
                    [position_ids, inv_freq],
                    prefix,
                    [f"{prefix}.cos", f"{prefix}.sin"],
                    domain=DOMAIN,
                )
            )
        return tables

    def rms_norm(self, x: ir.Value, module: str) -> ir.Value:
        return self.fn(
            "RMSNorm",
            [x, self.weight(f"{module}.weight", "norm")],
            module,
            epsilon=self.config.rms_norm_eps,
        )

    def matmul_weight(self, hf_name: str) -> ir.Value:
        """The [in, out] weight of a projection: an initializer, or, quantized, the output of a
        block-quantized DequantizeLinear (opset 21) that ONNX Runtime fuses into MatMulNBits."""
        if self.quant is None:
            return self.weight(hf_name, "linear")
        key = f"dequantized:{hf_name}"
        if key not in self._values:
            self._values[key] = self.dequantized(hf_name)
        return self._values[key]

    @property
    def layer_quant(self) -> QuantConfig:
        """How the decoder layers' projections are quantized on this target (--layer-bits)."""
        return self.quant.for_layers(self.TARGET)

    def dequantized(self, hf_name: str) -> ir.Value:
        # Only the decoder layers' projections come here (the portable graph keeps the
        # embedding table in float: Gather and Gemm read it as it is).
        quant = self.layer_quant
        out, k = self.weights.shape(hf_name)
        if k % quant.block_size:
            raise GemmaOnnxError(
                f"{hf_name}: input size {k} is not a multiple of --block-size {quant.block_size}"
            )
        blocks = k // quant.block_size
        base = hf_name.removesuffix(".weight")
        if quant.bits == 4:
            qtype = ir.DataType.INT4 if quant.symmetric else ir.DataType.UINT4
        else:
            qtype = ir.DataType.INT8
        layout = {"quantized": (qtype, (k, out)), "scales": (ir.DataType.FLOAT, (blocks, out))}
        if quant.bits == 4 and not quant.symmetric:
            layout["zero_points"] = (ir.DataType.UINT4, (blocks, out))
        read = self.weights.read

        def compute():
            return qdq_weights(read(hf_name).T, quant)

        shared = SharedComputation(compute, set(layout))
        inputs = []
        for part, (dtype, shape) in layout.items():
            name = f"{base}.weight_t.{part}"

            def load(part=part, name=name, dtype=dtype, shape=shape):
                array = shared.take(part)
                if dtype in (ir.DataType.INT4, ir.DataType.UINT4):
                    return ir.PackedTensor(array, dtype, shape=shape, name=name)
                return ir.Tensor(array, name=name)

            lazy = ir.LazyTensor(load, dtype=dtype, shape=ir.Shape(shape), name=name)
            inputs.append(self.tape.initializer(lazy, name=name))
        return self.op(
            "DequantizeLinear", inputs, f"{base}.dequantize", out=f"{base}.weight_t",
            axis=0, block_size=quant.block_size,
        )  # fmt: skip

    def linear(self, x: ir.Value, module: str) -> ir.Value:
        y = self.op("MatMul", [x, self.matmul_weight(f"{module}.weight")], module)
        if self.config.attention_bias and f"{module}.bias" in self.weights.tensors:
            y = self.op("Add", [y, self.weight(f"{module}.bias", "bias")], f"{module}.bias_add")
        return y

    def heads(self, x: ir.Value, count: int, name: str) -> ir.Value:
        """[B, S, count * D] -> [B, count, S, D]."""
        shape = self.const(
            f"shape.heads_{count}", np.array([0, 0, count, self.config.head_dim], dtype=np.int64)
        )
        split = self.op("Reshape", [x, shape], f"{name}.reshape")
        return self.op("Transpose", [split], f"{name}.transpose", perm=[0, 2, 1, 3])

    def decoder_layer(
        self,
        i: int,
        hidden: ir.Value,
        mask: ir.Value,
        cos_sin: tuple[ir.Value, ir.Value],
        past_key: ir.Value,
        past_value: ir.Value,
    ) -> tuple[ir.Value, list[ir.Value]]:
        """Sandwich norms: x += post_attn_norm(attn(input_norm(x)));
        x += post_ff_norm(mlp(pre_ff_norm(x)))."""
        p = f"model.layers.{i}"
        residual = hidden
        hidden = self.to_compute(self.rms_norm(hidden, f"{p}.input_layernorm"))
        hidden, present = self.attention(i, hidden, mask, cos_sin, past_key, past_value)
        hidden = self.rms_norm(self.to_stream(hidden), f"{p}.post_attention_layernorm")
        hidden = self.op("Add", [residual, hidden], f"{p}.attn_residual")

        residual = hidden
        hidden = self.to_compute(self.rms_norm(hidden, f"{p}.pre_feedforward_layernorm"))
        hidden = self.to_stream(self.mlp(hidden, f"{p}.mlp"))
        hidden = self.rms_norm(hidden, f"{p}.post_feedforward_layernorm")
        hidden = self.op("Add", [residual, hidden], f"{p}.mlp_residual", out=f"{p}/output")
        return hidden, present

    def attention(
        self,
        i: int,
        hidden: ir.Value,
        mask: ir.Value,
        cos_sin: tuple[ir.Value, ir.Value],
        past_key: ir.Value,
        past_value: ir.Value,
    ) -> tuple[ir.Value, list[ir.Value]]:
        cfg = self.config
        p = f"model.layers.{i}.self_attn"
        cos, sin = cos_sin
        query = self.heads(self.linear(hidden, f"{p}.q_proj"), cfg.num_attention_heads, f"{p}.q")
        key = self.heads(self.linear(hidden, f"{p}.k_proj"), cfg.num_key_value_heads, f"{p}.k")
        value = self.heads(self.linear(hidden, f"{p}.v_proj"), cfg.num_key_value_heads, f"{p}.v")
        # q_norm / k_norm over head_dim, before RoPE.
        query = self.rms_norm(query, f"{p}.q_norm")
        key = self.rms_norm(key, f"{p}.k_norm")
        query = self.fn("RotaryEmbedding", [query, cos, sin], f"{p}.q_rotary")
        key = self.fn("RotaryEmbedding", [key, cos, sin], f"{p}.k_rotary")
        # Every layer keeps full-length KV; the sliding window lives in the mask.
        present_key = self.op(
            "Concat", [past_key, key], f"{p}.present_key", out=f"present.{i}.key", axis=2
        )
        present_value = self.op(
            "Concat", [past_value, value], f"{p}.present_value", out=f"present.{i}.value", axis=2
        )
        context = self.fn(
            "GroupQueryAttention",
            [query, present_key, present_value, mask],
            f"{p}.attention",
            scale=cfg.attn_scale,
        )  # [B, S, H * D]
        return self.linear(context, f"{p}.o_proj"), [present_key, present_value]

    def mlp(self, hidden: ir.Value, module: str) -> ir.Value:
        weights = [
            self.matmul_weight(f"{module}.{proj}.weight")
            for proj in ("gate_proj", "up_proj", "down_proj")
        ]
        return self.fn("GeluTanhMLP", [hidden, *weights], module)

    def head_scores(self, flat: ir.Value) -> ir.Value:
        """[rows, E] -> [rows, V] ([B, S', E] -> [B, S', V] where HEAD_ON_ROWS is off); the
        tied head reads the embedding table through Gemm(transB=1): one [V, E] matrix in the
        file and in memory."""
        if self.config.tie_word_embeddings:
            table = self.weight("model.embed_tokens.weight", "embed")
            return self.op("Gemm", [flat, table], "lm_head", transB=1)
        return self.op("MatMul", [flat, self.weight("lm_head.weight", "linear")], "lm_head")

    def lm_head(
        self, hidden: ir.Value, logits_to_keep: ir.Value, final_norm: bool = True
    ) -> ir.Value:
        """Final norm and LM head over the last ``logits_to_keep`` positions (0 = all; a
        negative -n drops the first n instead, so -S or less keeps none: what our runtime binds
        for a long prompt's chunks before its last, which need no logits).

        The tied head reuses the embedding initializer through Gemm(transB=1), so the file and
        the session hold one copy of the [vocab, hidden] matrix.
        """
        cfg = self.config
        starts = self.op(
            "Neg",
            [
                self.op(
                    "Reshape",
                    [logits_to_keep, self.const("shape.one", np.array([1], dtype=np.int64))],
                    "lm_head.keep_1d",
                )
            ],
            "lm_head.keep_start",
        )
        kept = self.op(
            "Slice",
            [
                hidden,
                starts,
                self.const("lm_head.keep_end", np.array([2**62], np.int64)),
                self.const("lm_head.keep_axis", np.array([1], np.int64)),
            ],
            "lm_head.keep",
        )  # [B, S', E]
        hidden = self.to_compute(self.rms_norm(kept, "model.norm") if final_norm else kept)
        if self.HEAD_ON_ROWS:
            hidden = self.op(
                "Reshape",
                [hidden, self.const("shape.rows", np.array([-1, cfg.hidden_size], np.int64))],
                "lm_head.flatten",
            )
        scores = self.head_scores(hidden)  # [rows, V], or [B, S', V]
        if self.ir_dtype != ir.DataType.FLOAT:
            scores = self.op("Cast", [scores], "lm_head.to_float", to=ir.DataType.FLOAT)
        if cfg.final_logit_softcapping:
            cap = self.const("lm_head.softcap", np.array(cfg.final_logit_softcapping, np.float32))
            scores = self.op(
                "Mul",
                [
                    self.op(
                        "Tanh",
                        [self.op("Div", [scores, cap], "lm_head.softcap_div")],
                        "lm_head.softcap_tanh",
                    ),
                    cap,
                ],
                "lm_head.softcap",
            )
        if self.HEAD_ON_ROWS:
            batch_seq = self.op("Shape", [kept], "lm_head.batch_seq", start=0, end=2)
            shape = self.op(
                "Concat",
                [batch_seq, self.const("shape.vocab", np.array([cfg.vocab_size], np.int64))],
                "lm_head.logits_shape",
                axis=0,
            )
            # allowzero: a step that keeps no position has shape [B, 0, V], not "copy dim 1".
            logits = self.op(
                "Reshape", [scores, shape], "lm_head.unflatten", out="logits", allowzero=1
            )
        else:
            logits = scores
            logits.name = "logits"
        logits.dtype = ir.DataType.FLOAT
        logits.shape = ir.Shape(["batch_size", "sequence_length", cfg.vocab_size])
        return logits


def build_graph(
    config: Gemma3Config,
    checkpoint: Checkpoint,
    precision: str = "fp32",
    target: str = "portable",
    quant: QuantConfig | None = None,
) -> ir.Model:
    """The decoder as an in-memory ONNX model whose weights load lazily at save time."""
    if target == "ort":
        from gemma_onnx.builder.graph_ort import OrtDecoderGraph

        return OrtDecoderGraph(config, checkpoint, precision, quant).build()
    return DecoderGraph(config, checkpoint, precision, quant).build()
