"""Building blocks shared by every decoder family (Flax NNX).

Parameters are ``nnx.Param`` leaves named as in Hugging Face checkpoints
(``weight``, ``bias``), so a model's parameter pytree has paths such as
``layers.3.self_attn.q_proj.weight`` (see ``docs/models.md``). Every linear layer
calls :func:`jaxquant.ops.linear`, the single matmul entry point that quantized
formats and Pallas kernels hook into.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant import ops
from jaxquant.algorithms import act_quant
from jaxquant.algorithms.act_quant import ActQuantConfig
from jaxquant.models.config import ModelConfig, RopeConfig
from jaxquant.transforms.hadamard import hadamard_transform

_NEG_INF = -2.3819763e38  # large finite negative, as masked logits (avoids NaN rows)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    return (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """``y = x W^T + b`` with ``W`` of shape ``[out_features, in_features]``.

    With ``act`` the input is quantized per token first (W8A8 / W4A4, see
    :func:`jaxquant.ops.linear`); calibration records the float input.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype: Any,
                 rngs: nnx.Rngs, act: ActQuantConfig | None = None):
        self.weight = nnx.Param(_normal(rngs, (out_features, in_features), dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        if ops.capturing_inputs():  # calibration: record statistics of this layer's inputs
            xf = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
            if ops.capture_gram():
                gram = jnp.matmul(xf.T, xf, precision=jax.lax.Precision.HIGHEST)
                self.sow(nnx.Intermediate, "input_gram", gram)
            self.sow(nnx.Intermediate, "input_absmax", jnp.abs(xf).max(axis=0))
            if stride := ops.capture_sample_stride():
                self.sow(nnx.Intermediate, "input_sample", xf[::stride])
        bias = None if self.bias is None else self.bias.get_value()
        return ops.linear(x, self.weight.get_value(), bias, act=self.act)


class Embed(nnx.Module):
    """Token embedding table ``[vocab, hidden]``, optionally scaled (Gemma)."""

    def __init__(self, vocab: int, hidden: int, *, scale: float, dtype: Any, rngs: nnx.Rngs):
        self.weight = nnx.Param(_normal(rngs, (vocab, hidden), dtype))
        self.scale = scale

    def __call__(self, ids: jax.Array, dtype: Any) -> jax.Array:
        x = ops.embedding_lookup(self.weight.get_value(), ids, dtype)
        if self.scale != 1.0:
            x = x * jnp.asarray(self.scale, dtype)
        return x

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits against the embedding table (tied ``lm_head``)."""
        return ops.linear(x, self.weight.get_value())


class RMSNorm(nnx.Module):
    """RMSNorm (Zhang & Sennrich, 2019, eq. 4), computed in float32.

    ``y = x / sqrt(mean(x^2) + eps) * (offset + w)``; Gemma stores ``w`` around zero
    (``offset = 1``) and multiplies before casting back, Llama casts then multiplies.
    """

    def __init__(self, dim: int, *, eps: float, offset: float, dtype: Any):
        init = jnp.zeros if offset else jnp.ones
        self.weight = nnx.Param(init((dim,), dtype))
        self.eps = eps
        self.offset = offset

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        w = self.weight.get_value()
        if self.offset:
            return (xf * (self.offset + w.astype(jnp.float32))).astype(x.dtype)
        return w.astype(x.dtype) * xf.astype(x.dtype)


def rope_inv_freq(rope: RopeConfig, dim: int) -> np.ndarray:
    """Inverse frequencies of RoPE (Su et al., 2021, eq. 15), with Llama 3 / linear scaling.

    Computed in float32 as transformers does, so positions match it to the bit.
    """
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv = (np.float32(1.0) / (np.float32(rope.theta) ** exps)).astype(np.float32)
    if rope.rope_type == "linear":
        inv = inv / np.float32(rope.factor)
    elif rope.rope_type == "llama3":
        old = rope.original_max_position_embeddings
        low_wavelen = old / rope.low_freq_factor
        high_wavelen = old / rope.high_freq_factor
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: Any) -> jax.Array:
    """Rotates ``x [B, T, heads, D]`` by ``positions [B, T]`` (half-split layout, as HF)."""
    inv = jnp.asarray(np.asarray(inv_freq, np.float32))
    angles = positions.astype(jnp.float32)[..., None] * inv  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
    sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_pos: jax.Array,
              k_pos: jax.Array, k_valid: jax.Array | None, scale: float,
              window: int | None, softcap: float | None) -> jax.Array:
    """Causal grouped-query attention (Vaswani et al., 2017, eq. 1; Ainslie et al., 2023).

    Args:
      q: Queries ``[B, T, H, D]``.
      k: Keys ``[B, S, KV, D]`` with ``H % KV == 0``.
      v: Values ``[B, S, KV, D]``.
      q_pos: Query positions ``[B, T]``.
      k_pos: Key positions ``[B, S]``.
      k_valid: Optional ``[B, S]`` mask of filled key slots (KV cache).
      scale: Logit scale.
      window: Sliding window: key ``j`` is visible from query ``i`` iff ``i - j < window``.
      softcap: Optional tanh soft-cap of the logits.

    Returns:
      ``[B, T, H * D]``.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, h // kv, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32,
                        precision=ops._precision(q.dtype)) * scale
    if softcap:
        logits = softcap * jnp.tanh(logits / softcap)
    mask = k_pos[:, None, :] <= q_pos[:, :, None]  # [B, T, S]
    if window:
        mask &= k_pos[:, None, :] > q_pos[:, :, None] - window
    if k_valid is not None:
        mask &= k_valid[:, None, :]
    logits = jnp.where(mask[:, None, None], logits, _NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, precision=ops._precision(v.dtype))
    return out.reshape(b, t, h * d)


# --- KV cache ---------------------------------------------------------------------------
# A float cache is ``{"k", "v"}`` of ``[B, S, KV, D]``. A quantized cache (``kv_bits``)
# holds uint8 codes, two per byte when ``kv_bits <= 4`` (``[B, S, KV, D / 2]``: even
# channels in the low nibble), and per token and head a scale and an offset
# (``k_scale``, ``k_offset``, ... of ``[B, S, KV, 1]`` in the cache dtype).


def fake_quant_kv(x: jax.Array, bits: int) -> jax.Array:
    """K or V ``[B, T, KV, D]`` quantized per token and head, then dequantized."""
    codes, scale, offset = act_quant.quantize_kv(x, bits)
    return act_quant.dequantize_kv(codes, scale, offset, dtype=x.dtype)


def kv_code_width(head_dim: int, bits: int | None) -> int:
    """Bytes of codes per token and head: two codes per byte up to 4 bits."""
    return head_dim // 2 if bits is not None and bits <= 4 else head_dim


def _pack_nibbles(codes: jax.Array) -> jax.Array:
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _unpack_nibbles(packed: jax.Array) -> jax.Array:
    lo, hi = packed & 0xF, packed >> 4
    return jnp.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def write_cache(cache: dict[str, jax.Array], k: jax.Array, v: jax.Array, start: jax.Array,
                bits: int | None) -> dict[str, jax.Array]:
    """Writes this step's keys and values at slots ``start .. start + T - 1``."""
    new = {"k": k, "v": v}
    if bits:
        new = {}
        for name, x in (("k", k), ("v", v)):
            codes, scale, offset = act_quant.quantize_kv(x, bits)
            new[name] = _pack_nibbles(codes) if bits <= 4 else codes
            new[name + "_scale"], new[name + "_offset"] = scale, offset
    return {name: jax.lax.dynamic_update_slice(cache[name], x.astype(cache[name].dtype),
                                               (0, start, 0, 0))
            for name, x in new.items()}


def read_cache(cache: dict[str, jax.Array], bits: int | None, dtype: Any
               ) -> tuple[jax.Array, jax.Array]:
    """All cached keys and values ``[B, S, KV, D]`` in ``dtype`` (dequantized)."""
    if not bits:
        return cache["k"].astype(dtype), cache["v"].astype(dtype)
    out = []
    for name in ("k", "v"):
        codes = _unpack_nibbles(cache[name]) if bits <= 4 else cache[name]
        out.append(act_quant.dequantize_kv(codes, cache[name + "_scale"].astype(jnp.float32),
                                           cache[name + "_offset"].astype(jnp.float32),
                                           dtype=dtype))
    return out[0], out[1]


class Attention(nnx.Module):
    """Multi-head self-attention with GQA, RoPE, optional biases and q/k norms."""

    def __init__(self, cfg: ModelConfig, layer: int, *, dtype: Any, rngs: nnx.Rngs):
        h, d, act = cfg.hidden_size, cfg.head_dim, cfg.act_quant
        self.q_proj = Linear(h, cfg.num_heads * d, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs,
                             act=act)
        self.k_proj = Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs,
                             act=act)
        self.v_proj = Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs,
                             act=act)
        self.o_proj = Linear(cfg.num_heads * d, h, bias=cfg.o_bias, dtype=dtype, rngs=rngs,
                             act=act)
        self.online_hadamard = cfg.online_hadamard
        self.kv_bits = cfg.kv_bits
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, eps=cfg.rms_norm_eps, offset=cfg.norm_offset, dtype=dtype)
            self.k_norm = RMSNorm(d, eps=cfg.rms_norm_eps, offset=cfg.norm_offset, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.scale = cfg.scale
        self.window = cfg.window(layer)
        self.softcap = cfg.attn_logit_softcap
        # A tuple keeps the module's static data hashable; float32 -> float is exact.
        self.inv_freq = tuple(float(f) for f in rope_inv_freq(cfg.rope_for(layer), d))

    def __call__(self, x: jax.Array, positions: jax.Array, cache: dict[str, jax.Array] | None,
                 length: jax.Array | None = None) -> tuple[jax.Array, dict | None]:
        """Attends ``x [B, T, hidden]`` at ``positions [B, T]``.

        With a KV cache (``{"k", "v"}`` of ``[B, S, KV, D]``), writes this step's keys and
        values at slots ``length .. length + T - 1`` and attends to all filled slots.
        """
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, positions, self.inv_freq)
        k = apply_rope(k, positions, self.inv_freq)
        if self.online_hadamard and self.kv_bits:
            # (q H)(k H)^T = q k^T: rotated keys quantize better. Without a quantized
            # cache the scores are the same either way, so no transform is run.
            q, k = hadamard_transform(q), hadamard_transform(k)
        if cache is None:
            if self.kv_bits:  # no cache to store: quantize and dequantize in place
                k, v = fake_quant_kv(k, self.kv_bits), fake_quant_kv(v, self.kv_bits)
            out = attention(q, k, v, q_pos=positions, k_pos=positions, k_valid=None,
                            scale=self.scale, window=self.window, softcap=self.softcap)
        else:
            cache = write_cache(cache, k, v, length, self.kv_bits)
            ck, cv = read_cache(cache, self.kv_bits, q.dtype)
            s = ck.shape[1]
            k_pos = jnp.broadcast_to(jnp.arange(s, dtype=positions.dtype), (b, s))
            valid = k_pos < length + t
            out = attention(q, ck, cv, q_pos=positions, k_pos=k_pos, k_valid=valid,
                            scale=self.scale, window=self.window, softcap=self.softcap)
        if self.online_hadamard:  # across all heads; o_proj's weight holds W H^T
            out = hadamard_transform(out)
        return self.o_proj(out), cache


class MLP(nnx.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))`` (Shazeer, 2020, "GLU Variants", eq. 6)."""

    def __init__(self, cfg: ModelConfig, *, dtype: Any, rngs: nnx.Rngs):
        h, f, bias, act = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, cfg.act_quant
        self.gate_proj = Linear(h, f, bias=bias, dtype=dtype, rngs=rngs, act=act)
        self.up_proj = Linear(h, f, bias=bias, dtype=dtype, rngs=rngs, act=act)
        self.down_proj = Linear(f, h, bias=bias, dtype=dtype, rngs=rngs, act=act)
        self.activation = cfg.activation
        self.online_hadamard = cfg.online_hadamard

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = self.gate_proj(x)
        if self.activation == "silu":
            gate = jax.nn.silu(gate)
        else:
            gate = jax.nn.gelu(gate, approximate=True)
        h = gate * self.up_proj(x)
        if self.online_hadamard:  # QuaRot's online rotation; down_proj holds W H^T
            h = hadamard_transform(h)
        return self.down_proj(h)
