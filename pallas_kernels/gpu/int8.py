"""Mosaic GPU kernel (Hopper): W8A8, ``q_x q_w^T`` with int8 x int8 -> int32 wgmma.

Computes the exact integer sums ``acc[m, n] = sum_k qx[m, k] qw[n, k]`` of symmetric
per-token activation codes and symmetric per-output-channel weight codes;
:func:`int8_matmul` applies the scales ``s_x[m] s_w[n]`` in float32 after it
(:func:`jaxquant.algorithms.act_quant.int8_matmul` is the reference).

As in :mod:`pallas_kernels.gpu.uniform`, the matmul is computed transposed
(``acc^T = W x^T``): wgmma's A operand is a ``[64, tk]`` weight tile and B the ``[tm, tk]``
activation tile read through a transposed view (int8 wgmma takes both operands
K-major from shared memory), so a decode step uses an 8- or 16-wide wgmma. The weight
keeps its ``[N, K]`` int8 layout (no re-layout: the codes come from
``UniformWeight.integer_codes()`` at call time), so ``N`` must be a multiple of 64 and
``K`` of 64 (:func:`eligible`; every Llama-family width is). Grid
``(N / 64, M_pad / tm, split)``: split-K gives a decode step enough programs; the int32
partials are summed in XLA (exactly).

In the Pallas GPU interpreter (CPU tests) the activations are read ``[K, M]`` instead of
through the transposed view, which the interpreter does not implement; the device path
is checked by lowering for CUDA in CI and on a GPU by ``main()``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.compat import gpu_interpret, pl, plgpu
from pallas_kernels.gpu.uniform import TN, store_partial
from pallas_kernels.util import round_up

#: Shared memory the pipeline may take (bytes).
SMEM_BUDGET = 200 * 1024


def eligible(n: int, k: int) -> str | None:
    """``None`` when the kernel takes an ``[n, k]`` int8 weight, else why not."""
    if n % TN or k % 64:
        return f"weight {n}x{k}: N must be a multiple of {TN} and K of 64"
    return None


def tiles_for(m: int, n: int, k: int) -> tuple[int, int, int, int]:
    """``(tm, tk, split, steps)``: 8/16/64/128-row activation tiles, 128-column K tiles
    (64 where K is not a multiple of 128), split-K (up to 4) while the programs stay
    below two per SM (132), and a 2-4 deep pipeline within the shared memory."""
    tm = 8 if m <= 8 else 16 if m <= 16 else 64 if m <= 64 else 128
    tk = 128 if k % 128 == 0 else 64
    programs = (n // TN) * (round_up(m, tm) // tm)
    split = 1
    while split < 4 and programs * split * 2 <= 264 and (k // tk) % (split * 2) == 0 \
            and k // tk // (split * 2) >= 2:
        split *= 2
    stage = TN * tk + tm * tk
    steps = max(2, min(4, (SMEM_BUDGET - TN * tm * 4) // stage))
    return tm, tk, split, steps


@functools.cache
def _kernel(m_pad: int, n: int, k: int, *, tm: int, tk: int, split: int, steps: int,
            interpret: Any) -> Any:
    ksteps = k // tk // split
    device = not interpret

    def body(x_gmem, w_gmem, o_gmem):
        ni, mi, si = (jax.lax.axis_index(a) for a in ("n", "m", "s"))

        def scope(acc_ref):
            def step(_, w_smem, x_smem):
                xs = plgpu.transpose_ref(x_smem, (1, 0)) if device else x_smem
                plgpu.wgmma(acc_ref, w_smem, xs)
                plgpu.wgmma_wait(0)

            x_spec = (plgpu.BlockSpec((tm, tk), lambda kk: (mi, si * ksteps + kk)) if device
                      else plgpu.BlockSpec((tk, tm), lambda kk: (si * ksteps + kk, mi)))
            plgpu.emit_pipeline(
                step, grid=(ksteps,),
                in_specs=[plgpu.BlockSpec((TN, tk), lambda kk: (ni, si * ksteps + kk)),
                          x_spec],
                max_concurrent_steps=min(steps, ksteps),
            )(w_gmem, x_gmem)
            return acc_ref[...]

        acc = pl.run_scoped(scope, plgpu.ACC((TN, tm), jnp.int32))
        store_partial(acc, o_gmem.at[si, pl.ds(ni * TN, TN), pl.ds(mi * tm, tm)])

    return plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((split, n, m_pad), jnp.int32),
        grid=(n // TN, m_pad // tm, split), grid_names=("n", "m", "s"),
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret)


@functools.partial(jax.jit, static_argnames=("interpret", "tiles"))
def int8_matmul(x_codes: jax.Array, x_scale: jax.Array, w_codes: jax.Array,
                w_scale: jax.Array, *, interpret: bool | Any = False,
                tiles: tuple[int, int, int, int] | None = None) -> jax.Array:
    """``s_x s_w (q_x @ q_w^T)`` in float32, the integer sums exact (int32).

    Args:
      x_codes: int8 ``[..., K]``; x_scale: float ``[..., 1]`` (or ``[...]``), per token.
      w_codes: int8 ``[N, K]``; w_scale: float ``[N]`` (or ``[N, 1]``), per channel.
      interpret: ``True`` runs the Pallas GPU interpreter (CPU tests).
      tiles: ``(tm, tk, split, steps)`` overriding :func:`tiles_for`.

    Raises:
      ValueError: Codes that are not int8, or a weight :func:`eligible` refuses.
    """
    if x_codes.dtype != jnp.int8 or w_codes.dtype != jnp.int8:
        raise ValueError(f"int8 codes expected, got {x_codes.dtype} and {w_codes.dtype}")
    n, k = w_codes.shape
    why = eligible(n, k)
    if why:
        raise ValueError(f"the GPU int8 kernel cannot take this weight: {why}")
    lead = x_codes.shape[:-1]
    m = math.prod(lead)
    tm, tk, split, steps = tiles or tiles_for(m, n, k)
    if (k % tk or tk % 64 or (k // tk) % split or steps < 1
            or not (tm in (8, 16, 24) or (tm % 16 == 0 and 32 <= tm <= 256))):
        raise ValueError(f"int8 tiles {(tm, tk, split, steps)} do not fit K={k} (tk a "
                         "multiple of 64 dividing K into a multiple of split tiles; tm an "
                         "int8 wgmma N: 8, 16, 24 or a multiple of 16 up to 256)")
    m_pad = round_up(max(m, 1), tm)
    x2 = jnp.pad(x_codes.reshape(m, k), ((0, m_pad - m), (0, 0)))
    interp = gpu_interpret(interpret)
    kernel = _kernel(m_pad, n, k, tm=tm, tk=tk, split=split, steps=steps, interpret=interp)
    acc = kernel(x2.T if interp else x2, w_codes).sum(0)[:, :m].T  # [m, n] int32
    xs = jnp.broadcast_to(jnp.asarray(x_scale, jnp.float32).reshape(-1, 1)
                          if jnp.ndim(x_scale) else x_scale, (m, 1))
    ws = jnp.broadcast_to(jnp.asarray(w_scale, jnp.float32).reshape(1, -1), (1, n))
    return (acc.astype(jnp.float32) * xs * ws).reshape(*lead, n)


def reference(x_codes: jax.Array, x_scale: jax.Array, w_codes: jax.Array,
              w_scale: jax.Array) -> jax.Array:
    """The exact reference in NumPy int64."""
    acc = np.asarray(x_codes, np.int64) @ np.asarray(w_codes, np.int64).T
    xs = np.asarray(x_scale, np.float64).reshape(*acc.shape[:-1], 1)
    return acc * xs * np.asarray(w_scale, np.float64).reshape(-1)


def main() -> None:
    """On a GPU: check against the int64 reference, then time W8A8 against a bf16 matmul
    and the float32 dot of the same codes (act_quant's CUDA fallback), Llama-2-7B shapes."""
    if jax.default_backend() != "gpu":
        print("no GPU here: the benchmark needs one (tests run the kernel interpreted)")
        return
    try:  # CUPTI device time when run from the repository root
        from benchmarks.timing import device_us
    except ImportError:
        from pallas_kernels.util import wall_us

        def device_us(fn: Any, sets: Any) -> float:
            return wall_us(jax.jit(fn), *sets[0])

    rng = np.random.default_rng(0)
    for n, k in ((4096, 4096), (11008, 4096), (4096, 11008)):
        wq = jnp.asarray(rng.integers(-127, 128, (n, k)), jnp.int8)
        ws = jnp.asarray(rng.uniform(0.01, 0.02, n), jnp.float32)
        wb = jnp.asarray(rng.normal(size=(n, k)), jnp.bfloat16)
        for m in (1, 16, 64, 512, 2048):
            xq = jnp.asarray(rng.integers(-127, 128, (m, k)), jnp.int8)
            xs = jnp.asarray(rng.uniform(0.01, 0.02, (m, 1)), jnp.float32)
            xb = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
            got = np.asarray(int8_matmul(xq, xs, wq, ws))
            ref = reference(xq, xs, wq, ws)
            err = float(np.abs(got - ref).max() / np.abs(ref).max())
            t8 = device_us(int8_matmul, [(xq, xs, wq, ws)])
            t16 = device_us(jax.jit(lambda a, b: a @ b.T), [(xb, wb)])
            tf = device_us(jax.jit(lambda a, b: jnp.dot(
                a.astype(jnp.float32), b.astype(jnp.float32).T,
                precision=jax.lax.Precision.HIGHEST)), [(xq, wq)])
            print(f"{n}x{k} M={m}: int8 {t8:.1f} us (max rel err {err:.1e}), bf16 {t16:.1f} "
                  f"us, float32 codes {tf:.1f} us, tiles {tiles_for(m, n, k)}", flush=True)


if __name__ == "__main__":
    main()
