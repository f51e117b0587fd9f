"""Backend-neutral helpers of the kernel modules and benchmarks: tile arithmetic and the
host wall clock of a call (the kernels' ``main()`` benchmarks; ``benchmarks/timing.py``
adds the GPU device time on top)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def round_up(x: int, m: int) -> int:
    """The smallest multiple of ``m`` that is at least ``x``."""
    return -(-x // m) * m


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
    """Median wall-clock microseconds of ``fn(*args)`` after ``warmup`` untimed calls
    (:func:`wall_samples_us`)."""
    return statistics.median(wall_samples_us(fn, *args, runs=runs, warmup=warmup))
