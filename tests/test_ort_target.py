"""The ORT target (--target ort) and quantized builds against HF transformers on tiny checkpoints.

The ORT target lowers our functions to ONNX Runtime's fused kernels (GroupQueryAttention with
shared KV buffers, SkipSimplifiedLayerNormalization, MatMulNBits...), so it is checked through
our runtime, which binds those buffers, and directly through IO binding.
"""

from __future__ import annotations

import importlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import (
    assert_close,
    contract_feed,
    make_causal_lm,
    make_conditional_generation,
    ort_session,
    shared_kv_feed,
)
from gemma_onnx.api import Gemma
from gemma_onnx.builder import build_model, quantize
from gemma_onnx.builder.quantize import QuantConfig, dequantize_nbits, int8_rows, matmul_nbits
from gemma_onnx.errors import GemmaOnnxError
from gemma_onnx.runtime.session import DeviceBuffer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny checkpoint whose sizes are multiples of the quantization block (32)."""
    folder = tmp_path_factory.mktemp("ort_ckpt")
    oracle = make_causal_lm(folder, seed=7, hidden_size=64, intermediate_size=128, head_dim=32)
    return folder, oracle


@pytest.fixture(scope="module")
def ort_build(checkpoint, tmp_path_factory):
    return build_model(checkpoint[0], tmp_path_factory.mktemp("ort") / "m", target="ort")


def hf_greedy(oracle, prompt: list[int], new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = oracle.generate(
            torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def shared_kv_logits(folder, ids: np.ndarray, max_length: int) -> np.ndarray:
    """All-position logits through the ORT target's I/O: KV buffers of max length."""
    session = ort_session(folder)
    return session.run(["logits"], shared_kv_feed(session, ids, max_length))[0]


def target_logits(folder, ids: np.ndarray, target: str) -> np.ndarray:
    """All-position logits of a build through its target's I/O contract."""
    if target == "ort":
        return shared_kv_logits(folder, ids, 32)
    session = ort_session(folder)
    return session.run(["logits"], contract_feed(session, ids))[0]


def test_ort_target_logits_match_hf(checkpoint, ort_build):
    _, oracle = checkpoint
    ids = np.random.default_rng(0).integers(3, 320, size=(1, 17))  # > sliding window 5
    with torch.no_grad():
        expected = oracle(torch.from_numpy(ids)).logits.numpy()
    assert_close(shared_kv_logits(ort_build, ids, 32), expected, "tiny_fp32_logits")


def test_ort_target_greedy_batch_and_rows_equal_hf(checkpoint, ort_build):
    """Right-padded rows of different lengths: each equals HF greedy alone, batched or not."""
    _, oracle = checkpoint
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 320, size=n).tolist() for n in (13, 6, 9)]
    gemma = Gemma(ort_build)
    assert gemma.session.shared_kv
    expected = [hf_greedy(oracle, p, 16) for p in prompts]
    assert [gemma.generate(p, max_new_tokens=16, ignore_eos=True).token_ids for p in prompts] == (
        expected
    )
    batch = gemma.generate(prompts, max_new_tokens=16, ignore_eos=True)
    assert [row.token_ids for row in batch] == expected


def test_shared_kv_buffers_are_bound_once_per_row_range(checkpoint, ort_build, monkeypatch):
    """Decode steps rebind only the token inputs and logits; the KV bindings persist, and are
    redone only when the rows run change (per-row prefill, then the batch), with HF's tokens."""
    _, oracle = checkpoint
    binds = []
    real_bind = DeviceBuffer.bind_input

    def counting_bind(self, binding, name, shape, offset=0):
        binds.append((name, tuple(shape), offset))
        real_bind(self, binding, name, shape, offset)

    monkeypatch.setattr(DeviceBuffer, "bind_input", counting_bind)
    gemma = Gemma(ort_build)
    kv_tensors = len(gemma.session.kv_names)
    prompt = np.random.default_rng(2).integers(3, 320, size=9).tolist()
    assert gemma.generate(prompt, max_new_tokens=12, ignore_eos=True).token_ids == hf_greedy(
        oracle, prompt, 12
    )
    assert len(binds) == kv_tensors  # 1 prefill + 11 decode steps, bound once
    binds.clear()
    batch = gemma.generate([prompt, prompt[:5]], max_new_tokens=12, ignore_eos=True)
    assert [row.token_ids for row in batch] == [
        hf_greedy(oracle, p, 12) for p in (prompt, prompt[:5])
    ]
    # A new two-row state: one-row prefills of rows 0 and 1, then the two-row decode (11 steps)
    ranges = [(shape[0], offset) for _, shape, offset in binds[::kv_tensors]]
    assert len(binds) == 3 * kv_tensors and [rows for rows, _ in ranges] == [1, 1, 2], ranges


def test_chunked_prefill_equals_hf(checkpoint, ort_build, monkeypatch):
    """On the CPU a prompt runs in chunks of PREFILL_CHUNK tokens, each attending to the KV the
    earlier ones wrote: chunks of 4 across a sliding window of 5 still give HF's tokens. Only a
    prompt's last chunk runs the LM head: the others bind an empty logits output."""
    _, oracle = checkpoint
    generate_module = importlib.import_module("gemma_onnx.runtime.generate")
    monkeypatch.setattr(generate_module, "PREFILL_CHUNK", 4)
    logits_rows = []
    real_run = ort.InferenceSession.run_with_iobinding

    def recording_run(self, binding, *args):
        real_run(self, binding, *args)
        names = [o.name for o in self.get_outputs()]
        logits_rows.append(binding.get_outputs()[names.index("logits")].shape()[1])

    monkeypatch.setattr(ort.InferenceSession, "run_with_iobinding", recording_run)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 320, size=n).tolist() for n in (13, 4, 9)]
    gemma = Gemma(ort_build)
    batch = gemma.generate(prompts, max_new_tokens=8, ignore_eos=True)
    assert [row.token_ids for row in batch] == [hf_greedy(oracle, p, 8) for p in prompts]
    # Chunks of 13, 4 and 9 tokens: 4+4+4+1, 4, 4+4+1; then 7 one-token steps of the batch.
    assert logits_rows == [0, 0, 0, 1] + [1] + [0, 0, 1] + [1] * 7


@pytest.mark.parametrize("target", ["ort", "portable"])
def test_negative_logits_to_keep_drops_leading_positions(checkpoint, ort_build, tmp_path, target):
    """logits_to_keep -n leaves out the first n positions' logits (HF's 0 still keeps all), so
    -S or less yields none: how the runtime skips the LM head of a prompt's earlier chunks."""
    folder = ort_build if target == "ort" else build_model(checkpoint[0], tmp_path / "m")
    session = ort_session(folder)
    ids = np.random.default_rng(6).integers(3, 320, size=(1, 6))
    feed = shared_kv_feed(session, ids, 32) if target == "ort" else contract_feed(session, ids)
    every = session.run(["logits"], {**feed, "logits_to_keep": np.array(0, np.int64)})[0]
    assert every.shape[1] == 6
    for keep, first in ((-2, 2), (-6, 6), (-(2**62), 6), (3, 3)):
        kept = session.run(["logits"], {**feed, "logits_to_keep": np.array(keep, np.int64)})[0]
        assert kept.shape == (1, 6 - first, every.shape[2])
        np.testing.assert_allclose(kept, every[:, first:], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("precision", "quant"),
    [("int4", QuantConfig(bits=4, rescore_top=0)), ("int8", None)],  # int8: rescoring reads it too
)
def test_quantized_lookup_reads_the_lm_head_bytes_under_its_own_name(
    checkpoint, tmp_path, precision, quant
):
    """Where the table is the LM head's own (no 8-bit copy for rescoring beside a 4-bit head),
    each GatherBlockQuantized gets its own initializer over the LM head's packed table: same
    external bytes (stored once), no Reshape, so ORT maps them apart and can release the LM
    head's copy after prepacking it."""
    out = build_model(checkpoint[0], tmp_path / "q", target="ort", precision=precision,
                      quant=quant)  # fmt: skip
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    initializers = {t.name: t for t in model.graph.initializer}
    gathers = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gathers) == (1 if precision == "int4" else 2)
    head = next(n for n in model.graph.node if n.name == "lm_head")
    packed = initializers[head.input[1]]

    def location(tensor):
        return {e.key: e.value for e in tensor.external_data}

    for gather in gathers:
        rows = initializers[gather.input[0]]
        assert rows.name != packed.name
        assert list(rows.dims) == [packed.dims[0], packed.dims[1] * packed.dims[2]]
        assert location(rows) and location(rows) == location(packed)
    ends = [int(location(t)["offset"]) + int(location(t)["length"]) for t in initializers.values()
            if location(t)]  # fmt: skip
    assert (out / "model.onnx_data").stat().st_size == max(ends)
    assert not [n for n in model.graph.node if n.op_type == "Reshape" and packed.name in n.input]


def test_float_tied_table_is_one_unpacked_copy(ort_build):
    """Prepacking is on (packed float weights decode faster), so the table that the lookup and
    the LM head share is an overridable initializer: ORT may not prepack or fold it into a
    second copy. The runtime leaves it unbound and gets the stored table (HF's tokens)."""
    model = onnx.load(str(ort_build / "model.onnx"), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["gemma_onnx.session_config"])["session.disable_prepacking"] == "0"
    session = Gemma(ort_build).session.session
    vocab_sized = [i.name for i in session.get_overridable_initializers() if 320 in i.shape]
    assert vocab_sized == ["model.embed_tokens.weight_t"]
    assert "model.embed_tokens.weight_t" not in {i.name for i in session.get_inputs()}


def test_ort_target_uses_fused_kernels(ort_build):
    model = onnx.load(str(ort_build / "model.onnx"), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "FastGelu"} <= ops
    concatenated = [o for n in model.graph.node if n.op_type == "Concat" for o in n.output]
    assert not [o for o in concatenated if o.startswith("present.")], "KV is written in place"
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["gemma_onnx.kv_cache"] == "shared"
    # The LM head's MatMul writes the [B, S', V] logits itself: no Reshape copies them into the
    # bound output buffer each step (the portable target's Gemm needs 2-D rows and one).
    (head,) = [n for n in model.graph.node if "logits" in n.output]
    assert head.op_type == "MatMul"


def test_matmul_nbits_packing_roundtrips():
    """Our reading of onnxruntime's quantizer layout (used to share the tied table) is right:
    dequantizing the packed parts gives back the weight to within half a step per block."""
    rng = np.random.default_rng(2)
    weight = rng.normal(size=(64, 48)).astype(np.float32)  # [K, N]
    for config in (QuantConfig(bits=4), QuantConfig(bits=8), QuantConfig(bits=4, symmetric=True)):
        parts = matmul_nbits(weight, config)
        table = dequantize_nbits(parts, config)  # [N, K]
        step = np.abs(parts["scales"]).repeat(config.block_size, axis=1)  # symmetric: may be < 0
        # Rounding costs half a step; symmetric 4 bits also clip the far side at +7 of [-8, 7].
        bound = 1.0 if config.symmetric and config.bits == 4 else 0.5
        assert np.all(np.abs(table - weight.T) <= step * bound + 1e-6), config


@pytest.mark.parametrize(
    ("precision", "target"),
    [("int4", "ort"), ("int8", "ort"), ("int4", "portable"), ("int8", "portable")],
)
def test_quantized_builds_run_and_agree(checkpoint, tmp_path, precision, target):
    """Each quantized build runs through its I/O (plain ORT, optimizations off, for the portable
    one) and follows HF's fp32 logits closely enough that most top-1 tokens agree."""
    folder, oracle = checkpoint
    out = build_model(folder, tmp_path / "q", target=target, precision=precision)
    if target == "portable":  # standard ONNX (the ORT target uses ORT's own operators)
        onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    ids = np.random.default_rng(3).integers(3, 320, size=(1, 24))
    with torch.no_grad():
        expected = oracle(torch.from_numpy(ids)).logits.numpy()
    logits = target_logits(out, ids, target)
    agreement = (logits.argmax(-1) == expected.argmax(-1)).mean()
    # Random tiny weights have no outliers to protect: 8 bits keep nearly every token, 4 bits
    # most. Real-model agreement is measured by the build itself (quality.json).
    assert agreement >= (0.9 if precision == "int8" else 0.6), agreement
    assert np.isfinite(logits).all()


@pytest.mark.parametrize("target", ["portable", "ort"])
def test_untied_lm_head(tmp_path, target):
    """A fine-tune that unties the head (its own lm_head.weight, tie_word_embeddings false):
    fp32 builds multiply by that matrix, not the embedding (HF's logits within 1e-4), and int4
    builds quantize it on its own."""
    oracle = make_causal_lm(
        tmp_path / "hf", seed=11, hidden_size=64, intermediate_size=128, head_dim=32,
        tie_word_embeddings=False,
    )  # fmt: skip
    weights = oracle.state_dict()
    assert not torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    ids = np.random.default_rng(5).integers(3, 320, size=(1, 17))
    with torch.no_grad():
        expected = oracle(torch.from_numpy(ids)).logits.numpy()
    for precision in ("fp32", "int4"):
        out = build_model(tmp_path / "hf", tmp_path / precision, target=target, precision=precision)
        logits = target_logits(out, ids, target)
        if precision == "fp32":
            assert_close(logits, expected, "tiny_fp32_logits")
        else:  # the bound test_quantized_builds_run_and_agree holds int4 to
            assert (logits.argmax(-1) == expected.argmax(-1)).mean() >= 0.6


@pytest.mark.parametrize("target", ["portable", "ort"])
def test_head_of_its_own_under_a_tied_flag(tmp_path, target):
    """Checkpoints with a head of their own that a tied flag seems to deny, as transformers 5
    reads them:
    - an untied ConditionalGeneration saved by transformers 5: the outer config says untied,
      its text_config says tied, and transformers 5 goes by the outer flag;
    - a CausalLM that stores its own head under a config left tied: transformers 5 keeps the
      stored head, since it differs from the embedding.
    Both build to HF's logits, and the output config.json says untied, for other runtimes."""
    ids = np.random.default_rng(8).integers(3, 320, size=(1, 17))
    conditional = make_conditional_generation(tmp_path / "cond", seed=14, untied=True)
    raw = json.loads((tmp_path / "cond" / "config.json").read_text())
    causal = make_causal_lm(tmp_path / "causal", seed=15, tie_word_embeddings=False)
    raw_causal = json.loads((tmp_path / "causal" / "config.json").read_text())
    raw_causal["tie_word_embeddings"] = True
    (tmp_path / "causal" / "config.json").write_text(json.dumps(raw_causal))
    reload = {"dtype": torch.float32, "attn_implementation": "eager"}
    causal = type(causal).from_pretrained(tmp_path / "causal", **reload).eval()
    for name, oracle in (("cond", conditional), ("causal", causal)):
        weights = oracle.state_dict()
        embedding = next(v for k, v in weights.items() if k.endswith("embed_tokens.weight"))
        assert not torch.equal(oracle.lm_head.weight, embedding), name  # HF kept the head
        with torch.no_grad():
            expected = oracle(torch.from_numpy(ids)).logits.numpy()
        out = build_model(tmp_path / name, tmp_path / f"{name}-out", target=target)
        assert_close(target_logits(out, ids, target), expected, "tiny_fp32_logits")
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert raw["tie_word_embeddings"] is False  # the case as transformers 5 saves it
    assert raw["text_config"].get("tie_word_embeddings", True) is True


def test_head_stored_equal_to_the_embedding_stays_tied(tmp_path):
    """A tied checkpoint that stores the head anyway, equal to the embedding (as converters
    from .bin files write them), builds tied: one table, HF's logits."""
    oracle = make_causal_lm(tmp_path / "hf", seed=16)
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(path)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, path, metadata={"format": "pt"})
    ids = np.random.default_rng(9).integers(3, 320, size=(1, 17))
    with torch.no_grad():
        expected = oracle(torch.from_numpy(ids)).logits.numpy()
    out = build_model(tmp_path / "hf", tmp_path / "out", target="ort")
    assert_close(target_logits(out, ids, "ort"), expected, "tiny_fp32_logits")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    tables = [i for i in onnx.load(out / "model.onnx", load_external_data=False).graph.initializer
              if 320 in i.dims and 64 in i.dims]  # fmt: skip
    assert len(tables) == 1, [t.name for t in tables]


def test_ort_target_needs_head_dim_a_multiple_of_8(tmp_path):
    """ONNX Runtime's GroupQueryAttention takes head sizes in multiples of 8: the ort target
    refuses others at build time, naming the portable target, rather than failing at the first
    run (every published Gemma 3 has 256)."""
    make_causal_lm(tmp_path / "hf", seed=17, head_dim=20)
    with pytest.raises(GemmaOnnxError, match="head_dim 20.*multiple of 8.*--target portable"):
        build_model(tmp_path / "hf", tmp_path / "out", target="ort")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["portable", "ort"])
def test_sizes_left_to_transformers_defaults(tmp_path, target):
    """The published gemma-3-4b-it config.json leaves vocab_size, the head counts and head_dim
    to Gemma3TextConfig's defaults (262208, 8, 4, 256). A checkpoint with those sizes and a config
    written that way builds to HF's logits, and the output config.json spells them out: runtimes
    other than transformers (genai, transformers.js) do not know the defaults."""
    defaults = {"vocab_size": 262_208, "num_attention_heads": 8, "num_key_value_heads": 4}
    defaults["head_dim"] = 256
    oracle = make_conditional_generation(tmp_path / "hf", seed=12, **defaults)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for name in defaults:
        del config["text_config"][name]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    ids = np.random.default_rng(6).integers(3, 320, size=(1, 17))
    with torch.no_grad():
        expected = oracle(torch.from_numpy(ids)).logits.numpy()
    out = build_model(tmp_path / "hf", tmp_path / "out", target=target)
    assert_close(target_logits(out, ids, target), expected, "tiny_fp32_logits")
    written = json.loads((out / "config.json").read_text())
    assert {name: written.get(name) for name in defaults} == defaults
    if target == "portable":
        decoder = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
        assert (decoder["num_attention_heads"], decoder["num_key_value_heads"]) == (8, 4)
        assert decoder["head_size"] == 256


def _config(folder):
    from gemma_onnx.builder.config import Gemma3Config

    return Gemma3Config.from_file(folder / "config.json")


def _quantized_node_attribute(folder, attribute="bits") -> dict[str, int]:
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return {
        n.name: next(a.i for a in n.attribute if a.name == attribute)
        for n in model.graph.node
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized")
    }


def test_int4_keeps_the_table_at_4_bits_and_the_layers_at_8(checkpoint, tmp_path):
    """int4's default on the ORT target (QuantConfig.layer_bits): the LM head at 4 bits, the
    layers' projections at 8, which follows HF's fp32 logits more closely than 4-bit layers
    do; --layer-bits 4 quantizes the layers to 4 bits too. The lookup and the rescoring read
    the 8-bit copy of the table."""
    folder, oracle = checkpoint
    ids = np.random.default_rng(5).integers(3, 320, size=(1, 24))
    with torch.no_grad():
        expected = oracle(torch.from_numpy(ids)).logits.numpy()
    errors = {}
    for layer_bits in (None, 4):
        quant = QuantConfig(bits=4, layer_bits=layer_bits)
        out = build_model(folder, tmp_path / f"q{layer_bits}", target="ort", precision="int4",
                          quant=quant)  # fmt: skip
        bits = _quantized_node_attribute(out)
        table = {n: bits.pop(n) for n in ("model.embed_tokens", "lm_head", "lm_head.rescore_rows")}
        assert table == {"model.embed_tokens": 8, "lm_head": 4, "lm_head.rescore_rows": 8}
        assert bits and set(bits.values()) == {layer_bits or 8}, bits
        errors[layer_bits] = np.abs(shared_kv_logits(out, ids, 32) - expected).mean()
    assert errors[None] < errors[4], errors


def test_rescoring_recomputes_the_top_logits_from_8_bit_rows(checkpoint, tmp_path):
    """QuantConfig.rescore_top K: the 4-bit LM head only ranks, and each position's K highest
    logits are recomputed in float32 from the 8-bit table. With K = the vocabulary every logit
    is, and the head's 4-bit error is gone against HF's fp32 logits; with K = 8 exactly 8 per
    position are those values (the rest keep the 4-bit scores), the argmax among them."""
    folder, oracle = checkpoint
    ids = np.random.default_rng(8).integers(3, 320, size=(1, 24))
    with torch.no_grad():
        expected = oracle(torch.from_numpy(ids)).logits.numpy()[0]  # [T, V]
    logits = {}
    for top in (0, 8, 320):
        out = build_model(folder, tmp_path / f"r{top}", target="ort", precision="int4",
                          quant=QuantConfig(bits=4, rescore_top=top))  # fmt: skip
        logits[top] = shared_kv_logits(out, ids, 32)[0]
    error = {top: np.abs(values - expected).mean() for top, values in logits.items()}
    assert error[320] < 0.25 * error[0], error  # measured 0.15x; 0.41x with the lookup alone
    same = np.abs(logits[8] - logits[320]) <= 1e-5  # [T, V]
    # A zero row (the pad token's) scores 0 either way, rescored or not.
    table = oracle.state_dict()["model.embed_tokens.weight"].numpy()
    zero_rows = int((np.abs(table).max(-1) == 0).sum())
    assert ((same.sum(-1) >= 8) & (same.sum(-1) <= 8 + zero_rows)).all(), same.sum(-1)
    assert same[np.arange(len(same)), logits[8].argmax(-1)].all()
    agreement = {top: (v.argmax(-1) == expected.argmax(-1)).mean() for top, v in logits.items()}
    assert agreement[8] >= agreement[0] and agreement[8] >= 0.9, agreement


def test_int4_generation_follows_its_own_teacher_forced_argmax(checkpoint, tmp_path):
    """The rescored int4 build through the runtime (chunked prefill, then one token a step,
    rows alone or batched) picks what the same graph's one-pass logits over every position
    say: rescoring gives the same result whichever positions a call keeps."""
    folder, _ = checkpoint
    out = build_model(folder, tmp_path / "q", target="ort", precision="int4")
    gemma = Gemma(out)
    rng = np.random.default_rng(9)
    prompts = [rng.integers(3, 320, size=n).tolist() for n in (13, 6, 9)]
    solo = [gemma.generate(p, max_new_tokens=12, ignore_eos=True).token_ids for p in prompts]
    for prompt, tokens in zip(prompts, solo, strict=True):
        logits = shared_kv_logits(out, np.array([prompt + tokens[:-1]]), 32)[0]  # [T, V]
        assert logits[len(prompt) - 1 :].argmax(-1).tolist() == tokens
    batch = gemma.generate(prompts, max_new_tokens=12, ignore_eos=True)
    assert [row.token_ids for row in batch] == solo


def test_a_ranking_head_takes_coarser_blocks(checkpoint, tmp_path):
    """A rescored 4-bit LM head only ranks and shares its bytes with nothing, so it is quantized
    in blocks of up to RANKING_BLOCK_SIZE (capped by the hidden size: 64 here); the layers and
    the 8-bit table keep --block-size. Unrescored, the head is the lookup's table and keeps it."""
    folder, _ = checkpoint
    for top, head_block in ((8, 64), (0, 32)):
        out = build_model(folder, tmp_path / f"r{top}", target="ort", precision="int4",
                          quant=QuantConfig(bits=4, rescore_top=top))  # fmt: skip
        blocks = _quantized_node_attribute(out, "block_size")
        assert blocks.pop("lm_head") == head_block
        assert blocks and set(blocks.values()) == {32}, blocks


@pytest.mark.parametrize(
    ("quant", "target", "hidden", "block"),
    [
        (QuantConfig(bits=4), "ort", 640, 128),  # Gemma 3 270M
        (QuantConfig(bits=4), "ort", 1152, 128),  # 1B: 9 x 128
        (QuantConfig(bits=4), "ort", 96, 32),  # 3 x 32: no coarser power of two divides it
        (QuantConfig(bits=4, block_size=256), "ort", 2560, 256),  # never finer than asked
        (QuantConfig(bits=4, rescore_top=0), "ort", 640, 32),  # the lookup's table too
        (QuantConfig(bits=8), "ort", 640, 32),  # int8 rescores from the head's own table
        (QuantConfig(bits=4), "portable", 640, 32),  # no rescoring there
    ],
)  # fmt: skip
def test_head_block_size_by_role(quant, target, hidden, block):
    assert quant.head_quant(target, hidden).block_size == block
    described = quant.describe(target, hidden)["lm_head_block_size"]
    assert described == (block if target == "ort" else None)


def test_rescoring_options_are_checked(checkpoint, tmp_path):
    """rescore_top is a count in [0, 4096] and an ORT-target option (the portable head is
    float); neither mistake leaves an output folder behind."""
    with pytest.raises(GemmaOnnxError, match="--rescore-top must be from 0 to 4096"):
        QuantConfig(rescore_top=-1)
    with pytest.raises(GemmaOnnxError, match="must be an integer"):
        QuantConfig(rescore_top=2.5)
    with pytest.raises(GemmaOnnxError, match="--rescore-top applies to --target ort"):
        build_model(checkpoint[0], tmp_path / "p", precision="int4",
                    quant=QuantConfig(rescore_top=16))  # fmt: skip
    assert not (tmp_path / "p").exists()


def test_int8_rows_keep_a_q8_0_grid_exactly(monkeypatch):
    """The 8-bit copy rescoring reads: symmetric, scale max|w| / 127 per block (llama.cpp's
    Q8_0), so a table already on that grid comes back exactly, and any other within half a
    step; onnxruntime's 8-bit quantizer (scale / 128) clips such a table's extreme values."""
    rng = np.random.default_rng(4)
    config = QuantConfig(bits=8)
    # Q8_0 keeps its steps in float16: 127 * step, and back, are exact in float32.
    steps = rng.uniform(0.01, 0.1, size=(48, 2, 1)).astype(np.float16).astype(np.float32)
    grid = rng.integers(-127, 128, size=(48, 2, 32)).astype(np.float32)
    grid[:, :, 0] = 127  # every block reaches its extreme: the scale is the step
    grid[:, :, 1] = -127
    table = (grid * steps).reshape(48, 64)  # [N, K]

    def table_of(parts):  # GatherBlockQuantized's rows, as MatMulNBits' [N, K / 32, 32]
        return dequantize_nbits({**parts, "packed": parts["packed"].reshape(48, 2, 32)}, config)

    parts = int8_rows(table, config)
    assert parts["packed"].dtype == np.uint8 and parts["packed"].shape == (48, 64)
    np.testing.assert_array_equal(table_of(parts), table)
    noise = rng.normal(size=(48, 64)).astype(np.float32)
    parts = int8_rows(noise, config)
    step = parts["scales"].repeat(32, axis=1)
    assert np.all(np.abs(table_of(parts) - noise) <= step * 0.5 + 1e-7)
    assert np.abs(dequantize_nbits(matmul_nbits(table.T, config), config) - table).max() > 0
    # Quantized in chunks of rows (bounded float temporaries): the same bytes as all at once.
    monkeypatch.setattr(quantize, "_ROWS_PER_CHUNK", 7)
    chunked = int8_rows(noise, config)
    assert all(np.array_equal(chunked[key], parts[key]) for key in ("packed", "scales"))


def test_portable_int4_layer_bits(checkpoint, tmp_path):
    """The portable target keeps the table float, so --precision sets its layers' width unless
    --layer-bits says otherwise."""
    folder, _ = checkpoint
    for layer_bits, dtypes in ((None, {onnx.TensorProto.UINT4}), (8, {onnx.TensorProto.INT8})):
        quant = QuantConfig(bits=4, layer_bits=layer_bits)
        out = build_model(folder, tmp_path / f"p{layer_bits}", precision="int4", quant=quant)
        model = onnx.load(str(out / "model.onnx"), load_external_data=False)
        found = {t.data_type for t in model.graph.initializer if t.name.endswith(".quantized")}
        assert found == dtypes, (layer_bits, found)


def _with_word_tokenizer(folder, tmp_path):
    """The checkpoint in a folder of links beside a word-level tokenizer over its vocabulary,
    so a quantized build can read the held-out text."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    source = tmp_path / "src"
    source.mkdir()
    for item in folder.iterdir():
        (source / item.name).symlink_to(item)
    vocab = {f"w{i}": i for i in range(320)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(source / "tokenizer.json"))
    return source


@pytest.mark.parametrize(
    ("target", "quantization"),
    [
        ("ort", {"lm_head_bits": 4, "lm_head_block_size": 64, "embedding_bits": 8,
                 "rescore_top": 64, "layer_bits": 8, "block_size": 32, "accuracy_level": 4}),
        # the portable graph's KV grows (past + new): measured through its own I/O
        ("portable", {"lm_head_bits": None, "lm_head_block_size": None, "embedding_bits": None,
                      "rescore_top": 0, "layer_bits": 4, "block_size": 32,
                      "accuracy_level": None}),
    ],
)  # fmt: skip
def test_quantized_build_reports_measured_quality(checkpoint, tmp_path, target, quantization):
    """quality.json's agreement and KL are what HF fp32 and the quantized graph, run here over
    the same held-out ids in one step, give (its own reference is our fp32 build, which matches
    HF to ~1e-5: at most one near-tie may flip)."""
    from gemma_onnx.builder.report import heldout_ids

    folder, oracle = checkpoint
    source = _with_word_tokenizer(folder, tmp_path)
    out = build_model(source, tmp_path / "q", target=target, precision="int4")
    report = json.loads((out / "quality.json").read_text())
    assert report["quantization"] == quantization
    assert not (out / ".fp32-reference").exists()

    ids = heldout_ids(source / "tokenizer.json", oracle.config.vocab_size)
    assert report["tokens"] == ids.shape[1] > 100
    session = ort_session(out, optimize=True)
    feed = (
        shared_kv_feed(session, ids, ids.shape[1])
        if target == "ort"
        else contract_feed(session, ids)
    )
    actual = torch.from_numpy(session.run(["logits"], feed)[0][0]).double()
    with torch.no_grad():
        expected = oracle(torch.from_numpy(ids)).logits[0].double()
    agree = (actual.argmax(-1) == expected.argmax(-1)).double().mean().item()
    kl = (
        torch.nn.functional.kl_div(
            actual.log_softmax(-1), expected.log_softmax(-1), log_target=True, reduction="sum"
        ).item()
        / ids.shape[1]
    )
    assert 0 < kl and report["mean_kl_nats"] == pytest.approx(kl, rel=1e-3, abs=1e-5)
    assert abs(report["top1_agreement"] - agree) <= 1 / ids.shape[1] + 1e-4, (report, agree)
    assert report["max_abs_logit_diff"] > 0


def test_build_cli_prints_the_measured_quality(checkpoint, tmp_path):
    from click.testing import CliRunner

    from gemma_onnx.cli import main

    source = _with_word_tokenizer(checkpoint[0], tmp_path)
    out = tmp_path / "q"
    args = ["build", "--weights", str(source), "--output", str(out), "--precision", "int4"]
    result = CliRunner().invoke(main, [*args, "--target", "ort"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "quality.json").read_text())
    line = next(x for x in result.output.splitlines() if x.startswith("quality: "))
    assert f"{report['top1_agreement']:.1%} over {report['tokens']} held-out tokens" in line
    assert f"mean KL {report['mean_kl_nats']} nats" in line


def test_quality_is_skipped_where_its_fp32_reference_would_not_fit(
    checkpoint, tmp_path, monkeypatch, capsys
):
    """The measurement builds an fp32 reference (4 bytes a parameter: 108 GB for Gemma 3 27B).
    By default a build skips it, saying why, when that would not fit the free disk or the
    measurement the memory; quality=True measures anyway and quality=False never does."""
    import shutil as shutil_module

    from gemma_onnx.builder import export

    source = _with_word_tokenizer(checkpoint[0], tmp_path)
    checkpoint_bytes = 4 * sum(
        np.prod(t.shape) for t in export.load_checkpoint(source, _config(source)).tensors.values()
    )
    real_usage = shutil_module.disk_usage
    free = checkpoint_bytes // 2  # the reference does not fit

    def disk_usage(path):
        return real_usage(path)._replace(free=free)

    monkeypatch.setattr(export.shutil, "disk_usage", disk_usage)
    out = build_model(source, tmp_path / "auto", target="ort", precision="int4", progress=True)
    assert not (out / "quality.json").exists()
    err = capsys.readouterr().err
    assert "quality: not measured (its fp32 reference would take" in err
    assert "GB free on disk; --quality measures anyway" in err
    out = build_model(source, tmp_path / "forced", target="ort", precision="int4", quality=True)
    assert json.loads((out / "quality.json").read_text())["tokens"] > 100
    monkeypatch.undo()
    out = build_model(source, tmp_path / "off", target="ort", precision="int4", quality=False,
                      progress=True)  # fmt: skip
    assert not (out / "quality.json").exists()
    assert "quality: not measured (--no-quality)" in capsys.readouterr().err
    # The measurement peaks at about twice the reference plus 1.5 GB (a 1B-shaped int8 build:
    # 9.3 GB for a 4.0 GB reference): a machine with more than twice the reference, but less
    # than that, skips it.
    memory = 2 * checkpoint_bytes + 10**9
    monkeypatch.setattr(export.os, "sysconf", lambda name: 1 if name == "SC_PAGE_SIZE" else memory)
    reason = export.quality_skip_reason(export.load_checkpoint(source, _config(source)),
                                        tmp_path, None)  # fmt: skip
    assert reason and "more than this machine's 1 GB; --quality measures anyway" in reason
    memory = 2 * checkpoint_bytes + 2 * 10**9
    assert export.quality_skip_reason(export.load_checkpoint(source, _config(source)),
                                      tmp_path, None) is None  # fmt: skip


def test_fp16_residual_stream_stays_float32(checkpoint, tmp_path):
    """fp16 builds keep the residual stream in float32 (real Gemma 3 270M's outgrows fp16's
    65,504): the layer outputs are float32 and the logits follow HF fp32 closely."""
    folder, oracle = checkpoint
    out = build_model(folder, tmp_path / "fp16", precision="fp16")
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    residual_adds = [n for n in model.graph.node if n.name.endswith(("_residual",))]
    assert residual_adds
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    assert all(types.get(n.output[0]) == onnx.TensorProto.FLOAT for n in residual_adds)
    session = ort_session(out)
    ids = np.random.default_rng(4).integers(3, 320, size=(1, 17))
    logits = session.run(["logits"], contract_feed(session, ids))[0]
    with torch.no_grad():
        expected = oracle(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(logits - expected).max() < 3e-2
