"""The generation loop on token ids, named by phase: prefill(), decode_one_token(), generate().

Text never enters here (tokenization lives at the edges, the CLI and the API): stop strings reach
the loop as a ``should_stop(row, token)`` hook that the caller implements on its detokenizer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from gemma_onnx.errors import GemmaOnnxError
from gemma_onnx.runtime.sampling import Sampler
from gemma_onnx.runtime.session import RunState, Session

# Prompt tokens per forward on shared-KV graphs, on the CPU. A forward's activations grow with
# its tokens (~65 KB each on Gemma 3 270M int4) and the arena keeps their high-water mark for the
# whole run: an 860-token prompt in one forward held ~60 MB more than in chunks of 256.
PREFILL_CHUNK = 256


@dataclass
class GenerationStats:
    """Timings of one generate() call, filled in as it runs."""

    prompt_tokens: int = 0  # real (unpadded) prompt tokens over all rows
    cached_tokens: int = 0  # of those, how many the KV cache held already (not recomputed)
    new_tokens: int = 0  # tokens produced over all rows, eos included
    prefill_seconds: float = 0.0  # prompt forward + first sample: the time to first token
    decode_seconds: float = 0.0  # every later step
    decode_steps: int = 0  # decode_one_token() calls; each makes one token per live row

    @property
    def prefill_tokens_per_second(self) -> float:
        """Prompt tokens computed per second (cached ones are not)."""
        computed = self.prompt_tokens - self.cached_tokens
        return computed / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Decode steps per second: a row's tokens after its first (which prefill makes)."""
        return self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0


# Tokens a request makes when it does not say: fewer when the context has less room.
DEFAULT_MAX_NEW_TOKENS = 256


def check_max_new_tokens(max_new_tokens: object) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
        raise GemmaOnnxError(
            f"max_new_tokens (--max-new-tokens) must be an integer, got {max_new_tokens!r}"
        )
    if max_new_tokens < 1:
        raise GemmaOnnxError(
            f"max_new_tokens (--max-new-tokens) must be >= 1, got {max_new_tokens}"
        )


def default_max_new_tokens(
    prompts: Sequence[Sequence[int]], limit: int, truncate: bool = False
) -> int:
    """:data:`DEFAULT_MAX_NEW_TOKENS`, or what the context ``limit`` leaves after the longest
    prompt (at least 1: a prompt that fills the context is then fit_context's to refuse). With
    ``truncate``, at least half the context: the prompt is cut to make room for an answer."""
    longest = max((len(p) for p in prompts), default=0)
    room = limit - longest
    if truncate:
        room = max(room, limit // 2)
    return max(1, min(DEFAULT_MAX_NEW_TOKENS, room))


def fit_context(
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    limit: int,
    truncate: bool = False,
    bos_token_id: int | None = None,
    model_limit: int | None = None,
    frames: Sequence[tuple[int, int] | None] | None = None,
) -> list[list[int]]:
    """Check prompt + max_new_tokens against the context ``limit`` (the smaller of
    max_position_embeddings and the allocated max length); with ``truncate``, keep the end of a
    prompt that is too long (and its leading BOS, which Gemma needs), else refuse, suggesting a
    larger --max-length only when the model's own context (``model_limit``) allows one.
    ``frames``: per prompt, (head, tail) tokens a chat template put around the prompt's own,
    which truncation keeps (by default, or where the entry is None, only a leading BOS)."""
    check_max_new_tokens(max_new_tokens)
    if max_new_tokens >= limit:
        raise GemmaOnnxError(
            f"max_new_tokens (--max-new-tokens) {max_new_tokens} leaves no room for the prompt "
            f"in the context limit of {limit} tokens"
        )
    room = limit - max_new_tokens
    fitted = []
    for row, prompt in enumerate(prompts):
        prompt = list(prompt)
        name = "the prompt" if len(prompts) == 1 else f"prompt {row}"
        if not prompt:
            raise GemmaOnnxError(f"{name} is empty; generation needs at least one token")
        if len(prompt) > room:
            if not truncate:
                fixes = "shorten it, lower --max-new-tokens"
                if model_limit is not None and limit < model_limit:
                    fixes += f", raise --max-length (up to {model_limit})"
                raise GemmaOnnxError(
                    f"{name} has {len(prompt)} tokens; with max_new_tokens {max_new_tokens} that "
                    f"exceeds the context limit of {limit} tokens: {fixes} or pass --truncate"
                )
            if frames is not None and frames[row] is not None:
                head, tail = frames[row]
            else:
                head, tail = int(bos_token_id is not None and prompt[0] == bos_token_id), 0
            if head + tail >= room:
                if frames is not None and frames[row] is not None and head + tail > 1:
                    raise GemmaOnnxError(
                        f"{name}: the chat template (with the system message, if any) alone "
                        f"takes {head + tail} of the "
                        f"{room} tokens the context leaves for the prompt; lower "
                        "--max-new-tokens or raise --max-length"
                    )
                head, tail = 0, 0
            body = room - head - tail
            end = len(prompt) - tail
            prompt = prompt[:head] + prompt[end - body : end] + prompt[end:]
        fitted.append(prompt)
    return fitted


def prefill(
    session: Session,
    state: RunState,
    sampler: Sampler,
    prompts: Sequence[Sequence[int]],
    cached: int = 0,
) -> np.ndarray:
    """Run every prompt token in one step, left-padded to the longest prompt, and pick each row's
    first new token: [rows] int64.

    Left padding keeps every row's last token in the last column, so one ``logits_to_keep=1``
    step serves them all; position ids count real tokens only (HF generate: cumsum(mask) - 1).

    ``cached``: one prompt only, whose first ``cached`` tokens are exactly what the KV buffers
    of ``state``'s row 0 hold (the tokens the last generation on it fed); only the rest runs.
    """
    rows, seq = len(prompts), max(len(p) for p in prompts)
    if cached and (rows != 1 or not 0 < cached < seq):
        raise ValueError(f"cached={cached} needs one prompt longer than that, got {rows} x {seq}")
    state.start(rows)
    if session.shared_kv:
        return _prefill_rows(session, state, sampler, prompts, cached)
    if cached:  # one row, no padding: the new tokens at positions cached..seq-1
        prompt, new = prompts[0], seq - cached
        state.past_length = cached
        state.mask[0, :seq] = 1
        state.seen[0, prompt] = True
        state.input_ids[:new] = prompt[cached:]  # as [1, new]
        state.position_ids[:new] = np.arange(cached, seq)
        state.next_position[0] = seq
        return _pick(sampler, state, session.forward(state, 1, new))
    ids = state.input_ids[: rows * seq].reshape(rows, seq)  # [rows, seq]
    ids.fill(session.spec.pad_token_id)
    mask = state.mask[:rows, :seq]  # [rows, seq]
    for row, prompt in enumerate(prompts):
        ids[row, seq - len(prompt) :] = prompt
        mask[row, seq - len(prompt) :] = 1
        state.seen[row, prompt] = True
    positions = state.position_ids[: rows * seq].reshape(rows, seq)  # [rows, seq]
    np.cumsum(mask, axis=1, out=positions)
    positions -= 1
    np.maximum(positions, 0, out=positions)  # pads get 0; the mask hides them anyway
    state.next_position[:rows] = positions[:, -1] + 1
    logits = session.forward(state, rows, seq)  # [rows, V]
    return _pick(sampler, state, logits)


def _prefill_rows(
    session: Session,
    state: RunState,
    sampler: Sampler,
    prompts: Sequence[Sequence[int]],
    cached: int = 0,
) -> np.ndarray:
    """Shared-KV graphs keep rows right-padded (each row's tokens from position 0), so each
    prompt runs alone at its own length, into its own row of the KV buffers; on the CPU in
    chunks of PREFILL_CHUNK tokens, each attending to the KV the previous ones wrote, and only
    the last computing logits (on CUDA the activations are device memory, and one forward per
    prompt keeps GQA on its first-prompt path). A ``cached`` start continues row 0's buffers
    as the previous chunks would have left them."""
    first = np.zeros(len(prompts), np.int64)
    chunk = PREFILL_CHUNK if session.device == "cpu" else max(map(len, prompts))
    for row, prompt in enumerate(prompts):
        length = len(prompt)
        state.mask[row, :length] = 1
        state.seen[row, prompt] = True
        state.next_position[row] = length
        for start in range(cached, length, chunk):
            end = min(start + chunk, length)
            state.input_ids[: end - start] = prompt[start:end]  # as [1, end - start]
            state.position_ids[: end - start] = np.arange(start, end)
            logits = session.forward_shared(  # [1, V] from the last chunk; None before
                state, 1, end - start, end, first_row=row, logits=end == length
            )
        first[row] = sampler(logits, state.seen[row : row + 1])[0]
        state.seen[row, first[row]] = True
    return first


def decode_one_token(
    session: Session, state: RunState, sampler: Sampler, tokens: np.ndarray
) -> np.ndarray:
    """Feed one token per row ([rows] int64) and pick the next one: [rows] int64."""
    rows = len(tokens)
    state.input_ids[:rows] = tokens  # as [rows, 1]
    state.position_ids[:rows] = state.next_position[:rows]
    if session.shared_kv:  # right padding: each row's new token goes at its own length
        state.mask[np.arange(rows), state.next_position[:rows]] = 1
        total = int(state.next_position[:rows].max()) + 1
        logits = session.forward_shared(state, rows, 1, total)  # [rows, V]
    else:
        state.mask[:rows, state.past_length] = 1
        logits = session.forward(state, rows, 1)  # [rows, V]
    state.next_position[:rows] += 1
    return _pick(sampler, state, logits)


def _pick(sampler: Sampler, state: RunState, logits: np.ndarray) -> np.ndarray:
    rows = len(logits)
    tokens = sampler(logits, state.seen[:rows])  # [rows]
    state.seen[np.arange(rows), tokens] = True
    return tokens


def generate(
    session: Session,
    state: RunState,
    sampler: Sampler,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_ids: Iterable[int] = (),
    ignore_eos: bool = False,
    should_stop: Callable[[int, int], bool] | None = None,
    stats: GenerationStats | None = None,
    cached: int = 0,
) -> Iterator[np.ndarray]:
    """Yield each step's new tokens, [rows] int64, with -1 for rows that already finished.

    A row finishes on any id in ``eos_token_ids`` (unless ``ignore_eos``; the eos token itself
    is yielded), when ``should_stop(row, token)`` says so, or after ``max_new_tokens``. Rows
    finish independently; finished rows feed the pad token until the last row is done.
    Prompts must already fit (see :func:`fit_context`) the state's max_length. ``cached``: see
    :func:`prefill`. The tokens fed, and so left in the KV cache, are each prompt and its new
    tokens but the last.
    """
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens += sum(len(p) for p in prompts)
    stats.cached_tokens += cached
    rows = len(prompts)
    eos = np.fromiter(() if ignore_eos else eos_token_ids, np.int64)
    done = np.zeros(rows, bool)
    start = time.perf_counter()
    tokens = prefill(session, state, sampler, prompts, cached)
    stats.prefill_seconds += time.perf_counter() - start
    for step in range(max_new_tokens):
        if step:
            start = time.perf_counter()
            feed = np.where(done, session.spec.pad_token_id, tokens)  # [rows]
            tokens = decode_one_token(session, state, sampler, feed)
            stats.decode_seconds += time.perf_counter() - start
            stats.decode_steps += 1
        new = np.where(done, -1, tokens)  # [rows]
        stats.new_tokens += int((~done).sum())
        done |= np.isin(tokens, eos)
        if should_stop is not None:
            for row in np.flatnonzero(new >= 0):
                done[row] |= should_stop(int(row), int(new[row]))
        yield new
        if done.all():
            return
