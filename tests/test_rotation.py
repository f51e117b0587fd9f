"""Residual-stream rotation folded into the weights leaves the float model unchanged."""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.models.config import ModelConfig
from jaxquant.models.transformer import forward, init_params
from jaxquant.params import flatten, unflatten
from jaxquant.transforms.rotation import (
    TransformError,
    fuse_norms,
    random_hadamard_rotation,
    rotate_residual,
)


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


def _model(family: str, *, hidden: int, tie: bool, seed: int, kv_heads: int = 2):
    """A tiny random model whose norm scales and biases are not trivial."""
    cfg = ModelConfig(family=family, vocab_size=97, hidden_size=hidden,
                      intermediate_size=2 * hidden + 4, num_layers=2, num_heads=4,
                      num_kv_heads=kv_heads, head_dim=hidden // 4, rms_norm_eps=1e-5,
                      tie_word_embeddings=tie, qkv_bias=family == "qwen2",
                      o_bias=family == "qwen2", qk_norm=family == "qwen3")
    flat = flatten(init_params(cfg, seed=seed))
    rng = np.random.default_rng(seed)
    for path, leaf in flat.items():
        if path.endswith("norm.weight") or path.endswith(".bias"):
            flat[path] = jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
    return cfg, unflatten(flat)


def _outliers(params, cols=(3, 17), factor=30.0):
    """Plants outlier channels in the residual stream, as real LLMs have."""
    flat = flatten(params)
    emb = np.asarray(flat["embed_tokens.weight"]).copy()
    emb[:, list(cols)] *= factor
    flat["embed_tokens.weight"] = jnp.asarray(emb)
    return unflatten(flat)


# Hidden sizes 48 = 12 * 4 and 64 = 2^6 (Hadamard of both kinds).
CASES = [("llama", 48, True), ("llama", 64, False), ("qwen2", 48, False), ("qwen3", 64, True)]


@pytest.mark.parametrize("family,hidden,tie", CASES)
def test_rotation_keeps_logits(family, hidden, tie):
    seed = _seed(family, hidden, tie)
    cfg, params = _model(family, hidden=hidden, tie=tie, seed=seed % 1000)
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, 97, (2, 11)))
    ref = forward(params, cfg, tokens)
    fused, fcfg = fuse_norms(params, cfg)
    assert not fcfg.tie_word_embeddings
    np.testing.assert_allclose(np.asarray(forward(fused, fcfg, tokens)), np.asarray(ref),
                               rtol=1e-4, atol=1e-4)
    rot, rcfg = random_hadamard_rotation(params, cfg, jax.random.key(seed % 97))
    out = np.asarray(forward(rot, rcfg, tokens))
    np.testing.assert_allclose(out, np.asarray(ref), rtol=1e-4, atol=1e-4)
    flat, rflat = flatten(params), flatten(rot)
    # Really rotated: the embeddings moved, norms are all ones, shapes kept.
    assert not np.allclose(np.asarray(rflat["embed_tokens.weight"]),
                           np.asarray(flat["embed_tokens.weight"]), atol=1e-3)
    assert all(np.all(np.asarray(v) == 1) for p, v in rflat.items()
               if p.endswith("layernorm.weight") or p == "norm.weight")
    assert all(rflat[p].shape == v.shape for p, v in flat.items())
    # Any orthogonal matrix works, e.g. a random one from a QR factorization.
    q, _ = np.linalg.qr(np.random.default_rng(seed + 1).standard_normal((hidden, hidden)))
    rot2, rcfg2 = rotate_residual(params, cfg, q.astype(np.float32))
    np.testing.assert_allclose(np.asarray(forward(rot2, rcfg2, tokens)), np.asarray(ref),
                               rtol=1e-4, atol=1e-4)


def test_rotation_refuses_what_it_cannot_rotate():
    cfg, params = _model("llama", hidden=48, tie=False, seed=3)
    with pytest.raises(TransformError, match="48, 48"):
        rotate_residual(params, cfg, np.eye(40, dtype=np.float32))
    with pytest.raises(TransformError, match="pre-norm"):
        fuse_norms(params, dataclasses.replace(cfg, family="gemma3", sandwich_norm=True))
    flat = flatten(params)
    flat["layers.0.mlp.up_proj.weight"] = jnp.zeros((2, 2), jnp.int8)
    with pytest.raises(TransformError, match="up_proj"):
        fuse_norms(unflatten(flat), cfg)
    from jaxquant.algorithms.rtn import rtn

    flat = flatten(params)
    flat["layers.1.self_attn.q_proj.weight"] = rtn(flat["layers.1.self_attn.q_proj.weight"],
                                                   bits=4, group_size=16)
    with pytest.raises(TransformError, match="before quantizing"):
        rotate_residual(unflatten(flat), cfg, np.eye(48, dtype=np.float32))
