"""Translation of Hugging Face config.json dicts, in every spelling real files use."""

from __future__ import annotations

import math

import pytest

from jaxquant.errors import ConfigError
from jaxquant.models.config import FULL, SLIDING, ModelConfig, RopeConfig, from_hf_config

GEMMA_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=7,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=300)


def test_gemma3_legacy_spelling():
    cfg = from_hf_config({
        "model_type": "gemma3_text", **GEMMA_TEXT, "rope_theta": 1e6,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "rope_local_base_freq": 1e4,
        "sliding_window": 512, "sliding_window_pattern": 3, "query_pre_attn_scalar": 32})
    assert cfg.layer_types == (SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL, SLIDING)
    assert cfg.rope == RopeConfig(theta=1e6, rope_type="linear", factor=8.0)
    assert cfg.local_rope == RopeConfig(theta=1e4)
    assert cfg.rope_for(0) == cfg.local_rope and cfg.rope_for(2) == cfg.rope
    assert math.isclose(cfg.scale, 32 ** -0.5) and cfg.norm_offset == 1.0
    assert cfg.tie_word_embeddings and cfg.embed_scale == 8.0 and cfg.activation == "gelu_tanh"


def test_gemma3_multimodal_text_config_with_omitted_defaults():
    # As transformers writes Gemma 3 4B: fields equal to the class defaults are left out.
    cfg = from_hf_config({
        "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": {"model_type": "gemma3_text", "hidden_size": 2560,
                        "intermediate_size": 10240, "num_hidden_layers": 34,
                        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
        "vision_config": {"model_type": "siglip_vision_model"}})
    assert (cfg.family, cfg.hidden_size, cfg.num_layers) == ("gemma3", 2560, 34)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (8, 4, 256, 262208)
    assert cfg.rope.factor == 8.0 and cfg.local_rope.theta == 1e4 and cfg.sliding_window == 1024
    assert cfg.layer_types.count(FULL) == 5


def test_llama3_legacy_rope_scaling():
    cfg = from_hf_config({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 100, "rope_theta": 500000.0,
        "rope_scaling": {"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    assert cfg.rope.rope_type == "llama3" and cfg.rope.factor == 32.0
    assert cfg.rope.theta == 500000.0 and cfg.head_dim == 16


def test_qwen2_sliding_window_layers():
    cfg = from_hf_config({
        "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "vocab_size": 100,
        "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2})
    assert cfg.layer_types == (FULL, FULL, SLIDING, SLIDING) and cfg.qkv_bias
    assert not cfg.o_bias and cfg.num_kv_heads == 4


@pytest.mark.parametrize("family,qkv,o", [("llama", True, True), ("qwen3", True, True),
                                          ("gemma3_text", True, True), ("mistral", False, False),
                                          ("qwen2", True, False)])
def test_attention_bias_as_transformers_builds_it(family, qkv, o):
    cfg = from_hf_config({"model_type": family, **GEMMA_TEXT, "attention_bias": True})
    assert (cfg.qkv_bias, cfg.o_bias) == (qkv, o)


@pytest.mark.parametrize("bad,fragment", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "x"}}, "invalid value"),
    ({"sliding_window": "wide"}, "sliding_window"),
    ({"num_attention_heads": 5}, "multiple of"),
    ({"hidden_act": "relu"}, "activation"),
])
def test_invalid_values_raise_config_error(bad, fragment):
    with pytest.raises(ConfigError, match=fragment):
        from_hf_config({"model_type": "llama", **GEMMA_TEXT, **bad})


def test_round_trip_to_dict():
    cfg = from_hf_config({"model_type": "gemma3_text", **GEMMA_TEXT, "sliding_window": 8})
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown jaxquant config fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"])
def test_defaults_table_matches_transformers(model_type):
    import transformers

    from jaxquant.models.config import HF_DEFAULTS

    full = transformers.AutoConfig.for_model(model_type).to_dict()
    rope = full.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)
    for key, value in HF_DEFAULTS[model_type].items():
        if key == "rope_theta":
            assert rope["rope_theta"] == value
        elif key == "rope_local_base_freq":
            assert full["rope_parameters"]["sliding_attention"]["rope_theta"] == value
        else:
            assert full[key] == value, key
