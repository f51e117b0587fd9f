"""Pictures of the quantization-difficulty analysis (:mod:`jaxquant.eval.analysis`).

The figures of Czakó, Kertész, Szénási, "Turning LLM Activations
Quantization-Friendly" (SACI 2025), drawn from an analysis report (the dict
:func:`~jaxquant.eval.analysis.analyze` returns, or ``analysis.json`` read back):

* ``channels_<layer>.png``: per-channel norms ``c_j`` of a layer's input (top row) and
  of its weight per input channel (bottom row), one column per variant on a shared y
  scale, so outlier channels are seen to flatten after smoothing / rotation;
* ``metric_across_layers.png``: the channel difficulty of the inputs (top row) and
  weights (bottom row) by block, one panel per layer kind, one line per variant;
* ``layer_error_across_layers.png``: the relative layer error by block, measured
  (solid) against its analytic estimate (dashed).

Every file is written atomically (a temp file renamed over the target), with the
Agg backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxquant.eval.analysis import kind_order, split_path
from jaxquant.eval.plots import save_png

_SHORT = {"self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj",
          "self_attn.v_proj": "v_proj", "self_attn.o_proj": "o_proj",
          "mlp.gate_proj": "gate_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "down_proj"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_kind_figure(report: Mapping[str, Any], rows: int, height: float
                    ) -> tuple[dict[str, Any], list[str], list[dict[str, Any]], Any, Any]:
    """``(variants, kinds, styles, fig, axes)``: one column of panels per layer kind."""
    variants = _variants(report)
    kinds = _kinds(variants)
    fig, axes = _plt().subplots(rows, len(kinds), figsize=(3.0 * len(kinds) + 0.6, height),
                                squeeze=False)
    return variants, kinds, _styles(len(variants)), fig, axes


def _variants(report: Mapping[str, Any]) -> dict[str, Any]:
    variants = report.get("variants") if isinstance(report, Mapping) else None
    if not variants:
        raise ValueError("the analysis report has no variants to draw")
    return dict(variants)


def _out_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _f(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3g}"


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _styles(n: int) -> list[dict[str, Any]]:
    """Colour, marker and size per variant; later ones smaller, so coinciding lines show."""
    cmap = _plt().get_cmap("tab10")
    return [{"color": cmap(i % 10), "marker": _MARKERS[i % len(_MARKERS)],
             "markersize": max(7.0 - 1.2 * i, 2.5), "linewidth": max(2.2 - 0.4 * i, 0.8)}
            for i in range(n)]


def _block_axis(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("block")


def _log_if_positive(ax: Any, values: Sequence[float]) -> None:
    if any(np.isfinite(v) and v > 0 for v in values):
        ax.set_yscale("log")


def plot_channel_magnitudes(report: Mapping[str, Any], out_dir: str | Path, *,
                            layers: Sequence[str] | None = None) -> list[Path]:
    """One PNG per detail layer: per-channel norms ``c_j``, one column per variant.

    Top row: the norms of the layer's input channels over the sampled tokens, with the
    channel difficulty (their std) in the title; bottom row: the weight's input-channel
    norms. Each row shares its y scale across variants. The dashed line is the mean.

    Args:
      report: An analysis report (:func:`jaxquant.eval.analysis.analyze`).
      out_dir: Directory for ``channels_<layer path>.png`` (created if missing).
      layers: Detail layer paths to draw (None: every detail layer of any variant).

    Returns:
      The written files, in layer order.
    """
    plt = _plt()
    variants = _variants(report)
    available = {p for v in variants.values() for p in v.get("detail", {})}
    if layers is None:
        paths = sorted(available, key=lambda p: (split_path(p)[0], kind_order(split_path(p)[1])))
    else:
        paths = list(layers)
        missing = [p for p in paths if p not in available]
        if missing:
            raise ValueError(f"no per-channel norms in the report for {missing} "
                             f"(detail layers: {sorted(available)})")
    out = _out_dir(out_dir)
    names = list(variants)
    written = []
    for path in paths:
        fig, axes = plt.subplots(2, len(names), figsize=(3.6 * len(names) + 0.6, 5.6),
                                 squeeze=False, sharey="row")
        for col, name in enumerate(names):
            v = variants[name]
            d = v.get("detail", {}).get(path)
            row = v.get("layers", {}).get(path, {})
            for r, (key, metric, label) in enumerate((
                    ("act_norms", "act_metric", "activation"),
                    ("weight_norms", "weight_metric", "weight"))):
                ax = axes[r, col]
                if d is None:
                    ax.text(0.5, 0.5, "not analyzed", ha="center", va="center",
                            transform=ax.transAxes)
                    ax.set_title(name, fontsize=9)
                    continue
                c = np.asarray(d[key], dtype=float)
                ax.vlines(np.arange(len(c)), 0, c, linewidth=0.8, color=f"C{col % 10}")
                ax.axhline(float(np.mean(c)), color="k", linestyle="--", linewidth=0.7)
                cv = float(np.std(c) / np.mean(c)) if np.mean(c) > 0 else None
                ax.set_title(f"{name}\n{label} metric {_fmt(row.get(metric))} "
                             f"(std/mean {_fmt(cv)})", fontsize=9)
                ax.set_xlabel("input channel")
                ax.set_xlim(-0.5, len(c) - 0.5)
                if col == 0:
                    ax.set_ylabel(f"{label} channel norm $c_j$")
        fig.suptitle(f"{path}: per-channel norms", fontsize=11)
        fig.tight_layout()
        written.append(save_png(fig, out / f"channels_{path}.png"))
    return written


def _series(variants: Mapping[str, Any], kind: str, key: str) -> dict[str, tuple[list, list]]:
    """``{variant: (blocks, values)}`` of ``key`` for layers of ``kind``, by block."""
    out = {}
    for name, v in variants.items():
        rows = sorted((r["block"], _f(r.get(key))) for r in v.get("layers", {}).values()
                      if r["kind"] == kind)
        out[name] = ([b for b, _ in rows], [x for _, x in rows])
    return out


def _kinds(variants: Mapping[str, Any]) -> list[str]:
    kinds = {r["kind"] for v in variants.values() for r in v.get("layers", {}).values()}
    if not kinds:
        raise ValueError("the analysis report has no layers to draw")
    return sorted(kinds, key=kind_order)


def plot_metric_across_layers(report: Mapping[str, Any], out_dir: str | Path) -> Path:
    """``metric_across_layers.png``: channel difficulty by block, per layer kind.

    One panel per layer kind (q/k/v/o, gate/up/down), x the block index, y the metric
    (log scale), one line per variant; top row the input (activation) metric, bottom
    row the weight metric (SmoothQuant moves difficulty from one to the other).

    Args:
      report: An analysis report (:func:`jaxquant.eval.analysis.analyze`).
      out_dir: Output directory (created if missing).

    Returns:
      The written file.
    """
    variants, kinds, styles, fig, axes = _by_kind_figure(report, 2, 6.0)
    for col, kind in enumerate(kinds):
        for r, (key, label) in enumerate((("act_metric", "input"),
                                          ("weight_metric", "weight"))):
            ax = axes[r, col]
            values = []
            for style, (name, (xs, ys)) in zip(styles, _series(variants, kind, key).items(),
                                               strict=True):
                ax.plot(xs, ys, label=name, **style)
                values += ys
            _log_if_positive(ax, values)
            ax.set_title(f"{_SHORT.get(kind, kind)} {label}", fontsize=9)
            _block_axis(ax)
            if col == 0:
                ax.set_ylabel(f"{label} channel difficulty")
    axes[0, 0].legend(fontsize=8)
    settings = report.get("settings", {})
    fig.suptitle("channel difficulty (std of per-channel L2 norms) by block"
                 + (f", {settings['tokens']} tokens" if "tokens" in settings else ""),
                 fontsize=11)
    fig.tight_layout()
    return save_png(fig, _out_dir(out_dir) / "metric_across_layers.png")


def plot_layer_error_across_layers(report: Mapping[str, Any], out_dir: str | Path) -> Path:
    """``layer_error_across_layers.png``: relative layer error by block, per layer kind.

    ``||X W^T - Q(X) Q(W)^T||_F^2 / ||X W^T||_F^2`` measured (solid) and its analytic
    estimate (dashed), one colour per variant, log scale.

    Args:
      report: An analysis report (:func:`jaxquant.eval.analysis.analyze`).
      out_dir: Output directory (created if missing).

    Returns:
      The written file.
    """
    variants, kinds, styles, fig, axes = _by_kind_figure(report, 1, 3.8)
    measured = {k: _series(variants, k, "relative_error") for k in kinds}
    estimated = {k: _series(variants, k, "relative_error_estimate") for k in kinds}
    for col, kind in enumerate(kinds):
        ax = axes[0, col]
        values = []
        for style, name in zip(styles, variants, strict=True):
            xs, ys = measured[kind][name]
            ex, ey = estimated[kind][name]
            ax.plot(xs, ys, label=name, **style)
            ax.plot(ex, ey, linestyle="--", color=style["color"],
                    linewidth=style["linewidth"] * 0.7)
            values += ys + ey
        _log_if_positive(ax, values)
        ax.set_title(_SHORT.get(kind, kind), fontsize=9)
        _block_axis(ax)
        if col == 0:
            ax.set_ylabel("relative layer error")
    axes[0, 0].legend(fontsize=7)
    settings = report.get("settings", {})
    bits = (f" (W{settings['weight_bits']}A{settings['act_bits']} min-max RTN)"
            if {"weight_bits", "act_bits"} <= set(settings) else "")
    fig.suptitle("relative layer error by block, measured (solid) vs estimate (dashed)" + bits,
                 fontsize=11)
    fig.tight_layout()
    return save_png(fig, _out_dir(out_dir) / "layer_error_across_layers.png")


def plot_all(report: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """Every analysis figure into ``out_dir``: channel magnitudes, metric and error.

    Args:
      report: An analysis report (:func:`jaxquant.eval.analysis.analyze`).
      out_dir: Output directory (created if missing).

    Returns:
      The written files.
    """
    return [*plot_channel_magnitudes(report, out_dir), plot_metric_across_layers(report, out_dir),
            plot_layer_error_across_layers(report, out_dir)]
