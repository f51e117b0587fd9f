"""SmoothQuant scaling folded into the weights (params -> params).

SmoothQuant (Xiao et al., 2023, arXiv 2211.10438, Eq. 4) moves the quantization
difficulty of a linear layer's input ``X`` into its weight: with per-input-channel
scales ``s_j = max|X_j|^α / max|W_j|^(1 - α)``, ``X W^T = (X diag(s)^-1)(W diag(s))^T``,
and the division is folded into whatever produces ``X``:

* after an RMSNorm (q/k/v after ``input_layernorm``, gate/up after
  ``post_attention_layernorm``): ``γ ← γ / s``, every reader ``W ← W diag(s)`` (one
  ``s`` for all readers of the norm, from the largest weight over them);
* on the down_proj input (the smooth-then-rotate recipe, Czakó et al., SACI 2025):
  ``h = act(gate) ⊙ up`` is linear in the up_proj output, so up_proj's rows (and bias)
  ``← / s`` and down_proj ``W ← W diag(s)``.

``max|X_j|`` comes from calibration (:func:`activation_absmax`). The float model's
function is unchanged (up to rounding) for any positive scales.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.algorithms.act_quant import layer_error
from jaxquant.calibration import float_block_inputs
from jaxquant.models.config import ModelConfig
from jaxquant.params import flatten, unflatten
from jaxquant.transforms.hadamard import hadamard_transform
from jaxquant.transforms.rotation import (
    READERS,
    TransformError,
    check_rotatable,
    scale_columns,
)

Params = dict[str, Any]
#: Smallest scale: channels that never fire are not blown up.
_MIN_SCALE = 1e-5


def smooth_scales(act_absmax: jax.Array, weights: list[jax.Array], alpha: float) -> jax.Array:
    """``s_j = max|X_j|^α / max_i |W_ij|^(1 - α)`` over every reader ``W [out, in]``.

    Args:
      act_absmax: ``[in]`` largest input magnitude per channel (calibration).
      weights: The layers reading that input (their largest column entry is used).
      alpha: Migration strength in ``[0, 1]`` (0.5: SmoothQuant's default).

    Returns:
      ``[in]`` float32 scales, at least ``1e-5``; channels without activity or weight
      get 1.
    """
    if isinstance(alpha, (int, float)) and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a = jnp.asarray(act_absmax, jnp.float32)
    w = jnp.max(jnp.stack([jnp.max(jnp.abs(x.astype(jnp.float32)), axis=0) for x in weights]),
                axis=0)
    s = jnp.power(a, alpha) / jnp.power(jnp.maximum(w, 1e-30), 1.0 - alpha)
    dead = (a <= 0) | (w <= 0) | ~jnp.isfinite(s)
    return jnp.where(dead, 1.0, jnp.maximum(s, _MIN_SCALE))


#: Smoothing sites: where ``1 / s`` is folded -> the layers reading the smoothed input.
SITES = {**{norm: readers for norm, readers in READERS.items()},
         "mlp.down_proj": ("mlp.down_proj",)}
#: The alpha grid of the per-layer search.
ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(21))


def _block_walk(params: Params, cfg: ModelConfig, windows: np.ndarray, batch_size: int,
                sample_tokens: int):
    """Yields ``(layer, {layer path: LayerInputs})`` for every block of the float model."""
    for layer, _, stats in float_block_inputs(params, cfg, windows, batch_size=batch_size,
                                              sample_tokens=sample_tokens):
        for st in stats.values():
            if not bool(jnp.all(jnp.isfinite(st.absmax))):
                raise TransformError(f"non-finite activations in block {layer}: check the "
                                     "weights and calibration text")
        yield layer, {f"layers.{layer}.{p.removesuffix('.weight')}": st
                      for p, st in stats.items()}


def activation_absmax(params: Params, cfg: ModelConfig, windows: np.ndarray, *,
                      batch_size: int = 8) -> dict[str, jax.Array]:
    """``max_t |X_tj|`` of every block linear layer's input, on the float model.

    Args:
      params: Float parameters.
      cfg: Their model config.
      windows: ``[n, seq]`` int token windows.
      batch_size: Windows per forward pass.

    Returns:
      Flat layer path (``layers.3.mlp.down_proj``) -> ``[in]`` float32 maxima.
    """
    out: dict[str, jax.Array] = {}
    for _, stats in _block_walk(params, cfg, windows, batch_size, 0):
        out.update({p: st.absmax for p, st in stats.items()})
    return out


@functools.partial(jax.jit, static_argnames=("act_bits", "weight_bits", "rotate"))
def alpha_errors(x: jax.Array, absmax: jax.Array, weights: tuple[jax.Array, ...],
                 alphas: jax.Array, *, act_bits: int, weight_bits: int, rotate: bool
                 ) -> jax.Array:
    """Layer error ``||X W^T - Q(X / s) Q(W s)^T||_F^2`` without smoothing and per alpha.

    The smoothed input ``X diag(s)^-1`` and weights ``W diag(s)`` (all readers stacked)
    are quantized per row by min-max RTN (:func:`~jaxquant.algorithms.act_quant.
    layer_error`, the error of Czakó et al., SACI 2025). With ``rotate`` both are first
    rotated by the normalized Hadamard transform over the channels, as the online
    Hadamard of the smooth-then-rotate recipe does on the down_proj input.

    Args:
      x: Sampled input rows ``[m, in]``.
      absmax: ``[in]`` input maxima over all calibration tokens.
      weights: The layers reading ``x``.
      alphas: ``[n]`` candidate migration strengths.
      act_bits: Activation bits of the error.
      weight_bits: Weight bits of the error.
      rotate: Rotate after smoothing.

    Returns:
      ``[n + 1]`` float32 errors: entry 0 without smoothing (``s = 1``; alpha 0 is not
      that: it gives ``s = 1 / max|W_j|``), then one per alpha.
    """
    w = jnp.concatenate([a.astype(jnp.float32) for a in weights], axis=0)

    def err(s: jax.Array) -> jax.Array:
        xs, ws = x / s, w * s
        if rotate:
            xs, ws = hadamard_transform(xs), hadamard_transform(ws)
        return layer_error(xs, ws, act_bits, weight_bits)

    errs = jax.lax.map(lambda a: err(smooth_scales(absmax, [w], a)), alphas)
    return jnp.concatenate([err(jnp.ones_like(absmax))[None], errs])


def smoothing_scales(params: Params, cfg: ModelConfig, windows: np.ndarray, *,
                     alpha: float | None = 0.5, sites: tuple[str, ...] = tuple(SITES),
                     rotate: bool = False, act_bits: int = 8, weight_bits: int = 8,
                     sample_tokens: int = 2048, batch_size: int = 8
                     ) -> tuple[dict[str, jax.Array], dict[str, float]]:
    """SmoothQuant scales of every site of every block, alpha fixed or searched per site.

    Args:
      params: Float parameters.
      cfg: Their model config.
      windows: ``[n, seq]`` calibration token windows.
      alpha: Migration strength in ``[0, 1]``; None: for each site the alpha of
        :data:`ALPHA_GRID` that minimizes :func:`alpha_errors` on the site's sampled
        input, or no smoothing at all where that is better on the sample.
      sites: Keys of :data:`SITES` to smooth.
      rotate: The search measures the error after a Hadamard rotation (smooth-then-rotate).
      act_bits: Activation bits of the search's error.
      weight_bits: Weight bits of the search's error.
      sample_tokens: Input rows sampled per layer for the search.
      batch_size: Windows per forward pass.

    Returns:
      ``(scales, alphas)``: ``layers.{i}.{site}`` -> ``[in]`` scales, and the alpha used
      (None: the site is left unsmoothed).
    """
    unknown = set(sites) - set(SITES)
    if unknown:
        raise TransformError(f"unknown smoothing sites {sorted(unknown)} (known: {list(SITES)})")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise TransformError(f"alpha must be in [0, 1], got {alpha}")
    flat = flatten(params)
    check_rotatable(flat, cfg)
    grid = jnp.asarray(ALPHA_GRID, jnp.float32)
    scales: dict[str, jax.Array] = {}
    alphas: dict[str, float | None] = {}
    for layer, stats in _block_walk(params, cfg, windows, batch_size,
                                    sample_tokens if alpha is None else 0):
        pre = f"layers.{layer}."
        for site in sites:
            readers = SITES[site]
            st = stats[pre + readers[0]]
            ws = [flat[f"{pre}{r}.weight"] for r in readers]
            a = alpha
            if a is None:
                errs = alpha_errors(st.sample, st.absmax, tuple(ws), grid, act_bits=act_bits,
                                    weight_bits=weight_bits, rotate=rotate)
                best = int(jnp.argmin(errs))
                alphas[pre + site] = None if best == 0 else float(ALPHA_GRID[best - 1])
                if best == 0:
                    continue
                a = ALPHA_GRID[best - 1]
            scales[pre + site] = smooth_scales(st.absmax, ws, a)
            alphas[pre + site] = a
    return scales, alphas


def apply_smoothing(params: Params, cfg: ModelConfig, scales: dict[str, jax.Array]
                    ) -> Params:
    """Folds per-site scales (:func:`smoothing_scales`) into the weights.

    ``layers.{i}.{norm}``: the norm ``γ ← γ / s`` and its readers ``W ← W diag(s)``;
    ``layers.{i}.mlp.down_proj``: up_proj rows and bias ``← / s``, down_proj
    ``W ← W diag(s)``. The float function is unchanged.
    """
    flat = flatten(params)
    check_rotatable(flat, cfg)
    out = dict(flat)
    for key, s in scales.items():
        m = re.fullmatch(r"(layers\.\d+\.)(.+)", key)
        pre, site = (m.group(1), m.group(2)) if m else ("", key)
        if site not in SITES or not m:
            raise TransformError(f"unknown smoothing site {key}")
        for r in SITES[site]:
            w = f"{pre}{r}.weight"
            out[w] = scale_columns(out[w], s)
        if site == "mlp.down_proj":
            up = f"{pre}mlp.up_proj"
            w = out[up + ".weight"]
            out[up + ".weight"] = (w.astype(jnp.float32) / s[:, None]).astype(w.dtype)
            if up + ".bias" in out:
                b = out[up + ".bias"]
                out[up + ".bias"] = (b.astype(jnp.float32) / s).astype(b.dtype)
        else:
            g = f"{pre}{site}.weight"
            out[g] = (out[g].astype(jnp.float32) / s).astype(out[g].dtype)
    return unflatten(out)


def smooth(params: Params, cfg: ModelConfig, absmax: dict[str, jax.Array], *,
           alpha: float = 0.5, norms: bool = True, down_proj: bool = True) -> Params:
    """Folds SmoothQuant scales into the weights (see the module docstring).

    Args:
      params: Float parameters.
      cfg: Their model config (pre-norm families, as for rotation).
      absmax: Per-layer input maxima (:func:`activation_absmax`).
      alpha: Migration strength.
      norms: Smooth the inputs of q/k/v and gate/up (into the norms).
      down_proj: Smooth the down_proj input (into up_proj).

    Returns:
      Parameters computing the same function, with smoothed layer inputs.

    Raises:
      TransformError: Unsupported family or quantized parameters.
    """
    flat = flatten(params)
    check_rotatable(flat, cfg)
    sites = [*(READERS if norms else ()), *(["mlp.down_proj"] if down_proj else [])]
    scales = {}
    for i in range(cfg.num_layers):
        for site in sites:
            key = f"layers.{i}.{SITES[site][0]}"
            if key not in absmax:
                raise TransformError(f"no activation statistics for {key}")
            ws = [flat[f"layers.{i}.{r}.weight"] for r in SITES[site]]
            scales[f"layers.{i}.{site}"] = smooth_scales(absmax[key], ws, alpha)
    return apply_smoothing(params, cfg, scales)
