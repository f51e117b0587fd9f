"""CLAQ: column-level K-Means codebooks in the GPTQ sweep (Wang et al., 2024, arXiv 2405.17233).

Every input channel (column ``j`` of ``W [out, in]``) gets its own codebook of
``2**b_j`` float centroids, found by 1-D K-Means over the column's ``out`` values
*inside* the GPTQ sweep, so each column is fitted after the error of the columns
before it has been compensated (Frantar et al., 2023, Alg. 1 with a codebook
quantizer: ``err = (w - Q(w)) / U_jj``, spread over later columns by ``U``). Two
refinements of the paper:

* **Outlier-guided adaptive precision (AP)**: an outlier is ``|w| >= t mean|W|``
  (``t = 13``, the mean over the whole matrix); columns are ranked by their number of
  outliers (ties by Hessian-weighted column energy ``H_jj sum_i w_ij^2``, a
  deterministic order where the reference's sort is unstable), and for a fractional
  budget ``B`` the top fraction ``(B - lo) / (hi - lo)`` gets ``hi = 4`` bits and the
  rest ``lo = floor(B)`` (2.1 bits: 5% of the columns at 4 bits; 3.12: 12%).
* **Outlier reservation (OR)**: in each column the largest-magnitude weights, as the
  sweep reaches the column, are kept exactly in float (a column whose outlier count is
  in the top 10% keeps 3.5x as many, the reference's 1.4% / 0.4% per tail), stored
  sparse and counted in the storage account. Their error is zero, so nothing of them
  propagates.

Differences from the released code (fayuge/CLAQ), on purpose: the codebook is fitted
*without* the reserved weights (the reference fits it on the whole column and then
overrides the tails, wasting centroids on values that never use them); every column
reads its own reservation ratio (the reference indexes it with the in-block column,
so every block reuses the first block's ratios); reserved weights are chosen by
magnitude (the reference keeps the signed tails); ties in the ranking are broken
deterministically; the Cholesky's damping is raised when it fails.

K-Means runs on device under ``jit`` (:func:`jaxquant.algorithms.kmeans.kmeans_1d`):
at the start of each block of 128 columns all its columns are fitted at once (the
block's weights after the lazy updates of the earlier blocks), and inside the column
loop each column's codebook is refined from that start by a few Lloyd iterations on
the column as compensated by the columns before it in the block. (The reference runs
one scikit-learn K-Means per column on the CPU, ~300 iterations from k-means++.)

The budget is the average code width, as the paper labels it (2.1 bits: 5% of the
columns at 4 bits), or with ``total_bits`` the average of everything stored, the
codebooks (``16 * 2**b / out`` bits per weight in float16: 0.04 to 1.3 bits on a
135M model's layers, 0.02 to 0.06 on a 7B model's), the permutation and the reserved
weights included (:func:`code_bits_for_total`).

The result is a :class:`CodebookWeight` (one width, in the original column order), or
with several widths a :class:`MixedWeight` of codebook parts over permuted columns,
wrapped in an :class:`OutlierWeight` when weights are reserved.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.algorithms.gptq import inverse_cholesky, prepare_hessian
from jaxquant.algorithms.kmeans import kmeans_1d, nearest_centroid
from jaxquant.formats.base import QuantizedWeight
from jaxquant.formats.codebook import CodebookWeight
from jaxquant.formats.codebook import storage_bits as codebook_storage_bits
from jaxquant.formats.mixed import MixedWeight
from jaxquant.formats.outliers import OutlierWeight
from jaxquant.formats.outliers import storage_bits as outlier_storage_bits


class BudgetError(ValueError):
    """A total bit budget that a layer cannot meet (its codebooks alone exceed it)."""


#: Outlier-heavy columns (top 10% by outlier count) keep this many times more weights.
HEAVY_FRACTION, HEAVY_FACTOR = 0.1, 3.5


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClaqConfig:
    """CLAQ's options; every part can be switched off for ablations."""

    bits: float = 3.0  # average code width over columns, 2..8 (fractional with adaptive)
    # True: ``bits`` is the average of everything stored per weight (codes, codebooks,
    # column permutation, reserved weights and their positions; ``quantize`` meets it
    # over all CLAQ layers of a spec together); False: the average code width, as the
    # paper labels its budgets.
    total_bits: bool = False
    adaptive: bool = True  # AP: outlier-heavy columns get 4 bits to meet a fractional budget
    outlier_ratio: float = 0.0  # OR: fraction of all weights kept in float (0: off)
    outlier_threshold: float = 13.0  # |w| >= t mean|W| is an outlier (AP ranking, OR split)
    kmeans: bool = True  # K-Means codebooks; False: evenly spaced levels (RTN per column)
    act_order: bool = True  # sweep columns by decreasing Hessian diagonal (as published)
    damp: float = 0.01  # relative Hessian damping (raised automatically on failure)
    block_size: int = 128  # columns per lazy batch update and per block K-Means fit
    block_iters: int = 24  # Lloyd iterations of the block-start fit
    column_iters: int = 4  # Lloyd iterations refining each column after compensation
    codebook_dtype: Any = jnp.float16  # storage dtype of centroids and reserved weights

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"CLAQ needs 2 to 8 average bits, got {self.bits}")
        if (self.bits != int(self.bits) or self.total_bits) and not self.adaptive:
            raise ValueError(f"a fractional or total budget ({self.bits}) needs adaptive "
                             "precision (drop --no-adaptive)")
        if not 0 <= self.outlier_ratio < 0.5:
            raise ValueError(f"outlier ratio must be in [0, 0.5), got {self.outlier_ratio}")


def column_bits(outliers: np.ndarray, energy: np.ndarray, bits: float) -> np.ndarray:
    """AP: per-column code widths averaging ``bits`` (up to rounding one column).

    Columns are ranked by ``outliers`` (descending), ties by ``energy`` (descending),
    then by index; the top ``round(k (B - lo) / (hi - lo))`` get ``hi`` bits, where
    ``lo = floor(B)`` and ``hi = 4`` below 4 bits, else ``lo + 1``.
    """
    k = len(outliers)
    lo, hi, n_hi = _split(k, bits)
    out = np.full(k, lo, np.int32)
    order = np.lexsort((np.arange(k), -np.asarray(energy, np.float64),
                        -np.asarray(outliers, np.int64)))
    out[order[:n_hi]] = hi
    return out


def _split(k: int, bits: float) -> tuple[int, int, int]:
    """``(lo, hi, n_hi)``: :func:`column_bits`'s widths and its number of ``hi`` columns."""
    lo = math.floor(bits + 1e-9)
    if bits - lo < 1e-9:
        return lo, lo, 0
    hi = 4 if lo < 4 else lo + 1  # the paper's 2/4 and 3/4 splits below 4 bits
    return lo, hi, round(k * (bits - lo) / (hi - lo))


def stored_bits(rows: int, cols: int, bits: float, *, reserved: int = 0,
                codebook_dtype: Any = jnp.float16) -> int:
    """Exact bits :func:`claq` stores for a ``[rows, cols]`` weight at code budget ``bits``.

    Codes and codebooks of each width, the column permutation when there are two
    widths, and ``reserved`` float weights with their positions, as
    :attr:`QuantizedWeight.bits_per_weight` counts them.
    """
    lo, hi, n_hi = _split(cols, bits)
    total = codebook_storage_bits((rows, cols - n_hi), bits=lo, codebook_dtype=codebook_dtype)
    if n_hi:
        total += codebook_storage_bits((rows, n_hi), bits=hi, codebook_dtype=codebook_dtype)
        total += cols * np.dtype(MixedWeight.perm_dtype(cols)).itemsize * 8
    return total + outlier_storage_bits(reserved, value_dtype=codebook_dtype)


def code_bits_for_total(layers: Sequence[tuple[int, int, int]], budget: float, *,
                        codebook_dtype: Any = jnp.float16) -> float:
    """The code budget at which CLAQ stores at most ``budget`` bits per weight in all.

    Everything stored counts (:func:`stored_bits`): codes, codebooks (``16 * 2**b /
    rows`` bits per weight in float16: 0.04 to 1.3 on a 135M model's layers), the
    permutation of mixed-width layers, the reserved weights and their positions. The
    same code budget applies to every layer, as the paper applies one fraction of
    4-bit columns to all; the largest that keeps the total within ``budget`` is
    returned (to ``1e-6``).

    Args:
      layers: ``(rows, cols, reserved weights)`` of every weight quantized together.
      budget: Average bits per weight over all of them.
      codebook_dtype: Storage dtype of centroids and reserved values.

    Raises:
      BudgetError: Not even 2-bit codes with their codebooks fit the budget.
    """
    weights = sum(n * k for n, k, _ in layers)

    def average(bits: float) -> float:
        return sum(stored_bits(n, k, bits, reserved=r, codebook_dtype=codebook_dtype)
                   for n, k, r in layers) / weights

    if average(2) > budget:
        raise BudgetError(
            f"a CLAQ budget of {budget:g} bits/weight counting everything is too small: 2-bit "
            f"codes with {np.dtype(codebook_dtype).name} codebooks"
            f"{' and the reserved weights' if any(r for *_, r in layers) else ''} take "
            f"{average(2):.3f} here")
    lo = max(b for b in range(2, 9) if average(b) <= budget)
    if lo == 8:
        return 8.0
    # Between two widths the stored bits grow with the budget: bisect.
    good, bad = float(lo), float(lo + 1)
    while bad - good > 1e-6:
        mid = 0.5 * (good + bad)
        good, bad = (mid, bad) if average(mid) <= budget else (good, mid)
    return good


def reserve_counts(outliers: np.ndarray, rows: int, ratio: float) -> np.ndarray:
    """OR: weights kept in float per column; the top 10% by outlier count keep 3.5x."""
    k = len(outliers)
    if ratio <= 0:
        return np.zeros(k, np.int32)
    base = ratio / (1 + HEAVY_FRACTION * (HEAVY_FACTOR - 1))
    heavy = np.zeros(k, bool)
    top = np.argsort(-np.asarray(outliers), kind="stable")[:round(HEAVY_FRACTION * k)]
    heavy[top] = True
    frac = np.where(heavy, base * HEAVY_FACTOR, base)
    return np.minimum(np.round(frac * rows), rows - 1).astype(np.int32)


def _evenly_spaced(x: jax.Array, mask: jax.Array, k: int) -> jax.Array:
    """``[c, k]`` levels evenly spaced over each column's masked range (RTN grid)."""
    lo = jnp.min(jnp.where(mask, x, jnp.inf), axis=0)
    hi = jnp.max(jnp.where(mask, x, -jnp.inf), axis=0)
    lo, hi = jnp.where(jnp.isfinite(lo), lo, 0.0), jnp.where(jnp.isfinite(hi), hi, 0.0)
    t = jnp.linspace(0.0, 1.0, k, dtype=jnp.float32)
    return lo[:, None] + (hi - lo)[:, None] * t[None, :]


def _keep_mask(w: jax.Array, count: jax.Array) -> jax.Array:
    """The ``count[j]`` largest-magnitude entries of each column of ``w [n, c]``.

    Ties go to the lower row. One sort: the first ``count`` rows of the magnitude
    order are scattered back to their places.
    """
    order = jnp.argsort(-jnp.abs(w), axis=0, stable=True)
    first = jnp.arange(w.shape[0])[:, None] < count[None, :]
    return jnp.put_along_axis(jnp.zeros(w.shape, bool), order, first, axis=0, inplace=False)


def _select(which: jax.Array, outs: list[tuple[jax.Array, jax.Array]]
            ) -> tuple[jax.Array, jax.Array]:
    """``outs[which]`` without a conditional (a data-dependent branch syncs a GPU)."""
    return (jax.lax.select_n(which, *[c for c, _ in outs]),
            jax.lax.select_n(which, *[a for _, a in outs]))


def _fit(x, mask, k, iters, init, kmeans):
    if not kmeans:
        c = _evenly_spaced(x, mask, k)
        return c, nearest_centroid(x, c)
    return kmeans_1d(x, k, mask=mask, iters=iters, init=init)


@functools.partial(jax.jit, static_argnames=("widths", "block_size", "block_iters",
                                             "column_iters", "kmeans", "reserving"))
def sweep(w: jax.Array, u: jax.Array, col_bits: jax.Array, reserve: jax.Array, *,
          widths: tuple[int, ...], block_size: int, block_iters: int, column_iters: int,
          kmeans: bool, reserving: bool = True
          ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The GPTQ sweep with a per-column codebook quantizer (columns already permuted).

    Args:
      w: ``[out, in]`` float32 weights in processing order.
      u: Upper Cholesky factor of the damped inverse Hessian (same order).
      col_bits: ``[in]`` int32 code width of each column, each one of ``widths``.
      reserve: ``[in]`` int32 number of weights of each column kept in float.
      widths: The distinct code widths, ascending.
      block_size: Columns per lazy update and per block-start fit.
      block_iters: Lloyd iterations of the block-start fit.
      column_iters: Lloyd iterations refining each column's codebook.
      kmeans: K-Means codebooks; otherwise evenly spaced levels.
      reserving: Whether any weight is kept in float (``False`` skips the per-column
        magnitude sort; ``kept`` is then all ``False``).

    Returns:
      ``(codes [out, in] int32, codebooks [in, 2**max(widths)] float32 (a column of
      ``b`` bits uses the first ``2**b``), kept [out, in] bool, values [out, in]
      float32: the kept weights as the sweep reached them)``.
    """
    n, k = w.shape
    kp = -(-k // block_size) * block_size
    kmax = 2 ** max(widths)
    wp = jnp.zeros((n, kp), jnp.float32).at[:, :k].set(w)
    up = jnp.eye(kp, dtype=jnp.float32).at[:k, :k].set(u)
    bits = jnp.full((kp,), widths[0], jnp.int32).at[:k].set(col_bits)
    res = jnp.zeros((kp,), jnp.int32).at[:k].set(reserve)
    branch = jnp.searchsorted(jnp.asarray(widths, jnp.int32), bits)
    cols = jnp.arange(kp)

    def keep_mask(x: jax.Array, count: jax.Array) -> jax.Array:
        return _keep_mask(x, count) if reserving else jnp.zeros(x.shape, bool)

    def block(b, carry):
        wp, codes, books, kept, vals = carry
        i1 = b * block_size
        w1 = jax.lax.dynamic_slice(wp, (0, i1), (n, block_size))
        u1 = jax.lax.dynamic_slice(up, (i1, i1), (block_size, block_size))
        r1 = jax.lax.dynamic_slice(res, (i1,), (block_size,))
        # Block-start fit of every column at every width (reserved weights excluded).
        fit_mask = ~keep_mask(w1, r1)
        inits = tuple(_fit(w1, fit_mask, 2 ** wd, block_iters, None, kmeans)[0]
                      for wd in widths)

        def column(i, inner):
            w1, codes1, books1, kept1, vals1 = inner
            col = i1 + i
            wcol = jax.lax.dynamic_index_in_dim(w1, i, axis=1, keepdims=True)  # [n, 1]
            keep = keep_mask(wcol, res[col][None])

            def quantizer(j):
                def run(_):
                    init = jax.lax.dynamic_index_in_dim(inits[j], i, axis=0, keepdims=True)
                    c, a = _fit(wcol, ~keep, 2 ** widths[j], column_iters, init, kmeans)
                    c = jnp.pad(c, ((0, 0), (0, kmax - c.shape[1])), mode="edge")
                    return c, a
                return run

            fits = [quantizer(j) for j in range(len(widths))]
            if len(fits) == 1:
                c, a = fits[0](None)
            else:  # CPU: a branch per column; accelerators: every width, then a select
                c, a = jax.lax.platform_dependent(
                    cpu=lambda: jax.lax.switch(branch[col], fits, None),
                    default=lambda: _select(branch[col], [f(None) for f in fits]))
            dq = jnp.where(keep, wcol, jnp.take_along_axis(c.T, a, axis=0))
            err = (wcol[:, 0] - dq[:, 0]) / u1[i, i]
            w1 = w1 - err[:, None] * u1[i][None, :]  # U is upper: earlier columns unchanged
            codes1 = jax.lax.dynamic_update_slice(codes1, a, (0, i))
            books1 = jax.lax.dynamic_update_slice(books1, c, (i, 0))
            kept1 = jax.lax.dynamic_update_slice(kept1, keep, (0, i))
            vals1 = jax.lax.dynamic_update_slice(vals1, wcol, (0, i))
            return w1, codes1, books1, kept1, vals1

        init = (w1, jnp.zeros((n, block_size), jnp.int32),
                jnp.zeros((block_size, kmax), jnp.float32), jnp.zeros((n, block_size), bool),
                jnp.zeros((n, block_size), jnp.float32))
        w1, codes1, books1, kept1, vals1 = jax.lax.fori_loop(0, block_size, column, init)
        # The columns' errors, as in the loop: value when reached minus its quantization.
        dq1 = jnp.where(kept1, vals1, jnp.take_along_axis(books1.T, codes1, axis=0))
        err1 = (vals1 - dq1) / jnp.diag(u1)[None, :]
        rows = jax.lax.dynamic_slice(up, (i1, 0), (block_size, kp))
        later = (cols >= i1 + block_size)[None, :]
        update = jnp.matmul(err1, jnp.where(later, rows, 0.0),
                            precision=jax.lax.Precision.HIGHEST)
        wp = wp - update
        codes = jax.lax.dynamic_update_slice(codes, codes1, (0, i1))
        books = jax.lax.dynamic_update_slice(books, books1, (i1, 0))
        kept = jax.lax.dynamic_update_slice(kept, kept1, (0, i1))
        vals = jax.lax.dynamic_update_slice(vals, vals1, (0, i1))
        return wp, codes, books, kept, vals

    carry = (wp, jnp.zeros((n, kp), jnp.int32), jnp.zeros((kp, kmax), jnp.float32),
             jnp.zeros((n, kp), bool), jnp.zeros((n, kp), jnp.float32))
    _, codes, books, kept, vals = jax.lax.fori_loop(0, kp // block_size, block, carry)
    return codes[:, :k], books[:k], kept[:, :k], vals[:, :k]


def _pack(codes: np.ndarray, books: np.ndarray, bits: np.ndarray, widths: tuple[int, ...],
          perm: np.ndarray | None, dtype: Any) -> QuantizedWeight:
    """Codebook parts, one per width, over permuted columns (processing order in); a
    single width is stored in the original column order."""
    n, k = codes.shape
    base = np.arange(k) if perm is None else perm
    if len(widths) == 1:  # one width: back to the original column order, no permutation
        b = widths[0]
        inv = np.argsort(base)
        return CodebookWeight.from_indices(
            codes[:, inv], jnp.asarray(books[inv, :2 ** b].astype(dtype)), bits=b)
    parts, order = [], []
    for b in widths:
        cols = np.flatnonzero(bits == b)
        parts.append(CodebookWeight.from_indices(
            codes[:, cols], jnp.asarray(books[cols, :2 ** b].astype(dtype)), bits=b))
        order.append(base[cols])
    return MixedWeight(parts=tuple(parts),
                       perm=jnp.asarray(np.concatenate(order), MixedWeight.perm_dtype(k)),
                       shape=(n, k))


def claq(w: jax.Array, hessian: jax.Array, config: ClaqConfig = ClaqConfig(), *,
         return_info: bool = False) -> Any:
    """CLAQ-quantizes ``w [out, in]`` with the layer Hessian ``2 X^T X / n``.

    Args:
      w: Float weight.
      hessian: ``[in, in]`` Hessian of the layer's calibration inputs.
      config: Budget, parts switched on, sweep options.
      return_info: Also return ``{"column_bits": histogram, "reserved": count}``.

    Returns:
      The quantized weight (codebook, mixed codebook, either with float outliers).
    """
    cfg = config
    n, k = w.shape
    w, h = prepare_hessian(w, hessian)
    # Per-column statistics on device; only [k] vectors come to the host.
    a = jnp.abs(w)
    outl = np.asarray(jnp.sum(a >= cfg.outlier_threshold * jnp.mean(a), axis=0))
    energy = np.asarray(jnp.diag(h) * jnp.sum(jnp.square(w), axis=0), np.float64)
    reserve = reserve_counts(outl, n, cfg.outlier_ratio)
    code = cfg.bits
    if cfg.total_bits:
        code = code_bits_for_total([(n, k, int(reserve.sum()))], cfg.bits,
                                   codebook_dtype=cfg.codebook_dtype)
    bits = (column_bits(outl, energy, code) if cfg.adaptive
            else np.full(k, int(code), np.int32))
    perm = None
    if cfg.act_order:
        perm = np.asarray(jnp.argsort(-jnp.diag(h), stable=True))
        w, h = w[:, perm], h[perm][:, perm]
        bits, reserve = bits[perm], reserve[perm]
    u, _ = inverse_cholesky(h, damp=cfg.damp)
    widths = tuple(sorted(set(int(b) for b in bits)))
    reserving = bool(reserve.any())
    out = sweep(w, u, jnp.asarray(bits), jnp.asarray(reserve), widths=widths,
                block_size=cfg.block_size, block_iters=cfg.block_iters,
                column_iters=cfg.column_iters, kmeans=cfg.kmeans, reserving=reserving)
    codes, books = jax.device_get(out[:2])
    dtype = jnp.dtype(cfg.codebook_dtype)
    q = _pack(codes, books, bits, widths, perm, dtype)
    kept_count = 0
    if reserving:
        kept, vals = jax.device_get(out[2:])
        rows, pcols = np.nonzero(kept)
        kept_count = len(rows)
        ocols = pcols if perm is None else perm[pcols]
        index = rows.astype(np.int64) * k + ocols
        order = np.argsort(index)
        q = OutlierWeight(base=q, index=jnp.asarray(index[order], jnp.int32),
                          values=jnp.asarray(vals[rows, pcols][order].astype(dtype)),
                          shape=(n, k))
    if return_info:
        hist = {int(b): int(c) for b, c in zip(*np.unique(bits, return_counts=True),
                                               strict=True)}
        return q, {"column_bits": hist, "reserved": kept_count,
                   "code_bits": float(bits.mean())}
    return q
