"""Files that let other runtimes load a built folder as it is: onnxruntime-genai's
``genai_config.json`` and transformers.js's folder layout.

The graph already follows the portable I/O contract that optimum, transformers.js and
onnxruntime-genai feed; what differs between them is only the description they read beside it.
Everything here works from the JSON the builder has already written (``config.json``,
``generation_config.json``) and never imports a runtime.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import onnx

from gemma_onnx.errors import GemmaOnnxError

GENAI_CONFIG_FILE = "genai_config.json"
MODEL_FILE = "model.onnx"  # the names export.py writes
DATA_FILE = "model.onnx_data"
TRANSFORMERS_JS_SUBFOLDER = "onnx"  # transformers.js's default `subfolder` option


def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise GemmaOnnxError(f"token ids must be integers, found {value!r}")
    return list(values)


def genai_config(config_json: dict, generation: dict) -> dict[str, Any]:
    """onnxruntime-genai's description of the portable graph (schema of genai 0.18's builder).

    - ``type`` is ``gemma3_text``, the model type genai's own builder writes for
      Gemma3ForCausalLM; genai runs it as a plain decoder.
    - No ``sliding_window`` section: it would make genai keep a windowed KV cache, while our graph
      takes full-length KV on every layer and applies the window in its mask.
    - ``past_present_share_buffer`` is false: the portable graph concatenates past and new KV into
      a fresh ``present`` (shared buffers need a fixed-length, in-place KV graph).
    - eos ids come from generation_config first (Gemma 3 -it ends turns with 106 as well as 1).
    """

    def token(name: str) -> list[int]:
        return _token_ids(generation.get(name, config_json.get(name)))

    bos, eos, pad = token("bos_token_id"), token("eos_token_id"), token("pad_token_id")
    if not eos:
        raise GemmaOnnxError("generation_config.json and config.json name no eos_token_id")
    # HF Gemma3TextConfig's defaults, for configs that omit them.
    context = int(config_json.get("max_position_embeddings", 131_072))
    top_k = generation.get("top_k")
    top_p = generation.get("top_p")
    return {
        "model": {
            "bos_token_id": bos[0] if bos else None,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": config_json.get("head_dim", 256),  # HF's default too
                "hidden_size": config_json["hidden_size"],
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": config_json["num_attention_heads"],
                "num_hidden_layers": config_json["num_hidden_layers"],
                "num_key_value_heads": config_json["num_key_value_heads"],
            },
            "eos_token_id": eos,
            "pad_token_id": pad[0] if pad else eos[0],
            "type": "gemma3_text",
            "vocab_size": config_json["vocab_size"],
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": bool(generation.get("do_sample", False)),
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": float(generation.get("repetition_penalty", 1.0)),
            "temperature": float(generation.get("temperature", 1.0)),
            "top_k": int(top_k) if top_k is not None else 50,
            "top_p": float(top_p) if top_p is not None else 1.0,
        },
    }


def write_genai_config(folder: Path, config_json: dict, generation: dict) -> None:
    """Writes ``genai_config.json`` for the model file at the top of ``folder``."""
    config = genai_config(config_json, generation)
    (Path(folder) / GENAI_CONFIG_FILE).write_text(json.dumps(config, indent=4) + "\n")


# transformers.js names a model file by the dtype it holds (``dtype: "fp16"`` loads
# ``model_fp16.onnx``); it has no bf16 dtype, and ONNX Runtime Web has no bf16 kernels.
_TRANSFORMERS_JS_DTYPES = {1: "fp32", 10: "fp16"}  # ONNX element type -> transformers.js dtype
_TRANSFORMERS_JS_SUFFIX = {"fp32": "", "fp16": "_fp16"}


def _kv_elem_type(model: onnx.ModelProto) -> int:
    """ONNX element type of the first past key input: the dtype the whole graph computes in."""
    for value in model.graph.input:
        if value.name.startswith("past_key_values."):
            return value.type.tensor_type.elem_type
    raise GemmaOnnxError(f"{MODEL_FILE}: no past_key_values inputs; not a gemma-onnx model")


def write_transformers_js_layout(folder: Path) -> None:
    """Moves a built folder's model into transformers.js's layout, in place.

    transformers.js looks for ``onnx/model{suffix}.onnx`` (suffix ``""`` for fp32, ``"_fp16"``
    for fp16) and, in the browser, fetches external data only when ``config.json`` says so under
    ``transformers.js_config.use_external_data_format``; the data file must then be called
    ``model{suffix}.onnx_data``, and the ``location`` recorded in the graph must match it, since
    ONNX Runtime Web maps fetched files to tensors by that name. ``transformers.js_config.dtype``
    makes the right file the default, so callers need no options. ``genai_config.json``, if
    present, is pointed at the moved file; optimum finds ``onnx/*.onnx`` on its own.
    """
    folder = Path(folder)
    model_path = folder / MODEL_FILE
    if not model_path.is_file():
        raise GemmaOnnxError(f"{model_path}: not found; build the model first")
    model = onnx.load(str(model_path), load_external_data=False)
    elem_type = _kv_elem_type(model)
    if elem_type not in _TRANSFORMERS_JS_DTYPES:
        raise GemmaOnnxError(
            f"{model_path}: transformers.js runs fp32 and fp16 models only "
            f"(this one is {onnx.TensorProto.DataType.Name(elem_type).lower()})"
        )
    dtype = _TRANSFORMERS_JS_DTYPES[elem_type]
    stem = "model" + _TRANSFORMERS_JS_SUFFIX[dtype]
    name, data_name = f"{stem}.onnx", f"{stem}.onnx_data"

    target = folder / TRANSFORMERS_JS_SUBFOLDER
    target.mkdir(exist_ok=True)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = data_name
    os.replace(folder / DATA_FILE, target / data_name)
    onnx.save(model, str(target / name))
    model_path.unlink()

    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["transformers.js_config"] = {
        "dtype": dtype,
        "use_external_data_format": {name: 1},
    }
    config_path.write_text(json.dumps(config, indent=2) + "\n")

    genai_path = folder / GENAI_CONFIG_FILE
    if genai_path.is_file():
        genai = json.loads(genai_path.read_text(encoding="utf-8"))
        genai["model"]["decoder"]["filename"] = f"{TRANSFORMERS_JS_SUBFOLDER}/{name}"
        genai_path.write_text(json.dumps(genai, indent=4) + "\n")
