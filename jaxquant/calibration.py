"""Sequential (layer-by-layer) calibration, as GPTQ does it.

Block by block: the inputs of block ``i`` are computed by the *already quantized*
blocks ``0..i-1``; for every linear layer of the block the Hessian of its
reconstruction loss, ``H = 2 X^T X / n`` over all calibration tokens (float32,
``precision=HIGHEST``), is accumulated over batches of windows; the block's layers
are quantized with their method; and the quantized block computes the next block's
inputs. Memory: one block's parameters plus the current activations of the
calibration windows (``[windows, seq_len, hidden]``), never the whole model's.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant import ops
from jaxquant.models import transformer
from jaxquant.models.config import ModelConfig
from jaxquant.params import flatten, unflatten


@dataclasses.dataclass(frozen=True, kw_only=True)
class Calibration:
    """Calibration data for methods that need it (GPTQ and later)."""

    config: ModelConfig  # the model the windows are fed through
    windows: np.ndarray  # int32 token windows [n, seq_len]
    batch_size: int = 8  # windows per forward step
    progress: bool = True  # show a progress bar per block


@functools.partial(jax.jit, static_argnums=(1, 2))
def _block_grams(block_params: Any, cfg: ModelConfig, layer: int, x: jax.Array) -> Any:
    with ops.capture_inputs():
        block = transformer.bind_block(block_params, cfg, layer)
        b, t, _ = x.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

        def run(blk: Any, x: jax.Array, positions: jax.Array) -> jax.Array:
            return blk(x, positions, None, None)[0]

        if hasattr(nnx, "capture"):  # flax >= 0.12.8: sow only inside nnx.capture
            _, grams = nnx.capture(run, nnx.Intermediate)(block, x, positions)
        else:
            run(block, x, positions)
            grams = nnx.state(block, nnx.Intermediate)
    return nnx.to_pure_dict(grams)


_apply_block = jax.jit(transformer.apply_block, static_argnums=(1, 2))
_embed = jax.jit(transformer.embed, static_argnums=1)


def _gram_paths(grams: Any) -> dict[str, jax.Array]:
    """``{"self_attn.q_proj.input_gram": (g,)}`` -> ``{"self_attn.q_proj.weight": g}``."""
    out = {}
    for path, value in flatten(grams).items():
        head, _, _ = path.partition(".input_gram")
        out[head + ".weight"] = value
    return out


def sequential_quantize(params: Any, calibration: Calibration,
                        quantize_layer: Any, specs: dict[str, Any]) -> tuple[Any, dict]:
    """Quantizes the block layers in ``specs`` block by block with calibration Hessians.

    Args:
      params: Float params.
      calibration: Windows and config.
      quantize_layer: ``fn(path, weight, spec, hessian) -> QuantizedWeight``.
      specs: Parameter path -> spec, for the layers to quantize.

    Returns:
      ``(qparams, stats)`` with per-layer calibration statistics (tokens, seconds).
    """
    from tqdm.auto import tqdm

    cfg = calibration.config
    windows = np.asarray(calibration.windows, np.int32)
    bs = max(1, calibration.batch_size)
    flat = dict(flatten(params))
    xs = [_embed(params, cfg, jnp.asarray(windows[i:i + bs]))
          for i in range(0, len(windows), bs)]
    tokens = int(windows.size)
    stats: dict[str, Any] = {}
    bar = tqdm(range(cfg.num_layers), desc="calibrate", unit="block",
               disable=not calibration.progress, leave=False)
    for layer in bar:
        prefix = f"layers.{layer}."
        block_params = params["layers"][layer]
        wanted = {p[len(prefix):]: s for p, s in specs.items() if p.startswith(prefix)}
        if wanted:
            hessians: dict[str, jax.Array] = {}
            for x in xs:
                for path, g in _gram_paths(_block_grams(block_params, cfg, layer, x)).items():
                    if path in wanted:
                        g = g[0] if isinstance(g, (tuple, list)) else g
                        hessians[path] = hessians.get(path, 0.0) + g
            qblock = dict(flatten(block_params))
            for path, spec in wanted.items():
                start = time.perf_counter()
                h = hessians[path] * (2.0 / tokens)
                qblock[path] = quantize_layer(prefix + path, qblock[path], spec, h)
                flat[prefix + path] = qblock[path]
                stats[prefix + path] = {"seconds": time.perf_counter() - start}
            block_params = unflatten(qblock)
        xs = [_apply_block(block_params, cfg, layer, x) for x in xs]
    bar.close()
    return unflatten(flat), {"tokens": tokens, "layers": stats}
