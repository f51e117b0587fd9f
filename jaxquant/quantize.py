"""``quantize(params, recipe) -> qparams``: apply a recipe to a parameter pytree.

Pure: returns a new pytree in which every parameter the recipe selects is replaced
by a quantized format (:mod:`jaxquant.formats`) and every other leaf is shared with
the input. RTN needs no calibration data; calibration-based methods (GPTQ,
SliM-LLM, CLAQ) plug into the same call through ``calibration``.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.algorithms.claq import (
    BudgetError,
    ClaqConfig,
    claq,
    code_bits_for_total,
    reserve_counts,
)
from jaxquant.algorithms.gptq import HessianError, gptq
from jaxquant.algorithms.rtn import rtn
from jaxquant.algorithms.slim import slim
from jaxquant.algorithms.slim_plus import train_block
from jaxquant.calibration import BlockFn, Calibration, LayerInputs, sequential_quantize
from jaxquant.formats.base import QuantizedWeight, is_quantized, tree_nbytes
from jaxquant.params import flatten, unflatten
from jaxquant.recipes import CALIBRATED, QuantSpec, Recipe, RecipeError

Params = dict[str, Any]
#: method name -> fn(weight, spec, inputs) -> QuantizedWeight; ``inputs`` is the layer's
#: :class:`LayerInputs` for calibrated methods and None otherwise.
QuantizeFn = Callable[[jax.Array, QuantSpec, Any], QuantizedWeight]


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "symmetric", "scale_dtype"))
def _rtn_jit(w, *, bits, group_size, symmetric, scale_dtype):
    return rtn(w, bits=bits, group_size=group_size, symmetric=symmetric,
               scale_dtype=scale_dtype)


def _rtn(w: jax.Array, spec: QuantSpec, inputs: Any) -> QuantizedWeight:
    del inputs
    return _rtn_jit(w, bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric,
                    scale_dtype=jnp.dtype(spec.scale_dtype))


def _gptq(w: jax.Array, spec: QuantSpec, inputs: LayerInputs) -> QuantizedWeight:
    return gptq(w, inputs.hessian, bits=spec.bits, group_size=spec.group_size,
                symmetric=spec.symmetric, scale_dtype=jnp.dtype(spec.scale_dtype),
                block_size=spec.block_size, damp=spec.damp, act_order=spec.act_order,
                static_groups=spec.static_groups, mse=spec.mse)


def _claq(w: jax.Array, spec: QuantSpec, inputs: LayerInputs) -> QuantizedWeight:
    cfg = ClaqConfig(bits=spec.bits, adaptive=spec.adaptive, outlier_ratio=spec.outlier_ratio,
                     kmeans=spec.kmeans, total_bits=spec.total_bits,
                     act_order=spec.act_order, damp=spec.damp,
                     block_size=spec.block_size, codebook_dtype=_codebook_dtype(spec))
    return claq(w, inputs.hessian, cfg)


def _codebook_dtype(spec: QuantSpec) -> Any:
    """CLAQ's centroid dtype: the spec's scale dtype, float16 for bfloat16 (centroids
    need its mantissa, not its range)."""
    return jnp.dtype("float16" if spec.scale_dtype == "bfloat16" else spec.scale_dtype)


def _resolve_total_bits(specs: dict[str, QuantSpec], flat: dict[str, Any]
                        ) -> dict[str, QuantSpec]:
    """CLAQ specs with ``total_bits``: the one code budget that meets the total over all
    the weights the spec selects (:func:`~jaxquant.algorithms.claq.code_bits_for_total`),
    so that a model, not each layer, averages the asked bits per weight."""
    groups: dict[QuantSpec, list[str]] = {}
    for path, spec in specs.items():
        if spec.method == "claq" and spec.total_bits:
            groups.setdefault(spec, []).append(path)
    out = dict(specs)
    for spec, paths in groups.items():
        layers = []
        for path in paths:
            n, k = flat[path].shape
            reserved = reserve_counts(np.zeros(k, np.int32), n, spec.outlier_ratio)
            layers.append((int(n), int(k), int(reserved.sum())))
        try:
            code = code_bits_for_total(layers, spec.bits, codebook_dtype=_codebook_dtype(spec))
        except BudgetError as e:
            raise RecipeError(f"{paths[0]} and {len(paths) - 1} more: {e}") from e
        resolved = dataclasses.replace(spec, bits=code, total_bits=False)
        out.update(dict.fromkeys(paths, resolved))
    return out


def _slim(w: jax.Array, spec: QuantSpec, inputs: LayerInputs) -> QuantizedWeight:
    return _slim_state(w, spec, inputs)[0]


def _slim_state(w: jax.Array, spec: QuantSpec, inputs: LayerInputs) -> Any:
    q, _, state = slim(w, inputs.hessian, bits=spec.bits, group_size=spec.group_size,
                       inputs=inputs.sample, salience_weight=spec.salience_weight,
                       act_order=spec.act_order, damp=spec.damp,
                       scale_dtype=jnp.dtype(spec.scale_dtype), return_state=True)
    return q, state


def _slim_plus_block(cfg: Any, layer: int, float_block: Any, qblock: Any, xs: Any,
                     specs: dict[str, QuantSpec], states: dict[str, Any]
                     ) -> tuple[Any, dict[str, Any]]:
    spec = next(iter(specs.values()))
    return train_block(cfg, layer, float_block, qblock, xs, states, epochs=spec.lwc_epochs,
                       learning_rate=spec.lwc_lr, scale_dtype=jnp.dtype(spec.scale_dtype),
                       compute_dtype=jnp.dtype(spec.lwc_dtype))


#: Calibration input rows SliM-LLM's KL search uses per layer.
SBA_TOKENS = 4096

_METHODS: dict[str, QuantizeFn] = {"rtn": _rtn, "gptq": _gptq, "slim": _slim,
                                 "slim+": _slim_state, "claq": _claq}


#: Block-level steps after a block's layers are quantized (SliM-LLM+), per method.
_BLOCK_STEPS: dict[str, BlockFn] = {"slim+": _slim_plus_block}
#: Input rows per layer that a method needs (SliM-LLM scores bit maps on real outputs).
_SAMPLE_TOKENS: dict[str, int] = {"slim": SBA_TOKENS, "slim+": SBA_TOKENS}


def register_method(name: str, fn: QuantizeFn, *, block_step: BlockFn | None = None,
                    sample_tokens: int = 0) -> None:
    """Makes ``QuantSpec(method=name)`` call ``fn(weight, spec, inputs)``.

    Args:
      name: Method name.
      fn: Per-layer quantizer.
      block_step: Optional ``fn(layer, float_block, qblock, xs, specs) -> qblock`` run
        after each block's layers are quantized (calibrated methods only).
      sample_tokens: Rows of each layer's inputs the method needs in
        ``LayerInputs.sample``.
    """
    _METHODS[name] = fn
    if block_step is not None:
        _BLOCK_STEPS[name] = block_step
    if sample_tokens:
        _SAMPLE_TOKENS[name] = sample_tokens


def _calibrated_layer(path: str, w: Any, spec: QuantSpec, inputs: LayerInputs) -> Any:
    """Runs a calibrated method on one layer, handling degenerate calibration inputs.

    * Inputs with NaN/Inf (the model overflowed on the calibration text): error.
    * Inputs that are all zero carry no information about the layer: it falls back to
      RTN with the same bits and groups, with a warning (the run goes on).
    * A Hessian that stays non-positive-definite after every damping increase: error
      naming the layer (nothing is written).
    """
    h = inputs.hessian
    if not bool(jnp.isfinite(h).all()):
        raise RecipeError(f"{path}: its calibration inputs contain NaN or Inf (the model "
                          "overflowed on the calibration text; calibrate in float32)")
    if not bool(jnp.any(jnp.diag(h) > 0)):
        warnings.warn(f"{path}: all calibration inputs of this layer are zero; it is "
                      "quantized with RTN instead", stacklevel=2)
        return _rtn(w, dataclasses.replace(spec, method="rtn", act_order=False), None)
    try:
        return _METHODS[spec.method](w, spec, inputs)
    except (HessianError, BudgetError) as e:
        raise RecipeError(f"{path}: {e}") from e


def check_weight(path: str, w: Any, spec: QuantSpec) -> None:
    """Raises RecipeError if ``w`` cannot be quantized with ``spec`` (names the tensor)."""
    if is_quantized(w):
        raise RecipeError(f"{path} is already quantized")
    if getattr(w, "ndim", 0) != 2:
        raise RecipeError(f"{path}: only 2-D weights can be quantized, this one has shape "
                          f"{tuple(getattr(w, 'shape', ()))}")
    k = w.shape[1]
    if spec.group_size is not None and spec.group_size > k:
        raise RecipeError(f"{path}: group size {spec.group_size} is larger than its input "
                          f"dimension {k}")
    # host arrays are checked on the host (no transfer of a model kept out of device memory)
    finite = np.isfinite(w).all() if isinstance(w, np.ndarray) else jnp.isfinite(w).all()
    if not bool(finite):
        raise RecipeError(f"{path} contains NaN or Inf values")


def quantize(params: Params, recipe: Recipe, calibration: Calibration | None = None, *,
             return_stats: bool = False) -> Params | tuple[Params, dict[str, Any]]:
    """Quantizes the parameters ``recipe`` selects.

    Args:
      params: Float parameter pytree (paths as in ``docs/models.md``).
      recipe: Which parameters, and how.
      calibration: A :class:`jaxquant.calibration.Calibration` for methods that need it
        (GPTQ). When given, block layers are quantized block by block, each block's
        inputs computed by the already quantized blocks before it.

      return_stats: Also return calibration statistics (total and per-layer seconds,
        per-layer relative output error on the calibration inputs).

    Returns:
      A new pytree with quantized formats in place of the selected weights (and the
      statistics, ``{}`` without calibration, when ``return_stats``).

    Raises:
      RecipeError: a selected parameter cannot be quantized as asked (the message names
        it), or a method is unknown.
    """
    flat = flatten(params)
    specs, _ = recipe.plan(flat)
    for path, spec in specs.items():
        check_weight(path, flat[path], spec)
        if spec.method not in _METHODS:
            raise RecipeError(f"no implementation registered for method {spec.method!r}")
    specs = _resolve_total_bits(specs, flat)
    needs = sorted({s.method for s in specs.values() if s.method in CALIBRATED})
    if needs and calibration is None:
        raise RecipeError(f"method {needs[0]} needs calibration data (--calib)")
    if calibration is not None:
        layered = {p: s for p, s in specs.items() if p.startswith("layers.")}
        outside = sorted(set(specs) - set(layered))
        if any(specs[p].method in CALIBRATED for p in outside):
            raise RecipeError(f"{outside[0]}: calibrated methods apply to block layers only")

        methods = {s.method for s in layered.values()}
        steps = {_BLOCK_STEPS[m] for m in methods if m in _BLOCK_STEPS}
        if len(steps) > 1:
            raise RecipeError("one recipe can use at most one method with a block step")
        block_fn = steps.pop() if steps else None
        sample = max([_SAMPLE_TOKENS.get(m, 0) for m in methods], default=0)
        qparams, stats = sequential_quantize(params, calibration, _calibrated_layer, layered,
                                             block_fn=block_fn, sample_tokens=sample)
        out = dict(flatten(qparams))
        for path in outside:
            out[path] = _METHODS[specs[path].method](flat[path], specs[path], None)
        return (unflatten(out), stats) if return_stats else unflatten(out)
    out = dict(flat)
    for path, spec in specs.items():
        out[path] = _METHODS[spec.method](flat[path], spec, None)
    return (unflatten(out), {}) if return_stats else unflatten(out)


@jax.jit
def _relative_error(w: jax.Array, q: jax.Array) -> jax.Array:
    w = w.astype(jnp.float32)
    return jnp.linalg.norm(w - q) / jnp.maximum(jnp.linalg.norm(w), 1e-30)


def quantization_report(params: Params, qparams: Params) -> dict[str, Any]:
    """Storage account and per-layer relative weight error ``||W - Q(W)||_F / ||W||_F``.

    Returns:
      ``avg_bits`` (bits per weight over quantized layers, everything they store
      counted), ``quantized_bytes`` / ``float_bytes`` (whole model after / before),
      ``quantized_layers``, and ``layers``: path -> summary, bits, relative error.
    """
    flat, qflat = flatten(params), flatten(qparams)
    layers: dict[str, Any] = {}
    bits = weights = 0
    for path, q in qflat.items():
        if not is_quantized(q):
            continue
        bits += 8 * q.nbytes
        weights += q.num_weights
        layers[path] = {
            "format": q.summary(),
            "bits_per_weight": q.bits_per_weight,
            "relative_error": float(_relative_error(flat[path], q.dequantize(jnp.float32))),
        }
    return {
        "avg_bits": bits / weights if weights else None,
        "quantized_bytes": tree_nbytes(qparams),
        "float_bytes": tree_nbytes(params),
        "quantized_layers": len(layers),
        "layers": layers,
    }
