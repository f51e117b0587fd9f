"""Mosaic GPU kernel (Hopper) for wide activations (mid batches and prefill, M > 64):
``y = x W^T`` for a uniform weight in the :mod:`pallas_kernels.gpu.uniform` layout
(widths 1..3, stored there in bit planes, arrive unpacked to the int4 container by XLA:
``GpuUniformWeight.container_codes``).

Computes ``y[m, n] = sum_k x[m, k] (codes[n, k] s[n, g(k)] + bias[n, g(k)])`` on the tensor
cores, with the weight dequantized in registers (one bf16 FMA a weight) as wgmma's A
operand, as the decode kernel does, but organised for compute-bound shapes:

- **Warp-specialized pipeline** (``plgpu.emit_pipeline_warp_specialized``): one memory
  warpgroup issues the TMA copies of the next stages while two compute warpgroups
  dequantize and multiply, so loads, dequantization and wgmma overlap.
- **Persistent grid**: one block per SM loops (``plgpu.nd_loop``) over the output tiles,
  so no tail of half-empty waves and no per-tile launch.
- **Swap AB**: each compute warpgroup owns 64 weight rows (wgmma's M) and the block's
  ``tt`` activation rows (wgmma's N: 64, 128 or 256), so a weight tile is read once per
  ``tt`` tokens. The float32 accumulator ``[64, tt]`` is cast and stored *transposed*
  through shared memory (``WGMMA_TRANSPOSED`` register layout), so ``y`` comes out
  ``[M, N]`` with no transpose in XLA.
- **Split-K** for the smaller M (128..511 rows): when the output tiles alone cannot fill
  the SMs, each tile's K range is split into 2 or 4 float32 partials, summed in XLA.

Block layout: ``(tw = 128 weight rows) x (tt activation rows)``, a pipeline step moves
``codes[128, tk]`` (int4/int8), ``x[tt, tk]`` (bf16) and the ``tk / kg`` scale and bias rows
of those 128 rows. Tiles (:func:`tiles_for`) were measured on an H100
(``benchmarks/kernels_gpu.py``): at M >= 1024, ``tt = 256, tk = 64`` reaches XLA's bf16
matmul (0.99-1.01x); at M = 512, ``tt = 128, tk = 128`` gives 0.85-1.02x.

In the Pallas GPU interpreter (CPU tests), as for the decode kernel, the dequantized tile
goes through shared memory, the activations are read ``[K, M]`` and the output is stored
``[N, M]`` (then transposed in XLA): the interpreter implements neither register A
operands nor transposed views. The device path is checked by lowering for CUDA in CI and
against the reference on the GPU by ``benchmarks/kernels_gpu.py --check``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.compat import pl, plgpu
from pallas_kernels.util import round_up

#: Weight rows per block: two compute warpgroups of wgmma's 64 rows.
TW = 128
#: Registers the memory warpgroup keeps (the compute warpgroups get the rest).
MEMORY_REGISTERS = 40
#: Shared memory a block may take on Hopper (227 KiB), less 1 KiB for the barriers.
SMEM_LIMIT = 226 * 1024
#: Programs in the interpreter (several tiles per program exercise the persistent loop).
INTERPRET_PROGRAMS = 3


def num_sms() -> int:
    """Streaming multiprocessors of the first GPU (132 on an H100 SXM, and the value
    used where no GPU is attached, e.g. lowering for CUDA on a CPU machine)."""
    try:
        return int(jax.local_devices(backend="gpu")[0].core_count)
    except (RuntimeError, IndexError, AttributeError):
        return 132


def smem_bytes(tt: int, tk: int, kg: int, split: int, steps: int, container: int) -> int:
    """Shared memory of one block: ``steps`` pipeline stages of codes, activations, scale
    and bias rows, plus the two warpgroups' output tiles (bf16, float32 when split)."""
    stage = TW * tk * container // 8 + tt * tk * 2 + 2 * max(1, tk // kg) * TW * 2
    return steps * stage + 2 * tt * (TW // 2) * (2 if split == 1 else 4)


def tiles_for(m: int, n_pad: int, k: int, k_pad: int, kg: int, container: int = 4,
              sms: int | None = None) -> tuple[int, int, int, int]:
    """``(tt, tk, split, steps)`` for ``m`` activation rows.

    ``tt``: 256 rows from M = 1024 on, else 128 (each weight tile read once per ``tt``
    tokens). ``tk``: 64 with ``tt = 256`` (shared memory), for 64-column kernel groups and
    where K is not a multiple of 128 (x is then padded less), else 128. ``split``: doubled
    (to 4 at most) while the output tiles times the split stay within the SMs, so that the
    K range of a tile spreads over idle SMs. ``steps``: 4 pipeline stages, fewer where
    shared memory (:func:`smem_bytes`) is short; a split that leaves fewer than 2 is not
    taken. ``container``: bits a code is stored in (4 or 8).
    """
    sms = sms or num_sms()
    tt = 256 if m >= 1024 else 128
    tk = 64 if tt == 256 or kg < 128 or k % 128 else 128
    tiles = -(-m // tt) * (n_pad // TW)
    split = 1
    while (split < 4 and tiles * split * 2 <= sms and k_pad % (tk * split * 2) == 0
           and (k_pad // (split * 2)) % kg == 0 and k_pad // (tk * split * 2) >= 4
           and smem_bytes(tt, tk, kg, split * 2, 2, container) <= SMEM_LIMIT):
        split *= 2
    steps = 4
    while smem_bytes(tt, tk, kg, split, steps, container) > SMEM_LIMIT:
        steps -= 1
    return tt, tk, split, steps


@functools.cache
def _kernel(m_pad: int, n_pad: int, k_run: int, *, tt: int, tk: int, kg: int, split: int,
            steps: int, programs: int, interpret: Any) -> Any:
    """The ``plgpu.kernel`` for ``x [m_pad, >= k_run]`` (``[K, m_pad]`` interpreted)."""
    wgw = TW // 2  # weight rows per compute warpgroup
    sub = max(1, tk // kg)  # wgmmas (one scale row each) per step
    kgs = min(kg, tk)  # columns per wgmma
    m_iters, n_iters = m_pad // tt, n_pad // TW
    k_iters = k_run // tk // split
    # Scale rows of one split's K range (whole kernel groups when split; unsplit, the
    # last 64-column step may start a kernel group of 128, which must be in the view).
    rows_per_split = k_iters * tk // kg if split > 1 else -(-k_run // kg)

    def srow(k):  # block index of step k's scale rows (blocks of `sub` rows)
        return k * tk // (kg * sub), 0

    out_dtype = jnp.bfloat16 if split == 1 else jnp.float32
    device = not interpret

    def pipeline(body: Any, context: Any) -> Any:
        x_spec = (plgpu.BlockSpec((tt, tk), lambda k: (0, k)) if device
                  else plgpu.BlockSpec((tk, tt), lambda k: (k, 0)))
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_iters,), memory_registers=MEMORY_REGISTERS,
            in_specs=[plgpu.BlockSpec((TW, tk), lambda k: (0, k)), x_spec,
                      plgpu.BlockSpec((sub, TW), srow), plgpu.BlockSpec((sub, TW), srow)],
            wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=steps,
            compute_context=context)

    def kernel(x_gmem, q_gmem, s_gmem, b_gmem, o_gmem, o_smem, a_smem=None):
        def ignore(*_, **__):
            return None

        @functools.partial(pl.run_scoped, allocs=pipeline(ignore, ignore).get_allocations(
            q_gmem, x_gmem, s_gmem, b_gmem), collective_axes="wg")
        def _scope(allocs):
            wg = jax.lax.axis_index("wg")
            rows = pl.ds(wg * wgw, wgw)

            @plgpu.nd_loop((m_iters * n_iters * split,), collective_axes="sm")
            def _tile(info):
                (lin,) = info.index
                si, lin = lin % split, lin // split
                mi, ni = lin // n_iters, lin % n_iters
                ks = pl.ds(si * k_iters * tk, k_iters * tk)
                ss = pl.ds(si * rows_per_split, rows_per_split)
                out = o_gmem.at[si] if split > 1 else o_gmem

                def context(run):
                    @functools.partial(pl.run_scoped, acc=plgpu.ACC((wgw, tt), jnp.float32))
                    def _acc(acc):
                        run(acc)
                        y = acc[...].astype(out_dtype)
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        if device:  # stored transposed: y comes out [M, N]
                            plgpu.transpose_ref(o_smem.at[wg], (1, 0))[...] = (
                                plgpu.layout_cast(y, plgpu.Layout.WGMMA_TRANSPOSED))
                            dst = out.at[pl.ds(mi * tt, tt), pl.ds(ni * TW + wg * wgw, wgw)]
                        else:
                            o_smem[wg] = y
                            dst = out.at[pl.ds(ni * TW + wg * wgw, wgw), pl.ds(mi * tt, tt)]
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(o_smem.at[wg], dst)

                def step(_, q_smem, x_smem, s_smem, b_smem, acc):
                    for j in range(sub):
                        a = q_smem[rows, pl.ds(j * kgs, kgs)].astype(jnp.bfloat16)
                        a = (a * jax.lax.broadcast_in_dim(s_smem[j, rows], a.shape, [0])
                             + jax.lax.broadcast_in_dim(b_smem[j, rows], a.shape, [0]))
                        if not device:  # the interpreter takes wgmma's A from a ref only
                            a_smem[wg] = a
                            plgpu.commit_smem()
                            a = a_smem.at[wg]
                        xs = (plgpu.transpose_ref(x_smem.at[:, pl.ds(j * kgs, kgs)], (1, 0))
                              if device else x_smem.at[pl.ds(j * kgs, kgs), :])
                        plgpu.wgmma(acc, a, xs)
                    plgpu.wgmma_wait(0)
                    return acc

                pipeline(step, context)(
                    q_gmem.at[pl.ds(ni * TW, TW), ks],
                    x_gmem.at[pl.ds(mi * tt, tt), ks] if device
                    else x_gmem.at[ks, pl.ds(mi * tt, tt)],
                    s_gmem.at[ss, pl.ds(ni * TW, TW)], b_gmem.at[ss, pl.ds(ni * TW, TW)],
                    allocations=allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    shape = (m_pad, n_pad) if device else (n_pad, m_pad)
    scratch = dict(o_smem=plgpu.SMEM((2, tt, wgw) if device else (2, wgw, tt), out_dtype))
    if not device:
        scratch["a_smem"] = plgpu.SMEM((2, wgw, kgs), jnp.bfloat16)
    return plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct(((split,) if split > 1 else ()) + shape,
                                              out_dtype),
        grid=(programs,), grid_names=("sm",), num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        scratch_types=scratch, interpret=interpret)


def wide_matmul(x2: jax.Array, codes: jax.Array, scales: jax.Array, bias: jax.Array, *,
                n: int, kg: int, tiles: tuple[int, int, int, int],
                interpret: Any = None) -> jax.Array:
    """``x2 [M, K] @ W^T`` as ``[M, N]`` (bf16, or float32 when K is split) for the decode
    kernel's weight layout.

    Args:
      x2: Activations ``[M, K]`` (any float dtype; multiplied in bf16).
      codes: ``[N_pad, K_pad]`` int4/int8 codes (``N_pad`` a multiple of 128).
      scales: ``[K_pad / kg, N_pad]`` bf16.
      bias: ``[K_pad / kg, N_pad]`` bf16.
      n: Output features ``N``.
      kg: Input columns per scale row.
      tiles: ``(tt, tk, split, steps)`` (:func:`tiles_for` gives the measured choice).
      interpret: The Pallas GPU interpreter's parameters (CPU tests), or ``None``.
    """
    m, k = x2.shape
    n_pad, k_pad = codes.shape
    tt, tk, split, steps = tiles
    # K steps: the real K rounded up to a tile where one program takes all of K (no copy
    # of x when K divides), the padded K when the steps split (which the layout divides).
    k_run = k_pad if split > 1 else round_up(k, tk)
    if (tk % 64 or (tk % kg and kg % tk) or k_run % (tk * split)
            or (split > 1 and (k_pad // split) % kg) or tt not in (64, 128, 256)):
        raise ValueError(f"wide-kernel tiles {(tt, tk, split, steps)} do not fit K_pad "
                         f"{k_pad} with {kg}-column scale rows")
    m_pad = round_up(m, tt)
    xb = x2.astype(jnp.bfloat16)
    if (m_pad, k_run) != (m, k):
        xb = jnp.pad(xb, ((0, m_pad - m), (0, k_run - k)))
    programs = INTERPRET_PROGRAMS if interpret else num_sms()
    kernel = _kernel(m_pad, n_pad, k_run, tt=tt, tk=tk, kg=kg, split=split, steps=steps,
                     programs=programs, interpret=interpret)
    y = kernel(xb.T if interpret else xb, codes, scales, bias)
    if split > 1:
        y = y.sum(0)
    if interpret:
        y = y.T
    return y[:m, :n]


def main() -> None:
    """Benchmark on a GPU: see ``benchmarks/kernels_gpu.py`` (the full table)."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "benchmarks/kernels_gpu.py", "--quick"], check=False)


if __name__ == "__main__":
    main()
