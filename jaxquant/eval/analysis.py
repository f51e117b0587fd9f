"""Quantization-difficulty analysis of linear-layer inputs and weights, per transform.

The diagnostics of smooth-then-rotate (Czakó, Kertész, Szénási, "Turning LLM
Activations Quantization-Friendly", SACI 2025), measured on every block linear layer
of one or more variants of a model (typically the float model, SmoothQuant, a
Hadamard rotation and smooth-then-rotate, each already transformed):

* the **channel difficulty** of the layer input ``X [tokens, in]``: the population std
  of the per-channel norms ``c_j = ||X[:, j]||_2``
  (:func:`~jaxquant.algorithms.act_quant.channel_difficulty`), and the same for the
  weight ``W [out, in]`` per input channel;
* the **layer error** ``||X W^T - Q(X) Q(W)^T||_F^2`` with per-row min-max RTN on
  both sides, and its analytic estimate ``(||W||_F^2 sum Δ_x^2 + ||X||_F^2 sum
  Δ_w^2) / 12`` (:func:`~jaxquant.algorithms.act_quant.layer_error`,
  :func:`~jaxquant.algorithms.act_quant.layer_error_estimate`), both also relative to
  ``||X W^T||_F^2``.

The model is walked block by block on calibration windows, as
:func:`jaxquant.transforms.smooth.activation_absmax` does: the inputs of every linear
layer are captured *inside* the block's forward (:func:`jaxquant.calibration.
collect_inputs`), so they are exactly what the layer sees, including any online
rotation a variant's config applies before ``o_proj`` / ``down_proj``. Run-time
activation / KV-cache quantization in a config is switched off (:func:`float_config`):
the analysis quantizes the float inputs itself, and float activations flow from block
to block, so every variant is measured on its own float function. The metrics
are computed on a strided sample of ``sample_tokens`` input rows per layer (the same
rows for every layer and variant, so values are comparable across them; the norms
``c_j`` grow with the number of rows). Memory: one block's activations of the windows
at a time, as in sequential calibration.

The report (:func:`analyze`, written by :func:`write_report` as ``analysis.json``)::

    {"settings": {"paper", "act_bits", "weight_bits", "quantizer", "act_metric",
                  "weight_metric", "windows", "seq_len", "tokens", "sample_tokens",
                  "batch_size", "layers" (block indices or null), "detail" (paths or null)},
     "variants": {name: {
         "config": the variant's ModelConfig as a dict,
         "runtime_quantization_ignored": config fields turned off (e.g. ["act_quant"]),
         "layers": {"layers.3.mlp.down_proj": {
             "block", "kind" ("mlp.down_proj"), "in_features", "out_features",
             "rows" (sampled input rows the numbers below are over),
             "act_metric", "weight_metric" (channel difficulty of X and of W),
             "act_norm_mean", "weight_norm_mean" (mean of the c_j),
             "layer_error", "layer_error_estimate", "output_norm_sq" (||X W^T||_F^2),
             "relative_error", "relative_error_estimate" (the two over output_norm_sq),
             "act_absmax_max" (max |X| over *all* tokens)}, ...},
         "detail": {path: {"act_norms": [c_j], "weight_norms": [c_j]}, ...},
         "summary": {"layers", "mean_act_metric", "mean_weight_metric",
                     "mean_relative_error", "mean_relative_error_estimate",
                     "total_layer_error", "total_layer_error_estimate",
                     "total_output_norm_sq", "total_relative_error", "max_act_absmax",
                     "by_kind": {kind: {"layers", "mean_act_metric", "mean_weight_metric",
                                        "mean_relative_error",
                                        "mean_relative_error_estimate"}}}}}}

Layers are listed in forward order (block, then q/k/v/o/gate/up/down); numbers that
are not finite are ``null``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.algorithms.act_quant import (
    channel_difficulty,
    channel_norms,
    layer_error,
    layer_error_estimate,
)
from jaxquant.calibration import float_block_inputs
from jaxquant.errors import DataError
from jaxquant.models.config import ModelConfig
from jaxquant.params import flatten

PAPER = ("Czakó, Kertész, Szénási, \"Turning LLM Activations Quantization-Friendly\", "
         "SACI 2025")
#: Order of the linear layer kinds inside a block (others sort after, by name).
KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
#: Kinds whose per-channel norms are kept for the default detail blocks.
DETAIL_KINDS = ("self_attn.q_proj", "mlp.down_proj")
_PATH = re.compile(r"layers\.(\d+)\.(.+)")
_HI = jax.lax.Precision.HIGHEST


def kind_order(kind: str) -> tuple[int, str]:
    """Sort key of a layer kind (``self_attn.q_proj``): block order, then by name."""
    return (KINDS.index(kind) if kind in KINDS else len(KINDS), kind)


def _path_order(path: str) -> tuple[int, tuple[int, str]]:
    block, kind = split_path(path)
    return block, kind_order(kind)


def split_path(path: str) -> tuple[int, str]:
    """``"layers.3.mlp.down_proj"`` -> ``(3, "mlp.down_proj")``."""
    m = _PATH.fullmatch(path)
    if m is None:
        raise ValueError(f"not a block layer path: {path!r} (expected e.g. "
                         f"'layers.0.mlp.down_proj')")
    return int(m.group(1)), m.group(2)


@functools.partial(jax.jit, static_argnames=("act_bits", "weight_bits"))
def _layer_metrics(x: jax.Array, w: jax.Array, act_bits: int, weight_bits: int
                   ) -> dict[str, jax.Array]:
    """All per-layer numbers of one ``(X [m, in], W [out, in])`` pair, in one program."""
    xf, wf = x.astype(jnp.float32), w.astype(jnp.float32)
    y = jnp.matmul(xf, wf.T, precision=_HI)
    return {
        "act_norms": channel_norms(xf),
        "weight_norms": channel_norms(wf),
        "act_metric": channel_difficulty(xf),
        "weight_metric": channel_difficulty(wf),
        "layer_error": layer_error(xf, wf, act_bits, weight_bits),
        "layer_error_estimate": layer_error_estimate(xf, wf, act_bits, weight_bits),
        "output_norm_sq": jnp.sum(y * y),
        "x_finite": jnp.all(jnp.isfinite(xf)),
        "w_finite": jnp.all(jnp.isfinite(wf)),
    }


def _num(v: Any) -> float | None:
    """A JSON number: a Python float, or None where it is not finite."""
    f = float(v)
    return f if math.isfinite(f) else None


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None:
        return None
    if den <= 0:
        return 0.0 if num == 0 else None
    return num / den


def _jsonable(v: Any) -> Any:
    """Config values as JSON (tuples as lists, anything unknown as its string)."""
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float):
        return _num(v)
    if v is None or isinstance(v, (bool, int, str)):
        return v
    return str(v)


def _config_dict(cfg: ModelConfig) -> dict[str, Any]:
    try:
        return _jsonable(cfg.to_dict())
    except Exception:  # a config another module extended with unusual fields
        return _jsonable({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})


def _check_windows(windows: Any, variants: Mapping[str, tuple[Any, ModelConfig]]) -> np.ndarray:
    w = np.asarray(windows)
    if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
        raise DataError(f"windows must be a non-empty [n, seq] array of token ids, got "
                        f"shape {w.shape}")
    if not np.issubdtype(w.dtype, np.integer):
        raise DataError(f"windows must hold integer token ids, got dtype {w.dtype}")
    lo, hi = int(w.min()), int(w.max())
    for name, (_, cfg) in variants.items():
        if lo < 0 or hi >= cfg.vocab_size:
            raise DataError(f"windows hold token ids in [{lo}, {hi}], outside the vocabulary "
                            f"of variant {name!r} (size {cfg.vocab_size})")
    return w.astype(np.int32)


def _check_variants(variants: Any) -> dict[str, tuple[Any, ModelConfig]]:
    if not isinstance(variants, Mapping) or not variants:
        raise ValueError("analyze needs at least one variant: a mapping name -> "
                         "(params, ModelConfig)")
    out = {}
    for name, value in variants.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"variant names must be non-empty strings, got {name!r}")
        if (not isinstance(value, (tuple, list)) or len(value) != 2
                or not isinstance(value[1], ModelConfig)):
            raise ValueError(f"variant {name!r} must be a (params, ModelConfig) pair")
        params, cfg = value
        if not isinstance(params, Mapping) or "layers" not in params:
            raise ValueError(f"variant {name!r}: params must be a jaxquant parameter tree "
                             f"(a dict with 'layers')")
        out[name] = (params, cfg)
    return out


def _bits(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 16:
        raise ValueError(f"{name} must be an int in 1..16, got {v!r}")
    return v


def _default_detail(blocks: Sequence[int]) -> list[str]:
    """First, middle and last analyzed block; q_proj and down_proj inputs."""
    picks = sorted({blocks[0], blocks[len(blocks) // 2], blocks[-1]})
    return [f"layers.{b}.{k}" for b in picks for k in DETAIL_KINDS]


#: Config fields that quantize activations / the KV cache at run time (when the config
#: has them): switched off for the analysis, which applies its own quantizer to float
#: inputs and propagates float activations from block to block.
RUNTIME_QUANT_FIELDS = ("act_quant", "kv_bits")


def float_config(cfg: ModelConfig) -> tuple[ModelConfig, list[str]]:
    """``cfg`` without run-time activation / KV quantization, and the fields turned off.

    Function-preserving run-time transforms (e.g. online Hadamards) are kept.
    """
    names = {f.name for f in dataclasses.fields(cfg)}
    off = [f for f in RUNTIME_QUANT_FIELDS if f in names and getattr(cfg, f) is not None]
    return (dataclasses.replace(cfg, **dict.fromkeys(off)) if off else cfg), off


def _block_weights(block: Any) -> dict[str, Any]:
    """``{"mlp.down_proj": W}`` for every linear layer of a block (``*proj.weight``)."""
    return {p.removesuffix(".weight"): w for p, w in flatten(block).items()
            if p.endswith("proj.weight")}


def _float_weight(name: str, path: str, w: Any) -> jax.Array:
    if not (hasattr(w, "dtype") and hasattr(w, "ndim") and w.ndim == 2
            and jnp.issubdtype(w.dtype, jnp.floating)):
        raise ValueError(f"variant {name!r}: {path}.weight is not a float [out, in] array "
                         f"({type(w).__name__}); analyze float (transformed, unquantized) "
                         f"parameters")
    return jnp.asarray(w)


def _summary(layers: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    def mean(key: str, rows: Sequence[Mapping[str, Any]]) -> float | None:
        vals = [r[key] for r in rows if r[key] is not None]
        return float(np.mean(vals)) if vals else None

    def total(key: str, rows: Sequence[Mapping[str, Any]]) -> float | None:
        vals = [r[key] for r in rows]
        return None if any(v is None for v in vals) else float(sum(vals))

    rows = list(layers.values())
    out: dict[str, Any] = {"layers": len(rows)}
    for key in ("act_metric", "weight_metric", "relative_error", "relative_error_estimate"):
        out["mean_" + key] = mean(key, rows)
    for key in ("layer_error", "layer_error_estimate", "output_norm_sq"):
        out["total_" + key] = total(key, rows)
    out["total_relative_error"] = _ratio(out["total_layer_error"], out["total_output_norm_sq"])
    out["max_act_absmax"] = max((r["act_absmax_max"] for r in rows
                                 if r["act_absmax_max"] is not None), default=None)
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in sorted({r["kind"] for r in rows}, key=kind_order):
        sub = [r for r in rows if r["kind"] == kind]
        by_kind[kind] = {"layers": len(sub),
                         **{"mean_" + k: mean(k, sub) for k in
                            ("act_metric", "weight_metric", "relative_error",
                             "relative_error_estimate")}}
    out["by_kind"] = by_kind
    return out


def _analyze_variant(name: str, params: Any, cfg: ModelConfig, windows: np.ndarray, *,
                     act_bits: int, weight_bits: int, layers: list[int] | None,
                     detail: list[str] | None, batch_size: int, sample_tokens: int,
                     bar: Any) -> dict[str, Any]:
    original, (cfg, ignored) = cfg, float_config(cfg)
    blocks = list(range(cfg.num_layers)) if layers is None else layers
    bad = [b for b in blocks if b >= cfg.num_layers]
    if bad:
        raise ValueError(f"variant {name!r} has {cfg.num_layers} blocks; cannot analyze "
                         f"block(s) {bad}")
    detail_paths = _default_detail(blocks) if detail is None else detail
    out_layers: dict[str, dict[str, Any]] = {}
    out_detail: dict[str, dict[str, list[float]]] = {}
    walk = float_block_inputs(params, cfg, windows, batch_size=batch_size,
                              sample_tokens=sample_tokens, blocks=blocks)
    for layer, block, stats in walk:
        weights = _block_weights(block)
        if not weights:
            raise ValueError(f"variant {name!r}: block {layer} has no linear layers "
                             f"(*proj.weight)")
        weights = {k: _float_weight(name, f"layers.{layer}.{k}", w)
                   for k, w in sorted(weights.items(), key=lambda kw: kind_order(kw[0]))}
        results = {}
        for kind, w in weights.items():
            st = stats.get(kind + ".weight")
            if st is None or st.sample is None:
                raise ValueError(f"variant {name!r}: the forward of block {layer} did not "
                                 f"capture the input of {kind}")
            results[kind] = {"absmax": st.absmax,
                             **_layer_metrics(st.sample, w, act_bits, weight_bits)}
        results = jax.device_get(results)  # one transfer per block (keys re-sorted)
        for kind in weights:  # block order
            m = results[kind]
            path = f"layers.{layer}.{kind}"
            amax = np.asarray(m["absmax"])
            shape = weights[kind].shape
            if not (bool(m["x_finite"]) and np.all(np.isfinite(amax))):
                raise DataError(f"variant {name!r}: non-finite activations (NaN or Inf) at "
                                f"the input of {path}; check the parameters of this "
                                f"variant")
            if not bool(m["w_finite"]):
                raise ValueError(f"variant {name!r}: {path}.weight holds NaN or Inf")
            err, est = _num(m["layer_error"]), _num(m["layer_error_estimate"])
            ref = _num(m["output_norm_sq"])
            out_layers[path] = {
                "block": layer,
                "kind": kind,
                "in_features": int(shape[1]),
                "out_features": int(shape[0]),
                "rows": int(stats[kind + ".weight"].sample.shape[0]),
                "act_metric": _num(m["act_metric"]),
                "weight_metric": _num(m["weight_metric"]),
                "act_norm_mean": _num(np.mean(m["act_norms"])),
                "weight_norm_mean": _num(np.mean(m["weight_norms"])),
                "layer_error": err,
                "layer_error_estimate": est,
                "output_norm_sq": ref,
                "relative_error": _ratio(err, ref),
                "relative_error_estimate": _ratio(est, ref),
                "act_absmax_max": _num(amax.max()),
            }
            if path in detail_paths:
                out_detail[path] = {
                    "act_norms": [float(v) for v in np.asarray(m["act_norms"])],
                    "weight_norms": [float(v) for v in np.asarray(m["weight_norms"])]}
        if bar is not None:
            bar.update(1)
    missing = [p for p in detail_paths if p not in out_detail]
    if missing and detail is not None:
        raise ValueError(f"variant {name!r}: detail layer(s) {missing} were not analyzed "
                         f"(layers analyzed: blocks {blocks})")
    ordered = dict(sorted(out_detail.items(), key=lambda kv: _path_order(kv[0])))
    return {"config": _config_dict(original), "runtime_quantization_ignored": ignored,
            "layers": out_layers, "detail": ordered, "summary": _summary(out_layers)}


def analyze(variants: Mapping[str, tuple[Any, ModelConfig]], windows: np.ndarray, *,
            act_bits: int = 4, weight_bits: int = 4, layers: Sequence[int] | None = None,
            detail: Sequence[str] | None = None, batch_size: int = 8,
            sample_tokens: int = 2048, progress: bool = False) -> dict[str, Any]:
    """Measures how hard every block linear layer is to quantize, for each variant.

    The channel difficulty metric and the layer error with its analytic estimate of
    Czakó, Kertész, Szénási, "Turning LLM Activations Quantization-Friendly" (SACI
    2025), on the inputs each layer really sees in the forward pass of each variant.

    Args:
      variants: Name -> ``(float params, ModelConfig)``, each already transformed
        (e.g. ``none``, ``smooth``, ``rotate``, ``smoothrot``); configs may differ.
        Online rotations a config asks for are run; its run-time activation and KV
        quantization (``act_quant``, ``kv_bits``) are not (:func:`float_config`).
      windows: ``[n, seq]`` integer token windows (calibration text).
      act_bits: Bits of the per-token min-max RTN of the layer inputs.
      weight_bits: Bits of the per-output-row min-max RTN of the weights.
      layers: Block indices to analyze (None: all); earlier blocks are still run to
        compute their inputs, later ones are not.
      detail: Layer paths (``layers.0.mlp.down_proj``) whose per-channel norms are
        kept for plotting (None: q_proj and down_proj of the first, middle and last
        analyzed block).
      batch_size: Windows per forward pass.
      sample_tokens: Input rows sampled (strided) per layer for the metrics.
      progress: Show a progress bar over blocks.

    Returns:
      A JSON-serializable dict ``{"settings": {...}, "variants": {name: {"config",
      "layers": {path: {...}}, "detail": {path: {"act_norms", "weight_norms"}},
      "summary": {...}}}}``, described in the module docstring; non-finite numbers
      are None.

    Raises:
      DataError: Bad windows (shape, dtype, token ids outside a vocabulary), or a
        variant producing non-finite activations.
      ValueError: No variants, bad settings, quantized or non-finite weights.
    """
    variants = _check_variants(variants)
    win = _check_windows(windows, variants)
    act_bits, weight_bits = _bits("act_bits", act_bits), _bits("weight_bits", weight_bits)
    for what, v in (("batch_size", batch_size), ("sample_tokens", sample_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{what} must be a positive int, got {v!r}")
    blocks: list[int] | None = None
    if layers is not None:
        blocks = sorted({int(b) for b in layers})
        if not blocks or blocks[0] < 0:
            raise ValueError(f"layers must be non-empty block indices >= 0, got {list(layers)}")
    detail_list: list[str] | None = None
    if detail is not None:
        detail_list = list(detail)
        for p in detail_list:
            b, _ = split_path(p)
            if blocks is not None and b not in blocks:
                raise ValueError(f"detail layer {p!r} is in block {b}, which is not analyzed "
                                 f"(layers={blocks})")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(len(blocks) if blocks else cfg.num_layers for _, cfg in variants.values())
        bar = tqdm(total=total, desc="analyze", unit="block", leave=False)
    try:
        out = {}
        for name, (params, cfg) in variants.items():
            if bar is not None:
                bar.set_postfix_str(name)
            out[name] = _analyze_variant(
                name, params, cfg, win, act_bits=act_bits, weight_bits=weight_bits,
                layers=blocks, detail=detail_list, batch_size=batch_size,
                sample_tokens=sample_tokens, bar=bar)
    finally:
        if bar is not None:
            bar.close()
    settings = {
        "paper": PAPER,
        "act_bits": act_bits,
        "weight_bits": weight_bits,
        "quantizer": "per-row asymmetric min-max RTN: per token for X, per output row for W",
        "act_metric": "std (ddof=0) of per-channel L2 norms of the sampled layer inputs",
        "weight_metric": "std (ddof=0) of per-input-channel L2 norms of W",
        "windows": int(win.shape[0]),
        "seq_len": int(win.shape[1]),
        "tokens": int(win.size),
        "sample_tokens": sample_tokens,
        "batch_size": batch_size,
        "layers": blocks,
        "detail": detail_list,
    }
    return {"settings": settings, "variants": out}


def write_report(report: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Writes ``report`` to ``out_dir/analysis.json`` atomically (temp file + rename).

    Args:
      report: What :func:`analyze` returned.
      out_dir: Directory (created if missing).

    Returns:
      The path of ``analysis.json``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "analysis.json"
    text = json.dumps(report, indent=1, allow_nan=False)
    fd, tmp = tempfile.mkstemp(suffix=".json.tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
