"""Weight-only quantization with onnxruntime's own block quantizers (RTN, per block of K).

``MatMulNBits`` layout (the ORT target): a [K, N] weight becomes ``packed`` uint8
[N, K / block, block * bits / 8], ``scales`` float32 [N, K / block] and, when asymmetric, packed
uint8 ``zero_points`` [N, ceil(K / block * bits / 8)]. The same three tensors, seen as a [N, K]
table quantized along K, are what ``GatherBlockQuantized`` reads, which is how the tied embedding
and LM head share one quantized copy.

The portable target uses ONNX's standard block-quantized ``DequantizeLinear`` (opset 21) on
[K, N] int4/int8 weights quantized along K.

Mixed precision, in the spirit of llama.cpp's Q4_K_M: ``bits`` is the width of the LM head's
table (262144 x 640 on Gemma 3 270M, tied to the embedding: 63% of the parameters and most of
each decode step's weight traffic), ``layer_bits`` that of the decoder layers' projections.

Rescoring (the ORT target, ``rescore_top``): the quantized LM head ranks the vocabulary, and the
``rescore_top`` highest logits are recomputed in float32 from an 8-bit copy of the table's rows
(the lookup's own table: at 8 bits, at most ~1.25 bytes a parameter, read only where gathered).
On Gemma 3 270M int4 that lifts teacher-forced top-1 agreement with fp32 from 81% to 98%, and
the head, which then only ranks, is quantized in coarser blocks (``head_quant``) that decode
faster than the unrescored build (README, "Quantization").
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from onnxruntime.capi._pybind_state import (
    quantize_matmul_4bits,
    quantize_matmul_8bits,
    quantize_qdq_matmul_4bits,
)

from gemma_onnx.errors import GemmaOnnxError

BITS = {"int4": 4, "int8": 8}
ORT_LAYER_BITS = 8  # the decoder layers' default width on the ORT target (QuantConfig.layer_bits)
# Logits the ORT target recomputes from the 8-bit rows by default (QuantConfig.rescore_top):
# on Gemma 3 270M int4, top-1 agreement levels off from 8 on (the fp32 top token is within the
# 4-bit head's top 8 at every held-out position); 64 also brings the rest of the distribution
# near fp32's (KL 0.018 against 0.033 with 16) at no measurable decode cost (README,
# "Quantization").
ORT_RESCORE_TOP = 64
RESCORE_TOP_MAX = 4096  # a bound on the TopK + gather per position; far beyond any gain
# Block size of a 4-bit LM head that only ranks (rescored): on Gemma 3 270M int4, 128 decodes
# ~15% faster than 32 (fewer scales for MLAS to read, a 262144 x 640 head every token) at the
# same top-1 agreement, 98.2%; the fp32 top token stays within the head's top 8 (README,
# "Quantization"). Capped by the hidden size's largest power-of-two divisor.
RANKING_BLOCK_SIZE = 128
_ROWS_PER_CHUNK = 16_384  # int8_rows' working set: 16,384 rows of float32 at a time


@dataclass(frozen=True)
class QuantConfig:
    """How weights are quantized; defaults chosen by measurement (see README, "Quantization")."""

    bits: int = 4  # 4 or 8: the LM head's table (and the lookup's, unless rescoring: table_quant)
    block_size: int = 32  # weights per scale along K: a power of two >= 16
    # None: asymmetric (a zero point per block) at 4 bits, symmetric at 8 bits; each measured
    # the better top-1 agreement on Gemma 3 270M (README, "Quantization").
    symmetric: bool | None = None
    # MatMulNBits compute: 4 = int8 activations, 0 = float32. Level 0 has no fast CPU kernel
    # (8-bit: 0.4 tokens/s on Gemma 3 270M), so 4 is the default despite its small cost in
    # agreement (README, "Quantization").
    accuracy_level: int = 4
    # Width of the decoder layers' q/k/v/o and gate/up/down projections, 4 or 8. None: 8 on the
    # ORT target, where ``bits`` is the LM head's width (Gemma 3 270M int4: 98.2% top-1
    # agreement against 72.4% with 4-bit layers, for 47 MB more and slower decode; README,
    # "Quantization"); ``bits`` on the portable target, whose table stays float.
    layer_bits: int | None = None
    # ORT target: how many of the LM head's highest logits per position are recomputed in
    # float32 from the 8-bit table (the quantized head only ranks); 0 = off. None:
    # ORT_RESCORE_TOP on the ORT target. The portable target's head is float already.
    rescore_top: int | None = None

    def __post_init__(self):
        for name in ("bits", "block_size", "accuracy_level", "layer_bits", "rescore_top"):
            value = getattr(self, name)
            if value is None and name in ("layer_bits", "rescore_top"):
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise GemmaOnnxError(f"quantization {name} must be an integer, got {value!r}")
        if self.symmetric is None:
            object.__setattr__(self, "symmetric", self.bits == 8)
        if self.bits not in (4, 8):
            raise GemmaOnnxError(f"quantization bits must be 4 or 8, got {self.bits}")
        if self.layer_bits not in (None, 4, 8):
            raise GemmaOnnxError(f"--layer-bits must be 4 or 8, got {self.layer_bits}")
        size = self.block_size
        if size < 16 or size & (size - 1):
            raise GemmaOnnxError(
                f"--block-size must be a power of two >= 16 (16, 32, 64, 128...), got {size}"
            )
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise GemmaOnnxError(f"--accuracy-level must be 0-4, got {self.accuracy_level}")
        if self.rescore_top is not None and not 0 <= self.rescore_top <= RESCORE_TOP_MAX:
            raise GemmaOnnxError(
                f"--rescore-top must be from 0 to {RESCORE_TOP_MAX}, got {self.rescore_top}"
            )

    def check_block_size(self, config) -> None:
        """Every quantized weight's input size (K) is whole blocks: the hidden, MLP and attention
        widths of ``config`` (a Gemma3Config). Says which is not and which block size fits, before
        anything is built."""
        widths = {
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_attention_heads * head_dim": config.num_attention_heads * config.head_dim,
        }
        for name, width in widths.items():
            if width % self.block_size:
                fits = (b for b in (1024, 512, 256, 128, 64, 32, 16) if b < self.block_size)
                fit = next((b for b in fits if all(w % b == 0 for w in widths.values())), None)
                hint = (
                    f"--block-size {fit} divides them all"
                    if fit
                    else "no block size divides them all: build with --precision fp32 or fp16"
                )
                raise GemmaOnnxError(
                    f"--block-size {self.block_size} does not divide the model's {name} "
                    f"({width}); {hint}"
                )

    def layer_width(self, target: str) -> int:
        """The decoder layers' bits on ``target`` ("ort" or "portable")."""
        if self.layer_bits is not None:
            return self.layer_bits
        return ORT_LAYER_BITS if target == "ort" else self.bits

    def for_layers(self, target: str) -> QuantConfig:
        """The config of the decoder layers' projections on ``target``: symmetric at 8 bits
        and asymmetric at 4 when that differs from ``bits`` (each width's better measured
        choice)."""
        bits = self.layer_width(target)
        if bits == self.bits:
            return self
        return replace(self, bits=bits, symmetric=bits == 8)

    def rescore_count(self, target: str) -> int:
        """Logits per position recomputed from 8-bit rows on ``target`` (0: none)."""
        if target != "ort":
            return 0
        return ORT_RESCORE_TOP if self.rescore_top is None else self.rescore_top

    def head_quant(self, target: str, hidden_size: int) -> QuantConfig:
        """The LM head's quantization on ``target``. A 4-bit head that only ranks (rescored
        from the 8-bit table, whose rows the lookup reads too) shares its bytes with nothing,
        so it takes the coarser RANKING_BLOCK_SIZE blocks when they divide ``hidden_size``
        (its K); otherwise it is the lookup's table too and keeps ``block_size``."""
        if self.table_quant(target) is self or self.block_size >= RANKING_BLOCK_SIZE:
            return self
        block = self.block_size
        while block < RANKING_BLOCK_SIZE and hidden_size % (2 * block) == 0:
            block *= 2
        return self if block == self.block_size else replace(self, block_size=block)

    def table_quant(self, target: str) -> QuantConfig:
        """The quantization of the table the lookup and the rescoring gather rows from: 8-bit
        (symmetric) when rescoring a 4-bit head, else the head's own."""
        if self.bits == 8 or not self.rescore_count(target):
            return self
        return replace(self, bits=8, symmetric=True)

    def describe(self, target: str, hidden_size: int) -> dict:
        """How a build on ``target`` was quantized, for quality.json."""
        ort = target == "ort"
        return {
            "lm_head_bits": self.bits if ort else None,  # None: the float table
            "lm_head_block_size": self.head_quant(target, hidden_size).block_size if ort else None,
            "embedding_bits": self.table_quant(target).bits if ort else None,
            "rescore_top": self.rescore_count(target),
            "layer_bits": self.layer_width(target),
            "block_size": self.block_size,
            "accuracy_level": self.accuracy_level if ort else None,  # the runtime's choice
        }


def matmul_nbits(weight_kn: np.ndarray, config: QuantConfig) -> dict[str, np.ndarray]:
    """Quantizes a float32 [K, N] weight for MatMulNBits; K must be a multiple of block_size."""
    k, n = weight_kn.shape
    bits, block = config.bits, config.block_size
    if k % block:
        raise GemmaOnnxError(f"input size {k} is not a multiple of --block-size {block}")
    blocks = k // block
    packed = np.zeros((n, blocks, block * bits // 8), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zero_points = np.zeros((n, (blocks * bits + 7) // 8), np.uint8)
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    weight = np.ascontiguousarray(weight_kn, dtype=np.float32)
    quantize(packed, weight, scales, zero_points, block, n, k, config.symmetric)
    parts = {"packed": packed, "scales": scales}
    if not config.symmetric:
        parts["zero_points"] = zero_points
    return parts


def dequantize_nbits(parts: dict[str, np.ndarray], config: QuantConfig) -> np.ndarray:
    """The [N, K] float32 table that ``parts`` encode (what GatherBlockQuantized returns)."""
    packed, scales = parts["packed"], parts["scales"]
    n, blocks, _ = packed.shape
    if config.bits == 4:
        values = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, -1)
    else:
        values = packed
    if "zero_points" in parts:
        zp = parts["zero_points"]
        if config.bits == 4:
            zp = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)
        zero = zp[:, :blocks].astype(np.float32)
    else:
        zero = np.full((n, blocks), 2 ** (config.bits - 1), np.float32)
    return ((values.astype(np.float32) - zero[..., None]) * scales[..., None]).reshape(n, -1)


def qdq_weights(weight_kn: np.ndarray, config: QuantConfig) -> dict[str, np.ndarray]:
    """Quantizes a float32 [K, N] weight for DequantizeLinear(axis=0, block_size): values
    [K, N] (int4: two per byte, packed by onnxruntime's quantizer; int8: symmetric, scale
    max|w| / 127 per block), scales [K / block, N] and, for asymmetric int4, zero points."""
    if config.bits == 8:
        return _qdq_int8(weight_kn, config)
    k, n = weight_kn.shape
    block = config.block_size
    blocks = (k + block - 1) // block
    packed = np.zeros((k * n + 1) // 2, np.uint8)
    zero_points = np.zeros((n * blocks + 1) // 2, np.uint8)
    scales = np.zeros((blocks, n), np.float32)
    weight = np.ascontiguousarray(weight_kn, dtype=np.float32)
    quantize_qdq_matmul_4bits(packed, weight, scales, zero_points, block, n, k, config.symmetric)
    parts = {"quantized": packed, "scales": scales}
    if not config.symmetric:
        parts["zero_points"] = zero_points
    return parts


def _qdq_int8(weight_kn: np.ndarray, config: QuantConfig) -> dict[str, np.ndarray]:
    k, n = weight_kn.shape
    blocks = weight_kn.reshape(k // config.block_size, config.block_size, n)
    values, scales = _int8_blocks(blocks, axis=1)  # [K / block, block, N], [K / block, N]
    return {"quantized": values.reshape(k, n), "scales": scales}


def int8_rows(table_nk: np.ndarray, config: QuantConfig) -> dict[str, np.ndarray]:
    """An 8-bit copy of a float32 [N, K] table for GatherBlockQuantized alone (no MatMulNBits
    reads it): ``packed`` uint8 [N, K] (value + 128, the op's default zero point) and
    ``scales`` float32 [N, K / block].

    Symmetric with scale max|w| / 127 per block, as the portable int8 weights and llama.cpp's
    Q8_0 (a Q8_0 source comes back exactly). onnxruntime's 8-bit quantizer, made for
    MatMulNBits, divides by 128 and clips the block's largest value of the other sign.
    """
    n, k = table_nk.shape
    packed = np.empty((n, k), np.uint8)
    scales = np.empty((n, k // config.block_size), np.float32)
    for start in range(0, n, _ROWS_PER_CHUNK):  # float temporaries of a chunk, not the table
        rows = table_nk[start : start + _ROWS_PER_CHUNK]
        blocks = rows.reshape(len(rows), k // config.block_size, config.block_size)
        values, scales[start : start + len(rows)] = _int8_blocks(blocks, axis=2)
        packed[start : start + len(rows)] = values.reshape(len(rows), k).view(np.uint8) ^ 0x80
    return {"packed": packed, "scales": scales}  # packed: value + 128


def _int8_blocks(blocks: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 along ``axis`` of ``blocks``: values in [-127, 127] and the scales
    max|w| / 127 (1 for an all-zero block), with ``axis`` dropped."""
    scales = np.abs(blocks).max(axis=axis) / np.float32(127)
    scales = np.where(scales == 0, np.float32(1), scales).astype(np.float32)
    values = blocks / np.expand_dims(scales, axis)
    np.rint(values, out=values)
    return np.clip(values, -127, 127, out=values).astype(np.int8), scales


class SharedComputation:
    """Computes several tensors from one expensive call, once, and hands each out once.

    ``onnx_ir`` writes lazy tensors one at a time (possibly from worker threads); the packed
    weights, scales and zero points of one matrix come from a single quantizer call, which must
    not run three times, nor keep its result after the last part is written.
    """

    def __init__(self, compute: Callable[[], dict[str, np.ndarray]], parts: set[str]):
        self._compute = compute
        self._pending = set(parts)
        self._result: dict[str, np.ndarray] | None = None
        self._lock = threading.Lock()

    def take(self, part: str) -> np.ndarray:
        with self._lock:
            if self._result is None:
                self._result = self._compute()
            array = self._result[part]
            self._pending.discard(part)
            if not self._pending:
                self._result = None
            return array
