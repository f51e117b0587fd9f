"""Pictures of where the bits went (mixed-precision bit allocation)."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from jaxquant.formats.base import QuantizedWeight
from jaxquant.formats.mixed import MixedWeight
from jaxquant.formats.uniform import UniformWeight
from jaxquant.params import flatten

_LAYER = re.compile(r"layers\.(\d+)\.(.+)\.weight")


def column_bits(q: QuantizedWeight) -> np.ndarray | None:
    """Code width of every input column of a uniform or mixed weight (None otherwise)."""
    if isinstance(q, UniformWeight):
        return np.full(q.shape[1], q.bits)
    if isinstance(q, MixedWeight) and all(isinstance(p, UniformWeight) for p in q.parts):
        return q.column_bits()
    return None


def bit_allocation(qparams: Any) -> dict[str, np.ndarray]:
    """``{"self_attn.q_proj": bits [blocks, in_features]}`` for every quantized block layer."""
    rows: dict[str, dict[int, np.ndarray]] = {}
    for path, q in flatten(qparams).items():
        m = _LAYER.fullmatch(path)
        if m is None or not isinstance(q, QuantizedWeight):
            continue
        bits = column_bits(q)
        if bits is not None:
            rows.setdefault(m.group(2), {})[int(m.group(1))] = bits
    out = {}
    for name, per_block in rows.items():
        n = max(per_block) + 1
        width = max(len(b) for b in per_block.values())
        grid = np.full((n, width), np.nan)
        for i, b in per_block.items():
            grid[i, :len(b)] = b
        out[name] = grid
    return out


def plot_bit_allocation(qparams: Any, path: str | Path, *, title: str = "") -> Path:
    """Draws each layer's bit width per input channel into a PNG (written atomically).

    One panel per linear layer kind (q/k/v/o, gate/up/down); rows are blocks, columns
    input channels in their original order, colour the code width.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap

    grids = bit_allocation(qparams)
    if not grids:
        raise ValueError("no quantized block layers to draw")
    lo = int(np.nanmin([np.nanmin(g) for g in grids.values()]))
    hi = int(np.nanmax([np.nanmax(g) for g in grids.values()]))
    levels = list(range(lo, hi + 1))
    cmap = ListedColormap(plt.get_cmap("viridis", len(levels))(range(len(levels))))
    norm = BoundaryNorm([b - 0.5 for b in levels] + [hi + 0.5], cmap.N)
    names = sorted(grids)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        g = grids[name]
        im = ax.imshow(g, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
        ax.set_title(f"{name}\navg {np.nanmean(g):.3f} bits", fontsize=9)
        ax.set_xlabel("input channel")
        ax.set_ylabel("block")
    fig.colorbar(im, ax=axes[0].tolist(), ticks=levels, label="bits", fraction=0.02)
    if title:
        fig.suptitle(title)
    return save_png(fig, path, dpi=110)


def save_png(fig: Any, path: str | Path, *, dpi: int = 100) -> Path:
    """Writes a matplotlib figure as a PNG atomically (temp file renamed) and closes it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.absolute().parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
