"""Config reading: transformers 4.x and 5.x files, both architectures, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import FULL, SLIDING, hard_text_config_kwargs, to_v4_config
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


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "vocab_size"])
def test_missing_required_field_is_named(field):
    raw = v5_text()
    del raw[field]
    with pytest.raises(GemmaOnnxError, match=f"missing required field '{field}'"):
        Gemma3Config.from_dict(raw)


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
