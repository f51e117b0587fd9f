"""Tiny random transformers (torch) models of every supported family, for parity tests."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from jaxquant.checkpoints.source import CheckpointSource

_COMMON = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
               num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-5,
               max_position_embeddings=256, attn_implementation="eager")

#: name -> (config class, model class, config kwargs)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_theta=10000.0)),
    "llama3-rope-bias": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=16),
        rope_theta=500000.0)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(
        sliding_window=5, head_dim=16, attention_bias=True)),  # Mistral ignores the bias flag
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        tie_word_embeddings=True, rope_theta=1e6)),
    "qwen2-sliding": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=16)),
    "qwen3-bias": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(
        head_dim=16, attention_bias=True)),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, dict(
        head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        final_logit_softcapping=30.0, attention_bias=True,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
}


def make_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random float32 torch model with O(1)-scale weights (so logits differ)."""
    config_cls, model_cls, extra = FAMILIES[name]
    kwargs = {**_COMMON, **extra}
    attn = kwargs.pop("attn_implementation")
    config = config_cls(**kwargs)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = model_cls(config).eval().float()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _pname, p in model.named_parameters():
            if p.ndim == 1:  # norms and biases: around their defaults
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p.shape[-1]))
    return model


def torch_source(model: torch.nn.Module) -> CheckpointSource:
    """A CheckpointSource streaming a torch model's state dict."""
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}

    def read():
        yield from sd.items()

    return CheckpointSource(path="<torch>", format="torch", hf_config=model.config.to_dict(),
                            names=tuple(sd), read=read)
