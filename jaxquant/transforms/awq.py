"""AWQ scales (and clipping) folded into the float weights (params -> params).

AWQ (Lin et al., 2024, arXiv 2306.00978; :mod:`jaxquant.algorithms.awq` for the
search) runs block by block on the float model. For each block, the inputs of its
linear layers are captured once (on the unmodified block), and for every group of
layers reading one input (the reference's ``get_layers_for_scaling``) the scales
``s = s_X^α*`` are searched and folded:

* q/k/v read ``input_layernorm``: ``γ ← γ / s``, ``W ← W diag(s)``;
* o_proj reads the attention output, linear in v_proj's output: v_proj's rows (and
  bias) ``← / s``, ``W_o ← W_o diag(s)``; only when v_proj's output is o_proj's input
  channel for channel (``num_heads == num_kv_heads``), as in the reference;
* gate/up read ``post_attention_layernorm``: ``γ ← γ / s``, ``W ← W diag(s)``;
* down_proj reads ``act(gate) ⊙ up``, linear in up_proj's output: up_proj's rows (and
  bias) ``← / s``, ``W_down ← W_down diag(s)``.

The searches are independent: each group's readers are touched only by its own scales
(v_proj and up_proj get their columns from one group and their rows from another), and
every fold preserves the block's function, so each group's input is the captured one
until its own scales divide it. Then, with ``clip``, AWQ's range search runs on the
scaled weights with the scaled inputs ``X / s`` (q_proj and k_proj are skipped, as in
the reference) and the chosen clipping is applied to the float weights.

The result is a *float* model (the same function up to rounding without ``clip``),
to be quantized with RTN or GPTQ at the same ``bits`` / ``group_size``. Each block's
output, the next block's input, is computed by the unmodified float block.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.algorithms.awq import apply_clip, awq_clip_search, awq_scale_search
from jaxquant.calibration import float_block_inputs
from jaxquant.formats.base import is_quantized
from jaxquant.models.config import ModelConfig
from jaxquant.params import flatten, unflatten
from jaxquant.transforms.rotation import (
    READERS,
    TransformError,
    check_rotatable,
    scale_columns,
)

Params = dict[str, Any]
#: Layers whose range AWQ does not clip (their outputs meet in the attention scores).
NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")
#: ``(previous op, reader)``: the reader's input is linear in the previous op's output.
_ROW_FOLDS = (("self_attn.v_proj", "self_attn.o_proj"), ("mlp.up_proj", "mlp.down_proj"))


def _divide_rows(out: dict[str, Any], layer: str, s: jax.Array) -> None:
    """``W ← diag(s)^-1 W`` and ``b ← b / s`` of ``layer`` in ``out`` (in place)."""
    w = out[layer + ".weight"]
    out[layer + ".weight"] = (w.astype(jnp.float32) / s[:, None]).astype(w.dtype)
    if layer + ".bias" in out:
        b = out[layer + ".bias"]
        out[layer + ".bias"] = (b.astype(jnp.float32) / s).astype(b.dtype)


def awq(params: Params, cfg: ModelConfig, windows: np.ndarray, *, bits: int,
        group_size: int | None, symmetric: bool, n_grid: int = 20, clip: bool = True,
        batch_size: int = 8, sample_tokens: int = 4096, progress: bool = False,
        scale_dtype: Any = jnp.bfloat16) -> Params:
    """AWQ's activation-aware scales (and clipping) folded into float parameters.

    Args:
      params: Float parameters.
      cfg: Their model config (pre-norm families: llama, mistral, qwen2, qwen3).
      windows: ``[n, seq]`` int calibration token windows.
      bits: Code width the weights will be quantized to.
      group_size: Input channels per group of that quantization; ``None`` for per
        output channel.
      symmetric: Symmetric quantization range.
      n_grid: Grid points of the scale exponent (and of the clip ratio).
      clip: Also search and apply AWQ's weight clipping (all layers but q/k).
      batch_size: Windows per forward pass.
      sample_tokens: Input rows sampled per layer for the searches.
      progress: Show a progress bar over the blocks.
      scale_dtype: Storage dtype of the later quantizer's scales (the search quantizes
        exactly as that quantizer will).

    Returns:
      Float parameters with the scales (and clipping) folded in; without ``clip`` they
      compute the same function as ``params`` up to rounding.

    Raises:
      TransformError: Unsupported family, quantized parameters, empty calibration, or
        non-finite activations.
    """
    from tqdm.auto import tqdm

    flat = flatten(params)
    for path, leaf in flat.items():
        if is_quantized(leaf):
            raise TransformError(f"{path} is already quantized: AWQ folds its scales into "
                                 "float parameters, so it runs before quantizing")
    check_rotatable(flat, cfg)  # pre-norm families, float leaves
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.size == 0:
        raise TransformError(f"AWQ needs [n, seq] calibration windows, got shape "
                             f"{windows.shape}")
    if sample_tokens < 1:
        raise TransformError(f"sample_tokens must be positive, got {sample_tokens}")
    bs = max(1, batch_size)
    kw = dict(bits=bits, group_size=group_size, symmetric=symmetric, n_grid=n_grid,
              scale_dtype=scale_dtype)
    out = dict(flat)
    walk = float_block_inputs(params, cfg, windows, batch_size=bs, sample_tokens=sample_tokens)
    bar = tqdm(walk, total=cfg.num_layers, desc="awq", unit="block", disable=not progress,
               leave=False)
    for layer, _, inputs in bar:
        pre = f"layers.{layer}."
        paths = sorted(inputs)
        samples: dict[str, jax.Array] = {}
        for p in paths:
            x = inputs[p].sample
            if x is None or not bool(jnp.all(jnp.isfinite(x))):
                raise TransformError(f"non-finite activations at the input of {pre}"
                                     f"{p.removesuffix('.weight')}: AWQ needs a model whose "
                                     "float forward pass is finite on the calibration windows")
            samples[p.removesuffix(".weight")] = x
        # Scales of each group of readers, all from the captured (unscaled) inputs.
        scales: dict[str, jax.Array] = {}  # reader -> the scales its input is divided by
        alphas: list[str] = []
        for norm, readers in READERS.items():
            s, alpha, _ = awq_scale_search(
                samples[readers[0]], [flat[f"{pre}{r}.weight"] for r in readers], **kw)
            g = f"{pre}{norm}.weight"
            out[g] = (flat[g].astype(jnp.float32) / s).astype(flat[g].dtype)
            for r in readers:
                out[f"{pre}{r}.weight"] = scale_columns(out[f"{pre}{r}.weight"], s)
                scales[r] = s
            alphas.append(f"{alpha:.2f}")
        for prev, reader in _ROW_FOLDS:
            w = flat[f"{pre}{reader}.weight"]
            if out[f"{pre}{prev}.weight"].shape[0] != w.shape[1]:
                continue  # grouped-query attention: v_proj's rows are shared by heads
            s, alpha, _ = awq_scale_search(samples[reader], [w], **kw)
            _divide_rows(out, pre + prev, s)
            out[f"{pre}{reader}.weight"] = scale_columns(out[f"{pre}{reader}.weight"], s)
            scales[reader] = s
            alphas.append(f"{alpha:.2f}")
        if clip:
            for p in paths:
                r = p.removesuffix(".weight")
                if r in NO_CLIP:
                    continue
                x = samples[r] / scales[r] if r in scales else samples[r]
                w = out[pre + p]
                max_abs = awq_clip_search(x, w, bits=bits, group_size=group_size,
                                          symmetric=symmetric, n_grid=n_grid,
                                          scale_dtype=scale_dtype)
                out[pre + p] = apply_clip(w, max_abs, group_size)
        bar.set_postfix_str("alpha " + " ".join(alphas))
    bar.close()
    return unflatten(out)
