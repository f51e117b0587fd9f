"""Quantization-difficulty analysis (Czakó et al., SACI 2025): report numbers and plots."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.algorithms.act_quant import layer_error, layer_error_estimate
from jaxquant.calibration import apply_block
from jaxquant.errors import DataError
from jaxquant.eval.analysis import analyze, write_report
from jaxquant.eval.analysis_plots import (
    plot_all,
    plot_channel_magnitudes,
    plot_layer_error_across_layers,
    plot_metric_across_layers,
)
from jaxquant.models import transformer
from jaxquant.models.config import ModelConfig
from jaxquant.params import flatten, unflatten

PNG = b"\x89PNG\r\n\x1a\n"
KINDS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
EPS = 1e-5


def _tiny(tie: bool = True, seed: int = 5):
    """A 3-block random Llama whose norm scales are not all ones."""
    cfg = ModelConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=68,
                      num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=EPS,
                      tie_word_embeddings=tie)
    flat = flatten(transformer.init_params(cfg, seed=seed))
    rng = np.random.default_rng(seed)
    for path, leaf in flat.items():
        if path.endswith("norm.weight"):
            flat[path] = jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
    return cfg, unflatten(flat)


def _with(params, **changes):
    flat = dict(flatten(params))
    flat.update({k: jnp.asarray(v) for k, v in changes.items()})
    return unflatten(flat)


def _rms_norm(h: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    h = np.asarray(h, np.float64)
    return h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + EPS) * np.asarray(gamma)


def _difficulty(x: np.ndarray) -> float:
    return float(np.std(np.linalg.norm(np.asarray(x, np.float64), axis=0)))


@pytest.fixture(scope="module")
def model():
    cfg, params = _tiny()
    windows = np.random.default_rng(0).integers(0, 97, (4, 12))
    # 48 tokens in two batches of 2 windows (one compiled shape), every row sampled
    # (sample_tokens >= tokens): exact comparisons.
    report = analyze({"none": (params, cfg)}, windows, batch_size=2, sample_tokens=4096)
    return cfg, params, windows, report


def test_metrics_equal_direct_computation_on_the_layer_input(model):
    cfg, params, windows, report = model
    flat = flatten(params)
    layers = report["variants"]["none"]["layers"]
    assert list(layers) == [f"layers.{b}.{k}" for b in range(3) for k in KINDS]
    # Block 0's q_proj input is the RMSNorm of the embeddings, computed independently here.
    emb = np.asarray(flat["embed_tokens.weight"])[windows].reshape(-1, 32)
    x = _rms_norm(emb, flat["layers.0.input_layernorm.weight"])
    w = np.asarray(flat["layers.0.self_attn.q_proj.weight"], np.float64)
    row = layers["layers.0.self_attn.q_proj"]
    assert row["rows"] == 48 and row["in_features"] == 32 and row["block"] == 0
    assert row["act_metric"] == pytest.approx(_difficulty(x), rel=1e-4)
    assert row["weight_metric"] == pytest.approx(_difficulty(w), rel=1e-4)
    assert row["act_absmax_max"] == pytest.approx(np.abs(x).max(), rel=1e-4)
    x32, w32 = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
    err = float(layer_error(x32, w32, 4, 4))
    est = float(layer_error_estimate(x32, w32, 4, 4))
    assert row["layer_error"] == pytest.approx(err, rel=1e-3)
    assert row["layer_error_estimate"] == pytest.approx(est, rel=1e-3)
    assert row["relative_error"] == pytest.approx(err / np.sum((x @ w.T) ** 2), rel=1e-3)
    # The default detail layers (blocks 0, 1, 2) hold the norms the metric is the std of.
    detail = report["variants"]["none"]["detail"]
    assert list(detail) == [f"layers.{b}.{k}" for b in range(3)
                            for k in ("self_attn.q_proj", "mlp.down_proj")]
    np.testing.assert_allclose(detail["layers.0.self_attn.q_proj"]["act_norms"],
                               np.linalg.norm(x, axis=0), rtol=1e-4)
    np.testing.assert_allclose(detail["layers.0.self_attn.q_proj"]["weight_norms"],
                               np.linalg.norm(w, axis=0), rtol=1e-4)
    assert len(detail["layers.1.mlp.down_proj"]["act_norms"]) == 68
    # Block 1's q_proj input: the output of block 0 (the model's own block), then RMSNorm.
    e = jnp.asarray(emb.reshape(4, 12, 32), jnp.float32)
    h1 = np.concatenate([np.asarray(apply_block(params["layers"][0], cfg, 0, b)).reshape(-1, 32)
                         for b in (e[:2], e[2:])])  # the batches analyze runs (compiled once)
    x1 = _rms_norm(h1, flat["layers.1.input_layernorm.weight"])
    assert layers["layers.1.self_attn.q_proj"]["act_metric"] == pytest.approx(
        _difficulty(x1), rel=1e-3)
    s = report["variants"]["none"]["summary"]
    assert s["layers"] == 21 and s["by_kind"]["mlp.down_proj"]["layers"] == 3
    assert s["mean_act_metric"] == pytest.approx(np.mean([r["act_metric"]
                                                          for r in layers.values()]))
    assert s["total_layer_error"] == pytest.approx(sum(r["layer_error"]
                                                       for r in layers.values()))


def test_restricted_layers_and_identical_variants_agree(model):
    cfg, params, windows, report = model
    full = report["variants"]["none"]
    # Same params under an untied config (lm_head = embeddings): same function, same numbers.
    ucfg = dataclasses.replace(cfg, tie_word_embeddings=False)
    uparams = _with(params, **{"lm_head.weight": flatten(params)["embed_tokens.weight"]})
    part = analyze({"a": (params, cfg), "b": (params, cfg), "untied": (uparams, ucfg)},
                   windows, layers=[1], batch_size=2, sample_tokens=4096)
    a, b = part["variants"]["a"], part["variants"]["b"]
    assert a["layers"] == b["layers"] and a["detail"] == b["detail"]
    assert a["summary"] == b["summary"]
    assert list(a["layers"]) == [f"layers.1.{k}" for k in KINDS]
    assert list(a["detail"]) == ["layers.1.self_attn.q_proj", "layers.1.mlp.down_proj"]
    assert part["settings"]["layers"] == [1]
    for name in ("a", "untied"):
        for path, row in part["variants"][name]["layers"].items():
            ref = full["layers"][path]
            assert row["kind"] == ref["kind"] and row["block"] == ref["block"] == 1
            for key, value in row.items():
                if key not in ("kind", "block"):
                    assert value == pytest.approx(ref[key], rel=1e-5), (path, key)


def _outlier_variants(params):
    """A planted outlier input channel (embedding column 5 x 50), and that model with
    block 0's q/k/v input smoothed by hand (gamma / s, readers W diag(s)): same outputs."""
    flat = flatten(params)
    emb = np.asarray(flat["embed_tokens.weight"]).copy()
    emb[:, 5] *= 50.0
    outlier = _with(params, **{"embed_tokens.weight": emb})
    s = np.ones(32, np.float32)
    s[5] = 20.0
    smoothed = _with(outlier, **{"layers.0.input_layernorm.weight":
                                 np.asarray(flat["layers.0.input_layernorm.weight"]) / s},
                     **{f"layers.0.self_attn.{p}.weight":
                        np.asarray(flat[f"layers.0.self_attn.{p}.weight"]) * s
                        for p in ("q_proj", "k_proj", "v_proj")})
    return outlier, smoothed


@pytest.fixture(scope="module")
def three(model):
    """none / planted outlier / outlier smoothed by hand: 3 blocks, 2 detail layers."""
    cfg, params, windows, _ = model
    outlier, smoothed = _outlier_variants(params)
    detail = ["layers.0.self_attn.q_proj", "layers.2.mlp.down_proj"]
    return analyze({"none": (params, cfg), "outlier": (outlier, cfg),
                    "smoothed": (smoothed, cfg)}, windows, detail=detail, batch_size=2)


def test_planted_outlier_channel_and_its_smoothing(three):
    rep = three
    q = {n: v["layers"]["layers.0.self_attn.q_proj"] for n, v in rep["variants"].items()}
    assert q["outlier"]["act_metric"] > 2 * q["none"]["act_metric"]
    assert q["outlier"]["act_absmax_max"] > q["none"]["act_absmax_max"]
    norms = rep["variants"]["outlier"]["detail"]["layers.0.self_attn.q_proj"]["act_norms"]
    assert int(np.argmax(norms)) == 5
    assert q["smoothed"]["act_metric"] < 0.5 * q["outlier"]["act_metric"]
    assert q["smoothed"]["weight_metric"] > q["outlier"]["weight_metric"]
    assert q["smoothed"]["output_norm_sq"] == pytest.approx(q["outlier"]["output_norm_sq"],
                                                            rel=1e-4)


def test_report_is_json_and_write_report_round_trips(model, tmp_path):
    report = model[3]
    json.dumps(report, allow_nan=False)
    path = write_report(report, tmp_path / "out")
    assert path == tmp_path / "out" / "analysis.json"
    assert json.loads(path.read_text()) == report
    write_report(report, tmp_path / "out")  # overwrites in place
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["analysis.json"]


def test_plots_are_png_files(three, tmp_path):
    rep = three
    assert rep["settings"]["detail"] == ["layers.0.self_attn.q_proj", "layers.2.mlp.down_proj"]
    assert list(rep["variants"]["none"]["detail"]) == rep["settings"]["detail"]
    # Drawn from the report read back from JSON, as a user would.
    back = json.loads(write_report(rep, tmp_path / "json").read_text())
    files = plot_all(back, tmp_path / "plots")
    assert [f.name for f in files] == ["channels_layers.0.self_attn.q_proj.png",
                                       "channels_layers.2.mlp.down_proj.png",
                                       "metric_across_layers.png",
                                       "layer_error_across_layers.png"]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(
        f.name for f in files)
    for f in files:
        data = f.read_bytes()
        assert data.startswith(PNG) and len(data) > 1000, f
    with pytest.raises(ValueError, match="per-channel norms"):
        plot_channel_magnitudes(rep, tmp_path, layers=["layers.1.mlp.up_proj"])
    with pytest.raises(ValueError, match="no variants"):
        plot_metric_across_layers({"variants": {}}, tmp_path)
    with pytest.raises(ValueError, match="no layers"):
        plot_layer_error_across_layers({"variants": {"x": {"layers": {}}}}, tmp_path)


def test_bad_inputs_raise_clear_errors(model):
    cfg, params, windows, _ = model
    one = {"none": (params, cfg)}
    with pytest.raises(ValueError, match="at least one variant"):
        analyze({}, windows)
    with pytest.raises(ValueError, match="ModelConfig"):
        analyze({"x": (params, None)}, windows)
    with pytest.raises(DataError, match="integer token ids"):
        analyze(one, windows.astype(np.float32))
    with pytest.raises(DataError, match=r"\[n, seq\]"):
        analyze(one, windows[0])
    with pytest.raises(DataError, match=r"\[n, seq\]"):
        analyze(one, windows[:0])
    with pytest.raises(DataError, match="vocabulary"):
        analyze(one, windows + 97)
    with pytest.raises(ValueError, match="3 blocks"):
        analyze(one, windows, layers=[3])
    with pytest.raises(ValueError, match="act_bits"):
        analyze(one, windows, act_bits=0)
    with pytest.raises(ValueError, match="not analyzed"):
        analyze(one, windows, layers=[0], detail=["layers.1.mlp.down_proj"])
    with pytest.raises(ValueError, match="block layer path"):
        analyze(one, windows, detail=["mlp.down_proj"])
    codes = np.zeros((32, 32), np.int8)  # e.g. quantized codes: float weights are analyzed
    with pytest.raises(ValueError, match="not a float"):
        analyze({"q": (_with(params, **{"layers.0.self_attn.q_proj.weight": codes}), cfg)},
                windows, layers=[0])
    emb = np.asarray(flatten(params)["embed_tokens.weight"]).copy()
    emb[int(windows[1, 3])] = np.nan
    with pytest.raises(DataError, match=r"non-finite activations.*layers\.0\.self_attn\.q_proj"):
        analyze({"nan": (_with(params, **{"embed_tokens.weight": emb}), cfg)}, windows,
                layers=[0], batch_size=2)


def test_online_rotation_is_seen_and_runtime_quantization_ignored(model):
    cfg, params, windows, _ = model
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    if not {"online_hadamard", "act_quant", "kv_bits"} <= fields:
        pytest.skip("this ModelConfig has no run-time rotation / quantization flags")
    from jaxquant.algorithms.act_quant import ActQuantConfig

    had = dataclasses.replace(cfg, online_hadamard=True)
    quant = dataclasses.replace(had, act_quant=ActQuantConfig(bits=4), kv_bits=4)
    o = "layers.0.self_attn.o_proj"
    rep = analyze({"plain": (params, cfg), "had": (params, had), "quant": (params, quant)},
                  windows, layers=[0], detail=[o], batch_size=2)
    p, h, q = (rep["variants"][n] for n in ("plain", "had", "quant"))
    # Run-time quantization is switched off (and said so): the same float function.
    assert q["runtime_quantization_ignored"] == ["act_quant", "kv_bits"]
    assert h["runtime_quantization_ignored"] == [] and q["config"]["kv_bits"] == 4
    assert q["layers"] == h["layers"] and q["detail"] == h["detail"]
    # The Hadamard the model applies before o_proj is in the captured input: the same
    # attention output (q H (k H)^T = q k^T), rotated, so sum_j c_j^2 is kept but the
    # channel norms move. Nothing is rotated before q_proj.
    base, rot = p["detail"][o]["act_norms"], h["detail"][o]["act_norms"]
    assert np.sum(np.square(rot)) == pytest.approx(np.sum(np.square(base)), rel=1e-4)
    assert not np.allclose(rot, base, rtol=1e-2)
    assert h["layers"]["layers.0.self_attn.q_proj"] == p["layers"]["layers.0.self_attn.q_proj"]
