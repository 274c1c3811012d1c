"""Export: weights folder -> model folder, written atomically.

The folder is assembled in a temporary directory beside the output and renamed into place only
when complete, so an interrupted or failed build (Ctrl-C, kill, a full disk, a bad tensor found
mid-write) leaves nothing at the output path. An existing output is replaced only with
``overwrite=True``.

Ctrl-C and errors remove the temporary directory on the way out; SIGKILL or a power cut cannot,
so the next build to the same output removes what a dead build left. A live build holds an flock
on its temporary directory, which the kernel drops when the process dies however it dies: a
directory that can be locked is stale, and a concurrent build's is never touched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir

from gemma_onnx.builder.config import Gemma3Config
from gemma_onnx.builder.graph import ALIAS_OF, PRECISIONS, build_graph
from gemma_onnx.builder.interop import write_genai_config, write_transformers_js_layout
from gemma_onnx.builder.quantize import BITS, QuantConfig
from gemma_onnx.builder.report import write_quality_report
from gemma_onnx.builder.weights import find_safetensors, load_checkpoint
from gemma_onnx.errors import GemmaOnnxError

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"  # the external-data name optimum and transformers.js expect
TARGETS = ("portable", "ort")
LAYOUTS = ("default", "transformers.js")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


# The activations' dtype of each precision, as transformers names it in config.json.
_CONFIG_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _text_config_json(raw: dict, config: Gemma3Config, precision: str) -> dict:
    """The config clients should see: the decoder's, as a Gemma3ForCausalLM (the ONNX graph is
    the text decoder, even when the source was a ConditionalGeneration checkpoint), with every
    size written out: runtimes other than transformers do not know its defaults; and the dtype
    the graph computes in, not the source checkpoint's."""
    if raw.get("model_type") != "gemma3":
        text = dict(raw)
    else:
        text = dict(raw["text_config"])
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "transformers_version"):
            if key in raw and key not in text:
                text[key] = raw[key]
        text["model_type"] = "gemma3_text"
        text["architectures"] = ["Gemma3ForCausalLM"]
    for name in config.defaulted:
        text[name] = getattr(config, name)
    # As resolved from both config levels and the stored tensors (weights.load_checkpoint).
    text["tie_word_embeddings"] = config.tie_word_embeddings
    dtype = _CONFIG_DTYPES.get(precision, "float32")  # int8/int4: float activations
    for key in {"dtype", "torch_dtype"} & text.keys() or {"dtype"}:
        text[key] = dtype
    return text


def _generation_config(source: Path, config_json: dict, vocab_size: int) -> dict:
    """generation_config.json, or the special tokens of config.json; every special token id is
    checked here, before the build, as generate would refuse the model for it afterwards."""
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    path = source / "generation_config.json"
    has_file = path.is_file()
    if has_file:
        try:
            generation = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise GemmaOnnxError(f"{path}: not a readable JSON file ({exc})") from None
        if not isinstance(generation, dict):
            raise GemmaOnnxError(f"{path}: expected a JSON object")
    else:
        generation = {k: config_json[k] for k in keys if config_json.get(k) is not None}
    for key in keys:  # as generate reads them: generation_config.json first, then config.json
        if has_file and key in generation:
            where, value = path, generation[key]
        else:
            where, value = source / "config.json", config_json.get(key)
        for token in value if isinstance(value, list) else [value]:
            if token is None:
                continue
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
                raise GemmaOnnxError(
                    f"{where}: {key} {value!r} is not a token id in [0, {vocab_size})"
                )
    return generation


def _check_output(output: Path, source: Path, overwrite: bool) -> None:
    try:
        resolved, src = output.resolve(), source.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop, before Python 3.13
        raise GemmaOnnxError(f"{output}: cannot resolve the path ({exc})") from None
    if resolved == src and src.is_file():  # a GGUF file, the source itself
        raise GemmaOnnxError(f"{output}: is the source weights file; name a new folder")
    if resolved == src or resolved in src.parents:
        raise GemmaOnnxError(f"{output}: the output folder would contain the source weights")
    if _is_source_file(resolved, src):
        raise GemmaOnnxError(f"{output}: is one of the source's files; name a new folder")
    if output.is_symlink() and not output.exists():
        raise GemmaOnnxError(f"{output}: is a broken symbolic link; name a new folder")
    if output.exists() and not (output.is_dir() or output.is_file()):
        raise GemmaOnnxError(f"{output}: already exists and is not a folder or a file")
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the current folder was deleted: nothing to protect
        cwd = None
    if cwd is not None and (resolved == cwd or resolved in cwd.parents):
        raise GemmaOnnxError(
            f"{output}: the output folder would contain the current folder; name a new folder"
        )
    if output.exists() and not overwrite:
        if output.is_file() or any(output.iterdir()):
            raise GemmaOnnxError(f"{output}: already exists; pass --overwrite to replace it")


def _is_source_file(resolved: Path, source: Path) -> bool:
    """Whether ``resolved`` is a file in the source folder, or what one of them links to (a hub
    cache's snapshot links every file to a blob elsewhere): --overwrite must not delete it."""
    if source in resolved.parents and resolved.exists() and not resolved.is_dir():
        return True
    try:
        return any(f.resolve() == resolved for f in source.iterdir())
    except OSError:
        return False


def _write_files(
    model: ir.Model,
    staging: Path,
    source: Path,
    config_json: dict,
    generation: dict,
    progress: bool,
) -> None:
    callback = None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="converting weights", unit="tensor", leave=True)

        def callback(tensor: ir.TensorProtocol, info) -> None:
            if bar.total is None:
                bar.total = info.total
            bar.set_postfix_str(str(tensor.name)[-40:], refresh=False)
            bar.update()

    # Aliases (graph.py, DecoderGraph.alias) are left out of the data file and added after,
    # pointing at their source's bytes.
    initializers = model.graph.initializers
    aliases = {name: v for name, v in initializers.items() if ALIAS_OF in v.meta}
    for name in aliases:
        initializers.pop(name)
    try:
        ir.save(model, staging / MODEL_FILE, external_data=DATA_FILE, callback=callback)
    finally:
        for value in aliases.values():
            initializers.add(value)
        if bar is not None:
            bar.close()
    if aliases:
        _write_aliases(staging / MODEL_FILE, aliases)
    (staging / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, staging / name)


def _check_tokenizer_files_readable(source: Path) -> None:
    """They are copied last, after the conversion: an unreadable one should fail first."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            try:
                (source / name).open("rb").close()
            except OSError as exc:
                raise GemmaOnnxError(f"{source / name}: cannot read it ({exc.strerror})") from None
    tokenizer = source / "tokenizer.json"
    if tokenizer.is_file():  # a broken one would make a folder `generate` cannot read text with
        from tokenizers import Tokenizer

        from gemma_onnx.runtime.text import return_freed_heap

        try:
            Tokenizer.from_file(str(tokenizer))
        except Exception as exc:  # tokenizers raises its own plain Exception
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise GemmaOnnxError(f"{tokenizer}: not a readable tokenizer ({first})") from None
        finally:
            # Parsing Gemma's leaves ~250 MB of freed heap mapped, under the conversion's peak.
            return_freed_heap()


def _nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < 16 * 2**20
    except OSError:
        return False


def _write_aliases(path: Path, aliases: dict[str, ir.Value]) -> None:
    """Add each alias to the saved model as a second reference to its source's external data
    (same file, offset and length; its own name and shape). A source small enough to be stored
    inline is copied."""
    proto = onnx.load(str(path), load_external_data=False)
    saved = {tensor.name: tensor for tensor in proto.graph.initializer}
    for name, value in aliases.items():
        source = saved[value.meta[ALIAS_OF]]
        external = {e.key: e.value for e in source.external_data}
        length = int(external["length"]) if external else len(source.raw_data)
        if math.prod(value.shape.numpy()) * value.dtype.itemsize != length:
            raise AssertionError(f"alias {name}: {value.shape} does not span {source.name}")
        alias = onnx.TensorProto()
        alias.CopyFrom(source)
        alias.name = name
        del alias.dims[:]
        alias.dims.extend(value.shape.numpy())
        proto.graph.initializer.append(alias)
    onnx.save(proto, str(path))


def _staging_prefix(output: Path) -> str:
    # The name is cut so that prefix + mkdtemp's 8 characters stay within NAME_MAX (255) for
    # any output name that fits; a dead build's folder of a longer name sharing the first 200
    # characters is then cleaned up with ours, which is harmless.
    return f".{output.name[:200]}.tmp-"


def _try_lock(folder: Path) -> int | None:
    """An exclusive flock on ``folder``, held until the descriptor closes or the process dies;
    None when another process holds it, the folder vanished, or the filesystem has no flock
    (then no folder ever counts as stale: nothing is removed)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _remove_stale_staging(output: Path) -> None:
    """Remove the temporary folders that killed builds left beside ``output``."""
    pattern = glob.escape(str(output.parent / _staging_prefix(output))) + "*"
    for folder in map(Path, glob.glob(pattern)):
        fd = _try_lock(folder)
        if fd is None:  # a live build is writing it
            continue
        try:
            shutil.rmtree(folder)
            log.warning("removed %s, left by an interrupted build", folder)
        except OSError as exc:
            log.warning("could not remove %s, left by an interrupted build: %s", folder, exc)
        finally:
            os.close(fd)


def quality_skip_reason(checkpoint, where: Path, quality: bool | None) -> str | None:
    """Why a quantized build will not measure its quality (None: it will, given a tokenizer).

    The measurement builds an fp32 reference of the whole model beside it, 4 bytes a
    parameter, and runs both: 1 GB for Gemma 3 270M, but 48 GB for 12B and 108 GB for 27B,
    more disk than is free and more memory than most machines have. By default it is skipped
    where the reference would not fit in the free disk under ``where``, or the measurement in
    the physical memory; ``quality=True`` measures anyway, ``quality=False`` never."""
    if quality is False:
        return "--no-quality"
    if quality:
        return None
    need = 4 * sum(math.prod(t.shape) for t in checkpoint.tensors.values())
    folder = where
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > free:
        return (
            f"its fp32 reference would take {need / 1e9:.1f} GB, more than the "
            f"{free / 1e9:.1f} GB free on disk; --quality measures anyway"
        )
    # Peak of a build that measures, by /usr/bin/time: 270M int4 3.0 GB and int8 portable
    # 4.1 GB (reference 1.07 GB); a 1B-shaped int4 7.0 GB and int8 portable 9.3 GB (4.0 GB).
    peak = 2 * need + 1.5e9
    if peak > memory:
        return (
            f"measuring it against an fp32 reference would take about {peak / 1e9:.0f} GB of "
            f"memory, more than this machine's {memory / 1e9:.0f} GB; --quality measures anyway"
        )
    return None


def _settle_files(staging: Path) -> None:
    """Flush every written file to disk before the folder is renamed into place (a crash after
    the rename must not leave a truncated model), then drop the data files from the page cache.

    The build's own writes and its quality measurement leave the weights cached in large page
    -cache folios, and a process that then maps the file gets whole folios mapped where it
    touches a few rows: on Gemma 3 270M int4, gathering the prompt's rows from the 8-bit table
    counted 0.54 GB of peak RSS in the first run after a build against 0.46 GB in every later
    one (README, "Quantization"). Dropped, the first run reads the file as later ones do."""
    for path in sorted(staging.rglob("*")):
        if not path.is_file():
            continue
        with open(path, "rb") as file:
            os.fsync(file.fileno())
            if path.suffix == ".onnx_data" and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _move_into_place(staging: Path, output: Path, overwrite: bool) -> None:
    if output.exists() and overwrite and (output.is_file() or any(output.iterdir())):
        trash = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        os.replace(output, trash / output.name)
        os.replace(staging, output)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        try:
            if output.exists():
                output.rmdir()  # empty folder: nothing of the user's is lost
            os.replace(staging, output)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            # Another build (or the user) filled the folder while this one converted.
            raise GemmaOnnxError(
                f"{output}: already exists (written while this build ran); pass --overwrite "
                "to replace it"
            ) from None


def is_gguf(path: Path) -> bool:
    """A file named ``*.gguf``, or any file that starts with GGUF's magic."""
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with path.open("rb") as file:
            return file.read(4) == b"GGUF"
    except OSError:
        return False  # find_safetensors names the unreadable file


def _build_from_gguf(gguf: Path, output: Path, **options) -> Path:
    """Import the GGUF into a float32 Hugging Face folder beside the output (4 bytes a
    parameter: 1.1 GB for Gemma 3 270M), build from that, and remove it however the build ends.

    The folder lives in a locked staging folder of the output's, so a build killed before it
    could clean up has it removed by the next build to that output, as its own staging is."""
    from gemma_onnx.tools.gguf_import import import_gguf

    _check_output(output, gguf, options["overwrite"])  # the GGUF is the source to protect
    try:
        with _staging_folder(output) as holder:
            if options["progress"]:
                note = f"importing {gguf.name} (dequantized to float32)"
                print(note, file=sys.stderr, flush=True)
            try:
                imported = import_gguf(gguf, holder / "hf", progress=options["progress"])
            except GemmaOnnxError as exc:  # it names its temporary folder; the user named output
                where = f"{output} (importing the GGUF beside it)"
                raise GemmaOnnxError(str(exc).replace(str(holder / "hf"), where)) from None
            return build_model(imported, output, **options)
    except OSError as exc:  # making the holder; import_gguf reports its own writes
        reason = exc.strerror or exc
        raise GemmaOnnxError(f"{output}: could not write beside it ({reason})") from exc


@contextlib.contextmanager
def _staging_folder(output: Path) -> Iterator[Path]:
    """A new temporary folder beside ``output``, flock-ed while this build lives (so the next
    build to ``output`` removes it only if this one died), and removed on the way out unless it
    was renamed into place."""
    made = []  # the output's missing parent folders, deepest first: a failed build removes them
    parent = output.parent
    while not parent.exists() and parent != parent.parent:
        made.append(parent)
        parent = parent.parent
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(output)
    folder = Path(tempfile.mkdtemp(prefix=_staging_prefix(output), dir=output.parent))
    lock = _try_lock(folder)
    done = False
    try:
        yield folder
        done = True
    finally:
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        if lock is not None:
            os.close(lock)
        for parent in [] if done else made:
            try:
                parent.rmdir()  # only if empty: never anything of the user's
            except OSError:
                break


def build_model(
    weights: str | os.PathLike,
    output: str | os.PathLike,
    *,
    precision: str = "fp32",
    target: str = "portable",
    overwrite: bool = False,
    progress: bool = False,
    quant: QuantConfig | None = None,
    layout: str = "default",
    quality: bool | None = None,
) -> Path:
    """Builds a model folder (model.onnx + model.onnx_data, config, generation config, tokenizer).

    ``weights`` is a Hugging Face model folder or a ``.safetensors`` file with ``config.json``
    beside it (shards through ``model.safetensors.index.json``), or a Gemma 3 GGUF file (needs
    the ``gguf`` package; it is dequantized to float32 first). Returns the output folder.

    int8/int4 builds measure their agreement with fp32 into ``quality.json`` (report.py), which
    needs the source's tokenizer and an fp32 reference built beside the model. ``quality``:
    True measures whatever it costs, False never; None (the default) measures unless that
    reference would not fit the disk or half the memory (:func:`quality_skip_reason`). With
    ``progress``, a build that does not measure says why.
    """
    for name, value in (("weights", weights), ("output", output)):
        if not isinstance(value, (str, os.PathLike)):
            raise GemmaOnnxError(f"{name} must be a path, got {value!r}")
    if quant is not None and not isinstance(quant, QuantConfig):
        raise GemmaOnnxError(
            f"quant must be a gemma_onnx.builder.quantize.QuantConfig, got {quant!r}"
        )
    if quant is not None and precision not in BITS:
        raise GemmaOnnxError(f"quant applies to precision int8 or int4, not {precision!r}")
    if quality is not None and not isinstance(quality, bool):
        raise GemmaOnnxError(f"quality must be True, False or None, got {quality!r}")
    if precision not in (*PRECISIONS, *BITS):
        raise GemmaOnnxError(
            f"precision {precision!r} is not supported; choose from "
            f"{', '.join([*PRECISIONS, *BITS])}"
        )
    if target not in TARGETS:
        raise GemmaOnnxError(
            f"target {target!r} is not supported; choose from {', '.join(TARGETS)}"
        )
    if layout not in LAYOUTS:
        raise GemmaOnnxError(
            f"layout {layout!r} is not supported; choose from {', '.join(LAYOUTS)}"
        )
    if layout == "transformers.js" and (target != "portable" or precision not in ("fp32", "fp16")):
        raise GemmaOnnxError("--layout transformers.js needs --target portable and fp32 or fp16")
    if precision in BITS:
        quant = quant or QuantConfig(bits=BITS[precision])
        if target == "portable" and quant.rescore_top:
            raise GemmaOnnxError(
                "--rescore-top applies to --target ort; the portable target's LM head is float"
            )
    weights, output = Path(weights), Path(output)
    if is_gguf(weights):  # after the checks above, which need no weights: before the import
        return _build_from_gguf(
            weights, output, precision=precision, target=target, overwrite=overwrite,
            progress=progress, quant=quant, layout=layout, quality=quality,
        )  # fmt: skip
    _, source = find_safetensors(weights)
    _check_output(output, source, overwrite)
    config_path = source / "config.json"
    config = Gemma3Config.from_file(config_path)
    if target == "ort" and config.head_dim % 8:
        raise GemmaOnnxError(
            f"{config_path}: head_dim {config.head_dim} is not a multiple of 8, which ONNX "
            "Runtime's GroupQueryAttention (--target ort) needs; build with --target portable"
        )
    raw_config = json.loads(config_path.read_text(encoding="utf-8"))
    config_json = _text_config_json(raw_config, config, precision)
    generation = _generation_config(source, config_json, config.vocab_size)
    _check_tokenizer_files_readable(source)
    if precision in BITS:
        quant.check_block_size(config)
    if precision in BITS and quality and not (source / "tokenizer.json").is_file():
        raise GemmaOnnxError(
            f"{source}: --quality reads the held-out text with the source's tokenizer.json, "
            "and there is none; copy it there, or pass --no-quality"
        )
    checkpoint = load_checkpoint(weights, config)
    if checkpoint.config != config:  # a stored head of its own untied it
        config = checkpoint.config
        config_json["tie_word_embeddings"] = config.tie_word_embeddings
    skip_quality = None
    if precision in BITS:
        skip_quality = quality_skip_reason(checkpoint, output.parent, quality)
    model = build_graph(config, checkpoint, precision, target, quant)

    try:
        with _staging_folder(output) as staging:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the result is ordinary
            _write_files(model, staging, source, config_json, generation, progress)
            if precision in BITS:  # quantized: measure what it costs, on this very build
                report = None
                if skip_quality is None:
                    quantization = quant.describe(target, config.hidden_size)
                    report = write_quality_report(staging, config, checkpoint, quantization)
                    if report is None:
                        skip_quality = "the source has no tokenizer.json to read the held-out text"
                if report is None and progress:
                    print(f"quality: not measured ({skip_quality})", file=sys.stderr, flush=True)
            if target == "portable":  # onnxruntime-genai reads the folder through this file
                write_genai_config(staging, config_json, generation)
            if layout == "transformers.js":
                write_transformers_js_layout(staging)
            _settle_files(staging)
            _move_into_place(staging, output, overwrite)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""  # e.g. the file in the way
        # A short write says "N requested and M written", not ENOSPC: look at the disk too.
        full = exc.errno == errno.ENOSPC or _nearly_full(output.parent)
        raise GemmaOnnxError(
            f"{output}: could not write the model ({exc.strerror or exc}{where})"
            + ("; the disk is full" if full else "")
        ) from exc
    return output
