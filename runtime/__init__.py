"""Model folder -> tokens on ONNX Runtime: session and buffers, samplers, the generation loop.

Never imports the builder: the model folder on disk (model.onnx and HF's JSON files) is the
contract. The user-facing facade over these pieces is :class:`gemma_onnx.api.Gemma`.
"""

from gemma_onnx.runtime.generate import (
    GenerationStats,
    decode_one_token,
    fit_context,
    generate,
    prefill,
)
from gemma_onnx.runtime.sampling import Sampler, SamplingConfig
from gemma_onnx.runtime.session import ModelSpec, RunState, Session
from gemma_onnx.runtime.text import StreamDecoder, TextTokenizer

__all__ = [
    "GenerationStats",
    "ModelSpec",
    "RunState",
    "Sampler",
    "SamplingConfig",
    "Session",
    "StreamDecoder",
    "TextTokenizer",
    "decode_one_token",
    "fit_context",
    "generate",
    "prefill",
]
