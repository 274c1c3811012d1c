"""gemma-onnx: Gemma 3 weights -> ONNX (``gemma_onnx.builder``) -> tokens (``gemma_onnx.runtime``).

The builder and the runtime never import each other; the model folder on disk is their only
contract. Both raise :class:`gemma_onnx.errors.GemmaOnnxError` for problems a user can fix.
"""

from pathlib import Path as _Path

__version__ = "0.2.0"

# Installed, setuptools' package-dir puts builder/, runtime/ and tools/ inside this package. Run
# from a source checkout's root (`python -m pytest`, `python -m gemma_onnx`), Python imports this
# folder instead of the installed package; the checkout root then serves the same subpackages.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "builder" / "__init__.py").is_file():
    __path__.append(str(_checkout))
