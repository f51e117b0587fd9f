"""Reads a GGUF file (llama.cpp's format) as a :class:`CheckpointSource`.

A GGUF file holds a model config as metadata under llama.cpp's key names, the
tokenizer as metadata too, and tensors under llama.cpp's names, in llama.cpp's
layout and possibly quantized. This module undoes all of that (see SOURCES.md):

* metadata becomes a Hugging Face ``config.json``-style dict;
* ``blk.N.attn_q.weight`` and friends get their Hugging Face names;
* tensors come back in Hugging Face layout: GGUF lists dimensions innermost
  first, which the ``gguf`` package already reverses, so a linear weight is
  ``[out_features, in_features]``; quantized types are dequantized to float32;
* for arch ``llama``, llama.cpp's converter reorders the rows of the Q and K
  projections within each head (its RoPE pairs neighbouring dimensions, Hugging
  Face's pairs the two halves of a head); that reordering is inverted;
* for arch ``gemma3``, llama.cpp's converter stores every RMSNorm weight as
  ``w + 1`` (Gemma computes ``x * (1 + w)``); 1 is subtracted again;
* the embedded tokenizer is rebuilt as a ``tokenizers.Tokenizer`` that encodes
  exactly as ``transformers.AutoTokenizer.from_pretrained(dir, gguf_file=name)``.

Only metadata is parsed up front; the file is memory-mapped and each tensor is
dequantized when :meth:`CheckpointSource.tensors` reaches it.
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from jaxquant.checkpoints.source import CheckpointSource
from jaxquant.errors import CheckpointError, ConfigError

__all__ = ["SUPPORTED_ARCHITECTURES", "read_gguf"]

_GGUF_MAGIC = b"GGUF"

#: GGUF ``general.architecture`` values this reader translates.
SUPPORTED_ARCHITECTURES = ("gemma3", "llama", "qwen2", "qwen3")

# Errors the gguf package (numpy memmap / reshape / struct / enum lookups) raises on
# malformed or truncated input.
_READ_ERRORS = (
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    OverflowError,
    UnicodeDecodeError,
    struct.error,
    AttributeError,
)

# Per-block tensor names: GGUF leaf -> Hugging Face suffix under ``model.layers.N.``.
_DECODER_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}
_BLOCK_NAMES = {
    "llama": {**_DECODER_BLOCK_NAMES, "ffn_norm": "post_attention_layernorm"},
    "qwen2": {**_DECODER_BLOCK_NAMES, "ffn_norm": "post_attention_layernorm"},
    "qwen3": {**_DECODER_BLOCK_NAMES, "ffn_norm": "post_attention_layernorm"},
    # Gemma 3 has four norms per block; llama.cpp's FFN_PRE_NORM is also "ffn_norm".
    "gemma3": {
        **_DECODER_BLOCK_NAMES,
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Auxiliary tensors llama.cpp computes at conversion time; no Hugging Face weight holds
# them. ``rope_freqs`` (Llama 3 RoPE scaling factors) is turned into ``rope_scaling``;
# ``attn_rot_embd`` (old files) is a RoPE cache.
_ROPE_FREQS = "rope_freqs.weight"
_SKIPPED_BLOCK_LEAVES = ("attn_rot_embd",)

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([A-Za-z0-9_]+)\.(weight|bias)$")

_HF_ARCH = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}

# Split regexes transformers uses for a byte-level BPE vocabulary, by
# ``tokenizer.ggml.pre`` (transformers/integrations/gguf/gguf_tokenizer_mapping.py).
# Any other value (``smollm``, ``gpt2``, ``default``, ...) gets GPT-2's ByteLevel
# pre-tokenizer with its built-in regex, as transformers does.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BYTE_LEVEL_SPLITS = {
    **dict.fromkeys(
        (
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
            "dbrx",
            "smaug-bpe",
        ),
        _LLAMA3_SPLIT,
    ),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}

# llama.cpp token types (tokenizer.ggml.token_type).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


# --------------------------------------------------------------------------------------
# Opening the file
# --------------------------------------------------------------------------------------


def _open_reader(path: str) -> Any:
    """Opens ``path`` with ``gguf.GGUFReader``, turning every failure into CheckpointError."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: not a file (expected a .gguf file)")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the file ({e.strerror or e})") from e
    if len(magic) < 4:
        raise CheckpointError(
            f"{path}: not a GGUF file (only {len(magic)} bytes; truncated or empty)"
        )
    if magic != _GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")

    import gguf

    try:
        reader = gguf.GGUFReader(path, "r")
    except _READ_ERRORS as e:
        raise CheckpointError(
            f"{path}: truncated or malformed GGUF file ({type(e).__name__}: {_one_line(e)})"
        ) from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the file ({e.strerror or e})") from e
    if reader.byte_order != "I":
        raise CheckpointError(f"{path}: big-endian GGUF files are not supported")

    size = os.path.getsize(path)
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size or tensor.data.size * tensor.data.itemsize != int(tensor.n_bytes):
            raise CheckpointError(
                f"{path}: truncated GGUF file (tensor {tensor.name!r} needs bytes up to "
                f"{end}, the file has {size})"
            )
    return reader


def _one_line(error: BaseException) -> str:
    """The message of ``error`` on one line."""
    return " ".join(str(error).split()) or type(error).__name__


def _metadata(reader: Any, path: str) -> dict[str, Any]:
    """All key/value metadata as Python values (strings, numbers, bools, lists)."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = field.contents()
        except _READ_ERRORS as e:
            raise CheckpointError(
                f"{path}: malformed GGUF metadata value {key!r} ({_one_line(e)})"
            ) from e
    return out


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


def _f32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not
    9.999999747378752e-06), which is how config.json files spell it."""
    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


def _hf_config(
    arch: str,
    md: dict[str, Any],
    shapes: dict[str, tuple[int, ...]],
    path: str,
) -> dict[str, Any]:
    """Translates GGUF metadata into a Hugging Face config.json-style dict.

    Args:
      arch: ``general.architecture``.
      md: All metadata.
      shapes: GGUF tensor name -> shape in Hugging Face (numpy) order.
      path: The file, for messages.

    Returns:
      The config dict.

    Raises:
      ConfigError: A required key is missing or a value is unsupported.
    """

    def key(name: str, default: Any = None) -> Any:
        full = f"{arch}.{name}"
        if full in md:
            return md[full]
        if default is None:
            raise ConfigError(f"{path}: GGUF metadata lacks {full!r}, which a {arch} model needs")
        return default

    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    kv_heads = key("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per-layer counts (hybrid models); ours are uniform
        if len(set(kv_heads)) != 1:
            raise ConfigError(f"{path}: per-layer KV head counts {kv_heads} are not supported")
        kv_heads = kv_heads[0]
    kv_heads = int(kv_heads)
    head_dim = int(key("attention.key_length", hidden // heads))
    n_layers = int(key("block_count"))
    ffn = key("feed_forward_length")
    if isinstance(ffn, list):
        if len(set(ffn)) != 1:
            raise ConfigError(f"{path}: per-layer FFN widths {ffn} are not supported")
        ffn = ffn[0]

    if "token_embd.weight" in shapes:
        vocab_size = int(shapes["token_embd.weight"][0])
    elif f"{arch}.vocab_size" in md:
        vocab_size = int(md[f"{arch}.vocab_size"])
    elif "tokenizer.ggml.tokens" in md:
        vocab_size = len(md["tokenizer.ggml.tokens"])
    else:
        raise ConfigError(f"{path}: cannot tell the vocabulary size (no token_embd.weight)")

    model_type, architecture = _HF_ARCH[arch]
    default_theta = 1_000_000.0 if arch == "gemma3" else 10_000.0
    config: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [architecture],
        "hidden_size": hidden,
        "intermediate_size": int(ffn),
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab_size,
        "max_position_embeddings": int(key("context_length", 2048 if arch == "llama" else None)),
        "rms_norm_eps": _f32(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(key("rope.freq_base", default_theta)),
        "rope_scaling": _rope_scaling(arch, md, path),
        "tie_word_embeddings": "output.weight" not in shapes,
        "attention_bias": "blk.0.attn_q.bias" in shapes,
    }
    rope_dims = key("rope.dimension_count", head_dim)
    if int(rope_dims) != head_dim:
        raise ConfigError(
            f"{path}: partial rotary embedding ({arch}.rope.dimension_count={rope_dims}, "
            f"head_dim={head_dim}) is not supported"
        )

    for hf_key, gguf_key in (
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
        ("unk_token_id", "tokenizer.ggml.unknown_token_id"),
    ):
        if gguf_key in md:
            config[hf_key] = int(md[gguf_key])

    if arch in ("llama", "qwen2", "qwen3"):
        config["hidden_act"] = "silu"
    if arch == "llama":
        config["mlp_bias"] = "blk.0.ffn_up.bias" in shapes
    if arch == "qwen2":
        config["use_sliding_window"] = False
    if arch == "gemma3":
        config.update(_gemma3_extra(md, config, n_layers, path))
    return config


def _rope_scaling(arch: str, md: dict[str, Any], path: str) -> dict[str, Any] | None:
    """``rope_scaling`` from ``{arch}.rope.scaling.*`` metadata (linear, YaRN), or None."""
    prefix = f"{arch}.rope.scaling."
    kind = md.get(prefix + "type")
    factor = md.get(prefix + "factor")
    if kind is None and factor is None:
        return None
    kind = "linear" if kind is None else str(kind)
    if kind == "none":
        return None
    if factor is None:
        raise ConfigError(f"{path}: {prefix}type is {kind!r} but {prefix}factor is missing")
    scaling: dict[str, Any] = {"rope_type": kind, "factor": _f32(factor)}
    if kind == "linear":
        return scaling
    if kind == "yarn":
        if (orig := md.get(prefix + "original_context_length")) is not None:
            scaling["original_max_position_embeddings"] = int(orig)
        for gguf_name, hf_name in (
            ("yarn_beta_fast", "beta_fast"),
            ("yarn_beta_slow", "beta_slow"),
            ("attn_factor", "attention_factor"),
        ):
            if (value := md.get(prefix + gguf_name)) is not None:
                scaling[hf_name] = _f32(value)
        return scaling
    raise ConfigError(
        f"{path}: RoPE scaling type {kind!r} is not supported (supported: linear, yarn)"
    )


def _gemma3_extra(
    md: dict[str, Any], config: dict[str, Any], n_layers: int, path: str
) -> dict[str, Any]:
    """Gemma 3 keys: sliding-window layout, local RoPE base, attention scale, soft caps.

    llama.cpp hard-codes what the file does not say: every 6th layer is global, the
    sliding layers use RoPE base 10000, and queries are scaled by ``head_dim ** -0.5``
    except in the 27B model (62 layers), which uses ``(hidden / heads) ** -0.5``.
    """
    extra: dict[str, Any] = {"hidden_activation": "gelu_pytorch_tanh"}
    window = md.get("gemma3.attention.sliding_window")
    pattern = md.get("gemma3.attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # one bool per layer: True = sliding window
        if len(pattern) != n_layers:
            raise ConfigError(
                f"{path}: gemma3.attention.sliding_window_pattern has {len(pattern)} entries "
                f"for {n_layers} layers"
            )
        sliding = [bool(p) for p in pattern]
    else:
        period = int(pattern)
        sliding = [period > 0 and (i + 1) % period != 0 for i in range(n_layers)]
        extra["sliding_window_pattern"] = period
    if window is None:
        sliding = [False] * n_layers
    else:
        extra["sliding_window"] = int(window)
    extra["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
    extra["rope_local_base_freq"] = _f32(md.get("gemma3.rope.freq_base_swa", 10_000.0))
    if n_layers == 62:
        extra["query_pre_attn_scalar"] = config["hidden_size"] // config["num_attention_heads"]
    else:
        extra["query_pre_attn_scalar"] = config["head_dim"]
    final_cap = md.get("gemma3.final_logit_softcapping")
    extra["final_logit_softcapping"] = None if final_cap is None else _f32(final_cap)
    attn_cap = md.get("gemma3.attn_logit_softcapping")
    extra["attn_logit_softcapping"] = None if attn_cap is None else _f32(attn_cap)
    return extra


def _llama3_rope_scaling(
    factors: np.ndarray, theta: float, head_dim: int, path: str
) -> dict[str, Any] | None:
    """Recovers Hugging Face's ``llama3`` ``rope_scaling`` from llama.cpp's rope_freqs.

    llama.cpp's converter stores, per rotary frequency ``f_i = theta ** (-2i / d)``
    with wavelength ``w_i = 2 pi / f_i``, the divisor ``r_i``: 1 where ``w_i < L / hi``,
    ``factor`` where ``w_i > L / lo``, else ``1 / ((1 - s_i) / factor + s_i)`` with
    ``s_i = (L / w_i - lo) / (hi - lo)``. Inverting the middle band gives ``s_i``,
    which is linear in ``1 / w_i``; its slope and intercept fix ``L / (hi - lo)`` and
    ``lo / (hi - lo)``. Only those two ratios matter, so ``lo = 1`` is chosen (the
    value every Llama 3.x config uses), which recovers ``L`` and ``hi`` exactly for
    those models. The result is checked by recomputing the factors. All-ones factors
    mean no scaling (None).
    """
    r = np.asarray(factors, dtype=np.float64).reshape(-1)
    if r.size != head_dim // 2:
        raise ConfigError(
            f"{path}: rope_freqs has {r.size} entries, expected head_dim / 2 = {head_dim // 2}"
        )
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor = float(r.max())
    if factor <= 1.0 + 1e-6 and float(r.min()) >= 1.0 - 1e-6:
        return None  # all ones: no scaling
    if factor <= 1.0 + 1e-6:
        raise ConfigError(f"{path}: rope_freqs does not follow Llama 3 RoPE scaling")
    middle = (r > 1.0 + 1e-6) & (r < factor * (1 - 1e-6))
    if middle.sum() < 2:
        raise ConfigError(
            f"{path}: cannot recover the Llama 3 RoPE scaling from rope_freqs "
            "(fewer than two frequencies in the interpolated band)"
        )
    s = (1.0 / r[middle] - 1.0 / factor) / (1.0 - 1.0 / factor)
    x = inv_freq[middle] / (2 * math.pi)  # 1 / wavelength
    slope, intercept = np.polyfit(x, s, 1)
    if intercept >= 0 or slope <= 0:
        raise ConfigError(f"{path}: rope_freqs does not follow Llama 3 RoPE scaling")
    low = 1.0
    high = low - low / intercept  # intercept = -lo / (hi - lo)
    orig = slope * (high - low)  # slope = L / (hi - lo)
    params = {
        "rope_type": "llama3",
        "factor": _round_sig(factor),
        "low_freq_factor": low,
        "high_freq_factor": _round_sig(high),
        "original_max_position_embeddings": round(orig),
    }
    if not np.allclose(_llama3_factors(inv_freq, params), r, rtol=1e-4, atol=0):
        raise ConfigError(f"{path}: rope_freqs does not follow Llama 3 RoPE scaling")
    return params


def _round_sig(value: float, digits: int = 6) -> float:
    """``value`` rounded to ``digits`` significant digits (undoes float32 noise)."""
    return float(f"{value:.{digits}g}")


def _llama3_factors(inv_freq: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    """The rope_freqs divisors llama.cpp's converter writes for Llama 3 RoPE scaling."""
    factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    orig = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (orig / wavelen - lo) / (hi - lo)
    out = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < orig / hi, 1.0, out)
    return np.where(wavelen > orig / lo, factor, out)


# --------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------


def _hf_name(arch: str, gguf_name: str, n_layers: int) -> str | None:
    """The Hugging Face name of a GGUF tensor, None for skipped auxiliary tensors.

    Raises:
      KeyError: The name is not one this reader knows.
    """
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name == _ROPE_FREQS:
        return None
    m = _BLOCK_RE.match(gguf_name)
    if m is None:
        raise KeyError(gguf_name)
    layer, leaf, kind = int(m.group(1)), m.group(2), m.group(3)
    if leaf in _SKIPPED_BLOCK_LEAVES:
        return None
    hf_leaf = _BLOCK_NAMES[arch].get(leaf)
    if hf_leaf is None or layer >= n_layers:
        raise KeyError(gguf_name)
    return f"model.layers.{layer}.{hf_leaf}.{kind}"


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverts llama.cpp's Q/K row order within each head.

    llama.cpp writes ``w.reshape(n_head, 2, d // 2, *rest).swapaxes(1, 2)`` (row
    ``h, j, k`` -> ``h, k, j``); reading it back as ``(n_head, d // 2, 2)`` and
    swapping again restores Hugging Face's order. Works for weights and biases.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of even size")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(tensor: Any) -> np.ndarray:
    """A GGUF tensor as a numpy array in Hugging Face layout (a copy, not a memmap view).

    F32, F16 and BF16 keep their dtype; quantized types become float32.
    """
    import gguf

    qtype = tensor.tensor_type
    t = gguf.GGMLQuantizationType
    if qtype == t.F32:
        return np.array(tensor.data, dtype=np.float32)
    if qtype == t.F16:
        return np.array(tensor.data, dtype=np.float16)
    if qtype == t.BF16:
        import ml_dtypes

        raw = np.asarray(tensor.data)
        shape = (*raw.shape[:-1], raw.shape[-1] // 2)
        return np.array(raw.view(np.uint16).view(ml_dtypes.bfloat16).reshape(shape))
    if qtype == t.F64:
        return np.array(tensor.data, dtype=np.float32)
    return np.asarray(gguf.quants.dequantize(tensor.data, qtype), dtype=np.float32)


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _tokenizer(md: dict[str, Any], arch: str, path: str) -> Any | None:
    """A ``tokenizers.Tokenizer`` from ``tokenizer.ggml.*`` metadata, or None if absent.

    Mirrors what transformers builds for ``AutoTokenizer.from_pretrained(dir,
    gguf_file=name)`` (transformers/integrations/gguf/gguf_tokenizer_mapping.py):

    * ``tokenizer.ggml.model == "gpt2"``: byte-level BPE with the split regex
      transformers picks from ``tokenizer.ggml.pre`` (GPT-2's own regex for values it
      does not list, such as SmolLM2's ``smollm``); BOS only if
      ``tokenizer.ggml.add_bos_token`` is true.
    * ``"llama"`` (SentencePiece BPE): merges from the file, or recovered from the
      vocabulary and scores; Metaspace with a prefix space on the first word, byte
      fallback; for Gemma 3, Gemma's variant (spaces normalized to U+2581, no prefix
      space, whitespace-only tokens respelled, merges ordered by vocabulary position).
      BOS unless ``add_bos_token`` is false.

    Control tokens become special added tokens, user-defined ones plain added tokens.

    Raises:
      CheckpointError: The tokenizer model type is not supported.
    """
    tokens = md.get("tokenizer.ggml.tokens")
    if not tokens:
        return None
    kind = md.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tok, vocab, control_ok, class_specials = _byte_level_bpe(md, tokens, path)
        add_bos_default = False
    elif kind == "llama":
        tok, vocab, control_ok, class_specials = _sentencepiece_bpe(md, tokens, arch, path)
        add_bos_default = True
    else:
        raise CheckpointError(
            f"{path}: embedded tokenizer of type {kind!r} is not supported (supported: "
            "'gpt2' (byte-level BPE), 'llama' (SentencePiece BPE))"
        )
    from tokenizers import AddedToken, processors

    types = md.get("tokenizer.ggml.token_type") or []
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, ty in zip(tokens, types, strict=False)
        if ty == _TOKEN_CONTROL and control_ok(t)
    ]
    if control:
        tok.add_special_tokens(control)
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, ty in zip(tokens, types, strict=False)
        if ty == _TOKEN_USER_DEFINED and t in vocab
    ]
    if user:
        tok.add_tokens(user)

    def special(key: str) -> str | None:
        index = md.get(f"tokenizer.ggml.{key}")
        if index is None or not 0 <= int(index) < len(tokens):
            return None
        return tokens[int(index)]

    named = {
        "bos": special("bos_token_id"),
        "eos": special("eos_token_id"),
        "unk": special("unknown_token_id"),
        "pad": special("padding_token_id"),
    }
    # transformers also registers its tokenizer class's default special tokens; only
    # those the vocabulary has are added here (it would append missing ones past the
    # embedding matrix).
    present = {str(t.content) for t in tok.get_added_tokens_decoder().values()}
    wanted = [*class_specials, *named.values()]
    extra = [t for t in dict.fromkeys(wanted) if t is not None and t not in present and t in vocab]
    if extra:
        tok.add_special_tokens([AddedToken(t, special=True) for t in extra])

    bos, eos = named["bos"], named["eos"]
    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None
    add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = (
        f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    )
    specials: list[tuple[str, int]] = []
    if add_bos:
        specials.append((bos, tok.token_to_id(bos)))
    if add_eos:
        specials.append((eos, tok.token_to_id(eos)))
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=specials
    )
    return tok


def _file_merges(md: dict[str, Any], path: str) -> list[tuple[str, ...]] | None:
    """``tokenizer.ggml.merges`` as pairs, or None if the file has none."""
    raw = md.get("tokenizer.ggml.merges")
    if raw is None:
        return None
    merges = [tuple(m.split(" ")) for m in raw]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise CheckpointError(f"{path}: malformed tokenizer merge {' '.join(bad[0])!r}")
    return merges


def _byte_level_bpe(
    md: dict[str, Any], tokens: list[str], path: str
) -> tuple[Any, dict[str, int], Callable[[str], bool], tuple[str, ...]]:
    """GPT-2 style byte-level BPE (``tokenizer.ggml.model == "gpt2"``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if not set(token) <= spelled:  # stored as plain text: respell byte-wise
            token = "".join(alphabet[b] for b in token.encode("utf-8"))
        vocab[token] = index
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=_file_merges(md, path) or [],
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    split = _BYTE_LEVEL_SPLITS.get(md.get("tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    # A control token spelled outside the byte alphabet is a llama.cpp mislabel;
    # transformers keeps it an ordinary (respelled) vocabulary entry.
    return tok, vocab, lambda t: set(t) <= spelled, ("<|endoftext|>",)


def _sentencepiece_bpe(
    md: dict[str, Any], tokens: list[str], arch: str, path: str
) -> tuple[Any, dict[str, int], Callable[[str], bool], tuple[str, ...]]:
    """SentencePiece BPE (``tokenizer.ggml.model == "llama"``), Llama or Gemma style."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    gemma = arch == "gemma3"
    if gemma:  # whitespace-only pieces are stored as spaces; Gemma looks them up as U+2581
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _file_merges(md, path)
    if merges is None:
        if gemma:  # Gemma's scores do not follow its merge order; file order does
            ranks = {t: float(-i) for i, t in enumerate(tokens)}
        else:
            scores = md.get("tokenizer.ggml.scores")
            if scores is None or len(scores) != len(tokens):
                raise CheckpointError(
                    f"{path}: SentencePiece tokenizer has neither merges nor one score per token"
                )
            ranks = dict(zip(tokens, (float(x) for x in scores), strict=True))
        merges = _merges_from_scores(vocab, ranks)
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            fuse_unk=True,
            byte_fallback=True,
            dropout=None,
            unk_token="<unk>" if gemma else None,
        )
    )
    pieces = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        tok.decoder = decoders.Sequence(pieces)
        class_specials: tuple[str, ...] = ("<unk>", "<bos>", "<eos>", "<pad>", "<mask>")
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first", split=False
        )
        tok.decoder = decoders.Sequence([*pieces, decoders.Strip(" ", 1, 0)])
        class_specials = ("<unk>", "<s>", "</s>")
    return tok, vocab, lambda t: True, class_specials


def _merges_from_scores(vocab: dict[str, int], ranks: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary, best first.

    Every split of a piece into two pieces of the vocabulary is a merge, ranked by the
    piece's score, then by the lengths of its two halves (longer first); splits of one
    piece are ordered by their halves' ids. This is the order transformers derives
    (``generate_merges``), so both tokenize alike.
    """
    found: list[tuple[str, str, float]] = []
    for piece, score in ranks.items():
        local = [
            (piece[:i], piece[i:], score)
            for i in range(1, len(piece))
            if piece[:i] in vocab and piece[i:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        found.extend(local)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def read_gguf(path: str | os.PathLike[str]) -> CheckpointSource:
    """Reads a GGUF checkpoint lazily.

    Metadata is parsed now; tensors are dequantized one at a time as
    ``source.tensors()`` is iterated (the file stays memory-mapped while the
    iterator or the source is alive).

    Args:
      path: A ``.gguf`` file of architecture ``llama`` (Llama, Mistral, SmolLM, ...),
        ``qwen2``, ``qwen3`` or ``gemma3``.

    Returns:
      A :class:`CheckpointSource` with ``format="gguf"``, a Hugging Face config, Hugging
      Face tensor names and layout, and the embedded tokenizer (or None).

    Raises:
      CheckpointError: The file is missing, not GGUF, truncated, malformed, or holds a
        tensor this reader does not know.
      ConfigError: The architecture is not supported or the metadata lacks a key the
        config needs.
    """
    path_str = os.fspath(path)
    reader = _open_reader(path_str)
    md = _metadata(reader, path_str)

    arch = md.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"{path_str}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    by_name = {t.name: t for t in reader.tensors}
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    try:
        config = _hf_config(arch, md, shapes, path_str)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise ConfigError(f"{path_str}: malformed GGUF model metadata ({_one_line(e)})") from e

    if _ROPE_FREQS in by_name:
        if arch != "llama":
            raise CheckpointError(f"{path_str}: unexpected tensor {_ROPE_FREQS!r} for {arch}")
        if config["rope_scaling"] is not None:
            raise ConfigError(
                f"{path_str}: both {_ROPE_FREQS!r} and RoPE scaling metadata are present"
            )
        config["rope_scaling"] = _llama3_rope_scaling(
            _dequantize(by_name[_ROPE_FREQS]), config["rope_theta"], config["head_dim"], path_str
        )

    n_layers = config["num_hidden_layers"]
    plan: list[tuple[str, str, Callable[[np.ndarray], np.ndarray] | None]] = []
    unknown: list[str] = []
    for tensor in reader.tensors:
        try:
            hf_name = _hf_name(arch, tensor.name, n_layers)
        except KeyError:
            unknown.append(tensor.name)
            continue
        if hf_name is not None:
            plan.append((tensor.name, hf_name, _transform(arch, hf_name, config)))
    if unknown:
        shown = ", ".join(unknown[:5]) + (
            f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
        )
        raise CheckpointError(
            f"{path_str}: GGUF tensors this reader does not know for arch {arch}: {shown}"
        )
    _check_complete(arch, [h for _, h, _ in plan], config, path_str)
    _check_attention_shapes(plan, shapes, config, path_str)

    try:
        tokenizer = _tokenizer(md, arch, path_str)
    except CheckpointError:
        raise
    except Exception as e:  # tokenizers raises bare Exceptions for inconsistent vocabularies
        raise CheckpointError(
            f"{path_str}: cannot build the embedded tokenizer ({_one_line(e)})"
        ) from e

    def read() -> Iterator[tuple[str, np.ndarray]]:
        for gguf_name, hf_name, transform in plan:
            tensor = by_name[gguf_name]
            try:
                array = _dequantize(tensor)
                if transform is not None:
                    array = transform(array)
            except NotImplementedError as e:
                raise CheckpointError(
                    f"{path_str}: tensor {gguf_name!r} has type {tensor.tensor_type.name}, "
                    f"which cannot be dequantized ({_one_line(e)})"
                ) from e
            except _READ_ERRORS as e:
                raise CheckpointError(
                    f"{path_str}: cannot read tensor {gguf_name!r} ({_one_line(e)})"
                ) from e
            yield hf_name, array

    return CheckpointSource(
        path=path_str,
        format="gguf",
        hf_config=config,
        names=tuple(h for _, h, _ in plan),
        read=read,
        tokenizer=tokenizer,
    )


def _transform(
    arch: str, hf_name: str, config: dict[str, Any]
) -> Callable[[np.ndarray], np.ndarray] | None:
    """The value fix-up llama.cpp's converter needs undone for ``hf_name``, if any."""
    if arch == "llama":
        if ".self_attn.q_proj." in hf_name:
            heads = config["num_attention_heads"]
            return lambda w: _unpermute_rows(w, heads)
        if ".self_attn.k_proj." in hf_name:
            kv_heads = config["num_key_value_heads"]
            return lambda w: _unpermute_rows(w, kv_heads)
    if arch == "gemma3" and hf_name.endswith("norm.weight"):
        return lambda w: w.astype(np.float32) - np.float32(1.0)
    return None


def _check_complete(arch: str, names: Sequence[str], config: dict[str, Any], path: str) -> None:
    """Raises CheckpointError if a tensor every model of ``arch`` has is missing."""
    have = set(names)
    needed = ["model.embed_tokens.weight", "model.norm.weight"]
    leaves = ["q_proj", "k_proj", "v_proj", "o_proj"]
    mlp = ["gate_proj", "up_proj", "down_proj"]
    norms = ["input_layernorm", "post_attention_layernorm"]
    if arch == "gemma3":
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for i in range(config["num_hidden_layers"]):
        needed += [f"model.layers.{i}.self_attn.{leaf}.weight" for leaf in leaves]
        needed += [f"model.layers.{i}.mlp.{leaf}.weight" for leaf in mlp]
        needed += [f"model.layers.{i}.{norm}.weight" for norm in norms]
        if arch in ("qwen3", "gemma3"):
            needed += [f"model.layers.{i}.self_attn.{n}.weight" for n in ("q_norm", "k_norm")]
    missing = [n for n in needed if n not in have]
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        )
        raise CheckpointError(f"{path}: GGUF file lacks tensors: {shown}")


def _check_attention_shapes(
    plan: Sequence[tuple[str, str, Any]],
    shapes: dict[str, tuple[int, ...]],
    config: dict[str, Any],
    path: str,
) -> None:
    """Raises CheckpointError if a Q/K/V projection's rows disagree with the head counts.

    The Q/K row permutation is only well defined when they agree.
    """
    head_dim = config["head_dim"]
    rows = {
        "q_proj": config["num_attention_heads"] * head_dim,
        "k_proj": config["num_key_value_heads"] * head_dim,
        "v_proj": config["num_key_value_heads"] * head_dim,
    }
    for gguf_name, hf_name, _ in plan:
        leaf = hf_name.rsplit(".", 2)[-2]
        if leaf in rows and shapes[gguf_name][0] != rows[leaf]:
            raise CheckpointError(
                f"{path}: tensor {gguf_name!r} has shape {list(shapes[gguf_name])}, but the "
                f"metadata's head counts and head_dim {head_dim} need {rows[leaf]} rows"
            )
