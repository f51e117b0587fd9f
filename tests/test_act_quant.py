"""Activation / KV quantization, the W8A8 integer matmul and the difficulty diagnostics."""

from __future__ import annotations

import dataclasses
import itertools
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.algorithms.act_quant import (
    ActQuantConfig,
    calibrate_static_scale,
    channel_difficulty,
    channel_norms,
    dequantize_activations,
    dequantize_kv,
    fake_quant_activations,
    int8_matmul,
    layer_error,
    layer_error_estimate,
    quantize_activations,
    quantize_kv,
    quantize_weight_symmetric,
)

T, C, N_OUT = 37, 61, 29  # tokens, channels, output rows: multiples of nothing


def rng_for(*key) -> np.random.Generator:
    """A generator seeded from the test's parameters (fresh per test, reproducible)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def acts(rng: np.random.Generator, t: int = T, c: int = C, zero_rows: bool = True
         ) -> np.ndarray:
    """Heavy-tailed activations (Student-t, 3 dof) with 3 outlier channels (x20)."""
    x = rng.standard_t(3, size=(t, c))
    x[:, rng.choice(c, 3, replace=False)] *= 20.0
    x += rng.normal(0.3, 0.1, size=c)  # channel offsets: rows are not centred
    if zero_rows:
        x[[2, t - 1]] = 0.0
    return x.astype(np.float32)


# --- numpy reference, written from the definitions ----------------------------------------

def np_params(x: np.ndarray, cfg: ActQuantConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (scale, zero) in float64 and the clip range [lo, hi] per row."""
    x = x.astype(np.float64)
    if cfg.symmetric:
        hi = cfg.clip_ratio * np.abs(x).max(-1, keepdims=True)
        lo = -hi
        s = np.where(hi > 0, hi / cfg.qmax, 1.0)
        z = np.zeros_like(s)
    else:
        lo = cfg.clip_ratio * np.minimum(x.min(-1, keepdims=True), 0)
        hi = cfg.clip_ratio * np.maximum(x.max(-1, keepdims=True), 0)
        s = np.where(hi > lo, (hi - lo) / cfg.qmax, 1.0)
        z = np.round(-lo / s)
    return s, z, lo, hi


# --- config -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"bits": 1}, {"bits": 9}, {"bits": 4.0}, {"bits": True}, {"clip_ratio": 0.0},
    {"clip_ratio": 1.5}, {"clip_ratio": float("nan")}, {"clip_ratio": -0.5},
    {"symmetric": 1}, {"dynamic": "yes"}, {"dynamic": False, "symmetric": False},
])
def test_config_rejects(kwargs):
    with pytest.raises(ValueError):
        ActQuantConfig(**kwargs)


def test_config_defaults_and_qmax():
    cfg = ActQuantConfig()
    assert (cfg.bits, cfg.symmetric, cfg.clip_ratio, cfg.dynamic) == (8, True, 1.0, True)
    assert cfg.qmax == 127
    assert ActQuantConfig(bits=4, symmetric=False).qmax == 15
    assert ActQuantConfig(bits=4).qmax == 7
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.bits = 4  # type: ignore[misc]


# --- dynamic per-token --------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clip", [1.0, 0.9])
def test_dynamic_round_trip(bits, symmetric, clip):
    cfg = ActQuantConfig(bits=bits, symmetric=symmetric, clip_ratio=clip)
    x = acts(rng_for("dyn", bits, symmetric, clip))
    codes, s, z = quantize_activations(jnp.asarray(x), cfg)
    assert codes.dtype == (jnp.int8 if symmetric else jnp.uint8)
    assert codes.shape == x.shape and s.shape == (T, 1) and z.shape == (T, 1)
    c = np.asarray(codes).astype(np.int64)
    lo_code = -cfg.qmax if symmetric else 0
    assert c.min() >= lo_code and c.max() <= cfg.qmax
    rs, rz, lo, hi = np_params(x, cfg)
    np.testing.assert_allclose(np.asarray(s), rs, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(z), rz)
    xq = np.asarray(dequantize_activations(codes, s, z)).astype(np.float64)
    np.testing.assert_array_equal(xq, np.asarray(fake_quant_activations(jnp.asarray(x), cfg)))
    err = np.abs(xq - x)
    s64 = np.asarray(s).astype(np.float64)
    inside = (x >= lo) & (x <= hi)
    assert np.all(err[inside] <= (s64 * 0.5 * (1 + 1e-5) + 1e-7 * np.abs(x))[inside])
    # Outside the clip range: saturated at the end of the grid on that side.
    if clip < 1:
        above, below = x > hi, x < lo
        assert above.any() and below.any()
        assert np.all(c[above] == cfg.qmax) and np.all(c[below] == lo_code)
    else:
        assert inside.all()
    # All-zero rows: exactly zero, finite scale.
    assert np.all(xq[[2, T - 1]] == 0) and np.all(np.isfinite(np.asarray(s)))


def test_bf16_input():
    cfg = ActQuantConfig(bits=4, clip_ratio=0.9)
    x = jnp.asarray(acts(rng_for("bf16")), jnp.bfloat16)
    y = fake_quant_activations(x, cfg)
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    # Math is float32 on the upcast values; only the output is rounded to bf16.
    ref = fake_quant_activations(x.astype(jnp.float32), cfg).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(ref, np.float32))
    codes, s, _ = quantize_activations(x, cfg)
    assert codes.dtype == jnp.int8 and s.dtype == jnp.float32


def test_multi_axis_tokens():
    """Every index but the last is a token: [batch, seq, channels] == rows of the 2-D."""
    cfg = ActQuantConfig(bits=8, symmetric=False)
    x = acts(rng_for("3d"), t=2 * T).reshape(2, T, C)
    codes, s, z = quantize_activations(jnp.asarray(x), cfg)
    c2, s2, z2 = quantize_activations(jnp.asarray(x.reshape(2 * T, C)), cfg)
    assert s.shape == (2, T, 1)
    np.testing.assert_array_equal(np.asarray(codes).reshape(2 * T, C), np.asarray(c2))
    np.testing.assert_array_equal(np.asarray(s).reshape(-1, 1), np.asarray(s2))
    np.testing.assert_array_equal(np.asarray(z).reshape(-1, 1), np.asarray(z2))


# --- static per-tensor --------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_static_vs_dynamic(bits):
    rng = rng_for("static", bits)
    calib = [acts(rng, t=20), acts(rng, t=13)]
    x = acts(rng)
    x[5, 7] = 1e3  # beyond any calibration value
    scfg = ActQuantConfig(bits=bits, dynamic=False, clip_ratio=0.95)
    dcfg = ActQuantConfig(bits=bits, clip_ratio=0.95)
    scale = calibrate_static_scale([jnp.asarray(b) for b in calib], scfg)
    amax = max(np.abs(b).max() for b in calib)
    np.testing.assert_allclose(float(scale), 0.95 * amax / scfg.qmax, rtol=1e-6)
    # One array or a sequence of batches: the same.
    assert float(calibrate_static_scale(np.concatenate(calib), scfg)) == float(scale)

    codes, s, z = quantize_activations(jnp.asarray(x), scfg, scale=scale)
    assert s.shape == (T, 1) and np.all(np.asarray(s) == float(scale))
    assert np.all(np.asarray(z) == 0)
    xq = np.asarray(dequantize_activations(codes, s, z))
    hi = float(scale) * scfg.qmax
    inside = np.abs(x) <= hi
    assert np.all(np.abs(xq - x)[inside] <= float(scale) * 0.5 * (1 + 1e-5))
    c = np.asarray(codes)
    assert (~inside).any()
    np.testing.assert_array_equal(c[~inside], np.sign(x[~inside]) * scfg.qmax)
    assert c[5, 7] == scfg.qmax

    # Dynamic per-token scales never exceed the static one (rows are inside the calib
    # range here), so the dynamic grid is at least as fine on every row.
    xin = np.clip(x, -amax, amax)
    _, ds, _ = quantize_activations(jnp.asarray(xin), dcfg)
    assert np.all(np.asarray(ds) <= float(scale) * (1 + 1e-6))
    # One token calibrated on itself: static == dynamic.
    row = jnp.asarray(x[:1])
    one = calibrate_static_scale(row, scfg)
    np.testing.assert_array_equal(np.asarray(quantize_activations(row, scfg, scale=one)[0]),
                                  np.asarray(quantize_activations(row, dcfg)[0]))


def test_scale_argument_misuse():
    x = jnp.ones((3, 5))
    with pytest.raises(ValueError, match="static mode"):
        quantize_activations(x, ActQuantConfig(), scale=jnp.float32(0.1))
    with pytest.raises(ValueError, match="needs a scale"):
        quantize_activations(x, ActQuantConfig(dynamic=False))
    with pytest.raises(ValueError, match="symmetric"):
        calibrate_static_scale(x, ActQuantConfig(symmetric=False))


# --- non-finite input ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["sym", "asym", "static"])
def test_nan_and_inf_rows(mode):
    x = acts(rng_for("nan", mode))
    x[4, 10] = np.nan
    x[6, 0] = np.inf
    x[9, 60] = -np.inf
    bad = [4, 6, 9]
    if mode == "static":
        cfg = ActQuantConfig(bits=4, dynamic=False)
        scale = calibrate_static_scale(x, cfg)  # non-finite values are ignored
        assert np.isfinite(float(scale))
    else:
        cfg = ActQuantConfig(bits=4, symmetric=mode == "sym", clip_ratio=0.9)
        scale = None
    codes, s, _ = quantize_activations(jnp.asarray(x), cfg, scale=scale)
    y = np.asarray(fake_quant_activations(jnp.asarray(x), cfg, scale))
    assert np.all(np.isnan(y[bad])) and np.all(np.isnan(np.asarray(s)[bad]))
    assert np.all(np.asarray(codes)[bad] == 0)
    good = np.setdiff1d(np.arange(T), bad)
    assert np.all(np.isfinite(y[good]))
    clean = np.asarray(fake_quant_activations(jnp.asarray(x[good]), cfg, scale))
    np.testing.assert_array_equal(y[good], clean)


# --- KV cache -----------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("axis", [-1, 1])
def test_kv_round_trip(bits, axis):
    rng = rng_for("kv", bits, axis)
    b, s, h, d = 2, 7, 3, 37
    x = (rng.standard_t(4, size=(b, s, h, d)) * rng.uniform(0.1, 3, size=(1, 1, h, 1)))
    x = x.astype(np.float32)
    x[1, 3, 2] = 0.25  # a constant group
    # axis=1: a [batch, head_dim, seq, heads] layout holding the same groups.
    x_in = np.moveaxis(x, -1, 1) if axis == 1 else x
    codes, scale, off = quantize_kv(jnp.asarray(x_in), bits, axis=axis)
    assert codes.dtype == jnp.uint8 and codes.shape == x_in.shape
    kept = list(x_in.shape)
    kept[axis] = 1
    assert scale.shape == tuple(kept) and off.shape == tuple(kept)
    assert int(np.asarray(codes).max()) <= 2 ** bits - 1
    y = np.asarray(dequantize_kv(codes, scale, off))
    if axis == 1:
        y, scale, off = (np.moveaxis(np.asarray(a), 1, -1) for a in (y, scale, off))
    scale, off = np.asarray(scale), np.asarray(off)
    lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    np.testing.assert_allclose(scale, np.where(hi > lo, (hi - lo) / (2 ** bits - 1), 1),
                               rtol=1e-6)
    np.testing.assert_array_equal(off, lo)
    assert np.all(np.abs(y - x) <= scale * 0.5 * (1 + 1e-5) + 1e-6 * np.abs(x))
    assert np.all(y[1, 3, 2] == 0.25)
    assert y.dtype == np.float32


def test_kv_nan_group_and_bits():
    x = np.asarray(rng_for("kvnan").normal(size=(3, 2, 16)), np.float32)
    x[1, 0, 5] = np.nan
    codes, s, o = quantize_kv(jnp.asarray(x), 4)
    y = np.asarray(dequantize_kv(codes, s, o))
    assert np.all(np.isnan(y[1, 0])) and np.isfinite(np.delete(y.reshape(6, 16), 2, 0)).all()
    for bad in (1, 9, 4.0):
        with pytest.raises(ValueError):
            quantize_kv(jnp.asarray(x), bad)


# --- W8A8 integer matmul ------------------------------------------------------------------

@pytest.mark.parametrize("batch", [(), (2,)])
def test_int8_matmul(batch):
    rng = rng_for("int8mm", batch)
    x = acts(rng, t=int(np.prod(batch, dtype=int)) * T).reshape(*batch, T, C)
    w = (rng.standard_t(5, size=(N_OUT, C)) * 0.05).astype(np.float32)
    w[3] = 0.0
    xc, xs, _ = quantize_activations(jnp.asarray(x), ActQuantConfig(bits=8))
    wc, ws = quantize_weight_symmetric(jnp.asarray(w))
    assert wc.dtype == jnp.int8 and ws.shape == (N_OUT,)

    hlo = jax.jit(int8_matmul).lower(xc, xs, wc, ws).as_text()
    dots = re.findall(r"dot_general.*", hlo)
    assert dots and all("xi8>" in d for d in dots)
    lead = "x".join(str(n) for n in (*batch, T, N_OUT))
    assert any(f"tensor<{lead}xi32>" in d for d in dots), dots

    y = np.asarray(int8_matmul(xc, xs, wc, ws))
    assert y.dtype == np.float32 and y.shape == (*batch, T, N_OUT)
    # Integer accumulation is exact: the same float32 rescale of the int64 sum.
    acc = np.einsum("...k,ok->...o", np.asarray(xc, np.int64), np.asarray(wc, np.int64))
    assert np.abs(acc).max() < 2 ** 24  # exactly representable in float32
    ref = acc.astype(np.float32) * np.asarray(xs) * np.asarray(ws)
    np.testing.assert_allclose(y, ref, rtol=2e-7, atol=0)
    # Float dequantize-then-matmul: equal up to float32 rounding of the products and sum.
    xd = np.asarray(dequantize_activations(xc, xs)).astype(np.float64)
    wd = np.asarray(wc, np.float64) * np.asarray(ws, np.float64)[:, None]
    fref = np.einsum("...k,ok->...o", xd, wd)
    mag = np.einsum("...k,ok->...o", np.abs(xd), np.abs(wd))
    assert np.all(np.abs(y - fref) <= 1e-6 * mag + 1e-30)
    assert np.all(y[..., 3] == 0)
    # And it approximates the float layer.
    np.testing.assert_allclose(y, x @ w.T, atol=0.02 * np.abs(x @ w.T).max())


def test_int8_matmul_rejects_float_codes():
    with pytest.raises(ValueError, match="int8"):
        int8_matmul(jnp.ones((2, 3)), jnp.ones((2, 1)), jnp.ones((4, 3), jnp.int8),
                    jnp.ones(4))


# --- diagnostics --------------------------------------------------------------------------

def test_channel_difficulty():
    rng = rng_for("difficulty")
    x = acts(rng)
    w = (rng.standard_t(5, size=(N_OUT, C)) * 0.05).astype(np.float32)
    for a in (x, w):
        c = np.sqrt((a.astype(np.float64) ** 2).sum(0))
        np.testing.assert_allclose(np.asarray(channel_norms(jnp.asarray(a))), c, rtol=1e-5)
        np.testing.assert_allclose(float(channel_difficulty(jnp.asarray(a))), np.std(c),
                                   rtol=1e-5)
        assert not np.isclose(np.std(c), np.std(c, ddof=1), rtol=1e-5)  # ddof matters
    # Tokens over several axes; bf16 inputs are upcast.
    x3 = jnp.asarray(x[:36].reshape(4, 9, C))
    np.testing.assert_allclose(float(channel_difficulty(x3)),
                               float(channel_difficulty(jnp.asarray(x[:36]))), rtol=1e-6)
    xb = jnp.asarray(x, jnp.bfloat16)
    cb = np.sqrt((np.asarray(xb, np.float64) ** 2).sum(0))
    np.testing.assert_allclose(float(channel_difficulty(xb)), np.std(cb), rtol=1e-5)
    # Outlier channels are what makes it large: equal-norm channels give 0.
    flat = np.ones((T, C), np.float32)
    assert float(channel_difficulty(jnp.asarray(flat))) == pytest.approx(0.0, abs=1e-5)


def np_minmax_rtn(a: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row min-max RTN (float32 rounding decisions, as the definition in float32)."""
    lo, hi = a.min(-1, keepdims=True), a.max(-1, keepdims=True)
    d = (hi - lo) / np.float32(2 ** bits - 1)
    ds = np.where(d > 0, d, np.float32(1))
    q = np.clip(np.round((a - lo) / ds), 0, 2 ** bits - 1)
    return np.where(d > 0, lo + ds * q, a), d[:, 0]


def sample_layer(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = rng_for("layer", seed)
    return acts(rng, zero_rows=False), (rng.standard_t(5, size=(N_OUT, C)) * 0.05).astype(
        np.float32)


@pytest.mark.parametrize("bits", [(4, 4), (8, 8), (4, 8)])
def test_layer_error_against_numpy(bits):
    x, w = sample_layer(0)
    xb, wb = bits
    qx, dx = np_minmax_rtn(x, xb)
    qw, dw = np_minmax_rtn(w, wb)
    ref = np.sum((x.astype(np.float64) @ w.T.astype(np.float64)
                  - qx.astype(np.float64) @ qw.T.astype(np.float64)) ** 2)
    np.testing.assert_allclose(float(layer_error(x, w, xb, wb)), ref, rtol=1e-3)
    est = (np.sum(w.astype(np.float64) ** 2) * np.sum(dx.astype(np.float64) ** 2)
           + np.sum(x.astype(np.float64) ** 2) * np.sum(dw.astype(np.float64) ** 2)) / 12
    np.testing.assert_allclose(float(layer_error_estimate(x, w, xb, wb)), est, rtol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_layer_error_estimate_tracks_measured(seed):
    """Measured est/err on these layers: 0.81-1.35 at 8 bits, 1.04-1.07 at 4; bound: 2x."""
    x, w = sample_layer(seed)
    errs, ests = [], []
    for b in (8, 6, 4, 3, 2):
        errs.append(float(layer_error(x, w, b, b)))
        ests.append(float(layer_error_estimate(x, w, b, b)))
        if b in (4, 8):
            assert 0.5 <= ests[-1] / errs[-1] <= 2.0, (b, errs[-1], ests[-1])
    assert all(a < b for a, b in itertools.pairwise(errs)), errs
    assert all(a < b for a, b in itertools.pairwise(ests)), ests
