"""Timing helpers shared by the benchmarks: wall-clock and device (CUPTI) time.

* :func:`wall_us` (and :func:`wall_samples_us`, both from :mod:`pallas_kernels.util`,
  where the kernels' own ``main()`` benchmarks use them): host wall clock of a call,
  after a warm-up call (compilation), with ``jax.block_until_ready`` on the outputs;
  median of several runs. This is what a user of the call waits, dispatch and gaps between
  kernels included.
* :func:`device_us`: the summed time of the GPU kernels a call launches, measured with
  CUPTI (:func:`jax.experimental.mosaic.gpu.profiler.measure`); the gaps between kernels
  and host dispatch are not counted. Without CUPTI (CPU, TPU, a GPU without the
  profiler) it falls back to the wall clock.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import jax

from pallas_kernels.util import wall_samples_us, wall_us

__all__ = ["device_us", "wall_samples_us", "wall_us"]


def device_us(fn: Callable[..., Any], args_sets: Sequence[tuple[Any, ...]],
              iterations: int = 10, *, info: dict[str, Any] | None = None) -> float:
    """Median device time of one call ``fn(*args)``, over ``iterations`` runs of all sets.

    All argument sets run in one jitted call (so that, for example, weight sets rotated
    past the L2 cache are each read from memory); the time of that call is divided by
    the number of sets. A single set with an already jitted ``fn`` runs ``fn`` itself,
    so its compiled executable is reused (no second compile of a large program).

    Args:
      fn: The function; it is traced inside one ``jax.jit`` over all ``args_sets``.
      args_sets: Argument tuples, one call of ``fn`` each per iteration.
      iterations: Measured runs (the median is returned).
      info: If given, gets ``"method"`` (``"cupti"`` or ``"wall"``) and, after a
        fallback, ``"error"`` (why CUPTI did not measure).

    Returns:
      Microseconds per call: the CUPTI sum of the kernels' times on a GPU, else the
      wall clock after a warm-up run.
    """
    sets = list(args_sets)
    if len(sets) == 1 and isinstance(fn, jax.stages.Wrapped):
        f, f_args = fn, sets[0]
    else:
        f, f_args = jax.jit(lambda sets: [fn(*a) for a in sets]), (sets,)
    try:
        from jax.experimental.mosaic.gpu import profiler

        _, ts = profiler.measure(f, iterations=iterations)(*f_args)
        if iterations == 1:  # measure returns a single float then
            ts = [ts]
        us = statistics.median(ts) * 1e3 / len(sets)
        if info is not None:
            info["method"] = "cupti"
        return us
    except Exception as e:  # no CUPTI: wall clock after a warm-up
        if info is not None:
            info.update(method="wall", error=f"{type(e).__name__}: {e}")
        return wall_us(f, *f_args, runs=iterations) / len(sets)
