"""``jaxquant info``: what a model is, from its config and files, without loading weights."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from jaxquant.checkpoints import jq_checkpoint
from jaxquant.checkpoints.load import open_source, resolve
from jaxquant.errors import CheckpointError, ConfigError, JaxquantError
from jaxquant.models.config import ModelConfig, from_hf_config
from jaxquant.recipes import Recipe


def _disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _describe_layout(spec: dict[str, Any]) -> str:
    name = spec.get("format", "?")
    parts = [name]
    if "bits" in spec:
        parts.append(f"{spec['bits']}-bit")
    if "group_size" in spec and "shape" in spec:
        per_channel = spec["group_size"] >= spec["shape"][1]
        parts.append("per-channel" if per_channel else f"g{spec['group_size']}")
    for child in ("base", "parts"):
        if child in spec:
            kids = spec[child] if isinstance(spec[child], list) else [spec[child]]
            parts.append("[" + ", ".join(_describe_layout(k) for k in kids) + "]")
    return " ".join(parts)


def _quantized_info(meta: dict[str, Any]) -> dict[str, Any]:
    """Layout of a quantized checkpoint: rules, storage account, formats by count."""
    layout = meta.get("quantized_layout") or {}
    if not layout:
        return {}
    counts = Counter(_describe_layout(spec) for spec in layout.values())
    out: dict[str, Any] = {"quantized": f"{len(layout)} layers: " + "; ".join(
        f"{n} x {desc}" for desc, n in counts.most_common())}
    q = meta.get("quantization") or {}
    try:
        recipe = Recipe.from_dict(q["recipe"])
        out["recipe"] = "; ".join(
            f"{r.pattern} -> {r.spec.describe() if r.spec else 'float'}" for r in recipe.rules)
    except (KeyError, TypeError, JaxquantError):
        pass
    if q.get("avg_bits") is not None:
        out["avg_bits"] = round(float(q["avg_bits"]), 4)
    if q.get("quantized_bytes") is not None:
        out["bytes_quantized"] = q["quantized_bytes"]
    return out


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
        extra.update(_quantized_info(meta))
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
