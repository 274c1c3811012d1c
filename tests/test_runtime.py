"""The runtime on a tiny random Gemma 3 built by our builder: HF greedy parity, sampling, batching,
buffers allocated once, streaming detokenization, stop conditions and the context guard.

``make_tiny_model`` (also used by test_generate_cli.py) writes a byte-fallback BPE tokenizer whose
vocabulary is exactly the model's, so every id the model can produce decodes to text.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import FULL, SLIDING, make_causal_lm
from gemma_onnx.api import Gemma
from gemma_onnx.errors import GemmaOnnxError
from gemma_onnx.runtime import Sampler, SamplingConfig, Session, StreamDecoder, TextTokenizer
from gemma_onnx.runtime import generate as generate_ids
from gemma_onnx.runtime.session import DeviceBuffer

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]  # ids 0-5
VOCAB = 320
EOS_IDS = [1, 5]  # like Gemma 3 -it's <eos> and <end_of_turn> (1 and 106)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# The brief's tiny shape, plus conftest's hard cases (query_pre_attn_scalar != head_dim, small
# RoPE thetas, linear scaling on global layers). initializer_range 0.02 gives varied greedy text
# with a top-1/top-2 margin far above fp32 noise.
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    head_dim=32,
    sliding_window=8,
    layer_types=[SLIDING, FULL, SLIDING, FULL],
    max_position_embeddings=256,
    initializer_range=0.02,
)
PROMPT = [2, *np.random.default_rng(0).integers(6, VOCAB, 14).tolist()]  # 15 > sliding_window 8


def write_tokenizer(folder: Path) -> None:
    """Byte-fallback BPE like Gemma's: specials, the 256 byte tokens, then single characters."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors

    vocab = {token: i for i, token in enumerate(SPECIALS)}
    vocab.update({f"<0x{b:02X}>": len(SPECIALS) + b for b in range(256)})
    for char in "\u2581abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?'":
        vocab[char] = len(vocab)
    assert len(vocab) == VOCAB
    tokenizer = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tokenizer.add_special_tokens(SPECIALS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 2)]
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def make_tiny_model(base: Path) -> tuple[Path, object]:
    """A tiny random Gemma3ForCausalLM + tokenizer, built by our builder -> (folder, HF oracle)."""
    from gemma_onnx.builder import build_model

    weights = base / "weights"
    oracle = make_causal_lm(weights, seed=0, **TINY)
    write_tokenizer(weights)
    generation_path = weights / "generation_config.json"
    generation = json.loads(generation_path.read_text())
    generation["eos_token_id"] = EOS_IDS
    generation_path.write_text(json.dumps(generation))
    return build_model(weights, base / "onnx"), oracle


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def gemma(tiny):
    return Gemma(tiny[0], threads=1)


def hf_greedy(oracle, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = oracle.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False
        )
    return out[0, len(prompt) :].tolist()


def test_greedy_equals_hf_generate(tiny, gemma):
    _, oracle = tiny
    expected = hf_greedy(oracle, PROMPT, 24)
    assert len(expected) == 24 and len(set(expected)) > 10  # a meaningful sequence
    got = gemma.generate(PROMPT, max_new_tokens=24, ignore_eos=True)
    assert got.token_ids == expected


def test_stops_on_every_eos_id_in_generation_config(gemma):
    assert gemma.spec.eos_token_ids == tuple(EOS_IDS)
    full = gemma.generate(PROMPT, max_new_tokens=24, ignore_eos=True).token_ids
    first_eos = next(i for i, t in enumerate(full) if t in EOS_IDS)  # the model makes a 5
    assert full[first_eos] == 5
    stopped = gemma.generate(PROMPT, max_new_tokens=24)
    assert stopped.token_ids == full[: first_eos + 1]
    assert stopped.finish_reason == "eos"
    assert gemma.generate(PROMPT, max_new_tokens=3, ignore_eos=True).finish_reason == "length"


def test_seeded_sampling_repeats_and_another_seed_differs(gemma):
    def sample(seed: int) -> list[int]:
        options = dict(temperature=1.0, top_k=100, top_p=0.95, repetition_penalty=1.1)
        return gemma.generate(PROMPT, max_new_tokens=16, ignore_eos=True, seed=seed, **options)

    first = sample(3).token_ids
    assert sample(3).token_ids == first
    assert sample(4).token_ids != first


def test_left_padded_batch_equals_rows_alone(gemma):
    rng = np.random.default_rng(5)
    prompts = [[2, *rng.integers(6, VOCAB, n).tolist()] for n in (16, 3, 10)]
    alone = [gemma.generate(p, max_new_tokens=12, ignore_eos=True).token_ids for p in prompts]
    batch = gemma.generate(prompts, max_new_tokens=12, ignore_eos=True)
    assert [c.token_ids for c in batch] == alone


def test_rows_finish_independently(gemma):
    """Row 0 ends on its fourth token (made an eos id here); the others run on, unchanged."""
    rng = np.random.default_rng(6)
    prompts = [[2, *rng.integers(6, VOCAB, n).tolist()] for n in (5, 12, 9)]
    alone = [gemma.generate(p, max_new_tokens=10, ignore_eos=True).token_ids for p in prompts]
    eos = {alone[0][3]}
    assert not eos & set(alone[1] + alone[2]), "pick prompts whose other rows avoid that token"
    state = gemma.session.allocate(3, 32)
    rows: list[list[int]] = [[], [], []]
    steps = generate_ids(
        gemma.session, state, Sampler(SamplingConfig()), prompts, 10, eos_token_ids=eos
    )
    for new in steps:
        for r in np.flatnonzero(new >= 0):
            rows[r].append(int(new[r]))
    assert rows == [alone[0][:4], alone[1], alone[2]]


def test_kv_buffers_are_allocated_once_and_written_in_place(gemma, monkeypatch):
    made = []
    real_init = DeviceBuffer.__init__

    def counting_init(self, *args, **kwargs):
        made.append(args)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(DeviceBuffer, "__init__", counting_init)
    session = gemma.session
    state = session.allocate(2, 64)
    assert len(made) == 2 * len(session.kv_names)  # ping and pong per KV tensor, nothing else
    buffers = {id(b): b.ptr for b in state.past + state.present}
    logits_ptr = state.logits.ctypes.data
    prompts = [PROMPT, PROMPT[:7]]
    for _ in range(2):  # the state is reused across generations too
        steps = generate_ids(session, state, Sampler(SamplingConfig()), prompts, 40)
        for _ in steps:
            now = {id(b): b.ptr for b in state.past + state.present}
            assert now == buffers
            assert state.logits.ctypes.data == logits_ptr
            # ORT wrote present into our buffers (no copy): the bound outputs live there.
            outputs = state.binding.get_outputs()
            assert {o.data_ptr() for o in outputs[1:]} == {b.ptr for b in state.past}
            assert outputs[0].data_ptr() == logits_ptr
    assert len(made) == 2 * len(session.kv_names)
    assert state.past_length == len(PROMPT) + 39


def test_generation_without_logits_to_keep(tiny, tmp_path):
    """A graph lacking the optional input: prefill takes the full logits, same tokens."""
    folder = tmp_path / "no_keep"
    shutil.copytree(tiny[0], folder)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    inputs = [i for i in model.graph.input if i.name != "logits_to_keep"]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    onnx.save(model, str(folder / "model.onnx"))
    plain = Gemma(folder)
    assert not plain.session.has_logits_to_keep
    expected = Gemma(tiny[0]).generate(PROMPT, max_new_tokens=8, ignore_eos=True).token_ids
    assert plain.generate(PROMPT, max_new_tokens=8, ignore_eos=True).token_ids == expected


def test_without_the_tokenizer_ids_in_ids_out(tiny, gemma):
    """tokenizer=False: the same tokens for token-id prompts, no text, and a clear error for
    everything that needs the tokenizer."""
    bare = Gemma(tiny[0], threads=1, tokenizer=False)
    assert bare.tokenizer is None
    expected = gemma.generate(PROMPT, max_new_tokens=8, ignore_eos=True)
    completion = bare.generate(PROMPT, max_new_tokens=8, ignore_eos=True)
    assert completion.token_ids == expected.token_ids
    assert completion.text is None and expected.text is not None
    for call in (
        lambda: bare.generate("hello", max_new_tokens=2),
        lambda: bare.generate(PROMPT, max_new_tokens=2, stop=["x"]),
        lambda: bare.stream("hello", max_new_tokens=2),
    ):
        with pytest.raises(GemmaOnnxError, match="opened with tokenizer=False"):
            call()


def test_stream_decoder_never_splits_a_character(tiny):
    tokenizer = TextTokenizer.from_folder(tiny[0])
    text = "hi 😀 中文 ok ☕!"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text)  # emoji and CJK went through byte-fallback tokens
    decoder = StreamDecoder(tokenizer)
    pieces = []
    for token in ids:
        decoder.push(token)
        pieces.append(decoder.take())
    decoder.finish()
    pieces.append(decoder.take())
    assert "".join(pieces) == decoder.text == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert pieces.count("") >= 6  # held back while a character was incomplete


def test_stream_decoder_stops_before_a_stop_string(tiny):
    tokenizer = TextTokenizer.from_folder(tiny[0])
    decoder = StreamDecoder(tokenizer, stop=["中文", "zz"])
    pieces = []
    for token in tokenizer.encode("hi 😀 中文 ok"):
        stopped = decoder.push(token)
        pieces.append(decoder.take())
        if stopped:
            break
    assert decoder.stopped and "".join(pieces) == decoder.text == "hi 😀 "


def test_a_stop_string_naming_a_special_token_stops_on_it(tiny):
    """Decoding skips special tokens, so "<end_of_turn>" never shows in the text; as a stop
    string it stops on the token itself (as HF's stop_strings do), ending the text before it,
    with what was held back as a possible stop-string start ("<" of "<end") released."""
    tokenizer = TextTokenizer.from_folder(tiny[0])
    said = tokenizer.encode("ok <", add_special_tokens=False)
    then = tokenizer.encode("user", add_special_tokens=False)
    decoder = StreamDecoder(tokenizer, stop=["<end_of_turn>", "<end"])
    pieces, stops = [], []
    for token in [*said, SPECIALS.index("<end_of_turn>"), *then]:
        stops.append(decoder.push(token))
        pieces.append(decoder.take())
    assert stops.index(True) == len(said)
    assert decoder.stopped and "".join(pieces) == decoder.text == "ok <"


def test_streamed_text_equals_final_text(gemma):
    # The tiny model mostly emits byte tokens: split multi-byte sequences, many of them invalid.
    stream = gemma.stream(PROMPT, max_new_tokens=40, temperature=1.0, seed=0, ignore_eos=True)
    pieces = list(stream)
    completion = stream.completion
    assert "".join(pieces) == completion.text
    assert len(completion.token_ids) == 40
    # A U+FFFD is only printed once the bytes after it show it is final (or at the end).
    assert not any(piece.endswith("\ufffd") for piece in pieces[:-1])
    # (tokenizers' ByteFallback turns every byte of an invalid run into U+FFFD, valid ASCII
    # bytes included, so a whole-text decode may differ from the stream around invalid bytes;
    # on valid UTF-8 the two agree: test_stream_decoder_never_splits_a_character.)


def test_a_later_call_ends_an_unfinished_stream_instead_of_corrupting_it(gemma):
    """One KV cache per Gemma: a stream paused mid-way, then another call, must not resume on
    the other call's cache (it gave wrong text, silently). The later call is right."""
    expected = gemma.generate(PROMPT, max_new_tokens=12, ignore_eos=True).token_ids
    paused = iter(gemma.stream(PROMPT, max_new_tokens=12, ignore_eos=True))
    next(paused)
    assert gemma.generate(PROMPT, max_new_tokens=12, ignore_eos=True).token_ids == expected
    with pytest.raises(GemmaOnnxError, match="this generation was cut short"):
        list(paused)
    assert gemma.generate(PROMPT, max_new_tokens=12, ignore_eos=True).token_ids == expected


def test_one_gemma_from_two_threads_never_gives_wrong_tokens(gemma):
    """Each call either gives the tokens it gives alone or, cut short by the other thread's
    call, raises; interleaved steps on one KV cache gave wrong tokens for both."""
    import threading

    prompts = [PROMPT, [2, 40, 41, 42, 43]]
    alone = [gemma.generate(p, max_new_tokens=24, ignore_eos=True).token_ids for p in prompts]
    outcomes: list[object] = []

    def work(prompt, expected):
        for _ in range(4):
            try:
                got = gemma.generate(prompt, max_new_tokens=24, ignore_eos=True).token_ids
                outcomes.append(got == expected)
            except GemmaOnnxError as exc:
                outcomes.append("cut short" in str(exc))

    threads = [
        threading.Thread(target=work, args=pair) for pair in zip(prompts, alone, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(outcomes) == 8 and all(outcomes)


def test_prompts_and_stop_in_other_containers(gemma):
    """A bare string is one stop string (it was split into characters); numpy and torch ids
    are lists of ids."""

    expected = gemma.generate([2, 40, 41], max_new_tokens=6, ignore_eos=True).token_ids
    assert gemma.generate(np.array([2, 40, 41]), max_new_tokens=6, ignore_eos=True).token_ids == (
        expected
    )
    assert gemma.generate(
        torch.tensor([2, 40, 41]), max_new_tokens=6, ignore_eos=True
    ).token_ids == (expected)
    text = gemma.generate("abc", max_new_tokens=30, temperature=1.0, seed=1).text
    stop = text[3:5]
    as_str = gemma.generate("abc", max_new_tokens=30, temperature=1.0, seed=1, stop=stop)
    as_list = gemma.generate("abc", max_new_tokens=30, temperature=1.0, seed=1, stop=[stop])
    assert as_str.text == as_list.text == text[: text.index(stop)]


def test_stop_strings_end_the_text_before_them(gemma):
    text = gemma.generate("abc", max_new_tokens=30, ignore_eos=True, temperature=1.0, seed=1).text
    stop = text[10:12]
    got = gemma.generate("abc", max_new_tokens=30, temperature=1.0, seed=1, stop=[stop, "\x00"])
    assert got.finish_reason == "stop"
    assert got.text == text[: text.index(stop)]


def test_chat_template_renders_the_gemma_turn_format(gemma):
    tokenizer = gemma.tokenizer
    expected = "<bos><start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n"
    assert tokenizer.render_chat("hello") == expected
    assert tokenizer.encode_chat("hello")[:2] == [2, 4]  # one BOS, then <start_of_turn>
    tokenizer_without = TextTokenizer.from_folder(gemma.session.model_dir)
    tokenizer_without.chat_template = None
    assert tokenizer_without.render_chat("hello") == expected
    for padded in ("  hello \n", "line1\nline2\n\n"):  # Gemma's template trims each message
        assert tokenizer_without.render_chat(padded) == tokenizer.render_chat(padded)
    assert len(gemma.generate("hello", chat=True, max_new_tokens=2).token_ids) <= 2


# Gemma 3's published chat template (the -it models' tokenizer_config.json), text parts only:
# the oracle's template for conversations, rendered by transformers' apply_chat_template.
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""
CONVERSATION = [
    {"role": "system", "content": " Be brief.\n"},
    {"role": "user", "content": "Name a colour. "},
    {"role": "assistant", "content": "Blue."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "Another"}, {"type": "text", "text": " one?"}],
    },
]


def hf_tokenizer(model_dir, template: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


@pytest.mark.parametrize(
    "conversation",
    [CONVERSATION, CONVERSATION[1:], CONVERSATION[:2], [{"role": "user", "content": "hi"}]],
    ids=["system and turns", "turns", "system and one turn", "one turn"],
)
def test_conversations_render_as_gemma3s_template(gemma, conversation):
    """With Gemma 3's template, and with none (the built-in format), a conversation renders as
    transformers renders it."""
    expected = hf_tokenizer(gemma.session.model_dir, GEMMA3_TEMPLATE).apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True
    )
    ours = TextTokenizer.from_folder(gemma.session.model_dir)
    ours.chat_template = GEMMA3_TEMPLATE
    assert ours.render_chat(conversation) == expected
    ours.chat_template = None
    assert ours.render_chat(conversation) == expected


def test_conversation_roles_must_alternate_with_or_without_a_template(gemma):
    wrong = [CONVERSATION[1], CONVERSATION[1]]
    with pytest.raises(Exception, match="must alternate"):
        hf_tokenizer(gemma.session.model_dir, GEMMA3_TEMPLATE).apply_chat_template(wrong)
    ours = TextTokenizer.from_folder(gemma.session.model_dir)
    for template in (GEMMA3_TEMPLATE, None):
        ours.chat_template = template
        with pytest.raises(GemmaOnnxError, match="roles must alternate"):
            ours.render_chat(wrong)


def test_a_conversation_generates_what_hf_does_from_its_template(tiny, gemma):
    """A list of messages is one prompt, rendered by the folder's template (transformers'
    apply_chat_template gives the ids), chat=True or not; a list of them is a batch."""
    _, oracle = tiny
    ids = hf_tokenizer(gemma.session.model_dir).apply_chat_template(
        CONVERSATION, add_generation_prompt=True
    )
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers 5 returns a dict
    expected = hf_greedy(oracle, list(ids), 12)
    got = gemma.generate(CONVERSATION, max_new_tokens=12, ignore_eos=True)
    assert got.prompt_tokens == len(ids) and got.token_ids == expected
    again = gemma.generate(CONVERSATION, chat=True, max_new_tokens=12, ignore_eos=True)
    assert again.token_ids == got.token_ids
    batch = gemma.generate([CONVERSATION, "abc"], max_new_tokens=12, ignore_eos=True)
    assert batch[0].token_ids == expected
    assert batch[1].token_ids == gemma.generate("abc", max_new_tokens=12, ignore_eos=True).token_ids
    assert "".join(gemma.stream(CONVERSATION, max_new_tokens=12, ignore_eos=True)) == got.text


def test_a_long_conversation_loses_its_oldest_turns_first(tiny):
    """--truncate on a conversation drops whole turns after the system message, oldest first,
    then cuts the last message's text, keeping the system message and the turn markers."""
    turns = [{"role": "system", "content": "be brief"}]
    for n in range(6):
        turns += [{"role": "user", "content": f"q{'x' * n}"}, {"role": "assistant", "content": "a"}]
    turns.append({"role": "user", "content": "last"})
    tokenizer = TextTokenizer.from_folder(tiny[0])
    kept = [turns[0], *turns[-3:]]  # the system message, one whole turn and the question
    fits, one_more = (len(tokenizer.encode_chat(c)) for c in (kept, [turns[0], *turns[-5:]]))
    small = Gemma(tiny[0], max_length=4 + (fits + one_more) // 2)  # room for kept, not more
    got = small.generate(turns, truncate=True, max_new_tokens=4, ignore_eos=True)
    assert got.prompt_tokens == len(small.tokenizer.encode_chat(kept))
    assert got.token_ids == small.generate(kept, max_new_tokens=4, ignore_eos=True).token_ids

    long_question = [turns[0], {"role": "user", "content": "abc def " * 20}]
    got = small.generate(long_question, truncate=True, max_new_tokens=4, ignore_eos=True)
    full = tokenizer.encode_chat(long_question)
    # CHAT_TEMPLATE's markup around the question, with the system message's turn before it
    head = tokenizer.encode(
        "<bos><start_of_turn>system\nbe brief<end_of_turn>\n<start_of_turn>user\n",
        add_special_tokens=False,
    )
    tail = tokenizer.encode("<end_of_turn>\n<start_of_turn>model\n", add_special_tokens=False)
    assert full[: len(head)] == head and full[-len(tail) :] == tail
    room = small.max_length - 4
    assert got.prompt_tokens == room < len(full)
    end = len(full) - len(tail)
    kept = full[: len(head)] + full[end - (room - len(head) - len(tail)) : end] + tail
    assert small.generate(kept, max_new_tokens=4, ignore_eos=True).token_ids == got.token_ids


@pytest.mark.parametrize(
    "conversation, message",
    [
        ([{"role": "bot", "content": "x"}], "message 0: role 'bot' is not one of system, user"),
        ([CONVERSATION[1], {"role": "user"}], "message 1: content must be text"),
        (
            [{"role": "user", "content": [{"type": "image", "url": "cat.png"}]}],
            "message 0: only text parts",
        ),
        ([CONVERSATION[0]], "only system messages; add a user message"),
        ([CONVERSATION[1], "hi"], "message 1 must be a dict with 'role' and 'content'"),
        (CONVERSATION[1], "one message is not a conversation: pass a list of messages"),
        (
            [{"role": "user", "content": "a\udc80"}],
            r"the prompt: message 0 is not valid text: '\\udc80' at character 1",
        ),
    ],
)
def test_bad_conversations_are_named(gemma, conversation, message):
    with pytest.raises(GemmaOnnxError, match=message):
        gemma.generate(conversation, max_new_tokens=2)


@pytest.fixture(scope="module")
def tiny_ort(tiny, tmp_path_factory):
    """The same weights built for the ORT target (shared KV, window-sized sliding buffers)."""
    from gemma_onnx.builder import build_model

    weights = Path(tiny[0]).parent / "weights"
    return build_model(weights, tmp_path_factory.mktemp("tiny_ort") / "onnx", target="ort")


@pytest.mark.parametrize("target", ["portable", "ort"])
@pytest.mark.parametrize("allocation_step", [256, 16], ids=["same buffers", "larger buffers"])
def test_a_request_that_extends_the_last_one_reuses_its_kv_cache(
    tiny, tiny_ort, target, allocation_step, monkeypatch
):
    """A single prompt that starts with the last one's prompt and new tokens (a conversation's
    next turn) computes only the rest, past the sliding window (8) and across a reallocation,
    and gives HF's greedy tokens; the repetition penalty still sees the whole prompt."""
    import gemma_onnx.api as api

    monkeypatch.setattr(api, "_ALLOCATION_STEP", allocation_step)
    folder, oracle = (tiny[0] if target == "portable" else tiny_ort), tiny[1]
    gemma = Gemma(folder, threads=1)
    first = gemma.generate(PROMPT, max_new_tokens=10, ignore_eos=True)
    assert first.stats.cached_tokens == 0
    before = gemma._state
    longer = PROMPT + first.token_ids + [7, 8, 9]
    second = gemma.generate(longer, max_new_tokens=12, ignore_eos=True)
    assert second.stats.cached_tokens == len(PROMPT) + 9  # the last new token was never fed
    assert (gemma._state is before) == (allocation_step == 256)
    assert second.token_ids == hf_greedy(oracle, longer, 12)

    longest = longer + second.token_ids + [10]
    penalised = gemma.generate(longest, max_new_tokens=8, repetition_penalty=3.0)
    assert penalised.stats.cached_tokens == len(longer) + 11
    fresh = Gemma(folder, threads=1).generate(longest, max_new_tokens=8, repetition_penalty=3.0)
    assert fresh.stats.cached_tokens == 0 and penalised.token_ids == fresh.token_ids


@pytest.mark.parametrize("target", ["portable", "ort"])
def test_requests_that_do_not_extend_the_last_one_start_afresh(tiny, tiny_ort, target):
    """A prompt that differs, repeats, or follows a batch or an unfinished stream is computed
    whole, and gives HF's tokens."""
    folder, oracle = (tiny[0] if target == "portable" else tiny_ort), tiny[1]
    gemma = Gemma(folder, threads=1)
    first = gemma.generate(PROMPT, max_new_tokens=6, ignore_eos=True)
    diverging = PROMPT[:-1] + [9] + first.token_ids
    cases = {
        "differs": lambda: None,
        "repeats": lambda: gemma.generate(diverging, max_new_tokens=6, ignore_eos=True),
        "batch": lambda: gemma.generate([PROMPT, PROMPT[:5]], max_new_tokens=6, ignore_eos=True),
        "stream": lambda: next(iter(gemma.stream("abc", max_new_tokens=6, ignore_eos=True))),
    }
    for case, before in cases.items():
        before()
        got = gemma.generate(diverging, max_new_tokens=6, ignore_eos=True)
        assert got.stats.cached_tokens == 0, case
        assert got.token_ids == hf_greedy(oracle, diverging, 6), case


def test_context_guard_refuses_or_truncates(gemma, tiny):
    long_prompt = [2, *([7] * 250)]  # 251 + 10 > max_position_embeddings 256
    with pytest.raises(GemmaOnnxError, match="context limit of 256 tokens"):
        gemma.generate(long_prompt, max_new_tokens=10)
    got = gemma.generate(long_prompt, max_new_tokens=10, truncate=True, ignore_eos=True)
    assert got.prompt_tokens == 246 and len(got.token_ids) == 10
    small = Gemma(tiny[0], max_length=20)
    with pytest.raises(GemmaOnnxError, match="context limit of 20 tokens"):
        small.generate(PROMPT, max_new_tokens=10)
    truncated = small.generate(PROMPT, max_new_tokens=10, truncate=True, ignore_eos=True)
    assert truncated.prompt_tokens == 10
    assert small._state.max_length == 20  # allocated for the requested max length, once


def test_chat_truncation_cuts_the_text_and_keeps_the_turn_markers(tiny):
    """--chat --truncate: a chat prompt too long for the context loses the start of the user's
    text, not its BOS and <start_of_turn>user header (nor the closing markers)."""
    small = Gemma(tiny[0], max_length=24)
    text = "abc def ghi " * 12
    full = small.tokenizer.encode_chat(text)
    head = small.tokenizer.encode("<bos><start_of_turn>user\n", add_special_tokens=False)
    tail = small.tokenizer.encode("<end_of_turn>\n<start_of_turn>model\n", add_special_tokens=False)
    assert full[: len(head)] == head and full[-len(tail) :] == tail and len(full) > 30
    got = small.generate(text, chat=True, truncate=True, max_new_tokens=4, ignore_eos=True)
    assert got.prompt_tokens == 20
    body = 20 - len(head) - len(tail)
    kept = head + full[len(full) - len(tail) - body : len(full) - len(tail)] + tail
    assert small.generate(kept, max_new_tokens=4, ignore_eos=True).token_ids == got.token_ids
    tiny_room = Gemma(tiny[0], max_length=10)
    with pytest.raises(
        GemmaOnnxError, match=r"the chat template \(with the system message, if any\) alone takes"
    ):
        tiny_room.generate(text, chat=True, truncate=True, max_new_tokens=4)


def test_token_ids_outside_the_vocabulary_are_refused(gemma):
    with pytest.raises(GemmaOnnxError, match=r"token id 320 at position 1 .*\[0, 320\)"):
        gemma.generate([2, 320])
    with pytest.raises(GemmaOnnxError, match="token id -1"):
        gemma.generate([[2, 5], [2, -1]])


def test_cuda_without_cuda_names_the_available_providers(tiny):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(GemmaOnnxError) as info:
        Session(tiny[0], provider="cuda")
    assert "CPUExecutionProvider" in str(info.value) and "available" in str(info.value)


def test_cuda_that_falls_back_to_the_cpu_is_refused(tiny, monkeypatch):
    """onnxruntime-gpu on a machine whose GPU or CUDA libraries are missing: ORT's session
    falls back to the CPU on its own, which the CUDA-resident KV buffers cannot follow."""
    real = ort.InferenceSession
    created = []

    def without_cuda(path, options, providers):
        assert providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
        created.append(real(path, options, providers=["CPUExecutionProvider"]))
        return created[-1]

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", without_cuda)
    with pytest.raises(GemmaOnnxError, match="could not start CUDAExecutionProvider") as info:
        Session(tiny[0], provider="cuda")
    assert "fell back to CPUExecutionProvider; pass --provider cpu" in str(info.value)
    assert created, "the session was created, then refused"


def test_missing_or_truncated_model_is_a_clear_error(tiny, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny[0], folder)
    (folder / "model.onnx").unlink()
    with pytest.raises(GemmaOnnxError, match="model.onnx not found"):
        Session(folder)
    graph = (tiny[0] / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(graph[: len(graph) // 2])
    with pytest.raises(GemmaOnnxError, match="onnxruntime cannot load it"):
        Session(folder)
    shutil.copyfile(tiny[0] / "model.onnx", folder / "model.onnx")
    data = (folder / "model.onnx_data").read_bytes()  # the builder's external data file
    (folder / "model.onnx_data").write_bytes(data[: len(data) // 2])
    with pytest.raises(GemmaOnnxError, match="onnxruntime cannot load it"):
        Session(folder)
    with pytest.raises(GemmaOnnxError, match="does not exist"):
        Session(tmp_path / "nowhere")


def test_session_config_is_read_from_the_metadata(tiny, tmp_path):
    from gemma_onnx.runtime.session import _recommended_session_config

    path = tiny[0] / "model.onnx"
    assert _recommended_session_config(path) == {"session.disable_prepacking": "1"}
    broken = tmp_path / "model.onnx"
    broken.write_bytes(path.read_bytes()[:1000])
    assert _recommended_session_config(broken) == {}
