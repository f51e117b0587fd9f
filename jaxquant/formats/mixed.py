"""Mixed precision within one weight: parts of different widths over permuted columns.

SliM-LLM assigns a bit width per group of input channels, CLAQ per input channel.
Both are stored the same way, the way a kernel wants to read them: the input
channels are permuted so that channels of equal width are contiguous, and each
contiguous run is an ordinary format (uniform or codebook) of its own width. With
``perm`` the permutation (permuted column ``j`` is original column ``perm[j]``)::

    W[:, perm] = concat([part.dequantize() for part in parts], axis=1)
    x @ W^T    = sum_i x[..., perm][..., run_i] @ part_i^T

The permutation is stored (int16 where ``in_features < 32768``) and counted in the
storage account.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import ops
from jaxquant.formats.base import QuantizedWeight, register_format, static


@register_format
@dataclasses.dataclass(frozen=True, kw_only=True)
class MixedWeight(QuantizedWeight):
    """An ``[out, in]`` weight stored as parts of different formats over column runs."""

    NAME = "mixed"

    parts: tuple[QuantizedWeight, ...]  # formats over consecutive permuted columns
    perm: jax.Array | None  # [in] original column of each permuted column; None: identity
    shape: tuple[int, int] = static()  # (out_features, in_features)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        widths = [p.shape[1] for p in self.parts if isinstance(p, QuantizedWeight)]
        if len(widths) == len(self.parts) and self.parts and (
                sum(widths) != self.shape[1]
                or any(p.shape[0] != self.shape[0] for p in self.parts)):
            raise ValueError(f"parts {[p.shape for p in self.parts]} do not tile {self.shape}")
        dtype = getattr(self.perm, "dtype", None)
        if (dtype is not None and jnp.issubdtype(dtype, jnp.integer)
                and jnp.iinfo(dtype).max < self.shape[1] - 1):
            raise ValueError(f"a {jnp.dtype(dtype).name} permutation cannot index "
                                 f"{self.shape[1]} columns")

    @property
    def dtype(self) -> Any:
        return self.parts[0].dtype

    @property
    def part_bits(self) -> tuple[int, ...]:
        """Bit width of each part."""
        return tuple(getattr(p, "bits", 0) for p in self.parts)

    def column_bits(self) -> np.ndarray:
        """Bit width of every original input column (host numpy)."""
        bits = np.concatenate([np.full(p.shape[1], b) for p, b in zip(
            self.parts, self.part_bits, strict=True)])
        if self.perm is None:
            return bits
        out = np.empty_like(bits)
        out[np.asarray(self.perm)] = bits
        return out

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        wp = jnp.concatenate([p.dequantize(jnp.float32) for p in self.parts], axis=1)
        if self.perm is not None:
            wp = jnp.zeros_like(wp).at[:, self.perm.astype(jnp.int32)].set(wp)
        return wp.astype(dtype)

    def linear(self, x: jax.Array) -> jax.Array:
        if self.perm is not None:
            x = jnp.take(x, self.perm.astype(jnp.int32), axis=-1)
        y, start = None, 0
        # Each part comes back in x's dtype (rounded once per part when x is bf16: the
        # kernels and the jnp path both return x's dtype); the sum is taken in float32.
        for part in self.parts:
            k = part.shape[1]
            term = ops.linear(x[..., start:start + k], part).astype(jnp.float32)
            y = term if y is None else y + term
            start += k
        return y.astype(x.dtype)

    def summary(self) -> str:
        n, k = self.shape
        runs = ", ".join(f"{p.shape[1]}@{b}b" for p, b in zip(self.parts, self.part_bits,
                                                               strict=True))
        avg = sum(p.shape[1] * b for p, b in zip(self.parts, self.part_bits, strict=True)) / k
        return (f"mixed {type(self.parts[0]).NAME} [{runs}] avg {avg:.2f}-bit codes, {n}x{k}, "
                f"{self.bits_per_weight:.3f} bits/weight")

    @staticmethod
    def perm_dtype(k: int) -> Any:
        """Smallest integer dtype for a permutation of ``k`` columns."""
        return jnp.int16 if k < 2 ** 15 else jnp.int32
