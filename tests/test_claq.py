"""CLAQ: adaptive precision, outlier reservation and the codebook sweep against numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.algorithms.claq import (
    BudgetError,
    ClaqConfig,
    claq,
    code_bits_for_total,
    column_bits,
    reserve_counts,
    stored_bits,
    sweep,
)
from jaxquant.algorithms.gptq import inverse_cholesky
from jaxquant.algorithms.kmeans import kmeans_1d
from jaxquant.formats import CodebookWeight, MixedWeight
from jaxquant.formats.outliers import OutlierWeight
from tests.test_formats import seed_of


def _layer(seed, n, k, spikes=0.004):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4 * k, k)) * rng.gamma(1.0, size=k)
    h = (2 * x.T @ x / x.shape[0]).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[rng.random((n, k)) < spikes] *= 20
    return w, h


def test_column_bits_meet_the_budget_and_follow_the_outliers():
    rng = np.random.default_rng(seed_of("bits"))
    outl = rng.integers(0, 5, 200)
    energy = rng.random(200)
    for budget, lo, frac in [(2.1, 2, 0.05), (2.2, 2, 0.1), (3.12, 3, 0.12), (3.0, 3, 0.0)]:
        b = column_bits(outl, energy, budget)
        assert set(b) <= {lo, 4} and abs(b.mean() - budget) <= 2 / 200
        assert (b == 4).sum() == round(200 * frac)
        if frac:  # every 4-bit column has at least as many outliers as any other
            assert outl[b == 4].min() >= outl[b == lo].max()
    # Ties in the outlier count go to the higher energy.
    b = column_bits(np.zeros(10, int), np.arange(10.0), 2.2)
    assert list(np.flatnonzero(b == 4)) == [9]


def test_reserve_counts_give_outlier_heavy_columns_more():
    outl = np.arange(100)
    r = reserve_counts(outl, 1000, 0.01)
    heavy = outl >= 90
    assert (r[heavy] == 28).all() and (r[~heavy] == 8).all()  # 3.5x; 1% overall
    assert abs(r.sum() / (100 * 1000) - 0.01) < 1e-3
    assert not reserve_counts(outl, 1000, 0.0).any()


def _numpy_claq(w, u, bits, reserve, widths, block, block_iters, column_iters):
    """CLAQ's sweep written out column by column (float64 updates; same K-Means calls)."""
    w = w.astype(np.float64).copy()
    n, k = w.shape
    codes, kept = np.zeros((n, k), int), np.zeros((n, k), bool)
    books, vals = np.zeros((k, 2 ** max(widths))), np.zeros((n, k))

    def top(col, r):
        rank = np.argsort(np.argsort(-np.abs(col), kind="stable"), kind="stable")
        return rank < r

    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].copy()
        keep0 = np.stack([top(w1[:, j], reserve[i1 + j]) for j in range(i2 - i1)], 1)
        inits = {b: np.asarray(kmeans_1d(jnp.asarray(w1, jnp.float32), 2 ** b,
                                         mask=jnp.asarray(~keep0), iters=block_iters)[0])
                 for b in widths}
        errs = np.zeros((n, i2 - i1))
        for j in range(i2 - i1):
            c, b = i1 + j, int(bits[i1 + j])
            col = w1[:, j].copy()
            keep = top(col, reserve[c])
            cent, a = kmeans_1d(jnp.asarray(col[:, None], jnp.float32), 2 ** b,
                                mask=jnp.asarray(~keep[:, None]), iters=column_iters,
                                init=jnp.asarray(inits[b][j:j + 1]))
            cent, a = np.asarray(cent)[0], np.asarray(a)[:, 0]
            dq = np.where(keep, col, cent[a])
            errs[:, j] = (col - dq) / u[c, c]
            w1[:, j:] -= errs[:, j:j + 1] * u[c, c:i2][None, :]
            codes[:, c], kept[:, c], vals[:, c] = a, keep, col
            books[c, :2 ** b] = cent
        w[:, i2:] -= errs @ u[i1:i2, i2:]
    return codes, books, kept, vals


# One row count and the same short last block (k = 32 m + 6) throughout: the reference's
# K-Means calls then compile once per width and shape, shared between the cases.
@pytest.mark.parametrize("n,k,widths", [(37, 70, (2,)), (37, 134, (2, 4)), (37, 102, (3, 4))])
def test_sweep_matches_numpy(n, k, widths):
    w, h = _layer(seed_of("sweep", n, k), n, k)
    u, _ = inverse_cholesky(jnp.asarray(h), damp=0.01)
    u = np.asarray(u)
    rng = np.random.default_rng(seed_of("bits", n, k))
    bits = rng.choice(widths, k).astype(np.int32)
    reserve = rng.integers(0, 3, k).astype(np.int32)
    got = sweep(jnp.asarray(w), jnp.asarray(u), jnp.asarray(bits), jnp.asarray(reserve),
                widths=widths, block_size=32, block_iters=8, column_iters=3, kmeans=True)
    codes, books, kept, vals = (np.asarray(x) for x in got)
    rc, _, rk, rv = _numpy_claq(w, u, bits, reserve, widths, 32, 8, 3)
    assert np.isfinite(books).all() and np.isfinite(vals).all()
    # Float32 (ours) against float64 updates: equal up to rare near-ties.
    assert (codes == rc).mean() > 0.98
    assert (kept == rk).mean() > 0.99 and (kept.sum(0) == reserve).all()
    np.testing.assert_allclose(vals, rv, rtol=1e-3, atol=1e-3)
    for c in range(k):
        b = 2 ** int(bits[c])
        assert np.all(np.diff(books[c, :b]) >= 0)  # sorted codebook


def test_outliers_restored_exactly_and_codebooks_round_trip():
    n, k = 40, 90
    w, _ = _layer(seed_of("exact"), n, k, spikes=0.02)
    h = np.eye(k, dtype=np.float32)  # no compensation: the first values are the weights
    cfg = ClaqConfig(bits=3, act_order=False, outlier_ratio=0.05, codebook_dtype=jnp.float32)
    q, info = claq(jnp.asarray(w), jnp.asarray(h), cfg, return_info=True)
    assert isinstance(q, OutlierWeight) and isinstance(q.base, CodebookWeight)
    idx = np.asarray(q.index)
    assert info["reserved"] == len(idx) == reserve_counts(
        np.sum(np.abs(w) >= 13 * np.abs(w).mean(), 0), n, 0.05).sum()
    dq = np.asarray(q.dequantize())
    np.testing.assert_array_equal(dq.reshape(-1)[idx], w.reshape(-1)[idx])
    # The reserved weights are each column's largest in magnitude.
    mask = np.zeros(n * k, bool)
    mask[idx] = True
    mask = mask.reshape(n, k)
    for c in range(k):
        if mask[:, c].any() and (~mask[:, c]).any():
            assert np.abs(w[mask[:, c], c]).min() >= np.abs(w[~mask[:, c], c]).max()
    # The base is the codebook lookup; every other weight is its column's nearest centroid.
    base = q.base
    table = np.asarray(base.codebook)
    np.testing.assert_array_equal(np.asarray(base.dequantize()),
                                  np.take_along_axis(table.T, np.asarray(base.indices()), 0))
    dist = np.abs(w[:, :, None] - table[None])
    best = dist.min(-1)
    got = np.abs(w - np.asarray(base.dequantize()))
    np.testing.assert_allclose(got[~mask], best[~mask], rtol=1e-5, atol=1e-6)


def test_claq_beats_evenly_spaced_levels_and_stores_what_it_reports():
    n, k = 256, 150  # test_total_budget_counts_everything_stored's layer: shared compiles
    w, h = _layer(seed_of("better"), n, k)

    def loss(q):
        d = np.asarray(q.dequantize()) - w
        return float(np.sum((d @ h) * d))

    km = claq(jnp.asarray(w), jnp.asarray(h), ClaqConfig(bits=2.2))
    even = claq(jnp.asarray(w), jnp.asarray(h), ClaqConfig(bits=2.2, kmeans=False))
    res = claq(jnp.asarray(w), jnp.asarray(h), ClaqConfig(bits=2.2, outlier_ratio=0.01))
    assert isinstance(km, MixedWeight) and sorted(km.part_bits) == [2, 4]
    assert np.isfinite(np.asarray(km.dequantize())).all()
    assert loss(km) < 0.8 * loss(even)
    assert loss(res) < loss(km)
    # The storage account counts codebooks, the permutation and the outliers.
    assert res.bits_per_weight > km.bits_per_weight > 2.2 + 16 * 4 * 0.9 / n
    with pytest.raises(ValueError, match="fractional"):
        ClaqConfig(bits=2.1, adaptive=False)


def test_total_budget_counts_everything_stored():
    """With total_bits the stored weight (codes, codebooks, permutation, outliers and
    their positions) meets the budget, within one column's worth of it."""
    n, k = 256, 150
    w, h = _layer(seed_of("total"), n, k)
    for budget, ratio in ((3.0, 0.0), (2.9, 0.01), (4.3, 0.0)):
        q = claq(jnp.asarray(w), jnp.asarray(h),
                 ClaqConfig(bits=budget, total_bits=True, outlier_ratio=ratio))
        assert isinstance(q, OutlierWeight) == (ratio > 0)
        # At most the budget, and short of it by less than the two parts' next 32-bit
        # words of packed codes (each 32 / k bits per weight on this narrow layer).
        assert budget - 2 * 32 / k <= q.bits_per_weight <= budget, (budget, q.bits_per_weight)
    # One width (a budget a uniform width meets exactly): no permutation is stored, and
    # the act-order sweep's columns are back in their original order.
    exact = (n * 32 * 15 + k * 16 * 8) / (n * k)  # 3-bit codes: 2 planes of 10 + 5 words
    q = claq(jnp.asarray(w), jnp.asarray(h), ClaqConfig(bits=exact, total_bits=True))
    assert isinstance(q, CodebookWeight) and q.bits == 3
    assert q.bits_per_weight == pytest.approx(exact)
    plain = claq(jnp.asarray(w), jnp.asarray(h), ClaqConfig(bits=3))
    assert isinstance(plain, CodebookWeight)
    np.testing.assert_array_equal(np.asarray(plain.dequantize()), np.asarray(q.dequantize()))
    # One code budget for several layers meets the total over all of them, and a budget
    # a hair larger would not: the search is tight.
    layers = [(576, 576, 0), (192, 576, 0), (1536, 576, 0), (576, 1536, 1000)]
    weights = sum(n * k for n, k, _ in layers)
    for total in (2.2, 3.0, 3.12, 4.0):
        code = code_bits_for_total(layers, total)
        assert 2 <= code <= total

        def avg(c):
            return sum(stored_bits(n, k, c, reserved=r) for n, k, r in layers) / weights

        assert avg(code) <= total < avg(code + 2e-3)
    # Too small: 2-bit codes and their fp16 tables on 96 rows take 2.8 bits per weight.
    with pytest.raises(BudgetError, match="too small"):
        code_bits_for_total([(96, k, 0)], 2.7)


def test_claq_end_to_end_and_cli(tiny_hf_dir, tmp_path, capsys):
    import json

    import jaxquant
    from jaxquant.checkpoints.convert import params_from_source
    from jaxquant.cli.main import main
    from jaxquant.params import flatten
    from jaxquant.quantize import quantize
    from jaxquant.recipes import QuantSpec, Recipe, RecipeError
    from tests.hf_models import make_model, torch_source
    from tests.test_calibration import _calib
    from tests.test_cli_errors import _with_word_tokenizer

    with pytest.raises(RecipeError, match="per input channel"):
        QuantSpec(method="claq", bits=3, group_size=128)
    with pytest.raises(RecipeError, match="claq"):
        QuantSpec(method="gptq", bits=2.5)
    # The command line: fractional bits, the report counts everything stored, and the
    # checkpoint holds CLAQ's formats (each quantization of a model with CLAQ's
    # data-dependent layer shapes compiles its own dequantizations: one run covers both).
    d = _with_word_tokenizer(tiny_hf_dir, tmp_path / "m", 97)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"w{i}" for i in np.random.default_rng(0).integers(0, 97, 600)))
    report, out = tmp_path / "r.json", tmp_path / "q"
    assert main(["quantize", "--model", str(d), "--method", "claq", "--bits", "2.1",
                 "--act-order", "--outlier-ratio", "0.01", "--calib", str(calib),
                 "--calib-format", "plain", "--calib-windows", "4", "--calib-seq-len", "64",
                 "--json", str(report), "--out", str(out), "--quiet"]) == 0
    q = jaxquant.load_model(out)
    layers = [v for v in flatten(q.params).values()
              if isinstance(v, (OutlierWeight, MixedWeight, CodebookWeight))]
    assert len(layers) == 7 * q.config.num_layers
    assert any(isinstance(v, OutlierWeight) for v in layers)  # rows >= 50 keep some
    assert any(isinstance(v, MixedWeight) for v in layers)  # 2.1 bits: 2 and 4
    # Every layer's weights finite (one program: the layers' shapes are data-dependent).
    finite = jax.jit(lambda ls: [jnp.isfinite(v.dequantize()).all() for v in ls])(layers)
    assert all(bool(f) for f in finite)
    r = json.loads(report.read_text())
    assert r["method"] == "claq" and r["bits"] == 2.1 and r["avg_bits"] > 2.1
    assert main(["quantize", "--model", str(d), "--method", "claq", "--bits", "2.1",
                 "--no-adaptive", "--calib", str(calib), "--calib-format", "plain"]) == 2
    assert "adaptive" in capsys.readouterr().err
    # A total budget: the whole model's stored bits meet it; one the codebooks of these
    # tiny layers already exceed is refused before any calibration.
    from jaxquant.quantize import quantization_report

    cfg, params = params_from_source(torch_source(make_model("llama", seed=5)))
    windows = np.random.default_rng(seed_of("claq-e2e")).integers(0, cfg.vocab_size, (8, 48))
    total = QuantSpec(method="claq", bits=5.0, group_size=None, total_bits=True,
                      outlier_ratio=0.01)
    qt = quantize(params, Recipe.uniform(total), _calib(cfg, windows))
    avg = quantization_report(params, qt)["avg_bits"]
    shapes = [flatten(params)[p].shape for p, v in flatten(qt).items()
              if isinstance(v, (OutlierWeight, MixedWeight, CodebookWeight))]
    planned = [(n, k, int(reserve_counts(np.zeros(k), n, 0.01).sum())) for n, k in shapes]
    code = code_bits_for_total(planned, 5.0)
    expect = sum(stored_bits(n, k, code, reserved=r) for n, k, r in planned)
    assert avg <= 5.0 and avg == pytest.approx(expect / sum(n * k for n, k in shapes))
    assert main(["quantize", "--model", str(d), "--method", "claq", "--bits", "2.1",
                 "--total-bits", "--calib", str(calib), "--calib-format", "plain",
                 "--calib-seq-len", "64"]) == 2
    assert "too small" in capsys.readouterr().err


def test_sweep_lowers_for_accelerators():
    """The accelerator branch (all widths then a select, dense K-Means) lowers for GPU
    and TPU on this CPU."""

    rng = np.random.default_rng(seed_of("lower"))
    n, k = 40, 70
    w = jnp.asarray(rng.standard_normal((n, k)), jnp.float32)
    u = jnp.asarray(np.triu(rng.uniform(0.5, 1.0, (k, k))), jnp.float32)
    bits = jnp.asarray(rng.choice([2, 4], k), jnp.int32)
    reserve = jnp.asarray(rng.integers(0, 3, k), jnp.int32)
    for platform in ("cuda", "tpu"):
        text = sweep.trace(w, u, bits, reserve, widths=(2, 4), block_size=32, block_iters=3,
                           column_iters=2, kmeans=True).lower(
            lowering_platforms=(platform,)).as_text()
        assert "stablehlo.while" in text and "stablehlo.select" in text
