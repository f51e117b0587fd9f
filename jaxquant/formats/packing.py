"""Bit-packing of b-bit integer codes into uint32 words along the input axis.

A b-bit code is split into *planes* of power-of-two widths, the binary digits of b
from the top (3 = 2 + 1, 4 = 4, 6 = 4 + 2): the first plane holds the code's lowest
bits, the next plane the bits above them. A plane of width w stores ``32 / w`` codes
per uint32 word, code ``j`` of a word in bits ``[j*w, (j+1)*w)`` (little-endian), and
the words run along the last (input) axis, which is padded with zero codes to a whole
word. So a b-bit weight really takes b bits (plus at most one partial word per row
and plane): 3-bit codes are a 2-bit plane and a 1-bit plane, with no wasted bits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def plane_widths(bits: int) -> tuple[int, ...]:
    """Widths of the planes that store ``bits``-bit codes, e.g. 3 -> (2, 1)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bit width must be one of {SUPPORTED_BITS}, got {bits}")
    return tuple(w for w in (8, 4, 2, 1) if bits & w)


def packed_words(k: int, width: int) -> int:
    """uint32 words per row for ``k`` codes in a plane of ``width`` bits."""
    per = 32 // width
    return -(-k // per)


def row_words(k: int, bits: int) -> int:
    """uint32 words per row for ``k`` codes of ``bits`` bits, over all planes."""
    return sum(packed_words(k, w) for w in plane_widths(bits))


def pack(codes: jax.Array | np.ndarray, bits: int) -> tuple[jax.Array, ...]:
    """Packs integer codes ``[..., K]`` in ``[0, 2**bits)`` into uint32 planes.

    Returns:
      One ``uint32 [..., packed_words(K, w)]`` array per plane width ``w``.
    """
    # Host arrays are packed with NumPy: no per-shape compilation for eager jnp ops
    # (quantizers that produce many part shapes, such as SliM-LLM's, pack on the host).
    xp = np if isinstance(codes, np.ndarray) else jnp
    codes = xp.asarray(codes).astype(xp.uint32)
    k = codes.shape[-1]
    planes, shift = [], 0
    for width in plane_widths(bits):
        per = 32 // width
        words = packed_words(k, width)
        part = (codes >> xp.uint32(shift)) & xp.uint32((1 << width) - 1)
        part = xp.pad(part, [(0, 0)] * (part.ndim - 1) + [(0, words * per - k)])
        part = part.reshape(*part.shape[:-1], words, per)
        offsets = xp.arange(per, dtype=xp.uint32) * xp.uint32(width)
        # Fields are disjoint, so the sum is an OR.
        planes.append(jnp.asarray(xp.sum(part << offsets, axis=-1, dtype=xp.uint32)))
        shift += width
    return tuple(planes)


def unpack(planes: tuple[jax.Array, ...], bits: int, k: int) -> jax.Array:
    """Inverse of :func:`pack`: int32 codes ``[..., k]``."""
    widths = plane_widths(bits)
    if len(planes) != len(widths):
        raise ValueError(f"{bits}-bit codes need {len(widths)} planes, got {len(planes)}")
    codes, shift = None, 0
    for plane, width in zip(planes, widths, strict=True):
        per = 32 // width
        offsets = jnp.arange(per, dtype=jnp.uint32) * width
        part = (plane[..., None] >> offsets) & jnp.uint32((1 << width) - 1)
        part = part.reshape(*plane.shape[:-1], plane.shape[-1] * per)[..., :k]
        part = part.astype(jnp.int32) << shift
        codes = part if codes is None else codes | part
        shift += width
    return codes
