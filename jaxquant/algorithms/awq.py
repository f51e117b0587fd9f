"""AWQ: activation-aware weight quantization (the array math; no model plumbing).

Lin et al., 2024, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration", arXiv 2306.00978. A small fraction of input channels, those with large
activations, matters most for a linear layer's output. AWQ protects them without
mixed precision: with per-input-channel scales ``s > 0``,

    ``Q(W diag(s)) (diag(s)^-1 X)``                                        (AWQ Eq. 3)

scales the salient weights up before round-to-nearest (their relative rounding error
shrinks) and the input down by the same factor, which is folded into whatever
produces ``X`` (:mod:`jaxquant.transforms.awq`). The scales are searched on
calibration inputs:

    ``s = s_X^α``,  ``α* = argmin_α L(s_X^α)``,                              (AWQ Eq. 5)
    ``L(s) = || Q(W diag(s)) (diag(s)^-1 X) - W X ||``                      (AWQ Eq. 4)

with ``s_X`` the mean magnitude ``mean_t |X_tj|`` of each input channel and ``α`` on a
grid ``0, 1/n, ..., (n-1)/n`` (the reference implementation, ``auto_scale.py``; ``α = 0``
is ``s = 1``: plain RTN, so the chosen scales are never worse than RTN on the sample).
As the reference does, ``s`` is clamped to at least ``1e-4`` (channels that never fire)
and normalized by ``sqrt(max(s) min(s))``.

AWQ's second step (``auto_clip.py``) shrinks each group's range: per output row and
group, ``max_val = max|w_g| (1 - i / n)`` for ``i < max_shrink n``, the weights are
clamped to ``[-max_val, max_val]`` and quantized, and the ratio minimizing the group's
output error ``|| x_g w_g^T - x_g Q(clamp(w_g))^T ||^2`` on the sample is kept.

``Q`` throughout is the RTN quantizer of :mod:`jaxquant.algorithms.rtn` (the weights are
then quantized with RTN or GPTQ by the caller).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.algorithms.rtn import group_params
from jaxquant.formats.uniform import num_groups

_HI = jax.lax.Precision.HIGHEST
#: Smallest scale before normalization (the reference's ``clamp(min=1e-4)``).
MIN_SCALE = 1e-4


def _group(k: int, group_size: int | None) -> int:
    """Columns per group as RTN uses them: ``None`` (per output channel) is the whole row."""
    if group_size is not None and group_size < 1:
        raise ValueError(f"group_size must be positive or None, got {group_size}")
    return k if group_size is None else min(group_size, k)


def _per_column(x: jax.Array, group_size: int, k: int) -> jax.Array:
    """``[out, groups]`` -> ``[out, k]`` (``expand_groups`` as a broadcast and reshape)."""
    n, g = x.shape
    return jnp.broadcast_to(x[..., None], (n, g, group_size)).reshape(n, -1)[:, :k]


def _check(bits: int, symmetric: bool, n_grid: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if symmetric and bits < 2:
        raise ValueError("symmetric quantization needs at least 2 bits")
    if n_grid < 1:
        raise ValueError(f"n_grid must be at least 1, got {n_grid}")


def fake_quantize(w: jax.Array, *, bits: int, group_size: int | None, symmetric: bool,
                  scale_dtype: Any = jnp.bfloat16) -> jax.Array:
    """RTN quantize-dequantize of ``w [out, in]`` (float32), exactly as ``rtn()`` stores it.

    Args:
      w: Weights ``[out, in]``.
      bits: Code width.
      group_size: Input channels per group; ``None`` for per output channel.
      symmetric: Symmetric range around zero.
      scale_dtype: Storage dtype of the scales (rounded before the codes are chosen).

    Returns:
      ``s (q - z)`` per group, float32 ``[out, in]``.
    """
    n, k = w.shape
    g = _group(k, group_size)
    scale, zero = group_params(w, bits=bits, group_size=g, symmetric=symmetric,
                               scale_dtype=scale_dtype)
    # rtn.quantize_codes and UniformWeight.dequantize, with the groups as a reshape
    # (a broadcast instead of expand_groups' repeat: faster to compile and to run). The
    # barrier keeps XLA from turning ``w / broadcast(s)`` into ``w * broadcast(1 / s)``,
    # whose ulps resolve rounding ties (a group's extreme weights) unlike rtn().
    pad = num_groups(k, g) * g - k
    wg = jnp.pad(w.astype(jnp.float32), ((0, 0), (0, pad))).reshape(n, -1, g)
    s, z = jax.lax.optimization_barrier((jnp.broadcast_to(scale[..., None], wg.shape),
                                         jnp.broadcast_to(zero[..., None], wg.shape)))
    codes = jnp.clip(jnp.round(wg / s) + z, 0, 2 ** bits - 1)
    return (s * (codes - z)).reshape(n, -1)[:, :k]


def awq_scales(act_mean: jax.Array, alpha: jax.Array | float) -> jax.Array:
    """AWQ's candidate scales ``s = s_X^α`` (Eq. 5), clamped and normalized.

    Args:
      act_mean: ``[in]`` mean input magnitude per channel, ``s_X = mean_t |X_tj|``.
      alpha: Exponent in ``[0, 1]`` (0 gives all ones: plain RTN).

    Returns:
      ``[in]`` float32 ``s / sqrt(max(s) min(s))`` with ``s = max(s_X^α, 1e-4)``.
    """
    s = jnp.maximum(jnp.power(jnp.asarray(act_mean, jnp.float32), alpha), MIN_SCALE)
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "symmetric", "n_grid",
                                             "scale_dtype"))
def _scale_losses(x: jax.Array, weights: tuple[jax.Array, ...], *, bits: int,
                  group_size: int | None, symmetric: bool, n_grid: int,
                  scale_dtype: Any) -> tuple[jax.Array, jax.Array]:
    """``(scales [n_grid, in], losses [n_grid])`` of the scale grid."""
    x = x.astype(jnp.float32)
    ws = tuple(w.astype(jnp.float32) for w in weights)
    act_mean = jnp.mean(jnp.abs(x), axis=0)
    elements = x.shape[0] * sum(w.shape[0] for w in ws)

    def loss(alpha: jax.Array) -> tuple[jax.Array, jax.Array]:
        s = awq_scales(act_mean, alpha)
        xs = x / s
        total = jnp.zeros((), jnp.float32)
        for w in ws:
            w_s = w * s
            q = fake_quantize(w_s, bits=bits, group_size=group_size, symmetric=symmetric,
                              scale_dtype=scale_dtype)
            # X W^T - (X / s) Q(W s)^T = (X / s) (W s - Q(W s))^T: no cancellation.
            total = total + jnp.sum(jnp.square(jnp.matmul(xs, (w_s - q).T, precision=_HI)))
        return s, total / elements

    # The grid as constants (i / n rounded once), not as XLA's i * (1 / n).
    alphas = jnp.asarray(np.arange(n_grid) / n_grid, jnp.float32)
    return jax.lax.map(loss, alphas)


def awq_scale_search(x: jax.Array, weights: Sequence[jax.Array], *, bits: int,
                     group_size: int | None, symmetric: bool, n_grid: int = 20,
                     scale_dtype: Any = jnp.bfloat16) -> tuple[jax.Array, float, jax.Array]:
    """AWQ's grid search of per-input-channel scales for layers sharing one input.

    The loss of a candidate ``α`` (AWQ Eq. 4, summed over the readers ``W_i``) is

        ``L(α) = sum_i || X W_i^T - (X diag(s)^-1) Q(W_i diag(s))^T ||_F^2 / (m sum_i out_i)``

    (the mean squared error over every output element), with ``s = s_X^α`` from
    :func:`awq_scales`; ``α* = argmin L`` (Eq. 5; ties keep the smaller ``α``). The grid
    is evaluated with one jitted ``lax.map``.

    Args:
      x: ``[m, in]`` sample of the shared input rows.
      weights: The layers reading that input, each ``[out_i, in]``.
      bits: Code width of the RTN quantizer ``Q``.
      group_size: Input channels per group; ``None`` for per output channel.
      symmetric: Symmetric range around zero.
      n_grid: Grid points ``α = i / n_grid``, ``i = 0 .. n_grid - 1``.
      scale_dtype: Storage dtype of the quantizer's scales.

    Returns:
      ``(scales, alpha, losses)``: the chosen ``[in]`` float32 scales (multiply the
      readers' columns by them, divide the input by them), the chosen ``α`` and the
      ``[n_grid]`` losses (``losses[0]`` is plain RTN's).

    Raises:
      ValueError: Bad arguments, mismatched shapes, or non-finite inputs.
    """
    _check(bits, symmetric, n_grid)
    if not weights:
        raise ValueError("awq_scale_search needs at least one weight")
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty [m, in] sample, got shape {x.shape}")
    for w in weights:
        if w.ndim != 2 or w.shape[1] != x.shape[1]:
            raise ValueError(f"weight of shape {w.shape} does not read inputs of width "
                             f"{x.shape[1]}")
    if not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError("x has NaN or infinite values")
    scales, losses = _scale_losses(x, tuple(weights), bits=bits, group_size=group_size,
                                   symmetric=symmetric, n_grid=n_grid,
                                   scale_dtype=scale_dtype)
    losses_np = np.asarray(losses)
    if not np.all(np.isfinite(losses_np)):
        raise ValueError("AWQ scale search produced non-finite losses (weights with NaN or "
                         "infinite values?)")
    best = int(np.argmin(losses_np))
    return scales[best], best / n_grid, losses


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "symmetric", "n_grid",
                                             "steps", "scale_dtype"))
def _clip_search(x: jax.Array, w: jax.Array, *, bits: int, group_size: int, symmetric: bool,
                 n_grid: int, steps: int, scale_dtype: Any) -> jax.Array:
    """Chosen ``max_abs [out, groups]`` of the clip grid (see :func:`awq_clip_search`)."""
    x = x.astype(jnp.float32)
    w = w.astype(jnp.float32)
    m, k = x.shape
    n = w.shape[0]
    g = num_groups(k, group_size)
    pad = g * group_size - k
    xg = jnp.pad(x, ((0, 0), (0, pad))).reshape(m, g, group_size)  # padding: zeros
    org_max = jnp.pad(jnp.abs(w), ((0, 0), (0, pad))).reshape(n, g, group_size).max(axis=-1)
    ratios = jnp.asarray(1.0 - np.arange(steps) / n_grid, jnp.float32)  # rounded once
    # A group's output error of a weight change d_g is ||X_g d_g||^2 / m: directly
    # (m out in flops per candidate), or as d_g^T G_g d_g with the group's Gram matrix
    # G_g = X_g^T X_g / m (out in group_size flops): whichever is cheaper.
    gram = None
    if group_size < m:
        gram = jnp.einsum("tgi,tgj->gij", xg, xg, precision=_HI) / m

    def error(ratio: jax.Array) -> jax.Array:
        lim = _per_column(org_max * ratio, group_size, k)
        q = fake_quantize(jnp.clip(w, -lim, lim), bits=bits, group_size=group_size,
                          symmetric=symmetric, scale_dtype=scale_dtype)
        d = jnp.pad(w - q, ((0, 0), (0, pad))).reshape(n, g, group_size)
        if gram is None:
            e = jnp.einsum("tgi,ogi->tog", xg, d, precision=_HI)
            return jnp.mean(jnp.square(e), axis=0)  # [out, groups]
        gd = jnp.einsum("gij,ogj->ogi", gram, d, precision=_HI)
        return jnp.sum(d * gd, axis=-1)  # [out, groups]

    errs = jax.lax.map(error, ratios)  # [steps, out, groups]
    best = jnp.argmin(errs, axis=0)  # ties keep the smaller shrink (ratio 1 first)
    return org_max * ratios[best]


def awq_clip_search(x: jax.Array, w: jax.Array, *, bits: int, group_size: int | None,
                    symmetric: bool, n_grid: int = 20, max_shrink: float = 0.5,
                    scale_dtype: Any = jnp.bfloat16) -> jax.Array:
    """AWQ's weight clipping search: the best range of each output row's group.

    For every row ``o`` and group ``g`` of ``w``, candidates
    ``max_val = max_j |w_oj| (1 - i / n_grid)`` for ``i = 0 .. int(max_shrink n_grid) - 1``
    (``i = 0``: no clipping) are scored by the group's output error on the sample,
    ``mean_t (x_tg . w_og - x_tg . Q(clamp(w_og, -max_val, max_val)))^2``, and the
    smallest is kept (ties keep the smaller shrink). As in the reference, ``Q`` is RTN
    of the clamped row; groups are quantized independently, so each group's error
    depends on its own candidate only.

    Args:
      x: ``[m, in]`` sample of the layer's input rows (after any AWQ scaling).
      w: ``[out, in]`` weights (after any AWQ scaling).
      bits: Code width of the RTN quantizer.
      group_size: Input channels per group; ``None`` for per output channel.
      symmetric: Symmetric range around zero.
      n_grid: Grid resolution of the shrink ratio.
      max_shrink: Largest fraction of the range removed (exclusive).

    Returns:
      ``max_abs [out, n_groups]`` float32 clip thresholds (for :func:`apply_clip`).

    Raises:
      ValueError: Bad arguments, mismatched shapes, or non-finite inputs.
    """
    _check(bits, symmetric, n_grid)
    steps = int(max_shrink * n_grid)
    if steps < 1 or max_shrink > 1:
        raise ValueError(f"max_shrink * n_grid must give at least one candidate and "
                         f"max_shrink <= 1, got max_shrink={max_shrink}, n_grid={n_grid}")
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 2 or w.ndim != 2 or w.shape[1] != x.shape[1] or x.shape[0] == 0:
        raise ValueError(f"x [m, in] and w [out, in] do not match: {x.shape}, {w.shape}")
    if not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError("x has NaN or infinite values")
    return _clip_search(x, w, bits=bits, group_size=_group(w.shape[1], group_size),
                        symmetric=symmetric, n_grid=n_grid, steps=steps,
                        scale_dtype=scale_dtype)


@functools.partial(jax.jit, static_argnames=("group_size",))
def _apply_clip(w: jax.Array, max_abs: jax.Array, *, group_size: int) -> jax.Array:
    lim = _per_column(max_abs.astype(jnp.float32), group_size, w.shape[1])
    return jnp.clip(w.astype(jnp.float32), -lim, lim).astype(w.dtype)


def apply_clip(w: jax.Array, max_abs: jax.Array, group_size: int | None) -> jax.Array:
    """``clamp(w, -max_abs, max_abs)`` per group of columns, in ``w``'s dtype.

    Args:
      w: ``[out, in]`` weights.
      max_abs: ``[out, n_groups]`` thresholds (:func:`awq_clip_search`).
      group_size: Input channels per group; ``None`` for per output channel.
    """
    k = w.shape[1]
    g = _group(k, group_size)
    max_abs = jnp.asarray(max_abs)
    if tuple(max_abs.shape) != (w.shape[0], num_groups(k, g)):
        raise ValueError(f"max_abs of shape {max_abs.shape} does not match w {w.shape} in "
                         f"groups of {g}")
    return _apply_clip(jnp.asarray(w), max_abs, group_size=g)
