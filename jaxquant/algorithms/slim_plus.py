"""SliM-LLM+: learnable per-group clipping on SBA's bit map, trained on block outputs.

SliM-LLM+ (Huang et al., 2024, Sec. 4) replaces the GPTQ sweep by OmniQuant's
learnable weight clipping (LWC; Shao et al., 2024, eq. 2) with SliM-LLM's per-group
bit widths: per row ``r`` and group ``g`` of ``b >= 2`` bits,

    hi = sigmoid(gamma_hi[r, g]) * max(w, 0),   lo = sigmoid(gamma_lo[r, g]) * min(w, 0)
    s = (hi - lo) / (2^b - 1),   z = round(-lo / s),
    w' = s (clip(round_ste(w / s) + z, 0, 2^b - 1) - z),

with ``gamma`` initialised to 4 (``sigmoid(4) = 0.982``) and ``round_ste`` rounding
with a straight-through gradient; 1-bit groups learn the scale of their binarization,
``w' = mean + alpha (sigmoid(gamma_hi) + 1/2) sign(w - mean)`` (``gamma`` from 0).
The clipping parameters of all linear layers of a block are trained together with
optax AdamW to minimise ``|| block_float(X) - block_quant(X) ||^2`` on the block's
calibration inputs ``X`` (computed by the already quantized earlier blocks), and the
final codes are rounded with the learned ranges.

The bit map comes from SliM-LLM's SBA (the layer step quantizes with
:func:`jaxquant.algorithms.slim.slim` first; its :class:`MixedWeight` layout fixes
the groups and widths). Per block, the result with the lower block-output error on
the calibration inputs is kept: the trained clipping, or SliM-LLM's GPTQ codes (so
SliM-LLM+ is never worse than SliM-LLM on calibration data; the statistics say which
won).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxquant.calibration import apply_block
from jaxquant.formats.base import QuantizedWeight
from jaxquant.formats.mixed import MixedWeight
from jaxquant.formats.uniform import UniformWeight, num_groups
from jaxquant.models import transformer
from jaxquant.models.config import ModelConfig
from jaxquant.params import flatten, unflatten


@dataclasses.dataclass(frozen=True, kw_only=True)
class PartLayout:
    """One equal-width run of a mixed weight: its columns and code width."""

    columns: np.ndarray  # original column indices of the run, in stored order
    bits: int  # code width
    group_size: int  # columns per group (the last group of the run may be shorter)


def layout_of(q: QuantizedWeight) -> list[PartLayout]:
    """The runs of a SliM-LLM result (a :class:`MixedWeight` or :class:`UniformWeight`)."""
    if isinstance(q, UniformWeight):
        return [PartLayout(columns=np.arange(q.shape[1]), bits=q.bits,
                           group_size=q.group_size)]
    if not isinstance(q, MixedWeight) or not all(isinstance(p, UniformWeight)
                                                 for p in q.parts):
        raise TypeError(f"SliM-LLM+ needs a uniform or mixed-uniform weight, got {type(q)}")
    perm = np.arange(q.shape[1]) if q.perm is None else np.asarray(q.perm, np.int64)
    out, start = [], 0
    for p in q.parts:
        out.append(PartLayout(columns=perm[start:start + p.shape[1]], bits=p.bits,
                              group_size=p.group_size))
        start += p.shape[1]
    return out


def _round_ste(x: jax.Array) -> jax.Array:
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def _part_params(w: jax.Array, gamma: jax.Array, bits: int, group_size: int,
                 scale_dtype: Any, stored: bool = False
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Padded groups ``[n, G, gs]``, scale and zero ``[n, G]`` of one run.

    Differentiable in ``gamma`` through the scale; with ``stored`` the scale (and a
    1-bit zero) are rounded to ``scale_dtype`` first, as they will be stored.
    """
    n, k = w.shape
    g = num_groups(k, group_size)
    pad = g * group_size - k
    valid = (jnp.arange(g * group_size) < k).reshape(1, g, group_size)
    wg = jnp.pad(w, ((0, 0), (0, pad))).reshape(n, g, group_size)
    tiny = jnp.finfo(scale_dtype).tiny

    def rounded(x: jax.Array) -> jax.Array:
        return x.astype(scale_dtype).astype(jnp.float32) if stored else x

    if bits == 1:
        cnt = valid.sum(axis=-1)
        mean = jnp.sum(jnp.where(valid, wg, 0.0), -1) / cnt
        alpha = jnp.sum(jnp.where(valid, jnp.abs(wg - mean[..., None]), 0.0), -1) / cnt
        scale = rounded(jnp.maximum(2 * alpha * (jax.nn.sigmoid(gamma[0]) + 0.5), tiny))
        return wg, scale, rounded(0.5 - mean / scale)
    hi = jax.nn.sigmoid(gamma[0]) * jnp.maximum(jnp.where(valid, wg, -jnp.inf).max(-1), 0.0)
    lo = jax.nn.sigmoid(gamma[1]) * jnp.minimum(jnp.where(valid, wg, jnp.inf).min(-1), 0.0)
    dead = (hi - lo) <= 0
    hi = jnp.where(dead, 1.0, hi)
    lo = jnp.where(dead, -1.0, lo)
    scale = rounded(jnp.maximum((hi - lo) / (2 ** bits - 1), tiny))
    zero = jax.lax.stop_gradient(jnp.round(-lo / scale))
    return wg, scale, zero


def _codes(wg: jax.Array, scale: jax.Array, zero: jax.Array, bits: int) -> jax.Array:
    if bits == 1:
        return (wg / scale[..., None] + zero[..., None] > 0.5).astype(jnp.float32)
    q = _round_ste(wg / scale[..., None]) + zero[..., None]
    return jnp.clip(q, 0, 2 ** bits - 1)


def fake_quant(w: jax.Array, gammas: list[jax.Array], layout: list[PartLayout],
               scale_dtype: Any = jnp.float32) -> jax.Array:
    """The LWC-quantized float weight (differentiable in ``gammas``)."""
    out = jnp.zeros_like(w)
    for gamma, part in zip(gammas, layout, strict=True):
        cols = jnp.asarray(part.columns)
        wp = w[:, cols]
        wg, s, z = _part_params(wp, gamma, part.bits, part.group_size, scale_dtype)
        q = _codes(wg, s, z, part.bits)
        if part.bits == 1:  # the sign has no gradient: the scale learns through s
            q = jax.lax.stop_gradient(q)
        dq = (s[..., None] * (q - z[..., None])).reshape(w.shape[0], -1)[:, :wp.shape[1]]
        out = out.at[:, cols].set(dq)
    return out


def to_format(w: jax.Array, gammas: list[jax.Array], layout: list[PartLayout], *,
              scale_dtype: Any) -> QuantizedWeight:
    """Rounds ``w`` with the learned ranges into the same layout (scales in storage dtype)."""
    n, k = w.shape
    parts, order = [], []
    for gamma, part in zip(gammas, layout, strict=True):
        wp = w[:, jnp.asarray(part.columns)]
        wg, s, z = _part_params(wp, gamma, part.bits, part.group_size, scale_dtype,
                                stored=True)
        codes = _codes(wg, s, z, part.bits).astype(jnp.int32)
        codes = codes.reshape(n, -1)[:, :wp.shape[1]]
        parts.append(UniformWeight.from_codes(codes, s.astype(scale_dtype),
                                              z.astype(scale_dtype), bits=part.bits,
                                              group_size=part.group_size))
        order.append(part.columns)
    perm = np.concatenate(order)
    if len(parts) == 1 and np.array_equal(perm, np.arange(k)):
        return parts[0]
    return MixedWeight(parts=tuple(parts), perm=jnp.asarray(perm, MixedWeight.perm_dtype(k)),
                       shape=(n, k))


def init_gammas(layout: list[PartLayout], rows: int, init: float = 4.0) -> list[jax.Array]:
    """``[2, rows, groups]`` per run: ``init`` for >= 2-bit runs, 0 for 1-bit runs."""
    return [jnp.full((2, rows, num_groups(len(p.columns), p.group_size)),
                     0.0 if p.bits == 1 else init, jnp.float32) for p in layout]


@functools.partial(jax.jit, static_argnums=(1, 2))
def _block_loss(block_params: Any, cfg: ModelConfig, layer: int, x: jax.Array,
                target: jax.Array) -> jax.Array:
    y = transformer.apply_block(block_params, cfg, layer, x)
    return jnp.mean((y.astype(jnp.float32) - target) ** 2)


def train_block(cfg: ModelConfig, layer: int, float_block: Any, qblock: Any,
                xs: list[jax.Array], *, epochs: int, learning_rate: float, init: float = 4.0,
                scale_dtype: Any = jnp.bfloat16) -> tuple[Any, dict[str, Any]]:
    """Trains LWC for the quantized layers of one block; keeps the better block.

    Args:
      cfg: Model config.
      layer: Block index.
      float_block: The block's float params.
      qblock: The block's params with SliM-LLM-quantized layers (bit map source).
      xs: The block's calibration inputs, batches ``[b, seq, hidden]``.
      epochs: Passes over the batches.
      learning_rate: AdamW learning rate (weight decay 0).
      init: Initial ``gamma`` of >= 2-bit groups.
      scale_dtype: Storage dtype of the final scales and zeros.

    Returns:
      ``(block_params, info)`` with ``info`` the losses before/after and which won.
    """
    flat_f, flat_q = flatten(float_block), dict(flatten(qblock))
    paths = [p for p, v in flat_q.items() if isinstance(v, QuantizedWeight)]
    layouts = {p: layout_of(flat_q[p]) for p in paths}
    gammas = {p: init_gammas(layouts[p], flat_f[p].shape[0], init) for p in paths}
    weights = {p: jnp.asarray(flat_f[p], jnp.float32) for p in paths}
    targets = [apply_block(float_block, cfg, layer, x).astype(jnp.float32) for x in xs]

    def params_of(gammas: dict[str, list[jax.Array]]) -> Any:
        flat = dict(flat_f)
        for p in paths:
            flat[p] = fake_quant(weights[p], gammas[p], layouts[p])
        return unflatten(flat)

    opt = optax.adamw(learning_rate, weight_decay=0.0)

    @jax.jit
    def step(gammas: Any, state: Any, x: jax.Array, target: jax.Array) -> Any:
        def loss_fn(g: Any) -> jax.Array:
            y = transformer.apply_block(params_of(g), cfg, layer, x)
            return jnp.mean((y.astype(jnp.float32) - target) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(gammas)
        updates, state = opt.update(grads, state, gammas)
        return optax.apply_updates(gammas, updates), state, loss

    def total(block: Any) -> float:
        return float(sum(_block_loss(block, cfg, layer, x, t) for x, t in zip(
            xs, targets, strict=True)) / len(xs))

    before = total(qblock)
    state = opt.init(gammas)
    for _ in range(epochs):
        for x, t in zip(xs, targets, strict=True):
            gammas, state, _ = step(gammas, state, x, t)
    trained = dict(flat_q)
    for p in paths:
        trained[p] = to_format(weights[p], gammas[p], layouts[p], scale_dtype=scale_dtype)
    trained_block = unflatten(trained)
    after = total(trained_block)
    info = {"block_loss_slim": before, "block_loss_lwc": after, "kept": "lwc"}
    if not after < before:
        info["kept"] = "slim"
        return qblock, info
    return trained_block, info
