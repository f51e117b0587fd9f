"""Mosaic TPU kernel: ``y = x W^T`` for a uniform b-bit weight with group scales and zeros.

Computes ``y[m, n] = sum_k x[m, k] s[n, g(k)] (q[n, k] - z[n, g(k)])`` for a
:class:`jaxquant.formats.UniformWeight` (any width 1..8, groups along the input axis,
symmetric or not), dequantizing one ``[bk, bn]`` weight tile at a time in VMEM and
feeding it to the MXU with float32 accumulation. The weight is read once per M block
at ``b`` bits per code, so a memory-bound decode moves ``b/16`` of a bf16 weight's bytes.

Kernel layout (:func:`relayout`, once per weight, not per call): the codes in the
strided bit planes of :mod:`pallas_kernels.tpu.common` (``[K, N]``, whole tiles). Scales
and zeros are stored per *kernel group* of ``kg = gcd(group_size, bk)`` input rows,
``[K_pad / kg, N_pad]`` float32 (per output channel: one row ``[1, N_pad]``), and
broadcast over their rows in VMEM. When a K tile has fewer than 8 scale rows (the TPU's
sublane tiling), the scale block spans all K tiles (fetched once per N tile) and the
kernel slices the current tile's rows. The pipeline (grid, accumulator, block table by
TPU generation, VMEM limit) is :func:`pallas_kernels.tpu.common.dequant_matmul`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.formats import packing
from jaxquant.formats.uniform import UniformWeight
from jaxquant.ops import register_kernel
from pallas_kernels import util
from pallas_kernels.compat import pl
from pallas_kernels.reference import dequant_reference
from pallas_kernels.tpu import common

# Re-exported for callers of this module.
tpu_generation = common.tpu_generation
block_sizes = common.block_sizes


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class TpuUniformWeight:
    """A :class:`UniformWeight` in the kernel layout (see the module docstring)."""

    planes: tuple[jax.Array, ...]  # uint32 [K_pad / (32 / w), N_pad] per plane width w
    scales: jax.Array  # float32 [K_pad / kg, N_pad] (per output channel: [1, N_pad])
    zeros: jax.Array | None  # like scales; None: symmetric (2**(bits-1))
    shape: tuple[int, int] = dataclasses.field(metadata={"static": True})  # (N, K)
    bits: int = dataclasses.field(metadata={"static": True})  # code width
    kg: int = dataclasses.field(metadata={"static": True})  # input rows per stored scale row
    bn: int = dataclasses.field(metadata={"static": True})  # output lanes per tile
    bk: int = dataclasses.field(metadata={"static": True})  # input rows per tile

    @property
    def padded(self) -> tuple[int, int]:
        """``(N_pad, K_pad)``."""
        return int(self.scales.shape[1]), int(self.scales.shape[0]) * self.kg

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """The ``[N, K]`` weight back from the kernel layout (jnp; a test reference)."""
        codes = common.unpack_planes_jnp(self.planes, self.bits, self.bk)
        s = jnp.repeat(self.scales, self.kg, axis=0)
        z = (jnp.float32(2 ** (self.bits - 1)) if self.zeros is None
             else jnp.repeat(self.zeros, self.kg, axis=0))
        w = s * (codes.astype(jnp.float32) - z)
        n, k = self.shape
        return w[:k, :n].T.astype(dtype)


def eligible(w: Any) -> str | None:
    """``None`` when :func:`relayout` can take ``w``, else the reason it cannot."""
    if not isinstance(w, UniformWeight):
        return f"not a UniformWeight ({type(w).__name__})"
    k = w.shape[1]
    if w.group_size < k and w.group_size % 8:
        return f"group size {w.group_size} is not a multiple of 8 (TPU sublane tiling)"
    return None


def relayout(w: UniformWeight, *, generation: str | None = None,
             blocks: tuple[int, int] | None = None) -> TpuUniformWeight:
    """The kernel layout of ``w`` (host NumPy work, once per weight).

    Args:
      w: The weight (:func:`eligible` must hold).
      generation: TPU generation for :func:`block_sizes` (default: the current device's).
      blocks: ``(bn, bk)`` overriding the table (bn a multiple of 128, bk of 256).

    Raises:
      ValueError: An ineligible weight or bad block sizes.
    """
    why = eligible(w)
    if why:
        raise ValueError(f"the TPU uniform kernel cannot take this weight: {why}")
    n, k = w.shape
    bn, bk = common.choose_blocks(n, k, generation, blocks)
    n_pad, k_pad = util.round_up(n, bn), util.round_up(k, bk)
    codes = np.zeros((k_pad, n_pad), np.uint32)
    codes[:k, :n] = np.asarray(w.codes()).T
    planes = common.pack_planes(codes, w.bits, bk)
    if w.group_size >= k:  # per output channel: one row of scales for every K tile
        kg, groups = k_pad, np.zeros(1, np.int64)
    else:
        kg = math.gcd(w.group_size, bk)
        groups = np.minimum(np.arange(0, k_pad, kg) // w.group_size, w.scales.shape[1] - 1)

    def per_kernel_group(a: jax.Array) -> jax.Array:
        out = np.zeros((k_pad // kg, n_pad), np.float32)
        out[:, :n] = np.asarray(a, np.float32)[:, groups].T
        return jnp.asarray(out)

    return TpuUniformWeight(
        planes=tuple(planes), scales=per_kernel_group(w.scales),
        zeros=None if w.zeros is None else per_kernel_group(w.zeros),
        shape=(n, k), bits=w.bits, kg=kg, bn=bn, bk=bk)


def _tile(*refs: Any, bits: int, kg: int, bk: int, symmetric: bool,
          whole_scales: bool) -> jax.Array:
    """The dequantized float32 ``[bk, bn]`` tile of this grid step."""
    n_planes = len(packing.plane_widths(bits))
    codes = common.unpack_tile(refs[:n_planes], bits)
    s_ref, z_ref = refs[n_planes], (None if symmetric else refs[n_planes + 1])
    bn = codes.shape[1]
    r = max(bk // kg, 1)  # stored scale rows per K tile

    def expand(ref: Any) -> jax.Array:  # this K tile's rows -> [bk, bn]
        if kg >= bk:  # per output channel: the block is the one row
            return jnp.broadcast_to(ref[...], (bk, bn))
        # whole_scales: the block holds every K tile's rows; take this tile's
        a = (ref[pl.ds(pl.multiple_of(pl.program_id(2) * r, r), r), :] if whole_scales
             else ref[...])
        return jnp.broadcast_to(a[:, None, :], (r, kg, bn)).reshape(bk, bn)

    z = jnp.float32(2 ** (bits - 1)) if symmetric else expand(z_ref)
    return (codes.astype(jnp.float32) - z) * expand(s_ref)


@functools.partial(jax.jit, static_argnames=("interpret",))
def uniform_matmul(x: jax.Array, w: TpuUniformWeight, *, interpret: bool | Any = False
                   ) -> jax.Array:
    """``x @ W^T`` for ``x [..., K]`` (float) and a weight in the kernel layout.

    Args:
      x: Activations; float32 runs the MXU at full float32 precision, bf16 natively.
      w: :func:`relayout` output.
      interpret: ``True`` runs the kernel in the Pallas TPU interpreter (any backend;
        tests on CPU), or pass ``pltpu.InterpretParams(...)``.

    Returns:
      ``[..., N]`` in ``x``'s dtype.
    """
    bn, bk, kg = w.bn, w.bk, w.kg
    # Scale rows per K tile: a blocked spec needs a multiple of 8 rows (TPU tiling);
    # fewer (e.g. 4 groups of 128 in a 512-row tile) -> the block spans all K tiles'
    # rows (fetched once per N tile) and the kernel slices this tile's rows.
    rows = bk // kg if kg < bk else 1
    whole_scales = kg < bk and rows % 8 != 0
    if kg >= bk:
        s_spec = pl.BlockSpec((1, bn), lambda i, j, kk: (0, j))
    elif whole_scales:
        s_spec = pl.BlockSpec((w.scales.shape[0], bn), lambda i, j, kk: (0, j))
    else:
        s_spec = pl.BlockSpec((rows, bn), lambda i, j, kk: (kk, j))
    side = [w.scales] + ([] if w.zeros is None else [w.zeros])
    return common.dequant_matmul(
        x, [*w.planes, *side], [*common.plane_specs(w.bits, bn, bk), *[s_spec] * len(side)],
        tile=functools.partial(_tile, bits=w.bits, kg=kg, bk=bk, symmetric=w.zeros is None,
                               whole_scales=whole_scales),
        shape=w.shape, padded=w.padded, bn=bn, bk=bk, bits=w.bits,
        extra_tile_bytes=len(side) * 4 * bn * (w.scales.shape[0] if whole_scales else rows),
        interpret=interpret)


register_kernel(TpuUniformWeight, uniform_matmul, platform="tpu")


#: The jnp reference (``x @ dequantize(W)^T``, float32 HIGHEST) the tests compare with.
reference = dequant_reference


def main() -> None:
    """Benchmark on a TPU (Llama-2-7B shapes; median of 20 after warm-up)."""
    from jaxquant.algorithms.rtn import rtn

    if tpu_generation() is None:
        print("no TPU here: the benchmark needs one (tests run the kernel interpreted)")
        return
    rng = np.random.default_rng(0)
    for n, k in ((4096, 4096), (11008, 4096), (4096, 11008)):
        wf = jnp.asarray(rng.normal(size=(n, k)).astype(np.float32))
        for bits in (4, 3, 2):
            tw = relayout(rtn(wf, bits=bits, group_size=128, symmetric=False))
            for m in (1, 16, 512):
                x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
                us = util.wall_us(uniform_matmul, x, tw, runs=20)
                print(f"{n}x{k} {bits}-bit M={m}: {us:.1f} us")


if __name__ == "__main__":
    main()
