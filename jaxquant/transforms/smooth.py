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

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.calibration import apply_block, collect_inputs
from jaxquant.models import transformer
from jaxquant.models.config import ModelConfig
from jaxquant.params import flatten, unflatten
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
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a = jnp.asarray(act_absmax, jnp.float32)
    w = jnp.max(jnp.stack([jnp.max(jnp.abs(x.astype(jnp.float32)), axis=0) for x in weights]),
                axis=0)
    s = jnp.power(a, alpha) / jnp.power(jnp.maximum(w, 1e-30), 1.0 - alpha)
    dead = (a <= 0) | (w <= 0) | ~jnp.isfinite(s)
    return jnp.where(dead, 1.0, jnp.maximum(s, _MIN_SCALE))


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
    flat = flatten(params)
    xs = [transformer.embed(params, cfg, jnp.asarray(windows[i:i + batch_size]))
          for i in range(0, len(windows), batch_size)]
    out: dict[str, jax.Array] = {}
    for layer in range(cfg.num_layers):
        prefix = f"layers.{layer}."
        block = unflatten({p[len(prefix):]: v for p, v in flat.items() if p.startswith(prefix)})
        paths = sorted(p[len(prefix):] for p in flat
                       if p.startswith(prefix) and p.endswith("proj.weight"))
        stats = collect_inputs(block, cfg, layer, xs, paths)
        out.update({prefix + p.removesuffix(".weight"): st.absmax for p, st in stats.items()})
        xs = [apply_block(block, cfg, layer, x) for x in xs]
    return out


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
    out = dict(flat)
    for i in range(cfg.num_layers):
        pre = f"layers.{i}."
        if norms:
            for norm, readers in READERS.items():
                ws = [flat[f"{pre}{r}.weight"] for r in readers]
                key = f"{pre}{readers[0]}"
                if key not in absmax:
                    raise TransformError(f"no activation statistics for {key}")
                s = smooth_scales(absmax[key], ws, alpha)
                g = f"{pre}{norm}.weight"
                out[g] = (flat[g].astype(jnp.float32) / s).astype(flat[g].dtype)
                for r in readers:
                    out[f"{pre}{r}.weight"] = scale_columns(flat[f"{pre}{r}.weight"], s)
        if down_proj:
            down, up = f"{pre}mlp.down_proj", f"{pre}mlp.up_proj"
            if down not in absmax:
                raise TransformError(f"no activation statistics for {down}")
            # Read from ``out``: up_proj's columns may already be smoothed (its input).
            s = smooth_scales(absmax[down], [out[down + ".weight"]], alpha)
            out[down + ".weight"] = scale_columns(out[down + ".weight"], s)
            w = out[up + ".weight"]
            out[up + ".weight"] = (w.astype(jnp.float32) / s[:, None]).astype(w.dtype)
            if up + ".bias" in out:
                b = out[up + ".bias"]
                out[up + ".bias"] = (b.astype(jnp.float32) / s).astype(b.dtype)
    return unflatten(out)
