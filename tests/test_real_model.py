"""Real Gemma 3 270M (from the PyPI GGUF, via transformers' GGUF loader) built by our builder and
held to HF transformers fp32: teacher-forced logits and greedy tokens past the 512-token window."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import assert_close, contract_feed, max_diff_report, ort_session, shared_kv_feed
from gemma_onnx.builder import build_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_onnx_dir(real_hf_dir, tmp_path_factory):
    folder = build_model(real_hf_dir, tmp_path_factory.mktemp("real_onnx") / "gemma-3-270m")
    yield folder
    shutil.rmtree(folder.parent, ignore_errors=True)  # 1 GB the other modules do not use


@pytest.fixture(scope="module")
def hf_model(real_hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        real_hf_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="module")
def tokenizer(real_hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_hf_dir)


def long_prompt_ids(tokenizer, length: int) -> np.ndarray:
    """Natural English prose from the standard library's own docs, cut to ``length`` tokens."""
    text = "\n\n".join([argparse.__doc__, json.__doc__, np.__doc__ or "", torch.__doc__ or ""] * 3)
    ids = tokenizer(text, return_tensors="np").input_ids[:, :length]
    assert ids.shape[1] == length, "the prompt text is too short"
    return ids.astype(np.int64)


def greedy_through_contract(session, ids: np.ndarray, new_tokens: int) -> list[int]:
    outputs = session.run(None, contract_feed(session, ids))
    past, tokens = outputs[1:], [int(outputs[0][0, -1].argmax())]
    for _ in range(new_tokens - 1):
        outputs = session.run(None, contract_feed(session, np.array([[tokens[-1]]]), past=past))
        past = outputs[1:]
        tokens.append(int(outputs[0][0, -1].argmax()))
    return tokens


def test_config_and_single_embedding_copy(real_onnx_dir):
    import onnx

    model = onnx.load(str(real_onnx_dir / "model.onnx"), load_external_data=False)
    vocab_sized = [t.name for t in model.graph.initializer if 262144 in t.dims]
    assert vocab_sized == ["model.embed_tokens.weight"]
    data_bytes = (real_onnx_dir / "model.onnx_data").stat().st_size
    assert data_bytes < 268_200_000 * 4, "the tied LM head must not be stored twice"


def test_teacher_forced_logits_match_hf(real_onnx_dir, hf_model, tokenizer):
    ids = long_prompt_ids(tokenizer, 600)
    session = ort_session(real_onnx_dir, optimize=True)
    logits = session.run(["logits"], contract_feed(session, ids))[0]
    with torch.no_grad():
        expected = hf_model(torch.from_numpy(ids)).logits.numpy()
    assert_close(logits, expected, "real_fp32_logits")
    agreement = (logits.argmax(-1) == expected.argmax(-1)).mean()
    assert agreement == 1.0, f"top-1 agreement {agreement:.4f}; {max_diff_report(logits, expected)}"


def test_ort_target_teacher_forced_logits_match_hf(real_ort_dir, hf_model, tokenizer):
    """The fused kernels (GQA with its sliding window, RotaryEmbedding, SkipSimplifiedLayerNorm)
    at the same limit as the portable graph, through max-length shared KV buffers."""
    ids = long_prompt_ids(tokenizer, 600)  # > the 512-token sliding window
    session = ort_session(real_ort_dir, optimize=True)
    logits = session.run(["logits"], shared_kv_feed(session, ids, 640))[0]
    with torch.no_grad():
        expected = hf_model(torch.from_numpy(ids)).logits.numpy()
    assert_close(logits, expected, "real_fp32_logits")
    agreement = (logits.argmax(-1) == expected.argmax(-1)).mean()
    assert agreement == 1.0, f"top-1 agreement {agreement:.4f}; {max_diff_report(logits, expected)}"


@pytest.mark.parametrize("length", [12, 700])  # 700 > the 512-token sliding window
def test_greedy_tokens_match_hf(real_onnx_dir, hf_model, tokenizer, length):
    ids = long_prompt_ids(tokenizer, length)
    new_tokens = 32
    with torch.no_grad():
        expected = hf_model.generate(
            torch.from_numpy(ids),
            attention_mask=torch.ones_like(torch.from_numpy(ids)),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
        )[0, length:].tolist()
    session = ort_session(real_onnx_dir, optimize=True)
    assert greedy_through_contract(session, ids, new_tokens) == expected


def test_int4_ort_target_agrees_with_hf_as_its_quality_report_says(
    real_hf_dir, hf_model, tokenizer, tmp_path
):
    """The int4 default (4-bit LM head rescored from its 8-bit table, 8-bit layers) on text it
    was not measured on: teacher-forced top-1 agreement with HF fp32 of at least 97%, the bound
    issue 5 sets (llama.cpp's Q4_K_M: 97.4%), and so does the build's own quality.json."""
    out = build_model(real_hf_dir, tmp_path / "int4", target="ort", precision="int4")
    report = json.loads((out / "quality.json").read_text())
    assert report["top1_agreement"] >= 0.97, report
    ids = long_prompt_ids(tokenizer, 600)
    session = ort_session(out, optimize=True)
    logits = session.run(["logits"], shared_kv_feed(session, ids, 640))[0]
    with torch.no_grad():
        expected = hf_model(torch.from_numpy(ids)).logits.numpy()
    agreement = (logits.argmax(-1) == expected.argmax(-1)).mean()
    assert agreement >= 0.97, f"top-1 agreement {agreement:.4f}"
