"""fp16 and bf16 builds: half-precision weights and activations, float32 norms/softmax/RoPE, as in
HF. Each is held to HF running the same checkpoint at the same precision."""

from __future__ import annotations

import copy
import json

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch

from conftest import contract_feed, max_diff_report, ort_session

# Why these bounds: fp16 keeps 11 significant bits, bf16 8, and the two implementations round
# at different points (fused vs unfused ops), so logits of magnitude ~5 differ by a few ulps.
FP16_LOGITS = 3e-2
BF16_LOGITS = 0.25


def hf_logits_at(oracle, ids: np.ndarray, dtype) -> np.ndarray:
    # A copy: casting the shared fp32 oracle down and back would round its weights for every
    # later test (the fp32 parity tests then fail when they run after this file).
    model = copy.deepcopy(oracle).to(dtype)
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.float().numpy()


def test_fp16_build_matches_hf_fp16(tiny_checkpoints, built_models):
    _, oracle = tiny_checkpoints("hard")
    folder = built_models("hard", "fp16")
    session = ort_session(folder)
    assert session.get_inputs()[3].type == "tensor(float16)"
    assert session.get_outputs()[0].type == "tensor(float)"  # logits stay float32
    ids = np.random.default_rng(0).integers(3, 320, size=(2, 17))
    logits = session.run(["logits"], contract_feed(session, ids))[0]
    expected = hf_logits_at(oracle, ids, torch.float16)
    diff = np.abs(logits - expected).max()
    assert diff <= FP16_LOGITS, max_diff_report(logits, expected)
    assert (logits.argmax(-1) == expected.argmax(-1)).mean() >= 0.97


def test_bf16_build_matches_hf_bf16_in_the_onnx_reference_runtime(tiny_checkpoints, built_models):
    """ORT's CPU provider has no bfloat16 kernels (bf16 is for CUDA), so this runs the graph in
    onnx's reference evaluator, which implements every standard op."""
    from onnx.reference import ReferenceEvaluator

    _, oracle = tiny_checkpoints("hard")
    folder = built_models("hard", "bf16")
    model = onnx.load(str(folder / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    ids = np.random.default_rng(0).integers(3, 320, size=(2, 17))
    feed = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "position_ids": np.broadcast_to(np.arange(17), (2, 17)).copy(),
    }
    for i in range(4):
        for kind in ("key", "value"):
            feed[f"past_key_values.{i}.{kind}"] = np.zeros((2, 2, 0, 24), dtype=ml_dtypes.bfloat16)
    logits = ReferenceEvaluator(model).run(["logits"], feed)[0]
    expected = hf_logits_at(oracle, ids, torch.bfloat16)
    assert logits.dtype == np.float32
    diff = np.abs(logits - expected).max()
    assert diff <= BF16_LOGITS, max_diff_report(logits, expected)
    # Greedy tokens agree wherever HF's own bf16 top-2 margin is wider than two bf16 ulps at
    # these magnitudes (2 * 2**-5 for logits in [4, 8)); below that the top two are rounding
    # ties (HF's bf16 logits tie exactly at some positions), and either pick is right.
    top2 = np.sort(expected, axis=-1)[..., -2:]
    decided = top2[..., 1] - top2[..., 0] > 2 * 2**-5
    assert decided.mean() >= 0.75, f"only {decided.sum()} of {decided.size} positions decided"
    assert (logits.argmax(-1) == expected.argmax(-1))[decided].all()


def test_fp16_ort_target_matches_hf_fp16(tiny_checkpoints, tmp_path):
    """--target ort at fp16: ORT's fused kernels in half precision, the residual stream, norms
    and RoPE in float32. Held to HF fp16 like the portable build, through the shared KV buffers
    directly and through our runtime's greedy loop."""
    from conftest import shared_kv_feed
    from gemma_onnx.api import Gemma
    from gemma_onnx.builder import build_model

    source, oracle = tiny_checkpoints("hard")
    folder = build_model(source, tmp_path / "ort-fp16", target="ort", precision="fp16")
    session = ort_session(folder)
    assert session.get_inputs()[3].type == "tensor(float16)"  # the KV cache
    assert (
        json.loads((folder / "config.json").read_text())["dtype"] == "float16"
    )  # not the source's
    ids = np.random.default_rng(0).integers(3, 320, size=(2, 17))
    logits = session.run(["logits"], shared_kv_feed(session, ids, 32))[0]
    expected = hf_logits_at(oracle, ids, torch.float16)
    assert np.abs(logits - expected).max() <= FP16_LOGITS, max_diff_report(logits, expected)
    assert (logits.argmax(-1) == expected.argmax(-1)).mean() >= 0.97
    half = copy.deepcopy(oracle).to(torch.float16)
    gemma = Gemma(folder)
    for prompt in ([5, 9, 200, 17, 42, 11, 3, 77], ids[1].tolist()):
        with torch.no_grad():
            hf = half.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10,
                               do_sample=False)[0, len(prompt):].tolist()  # fmt: skip
        assert gemma.generate(prompt, max_new_tokens=10, ignore_eos=True).token_ids == hf


def test_bf16_ort_target_graph_resolves(tiny_checkpoints, tmp_path):
    """bf16 is for CUDA: ORT resolves the graph's types before it looks for kernels, so on the
    CPU a consistent bf16 graph fails only for want of a bf16 kernel, never on a type clash."""
    from gemma_onnx.builder import build_model

    source, _ = tiny_checkpoints("hard")
    folder = build_model(source, tmp_path / "ort-bf16", target="ort", precision="bf16")
    with pytest.raises(Exception, match="NOT_IMPLEMENTED : Could not find an implementation"):
        ort_session(folder)
