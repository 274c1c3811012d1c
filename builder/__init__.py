"""Weights -> ONNX model folder. Never imports the runtime.

>>> from gemma_onnx.builder import build_model
>>> build_model("path/to/gemma-3-270m", "gemma-270m-onnx")  # doctest: +SKIP
"""

from gemma_onnx.builder.config import Gemma3Config
from gemma_onnx.builder.export import build_model

__all__ = ["Gemma3Config", "build_model"]
