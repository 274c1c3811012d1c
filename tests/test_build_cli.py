"""``gemma-onnx build`` end to end: the output folder, and bad input failing with one clear line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from gemma_onnx.builder import build_model
from gemma_onnx.cli import main
from gemma_onnx.errors import GemmaOnnxError


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_checkpoints) -> Path:
    folder, _ = tiny_checkpoints("hard")
    return folder


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args))


def copy_checkpoint(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(source, target)
    return target


def assert_clean_failure(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_build_writes_a_complete_folder(source, tmp_path):
    # Any tokenizer file present is carried over (tokenizer.json is parsed first).
    empty_bpe = {"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}
    (source / "tokenizer.json").write_text(json.dumps(empty_bpe))
    try:
        result = run_cli("build", "--weights", str(source), "--output", str(tmp_path / "out"))
    finally:
        (source / "tokenizer.json").unlink()
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "genai_config.json",
        "generation_config.json",
        "model.onnx",
        "model.onnx_data",
        "tokenizer.json",
    ]
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    assert json.loads((out / "config.json").read_text())["model_type"] == "gemma3_text"
    assert not list(tmp_path.glob(".out.*")), "no temporary folder is left behind"


def test_single_safetensors_file_with_config_beside_it(source, tmp_path):
    out = build_model(source / "model.safetensors", tmp_path / "out")
    assert (out / "model.onnx").is_file()


def test_conditional_generation_writes_a_text_decoder_config(tiny_checkpoints, tmp_path):
    folder, _ = tiny_checkpoints("conditional")
    out = build_model(folder, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text"
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert config["num_hidden_layers"] == 4


def test_existing_output_is_not_touched_without_overwrite(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = run_cli("build", "--weights", str(source), "--output", str(out))
    assert_clean_failure(result, "already exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    result = run_cli("build", "--weights", str(source), "--output", str(out), "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "notes.txt").exists() and (out / "model.onnx").is_file()


def test_output_may_not_contain_the_source(source, tmp_path):
    ckpt = copy_checkpoint(source, tmp_path)
    result = run_cli("build", "--weights", str(ckpt), "--output", str(ckpt), "--overwrite")
    assert_clean_failure(result, "would contain the source weights")
    assert (ckpt / "model.safetensors").is_file()


def test_failure_mid_write_leaves_nothing(source, tmp_path):
    """A NaN found while writing (as Ctrl-C or a full disk would) leaves no output folder."""
    ckpt = copy_checkpoint(source, tmp_path)
    weights = load_file(ckpt / "model.safetensors")
    weights["model.layers.3.mlp.down_proj.weight"][0, 0] = np.nan
    save_file(weights, ckpt / "model.safetensors")
    result = run_cli("build", "--weights", str(ckpt), "--output", str(tmp_path / "out"))
    assert_clean_failure(result, "model.layers.3.mlp.down_proj.weight", "NaN")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


@pytest.mark.parametrize(
    ("damage", "fragments"),
    [
        ("no_path", ["no such file or folder"]),
        ("no_config", ["config.json not found"]),
        ("wrong_arch", ["not a Gemma 3 model", "llama"]),
        ("missing_field", ["transformers' defaults: num_attention_heads 8"]),
        ("truncated", ["model.safetensors", "not a valid safetensors file"]),
        ("garbage_header", ["model.safetensors", "not a valid safetensors file"]),
        ("missing_shard", ["model-00002-of-00002.safetensors"]),
        ("int8", ["model.norm.weight", "I8"]),
    ],
)
def test_bad_input_fails_with_a_clear_message(damage, fragments, source, tmp_path):
    ckpt = copy_checkpoint(source, tmp_path)
    weights_file = ckpt / "model.safetensors"
    config_file = ckpt / "config.json"
    if damage == "no_path":
        ckpt = tmp_path / "does-not-exist"
    elif damage == "no_config":
        config_file.unlink()
    elif damage in ("wrong_arch", "missing_field"):
        config = json.loads(config_file.read_text())
        if damage == "wrong_arch":
            config.update(model_type="llama", architectures=["LlamaForCausalLM"])
        else:
            del config["num_attention_heads"]
        config_file.write_text(json.dumps(config))
    elif damage == "truncated":
        data = weights_file.read_bytes()
        weights_file.write_bytes(data[: len(data) // 2])
    elif damage == "garbage_header":
        weights_file.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage!garbage}" + b"\0" * 64)
    elif damage == "missing_shard":
        index = {
            "metadata": {},
            "weight_map": {
                "model.norm.weight": "model-00001-of-00002.safetensors",
                "model.embed_tokens.weight": "model-00002-of-00002.safetensors",
            },
        }
        weights_file.rename(ckpt / "model-00001-of-00002.safetensors")
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    elif damage == "int8":
        weights = load_file(weights_file)
        weights["model.norm.weight"] = weights["model.norm.weight"].astype(np.int8)
        save_file(weights, weights_file)
    result = run_cli("build", "--weights", str(ckpt), "--output", str(tmp_path / "out"))
    assert_clean_failure(result, *fragments)
    assert not (tmp_path / "out").exists()


def test_block_size_that_does_not_divide_the_model_is_refused_up_front(source, tmp_path):
    """The tiny model's MLP is 96 wide: 64-weight blocks do not fit it, 32 do."""
    out = tmp_path / "out"
    args = ["--weights", str(source), "--output", str(out), "--precision", "int4"]
    result = run_cli("build", *args, "--block-size", "64")
    assert_clean_failure(
        result, "--block-size 64 does not divide", "intermediate_size (96)",
        "--block-size 32 divides them all",
    )  # fmt: skip
    assert not out.exists()


def test_tensor_problems_are_reported_all_at_once(source, tmp_path):
    ckpt = copy_checkpoint(source, tmp_path)
    weights = load_file(ckpt / "model.safetensors")
    del weights["model.layers.1.self_attn.k_norm.weight"]
    weights["model.layers.0.mlp.extra.weight"] = np.zeros(3, dtype=np.float32)
    weights["model.layers.2.self_attn.q_proj.weight"] = np.zeros((8, 64), dtype=np.float32)
    save_file(weights, ckpt / "model.safetensors")
    with pytest.raises(GemmaOnnxError) as info:
        build_model(ckpt, tmp_path / "out")
    message = str(info.value)
    assert "missing: model.layers.1.self_attn.k_norm.weight" in message
    assert "unexpected: model.layers.0.mlp.extra.weight" in message
    assert (
        "model.layers.2.self_attn.q_proj.weight: expected shape [96, 64], found [8, 64]" in message
    )


def test_debug_shows_the_traceback(tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "--debug",
            "build",
            "--weights",
            str(tmp_path / "nope"),
            "--output",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code != 0
    assert isinstance(result.exception, GemmaOnnxError)
