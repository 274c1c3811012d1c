"""Samplers on hand-made logits, and against HF's own logits warpers on random ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from gemma_onnx.errors import GemmaOnnxError
from gemma_onnx.runtime.sampling import (
    Sampler,
    SamplingConfig,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
)


def row(*values: float) -> np.ndarray:
    return np.array([values], dtype=np.float32)  # [1, V]


def kept(logits: np.ndarray) -> list[int]:
    return np.flatnonzero(np.isfinite(logits[0])).tolist()


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = row(2.0, -2.0, 1.0, -1.0)
    seen = np.array([[True, True, False, False]])
    apply_repetition_penalty(logits, seen, 2.0)
    np.testing.assert_array_equal(logits, row(1.0, -4.0, 1.0, -1.0))


def test_temperature_scales_logits():
    logits = row(2.0, -1.0, 0.5)
    apply_temperature(logits, 0.5)
    np.testing.assert_array_equal(logits, row(4.0, -2.0, 1.0))


@pytest.mark.parametrize("temperature", [1e-38, 1e-45, 1e-300])
def test_a_temperature_too_small_for_float32_is_the_greedy_limit(temperature):
    """30 / 1e-38 overflows float32: the likeliest token must keep all the probability, not
    turn into inf and be dropped as if filtered (which sampled the least likely one)."""
    logits = row(30.0, 10.0, 5.0, -2.0)
    apply_temperature(logits, temperature)
    assert kept(logits) == [0]
    sampler = Sampler(SamplingConfig(temperature=temperature, seed=0))
    assert [sampler(row(30.0, 10.0, 5.0, -2.0), np.zeros((1, 4), bool))[0] for _ in range(20)] == (
        [0] * 20
    )


def test_an_extreme_repetition_penalty_saturates_instead_of_overflowing():
    seen = np.array([[False, True, False, True]])
    logits = row(30.0, 10.0, 5.0, -2.0)
    apply_repetition_penalty(logits, seen, 1e-40)  # 10 / 1e-40 and -2 * 1e-40
    assert logits[0, 1] == np.finfo(np.float32).max and np.isfinite(logits).all()
    sampler = Sampler(SamplingConfig(temperature=0.7, repetition_penalty=1e-40, seed=0))
    assert sampler(row(30.0, 10.0, 5.0, -2.0), seen)[0] == 1


def test_top_k_keeps_the_k_largest_and_ties_with_the_kth():
    logits = row(1.0, 5.0, 3.0, 5.0, 2.0)
    apply_top_k(logits, 3)
    assert kept(logits) == [1, 2, 3]
    logits = row(1.0, 5.0, 3.0, 5.0, 2.0)
    apply_top_k(logits, 1)
    assert kept(logits) == [1, 3]  # HF compares against the k-th value: both 5s stay


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    logits = np.log(probs).astype(np.float32)[None]
    apply_top_p(logits, 0.75)  # 0.5 + 0.3 reaches 0.75
    assert kept(logits) == [1, 3]
    logits = np.log(probs).astype(np.float32)[None]
    apply_top_p(logits, 0.85)  # needs 0.15 too
    assert kept(logits) == [1, 2, 3]
    logits = np.log(probs).astype(np.float32)[None]
    apply_top_p(logits, 0.01)  # the most likely token always stays
    assert kept(logits) == [1]


def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability():
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    logits = np.log(probs).astype(np.float32)[None]
    apply_min_p(logits, 0.2)  # threshold 0.2 * 0.5 = 0.1
    assert kept(logits) == [1, 2, 3]
    logits = np.log(probs).astype(np.float32)[None]
    apply_min_p(logits, 0.7)  # threshold 0.35
    assert kept(logits) == [1]


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (lambda x: apply_temperature(x, 0.7), TemperatureLogitsWarper(0.7)),
        (lambda x: apply_top_k(x, 7), TopKLogitsWarper(7)),
        (lambda x: apply_top_p(x, 0.9), TopPLogitsWarper(0.9)),
        (lambda x: apply_min_p(x, 0.05), MinPLogitsWarper(0.05)),
    ],
    ids=["temperature", "top_k", "top_p", "min_p"],
)
def test_warpers_match_hf_on_random_logits(ours, theirs):
    logits = np.random.default_rng(0).normal(size=(3, 200)).astype(np.float32) * 3
    expected = theirs(torch.zeros(3, 1, dtype=torch.long), torch.from_numpy(logits.copy())).numpy()
    ours(logits)
    np.testing.assert_allclose(logits, expected, rtol=1e-6)


def test_repetition_penalty_matches_hf():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 50)).astype(np.float32)
    ids = rng.integers(0, 50, size=(2, 12))
    seen = np.zeros((2, 50), bool)
    seen[np.arange(2)[:, None], ids] = True
    processor = RepetitionPenaltyLogitsProcessor(1.3)
    expected = processor(torch.from_numpy(ids), torch.from_numpy(logits.copy())).numpy()
    apply_repetition_penalty(logits, seen, 1.3)
    np.testing.assert_allclose(logits, expected, rtol=1e-6)


def test_greedy_is_argmax_after_the_repetition_penalty():
    logits = row(1.0, 3.0, 2.5)
    seen = np.array([[False, True, False]])
    assert Sampler(SamplingConfig())(logits.copy(), np.zeros_like(seen)).tolist() == [1]
    penalised = Sampler(SamplingConfig(repetition_penalty=2.0))(logits.copy(), seen)
    assert penalised.tolist() == [2]


def test_seed_repeats_and_another_seed_differs():
    logits = np.random.default_rng(2).normal(size=(2, 1000)).astype(np.float32)
    seen = np.zeros((2, 1000), bool)

    def draw(seed: int) -> list[int]:
        sampler = Sampler(SamplingConfig(temperature=1.0, seed=seed))
        return [sampler(logits.copy(), seen).tolist() for _ in range(20)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_samples_follow_the_filtered_distribution():
    probs = np.array([0.1, 0.4, 0.2, 0.3])
    logits = np.log(probs).astype(np.float32)[None]
    sampler = Sampler(SamplingConfig(temperature=1.0, top_k=3, seed=0))
    counts = np.bincount(
        [int(sampler(logits.copy(), np.zeros((1, 4), bool))[0]) for _ in range(4000)],
        minlength=4,
    )
    assert counts[0] == 0  # removed by top-k
    np.testing.assert_allclose(counts[1:] / 4000, [0.4 / 0.9, 0.2 / 0.9, 0.3 / 0.9], atol=0.03)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "temperature (--temperature) must be >= 0"),
        ({"top_p": 0.0}, "top_p (--top-p) must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p (--top-p) must be in (0, 1]"),
        ({"top_k": -1}, "top_k (--top-k) must be >= 0"),
        ({"min_p": 1.5}, "min_p (--min-p) must be in [0, 1]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty (--repetition-penalty) must be > 0"),
        ({"temperature": float("nan")}, "temperature (--temperature) must be >= 0"),
    ],
)
def test_bad_settings_name_the_option(kwargs, message):
    with pytest.raises(GemmaOnnxError) as info:
        SamplingConfig(**kwargs)
    assert message in str(info.value)


def test_samplers_never_pick_a_removed_token():
    logits = np.random.default_rng(3).normal(size=(4, 300)).astype(np.float32)
    config = SamplingConfig(temperature=1.5, top_k=20, top_p=0.5, min_p=0.1, seed=1)
    allowed = logits.copy()
    apply_temperature(allowed, 1.5)
    apply_top_k(allowed, 20)
    apply_top_p(allowed, 0.5)
    apply_min_p(allowed, 0.1)
    sampler = Sampler(config)
    for _ in range(200):
        picks = sampler(logits.copy(), np.zeros((4, 300), bool))
        assert np.isfinite(allowed[np.arange(4), picks]).all()
