"""Text at the edges: the folder's tokenizer, the chat template and streaming detokenization.

The generation loop sees token ids only; the CLI and the API use this module on either side of it.
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from tokenizers import Tokenizer

from gemma_onnx.errors import GemmaOnnxError

# Roles a chat message may have ("model" is Gemma's own name for the assistant). Folders without
# a chat template (or without jinja2 installed) render Gemma 3's format (_gemma_turns).
ROLES = ("system", "user", "assistant", "model")
_REPLACEMENT = "\ufffd"  # what a decoder prints for bytes that are not (yet) a whole character


def return_freed_heap() -> None:
    """Hand freed heap pages back to the OS. Parsing Gemma's tokenizer.json (262k pieces,
    515k merges) frees ~200 MB that glibc would otherwise keep mapped for the whole run."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its allocator decides alone
        pass


class TextTokenizer:
    """``tokenizer.json`` (+ ``tokenizer_config.json``) of a model folder."""

    def __init__(self, model_dir: Path) -> None:
        path = model_dir / "tokenizer.json"
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
            raise GemmaOnnxError(f"{path}: cannot load the tokenizer ({exc})") from None
        return_freed_heap()
        config_path = model_dir / "tokenizer_config.json"
        try:
            self.config = json.loads(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            self.config = {}
        except (OSError, ValueError, RecursionError) as exc:
            raise GemmaOnnxError(f"{config_path}: not readable JSON ({exc})") from None
        if not isinstance(self.config, dict):
            raise GemmaOnnxError(f"{config_path}: expected a JSON object")
        self.bos_token = _token_text(self.config.get("bos_token")) or "<bos>"
        self.eos_token = _token_text(self.config.get("eos_token")) or "<eos>"
        self.bos_token_id = self.tokenizer.token_to_id(self.bos_token)
        self.chat_template = _chat_template(model_dir, self.config)
        self._specials: dict[str, int] | None = None  # special_token_ids' map, made on first use

    @classmethod
    def from_folder(cls, model_dir: str | Path) -> TextTokenizer | None:
        """The folder's tokenizer, or None when it has no tokenizer.json (token ids only)."""
        model_dir = Path(model_dir)
        return cls(model_dir) if (model_dir / "tokenizer.json").is_file() else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` a BOS leads, as Gemma expects."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            # Python's surrogateescape hands undecodable argv/stdin bytes over as lone
            # surrogates; tokenizers would reject them with a bare TypeError.
            raise GemmaOnnxError(
                f"the prompt is not valid text: {text[exc.start : exc.end]!r} at character "
                f"{exc.start} (was it read from bytes that are not UTF-8?)"
            ) from None
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        # Some exports put BOS in tokenizer_config (add_bos_token) rather than the post-processor.
        wants_bos = add_special_tokens and self.config.get("add_bos_token", False)
        if wants_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id, *ids]
        return ids

    def special_token_ids(self, texts: Sequence[str]) -> set[int]:
        """Ids of the special tokens spelled by ``texts`` (e.g. "<end_of_turn>"): decoding skips
        them, so a stop string naming one is matched by id."""
        if self._specials is None:
            added = self.tokenizer.get_added_tokens_decoder()
            self._specials = {t.content: i for i, t in added.items() if t.special}
        return {self._specials[t] for t in texts if t in self._specials}

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def encode_chat(self, conversation: str | Sequence[Mapping]) -> list[int]:
        """A conversation in the folder's chat template, ready for the model's answer: text
        is one user turn; else a list of messages (see :func:`check_messages`).

        The template renders the BOS itself, so the tokenizer must not add another.
        """
        return self.encode(self.render_chat(conversation), add_special_tokens=False)

    def chat_frame(
        self, conversation: str | Sequence[Mapping], ids: Sequence[int]
    ) -> tuple[int, int]:
        """(head, tail): how many of ``ids`` (``encode_chat(conversation)``) the template puts
        before and after the last message's own tokens, so that truncation can cut that text
        and keep the turn markers (and the turns before it). (1, 0), only the BOS, when the
        template's parts do not tokenize apart."""
        fallback = (1, 0) if ids[:1] == [self.bos_token_id] else (0, 0)
        messages = check_messages(conversation)
        marker = "\ue000gemma-onnx\ue000"  # private-use characters: in no real prompt
        last = {**messages[-1], "content": marker}
        frame = self.render_chat([*messages[:-1], last])
        if frame.count(marker) != 1:
            return fallback
        before, after = frame.split(marker)
        rendered = self.render_chat(messages)
        if not (rendered.startswith(before) and rendered.endswith(after)):
            return fallback
        head = self.encode(before, add_special_tokens=False) if before else []
        tail = self.encode(after, add_special_tokens=False) if after else []
        if len(head) + len(tail) > len(ids) or list(ids[: len(head)]) != head:
            return fallback
        if tail and list(ids[len(ids) - len(tail) :]) != tail:
            return fallback
        return len(head), len(tail)

    def render_chat(self, conversation: str | Sequence[Mapping]) -> str:
        messages = check_messages(conversation)
        if self.chat_template is not None:
            try:
                from jinja2.exceptions import TemplateError
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError:
                pass
            else:
                # The environment HF's apply_chat_template uses, so templates render the same.
                env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
                env.globals["raise_exception"] = _raise_template_error
                try:
                    return env.from_string(self.chat_template).render(
                        messages=messages,
                        add_generation_prompt=True,
                        bos_token=self.bos_token,
                        eos_token=self.eos_token,
                    )
                except TemplateError as exc:
                    raise GemmaOnnxError(f"chat template of the model folder: {exc}") from None
        return _gemma_turns(messages, self.bos_token)


def check_messages(conversation: str | Sequence[Mapping]) -> list[dict]:
    """A conversation as chat-template messages: text is one user message; otherwise a
    non-empty list of ``{"role": ..., "content": ...}`` with a known role and text content (a
    string, or a list of ``{"type": "text", "text": ...}`` parts), not only system messages.
    Everything else is refused by message number, before any template runs."""
    if isinstance(conversation, str):
        return [{"role": "user", "content": conversation}]
    messages = list(conversation)
    if not messages:
        raise GemmaOnnxError("the conversation has no messages")
    for number, message in enumerate(messages):
        where = f"message {number}"
        if not isinstance(message, Mapping):
            raise GemmaOnnxError(
                f"{where} must be a dict with 'role' and 'content', got {type(message).__name__}"
            )
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise GemmaOnnxError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
        if isinstance(content, str):
            _check_text(content, where)
            continue
        if not isinstance(content, Sequence) or isinstance(content, (bytes, bytearray)):
            raise GemmaOnnxError(
                f"{where}: content must be text or a list of text parts, got {content!r:.60}"
            )
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise GemmaOnnxError(
                    f"{where}: only text parts ({{'type': 'text', 'text': ...}}) are supported "
                    f"by Gemma 3's text decoder, got {part!r:.60}"
                )
            _check_text(part["text"], where)
    if all(m["role"] == "system" for m in messages):
        raise GemmaOnnxError("the conversation has only system messages; add a user message")
    return [dict(m) for m in messages]


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate (surrogateescape'd bytes)
        raise GemmaOnnxError(
            f"{where} is not valid text: {text[exc.start : exc.end]!r} at character {exc.start} "
            "(was it read from bytes that are not UTF-8?)"
        ) from None


def _text(content: str | Sequence[Mapping], trim: bool = True) -> str:
    if isinstance(content, str):
        return content.strip() if trim else content
    return "".join(p["text"].strip() if trim else p["text"] for p in content)


def _gemma_turns(messages: list[dict], bos: str) -> str:
    """Gemma 3's chat template, for folders without one: a leading system message opens the
    first turn (followed by a blank line), roles alternate user/model starting with the user,
    each message's text is trimmed, and the model's turn is opened for its answer."""
    prefix = ""
    if messages[0]["role"] == "system":
        content = messages[0]["content"]
        first = content if isinstance(content, str) else (content[0]["text"] if content else "")
        prefix = first + "\n\n"
        messages = messages[1:]
    turns = [bos]
    for index, message in enumerate(messages):
        if (message["role"] == "user") != (index % 2 == 0):
            raise GemmaOnnxError(
                "chat template: Conversation roles must alternate user/assistant/user/assistant/..."
            )
        role = "model" if message["role"] == "assistant" else message["role"]
        text = (prefix if index == 0 else "") + _text(message["content"])
        turns.append(f"<start_of_turn>{role}\n{text}<end_of_turn>\n")
    return "".join(turns) + "<start_of_turn>model\n"


def _raise_template_error(message: str) -> None:
    raise GemmaOnnxError(f"chat template: {message}")


def _token_text(value: object) -> str | None:
    """tokenizer_config stores special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(model_dir: Path, config: dict) -> str | None:
    """transformers >= 4.43 writes chat_template.jinja; older ones put it in tokenizer_config,
    as a string or a list of named templates."""
    jinja_path = model_dir / "chat_template.jinja"
    if jinja_path.is_file():
        try:
            return jinja_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise GemmaOnnxError(f"{jinja_path}: cannot read the chat template ({exc})") from None
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class StreamDecoder:
    """One row's growing token list -> text pieces that are safe to print at once.

    A piece never ends in half a UTF-8 character (a trailing U+FFFD is held back until its bytes
    arrive) nor in the start of a stop string (held back until it is clearly not one). When a
    stop string appears, the text ends just before it. Concatenated, the pieces are ``text``,
    which equals ``decode(ids)`` (up to any stop string) whenever the bytes are valid UTF-8.
    Around invalid bytes the two may differ in how many U+FFFD stand for them: tokenizers'
    ByteFallback replaces every byte of an invalid run, valid ASCII bytes in it included.

    Decoding works on a window (the last emitted token as context, then the new ones), as TGI
    does, so the cost per token does not grow with the output.
    """

    def __init__(self, tokenizer: TextTokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self._stop_ids = tokenizer.special_token_ids(self.stop)  # never in the decoded text
        self.ids: list[int] = []
        self.text = ""  # everything emitted so far
        self.stopped = False  # a stop string ended the text
        self._prefix = 0  # ids[_prefix:_read] were decoded already: the context for the next
        self._read = 0
        self._pending = ""  # decoded, but held back as a possible start of a stop string
        self._ready = ""  # emitted by push() and not yet taken

    def push(self, token: int) -> bool:
        """Add one token; return True once a stop string has ended the text."""
        if self.stopped:
            return True
        if token in self._stop_ids:  # the text so far is final, and ends here
            self.finish()
            self.ids.append(token)
            self.stopped = True
            return True
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self._prefix : self._read])
        after = self.tokenizer.decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith(_REPLACEMENT):
            self._add(after[len(before) :])
            self._prefix, self._read = self._read, len(self.ids)
        return self.stopped

    def finish(self) -> None:
        """The row ended: release what was held back (a trailing U+FFFD is now final)."""
        if self.stopped:
            return
        before = self.tokenizer.decode(self.ids[self._prefix : self._read])
        after = self.tokenizer.decode(self.ids[self._prefix :])
        self._add(after[len(before) :])
        self._emit(self._pending)
        self._pending = ""

    def take(self) -> str:
        """The text emitted since the last take()."""
        piece, self._ready = self._ready, ""
        return piece

    def _add(self, piece: str) -> None:
        text = self._pending + piece
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self._emit(text[: min(hits)])
            self._pending = ""
            self.stopped = True
            return
        hold = _longest_stop_prefix(text, self.stop)
        self._emit(text[: len(text) - hold])
        self._pending = text[len(text) - hold :]

    def _emit(self, piece: str) -> None:
        self.text += piece
        self._ready += piece


def _longest_stop_prefix(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that begins some stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
