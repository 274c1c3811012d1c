"""`gemma-onnx generate` on real Gemma 3 270M: HF transformers' greedy continuation, printed by
the CLI, for the default model (assembled, imported and built on first use) and for an
ORT-target build, on short prompts and a 1180-token one; seeded sampling repeats."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gemma_onnx.cli import main

pytestmark = pytest.mark.slow

SHORT_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a"]


@pytest.fixture(scope="module")
def default_model(tmp_path_factory, monkeypatch_module):
    """The default model in an empty GEMMA_ONNX_HOME, made on first use by the CLI itself."""
    home = tmp_path_factory.mktemp("gemma_onnx_home")
    monkeypatch_module.setenv("GEMMA_ONNX_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def ort_build(real_ort_dir):
    return real_ort_dir


def hf_continuation(oracle, prompt_ids: list[int], new_tokens: int) -> str:
    model, tokenizer = oracle
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=int),
            max_new_tokens=new_tokens, do_sample=False,
        )  # fmt: skip
    return tokenizer.decode(out[0, len(prompt_ids) :], skip_special_tokens=True)


def generate(*args: str) -> str:
    result = CliRunner().invoke(main, ["generate", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def long_prompt(tokenizer, length: int) -> str:
    """Natural prose from the standard library's docs, cut to ``length`` tokens (with BOS)."""
    text = "\n\n".join([argparse.__doc__, json.__doc__, np.__doc__ or "", torch.__doc__ or ""] * 4)
    ids = tokenizer(text).input_ids[:length]
    assert len(ids) == length
    return tokenizer.decode(ids[1:])


def test_default_model_first_use_prints_hf_greedy(default_model, real_gguf_oracle):
    _, tokenizer = real_gguf_oracle
    out = generate("--temperature", "0", "--max-new-tokens", "24", SHORT_PROMPTS[0])
    ids = tokenizer(SHORT_PROMPTS[0]).input_ids
    assert out == hf_continuation(real_gguf_oracle, ids, 24) + "\n"
    built = default_model / "gemma-3-270m-q4_k_m" / "onnx"
    assert (built / "model.onnx").is_file()
    assert sorted(p.name for p in built.parent.iterdir()) == ["gguf", "onnx"]  # no HF copy
    # A second run reuses the cache: nothing is rebuilt.
    stamp = (built / "model.onnx").stat().st_mtime_ns
    assert generate("--temperature", "0", "--max-new-tokens", "4", "Hello") is not None
    assert (built / "model.onnx").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("prompt", SHORT_PROMPTS[1:])
def test_cli_greedy_equals_hf_on_short_prompts(ort_build, real_gguf_oracle, prompt):
    _, tokenizer = real_gguf_oracle
    out = generate("--model", str(ort_build), "--temperature", "0", "--max-new-tokens", "48",
                   prompt)  # fmt: skip
    expected = hf_continuation(real_gguf_oracle, tokenizer(prompt).input_ids, 48)
    assert out == expected + "\n"  # the CLI ends the stream with one newline


def test_cli_greedy_equals_hf_on_a_1180_token_prompt(ort_build, real_gguf_oracle):
    _, tokenizer = real_gguf_oracle
    prompt = long_prompt(tokenizer, 1180)
    ids = tokenizer(prompt).input_ids
    assert len(ids) > 1100
    out = generate("--model", str(ort_build), "--temperature", "0", "--max-new-tokens", "48",
                   prompt)  # fmt: skip
    assert out == hf_continuation(real_gguf_oracle, ids, 48) + "\n"


def test_seeded_sampling_repeats_and_another_seed_differs(ort_build):
    prompt = "Write a short story about a robot:"
    args = ["--model", str(ort_build), "--temperature", "0.8", "--top-p", "0.95",
            "--max-new-tokens", "32", "--ignore-eos", prompt]  # fmt: skip
    first = generate(*args, "--seed", "7")
    assert generate(*args, "--seed", "7") == first
    assert generate(*args, "--seed", "8") != first
