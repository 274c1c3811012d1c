"""Gemma 3 text-decoder config, read once from config.json (transformers 4.x or 5.x) and validated.

Both architectures land here: ``Gemma3ForCausalLM`` (model_type ``gemma3_text``, fields at the top
level) and ``Gemma3ForConditionalGeneration`` (model_type ``gemma3``, the decoder in
``text_config``; the vision tower is ignored). Everything downstream keys off ``layer_types``,
derived once here, as HF's ``Gemma3TextConfig.__post_init__`` does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemma_onnx.errors import GemmaOnnxError

SLIDING = "sliding_attention"
FULL = "full_attention"

# The decoder's sizes, with transformers' Gemma3TextConfig defaults: the published 4b/12b/27b
# configs leave some of them out (4b: vocab_size, the head counts and head_dim), and HF fills them
# in from here. head_dim defaults to 256, not hidden_size // heads.
_SIZES: dict[str, int] = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
}
# transformers' Gemma3TextConfig defaults for the other fields that hub configs often omit.
_DEFAULTS: dict[str, Any] = {
    **_SIZES,
    "rms_norm_eps": 1e-6,
    "query_pre_attn_scalar": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "attention_bias": False,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "tie_word_embeddings": True,
    "use_bidirectional_attention": False,
    "sliding_window": 4096,
}
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast")
# Sanity bounds, far above any Gemma (27b: 62 layers, vocab 262208): a size past them is a typo,
# and would otherwise hang building a billion-entry layer list or overflow ORT's int32 indexing.
_MAX_LAYERS = 10_000
_MAX_DIM = 2**31 - 1


@dataclass(frozen=True)
class RopeParams:
    """RoPE for one layer type: ``inv_freq = 1 / theta ** (2i / head_dim) / factor``."""

    theta: float  # base frequency: 10_000 on sliding layers, 1_000_000 on global ones
    factor: float = 1.0  # linear position scaling (4b+: 8 on global layers only)


@dataclass(frozen=True)
class Gemma3Config:
    """The decoder hyper-parameters the graph needs, with HF's field names."""

    vocab_size: int  # 262144 (270m, 1b) or 262208 (4b+, image tokens appended)
    hidden_size: int  # residual width; the embedding is scaled by sqrt(hidden_size)
    intermediate_size: int  # MLP width
    num_hidden_layers: int
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # KV heads, shared by num_attention_heads // num_key_value_heads
    head_dim: int  # its own field: not hidden_size // heads (1b: 1152 / 4 = 288, head_dim 256)
    query_pre_attn_scalar: float  # attention scale is query_pre_attn_scalar ** -0.5
    rms_norm_eps: float
    sliding_window: int  # tokens a sliding layer sees, itself included
    layer_types: tuple[str, ...]  # per layer: "sliding_attention" or "full_attention"
    rope: dict[str, RopeParams]  # per layer type
    max_position_embeddings: int
    attention_bias: bool  # q/k/v/o projections carry biases (False in every Gemma 3)
    final_logit_softcapping: float | None  # logits = cap * tanh(logits / cap) when set
    # Read but not applied: HF's Gemma3Attention never passes it to attention (Gemma 3 replaced
    # attention softcapping with q/k norms), and HF is the oracle. Checked in tests/test_parity.py.
    attn_logit_softcapping: float | None
    tie_word_embeddings: bool  # LM head is the embedding matrix
    architecture: str  # "Gemma3ForCausalLM" or "Gemma3ForConditionalGeneration"
    # The sizes config.json left to transformers' defaults: named if the weights disagree.
    defaulted: tuple[str, ...] = field(default=(), compare=False)

    @property
    def embed_scale(self) -> float:
        """HF multiplies embeddings by sqrt(hidden_size) cast to the weight dtype (not 25.3)."""
        return math.sqrt(self.hidden_size)

    @property
    def attn_scale(self) -> float:
        return self.query_pre_attn_scalar**-0.5

    @classmethod
    def from_file(cls, path: str | Path) -> Gemma3Config:
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise GemmaOnnxError(f"{path}: config.json not found") from None
        except (OSError, ValueError) as exc:  # also a >4300-digit number
            raise GemmaOnnxError(f"{path}: not a readable JSON config ({exc})") from None
        except RecursionError:
            raise GemmaOnnxError(f"{path}: JSON nested too deeply to be a config") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: Any, source: str = "config.json") -> Gemma3Config:
        if not isinstance(raw, dict):
            raise GemmaOnnxError(f"{source}: expected a JSON object, found {type(raw).__name__}")
        model_type = raw.get("model_type")
        architectures = raw.get("architectures") or []
        if not isinstance(architectures, list):
            architectures = [architectures]
        if model_type == "gemma3":
            text = raw.get("text_config")
            if not isinstance(text, dict):
                raise GemmaOnnxError(f"{source}: model_type 'gemma3' needs a 'text_config' object")
            # transformers 5 ties by the outer config's flag, and writes it there (an untied
            # model saved by 5.x has outer false, text_config true); 4.x read text_config's,
            # and wrote only flags that differ from the default. So the outer flag wins when
            # present. A stored head that differs from the embedding unties it either way
            # (weights.load_checkpoint), as transformers 5 does.
            text = {**text}
            if "tie_word_embeddings" in raw:
                text["tie_word_embeddings"] = raw["tie_word_embeddings"]
            architecture = "Gemma3ForConditionalGeneration"
        elif model_type == "gemma3_text":
            text = raw
            architecture = "Gemma3ForCausalLM"
        else:
            if model_type is not None:
                found = f"model_type {model_type!r}"
            elif architectures:
                found = f"no model_type, architectures {architectures!r}"
            else:
                found = "no model_type or architectures"
            raise GemmaOnnxError(
                f"{source}: not a Gemma 3 model ({found}); "
                "expected model_type 'gemma3_text' (Gemma3ForCausalLM) or 'gemma3' "
                "(Gemma3ForConditionalGeneration)"
            )
        return _parse_text_config(text, architecture, source)


def _field(text: dict, name: str, source: str, kind: type | tuple, positive: bool = True) -> Any:
    value = text.get(name, _DEFAULTS.get(name))
    if value is None:
        raise GemmaOnnxError(f"{source}: missing required field {name!r}")
    if isinstance(value, bool) or not isinstance(value, kind):
        raise GemmaOnnxError(f"{source}: field {name!r} has invalid value {value!r}")
    if positive and not value > 0:
        raise GemmaOnnxError(f"{source}: field {name!r} must be positive, found {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise GemmaOnnxError(f"{source}: field {name!r} must be finite, found {value!r}")
    limit = _MAX_LAYERS if name == "num_hidden_layers" else _MAX_DIM
    if isinstance(value, int) and value > limit:
        raise GemmaOnnxError(f"{source}: field {name!r} is implausibly large: {value}")
    return value


def _optional_cap(text: dict, name: str, source: str) -> float | None:
    value = text.get(name)
    if value is None:
        return None
    return float(_field(text, name, source, (int, float)))


def _layer_types(text: dict, num_layers: int, source: str) -> tuple[str, ...]:
    """5.x lists them; 4.x derives them: layer i is sliding iff (i + 1) % pattern != 0."""
    types = text.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != num_layers:
            raise GemmaOnnxError(
                f"{source}: field 'layer_types' must list {num_layers} entries "
                f"(num_hidden_layers), found {types!r}"
            )
        unknown = sorted({str(t) for t in types} - {SLIDING, FULL})
        if unknown:
            raise GemmaOnnxError(f"{source}: field 'layer_types' has unknown types {unknown}")
        return tuple(types)
    pattern = text.get("sliding_window_pattern", text.get("_sliding_window_pattern", 6))
    if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
        raise GemmaOnnxError(f"{source}: field 'sliding_window_pattern' is invalid: {pattern!r}")
    return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(num_layers))


def _rope_params(text: dict, source: str) -> dict[str, RopeParams]:
    """5.x: ``rope_parameters`` keyed by layer type. 4.x: ``rope_theta`` (global),
    ``rope_local_base_freq`` (sliding) and ``rope_scaling`` (global layers only)."""
    params = text.get("rope_parameters")
    if isinstance(params, dict) and (SLIDING in params or FULL in params):
        per_type = {t: params.get(t) or {} for t in (SLIDING, FULL)}
    else:
        # 4.x, or a 5.x file with one flat rope_parameters dict (it describes the global layers).
        full = dict(params) if isinstance(params, dict) else {}
        full.setdefault("rope_theta", text.get("rope_theta", 1_000_000.0))
        scaling = text.get("rope_scaling")
        if isinstance(scaling, dict):
            full.update(scaling)
        sliding = {"rope_theta": text.get("rope_local_base_freq", 10_000.0)}
        per_type = {SLIDING: sliding, FULL: full}
    defaults = {SLIDING: 10_000.0, FULL: 1_000_000.0}
    result = {}
    for layer_type, entry in per_type.items():
        if not isinstance(entry, dict):
            raise GemmaOnnxError(f"{source}: rope parameters for {layer_type} must be an object")
        rope_type = entry.get("rope_type", entry.get("type", "default"))
        theta = entry.get("rope_theta", defaults[layer_type])
        if not _positive_number(theta):
            raise GemmaOnnxError(f"{source}: rope_theta for {layer_type} is invalid: {theta!r}")
        if rope_type == "default":
            factor = 1.0
        elif rope_type == "linear":
            factor = entry.get("factor")
            if not _positive_number(factor):
                raise GemmaOnnxError(
                    f"{source}: linear RoPE scaling for {layer_type} needs a positive 'factor', "
                    f"found {factor!r}"
                )
        else:
            raise GemmaOnnxError(
                f"{source}: RoPE type {rope_type!r} ({layer_type}) is not supported; "
                "Gemma 3 uses 'default' and 'linear'"
            )
        result[layer_type] = RopeParams(theta=float(theta), factor=float(factor))
    return result


def _positive_number(value: Any) -> bool:
    """A finite number > 0 that fits a float (not a bool, which JSON true would give)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        value = float(value)
    except OverflowError:  # an int beyond 1.8e308
        return False
    return math.isfinite(value) and value > 0


def _parse_text_config(text: dict, architecture: str, source: str) -> Gemma3Config:
    ints = {name: _field(text, name, source, int) for name in _SIZES}
    heads, kv_heads = ints["num_attention_heads"], ints["num_key_value_heads"]
    if heads % kv_heads:
        raise GemmaOnnxError(
            f"{source}: num_attention_heads ({heads}) must be a multiple of "
            f"num_key_value_heads ({kv_heads})"
        )
    head_dim = ints["head_dim"]
    if head_dim % 2:
        raise GemmaOnnxError(f"{source}: field 'head_dim' must be even for RoPE, found {head_dim}")
    activation = text.get("hidden_activation") or text.get("hidden_act") or "gelu_pytorch_tanh"
    if activation not in _GELU_TANH:
        raise GemmaOnnxError(
            f"{source}: hidden_activation {activation!r} is not supported (Gemma 3 uses "
            "'gelu_pytorch_tanh')"
        )
    if text.get("use_bidirectional_attention"):
        raise GemmaOnnxError(
            f"{source}: use_bidirectional_attention is set; only causal decoders are supported"
        )
    sliding_window = _field(text, "sliding_window", source, int)
    layer_types = _layer_types(text, ints["num_hidden_layers"], source)
    return Gemma3Config(
        **ints,
        query_pre_attn_scalar=float(_field(text, "query_pre_attn_scalar", source, (int, float))),
        rms_norm_eps=float(_field(text, "rms_norm_eps", source, (int, float))),
        sliding_window=sliding_window,
        layer_types=layer_types,
        rope=_rope_params(text, source),
        max_position_embeddings=_field(text, "max_position_embeddings", source, int),
        attention_bias=bool(text.get("attention_bias", False)),
        final_logit_softcapping=_optional_cap(text, "final_logit_softcapping", source),
        attn_logit_softcapping=_optional_cap(text, "attn_logit_softcapping", source),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", True)),
        architecture=architecture,
        defaulted=tuple(name for name in _SIZES if name not in text),
    )
