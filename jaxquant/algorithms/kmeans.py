"""Batched, weighted, masked 1-D K-Means: the per-column codebooks of CLAQ.

CLAQ (Wang et al., 2024, "CLAQ", arXiv 2405.17233) gives every input channel
(column) of a weight ``W[out, in]`` its own table of ``2**bits`` float centroids,
found by K-Means over the column's ``out`` values, and stores per weight the index of
its nearest centroid (:class:`~jaxquant.formats.codebook.CodebookWeight`). This module
fits many such independent 1-D problems at once, on device, under ``jit``.

The layout is the weight's own: ``x [n, c]`` holds ``c`` problems of ``n`` samples
along axis 0, so ``x = W[:, cols]`` (``n = out``) needs no transpose, the centroids
``[c, K]`` are the ``codebook`` rows of those input channels, and the assignments
``[n, c]`` are the codebook indices of ``W[:, cols]``. In a GPTQ sweep the codebook
of column ``j`` is fitted to the column as updated by the earlier columns, as
``kmeans_1d(w[:, j:j + 1], K)``, or to a whole block at once.

The fit is Lloyd's algorithm (Lloyd, 1982, "Least squares quantization in PCM") with
a fixed number of iterations, made cheap by one dimension:

* The columns are sorted once. Each sample's weight and the running sums of ``w`` and
  ``w x`` along the sorted column are kept, so the samples nearest to centroid ``k``
  (the sorted samples between two midpoints of sorted centroids) are a run
  ``[b_k, b_{k+1})`` found by binary search, and its weighted mean is a difference of
  two running sums: an iteration costs ``O(c K log n)``, independent of ``n`` (on the
  CPU below 0.3-2 ms, against 2-230 ms for assigning all ``n c`` samples and summing
  ``K`` masked ``[n, c]`` arrays).
* The initial centroids are deterministic quantiles at levels ``(i + 1/2) / K``: by
  default not of the samples but of their density to the power 1/3, the point
  density of the MSE-optimal quantizer with many levels (Panter & Dite, 1951). Lloyd
  only finds a local optimum, and which one depends on the start: on columns of three
  SmolLM2-135M layers (576 or 1536 rows; its Q4_1 GGUF dequantized) with ``K = 16``,
  Lloyd from the plain sample quantiles ends on average 22-63% above the exact
  optimum (dynamic programming) even after 200 iterations, from the ``1/3`` quantiles
  3-11% above it after 20; with ``K = 4`` both are within 1%.
* Centroids stay sorted: a cluster's new mean is clamped into the range of its own
  (sorted, ordered) run, and an empty cluster keeps its centroid, which lies between
  its neighbours' midpoints.

Cost on a 2-core CPU for ``[1536, 576]`` or ``[576, 1536]``, 20 iterations: 50-80 ms,
of which the sort is ~25 ms, the initialization ~15-20 ms and the final assignment
(``K - 1`` fused comparisons with the midpoints, as fast as ``K`` distances and an
argmin) 1-2 ms. XLA's CPU sort is ~6x faster on int32 keys than on float32 ones, so
floats are sorted as order-preserving int32 keys, and ~6x slower with a second
operand, so only per-sample ``weights`` are sorted along (~200 ms in all).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _order_key(v: jax.Array) -> jax.Array:
    """Float32 <-> int32 keys of the same order (an involution on the bit patterns)."""
    i = jax.lax.bitcast_convert_type(v, jnp.int32)
    return i ^ ((i >> 31) & 0x7FFFFFFF)


def _sort_columns(x: jax.Array, weights: jax.Array | None, mask: jax.Array | None
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Fitted samples of each column, sorted: ``(xs [c, n], ws [c, n], count [c])``.

    Samples that do not take part (masked, zero weight) sort to the end as ``+inf``
    with weight 0; ``xs[:, :count]`` are the others. A column whose total weight is
    zero is fitted with unit weights on its unmasked samples.
    """
    n, _ = x.shape
    m = jnp.ones(x.shape, bool) if mask is None else jnp.broadcast_to(mask, x.shape)
    if weights is None:
        keys = jax.lax.sort(_order_key(jnp.where(m, x, jnp.inf).T), dimension=1)
        count = jnp.sum(m, axis=0)
        ws = (jnp.arange(n)[None, :] < count[:, None]).astype(jnp.float32)
    else:
        w = _fit_weights(x, weights, mask)
        fit = w > 0
        count = jnp.sum(fit, axis=0)
        keys, ws = jax.lax.sort((_order_key(jnp.where(fit, x, jnp.inf).T), w.T),
                                dimension=1, num_keys=1)
    xs = jax.lax.bitcast_convert_type(_order_key(keys), jnp.float32)
    return xs, ws, count


def _quantile_init(xs: jax.Array, ws: jax.Array, cum_w: jax.Array, count: jax.Array,
                   num_clusters: int, power: float) -> jax.Array:
    """Quantiles at levels ``(i + 1/2) / K`` of the measure ``p**power dx`` of each column.

    ``p`` is the (weighted) sample density. As ``p**power dx = p**(power - 1) dP``, the
    measure gives sample ``i`` the mass ``w_i s_i**(1 - power)``, where ``s_i`` is the
    local spacing per unit weight, ``(x[i+h] - x[i-h]) / (w[i-h] + ... + w[i+h-1])`` in
    sorted order (``h = count // 4K``, clipped at the ends). ``power = 1`` gives the
    plain weighted quantiles, as does a column with no spread (all spacings zero).
    """
    n = xs.shape[1]
    last = jnp.maximum(count - 1, 0)[:, None]
    mass = ws
    if power != 1.0:
        h = jnp.maximum(count // (4 * num_clusters), 1)[:, None]
        i = jnp.arange(n)[None, :]
        lo, hi = jnp.minimum(jnp.maximum(i - h, 0), last), jnp.minimum(i + h, last)
        dx = jnp.take_along_axis(xs, hi, 1) - jnp.take_along_axis(xs, lo, 1)
        dw = jnp.take_along_axis(cum_w, hi, 1) - jnp.take_along_axis(cum_w, lo, 1)
        spacing = jnp.where(ws > 0, dx / jnp.where(dw > 0, dw, 1.0), 0.0)
        mass = ws * jnp.maximum(spacing, 0.0) ** (1.0 - power)
        mass = jnp.where(jnp.sum(mass, axis=1, keepdims=True) > 0, mass, ws)
    cum = jnp.cumsum(mass, axis=1)
    levels = (jnp.arange(num_clusters, dtype=jnp.float32) + 0.5) / num_clusters
    # The first sample whose running mass reaches the level.
    first = _searchsorted(cum, levels[None, :] * cum[:, -1:], "left")
    # cummax: the tree-scan cumsum need not be monotone to the last ulp.
    return jax.lax.cummax(jnp.take_along_axis(xs, jnp.minimum(first, last), axis=1), axis=1)


def _searchsorted(a: jax.Array, v: jax.Array, side: str) -> jax.Array:
    """Row-wise ``searchsorted``: ``a [c, n]`` sorted rows, ``v [c, m]`` -> ``[c, m]``.

    The default binary search ("scan": ``log2 n`` gathers of ``[c, m]``) beat
    "compare_all" (``O(n m)``) 10-30x on CPU for ``m <= 16``.
    """
    return jax.vmap(functools.partial(jnp.searchsorted, side=side))(a, v)


def nearest_centroid(x: jax.Array, centroids: jax.Array) -> jax.Array:
    """Index of the nearest of each column's sorted centroids, for every sample.

    ``x[i, j]`` goes to ``#{k : x[i, j] > (C[j, k] + C[j, k+1]) / 2}``: ``K - 1``
    fused comparisons with the midpoints (a sample on a midpoint goes to the lower
    centroid; of repeated centroids, to the first copy at or below, else the last).

    Args:
      x: ``[n, c]`` samples.
      centroids: ``[c, K]`` centroids, sorted ascending along axis 1.

    Returns:
      ``[n, c]`` int32 indices into ``centroids[j]``.
    """
    c = centroids.astype(jnp.float32)
    mid = 0.5 * (c[:, 1:] + c[:, :-1])
    return jnp.sum(x.astype(jnp.float32)[:, :, None] > mid[None], axis=-1, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=("num_clusters", "iters", "density_power"))
def kmeans_1d(x: jax.Array, num_clusters: int, *, weights: jax.Array | None = None,
              mask: jax.Array | None = None, iters: int = 32, density_power: float = 1 / 3,
              init: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Weighted 1-D K-Means (Lloyd's algorithm) of every column of ``x`` at once.

    Minimises, independently for every column ``j``,
    ``sum_i w[i, j] (x[i, j] - C[j, a[i, j]])^2`` over the samples with
    ``mask[i, j]``, by ``iters`` Lloyd iterations (assign every sample to its nearest
    centroid, move every non-empty cluster's centroid to its weighted mean; an empty
    cluster keeps its centroid). CLAQ's codebooks are ``kmeans_1d(W, 2**bits)``.

    Degenerate columns never give NaN: one with fewer distinct values than
    ``num_clusters`` gets repeated centroids; one whose weights are all zero is
    fitted with unit weights on its unmasked samples; a fully masked one gets zeros.

    Args:
      x: ``[n, c]`` samples, ``c`` independent problems along axis 1 (a weight
        ``W[:, cols]``); computed in float32. Must be finite where fitted.
      num_clusters: ``K``, centroids per column (``2**bits``).
      weights: Optional non-negative sample weights broadcastable to ``[n, c]``; a
        sample of weight 0 takes no part. Weights constant along a column (``[c]``,
        e.g. a Hessian diagonal) cannot change its clustering and are skipped; per
        sample (``[n, c]``) they cost a two-operand sort, ~4-6x slower on CPU.
      mask: Optional bool ``[n, c]``: samples that take part in the fit. Excluded
        samples (e.g. outliers kept in float) do not move the centroids but are still
        assigned to their nearest centroid.
      iters: Number of Lloyd iterations (fixed; each costs ``O(c K log n)``).
      density_power: Initialization: the centroids start at the quantiles, at levels
        ``(i + 1/2) / K``, of the weighted sample density raised to this power. ``1``:
        plain weighted quantiles of the samples. ``1/3`` (default): the point density
        of the MSE-optimal quantizer with many levels (Panter & Dite, 1951), from which
        Lloyd converges in ~20 iterations to a far better optimum at ``K >= 8``.
      init: Optional ``[c, K]`` initial centroids (sorted here), e.g. a warm start from
        a neighbouring column's codebook; overrides ``density_power``.

    Returns:
      ``(centroids, assignments)``: float32 ``[c, K]``, sorted ascending per column,
      and int32 ``[n, c]``, the nearest centroid of every sample (masked included).
    """
    n, c = x.shape
    if n == 0 or num_clusters < 1:
        raise ValueError(f"need samples and clusters, got x {x.shape}, K={num_clusters}")
    if weights is not None and (jnp.ndim(weights) < 2 or jnp.shape(weights)[0] == 1):
        weights = None  # constant along each column: cannot change its clustering
    xf = x.astype(jnp.float32)
    fit_w = _fit_weights(xf, weights, mask)  # dead code for XLA on a CPU quantile start
    sums = _sorted_sums(xf, weights, mask) if init is None else None
    if sums is not None:
        xs, ws, count, cum_w, _ = sums
        centroids = _quantile_init(xs, ws, cum_w, count, num_clusters, density_power)
        centroids = jnp.where(count[:, None] > 0, centroids, 0.0)
    else:
        centroids = jnp.sort(jnp.broadcast_to(init, (c, num_clusters)).astype(jnp.float32),
                             axis=1)
        centroids = jnp.where(jnp.any(fit_w > 0, axis=0)[:, None], centroids, 0.0)

    def sorted_lloyd(centroids: jax.Array) -> jax.Array:
        xs, _, count, cum_w, cum_wx = sums or _sorted_sums(xf, weights, mask)
        return _lloyd_sorted(xs, count, cum_w, cum_wx, centroids, iters)

    def dense_lloyd(centroids: jax.Array) -> jax.Array:
        return _lloyd_dense(xf, fit_w, centroids, iters)

    # Same iterations, two evaluations: on the CPU the sorted runs' binary searches are
    # cheapest; on accelerators one fused pass over the samples per iteration is (no
    # sort, no sequential search loop of small kernels).
    if iters > 0:
        centroids = jax.lax.platform_dependent(centroids, cpu=sorted_lloyd,
                                               default=dense_lloyd)
    return centroids, nearest_centroid(xf, centroids)


def _fit_weights(x: jax.Array, weights: jax.Array | None, mask: jax.Array | None
                 ) -> jax.Array:
    """``[n, c]`` weight of every sample in the fit (0: takes no part).

    Masked samples weigh 0; a column whose total weight is zero is fitted with unit
    weights on its unmasked samples.
    """
    m = jnp.ones(x.shape, bool) if mask is None else jnp.broadcast_to(mask, x.shape)
    if weights is None:
        return m.astype(jnp.float32)
    w = jnp.where(m, jnp.broadcast_to(weights, x.shape).astype(jnp.float32), 0.0)
    return jnp.where(jnp.sum(w, axis=0) > 0, w, m.astype(jnp.float32))


def _sorted_sums(x: jax.Array, weights: jax.Array | None, mask: jax.Array | None
                 ) -> tuple[jax.Array, ...]:
    """Sorted samples and their running sums: ``(xs, ws, count, cum_w [c, n + 1], cum_wx)``.

    Cluster sums are differences of the running sums; cumsum's tree scan keeps the error
    ``O(log n)`` ulps of the column sum.
    """
    xs, ws, count = _sort_columns(x, weights, mask)
    zero = jnp.zeros((xs.shape[0], 1), jnp.float32)
    cum_w = jnp.concatenate([zero, jnp.cumsum(ws, axis=1)], axis=1)
    cum_wx = jnp.concatenate([zero, jnp.cumsum(jnp.where(ws > 0, ws * xs, 0.0), axis=1)],
                             axis=1)
    return xs, ws, count, cum_w, cum_wx


def _lloyd_sorted(xs: jax.Array, count: jax.Array, cum_w: jax.Array, cum_wx: jax.Array,
                  centroids: jax.Array, iters: int) -> jax.Array:
    """Lloyd on sorted columns: cluster ``k`` is the run between two midpoints.

    Cost per iteration ``O(c K log n)``: a binary search per midpoint, two differences
    of running sums per cluster.
    """
    c = xs.shape[0]
    last = jnp.maximum(count - 1, 0)[:, None]
    ends = (jnp.zeros((c, 1), jnp.int32), count[:, None].astype(jnp.int32))

    def lloyd(_, centroids: jax.Array) -> jax.Array:
        mid = 0.5 * (centroids[:, 1:] + centroids[:, :-1])
        # Samples <= midpoint k belong to clusters <= k: run k is [bounds_k, bounds_k+1).
        inner = jnp.minimum(_searchsorted(xs, mid, "right").astype(jnp.int32), ends[1])
        bounds = jnp.concatenate([ends[0], inner, ends[1]], axis=1)
        lo, hi = bounds[:, :-1], bounds[:, 1:]
        sw = jnp.take_along_axis(cum_w, hi, 1) - jnp.take_along_axis(cum_w, lo, 1)
        swx = jnp.take_along_axis(cum_wx, hi, 1) - jnp.take_along_axis(cum_wx, lo, 1)
        mean = swx / jnp.where(sw > 0, sw, 1.0)
        # The true mean lies in [first, last] of its run; clamping absorbs rounding in
        # tiny-weight clusters and keeps the centroids sorted.
        run_min = jnp.take_along_axis(xs, jnp.minimum(lo, last), 1)
        run_max = jnp.take_along_axis(xs, jnp.maximum(hi - 1, 0), 1)
        return jnp.where(hi > lo, jnp.clip(mean, run_min, run_max), centroids)

    return jax.lax.fori_loop(0, iters, lloyd, centroids)


def _lloyd_dense(x: jax.Array, w: jax.Array, centroids: jax.Array, iters: int) -> jax.Array:
    """The same Lloyd iterations as :func:`_lloyd_sorted`, by one pass over the samples.

    Every sample is assigned by comparing it with the ``K - 1`` midpoints, and each
    cluster's weighted sum, weight, minimum and maximum are masked reductions over the
    samples: ``O(n c K)`` work per iteration in one fused pass, no sort.
    """
    k = centroids.shape[1]
    fit = w > 0
    levels = jnp.arange(k, dtype=jnp.int32)

    def lloyd(_, centroids: jax.Array) -> jax.Array:
        member = (nearest_centroid(x, centroids)[:, :, None] == levels) & fit[:, :, None]
        sw = jnp.sum(jnp.where(member, w[:, :, None], 0.0), axis=0)
        swx = jnp.sum(jnp.where(member, (w * x)[:, :, None], 0.0), axis=0)
        run_min = jnp.min(jnp.where(member, x[:, :, None], jnp.inf), axis=0)
        run_max = jnp.max(jnp.where(member, x[:, :, None], -jnp.inf), axis=0)
        mean = swx / jnp.where(sw > 0, sw, 1.0)
        return jnp.where(sw > 0, jnp.clip(mean, run_min, run_max), centroids)

    return jax.lax.fori_loop(0, iters, lloyd, centroids, unroll=iters <= 8)


def kmeans_objective(x: jax.Array, centroids: jax.Array, assignments: jax.Array,
                     weights: jax.Array | None = None, mask: jax.Array | None = None
                     ) -> jax.Array:
    """Per-column weighted squared error ``sum_i w (x - C[a])^2`` over masked samples.

    Args:
      x: ``[n, c]`` samples.
      centroids: ``[c, K]`` centroids.
      assignments: ``[n, c]`` int indices into each column's centroids.
      weights: Optional weights broadcastable to ``[n, c]`` (used as given: no
        fallback for all-zero columns).
      mask: Optional bool ``[n, c]``; excluded samples count zero.

    Returns:
      ``[c]`` float32 errors.
    """
    xf = x.astype(jnp.float32)
    q = jnp.take_along_axis(centroids.astype(jnp.float32).T, assignments, axis=0)
    w = jnp.ones_like(xf) if weights is None else jnp.broadcast_to(weights, x.shape)
    err = w.astype(jnp.float32) * (xf - q) ** 2
    if mask is not None:
        err = jnp.where(mask, err, 0.0)
    return jnp.sum(err, axis=0)
