"""The ``gemma-onnx`` command line: ``build`` (weights -> model folder) and ``generate``.

Errors a user can fix (:class:`GemmaOnnxError`, bad options, missing files) print one line and
exit 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys

import click

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
    help="A Hugging Face model folder, or a .safetensors file with config.json beside it.",
)
@click.option(
    "--output", required=True, type=click.Path(path_type=str), help="Model folder to write."
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "bf16"]),
    default="fp32",
    show_default=True,
    help="Weight and activation dtype (norms, softmax and RoPE stay in fp32).",
)
@click.option(
    "--target",
    type=click.Choice(["portable", "ort"]),
    default="portable",
    show_default=True,
    help="portable: standard ONNX ops and the optimum/transformers.js I/O contract. "
    "ort: ONNX Runtime's fused kernels and shared KV buffers, for gemma-onnx generate.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
def build(weights: str, output: str, precision: str, target: str, overwrite: bool) -> None:
    """Build an ONNX model folder from Gemma 3 safetensors weights."""
    from gemma_onnx.builder import build_model

    result = build_model(
        weights, output, precision=precision, target=target, overwrite=overwrite, progress=True
    )
    click.echo(f"wrote {result}")


def _register_generate() -> None:
    from gemma_onnx.cli_generate import generate

    main.add_command(generate)


_register_generate()

if __name__ == "__main__":
    main()
