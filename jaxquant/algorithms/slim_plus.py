"""SliM-LLM+: learnable per-group clipping on SBA's bit map, trained on block outputs.

SliM-LLM+ (Huang et al., 2024, Sec. 4) learns OmniQuant-style weight clipping (LWC;
Shao et al., 2024, eq. 2) for SliM-LLM's per-group bit widths by gradient descent on
the block's output error. jaxquant learns it *on top of SliM-LLM's GPTQ result*
instead of from the float weights: each group's quantizer range ``[lo0, hi0]`` (the
range the sweep chose, with SQC) is scaled per row by learned factors,

    hi = 2 sigmoid(gamma_hi) hi0,   lo = 2 sigmoid(gamma_lo) lo0        (gamma from 0)
    s = (hi - lo) / (2^b - 1),   z = round(-lo / s),
    w' = s (clip(round_ste(w~ / s) + z, 0, 2^b - 1) - z),

where ``w~`` are the sweep's error-compensated weights just before rounding (so at
``gamma = 0`` the codes are exactly SliM-LLM's) and ``round_ste`` rounds with a
straight-through gradient. 1-bit groups learn the scale of their binarization around
its centre. The factors of all linear layers of a block are trained together with
optax AdamW (weight decay 0) to minimise ``|| block_float(X) - block_quant(X) ||^2``
on the block's calibration inputs ``X`` (computed by the already quantized earlier
blocks). The reference instead starts from RTN of the float weights (``gamma0 = 4``);
on a 135M model at 2-3 bits that start is far worse than GPTQ's and needs thousands
of steps per block to recover (measured; see ``docs/quantization.md``).

Per block the result with the lower block-output error on the calibration inputs is
kept (trained, or SliM-LLM's own), so SliM-LLM+ is never worse than SliM-LLM on
calibration data; the statistics say which won. Shapes do not depend on the bit map
(bit widths are data), so the training step compiles once per kind of block.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxquant.algorithms.slim import mixed_from_groups
from jaxquant.calibration import apply_block
from jaxquant.formats.base import QuantizedWeight
from jaxquant.formats.uniform import num_groups
from jaxquant.models import transformer
from jaxquant.models.config import ModelConfig
from jaxquant.params import flatten, unflatten


def _round_ste(x: jax.Array) -> jax.Array:
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def _group_fq(wg: jax.Array, gamma: jax.Array, bits: jax.Array, s0: jax.Array,
              z0: jax.Array, scale_dtype: Any, stored: bool
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One group ``[n, gs]`` of latent weights: codes, scale, zero (differentiable in s).

    With ``stored`` the scale (and a 1-bit zero) are rounded to ``scale_dtype`` first,
    as they will be stored.
    """
    tiny = jnp.finfo(scale_dtype).tiny

    def rounded(x: jax.Array) -> jax.Array:
        return x.astype(scale_dtype).astype(jnp.float32) if stored else x

    def binary(_: Any) -> tuple[jax.Array, ...]:
        centre = s0 * (0.5 - z0)
        scale = rounded(jnp.maximum(s0 * 2 * jax.nn.sigmoid(gamma[0]), tiny))
        zero = rounded(0.5 - centre / scale)
        q = jax.lax.stop_gradient((wg / scale[:, None] + zero[:, None] > 0.5)
                                  .astype(jnp.float32))
        return q, scale, zero

    def uniform(_: Any) -> tuple[jax.Array, ...]:
        maxq = (2 ** bits - 1).astype(jnp.float32)
        hi = 2 * jax.nn.sigmoid(gamma[0]) * s0 * (maxq - z0)
        lo = -2 * jax.nn.sigmoid(gamma[1]) * s0 * z0
        scale = rounded(jnp.maximum((hi - lo) / maxq, tiny))
        zero = jax.lax.stop_gradient(jnp.round(-lo / scale))
        q = jnp.clip(_round_ste(wg / scale[:, None]) + zero[:, None], 0, maxq)
        return q, scale, zero

    return jax.lax.cond(bits == 1, binary, uniform, None)


def _quantize_groups(latent: jax.Array, gamma: jax.Array, group_bits: jax.Array,
                     s0: jax.Array, z0: jax.Array, group_size: int, scale_dtype: Any,
                     stored: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    n, k = latent.shape
    g = num_groups(k, group_size)
    wg = jnp.pad(latent, ((0, 0), (0, g * group_size - k))).reshape(n, g, group_size)
    fq = jax.vmap(lambda a, gm, b, s, z: _group_fq(a, gm, b, s, z, scale_dtype, stored),
                  in_axes=(1, 2, 0, 1, 1), out_axes=(1, 1, 1))
    return fq(wg, gamma, group_bits, s0, z0)


def fake_quant(latent: jax.Array, gamma: jax.Array, group_bits: jax.Array, s0: jax.Array,
               z0: jax.Array, inv_perm: jax.Array, group_size: int) -> jax.Array:
    """The tuned quantized weight in the original column order (differentiable).

    Args:
      latent: ``[n, k]`` pre-rounding weights in processing order.
      gamma: ``[2, n, groups]`` range parameters (upper, lower); 0 reproduces SliM-LLM.
      group_bits: ``[groups]`` widths in processing order.
      s0, z0: ``[n, groups]`` the sweep's scales and zeros.
      inv_perm: Inverse of the processing order.
      group_size: Columns per group.
    """
    n, k = latent.shape
    q, s, z = _quantize_groups(latent, gamma, group_bits, s0, z0, group_size, jnp.float32,
                               False)
    dq = (s[..., None] * (q - z[..., None])).reshape(n, -1)[:, :k]
    return dq[:, inv_perm]


def to_format(state: dict[str, Any], gamma: jax.Array, *, scale_dtype: Any
              ) -> QuantizedWeight:
    """Rounds the latent weights with the tuned ranges into the mixed format."""
    latent = state["latent"]
    n, k = latent.shape
    q, s, z = _quantize_groups(latent, gamma, jnp.asarray(state["group_bits"]),
                               state["scales"], state["zeros"], state["group_size"],
                               scale_dtype, True)
    codes = q.astype(jnp.int32).reshape(n, -1)[:, :k]
    return mixed_from_groups(codes, s, z, np.asarray(state["group_bits"]),
                             jnp.asarray(state["perm"]), group_size=state["group_size"],
                             symmetric=False, scale_dtype=scale_dtype)


def _fq_block(float_flat: dict[str, Any], consts: dict[str, Any], gammas: dict[str, Any],
              group_size: int) -> Any:
    flat = dict(float_flat)
    for p, (latent, bits, s0, z0, inv) in consts.items():
        flat[p] = fake_quant(latent, gammas[p], bits, s0, z0, inv, group_size)
    return unflatten(flat)


@functools.partial(jax.jit, static_argnames=("cfg", "layer", "group_size", "lr"))
def _step(gammas: Any, opt_state: Any, float_flat: Any, consts: Any, x: jax.Array,
          target: jax.Array, *, cfg: ModelConfig, layer: int, group_size: int, lr: float):
    opt = optax.adamw(lr, weight_decay=0.0)

    def loss_fn(g: Any) -> jax.Array:
        y = transformer.apply_block(_fq_block(float_flat, consts, g, group_size), cfg, layer, x)
        return jnp.mean((y.astype(jnp.float32) - target) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(gammas)
    updates, opt_state = opt.update(grads, opt_state, gammas)
    return optax.apply_updates(gammas, updates), opt_state, loss


@functools.partial(jax.jit, static_argnums=(1, 2))
def _block_loss(block_params: Any, cfg: ModelConfig, layer: int, x: jax.Array,
                target: jax.Array) -> jax.Array:
    y = transformer.apply_block(block_params, cfg, layer, x)
    return jnp.mean((y.astype(jnp.float32) - target) ** 2)


def train_block(cfg: ModelConfig, layer: int, float_block: Any, qblock: Any,
                xs: list[jax.Array], states: dict[str, Any], *, epochs: int,
                learning_rate: float, scale_dtype: Any = jnp.bfloat16
                ) -> tuple[Any, dict[str, Any]]:
    """Tunes the quantizer ranges of one block's SliM-LLM layers; keeps the better block.

    Args:
      cfg: Model config.
      layer: Block index.
      float_block: The block's float params.
      qblock: The block's params with SliM-LLM-quantized layers.
      xs: The block's calibration inputs, batches ``[b, seq, hidden]``.
      states: Per layer path, SliM-LLM's sweep state (``slim(..., return_state=True)``);
        layers without one are left as they are.
      epochs: Passes over the batches.
      learning_rate: AdamW learning rate (weight decay 0).
      scale_dtype: Storage dtype of the final scales and zeros.

    Returns:
      ``(block_params, info)`` with ``info`` the block-output losses of SliM-LLM and of
      the tuned ranges, and which was kept.
    """
    kind = transformer.canonical_layer(cfg, layer)
    float_flat, flat_q = flatten(float_block), dict(flatten(qblock))
    paths = sorted(p for p in states if isinstance(flat_q.get(p), QuantizedWeight))
    if not paths:
        return qblock, {"kept": "slim"}
    sizes = {states[p]["group_size"] for p in paths}
    if len(sizes) != 1:
        raise ValueError("SliM-LLM+ needs one group size per block")
    group_size = sizes.pop()
    consts = {p: (states[p]["latent"], jnp.asarray(states[p]["group_bits"], jnp.int32),
                  states[p]["scales"], states[p]["zeros"],
                  jnp.asarray(np.argsort(states[p]["perm"]), jnp.int32)) for p in paths}
    gammas = {p: jnp.zeros((2, *states[p]["scales"].shape), jnp.float32) for p in paths}
    targets = [apply_block(float_block, cfg, layer, x).astype(jnp.float32) for x in xs]

    def total(block: Any) -> float:
        return float(sum(_block_loss(block, cfg, kind, x, t) for x, t in zip(
            xs, targets, strict=True)) / len(xs))

    before = total(qblock)
    opt_state = optax.adamw(learning_rate, weight_decay=0.0).init(gammas)
    for _ in range(epochs):
        for x, t in zip(xs, targets, strict=True):
            gammas, opt_state, _ = _step(gammas, opt_state, float_flat, consts, x, t,
                                         cfg=cfg, layer=kind, group_size=group_size,
                                         lr=learning_rate)
    trained = dict(flat_q)
    for p in paths:
        trained[p] = to_format(states[p], gammas[p], scale_dtype=scale_dtype)
    trained_block = unflatten(trained)
    after = total(trained_block)
    info = {"block_loss_slim": before, "block_loss_lwc": after, "kept": "lwc"}
    if not after < before:
        info["kept"] = "slim"
        return qblock, info
    return trained_block, info
