"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class LlmkitError(Exception):
    """A user-facing error: bad input, unsupported feature, or a file that does not fit."""
