"""A tiny model and a recipe that produces every quantized format, for the sharding tests.

No side effects on import (the child processes set ``XLA_FLAGS`` before importing JAX).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxquant.formats import CodebookWeight, MixedWeight, OutlierWeight, UniformWeight
from jaxquant.models import transformer
from jaxquant.models.config import ModelConfig
from jaxquant.params import flatten, unflatten
from jaxquant.recipes import QuantSpec, Recipe, Rule

#: hidden 128 and FFN 256 split into whole 32-code words over 2 and 4 devices.
CONFIG = ModelConfig(family="llama", vocab_size=256, hidden_size=128, intermediate_size=256,
                     num_layers=3, num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5)
MESHES = ((8, 1), (4, 2), (2, 4))
CALIB_MESH = (4, 2)


def _spec(method: str, bits: float, group: int | None = None, **kw: Any) -> QuantSpec:
    return QuantSpec(method=method, bits=bits, group_size=group, **kw)


#: Every format in a column- (q/k/v/gate/up) and a row-parallel (o/down) position, with
#: few distinct (method, shape) pairs to compile; every other block linear: RTN 4-bit g32.
RULES = {
    "0.self_attn.q_proj": _spec("claq", 3),  # codebook
    "0.self_attn.o_proj": _spec("claq", 3),  # codebook, row: codebook rows split too
    "1.self_attn.q_proj": _spec("claq", 2.5, outlier_ratio=0.01),  # outliers(mixed(codebook))
    "1.self_attn.o_proj": _spec("claq", 2.5, outlier_ratio=0.01),  # row: fallback to column
    "0.mlp.gate_proj": _spec("gptq", 4, 32, act_order=True),  # mixed(uniform)
    "1.mlp.down_proj": _spec("gptq", 4, 32, act_order=True),  # mixed, row: fallback
    "0.mlp.down_proj": _spec("gptq", 4, 32),  # uniform, row: words and scales split
    "2.self_attn.o_proj": _spec("rtn", 4, None, symmetric=True),  # row: scales replicated
    "2.self_attn.k_proj": _spec("rtn", 3, None, symmetric=True),  # sym per-channel, column
}
RECIPE = Recipe(rules=(*(Rule(pattern=rf"layers\.{k.replace('.', chr(92) + '.')}\.weight",
                              spec=s) for k, s in RULES.items()),
                       Rule(pattern=r"layers\.\d+\.(self_attn|mlp)\.[a-z_]+_proj\.weight",
                            spec=_spec("rtn", 4, 32))))


def tiny_model() -> tuple[ModelConfig, dict]:
    """Random weights of O(1) output scale (host NumPy)."""
    rng = np.random.default_rng(0)
    flat = {}
    for path, v in flatten(transformer.init_params(CONFIG)).items():
        if v.ndim == 2:
            flat[path] = (rng.standard_normal(v.shape) / np.sqrt(v.shape[1])).astype(np.float32)
        else:
            flat[path] = (np.asarray(v) + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
    return CONFIG, unflatten(flat)


def kind(w: Any) -> str:
    """``outliers(mixed(codebook))`` style name of a format."""
    if isinstance(w, OutlierWeight):
        return f"outliers({kind(w.base)})"
    if isinstance(w, MixedWeight):
        return f"mixed({kind(w.parts[0])})"
    return {UniformWeight: "uniform", CodebookWeight: "codebook"}.get(type(w), "float")


def multihost_case() -> tuple[dict, ModelConfig, np.ndarray]:
    """(RTN 4-bit g32 params, config, 7 windows) of the two-process evaluation test."""
    from jaxquant.quantize import quantize

    cfg, params = tiny_model()
    qparams = quantize(params, Recipe.uniform(QuantSpec(bits=4, group_size=32)))
    windows = np.random.default_rng(2).integers(0, cfg.vocab_size, (7, 16)).astype(np.int32)
    return qparams, cfg, windows
