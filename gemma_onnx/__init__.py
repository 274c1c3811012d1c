"""gemma-onnx: Gemma 3 weights -> ONNX (``gemma_onnx.builder``) -> tokens (``gemma_onnx.runtime``).

The builder and the runtime never import each other; the model folder on disk is their only
contract. Both raise :class:`gemma_onnx.errors.GemmaOnnxError` for problems a user can fix.
"""

__version__ = "0.1.0"
