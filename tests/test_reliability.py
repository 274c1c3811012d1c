"""Issue 7: bad input gets a clear error, and nothing is lost or half-written.

One test per case a careless user can hit. Each must exit non-zero with a short ``error: ...``
line naming the problem and the file, tensor or option (a traceback only with ``--debug``), and
a build must leave nothing at the output path and nothing beside it. Kills and Ctrl-C are real
signals sent to a real ``gemma-onnx build`` process, paused at the moment under test.

The checkpoint is written with numpy (no torch), big enough that every matrix goes to
model.onnx_data, so a kill mid-write leaves a partly written data file behind.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx_ir
import onnxruntime as ort
import pytest
from click.testing import CliRunner, Result
from safetensors.numpy import save_file
from test_runtime import write_tokenizer

from conftest import FULL, SLIDING
from gemma_onnx.api import Gemma, check_options
from gemma_onnx.builder import build_model
from gemma_onnx.builder.config import Gemma3Config
from gemma_onnx.builder.quantize import QuantConfig
from gemma_onnx.builder.weights import expected_shapes
from gemma_onnx.cli import main
from gemma_onnx.errors import GemmaOnnxError
from gemma_onnx.runtime import Sampler, SamplingConfig, Session
from gemma_onnx.runtime import generate as generate_ids

# A small Gemma 3 (both layer types, GQA) with room for a 2,000-token generation; the vocabulary
# matches test_runtime's tokenizer.
SMALL = {
    "model_type": "gemma3_text",
    "architectures": ["Gemma3ForCausalLM"],
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "sliding_window": 8,
    "layer_types": [SLIDING, FULL],
    "max_position_embeddings": 4096,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
}
STAGING = ".out.tmp-*"  # what a build to ``out`` writes into before the final rename


def small_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = expected_shapes(Gemma3Config.from_dict(SMALL))
    return {name: (rng.standard_normal(s) * 0.2).astype(np.float32) for name, s in shapes.items()}


def write_checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(SMALL))
    save_file(small_weights(), folder / "model.safetensors")
    return folder


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A good checkpoint; tests that damage one copy it first (see ``ckpt``)."""
    return write_checkpoint(tmp_path_factory.mktemp("small") / "weights")


@pytest.fixture
def ckpt(source, tmp_path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "ckpt"))


def run(*args: str, stdin: bytes | str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=stdin)


def assert_clean_error(result: Result, *fragments: str, lines: int = 1) -> None:
    """Exit 1 with an ``error: ...`` of ``lines`` lines ending stderr, naming every fragment;
    before it, at most the progress bar of a build that failed while writing.

    Under CliRunner an escaped exception prints no traceback: it lands in ``result.exception``,
    where a clean exit leaves the group's SystemExit.
    """
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 1, result.output
    start = result.stderr.find("error: ")
    assert start >= 0, result.stderr
    before = result.stderr[:start]
    assert not before.strip() or "converting weights" in before, result.stderr
    error = result.stderr[start:]
    assert error.count("\n") == lines and error.endswith("\n"), result.stderr
    for fragment in fragments:
        assert fragment in error, result.stderr


def assert_nothing_written(folder: Path) -> None:
    """The build's parent folder holds only what the test put there: no output, no staging."""
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt"]


# ---- build: bad input --------------------------------------------------------------------------


def _edit_config(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(ckpt: Path) -> None:
        config = json.loads((ckpt / "config.json").read_text())
        edit(config)
        (ckpt / "config.json").write_text(json.dumps(config))

    return damage


def _edit_weights(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(ckpt: Path) -> None:
        weights = small_weights()
        edit(weights)
        save_file(weights, ckpt / "model.safetensors")

    return damage


def _cut_file(ckpt: Path) -> None:
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])


def _write_file(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda ckpt: (ckpt / name).write_bytes(data)


def _shard(weight_map: dict) -> Callable[[Path], None]:
    def damage(ckpt: Path) -> None:
        (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00002.safetensors")
        index = {"metadata": {}, "weight_map": weight_map}
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))

    return damage


def _second_shard_with_norm(ckpt: Path) -> None:
    _shard({"model.norm.weight": "model-00001-of-00002.safetensors"})(ckpt)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["x"] = "model-00002-of-00002.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    norm = {"model.norm.weight": np.ones(64, np.float32)}
    save_file(norm, ckpt / "model-00002-of-00002.safetensors")


def _del(*names: str) -> Callable[[dict], None]:
    def edit(mapping: dict) -> None:
        for name in names:
            del mapping[name]

    return edit


def _poison(name: str, value: float) -> Callable[[dict], None]:
    def edit(weights: dict) -> None:
        weights[name][0, 0] = value

    return edit


def _many_tensor_problems(weights: dict) -> None:
    del weights["model.layers.1.self_attn.k_norm.weight"]
    weights["model.layers.0.mlp.extra.weight"] = np.zeros(3, np.float32)
    weights["model.layers.0.self_attn.q_proj.weight"] = np.zeros((8, 64), np.float32)


BUILD_CASES: dict[str, tuple[Callable[[Path], None], list[str], int]] = {
    # case: (damage to a copy of the checkpoint, fragments the error names, lines)
    "folder without config.json": (
        lambda ckpt: (ckpt / "config.json").unlink(),
        ["ckpt/config.json: config.json not found"],
        1,
    ),
    "architecture not Gemma 3": (
        _edit_config(lambda c: c.update(model_type="llama", architectures=["LlamaForCausalLM"])),
        ["config.json: not a Gemma 3 model (model_type 'llama')", "'gemma3_text'"],
        1,
    ),
    "architecture named only by architectures": (
        _edit_config(
            lambda c: (c.pop("model_type"), c.update(architectures=["MistralForCausalLM"]))
        ),
        ["not a Gemma 3 model (no model_type, architectures ['MistralForCausalLM'])"],
        1,
    ),
    "config leaving a size to transformers' default": (
        _edit_config(_del("num_key_value_heads")),
        [
            "checkpoint does not match config.json:",
            "model.layers.0.self_attn.k_proj.weight: expected shape [64, 64], found [32, 64]",
            "(config.json leaves these to transformers' defaults: num_key_value_heads 4)",
        ],
        6,
    ),
    "config typo of thousands of layers": (
        _edit_config(lambda c: (c.pop("layer_types"), c.update(num_hidden_layers=9000))),
        ["missing: model.layers.2.input_layernorm.weight", "and 116962 more"],
        2,
    ),
    "config field of the wrong type": (
        _edit_config(lambda c: c.update(hidden_size="64")),
        ["config.json: field 'hidden_size' has invalid value '64'"],
        1,
    ),
    "config field absurdly large": (
        _edit_config(lambda c: (c.pop("layer_types"), c.update(num_hidden_layers=10**12))),
        ["field 'num_hidden_layers' is implausibly large"],
        1,
    ),
    "config.json with a number beyond Python's 4300 digits": (
        _write_file("config.json", b'{"model_type": "gemma3_text", "vocab_size": 1' + b"0" * 5000),
        ["config.json: not a readable JSON config"],
        1,
    ),
    "eos id in config.json outside the vocabulary": (
        _edit_config(lambda c: c.update(eos_token_id=[1, 99999])),
        ["config.json: eos_token_id [1, 99999] is not a token id in [0, 320)"],
        1,
    ),
    "eos id in generation_config.json not an integer": (
        _write_file("generation_config.json", b'{"eos_token_id": [1, "x"]}'),
        ["generation_config.json: eos_token_id [1, 'x'] is not a token id in [0, 320)"],
        1,
    ),
    "config.json not JSON": (
        _write_file("config.json", b'{"model_type": "gemma3_text",'),
        ["config.json: not a readable JSON config"],
        1,
    ),
    "config.json nested too deeply": (
        _write_file("config.json", b"[" * 100_000),
        ["config.json: JSON nested too deeply"],
        1,
    ),
    "truncated safetensors": (
        _cut_file,
        ["model.safetensors: not a valid safetensors file", "not fully covered"],
        1,
    ),
    "garbage safetensors header": (
        _write_file("model.safetensors", b"\x10\0\0\0\0\0\0\0{garbage!garbage}" + b"\0" * 64),
        ["model.safetensors: not a valid safetensors file", "invalid JSON in header"],
        1,
    ),
    "safetensors header length beyond the file": (
        _write_file("model.safetensors", b"\xff" * 8 + b"{}"),
        ["model.safetensors: not a valid safetensors file", "header too large"],
        1,
    ),
    "empty safetensors file": (
        _write_file("model.safetensors", b""),
        ["model.safetensors: not a valid safetensors file", "header too small"],
        1,
    ),
    "index names a missing shard": (
        _shard({"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}),
        ["model.safetensors.index.json: names missing shard", "model-00002-of-00002.safetensors"],
        1,
    ),
    "index names a shard outside the folder": (
        _shard({"a": "model-00001-of-00002.safetensors", "b": "../model-00002.safetensors"}),
        ["model.safetensors.index.json: 'weight_map' must map", "'../model-00002.safetensors'"],
        1,
    ),
    "index not a weight map": (
        _shard({"a": 5}),
        ["model.safetensors.index.json: 'weight_map' must map tensor names", "[5]"],
        1,
    ),
    "missing, unexpected and mis-shaped tensors, all at once": (
        _edit_weights(_many_tensor_problems),
        [
            "checkpoint does not match config.json:",
            "missing: model.layers.1.self_attn.k_norm.weight",
            "unexpected: model.layers.0.mlp.extra.weight",
            "model.layers.0.self_attn.q_proj.weight: expected shape [64, 64], found [8, 64]",
        ],
        4,
    ),
    "tensor stored in two shards": (
        _second_shard_with_norm,
        ["stored twice: model.norm.weight"],
        2,
    ),
    "NaN weight": (
        _edit_weights(_poison("model.layers.1.mlp.down_proj.weight", np.nan)),
        ["tensor 'model.layers.1.mlp.down_proj.weight' contains NaN or infinite values"],
        1,
    ),
    "infinite weight": (
        _edit_weights(_poison("model.embed_tokens.weight", -np.inf)),
        ["tensor 'model.embed_tokens.weight' contains NaN or infinite values"],
        1,
    ),
    "unsupported dtype": (
        _edit_weights(lambda w: w.update({"model.norm.weight": np.ones(64, np.float64)})),
        ["tensor 'model.norm.weight' has dtype F64; supported: F32, F16, BF16"],
        1,
    ),
    "generation_config.json not an object": (
        _write_file("generation_config.json", b"[1, 106]"),
        ["generation_config.json: expected a JSON object"],
        1,
    ),
}


def test_build_of_a_path_that_does_not_exist(tmp_path):
    (tmp_path / "ckpt").mkdir()
    result = run("build", "--weights", str(tmp_path / "nope"), "--output", str(tmp_path / "out"))
    assert_clean_error(result, "nope: no such file or folder")
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("case", BUILD_CASES)
def test_bad_build_input_fails_in_one_clear_line_and_writes_nothing(case, ckpt, tmp_path):
    damage, fragments, lines = BUILD_CASES[case]
    damage(ckpt)
    result = run("build", "--weights", str(ckpt), "--output", str(tmp_path / "out"))
    assert_clean_error(result, *fragments, lines=lines)
    assert_nothing_written(tmp_path)


def test_output_under_a_file_fails_cleanly(ckpt, tmp_path):
    result = run("build", "--weights", str(ckpt), "--output", str(ckpt / "config.json" / "out"))
    assert_clean_error(result, "could not write the model")
    assert_nothing_written(tmp_path)


def test_output_through_a_symlink_loop_fails_cleanly(ckpt, tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    result = run("build", "--weights", str(ckpt), "--output", str(tmp_path / "a" / "out"))
    assert_clean_error(result, "cannot resolve the path")


def test_an_output_that_is_a_source_file_is_refused_even_with_overwrite(ckpt, tmp_path):
    """--overwrite replaces the output: never one of the inputs (the weights file given as
    --weights, config.json), nor, through a symlink, what one of them links to."""
    before = {f.name: f.read_bytes() for f in ckpt.iterdir()}
    (tmp_path / "link").symlink_to(ckpt / "model.safetensors")
    cases = [
        (ckpt / "model.safetensors", ckpt / "model.safetensors"),
        (ckpt, ckpt / "config.json"),
        (ckpt, tmp_path / "link"),
    ]
    for weights, output in cases:
        result = run("build", "--weights", str(weights), "--output", str(output), "--overwrite")
        assert_clean_error(result, str(output), "is one of the source's files")
    assert {f.name: f.read_bytes() for f in ckpt.iterdir()} == before
    (tmp_path / "link").unlink()
    assert_nothing_written(tmp_path)


def test_an_output_name_near_the_filesystem_limit_builds(ckpt, tmp_path):
    """The staging folder beside the output is named after it: a 250-character output name
    (NAME_MAX is 255) must not make that name too long."""
    output = tmp_path / ("m" * 250)
    result = run("build", "--weights", str(ckpt), "--output", str(output))
    assert result.exit_code == 0, result.output
    assert (output / "model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", output.name]


def test_an_output_that_is_no_folder_or_file_is_refused(ckpt, tmp_path):
    """A FIFO (or a device) and a dangling symlink at --output: a one-line error before any
    conversion, with or without --overwrite, and the path left as it was."""
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for name, message in (("fifo", "is not a folder or a file"), ("dangling", "broken symbolic")):
        for extra in ((), ("--overwrite",)):
            output = str(tmp_path / name)
            result = run("build", "--weights", str(ckpt), "--output", output, *extra)
            assert_clean_error(result, output, message)
    assert (tmp_path / "fifo").is_fifo() and (tmp_path / "dangling").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "dangling", "fifo"]


def test_a_broken_tokenizer_fails_before_converting(ckpt, tmp_path):
    """It would be copied into a folder whose text prompts then fail (and an int4 build's
    quality measurement reads it): refused up front, by name."""
    write_tokenizer(ckpt)
    (ckpt / "tokenizer.json").write_text('{"bad": ')
    for precision in ("fp32", "int4"):
        result = run(
            "build", "--weights", str(ckpt), "--output", str(tmp_path / "out"),
            "--precision", precision,
        )  # fmt: skip
        assert_clean_error(result, "tokenizer.json: not a readable tokenizer")
        assert "converting" not in result.stderr
    assert_nothing_written(tmp_path)


def test_output_at_the_current_folder_or_above_is_refused(ckpt, tmp_path, monkeypatch):
    """``--output . --overwrite`` would swap the folder the user stands in (and fail doing it)."""
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    for output in (".", ".."):
        result = run("build", "--weights", str(ckpt), "--output", output, "--overwrite")
        assert_clean_error(result, "the output folder would contain the current folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "work"]
    assert [p.name for p in work.parent.iterdir()] == ["here"] and not any(work.iterdir())


@pytest.mark.parametrize(
    "options",
    [
        ["--block-size", "64"],
        ["--accuracy-level", "0", "--layer-bits", "4"],
        ["--rescore-top", "8"],
        ["--no-quality"],
    ],
)
def test_quantization_options_without_quantization_are_refused(ckpt, tmp_path, options):
    result = run("build", "--weights", str(ckpt), "--output", str(tmp_path / "out"), *options)
    names = [o for o in options if o.startswith("--")]
    verb = "applies" if len(names) == 1 else "apply"
    assert_clean_error(result, f"only {verb} to --precision int8 or int4 (not fp32)")
    assert all(name in result.stderr for name in names)
    assert_nothing_written(tmp_path)


def test_quality_asked_for_without_a_tokenizer_is_refused(ckpt, tmp_path):
    """By default a source without tokenizer.json builds unmeasured, with a note; an explicit
    --quality cannot be honoured, and says so before converting."""
    args = ["build", "--weights", str(ckpt), "--precision", "int4"]
    result = run(*args, "--output", str(tmp_path / "out"), "--quality")
    assert_clean_error(result, "--quality reads the held-out text", "tokenizer.json")
    assert_nothing_written(tmp_path)
    result = run(*args, "--output", str(tmp_path / "out"))
    assert result.exit_code == 0 and "quality: not measured" in result.stderr


def test_accuracy_level_on_the_portable_target_is_refused(ckpt, tmp_path):
    """Its DequantizeLinear graph has no accuracy level: the runtime that fuses it chooses."""
    result = run(
        "build", "--weights", str(ckpt), "--output", str(tmp_path / "out"),
        "--precision", "int4", "--accuracy-level", "0",
    )  # fmt: skip
    assert_clean_error(result, "--accuracy-level applies to --target ort")
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--target", "ort", "--rescore-top", "-1"], "--rescore-top must be from 0 to 4096"),
        (["--rescore-top", "8"], "--rescore-top applies to --target ort"),  # portable
    ],
)
def test_rescore_top_out_of_range_or_target_is_refused(ckpt, tmp_path, options, message):
    out = str(tmp_path / "out")
    result = run("build", "--weights", str(ckpt), "--output", out, "--precision", "int4", *options)
    assert_clean_error(result, message)
    assert_nothing_written(tmp_path)


# ---- build: the output folder ------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_a_build_flushes_its_files_and_leaves_the_weights_uncached(ckpt, tmp_path, monkeypatch):
    """Every file is on disk before the folder is renamed into place, and the data file's page
    cache is dropped: the first run after a build must not map the build's large cached folios
    (Gemma 3 270M int4: 0.54 GB peak RSS instead of 0.46; README, "Quantization")."""
    from gemma_onnx.builder import build_model

    synced, dropped = [], []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def fadvise(fd, offset, length, advice):
        dropped.append((Path(os.readlink(f"/proc/self/fd/{fd}")).name, offset, length, advice))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    out = build_model(ckpt, tmp_path / "out")
    assert {p.name for p in synced} == {p.name for p in out.iterdir()}
    assert all(p.parent != out for p in synced), "synced before the rename, in the staging folder"
    assert dropped == [("model.onnx_data", 0, 0, os.POSIX_FADV_DONTNEED)]


def test_an_output_filled_while_building_is_not_replaced(ckpt, tmp_path, monkeypatch):
    """Two builds to one folder: the one that finishes second says so and touches nothing."""
    import gemma_onnx.builder.export as export

    out = tmp_path / "out"
    real = export.load_checkpoint

    def meanwhile(*args, **kwargs):
        out.mkdir()
        (out / "model.onnx").write_text("the other build's")
        return real(*args, **kwargs)

    monkeypatch.setattr(export, "load_checkpoint", meanwhile)
    result = run("build", "--weights", str(ckpt), "--output", str(out))
    assert_clean_error(result, "out: already exists (written while this build ran)")
    assert [p.name for p in out.iterdir()] == ["model.onnx"]
    assert (out / "model.onnx").read_text() == "the other build's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]


def test_existing_output_is_never_touched_without_overwrite(ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model.onnx").write_text("an older model")
    before = _snapshot(out)
    assert_clean_error(
        run("build", "--weights", str(ckpt), "--output", str(out)), "already exists", "--overwrite"
    )
    assert _snapshot(out) == before
    file_output = tmp_path / "file"
    file_output.write_text("mine")
    result = run("build", "--weights", str(ckpt), "--output", str(file_output))
    assert_clean_error(result, "already exists")
    assert file_output.read_text() == "mine"


def test_a_failed_overwrite_keeps_the_old_output(ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _edit_weights(_poison("model.layers.0.mlp.up_proj.weight", np.nan))(ckpt)
    result = run("build", "--weights", str(ckpt), "--output", str(out), "--overwrite")
    assert_clean_error(result, "model.layers.0.mlp.up_proj.weight", "NaN")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]


def _save_failing_at(
    monkeypatch: pytest.MonkeyPatch, exc: BaseException, tensor: int = 3
) -> list[Path]:
    """Make onnx_ir.save raise ``exc`` as it starts writing tensor number ``tensor`` (earlier
    tensors are in model.onnx_data by then); returns where the staging folder was seen."""
    real_save = onnx_ir.save
    seen: list[Path] = []

    def save(model, path, *args, callback=None, **kwargs):
        count = 0

        def hook(value, info) -> None:
            nonlocal count
            count += 1
            if count == tensor:
                seen.append(Path(path).parent)
                assert list(Path(path).parent.rglob("model.onnx_data")), "none written yet"
                raise exc
            if callback is not None:
                callback(value, info)

        return real_save(model, path, *args, callback=hook, **kwargs)

    monkeypatch.setattr(onnx_ir, "save", save)
    return seen


def test_disk_full_mid_write_fails_cleanly_and_leaves_nothing(ckpt, tmp_path, monkeypatch):
    seen = _save_failing_at(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    result = run("build", "--weights", str(ckpt), "--output", str(tmp_path / "out"))
    assert_clean_error(
        result, "out: could not write the model (No space left on device); the disk is full"
    )
    assert seen and seen[0].name.startswith(".out.tmp-")
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json"])
def test_an_unreadable_source_file_is_named_before_the_build(name, ckpt, tmp_path, monkeypatch):
    """Permission denied on a source file says so (safetensors itself calls the file missing),
    and a tokenizer file, copied last, is checked before minutes of conversion."""
    write_tokenizer(ckpt)
    real_open = Path.open

    def open_(self, *args, **kwargs):
        if self.name == name and self.parent == ckpt:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)
    result = run("build", "--weights", str(ckpt), "--output", str(tmp_path / "out"))
    assert_clean_error(result, f"ckpt/{name}: cannot read it (Permission denied)")
    assert_nothing_written(tmp_path)


def test_ctrl_c_mid_write_leaves_nothing(ckpt, tmp_path, monkeypatch):
    _save_failing_at(monkeypatch, KeyboardInterrupt())
    result = run("build", "--weights", str(ckpt), "--output", str(tmp_path / "out"))
    assert isinstance(result.exception, SystemExit) and result.exit_code == 130
    assert result.stderr.endswith("\ninterrupted\n")
    assert_nothing_written(tmp_path)


# A real `gemma-onnx build` that pauses at a chosen moment, writing a marker file, until a signal
# arrives: "mid-write" as it starts writing the third tensor to model.onnx_data (which onnx_ir
# writes in a folder of its own inside the staging folder), "before-rename" with every file
# written and the staging folder about to become the output.
PAUSING_BUILD = """
import os, sys, time
from pathlib import Path
import onnx_ir
from gemma_onnx.cli import main

marker, moment = Path(sys.argv[1]), sys.argv[2]
real_save, real_replace = onnx_ir.save, os.replace

def pause():
    marker.write_text(moment)
    time.sleep(600)

def save(model, path, *args, callback=None, **kwargs):
    count = 0
    def hook(tensor, info):
        nonlocal count
        count += 1
        if callback is not None:
            callback(tensor, info)
        if moment == "mid-write" and count == 3:
            pause()
    return real_save(model, path, *args, callback=hook, **kwargs)

def replace(src, dst, *args, **kwargs):
    if moment == "before-rename" and Path(src).name.startswith(f".{Path(dst).name}.tmp-"):
        pause()
    return real_replace(src, dst, *args, **kwargs)

onnx_ir.save, os.replace = save, replace
main(sys.argv[3:], prog_name="gemma-onnx")
"""


@contextmanager
def paused_build(source: Path, output: Path, moment: str) -> Iterator[subprocess.Popen]:
    marker = output.parent / f"paused-{moment}"
    args = ["build", "--weights", str(source), "--output", str(output)]
    process = subprocess.Popen(
        [sys.executable, "-c", PAUSING_BUILD, str(marker), moment, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as in a terminal, even when the test runner was started with SIGINT ignored
        # (a background job of a non-interactive shell): Python ignores it too then.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the build never reached the pause"
            time.sleep(0.05)
        marker.unlink()
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        if not process.stderr.closed:  # the test may have read it already
            process.communicate()


@pytest.mark.parametrize("moment", ["mid-write", "before-rename"])
def test_sigkill_leaves_nothing_at_the_output_and_the_next_build_cleans_up(
    moment, ckpt, tmp_path, caplog
):
    out = tmp_path / "out"
    with paused_build(ckpt, out, moment) as process:
        (staging,) = tmp_path.glob(STAGING)
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
    assert not out.exists()
    assert list(staging.rglob("model.onnx_data")), "killed after the data file was started"
    if moment == "before-rename":
        complete = {"config.json", "generation_config.json", "model.onnx", "model.onnx_data"}
        assert complete <= {p.name for p in staging.iterdir()}

    result = run("build", "--weights", str(ckpt), "--output", str(out))
    assert result.exit_code == 0, result.output
    assert f"removed {staging}, left by an interrupted build" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]
    assert (out / "model.onnx").is_file()


def test_a_live_builds_folder_is_spared_and_ctrl_c_removes_it(ckpt, tmp_path, caplog):
    out = tmp_path / "out"
    with paused_build(ckpt, out, "mid-write") as process:
        (staging,) = tmp_path.glob(STAGING)
        result = run("build", "--weights", str(ckpt), "--output", str(out))
        assert result.exit_code == 0, result.output
        assert staging.is_dir(), "a build still writing must keep its folder"
        assert "interrupted build" not in caplog.text
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.splitlines()[-1] == "interrupted" and "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]
    assert (out / "model.onnx").is_file()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_mid_write_clean_up_as_ctrl_c_does(sig, ckpt, tmp_path):
    """`kill` or a closed terminal ends a build through its cleanup, not mid-write."""
    with paused_build(ckpt, tmp_path / "out", "mid-write") as process:
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.splitlines()[-1] == "interrupted" and "Traceback" not in stderr
    assert_nothing_written(tmp_path)


# ---- the command itself ------------------------------------------------------------------------


def test_a_full_stdout_is_one_line_not_a_traceback(model_dir):
    with open("/dev/full", "w") as full:  # Linux: every write fails with ENOSPC
        done = subprocess.run(
            [sys.executable, "-m", "gemma_onnx", "generate", "--model", str(model_dir),
             "--threads", "1", "--max-new-tokens", "2", "hello"],
            stdout=full, stderr=subprocess.PIPE, text=True, timeout=300,
        )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr == "error: could not write to standard output (No space left on device)\n"


def _module(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gemma_onnx", *args], capture_output=True, input=stdin, timeout=120
    )


def test_python_m_gemma_onnx_help():
    result = _module("--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    assert "Usage: python -m gemma_onnx" in text or "Usage: gemma-onnx" in text
    assert "build" in text and "generate" in text and "--debug" in text


def test_real_exit_code_one_line_and_debug_traceback(tmp_path):
    args = ("build", "--weights", str(tmp_path / "nope"), "--output", str(tmp_path / "out"))
    plain = _module(*args)
    assert plain.returncode == 1
    assert plain.stderr.decode() == f"error: {tmp_path / 'nope'}: no such file or folder\n"
    debug = _module("--debug", *args)
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr.decode() and "GemmaOnnxError" in debug.stderr.decode()


# ---- generate ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_factory(tmp_path_factory, source) -> Callable[[str], Path]:
    """``model_factory(target)``: SMALL with test_runtime's tokenizer, built once per target."""
    weights = Path(shutil.copytree(source, tmp_path_factory.mktemp("gen") / "weights"))
    write_tokenizer(weights)
    built: dict[str, Path] = {}

    def get(target: str) -> Path:
        if target not in built:
            built[target] = build_model(weights, weights.parent / target, target=target)
        return built[target]

    return get


@pytest.fixture(scope="module")
def model_dir(model_factory) -> Path:
    return model_factory("portable")


@pytest.fixture
def model_copy(model_dir, tmp_path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "model"))


def generate(model: Path, *args: str, stdin: bytes | str | None = None) -> Result:
    return run("generate", "--model", str(model), "--threads", "1", *args, stdin=stdin)


def _config_edit(**fields: object) -> Callable[[Path], None]:
    def damage(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        config.update(fields)
        (model / "config.json").write_text(json.dumps(config))

    return damage


def _cut(name: str) -> Callable[[Path], None]:
    def damage(model: Path) -> None:
        data = (model / name).read_bytes()
        (model / name).write_bytes(data[: len(data) // 2])

    return damage


MODEL_CASES: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "folder without model.onnx": (
        lambda model: (model / "model.onnx").unlink(),
        ["model/model.onnx not found; build it with `gemma-onnx build`"],
    ),
    "truncated model.onnx": (_cut("model.onnx"), ["model.onnx: onnxruntime cannot load it"]),
    "truncated model.onnx_data": (
        _cut("model.onnx_data"),
        ["model.onnx: onnxruntime cannot load it", "out of bounds"],
    ),
    "missing model.onnx_data": (
        lambda model: (model / "model.onnx_data").unlink(),
        ["model.onnx: onnxruntime cannot load it", "model.onnx_data"],
    ),
    "folder without config.json": (
        lambda model: (model / "config.json").unlink(),
        ["config.json not found; is this a gemma-onnx model folder?"],
    ),
    "config.json with more layers than the graph": (
        _config_edit(num_hidden_layers=3),
        ["graph lacks past_key_values.2.key", "for 3 layers (config.json)"],
    ),
    "config.json with fewer layers than the graph": (
        _config_edit(num_hidden_layers=1),
        ["graph needs inputs this runtime cannot feed", "past_key_values.1.key"],
    ),
    "config.json head_dim not the graph's": (
        _config_edit(head_dim=8),
        ["disagrees with config.json (num_key_value_heads 2, head_dim 8)"],
    ),
    "config.json kv heads not the graph's": (
        _config_edit(num_key_value_heads=4),
        ["disagrees with config.json (num_key_value_heads 4, head_dim 16)"],
    ),
    "tokenizer.json broken": (
        lambda model: (model / "tokenizer.json").write_text("{"),
        ["tokenizer.json: cannot load the tokenizer"],
    ),
    "tokenizer.json missing": (
        lambda model: (model / "tokenizer.json").unlink(),
        ["has no tokenizer.json, which gemma-onnx generate needs to read the prompt"],
    ),
    "tokenizer.json of a model with a larger vocabulary": (
        lambda model: _grow_tokenizer(model / "tokenizer.json", "hello"),
        ["tokenizer.json gives token id 320,", "outside the model's vocabulary [0, 320)"],
    ),
    "a folder in transformers.js's layout": (
        lambda model: ((model / "onnx").mkdir(), (model / "model.onnx").unlink()),
        ["has the transformers.js layout (onnx/)", "built without --layout"],
    ),
}


def _grow_tokenizer(path: Path, word: str) -> None:
    """A tokenizer with ``word`` as one token past the model's 320 ids, as a bigger sibling
    model's tokenizer would give."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.add_tokens([word])
    tokenizer.save(str(path))


SESSION_CASES: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "empty model.onnx": (
        lambda model: (model / "model.onnx").write_bytes(b""),
        ["model.onnx: onnxruntime cannot load it"],
    ),
    "config.json vocab_size not the graph's": (
        _config_edit(vocab_size=300),
        ["logits have 320 entries but config.json says vocab_size 300"],
    ),
    "generation_config eos id not an integer": (
        lambda model: (model / "generation_config.json").write_text('{"eos_token_id": [1, "a"]}'),
        ["eos_token_id 'a'", "not a token id in [0, 320)"],
    ),
    "generation_config pad id outside the vocabulary": (
        lambda model: (model / "generation_config.json").write_text('{"pad_token_id": 99999}'),
        ["pad_token_id 99999", "not a token id in [0, 320)"],
    ),
    "generation_config nested too deeply": (
        lambda model: (model / "generation_config.json").write_text("[" * 100_000 + "]" * 100_000),
        ["generation_config.json: JSON nested too deeply"],
    ),
}


@pytest.mark.parametrize("case", {**MODEL_CASES, **SESSION_CASES})
def test_broken_model_folder_fails_in_one_clear_line(case, model_copy):
    damage, fragments = {**MODEL_CASES, **SESSION_CASES}[case]
    damage(model_copy)
    assert_clean_error(generate(model_copy, "--max-new-tokens", "2", "hello"), *fragments)


def test_model_path_that_is_a_file_is_named_as_such(model_dir):
    result = generate(model_dir / "model.onnx", "hello")
    assert_clean_error(result, "model.onnx is a file; pass the model folder that holds it")


def test_model_path_that_is_a_gguf_says_to_build_it(tmp_path):
    gguf = tmp_path / "gemma-3-270m.Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    result = generate(gguf, "hello")
    assert_clean_error(result, "is a GGUF file; build a model folder from it first")
    assert f"gemma-onnx build --weights {gguf} --output DIR" in result.output


def test_prompt_longer_than_the_context_is_refused_with_the_limit(model_dir):
    prompt = "the quick brown fox " * 8  # 161 tokens
    args = ("--max-new-tokens", "8", "--max-length", "64")
    result = generate(model_dir, *args, prompt)
    assert_clean_error(
        result,
        "the prompt has 161 tokens",
        "context limit of 64 tokens",
        "raise --max-length (up to 4096)",
        "--truncate",
    )
    assert generate(model_dir, *args, "--truncate", prompt).exit_code == 0


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--temperature", "-0.5", "temperature (--temperature) must be >= 0, got -0.5"),
        ("--temperature", "nan", "temperature (--temperature) must be >= 0, got nan"),
        ("--top-p", "0", "top_p (--top-p) must be in (0, 1], got 0.0"),
        ("--top-p", "1.01", "top_p (--top-p) must be in (0, 1], got 1.01"),
        ("--top-k", "-1", "top_k (--top-k) must be >= 0, got -1"),
        ("--min-p", "-0.1", "min_p (--min-p) must be in [0, 1], got -0.1"),
        ("--min-p", "1.5", "min_p (--min-p) must be in [0, 1], got 1.5"),
        ("--repetition-penalty", "0", "repetition_penalty (--repetition-penalty) must be > 0"),
        ("--repetition-penalty", "-2", "repetition_penalty (--repetition-penalty) must be > 0"),
        ("--max-new-tokens", "0", "max_new_tokens (--max-new-tokens) must be >= 1, got 0"),
        ("--max-new-tokens", "-5", "max_new_tokens (--max-new-tokens) must be >= 1, got -5"),
        ("--seed", "-1", "seed (--seed) must be an integer >= 0, got -1"),
        ("--max-length", "1", "max_length (--max-length) must be >= 2, got 1"),
        ("--max-length", "4097", "max_length (--max-length) 4097 is beyond the model's context"),
        ("--threads", "0", "threads (--threads) must be from 1 to"),
        ("--threads", "100000", "threads (--threads) must be from 1 to"),
        ("--provider", "tpu", "provider 'tpu' is not supported; choose cpu or cuda"),
    ],
)
def test_out_of_range_options_fail_in_one_line(model_dir, option, value, message):
    result = generate(model_dir, option, value, "hello")
    assert_clean_error(result, message)


def test_a_non_number_is_a_usage_error(model_dir):
    result = generate(model_dir, "--top-k", "abc", "hello")
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2
    assert "Invalid value for '--top-k': 'abc' is not a valid integer" in result.stderr


def test_cuda_where_it_is_not_available(model_dir):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    result = generate(model_dir, "--provider", "cuda", "hello")
    assert_clean_error(result, "provider 'cuda' needs CUDAExecutionProvider", "available: ")


KINDS = "must be text, a list of token ids or a list of chat messages"


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([2, 320], "the prompt: token id 320 at position 1 is outside the vocabulary [0, 320)"),
        ([2, -1], "the prompt: token id -1 at position 1 is outside the vocabulary [0, 320)"),
        ([2, 2**40], "token id 1099511627776 at position 1 is outside the vocabulary"),
        ([2, 1.5], "the prompt: token 1.5 at position 1 is not an integer id"),
        ([[2, 7], [2, 999]], "prompt 1: token id 999 at position 1 is outside the vocabulary"),
        ([[2, 7], None], f"prompt 1 {KINDS}, got NoneType"),
        (None, f"the prompt {KINDS}, got NoneType"),
        (b"hi", "the prompt is bytes; decode it to str"),
        ([], "no prompt given"),
        ([[2], []], "prompt 1 is empty"),
        ("", "the prompt is empty text"),
        (["hi", ""], "prompt 1 is empty text"),
        ("caf\udce9", "the prompt is not valid text: '\\udce9' at character 3"),
        ({"input_ids": [2, 7]}, f"the prompt {KINDS}, got dict"),
        ({2, 7}, f"the prompt {KINDS}, got set"),
    ],
)
def test_bad_prompts_through_the_python_api(model_dir, prompt, message):
    gemma = Gemma(model_dir, threads=1)
    with pytest.raises(GemmaOnnxError) as info:
        gemma.generate(prompt, max_new_tokens=2)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_new_tokens": 2.5}, "max_new_tokens (--max-new-tokens) must be an integer"),
        ({"seed": 1.5}, "seed (--seed) must be an integer >= 0, got 1.5"),
        ({"top_k": True}, "top_k (--top-k) must be an integer, got True"),
        ({"temperature": "0.5"}, "temperature (--temperature) must be a number, got '0.5'"),
        ({"top_p": None}, "top_p (--top-p) must be a number, got None"),
        ({"stop": [5]}, "stop strings must be non-empty text, got 5"),
        ({"stop": [""]}, "stop strings must be non-empty text, got ''"),
        ({"stop": 5}, "stop must be a list of strings, got 5"),
    ],
)
def test_bad_option_types_through_the_python_api(model_dir, options, message):
    with pytest.raises(GemmaOnnxError) as info:
        Gemma(model_dir, threads=1).generate([2, 7], **{"max_new_tokens": 2, **options})
    assert message in str(info.value)


def test_default_max_new_tokens_fits_a_small_max_length(model_dir):
    """max_length caps prompt + new tokens: left at its default, max_new_tokens takes what the
    cap leaves (finish "length"); a number given is held to, and refused when it cannot fit."""
    gemma = Gemma(model_dir, threads=1, max_length=12)
    done = gemma.generate([2, 7, 9], ignore_eos=True)
    assert len(done.token_ids) == 9 and done.finish_reason == "length"
    with pytest.raises(GemmaOnnxError, match="leaves no room for the prompt"):
        gemma.generate([2, 7, 9], max_new_tokens=20)
    result = generate(model_dir, "--max-length", "12", "--ignore-eos", "--stats", "ab")
    assert result.exit_code == 0, result.output
    assert "decode 8 tokens" in result.stderr  # the first of 9 new tokens comes from prefill
    full = Gemma(model_dir, threads=1).generate([2, 7, 9], ignore_eos=True)
    assert len(full.token_ids) == 256  # no cap: the default
    # A prompt past the cap, with --truncate: cut to leave half the context for the answer.
    cut = gemma.generate([2, *range(7, 27)], ignore_eos=True, truncate=True)
    assert (cut.prompt_tokens, len(cut.token_ids)) == (6, 6)


def test_no_stop_strings_as_none_and_stream_checks_at_once(model_dir):
    """stop=None means no stop strings. stream() refuses what it can check without running
    (an empty prompt, a bad max_new_tokens or stop) when called, not at the first next()."""
    gemma = Gemma(model_dir, threads=1)
    plain = gemma.generate("ab", max_new_tokens=5, ignore_eos=True)
    same = gemma.generate("ab", max_new_tokens=5, ignore_eos=True, stop=None)
    assert same.token_ids == plain.token_ids
    for prompt, options, message in (
        ("", {}, "the prompt is empty text"),
        ("ab", {"max_new_tokens": 0}, "must be >= 1"),
        ("ab", {"stop": [""]}, "stop strings must be non-empty"),
    ):
        with pytest.raises(GemmaOnnxError, match=message):
            gemma.stream(prompt, **options)


def test_generate_checks_its_options_before_making_the_default_model(tmp_path, monkeypatch):
    """A typo must not cost the first use's download-free but minute-long setup."""
    monkeypatch.setenv("GEMMA_ONNX_HOME", str(tmp_path / "home"))
    for args, message in (
        (("--provider", "tpu"), "provider 'tpu' is not supported"),
        (("--threads", "0"), "threads (--threads) must be from 1"),
        (("--max-new-tokens", "0"), "max_new_tokens (--max-new-tokens) must be >= 1"),
        (("--max-length", "1"), "max_length (--max-length) must be >= 2"),
        (("--stop", ""), "stop strings must be non-empty"),
    ):
        result = run("generate", *args, "hello")
        assert_clean_error(result, message)
    assert not (tmp_path / "home").exists()
    check_options(provider="cpu", threads=1, max_length=64, max_new_tokens=8, stop=None)
    for options, message in (
        ({"max_length": 1}, "must be >= 2"),
        ({"max_length": "64"}, "must be an integer"),
        ({"provider": "tpu"}, "not supported"),
        ({"stop": 5}, "stop must be a list"),
    ):
        with pytest.raises(GemmaOnnxError, match=message):
            check_options(**options)


def test_greedy_notes_the_sampling_options_it_ignores(model_dir):
    result = generate(model_dir, "--top-p", "0.9", "--seed", "3", "--max-new-tokens", "2", "ab")
    assert result.exit_code == 0, result.output
    assert "note: --top-p, --seed only shape sampling" in result.stderr
    result = generate(model_dir, "--max-new-tokens", "2", "ab")
    assert "note:" not in result.stderr


def test_a_terminal_that_cannot_show_a_character_gets_a_mark(monkeypatch):
    """LANG=C or latin-1 terminals: unencodable output is replaced, not a traceback."""
    import io

    from gemma_onnx import cli_generate

    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="latin-1"))
    cli_generate._tolerant_stdout()
    sys.stdout.write("caf\u00e9 \u65e5\u672c")
    sys.stdout.flush()
    assert raw.getvalue() == "café ??".encode("latin-1")


def test_a_chat_template_that_is_not_utf8_is_named(model_copy):
    (model_copy / "chat_template.jinja").write_bytes(b"\xff\xfe{{ x }}")
    result = generate(model_copy, "--max-new-tokens", "2", "ab")
    assert_clean_error(result, "chat_template.jinja: cannot read the chat template")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_length": "64"}, "max_length (--max-length) must be an integer, got '64'"),
        ({"max_length": 64.0}, "max_length (--max-length) must be an integer, got 64.0"),
        ({"provider": ["cpu"]}, "provider ['cpu'] is not supported; choose cpu or cuda"),
        ({"tokenizer": "no"}, "tokenizer must be True or False, got 'no'"),
    ],
)
def test_bad_constructor_arguments_through_the_python_api(model_dir, options, message):
    with pytest.raises(GemmaOnnxError) as info:
        Gemma(model_dir, **options)
    assert message in str(info.value)
    with pytest.raises(GemmaOnnxError, match="model_dir must be a folder path, got None"):
        Gemma(None)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda ckpt, out: build_model(None, out), "weights must be a path, got None"),
        (lambda ckpt, out: build_model(ckpt, out, quant={}), "quant must be a gemma_onnx"),
        (
            lambda ckpt, out: build_model(ckpt, out, quant=QuantConfig(bits=4)),
            "quant applies to precision int8 or int4, not 'fp32'",
        ),
        (
            lambda ckpt, out: QuantConfig(bits=4, block_size="32"),
            "quantization block_size must be an integer, got '32'",
        ),
    ],
)
def test_bad_build_arguments_through_the_python_api(call, message, ckpt, tmp_path):
    with pytest.raises(GemmaOnnxError) as info:
        call(ckpt, tmp_path / "out")
    assert message in str(info.value)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("stdin", [None, "", "\n"])
def test_empty_prompt(model_dir, stdin):
    args = ("",) if stdin is None else ()
    result = generate(model_dir, *args, stdin=stdin)
    assert_clean_error(result, "the prompt is empty; pass PROMPT or pipe it on stdin")


def test_non_utf8_stdin(model_dir):
    result = generate(model_dir, stdin=b"caf\xe9 au lait\n")
    assert_clean_error(result, "the prompt on stdin is not UTF-8 text (byte 0xe9 at offset 3)")


def test_non_utf8_argument(model_dir):
    """What Python makes of the bytes b'caf\\xe9' in argv under a UTF-8 locale."""
    result = generate(model_dir, "caf\udce9")
    assert_clean_error(result, "the prompt is not valid text: '\\udce9' at character 3")


# ---- long runs ---------------------------------------------------------------------------------


def _rss() -> int:
    """Resident set size now, in bytes (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc")
@pytest.mark.parametrize("target", ["portable", "ort"])
def test_a_2000_token_generation_keeps_memory_flat(model_factory, target):
    """From step 200 to step 2000 nothing grows: not the Python heap (tracemalloc: numpy arrays
    included), not the buffers (same pointers), not RSS (ORT's own allocations).

    One warm-up generation first: the first pass to 2000 positions raises the high-water mark
    of ORT's working memory for attention over that many positions (MiBs on the portable graph,
    whose attention repeats the KV heads), which later passes reuse. Measured: a second and a
    third pass add nothing, so what this test bounds is growth per token.
    """
    session = Session(model_factory(target), threads=1)
    state = session.allocate(1, 2100)
    for buffer in {id(b): b for b in state.past + state.present}.values():
        buffer.memory.fill(0)  # np.zeros maps pages lazily; touch them all now
    prompt = [2, *range(10, 25)]

    def pointers() -> list[int]:
        buffers = sorted(b.ptr for b in state.past + state.present)
        arrays = (state.logits, state.input_ids, state.position_ids, state.mask, state.seen)
        return buffers + [a.ctypes.data for a in arrays]

    def steps() -> Iterator[np.ndarray]:
        sampler = Sampler(SamplingConfig())
        return generate_ids(session, state, sampler, [prompt], 2000, ignore_eos=True)

    for _ in steps():
        pass
    before = pointers()
    marks = {}
    tracemalloc.start()
    try:
        for step, _ in enumerate(steps(), start=1):
            if step in (200, 2000):
                marks[step] = (_rss(), tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert step == 2000 and state.past_length >= 2000 + len(prompt) - 1
    assert pointers() == before
    rss_growth = marks[2000][0] - marks[200][0]
    traced_growth = marks[2000][1] - marks[200][1]
    assert traced_growth < 64 * 1024, f"Python heap grew {traced_growth} bytes in 1800 steps"
    assert rss_growth < 4 * 2**20, f"RSS grew {rss_growth / 2**20:.1f} MiB in 1800 steps"
