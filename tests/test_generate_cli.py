"""``gemma-onnx generate`` through click's CliRunner, on the tiny model of test_runtime.py."""

from __future__ import annotations

import os
import sys

import onnxruntime as ort
import pytest
from click.testing import CliRunner
from test_runtime import make_tiny_model

from gemma_onnx.api import Gemma
from gemma_onnx.cli import main
from gemma_onnx.cli_generate import generate
from gemma_onnx.errors import GemmaOnnxError

if "generate" not in main.commands:  # until the lead registers it on the group
    main.add_command(generate)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny_cli"))[0])


def run(*args: str, stdin: str | None = None):
    return CliRunner().invoke(main, ["generate", *args], input=stdin)


def test_generate_streams_the_greedy_text(model_dir):
    result = run("--model", model_dir, "--max-new-tokens", "12", "--threads", "1", "hello world")
    assert result.exit_code == 0, result.output
    expected = Gemma(model_dir).generate("hello world", max_new_tokens=12).text
    assert result.stdout == expected + "\n"


def test_prompt_from_stdin_and_stats_on_stderr(model_dir):
    args = ("--model", model_dir, "--max-new-tokens", "5", "--ignore-eos", "--stats")
    from_stdin = run(*args, stdin="hello world\n")
    assert from_stdin.exit_code == 0, from_stdin.output
    assert from_stdin.stdout == run(*args, "hello world").stdout
    assert from_stdin.stdout == run(*args, "-", stdin="hello world").stdout
    stats = from_stdin.stderr
    for part in ("time to first token", "prefill 12 tokens", "decode 4 tokens", "peak RSS"):
        assert part in stats


def test_sampling_chat_and_stop_options(model_dir):
    args = ["--model", model_dir, "--max-new-tokens", "20", "--temperature", "0.8", "--seed", "1"]
    args += ["--top-k", "50", "--top-p", "0.9", "--min-p", "0.01", "--repetition-penalty", "1.2"]
    first = run(*args, "--chat", "hi")
    assert first.exit_code == 0, first.output
    assert run(*args, "--chat", "hi").stdout == first.stdout
    stop = first.stdout[3:5]
    stopped = run(*args, "--chat", "--stop", stop, "--stop", "\x00", "hi")
    assert stopped.stdout == first.stdout[: first.stdout.index(stop)] + "\n"


def test_system_message_opens_the_chat(model_dir):
    """--system puts a system message before the prompt, in the chat template (--chat implied)."""
    args = ["--model", model_dir, "--max-new-tokens", "8", "--ignore-eos", "--threads", "1"]
    result = run(*args, "--system", "be brief", "hi")
    assert result.exit_code == 0, result.output
    conversation = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    expected = Gemma(model_dir).generate(conversation, max_new_tokens=8, ignore_eos=True).text
    assert result.stdout == expected + "\n"
    assert run(*args, "--chat", "--system", "be brief", "hi").stdout == result.stdout
    assert run(*args, "--chat", "hi").stdout != result.stdout


def chat(*args: str, stdin: str):
    return CliRunner().invoke(main, ["chat", *args], input=stdin)


def test_chat_keeps_the_conversation(model_dir):
    """Each line is a user message in one growing conversation, answered as Gemma.generate
    answers that conversation; --stats reports every turn."""
    args = ["--model", model_dir, "--max-new-tokens", "6", "--threads", "1", "--stats"]
    result = chat(*args, "--system", "be brief", stdin="hello\n\nabc def\n")
    assert result.exit_code == 0, result.output
    gemma = Gemma(model_dir)
    conversation = [{"role": "system", "content": "be brief"}]
    expected = ""
    for message in ("hello", "abc def"):
        conversation.append({"role": "user", "content": message})
        answer = gemma.generate(conversation, max_new_tokens=6, truncate=True).text
        conversation.append({"role": "assistant", "content": answer})
        expected += answer + "\n"
    assert result.stdout == expected
    assert result.stderr.count("time to first token") == 2  # the blank line is no message


def test_chat_reset_exit_and_continued_lines(model_dir):
    args = ["--model", model_dir, "--max-new-tokens", "5", "--threads", "1"]
    alone = chat(*args, stdin="ab\\\ncd\n").stdout  # "ab\ncd", one message over two lines
    assert alone.count("\n") == 1
    gemma = Gemma(model_dir)
    message = [{"role": "user", "content": "ab\ncd"}]
    assert alone == gemma.generate(message, max_new_tokens=5, truncate=True).text + "\n"
    again = chat(*args, stdin="ab\\\ncd\n/reset\nab\\\ncd\n/exit\nnot read\n")
    assert again.exit_code == 0 and again.stdout == alone + alone


def test_chat_turn_that_cannot_fit_is_one_line_error(model_dir):
    result = chat("--model", model_dir, "--max-length", "12", "--system", "a long system message",
                  stdin="hi\n")  # fmt: skip
    assert result.exit_code == 1
    message = "the chat template (with the system message, if any) alone takes"
    assert message in result.stderr and "Traceback" not in result.output


def test_interactive_chat_survives_a_bad_line_and_an_unanswerable_message(model_dir, monkeypatch):
    """Typed, a line that is not UTF-8, or a message the API refuses (here: by a stand-in for
    any GemmaOnnxError), is named and the chat goes on (piped, an error ends it, as the test
    above shows)."""
    from gemma_onnx import api, cli_generate

    monkeypatch.setattr(cli_generate, "_interactive", lambda: True)
    encode = api.Gemma._encode

    def refuse_boom(self, prompt, *args):
        if prompt[-1]["content"] == "boom":
            raise GemmaOnnxError("this message cannot be answered")
        return encode(self, prompt, *args)

    monkeypatch.setattr(api.Gemma, "_encode", refuse_boom)
    args = ["--model", model_dir, "--max-new-tokens", "5", "--threads", "1"]
    result = CliRunner().invoke(main, ["chat", *args], input=b"bad \xff line\nboom\nhi\n")
    assert result.exit_code == 0, result.output
    assert "error: the message on stdin is not UTF-8 text (byte 0xff)" in result.stderr
    assert "error: this message cannot be answered" in result.stderr
    hi = [{"role": "user", "content": "hi"}]  # neither refused message stays in the chat
    answer = Gemma(model_dir).generate(hi, max_new_tokens=5, truncate=True).text
    assert result.stdout == answer + "\n"


def test_chat_refuses_max_new_tokens_that_fill_max_length_before_loading(tmp_path):
    result = chat("--model", str(tmp_path / "nowhere"), "--max-length", "10",
                  "--max-new-tokens", "10", stdin="hi\n")  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr == (
        "error: max_new_tokens (--max-new-tokens) 10 leaves no room for the prompt in "
        "max_length (--max-length) 10\n"
    )


MOST_THREADS = 4 * (os.cpu_count() or 1)  # what the session allows


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--temperature", "-1", "temperature (--temperature) must be >= 0, got -1.0"),
        ("--top-p", "0", "top_p (--top-p) must be in (0, 1], got 0.0"),
        ("--top-p", "1.5", "top_p (--top-p) must be in (0, 1], got 1.5"),
        ("--top-k", "-3", "top_k (--top-k) must be >= 0, got -3"),
        ("--min-p", "2", "min_p (--min-p) must be in [0, 1], got 2.0"),
        (
            "--repetition-penalty",
            "0",
            "repetition_penalty (--repetition-penalty) must be > 0, got 0.0",
        ),
        (
            "--threads",
            "0",
            f"threads (--threads) must be from 1 to {MOST_THREADS} (4 per CPU here), got 0",
        ),
        ("--max-new-tokens", "0", "max_new_tokens (--max-new-tokens) must be >= 1, got 0"),
        ("--max-length", "1", "max_length (--max-length) must be >= 2, got 1"),
        ("--provider", "tpu", "provider 'tpu' is not supported; choose cpu or cuda"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_bad_option_values_fail_in_one_line(model_dir, option, value, message, command):
    prompt = ["hello"] if command == "generate" else []
    result = CliRunner().invoke(main, [command, "--model", model_dir, option, value, *prompt])
    assert result.exit_code == 1
    assert result.stderr == f"error: {message}\n"
    assert "Traceback" not in result.output


def test_context_overflow_names_the_limit(model_dir):
    args = ("--model", model_dir, "--max-new-tokens", "10", "--max-length", "16")
    result = run(*args, "a long prompt that is too long")
    assert result.exit_code == 1
    assert "context limit of 16 tokens" in result.stderr and result.stderr.count("\n") == 1
    truncated = run(*args, "--truncate", "a long prompt that is too long")
    assert truncated.exit_code == 0, truncated.output


def test_cuda_without_cuda_names_the_available_providers(model_dir):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    result = run("--model", model_dir, "--provider", "cuda", "hello")
    assert result.exit_code == 1
    assert "available: " in result.stderr and "CPUExecutionProvider" in result.stderr
    assert result.stderr.count("\n") == 1


def test_missing_model_folder_and_missing_default_model(tmp_path, monkeypatch):
    result = run("--model", str(tmp_path / "nowhere"), "hello")
    assert result.exit_code == 1 and "does not exist" in result.stderr
    monkeypatch.setitem(sys.modules, "gemma_onnx.tools.default_model", None)  # import fails
    result = run("hello")
    assert result.exit_code == 1
    assert "pass --model DIR" in result.stderr and "Traceback" not in result.output
