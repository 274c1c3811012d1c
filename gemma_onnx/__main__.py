"""``python -m gemma_onnx`` and the ``gemma-onnx`` script.

Importing the CLI (numpy, onnxruntime) takes a moment; Ctrl-C during it, or before the command
starts, ends quietly as it does once the command runs. ``generate`` and ``chat`` first re-execute
themselves with glibc's malloc on transparent huge pages where that helps (see
gemma_onnx/huge_pages.py).
"""

import sys


def run() -> None:
    try:
        if {"generate", "chat"} & set(sys.argv[1:]):
            from gemma_onnx.huge_pages import reexec_with_huge_pages

            reexec_with_huge_pages()
        from gemma_onnx.cli import main

        main()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)


if __name__ == "__main__":
    run()
