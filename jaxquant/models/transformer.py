"""Decoder-only language models (Flax NNX) and their pure functional interface.

Two block layouts cover the supported families:

* :class:`LlamaBlock` (Llama 1/2/3, Mistral, Qwen2/2.5, Qwen3): pre-norm attention
  and gated MLP; Qwen2 adds q/k/v biases, Qwen3 q/k RMSNorm, Mistral a sliding
  window.
* :class:`Gemma3Block`: pre- and post-norms around attention and MLP, q/k norms,
  RMSNorm weights around zero, gelu-tanh, and alternating sliding-window / global
  layers with their own RoPE bases.

Parameters form a plain nested dict (``params``) whose paths mirror the Hugging Face
names without the ``model.`` prefix, e.g. ``layers.0.self_attn.q_proj.weight``
(``docs/models.md`` lists them). :func:`forward` and :func:`decode_step` are pure
functions of ``params`` that merge them into the NNX module graph inside ``jit``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant.models.config import ModelConfig
from jaxquant.models.layers import MLP, Attention, Embed, Linear, RMSNorm, kv_code_width

Params = dict[str, Any]
Cache = dict[str, Any]


class LlamaBlock(nnx.Module):
    """``x + attn(norm(x))`` then ``x + mlp(norm(x))`` (Touvron et al., 2023)."""

    def __init__(self, cfg: ModelConfig, layer: int, *, dtype: Any, rngs: nnx.Rngs):
        norm = functools.partial(RMSNorm, cfg.hidden_size, eps=cfg.rms_norm_eps,
                                 offset=cfg.norm_offset, dtype=dtype)
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, layer, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = norm()
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, cache: Cache | None,
                 length: jax.Array | None) -> tuple[jax.Array, Cache | None]:
        h, cache = self.self_attn(self.input_layernorm(x), positions, cache, length)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class Gemma3Block(nnx.Module):
    """Gemma 3 block: ``x + post(attn(pre(x)))`` then ``x + post(mlp(pre(x)))``."""

    def __init__(self, cfg: ModelConfig, layer: int, *, dtype: Any, rngs: nnx.Rngs):
        norm = functools.partial(RMSNorm, cfg.hidden_size, eps=cfg.rms_norm_eps,
                                 offset=cfg.norm_offset, dtype=dtype)
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, layer, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)
        self.post_feedforward_layernorm = norm()

    def __call__(self, x: jax.Array, positions: jax.Array, cache: Cache | None,
                 length: jax.Array | None) -> tuple[jax.Array, Cache | None]:
        h, cache = self.self_attn(self.input_layernorm(x), positions, cache, length)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h), cache


_BLOCKS = {"gemma3": Gemma3Block}


class CausalLM(nnx.Module):
    """A decoder-only causal language model of any supported family."""

    def __init__(self, cfg: ModelConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, scale=cfg.embed_scale,
                                  dtype=dtype, rngs=rngs)
        block = _BLOCKS.get(cfg.family, LlamaBlock)
        self.layers = nnx.List([block(cfg, i, dtype=dtype, rngs=rngs)
                                for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, offset=cfg.norm_offset,
                            dtype=dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, rngs=rngs)

    def hidden_states(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                      cache: Cache | None = None) -> tuple[jax.Array, Cache | None]:
        """Final normed hidden states ``[B, T, hidden]`` (and the updated cache)."""
        b, t = tokens.shape
        length = None if cache is None else cache["length"]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            if length is not None:
                positions = positions + length
        dtype = self.norm.weight.get_value().dtype
        x = self.embed_tokens(tokens, dtype)
        new_layers = []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache["layers"][i]
            x, layer_cache = layer(x, positions, layer_cache, length)
            new_layers.append(layer_cache)
        new_cache = None if cache is None else {"length": length + t, "layers": new_layers}
        return self.norm(x), new_cache

    def logits(self, h: jax.Array) -> jax.Array:
        """Output logits for hidden states ``h`` (float32, soft-capped if configured)."""
        out = self.embed_tokens.attend(h) if self.lm_head is None else self.lm_head(h)
        out = out.astype(jnp.float32)
        cap = self.config.final_logit_softcap
        if cap:
            out = cap * jnp.tanh(out / cap)
        return out

    def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                 cache: Cache | None = None) -> tuple[jax.Array, Cache | None]:
        h, new_cache = self.hidden_states(tokens, positions=positions, cache=cache)
        logits = self.logits(h)
        if cache is not None:
            # Writing past the cache would silently overwrite its last slots: poison the
            # logits instead, so the overflow cannot pass unnoticed under jit.
            max_len = cache["layers"][0]["k"].shape[1] if cache["layers"] else 0
            overflow = cache["length"] + tokens.shape[1] > max_len
            logits = jnp.where(overflow, jnp.nan, logits)
        return logits, new_cache


# ----------------------------------------------------------------------------------------
# Pure functional interface over plain parameter dicts.


@functools.lru_cache(maxsize=32)
def _graphdef(cfg: ModelConfig) -> nnx.GraphDef:
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)[0]


def bind(params: Params, cfg: ModelConfig) -> CausalLM:
    """The NNX module holding ``params`` (cheap; use inside ``jit``)."""
    return nnx.merge(_graphdef(cfg), params)


def abstract_params(cfg: ModelConfig, dtype: Any = jnp.float32) -> Params:
    """Parameter tree of ``jax.ShapeDtypeStruct`` for ``cfg`` (no memory allocated)."""
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(abstract))


def init_params(cfg: ModelConfig, *, seed: int = 0, dtype: Any = jnp.float32) -> Params:
    """Random parameters (normal(0, 0.02) weights, unit norms) for tests and benchmarks."""
    model = CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
    return nnx.to_pure_dict(nnx.state(model))


def forward(params: Params, cfg: ModelConfig, tokens: jax.Array,
            positions: jax.Array | None = None) -> jax.Array:
    """Logits of a full-sequence causal forward pass.

    Args:
      params: Parameter pytree (float or quantized weights).
      cfg: Model config (static under ``jit``).
      tokens: Token ids ``[B, T]``.
      positions: Positions ``[B, T]`` (default ``0..T-1``).

    Returns:
      Logits ``[B, T, vocab]`` in float32.
    """
    return bind(params, cfg)(tokens, positions=positions)[0]


def hidden_states(params: Params, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Final normed hidden states ``[B, T, hidden]``."""
    return bind(params, cfg).hidden_states(tokens)[0]


def logits_from_hidden(params: Params, cfg: ModelConfig, h: jax.Array) -> jax.Array:
    """Output logits for hidden states (the ``lm_head``), float32."""
    return bind(params, cfg).logits(h)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> Cache:
    """An empty KV cache for ``batch`` sequences of up to ``max_len`` tokens.

    Args:
      cfg: Model config.
      batch: Number of sequences decoded together.
      max_len: Capacity in tokens (prompt plus generated).
      dtype: Dtype of the cached keys and values.

    Returns:
      ``{"length": int32 scalar, "layers": [{"k", "v"}: [batch, max_len, kv_heads, head_dim]]}``;
      with ``cfg.kv_bits`` the keys and values are uint8 codes (two per byte up to 4
      bits) with ``k_scale``, ``k_offset``, ``v_scale``, ``v_offset`` of
      ``[batch, max_len, kv_heads, 1]`` in ``dtype``.
    """
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    if cfg.kv_bits:
        codes = (*shape[:-1], kv_code_width(cfg.head_dim, cfg.kv_bits))
        one = {name: jnp.zeros(codes, jnp.uint8) for name in ("k", "v")}
        one |= {f"{n}_{p}": jnp.zeros((*shape[:-1], 1), dtype)
                for n in ("k", "v") for p in ("scale", "offset")}
        return {"length": jnp.zeros((), jnp.int32),
                "layers": [dict(one) for _ in range(cfg.num_layers)]}
    layers = [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
              for _ in range(cfg.num_layers)]
    return {"length": jnp.zeros((), jnp.int32), "layers": layers}


def decode_step(params: Params, cfg: ModelConfig, tokens: jax.Array,
                cache: Cache) -> tuple[jax.Array, Cache]:
    """Feeds ``tokens [B, T]`` after the cached ones; returns logits and the new cache.

    Use ``T > 1`` for the prompt (prefill) and ``T = 1`` per generated token.

    Args:
      params: Parameter pytree (float or quantized).
      cfg: Model config.
      tokens: Token ids ``[B, T]``.
      cache: From :func:`init_cache` or a previous step.

    Returns:
      Logits ``[B, T, vocab]`` (float32) and the updated cache. If the tokens do not fit
      (``length + T > max_len``) the logits are NaN; outside ``jit`` this raises.

    Raises:
      ValueError: the tokens do not fit in the cache (when the length is concrete).
    """
    length = cache["length"]
    if not isinstance(length, jax.core.Tracer):
        max_len = cache["layers"][0]["k"].shape[1] if cache["layers"] else 0
        if int(length) + tokens.shape[1] > max_len:
            raise ValueError(f"KV cache overflow: {int(length)} cached + {tokens.shape[1]} new "
                             f"tokens exceed its capacity of {max_len}")
    return bind(params, cfg)(tokens, cache=cache)


# ----------------------------------------------------------------------------------------
# Block-level pieces for calibration (layer-by-layer quantization).


@functools.lru_cache(maxsize=512)
def _block_graphdef(cfg: ModelConfig, layer: int) -> nnx.GraphDef:
    block = _BLOCKS.get(cfg.family, LlamaBlock)
    abstract = nnx.eval_shape(lambda: block(cfg, layer, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)[0]


@functools.lru_cache(maxsize=512)
def canonical_layer(cfg: ModelConfig, layer: int) -> int:
    """The first block built like block ``layer`` (same attention window and RoPE).

    Block functions jitted with the layer as a static argument compile once per kind
    of block when called with this index instead of ``layer``.
    """
    key = (cfg.window(layer), cfg.rope_for(layer))
    return next(i for i in range(cfg.num_layers) if (cfg.window(i), cfg.rope_for(i)) == key)


def bind_block(block_params: Params, cfg: ModelConfig, layer: int) -> nnx.Module:
    """The NNX module of decoder block ``layer`` holding ``block_params``."""
    return nnx.merge(_block_graphdef(cfg, layer), block_params)


def embed(params: Params, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Input of the first block: (scaled) token embeddings ``[B, T, hidden]``."""
    dtype = params["norm"]["weight"].dtype
    return bind(params, cfg).embed_tokens(tokens, dtype)


def apply_block(block_params: Params, cfg: ModelConfig, layer: int, x: jax.Array) -> jax.Array:
    """Output of decoder block ``layer`` for its input ``x [B, T, hidden]`` (no cache)."""
    b, t, _ = x.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return bind_block(block_params, cfg, layer)(x, positions, None, None)[0]
