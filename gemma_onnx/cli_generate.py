"""``gemma-onnx generate``: stream text from a model folder (a thin layer over gemma_onnx.api).

Option values are checked by the API (SamplingConfig, the context guard) and fail as
GemmaOnnxError, which the ``main`` group prints as one line.
"""

from __future__ import annotations

import errno
import resource
import sys
import time

import click

from gemma_onnx.errors import GemmaOnnxError


@click.command()
@click.option(
    "--model",
    "model_dir",
    type=click.Path(path_type=str),
    default=None,
    help="Model folder written by `gemma-onnx build` (default: the Gemma 3 270M default model).",
)
@click.option("--provider", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--threads", type=int, default=None, help="ORT intra-op threads [default: all].")
@click.option(
    "--max-new-tokens",
    type=int,
    default=None,
    help="[default: 256, or what --max-length leaves after the prompt; with --truncate, at "
    "least half of --max-length]",
)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="0 = off.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="1 = off.")
@click.option("--min-p", type=float, default=0.0, show_default=True, help="0 = off.")
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True, help="1 = off.")
@click.option("--seed", type=int, default=None, help="Makes sampling repeatable.")
@click.option("--stop", multiple=True, help="Stop before this string (repeatable).")
@click.option("--ignore-eos", is_flag=True, help="Run to --max-new-tokens (benchmarks).")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option(
    "--system",
    default=None,
    help="A system message before the prompt, in the chat template (implies --chat).",
)
@click.option(
    "--max-length",
    type=int,
    default=None,
    help="Cap on prompt + new tokens (sizes the KV cache) [default: what the request needs].",
)
@click.option("--truncate", is_flag=True, help="Drop the start of a prompt that is too long.")
@click.option("--stats", is_flag=True, help="Print timings and peak memory to stderr.")
@click.argument("prompt", required=False)
def generate(
    model_dir: str | None,
    provider: str,
    threads: int | None,
    max_new_tokens: int | None,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    repetition_penalty: float,
    seed: int | None,
    stop: tuple[str, ...],
    ignore_eos: bool,
    chat: bool,
    system: str | None,
    max_length: int | None,
    truncate: bool,
    stats: bool,
    prompt: str | None,
) -> None:
    """Generate text for PROMPT (read from stdin when omitted or '-'), printed as it is made."""
    from gemma_onnx.api import Gemma, check_options
    from gemma_onnx.runtime.sampling import SamplingConfig

    # Check the options before loading anything (or making the default model), so a typo fails
    # at once.
    SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty, seed)
    check_options(provider, threads, max_length, max_new_tokens, stop)
    if temperature == 0:
        ignored = [
            name
            for name, value, off in (
                ("--top-k", top_k, 0),
                ("--top-p", top_p, 1.0),
                ("--min-p", min_p, 0.0),
                ("--seed", seed, None),
            )
            if value != off
        ]
        if ignored:
            click.echo(
                f"note: {', '.join(ignored)} only shape sampling; with --temperature 0 the "
                "output is greedy",
                err=True,
            )
    if prompt is None or prompt == "-":
        prompt = _read_stdin()
    if not prompt:
        raise GemmaOnnxError("the prompt is empty; pass PROMPT or pipe it on stdin")
    request: str | list[dict] = prompt
    if system is not None:  # Gemma 3's template opens the first user turn with it
        request = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    _tolerant_stdout()
    start = time.perf_counter()
    gemma = Gemma(
        model_dir or _default_model(), provider=provider, threads=threads, max_length=max_length
    )
    load_seconds = time.perf_counter() - start
    if gemma.tokenizer is None:
        raise GemmaOnnxError(
            f"{gemma.session.model_dir} has no tokenizer.json, which gemma-onnx generate needs "
            "to read the prompt; copy it there from the source weights' folder"
        )
    stream = gemma.stream(
        request,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=stop,
        ignore_eos=ignore_eos,
        chat=chat,
        truncate=truncate,
    )
    for piece in stream:
        echo(piece, nl=False)  # click.echo flushes: text appears as it is made
    echo()
    if stats:
        click.echo(_format_stats(stream.completion, load_seconds), err=True)


def echo(text: str = "", nl: bool = True) -> None:
    """click.echo to stdout. A stdout that cannot take the text (a full disk) is an error to
    name in one line; a closed pipe (`| head`) is click's to end quietly."""
    try:
        click.echo(text, nl=nl)
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            raise
        raise GemmaOnnxError(f"could not write to standard output ({exc.strerror})") from None


def _tolerant_stdout() -> None:
    """A terminal whose encoding cannot show a character (LANG=C, latin-1) gets a replacement
    mark for it rather than a traceback in the middle of the text."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(errors="replace")
        except (OSError, ValueError):  # a stream that cannot change: keep it as it is
            pass


def _read_stdin() -> str:
    """The prompt piped on stdin, decoded as UTF-8 whatever the locale says (the tokenizer's
    encoding), refused by byte offset when it is not."""
    if sys.stdin.isatty():
        click.echo("gemma-onnx: type the prompt, then Ctrl-D on a line of its own", err=True)
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8").removesuffix("\n")
    except UnicodeDecodeError as exc:
        raise GemmaOnnxError(
            f"the prompt on stdin is not UTF-8 text (byte {data[exc.start]:#04x} at offset "
            f"{exc.start}); convert it, e.g. with iconv -t UTF-8"
        ) from None


def _default_model() -> str:
    """The default model folder, made on first use by the default-model tool."""
    try:
        from gemma_onnx.tools.default_model import ensure_default_model
    except ImportError:
        raise GemmaOnnxError(
            "no --model given and the default model is not available in this install; "
            "pass --model DIR (a folder written by `gemma-onnx build`)"
        ) from None
    return str(ensure_default_model())


def _format_stats(completion, load_seconds: float) -> str:
    s = completion.stats
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_mib = peak / 2**20 if sys.platform == "darwin" else peak / 1024
    return (
        f"load {load_seconds:.2f} s | time to first token {s.prefill_seconds * 1000:.0f} ms | "
        f"prefill {s.prompt_tokens} tokens, {s.prefill_tokens_per_second:.1f} tok/s | "
        f"decode {s.decode_steps} tokens, {s.decode_tokens_per_second:.1f} tok/s | "
        f"finish {completion.finish_reason} | peak RSS {peak_mib:.0f} MiB"
    )
