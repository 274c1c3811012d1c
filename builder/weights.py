"""Checkpoint reading: safetensors files (single or sharded) -> memory-mapped tensors by HF name.

Nothing is read into memory here. Each tensor becomes an ``onnx_ir.ExternalTensor`` that points
into its safetensors file, so the export can convert one tensor at a time and the checkpoint is
never held twice. ``safetensors`` validates every file first (garbage headers, truncated data,
overlapping offsets); the header's offsets then give the memory maps.

Decoder weights map through one template table (:data:`DECODER_TEMPLATES`); missing, unexpected
and mis-shaped tensors are reported together, by name.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx_ir as ir
from safetensors import SafetensorError, safe_open

from gemma_onnx.builder.config import Gemma3Config
from gemma_onnx.errors import GemmaOnnxError

SUPPORTED_DTYPES = {
    "F32": ir.DataType.FLOAT,
    "F16": ir.DataType.FLOAT16,
    "BF16": ir.DataType.BFLOAT16,
}

# Where the text decoder lives, per checkpoint kind. Each entry: (decoder prefix, lm_head name).
# Tried in order, so "model." (which also begins the 5.x ConditionalGeneration names) comes last.
PREFIXES = (
    ("model.language_model.", "lm_head.weight"),  # Gemma3ForConditionalGeneration, transformers 5.x
    ("language_model.model.", "language_model.lm_head.weight"),  # the same, transformers 4.x files
    ("model.", "lm_head.weight"),  # Gemma3ForCausalLM
)
# The vision tower and projector of ConditionalGeneration checkpoints: not part of the decoder.
VISION_PREFIXES = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)

# Decoder tensors, relative to the decoder prefix, with their shapes in HF's [out, in] layout.
# Shape entries name Gemma3Config fields, or products of them ("heads*head_dim").
DECODER_TEMPLATES: dict[str, tuple[str, ...]] = {
    "embed_tokens.weight": ("vocab_size", "hidden_size"),
    "norm.weight": ("hidden_size",),
    "layers.{}.input_layernorm.weight": ("hidden_size",),
    "layers.{}.self_attn.q_proj.weight": ("heads*head_dim", "hidden_size"),
    "layers.{}.self_attn.k_proj.weight": ("kv_heads*head_dim", "hidden_size"),
    "layers.{}.self_attn.v_proj.weight": ("kv_heads*head_dim", "hidden_size"),
    "layers.{}.self_attn.o_proj.weight": ("hidden_size", "heads*head_dim"),
    "layers.{}.self_attn.q_norm.weight": ("head_dim",),
    "layers.{}.self_attn.k_norm.weight": ("head_dim",),
    "layers.{}.post_attention_layernorm.weight": ("hidden_size",),
    "layers.{}.pre_feedforward_layernorm.weight": ("hidden_size",),
    "layers.{}.mlp.gate_proj.weight": ("intermediate_size", "hidden_size"),
    "layers.{}.mlp.up_proj.weight": ("intermediate_size", "hidden_size"),
    "layers.{}.mlp.down_proj.weight": ("hidden_size", "intermediate_size"),
    "layers.{}.post_feedforward_layernorm.weight": ("hidden_size",),
}
BIAS_TEMPLATES: dict[str, tuple[str, ...]] = {
    "layers.{}.self_attn.q_proj.bias": ("heads*head_dim",),
    "layers.{}.self_attn.k_proj.bias": ("kv_heads*head_dim",),
    "layers.{}.self_attn.v_proj.bias": ("kv_heads*head_dim",),
    "layers.{}.self_attn.o_proj.bias": ("hidden_size",),
}


def _dim(config: Gemma3Config, name: str) -> int:
    aliases = {"heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads}
    result = 1
    for part in name.split("*"):
        result *= aliases[part] if part in aliases else getattr(config, part)
    return result


def expected_shapes(config: Gemma3Config) -> dict[str, tuple[int, ...]]:
    """Every decoder tensor the config implies, by canonical name (``model.layers.0...``)."""
    templates = dict(DECODER_TEMPLATES)
    if config.attention_bias:
        templates.update(BIAS_TEMPLATES)
    shapes = {}
    for template, dims in templates.items():
        shape = tuple(_dim(config, d) for d in dims)
        if "{}" in template:
            for i in range(config.num_hidden_layers):
                shapes["model." + template.format(i)] = shape
        else:
            shapes["model." + template] = shape
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    return shapes


@dataclass
class Checkpoint:
    """The decoder's tensors, memory-mapped, under canonical CausalLM names (``model.*``)."""

    tensors: dict[str, ir.ExternalTensor]
    files: list[Path]
    # The config the tensors were checked against: the one given, untied when the checkpoint
    # stores a head that differs from its embedding (build from this one).
    config: Gemma3Config


def find_safetensors(path: Path) -> tuple[list[Path], Path]:
    """Returns (safetensors files, folder holding config.json) for a folder or a single file."""
    if not path.exists():
        raise GemmaOnnxError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise GemmaOnnxError(f"{path}: expected a .safetensors file or a model folder")
        return [path], path.parent
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise GemmaOnnxError(f"{index}: not a valid safetensors index ({exc!r})") from None
        except RecursionError:
            raise GemmaOnnxError(f"{index}: JSON nested too deeply to be an index") from None
        # Shards sit beside the index (as HF writes them): a bare file name, nothing else.
        odd = [s for s in shards if not isinstance(s, str) or not s or Path(s).name != s]
        if odd or not shards:
            raise GemmaOnnxError(
                f"{index}: 'weight_map' must map tensor names to shard file names in "
                f"{path}, found {odd[:3] if odd else 'no shards'}"
            )
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise GemmaOnnxError(f"{index}: names missing shard file(s): {', '.join(missing)}")
        return [path / s for s in shards], path
    single = path / "model.safetensors"
    if single.is_file():
        return [single], path
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise GemmaOnnxError(f"{path}: no model.safetensors or model.safetensors.index.json")
    return found, path


def _open_file(path: Path) -> dict[str, ir.ExternalTensor]:
    """Validates one safetensors file with the safetensors library, then maps its tensors."""
    try:  # safetensors reports an unreadable file as a missing one
        path.open("rb").close()
    except OSError as exc:
        raise GemmaOnnxError(f"{path}: cannot read it ({exc.strerror})") from None
    try:
        with safe_open(str(path), framework="numpy") as handle:
            names = list(handle.keys())
            dtypes = {name: handle.get_slice(name).get_dtype() for name in names}
    except (SafetensorError, OSError, ValueError) as exc:
        raise GemmaOnnxError(f"{path}: not a valid safetensors file ({exc})") from None
    with path.open("rb") as file:
        (header_size,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(header_size))
    data_start = 8 + header_size
    resolved = path.resolve()
    tensors = {}
    for name in names:
        entry = header[name]
        if dtypes[name] not in SUPPORTED_DTYPES:
            raise GemmaOnnxError(
                f"{path}: tensor {name!r} has dtype {dtypes[name]}; supported: "
                + ", ".join(SUPPORTED_DTYPES)
            )
        begin, end = entry["data_offsets"]
        tensors[name] = ir.ExternalTensor(
            # The resolved file: Hugging Face's hub cache links each snapshot file to a blob
            # elsewhere, and onnx_ir refuses external data reached through such a link.
            location=resolved.name,
            offset=data_start + begin,
            length=end - begin,
            dtype=SUPPORTED_DTYPES[dtypes[name]],
            shape=ir.Shape(entry["shape"]),
            name=name,
            base_dir=str(resolved.parent),
        )
    return tensors


def _canonical_name(name: str) -> str | None:
    """``model.language_model.layers.0...`` -> ``model.layers.0...``; None for vision weights."""
    if name.startswith(VISION_PREFIXES):
        return None
    for prefix, head in PREFIXES:
        if name == head:
            return "lm_head.weight"
        if name.startswith(prefix) and not name.startswith(VISION_PREFIXES):
            return "model." + name[len(prefix) :]
    return name


_LAYER = re.compile(r"\.(\d+)\.")


def _sort_key(name: str) -> tuple:
    match = _LAYER.search(name)
    return (int(match.group(1)) if match else -1, name)


def load_checkpoint(path: str | Path, config: Gemma3Config) -> Checkpoint:
    """Maps every decoder tensor and checks names and shapes against the config, all at once."""
    files, _ = find_safetensors(Path(path))
    tensors: dict[str, ir.ExternalTensor] = {}
    duplicates = []
    for file in files:
        for name, tensor in _open_file(file).items():
            canonical = _canonical_name(name)
            if canonical in tensors:  # in two shards, or under two checkpoint prefixes
                duplicates.append(canonical)
            if canonical is not None:
                tensors[canonical] = tensor

    if config.tie_word_embeddings and "lm_head.weight" in tensors:
        # Tied checkpoints sometimes store the head anyway, equal to the embedding: unused then.
        # One that differs is a head of its own that the config failed to untie (transformers 5
        # then keeps it, with a warning; 4.x overwrote it with the embedding).
        head, embedding = tensors["lm_head.weight"], tensors.get("model.embed_tokens.weight")
        if embedding is None or _same_values(head, embedding):
            del tensors["lm_head.weight"]
        else:
            config = replace(config, tie_word_embeddings=False)
    expected = expected_shapes(config)
    problems = []
    twice = sorted({name for name in duplicates if name in expected}, key=_sort_key)
    if twice:
        problems.append("stored twice: " + _names(twice))
    missing = sorted(set(expected) - set(tensors), key=_sort_key)
    unexpected = sorted(set(tensors) - set(expected), key=_sort_key)
    if missing:
        problems.append("missing: " + _names(missing))
    if unexpected:
        problems.append("unexpected: " + _names(unexpected))
    misshaped = []
    for name in sorted(set(expected) & set(tensors), key=_sort_key):
        found = tuple(tensors[name].shape.numpy())
        if found != expected[name]:
            misshaped.append(f"{name}: expected shape {list(expected[name])}, found {list(found)}")
    problems += misshaped[:_MAX_LISTED]
    if len(misshaped) > _MAX_LISTED:
        problems.append(f"... and {len(misshaped) - _MAX_LISTED} more mis-shaped tensors")
    if problems:
        if config.defaulted:
            defaults = ", ".join(f"{name} {getattr(config, name)}" for name in config.defaulted)
            problems.append(f"(config.json leaves these to transformers' defaults: {defaults})")
        where = files[0].parent
        raise GemmaOnnxError(
            f"{where}: checkpoint does not match config.json:\n  " + "\n  ".join(problems)
        )
    return Checkpoint(tensors=tensors, files=files, config=config)


def _same_values(a: ir.ExternalTensor, b: ir.ExternalTensor) -> bool:
    """Whether two stored tensors hold the same values, compared a slab of rows at a time."""
    if tuple(a.shape.numpy()) != tuple(b.shape.numpy()):
        return False
    x, y = a.numpy(), b.numpy()  # memory-mapped
    rows = max(1, (16 << 20) // max(1, x[:1].nbytes))
    for i in range(0, len(x), rows):
        u, v = x[i : i + rows], y[i : i + rows]
        if u.dtype != v.dtype:
            u, v = u.astype(np.float32), v.astype(np.float32)
        if not np.array_equal(u, v):
            return False
    return True


# An error lists this many tensor names per kind, then counts the rest: a config typo such as
# num_hidden_layers 9000 would otherwise print megabytes of names.
_MAX_LISTED = 12


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")
