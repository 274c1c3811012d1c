"""One ONNX Runtime session over a gemma-onnx model folder, fed through IO binding.

The folder is the contract with the builder (this module never imports it): ``model.onnx`` with
the portable I/O names, HF's ``config.json`` and ``generation_config.json``. Every buffer a
generation touches is allocated once, in :class:`RunState`, for the largest batch and length it
will hold; each step binds packed views of those buffers by pointer, so decoding allocates
nothing that grows with the sequence.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from gemma_onnx.errors import GemmaOnnxError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}

# ONNX TensorProto element types, as IOBinding takes them (ints work for bfloat16 too).
_INT64 = 7
_FLOAT32 = 1
_KV_TYPES = {  # graph input type -> (numpy dtype of host buffers, ONNX element type)
    "tensor(float)": (np.dtype(np.float32), _FLOAT32),
    "tensor(float16)": (np.dtype(np.float16), 10),
    "tensor(bfloat16)": (np.dtype(ml_dtypes.bfloat16), 16),
}
_MAX_POSITIONS_DEFAULT = 131_072  # HF Gemma3TextConfig's default when config.json omits it


@dataclass(frozen=True)
class ModelSpec:
    """The numbers the runtime needs, read from config.json and generation_config.json."""

    num_layers: int  # decoder layers: one past/present key and value each
    num_kv_heads: int  # KV heads (dim 1 of every past/present tensor)
    head_dim: int  # dim 3 of every past/present tensor
    vocab_size: int  # last dim of logits; token ids must lie in [0, vocab_size)
    max_position_embeddings: int  # longest context (prompt + new tokens) the model supports
    eos_token_ids: tuple[int, ...]  # every id that ends a row (Gemma 3 -it: 1 and 106)
    bos_token_id: int | None  # kept at the front when a prompt is truncated
    pad_token_id: int  # fed at left-padded positions and for rows already finished

    @classmethod
    def from_folder(cls, model_dir: Path) -> ModelSpec:
        config_path = model_dir / "config.json"
        raw = _read_json(config_path, required=True)
        # Gemma3ForConditionalGeneration keeps the decoder's fields in text_config.
        text = raw["text_config"] if isinstance(raw.get("text_config"), dict) else raw
        generation = _read_json(model_dir / "generation_config.json", required=False)

        def number(name: str, default: int | None = None) -> int:
            value = text.get(name, default)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise GemmaOnnxError(f"{config_path}: field {name!r} must be a positive integer")
            return value

        def token(name: str) -> Any:
            for source in (generation, text, raw):
                if source.get(name) is not None:
                    return source[name]
            return None

        heads = number("num_attention_heads")
        vocab_size = number("vocab_size")

        def token_id(name: str, value: Any) -> int:
            """A special token id must index the vocabulary (pad fills batch rows)."""
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not (0 <= value < vocab_size)
            ):
                raise GemmaOnnxError(
                    f"{model_dir}: {name} {value!r} (generation_config.json or config.json) is "
                    f"not a token id in [0, {vocab_size})"
                )
            return value

        eos = token("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        bos = token("bos_token_id")
        return cls(
            num_layers=number("num_hidden_layers"),
            num_kv_heads=number("num_key_value_heads"),
            head_dim=number("head_dim", text.get("hidden_size", 0) // heads),
            vocab_size=vocab_size,
            max_position_embeddings=number("max_position_embeddings", _MAX_POSITIONS_DEFAULT),
            eos_token_ids=tuple(token_id("eos_token_id", i) for i in eos_ids),
            bos_token_id=None if bos is None else token_id("bos_token_id", bos),
            pad_token_id=token_id("pad_token_id", token("pad_token_id") or 0),
        )


def _read_json(path: Path, required: bool) -> dict:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if required:
            raise GemmaOnnxError(f"{path} not found; is this a gemma-onnx model folder?") from None
        return {}
    except (OSError, ValueError) as exc:  # also a >4300-digit number
        raise GemmaOnnxError(f"{path}: not readable JSON ({exc})") from None
    except RecursionError:
        raise GemmaOnnxError(f"{path}: JSON nested too deeply to be a config") from None
    if not isinstance(raw, dict):
        raise GemmaOnnxError(f"{path}: expected a JSON object")
    return raw


class DeviceBuffer:
    """One flat buffer, bound by pointer under any packed shape that fits in it.

    ``memory`` owns it: numpy on the CPU; on CUDA an OrtValue in device memory (device 0),
    which never comes back to the host.
    """

    def __init__(self, size: int, dtype: np.dtype, onnx_type: int, device: str) -> None:
        self.size = size
        self.itemsize = np.dtype(dtype).itemsize
        self.onnx_type = onnx_type
        self.device = device
        self.memory: np.ndarray | ort.OrtValue
        if device == "cpu":
            # np.zeros maps untouched pages lazily: a long max_length costs memory as it fills.
            self.memory = np.zeros(size, dtype)
            self.ptr = self.memory.ctypes.data
        else:
            self.memory = ort.OrtValue.ortvalue_from_shape_and_type([size], onnx_type, device, 0)
            self.ptr = self.memory.data_ptr()

    def _check(self, shape: tuple[int, ...], offset: int) -> list[int]:
        if offset + int(np.prod(shape)) > self.size:
            raise ValueError(
                f"shape {shape} at element {offset} does not fit a buffer of {self.size} elements"
            )
        return list(shape)

    def _ptr(self, offset: int) -> int:
        return self.ptr + offset * self.itemsize

    def bind_input(
        self, binding: ort.IOBinding, name: str, shape: tuple[int, ...], offset: int = 0
    ) -> None:
        shape_ = self._check(shape, offset)
        binding.bind_input(name, self.device, 0, self.onnx_type, shape_, self._ptr(offset))

    def bind_output(
        self, binding: ort.IOBinding, name: str, shape: tuple[int, ...], offset: int = 0
    ) -> None:
        shape_ = self._check(shape, offset)
        binding.bind_output(name, self.device, 0, self.onnx_type, shape_, self._ptr(offset))


@dataclass
class RunState:
    """Every run-time buffer, allocated once by :meth:`Session.allocate` (cf. llama2.c's RunState).

    ``batch`` and ``max_length`` are the capacity; a generation may use fewer rows and positions,
    binding packed views of the first elements. Lifetime of every buffer: the RunState's, reused
    across generations. Shapes use B = batch, T = max_length, H = num_kv_heads, D = head_dim,
    V = vocab_size.
    """

    batch: int  # rows the buffers hold
    max_length: int  # positions (prompt + new tokens) the KV buffers hold
    binding: ort.IOBinding  # token inputs rebound every step (shapes change); never re-created
    # KV cache, one entry per graph past input (layer-major, key then value). Each buffer is
    # flat [B*H*T*D] in the graph's float type (on CUDA: device memory).
    # Portable graphs (kv_cache "concat"), ping-pong: `past[i]` is read as packed
    # [rows, H, past_length, D]; the graph writes present = concat(past, new) as packed
    # [rows, H, past_length + seq, D] into `present[i]`; then the lists swap. Present must not
    # alias past, hence two buffers per tensor.
    # ORT-target graphs (kv_cache "shared"): `present` is `past`, one [B, H, T, D] buffer per
    # tensor bound as both; GroupQueryAttention writes the new positions in place. Sliding
    # layers' buffers are [B, H, window, D] instead (Session.kv_length): the kernel keeps the
    # window's last positions there itself.
    past: list[DeviceBuffer]
    present: list[DeviceBuffer]
    # Logits of each row's last position: flat [B*V] float32 on the host, bound as [rows, 1, V]
    # (on CUDA, ORT copies just these rows back). The sampler overwrites it in place.
    logits: np.ndarray
    # Token inputs, host, flat [B*T] int64: prefill uses [rows, seq], decode [rows, 1].
    input_ids: np.ndarray
    position_ids: np.ndarray
    # Attention mask, host [B, T] int64: 1 where row b holds a real token at position t
    # (0 on left padding; on shared-KV graphs rows are right-padded: ones, then zeros).
    # `mask_packed`, flat [B*T], holds the [rows, past_length + seq] copy the graph reads.
    mask: np.ndarray
    mask_packed: np.ndarray
    # 0-d int64 = 1: ask the graph for the last position's logits only (the optional input).
    logits_to_keep: np.ndarray
    # 0-d int64 = -2**62: ask for none (the graph drops that many leading positions; a shared-KV
    # prompt's chunks before its last need no logits).
    no_logits: np.ndarray
    # Per row: the position id of the next token, [B] int64 (rows differ under left padding).
    next_position: np.ndarray
    # Per row: tokens in the prompt + output so far, [B, V] bool (the repetition penalty's set).
    seen: np.ndarray
    # Positions already in the KV cache (the same for every row: padding is on the left; on
    # shared-KV graphs the longest row's, with next_position holding each row's own).
    past_length: int = 0
    # Shared-KV graphs: the (rows, first_row) the KV buffers are bound for. The bindings
    # persist across runs, so a decode step rebinds only the token inputs and the logits.
    kv_bound: tuple[int, int] | None = None

    def start(self, rows: int) -> None:
        """Forget the previous generation; the buffers stay."""
        self.past_length = 0
        self.mask[:rows] = 0
        self.seen[:rows] = False


class Session:
    """An InferenceSession over ``model_dir/model.onnx`` plus what is needed to feed it."""

    def __init__(self, model_dir: str | Path, provider: str = "cpu", threads: int | None = None):
        self.model_dir = Path(model_dir)
        if self.model_dir.is_file():
            if _starts_with(self.model_dir, b"GGUF"):
                raise GemmaOnnxError(
                    f"{self.model_dir} is a GGUF file; build a model folder from it first "
                    f"(gemma-onnx build --weights {self.model_dir} --output DIR --target ort)"
                )
            raise GemmaOnnxError(f"{self.model_dir} is a file; pass the model folder that holds it")
        if not self.model_dir.is_dir():
            raise GemmaOnnxError(f"model folder {self.model_dir} does not exist")
        self.spec = ModelSpec.from_folder(self.model_dir)
        self.device = "cuda" if provider == "cuda" else "cpu"
        self.session = _open_session(self.model_dir / "model.onnx", provider, threads)
        self.kv_names, kv_type = self._check_io()
        # Positions each KV buffer holds: a fixed number where the graph declares one (an ORT-
        # target sliding layer's window, kept by GQA's sliding_window_cache), else max_length.
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.kv_capacity: list[int | None] = [
            dim if isinstance(dim := inputs[past].shape[2], int) else None
            for past, _ in self.kv_names
        ]
        meta = self.session.get_modelmeta().custom_metadata_map
        # "shared": ORT-target graph, one KV buffer per tensor bound as both past and present.
        self.shared_kv = meta.get("gemma_onnx.kv_cache") == "shared"
        self.kv_dtype, self.kv_onnx_type = _KV_TYPES[kv_type]
        optional = self.session.get_overridable_initializers() + self.session.get_inputs()
        self.has_logits_to_keep = any(i.name == "logits_to_keep" for i in optional)

    def _check_io(self) -> tuple[list[tuple[str, str]], str]:
        """Check the graph against the portable I/O contract; return the (past, present) name
        pairs in layer order and the KV type."""
        path = self.model_dir / "model.onnx"
        spec = self.spec
        kv_names = [
            (f"past_key_values.{i}.{kind}", f"present.{i}.{kind}")
            for i in range(spec.num_layers)
            for kind in ("key", "value")
        ]
        expected_in = {"input_ids", "attention_mask", "position_ids", *(p for p, _ in kv_names)}
        expected_out = {"logits", *(p for _, p in kv_names)}
        inputs = {i.name: i for i in self.session.get_inputs()}
        output_specs = {o.name: o for o in self.session.get_outputs()}
        outputs = set(output_specs)
        logits = output_specs.get("logits")
        vocab = logits.shape[-1] if logits is not None and logits.shape else None
        if isinstance(vocab, int) and vocab != spec.vocab_size:
            raise GemmaOnnxError(
                f"{path}: the graph's logits have {vocab} entries but config.json says "
                f"vocab_size {spec.vocab_size}"
            )
        missing = sorted(expected_in - inputs.keys()) + sorted(expected_out - outputs)
        if missing:
            raise GemmaOnnxError(
                f"{path}: graph lacks {', '.join(missing[:4])}"
                f"{' ...' if len(missing) > 4 else ''} for {spec.num_layers} layers (config.json); "
                "was it built by gemma-onnx for the portable target?"
            )
        extra = sorted(inputs.keys() - expected_in - {"logits_to_keep"})
        if extra:
            raise GemmaOnnxError(f"{path}: graph needs inputs this runtime cannot feed: {extra}")
        first = inputs[kv_names[0][0]]
        if first.type not in _KV_TYPES:
            raise GemmaOnnxError(f"{path}: KV cache type {first.type} is not supported")
        want = [None, spec.num_kv_heads, None, spec.head_dim]
        if len(first.shape) != len(want) or any(
            isinstance(got, int) and expected is not None and got != expected
            for got, expected in zip(first.shape, want, strict=False)
        ):
            raise GemmaOnnxError(
                f"{path}: past shape {first.shape} disagrees with config.json "
                f"(num_key_value_heads {spec.num_kv_heads}, head_dim {spec.head_dim})"
            )
        return kv_names, first.type

    def allocate(self, batch: int, max_length: int) -> RunState:
        """Allocate every buffer for ``batch`` rows of up to ``max_length`` positions, once."""
        spec = self.spec

        sizes = [
            batch * spec.num_kv_heads * self.kv_length(i, max_length) * spec.head_dim
            for i in range(len(self.kv_names))
        ]

        def kv() -> list[DeviceBuffer]:
            return [DeviceBuffer(n, self.kv_dtype, self.kv_onnx_type, self.device) for n in sizes]

        past = kv()
        return RunState(
            batch=batch,
            max_length=max_length,
            binding=self.session.io_binding(),
            past=past,
            present=past if self.shared_kv else kv(),
            logits=np.zeros(batch * spec.vocab_size, np.float32),
            input_ids=np.zeros(batch * max_length, np.int64),
            position_ids=np.zeros(batch * max_length, np.int64),
            mask=np.zeros((batch, max_length), np.int64),
            mask_packed=np.zeros(batch * max_length, np.int64),
            logits_to_keep=np.array(1, np.int64),
            no_logits=np.array(-(2**62), np.int64),
            next_position=np.zeros(batch, np.int64),
            seen=np.zeros((batch, spec.vocab_size), bool),
        )

    def carry_kv(self, source: RunState, target: RunState, positions: int) -> bool:
        """Copy row 0's first ``positions`` cached positions from ``source``'s KV buffers into
        ``target``'s (a larger RunState replacing it), laid out as ``target`` binds them, so a
        generation can continue there. False, copying nothing, where the buffers are device
        memory (CUDA)."""
        if self.device != "cpu":
            return False
        heads, dim = self.spec.num_kv_heads, self.spec.head_dim
        for index, (old, new) in enumerate(zip(source.past, target.past, strict=True)):
            old_array, new_array = old.memory, new.memory
            if self.shared_kv:  # [B, H, length, D], row 0 first; a window's length is fixed
                old_length = self.kv_length(index, source.max_length)
                new_length = self.kv_length(index, target.max_length)
                keep = min(positions, old_length) * dim
                for head in range(heads):
                    at_old, at_new = head * old_length * dim, head * new_length * dim
                    new_array[at_new : at_new + keep] = old_array[at_old : at_old + keep]
            else:  # packed [1, H, positions, D]: the same elements at any capacity
                size = heads * positions * dim
                new_array[:size] = old_array[:size]
        return True

    def kv_length(self, index: int, max_length: int) -> int:
        """Positions KV buffer ``index`` holds: its graph's fixed window, or ``max_length``."""
        capacity = self.kv_capacity[index]
        return max_length if capacity is None else capacity

    def _bind_tokens(
        self, state: RunState, rows: int, seq: int, total: int, first_row: int = 0
    ) -> None:
        """Bind input_ids / position_ids as packed [rows, seq] and the mask of rows
        ``first_row ..`` as packed [rows, total] (a binding replaces the one of the same name)."""
        b = state.binding
        b.bind_input("input_ids", "cpu", 0, _INT64, [rows, seq], state.input_ids.ctypes.data)
        b.bind_input("position_ids", "cpu", 0, _INT64, [rows, seq], state.position_ids.ctypes.data)
        mask = state.mask_packed[: rows * total].reshape(rows, total)  # [rows, total]
        np.copyto(mask, state.mask[first_row : first_row + rows, :total])
        b.bind_input("attention_mask", "cpu", 0, _INT64, [rows, total], mask.ctypes.data)

    def forward_shared(
        self,
        state: RunState,
        rows: int,
        seq: int,
        total: int,
        first_row: int = 0,
        logits: bool = True,
    ) -> np.ndarray | None:
        """Shared-KV graphs: run rows ``first_row .. first_row + rows`` on packed [rows, seq]
        inputs and the mask's first ``total`` columns (right-padded: each row's valid tokens
        from position 0); the graph writes each row's new KV at its own length, in place.

        Returns the last position's logits, [rows, V] float32, a view of ``state.logits``; with
        ``logits=False`` (a prompt's chunk before its last) the graph skips its LM head and
        this returns None.
        """
        if first_row + rows > state.batch or total > state.max_length:
            raise ValueError(
                f"rows {first_row}..{first_row + rows} x {total} positions exceed the RunState "
                f"({state.batch} x {state.max_length})"
            )
        spec, b = self.spec, state.binding
        self._bind_tokens(state, rows, seq, total, first_row)
        keep = state.logits_to_keep if logits else state.no_logits
        b.bind_input("logits_to_keep", "cpu", 0, _INT64, [], keep.ctypes.data)
        shape = [rows, 1 if logits else 0, spec.vocab_size]
        b.bind_output("logits", "cpu", 0, _FLOAT32, shape, state.logits.ctypes.data)
        if state.kv_bound != (rows, first_row):
            heads, dim = spec.num_kv_heads, spec.head_dim
            for index, ((past_name, present_name), buffer) in enumerate(
                zip(self.kv_names, state.past, strict=True)
            ):
                length = self.kv_length(index, state.max_length)
                shape, offset = (rows, heads, length, dim), first_row * heads * length * dim
                buffer.bind_input(b, past_name, shape, offset)
                buffer.bind_output(b, present_name, shape, offset)
            state.kv_bound = (rows, first_row)
        self.session.run_with_iobinding(b)
        state.past_length = max(state.past_length, total)
        if not logits:
            return None
        return state.logits[: rows * spec.vocab_size].reshape(rows, spec.vocab_size)

    def forward(self, state: RunState, rows: int, seq: int) -> np.ndarray:
        """Run the graph on ``state.input_ids`` / ``position_ids`` as packed [rows, seq], the
        mask's first past_length + seq columns and the cached past; append to the cache.

        Returns the last position's logits, [rows, V] float32 (a view of ``state.logits`` unless
        the graph has no ``logits_to_keep`` and seq > 1).
        """
        past, total = state.past_length, state.past_length + seq
        if rows > state.batch or total > state.max_length:
            raise ValueError(
                f"{rows} rows x {total} positions exceed the RunState ({state.batch} x "
                f"{state.max_length})"
            )
        spec, b = self.spec, state.binding
        b.clear_binding_outputs()  # the logits binding below may change kind (ORT-allocated)
        self._bind_tokens(state, rows, seq, total)
        if self.has_logits_to_keep:
            b.bind_input("logits_to_keep", "cpu", 0, _INT64, [], state.logits_to_keep.ctypes.data)
        # Without logits_to_keep a prefill yields [rows, seq, V]: let ORT allocate that once.
        full_logits = seq > 1 and not self.has_logits_to_keep
        if full_logits:
            b.bind_output("logits", "cpu")
        else:
            shape = [rows, 1, spec.vocab_size]
            b.bind_output("logits", "cpu", 0, _FLOAT32, shape, state.logits.ctypes.data)
        heads, dim = spec.num_kv_heads, spec.head_dim
        for (past_name, present_name), src, dst in zip(
            self.kv_names, state.past, state.present, strict=True
        ):
            src.bind_input(b, past_name, (rows, heads, past, dim))
            dst.bind_output(b, present_name, (rows, heads, total, dim))
        self.session.run_with_iobinding(b)
        state.past, state.present = state.present, state.past
        state.past_length = total
        if full_logits:
            return b.get_outputs()[0].numpy()[:, -1]  # logits were bound first
        return state.logits[: rows * spec.vocab_size].reshape(rows, spec.vocab_size)


def check_session_options(provider: str, threads: int | None) -> None:
    """The provider (known, and in this onnxruntime) and the thread count, before any loading."""
    if not isinstance(provider, str) or provider not in PROVIDERS:
        raise GemmaOnnxError(f"provider {provider!r} is not supported; choose cpu or cuda")
    available = ort.get_available_providers()
    if PROVIDERS[provider] not in available:
        raise GemmaOnnxError(
            f"provider {provider!r} needs {PROVIDERS[provider]}, which this onnxruntime lacks; "
            f"available: {', '.join(available)}"
        )
    # Threads beyond the CPUs only contend, and each holds a stack: 100,000 took 16 GB. A few
    # per CPU are allowed, for machines whose CPU count hides what a container may use.
    most = 4 * (os.cpu_count() or 1)
    if threads is not None and (
        isinstance(threads, bool)
        or not isinstance(threads, (int, np.integer))
        or not 1 <= threads <= most
    ):
        raise GemmaOnnxError(
            f"threads (--threads) must be from 1 to {most} (4 per CPU here), got {threads!r}"
        )


def _open_session(path: Path, provider: str, threads: int | None) -> ort.InferenceSession:
    """Create the session; a wrong provider, thread count or a broken file is the user's to fix."""
    check_session_options(provider, threads)
    if not path.is_file():
        if (path.parent / "onnx").is_dir():
            raise GemmaOnnxError(
                f"{path.parent} has the transformers.js layout (onnx/); gemma-onnx generate "
                "runs a folder built without --layout"
            )
        raise GemmaOnnxError(f"{path} not found; build it with `gemma-onnx build`")
    options = ort.SessionOptions()
    # Errors only: ORT warns on every load that the overridable logits_to_keep is not a constant.
    options.log_severity_level = 3
    # A memory pattern is recorded per set of input shapes and replayed as one block when the
    # same shapes come again. Ours never repeat within a generation (the mask grows by one
    # every step), and a repeated prompt's block is carved anew next to the arena chunks the
    # first run left: +85 MB peak RSS for the benchmark's warm-up + measured run on Gemma 3 270M.
    options.enable_mem_pattern = False
    # The builder records the session settings its graph runs best with (prepacking on for
    # MatMulNBits, off for float weights); see builder/graph.py, session_metadata.
    for key, value in _recommended_session_config(path).items():
        options.add_session_config_entry(key, value)
    if threads is not None:
        options.intra_op_num_threads = threads
    providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider == "cuda" else [])
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except ort_state.NotImplemented as exc:
        raise GemmaOnnxError(
            f"{path}: onnxruntime's {provider} provider lacks a kernel this model needs (on cpu, "
            f"build with --precision fp32 or fp16; bf16 needs cuda): {_first_line(exc)}"
        ) from None
    except (
        ort_state.Fail,
        ort_state.InvalidArgument,
        ort_state.InvalidProtobuf,
        ort_state.InvalidGraph,
        ort_state.NoSuchFile,
        ort_state.RuntimeException,
    ) as exc:
        raise GemmaOnnxError(
            f"{path}: onnxruntime cannot load it (truncated, or its external data file missing "
            f"from the folder?): {_first_line(exc)}"
        ) from None
    # onnxruntime-gpu without a usable GPU (no device, or CUDA/cuDNN libraries missing) logs
    # the failure and quietly retries on the CPU; the KV buffers would then sit on a device the
    # session does not use.
    if PROVIDERS[provider] not in session.get_providers():
        raise GemmaOnnxError(
            f"provider {provider!r}: onnxruntime could not start {PROVIDERS[provider]} (no GPU, "
            "or its CUDA/cuDNN libraries missing?) and fell back to "
            f"{', '.join(session.get_providers())}; pass --provider cpu or fix the CUDA setup"
        )
    return session


def _recommended_session_config(path: Path) -> dict[str, str]:
    """``gemma_onnx.session_config`` from the model's metadata, read without its weights."""
    import onnx  # here, not at import time: only opening a session needs it

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # a broken file: let InferenceSession report it in its own words
        return {}
    props = {p.key: p.value for p in model.metadata_props}
    try:
        entries = json.loads(props.get("gemma_onnx.session_config", "{}"))
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in entries.items()} if isinstance(entries, dict) else {}


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with path.open("rb") as file:
            return file.read(len(magic)) == magic
    except OSError:
        return False


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
