"""``quantize(params, recipe) -> qparams``: apply a recipe to a parameter pytree.

Pure: returns a new pytree in which every parameter the recipe selects is replaced
by a quantized format (:mod:`jaxquant.formats`) and every other leaf is shared with
the input. RTN needs no calibration data; calibration-based methods (GPTQ,
SliM-LLM, CLAQ) plug into the same call through ``calibration``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxquant.algorithms.gptq import HessianError, gptq
from jaxquant.algorithms.rtn import rtn
from jaxquant.calibration import sequential_quantize
from jaxquant.formats.base import QuantizedWeight, is_quantized, tree_nbytes
from jaxquant.params import flatten, unflatten
from jaxquant.recipes import CALIBRATED, QuantSpec, Recipe, RecipeError

Params = dict[str, Any]
#: method name -> fn(weight, spec, calibration) -> QuantizedWeight
QuantizeFn = Callable[[jax.Array, QuantSpec, Any], QuantizedWeight]


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "symmetric", "scale_dtype"))
def _rtn_jit(w, *, bits, group_size, symmetric, scale_dtype):
    return rtn(w, bits=bits, group_size=group_size, symmetric=symmetric,
               scale_dtype=scale_dtype)


def _rtn(w: jax.Array, spec: QuantSpec, calibration: Any) -> QuantizedWeight:
    del calibration
    return _rtn_jit(w, bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric,
                    scale_dtype=jnp.dtype(spec.scale_dtype))


def _gptq(w: jax.Array, spec: QuantSpec, hessian: Any) -> QuantizedWeight:
    return gptq(w, hessian, bits=spec.bits, group_size=spec.group_size,
                symmetric=spec.symmetric, scale_dtype=jnp.dtype(spec.scale_dtype),
                block_size=spec.block_size, damp=spec.damp, act_order=spec.act_order,
                static_groups=spec.static_groups)


_METHODS: dict[str, QuantizeFn] = {"rtn": _rtn, "gptq": _gptq}


def register_method(name: str, fn: QuantizeFn) -> None:
    """Makes ``QuantSpec(method=name)`` call ``fn(weight, spec, calibration)``."""
    _METHODS[name] = fn


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
    if not bool(jnp.isfinite(w).all()):
        raise RecipeError(f"{path} contains NaN or Inf values")


def quantize(params: Params, recipe: Recipe, calibration: Any = None) -> Params:
    """Quantizes the parameters ``recipe`` selects.

    Args:
      params: Float parameter pytree (paths as in ``docs/models.md``).
      recipe: Which parameters, and how.
      calibration: A :class:`jaxquant.calibration.Calibration` for methods that need it
        (GPTQ). When given, block layers are quantized block by block, each block's
        inputs computed by the already quantized blocks before it.

    Returns:
      A new pytree with quantized formats in place of the selected weights.

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
    needs = sorted({s.method for s in specs.values() if s.method in CALIBRATED})
    if needs and calibration is None:
        raise RecipeError(f"method {needs[0]} needs calibration data (--calib)")
    if calibration is not None:
        layered = {p: s for p, s in specs.items() if p.startswith("layers.")}
        outside = sorted(set(specs) - set(layered))
        if any(specs[p].method in CALIBRATED for p in outside):
            raise RecipeError(f"{outside[0]}: calibrated methods apply to block layers only")

        def quantize_layer(path: str, w: Any, spec: QuantSpec, hessian: Any) -> Any:
            try:
                return _METHODS[spec.method](w, spec, hessian)
            except HessianError as e:
                raise RecipeError(f"{path}: {e}") from e

        qparams, _ = sequential_quantize(params, calibration, quantize_layer, layered)
        out = dict(flatten(qparams))
        for path in outside:
            out[path] = _METHODS[specs[path].method](flat[path], specs[path], None)
        return unflatten(out)
    out = dict(flat)
    for path, spec in specs.items():
        out[path] = _METHODS[spec.method](flat[path], spec, None)
    return unflatten(out)


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
