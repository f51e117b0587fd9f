"""Timing helpers shared by the benchmarks: wall-clock and device (CUPTI) time.

* :func:`wall_us` (and :func:`wall_samples_us`): host wall clock of a call, after a
  warm-up call (compilation), with ``jax.block_until_ready`` on the outputs; median of
  several runs. This is what a user of the call waits, dispatch and gaps between
  kernels included.
* :func:`device_us`: the summed time of the GPU kernels a call launches, measured with
  CUPTI (:func:`jax.experimental.mosaic.gpu.profiler.measure`); the gaps between kernels
  and host dispatch are not counted. Without CUPTI (CPU, TPU, a GPU without the
  profiler) it falls back to the wall clock.

``device_us`` has the semantics of the helper of ``benchmarks/kernels_gpu.py`` (which
will import it from here).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax


def wall_samples_us(fn: Callable[..., Any], *args: Any, runs: int = 10,
                    warmup: int = 1) -> list[float]:
    """Wall-clock microseconds of ``runs`` calls of ``fn(*args)``, each waited for.

    Args:
      fn: The function (usually jitted).
      *args: Its arguments, the same for every call.
      runs: Timed calls.
      warmup: Untimed calls first (compilation, autotuning, allocator warm-up).

    Returns:
      One duration per timed call, in microseconds, in call order.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append((time.perf_counter() - start) * 1e6)
    return out


def wall_us(fn: Callable[..., Any], *args: Any, runs: int = 10, warmup: int = 1) -> float:
    """Median wall-clock microseconds of ``fn(*args)`` after ``warmup`` untimed calls.

    Args:
      fn: The function (usually jitted).
      *args: Its arguments, the same for every call.
      runs: Timed calls (the median is returned).
      warmup: Untimed calls first.

    Returns:
      The median over the timed calls, in microseconds.
    """
    return statistics.median(wall_samples_us(fn, *args, runs=runs, warmup=warmup))


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
        jax.block_until_ready(f(*f_args))
        ts = []
        for _ in range(iterations):
            t = time.perf_counter()
            jax.block_until_ready(f(*f_args))
            ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1e6 / len(sets)
