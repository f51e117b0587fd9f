"""``jaxquant info``: what a model is, from its config and files, without loading weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jaxquant.checkpoints import jq_checkpoint
from jaxquant.checkpoints.load import open_source, resolve
from jaxquant.errors import CheckpointError, ConfigError
from jaxquant.models.config import ModelConfig, from_hf_config


def _disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def model_info(spec: str) -> dict[str, Any]:
    """Architecture, parameter count and sizes of a model (see :func:`load_model` for spec)."""
    path = resolve(spec)
    if path.is_dir() and jq_checkpoint.is_checkpoint(path):
        meta = jq_checkpoint.read_metadata(path)
        try:
            cfg = ModelConfig.from_dict(meta["config"])
        except ConfigError as e:
            raise CheckpointError(f"{path}: {e}") from e
        fmt, extra = "jaxquant", {"dtypes": ", ".join(meta.get("dtypes", []))}
    else:
        source = open_source(spec)
        cfg = from_hf_config(source.hf_config)
        fmt, extra = source.format, {"tensors": len(source.names)}
    n = cfg.num_params()
    return {
        "model": spec,
        "path": str(path),
        "format": fmt,
        "architecture": cfg.family,
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "heads": f"{cfg.num_heads} query / {cfg.num_kv_heads} kv x {cfg.head_dim}",
        "vocab_size": cfg.vocab_size,
        "tied_embeddings": cfg.tie_word_embeddings,
        "sliding_layers": sum(cfg.window(i) is not None for i in range(cfg.num_layers)),
        "parameters": n,
        "bytes_float32": 4 * n,
        "bytes_bfloat16": 2 * n,
        "bytes_on_disk": _disk_bytes(path),
        **extra,
    }
