"""Recipes, quantize(), the quantized forward, quantized checkpoints and the CLI."""

from __future__ import annotations

import json
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant
from jaxquant.checkpoints.convert import params_from_source
from jaxquant.checkpoints.jq_checkpoint import data_bytes
from jaxquant.cli.main import main
from jaxquant.formats import UniformWeight, is_quantized, storage_bits
from jaxquant.models import transformer
from jaxquant.params import flatten
from jaxquant.quantize import quantization_report, quantize
from jaxquant.recipes import BLOCK_LINEARS, QuantSpec, Recipe, RecipeError, Rule
from tests.hf_models import FAMILIES, make_model, torch_source
from tests.test_cli_errors import assert_error, run


def dequantized(qparams):
    return jax.tree.map(lambda x: x.dequantize(jnp.float32) if is_quantized(x) else x,
                        qparams, is_leaf=is_quantized)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_quantized_forward_equals_dequantized_forward(family):
    seed = zlib.crc32(family.encode()) % 1000
    cfg, params = params_from_source(torch_source(make_model(family, seed=seed)))
    recipe = Recipe.uniform(QuantSpec(bits=3, group_size=32))
    qparams = quantize(params, recipe)
    flat = flatten(qparams)
    assert sum(is_quantized(v) for v in flat.values()) == 7 * cfg.num_layers
    assert not is_quantized(flat["embed_tokens.weight"])
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 11)))
    fwd = jax.jit(transformer.forward, static_argnums=1)
    got = np.asarray(fwd(qparams, cfg, tokens))
    want = np.asarray(fwd(dequantized(qparams), cfg, tokens))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # And it differs from the float model (the weights really are quantized).
    assert np.abs(got - np.asarray(fwd(params, cfg, tokens))).max() > 1e-3
    if family not in ("llama", "gemma3"):
        return  # test_model_parity decodes every family; quantized linears: two suffice
    # KV-cache decoding on quantized params.
    cache = transformer.init_cache(cfg, batch=2, max_len=16)
    step = jax.jit(transformer.decode_step, static_argnums=1)
    logits, cache = step(qparams, cfg, tokens[:, :6], cache)
    outs = [np.asarray(logits)]
    for i in range(6, 11):
        logits, cache = step(qparams, cfg, tokens[:, i:i + 1], cache)
        outs.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(outs, 1), got, atol=1e-4, rtol=0)


def test_recipe_first_rule_wins_and_reports_unused():
    cfg, params = params_from_source(torch_source(make_model("llama", seed=1)))
    recipe = Recipe(rules=(
        Rule(pattern=r"layers\.0\.mlp\.down_proj\.weight", spec=None),
        Rule(pattern=r"layers\.\d+\.mlp\.[a-z_]+\.weight", spec=QuantSpec(bits=2,
                                                                            group_size=16)),
        Rule(pattern=BLOCK_LINEARS, spec=QuantSpec(bits=8, group_size=None)),
        Rule(pattern=r"nothing\.here", spec=QuantSpec()),
    ))
    specs, unused = recipe.plan(flatten(params))
    assert "layers.0.mlp.down_proj.weight" not in specs
    assert specs["layers.1.mlp.down_proj.weight"].bits == 2
    assert specs["layers.1.self_attn.q_proj.weight"].bits == 8
    assert [r.pattern for r in unused] == [r"nothing\.here"]
    q = flatten(quantize(params, recipe))
    assert not is_quantized(q["layers.0.mlp.down_proj.weight"])
    assert q["layers.2.mlp.up_proj.weight"].bits == 2
    assert q["layers.2.self_attn.o_proj.weight"].group_size == cfg.hidden_size
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe


def test_quantize_is_pure():
    _cfg, params = params_from_source(torch_source(make_model("qwen2", seed=2)))
    before = {k: np.asarray(v).copy() for k, v in flatten(params).items()}
    quantize(params, Recipe.uniform(QuantSpec(bits=4, group_size=16)))
    for k, v in flatten(params).items():
        assert not is_quantized(v)
        np.testing.assert_array_equal(np.asarray(v), before[k])


def test_report_accounts_storage():
    _cfg, params = params_from_source(torch_source(make_model("llama", seed=3)))
    q = quantize(params, Recipe.uniform(QuantSpec(bits=4, group_size=16)))
    r = quantization_report(params, q)
    layers = [v for v in flatten(q).values() if isinstance(v, UniformWeight)]
    assert r["quantized_layers"] == len(layers) == 21
    assert r["avg_bits"] == pytest.approx(
        sum(8 * w.nbytes for w in layers) / sum(w.num_weights for w in layers))
    assert min(v["relative_error"] for v in r["layers"].values()) > 0
    assert max(v["relative_error"] for v in r["layers"].values()) < 0.2
    assert r["quantized_bytes"] < r["float_bytes"]


@pytest.mark.parametrize("spec_kwargs,fragment", [
    (dict(bits=9), "unsupported bit width"),
    (dict(bits=1), "unsupported bit width"),
    (dict(group_size=0), "group size"),
    (dict(method="magic"), "unknown method"),
    (dict(scale_dtype="int8"), "scale dtype"),
])
def test_bad_specs(spec_kwargs, fragment):
    with pytest.raises(RecipeError, match=fragment):
        QuantSpec(**spec_kwargs)


def test_bad_regex():
    with pytest.raises(RecipeError, match="not a valid regex"):
        Rule(pattern="layers.(", spec=QuantSpec())


def test_group_larger_than_input_names_the_layer():
    _cfg, params = params_from_source(torch_source(make_model("llama", seed=4)))
    # down_proj (input 80) fits a group of 64; q_proj (input 48) does not.
    with pytest.raises(RecipeError, match=r"layers\.0\.self_attn\.q_proj\.weight: group size "
                                          r"64 is larger than its input dimension 48"):
        quantize(params, Recipe.uniform(QuantSpec(group_size=64),
                                        pattern=r"layers\.0\.mlp\.down_proj\.weight|"
                                                r"layers\.0\.self_attn\.q_proj\.weight"))


def test_nan_weight_names_the_tensor():
    _cfg, params = params_from_source(torch_source(make_model("llama", seed=5)))
    w = params["layers"][1]["self_attn"]["k_proj"]["weight"]
    params["layers"][1]["self_attn"]["k_proj"]["weight"] = w.at[0, 0].set(jnp.inf)
    with pytest.raises(RecipeError, match=r"layers\.1\.self_attn\.k_proj\.weight contains NaN"):
        quantize(params, Recipe.uniform(QuantSpec(bits=4, group_size=16)))


def test_quantized_checkpoint_round_trip(tiny_hf_dir, tmp_path, capsys):
    from tests.test_cli_errors import _with_word_tokenizer

    tiny_hf_dir = _with_word_tokenizer(tiny_hf_dir, tmp_path / "src", 97)
    out, report = tmp_path / "q", tmp_path / "q.json"
    code = main(["quantize", "--model", str(tiny_hf_dir), "--bits", "3", "--group-size", "16",
                 "--sym", "--out", str(out), "--json", str(report)])
    assert code == 0, capsys.readouterr().err
    r = json.loads(report.read_text())
    for key in ("method", "bits", "group_size", "avg_bits", "quantized_bytes", "float_bytes",
                "seconds", "layers"):
        assert key in r
    assert r["bits"] == 3 and r["group_size"] == 16 and r["symmetric"] is True
    src = jaxquant.load_model(tiny_hf_dir)
    shapes = [tuple(w.shape) for p, w in flatten(src.params).items() if re.fullmatch(
        BLOCK_LINEARS, p)]
    bits = sum(storage_bits(s, bits=3, group_size=16, symmetric=True, scale_dtype=jnp.bfloat16)
               for s in shapes)
    assert r["avg_bits"] == pytest.approx(bits / sum(a * b for a, b in shapes), rel=1e-12)
    assert 4.0 < r["avg_bits"] < 4.4  # 3-bit codes + a bf16 scale per 16 + word padding
    # On disk every array is stored raw: the data bytes equal the in-memory account.
    assert data_bytes(out) == r["quantized_bytes"]
    for path, layer in r["layers"].items():
        on_disk = data_bytes(out, prefix=path + ".")
        assert on_disk * 8 == pytest.approx(layer["bits_per_weight"] * _numel(src, path))
    back = jaxquant.load_model(out)
    q = quantize(src.params, Recipe.uniform(QuantSpec(bits=3, group_size=16, symmetric=True)))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (1, 9)))
    np.testing.assert_array_equal(np.asarray(transformer.forward(q, src.config, tokens)),
                                  np.asarray(transformer.forward(back.params, back.config,
                                                                 tokens)))
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "quantized" in info and "rtn 3-bit sym g16" in info


def _numel(model, path):
    shape = flatten(model.params)[path].shape
    return shape[0] * shape[1]


def test_incompatible_checkpoint_version(tiny_hf_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_hf_dir), "--group-size", "16",
                 "--out", str(out)]) == 0
    marker = json.loads((out / "jaxquant.json").read_text())
    marker["version"] = 99
    (out / "jaxquant.json").write_text(json.dumps(marker))
    code, err = run(["eval", "--model", out], capsys)
    assert_error(code, err, "newer jaxquant", "version 99")


def test_cli_quantize_errors(tiny_hf_dir, tmp_path, capsys):
    code, err = run(["quantize", "--model", tiny_hf_dir, "--group-size", "4096"], capsys)
    assert_error(code, err, "group size 4096 is larger than its input dimension")
    code, err = run(["quantize", "--model", tiny_hf_dir, "--bits", "12"], capsys)
    assert_error(code, err, "unsupported bit width 12")
    code, err = run(["quantize", "--model", tiny_hf_dir, "--pattern", "("], capsys)
    assert_error(code, err, "not a valid regex")
    code, err = run(["quantize", "--model", tiny_hf_dir, "--pattern", "nothing"], capsys)
    assert_error(code, err, "matches no parameter")


@pytest.mark.model
def test_generate_prints_text(smollm2_model, monkeypatch, capsys):
    from jaxquant.checkpoints import load

    real = load.load_model

    def load_model(spec, **kwargs):  # the session's copy: reading the GGUF takes ~10 s
        if spec == "smollm2-135m" and kwargs.get("dtype", "float32") == "float32":
            return smollm2_model
        return real(spec, **kwargs)

    monkeypatch.setattr(load, "load_model", load_model)
    assert main(["generate", "--model", "smollm2-135m", "--prompt", "The capital of France is",
                 "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The capital of France is") and "Paris" in out


def test_cli_gptq_with_calibration(tiny_hf_dir, tmp_path, capsys):
    from tests.test_cli_errors import _with_word_tokenizer

    d = _with_word_tokenizer(tiny_hf_dir, tmp_path / "m", 97)
    rng = np.random.default_rng(0)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"w{i}" for i in rng.integers(0, 97, 2000)))
    code, err = run(["quantize", "--model", d, "--method", "gptq", "--bits", "3",
                     "--group-size", "16"], capsys)
    assert_error(code, err, "needs calibration text", "--calib")
    code, err = run(["quantize", "--model", d, "--method", "gptq", "--calib", calib,
                     "--calib-seq-len", "4096"], capsys)
    assert_error(code, err, "shorter than one window of 4096")
    report = tmp_path / "g.json"
    out = tmp_path / "g"
    assert main(["quantize", "--model", str(d), "--method", "gptq", "--bits", "3",
                 "--group-size", "16", "--act-order", "--calib", str(calib),
                 "--calib-format", "plain", "--calib-windows", "8", "--calib-seq-len", "64",
                 "--batch-size", "4", "--json", str(report), "--out", str(out),
                 "--quiet"]) == 0
    r = json.loads(report.read_text())
    assert r["method"] == "gptq" and r["calibration"]["windows"] == 8
    assert (r["quantized_layers"] == 21 and "act-order" in r["recipe"]["rules"][0]["spec"] \
        .__repr__()) or r["recipe"]["rules"][0]["spec"]["act_order"] is True
    back = jaxquant.load_model(out)  # act-order with groups: permuted mixed layout
    assert any(isinstance(v, jaxquant.MixedWeight) for v in flatten(back.params).values())
    tokens = jnp.asarray(rng.integers(0, 97, (1, 9)))
    assert np.isfinite(np.asarray(transformer.forward(back.params, back.config, tokens))).all()


def test_gptq_beats_rtn_on_calibration_loss():
    """End to end through sequential calibration: GPTQ's output error on the
    calibration data is lower than RTN's."""
    from jaxquant.calibration import Calibration
    from jaxquant.eval import evaluate_perplexity

    cfg, params = params_from_source(torch_source(make_model("llama", seed=9)))
    rng = np.random.default_rng(1)
    windows = rng.integers(0, cfg.vocab_size, (16, 32))
    calib = Calibration(config=cfg, windows=windows, batch_size=8, progress=False)
    spec = dict(bits=2, group_size=16)
    g = quantize(params, Recipe.uniform(QuantSpec(method="gptq", **spec)), calib)
    r = quantize(params, Recipe.uniform(QuantSpec(method="rtn", **spec)))
    nll = {k: evaluate_perplexity(v, cfg, windows, progress=False).nll
           for k, v in (("float", params), ("gptq", g), ("rtn", r))}
    assert abs(nll["gptq"] - nll["float"]) < abs(nll["rtn"] - nll["float"])
    with pytest.raises(RecipeError, match="needs calibration data"):
        quantize(params, Recipe.uniform(QuantSpec(method="gptq", **spec)))
