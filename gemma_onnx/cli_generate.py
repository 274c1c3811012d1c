"""``gemma-onnx generate`` and ``gemma-onnx chat``: stream text from a model folder (a thin layer
over gemma_onnx.api).

Option values are checked by the API (SamplingConfig, the context guard) and fail as
GemmaOnnxError, which the ``main`` group prints as one line.
"""

from __future__ import annotations

import errno
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

import click

from gemma_onnx.errors import GemmaOnnxError

# Options shared by generate and chat: the model, where it runs, and how tokens are picked.
_MODEL_OPTIONS = [
    click.option(
        "--model",
        "model_dir",
        type=click.Path(path_type=str),
        default=None,
        help="Model folder written by `gemma-onnx build` (default: the Gemma 3 270M default "
        "model).",
    ),
    click.option("--provider", default="cpu", show_default=True, help="cpu or cuda."),
    click.option("--threads", type=int, default=None, help="ORT intra-op threads [default: all]."),
    click.option(
        "--max-new-tokens",
        type=int,
        default=None,
        help="[default: 256, or what --max-length leaves after the prompt; at least half of "
        "--max-length where the prompt may be cut (generate --truncate, chat)]",
    ),
    click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy."),
    click.option("--top-k", type=int, default=0, show_default=True, help="0 = off."),
    click.option("--top-p", type=float, default=1.0, show_default=True, help="1 = off."),
    click.option("--min-p", type=float, default=0.0, show_default=True, help="0 = off."),
    click.option(
        "--repetition-penalty", type=float, default=1.0, show_default=True, help="1 = off."
    ),
    click.option("--seed", type=int, default=None, help="Makes sampling repeatable."),
    click.option("--stop", multiple=True, help="Stop before this string (repeatable)."),
    click.option(
        "--max-length",
        type=int,
        default=None,
        help="Cap on prompt + new tokens (sizes the KV cache) [default: what the request needs].",
    ),
    click.option(
        "--system",
        default=None,
        help="A system message that opens the conversation, in the chat template (generate: "
        "implies --chat).",
    ),
    click.option("--stats", is_flag=True, help="Print timings and peak memory to stderr."),
]


def _model_options(command):
    for option in reversed(_MODEL_OPTIONS):
        command = option(command)
    return command


@click.command()
@_model_options
@click.option("--ignore-eos", is_flag=True, help="Run to --max-new-tokens (benchmarks).")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--truncate", is_flag=True, help="Drop the start of a prompt that is too long.")
@click.argument("prompt", required=False)
def generate(
    ignore_eos: bool, chat: bool, truncate: bool, prompt: str | None, **shared: Any
) -> None:
    """Generate text for PROMPT (read from stdin when omitted or '-'), printed as it is made."""
    options = _Options(**shared)
    options.check()
    if prompt is None or prompt == "-":
        prompt = _read_stdin()
    if not prompt:
        raise GemmaOnnxError("the prompt is empty; pass PROMPT or pipe it on stdin")
    request: str | list[dict] = prompt
    if options.system is not None:  # Gemma 3's template opens the first user turn with it
        system = {"role": "system", "content": options.system}
        request = [system, {"role": "user", "content": prompt}]
    gemma, load_seconds = options.open("generate")
    stream = gemma.stream(
        request, ignore_eos=ignore_eos, chat=chat, truncate=truncate, **options.generation
    )
    for piece in stream:
        echo(piece, nl=False)  # click.echo flushes: text appears as it is made
    echo()
    if options.stats:
        click.echo(_format_stats(stream.completion, load_seconds), err=True)


@click.command()
@_model_options
def chat(**shared: Any) -> None:
    """Chat in the model's chat template: each line read is a message (end a line with \\ to
    go on to the next), each answer is printed as it is made. Ctrl-C stops an answer; Ctrl-D,
    /exit or the end of the input ends the chat, /reset starts a new conversation.

    On the CPU each turn continues the KV cache of the last one, so only the new message is
    computed; a conversation that outgrows the context loses its oldest turns.
    """
    options = _Options(**shared)
    options.check()
    gemma, load_seconds = options.open("chat")
    if gemma.tokenizer.chat_template is None:
        click.echo(
            "note: this model folder has no chat template (a pretrained checkpoint?); its "
            "turns follow Gemma 3's format",
            err=True,
        )
    start = [{"role": "system", "content": options.system}] if options.system else []
    messages = list(start)
    interactive = _interactive()
    while True:
        try:
            message = _read_message(interactive)
        except GemmaOnnxError as exc:  # a line that is not UTF-8
            if not interactive:
                raise
            click.echo(f"error: {exc}", err=True)
            continue
        if message is None or message.strip() in ("/exit", "/quit"):
            return
        if message.strip() == "/reset":
            messages = list(start)
            continue
        if not message.strip():
            continue
        messages.append({"role": "user", "content": message})
        stream = gemma.stream(messages, truncate=True, **options.generation)
        answer, stopped = [], False
        try:
            for piece in stream:
                answer.append(piece)
                echo(piece, nl=False)
        except KeyboardInterrupt:
            if not interactive:
                raise
            stopped = True  # the partial answer stays in the conversation
            click.echo(" [stopped]", err=True)
        except GemmaOnnxError as exc:  # this message cannot be answered (too long, ...)
            if not interactive:
                raise
            if answer:
                echo()
            messages.pop()
            click.echo(f"error: {exc}", err=True)
            continue
        echo()
        messages.append({"role": "assistant", "content": "".join(answer)})
        if options.stats and not stopped:
            click.echo(_format_stats(stream.completion, load_seconds), err=True)


@dataclass(frozen=True)
class _Options:
    """The options generate and chat share (_MODEL_OPTIONS), as click passes them."""

    model_dir: str | None
    provider: str
    threads: int | None
    max_new_tokens: int | None
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    seed: int | None
    stop: tuple[str, ...]
    max_length: int | None
    system: str | None
    stats: bool

    @property
    def generation(self) -> dict[str, Any]:
        """Gemma.stream's keywords for these options."""
        return dict(
            max_new_tokens=self.max_new_tokens, stop=self.stop, temperature=self.temperature,
            top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, seed=self.seed,
        )  # fmt: skip

    def check(self) -> None:
        """Check every option before anything loads (or the default model is made), so a typo
        fails at once; note sampling options that greedy decoding ignores."""
        from gemma_onnx.api import check_options
        from gemma_onnx.runtime.sampling import SamplingConfig

        SamplingConfig(
            self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty,
            self.seed,
        )  # fmt: skip
        check_options(self.provider, self.threads, self.max_length, self.max_new_tokens, self.stop)
        if self.temperature == 0:
            ignored = [
                name
                for name, value, off in (
                    ("--top-k", self.top_k, 0),
                    ("--top-p", self.top_p, 1.0),
                    ("--min-p", self.min_p, 0.0),
                    ("--seed", self.seed, None),
                )
                if value != off
            ]
            if ignored:
                click.echo(
                    f"note: {', '.join(ignored)} only shape sampling; with --temperature 0 the "
                    "output is greedy",
                    err=True,
                )

    def open(self, command: str):
        """(Gemma on the model folder, seconds it took to load); the folder needs a tokenizer."""
        from gemma_onnx.api import Gemma

        _tolerant_stdout()
        start = time.perf_counter()
        gemma = Gemma(
            self.model_dir or _default_model(),
            provider=self.provider,
            threads=self.threads,
            max_length=self.max_length,
        )
        load_seconds = time.perf_counter() - start
        if gemma.tokenizer is None:
            raise GemmaOnnxError(
                f"{gemma.session.model_dir} has no tokenizer.json, which gemma-onnx {command} "
                "needs to read the prompt; copy it there from the source weights' folder"
            )
        return gemma, load_seconds


def _interactive() -> bool:
    """Someone types the messages: show a prompt, and let a bad line or turn pass."""
    return sys.stdin.isatty()


def _read_message(interactive: bool) -> str | None:
    """One message from stdin: a line, joined with the next while it ends in a backslash;
    None at the end of the input."""
    lines = []
    while True:
        if interactive:
            click.echo("> " if not lines else "… ", nl=False, err=True)
        raw = sys.stdin.buffer.readline()
        if not raw:
            return "\n".join(lines) if lines else None
        try:
            line = raw.decode("utf-8").removesuffix("\n").removesuffix("\r")
        except UnicodeDecodeError as exc:
            raise GemmaOnnxError(
                f"the message on stdin is not UTF-8 text (byte {raw[exc.start]:#04x}); convert "
                "it, e.g. with iconv -t UTF-8"
            ) from None
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        lines.append(line)
        return "\n".join(lines)


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
    cached = f" ({s.cached_tokens} cached)" if s.cached_tokens else ""
    return (
        f"load {load_seconds:.2f} s | time to first token {s.prefill_seconds * 1000:.0f} ms | "
        f"prefill {s.prompt_tokens} tokens{cached}, {s.prefill_tokens_per_second:.1f} tok/s | "
        f"decode {s.decode_steps} tokens, {s.decode_tokens_per_second:.1f} tok/s | "
        f"finish {completion.finish_reason} | peak RSS {peak_mib:.0f} MiB"
    )
