"""Model configuration: one frozen dataclass for every supported decoder family.

A :class:`ModelConfig` is built from a Hugging Face ``config.json`` dict with
:func:`from_hf_config` (both the transformers 4 spelling, ``rope_theta`` /
``rope_scaling``, and the transformers 5 spelling, ``rope_parameters``, are read),
and is stored as JSON in jaxquant checkpoints (:meth:`ModelConfig.to_dict`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from jaxquant.algorithms.act_quant import ActQuantConfig
from jaxquant.errors import ConfigError

#: Families and the Hugging Face ``model_type`` values that map to them.
FAMILIES: dict[str, str] = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}

#: Layer attention kinds.
FULL = "full_attention"
SLIDING = "sliding_attention"

_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """Rotary position embedding parameters (Su et al., 2021, "RoFormer", eq. 34).

    Attributes mirror transformers' ``rope_parameters``.
    """

    theta: float = 10000.0  # base of the inverse frequencies
    rope_type: str = "default"  # "default" | "linear" | "llama3"
    factor: float = 1.0  # position scaling factor ("linear", "llama3")
    low_freq_factor: float = 1.0  # llama3: low-frequency wavelength divisor
    high_freq_factor: float = 4.0  # llama3: high-frequency wavelength divisor
    original_max_position_embeddings: int = 8192  # llama3: pre-extension context


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a decoder-only transformer.

    The family selects the block layout (``"gemma3"``: sandwich norms and scaled
    embeddings; all others: the Llama block); the remaining fields switch the
    smaller differences between families on and off.
    """

    family: str  # "llama" | "mistral" | "qwen2" | "qwen3" | "gemma3"
    vocab_size: int  # rows of the embedding table
    hidden_size: int  # residual stream width
    intermediate_size: int  # MLP inner width
    num_layers: int  # number of decoder blocks
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (grouped-query attention when < num_heads)
    head_dim: int  # width of one attention head
    rms_norm_eps: float = 1e-6  # epsilon inside every RMSNorm
    rope: RopeConfig = RopeConfig()  # RoPE of full-attention layers
    local_rope: RopeConfig | None = None  # RoPE of sliding layers (None: same as rope)
    layer_types: tuple[str, ...] = ()  # FULL or SLIDING per layer (empty: all FULL)
    sliding_window: int | None = None  # window of SLIDING layers, in tokens
    tie_word_embeddings: bool = False  # lm_head shares the embedding table
    qkv_bias: bool = False  # q/k/v projections have biases (Qwen2, Llama option)
    o_bias: bool = False  # output projection has a bias (Llama option)
    mlp_bias: bool = False  # MLP projections have biases (Llama option)
    qk_norm: bool = False  # RMSNorm over head_dim on queries and keys (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # RMSNorm multiplies by (offset + weight); Gemma: 1.0
    sandwich_norm: bool = False  # extra norms after attention and MLP (Gemma 3)
    embed_scale: float = 1.0  # embeddings are multiplied by this (Gemma: sqrt(hidden))
    activation: str = "silu"  # MLP gate activation: "silu" | "gelu_tanh"
    query_scale: float = 0.0  # attention logit scale (0: 1/sqrt(head_dim))
    attn_logit_softcap: float | None = None  # tanh soft-cap of attention logits
    final_logit_softcap: float | None = None  # tanh soft-cap of output logits
    max_position_embeddings: int = 2048  # context the model was trained for
    bos_token_id: int | None = None  # beginning-of-sequence token
    eos_token_id: int | None = None  # end-of-sequence token
    # Run-time quantization and rotation of activations (set by jaxquant's transforms and
    # ``quantize --act-bits/--kv-bits``, not by Hugging Face configs):
    act_quant: ActQuantConfig | None = None  # inputs of every block linear, per token
    kv_bits: int | None = None  # K/V quantized per token and head, asymmetric (None: float)
    online_hadamard: bool = False  # Hadamards at run time: o_proj/down_proj inputs, q and k

    def __post_init__(self) -> None:
        if self.family not in set(FAMILIES.values()):
            raise ConfigError(f"unknown family {self.family!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        for kind in self.layer_types:
            if kind not in (FULL, SLIDING):
                raise ConfigError(f"unknown layer type {kind!r} (expected {FULL} or {SLIDING})")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ConfigError("sliding-attention layers need a positive sliding_window")
        if self.activation not in ("silu", "gelu_tanh"):
            raise ConfigError(f"unsupported activation {self.activation!r}")
        if self.act_quant is not None and not isinstance(self.act_quant, ActQuantConfig):
            raise ConfigError(f"act_quant must be an ActQuantConfig, got {self.act_quant!r}")
        if self.act_quant is not None and not self.act_quant.dynamic:
            raise ConfigError("the model quantizes activations per token at run time: "
                              "static per-tensor scales are not supported in the forward")
        if self.kv_bits is not None and (isinstance(self.kv_bits, bool)
                                         or self.kv_bits not in range(2, 9)):
            raise ConfigError(f"kv_bits must be an integer from 2 to 8, got {self.kv_bits!r}")
        if self.online_hadamard and self.sandwich_norm:
            raise ConfigError("online Hadamards need a pre-norm family (not Gemma 3)")

    @property
    def scale(self) -> float:
        """Attention logit scale."""
        return self.query_scale or 1.0 / math.sqrt(self.head_dim)

    def layer_type(self, i: int) -> str:
        """FULL or SLIDING for layer ``i``."""
        return self.layer_types[i] if self.layer_types else FULL

    def window(self, i: int) -> int | None:
        """Sliding window of layer ``i`` in tokens, or None for full attention."""
        return self.sliding_window if self.layer_type(i) == SLIDING else None

    def rope_for(self, i: int) -> RopeConfig:
        """RoPE parameters of layer ``i``."""
        if self.layer_type(i) == SLIDING and self.local_rope is not None:
            return self.local_rope
        return self.rope

    def num_params(self) -> int:
        """Number of parameters, counted from the shapes."""
        h, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        attn += d * (self.num_heads + 2 * self.num_kv_heads) if self.qkv_bias else 0
        attn += h if self.o_bias else 0
        attn += 2 * d if self.qk_norm else 0
        mlp = 3 * h * f + ((2 * f + h) if self.mlp_bias else 0)
        norms = h * (4 if self.sandwich_norm else 2)
        per_layer = attn + mlp + norms
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + h

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; inverse of :meth:`from_dict`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Rebuilds a config written by :meth:`to_dict`."""
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown jaxquant config fields: {sorted(unknown)}")
        try:
            for key in ("rope", "local_rope"):
                if isinstance(d.get(key), Mapping):
                    d[key] = RopeConfig(**d[key])
            d["layer_types"] = tuple(d.get("layer_types", ()))
            if isinstance(d.get("act_quant"), Mapping):
                d["act_quant"] = ActQuantConfig(**d["act_quant"])
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"invalid jaxquant model config: {e}") from e


def supported_architectures() -> str:
    """Human-readable list of supported Hugging Face ``model_type`` values."""
    return ", ".join(sorted(FAMILIES))


def _get(d: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if key not in d or d[key] is None:
        if default is ...:
            raise ConfigError(f"config.json lacks required field {key!r}")
        return default
    value = d[key]
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"config.json field {key!r} has the wrong type: {value!r}")
    return value


def _rope_from(params: Mapping[str, Any] | None, theta: float) -> RopeConfig:
    """Builds a RopeConfig from transformers' rope_scaling / rope_parameters dict."""
    if not params:
        return RopeConfig(theta=float(theta))
    if not isinstance(params, Mapping):
        raise ConfigError(f"rope parameters must be an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", theta))
    if rope_type not in _ROPE_TYPES:
        raise ConfigError(
            f"RoPE type {rope_type!r} is not supported (supported: {', '.join(_ROPE_TYPES)})")
    if rope_type == "default":
        return RopeConfig(theta=theta)
    factor = float(params.get("factor", 1.0))
    if rope_type == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=factor)
    return RopeConfig(
        theta=theta, rope_type="llama3", factor=factor,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)))


_BASE_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, rms_norm_eps=1e-6,
                      rope_theta=10000.0, tie_word_embeddings=False)
_QWEN_DEFAULTS = dict(_BASE_DEFAULTS, vocab_size=151936, intermediate_size=22016,
                      max_window_layers=28, use_sliding_window=False)

#: transformers' config-class defaults (transformers 5) for the fields jaxquant reads.
#: ``save_pretrained`` omits fields equal to these, so a config.json (notably Gemma 3's
#: nested ``text_config``) may lack them; ``tests/test_config.py`` checks this table
#: against the transformers classes.
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(_BASE_DEFAULTS, max_position_embeddings=2048),
    "mistral": dict(_BASE_DEFAULTS, intermediate_size=14336, num_key_value_heads=8,
                    sliding_window=4096, max_position_embeddings=131072),
    "qwen2": dict(_QWEN_DEFAULTS, max_position_embeddings=32768),
    "qwen3": dict(_QWEN_DEFAULTS, head_dim=128, max_position_embeddings=32768),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216,
                        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                        head_dim=256, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                        rope_local_base_freq=10000.0, sliding_window=4096,
                        query_pre_attn_scalar=256, tie_word_embeddings=True,
                        max_position_embeddings=131072),
}


def from_hf_config(hf: Mapping[str, Any]) -> ModelConfig:
    """Translates a Hugging Face ``config.json`` dict into a :class:`ModelConfig`.

    Fields the file omits are filled from transformers' defaults for its class
    (:data:`HF_DEFAULTS`).

    Args:
      hf: The parsed ``config.json`` (transformers 4 or 5 spelling).

    Returns:
      The model config.

    Raises:
      ConfigError: unknown architecture (the message lists the supported ones), or a
        missing / mistyped field.
    """
    if not isinstance(hf, Mapping):
        raise ConfigError("config.json must hold a JSON object")
    try:
        return _from_hf_config(hf)
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"config.json has an invalid value: {e}") from e


def _from_hf_config(hf: Mapping[str, Any]) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        arch = model_type or (hf.get("architectures") or ["<none>"])[0]
        raise ConfigError(
            f"unsupported architecture {arch!r}; supported model_type values: "
            f"{supported_architectures()}")
    if model_type == "gemma3" and isinstance(hf.get("text_config"), Mapping):
        hf = {**hf["text_config"], "model_type": "gemma3_text"}
        model_type = "gemma3_text"
    hf = {**HF_DEFAULTS[model_type], **hf}
    family = FAMILIES[model_type]
    hidden = _get(hf, "hidden_size", int)
    heads = _get(hf, "num_attention_heads", int)
    kv_heads = _get(hf, "num_key_value_heads", int, heads)
    if heads <= 0:
        raise ConfigError(f"num_attention_heads must be positive, got {heads}")
    head_dim = _get(hf, "head_dim", int, hidden // heads)
    layers = _get(hf, "num_hidden_layers", int)
    gemma = family == "gemma3"

    rope_params = hf.get("rope_parameters")
    theta = float(_get(hf, "rope_theta", (int, float), 1_000_000.0 if gemma else 10000.0))
    local_rope = None
    if gemma:
        local_theta = float(_get(hf, "rope_local_base_freq", (int, float), 10000.0))
        if isinstance(rope_params, Mapping) and "full_attention" in rope_params:
            rope = _rope_from(rope_params["full_attention"], theta)
            local_rope = _rope_from(rope_params.get("sliding_attention"), local_theta)
        else:
            rope = _rope_from(rope_params or hf.get("rope_scaling"), theta)
            local_rope = RopeConfig(theta=local_theta)
    else:
        rope = _rope_from(rope_params or hf.get("rope_scaling"), theta)

    sliding_window = _get(hf, "sliding_window", int, None)
    layer_types = hf.get("layer_types")
    if layer_types is None:
        if gemma:
            pattern = int(hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6)))
            layer_types = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(layers)]
        elif family == "mistral" and sliding_window:
            layer_types = [SLIDING] * layers
        elif family in ("qwen2", "qwen3") and hf.get("use_sliding_window") and sliding_window:
            start = int(hf.get("max_window_layers", layers))
            layer_types = [SLIDING if i >= start else FULL for i in range(layers)]
        else:
            layer_types = [FULL] * layers
    if not isinstance(layer_types, (list, tuple)):
        raise ConfigError(f"config.json field 'layer_types' must be a list, got {layer_types!r}")
    if SLIDING not in layer_types:
        sliding_window = None

    act = hf.get("hidden_activation") or hf.get("hidden_act") or (
        "gelu_pytorch_tanh" if gemma else "silu")
    activations = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                   "gelu_tanh": "gelu_tanh"}
    if act not in activations:
        raise ConfigError(f"unsupported hidden activation {act!r}")

    # q/k/v/o biases as transformers builds them: Qwen2 always has q/k/v biases and no
    # o bias; Mistral has none; Llama, Qwen3 and Gemma 3 put attention_bias on all four.
    attention_bias = bool(hf.get("attention_bias", False)) and family != "mistral"
    qkv_bias = family == "qwen2" or attention_bias
    o_bias = attention_bias and family != "qwen2"
    query_scale = 0.0
    if gemma:
        query_scale = float(_get(hf, "query_pre_attn_scalar", (int, float), head_dim)) ** -0.5

    def _token(key: str) -> int | None:
        value = hf.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        return value if isinstance(value, int) else None

    return ModelConfig(
        family=family,
        vocab_size=_get(hf, "vocab_size", int),
        hidden_size=hidden,
        intermediate_size=_get(hf, "intermediate_size", int),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(_get(hf, "rms_norm_eps", (int, float), 1e-6)),
        rope=rope,
        local_rope=local_rope,
        layer_types=tuple(layer_types),
        sliding_window=sliding_window,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=family in ("qwen3", "gemma3"),
        norm_offset=1.0 if gemma else 0.0,
        sandwich_norm=gemma,
        embed_scale=math.sqrt(hidden) if gemma else 1.0,
        activation=activations[act],
        query_scale=query_scale,
        attn_logit_softcap=_get(hf, "attn_logit_softcapping", (int, float), None),
        final_logit_softcap=_get(hf, "final_logit_softcapping", (int, float), None),
        max_position_embeddings=_get(hf, "max_position_embeddings", int, 2048),
        bos_token_id=_token("bos_token_id"),
        eos_token_id=_token("eos_token_id"),
    )
