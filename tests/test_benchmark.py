"""The benchmark tool's machinery on a tiny checkpoint: builds, child processes, the table.

No timing is asserted (speed lives in the benchmark itself, on the real model); these tests only
check that the tool runs our engines end to end and reports a well-formed result.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gemma_onnx import huge_pages
from gemma_onnx.tools import benchmark

OURS = (
    "ours-fp32", "ours-int4", "ours-int4-4bit", "ours-int4-plain", "ours-portable",
    "ours-int4-text",
)  # fmt: skip
BUILT = OURS[:-1]  # ours-int4-text runs ours-int4's folder


def _word_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer over the benchmark's own prompt text, small enough for the tiny
    checkpoint's vocabulary; the tool needs one to make its prompt."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for word in benchmark.prompt_text().split():
        if len(vocab) == vocab_size:
            break
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "add_bos_token": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def tiny_hf(tiny_checkpoints, tmp_path_factory) -> Path:
    source, _ = tiny_checkpoints("hard")
    folder = tmp_path_factory.mktemp("bench") / "hf"
    shutil.copytree(source, folder)  # a copy: the shared checkpoint stays tokenizer-free
    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
    _word_tokenizer(folder, vocab_size)
    return folder


def _markdown_rows(text: str, first_header: str) -> list[dict[str, str]]:
    """The rows of the markdown table whose first header cell is ``first_header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    headers = [cell.strip() for cell in lines[start].strip("|").split("|")]
    assert set(lines[start + 1].strip("|").split("|")) == {"---"}
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(
            dict(zip(headers, (c.strip() for c in line.strip("|").split("|")), strict=True))
        )
    return rows


def test_benchmark_reports_our_engines(tiny_hf, tmp_path, capsys):
    work = tmp_path / "work"
    common = ["--hf-dir", str(tiny_hf), "--work-dir", str(work), "--runs", "1", "--threads", "1"]
    common += ["--prompt-tokens", "40", "--decode-tokens", "8", "--settle", "0", "--markdown"]
    assert benchmark.main([*common, "--engines", ",".join(OURS)]) == 0
    out = capsys.readouterr().out

    rows = _markdown_rows(out, "engine")
    assert [row["engine"] for row in rows] == [benchmark.LABELS[name] for name in OURS]
    for row in rows:
        for column in ("decode tok/s", "prefill tok/s", "peak RSS GB"):
            assert float(row[column]) > 0, (column, row)
        assert float(row["load s"]) >= 0
        assert row["same tokens as ours-fp32"].endswith("/8")
        assert "onnxruntime" in row["versions"]
    assert rows[0]["same tokens as ours-fp32"] == "8/8"

    builds = _markdown_rows(out, "build")
    assert [(row["build"], row["cache"]) for row in builds] == [(n, "built now") for n in BUILT]
    assert all(float(row["peak RSS GB"]) > 0 and float(row["wall s"]) >= 0 for row in builds)
    assert " skipped" not in out and " failed" not in out
    assert "note: CPUs idle in the second before each run" in out

    results = json.loads((work / "results.json").read_text())
    prompt = json.loads((work / "prompt.json").read_text())["ids"]
    assert len(prompt) == 40 and prompt[0] == 2  # BOS first
    for name in OURS:
        (run,) = results["engines"][name]["runs"]
        assert run["prompt_tokens"] == 40 and len(run["tokens"]) == 8
        assert run["decode"] > 0 and run["prefill"] > 0 and run["rss"] > 0
    tokens = {name: results["engines"][name]["runs"][0]["tokens"] for name in OURS}
    assert tokens["ours-int4-text"] == tokens["ours-int4"]  # the same folder, run with text on


def test_huge_pages_go_to_every_engine_or_none(huge_pages_apply):
    """--huge-pages starts every engine with the malloc tunable (ORT-based peers gain from it
    as ours do); without it, every engine starts in this environment as it is."""
    assert benchmark.engine_env(True)["GLIBC_TUNABLES"] == huge_pages.TUNABLE
    assert "GLIBC_TUNABLES" not in benchmark.engine_env(False)
    assert benchmark.engine_env(True)["HF_HUB_OFFLINE"] == "1"


def test_benchmark_reuses_builds_and_skips_missing_engines(tiny_hf, tmp_path, capsys):
    work = tmp_path / "work"
    common = ["--hf-dir", str(tiny_hf), "--work-dir", str(work), "--runs", "1", "--threads", "1"]
    common += ["--prompt-tokens", "24", "--decode-tokens", "4", "--settle", "0", "--markdown"]
    assert benchmark.main([*common, "--engines", "ours-fp32"]) == 0
    capsys.readouterr()
    missing = str(tmp_path / "no-such-python")
    engines = ["--engines", "ours-fp32,llama", "--llama-python", missing]
    assert benchmark.main([*common, *engines]) == 0
    out = capsys.readouterr().out

    assert [row["engine"] for row in _markdown_rows(out, "engine")] == [
        benchmark.LABELS["ours-fp32"]
    ]
    assert [row["cache"] for row in _markdown_rows(out, "build")] == ["cached"]
    assert f"note: llama skipped: no Python with llama_cpp, numpy (tried {missing})" in out


def test_unknown_engine_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--engines", "ours-fp32,vllm"])
    assert "unknown engines vllm" in capsys.readouterr().err


def test_bad_folders_and_nothing_measured_are_failures(tiny_hf, tmp_path, capsys):
    """A --work-dir that is a file or a --hf-dir that is missing stop the run with one line, and
    a run where every engine was skipped exits 1 rather than 0."""
    (tmp_path / "file").write_text("mine")
    with pytest.raises(SystemExit, match="--work-dir .*file is a file, not a folder"):
        benchmark.main(["--work-dir", str(tmp_path / "file"), "--engines", "ours-fp32"])
    assert (tmp_path / "file").read_text() == "mine"
    work = ["--work-dir", str(tmp_path / "work")]
    with pytest.raises(SystemExit, match="--hf-dir .*nowhere is not a model folder"):
        benchmark.main([*work, "--hf-dir", str(tmp_path / "nowhere"), "--engines", "ours-fp32"])
    missing = str(tmp_path / "no-such-python")
    args = [*work, "--hf-dir", str(tiny_hf), "--engines", "llama", "--llama-python", missing]
    assert benchmark.main([*args, "--prompt-tokens", "8", "--settle", "0"]) == 1
    assert "benchmark: no engine was measured" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.main(["--engines", ","])
    assert "--engines names none" in capsys.readouterr().err
