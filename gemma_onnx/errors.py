"""The one exception type for problems a user can fix (bad input, missing files, bad options).

The CLI prints these as one short line and exits non-zero; anything else is a bug and keeps its
traceback.
"""


class GemmaOnnxError(Exception):
    """A user-facing error: the message names the file, tensor or option at fault."""
