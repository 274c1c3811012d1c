"""Choosing the next token from a row of logits: greedy, or sampling after HF's logits warpers.

Every filter follows the transformers class named in its docstring, in the order HF's
``generate`` applies them (repetition penalty, temperature, top-k, top-p, min-p), so a setting
means here what it means there. All work on float32 numpy arrays of shape ``[batch, vocab]`` and
mark removed tokens with ``-inf``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gemma_onnx.errors import GemmaOnnxError

_TOP_P_CANDIDATES = 1024  # tokens sorted first by top-p; enough unless the distribution is flat
_FLOAT32_MAX = np.finfo(np.float32).max


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens; validated once here, for the CLI and the Python API alike."""

    temperature: float = 0.0  # 0 = greedy (argmax); otherwise logits are divided by it
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p; 1 = off
    min_p: float = 0.0  # drop tokens less likely than min_p * p(most likely); 0 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in prompt + output
    seed: int | None = None  # the same seed, settings and model give the same tokens

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)):
            raise GemmaOnnxError(f"top_k (--top-k) must be an integer, got {self.top_k!r}")
        numbers = (
            ("temperature (--temperature)", self.temperature),
            ("top_p (--top-p)", self.top_p),
            ("min_p (--min-p)", self.min_p),
            ("repetition_penalty (--repetition-penalty)", self.repetition_penalty),
        )
        for name, value in numbers:
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                raise GemmaOnnxError(f"{name} must be a number, got {value!r}")
        checks = (
            ("temperature (--temperature)", self.temperature, self.temperature >= 0, ">= 0"),
            ("top_k (--top-k)", self.top_k, self.top_k >= 0, ">= 0"),
            ("top_p (--top-p)", self.top_p, 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p (--min-p)", self.min_p, 0 <= self.min_p <= 1, "in [0, 1]"),
            (
                "repetition_penalty (--repetition-penalty)",
                self.repetition_penalty,
                self.repetition_penalty > 0,
                "> 0",
            ),
        )
        for name, value, ok, expected in checks:
            # `not ok` is also True for NaN, which compares false with everything.
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                raise GemmaOnnxError(f"{name} must be {expected}, got {value!r}")
        # numpy's generators take any non-negative integer as a seed, and nothing else.
        seed = self.seed
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0
        ):
            raise GemmaOnnxError(f"seed (--seed) must be an integer >= 0, got {seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> None:
    """HF ``RepetitionPenaltyLogitsProcessor``, in place: over tokens already seen, divide
    positive logits by ``penalty`` and multiply negative ones (so > 1 always lowers them).

    logits: [B, V] float32; seen: [B, V] bool, True for every token in that row's prompt + output.
    """
    if penalty == 1.0:
        return
    picked = logits[seen]
    with np.errstate(over="ignore"):  # an extreme penalty saturates at float32's largest
        penalised = np.where(picked < 0, picked * penalty, picked / penalty)
    logits[seen] = np.clip(penalised, -_FLOAT32_MAX, _FLOAT32_MAX)


def apply_temperature(logits: np.ndarray, temperature: float) -> None:
    """HF ``TemperatureLogitsWarper``, in place: < 1 sharpens the distribution, > 1 flattens it.

    A temperature so small that ``logits / temperature`` overflows float32 is the greedy limit:
    the largest logit (and any tie with it) keeps all the probability, as it would at any such
    temperature (float32 logits differ by at least an ulp, and exp(-ulp / t) is 0 there).
    """
    if temperature == 1.0:
        return
    with np.errstate(over="ignore", divide="ignore"):
        scaled = logits / np.float32(temperature)
    if np.isinf(scaled).any() or not np.float32(temperature) > 0:
        top = logits.max(axis=-1, keepdims=True)
        scaled = np.where(logits == top, np.float32(0), np.float32(-np.inf))
    logits[...] = scaled


def apply_top_k(logits: np.ndarray, k: int) -> None:
    """HF ``TopKLogitsWarper``, in place: drop tokens below the k-th largest logit (ties with it
    stay, as in HF, which compares against the k-th value rather than keeping k indices)."""
    vocab = logits.shape[-1]
    if k <= 0 or k >= vocab:
        return
    kth = np.partition(logits, vocab - k, axis=-1)[:, vocab - k : vocab - k + 1]  # [B, 1]
    logits[logits < kth] = -np.inf


def apply_top_p(logits: np.ndarray, p: float) -> None:
    """HF ``TopPLogitsWarper``, in place: sort ascending and drop the tokens whose cumulative
    probability stays <= 1 - p, i.e. those with >= p of the mass on more likely tokens; the
    most likely token always stays.

    Sorting 262k logits per token would cost more than the model step, so the most likely
    ``_TOP_P_CANDIDATES`` are sorted first; only when they hold less than p is the rest needed.
    """
    if p >= 1.0:
        return
    for row in logits:
        live = np.flatnonzero(np.isfinite(row))  # [n]: after top-k, k tokens
        probs = _softmax(row[live])  # [n]
        n = len(probs)
        top = np.arange(n)  # [m]: the candidates to sort
        if n > _TOP_P_CANDIDATES:
            likeliest = np.argpartition(probs, n - _TOP_P_CANDIDATES)[n - _TOP_P_CANDIDATES :]
            if probs[likeliest].sum() >= p:  # every other token has >= p above it: dropped
                top = likeliest
        order = top[np.argsort(probs[top], kind="stable")]  # [m], ascending
        sorted_probs = probs[order]
        above = np.cumsum(sorted_probs[::-1])[::-1] - sorted_probs  # mass of likelier tokens
        drop = np.ones(n, bool)
        drop[order[above < p]] = False
        row[live[drop]] = -np.inf


def apply_min_p(logits: np.ndarray, min_p: float) -> None:
    """HF ``MinPLogitsWarper``, in place: drop tokens whose probability is below
    ``min_p * max probability``; the scale follows the model's confidence."""
    if min_p <= 0.0:
        return
    probs = _softmax(logits)  # [B, V]
    threshold = min_p * probs.max(axis=-1, keepdims=True)  # [B, 1]
    logits[probs < threshold] = -np.inf


def _softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float64, so cumulative sums over 262k tokens stay exact."""
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class Sampler:
    """Picks one token per row from ``[B, V]`` logits; owns the random stream.

    A new ``Sampler`` starts the stream afresh from ``config.seed``: build one per generation
    so that the same request repeats.
    """

    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray, seen: np.ndarray) -> np.ndarray:
        """logits: [B, V] float32 (modified in place); seen: [B, V] bool -> token ids [B] int64."""
        cfg = self.config
        apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
        if cfg.greedy:
            return logits.argmax(axis=-1).astype(np.int64)
        apply_temperature(logits, cfg.temperature)
        apply_top_k(logits, cfg.top_k)
        apply_top_p(logits, cfg.top_p)
        apply_min_p(logits, cfg.min_p)
        picks = np.empty(len(logits), np.int64)  # [B]
        uniforms = self.rng.random(len(logits))  # [B]: one draw per row, whatever the vocabulary
        for b, row in enumerate(logits):
            live = np.flatnonzero(np.isfinite(row))  # [n]: what the filters kept
            probs = _softmax(row[live])  # [n]
            cdf = np.cumsum(probs)  # [n]
            # Inverse CDF: side="right" skips zero-probability tokens; the cap on the last
            # likely one guards against the product rounding up to cdf[-1].
            index = np.searchsorted(cdf, uniforms[b] * cdf[-1], side="right")
            picks[b] = live[min(index, np.flatnonzero(probs)[-1])]
        return picks
