"""The built folder runs, as it is, in the runtimes people ship ONNX decoders to: optimum's
ORTModelForCausalLM (with and without IO binding), onnxruntime-genai, transformers.js in Node,
and plain ONNX Runtime with every graph optimization off. Each gives HF transformers' greedy
tokens on a tiny checkpoint that has a Gemma-style tokenizer, so the clients' tokenizers load too.

optimum pins transformers below 4.58 and runs in its own venv, made once and cached (see
``optimum_python``); transformers.js is installed from npm once into a cached folder. fp16 builds
are held to the same graph run directly in ONNX Runtime (fp16 vs HF fp32 is test_precision's
job); bf16 builds are checked for validity only, since ONNX Runtime's CPU provider has no bf16
kernels.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import contract_feed, make_causal_lm, ort_session
from gemma_onnx.builder import build_model
from gemma_onnx.builder.interop import (
    GENAI_CONFIG_FILE,
    genai_config,
    write_genai_config,
    write_transformers_js_layout,
)
from gemma_onnx.errors import GemmaOnnxError

HERE = Path(__file__).parent / "interop"
MAX_NEW_TOKENS = 16
# Token ids (bos first). Greedy decoding of a random tiny model tends to repeat one token; these
# prompts give changing outputs on this checkpoint, and the two long ones run past its 5-token
# sliding window.
PROMPTS = [
    [2, 218, 100, 37, 5, 200, 300, 44, 12, 99, 150, 250, 17],
    [2, 202, 77],
    [2, 41, 87, 280, 36, 291, 250, 10, 301],
]
TEXT = "the cat sat on the mat, and ate 3 fish!"

# Exact pins: the cached venv and npm folder are keyed by these strings, so a change re-creates
# them. torch must stay pinned to the CPU build on the machine's disk (an unpinned torch pulls a
# CUDA build of several GB).
OPTIMUM_REQUIREMENTS = ("torch==2.13.0", "optimum[onnxruntime]==2.1.0", "transformers<4.58")
TRANSFORMERS_JS_PACKAGE = "@huggingface/transformers@4.3.1"


# ---- the tiny checkpoint, with a tokenizer ------------------------------------------------------
_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
_LETTERS = list("▁abcdefghijklmnopqrstuvwxyz")
_MERGES = [
    ("▁", "t"), ("h", "e"), ("▁t", "he"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "n"),
    ("▁", "a"), ("r", "e"), ("a", "t"), ("e", "n"), ("o", "r"), ("e", "s"), ("▁", "s"),
    ("▁", "w"), ("▁", "o"), ("▁", "c"), ("in", "g"), ("▁", "f"), ("▁", "b"), ("n", "d"),
    ("▁a", "nd"), ("▁", "i"), ("o", "u"), ("l", "l"), ("▁", "m"), ("▁", "p"), ("i", "s"),
    ("i", "t"), ("▁", "d"), ("e", "d"), ("▁o", "f"), ("▁", "h"),
]  # fmt: skip


def write_gemma_style_tokenizer(folder: Path) -> None:
    """A 320-token tokenizer built like Gemma 3's (BPE with byte fallback, ``" "`` -> ``"▁"``,
    ``<bos>`` prepended): specials 0-3, the 256 byte tokens, letters, then merges."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    vocab = {token: i for i, token in enumerate(_SPECIALS)}
    vocab.update({f"<0x{b:02X}>": len(_SPECIALS) + b for b in range(256)})
    for token in _LETTERS + [a + b for a, b in _MERGES]:
        vocab[token] = len(vocab)
    assert len(vocab) == 320
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab, merges=_MERGES, unk_token="<unk>", fuse_unk=True, byte_fallback=True
        )
    )
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in _SPECIALS])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)]
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    special = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    config = {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 256,
        "added_tokens_decoder": {
            str(i): {"content": t, **special, "special": True} for i, t in enumerate(_SPECIALS)
        },
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(folder, HF fp32 eager oracle): conftest's hard case with smaller weights (so greedy
    outputs vary), plus a tokenizer."""
    folder = tmp_path_factory.mktemp("interop_ckpt")
    oracle = make_causal_lm(folder, seed=0, initializer_range=0.1)
    write_gemma_style_tokenizer(folder)
    return folder, oracle


@pytest.fixture(scope="module")
def built(checkpoint, tmp_path_factory):
    """``built(precision)`` -> the portable folder plus genai_config.json, as the builder's
    ``write_genai_config`` hook writes it."""
    made: dict[str, Path] = {}

    def get(precision: str) -> Path:
        if precision not in made:
            out = tmp_path_factory.mktemp(f"interop_{precision}") / "model"
            build_model(checkpoint[0], out, precision=precision)
            config = json.loads((out / "config.json").read_text())
            generation = json.loads((out / "generation_config.json").read_text())
            write_genai_config(out, config, generation)
            made[precision] = out
        return made[precision]

    return get


def hf_greedy(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    import torch

    tokens = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False
        )
        tokens.append(out[0, len(prompt) :].tolist())
    return tokens


@pytest.fixture(scope="module")
def hf_tokens(checkpoint) -> list[list[int]]:
    tokens = hf_greedy(checkpoint[1], PROMPTS, MAX_NEW_TOKENS)
    # Clients stop at eos on their own terms; the comparison is only fair without one.
    assert all(len(t) == MAX_NEW_TOKENS and 1 not in t for t in tokens), tokens
    assert len({t for row in tokens for t in row}) >= 6, f"outputs barely vary: {tokens}"
    return tokens


def ort_greedy(folder: Path) -> list[list[int]]:
    """Greedy decoding straight through the I/O contract, with graph optimizations off."""
    session = ort_session(folder)
    tokens = []
    for prompt in PROMPTS:
        outputs = session.run(None, contract_feed(session, np.array([prompt])))
        row = [int(outputs[0][0, -1].argmax())]
        for _ in range(MAX_NEW_TOKENS - 1):
            outputs = session.run(
                None, contract_feed(session, np.array([[row[-1]]]), past=outputs[1:])
            )
            row.append(int(outputs[0][0, -1].argmax()))
        tokens.append(row)
    return tokens


@pytest.fixture(scope="module")
def reference(built, hf_tokens):
    """``reference(precision)``: HF's tokens for fp32; for fp16, the fp16 graph's own greedy
    tokens in ONNX Runtime, which a client must reproduce."""

    made = {"fp32": hf_tokens}

    def get(precision: str) -> list[list[int]]:
        if precision not in made:
            made[precision] = ort_greedy(built(precision))
        return made[precision]

    return get


# ---- cached client installs ---------------------------------------------------------------
def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))


def _key(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def _run(command: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        pytest.fail(f"{what} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="session")
def optimum_python() -> Path:
    """The python of a venv holding optimum, made once per requirement set and cached under
    ``~/.cache/gemma-onnx-test-venvs`` (about 75 s to make here; a marker file says it is
    complete, so an interrupted install is redone)."""
    name = f"optimum-{_key(sys.version, *OPTIMUM_REQUIREMENTS)}"
    venv = _cache_root() / "gemma-onnx-test-venvs" / name
    python, ready = venv / "bin" / "python", venv / ".complete"
    if not ready.is_file():
        shutil.rmtree(venv, ignore_errors=True)
        _run([sys.executable, "-m", "venv", str(venv)], "creating the optimum venv")
        _run(
            [str(python), "-m", "pip", "install", "-q", *OPTIMUM_REQUIREMENTS],
            "installing optimum",
        )
        ready.write_text("\n".join(OPTIMUM_REQUIREMENTS) + "\n")
    return python


@pytest.fixture(scope="session")
def transformers_js_root() -> Path:
    """A folder whose node_modules holds transformers.js, installed once from npm and cached.

    ``--ignore-scripts``: onnxruntime-node's install script fetches optional CUDA binaries from
    outside npm, which is neither needed on CPU nor reachable here; its CPU library ships in the
    npm package itself."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not on PATH: transformers.js (Node.js) cannot run")
    root = _cache_root() / "gemma-onnx-test-node" / _key(TRANSFORMERS_JS_PACKAGE)
    ready = root / ".complete"
    if not ready.is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        (root / "package.json").write_text('{"private": true}\n')
        _run(
            [npm, "install", "--ignore-scripts", "--no-audit", "--no-fund",
             TRANSFORMERS_JS_PACKAGE],
            "npm install of transformers.js",
            cwd=root,
        )  # fmt: skip
        ready.write_text(TRANSFORMERS_JS_PACKAGE + "\n")
    return root


def _last_json_line(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


# ---- the graph itself -----------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_onnx_full_check_and_opset(built, precision):
    """Opset 18, IR 8, standard ops only inside the model-local functions (the README's opset
    statement), and valid for onnx's checker with full shape inference."""
    path = built(precision) / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    assert model.ir_version == 8
    assert {o.domain: o.version for o in model.opset_import} == {"": 18, "gemma_onnx": 1}
    for function in model.functions:
        assert {o.domain for o in function.opset_import} <= {"", "gemma_onnx"}
        assert all(node.domain in ("", "gemma_onnx") for node in function.node)


def test_ort_without_graph_optimizations_matches_hf(built, hf_tokens):
    """No ORT fusion can make up for a wrong graph here."""
    assert ort_greedy(built("fp32")) == hf_tokens


# ---- onnxruntime-genai ----------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_genai_config_fits_the_graph(built, precision):
    folder = built(precision)
    genai = json.loads((folder / GENAI_CONFIG_FILE).read_text())
    config = json.loads((folder / "config.json").read_text())
    model = onnx.load(str(folder / genai["model"]["decoder"]["filename"]), load_external_data=False)
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    decoder = genai["model"]["decoder"]
    layers = decoder["num_hidden_layers"]
    names = decoder["inputs"]
    assert inputs[:3] == [names["input_ids"], names["attention_mask"], names["position_ids"]]
    assert inputs[3 : 3 + 2 * layers] == [
        names[f"past_{kind}_names"] % i for i in range(layers) for kind in ("key", "value")
    ]
    assert outputs == [decoder["outputs"]["logits"]] + [
        decoder["outputs"][f"present_{kind}_names"] % i
        for i in range(layers)
        for kind in ("key", "value")
    ]
    past = model.graph.input[3].type.tensor_type.shape.dim
    assert [past[1].dim_value, past[3].dim_value] == [
        decoder["num_key_value_heads"],
        decoder["head_size"],
    ]
    assert genai["model"]["type"] == "gemma3_text"
    assert genai["model"]["eos_token_id"] == [1]
    assert genai["model"]["context_length"] == config["max_position_embeddings"]
    assert genai["search"]["past_present_share_buffer"] is False


def genai_greedy(folder: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    tokens = []
    for prompt in prompts:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens)
        generator = og.Generator(model, params)
        generator.append_tokens([prompt])
        while not generator.is_done():
            generator.generate_next_token()
        tokens.append([int(t) for t in generator.get_sequence(0)][len(prompt) :])
    return tokens


def test_genai_config_token_ids():
    """Gemma 3 -it lists two eos ids in generation_config.json; both must stop genai."""
    config = {"hidden_size": 640, "num_attention_heads": 4, "num_hidden_layers": 18,
              "num_key_value_heads": 1, "vocab_size": 262144, "eos_token_id": 1}  # fmt: skip
    generation = {"bos_token_id": 2, "eos_token_id": [1, 106], "top_k": 64, "top_p": 0.95}
    genai = genai_config(config, generation)
    assert genai["model"]["eos_token_id"] == [1, 106]
    assert (genai["model"]["bos_token_id"], genai["model"]["pad_token_id"]) == (2, 1)
    assert (genai["search"]["top_k"], genai["search"]["top_p"]) == (64, 0.95)
    assert genai["model"]["decoder"]["head_size"] == 256
    with pytest.raises(GemmaOnnxError, match="no eos_token_id"):
        genai_config({**config, "eos_token_id": None}, {})


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_genai_greedy_matches(built, reference, precision):
    assert genai_greedy(built(precision), PROMPTS, MAX_NEW_TOKENS) == reference(precision)


def test_genai_tokenizer_loads_and_matches_hf(built, checkpoint):
    """genai's tokenizer does not prepend <bos> (callers add it, or use a chat template)."""
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    tokenizer = og.Tokenizer(og.Model(str(built("fp32"))))
    expected = AutoTokenizer.from_pretrained(checkpoint[0])(TEXT).input_ids
    assert expected[0] == 2
    assert [int(t) for t in tokenizer.encode(TEXT)] == expected[1:]
    assert tokenizer.decode(expected[1:]) == TEXT


# ---- optimum --------------------------------------------------------------------------------
def optimum_greedy(
    python: Path, folder: Path, prompts: list[list[int]], new_tokens: int
) -> dict[str, list[list[int]]]:
    """Tokens from the optimum venv: ``io_binding`` / ``no_io_binding`` per prompt, and
    ``..._batched`` for all prompts as one left-padded batch."""
    request = {"model": str(folder), "prompts": prompts, "max_new_tokens": new_tokens}
    result = _run(
        [str(python), str(HERE / "optimum_generate.py")],
        "optimum generation",
        input=json.dumps(request),
    )
    return _last_json_line(result.stdout)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_optimum_greedy_matches_with_and_without_io_binding(
    built, reference, optimum_python, precision
):
    tokens = optimum_greedy(optimum_python, built(precision), PROMPTS, MAX_NEW_TOKENS)
    expected = reference(precision)
    for key in ("no_io_binding", "io_binding", "no_io_binding_batched", "io_binding_batched"):
        assert tokens[key] == expected, key


# ---- transformers.js --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def transformers_js_folder(built, tmp_path_factory):
    """``transformers_js_folder(precision)``: a copy of the build moved into transformers.js's
    layout by ``write_transformers_js_layout``."""

    def get(precision: str) -> Path:
        folder = tmp_path_factory.mktemp(f"tjs_{precision}") / "model"
        shutil.copytree(built(precision), folder)
        write_transformers_js_layout(folder)
        return folder

    return get


def transformers_js_run(root: Path, folder: Path, **request) -> dict:
    request = {"model": str(folder), "prompts": PROMPTS, "max_new_tokens": MAX_NEW_TOKENS,
               "text": TEXT, **request}  # fmt: skip
    result = _run(
        [shutil.which("node"), str(HERE / "transformers_js_generate.mjs"), str(root)],
        "transformers.js generation",
        input=json.dumps(request),
    )
    return _last_json_line(result.stdout)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_transformers_js_greedy_matches(
    transformers_js_root, transformers_js_folder, reference, checkpoint, precision
):
    output = transformers_js_run(transformers_js_root, transformers_js_folder(precision))
    assert output["generated"] == reference(precision)

    from transformers import AutoTokenizer

    assert output["encoded"] == AutoTokenizer.from_pretrained(checkpoint[0])(TEXT).input_ids


def test_transformers_js_reads_the_default_layout_with_subfolder_option(
    transformers_js_root, built, hf_tokens
):
    """In Node, the folder as built loads too when told the model is at the top (``subfolder:
    ""``): ONNX Runtime finds model.onnx_data beside model.onnx by itself."""
    output = transformers_js_run(transformers_js_root, built("fp32"), subfolder="")
    assert output["generated"] == hf_tokens


def test_transformers_js_layout_files(transformers_js_folder, built):
    """The layout moves the model (nothing is left at the top), names it by dtype, records the
    data file's new name in the graph, and keeps genai pointed at it."""
    folder = transformers_js_folder("fp16")
    assert sorted(p.name for p in (folder / "onnx").iterdir()) == [
        "model_fp16.onnx",
        "model_fp16.onnx_data",
    ]
    assert not (folder / "model.onnx").exists() and not (folder / "model.onnx_data").exists()
    config = json.loads((folder / "config.json").read_text())
    assert config["transformers.js_config"] == {
        "dtype": "fp16",
        "use_external_data_format": {"model_fp16.onnx": 1},
    }
    genai = json.loads((folder / GENAI_CONFIG_FILE).read_text())
    assert genai["model"]["decoder"]["filename"] == "onnx/model_fp16.onnx"
    onnx.checker.check_model(str(folder / "onnx" / "model_fp16.onnx"), full_check=True)

    bf16 = shutil.copytree(built("bf16"), folder.parent / "bf16")
    with pytest.raises(GemmaOnnxError, match="fp32 and fp16 models only"):
        write_transformers_js_layout(bf16)


# ---- real Gemma 3 270M (the done-when) ---------------------------------------------------
REAL_TEXTS = ["The capital of France is", "def fibonacci(n):\n    "]
REAL_NEW_TOKENS = 24


@pytest.mark.slow
def test_real_model_in_optimum_and_genai(real_hf_dir, optimum_python, tmp_path):
    """The issue's done-when: a portable fp32 build of real Gemma 3 270M gives HF's greedy tokens
    in optimum, with and without IO binding, and in onnxruntime-genai."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_model(real_hf_dir, tmp_path / "gemma-3-270m")
    config = json.loads((folder / "config.json").read_text())
    write_genai_config(folder, config, json.loads((folder / "generation_config.json").read_text()))
    tokenizer = AutoTokenizer.from_pretrained(real_hf_dir)
    prompts = [tokenizer(text).input_ids for text in REAL_TEXTS]
    hf = AutoModelForCausalLM.from_pretrained(
        real_hf_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    expected = hf_greedy(hf, prompts, REAL_NEW_TOKENS)
    del hf

    tokens = optimum_greedy(optimum_python, folder, prompts, REAL_NEW_TOKENS)
    assert tokens["no_io_binding"] == expected
    assert tokens["io_binding"] == expected
    assert genai_greedy(folder, prompts, REAL_NEW_TOKENS) == expected
