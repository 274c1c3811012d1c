"""Config reading: transformers 4.x and 5.x files, both architectures, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import DECODER_FIELDS, FULL, SLIDING, hard_text_config_kwargs, to_v4_config
from gemma_onnx.builder.config import Gemma3Config, RopeParams
from gemma_onnx.builder.graph import rope_inv_freq
from gemma_onnx.errors import GemmaOnnxError


def v5_text(**overrides) -> dict:
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(**hard_text_config_kwargs(**overrides)).to_dict()


def test_v4_and_v5_files_describe_the_same_decoder():
    v5 = v5_text()
    v4 = to_v4_config(v5, pattern=2)
    assert "layer_types" not in v4 and "rope_parameters" not in v4
    assert Gemma3Config.from_dict(v4) == Gemma3Config.from_dict(v5)


def test_fields_the_graph_depends_on():
    cfg = Gemma3Config.from_dict(v5_text())
    assert cfg.layer_types == (SLIDING, FULL, SLIDING, FULL)
    assert cfg.head_dim == 24 and cfg.hidden_size // cfg.num_attention_heads == 16
    assert cfg.attn_scale == pytest.approx(20**-0.5)
    # Linear scaling applies to global layers only.
    assert cfg.rope[SLIDING] == RopeParams(theta=50.0, factor=1.0)
    assert cfg.rope[FULL] == RopeParams(theta=1000.0, factor=4.0)


def test_v4_pattern_derives_layer_types_like_hf():
    """4.x: layer i is sliding iff (i + 1) % pattern != 0 (gemma-3: pattern 6)."""
    raw = to_v4_config(v5_text(num_hidden_layers=4, layer_types=[SLIDING, FULL, SLIDING, FULL]), 2)
    raw.update(num_hidden_layers=12, sliding_window_pattern=6)
    cfg = Gemma3Config.from_dict(raw)
    assert [i for i, t in enumerate(cfg.layer_types) if t == FULL] == [5, 11]


def test_conditional_generation_reads_text_config():
    raw = {
        "model_type": "gemma3",
        "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": v5_text(),
        "vision_config": {"model_type": "siglip_vision_model"},
        "tie_word_embeddings": True,
    }
    cfg = Gemma3Config.from_dict(raw)
    assert cfg.architecture == "Gemma3ForConditionalGeneration"
    assert cfg == Gemma3Config.from_dict(v5_text()).__class__(
        **{**Gemma3Config.from_dict(v5_text()).__dict__, "architecture": cfg.architecture}
    )


def test_inv_freq_matches_hf_rope_init():
    """Our float32 inv_freq (with linear scaling) equals HF's to one float32 ulp: HF's float32
    pow is not always correctly rounded, ours is (see rope_inv_freq)."""
    import torch
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    hf = Gemma3RotaryEmbedding(Gemma3TextConfig(**hard_text_config_kwargs()))
    cfg = Gemma3Config.from_dict(v5_text())
    for layer_type in (SLIDING, FULL):
        ours = rope_inv_freq(cfg.head_dim, cfg.rope[layer_type].theta, cfg.rope[layer_type].factor)
        theirs = getattr(hf, f"{layer_type}_inv_freq").to(torch.float32).numpy()
        np.testing.assert_allclose(ours, theirs, rtol=1.2e-7, atol=0, err_msg=layer_type)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
            "not a Gemma 3 model (model_type 'llama')",
        ),
        ({"model_type": "gemma3"}, "needs a 'text_config'"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_wrong_architecture_is_named(raw, message):
    with pytest.raises(GemmaOnnxError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Gemma3Config.from_dict(raw)


# The text_config of the published google/gemma-3-{4b,12b,27b}-it config.json files (the vision
# config is left out): each leaves some sizes to Gemma3TextConfig's defaults (4b: vocab_size, the
# head counts, head_dim; 12b: vocab_size, head_dim 256, although 3840 / 16 = 240).
_LINEAR_8 = {"rope_type": "linear", "factor": 8.0}
HUB_TEXT_CONFIGS = {
    "4b": {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34},
    "12b": {
        "hidden_size": 3840,
        "intermediate_size": 15360,
        "num_attention_heads": 16,
        "num_hidden_layers": 48,
        "num_key_value_heads": 8,
    },
    "27b": {
        "head_dim": 128,
        "hidden_size": 5376,
        "intermediate_size": 21504,
        "num_attention_heads": 32,
        "num_hidden_layers": 62,
        "num_key_value_heads": 16,
        "query_pre_attn_scalar": 168,
    },
}


@pytest.mark.parametrize("size", HUB_TEXT_CONFIGS)
def test_hub_configs_take_transformers_defaults_for_what_they_omit(size):
    from transformers import Gemma3Config as HFGemma3Config

    text = {
        **HUB_TEXT_CONFIGS[size],
        "model_type": "gemma3_text",
        "rope_scaling": dict(_LINEAR_8),
        "sliding_window": 1024,
    }
    raw = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3"}
    raw["text_config"] = text
    ours = Gemma3Config.from_dict(json.loads(json.dumps(raw)))
    hf = HFGemma3Config(**json.loads(json.dumps(raw))).text_config
    for name in DECODER_FIELDS:
        mine = getattr(ours, name)
        assert (list(mine) if name == "layer_types" else mine) == getattr(hf, name), name
    for layer_type, rope in ours.rope.items():
        expected = hf.rope_parameters[layer_type]
        assert rope.theta == expected["rope_theta"], layer_type
        assert rope.factor == expected.get("factor", 1.0), layer_type
    assert set(ours.defaulted) == {"vocab_size", "num_attention_heads", "num_key_value_heads",
                                   "head_dim"} - set(text)  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_key_value_heads": 3}, "must be a multiple"),
        ({"hidden_size": -4}, "must be positive"),
        ({"hidden_size": "64"}, "invalid value"),
        ({"layer_types": ["sliding_attention"]}, "must list 4 entries"),
        ({"layer_types": ["chunked", FULL, FULL, FULL]}, "unknown types"),
        ({"rope_parameters": {SLIDING: {"rope_type": "yarn"}, FULL: {}}}, "not supported"),
        ({"hidden_activation": "relu"}, "not supported"),
        ({"head_dim": 23}, "must be even"),
    ],
)
def test_invalid_values_are_named(change, message):
    raw = {**v5_text(), **change}
    with pytest.raises(GemmaOnnxError, match=message):
        Gemma3Config.from_dict(raw)


def test_unreadable_file(tmp_path):
    path = tmp_path / "config.json"
    with pytest.raises(GemmaOnnxError, match="config.json not found"):
        Gemma3Config.from_file(path)
    path.write_text("{not json")
    with pytest.raises(GemmaOnnxError, match="not a readable JSON config"):
        Gemma3Config.from_file(path)
    path.write_text(json.dumps(v5_text()))
    assert Gemma3Config.from_file(path).num_hidden_layers == 4
