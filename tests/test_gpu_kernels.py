"""GPU (Mosaic GPU, Hopper) Pallas kernels, verified without a GPU: the Pallas GPU
interpreter against the jnp reference, and Mosaic GPU lowering for CUDA (the register
path, transposed activation views and transposed output stores the interpreter does not
implement; see ``pallas_kernels/gpu/uniform.py`` and ``uniform_wide.py``).
``benchmarks/kernels_gpu.py --check`` runs the same comparisons compiled on a real GPU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gpu import uniform as gu
from tests.test_rotation import _seed
from tests.test_tpu_kernels import _weight  # RTN of a weight with an outlier column


@pytest.mark.parametrize("bits", range(1, 9))
def test_relayout_round_trips_every_width_and_grouping(bits):
    rng = np.random.default_rng(_seed("gpu relayout", bits))
    for group_size, symmetric in ((64, False), (128, bits > 1), (None, bits > 1)):
        w = _weight(rng, 131, 300, bits, group_size, symmetric)
        gw = gu.relayout(w)
        want = np.asarray(w.dequantize())
        got = np.asarray(gw.dequantize())
        # bf16 scales and biases: the kernel's own rounding, nothing more
        np.testing.assert_allclose(got, want, rtol=0, atol=2 ** -7 * np.abs(want).max())
        n_pad, k_pad = gw.padded
        assert n_pad % gu.N_ALIGN == 0 and k_pad % (gw.tk * gw.max_split) == 0
        # widths 1..3 in bit planes (bits/8 bytes a code), 4..8 in int4/int8 containers
        assert gw.code_bytes == n_pad * k_pad * (bits if bits < 4 else 4 if bits == 4
                                                 else 8) // 8
        assert gw.codes.dtype == (jnp.uint8 if bits < 4 else jnp.int4 if bits == 4
                                  else jnp.int8)
        assert (gw.codes_hi is not None) == (bits == 3)
        values = np.asarray(gw.values().astype(jnp.int32))
        assert values.shape == (n_pad, k_pad)
        np.testing.assert_array_equal(  # the codes themselves are exact
            values[:131, :300] + gw.offset, np.asarray(w.codes(), np.int32))
        # the padding contributes nothing: zero scales and biases past K and N
        assert not np.asarray(gw.scales, np.float32)[:, 131:].any()
        assert not np.asarray(gw.bias, np.float32)[-(-300 // gw.kg):, :].any()
        assert not values[:, 300:].any()
        # what the wide kernel reads: the same codes in the int4/int8 container
        codes, bias = gw.container_codes()
        container = np.asarray(codes.astype(jnp.int32))
        np.testing.assert_array_equal(container[:131, :300] + 2 ** (bits - 1),
                                      np.asarray(w.codes(), np.int32))
        back = (np.repeat(np.asarray(gw.scales, np.float32).T, gw.kg, 1) * container
                + np.repeat(np.asarray(bias, np.float32).T, gw.kg, 1))
        np.testing.assert_allclose(back[:131, :300], want, rtol=0,
                                   atol=2 ** -7 * np.abs(want).max())


@pytest.mark.parametrize("width", [1, 2])
def test_bit_planes_pack_and_unpack_exactly(width):
    rng = np.random.default_rng(_seed("planes", width))
    per = 8 // width
    v = rng.integers(0, 2 ** width, (5, 3 * per * gu.PLANE_UNIT))
    plane = gu.pack_plane(v, width)
    assert plane.dtype == np.uint8 and plane.shape == (5, v.shape[1] * width // 8)
    np.testing.assert_array_equal(np.asarray(gu.unpack_plane(jnp.asarray(plane), width)), v)
    # layout: column c of a run sits in field (c // 64) % per of byte c % 64 of its block
    c = 2 * gu.PLANE_UNIT + 5  # third field of the first run
    byte = plane[:, 5]
    np.testing.assert_array_equal((byte >> (width * 2)) & (2 ** width - 1), v[:, c])


def test_ineligible_weights_say_why():
    rng = np.random.default_rng(_seed("gpu eligible"))
    w = _weight(rng, 64, 256, 4, 32, False)
    assert "multiple of 64" in gu.eligible(w)
    assert "UniformWeight" in gu.eligible(jnp.zeros((4, 4)))
    with pytest.raises(ValueError, match="cannot take"):
        gu.relayout(w)


@pytest.mark.parametrize("bits,group_size,symmetric,lead,dtype", [
    (4, 128, False, (1,), jnp.float32),  # decode: tm 8, split-K 2
    (3, 64, True, (3, 5), jnp.float32),  # 15 rows: tm 16, 64-column kernel groups
    (8, None, False, (20,), jnp.bfloat16),  # int8 codes, per channel, tm 64
    (2, 128, False, (130,), jnp.float32),  # wide kernel: 2 M tiles of 128, split-K
    (2, 128, True, (5,), jnp.float32),  # 2-bit plane (symmetric), decode kernel
    (1, 64, False, (2, 4), jnp.float32),  # 1-bit plane, 64-column kernel groups
    (3, 128, False, (1,), jnp.bfloat16),  # 2-bit + 1-bit planes, split-K
    (4, 64, False, (2, 520), jnp.float32),  # wide kernel, prefill: M tiles of 256
])
def test_uniform_kernel_matches_reference_interpreted(bits, group_size, symmetric, lead, dtype):
    rng = np.random.default_rng(_seed("gpu kernel", bits, group_size, lead))
    n, k = 130, 2304 if lead == (1,) else 576  # 2304: 4-bit: 9 tiles of 256 padded to 10,
    # split 2; 3-bit planes: 5 tiles of 512 (split 1 pads least)
    w = _weight(rng, n, k, bits, group_size, symmetric)
    gw = gu.relayout(w)
    x = jnp.asarray(rng.normal(size=(*lead, k)), dtype)
    y = gu.uniform_matmul(x, gw, interpret=True)
    assert y.shape == (*lead, n) and y.dtype == dtype
    ref = np.asarray(gu.reference(x, w))
    got = np.asarray(y, np.float32)
    assert np.isfinite(got).all()
    # bf16 operands on the tensor cores, float32 accumulation (MISSION: 1e-3..1e-2)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < 1e-2, rel


@pytest.mark.parametrize("m", [4, 66])  # the decode kernel, the wide kernel
def test_nan_activations_propagate_and_other_rows_stay_exact(m):
    rng = np.random.default_rng(_seed("gpu nan", m))
    w = _weight(rng, 64, 256, 4, 128, False)
    gw = gu.relayout(w)
    x = np.asarray(rng.normal(size=(m, 256)), np.float32)
    x[2, 17] = np.nan
    y = np.asarray(gu.uniform_matmul(jnp.asarray(x), gw, interpret=True))
    assert np.isnan(y[2]).all() and np.isfinite(np.delete(y, 2, 0)).all()
    ref = np.asarray(gu.reference(jnp.asarray(np.delete(x, 2, 0)), w))
    assert np.linalg.norm(np.delete(y, 2, 0) - ref) / np.linalg.norm(ref) < 1e-2


@pytest.mark.parametrize("wide_tiles,bits,group_size,k,m", [
    ((128, 128, 2, 2), 4, 128, 1024, 70),  # split-K partials summed in XLA
    ((64, 64, 1, 2), 8, 128, 576, 40),  # int8; 64-column steps on 128-column scale rows
    ((256, 64, 1, 3), 3, 64, 448, 300),  # 64-column kernel groups, K = 7 steps
])
def test_wide_kernel_forced_tiles_match_reference(wide_tiles, bits, group_size, k, m):
    """The wide kernel's tile variants, interpreted (M, N, K not multiples of the tiles)."""
    rng = np.random.default_rng(_seed("gpu wide", wide_tiles, bits, k, m))
    w = _weight(rng, 200, k, bits, group_size, False)
    gw = gu.relayout(w)
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    got = np.asarray(gu.uniform_matmul(x, gw, interpret=True, wide_tiles=wide_tiles))
    ref = np.asarray(gu.reference(x, w))
    assert got.shape == (m, 200) and np.isfinite(got).all()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-2


def test_wide_tiles_fill_the_sms_and_fit_the_layout():
    for m, n, k, group in ((70, 4096, 4096, 128), (512, 1408, 4096, 128),
                           (2048, 512, 2752, 128), (300, 576, 1536, 64), (130, 200, 576, 128)):
        gw = gu.relayout(_weight(np.random.default_rng(0), n, k, 4, group, False))
        n_pad, k_pad = gw.padded
        tt, tk, split, steps = gu.uniform_wide.tiles_for(m, n_pad, k, k_pad, gw.kg, sms=132)
        assert gu.uniform_wide.smem_bytes(tt, tk, gw.kg, split, steps, 4) <= 226 * 1024
        tiles = -(-m // tt) * (n_pad // gu.uniform_wide.TW)
        assert tt == (256 if m >= 1024 else 128) and tk in (64, 128) and steps >= 2
        assert tiles * split <= max(132, tiles)  # split only fills idle SMs
        assert k_pad % (tk * split) == 0 and (k_pad // split) % gw.kg == 0
        if m == 70 and n == 4096:
            assert split == 4  # 32 tiles: the K range spreads over 128 SMs
        if tk < gw.kg:
            assert gw.kg % tk == 0
    with pytest.raises(ValueError, match="do not fit"):  # K_pad 768 does not split in 5
        gu.uniform_matmul(jnp.ones((70, 576)), gw, wide_tiles=(128, 64, 5, 2), interpret=True)


@pytest.mark.parametrize("bits,group_size,m", [
    (4, 128, 1), (4, 128, 16), (4, None, 64), (4, 64, 2048), (8, 128, 1), (2, 128, 512),
    (4, 128, 100), (2, 128, 1), (3, 128, 16), (1, 64, 4), (3, None, 64),
])
def test_uniform_kernel_lowers_for_cuda(bits, group_size, m):
    """The compiled paths (A operand from registers, transposed activation view and
    output store, int4 and int8 upcasts, split-K, the warp-specialized wide kernel)
    through Mosaic GPU's lowering and layout inference."""
    rng = np.random.default_rng(_seed("gpu lower", bits, group_size, m))
    gw = gu.relayout(_weight(rng, 192, 4096, bits, group_size, False))
    x = jax.ShapeDtypeStruct((m, 4096), jnp.bfloat16)
    tm, split, steps = gu.tiles_for(m, gw)

    def lowered(**tiles):
        fn = functools.partial(gu.uniform_matmul, **tiles)
        return jax.jit(fn).trace(x, gw).lower(lowering_platforms=("cuda",)).as_text()

    assert "mosaic_gpu" in lowered()  # the default: decode kernel to DECODE_M, then wide
    assert "mosaic_gpu" in lowered(tiles=(tm, split, steps))  # the decode kernel at any M
    assert tm >= min(m, 8) and (split > 1) == (m <= 64 and gw.max_split > 1)
    if m > gu.DECODE_M:  # the wide kernel's other variants
        assert "mosaic_gpu" in lowered(wide_tiles=(128, 128, 2, 3))
        assert "mosaic_gpu" in lowered(wide_tiles=(256, 64, 1, 4))


def test_prepared_model_runs_the_gpu_kernel_in_the_forward():
    from jaxquant.backends import is_prepared, prepare
    from jaxquant.models.transformer import forward
    from jaxquant.params import flatten
    from tests.test_tpu_kernels import _quantized_model

    cfg, _, q = _quantized_model(bits=4, group_size=None)
    gq = prepare(q, cfg, backend="gpu")
    kinds = {p: type(v).__name__ for p, v in flatten(gq).items()}
    assert kinds["layers.1.mlp.down_proj.weight"] == "GpuUniformWeight"
    assert kinds["lm_head.weight"] == "GpuUniformWeight" and is_prepared(gq)
    assert prepare(q, cfg, backend="gpu", kernels=False) is q
    tokens = jnp.asarray(np.random.default_rng(_seed("gpu fwd")).integers(0, 97, (1, 5)))
    fwd = jax.jit(forward, static_argnums=1)
    want = np.asarray(fwd(q, cfg, tokens))
    got = np.asarray(fwd(gq, cfg, tokens))  # interpreted Mosaic GPU kernels on CPU
    assert np.abs(got - want).max() < 3e-2 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8


# --- W8A8: int8 x int8 -> int32 wgmma ----------------------------------------------------

@pytest.mark.parametrize("lead,n,k", [((1,), 128, 512), ((3, 5), 192, 576), ((70,), 64, 256)])
def test_int8_kernel_is_exact_interpreted(lead, n, k):
    from pallas_kernels.gpu import int8 as g8

    rng = np.random.default_rng(_seed("gpu int8", lead, n, k))
    xq = jnp.asarray(rng.integers(-127, 128, (*lead, k)), jnp.int8)
    wq = jnp.asarray(rng.integers(-127, 128, (n, k)), jnp.int8)
    ones_x, ones_w = jnp.ones((*lead, 1), jnp.float32), jnp.ones((n,), jnp.float32)
    sums = np.asarray(g8.int8_matmul(xq, ones_x, wq, ones_w, interpret=True))
    want = np.asarray(xq, np.int64) @ np.asarray(wq, np.int64).T
    np.testing.assert_array_equal(sums, want)  # int32 accumulation: exact
    xs = jnp.asarray(rng.uniform(0.5, 2.0, (*lead, 1)), jnp.float32)
    ws = jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)
    y = g8.int8_matmul(xq, xs, wq, ws, interpret=True)
    assert y.shape == (*lead, n) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), g8.reference(xq, xs, wq, ws), rtol=1e-6)


def test_int8_kernel_eligibility_lowering_and_opt_in_routing(monkeypatch):
    from jaxquant.algorithms.act_quant import int8_matmul
    from pallas_kernels.gpu import int8 as g8

    assert "multiple of 64" in g8.eligible(200, 576) and g8.eligible(576, 1536) is None
    with pytest.raises(ValueError, match="cannot take"):
        g8.int8_matmul(jnp.zeros((1, 576), jnp.int8), jnp.ones((1, 1)),
                       jnp.zeros((200, 576), jnp.int8), jnp.ones(200))
    ok = (jnp.zeros((2, 576), jnp.int8), jnp.ones(()), jnp.zeros((64, 576), jnp.int8),
          jnp.ones(64))
    for bad in ((8, 64, 2, 2), (40, 64, 1, 2), (8, 128, 1, 2)):  # 9 tiles; N 40; 576 % 128
        with pytest.raises(ValueError, match="do not fit"):
            g8.int8_matmul(*ok, tiles=bad, interpret=True)
    assert g8.int8_matmul(*ok, interpret=True).shape == (2, 64)  # a scalar x scale

    def args(m, n=11008, k=4096):
        return (jax.ShapeDtypeStruct((m, k), jnp.int8), jax.ShapeDtypeStruct((m, 1), jnp.float32),
                jax.ShapeDtypeStruct((n, k), jnp.int8), jax.ShapeDtypeStruct((n,), jnp.float32))

    for m in (1, 16, 2048):  # the compiled path (transposed activation view) for CUDA
        tm, tk, split, steps = g8.tiles_for(m, 4096, 4096)  # 64 row tiles of 64
        assert tm >= min(m, 8) and tk == 128 and 2 <= steps <= 4
        assert split == (4 if m <= 16 else 1)
        assert g8.tiles_for(m, 11008, 4096)[2] == 1  # 172 row tiles fill the SMs already
        assert "mosaic_gpu" in jax.jit(g8.int8_matmul).trace(*args(m)).lower(
            lowering_platforms=("cuda",)).as_text()

    def cuda_text(m, **kw):
        jax.clear_caches()  # the switch is read at trace time
        return int8_matmul.trace(*args(m, **kw)).lower(lowering_platforms=("cuda",)).as_text()

    monkeypatch.setenv("JAXQUANT_GPU_INT8", "1")  # opted in: act_quant routes to it ...
    assert "mosaic_gpu" in cuda_text(4)
    assert "mosaic_gpu" not in cuda_text(4, n=200, k=576)  # ... where the weight fits
    monkeypatch.setenv("JAXQUANT_GPU_INT8", "0")  # the default: float32 dot of the codes
    assert "mosaic_gpu" not in cuda_text(4)
