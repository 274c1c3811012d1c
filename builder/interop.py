"""Files that let other runtimes load a built folder as it is: onnxruntime-genai's
``genai_config.json`` and transformers.js's folder layout.

The graph already follows the portable I/O contract that optimum, transformers.js and
onnxruntime-genai feed; what differs between them is only the description they read beside it.
Everything here works from the JSON the builder has already written (``config.json``,
``generation_config.json``) and never imports a runtime.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gemma_onnx.errors import GemmaOnnxError

GENAI_CONFIG_FILE = "genai_config.json"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"
TRANSFORMERS_JS_SUBFOLDER = "onnx"  # transformers.js's default `subfolder` option


def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise GemmaOnnxError(f"token ids must be integers, found {value!r}")
    return list(values)


def genai_config(config_json: dict, generation: dict, filename: str = MODEL_FILE) -> dict[str, Any]:
    """onnxruntime-genai's description of the portable graph (schema of genai 0.18's builder).

    - ``type`` is ``gemma3_text``, the model type genai's own builder writes for
      Gemma3ForCausalLM; genai runs it as a plain decoder.
    - No ``sliding_window`` section: it would make genai keep a windowed KV cache, while our graph
      takes full-length KV on every layer and applies the window in its mask.
    - ``past_present_share_buffer`` is false: the portable graph concatenates past and new KV into
      a fresh ``present`` (shared buffers need a fixed-length, in-place KV graph).
    - eos ids come from generation_config first (Gemma 3 -it ends turns with 106 as well as 1).
    """
    bos = generation.get("bos_token_id", config_json.get("bos_token_id"))
    eos = _token_ids(generation.get("eos_token_id", config_json.get("eos_token_id")))
    if not eos:
        raise GemmaOnnxError("generation_config.json and config.json name no eos_token_id")
    pad = generation.get("pad_token_id", config_json.get("pad_token_id"))
    context = int(config_json.get("max_position_embeddings", 131_072))
    top_k = generation.get("top_k")
    top_p = generation.get("top_p")
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": config_json.get("head_dim", 256),
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
            "pad_token_id": pad if pad is not None else eos[0],
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
