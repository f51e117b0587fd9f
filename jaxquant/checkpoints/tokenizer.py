"""Loading the ``tokenizer.json`` stored with a checkpoint, and small encode/decode helpers."""

from __future__ import annotations

import os
from collections.abc import Sequence

import tokenizers

from jaxquant.errors import CheckpointError, one_line

TOKENIZER_NAME = "tokenizer.json"


def load_tokenizer(path: str | os.PathLike[str]) -> tokenizers.Tokenizer | None:
    """Loads the Hugging Face fast tokenizer stored with a checkpoint.

    Args:
      path: A model directory (its ``tokenizer.json`` is read) or the path of a
        ``tokenizer.json`` file itself.

    Returns:
      The tokenizer, or ``None`` if the directory has no ``tokenizer.json`` (for
      example a checkpoint that ships only a SentencePiece ``tokenizer.model``).

    Raises:
      CheckpointError: ``tokenizer.json`` exists but cannot be read or parsed.
    """
    path = os.fspath(path)
    file = path if os.path.isfile(path) else os.path.join(path, TOKENIZER_NAME)
    if not os.path.isfile(file):
        return None
    try:
        return tokenizers.Tokenizer.from_file(file)
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise CheckpointError(f"{file} is not a valid tokenizer: {one_line(e)}") from e


def encode(tokenizer: tokenizers.Tokenizer, text: str) -> list[int]:
    """Encodes ``text`` to token ids without adding special tokens (no BOS/EOS).

    Args:
      tokenizer: The tokenizer.
      text: The text to encode.

    Returns:
      The token ids.
    """
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


def decode(
    tokenizer: tokenizers.Tokenizer, ids: Sequence[int], *, skip_special_tokens: bool = True
) -> str:
    """Decodes token ids to text.

    Args:
      tokenizer: The tokenizer.
      ids: The token ids (plain ints or numpy integers).
      skip_special_tokens: Whether special tokens (BOS, EOS, padding, ...) are left
        out of the text, as ``tokenizers`` does by default.

    Returns:
      The decoded text.
    """
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
