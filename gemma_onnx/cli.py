"""The ``gemma-onnx`` command line: ``build`` (weights -> model folder), ``generate`` and ``chat``.

Errors a user can fix (:class:`GemmaOnnxError`, bad options, missing files) print one line and
exit 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from pathlib import Path

import click

from gemma_onnx.cli_generate import echo
from gemma_onnx.errors import GemmaOnnxError


class _Group(click.Group):
    """Turns user errors (and Ctrl-C) into one line on stderr, unless ``--debug`` asks otherwise."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except GemmaOnnxError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.version_option(package_name="gemma-onnx")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Build Gemma 3 ONNX models from safetensors weights and run them on ONNX Runtime."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


@main.command()
@click.option(
    "--weights",
    required=True,
    type=click.Path(path_type=str),
    help="A Hugging Face model folder, a .safetensors file with config.json beside it, or a "
    "Gemma 3 GGUF file (dequantized to float32 first; needs gemma-onnx[gguf]).",
)
@click.option(
    "--output", required=True, type=click.Path(path_type=str), help="Model folder to write."
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "bf16", "int8", "int4"]),
    default="fp32",
    show_default=True,
    help="fp32/fp16/bf16: weight and activation dtype (norms, softmax and RoPE stay fp32). "
    "int8/int4: weight-only quantization (MatMulNBits on --target ort, DequantizeLinear on "
    "--target portable); the build measures and reports its agreement with fp32.",
)
@click.option(
    "--target",
    type=click.Choice(["portable", "ort"]),
    default="portable",
    show_default=True,
    help="portable: standard ONNX ops and the optimum/transformers.js I/O contract. "
    "ort: ONNX Runtime's fused kernels and shared KV buffers, for gemma-onnx generate.",
)
@click.option(
    "--block-size",
    type=int,
    default=32,
    show_default=True,
    help="int8/int4: weights per quantization scale (a power of two >= 16). A rescored int4 "
    "LM head, which only ranks, uses blocks of up to 128 (same agreement, faster decode).",
)
@click.option(
    "--accuracy-level",
    type=click.IntRange(0, 4),
    default=4,
    show_default=True,
    help="int8/int4: MatMulNBits compute type; 4 = int8 activations (fast on CPU), 0 = fp32.",
)
@click.option(
    "--layer-bits",
    type=click.Choice(["4", "8"]),
    default=None,
    help="int8/int4: bits of the decoder layers' projections; --precision then sets the LM "
    "head's. Default: 8 on --target ort (int4: 98.2% instead of 72.4% top-1 agreement on "
    "Gemma 3 270M, for 47 MB more and 0-15% slower decode), --precision's on --target portable "
    "(its table stays float).",
)
@click.option(
    "--rescore-top",
    type=int,
    default=None,
    help="int8/int4, --target ort: recompute each position's K highest logits in float32 from "
    "an 8-bit copy of the table (the quantized LM head only ranks them); 0 = off. Default: 64 "
    "(int4 on Gemma 3 270M: 98.2% instead of 81.3% top-1 agreement, for a 0.17 GB larger "
    "file; the head, which then only ranks, takes coarser blocks and decodes faster).",
)
@click.option(
    "--quality/--no-quality",
    default=None,
    help="int8/int4: measure the build's top-1 agreement with fp32 (quality.json), which builds "
    "an fp32 reference beside it (4 bytes a parameter). Default: measure unless that reference "
    "would not fit the free disk or half the memory.",
)
@click.option(
    "--layout",
    type=click.Choice(["default", "transformers.js"]),
    default="default",
    show_default=True,
    help="transformers.js: the model goes in onnx/, named by dtype, where transformers.js "
    "looks (optimum and onnxruntime-genai still load the folder).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.pass_context
def build(
    ctx: click.Context,
    weights: str,
    output: str,
    precision: str,
    target: str,
    block_size: int,
    accuracy_level: int,
    layer_bits: str | None,
    rescore_top: int | None,
    quality: bool | None,
    layout: str,
    overwrite: bool,
) -> None:
    """Build an ONNX model folder from Gemma 3 safetensors (or GGUF) weights."""
    from gemma_onnx.builder import build_model
    from gemma_onnx.builder.quantize import BITS, QuantConfig

    quant = None
    if precision not in BITS:
        given = [
            f"--{'no-' if name == 'quality' and not quality else ''}{name.replace('_', '-')}"
            for name in ("block_size", "accuracy_level", "layer_bits", "rescore_top", "quality")
            if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
        ]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise GemmaOnnxError(
                f"{', '.join(given)} only {verb} to --precision int8 or int4 (not {precision})"
            )
    given = ctx.get_parameter_source("accuracy_level") == click.core.ParameterSource.COMMANDLINE
    if precision in BITS and target == "portable" and given:
        raise GemmaOnnxError(
            "--accuracy-level applies to --target ort (MatMulNBits); a portable graph's "
            "runtime chooses (ONNX Runtime: session.qdq_matmulnbits_accuracy_level)"
        )
    if precision in BITS:
        quant = QuantConfig(
            bits=BITS[precision],
            block_size=block_size,
            accuracy_level=accuracy_level,
            layer_bits=None if layer_bits is None else int(layer_bits),
            rescore_top=rescore_top,
        )
    with _terminate_as_interrupt():
        result = build_model(
            weights, output, precision=precision, target=target, overwrite=overwrite,
            progress=True, quant=quant, layout=layout, quality=quality,
        )  # fmt: skip
    echo(f"wrote {result}")
    report = Path(result) / "quality.json"
    if report.is_file():
        measured = json.loads(report.read_text())
        echo(
            f"quality: top-1 agreement with the fp32 build {measured['top1_agreement']:.1%} over "
            f"{measured['tokens']} held-out tokens (mean KL {measured['mean_kl_nats']} nats, max "
            f"logit diff {measured['max_abs_logit_diff']}); details in {report}"
        )


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM and SIGHUP (a `kill`, a closed terminal) end a build as Ctrl-C does: through
    its cleanup, which removes the half-written staging folder, rather than mid-write."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signals = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    try:
        previous = {sig: signal.signal(sig, interrupt) for sig in signals}
    except ValueError:  # not the main thread: leave the signals alone
        previous = {}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _register_generate() -> None:
    from gemma_onnx.cli_generate import chat, generate

    main.add_command(generate)
    main.add_command(chat)


_register_generate()

if __name__ == "__main__":
    main()
