"""Round-to-nearest (RTN) uniform quantization, the baseline every method is compared with.

The quantizer of GPTQ (Frantar et al., 2023, "GPTQ", Sec. 2 and its reference code):
per group of input channels of each output row,

* asymmetric: ``lo = min(min w, 0)``, ``hi = max(max w, 0)``,
  ``s = (hi - lo) / (2**b - 1)``, ``z = round(-lo / s)``;
* symmetric: ``hi = max |w|``, ``s = 2 hi / (2**b - 1)``, ``z = 2**(b - 1)``;
* ``q = clip(round(w / s) + z, 0, 2**b - 1)``, ``w' = s (q - z)``.

A group whose range is zero gets ``lo = -1, hi = 1``. The scale is rounded to the
storage dtype *before* the codes are computed, so the stored scale is the one the
codes were chosen for.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxquant.formats.uniform import UniformWeight, expand_groups, num_groups


def group_params(w: jax.Array, *, bits: int, group_size: int, symmetric: bool,
                 scale_dtype: Any = jnp.bfloat16) -> tuple[jax.Array, jax.Array]:
    """Scales and zero points ``[out, groups]`` (float32) of RTN over groups of columns."""
    n, k = w.shape
    g = num_groups(k, group_size)
    wf = w.astype(jnp.float32)
    # Pad the short last group by repeating its last column: min/max are unchanged.
    wp = jnp.pad(wf, ((0, 0), (0, g * group_size - k)), mode="edge").reshape(n, g, group_size)
    lo = jnp.minimum(wp.min(axis=-1), 0.0)
    hi = jnp.maximum(wp.max(axis=-1), 0.0)
    maxq = 2 ** bits - 1
    if symmetric:
        hi = jnp.maximum(-lo, hi)
        lo = -hi
    dead = (lo == 0) & (hi == 0)
    lo = jnp.where(dead, -1.0, lo)
    hi = jnp.where(dead, 1.0, hi)
    # Clamp before rounding to the storage dtype: a tiny range must not become scale 0.
    scale = jnp.maximum((hi - lo) / maxq, jnp.finfo(scale_dtype).tiny)
    scale = scale.astype(scale_dtype).astype(jnp.float32)
    zero = jnp.full_like(scale, 2 ** (bits - 1)) if symmetric else jnp.round(-lo / scale)
    return scale, zero


def quantize_codes(w: jax.Array, scale: jax.Array, zero: jax.Array, *, bits: int,
                   group_size: int) -> jax.Array:
    """``clip(round(w / s) + z, 0, 2**b - 1)`` with per-group ``s``, ``z`` -> int32 codes."""
    k = w.shape[1]
    s = expand_groups(scale, group_size, k)
    z = expand_groups(zero, group_size, k)
    q = jnp.round(w.astype(jnp.float32) / s) + z
    return jnp.clip(q, 0, 2 ** bits - 1).astype(jnp.int32)


def rtn(w: jax.Array, *, bits: int, group_size: int | None, symmetric: bool = False,
        scale_dtype: Any = jnp.bfloat16) -> UniformWeight:
    """Round-to-nearest quantization of ``w [out, in]`` into a :class:`UniformWeight`.

    Args:
      w: Float weight ``[out_features, in_features]``.
      bits: Code width (1..8).
      group_size: Input channels per group; ``None`` for per-output-channel.
      symmetric: Symmetric range around zero (no stored zeros).
      scale_dtype: Dtype of the stored scales and zeros.
    """
    if symmetric and bits < 2:
        raise ValueError("symmetric quantization needs at least 2 bits (1-bit symmetric codes "
                         "cannot represent a sign around zero)")
    k = w.shape[1]
    g = k if group_size is None else min(group_size, k)
    scale, zero = group_params(w, bits=bits, group_size=g, symmetric=symmetric,
                               scale_dtype=scale_dtype)
    codes = quantize_codes(w, scale, zero, bits=bits, group_size=g)
    return UniformWeight.from_codes(
        codes, scale.astype(scale_dtype), None if symmetric else zero.astype(scale_dtype),
        bits=bits, group_size=g)
