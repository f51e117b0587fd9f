"""Maps a :class:`CheckpointSource` (Hugging Face names and layout) into jaxquant params.

Streaming: tensors are read, checked and moved to the default device one at a
time, so host memory peaks near one copy of the model (plus one tensor).
"""

from __future__ import annotations

import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxquant.checkpoints.source import CheckpointSource
from jaxquant.errors import CheckpointError
from jaxquant.models.config import ModelConfig, from_hf_config
from jaxquant.models.transformer import Params, abstract_params
from jaxquant.params import flatten, unflatten

# Tensors some checkpoints carry that the model recomputes.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$|.*\.masked_bias$|.*attn\.bias$")


def hf_name_to_path(name: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``layers.3.mlp.up_proj.weight``."""
    return name[len("model.") :] if name.startswith("model.") else name


def params_from_source(
    source: CheckpointSource, *, dtype: Any = jnp.float32, config: ModelConfig | None = None,
    host: bool = False,
) -> tuple[ModelConfig, Params]:
    """Reads every tensor of ``source`` into a parameter pytree of ``dtype``.

    Args:
      source: The checkpoint.
      dtype: Parameter dtype (float32 for exact evaluation, bfloat16 to halve memory).
      config: Overrides the config translated from ``source.hf_config``.
      host: Keep the tensors as host NumPy arrays instead of device arrays (a model larger
        than one device, for layer-streaming quantization on a mesh).

    Raises:
      CheckpointError: a tensor that is missing, unexpected, of the wrong shape, or
        holds NaN/Inf.
    """
    cfg = config or from_hf_config(source.hf_config)
    expected = flatten(abstract_params(cfg, dtype))
    out: dict[str, Any] = {}
    for name, array in source.tensors():
        path = hf_name_to_path(name)
        if path not in expected:
            if _IGNORED.match(name) or (path == "lm_head.weight" and cfg.tie_word_embeddings):
                continue
            raise CheckpointError(
                f"{source.path}: unexpected tensor {name!r} for a {cfg.family} model with "
                f"{cfg.num_layers} layers"
            )
        want = expected[path].shape
        if tuple(array.shape) != tuple(want):
            raise CheckpointError(
                f"{source.path}: tensor {name!r} has shape {tuple(array.shape)} but the config "
                f"implies {tuple(want)}"
            )
        value = np.asarray(array)
        if not np.isfinite(value.astype(np.float32) if value.dtype.itemsize < 4
                           else value).all():
            raise CheckpointError(f"{source.path}: tensor {name!r} contains NaN or Inf values")
        out[path] = (value.astype(np.dtype(dtype), copy=False) if host
                     else jnp.asarray(value, dtype=dtype))
    missing = sorted(set(expected) - set(out))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(
            f"{source.path}: checkpoint lacks tensors {', '.join(missing[:5])}{more}"
        )
    return cfg, unflatten(out)


def check_params(params: Params, cfg: ModelConfig, *, where: str) -> None:
    """Raises CheckpointError unless ``params`` has exactly the paths and shapes of ``cfg``.

    Quantized formats are checked by their logical ``[out, in]`` shape.
    """
    expected = flatten(abstract_params(cfg))
    got = flatten(params)
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{where}: parameters do not match the config (missing {missing[:3]}, "
            f"unexpected {extra[:3]})"
        )
    for path, leaf in got.items():
        shape = getattr(leaf, "shape", None)  # quantized formats carry their logical shape
        if shape is not None and tuple(shape) != expected[path].shape:
            raise CheckpointError(
                f"{where}: parameter {path} has shape {tuple(shape)}, config implies "
                f"{expected[path].shape}"
            )
