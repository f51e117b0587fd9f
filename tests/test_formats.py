"""Quantized formats: packing, RTN against a numpy reference, storage accounts, pytrees."""

from __future__ import annotations

import itertools
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxquant.algorithms.rtn import rtn
from jaxquant.formats import (
    CodebookWeight,
    MixedWeight,
    OutlierWeight,
    UniformWeight,
    from_layout,
    storage_bits,
)
from jaxquant.formats.packing import pack, plane_widths, unpack


def seed_of(*args) -> int:
    return zlib.crc32(repr(args).encode())


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("k", [1, 7, 31, 32, 33, 100, 576])
def test_pack_round_trip_and_size(bits, k):
    rng = np.random.default_rng(seed_of(bits, k))
    codes = rng.integers(0, 2 ** bits, (5, k))
    planes = pack(codes, bits)
    assert all(p.dtype == jnp.uint32 for p in planes)
    assert [p.shape[1] for p in planes] == [-(-k // (32 // w)) for w in plane_widths(bits)]
    np.testing.assert_array_equal(np.asarray(unpack(planes, bits, k)), codes)
    # Host (NumPy) and device (jnp) packing agree bit for bit.
    for a, b in zip(planes, pack(jnp.asarray(codes, jnp.int32), bits), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if k % 32 == 0:  # no padding: exactly `bits` bits per code
        assert sum(p.size for p in planes) * 32 == 5 * k * bits


def numpy_group_params(block: np.ndarray, bits: int, sym: bool,
                       scale_dtype=ml_dtypes.bfloat16) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ's quantizer range for each row of ``block``: scale and zero, in numpy."""
    maxq = 2 ** bits - 1
    lo = np.minimum(block.min(axis=1), 0)
    hi = np.maximum(block.max(axis=1), 0)
    if sym:
        hi = np.maximum(-lo, hi)
        lo = -hi
    dead = (lo == 0) & (hi == 0)
    lo[dead], hi[dead] = -1, 1
    scale = ((hi - lo) / maxq).astype(scale_dtype).astype(np.float32)
    zero = np.full_like(scale, 2 ** (bits - 1)) if sym else np.round(-lo / scale)
    return scale, zero


def numpy_rtn(w: np.ndarray, bits: int, group: int | None, sym: bool, scale_dtype) -> np.ndarray:
    """Straightforward RTN (GPTQ's quantizer), group by group, in numpy."""
    w = w.astype(np.float32)
    _n, k = w.shape
    g = k if group is None else min(group, k)
    maxq = 2 ** bits - 1
    out = np.empty_like(w)
    for start in range(0, k, g):
        block = w[:, start:start + g]
        scale, zero = numpy_group_params(block, bits, sym, scale_dtype)
        q = np.clip(np.round(block / scale[:, None]) + zero[:, None], 0, maxq)
        out[:, start:start + g] = scale[:, None] * (q - zero[:, None])
    return out


COMBOS = list(itertools.product([2, 3, 4, 8], [None, 32, 64, 128, 256], [False, True]))
#: One odd shape per group size, shared by its 8 (bits, symmetric) cases (eager RTN
#: compiles its ops once per shape): per channel, a short last group (200 = 6 x 32 + 8,
#: 300 = 2 x 128 + 44), whole groups (576 = 9 x 64), a group wider than the layer.
SHAPES = {None: (19, 300), 32: (7, 200), 64: (33, 576), 128: (13, 300), 256: (39, 37)}


@pytest.mark.parametrize("bits,group,sym", COMBOS)
def test_rtn_matches_numpy_reference(bits, group, sym):
    rng = np.random.default_rng(seed_of(bits, group, sym))
    shape = SHAPES[group]
    w = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 3.0)
    w[0, : min(5, shape[1])] = 0.0  # a row segment of zeros
    q = rtn(jnp.asarray(w), bits=bits, group_size=group, symmetric=sym,
            scale_dtype=jnp.bfloat16)
    want = numpy_rtn(w, bits, group, sym, ml_dtypes.bfloat16)
    got = np.asarray(q.dequantize())
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
    # The account is exact: the bytes held equal the formula for these parameters.
    assert q.nbytes * 8 == storage_bits(shape, bits=bits, group_size=group or shape[1],
                                        symmetric=sym, scale_dtype=jnp.bfloat16)


@pytest.mark.parametrize("bits,want", [(4, 4.25), (3, 3.25), (2, 2.25)])
def test_bits_per_weight_g128_asym_bf16(bits, want):
    w = jnp.asarray(np.random.default_rng(bits).standard_normal((64, 1024)), jnp.float32)
    q = rtn(w, bits=bits, group_size=128, symmetric=False, scale_dtype=jnp.bfloat16)
    assert q.bits_per_weight == want
    # SmolLM2's 576 = 4 x 128 + 64: a short last group adds one more scale and zero.
    q = rtn(w[:, :576], bits=bits, group_size=128, symmetric=False, scale_dtype=jnp.bfloat16)
    assert q.bits_per_weight == bits + 5 * 32 / 576


def test_uniform_is_a_pytree_through_jit_and_device_put():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((8, 100)), jnp.float32)
    q = rtn(w, bits=3, group_size=32)
    leaves, _treedef = jax.tree.flatten(q)
    assert len(leaves) == 4  # two code planes, scales, zeros
    q2 = jax.jit(lambda x: x)(jax.device_put(q, jax.devices()[0]))
    assert isinstance(q2, UniformWeight) and q2.bits == 3 and q2.group_size == 32
    np.testing.assert_array_equal(np.asarray(q2.dequantize()), np.asarray(q.dequantize()))
    assert "3-bit asym g32" in q.summary()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codebook_round_trip(bits):
    rng = np.random.default_rng(seed_of("cb", bits))
    n, k = 13, 77
    table = np.sort(rng.standard_normal((k, 2 ** bits)).astype(np.float32), axis=1)
    idx = rng.integers(0, 2 ** bits, (n, k))
    q = CodebookWeight.from_indices(jnp.asarray(idx), jnp.asarray(table), bits=bits)
    want = table[np.arange(k)[None, :], idx]
    np.testing.assert_array_equal(np.asarray(q.dequantize()), want)
    assert q.nbytes == sum(p.size * 4 for p in q.planes) + table.size * 4


def test_mixed_precision_dequantize_and_linear():
    rng = np.random.default_rng(5)
    n, k = 11, 200
    w = rng.standard_normal((n, k)).astype(np.float32)
    bits = rng.choice([2, 3, 4], size=k)
    perm = np.argsort(bits, kind="stable")
    parts, start = [], 0
    for b in (2, 3, 4):
        cols = perm[start:start + int((bits == b).sum())]
        parts.append(rtn(jnp.asarray(w[:, cols]), bits=int(b), group_size=32))
        start += len(cols)
    mixed = MixedWeight(parts=tuple(parts), perm=jnp.asarray(perm, jnp.int16), shape=(n, k))
    np.testing.assert_array_equal(mixed.column_bits(), bits)
    want = np.empty_like(w)
    want[:, perm] = np.concatenate([np.asarray(p.dequantize()) for p in parts], axis=1)
    np.testing.assert_array_equal(np.asarray(mixed.dequantize()), want)
    x = rng.standard_normal((3, k)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(mixed.linear(jnp.asarray(x))), x @ want.T,
                               rtol=1e-5, atol=1e-5)
    assert mixed.nbytes == sum(p.nbytes for p in parts) + 2 * k


def test_outliers_restored_exactly():
    rng = np.random.default_rng(9)
    n, k = 9, 70
    w = rng.standard_normal((n, k)).astype(np.float32)
    base = rtn(jnp.asarray(w), bits=2, group_size=None)
    index = rng.choice(n * k, 20, replace=False).astype(np.int32)
    q = OutlierWeight(base=base, index=jnp.asarray(index),
                      values=jnp.asarray(w.reshape(-1)[index]), shape=(n, k))
    got = np.asarray(q.dequantize()).reshape(-1)
    np.testing.assert_array_equal(got[index], w.reshape(-1)[index])
    rest = np.setdiff1d(np.arange(n * k), index)
    np.testing.assert_array_equal(got[rest], np.asarray(base.dequantize()).reshape(-1)[rest])
    assert q.nbytes == base.nbytes + 20 * (4 + 4)


def test_layout_rebuilds_every_format():
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal((6, 64)), jnp.float32)
    u = rtn(w, bits=4, group_size=32, symmetric=True)
    cb = CodebookWeight.from_indices(jnp.zeros((6, 64), jnp.int32),
                                     jnp.ones((64, 4), jnp.float32), bits=2)
    mixed = MixedWeight(parts=(rtn(w[:, :32], bits=2, group_size=32),
                               rtn(w[:, 32:], bits=4, group_size=32)),
                        perm=jnp.arange(64, dtype=jnp.int16), shape=(6, 64))
    out = OutlierWeight(base=mixed, index=jnp.asarray([0, 5], jnp.int32),
                        values=jnp.asarray([1.0, 2.0]), shape=(6, 64))
    for q in (u, cb, mixed, out):
        arrays = jax.tree_util.tree_map(np.asarray, q)
        as_dict = _to_dict(arrays)
        back = from_layout(as_dict, q.layout())
        assert type(back) is type(q)
        np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(q.dequantize()))


def _to_dict(q):
    """The nested-dict form Orbax restores a format to without a target."""
    import dataclasses

    from jaxquant.formats.base import QuantizedWeight

    def conv(v):
        if isinstance(v, QuantizedWeight):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)
                    if f.metadata.get("static") is not True}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return conv(q)


def test_device_put_with_sharding_and_no_retrace():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.asarray(jax.devices()[:1]), ("model",))
    w = jnp.asarray(np.random.default_rng(1).standard_normal((16, 96)), jnp.float32)
    q = rtn(w, bits=4, group_size=32)
    sharded = jax.device_put(q, NamedSharding(mesh, PartitionSpec("model")))
    assert isinstance(sharded, UniformWeight)
    assert all(leaf.sharding.spec == PartitionSpec("model") for leaf in jax.tree.leaves(sharded))
    traces = []

    @jax.jit
    def f(x, weight):
        traces.append(1)
        return weight.linear(x)

    x = jnp.ones((2, 96))
    f(x, sharded)
    other = jax.device_put(rtn(w * 2, bits=4, group_size=32), sharded.scales.sharding)
    f(x, other)  # same structure and sharding: no new trace
    assert len(traces) == 1


def test_tiny_ranges_keep_finite_float16_scales():
    w = jnp.asarray(np.random.default_rng(2).standard_normal((4, 64)) * 1e-9, jnp.float32)
    q = rtn(w, bits=8, group_size=32, scale_dtype=jnp.float16)
    assert np.isfinite(np.asarray(q.dequantize())).all()
    assert float(jnp.abs(q.dequantize() - w).max()) < 1e-6


def test_one_bit_symmetric_is_refused():
    with pytest.raises(ValueError, match="at least 2 bits"):
        rtn(jnp.ones((2, 8)), bits=1, group_size=None, symmetric=True)


def test_permutation_dtype_must_index_all_columns():
    k = 40000
    part = rtn(jnp.ones((1, k)), bits=2, group_size=None)
    with pytest.raises(ValueError, match="int16 permutation cannot index 40000"):
        MixedWeight(parts=(part,), perm=jnp.arange(k).astype(jnp.int16), shape=(1, k))
    assert MixedWeight.perm_dtype(k) == jnp.int32


def test_mixed_linear_with_bfloat16_activations():
    rng = np.random.default_rng(8)
    w = jnp.asarray(rng.standard_normal((32, 256)), jnp.float32)
    parts = (rtn(w[:, :128], bits=2, group_size=64), rtn(w[:, 128:], bits=4, group_size=64))
    mixed = MixedWeight(parts=parts, perm=None, shape=(32, 256))
    x = jnp.asarray(rng.standard_normal((4, 256)), jnp.bfloat16)
    got = np.asarray(mixed.linear(x), np.float32)
    want = np.asarray(x, np.float32) @ np.asarray(mixed.dequantize()).T
    assert mixed.linear(x).dtype == jnp.bfloat16
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
