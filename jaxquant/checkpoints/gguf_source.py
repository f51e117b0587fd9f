"""Reads a GGUF file (llama.cpp's format) as a :class:`CheckpointSource`.

A GGUF file holds a model config as metadata under llama.cpp's key names, the
tokenizer as metadata too, and tensors under llama.cpp's names, in llama.cpp's
layout and possibly quantized. This module undoes all of that (see SOURCES.md):

* metadata becomes a Hugging Face ``config.json``-style dict;
* ``blk.N.attn_q.weight`` and friends get their Hugging Face names, from the
  ``gguf`` package's per-architecture ``TensorNameMap``;
* tensors come back in Hugging Face layout: GGUF lists dimensions innermost
  first, which the ``gguf`` package already reverses, so a linear weight is
  ``[out_features, in_features]``; quantized types are dequantized to float32;
* for arch ``llama``, llama.cpp's converter reorders the rows of the Q and K
  projections within each head (its RoPE pairs neighbouring dimensions, Hugging
  Face's pairs the two halves of a head); that reordering is inverted;
* for arch ``gemma3``, llama.cpp's converter stores every RMSNorm weight as
  ``w + 1`` (Gemma computes ``x * (1 + w)``); 1 is subtracted again;
* the embedded tokenizer is rebuilt as a ``tokenizers.Tokenizer`` by transformers'
  GGUF tokenizer converter, so it encodes exactly as
  ``transformers.AutoTokenizer.from_pretrained(dir, gguf_file=name)``.

Nothing here imports torch: transformers' ``load_gguf_checkpoint`` (its GGUF config
reader) and its tensor name conversion need torch, so metadata and tensors are read
with the ``gguf`` package.

Only metadata is parsed up front; the file is memory-mapped and each tensor is
dequantized when :meth:`CheckpointSource.tensors` reaches it.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from jaxquant.checkpoints.source import CheckpointSource
from jaxquant.errors import CheckpointError, ConfigError, one_line

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

# Hugging Face modules of the model and of a decoder layer (under ``model.layers.N.``).
# gguf's per-architecture ``TensorNameMap`` (the table llama.cpp's converter names
# tensors with) gives each its GGUF name, or None where the architecture has no such
# tensor (Llama has no q_norm; Gemma 3 stores post_attention_layernorm as
# ``post_attention_norm`` and pre_feedforward_layernorm as ``ffn_norm``).
_MODEL_MODULES = ("model.embed_tokens", "model.norm", "lm_head")
_LAYER_MODULES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "self_attn.q_norm",
    "self_attn.k_norm",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)
# Auxiliary tensors llama.cpp computes at conversion time; no Hugging Face weight holds
# them. ``rope_freqs`` (Llama 3 RoPE scaling factors) is turned into ``rope_scaling``;
# ``attn_rot_embd`` (old files) is a RoPE cache.
_ROPE_FREQS = "rope_freqs.weight"
_SKIPPED_RE = re.compile(r"rope_freqs\.weight|blk\.\d+\.attn_rot_embd\.(weight|bias)")

_HF_ARCH = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}


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
            f"{path}: truncated or malformed GGUF file ({type(e).__name__}: {one_line(e)})"
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
                f"{path}: malformed GGUF metadata value {key!r} ({one_line(e)})"
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

    Not delegated to transformers: its GGUF config reader (``load_gguf_checkpoint``)
    imports and needs torch, and its key table (``GGUF_CONFIG_MAPPING``) is a bare
    rename that leaves out what this reader derives and checks: head_dim (qwen3 has no
    entry for it), vocab size from the embedding, RoPE scaling, Gemma 3's sliding
    window layout, float32 values as config.json spells them.

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


def _name_map(arch: str, n_layers: int) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face name, for every tensor a model of ``arch`` may hold."""
    import gguf

    gguf_arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    gguf_names = gguf.get_tensor_name_map(gguf_arch, n_layers)
    modules = [*_MODEL_MODULES]
    modules += [f"model.layers.{i}.{m}" for i in range(n_layers) for m in _LAYER_MODULES]
    out = {}
    for module in modules:
        if (gguf_name := gguf_names.get_name(module)) is not None:
            out[f"{gguf_name}.weight"] = f"{module}.weight"
            out[f"{gguf_name}.bias"] = f"{module}.bias"
    return out


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


def _tokenizer(md: dict[str, Any], arch: str, path: str) -> Any | None:
    """A ``tokenizers.Tokenizer`` from ``tokenizer.ggml.*`` metadata, or None if absent.

    The tokenizer model (vocabulary, merges, split regex, normalizer, decoder, control
    and user-defined tokens) is built by transformers' own GGUF converter,
    ``convert_gguf_tokenizer``, the one ``AutoTokenizer.from_pretrained(dir,
    gguf_file=name)`` uses (it needs no torch). What transformers' tokenizer classes
    add on top is done here:

    * the file's BOS/EOS/UNK/PAD tokens become special tokens (those in the
      vocabulary only: default special tokens of the tokenizer class that the
      vocabulary lacks, which transformers appends past the embedding matrix, are
      dropped);
    * BOS (EOS) is prepended (appended) as ``tokenizer.ggml.add_bos_token``
      (``add_eos_token``) say; without the flag, BOS for a SentencePiece
      vocabulary (``tokenizer.ggml.model == "llama"``), as llama.cpp does.

    Raises:
      CheckpointError: The tokenizer model type is not supported, or its metadata
        is incomplete or inconsistent.
    """
    tokens = md.get("tokenizer.ggml.tokens")
    if not tokens:
        return None
    from tokenizers import AddedToken, Tokenizer, processors

    # transformers advises at import that PyTorch is missing; jaxquant needs no torch.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    except ImportError:  # transformers before the integrations.gguf package
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    renames = {
        f"tokenizer.{key}": name for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
    }
    fields = {name: md[key] for key, name in renames.items() if key in md}
    try:
        tok, _ = convert_gguf_tokenizer(arch, fields)
    except KeyError as e:  # a field this tokenizer type needs is absent
        gguf_key = next((k for k, name in renames.items() if name == e.args[0]), e.args[0])
        raise CheckpointError(f"{path}: GGUF tokenizer metadata lacks {gguf_key!r}") from e

    if tok.get_vocab_size() > len(tokens):  # class defaults appended past the vocabulary
        spec = json.loads(tok.to_str())
        spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < len(tokens)]
        tok = Tokenizer.from_str(json.dumps(spec))

    def special(key: str) -> str | None:
        index = md.get(f"tokenizer.ggml.{key}")
        if index is None or not 0 <= int(index) < len(tokens):
            return None
        return tokens[int(index)]

    bos, eos = special("bos_token_id"), special("eos_token_id")
    named = [bos, eos, special("unknown_token_id"), special("padding_token_id")]
    present = {str(t.content) for t in tok.get_added_tokens_decoder().values()}
    vocab = tok.get_vocab(with_added_tokens=False)
    extra = [t for t in dict.fromkeys(named) if t is not None and t not in present and t in vocab]
    if extra:
        tok.add_special_tokens([AddedToken(t, special=True) for t in extra])

    add_bos_default = md.get("tokenizer.ggml.model") == "llama"
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
        raise ConfigError(f"{path_str}: malformed GGUF model metadata ({one_line(e)})") from e

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

    names = _name_map(arch, config["num_hidden_layers"])
    plan: list[tuple[str, str, Callable[[np.ndarray], np.ndarray] | None]] = []
    unknown: list[str] = []
    for tensor in reader.tensors:
        if tensor.name in names:
            hf_name = names[tensor.name]
            plan.append((tensor.name, hf_name, _transform(arch, hf_name, config)))
        elif not _SKIPPED_RE.fullmatch(tensor.name):
            unknown.append(tensor.name)
    if unknown:
        shown = ", ".join(unknown[:5]) + (
            f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
        )
        raise CheckpointError(
            f"{path_str}: GGUF tensors this reader does not know for arch {arch}: {shown}"
        )
    # Every weight the architecture has except lm_head (absent when tied) is required.
    have = {h for _, h, _ in plan}
    missing = [
        h
        for h in names.values()
        if h.endswith(".weight") and h != "lm_head.weight" and h not in have
    ]
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        )
        raise CheckpointError(f"{path_str}: GGUF file lacks tensors: {shown}")
    _check_attention_shapes(plan, shapes, config, path_str)

    try:
        tokenizer = _tokenizer(md, arch, path_str)
    except CheckpointError:
        raise
    except Exception as e:  # ValueError (unsupported type), tokenizers' bare Exceptions, ...
        raise CheckpointError(
            f"{path_str}: cannot build the embedded tokenizer ({one_line(e)})"
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
                    f"which cannot be dequantized ({one_line(e)})"
                ) from e
            except _READ_ERRORS as e:
                raise CheckpointError(
                    f"{path_str}: cannot read tensor {gguf_name!r} ({one_line(e)})"
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
