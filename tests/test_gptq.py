"""GPTQ against a plain numpy GPTQ written from the paper (Alg. 1, lazy batches)."""

from __future__ import annotations

import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.algorithms.gptq import HessianError, gptq, inverse_cholesky, proxy_loss
from jaxquant.algorithms.rtn import rtn
from jaxquant.formats import MixedWeight, UniformWeight
from tests.test_formats import numpy_group_params


def numpy_gptq(w, h, *, bits, group, sym, block=128, damp=0.01, act_order=False):
    """Straight from the paper / reference loop, float32 numpy; returns dequantized W."""
    w = w.astype(np.float32).copy()
    h = h.astype(np.float32).copy()
    _n, k = w.shape
    g = k if group is None else group
    maxq = 2 ** bits - 1
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    if group is None:
        scale, zero = numpy_group_params(w, bits, sym)
    perm = np.arange(k)
    if act_order:
        perm = np.argsort(-np.diag(h), kind="stable")
        w, h = w[:, perm], h[perm][:, perm]
    h = h + damp * np.mean(np.diag(h)) * np.eye(k, dtype=np.float32)
    u = np.linalg.cholesky(np.linalg.inv(h.astype(np.float64))).T.astype(np.float32)
    q = np.zeros_like(w)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if group is not None and col % g == 0:
                scale, zero = numpy_group_params(w[:, col:col + g], bits, sym)
            c = np.clip(np.round(w1[:, i] / scale) + zero, 0, maxq)
            q[:, col] = scale * (c - zero)
            e = (w1[:, i] - q[:, col]) / u1[i, i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    out = np.empty_like(q)
    out[:, perm] = q
    return out


def layer(seed: int, n: int, k: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4 * k, k)).astype(np.float32)
    x[:, ::7] *= 5.0  # outlier channels make the Hessian far from identity
    x[:, 3] = 0.0  # a dead input
    h = 2 * x.T @ x / len(x)
    w = rng.standard_normal((n, k)).astype(np.float32)
    return w, h


@pytest.mark.parametrize("bits,group,sym,act_order", [
    (4, 128, False, False), (3, 64, True, False), (2, None, False, False),
    (4, 32, False, True), (3, None, True, True),
])
def test_matches_numpy_reference(bits, group, sym, act_order):
    w, h = layer(zlib.crc32(repr((bits, group, sym, act_order)).encode()), 24, 200)
    q = gptq(jnp.asarray(w), jnp.asarray(h), bits=bits, group_size=group, symmetric=sym,
             act_order=act_order, block_size=64)
    want = numpy_gptq(w, h, bits=bits, group=group, sym=sym, block=64, act_order=act_order)
    got = np.asarray(q.dequantize())
    assert np.isfinite(got).all()
    assert isinstance(q, MixedWeight if act_order and group else UniformWeight)
    # Same quantized weights up to rounding ties (float32 vs float32, different order).
    same = np.isclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max()).mean()
    assert same > 0.995, same
    assert proxy_loss(w, got, h) == pytest.approx(proxy_loss(w, want, h), rel=0.02)
    assert np.all(got[:, 3] == 0) or np.allclose(got[:, 3], 0)  # dead input


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_beats_rtn_on_the_layer_loss(bits):
    # Correlated inputs (as in real activations): error compensation pays off.
    rng = np.random.default_rng(bits)
    k = 256
    x = rng.standard_normal((1024, 32)) @ rng.standard_normal((32, k)) + 0.3 * \
        rng.standard_normal((1024, k))
    h = (2 * x.T @ x / len(x)).astype(np.float32)
    w = rng.standard_normal((32, k)).astype(np.float32)
    q = gptq(jnp.asarray(w), jnp.asarray(h), bits=bits, group_size=128)
    r = rtn(jnp.asarray(w), bits=bits, group_size=128)
    assert proxy_loss(w, q.dequantize(), h) < 0.5 * proxy_loss(w, r.dequantize(), h)


def test_static_groups_with_act_order_keep_original_layout():
    w, h = layer(11, 16, 160)
    q = gptq(jnp.asarray(w), jnp.asarray(h), bits=4, group_size=32, act_order=True,
             static_groups=True, block_size=32)
    assert isinstance(q, UniformWeight) and q.group_size == 32
    r = rtn(jnp.asarray(w).at[:, 3].set(0), bits=4, group_size=32)
    np.testing.assert_array_equal(np.asarray(q.scales), np.asarray(r.scales))
    assert proxy_loss(w, q.dequantize(), h) < proxy_loss(w, r.dequantize(), h)


def test_damping_raised_when_cholesky_fails():
    # Indefinite (eigenvalues -1 and 3) but with a positive diagonal: 1% and 10% damping
    # fail, JAX returns NaN instead of raising, and the damping is raised until it works.
    h = np.array([[1.0, 2.0], [2.0, 1.0]], np.float32)
    u, used = inverse_cholesky(jnp.asarray(h), damp=0.01)
    assert used >= 1.0 and np.isfinite(np.asarray(u)).all()
    with pytest.raises(HessianError, match="not positive definite"):
        inverse_cholesky(jnp.asarray(-np.eye(4, dtype=np.float32)), damp=0.01, max_tries=2)
