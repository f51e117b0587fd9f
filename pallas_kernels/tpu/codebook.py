"""Mosaic TPU kernel: ``y = x W^T`` for a per-column codebook weight (CLAQ's format).

Computes ``y[m, n] = sum_k x[m, k] C[k, q[n, k]]`` for a
:class:`jaxquant.formats.CodebookWeight`: every input channel ``k`` has its own table of
``2**bits`` float centroids. Layout (:func:`relayout`, once per weight): the indices in
the strided bit planes of :mod:`pallas_kernels.tpu.common` (``[K, N]``, whole tiles);
the tables float32 ``[K_pad, 2**bits]`` (a block is one K tile's rows, the table axis
whole). In VMEM a tile's weights are picked from the tables by a select chain over the
``2**bits`` entries (``w = where(q == c, C[:, c], w)``), vector selects with the table
column broadcast along lanes; no gathers. The pipeline is
:func:`pallas_kernels.tpu.common.dequant_matmul`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.formats.codebook import CodebookWeight
from jaxquant.ops import register_kernel
from pallas_kernels import util
from pallas_kernels.compat import pl
from pallas_kernels.reference import dequant_reference
from pallas_kernels.tpu import common

#: Largest index width the select chain takes (2**6 = 64 selects per element).
MAX_BITS = 6


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class TpuCodebookWeight:
    """A :class:`CodebookWeight` in the kernel layout (see the module docstring)."""

    planes: tuple[jax.Array, ...]  # uint32 [K_pad / (32 / w), N_pad] per plane width w
    codebook: jax.Array  # float32 [K_pad, 2**bits]; padded rows are zeros
    shape: tuple[int, int] = dataclasses.field(metadata={"static": True})  # (N, K)
    n_pad: int = dataclasses.field(metadata={"static": True})  # N padded to bn
    bits: int = dataclasses.field(metadata={"static": True})  # index width
    bn: int = dataclasses.field(metadata={"static": True})  # output lanes per tile
    bk: int = dataclasses.field(metadata={"static": True})  # input rows per tile

    @property
    def padded(self) -> tuple[int, int]:
        """``(N_pad, K_pad)``."""
        return self.n_pad, int(self.codebook.shape[0])

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """The ``[N, K]`` weight back from the kernel layout (jnp; a test reference)."""
        idx = common.unpack_planes_jnp(self.planes, self.bits, self.bk)
        w = jnp.take_along_axis(self.codebook, idx, axis=1)
        n, k = self.shape
        return w[:k, :n].T.astype(dtype)


def eligible(w: Any) -> str | None:
    """``None`` when :func:`relayout` can take ``w``, else the reason it cannot."""
    if not isinstance(w, CodebookWeight):
        return f"not a CodebookWeight ({type(w).__name__})"
    if w.bits > MAX_BITS:
        return f"{w.bits}-bit indices (the select chain takes at most {MAX_BITS})"
    return None


def relayout(w: CodebookWeight, *, generation: str | None = None,
             blocks: tuple[int, int] | None = None) -> TpuCodebookWeight:
    """The kernel layout of ``w`` (host NumPy work, once per weight).

    Raises:
      ValueError: An ineligible weight or bad block sizes.
    """
    why = eligible(w)
    if why:
        raise ValueError(f"the TPU codebook kernel cannot take this weight: {why}")
    n, k = w.shape
    bn, bk = common.choose_blocks(n, k, generation, blocks)
    n_pad, k_pad = util.round_up(n, bn), util.round_up(k, bk)
    idx = np.zeros((k_pad, n_pad), np.uint32)
    idx[:k, :n] = np.asarray(w.indices()).T
    table = np.zeros((k_pad, 2 ** w.bits), np.float32)
    table[:k] = np.asarray(w.codebook, np.float32)
    return TpuCodebookWeight(planes=common.pack_planes(idx, w.bits, bk),
                             codebook=jnp.asarray(table), shape=(n, k), n_pad=n_pad,
                             bits=w.bits, bn=bn, bk=bk)


def _tile(*refs: Any, bits: int) -> jax.Array:
    """The float32 ``[bk, bn]`` tile: each weight picked from its row's table."""
    idx = common.unpack_tile(refs[:-1], bits)
    table = refs[-1][...]  # [bk, 2**bits]
    w = jnp.zeros(idx.shape, jnp.float32)
    for c in range(2 ** bits):
        w = jnp.where(idx == c, table[:, c:c + 1], w)
    return w


@functools.partial(jax.jit, static_argnames=("interpret",))
def codebook_matmul(x: jax.Array, w: TpuCodebookWeight, *, interpret: bool | Any = False
                    ) -> jax.Array:
    """``x @ W^T`` for ``x [..., K]`` (float) and a weight in the kernel layout.

    Args:
      x: Activations; float32 runs the MXU at full float32 precision, bf16 natively.
      w: :func:`relayout` output.
      interpret: ``True`` runs the Pallas TPU interpreter (any backend; CI on CPU).

    Returns:
      ``[..., N]`` in ``x``'s dtype.
    """
    bn, bk, entries = w.bn, w.bk, 2 ** w.bits
    table_spec = pl.BlockSpec((bk, entries), lambda i, j, kk: (kk, 0))
    return common.dequant_matmul(
        x, [*w.planes, w.codebook], [*common.plane_specs(w.bits, bn, bk), table_spec],
        tile=functools.partial(_tile, bits=w.bits), shape=w.shape, padded=w.padded,
        bn=bn, bk=bk, bits=w.bits, extra_tile_bytes=4 * bk * 128, interpret=interpret)


register_kernel(TpuCodebookWeight, codebook_matmul, platform="tpu")


#: The jnp reference (``x @ dequantize(W)^T``, float32 HIGHEST) the tests compare with.
reference = dequant_reference


def main() -> None:
    """Benchmark on a TPU (Llama-2-7B shapes; median of 20 after warm-up)."""
    if common.tpu_generation() is None:
        print("no TPU here: the benchmark needs one (tests run the kernel interpreted)")
        return
    rng = np.random.default_rng(0)
    for n, k in ((4096, 4096), (11008, 4096), (4096, 11008)):
        for bits in (4, 3, 2):
            idx = jnp.asarray(rng.integers(0, 2 ** bits, (n, k)))
            table = jnp.asarray(np.sort(rng.normal(size=(k, 2 ** bits)), 1), jnp.float16)
            tw = relayout(CodebookWeight.from_indices(idx, table, bits=bits))
            for m in (1, 16, 512):
                x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
                us = util.wall_us(codebook_matmul, x, tw, runs=20)
                print(f"{n}x{k} {bits}-bit codebook M={m}: {us:.1f} us")


if __name__ == "__main__":
    main()
