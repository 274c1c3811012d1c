"""Property tests for the builder's inputs: whatever config.json, index or safetensors bytes come
in, the answer is a valid load or a GemmaOnnxError, never another exception.

Why: a hand-edited config or a half-downloaded shard must get one clear line from the CLI, and any
other exception (KeyError, TypeError, struct.error, RecursionError, MemoryError) is a traceback.
Valid loads are checked too, so a property cannot pass by rejecting everything: a parsed config
is internally consistent, and a mapped tensor holds the bytes safetensors itself reads.

Example counts are modest so the file runs in well under a minute; ``GEMMA_ONNX_PROPERTY_SCALE=20``
runs twenty times as many (how the bugs these tests guard against were found).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save

from conftest import FULL, SLIDING, hard_text_config_kwargs, to_v4_config
from gemma_onnx.builder import build_model
from gemma_onnx.builder.config import Gemma3Config
from gemma_onnx.builder.weights import (
    Checkpoint,
    _open_file,
    expected_shapes,
    find_safetensors,
    load_checkpoint,
)
from gemma_onnx.errors import GemmaOnnxError

_SCALE = int(os.environ.get("GEMMA_ONNX_PROPERTY_SCALE", "1"))


def examples(n: int) -> settings:
    """``n`` examples (times the scale), no deadline: a build example takes a fraction of a
    second, and the first one pays for imports."""
    return settings(
        max_examples=n * _SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )


# ---- strategies --------------------------------------------------------------------------------

# Values a careless edit leaves in a config field: wrong types, signs, sizes and non-finite floats.
ODD_VALUES = st.sampled_from(
    [0, -1, 1, 2, 3, 7, 64, 2**31, 2**63, 10**30, 0.5, 2.0, 1e-320, 1e308, -0.0]
    + [float("nan"), float("inf"), -float("inf"), True, False, None, "", "64", "linear"]
    + [SLIDING, FULL, "default", [], {}, [SLIDING], {"rope_type": "linear"}]
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=10,
)
# Field names worth adding to a config that lacks them, beside those already present.
EXTRA_FIELDS = [
    "head_dim",
    "sliding_window_pattern",
    "rope_scaling",
    "rope_theta",
    "rope_local_base_freq",
    "rope_parameters",
    "final_logit_softcapping",
    "hidden_activation",
    "hidden_act",
    "use_bidirectional_attention",
    "text_config",
    "model_type",
]


def _causal_config() -> dict:
    return {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        **hard_text_config_kwargs(),
    }


def _base_configs() -> list[dict]:
    """A transformers 5.x causal config, its 4.x form, and a 5.x ConditionalGeneration one."""
    causal = _causal_config()
    conditional = {
        "model_type": "gemma3",
        "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": {**causal, "model_type": "gemma3_text"},
        "tie_word_embeddings": True,
    }
    return [causal, to_v4_config(causal, pattern=2), conditional]


def _paths(node: object, prefix: tuple = ()) -> Iterator[tuple]:
    """Every key path inside a JSON value, parents before children."""
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, child in items:
        yield (*prefix, key)
        yield from _paths(child, (*prefix, key))


def _at(node: object, path: tuple) -> object:
    for key in path:
        node = node[key]
    return node


@st.composite
def mutated_configs(draw: st.DrawFn) -> dict:
    """A valid config with one to three fields deleted, replaced or added."""
    config = copy.deepcopy(draw(st.sampled_from(_base_configs())))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(config))
        path = draw(st.sampled_from(paths)) if paths else ("model_type",)
        parent = _at(config, path[:-1])
        value = copy.deepcopy(draw(ODD_VALUES | JSON_VALUES))  # later mutations edit it
        action = draw(st.sampled_from(["delete", "replace", "add"]))
        if action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(EXTRA_FIELDS))] = value
        else:
            parent[path[-1]] = value
    return config


ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I8": 1, "U8": 1, "BOOL": 1, "I64": 8}
# Three in four tensors get a dtype the loader maps, so that many files load and their mapping
# gets checked; the rest get one it refuses or safetensors does not know.
MAPPED_DTYPES = ["F32", "F16", "BF16"]
OTHER_DTYPES = ["F64", "I8", "U8", "BOOL", "I64", "F8_E4M3", "", "f32", "XX"]
TENSOR_NAMES = st.sampled_from(["a", "b", "model.norm.weight", "é", "x" * 300, "__metadata__"])


@st.composite
def safetensors_files(draw: st.DrawFn) -> bytes:
    """Files laid out as safetensors: half consistent, half with one defect (a header field, the
    header length or the data length wrong)."""
    defect = draw(st.sampled_from([None, None, None, "field", "declared", "data"]))
    header: dict = {}
    offset = 0
    dtypes = st.sampled_from(MAPPED_DTYPES * 3 + OTHER_DTYPES[:3]) | st.sampled_from(
        MAPPED_DTYPES + OTHER_DTYPES
    )
    specs = draw(
        st.lists(
            st.tuples(TENSOR_NAMES, dtypes, st.lists(st.integers(0, 4), max_size=3)), max_size=4
        )
    )
    for name, dtype, shape in specs:
        size = ITEMSIZE.get(dtype, 4) * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        values = st.text(max_size=4) | ODD_VALUES  # safetensors wants strings
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), values, max_size=2))
    if header and defect == "field":
        name = draw(st.sampled_from(sorted(header)))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
        if field is None or not isinstance(header[name], dict):
            header[name] = draw(ODD_VALUES | JSON_VALUES)
        else:
            header[name][field] = draw(ODD_VALUES | JSON_VALUES)
    text = json.dumps(header).encode() + b" " * draw(st.integers(0, 8))
    declared = len(text)
    if defect == "declared":
        declared += draw(st.sampled_from([-1, 1, -8, 2**40, 2**64]))
        declared = min(max(declared, 0), 2**64 - 1)
    data = draw(st.binary(min_size=offset, max_size=offset))
    if defect == "data":
        data = data[: draw(st.sampled_from([max(len(data) - 1, 0), 0]))]
        data += draw(st.sampled_from([b"", b"\0", b"\0" * 16]))
    return struct.pack("<Q", declared) + text + data


@st.composite
def mutated_bytes(draw: st.DrawFn, original: bytes) -> bytes:
    """``original`` with up to three edits: a byte of the header or of the data overwritten
    (data edits keep the file valid, and may make NaNs), the file cut short or extended."""
    data = bytearray(original)
    (header_size,) = struct.unpack("<Q", original[:8])
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["header", "data", "data", "cut", "extend"]))
        if kind == "header" and data:
            end = min(8 + header_size, len(data))
            data[draw(st.integers(0, end - 1))] = draw(st.integers(0, 255))
        elif kind == "data" and len(data) > 8 + header_size:
            data[draw(st.integers(8 + header_size, len(data) - 1))] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[draw(st.integers(0, len(data))) :]
        elif kind == "extend":
            data += draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


# ---- a micro checkpoint the loader and the build can check quickly -----------------------------

MICRO = {
    "model_type": "gemma3_text",
    "vocab_size": 8,
    "hidden_size": 4,
    "intermediate_size": 6,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 2,
    "max_position_embeddings": 64,
}


def _micro_weights() -> dict[str, np.ndarray]:
    config = Gemma3Config.from_dict(MICRO)
    rng = np.random.default_rng(0)
    return {
        name: rng.standard_normal(shape).astype(np.float32)
        for name, shape in expected_shapes(config).items()
    }


MICRO_BYTES = save(_micro_weights())


def _write(folder: Path, config: object, weights: bytes) -> None:
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "model.safetensors").write_bytes(weights)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One folder reused by every example (hypothesis forbids function-scoped fixtures)."""
    return tmp_path_factory.mktemp("properties")


def _fresh(scratch: Path) -> Path:
    folder = scratch / "case"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder


# ---- config.json -------------------------------------------------------------------------------


def _check_valid_config(config: Gemma3Config) -> None:
    """What every accepted config promises the graph builder."""
    assert len(config.layer_types) == config.num_hidden_layers
    assert set(config.layer_types) <= {SLIDING, FULL}
    assert config.head_dim % 2 == 0
    assert config.num_attention_heads % config.num_key_value_heads == 0
    assert set(config.rope) == {SLIDING, FULL}
    for rope in config.rope.values():
        assert math.isfinite(rope.theta) and rope.theta > 0
        assert math.isfinite(rope.factor) and rope.factor > 0
    for value in (config.rms_norm_eps, config.attn_scale, config.embed_scale):
        assert math.isfinite(value) and value > 0
    assert all(dim > 0 for shape in expected_shapes(config).values() for dim in shape)


def _parse(raw: object) -> Gemma3Config | None:
    try:
        config = Gemma3Config.from_dict(raw)
    except GemmaOnnxError:
        return None
    _check_valid_config(config)
    return config


@examples(150)
@given(mutated_configs())
def test_mutated_configs_parse_or_fail_cleanly(raw):
    event("config accepted" if _parse(raw) else "config refused")


@examples(100)
@given(JSON_VALUES | st.dictionaries(st.sampled_from([*MICRO, *EXTRA_FIELDS]), ODD_VALUES))
def test_random_json_configs_parse_or_fail_cleanly(raw):
    event("config accepted" if _parse(raw) else "config refused")


@examples(60)
@given(st.binary(max_size=64) | st.sampled_from([b"[" * 5_000, b'{"a":' * 5_000]))
def test_config_file_bytes_read_or_fail_cleanly(scratch, data):
    path = _fresh(scratch) / "config.json"
    path.write_bytes(data)
    try:
        Gemma3Config.from_file(path)
    except GemmaOnnxError as exc:
        assert str(path) in str(exc)


def test_every_base_config_is_valid():
    """The mutation bases themselves parse, so mutations start from a working config."""
    for raw in _base_configs():
        assert _parse(raw) is not None


# ---- safetensors files and indexes -------------------------------------------------------------


def _check_mapping(path: Path, tensors: dict) -> None:
    """A valid load maps exactly the bytes safetensors itself reads."""
    with safe_open(str(path), framework="numpy") as handle:
        assert sorted(tensors) == sorted(handle.keys())
        for name, tensor in tensors.items():
            if handle.get_slice(name).get_dtype() in ("F32", "F16"):
                np.testing.assert_array_equal(tensor.numpy(), handle.get_tensor(name))
                tensor.release()


@examples(150)
@given(safetensors_files())
def test_safetensors_files_load_or_fail_cleanly(scratch, data):
    _load_or_fail_cleanly(scratch, data)


@examples(40)
@given(st.binary(max_size=64))
def test_random_bytes_fail_cleanly(scratch, data):
    _load_or_fail_cleanly(scratch, data)


def _load_or_fail_cleanly(scratch: Path, data: bytes) -> None:
    path = _fresh(scratch) / "model.safetensors"
    path.write_bytes(data)
    try:
        tensors = _open_file(path)
    except GemmaOnnxError as exc:
        assert str(path) in str(exc)
        event("file refused")
        return
    event(f"file mapped ({len(tensors)} tensors)")
    _check_mapping(path, tensors)


@examples(100)
@given(mutated_bytes(MICRO_BYTES))
def test_mutated_checkpoints_load_or_fail_cleanly(scratch, data):
    folder = _fresh(scratch)
    _write(folder, MICRO, data)
    try:
        checkpoint = load_checkpoint(folder, Gemma3Config.from_dict(MICRO))
    except GemmaOnnxError:
        event("checkpoint refused")
        return
    event("checkpoint loaded")
    assert isinstance(checkpoint, Checkpoint)
    _check_mapping(folder / "model.safetensors", checkpoint.tensors)


SHARD_NAMES = st.sampled_from(
    ["model.safetensors", "", ".", "..", "/etc/passwd", "../x.safetensors", "a\x00b", "missing"]
)


@examples(80)
@given(
    st.dictionaries(st.text(max_size=4), st.just("model.safetensors") | SHARD_NAMES, max_size=3)
    | st.dictionaries(st.text(max_size=4), ODD_VALUES | JSON_VALUES, max_size=3)
    | JSON_VALUES
)
def test_random_indexes_resolve_or_fail_cleanly(scratch, weight_map):
    folder = _fresh(scratch)
    _write(folder, MICRO, MICRO_BYTES)
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        files, source = find_safetensors(folder)
    except GemmaOnnxError:
        event("index refused")
        return
    event("index resolved")
    assert source == folder
    assert all(f.parent == folder and f.is_file() for f in files)


# ---- the whole build ---------------------------------------------------------------------------


@st.composite
def micro_cases(draw: st.DrawFn) -> tuple[object, bytes]:
    """The micro checkpoint with its config mutated, or its bytes, or both left as they are."""
    config: object = copy.deepcopy(MICRO)
    weights = MICRO_BYTES
    kind = draw(st.sampled_from(["config", "weights", "both"]))
    if kind in ("config", "both"):
        for _ in range(draw(st.integers(1, 2))):
            key = draw(st.sampled_from([*MICRO, *EXTRA_FIELDS]))
            config[key] = copy.deepcopy(draw(ODD_VALUES))
    if kind in ("weights", "both"):
        weights = draw(mutated_bytes(MICRO_BYTES))
    return config, weights


@examples(25)
@given(micro_cases())
def test_build_succeeds_or_fails_cleanly_and_leaves_nothing(scratch, case):
    config, weights = case
    folder = _fresh(scratch)
    source = folder / "weights"
    source.mkdir()
    _write(source, config, weights)
    output = folder / "out"
    try:
        build_model(source, output)
    except GemmaOnnxError:
        event("build refused")
        assert not output.exists()
    else:
        event("build written")
        assert (output / "model.onnx").is_file()
    left = sorted(p.name for p in folder.iterdir())
    assert left == (["out", "weights"] if output.exists() else ["weights"])
