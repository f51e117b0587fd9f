"""User-facing errors.

Every problem caused by user input (a path, a checkpoint, a config, a flag, a text)
raises a subclass of :class:`JaxquantError` with a one-line message that says what
is wrong and, where possible, how to fix it. The CLI prints ``error: <message>``
and exits with status 2; it never shows a traceback for these.
"""

from __future__ import annotations


class JaxquantError(Exception):
    """Base class of errors caused by user input; the message is shown verbatim."""


class CheckpointError(JaxquantError):
    """A checkpoint is missing, malformed, truncated, or does not match its config."""


class ConfigError(JaxquantError):
    """A model config is malformed or names an unsupported architecture."""


class DataError(JaxquantError):
    """Evaluation or calibration text is missing or too short."""


class MeshError(JaxquantError):
    """A device mesh shape that is malformed or does not match the available devices."""


class OutputExistsError(JaxquantError):
    """An output path exists and ``force`` was not given."""


def one_line(error: BaseException, limit: int = 300) -> str:
    """A short one-line form of ``error``'s message, for embedding in an error message.

    Args:
      error: The exception, typically one raised by a library.
      limit: The most characters returned; a longer line is cut and ends in "…".

    Returns:
      The first non-empty line of ``str(error)``, stripped, or the exception's class
      name if its message is empty.
    """
    line = next((s.strip() for s in str(error).splitlines() if s.strip()), "")
    line = line or type(error).__name__
    return line if len(line) <= limit else line[: max(limit - 1, 0)] + "…"
