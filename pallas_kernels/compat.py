"""Version-specific Pallas imports, in one place (jax >= 0.10 on CPU, 0.11 on the GPU box).

Kernel modules import ``pl``, ``pltpu`` and the helpers below from here, never from
``jax.experimental`` directly, so an API rename between JAX versions is fixed once.
"""

from __future__ import annotations

from typing import Any

from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import tpu as pltpu

__all__ = ["gpu_interpret", "pl", "plgpu", "pltpu", "tpu_compiler_params", "tpu_interpret",
           "tpu_races_found"]


def tpu_compiler_params(*, dimension_semantics: tuple[str, ...],
                        vmem_limit_bytes: int | None = None) -> Any:
    """Mosaic TPU compiler parameters (``CompilerParams``; ``TPUCompilerParams`` before)."""
    cls = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams
    return cls(dimension_semantics=dimension_semantics, vmem_limit_bytes=vmem_limit_bytes)


def tpu_interpret(interpret: bool | Any) -> Any:
    """``interpret=True`` -> the TPU interpreter (``pltpu.InterpretParams``), which also
    detects races and reads of uninitialized scratch; other values pass through."""
    if interpret is True and hasattr(pltpu, "InterpretParams"):
        # uninitialized scratch reads give NaN (caught by the tests), races raise
        return pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")
    return interpret


def tpu_races_found() -> bool | None:
    """Whether the TPU interpreter's race detector has seen a race since its state was
    last reset (``None`` where this JAX version does not expose it)."""
    try:
        from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
    except ImportError:
        return None
    races = getattr(ipc, "races", None)
    return None if races is None else bool(races.races_found)


def gpu_interpret(interpret: bool | Any) -> Any:
    """``interpret=True`` -> the Pallas GPU interpreter's parameters (Mosaic GPU kernels
    run on CPU with simulated shared memory, barriers and TMA); other values pass
    through (``False``: compile for the GPU)."""
    if interpret is not True:
        return interpret or None
    params = getattr(plgpu, "InterpretParams", None)
    if params is None:  # jax 0.10: not re-exported yet
        from jax._src.pallas.mosaic_gpu.interpret import params as interpret_params

        params = interpret_params.InterpretGPUParams
    return params()
