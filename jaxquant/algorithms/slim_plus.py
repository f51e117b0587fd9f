"""SliM-LLM+: learnable per-group clipping on SBA's bit map, trained on block outputs.

SliM-LLM+ (Huang et al., 2024, Sec. 4) learns per-group clipping ranges for SliM-LLM's
per-group bit widths by gradient descent on the block's output error (OmniQuant's LWC,
Shao et al., 2024). jaxquant learns them *on top of SliM-LLM's GPTQ result*: the codes
of the sweep are kept (so GPTQ's error compensation stays intact) and each row and
group's range is tuned. A group's dequantized values ``s (q - z)`` are the affine map
``lo + q (hi - lo) / (2^b - 1)`` of its codes, so tuning the clipping range ``[lo, hi]``
is tuning, per row and group,

    a = s0 exp(gamma_a),   b = -s0 z0 + s0 gamma_b,   w' = a q + b        (gamma from 0)

(``s0``, ``z0`` the sweep's scale and zero, with SQC; 1-bit groups the same). The
parameters of all linear layers of a block are trained together with optax AdamW
(weight decay 0) to minimise ``|| block_float(X) - block_quant(X) ||^2`` on the block's
calibration inputs ``X`` (computed by the already quantized earlier blocks); the
stored format has scale ``a`` and zero ``-b / a`` (a real number, in the scale dtype).

Why not the reference's recipe: it trains LWC from RTN of the float weights
(``hi = sigmoid(gamma) max w``, ``gamma0 = 4``, straight-through rounding, 50 epochs
of 128 steps per block). On SmolLM2 at 2 bits, RTN's start is more than twice
SliM-LLM's block error and a few hundred steps did not close the gap; re-rounding
GPTQ's compensated weights with tuned ranges did not either (it breaks the
compensation). Frozen codes keep training a smooth least-squares problem that
starts exactly at SliM-LLM's solution.

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
from jaxquant.models import transformer
from jaxquant.models.config import ModelConfig
from jaxquant.params import flatten, unflatten


def _affine(gamma: jax.Array, s0: jax.Array, z0: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row and group ``(a, b)`` of ``w' = a q + b`` (``gamma = 0``: the sweep's)."""
    return s0 * jnp.exp(gamma[0]), -s0 * z0 + s0 * gamma[1]


def _expand(x: jax.Array, group_size: int, k: int) -> jax.Array:
    return jnp.repeat(x, group_size, axis=1, total_repeat_length=x.shape[1] * group_size)[:, :k]


def fake_quant(codes: jax.Array, gamma: jax.Array, s0: jax.Array, z0: jax.Array,
               inv_perm: jax.Array, group_size: int) -> jax.Array:
    """The tuned quantized weight in the original column order (differentiable).

    Args:
      codes: ``[n, k]`` the sweep's codes in processing order.
      gamma: ``[2, n, groups]`` range parameters; 0 reproduces SliM-LLM.
      s0, z0: ``[n, groups]`` the sweep's scales and zeros.
      inv_perm: Inverse of the processing order.
      group_size: Columns per group.
    """
    k = codes.shape[1]
    a, b = _affine(gamma, s0, z0)
    w = _expand(a, group_size, k) * codes.astype(jnp.float32) + _expand(b, group_size, k)
    return w[:, inv_perm]


def to_format(state: dict[str, Any], gamma: jax.Array, *, scale_dtype: Any
              ) -> QuantizedWeight:
    """The tuned ranges as a mixed format: scale ``a`` and zero ``-b / a``."""
    a, b = _affine(gamma, state["scales"], state["zeros"])
    a = jnp.maximum(jnp.abs(a), jnp.finfo(scale_dtype).tiny) * jnp.where(a < 0, -1.0, 1.0)
    scale = a.astype(scale_dtype).astype(jnp.float32)
    zero = -b / scale
    return mixed_from_groups(state["codes"], scale, zero, np.asarray(state["group_bits"]),
                             jnp.asarray(state["perm"]), group_size=state["group_size"],
                             symmetric=False, scale_dtype=scale_dtype)


def _fq_block(float_flat: dict[str, Any], consts: dict[str, Any], gammas: dict[str, Any],
              group_size: int, dtype: Any = jnp.float32) -> Any:
    flat = {p: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v
            for p, v in float_flat.items()}
    for p, (codes, s0, z0, inv) in consts.items():
        flat[p] = fake_quant(codes, gammas[p], s0, z0, inv, group_size).astype(dtype)
    return unflatten(flat)


@functools.partial(jax.jit, static_argnames=("cfg", "layer", "group_size", "lr", "dtype"))
def _step(gammas: Any, opt_state: Any, float_flat: Any, consts: Any, x: jax.Array,
          target: jax.Array, *, cfg: ModelConfig, layer: int, group_size: int, lr: float,
          dtype: Any = jnp.float32):
    opt = optax.adamw(lr, weight_decay=0.0)

    def loss_fn(g: Any) -> jax.Array:
        block = _fq_block(float_flat, consts, g, group_size, dtype)
        y = transformer.apply_block(block, cfg, layer, x.astype(dtype))
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
                learning_rate: float, scale_dtype: Any = jnp.bfloat16,
                compute_dtype: Any = jnp.float32) -> tuple[Any, dict[str, Any]]:
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
      compute_dtype: Dtype of the training forward and backward pass (``bfloat16``
        is several times faster on accelerators; the loss, the parameters and the
        final keep-or-not comparison stay float32).

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
    consts = {p: (states[p]["codes"], states[p]["scales"], states[p]["zeros"],
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
                                         lr=learning_rate,
                                         dtype=jnp.dtype(compute_dtype))
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
