"""The jnp reference every dequant-matmul kernel is tested against."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def dequant_reference(x: jax.Array, w: Any) -> jax.Array:
    """``x @ dequantize(W)^T`` in float32 (HIGHEST precision) for any quantized format."""
    return jnp.einsum("...k,nk->...n", x.astype(jnp.float32), w.dequantize(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
