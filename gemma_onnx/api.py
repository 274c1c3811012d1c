"""The Python API: load a model folder once, then generate text (or token ids) from prompts.

    from gemma_onnx.api import Gemma

    gemma = Gemma("gemma-3-270m-onnx")
    print(gemma.generate("The capital of France is", max_new_tokens=20).text)
    for piece in gemma.stream("Write a haiku about rain.", chat=True, temperature=0.7, seed=1):
        print(piece, end="", flush=True)

Everything the CLI offers is a keyword argument here; the CLI is a thin layer over this class.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gemma_onnx.errors import GemmaOnnxError
from gemma_onnx.runtime.generate import (
    GenerationStats,
    check_max_new_tokens,
    default_max_new_tokens,
    fit_context,
)
from gemma_onnx.runtime.generate import generate as generate_ids
from gemma_onnx.runtime.sampling import Sampler, SamplingConfig
from gemma_onnx.runtime.session import RunState, Session, check_session_options
from gemma_onnx.runtime.text import StreamDecoder, TextTokenizer

# Text, token ids used as they are (no BOS added), or a conversation: a list of chat messages
# ({"role": "system" | "user" | "assistant", "content": text}) rendered by the chat template.
Prompt = str | Sequence[int] | Sequence[Mapping[str, Any]]
_ALLOCATION_STEP = 256  # grow the KV buffers in whole steps, so similar requests reuse them


@dataclass
class Completion:
    """One prompt's result."""

    token_ids: list[int]  # new tokens; ends with the eos token when that ended the row
    text: str | None  # the new text, exactly as streamed (None when there is no tokenizer)
    finish_reason: str  # "eos", "stop" (a stop string) or "length" (max_new_tokens)
    prompt_tokens: int  # after chat templating and truncation
    stats: GenerationStats = field(repr=False, default_factory=GenerationStats)  # whole batch's


class Stream:
    """Iterates over the text of one generation as it is made; ``completion`` is set at the end.

    Concatenated, the pieces equal ``completion.text``.
    """

    def __init__(self, pieces: Iterator[tuple[int, str]], completions: list[Completion]) -> None:
        self._pieces = pieces
        self._completions = completions

    def __iter__(self) -> Iterator[str]:
        for _, piece in self._pieces:
            yield piece

    @property
    def completion(self) -> Completion:
        if not self._completions:
            raise GemmaOnnxError("the stream has not finished yet; iterate over it first")
        return self._completions[0]


class Gemma:
    """A gemma-onnx model folder on ONNX Runtime.

    ``max_length`` caps prompt + new tokens and sizes the KV buffers once; without it the
    buffers are sized (and grown, in steps of 256) to what each request needs, up to the model's
    max_position_embeddings.

    ``tokenizer=False`` leaves the folder's tokenizer unloaded, for callers that bring token
    ids and take token ids back (their own tokenizer, a server's front end): Gemma 3's keeps
    ~0.1 GB resident. Text prompts, stop strings and ``stream`` then raise, and each
    Completion's ``text`` is None.

    One Gemma runs one generation at a time, as it has one KV cache: a call (from any thread)
    ends a stream still being iterated, which then raises instead of continuing on the other
    call's cache. For generations side by side, open one Gemma per thread.
    """

    def __init__(
        self,
        model_dir: str | Path,
        provider: str = "cpu",
        threads: int | None = None,
        max_length: int | None = None,
        tokenizer: bool = True,
    ) -> None:
        if not isinstance(model_dir, (str, os.PathLike)):
            raise GemmaOnnxError(f"model_dir must be a folder path, got {model_dir!r}")
        _check_max_length(max_length)
        if not isinstance(tokenizer, bool):
            raise GemmaOnnxError(f"tokenizer must be True or False, got {tokenizer!r}")
        # The tokenizer first: parsing a 262k-vocab tokenizer.json peaks ~300 MB above what the
        # tokenizer keeps, and that peak should not stack on top of the model's weights.
        self.tokenizer = TextTokenizer.from_folder(model_dir) if tokenizer else None
        self._tokenizer_declined = not tokenizer
        self.session = Session(model_dir, provider=provider, threads=threads)
        self.spec = self.session.spec
        if max_length is not None and max_length > self.spec.max_position_embeddings:
            raise GemmaOnnxError(
                f"max_length (--max-length) {max_length} is beyond the model's context of "
                f"{self.spec.max_position_embeddings} tokens"
            )
        self.max_length = max_length
        self._state: RunState | None = None
        # The tokens whose KV row 0 of _state holds after the last single-prompt generation (its
        # prompt and new tokens but the last); a request that extends them computes only the
        # rest, on the CPU. Reset by every call, set again when a single-prompt call completes.
        self._cached: list[int] | None = None
        # One generation at a time: each call takes a new epoch, and a generation whose epoch
        # is no longer current stops (see _run); the lock makes check-and-step atomic.
        self._lock = threading.Lock()
        self._epoch = 0

    @property
    def context_limit(self) -> int:
        """Most positions (prompt + new tokens) one row may use."""
        limit = self.spec.max_position_embeddings
        return limit if self.max_length is None else min(limit, self.max_length)

    def generate(
        self,
        prompt: Prompt | Sequence[Prompt],
        *,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        chat: bool = False,
        truncate: bool = False,
    ) -> Completion | list[Completion]:
        """Generate for one prompt (-> Completion) or a batch (a list -> list of Completions).

        A prompt is text, a list of token ids, or a conversation: a list of messages
        (``{"role": "system" | "user" | "assistant", "content": text}``) rendered by the
        folder's chat template, whatever ``chat`` says. A batch runs in one padded session and
        each row finishes on its own; greedy rows give the tokens they would alone, while
        sampled rows share one random stream (the same batch and seed repeat, but a row's
        sample depends on the rows beside it). Greedy when temperature is 0; ``seed`` makes
        sampling repeat; ``stop`` strings end a row (the text stops before them); ``chat``
        wraps text prompts in the folder's chat template; ``truncate`` keeps the end of a
        prompt too long for the context instead of refusing it (of a chat prompt, with its turn
        markers; a conversation first loses its oldest turns, after any system message).
        ``max_new_tokens`` defaults to 256, or to what the context limit (``max_length``) leaves
        after the longest prompt, if less (with ``truncate``, at least half the context); a
        number given is held to.
        """
        single, prompts = _as_batch(prompt)
        completions: list[Completion] = []
        options = dict(
            max_new_tokens=max_new_tokens,
            sampling=SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty, seed),
            stop=stop,
            ignore_eos=ignore_eos,
            chat=chat,
            truncate=truncate,
        )
        for _ in self._run(prompts, completions, **options):
            pass
        return completions[0] if single else completions

    def stream(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        chat: bool = False,
        truncate: bool = False,
    ) -> Stream:
        """Like :meth:`generate` for one text prompt, yielding text as the tokens are made."""
        single, prompts = _as_batch(prompt)
        if not single:
            raise GemmaOnnxError("stream() takes one prompt; use generate() for a batch")
        self._require_tokenizer("text streams (stream())")
        # What can be checked without the cache, now rather than at the first iteration.
        if max_new_tokens is not None:
            check_max_new_tokens(max_new_tokens)
        _stop_strings(stop)
        if prompts[0] == "":
            self._encode(prompts[0], chat, 0)
        completions: list[Completion] = []
        pieces = self._run(
            prompts,
            completions,
            max_new_tokens=max_new_tokens,
            sampling=SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty, seed),
            stop=stop,
            ignore_eos=ignore_eos,
            chat=chat,
            truncate=truncate,
        )
        return Stream(pieces, completions)

    def _run(
        self,
        prompts: list[Prompt],
        completions: list[Completion],
        *,
        max_new_tokens: int | None,
        sampling: SamplingConfig,
        stop: Sequence[str],
        ignore_eos: bool,
        chat: bool,
        truncate: bool,
    ) -> Iterator[tuple[int, str]]:
        """Yield (row, text piece) as tokens are made; fill ``completions`` when all rows end."""
        stop = _stop_strings(stop)
        if stop:
            self._require_tokenizer("stop strings")
        with self._lock:
            self._epoch += 1
            epoch = self._epoch
            encoded = [self._encode(p, chat, row, len(prompts)) for row, p in enumerate(prompts)]
            if max_new_tokens is None:
                max_new_tokens = default_max_new_tokens(encoded, self.context_limit, truncate)
            frames = None
            if truncate:  # of chat prompts, cut the last message's text, not the turn markers
                frames = []
                for row, prompt in enumerate(prompts):
                    if _is_conversation(prompt):
                        room = self.context_limit - max_new_tokens
                        prompt, encoded[row] = self._drop_oldest_turns(prompt, encoded[row], room)
                    chat_row = _is_conversation(prompt) or (chat and isinstance(prompt, str))
                    frame = self.tokenizer.chat_frame(prompt, encoded[row]) if chat_row else None
                    frames.append(frame)
            ids = fit_context(
                encoded,
                max_new_tokens,
                self.context_limit,
                truncate=truncate,
                bos_token_id=self.spec.bos_token_id,
                model_limit=self.spec.max_position_embeddings,
                frames=frames,
            )
            cached, self._cached = self._cached, None
            # CUDA prefills each prompt in one forward from position 0 (see _prefill_rows): a
            # continuation there would take GQA paths this project cannot test without a GPU.
            on_cpu = self.session.device == "cpu"
            if not (on_cpu and cached and len(ids) == 1 and _extends(ids[0], cached)):
                cached = []
            state, carried = self._state_for(
                len(ids), max(map(len, ids)) + max_new_tokens, len(cached)
            )
        decoders = [StreamDecoder(self.tokenizer, stop) for _ in ids] if self.tokenizer else None
        outputs: list[list[int]] = [[] for _ in ids]
        stats = GenerationStats()
        steps = generate_ids(
            self.session,
            state,
            Sampler(sampling),
            ids,
            max_new_tokens,
            eos_token_ids=self.spec.eos_token_ids,
            ignore_eos=ignore_eos,
            should_stop=(lambda row, token: decoders[row].push(token)) if decoders else None,
            stats=stats,
            cached=carried,
        )
        while True:
            with self._lock:
                if self._epoch != epoch:
                    raise GemmaOnnxError(
                        "this generation was cut short: a later call on the same Gemma took "
                        "its KV cache (finish a stream before the next call, or use one Gemma "
                        "per thread)"
                    )
                new = next(steps, None)
                if new is None and len(ids) == 1:  # what the KV cache holds, for a later request
                    self._cached = ids[0] + outputs[0][:-1]  # that extends it
            if new is None:
                break
            for row in np.flatnonzero(new >= 0):
                outputs[row].append(int(new[row]))
                if decoders:
                    piece = decoders[row].take()
                    if piece:
                        yield int(row), piece
        eos = set(self.spec.eos_token_ids)
        for row, tokens in enumerate(outputs):
            text = None
            if decoders:
                decoders[row].finish()
                piece = decoders[row].take()
                if piece:
                    yield row, piece
                text = decoders[row].text
            if decoders and decoders[row].stopped:
                reason = "stop"
            elif not ignore_eos and tokens[-1] in eos:
                reason = "eos"
            else:
                reason = "length"
            completions.append(Completion(tokens, text, reason, len(ids[row]), stats))

    def _drop_oldest_turns(
        self, messages: Sequence[Mapping], ids: list[int], room: int
    ) -> tuple[list[Mapping], list[int]]:
        """A conversation too long for ``room`` tokens loses its oldest turns, a user message
        and the answer after it at a time, keeping any leading system message and at least the
        last message; returns the messages kept and their ids."""
        messages = list(messages)
        system = 1 if messages[0].get("role") == "system" else 0
        while len(ids) > room and len(messages) - system >= 3:
            messages = messages[:system] + messages[system + 2 :]
            ids = self.tokenizer.encode_chat(messages)
        return messages, ids

    def _encode(self, prompt: Prompt, chat: bool, row: int, rows: int = 1) -> list[int]:
        name = "the prompt" if rows == 1 else f"prompt {row}"
        if _is_conversation(prompt):
            tokenizer = self._require_tokenizer("conversations")
            try:
                ids = tokenizer.encode_chat(prompt)
            except GemmaOnnxError as exc:
                raise GemmaOnnxError(f"{name}: {exc}") from None
            return self._check_vocabulary(ids)
        if isinstance(prompt, str):
            if not prompt:
                # The tokenizer would turn "" into BOS alone: say so rather than ramble from it.
                raise GemmaOnnxError(
                    f"{name} is empty text; to start from BOS alone, pass its token id"
                )
            tokenizer = self._require_tokenizer("text prompts")
            ids = tokenizer.encode_chat(prompt) if chat else tokenizer.encode(prompt)
            return self._check_vocabulary(ids)
        if chat:
            raise GemmaOnnxError("chat needs a text prompt, not token ids")
        ids = _as_list(prompt, name)
        vocab = self.spec.vocab_size
        for position, token in enumerate(ids):
            if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
                raise GemmaOnnxError(
                    f"{name}: token {token!r} at position {position} is not an integer id"
                )
            if not 0 <= token < vocab:
                raise GemmaOnnxError(
                    f"{name}: token id {token} at position {position} is outside the "
                    f"vocabulary [0, {vocab})"
                )
        return [int(t) for t in ids]

    def _check_vocabulary(self, ids: list[int]) -> list[int]:
        outside = [t for t in ids if not 0 <= t < self.spec.vocab_size]
        if outside:
            raise GemmaOnnxError(
                f"{self.session.model_dir}: tokenizer.json gives token id {outside[0]}, "
                f"outside the model's vocabulary [0, {self.spec.vocab_size}); the tokenizer "
                "does not belong to this model"
            )
        return ids

    def _require_tokenizer(self, what: str) -> TextTokenizer:
        if self.tokenizer is None:
            why = (
                "this Gemma was opened with tokenizer=False"
                if self._tokenizer_declined
                else f"{self.session.model_dir} has no tokenizer.json"
            )
            raise GemmaOnnxError(f"{what} need a tokenizer, and {why}; pass token ids instead")
        return self.tokenizer

    def _state_for(self, rows: int, length: int, cached: int = 0) -> tuple[RunState, int]:
        """The RunState, allocated anew only when this request needs more rows or positions,
        and how many of the ``cached`` positions of row 0 it holds (a new one gets them copied
        where the buffers are host memory)."""
        state = self._state
        if state is not None and state.batch >= rows and state.max_length >= length:
            return state, cached
        if self.max_length is not None:
            length = self.context_limit
        else:
            steps = -(-length // _ALLOCATION_STEP)
            length = min(steps * _ALLOCATION_STEP, self.spec.max_position_embeddings)
            if state is not None:
                length = max(length, state.max_length)
        rows = max(rows, state.batch if state is not None else 0)
        if cached:  # both sets of buffers live for the copy
            self._state = self.session.allocate(rows, length)
            carried = self.session.carry_kv(state, self._state, cached)
            return self._state, cached if carried else 0
        self._state = None  # release the old buffers before allocating the new ones
        self._state = self.session.allocate(rows, length)
        return self._state, 0


def _as_batch(prompt: Prompt | Sequence[Prompt]) -> tuple[bool, list[Prompt]]:
    """(is a single prompt, prompts): text, a flat id list or a list of messages is one
    prompt; any other list is a batch.

    A list holding any integer is one id list (a stray non-integer in it is then reported by
    position), since a batch of bare integers means nothing; one holding any dict is one
    conversation, for the same reason.
    """
    if isinstance(prompt, str):
        return True, [prompt]
    if isinstance(prompt, Mapping) and "role" in prompt:
        raise GemmaOnnxError(
            "one message is not a conversation: pass a list of messages, [{'role': 'user', "
            "'content': ...}]"
        )
    if hasattr(prompt, "tolist") and not isinstance(prompt, list):  # numpy, torch: plain lists
        prompt = prompt.tolist()
    items = _as_list(prompt, "the prompt")
    if not items:
        raise GemmaOnnxError("no prompt given")
    if any(isinstance(p, (int, np.integer)) for p in items) or _is_conversation(items):
        return True, [items]
    return False, items


def _extends(ids: list[int], prefix: list[int]) -> bool:
    """Whether ``ids`` is ``prefix`` followed by at least one more token."""
    return len(ids) > len(prefix) and ids[: len(prefix)] == prefix


def _is_conversation(prompt: object) -> bool:
    """A list of chat messages: a list that holds a dict (check_messages checks the rest)."""
    return isinstance(prompt, (list, tuple)) and any(isinstance(m, Mapping) for m in prompt)


_PROMPT_KINDS = "must be text, a list of token ids or a list of chat messages"


def _as_list(prompt: object, what: str) -> list:
    """``prompt`` as a list of items; bytes and non-iterables are refused by name."""
    if isinstance(prompt, (bytes, bytearray)):
        raise GemmaOnnxError(f"{what} is bytes; decode it to str, or pass a list of token ids")
    if isinstance(prompt, (dict, set, frozenset)):  # a mapping's keys, a set's own order
        raise GemmaOnnxError(f"{what} {_PROMPT_KINDS}, got {type(prompt).__name__}")
    try:
        return list(prompt)
    except TypeError:
        raise GemmaOnnxError(f"{what} {_PROMPT_KINDS}, got {type(prompt).__name__}") from None


def check_options(
    provider: str = "cpu",
    threads: int | None = None,
    max_length: int | None = None,
    max_new_tokens: int | None = None,
    stop: Sequence[str] | None = (),
) -> None:
    """What Gemma(...) and generate() would refuse among these, checked before anything
    loads (the CLI calls it before it makes the default model)."""
    check_session_options(provider, threads)
    _check_max_length(max_length)
    if max_new_tokens is not None:
        check_max_new_tokens(max_new_tokens)
        if max_length is not None and max_new_tokens >= max_length:
            raise GemmaOnnxError(
                f"max_new_tokens (--max-new-tokens) {max_new_tokens} leaves no room for the "
                f"prompt in max_length (--max-length) {max_length}"
            )
    _stop_strings(stop)


def _check_max_length(max_length: object) -> None:
    if max_length is None:
        return
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)):
        raise GemmaOnnxError(f"max_length (--max-length) must be an integer, got {max_length!r}")
    if max_length < 2:
        raise GemmaOnnxError(f"max_length (--max-length) must be >= 2, got {max_length}")


def _stop_strings(stop: object) -> list[str]:
    """``stop`` as a list of non-empty strings; one string alone is one stop string, None
    none."""
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, (bytes, dict)) or not hasattr(stop, "__iter__"):
        raise GemmaOnnxError(f"stop must be a list of strings, got {stop!r}")
    stop = list(stop)
    for item in stop:
        if not isinstance(item, str) or not item:
            raise GemmaOnnxError(f"stop strings must be non-empty text, got {item!r}")
    return stop
