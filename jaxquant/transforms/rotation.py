"""QuaRot-style rotation of the residual stream, folded into the weights (params -> params).

A pre-norm decoder's residual stream can be rotated by any orthogonal ``Q``
(``[hidden, hidden]``) without changing the model's function (Ashkboos et al., 2024,
"QuaRot", arXiv 2404.00456, Sec. 4; Ashkboos et al., 2024, "SliceGPT", Thm. 1), once
the RMSNorm scales are moved out of the way:

1. **Fuse the norms** (:func:`fuse_norms`): ``RMSNorm(x) = γ ⊙ x / rms(x)``, and the
   only readers of a norm's output are linear layers, so ``W ← W diag(γ)`` for every
   reader (q/k/v after ``input_layernorm``, gate/up after ``post_attention_layernorm``,
   the output head after the final ``norm``) and ``γ ← 1``. Tied embeddings are
   untied first: the head gets its own copy of the table, scaled.
2. **Rotate** (:func:`rotate_residual`): with the residual stream ``x' = x Q``, a
   unit-scale RMSNorm commutes with ``Q`` (``rms(x Q) = rms(x)``). Linear layers compute
   ``y = x W^T + b``, so a reader of the stream becomes ``W ← W Q``
   (``x' (W Q)^T = x W^T``), a writer into it (o_proj, down_proj) ``W ← Q^T W`` and
   ``b ← b Q``, the embedding table ``E ← E Q``, and the head ``W ← W Q``.

With ``Q`` a random-sign Hadamard matrix (:mod:`jaxquant.transforms.hadamard`, any
width ``K 2^m``: SmolLM2's 576 = 36 x 16), outlier channels of the stream are spread
over all channels, which makes the activations of the readers easier to quantize;
the float model's output is unchanged up to rounding.

Supported: the pre-norm families (``llama``, ``mistral``, ``qwen2``, ``qwen3``; q/k
norms act after the projections and are unaffected). Gemma 3 is refused: its
post-attention and post-MLP norms scale the residual writes per channel, which does
not commute with a rotation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.errors import JaxquantError
from jaxquant.formats.base import is_quantized
from jaxquant.models.config import ModelConfig
from jaxquant.params import flatten, unflatten
from jaxquant.transforms.hadamard import (
    hadamard_factorization,
    hadamard_transform,
    random_hadamard_matrix,
)

Params = dict[str, Any]
_HI = jax.lax.Precision.HIGHEST

#: Linear layers that read the residual stream (after a norm), per norm.
READERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
#: Linear layers that write into the residual stream.
_WRITERS = ("self_attn.o_proj", "mlp.down_proj")


class TransformError(JaxquantError, ValueError):
    """A transform cannot apply (unsupported family, quantized weights, missing data)."""


def check_rotatable(params: Params, cfg: ModelConfig) -> None:
    if cfg.sandwich_norm or cfg.family == "gemma3":
        raise TransformError(f"rotation needs a pre-norm decoder; {cfg.family}'s norms after "
                            "attention and MLP scale the residual writes per channel")
    if cfg.norm_offset:
        raise TransformError("rotation needs RMSNorm scales without an offset")
    for path, leaf in params.items():
        if is_quantized(leaf) or not isinstance(leaf, jax.Array | np.ndarray) or \
                not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TransformError(f"{path} is not a float array: rotate before quantizing")


def check_online_sizes(cfg: ModelConfig) -> None:
    """The online Hadamards need Hadamard matrices of these orders (:func:`fold_online`)."""
    sizes = {"head_dim": cfg.head_dim, "num_heads * head_dim": cfg.num_heads * cfg.head_dim,
             "intermediate_size": cfg.intermediate_size}
    for name, n in sizes.items():
        try:
            hadamard_factorization(n)
        except ValueError as e:
            raise TransformError(f"online Hadamard of {name} = {n}: {e}") from e


def scale_columns(w: jax.Array, gamma: jax.Array) -> jax.Array:
    """``W diag(gamma)``, computed in float32, in ``W``'s dtype."""
    return (w.astype(jnp.float32) * gamma.astype(jnp.float32)[None, :]).astype(w.dtype)


def fuse_norms(params: Params, cfg: ModelConfig) -> tuple[Params, ModelConfig]:
    """Moves every RMSNorm scale into the linear layers that read its output.

    Args:
      params: Float parameters (flat paths, ``docs/models.md``).
      cfg: Their model config.

    Returns:
      ``(params, cfg)``: norm weights all 1, readers ``W diag(γ)``; with tied
      embeddings, ``lm_head.weight`` is added (the scaled table) and the config says
      the embeddings are untied.

    Raises:
      TransformError: Unsupported family, or quantized parameters.
    """
    flat = flatten(params)
    out, cfg = _fuse(flat, cfg)
    return unflatten(out), cfg


def _fuse(params: Params, cfg: ModelConfig) -> tuple[Params, ModelConfig]:
    """:func:`fuse_norms` on flat paths."""
    check_rotatable(params, cfg)
    out = dict(params)
    for i in range(cfg.num_layers):
        for norm, readers in READERS.items():
            key = f"layers.{i}.{norm}.weight"
            gamma = params[key]
            for r in readers:
                w = f"layers.{i}.{r}.weight"
                out[w] = scale_columns(params[w], gamma)
            out[key] = jnp.ones_like(gamma)
    head = params["embed_tokens.weight"] if cfg.tie_word_embeddings else params["lm_head.weight"]
    out["lm_head.weight"] = scale_columns(head, params["norm.weight"])
    out["norm.weight"] = jnp.ones_like(params["norm.weight"])
    return out, dataclasses.replace(cfg, tie_word_embeddings=False)


def _mm(a: jax.Array, b: jax.Array, dtype: Any) -> jax.Array:
    return jnp.matmul(a.astype(jnp.float32), b, precision=_HI).astype(dtype)


def rotate_residual(params: Params, cfg: ModelConfig, q: jax.Array
                    ) -> tuple[Params, ModelConfig]:
    """Rotates the residual stream by the orthogonal ``q``: ``x -> x q``.

    The norms are fused first (:func:`fuse_norms`), so the result computes the same
    function as ``params`` (up to float rounding).

    Args:
      params: Float parameters.
      cfg: Their model config.
      q: ``[hidden, hidden]`` orthogonal matrix.

    Returns:
      ``(params, cfg)`` of the rotated model (embeddings untied).

    Raises:
      TransformError: Unsupported family, quantized parameters, or ``q`` not square of
        the hidden size.
    """
    h = cfg.hidden_size
    if tuple(q.shape) != (h, h):
        raise TransformError(f"rotation must be [{h}, {h}], got {tuple(q.shape)}")
    params = flatten(params)
    out, cfg = _fuse(params, cfg)
    q = jnp.asarray(q, jnp.float32)
    out["embed_tokens.weight"] = _mm(out["embed_tokens.weight"], q, params[
        "embed_tokens.weight"].dtype)
    out["lm_head.weight"] = _mm(out["lm_head.weight"], q, out["lm_head.weight"].dtype)
    for i in range(cfg.num_layers):
        for readers in READERS.values():
            for r in readers:
                w = f"layers.{i}.{r}.weight"
                out[w] = _mm(out[w], q, out[w].dtype)
        for wr in _WRITERS:
            w = f"layers.{i}.{wr}.weight"
            out[w] = _mm(q.T, out[w].astype(jnp.float32), out[w].dtype)
            b = f"layers.{i}.{wr}.bias"
            if b in out:
                out[b] = _mm(out[b][None, :], q, out[b].dtype)[0]
    return unflatten(out), cfg


def random_hadamard_rotation(params: Params, cfg: ModelConfig, key: jax.Array
                             ) -> tuple[Params, ModelConfig]:
    """:func:`rotate_residual` by a random-sign Hadamard matrix of the hidden size.

    Args:
      params: Float parameters.
      cfg: Their model config.
      key: PRNG key of the signs.

    Returns:
      ``(params, cfg)`` of the rotated model.
    """
    q = random_hadamard_matrix(cfg.hidden_size, key)
    return rotate_residual(params, cfg, np.asarray(q, np.float32))


def _had(w: jax.Array, axis: int) -> jax.Array:
    """``hadamard_transform`` along ``axis`` in float32, in ``w``'s dtype."""
    return hadamard_transform(w.astype(jnp.float32), axis=axis).astype(w.dtype)


def fold_online(params: Params, cfg: ModelConfig) -> tuple[Params, ModelConfig]:
    """Prepares the weights for QuaRot's online Hadamards (Ashkboos et al., 2024, Sec. 4).

    With ``cfg.online_hadamard`` the forward applies the normalized transform
    ``T(x) = x H^T / sqrt(n)`` (orthogonal, :func:`~jaxquant.transforms.hadamard.
    hadamard_transform`) to

    * the down_proj input (``n`` = intermediate size): ``W_down ← T(W_down)`` along its
      input axis, so ``T(x) T(W)^T = x W^T``;
    * queries and keys after RoPE, over ``head_dim``, when the KV cache is quantized
      (``cfg.kv_bits``): ``T(q) T(k)^T = q k^T``, nothing to fold; the rotated keys
      are what the quantized cache stores (without one the scores are the same, so
      the forward skips these two transforms);
    * the o_proj input, across all heads (``n = heads * head_dim``; SmolLM2: 9 x 64 = 576
      = 36 x 16, which has no Kronecker split into a Hadamard over 9 heads):
      ``W_o ← T(W_o)``.

    Offline, values are rotated per head over ``head_dim`` (``v_proj`` rows of each
    head ``← T_d`` applied from the left, o_proj columns of each head ``← T_d``), so a
    quantized V cache stores rotated values too. The float function is unchanged.

    Args:
      params: Float parameters (rotated or not; any pre-norm family).
      cfg: Their model config (``online_hadamard`` must be off).

    Returns:
      ``(params, cfg)`` with ``cfg.online_hadamard = True``.

    Raises:
      TransformError: Unsupported family, quantized weights, sizes without a Hadamard
        matrix, or the online Hadamards already folded.
    """
    if cfg.online_hadamard:
        raise TransformError("the online Hadamards are already folded into these weights")
    flat = flatten(params)
    check_rotatable(flat, cfg)
    check_online_sizes(cfg)
    out = dict(flat)
    d, heads, kv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    for i in range(cfg.num_layers):
        pre = f"layers.{i}."
        down = pre + "mlp.down_proj.weight"
        out[down] = _had(flat[down], -1)
        v = pre + "self_attn.v_proj.weight"
        w = flat[v]
        out[v] = _had(w.reshape(kv, d, w.shape[1]), 1).reshape(w.shape)
        if pre + "self_attn.v_proj.bias" in flat:
            b = flat[pre + "self_attn.v_proj.bias"]
            out[pre + "self_attn.v_proj.bias"] = _had(b.reshape(kv, d), -1).reshape(b.shape)
        o = pre + "self_attn.o_proj.weight"
        w = flat[o]
        w = _had(w.reshape(w.shape[0], heads, d), -1).reshape(w.shape)
        out[o] = _had(w, -1)
    return unflatten(out), dataclasses.replace(cfg, online_hadamard=True)
