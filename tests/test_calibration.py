"""Sequential calibration end to end: SliM-LLM / SliM-LLM+, true-sequential, degenerate inputs."""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.algorithms.rtn import rtn
from jaxquant.calibration import Calibration, apply_block, collect_inputs
from jaxquant.checkpoints.convert import params_from_source
from jaxquant.cli.main import main
from jaxquant.formats import MixedWeight, UniformWeight
from jaxquant.models import transformer
from jaxquant.params import flatten
from jaxquant.quantize import quantize
from jaxquant.recipes import QuantSpec, Recipe, RecipeError
from tests.hf_models import make_model, torch_source


@pytest.fixture(scope="module")
def tiny():
    cfg, params = params_from_source(torch_source(make_model("llama", seed=11)))
    windows = np.random.default_rng(3).integers(0, cfg.vocab_size, (16, 48))
    return cfg, params, windows


def _calib(cfg, windows, **kw):
    return Calibration(config=cfg, windows=windows, batch_size=8, progress=False, **kw)


def test_slim_end_to_end_exact_bits_and_better_than_rtn(tiny):
    cfg, params, windows = tiny
    spec = dict(bits=2, group_size=16)
    s, stats = quantize(params, Recipe.uniform(QuantSpec(method="slim", **spec)),
                        _calib(cfg, windows), return_stats=True)
    r = quantize(params, Recipe.uniform(QuantSpec(method="rtn", **spec)))
    layers = {p: q for p, q in flatten(s).items() if isinstance(q, (MixedWeight, UniformWeight))}
    assert len(layers) == 7 * cfg.num_layers
    for q in layers.values():
        bits = (q.column_bits() if isinstance(q, MixedWeight)
                else np.full(q.shape[1], q.bits))
        assert bits.mean() == 2 and set(bits) <= {1, 2, 3}
    errs = [v["relative_error"] for v in stats["layers"].values()]
    assert len(errs) == len(layers) and all(np.isfinite(errs)) and stats["seconds"] > 0
    tokens = jnp.asarray(windows)
    # Jitted: one program per model (eager, SliM's data-dependent layer shapes would
    # compile every op of every layer on its own).
    fwd = jax.jit(transformer.forward, static_argnums=1)
    ref = np.asarray(fwd(params, cfg, tokens))
    dist = {k: np.mean((np.asarray(fwd(v, cfg, tokens)) - ref) ** 2)
            for k, v in (("slim", s), ("rtn", r))}
    assert dist["slim"] < dist["rtn"], dist


@pytest.mark.parametrize("lwc_dtype", ["float32", "bfloat16"])
def test_slim_plus_keeps_the_better_block(tiny, lwc_dtype):
    cfg, params, windows = tiny
    spec = QuantSpec(method="slim+", bits=2, group_size=16, lwc_epochs=3, lwc_lr=1e-2,
                     lwc_dtype=lwc_dtype)
    q, stats = quantize(params, Recipe.uniform(spec), _calib(cfg, windows),
                        return_stats=True)
    blocks = stats["blocks"]
    assert sorted(blocks) == list(range(cfg.num_layers))
    for b in blocks.values():
        assert np.isfinite(b["block_loss_slim"]) and np.isfinite(b["block_loss_lwc"])
        kept = min(b["block_loss_slim"], b["block_loss_lwc"])
        assert b[f"block_loss_{b['kept']}"] == kept
    # Training (in either compute dtype) improves on SliM-LLM somewhere.
    assert any(b["kept"] == "lwc" for b in blocks.values()), blocks
    assert all(np.isfinite(np.asarray(v.dequantize())).all()
               for v in flatten(q).values() if isinstance(v, (MixedWeight, UniformWeight)))


def test_true_sequential_collects_inputs_of_quantized_layers(tiny):
    cfg, params, windows = tiny
    spec = QuantSpec(method="gptq", bits=3, group_size=16)
    a = quantize(params, Recipe.uniform(spec), _calib(cfg, windows))
    b = quantize(params, Recipe.uniform(spec), _calib(cfg, windows, true_sequential=True))
    fa, fb = flatten(a), flatten(b)
    # q/k/v see the same inputs either way; o_proj's inputs differ once q/k/v are quantized.
    p = "layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(np.asarray(fa[p].codes()), np.asarray(fb[p].codes()))
    o = "layers.0.self_attn.o_proj.weight"
    assert not np.array_equal(np.asarray(fa[o].codes()), np.asarray(fb[o].codes()))


def test_all_zero_inputs_fall_back_to_rtn_with_a_warning(tiny):
    cfg, params, windows = tiny
    params = jax_tree_copy(params)
    params["layers"][0]["input_layernorm"]["weight"] = jnp.zeros_like(
        params["layers"][0]["input_layernorm"]["weight"])
    spec = QuantSpec(method="gptq", bits=4, group_size=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = quantize(params, Recipe.uniform(spec, r"layers\.0\..*_proj\.weight"),
                     _calib(cfg, windows))
    msgs = [str(w.message) for w in caught]
    assert any("layers.0.self_attn.q_proj.weight" in m and "RTN" in m for m in msgs), msgs
    w = params["layers"][0]["self_attn"]["q_proj"]["weight"]
    want = rtn(w, bits=4, group_size=16)
    got = q["layers"][0]["self_attn"]["q_proj"]["weight"]
    np.testing.assert_array_equal(np.asarray(got.dequantize()), np.asarray(want.dequantize()))


def test_nan_activations_stop_with_the_layer_named(tiny):
    cfg, params, windows = tiny
    params = jax_tree_copy(params)
    norm = params["layers"][1]["post_attention_layernorm"]["weight"]
    params["layers"][1]["post_attention_layernorm"]["weight"] = norm.at[0].set(jnp.nan)
    with pytest.raises(RecipeError, match=r"layers\.1\.mlp\.\w+_proj\.weight: its calibration "
                                          "inputs contain NaN"):
        quantize(params, Recipe.uniform(QuantSpec(method="slim", bits=3, group_size=16)),
                 _calib(cfg, windows))


def test_canonical_layer_compiles_once_per_kind_and_computes_the_same():
    cfg, params = params_from_source(torch_source(make_model("gemma3", seed=2)))
    x = transformer.embed(params, cfg, jnp.asarray(np.arange(20).reshape(2, 10) % 50))
    kinds = {transformer.canonical_layer(cfg, i) for i in range(cfg.num_layers)}
    assert kinds == {0, 1}  # sliding and full attention layers
    for i in range(cfg.num_layers):
        want = transformer.apply_block(params["layers"][i], cfg, i, x)
        np.testing.assert_allclose(np.asarray(apply_block(params["layers"][i], cfg, i, x)),
                                   np.asarray(want), rtol=1e-5, atol=1e-5)


def test_collected_hessian_is_2xtx_over_tokens(tiny):
    cfg, params, windows = tiny
    xs = [transformer.embed(params, cfg, jnp.asarray(windows[:8])),
          transformer.embed(params, cfg, jnp.asarray(windows[8:]))]
    inputs = collect_inputs(params["layers"][0], cfg, 0, xs, ["mlp.down_proj.weight"],
                            sample_tokens=100)
    st = inputs["mlp.down_proj.weight"]
    assert st.tokens == windows.size
    assert st.sample.shape[1] == cfg.intermediate_size and 90 <= len(st.sample) <= 200
    # Recompute down_proj's inputs directly: act(gate(x)) * up(x) after the first half.
    h = transformer.bind_block(params["layers"][0], cfg, 0)
    rows = []
    for x in xs:
        pos = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
        a, _ = h.self_attn(h.input_layernorm(x), pos, None, None)
        y = h.post_attention_layernorm(x + a)
        assert h.mlp.activation == "silu"
        inner = jax.nn.silu(h.mlp.gate_proj(y)) * h.mlp.up_proj(y)
        rows.append(np.asarray(inner).reshape(-1, inner.shape[-1]))
    x = np.concatenate(rows).astype(np.float64)
    np.testing.assert_allclose(np.asarray(st.hessian), 2 * x.T @ x / len(x), rtol=2e-4,
                               atol=1e-5 * np.abs(x).max() ** 2)
    np.testing.assert_allclose(np.asarray(st.absmax), np.abs(x).max(0), rtol=1e-5)


def test_cli_slim_report_bit_map_and_short_text_warning(tiny_hf_dir, tmp_path, capsys):
    from tests.test_cli_errors import _with_word_tokenizer

    d = _with_word_tokenizer(tiny_hf_dir, tmp_path / "m", 97)
    rng = np.random.default_rng(0)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"w{i}" for i in rng.integers(0, 97, 300)))
    report, png = tmp_path / "r.json", tmp_path / "bits.png"
    assert main(["quantize", "--model", str(d), "--method", "slim", "--bits", "2",
                 "--group-size", "16", "--calib", str(calib), "--calib-format", "plain",
                 "--calib-windows", "8", "--calib-seq-len", "64", "--json", str(report),
                 "--bit-map", str(png), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "fewer than the 8 x 64 = 512 asked for" in err
    r = json.loads(report.read_text())
    assert r["method"] == "slim" and r["calibration"]["seconds"] > 0
    layer = r["layers"]["layers.0.mlp.down_proj.weight"]
    assert np.isfinite(layer["calibration_relative_error"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code = main(["quantize", "--model", str(d), "--method", "gptq", "--calib", str(calib),
                 "--bit-map", str(tmp_path / "x.png")])
    assert code == 2 and "--bit-map" in capsys.readouterr().err
    code = main(["quantize", "--model", str(d), "--method", "slim", "--bits", "8",
                 "--calib", str(calib)])
    assert code == 2 and "2 to 7" in capsys.readouterr().err


def test_cli_warns_when_calibrating_on_the_evaluation_text(tiny_hf_dir, tmp_path, capsys):
    from jaxquant.cli.main import _same_text
    from tests.test_cli_errors import _with_word_tokenizer

    assert _same_text("kjv-nt", "kjv-nt") and _same_text("kjv", "kjv-ot")
    assert not _same_text("kjv-nt", "kjv-ot") and not _same_text("kjv-nt", str(tmp_path))
    d = _with_word_tokenizer(tiny_hf_dir, tmp_path / "m", 97)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i}" for i in np.random.default_rng(1).integers(0, 97, 400)))
    args = ["quantize", "--model", str(d), "--method", "gptq", "--bits", "4", "--group-size",
            "16", "--calib", str(text), "--calib-windows", "2", "--calib-seq-len", "64",
            "--eval", "--seq-len", "64", "--quiet"]
    assert main([*args, "--data", str(text)]) == 0
    assert "calibrating on the evaluation text" in capsys.readouterr().err
    other = tmp_path / "e.txt"
    other.write_text(text.read_text())
    assert main([*args, "--data", str(other)]) == 0
    assert "calibrating on the evaluation text" not in capsys.readouterr().err


def jax_tree_copy(params):
    """A shallow-copied nested dict (leaves shared) that can be edited."""
    if isinstance(params, dict):
        return {k: jax_tree_copy(v) for k, v in params.items()}
    return params
