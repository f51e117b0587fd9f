"""Greedy text generation with the KV cache (float or quantized params)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.models import transformer
from jaxquant.models.config import ModelConfig


@functools.partial(jax.jit, static_argnums=1)
def _step(params: Any, cfg: ModelConfig, tokens: jax.Array, cache: Any):
    logits, cache = transformer.decode_step(params, cfg, tokens, cache)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


def greedy_generate(params: Any, cfg: ModelConfig, prompt: np.ndarray, *,
                    max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
    """Greedy continuation of one prompt.

    Args:
      params: Parameter pytree (float or quantized).
      cfg: Model config.
      prompt: Token ids ``[T]`` (at least one).
      max_new_tokens: Upper bound on generated tokens.
      stop_ids: Generation stops after emitting one of these (e.g. EOS).

    Returns:
      The generated ids (without the prompt).
    """
    prompt = np.asarray(prompt, np.int32)
    if prompt.ndim != 1 or prompt.size == 0:
        raise ValueError("the prompt must be a non-empty 1-D sequence of token ids")
    cache = transformer.init_cache(cfg, batch=1, max_len=prompt.size + max_new_tokens)
    nxt, cache = _step(params, cfg, jnp.asarray(prompt)[None], cache)
    out: list[int] = []
    for i in range(max_new_tokens):
        token = int(nxt[0])
        out.append(token)
        if token in stop_ids or i == max_new_tokens - 1:
            break
        nxt, cache = _step(params, cfg, nxt[:, None], cache)
    return out
