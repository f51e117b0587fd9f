"""TPU Pallas kernels, verified without a TPU: the Pallas TPU interpreter (races and
uninitialized reads checked) against the jnp reference, and Mosaic lowering for TPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.algorithms.rtn import rtn
from jaxquant.formats import UniformWeight
from pallas_kernels.compat import tpu_races_found
from pallas_kernels.tpu import uniform as tu
from tests.test_rotation import _seed


def _weight(rng: np.random.Generator, n: int, k: int, bits: int, group_size: int | None,
            symmetric: bool) -> UniformWeight:
    w = rng.normal(size=(n, k)).astype(np.float32)
    w[:, rng.integers(0, k)] *= 8.0  # an outlier column: scales differ along K
    return rtn(jnp.asarray(w), bits=bits, group_size=group_size, symmetric=symmetric)


@pytest.mark.parametrize("bits", range(1, 9))
def test_relayout_round_trips_every_width_and_grouping(bits):
    rng = np.random.default_rng(_seed("tpu relayout", bits))
    for group_size, symmetric in ((32, False), (128, bits > 1), (None, bits > 1)):
        w = _weight(rng, 131, 300, bits, group_size, symmetric)
        tw = tu.relayout(w)
        np.testing.assert_array_equal(np.asarray(tw.dequantize()), np.asarray(w.dequantize()))
        n_pad, k_pad = tw.padded
        assert n_pad % tw.bn == 0 and k_pad % tw.bk == 0
        assert tw.bk % tw.kg == 0 or tw.kg == k_pad
        assert sum(p.size for p in tw.planes) * 32 == n_pad * k_pad * bits


@pytest.mark.parametrize("bits,group_size,symmetric,lead,dtype,blocks", [
    (4, 128, False, (1,), jnp.float32, None),  # decode; 4 scale rows per tile: sliced
    (3, 64, True, (3, 5), jnp.float32, None),  # 8 scale rows per tile: blocked spec
    (2, None, False, (19,), jnp.float32, None),  # per output channel
    (8, 128, True, (2, 3), jnp.bfloat16, None),
    (4, 32, False, (300,), jnp.float32, (128, 256)),  # 2 M tiles, 3 N tiles, 3 K tiles
])
def test_uniform_kernel_matches_reference_interpreted(bits, group_size, symmetric, lead,
                                                      dtype, blocks):
    rng = np.random.default_rng(_seed("tpu kernel", bits, group_size, lead))
    n, k = (300, 700) if blocks else (200, 576)
    w = _weight(rng, n, k, bits, group_size, symmetric)
    tw = tu.relayout(w, blocks=blocks)
    x = jnp.asarray(rng.normal(size=(*lead, k)), dtype)
    y = tu.uniform_matmul(x, tw, interpret=True)
    assert y.shape == (*lead, n) and y.dtype == dtype
    assert tpu_races_found() is False  # the interpreter ran its race detector
    ref = np.asarray(tu.reference(x, w))
    if dtype == jnp.float32:
        np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-4 * np.abs(ref).max())
    else:  # bf16 inputs and output, float32 accumulation
        err = np.abs(np.asarray(y, np.float32) - ref)
        assert err.max() < 2e-2 * np.abs(ref).max()


def test_nan_rows_stay_nan_and_others_exact():
    rng = np.random.default_rng(_seed("tpu nan"))
    w = _weight(rng, 130, 260, 4, 128, False)
    x = np.asarray(rng.normal(size=(4, 260)), np.float32)
    x[2, 7] = np.nan
    y = np.asarray(tu.uniform_matmul(jnp.asarray(x), tu.relayout(w), interpret=True))
    assert np.isnan(y[2]).all() and np.isfinite(np.delete(y, 2, 0)).all()
    ref = np.asarray(tu.reference(jnp.asarray(x), w))
    np.testing.assert_allclose(np.delete(y, 2, 0), np.delete(ref, 2, 0), rtol=1e-5,
                               atol=1e-3)


def test_eligibility_and_bad_blocks():
    rng = np.random.default_rng(_seed("tpu eligible"))
    odd = _weight(rng, 16, 48, 4, 12, False)
    assert "multiple of 8" in tu.eligible(odd)
    with pytest.raises(ValueError, match="cannot take this weight"):
        tu.relayout(odd)
    assert "not a UniformWeight" in tu.eligible(jnp.zeros((4, 4)))
    ok = _weight(rng, 16, 48, 4, 16, False)
    assert tu.eligible(ok) is None
    with pytest.raises(ValueError, match="multiple of 128"):
        tu.relayout(ok, blocks=(100, 256))


def test_block_table_fits_vmem_and_tiling():
    for gen in (*tu.common.NK_BLOCKS, None, "v99"):
        for n, k in ((4096, 4096), (11008, 4096), (4096, 11008), (200, 576)):
            bn, bk = tu.block_sizes(n, k, gen)
            assert bn % 128 == 0 and bk % 256 == 0
            for bits in (2, 3, 4, 8):
                assert tu.common.vmem_bytes(256, bn, bk, bits, 2) < tu.common.VMEM_CAP // 2
    assert tu.block_sizes(4096, 4096, "v99") == tu.common.FALLBACK_NK


# Mosaic lowering of every configuration: a kernel that would not compile for a TPU
# (block shapes off the (8, 128) tiling, unsupported ops) fails here.
_LOWER = ([(b, 128, b % 2 == 0, 1, jnp.bfloat16) for b in range(1, 9)]
          + [(4, g, s, 1, dt) for g in (64, None) for s in (True, False)
             for dt in (jnp.bfloat16, jnp.float32)]
          + [(3, 128, False, m, jnp.bfloat16) for m in (16, 64, 512, 2048)])


@pytest.mark.parametrize("bits,group_size,symmetric,m,dtype", _LOWER)
def test_uniform_kernel_lowers_for_tpu(bits, group_size, symmetric, m, dtype):
    rng = np.random.default_rng(_seed("tpu lower", bits, group_size, m))
    tw = tu.relayout(_weight(rng, 256, 1024, bits, group_size, symmetric), generation="v5e")
    x = jax.ShapeDtypeStruct((m, 1024), dtype)
    text = jax.jit(tu.uniform_matmul).trace(x, tw).lower(
        lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text


# --- integration: the forward dispatches prepared weights to the kernel -----------------

def _quantized_model(**spec):
    from jaxquant.quantize import quantize
    from jaxquant.recipes import QuantSpec, Recipe
    from tests.test_rotation import _model

    cfg, params = _model("qwen2", hidden=48, tie=False, seed=5)
    recipe = Recipe.uniform(QuantSpec(**spec), pattern=r".*_proj\.weight|lm_head\.weight")
    return cfg, params, quantize(params, recipe)


def test_prepared_model_runs_the_kernel_in_the_forward(monkeypatch, tmp_path):
    from jaxquant.backends import is_prepared, prepare
    from jaxquant.checkpoints.jq_checkpoint import save_checkpoint
    from jaxquant.errors import CheckpointError
    from jaxquant.models.transformer import forward
    from jaxquant.params import flatten

    cfg, _, q = _quantized_model(bits=3, group_size=16)
    assert prepare(q, cfg) is q  # CPU: no kernels, params untouched
    assert prepare(q, cfg, backend="tpu", kernels=False) is q  # the override
    monkeypatch.setenv("JAXQUANT_KERNELS", "0")
    assert prepare(q, cfg, backend="tpu") is q
    monkeypatch.delenv("JAXQUANT_KERNELS")
    tq = prepare(q, cfg, backend="tpu")
    kinds = {p: type(v).__name__ for p, v in flatten(tq).items()}
    assert kinds["layers.1.mlp.down_proj.weight"] == "TpuUniformWeight"
    assert kinds["lm_head.weight"] == "TpuUniformWeight"
    assert kinds["embed_tokens.weight"] == "ArrayImpl" and is_prepared(tq)
    tokens = jnp.asarray(np.random.default_rng(_seed("tpu fwd")).integers(0, 97, (2, 11)))
    fwd = jax.jit(forward, static_argnums=1)
    want = np.asarray(fwd(q, cfg, tokens))
    got = np.asarray(fwd(tq, cfg, tokens))  # interpreted Mosaic kernels on CPU
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    with pytest.raises(CheckpointError, match="kernel layout"):
        save_checkpoint(tmp_path / "ck", config=cfg, params=tq)


def test_integer_dot_weights_stay_with_symmetric_activation_quantization():
    import dataclasses

    from jaxquant.algorithms.act_quant import ActQuantConfig
    from jaxquant.backends import prepare
    from jaxquant.params import flatten

    cfg, _, q = _quantized_model(bits=8, group_size=None, symmetric=True)
    w8a8 = dataclasses.replace(cfg, act_quant=ActQuantConfig(bits=8))
    kept = prepare(q, w8a8, backend="tpu")
    assert all(type(v).__name__ != "TpuUniformWeight" for v in flatten(kept).values())
    moved = prepare(q, cfg, backend="tpu")  # no activation quantization: the kernel
    assert type(flatten(moved)["layers.0.self_attn.q_proj.weight"]).__name__ == \
        "TpuUniformWeight"


# --- per-column codebooks (CLAQ) -----------------------------------------------------------

def _codebook_weight(rng: np.random.Generator, n: int, k: int, bits: int):
    from jaxquant.formats import CodebookWeight

    idx = jnp.asarray(rng.integers(0, 2 ** bits, (n, k)))
    table = jnp.asarray(np.sort(rng.normal(size=(k, 2 ** bits)), axis=1), jnp.float16)
    return CodebookWeight.from_indices(idx, table, bits=bits)


@pytest.mark.parametrize("bits,lead,dtype,blocks", [
    (4, (1,), jnp.float32, None),
    (3, (3, 5), jnp.float32, (128, 256)),  # several N and K tiles
    (2, (19,), jnp.bfloat16, None),
    (6, (2,), jnp.float32, None),
])
def test_codebook_kernel_matches_reference_interpreted(bits, lead, dtype, blocks):
    from pallas_kernels.tpu import codebook as tc

    rng = np.random.default_rng(_seed("tpu codebook", bits, lead))
    n, k = (300, 700) if blocks else (200, 576)
    w = _codebook_weight(rng, n, k, bits)
    tw = tc.relayout(w, blocks=blocks)
    np.testing.assert_array_equal(np.asarray(tw.dequantize()), np.asarray(w.dequantize()))
    x = jnp.asarray(rng.normal(size=(*lead, k)), dtype)
    y = tc.codebook_matmul(x, tw, interpret=True)
    assert y.shape == (*lead, n) and y.dtype == dtype and tpu_races_found() is False
    ref = np.asarray(tc.reference(x, w))
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=tol,
                               atol=tol * np.abs(ref).max())


def test_codebook_eligibility_nan_and_lowering():
    from jaxquant.formats import CodebookWeight
    from pallas_kernels.tpu import codebook as tc

    rng = np.random.default_rng(_seed("tpu codebook misc"))
    assert "not a CodebookWeight" in tc.eligible(jnp.zeros((2, 2)))
    big = CodebookWeight.from_indices(jnp.zeros((8, 16), jnp.int32),
                                      jnp.zeros((16, 128), jnp.float16), bits=7)
    assert "at most 6" in tc.eligible(big)
    w = _codebook_weight(rng, 130, 260, 3)
    x = np.asarray(rng.normal(size=(4, 260)), np.float32)
    x[1, 0] = np.nan
    y = np.asarray(tc.codebook_matmul(jnp.asarray(x), tc.relayout(w), interpret=True))
    assert np.isnan(y[1]).all() and np.isfinite(np.delete(y, 1, 0)).all()
    for bits in (2, 3, 4):
        for m, dt in ((1, jnp.bfloat16), (512, jnp.bfloat16), (16, jnp.float32)):
            tw = tc.relayout(_codebook_weight(rng, 256, 1024, bits), generation="v5e")
            text = jax.jit(tc.codebook_matmul).trace(
                jax.ShapeDtypeStruct((m, 1024), dt), tw).lower(
                lowering_platforms=("tpu",)).as_text()
            assert "tpu_custom_call" in text


def test_prepare_picks_the_codebook_kernel():
    from jaxquant.backends import prepare
    from pallas_kernels.tpu import codebook as tc

    rng = np.random.default_rng(_seed("tpu prepare codebook"))
    w = _codebook_weight(rng, 40, 48, 3)
    params = {"layers": {0: {"mlp": {"down_proj": {"weight": w}}}}}
    got = prepare(params, backend="tpu")["layers"][0]["mlp"]["down_proj"]["weight"]
    assert isinstance(got, tc.TpuCodebookWeight)
    x = jnp.asarray(rng.normal(size=(3, 48)), jnp.float32)
    from jaxquant.ops import linear

    np.testing.assert_allclose(np.asarray(linear(x, got)), np.asarray(tc.reference(x, w)),
                               rtol=1e-5, atol=1e-4)


# --- W8A8 int8 on the MXU ---------------------------------------------------------------------

@pytest.mark.parametrize("lead,n,k", [((1,), 256, 384), ((3, 7), 384, 1280), ((70,), 128, 128)])
def test_int8_kernel_is_exact_interpreted(lead, n, k):
    from pallas_kernels.tpu import int8 as ti

    rng = np.random.default_rng(_seed("tpu int8", lead, n, k))
    xq = jnp.asarray(rng.integers(-127, 128, (*lead, k)), jnp.int8)
    xs = jnp.asarray(rng.uniform(0.5, 2.0, (*lead, 1)), jnp.float32)
    wq = jnp.asarray(rng.integers(-127, 128, (n, k)), jnp.int8)
    ws = jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)
    y = ti.int8_matmul(xq, xs, wq, ws, interpret=True)
    assert y.shape == (*lead, n) and tpu_races_found() is False
    np.testing.assert_allclose(np.asarray(y), ti.reference(xq, xs, wq, ws), rtol=1e-6)


def test_int8_kernel_eligibility_lowering_and_routing():
    from jaxquant.algorithms.act_quant import int8_matmul
    from pallas_kernels.tpu import int8 as ti

    assert "multiples of 128" in ti.eligible(200, 576)
    assert ti.eligible(576 * 2, 1536) is None
    with pytest.raises(ValueError, match="cannot take"):
        ti.int8_matmul(jnp.zeros((1, 576), jnp.int8), jnp.ones((1, 1)),
                       jnp.zeros((200, 576), jnp.int8), jnp.ones(200))
    for m in (1, 64, 2048):
        args = (jax.ShapeDtypeStruct((m, 4096), jnp.int8),
                jax.ShapeDtypeStruct((m, 1), jnp.float32),
                jax.ShapeDtypeStruct((11008, 4096), jnp.int8),
                jax.ShapeDtypeStruct((11008,), jnp.float32))
        assert "tpu_custom_call" in jax.jit(ti.int8_matmul).trace(*args).lower(
            lowering_platforms=("tpu",)).as_text()
        # act_quant.int8_matmul, lowered for TPU, routes to the kernel ...
        assert "tpu_custom_call" in int8_matmul.trace(*args).lower(
            lowering_platforms=("tpu",)).as_text()
    # ... and keeps XLA's integer dot where the weight is not whole tiles.
    odd = (jax.ShapeDtypeStruct((4, 576), jnp.int8), jax.ShapeDtypeStruct((4, 1), jnp.float32),
           jax.ShapeDtypeStruct((200, 576), jnp.int8), jax.ShapeDtypeStruct((200,), jnp.float32))
    text = int8_matmul.trace(*odd).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" not in text and "xi32>" in text


# --- mixed precision and outliers: parts on their kernels, sparse correction -------------

def test_mixed_and_outlier_weights_run_on_the_kernels():
    from jaxquant.backends import prepare
    from jaxquant.formats import MixedWeight, OutlierWeight
    from jaxquant.ops import linear
    from pallas_kernels.sparse import SparseCorrectedWeight
    from pallas_kernels.tpu.uniform import TpuUniformWeight

    rng = np.random.default_rng(_seed("tpu mixed"))
    n, k = 40, 200
    parts = (_weight(rng, n, 64, 2, 32, False), _weight(rng, n, 96, 3, 32, False),
             _weight(rng, n, 40, 4, None, True))
    perm = jnp.asarray(rng.permutation(k), jnp.int16)
    mixed = MixedWeight(parts=parts, perm=perm, shape=(n, k))
    idx = np.sort(rng.choice(n * k, 60, replace=False))
    outl = OutlierWeight(base=mixed, index=jnp.asarray(idx, jnp.int32),
                         values=jnp.asarray(rng.normal(size=60) * 5, jnp.float32), shape=(n, k))
    path = "layers.0.mlp.down_proj.weight"
    for w in (mixed, outl):
        got = prepare({"layers": {0: {"mlp": {"down_proj": {"weight": w}}}}}, backend="tpu")
        pw = got["layers"][0]["mlp"]["down_proj"]["weight"]
        inner = pw.base if isinstance(w, OutlierWeight) else pw
        assert isinstance(pw, SparseCorrectedWeight if w is outl else MixedWeight), path
        assert all(isinstance(p, TpuUniformWeight) for p in inner.parts)
        x = jnp.asarray(rng.normal(size=(3, k)), jnp.float32)
        ref = np.asarray(x) @ np.asarray(w.dequantize()).T
        np.testing.assert_allclose(np.asarray(linear(x, pw)), ref, rtol=1e-4,
                                   atol=1e-4 * np.abs(ref).max())
