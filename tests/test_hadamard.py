"""Hadamard matrices (exact integer checks) and the fast Hadamard transform."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from jaxquant.transforms import hadamard as had

REQUIRED = [1, 2, 4, 12, 20, 28, 36, 40, 44, 52, 60, 76, 108, 140, 156, 172]


def _assert_hadamard(h: np.ndarray, n: int) -> None:
    assert h.shape == (n, n)
    assert h.dtype == np.int8
    assert np.all(np.abs(h) == 1)
    h64 = h.astype(np.int64)
    np.testing.assert_array_equal(h64 @ h64.T, n * np.eye(n, dtype=np.int64))


def _rng(*params: int) -> np.random.Generator:
    return np.random.default_rng([abs(int(p)) for p in params])


def _dense_reference(x: np.ndarray, h: np.ndarray, axis: int, scale: float) -> np.ndarray:
    """``x @ h.T * scale`` along ``axis``, in float64."""
    xm = np.moveaxis(x.astype(np.float64), axis, -1)
    return np.moveaxis(xm @ h.T.astype(np.float64) * scale, -1, axis)


# ----------------------------------------------------------------------------------
# Matrices.
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [*REQUIRED, 92, 116, 576])
def test_hadamard_matrix_exact(n):
    _assert_hadamard(had.hadamard_matrix(n), n)


def test_every_supported_order_up_to_256_is_hadamard():
    orders = had.supported_orders(256)
    assert set(REQUIRED) <= set(orders)
    # Everything Paley I/II, Williamson data and Kronecker reach; 188 = 4 * 47 and
    # 236 = 4 * 59 are the documented gaps among multiples of 4.
    assert [n for n in range(4, 257, 4) if n not in orders] == [188, 236]
    assert [n for n in orders if n > 2 and n % 4] == []
    for n in orders:
        _assert_hadamard(had.hadamard_matrix(n), n)


def test_base_orders_and_factorizations():
    bases = had.base_orders(256)
    for k in [1, 12, 20, 28, 36, 44, 52, 60, 76, 108, 140, 156, 172]:
        assert k in bases
    assert 2 not in bases and 40 not in bases  # 2 = 1 * 2, 40 = 20 * 2
    expected = {576: (36, 16), 11008: (172, 64), 4864: (76, 64), 40: (20, 2),
                4096: (1, 4096), 1: (1, 1), 12: (12, 1), 1536: (12, 128)}
    for n, (k, p) in expected.items():
        f = had.hadamard_factorization(n)
        assert (f.num_blocks, f.base_order, f.power_of_two) == (1, k, p)
        assert f.size == n


def test_hadamard_matrix_is_kronecker_of_factors():
    h = had.hadamard_matrix(576)
    np.testing.assert_array_equal(h, np.kron(had.hadamard_matrix(36), had.hadamard_matrix(16)))
    # Sylvester: H[i, j] = (-1)^popcount(i & j).
    i = np.arange(64)
    popcount = np.vectorize(lambda v: bin(v).count("1"))(i[:, None] & i[None, :])
    np.testing.assert_array_equal(had.hadamard_matrix(64), (-1) ** popcount)


@pytest.mark.parametrize("w", sorted(had._WILLIAMSON_ROWS))
def test_williamson_data_periodic_autocorrelation(w):
    """The tabulated circulants have total periodic autocorrelation 0 off shift 0."""
    rows = [np.array([1 if s == "+" else -1 for s in r]) for r in had._WILLIAMSON_ROWS[w]]
    assert all(r.shape == (w,) for r in rows)
    for shift in range(1, w):
        assert sum(int(r @ np.roll(r, shift)) for r in rows) == 0


@pytest.mark.parametrize("q", [9, 25, 27, 49, 121, 125, 243])
def test_finite_field_quadratic_character(q):
    chi = had._quadratic_character(q)
    assert chi[0] == 0
    assert np.sum(chi == 1) == np.sum(chi == -1) == (q - 1) // 2
    # χ(a - b) = χ(-1) χ(b - a) with χ(-1) = (-1)^((q-1)/2).
    jac = had._jacobsthal(q).astype(np.int64)
    np.testing.assert_array_equal(jac.T, (-1) ** ((q - 1) // 2) * jac)


def test_large_order_via_fast_transform_columns():
    """n = 11008 = 172 * 64 without forming the 11008^2 matrix."""
    n = 11008
    h172 = had.hadamard_matrix(172).astype(np.float64)
    h64 = had.hadamard_matrix(64).astype(np.float64)
    cols = _rng(n).choice(n, size=6, replace=False)
    eye = np.zeros((cols.size, n), np.float32)
    eye[np.arange(cols.size), cols] = 1.0
    # e_j H^T is column j of H = kron(H_172, H_64)[:, j].
    got = np.asarray(had.hadamard_transform(jnp.asarray(eye), normalize=False))
    want = np.stack([np.kron(h172[:, j // 64], h64[:, j % 64]) for j in cols])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got @ got.T, n * np.eye(cols.size))
    x = _rng(n, 1).standard_normal((4, n)).astype(np.float32)
    y = np.asarray(had.hadamard_transform(jnp.asarray(x)))
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1),
                               rtol=1e-5)


# ----------------------------------------------------------------------------------
# Fast transform.
# ----------------------------------------------------------------------------------

FAST_SIZES = [1, 2, 12, 64, 40, 20 * 8, 28 * 4, 36 * 16, 52 * 2, 76 * 2, 100, 156, 172 * 2]


@pytest.mark.parametrize("n", FAST_SIZES)
@pytest.mark.parametrize("axis", [-1, 1])
def test_fast_transform_matches_dense(n, axis):
    shape = [3, 5, n] if axis == -1 else [3, n, 5]
    x = _rng(n, axis).standard_normal(shape).astype(np.float32)
    h = had.hadamard_matrix(n)
    y = np.asarray(had.hadamard_transform(jnp.asarray(x), axis=axis))
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.all(np.isfinite(y))
    want = _dense_reference(x, h, axis, 1.0 / math.sqrt(n))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    y_raw = np.asarray(had.hadamard_transform(jnp.asarray(x), axis=axis, normalize=False))
    np.testing.assert_allclose(y_raw, _dense_reference(x, h, axis, 1.0),
                               rtol=1e-5, atol=1e-4 * math.sqrt(n))


@pytest.mark.parametrize("n", [36 * 16, 156, 28 * 4])
def test_orthonormal_inverse_and_norms(n):
    x = _rng(n, 7).standard_normal((6, n)).astype(np.float32)
    h = had.hadamard_matrix(n).astype(np.float64)
    y = np.asarray(had.hadamard_transform(jnp.asarray(x)), dtype=np.float64)
    np.testing.assert_allclose(y @ h / math.sqrt(n), x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1),
                               rtol=1e-5)


@pytest.mark.parametrize("n", [576, 172])
def test_random_hadamard_rotation_preserves_linear_layer(n):
    key = jax.random.key(n)
    q = np.asarray(had.random_hadamard_matrix(n, key), dtype=np.float64)
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-6)
    np.testing.assert_allclose(q.T @ q, np.eye(n), atol=1e-6)
    signs = had.random_signs(key, n)
    assert set(np.unique(np.asarray(signs)).tolist()) == {-1.0, 1.0}
    np.testing.assert_allclose(
        q, had.hadamard_matrix(n) * np.asarray(signs)[None, :] / math.sqrt(n), atol=1e-7)

    rng = _rng(n, 3)
    x = rng.standard_normal((8, n)).astype(np.float32)
    w = rng.standard_normal((16, n)).astype(np.float32)
    xq = had.random_sign_hadamard_transform(jnp.asarray(x), signs)
    wq = had.random_sign_hadamard_transform(jnp.asarray(w), signs)
    np.testing.assert_allclose(np.asarray(xq), x @ q.T, rtol=1e-5, atol=1e-5)
    out = np.asarray(xq, np.float64) @ np.asarray(wq, np.float64).T
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * math.sqrt(n))
    # Same with explicit Q: (x Q)(W Q)^T = x W^T.
    np.testing.assert_allclose((x @ q) @ (w @ q).T, ref, rtol=1e-6, atol=1e-6 * math.sqrt(n))


def test_random_sign_transform_along_other_axis():
    n = 12
    signs = had.random_signs(jax.random.key(1), n)
    x = _rng(n, 11).standard_normal((n, 4)).astype(np.float32)
    q = np.asarray(had.random_hadamard_matrix(n, jax.random.key(1)), np.float64)
    y = had.random_sign_hadamard_transform(jnp.asarray(x), signs, axis=0)
    np.testing.assert_allclose(np.asarray(y), q @ x, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------
# Block-diagonal fallback and errors.
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "block"), [(376, 8), (6, 2), (532, 76)])
def test_block_diagonal_fallback(n, block):
    assert n not in had.supported_orders(n)
    f = had.hadamard_factorization(n, allow_block_diagonal=True)
    assert f.block_size == block and f.num_blocks == n // block
    hb = had.hadamard_matrix(block)
    dense = scipy.linalg.block_diag(*[hb] * (n // block))
    np.testing.assert_array_equal(had.hadamard_matrix(n, allow_block_diagonal=True), dense)
    x = _rng(n, 5).standard_normal((2, n, 3)).astype(np.float32)
    y = had.hadamard_transform(jnp.asarray(x), axis=1, allow_block_diagonal=True)
    want = _dense_reference(x, dense, 1, 1.0 / math.sqrt(block))
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(y), axis=1),
                               np.linalg.norm(x, axis=1), rtol=1e-5)
    q = np.asarray(had.random_hadamard_matrix(n, jax.random.key(0),
                                              allow_block_diagonal=True), np.float64)
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-6)


def test_unsupported_size_errors():
    with pytest.raises(ValueError, match=r"order 376.*allow_block_diagonal=True"):
        had.hadamard_transform(jnp.ones((2, 376)))
    with pytest.raises(ValueError, match="allow_block_diagonal"):
        had.hadamard_matrix(188)
    for n in (15, 3, 7 * 9):
        with pytest.raises(ValueError, match=rf"size {n}: no supported"):
            had.hadamard_transform(jnp.ones((n,)), allow_block_diagonal=True)
    with pytest.raises(ValueError, match="positive"):
        had.hadamard_factorization(0)
    with pytest.raises(ValueError, match=r"signs must have shape \(12,\)"):
        had.random_sign_hadamard_transform(jnp.ones((2, 12)), jnp.ones((6,)))


# ----------------------------------------------------------------------------------
# JAX behaviour: jit, vmap, dtypes, NaN.
# ----------------------------------------------------------------------------------


def test_jit_and_vmap():
    n = 36 * 16
    x = jnp.asarray(_rng(n, 2).standard_normal((4, n, 3)).astype(np.float32))
    eager = had.hadamard_transform(x, axis=1)
    jitted = jax.jit(functools.partial(had.hadamard_transform, axis=1))(x)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6, atol=1e-6)
    vmapped = jax.vmap(functools.partial(had.hadamard_transform, axis=-1), in_axes=2,
                       out_axes=2)(x)
    np.testing.assert_allclose(np.asarray(vmapped), np.asarray(eager), rtol=1e-6, atol=1e-6)
    signs = had.random_signs(jax.random.key(0), n)
    rot = jax.jit(lambda a, s: had.random_sign_hadamard_transform(a, s, axis=1))(x, signs)
    np.testing.assert_allclose(
        np.asarray(rot), np.asarray(had.random_sign_hadamard_transform(x, signs, axis=1)),
        rtol=1e-6, atol=1e-6)


def test_bfloat16_input():
    n = 172 * 2
    x32 = jnp.asarray(_rng(n, 16).standard_normal((5, n)).astype(np.float32))
    xbf = x32.astype(jnp.bfloat16)
    y = had.hadamard_transform(xbf)
    assert y.dtype == jnp.bfloat16
    ref = had.hadamard_transform(xbf.astype(jnp.float32))
    err = np.linalg.norm(np.asarray(y, np.float32) - np.asarray(ref)) / np.linalg.norm(ref)
    assert err < 1e-2
    ys = had.random_sign_hadamard_transform(xbf, had.random_signs(jax.random.key(2), n))
    assert ys.dtype == jnp.bfloat16
    # Integer input is promoted to float32.
    yi = had.hadamard_transform(jnp.ones((4,), jnp.int32), normalize=False)
    assert yi.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(yi), [4.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize(("n", "block_diag"), [(576, False), (376, True)])
def test_nan_propagates_only_where_expected(n, block_diag):
    x = _rng(n, 9).standard_normal((3, n)).astype(np.float32)
    y = np.asarray(had.hadamard_transform(jnp.asarray(x), allow_block_diagonal=block_diag))
    assert np.all(np.isfinite(y))
    j = n // 2 + 1
    x[1, j] = np.nan
    y = np.asarray(had.hadamard_transform(jnp.asarray(x), allow_block_diagonal=block_diag))
    expect = np.zeros_like(x, dtype=bool)
    if block_diag:
        b = had.hadamard_factorization(n, allow_block_diagonal=True).block_size
        expect[1, (j // b) * b:(j // b + 1) * b] = True
    else:
        expect[1] = True  # Every entry of H is ±1: the NaN reaches the whole row.
    np.testing.assert_array_equal(np.isnan(y), expect)
