"""Activation / KV quantization in the forward, the online Hadamards, and the transforms."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant
from jaxquant import ops
from jaxquant.algorithms.act_quant import ActQuantConfig, fake_quant_activations, layer_error
from jaxquant.algorithms.rtn import rtn
from jaxquant.cli.main import main
from jaxquant.errors import ConfigError
from jaxquant.models.config import ModelConfig
from jaxquant.models.transformer import decode_step, forward, init_cache
from jaxquant.quantize import quantize
from jaxquant.recipes import QuantSpec, Recipe
from jaxquant.transforms.hadamard import hadamard_transform
from jaxquant.transforms.pipeline import TransformConfig, apply_transform
from jaxquant.transforms.rotation import TransformError, fold_online
from jaxquant.transforms.smooth import ALPHA_GRID, alpha_errors, smooth_scales
from tests.test_cli_errors import assert_error, run
from tests.test_rotation import _model, _outliers, _seed


@pytest.mark.parametrize("kind", ["smooth", "rotate", "smoothrot"])
@pytest.mark.parametrize("family,hidden,tie", [("llama", 48, True), ("qwen2", 64, False)])
def test_transforms_keep_the_float_model(kind, family, hidden, tie):
    seed = _seed("transform", kind, family)
    cfg, params = _model(family, hidden=hidden, tie=tie, seed=seed % 1000)
    params = _outliers(params)
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, 97, (2, 13)))
    calib = rng.integers(0, 97, (3, 16))
    ref = np.asarray(forward(params, cfg, tokens))
    tp, tcfg, info = apply_transform(params, cfg, TransformConfig(kind=kind, seed=seed % 7),
                                     calib)
    assert info["transform"] == kind
    assert tcfg.online_hadamard == (kind != "smooth")
    np.testing.assert_allclose(np.asarray(forward(tp, tcfg, tokens)), ref, rtol=2e-4,
                               atol=2e-4)
    if kind == "smoothrot":  # smoothing and the online Hadamards: one case per family
        # The KV cache path computes the same function: 6 tokens, then 6 more after them
        # (equal chunks: one shape of each eager op).
        cache = init_cache(tcfg, 2, 16)
        first, cache = decode_step(tp, tcfg, tokens[:, :6], cache)
        rest, _ = decode_step(tp, tcfg, tokens[:, 6:12], cache)
        np.testing.assert_allclose(np.concatenate([first, rest], 1), ref[:, :12], rtol=2e-4,
                                   atol=2e-4)


def test_online_hadamard_weights_are_rotated():
    cfg, params = _model("llama", hidden=48, tie=False, seed=3)
    rot, rcfg = fold_online(params, cfg)
    down = params["layers"][1]["mlp"]["down_proj"]["weight"]
    np.testing.assert_allclose(rot["layers"][1]["mlp"]["down_proj"]["weight"],
                               hadamard_transform(down), rtol=1e-5, atol=1e-6)
    with pytest.raises(TransformError, match="already folded"):
        fold_online(rot, rcfg)
    odd = dataclasses.replace(cfg, intermediate_size=188)  # 188 = 47 * 4: none known
    with pytest.raises(TransformError, match="intermediate_size = 188"):
        fold_online(jaxquant.init_params(odd), odd)


def test_alpha_search_errors_and_choice():
    rng = np.random.default_rng(_seed("alpha"))
    x = rng.normal(size=(64, 40)).astype(np.float32)
    x[:, 5] *= 40.0
    w = rng.normal(size=(24, 40)).astype(np.float32)
    absmax = jnp.abs(jnp.asarray(x)).max(0)
    grid = jnp.asarray(ALPHA_GRID)
    errs = np.asarray(alpha_errors(jnp.asarray(x), absmax, (jnp.asarray(w),), grid, act_bits=4,
                                   weight_bits=4, rotate=False))
    assert errs.shape == (len(ALPHA_GRID) + 1,)
    for i in (0, 7, 20):
        s = smooth_scales(absmax, [jnp.asarray(w)], ALPHA_GRID[i])
        direct = layer_error(jnp.asarray(x) / s, jnp.asarray(w) * s, 4, 4)
        assert errs[i + 1] == pytest.approx(float(direct), rel=1e-5)
    # entry 0: no smoothing at all
    assert errs[0] == pytest.approx(float(layer_error(jnp.asarray(x), jnp.asarray(w), 4, 4)),
                                    rel=1e-5)
    assert errs.min() < 0.5 * errs[0]  # a strong outlier channel: smoothing pays
    rot = np.asarray(alpha_errors(jnp.asarray(x), absmax, (jnp.asarray(w),), grid[:1],
                                  act_bits=4, weight_bits=4, rotate=True))
    assert rot.shape == (2,)
    direct = layer_error(hadamard_transform(jnp.asarray(x)), hadamard_transform(jnp.asarray(w)),
                         4, 4)
    assert rot[0] == pytest.approx(float(direct), rel=1e-4)


def test_searched_alpha_transform():
    cfg, params = _model("llama", hidden=48, tie=True, seed=11)
    params = _outliers(params)
    calib = np.random.default_rng(1).integers(0, 97, (2, 16))
    tp, tcfg, info = apply_transform(
        params, cfg, TransformConfig(kind="smoothrot", alpha=None, act_bits=4, weight_bits=4),
        calib)
    assert set(info["alphas"]) == {f"layers.{i}.mlp.down_proj" for i in range(2)}
    assert all(a is None or a in ALPHA_GRID for a in info["alphas"].values())
    tokens = jnp.asarray(calib)
    np.testing.assert_allclose(forward(tp, tcfg, tokens), forward(params, cfg, tokens),
                               rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("wbits,abits,per_channel,integer", [
    (8, 8, True, True), (4, 4, True, True), (4, 8, False, False)])
def test_act_quant_linear_paths(wbits, abits, per_channel, integer):
    rng = np.random.default_rng(_seed("linear", wbits, abits))
    x = jnp.asarray(rng.normal(size=(3, 5, 70)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(33, 70)).astype(np.float32))
    q = rtn(w, bits=wbits, group_size=None if per_channel else 32, symmetric=True)
    act = ActQuantConfig(bits=abits, clip_ratio=0.9 if abits == 4 else 1.0)
    assert (q.integer_codes() is not None) == integer
    y = ops.linear(x, q, act=act)
    ref = fake_quant_activations(x, act) @ q.dequantize().T
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-4, atol=1e-4)
    hlo = jax.jit(lambda a: ops.linear(a, q, act=act)).lower(x).as_text()
    assert ("xi8>" in hlo and "-> tensor<3x5x33xi32>" in hlo) == integer
    # NaN never passes as finite: a token with NaN gives NaN outputs, the others do not.
    bad = ops.linear(x.at[0, 0, 3].set(jnp.nan), q, act=act)
    assert bool(jnp.all(jnp.isnan(bad[0, 0]))) and bool(jnp.all(jnp.isfinite(bad[1:])))


def test_w8a8_model_uses_integer_dots_and_stays_close():
    cfg, params = _model("llama", hidden=48, tie=False, seed=5)
    q = quantize(params, Recipe.uniform(QuantSpec(bits=8, group_size=None, symmetric=True)))
    qcfg = dataclasses.replace(cfg, act_quant=ActQuantConfig(bits=8))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 97, (1, 12)))
    hlo = jax.jit(lambda p, t: forward(p, qcfg, t)).lower(q, tokens).as_text()
    assert hlo.count("i32>") >= 7 * cfg.num_layers  # every block linear: an int32 product
    ref = forward(params, cfg, tokens)
    out = forward(q, qcfg, tokens)
    assert float(jnp.abs(out - ref).max()) < 0.05 * float(jnp.abs(ref).max())


def test_rotation_makes_4bit_activations_better():
    seed = _seed("w4a4")
    cfg, params = _model("llama", hidden=64, tie=False, seed=seed % 1000)
    params = _outliers(params, cols=(3, 17, 40), factor=50.0)
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, 97, (2, 16)))
    ref = forward(params, cfg, tokens)
    a4 = ActQuantConfig(bits=4, clip_ratio=0.9)
    plain = forward(params, dataclasses.replace(cfg, act_quant=a4), tokens)
    rp, rcfg, _ = apply_transform(params, cfg, TransformConfig(kind="rotate", seed=1))
    rotated = forward(rp, dataclasses.replace(rcfg, act_quant=a4), tokens)
    err_plain = float(jnp.mean((plain - ref) ** 2))
    err_rot = float(jnp.mean((rotated - ref) ** 2))
    assert err_rot < 0.5 * err_plain


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_kv_cache(bits):
    cfg, params = _model("qwen3", hidden=64, tie=True, seed=7)
    kcfg = dataclasses.replace(cfg, kv_bits=bits)
    tokens = jnp.asarray(np.random.default_rng(bits).integers(0, 97, (2, 11)))
    full = forward(params, kcfg, tokens)
    cache = init_cache(kcfg, 2, 16)
    layer = cache["layers"][0]
    assert layer["k"].dtype == jnp.uint8
    assert layer["k"].shape[-1] == (cfg.head_dim // 2 if bits <= 4 else cfg.head_dim)
    assert layer["v_scale"].shape == (2, 16, cfg.num_kv_heads, 1)
    a, cache = decode_step(params, kcfg, tokens[:, :4], cache)
    outs = [a]
    for t in range(4, 11):
        b, cache = decode_step(params, kcfg, tokens[:, t:t + 1], cache)
        outs.append(b)
    np.testing.assert_allclose(np.concatenate(outs, 1), full, rtol=1e-4, atol=1e-4)
    ref = forward(params, cfg, tokens)
    err = float(jnp.abs(full - ref).max())
    assert 0 < err < (0.5 if bits == 4 else 0.05) * float(jnp.abs(ref).max())


def test_runtime_config_round_trip_and_errors():
    cfg = ModelConfig(family="llama", vocab_size=97, hidden_size=48, intermediate_size=80,
                      num_layers=1, num_heads=6, num_kv_heads=2, head_dim=8,
                      act_quant=ActQuantConfig(bits=4, clip_ratio=0.9), kv_bits=4,
                      online_hadamard=True)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="kv_bits"):
        dataclasses.replace(cfg, kv_bits=1)
    with pytest.raises(ConfigError, match="static"):
        dataclasses.replace(cfg, act_quant=ActQuantConfig(bits=8, dynamic=False))
    bad = cfg.to_dict()
    bad["act_quant"]["bits"] = 12
    with pytest.raises(ConfigError, match="bits"):
        ModelConfig.from_dict(bad)


def test_cli_transform_alone_and_w4a4kv4_checkpoint(tiny_hf_dir, tmp_path, capsys):
    from tests.test_cli_errors import _with_word_tokenizer

    src = _with_word_tokenizer(tiny_hf_dir, tmp_path / "src", 97)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"w{i % 90}" for i in range(600)))
    out, report = tmp_path / "rot", tmp_path / "rot.json"
    assert main(["quantize", "--model", str(src), "--method", "none", "--bits", "16",
                 "--transform", "smoothrot", "--calib", str(calib), "--calib-windows", "2",
                 "--calib-seq-len", "32", "--out", str(out), "--json", str(report),
                 "--quiet"]) == 0, capsys.readouterr().err
    r = json.loads(report.read_text())
    assert r["transform"] == "smoothrot" and r["quantized_layers"] == 0
    model, back = jaxquant.load_model(src), jaxquant.load_model(out)
    assert back.config.online_hadamard and back.config.act_quant is None
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (1, 9)))
    np.testing.assert_allclose(forward(back.params, back.config, tokens),
                               forward(model.params, model.config, tokens), rtol=2e-4,
                               atol=2e-4)
    out4 = tmp_path / "w4a4"
    assert main(["quantize", "--model", str(src), "--bits", "4", "--per-channel", "--sym",
                 "--transform", "rotate", "--act-bits", "4", "--kv-bits", "4",
                 "--out", str(out4), "--quiet"]) == 0, capsys.readouterr().err
    q = jaxquant.load_model(out4)
    assert q.config.act_quant == ActQuantConfig(bits=4, clip_ratio=0.9)
    assert q.config.kv_bits == 4 and q.config.online_hadamard
    logits = forward(q.params, q.config, tokens)
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_cli_awq(tiny_hf_dir, tmp_path, capsys):
    from tests.test_cli_errors import _with_word_tokenizer

    src = _with_word_tokenizer(tiny_hf_dir, tmp_path / "src", 97)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"w{i % 90}" for i in range(600)))
    report = tmp_path / "awq.json"
    assert main(["quantize", "--model", str(src), "--method", "awq", "--bits", "3",
                 "--group-size", "16", "--calib", str(calib), "--calib-windows", "2",
                 "--calib-seq-len", "32", "--json", str(report), "--quiet"]) == 0, \
        capsys.readouterr().err
    r = json.loads(report.read_text())
    assert r["method"] == "awq" and r["label"].startswith("awq+rtn 3-bit")
    assert r["quantized_layers"] == 21 and 5.0 < r["avg_bits"] < 5.5  # + bf16 scale, zero / 16
    code, err = run(["quantize", "--model", tiny_hf_dir, "--method", "awq"], capsys)
    assert_error(code, err, "--method awq needs calibration text")


def test_cli_activation_errors(tiny_hf_dir, capsys):
    code, err = run(["quantize", "--model", tiny_hf_dir, "--method", "none", "--bits", "4",
                     "--transform", "rotate"], capsys)
    assert_error(code, err, "--method none keeps the weights in float")
    code, err = run(["quantize", "--model", tiny_hf_dir, "--method", "none"], capsys)
    assert_error(code, err, "quantizes nothing")
    code, err = run(["quantize", "--model", tiny_hf_dir, "--alpha", "0.5"], capsys)
    assert_error(code, err, "--transform smooth or smoothrot")
    code, err = run(["quantize", "--model", tiny_hf_dir, "--act-bits", "9"], capsys)
    assert_error(code, err, "--act-bits", "2..8")
    code, err = run(["quantize", "--model", tiny_hf_dir, "--transform", "smooth"], capsys)
    assert_error(code, err, "--transform smooth needs calibration text")
    code, err = run(["quantize", "--model", tiny_hf_dir, "--transform", "smooth", "--alpha",
                     "1.5", "--calib", "kjv-nt"], capsys)
    assert_error(code, err, "alpha must be a number in [0, 1]")


def test_online_key_hadamard_only_with_quantized_cache():
    # (q H)(k H)^T = q k^T: the q/k Hadamards only matter for what a quantized cache
    # stores, so the forward runs them with kv_bits and skips them without.
    from jaxquant.models.layers import read_cache

    cfg, params = _model("llama", hidden=64, tie=False, seed=_seed("qk") % 1000)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 97, (2, 5)))

    def keys(c):
        cache = init_cache(c, 2, 8)
        _, cache = decode_step(params, c, tokens, cache)
        return read_cache(cache["layers"][0], c.kv_bits, jnp.float32)[0][:, :5]

    plain = keys(cfg)  # layer 0's keys do not depend on the other online transforms
    on = dataclasses.replace(cfg, online_hadamard=True)
    np.testing.assert_array_equal(keys(on), plain)
    stored = keys(dataclasses.replace(on, kv_bits=8))
    rotated = hadamard_transform(plain)
    assert float(jnp.abs(stored - rotated).max()) < 0.02 * float(jnp.abs(rotated).max())
    assert float(jnp.abs(stored - plain).max()) > 0.2 * float(jnp.abs(plain).max())
