"""SliM-LLM (SBA, SQC, 1-bit groups) and SliM-LLM+ against plain numpy written from the paper."""

from __future__ import annotations

import zlib

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxquant.algorithms.gptq import binary_params, gptq, proxy_loss
from jaxquant.algorithms.slim import (
    SQC,
    allocate_bits,
    candidate_bits,
    fake_quant_groups,
    kl_scores,
    slim,
)
from jaxquant.algorithms.slim_plus import fake_quant, to_format
from jaxquant.formats import MixedWeight, UniformWeight
from tests.test_formats import numpy_group_params

BF16 = ml_dtypes.bfloat16


def _bf16(x):
    return np.asarray(x, np.float32).astype(BF16).astype(np.float32)


def numpy_binary(block):
    """Row-wise binarization around the mean: scale 2*alpha, zero 1/2 - mean/scale."""
    mean = block.mean(axis=1)
    alpha = np.abs(block - mean[:, None]).mean(axis=1)
    scale = _bf16(np.maximum(2 * alpha, np.finfo(np.float32).tiny))
    return scale, _bf16(0.5 - mean / scale)


def numpy_quant(col, scale, zero, bits):
    if bits == 1:
        q = (col / scale + zero > 0.5).astype(np.float32)
    else:
        q = np.clip(np.round(col / scale) + zero, 0, 2 ** bits - 1)
    return scale * (q - zero)


def numpy_sqc(block, sal, bits, lam):
    """SQC per row: the factor of [min, max] in SQC's grid minimising the weighted l_2.4."""
    maxq = 2 ** bits - 1
    flat = sal.ravel()
    z = (sal - flat.mean()) / flat.std(ddof=1)
    weight = np.where(z > 2, lam, 1.0)
    lo0 = np.minimum(block.min(axis=1), 0)
    hi0 = np.maximum(block.max(axis=1), 0)
    best = np.full(len(block), np.inf)
    out_s, out_z = np.zeros(len(block), np.float32), np.zeros(len(block), np.float32)
    for f in np.asarray(SQC.grid, np.float32):
        lo, hi = lo0 * f, hi0 * f
        dead = (lo == 0) & (hi == 0)
        lo, hi = np.where(dead, -1, lo), np.where(dead, 1, hi)
        s = _bf16((hi - lo) / maxq)
        zz = np.round(-lo / s)
        q = np.clip(np.round(block / s[:, None]) + zz[:, None], 0, maxq)
        err = (weight * np.abs(s[:, None] * (q - zz[:, None]) - block) ** 2.4).sum(axis=1)
        better = err < best
        best = np.where(better, err, best)
        out_s, out_z = np.where(better, s, out_s), np.where(better, zz, out_z)
    return out_s, out_z


def numpy_fake_quant(w, group_bits, g):
    out = np.empty_like(w)
    for gi, b in enumerate(group_bits):
        blk = w[:, gi * g:(gi + 1) * g]
        s, z = numpy_binary(blk) if b == 1 else numpy_group_params(blk, int(b), False)
        out[:, gi * g:(gi + 1) * g] = numpy_quant(blk, s[:, None], z[:, None], b)
    return out


def numpy_slim(w, h, x, *, bits, g, lam, damp=0.01):
    """SliM-LLM from the paper: salience, SBA by KL over candidates, GPTQ with SQC."""
    w = w.astype(np.float32).copy()
    h = h.astype(np.float32).copy()
    _n, k = w.shape
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h = h + damp * np.mean(np.diag(h)) * np.eye(k, dtype=np.float32)
    u = np.linalg.cholesky(np.linalg.inv(h.astype(np.float64))).T.astype(np.float32)
    ngroups = -(-k // g)
    widths = np.minimum(g, k - g * np.arange(ngroups))
    sal = (w ** 2 / np.diag(u)[None, :] ** 2).sum(axis=0)
    gsal = np.array([sal[i * g:(i + 1) * g].sum() for i in range(ngroups)])
    full = np.flatnonzero(widths == g)
    order = full[np.argsort(gsal[full], kind="stable")]
    logits = x @ w.T
    log_qf = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                             keepdims=True)) - logits.max(-1, keepdims=True)
    best, best_bits = np.inf, None
    for i in range(len(full) // 2 + 1):
        gb = np.full(ngroups, bits)
        if i:
            gb[order[:i]], gb[order[-i:]] = bits - 1, bits + 1
        lq = x @ numpy_fake_quant(w, gb, g).T
        log_p = lq - lq.max(-1, keepdims=True)
        log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
        kl = np.mean(np.sum(np.exp(log_p) * (log_p - log_qf), axis=-1))
        if kl < best:
            best, best_bits = kl, gb
    out = np.zeros_like(w)
    for gi in range(ngroups):
        i1, i2 = gi * g, min(gi * g + g, k)
        b = int(best_bits[gi])
        w1 = w[:, i1:i2].copy()
        if b == 1:
            s, z = numpy_binary(w1)
        else:
            s, z = numpy_sqc(w1, w1 ** 2 / np.diag(u)[None, i1:i2] ** 2, b, lam)
        err1 = np.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            out[:, i1 + i] = numpy_quant(w1[:, i], s, z, b)
            e = (w1[:, i] - out[:, i1 + i]) / u1[i, i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return out, best_bits


def structured_layer(seed, n, k, tokens=512):
    """Correlated inputs with a few strong channels (salience differs across groups)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, 24)) @ rng.standard_normal((24, k))
    x = x + 0.3 * rng.standard_normal((tokens, k))
    x[:, :k // 5] *= 4.0  # strong channels, concentrated in the first groups
    x = x.astype(np.float32)
    h = (2 * x.T @ x / len(x)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    return w, h, x


def test_candidates_average_exactly_n_bits_with_a_short_group():
    rng = np.random.default_rng(zlib.crc32(b"cands"))
    widths = np.array([32, 32, 32, 32, 32, 17])
    sal = rng.random(6)
    cands = candidate_bits(sal, 2, widths)
    assert len(cands) == 3 and (cands[0] == 2).all()
    for c in cands:
        assert (c * widths).sum() == 2 * widths.sum()  # exact average
        assert c[-1] == 2  # the short group keeps N bits
        assert set(c) <= {1, 2, 3}
    order = np.argsort(sal[:5])
    assert cands[2][order[0]] == 1 and cands[2][order[-1]] == 3


def test_binary_params_are_the_two_best_levels():
    rng = np.random.default_rng(zlib.crc32(b"binary"))
    w = rng.standard_normal((6, 40)).astype(np.float32) + 0.7
    valid = jnp.arange(48) < 40
    s, z = binary_params(jnp.pad(jnp.asarray(w), ((0, 0), (0, 8))), valid, jnp.float32)
    s, z = np.asarray(s), np.asarray(z)
    mean = w.mean(1)
    alpha = np.abs(w - mean[:, None]).mean(1)
    np.testing.assert_allclose(s * (0 - z), mean - alpha, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s * (1 - z), mean + alpha, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k,g", [(200, 64), (96, 32)])
def test_fake_quant_groups_matches_numpy(k, g):
    rng = np.random.default_rng(zlib.crc32(repr((k, g)).encode()))
    w = rng.standard_normal((10, k)).astype(np.float32)
    ngroups = -(-k // g)
    bits = rng.integers(1, 5, ngroups).astype(np.int32)
    got = np.asarray(fake_quant_groups(jnp.asarray(w), jnp.asarray(bits), group_size=g))
    want = numpy_fake_quant(w, bits, g)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_kl_scores_zero_for_exact_weights_and_positive_otherwise():
    w, _h, x = structured_layer(3, 16, 64)
    cands = jnp.asarray([[8, 8], [2, 2], [1, 3]], jnp.int32)
    kl = np.asarray(kl_scores(jnp.asarray(w), jnp.asarray(x), cands, group_size=32,
                              scale_dtype=jnp.float32))
    assert np.isfinite(kl).all() and (kl >= -1e-6).all()
    assert kl[0] < 1e-3 * kl[1]


@pytest.mark.parametrize("bits,k,g,lam", [(2, 200, 32, 4.0), (3, 160, 32, 1.0),
                                          (4, 136, 32, 8.0)])
def test_slim_matches_numpy_reference(bits, k, g, lam):
    w, h, x = structured_layer(zlib.crc32(repr((bits, k, g, lam)).encode()), 20, k)
    h[5, :] = h[:, 5] = 0  # a dead input
    q, info = slim(jnp.asarray(w), jnp.asarray(h), bits=bits, group_size=g,
                   inputs=jnp.asarray(x), salience_weight=lam, return_info=True)
    want, want_bits = numpy_slim(w, h, x, bits=bits, g=g, lam=lam)
    assert info["group_bits"] == [int(b) for b in want_bits]
    got = np.asarray(q.dequantize())
    assert np.isfinite(got).all()
    same = np.isclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max()).mean()
    assert same > 0.99, same
    assert proxy_loss(w, got, h) == pytest.approx(proxy_loss(w, want, h), rel=0.03)
    ngroups = -(-k // g)
    widths = np.minimum(g, k - g * np.arange(ngroups))
    assert (np.asarray(info["group_bits"]) * widths).sum() == bits * k


@pytest.mark.parametrize("bits", [2, 3])
def test_slim_beats_gptq_where_salience_varies(bits):
    w, h, x = structured_layer(100 + bits, 48, 512)
    q, info = slim(jnp.asarray(w), jnp.asarray(h), bits=bits, group_size=64,
                   inputs=jnp.asarray(x), return_info=True)
    assert isinstance(q, MixedWeight) and info["pairs"] > 0
    assert sorted(set(q.part_bits)) == [bits - 1, bits, bits + 1]
    assert q.column_bits().mean() == bits
    g = gptq(jnp.asarray(w), jnp.asarray(h), bits=bits, group_size=64)
    assert proxy_loss(w, q.dequantize(), h) < proxy_loss(w, g.dequantize(), h)


def test_slim_act_order_and_without_inputs():
    w, h, x = structured_layer(7, 24, 192)
    q = slim(jnp.asarray(w), jnp.asarray(h), bits=3, group_size=64, inputs=jnp.asarray(x),
             act_order=True)
    assert isinstance(q, MixedWeight) and q.column_bits().mean() == 3
    assert np.isfinite(np.asarray(q.dequantize())).all()
    u = slim(jnp.asarray(w), jnp.asarray(h), bits=3, group_size=64)  # no inputs: uniform
    assert isinstance(u, UniformWeight) and u.bits == 3
    with pytest.raises(ValueError, match="2 to 7"):
        slim(jnp.asarray(w), jnp.asarray(h), bits=8, group_size=64)


def test_slim_plus_starts_at_slim_and_stores_what_it_trains():
    w, h, x = structured_layer(9, 16, 160)
    q, _, state = slim(jnp.asarray(w), jnp.asarray(h), bits=2, group_size=32,
                       inputs=jnp.asarray(x), act_order=True, return_state=True)
    inv = jnp.asarray(np.argsort(state["perm"]))
    zero = jnp.zeros((2, *state["scales"].shape))
    # gamma = 0 reproduces SliM-LLM's weights exactly.
    fq0 = np.asarray(fake_quant(state["codes"], zero, state["scales"], state["zeros"], inv, 32))
    np.testing.assert_allclose(fq0, np.asarray(q.dequantize()), rtol=1e-5, atol=1e-6)
    # Other ranges: the stored format holds what the training forward computed.
    rng = np.random.default_rng(1)
    gamma = jnp.asarray(rng.normal(0, 0.1, zero.shape), jnp.float32)
    fq = np.asarray(fake_quant(state["codes"], gamma, state["scales"], state["zeros"], inv, 32))
    stored = to_format(state, gamma, scale_dtype=jnp.float32)
    assert np.isfinite(fq).all() and not np.allclose(fq, fq0)
    np.testing.assert_allclose(np.asarray(stored.dequantize()), fq, rtol=1e-4, atol=1e-5)
    assert stored.column_bits().mean() == 2


def test_allocate_bits_prefers_uniform_when_groups_are_alike():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((32, 256)).astype(np.float32)
    x = rng.standard_normal((256, 256)).astype(np.float32)
    bits, info = allocate_bits(jnp.asarray(w), jnp.eye(256), jnp.asarray(x), bits=3,
                               group_size=64)
    assert len(info["kl"]) == 3 and np.isfinite(info["kl"]).all()
    assert (bits * 64).sum() == 3 * 256
