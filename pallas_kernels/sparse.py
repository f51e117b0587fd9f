"""Float outliers over a kernel-layout base: ``y = x W_base^T + sparse correction``.

For an :class:`jaxquant.formats.OutlierWeight` (CLAQ's reserved weights, SpQR-style),
the bulk runs through the base format's kernel and the outliers add
``y[..., r] += x[..., c] (v - base[r, c])`` for each kept weight ``(r, c, v)``: a
gather of ``x`` columns and a scatter-add into ``y`` (about 1% of the weights), in jnp.
The deltas ``v - base[r, c]`` are computed once by :func:`relayout`. Backend-neutral:
any kernel layout that :func:`jaxquant.ops.linear` dispatches can be the base.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.formats.outliers import OutlierWeight
from jaxquant.ops import linear as ops_linear
from jaxquant.ops import register_linear


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseCorrectedWeight:
    """A kernel-layout base plus sparse float corrections (see the module docstring)."""

    base: Any  # the base weight, in a kernel layout (or any linear-dispatched type)
    rows: jax.Array  # int32 [n] output row of each outlier
    cols: jax.Array  # int32 [n] input column of each outlier
    delta: jax.Array  # float32 [n] outlier value minus the base's value there
    shape: tuple[int, int] = dataclasses.field(metadata={"static": True})  # (N, K)


def relayout(w: OutlierWeight, base: Any) -> SparseCorrectedWeight:
    """``w``'s outliers over ``base`` (``w.base`` already in a kernel layout)."""
    n, k = w.shape
    index = np.asarray(w.index, np.int64)
    rows, cols = index // k, index % k
    base_vals = np.asarray(w.base.dequantize(jnp.float32))[rows, cols]
    delta = np.asarray(w.values, np.float32) - base_vals
    return SparseCorrectedWeight(base=base, rows=jnp.asarray(rows, jnp.int32),
                                 cols=jnp.asarray(cols, jnp.int32),
                                 delta=jnp.asarray(delta), shape=(n, k))


def linear(x: jax.Array, w: SparseCorrectedWeight) -> jax.Array:
    """:func:`jaxquant.ops.linear` for :class:`SparseCorrectedWeight`."""
    y = ops_linear(x, w.base).astype(jnp.float32)
    contrib = jnp.take(x, w.cols, axis=-1).astype(jnp.float32) * w.delta
    y = y.at[..., w.rows].add(contrib)
    return y.astype(x.dtype)


register_linear(SparseCorrectedWeight, linear)
