"""SmoothQuant scaling folded into the weights leaves the float model unchanged."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.algorithms.act_quant import channel_difficulty
from jaxquant.calibration import collect_inputs
from jaxquant.models.transformer import embed, forward
from jaxquant.params import flatten, unflatten
from jaxquant.transforms.rotation import random_hadamard_rotation
from jaxquant.transforms.smooth import activation_absmax, smooth, smooth_scales
from tests.test_rotation import _model, _seed


@pytest.mark.parametrize("family,hidden,tie", [("llama", 48, True), ("qwen2", 64, False)])
def test_smoothing_keeps_logits_and_flattens_inputs(family, hidden, tie):
    seed = _seed("smooth", family, hidden)
    cfg, params = _model(family, hidden=hidden, tie=tie, seed=seed % 1000)
    flat = flatten(params)
    # Outlier channels in the residual stream, as real LLMs have.
    emb = np.asarray(flat["embed_tokens.weight"]).copy()
    emb[:, [3, 17]] *= 30.0
    flat["embed_tokens.weight"] = jnp.asarray(emb)
    params = unflatten(flat)
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, 97, (2, 13)))
    calib = rng.integers(0, 97, (3, 16))
    ref = np.asarray(forward(params, cfg, tokens))
    absmax = activation_absmax(params, cfg, calib, batch_size=2)
    assert set(absmax) >= {"layers.0.self_attn.q_proj", "layers.1.mlp.down_proj"}
    assert absmax["layers.0.self_attn.q_proj"].shape == (hidden,)
    sm = smooth(params, cfg, absmax, alpha=0.5)
    np.testing.assert_allclose(np.asarray(forward(sm, cfg, tokens)), ref, rtol=1e-4, atol=1e-4)
    # The smoothed q_proj input has a smaller channel difficulty than before.
    x = embed(params, cfg, jnp.asarray(calib))
    before = collect_inputs(params["layers"][0], cfg, 0, [x], ["self_attn.q_proj.weight"])
    after = collect_inputs(sm["layers"][0], cfg, 0, [x], ["self_attn.q_proj.weight"])
    assert float(jnp.std(after["self_attn.q_proj.weight"].absmax)) < 0.5 * float(
        jnp.std(before["self_attn.q_proj.weight"].absmax))
    # Smooth, then rotate: still the same model.
    both, bcfg = random_hadamard_rotation(sm, cfg, __import__("jax").random.key(1))
    np.testing.assert_allclose(np.asarray(forward(both, bcfg, tokens)), ref, rtol=1e-4,
                               atol=1e-4)
    assert channel_difficulty(jnp.ones((4, 5))) == 0


def test_smooth_scales_formula_and_edge_cases():
    a = jnp.asarray([4.0, 0.0, 9.0, 1e-12])
    w1 = jnp.asarray([[1.0, 2.0, -1.0, 1.0]])
    w2 = jnp.asarray([[-4.0, 0.5, 0.25, 1.0]])
    s = np.asarray(smooth_scales(a, [w1, w2], 0.5))
    np.testing.assert_allclose(s[[0, 2]], [np.sqrt(4.0) / np.sqrt(4.0), 3.0 / 1.0], rtol=1e-6)
    assert s[1] == 1.0 and s[3] == pytest.approx(1e-5)  # dead channel; clamped
    np.testing.assert_allclose(np.asarray(smooth_scales(a[:1], [w1[:, :1]], 1.0)), [4.0])
    with pytest.raises(ValueError, match="alpha"):
        smooth_scales(a, [w1], 1.5)
