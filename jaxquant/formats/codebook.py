"""Per-column codebook quantization (CLAQ's K-Means format).

``W[n, k] = C[k, q[n, k]]``: every input channel ``k`` (a column of the
``[out, in]`` weight) has its own table of ``2**bits`` float centroids ``C[k]``, and
each weight stores a ``bits``-bit index into its column's table, bit-packed along the
input axis like uniform codes (:mod:`jaxquant.formats.packing`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.formats import packing
from jaxquant.formats.base import QuantizedWeight, register_format, static


@register_format
@dataclasses.dataclass(frozen=True, kw_only=True)
class CodebookWeight(QuantizedWeight):
    """A per-column codebook-quantized ``[out, in]`` weight."""

    NAME = "codebook"

    planes: tuple[jax.Array, ...]  # bit-packed indices, uint32 [out, words] per plane
    codebook: jax.Array  # [in, 2**bits] float centroids, one table per input channel
    shape: tuple[int, int] = static()  # (out_features, in_features)
    bits: int = static()  # index width

    @property
    def dtype(self) -> Any:
        return self.codebook.dtype

    def indices(self) -> jax.Array:
        """Unpacked int32 indices ``[out, in]``."""
        return packing.unpack(self.planes, self.bits, self.shape[1])

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        table = self.codebook.astype(jnp.float32)[None]  # [1, in, C]
        w = jnp.take_along_axis(table, self.indices()[..., None], axis=-1)[..., 0]
        return w.astype(dtype)

    def summary(self) -> str:
        n, k = self.shape
        return (f"codebook {self.bits}-bit per-column {jnp.dtype(self.dtype).name} tables, "
                f"{n}x{k}, {self.bits_per_weight:.3f} bits/weight")

    @classmethod
    def from_indices(cls, indices: jax.Array, codebook: jax.Array, *, bits: int
                     ) -> CodebookWeight:
        """Packs int indices ``[out, in]`` with their ``[in, 2**bits]`` tables."""
        n, k = indices.shape
        if codebook.shape != (k, 2 ** bits):
            raise ValueError(f"codebook must be [{k}, {2 ** bits}], got {codebook.shape}")
        return cls(planes=packing.pack(indices, bits), codebook=codebook,
                   shape=(int(n), int(k)), bits=bits)


def storage_bits(shape: tuple[int, int], *, bits: int, codebook_dtype: Any) -> int:
    """Exact bits a :class:`CodebookWeight` of this shape holds (without building it)."""
    n, k = shape
    table = k * 2 ** bits * np.dtype(codebook_dtype).itemsize * 8
    return n * 32 * packing.row_words(k, bits) + table
