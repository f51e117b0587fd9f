"""Logits parity with transformers (torch, float32, CPU) on tiny random configs."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxquant
from jaxquant.checkpoints.convert import params_from_source
from jaxquant.models import transformer
from jaxquant.params import iter_paths
from tests.hf_models import FAMILIES, make_model, torch_source

TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    """A torch model, and the same model saved by transformers and loaded by jaxquant.

    Loading the saved directory exercises the reduced config.json that transformers
    writes (fields equal to class defaults are omitted) and the safetensors reader.
    """
    seed = zlib.crc32(request.param.encode()) % 1000
    model = make_model(request.param, seed=seed)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    loaded = jaxquant.load_model(path)
    cfg, params = params_from_source(torch_source(model))
    assert loaded.config == cfg
    for (path_a, a), (path_b, b) in zip(iter_paths(params), iter_paths(loaded.params),
                                        strict=True):
        assert path_a == path_b
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path_a)
    return request.param, model, loaded.config, loaded.params, np.random.default_rng(seed)


def _torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.numpy()


def test_full_sequence_logits(pair):
    _name, model, cfg, params, rng = pair
    tokens = rng.integers(0, cfg.vocab_size, size=(2, 13))
    ref = _torch_logits(model, tokens)
    ours = jax.jit(transformer.forward, static_argnums=1)(params, cfg, jnp.asarray(tokens))
    assert np.isfinite(np.asarray(ours)).all()
    np.testing.assert_allclose(np.asarray(ours), ref, atol=TOL, rtol=0)
    # The check can fail: logits are far from zero and vary across positions.
    assert np.abs(ref).max() > 0.1


def test_kv_cache_decoding(pair):
    _name, model, cfg, params, rng = pair
    prompt, steps = 5, 8
    tokens = rng.integers(0, cfg.vocab_size, size=(2, prompt + steps))
    ref = _torch_logits(model, tokens)
    step = jax.jit(transformer.decode_step, static_argnums=1)
    cache = transformer.init_cache(cfg, batch=2, max_len=prompt + steps + 3)
    logits, cache = step(params, cfg, jnp.asarray(tokens[:, :prompt]), cache)
    outs = [np.asarray(logits)]
    for i in range(prompt, prompt + steps):
        logits, cache = step(params, cfg, jnp.asarray(tokens[:, i:i + 1]), cache)
        outs.append(np.asarray(logits))
    assert int(cache["length"]) == prompt + steps
    np.testing.assert_allclose(np.concatenate(outs, axis=1), ref, atol=TOL, rtol=0)


def test_bfloat16_forward_close_to_float32(pair):
    _name, _model, cfg, params, rng = pair
    # Jitted, at test_full_sequence_logits' shape: its float32 program is reused, and one
    # program for bfloat16 (eager, every op would compile on its own for bfloat16).
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(2, 13)))
    fwd = jax.jit(transformer.forward, static_argnums=1)
    f32 = np.asarray(fwd(params, cfg, tokens))
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    low = np.asarray(fwd(bf16, cfg, tokens))
    assert low.dtype == np.float32 and np.isfinite(low).all()
    # bf16 keeps ~3 significant digits; the predictions must agree almost everywhere.
    assert np.abs(low - f32).max() < 0.1 * np.abs(f32).max()
    assert (low.argmax(-1) == f32.argmax(-1)).mean() >= 0.75


def test_kv_cache_overflow_is_refused(pair):
    _name, _model, cfg, params, rng = pair
    # test_kv_cache_decoding's cache and prompt shapes: its jitted step is reused.
    step = jax.jit(transformer.decode_step, static_argnums=1)
    cache = transformer.init_cache(cfg, batch=2, max_len=16)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(2, 5)))
    for _ in range(3):
        _, cache = step(params, cfg, tokens, cache)
    assert int(cache["length"]) == 15
    with pytest.raises(ValueError, match="KV cache overflow"):
        transformer.decode_step(params, cfg, tokens, cache)
    logits, _ = step(params, cfg, tokens, cache)
    assert np.isnan(np.asarray(logits)).all()
