"""Shared pieces of the TPU dequant-matmul kernels: the strided bit-plane layout and the
tiled ``x @ W`` pipeline with a float32 accumulator.

Every kernel here computes ``y = x W^T`` with the weight stored transposed, ``[K, N]``
(input rows on sublanes, outputs on lanes), padded to whole ``[bk, bn]`` tiles. Codes
(or codebook indices) are split into the bit planes of :mod:`jaxquant.formats.packing`
(3 = 2 + 1); a plane of width ``w`` packs ``p = 32 / w`` codes per uint32 *strided
within each K tile*: word row ``r`` of tile ``t`` holds rows ``t bk + j (bk / p) + r``
at bits ``[j w, (j + 1) w)``, ``j < p``. Unpacking is ``p`` whole-tile shifts and masks
stacked along sublanes: no lane shuffles. ``bk`` is a multiple of 256, so even the
1-bit plane's tile has whole 8-row sublane groups.

Grid ``(M / bm, N / bn, K / bk)``, K innermost and sequential (the accumulator), the
others parallel; a kernel supplies only the function that turns its refs into the
float32 ``[bk, bn]`` weight tile.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.formats import packing
from pallas_kernels.compat import pl, pltpu, tpu_compiler_params, tpu_interpret
from pallas_kernels.util import round_up

#: (bn, bk) per TPU generation: output lanes and input rows per weight tile.
NK_BLOCKS: dict[str, tuple[int, int]] = {
    "v4": (512, 1024),
    "v5e": (512, 1024),
    "v5p": (512, 1024),
    "v6e": (1024, 1024),
}
FALLBACK_NK = (256, 512)
#: Largest M block; M is padded to a multiple of 16 (bf16 sublane packing).
BM_MAX = 256
VMEM_CAP = 48 * 2**20


def tpu_generation(device: Any | None = None) -> str | None:
    """``"v4"``, ``"v5e"``, ``"v5p"``, ``"v6e"``... from a device kind, else ``None``."""
    try:
        kind = (device or jax.devices()[0]).device_kind.lower()
    except Exception:  # no devices at all
        return None
    if "tpu" not in kind:
        return None
    for gen, keys in (("v6e", ("v6",)), ("v5e", ("v5 lite", "v5e")), ("v5p", ("v5p", "v5")),
                      ("v4", ("v4",))):
        if any(k in kind for k in keys):
            return gen
    return None


def block_sizes(n: int, k: int, generation: str | None = None) -> tuple[int, int]:
    """``(bn, bk)`` for an ``[n, k]`` weight: the generation's entry, shrunk for small
    weights (never below 128 lanes / 256 rows), else the safe fallback."""
    bn, bk = NK_BLOCKS.get(generation or "", FALLBACK_NK)
    bn = min(bn, max(128, round_up(n, 128)))
    bk = min(bk, max(256, round_up(k, 256)))
    return bn, bk


def choose_blocks(n: int, k: int, generation: str | None,
                  blocks: tuple[int, int] | None) -> tuple[int, int]:
    """:func:`block_sizes` (for the current TPU unless ``generation``), or ``blocks``."""
    bn, bk = blocks or block_sizes(n, k, generation or tpu_generation())
    if bn % 128 or bk % 256:
        raise ValueError(f"blocks must be (multiple of 128, multiple of 256), got {(bn, bk)}")
    return bn, bk


def pack_planes(codes_kn: np.ndarray, bits: int, bk: int) -> tuple[jax.Array, ...]:
    """``uint32 [K_pad, N_pad]`` codes (K_pad a multiple of ``bk``) -> strided planes."""
    k_pad, n_pad = codes_kn.shape
    planes, shift = [], 0
    for width in packing.plane_widths(bits):
        per = 32 // width
        part = (codes_kn >> np.uint32(shift)) & np.uint32((1 << width) - 1)
        part = part.reshape(k_pad // bk, per, bk // per, n_pad)
        offsets = (np.arange(per, dtype=np.uint32) * np.uint32(width))[None, :, None, None]
        words = np.bitwise_or.reduce(part << offsets, axis=1)  # fields are disjoint
        planes.append(jnp.asarray(words.reshape(k_pad // per, n_pad)))
        shift += width
    return tuple(planes)


def unpack_planes_jnp(planes: Sequence[jax.Array], bits: int, bk: int) -> jax.Array:
    """Inverse of :func:`pack_planes` in plain jnp: int32 ``[K_pad, N_pad]``."""
    codes, shift = None, 0
    for plane, width in zip(planes, packing.plane_widths(bits), strict=True):
        per = 32 // width
        k_pad, n_pad = plane.shape[0] * per, plane.shape[1]
        words = plane.reshape(k_pad // bk, 1, bk // per, n_pad)
        offsets = (jnp.arange(per, dtype=jnp.uint32) * width)[None, :, None, None]
        part = ((words >> offsets) & jnp.uint32((1 << width) - 1)).astype(jnp.int32)
        part = part.reshape(k_pad, n_pad) << shift
        codes = part if codes is None else codes | part
        shift += width
    return codes


def unpack_tile(plane_refs: Sequence[Any], bits: int) -> jax.Array:
    """In a kernel: one K tile of the planes -> int32 codes ``[bk, bn]``."""
    codes, shift = None, 0
    for plane_ref, width in zip(plane_refs, packing.plane_widths(bits), strict=True):
        words = plane_ref[...]
        mask = jnp.uint32((1 << width) - 1)
        rows = [(words >> jnp.uint32(j * width)) & mask for j in range(32 // width)]
        part = (jnp.concatenate(rows, axis=0) if len(rows) > 1 else rows[0]).astype(jnp.int32)
        part = part << shift if shift else part
        codes = part if codes is None else codes | part
        shift += width
    return codes


def plane_specs(bits: int, bn: int, bk: int) -> list[Any]:
    """Block specs of the planes (one K tile, one N tile)."""
    return [pl.BlockSpec((bk // (32 // w), bn), lambda i, j, kk: (kk, j))
            for w in packing.plane_widths(bits)]


def vmem_bytes(bm: int, bn: int, bk: int, bits: int, x_itemsize: int,
               extra_tile_bytes: int = 0) -> int:
    """Estimated VMEM of one grid step: double-buffered inputs (x, planes, per-tile
    side data) and output, the accumulator, and the unpacked/dequantized temporaries."""
    inputs = bm * bk * x_itemsize + bk * bn * bits // 8 + extra_tile_bytes
    return 2 * (inputs + bm * bn * x_itemsize) + bm * bn * 4 + 3 * bk * bn * 4


def _kernel(*refs: Any, n_in: int, tile: Callable[..., jax.Array], precision: Any) -> None:
    x_ref, in_refs, (o_ref, acc_ref) = refs[0], refs[1:n_in], refs[n_in:]

    @pl.when(pl.program_id(2) == 0)
    def _init() -> None:
        acc_ref[...] = jnp.zeros_like(acc_ref)

    x = x_ref[...]
    w = tile(*in_refs)
    acc_ref[...] += jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32,
                            precision=precision)

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _done() -> None:
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def dequant_matmul(x: jax.Array, operands: Sequence[jax.Array], specs: Sequence[Any], *,
                   tile: Callable[..., jax.Array], shape: tuple[int, int],
                   padded: tuple[int, int], bn: int, bk: int, bits: int,
                   extra_tile_bytes: int = 0, interpret: bool | Any = False) -> jax.Array:
    """``x [..., K] @ W^T`` where ``tile(*refs)`` dequantizes one ``[bk, bn]`` tile.

    Args:
      x: Activations (float32: full-precision MXU passes; bf16 natively).
      operands: The weight's arrays, in kernel layout; ``specs`` their block specs.
      tile: In-kernel function of the operands' refs -> float32 ``[bk, bn]``.
      shape: ``(N, K)``; ``padded``: ``(N_pad, K_pad)``.
      bn, bk: The weight tile. bits: Code bits (VMEM estimate).
      extra_tile_bytes: Per-tile side data (scales, codebooks) for the VMEM estimate.
      interpret: ``True`` runs the Pallas TPU interpreter (any backend).

    Returns:
      ``[..., N]`` in ``x``'s dtype.
    """
    n, k = shape
    n_pad, k_pad = padded
    lead = x.shape[:-1]
    m = math.prod(lead)
    bm = min(BM_MAX, round_up(max(m, 1), 16))
    m_pad = round_up(m, bm)
    x2 = jnp.pad(x.reshape(m, k), ((0, m_pad - m), (0, k_pad - k)))
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    vmem = vmem_bytes(bm, bn, bk, bits, x.dtype.itemsize, extra_tile_bytes)
    out = pl.pallas_call(
        functools.partial(_kernel, n_in=1 + len(operands), tile=tile, precision=precision),
        grid=(m_pad // bm, n_pad // bn, k_pad // bk),
        in_specs=[pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)), *specs],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), x.dtype),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=tpu_compiler_params(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=min(VMEM_CAP, max(16 * 2**20, 2 * vmem))),
        interpret=tpu_interpret(interpret),
    )(x2, *operands)
    return out[:m, :n].reshape(*lead, n)
