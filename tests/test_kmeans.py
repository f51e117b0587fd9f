"""Batched 1-D K-Means against a plain numpy Lloyd and an exact dynamic program."""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.algorithms.kmeans import kmeans_1d, kmeans_objective, nearest_centroid

N, C = 101, 13  # shapes that are multiples of nothing

# Each (shape, K, density_power, which of weights / mask / init are given) compiles once
# (~1 s on a small CPU); the tests share these signatures to stay fast.
ONES = np.ones((N, C), np.float32)
ALL = np.ones((N, C), bool)


def rng_for(*key) -> np.random.Generator:
    """A generator seeded from the test's parameters (fresh per test, reproducible)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def sample(rng: np.random.Generator, n: int = N, c: int = C) -> np.ndarray:
    """Weight-like columns: Student-t values at a per-column scale, some ties."""
    x = rng.standard_t(4, size=(n, c)) * rng.uniform(0.01, 0.1, size=c)
    x[: n // 8] = x[n // 8: 2 * (n // 8)]  # repeated values
    return x.astype(np.float32)


# --- numpy reference, float64, written from the definitions ----------------------------

def np_fit_weights(x, weights, mask):
    """Weights of the fitted samples: masked out -> 0; an all-zero column -> unit."""
    m = np.ones(x.shape, bool) if mask is None else mask
    w = np.ones(x.shape) if weights is None else np.broadcast_to(weights, x.shape).astype(float)
    w = np.where(m, w, 0.0)
    return np.where(w.sum(0) > 0, w, m.astype(float))


def np_init(xs, ws, k, power):
    """Quantiles at (i + 1/2) / k of the measure p**power dx of one sorted column."""
    n = len(xs)
    if n == 0:
        return np.zeros(k)
    mass = ws.copy()
    if power != 1.0:
        h = max(n // (4 * k), 1)
        i = np.arange(n)
        lo, hi = np.clip(i - h, 0, n - 1), np.minimum(i + h, n - 1)
        cw = np.concatenate([[0.0], np.cumsum(ws)])
        dw = cw[hi] - cw[lo]
        spacing = (xs[hi] - xs[lo]) / np.where(dw > 0, dw, 1.0)
        mass = ws * spacing ** (1.0 - power)
        if mass.sum() <= 0:
            mass = ws.copy()
    cum = np.cumsum(mass)
    levels = (np.arange(k) + 0.5) / k
    return xs[np.minimum(np.searchsorted(cum, levels * cum[-1], side="left"), n - 1)]


def np_nearest(xs, cent):
    """Index of the nearest centroid. Ties: the lower value; of repeated centroids, the
    first copy if the sample is at or below them, else the last (kmeans_1d's rule)."""
    dist = np.abs(xs[:, None] - cent[None, :])
    near = dist == dist.min(axis=1, keepdims=True)
    value = np.where(near, cent[None, :], np.inf).min(axis=1)
    same = cent[None, :] == value[:, None]
    first = np.argmax(same, axis=1)
    last = len(cent) - 1 - np.argmax(same[:, ::-1], axis=1)
    return np.where(xs > value, last, first)


def np_kmeans(x, k, *, weights=None, mask=None, iters=32, power=1 / 3):
    """Plain weighted Lloyd per column: nearest centroid, weighted means, empty stays."""
    w = np_fit_weights(x, weights, mask)
    cents = np.zeros((x.shape[1], k))
    for j in range(x.shape[1]):
        fit = w[:, j] > 0
        order = np.argsort(x[fit, j], kind="stable")
        xs, ws = x[fit, j][order].astype(float), w[fit, j][order]
        cent = np_init(xs, ws, k, power)
        for _ in range(iters):
            a = np_nearest(xs, cent)
            sw = np.bincount(a, ws, minlength=k)
            swx = np.bincount(a, ws * xs, minlength=k)
            cent = np.where(sw > 0, swx / np.where(sw > 0, sw, 1), cent)
        cents[j] = cent
    return cents


def np_objective(x, cents, *, weights=None, mask=None):
    """Weighted SSE to the nearest centroid over the masked samples, per column."""
    m = np.ones(x.shape, bool) if mask is None else mask
    w = np.ones(x.shape) if weights is None else np.broadcast_to(weights, x.shape)
    d = np.min((x.astype(float)[:, :, None] - cents[None]) ** 2, axis=-1)
    return np.sum(np.where(m, w * d, 0.0), axis=0)


def np_optimal(xs, ws, k):
    """Exact weighted 1-D k-means of a sorted column: O(k n^2) dynamic programming."""
    n = len(xs)
    pw, px, pxx = (np.concatenate([[0.0], np.cumsum(v)]) for v in (ws, ws * xs, ws * xs * xs))
    i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    sw, sx = pw[j] - pw[i], px[j] - px[i]
    cost = np.where(j > i, pxx[j] - pxx[i] - sx * sx / np.where(sw > 0, sw, 1.0), np.inf)
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    for _ in range(k):  # best[j]: first j samples in at most the clusters so far
        best = np.minimum(best, np.min(best[:, None] + cost, axis=0))
    return best[n]


def check_nearest(x, cents, assign):
    """Every sample's assignment is a nearest centroid (masked samples included)."""
    x = np.asarray(x, np.float64)
    cents = np.asarray(cents, np.float64)
    got = np.abs(x - np.take_along_axis(cents.T, np.asarray(assign), axis=0))
    best = np.min(np.abs(x[:, :, None] - cents[None]), axis=-1)
    tol = 1e-6 * np.maximum(np.abs(x), np.abs(cents).max(1))
    np.testing.assert_array_less(got - best, tol + 1e-30)


def check_sorted_finite(cents):
    cents = np.asarray(cents)
    assert np.isfinite(cents).all()
    assert (np.diff(cents, axis=1) >= 0).all()


# --- tests ----------------------------------------------------------------------------

# (K, weights and mask given, density_power); K = 16 plain is also the init test's.
CASES = [(2, False, 1 / 3), (4, True, 1 / 3), (8, False, 1 / 3), (16, True, 1 / 3),
         (16, False, 1 / 3), (4, True, 1.0), (16, False, 1.0)]
# Lloyd is a local search: its optimum over the exact one, at most (mean, max), for
# these Student-t columns of ~100 samples (measured: mean 1.05-1.6, max 1.5-4.1). From
# plain quantiles (density_power=1) K = 16 ends ~5x above the optimum on average.
OPTIMUM_FACTOR = {2: (1.25, 2.5), 4: (1.25, 2.5), 8: (1.4, 2.5), 16: (2.0, 5.0)}


@pytest.mark.parametrize("k,extra,power", CASES)
def test_matches_numpy_lloyd_and_near_optimum(k, extra, power):
    rng = rng_for("lloyd", k, extra, power)
    x = sample(rng)
    kw = {}
    if extra:
        kw["weights"] = rng.uniform(0.0, 2.0, size=x.shape).astype(np.float32)
        kw["mask"] = rng.uniform(size=x.shape) > 0.2
        x[~kw["mask"]] *= 50.0  # masked samples far out must not matter
    if power != 1 / 3:  # passing the default explicitly would compile another variant
        kw["density_power"] = power
    cents, assign = kmeans_1d(jnp.asarray(x), k, **kw)
    kw.pop("density_power", None)
    check_sorted_finite(cents)
    assert cents.shape == (C, k) and cents.dtype == jnp.float32
    assert assign.shape == (N, C) and assign.dtype == jnp.int32
    check_nearest(x, cents, assign)
    ref = np_kmeans(x, k, power=power, **kw)
    ours = np.asarray(kmeans_objective(x, cents, assign, kw.get("weights"), kw.get("mask")),
                      np.float64)
    np.testing.assert_allclose(ours, np_objective(x, cents, **kw), rtol=1e-5)
    theirs = np_objective(x, ref, **kw)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-12)
    assert (ours <= theirs * (1 + 1e-5) + 1e-12).all()
    np.testing.assert_allclose(np.asarray(cents), ref, rtol=1e-4, atol=1e-6)
    # Against the exact optimum of each column.
    w = np_fit_weights(x, kw.get("weights"), kw.get("mask"))
    opt = np.zeros(C)
    for j in range(C):
        fit = w[:, j] > 0
        order = np.argsort(x[fit, j])
        opt[j] = np_optimal(x[fit, j][order].astype(float), w[fit, j][order], k)
    assert (ours >= opt * (1 - 1e-4) - 1e-12).all()  # the optimum is a lower bound
    ratio = ours / np.maximum(opt, 1e-30)
    mean_bound, max_bound = OPTIMUM_FACTOR[k] if power == 1 / 3 else (6.0, 20.0)
    assert ratio.mean() <= mean_bound and ratio.max() <= max_bound, ratio


def test_masked_samples_do_not_move_centroids():
    rng = rng_for("masked")
    x = sample(rng)
    mask = rng.uniform(size=x.shape) > 0.3
    cents, _ = kmeans_1d(jnp.asarray(x), 8, mask=mask)
    wild = x.copy()
    wild[~mask] = rng.choice([1e6, -1e6, 1e30, np.inf, -np.inf, np.nan], size=(~mask).sum())
    cents2, assign2 = kmeans_1d(jnp.asarray(wild), 8, mask=mask)
    np.testing.assert_array_equal(np.asarray(cents2), np.asarray(cents))
    finite = np.isfinite(wild).all(axis=0)
    check_nearest(wild[:, finite], np.asarray(cents2)[finite], np.asarray(assign2)[:, finite])
    # The same as fitting the unmasked samples alone.
    alone, _ = kmeans_1d(jnp.asarray(x[mask[:, 5], 5][:, None]), 8)
    np.testing.assert_allclose(np.asarray(cents)[5], np.asarray(alone)[0], rtol=1e-5,
                               atol=1e-7)


def test_weights_pull_centroids():
    rng = rng_for("heavy")
    x = sample(rng)
    cents, assign = kmeans_1d(jnp.asarray(x), 4, weights=ONES, mask=ALL)
    heavy = ONES.copy()
    rows, cols = rng.integers(0, N, size=C), np.arange(C)
    heavy[rows, cols] = 1000.0
    cents_h, assign_h = kmeans_1d(jnp.asarray(x), 4, weights=heavy, mask=ALL)
    target = x[rows, cols]
    near = np.asarray(cents_h)[cols, np.asarray(assign_h)[rows, cols]]
    before = np.asarray(cents)[cols, np.asarray(assign)[rows, cols]]
    assert (np.abs(near - target) <= np.abs(before - target) + 1e-7).all()
    assert np.mean(np.abs(near - target)) < 0.1 * np.mean(np.abs(before - target))


def test_integer_weights_equal_repeated_samples():
    rng = rng_for("repeat")
    x = sample(rng)
    reps = rng.integers(1, 4, size=N)
    weights = np.broadcast_to(reps[:, None], x.shape).astype(np.float32)
    cents, _ = kmeans_1d(jnp.asarray(x), 4, weights=weights, mask=ALL, density_power=1.0)
    cents_r, _ = kmeans_1d(jnp.asarray(np.repeat(x, reps, axis=0)), 4, density_power=1.0)
    np.testing.assert_allclose(np.asarray(cents), np.asarray(cents_r), rtol=1e-5, atol=1e-7)


def test_per_column_weights_change_nothing():
    rng = rng_for("column weights")
    x = sample(rng)
    cents, assign = kmeans_1d(jnp.asarray(x), 8)
    col_w = rng.uniform(0.5, 100.0, size=C).astype(np.float32)  # a [c] Hessian diagonal
    cents_w, assign_w = kmeans_1d(jnp.asarray(x), 8, weights=col_w)
    np.testing.assert_array_equal(np.asarray(cents_w), np.asarray(cents))
    np.testing.assert_array_equal(np.asarray(assign_w), np.asarray(assign))


@pytest.mark.parametrize("k", [4, 16])
def test_degenerate_columns(k):
    rng = rng_for("degenerate", k)
    x = sample(rng)
    mask = ALL.copy()
    weights = rng.uniform(0.5, 1.5, size=x.shape).astype(np.float32)
    x[:, 0] = 0.25  # constant
    mask[:, 1] = False  # fully masked (with a wild value)
    x[3, 1] = np.nan
    weights[:, 2] = 0.0  # zero total weight: unit weights on the unmasked samples
    mask[:5, 2] = False
    x[:, 3] = rng.choice([-1.0, 0.5, 2.0], size=N)  # fewer distinct values than k
    mask[1:, 4] = False  # a single sample
    weights[:, 5] = 0.0  # zero weights and fully masked
    mask[:, 5] = False
    weights[: N - 3, 6] = 0.0  # three samples with weight
    x[:, 7] = 0.0  # all zero, some masked
    mask[::2, 7] = False
    cents, assign = kmeans_1d(jnp.asarray(x), k, weights=weights, mask=mask)
    cents, assign = np.asarray(cents), np.asarray(assign)
    check_sorted_finite(cents)
    assert ((assign >= 0) & (assign < k)).all()
    np.testing.assert_array_equal(cents[0], 0.25)
    np.testing.assert_array_equal(cents[[1, 5, 7]], 0.0)
    np.testing.assert_array_equal(cents[4], x[0, 4])
    assert set(np.unique(cents[3])) <= {-1.0, 0.5, 2.0}
    obj = np.asarray(kmeans_objective(x, cents, assign, weights, mask))
    assert np.isfinite(obj).all()
    np.testing.assert_array_equal(obj[[0, 3, 4, 7]], 0.0)
    assert obj[6] == 0.0 or k < 3
    unit = weights.copy()
    unit[:, 2] = 1.0
    cents_u, _ = kmeans_1d(jnp.asarray(x), k, weights=unit, mask=mask)
    np.testing.assert_array_equal(cents[2], np.asarray(cents_u)[2])
    keep = [0, 2, 3, 4, 5, 6, 7, 8]
    check_nearest(x[:, keep], cents[keep], assign[:, keep])


def test_batched_columns_jit_and_vmap():
    rng = rng_for("batching")
    x = sample(rng)
    mask = rng.uniform(size=x.shape) > 0.1
    weights = rng.uniform(0.1, 1.0, size=x.shape).astype(np.float32)
    cents, assign = kmeans_1d(jnp.asarray(x), 4, weights=weights, mask=mask)
    # Columns are independent problems: one at a time gives the same.
    for j in (0, 7, 12):
        cj, aj = kmeans_1d(jnp.asarray(x[:, j:j + 1]), 4, weights=weights[:, j:j + 1],
                           mask=mask[:, j:j + 1])
        np.testing.assert_allclose(np.asarray(cj)[0], np.asarray(cents)[j], rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(aj)[:, 0], np.asarray(assign)[:, j])
    # Inside a user's jit, with traced weights and mask.
    f = jax.jit(lambda x, w, m: kmeans_1d(x * 1.0, 4, weights=w, mask=m))
    cents_j, assign_j = f(jnp.asarray(x), weights, mask)
    np.testing.assert_allclose(np.asarray(cents_j), np.asarray(cents), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(assign_j), np.asarray(assign))
    # vmap over stacked matrices.
    stack = np.stack([x, -x[::-1]])
    cents_v, _ = jax.vmap(functools.partial(kmeans_1d, num_clusters=2))(jnp.asarray(stack))
    for b in range(2):
        np.testing.assert_allclose(np.asarray(cents_v[b]),
                                   np.asarray(kmeans_1d(jnp.asarray(stack[b]), 2)[0]),
                                   rtol=1e-6)


def test_density_init_beats_plain_quantiles_at_16():
    """The default start (density**(1/3) quantiles) ends in better optima than quantiles."""
    x = rng_for("init quality").standard_t(4, size=(N, C)).astype(np.float32)
    objs = {}
    for power in (1 / 3, 1.0):
        kw = {} if power == 1 / 3 else {"density_power": power}
        cents, assign = kmeans_1d(jnp.asarray(x), 16, **kw)
        objs[power] = np.asarray(kmeans_objective(x, cents, assign))
    assert objs[1 / 3].sum() < 0.9 * objs[1.0].sum(), objs


def test_explicit_init_and_helpers():
    rng = rng_for("init")
    x = sample(rng)
    init = rng.standard_normal((C, 4)).astype(np.float32) * 0.05
    cents, assign = kmeans_1d(jnp.asarray(x), 4, iters=0, init=init)
    np.testing.assert_array_equal(np.asarray(cents), np.sort(init, axis=1))
    np.testing.assert_array_equal(np.asarray(assign),
                                  np.asarray(nearest_centroid(jnp.asarray(x), cents)))
    check_nearest(x, cents, assign)
    np.testing.assert_allclose(np.asarray(kmeans_objective(x, cents, assign)),
                               np_objective(x, np.sort(init, axis=1)), rtol=1e-5)
    # bfloat16 inputs are fitted in float32.
    xb = jnp.asarray(x, jnp.bfloat16)
    cb, _ = kmeans_1d(xb, 2)
    c32, _ = kmeans_1d(xb.astype(jnp.float32), 2)
    np.testing.assert_array_equal(np.asarray(cb), np.asarray(c32))
    with pytest.raises(ValueError):
        kmeans_1d(jnp.zeros((0, 3)), 4)


@pytest.mark.parametrize("k", [4, 16])
def test_dense_lloyd_equals_sorted_lloyd(k):
    """The accelerator form of the iterations (one pass over the samples) and the CPU
    form (runs of sorted columns) are the same algorithm: same centroids."""
    from jaxquant.algorithms.kmeans import _fit_weights, _lloyd_dense, _lloyd_sorted, _sorted_sums

    rng = rng_for("dense", k)
    x = sample(rng)
    weights = rng.uniform(0.0, 2.0, size=x.shape).astype(np.float32)
    mask = rng.uniform(size=x.shape) > 0.2
    x[~mask] = rng.choice([1e6, np.inf, np.nan], size=(~mask).sum())  # excluded: no effect
    weights[:, 2] = 0.0  # unit weights on the unmasked samples
    mask[1:, 4] = False  # a single sample
    x[:, 5] = 0.5  # constant (masked entries stay wild)
    mask[:, 6] = False  # nothing to fit: the start stays
    init = np.sort(rng.standard_normal((C, k)).astype(np.float32) * 0.05, axis=1)
    for w_, m_ in ((None, None), (weights, mask)):
        xj = jnp.asarray(np.where(mask, x, 0.0) if m_ is None else x)
        xs, _, count, cum_w, cum_wx = _sorted_sums(xj, w_, m_)
        sorted_c = _lloyd_sorted(xs, count, cum_w, cum_wx, jnp.asarray(init), 12)
        dense_c = _lloyd_dense(xj, _fit_weights(xj, w_, m_), jnp.asarray(init), 12)
        check_sorted_finite(dense_c)
        np.testing.assert_allclose(np.asarray(dense_c), np.asarray(sorted_c), rtol=1e-4,
                                   atol=1e-7)  # running-sum differences vs direct sums


def test_kmeans_lowers_for_accelerators():
    """The accelerator branch (dense iterations) lowers for GPU and TPU on this CPU."""
    x = jnp.asarray(sample(rng_for("lower")))
    for platform in ("cuda", "tpu"):
        text = jax.jit(lambda x: kmeans_1d(x, 8, iters=3)).trace(x).lower(
            lowering_platforms=(platform,)).as_text()
        assert "sort" in text  # the quantile start sorts; the iterations do not search
