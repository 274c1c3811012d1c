"""``python -m gemma_onnx`` and the ``gemma-onnx`` script.

Importing the CLI (numpy, onnxruntime) takes a moment; Ctrl-C during it, or before the command
starts, ends quietly as it does once the command runs.
"""

import sys


def run() -> None:
    try:
        from gemma_onnx.cli import main

        main()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)


if __name__ == "__main__":
    run()
