"""Pallas kernels in the quantized forward: weights re-laid out once for a backend.

:func:`prepare` converts every quantized weight that a kernel of the backend can take
into that kernel's layout (once, at load or quantize time); :func:`jaxquant.ops.linear`
then dispatches those weights to the kernel by type. Weights no kernel takes keep
their format and the ``jnp`` path. ``prepare(..., kernels=False)`` (CLI
``--no-kernels``, or the environment variable ``JAXQUANT_KERNELS=0``) is the override
that forces the ``jnp`` path everywhere.

Backends with kernels: TPU (:mod:`pallas_kernels.tpu`: uniform 1..8-bit weights with
group scales, per-column codebooks up to 6 bits; mixed-precision weights run each part
on its kernel, outlier weights their base plus a sparse correction) and GPU
(:mod:`pallas_kernels.gpu`, Mosaic GPU for Hopper: uniform 1..8-bit weights with group
scales; mixed-precision parts and outlier bases likewise). On other backends
:func:`prepare` returns the parameters unchanged.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import jax

from jaxquant.models.config import ModelConfig
from jaxquant.params import flatten, unflatten
from jaxquant.recipes import BLOCK_LINEARS

Params = Mapping[Any, Any]
#: Kernel modules per backend, tried in order; each has ``eligible`` and ``relayout``.
_KERNEL_MODULES = {
    "tpu": ("pallas_kernels.tpu.uniform", "pallas_kernels.tpu.codebook"),
    "gpu": ("pallas_kernels.gpu.uniform",),
}
#: Backends :func:`prepare` has kernels for.
KERNEL_BACKENDS = tuple(_KERNEL_MODULES)
_LINEAR_PATH = re.compile(rf"{BLOCK_LINEARS}|lm_head\.weight")


def kernels_enabled() -> bool:
    """False when the environment says ``JAXQUANT_KERNELS=0`` (force the jnp path)."""
    return os.environ.get("JAXQUANT_KERNELS", "1").strip().lower() not in ("0", "false", "no")


def gpu_int8_enabled() -> bool:
    """True when ``JAXQUANT_GPU_INT8=1``: W8A8 on CUDA takes the Mosaic GPU int8 kernel
    (:mod:`pallas_kernels.gpu.int8`) instead of the float32 dot of the codes. Opt-in
    until the kernel has been checked on a GPU (it is verified by the interpreter and
    by lowering for CUDA only; ``python -m pallas_kernels.gpu.int8`` checks it there).
    Read when a forward is traced: set it before the first call."""
    flag = os.environ.get("JAXQUANT_GPU_INT8", "0").strip().lower()
    return kernels_enabled() and flag in ("1", "true", "yes")


def prepare(params: Params, cfg: ModelConfig | None = None, *, backend: str | None = None,
            kernels: bool = True) -> Params:
    """``params`` with each kernel-eligible quantized weight in its kernel's layout.

    Args:
      params: Model parameters (quantized weights as :mod:`jaxquant.formats` types).
        Only linear layers are converted (block linears and ``lm_head``), never the
        token embedding, which is read by lookup.
      cfg: The model config: with symmetric activation quantization, weights that take
        the integer dot (symmetric per-channel, ``integer_codes()``) keep their format.
      backend: ``"tpu"``, ``"gpu"``, ``"cpu"``; default: JAX's default backend. A
        backend without kernels returns ``params`` unchanged. Passing ``"tpu"`` or
        ``"gpu"`` on another machine runs the kernels in the Pallas TPU or GPU
        interpreter (for tests).
      kernels: ``False`` returns ``params`` unchanged (the jnp path), as does the
        environment variable ``JAXQUANT_KERNELS=0``.

    Returns:
      The same tree; converted weights are kernel-layout types, which the forward
      dispatches to their kernels. Checkpoints are written from unprepared params.
    """
    backend = backend or jax.default_backend()
    if not kernels or not kernels_enabled() or backend not in KERNEL_BACKENDS:
        return params
    import importlib

    # Each kernel module registers its linear with jaxquant.ops on import.
    modules = [importlib.import_module(name) for name in _KERNEL_MODULES[backend]]

    act = getattr(cfg, "act_quant", None)
    int_dot = act is not None and act.symmetric
    flat = flatten(params)
    changed = False
    for path, leaf in flat.items():
        if not _LINEAR_PATH.fullmatch(path):
            continue
        if int_dot and getattr(leaf, "integer_codes", lambda: None)() is not None:
            continue
        new = _convert(leaf, modules)
        if new is not leaf:
            flat[path] = new
            changed = True
    return unflatten(flat) if changed else params


def _convert(w: Any, modules: list[Any]) -> Any:
    """``w`` in a kernel layout, recursing into mixed-precision parts (each part its own
    kernel: the EXL2 scheme, permuted columns then a sum of uniform-width matmuls) and
    outlier bases (base kernel plus a sparse correction); ``w`` itself when nothing
    applies."""
    from jaxquant.formats import MixedWeight, OutlierWeight

    for module in modules:
        if module.eligible(w) is None:
            return module.relayout(w)
    if isinstance(w, MixedWeight):
        parts = tuple(_convert(p, modules) for p in w.parts)
        if all(a is b for a, b in zip(parts, w.parts, strict=True)):
            return w
        return dataclasses.replace(w, parts=parts)
    if isinstance(w, OutlierWeight):
        base = _convert(w.base, modules)
        if base is w.base:
            return w
        from pallas_kernels import sparse

        return sparse.relayout(w, base)
    return w


def is_prepared(params: Params) -> bool:
    """True when some weight of ``params`` is in a kernel layout."""
    return any(type(leaf).__module__.startswith("pallas_kernels.")
               for leaf in flatten(params).values())
