"""AWQ: the scale and clip searches against plain numpy loops, and the folded transform."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.algorithms.awq import (
    apply_clip,
    awq_clip_search,
    awq_scale_search,
    fake_quantize,
)
from jaxquant.algorithms.rtn import rtn
from jaxquant.models.transformer import forward
from jaxquant.params import flatten, unflatten
from jaxquant.transforms.awq import awq
from jaxquant.transforms.rotation import TransformError
from tests.test_rotation import _model, _outliers


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "symmetric", "dequantize"))
def _rtn(w, *, bits: int, group_size: int | None, symmetric: bool = False,
         dequantize: bool = True):
    """The library's RTN (jitted: eager RTN spends seconds compiling op by op)."""
    q = rtn(w, bits=bits, group_size=group_size, symmetric=symmetric)
    return q.dequantize(jnp.float32) if dequantize else q


def _np_rtn(w: np.ndarray, bits: int, group_size: int | None, symmetric: bool) -> np.ndarray:
    """Plain numpy RTN quantize-dequantize (float32 scales), one group at a time."""
    w = np.asarray(w, np.float32)
    k = w.shape[1]
    g = k if group_size is None else min(group_size, k)
    maxq = 2 ** bits - 1
    out = np.empty_like(w)
    for j in range(0, k, g):
        wg = w[:, j:j + g]
        lo = np.minimum(wg.min(axis=1), 0)
        hi = np.maximum(wg.max(axis=1), 0)
        if symmetric:
            hi = np.maximum(-lo, hi)
            lo = -hi
        dead = (lo == 0) & (hi == 0)
        lo, hi = np.where(dead, -1, lo), np.where(dead, 1, hi)
        # XLA divides by the constant 2**b - 1 as a multiplication by its reciprocal.
        s = np.maximum((hi - lo) * np.float32(1 / maxq), np.finfo(np.float32).tiny)
        z = np.full_like(s, (maxq + 1) // 2) if symmetric else np.round(-lo / s)
        q = np.clip(np.round(wg / s[:, None]) + z[:, None], 0, maxq)
        out[:, j:j + g] = s[:, None] * (q - z[:, None])
    return out


def _np_scale_losses(x, ws, bits, group_size, symmetric, n_grid):
    """AWQ's reference loop over alpha (auto_scale.py), in numpy."""
    x64 = x.astype(np.float64)
    mean = np.abs(x64).mean(axis=0)
    losses, scales = [], []
    for i in range(n_grid):
        s = np.maximum(mean ** (i / n_grid), 1e-4)
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        err, count = 0.0, 0
        for w in ws:
            q = _np_rtn(w * s, bits, group_size, symmetric).astype(np.float64)
            err += np.sum((x64 @ w.T.astype(np.float64) - (x64 / s) @ q.T) ** 2)
            count += x.shape[0] * w.shape[0]
        losses.append(err / count)
        scales.append(s)
    return np.asarray(losses), scales


def _data(rng, m, k, outs, outliers=()):
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[:, list(outliers)] *= 25.0
    ws = [(rng.standard_normal((o, k)) * 0.05).astype(np.float32) for o in outs]
    return x, ws


@pytest.mark.parametrize("bits,group_size,symmetric", [(3, 64, False), (4, None, True)])
def test_scale_search_matches_numpy_loop(bits, group_size, symmetric):
    rng = np.random.default_rng(9321 + bits)
    x, ws = _data(rng, 300, 200, (56, 24), outliers=(5, 77, 199))
    x[:, 11] = 0.0  # a dead channel: clamped, finite scales
    if symmetric:
        # Symmetric RTN puts a row's most negative weight, when it is the largest in
        # magnitude, on a rounding tie (-hi / s = -(2**b - 1) / 2) that float32 ulps of s
        # resolve either way; a dominant positive weight on an outlier channel avoids it.
        for w in ws:
            w[:, 77] = 0.2
    n_grid = 10
    s, alpha, losses = awq_scale_search(x, ws, bits=bits, group_size=group_size,
                                        symmetric=symmetric, n_grid=n_grid,
                                        scale_dtype=jnp.float32)
    ref, ref_scales = _np_scale_losses(x, ws, bits, group_size, symmetric, n_grid)
    np.testing.assert_allclose(np.asarray(losses), ref, rtol=1e-4)
    i = round(alpha * n_grid)
    assert i == int(np.argmin(ref)) or ref[i] <= ref.min() * (1 + 1e-4)
    if not symmetric:  # (the dominant column above makes alpha = 0 best there)
        assert 0 < i < n_grid  # the outliers make some alpha > 0 worthwhile
    assert np.ptp(ref) > 0.1 * ref.min()  # the candidates really differ
    assert np.all(np.isfinite(np.asarray(s))) and float(jnp.min(s)) > 0
    np.testing.assert_allclose(np.asarray(s), ref_scales[i], rtol=1e-4)


def test_alpha_zero_is_rtn_and_awq_beats_rtn_on_outlier_channels():
    rng = np.random.default_rng(47)
    x, (w,) = _data(rng, 512, 200, (72,), outliers=(3, 64, 150, 151))
    kw = dict(bits=3, group_size=64, symmetric=False)
    s, alpha, losses = awq_scale_search(x, [w], **kw)
    losses = np.asarray(losses)
    # alpha = 0 is exactly RTN (the bfloat16-scale quantizer that rtn() stores).
    wq = np.asarray(_rtn(jnp.asarray(w), **kw), np.float64)
    x64 = x.astype(np.float64)
    rtn_loss = np.mean((x64 @ w.T.astype(np.float64) - x64 @ wq.T) ** 2)
    np.testing.assert_allclose(losses[0], rtn_loss, rtol=1e-4)
    assert losses.min() <= losses[0] and losses[round(alpha * 20)] == losses.min()
    # Folded and quantized for real, on fresh rows of the same distribution: AWQ's
    # output error is clearly below RTN's.
    x_new, _ = _data(np.random.default_rng(48), 512, 200, (), outliers=(3, 64, 150, 151))
    x_new = x_new.astype(np.float64)
    ref = x_new @ w.T.astype(np.float64)
    q_awq = np.asarray(_rtn(jnp.asarray(w) * s[None, :], **kw))
    err_awq = np.mean((x_new / np.asarray(s, np.float64) @ q_awq.T.astype(np.float64) - ref)
                      ** 2)
    err_rtn = np.mean((x_new @ wq.T - ref) ** 2)
    assert err_awq < 0.7 * err_rtn


def _np_clip_errors(x, w, bits, group_size, n_grid, steps):
    """Per candidate, row and group: mean_t (x_g . w_g - x_g . Q(clamp(w_g)))^2."""
    k = w.shape[1]
    g = k if group_size is None else group_size
    starts = range(0, k, g)
    org = np.stack([np.abs(w[:, j:j + g]).max(axis=1) for j in starts], axis=1)
    errs, maxes = [], []
    for i in range(steps):
        mx = (org * np.float32(1 - i / n_grid)).astype(np.float32)
        lim = np.repeat(mx, g, axis=1)[:, :k]
        q = _np_rtn(np.clip(w, -lim, lim), bits, group_size, False).astype(np.float64)
        d = w.astype(np.float64) - q
        e = np.stack([np.mean((x[:, j:j + g].astype(np.float64) @ d[:, j:j + g].T) ** 2,
                              axis=0) for j in starts], axis=1)
        errs.append(e)
        maxes.append(mx)
    return np.asarray(errs), np.asarray(maxes)


@pytest.mark.parametrize("group_size", [64, None])
def test_clip_search_matches_numpy_and_never_hurts(group_size):
    rng = np.random.default_rng(5150 + (group_size or 0))
    # 256 rows > 64 columns per group: the Gram-matrix error; 160 < 200: the direct one.
    x, (w,) = _data(rng, 256 if group_size else 160, 200, (40,), outliers=(7,))
    w[:, 30] *= 8.0  # a column of large weights: worth clipping in some groups
    max_abs = np.asarray(awq_clip_search(x, w, bits=3, group_size=group_size,
                                         symmetric=False, scale_dtype=jnp.float32))
    errs, maxes = _np_clip_errors(x, w, 3, group_size, 20, 10)
    groups = 4 if group_size else 1
    assert max_abs.shape == (40, groups)
    chosen = np.argmin(np.abs(maxes - max_abs[None]), axis=0)  # candidate of each choice
    np.testing.assert_allclose(np.take_along_axis(maxes, chosen[None], 0)[0], max_abs,
                               rtol=1e-6)
    picked = np.take_along_axis(errs, chosen[None], 0)[0]
    best = errs.min(axis=0)
    assert np.all(picked <= best * (1 + 1e-4) + 1e-12)
    assert np.mean(chosen == np.argmin(errs, axis=0)) > 0.95
    assert np.all(picked <= errs[0] * (1 + 1e-6) + 1e-12)  # never worse than no clipping
    assert np.any(chosen > 0)  # and it does clip somewhere
    clipped = np.asarray(apply_clip(jnp.asarray(w), jnp.asarray(max_abs), group_size))
    lim = np.repeat(max_abs, group_size or 200, axis=1)[:, :200]
    np.testing.assert_array_equal(clipped, np.clip(w, -lim, lim))
    # The quantizer the search uses is RTN's, bit for bit.
    np.testing.assert_allclose(
        np.asarray(fake_quantize(jnp.asarray(w), bits=3, group_size=group_size,
                                 symmetric=False, scale_dtype=jnp.float32)),
        _np_rtn(w, 3, group_size, False), rtol=1e-6, atol=1e-7)


def _tiny(family: str, *, kv_heads: int, seed: int):
    """A 2-block random model (hidden 48, MLP 100: not multiples of the group size 32)
    with non-trivial norms and biases and outlier channels in the residual stream."""
    cfg, params = _model(family, hidden=48, tie=False, seed=seed, kv_heads=kv_heads)
    return cfg, _outliers(params, cols=(5, 29), factor=20.0)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


#: Shared by the transform tests (same configs and shapes: jit caches are reused).
_KW = dict(bits=3, group_size=32, symmetric=False, n_grid=10, batch_size=2)
_MHA = ("qwen2", 4)  # v -> o folding happens (num_heads == num_kv_heads); biases


def _windows(seed: int):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 97, (4, 24)), jnp.asarray(rng.integers(0, 97, (2, 24)))


@pytest.mark.parametrize("family,kv_heads", [("llama", 2), _MHA])
def test_awq_transform_keeps_the_float_model(family, kv_heads):
    cfg, params = _tiny(family, kv_heads=kv_heads, seed=611 + kv_heads)
    calib, tokens = _windows(612 + kv_heads)
    ref = np.asarray(forward(params, cfg, tokens))
    scaled = awq(params, cfg, calib, clip=False, **_KW)
    np.testing.assert_allclose(np.asarray(forward(scaled, cfg, tokens)), ref, rtol=1e-4,
                               atol=1e-4)
    flat, sflat = flatten(params), flatten(scaled)
    assert set(flat) == set(sflat) and all(sflat[p].shape == v.shape for p, v in flat.items())
    a = {p: np.asarray(v, np.float64) for p, v in flat.items()}
    b = {p: np.asarray(v, np.float64) for p, v in sflat.items()}

    def col_scales(w):  # s of b[w] = a[w] diag(s), by least squares over the rows
        return np.sum(a[w] * b[w], axis=0) / np.sum(a[w] ** 2, axis=0)

    def close(x, y):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-9)

    trivial = {"qkv": [], "gate_up": [], "o": [], "down": []}  # alpha = 0 chosen?
    for i in range(2):
        pre = f"layers.{i}."
        # Exactly AWQ's folds: readers' columns times s, the norm (or the previous
        # layer's rows and bias) divided by s; nothing else.
        s_qkv = a[pre + "input_layernorm.weight"] / b[pre + "input_layernorm.weight"]
        s_gu = a[pre + "post_attention_layernorm.weight"] / b[
            pre + "post_attention_layernorm.weight"]
        s_o, s_down = col_scales(pre + "self_attn.o_proj.weight"), col_scales(
            pre + "mlp.down_proj.weight")
        for r in ("q_proj", "k_proj"):
            close(b[f"{pre}self_attn.{r}.weight"], a[f"{pre}self_attn.{r}.weight"] * s_qkv)
        close(b[pre + "mlp.gate_proj.weight"], a[pre + "mlp.gate_proj.weight"] * s_gu)
        close(b[pre + "mlp.up_proj.weight"],
              a[pre + "mlp.up_proj.weight"] * s_gu / s_down[:, None])
        close(b[pre + "mlp.down_proj.weight"], a[pre + "mlp.down_proj.weight"] * s_down)
        if kv_heads < cfg.num_heads:  # no v -> o folding with grouped-query attention
            np.testing.assert_array_equal(b[pre + "self_attn.o_proj.weight"],
                                          a[pre + "self_attn.o_proj.weight"])
            s_o = np.ones(cfg.num_kv_heads * cfg.head_dim)
        close(b[pre + "self_attn.v_proj.weight"],
              a[pre + "self_attn.v_proj.weight"] * s_qkv / s_o[:, None])
        if family == "qwen2":  # v_proj's bias carries the o_proj scales, q/k's nothing
            close(b[pre + "self_attn.v_proj.bias"], a[pre + "self_attn.v_proj.bias"] / s_o)
            for r in ("q_proj", "k_proj", "o_proj"):
                close(b[f"{pre}self_attn.{r}.bias"], a[f"{pre}self_attn.{r}.bias"])
        for k, s in (("qkv", s_qkv), ("gate_up", s_gu), ("o", s_o), ("down", s_down)):
            trivial[k].append(np.allclose(s, 1.0, rtol=1e-6))
    assert not any(trivial["qkv"])  # outlier channels: always worth scaling here
    assert not all(trivial["gate_up"]) and not all(trivial["down"])
    assert all(trivial["o"]) == (kv_heads < cfg.num_heads)
    for p in ("embed_tokens.weight", "lm_head.weight", "norm.weight"):
        np.testing.assert_array_equal(b[p], a[p])
    # With clipping: other weights, nearly the same function.
    clipped = awq(params, cfg, calib, clip=True, progress=True, **_KW)
    cflat = flatten(clipped)
    for name in ("self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        p = f"layers.0.{name}.weight"
        assert not np.array_equal(np.asarray(cflat[p]), np.asarray(sflat[p])), p
        assert np.all(np.abs(np.asarray(cflat[p])) <= np.abs(np.asarray(sflat[p])))
    for name in ("self_attn.q_proj", "self_attn.k_proj"):  # AWQ does not clip q/k
        p = f"layers.1.{name}.weight"
        np.testing.assert_array_equal(np.asarray(cflat[p]), np.asarray(sflat[p]))
    assert _rel(forward(clipped, cfg, tokens), ref) < 0.1


def test_awq_then_rtn_beats_rtn_on_outlier_channels():
    cfg, params = _tiny(_MHA[0], kv_heads=_MHA[1], seed=733)
    calib, tokens = _windows(734)

    def quantized(p):
        return unflatten({k: _rtn(v, bits=3, group_size=32)
                          if k.startswith("layers.") and k.endswith("proj.weight") else v
                          for k, v in flatten(p).items()})

    ref = forward(params, cfg, tokens)
    err_rtn = _rel(forward(quantized(params), cfg, tokens), ref)
    err_awq = _rel(forward(quantized(awq(params, cfg, calib, **_KW)), cfg, tokens), ref)
    assert err_awq < 0.8 * err_rtn


def test_awq_refuses_quantized_params_and_non_finite_activations():
    cfg, params = _tiny("llama", kv_heads=2, seed=901)
    calib, _ = _windows(902)
    flat = flatten(params)
    q = dict(flat)
    q["layers.1.mlp.up_proj.weight"] = _rtn(flat["layers.1.mlp.up_proj.weight"], bits=4,
                                            group_size=32, dequantize=False)
    with pytest.raises(TransformError, match="already quantized"):
        awq(unflatten(q), cfg, calib, **_KW)
    gemma = dataclasses.replace(cfg, family="gemma3", sandwich_norm=True)
    with pytest.raises(TransformError, match="pre-norm"):
        awq(params, gemma, calib, **_KW)
    bad = dict(flat)
    emb = np.asarray(flat["embed_tokens.weight"]).copy()
    emb[calib[0, 3]] = np.nan
    bad["embed_tokens.weight"] = jnp.asarray(emb)
    with pytest.raises(TransformError, match="non-finite"):
        awq(unflatten(bad), cfg, calib, **_KW)
    with pytest.raises(ValueError, match="NaN"):
        awq_scale_search(np.full((4, 8), np.inf, np.float32), [np.ones((3, 8), np.float32)],
                         bits=4, group_size=None, symmetric=False)
