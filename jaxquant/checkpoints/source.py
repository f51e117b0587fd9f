"""The interface between checkpoint readers and the converter (see SOURCES.md)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointSource:
    """A checkpoint on disk, read lazily.

    Attributes:
      path: The file or directory it was read from (for messages).
      format: A short name of the on-disk format: ``"safetensors"``, ``"msgpack"``,
        ``"gguf"``.
      hf_config: Model config in Hugging Face ``config.json`` form.
      names: Hugging Face names of every tensor the checkpoint holds.
      read: Callable returning an iterator of ``(hf_name, array)`` in Hugging Face
        layout, one tensor at a time.
      tokenizer: The tokenizer stored with the checkpoint, if any.
    """

    path: str  # file or directory the checkpoint was read from
    format: str  # "safetensors" | "msgpack" | "gguf"
    hf_config: dict[str, Any]  # config in Hugging Face config.json form
    names: tuple[str, ...]  # Hugging Face tensor names
    read: Callable[[], Iterator[tuple[str, np.ndarray]]]  # streams (name, array)
    tokenizer: Any | None = None  # tokenizers.Tokenizer, if the checkpoint has one

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Streams ``(hf_name, array)`` pairs, one tensor at a time."""
        return self.read()
