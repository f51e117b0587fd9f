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


class OutputExistsError(JaxquantError):
    """An output path exists and ``force`` was not given."""
