"""Float outliers: a sparse set of weights kept exactly, over any base format.

``W = base.dequantize()`` with the entries at flat positions ``index`` (row-major in
the ``[out, in]`` matrix) replaced by ``values``, exactly (CLAQ's outlier reservation;
SpQR's sparse outliers). Indices are int32 and values float; both are counted in the
storage account. The jnp matmul path dequantizes; a kernel adds the sparse
correction ``x[..., col] * (value - base value)`` to the base matmul instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.formats.base import QuantizedWeight, register_format, static


@register_format
@dataclasses.dataclass(frozen=True, kw_only=True)
class OutlierWeight(QuantizedWeight):
    """A base format plus sparse float weights that override it."""

    NAME = "outliers"

    base: QuantizedWeight  # the quantized bulk of the weight
    index: jax.Array  # int32 [n] flat row-major positions in [out, in]
    values: jax.Array  # [n] float: the exact weights at those positions
    shape: tuple[int, int] = static()  # (out_features, in_features)

    @property
    def dtype(self) -> Any:
        return self.base.dtype

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        n, k = self.shape
        w = self.base.dequantize(jnp.float32).reshape(n * k)
        w = w.at[self.index].set(self.values.astype(jnp.float32))
        return w.reshape(n, k).astype(dtype)

    def summary(self) -> str:
        frac = self.index.shape[0] / self.num_weights
        return (f"{self.base.summary().split(',')[0]} + {self.index.shape[0]} float outliers "
                f"({100 * frac:.2f}%), {self.shape[0]}x{self.shape[1]}, "
                f"{self.bits_per_weight:.3f} bits/weight")


def storage_bits(count: int, *, value_dtype: Any) -> int:
    """Bits that ``count`` outliers add to their base format (int32 index + value)."""
    return count * (32 + np.dtype(value_dtype).itemsize * 8)
