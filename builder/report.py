"""Measured quality of a quantized build: teacher-forced top-1 agreement with the fp32 model.

Both graphs run over the same held-out text (``data/heldout.txt``: original prose written for
this purpose, ~600 tokens), chunk by chunk with their KV caches; at every position, the
quantized model's most likely next token either equals the fp32 model's or not. The fraction
that agree, the mean KL divergence of the quantized next-token distribution from fp32's (the
finer measure: on ~600 tokens, builds of equal KL were seen to differ by 2 points of
agreement, a dozen near-ties flipping) and the largest logit difference go into
``quality.json`` beside the model, so the number a user sees is measured on their build, not
quoted.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from gemma_onnx.builder.config import Gemma3Config

REPORT_FILE = "quality.json"


def _session(model_dir: Path) -> tuple[ort.InferenceSession, dict[str, str]]:
    """The session, with the settings the build recorded, and the model's metadata."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    for key, value in json.loads(metadata.get("gemma_onnx.session_config", "{}")).items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(
        str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    return session, metadata


class _Forward:
    """One session of either target run chunk by chunk over one row, its KV in numpy arrays:
    on the ORT target, buffers of all positions (or a sliding layer's fixed window) that
    past and present share; on the portable one, a past that starts empty and that each
    chunk's present (past + new) replaces."""

    def __init__(self, model_dir: Path, config: Gemma3Config, total: int):
        self.session, metadata = _session(model_dir)
        shared = metadata.get("gemma_onnx.kv_cache") == "shared"
        self.past = {}
        for spec in self.session.get_inputs():
            if spec.name.startswith("past_key_values."):
                if not shared:
                    length = 0
                elif isinstance(spec.shape[2], int):  # sliding_window_cache
                    length = spec.shape[2]
                else:
                    length = total
                shape = (1, config.num_key_value_heads, length, config.head_dim)
                self.past[spec.name] = np.zeros(shape, np.float32)
        self.outputs = ["logits"] + [n.replace("past_key_values", "present") for n in self.past]

    def __call__(self, ids: np.ndarray, start: int, end: int) -> np.ndarray:
        """Logits of positions start..end-1, [end - start, V], after the cached prefix."""
        feed = {
            "input_ids": ids[:, start:end],
            "attention_mask": np.ones((1, end), np.int64),
            "position_ids": np.arange(start, end, dtype=np.int64)[None],
            "logits_to_keep": np.array(end - start, np.int64),
            **self.past,
        }
        logits, *presents = self.session.run(self.outputs, feed)
        self.past = dict(zip(self.past, presents, strict=True))
        return logits[0]


def heldout_ids(tokenizer_file: Path, vocab_size: int) -> np.ndarray | None:
    """The held-out text as [1, T] ids with the model's own tokenizer (None without one)."""
    if not tokenizer_file.is_file():
        return None
    from tokenizers import Tokenizer

    text = resources.files("gemma_onnx.builder").joinpath("data/heldout.txt").read_text("utf-8")
    ids = Tokenizer.from_file(str(tokenizer_file)).encode(text).ids
    if not ids or max(ids) >= vocab_size:
        return None
    return np.array([ids], dtype=np.int64)


def measure_agreement(
    quantized_dir: Path,
    reference_dir: Path,
    config: Gemma3Config,
    ids: np.ndarray,
    chunk: int = 128,
) -> dict:
    """Teacher-forced top-1 agreement of two builds (either target) on ``ids``, in chunks of
    ``chunk`` positions so no [T, vocab] logits matrix is ever held whole."""
    total = ids.shape[1]
    reference = _Forward(reference_dir, config, total)
    quantized = _Forward(quantized_dir, config, total)
    agree, kl, max_diff = 0, 0.0, 0.0
    for start in range(0, total, chunk):
        end = min(start + chunk, total)
        expected, actual = reference(ids, start, end), quantized(ids, start, end)
        agree += int((expected.argmax(-1) == actual.argmax(-1)).sum())
        kl += kl_divergence_sum(expected, actual)
        max_diff = max(max_diff, float(np.abs(expected - actual).max()))
    return {
        "metric": "teacher-forced top-1 agreement with the fp32 build",
        "text": "gemma_onnx/builder/data/heldout.txt",
        "tokens": int(total),
        "top1_agreement": round(agree / total, 4),
        "mean_kl_nats": round(kl / total, 5),
        "max_abs_logit_diff": round(max_diff, 4),
    }


def kl_divergence_sum(expected: np.ndarray, actual: np.ndarray, rows: int = 16) -> float:
    """Sum over positions of KL(softmax(expected) || softmax(actual)) in nats, for [T, V]
    logits, ``rows`` positions at a time. With e, a each row's logits less their max and Z_e,
    Z_a their sums of exp, KL = sum(exp(e) * (e - a)) / Z_e - log Z_e + log Z_a: two
    float32 exps per logit, the sums in float64."""
    total = 0.0
    for start in range(0, len(expected), rows):
        e = expected[start : start + rows].astype(np.float32)
        a = actual[start : start + rows].astype(np.float32)
        e -= e.max(-1, keepdims=True)
        a -= a.max(-1, keepdims=True)
        weights = np.exp(e)
        z_e = weights.sum(-1, dtype=np.float64)
        z_a = np.exp(a).sum(-1, dtype=np.float64)
        cross = (weights * (e - a)).sum(-1, dtype=np.float64)
        total += float((cross / z_e - np.log(z_e) + np.log(z_a)).sum())
    return total


def write_quality_report(
    folder: Path, config: Gemma3Config, checkpoint, quantization: dict | None = None
) -> dict | None:
    """Builds the fp32 ORT-target reference inside ``folder`` (removed afterwards), measures
    the quantized model in ``folder`` against it and writes ``quality.json`` (with
    ``quantization``, the build's settings, when given). None when the folder has no
    tokenizer to read the held-out text with."""
    import shutil

    import onnx_ir as ir

    from gemma_onnx.builder.graph import build_graph

    ids = heldout_ids(folder / "tokenizer.json", config.vocab_size)
    if ids is None:
        return None
    reference_dir = folder / ".fp32-reference"
    reference_dir.mkdir()
    try:
        reference = build_graph(config, checkpoint, "fp32", "ort")
        ir.save(reference, reference_dir / "model.onnx", external_data="model.onnx_data")
        report = measure_agreement(folder, reference_dir, config, ids)
    finally:
        shutil.rmtree(reference_dir, ignore_errors=True)
    if quantization is not None:
        report["quantization"] = quantization
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report
