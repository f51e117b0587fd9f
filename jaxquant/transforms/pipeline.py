"""The activation-quantization transforms, composed: none, smooth, rotate, smoothrot.

Each is a pure function ``(params, cfg) -> (params, cfg)`` that leaves the float
model's output unchanged (up to rounding), meant to run before weight quantization
and together with activation / KV quantization (``ModelConfig.act_quant``,
``ModelConfig.kv_bits``):

* ``smooth`` (SmoothQuant, Xiao et al., 2023, Eq. 4): per-channel scales folded into
  the RMSNorms in front of q/k/v and gate/up, and into up_proj for the down_proj input
  (:mod:`jaxquant.transforms.smooth`);
* ``rotate`` (QuaRot, Ashkboos et al., 2024): norms fused, a random-sign Hadamard
  rotation of the residual stream folded into the weights
  (:func:`~jaxquant.transforms.rotation.random_hadamard_rotation`), and the online
  Hadamards on the down_proj and o_proj inputs and on queries/keys
  (:func:`~jaxquant.transforms.rotation.fold_online`);
* ``smoothrot`` (Czakó, Kertész, Szénási, SACI 2025, "SmoothRot"): SmoothQuant on the
  down_proj input, whose massive outliers a rotation alone spreads but does not remove,
  then ``rotate``. Smoothing the norm readers would be undone by fusing the norms, so
  only the down_proj input is smoothed; its alpha search measures the error after the
  online Hadamard.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jaxquant.models.config import ModelConfig
from jaxquant.params import flatten
from jaxquant.transforms.hadamard import hadamard_factorization
from jaxquant.transforms.rotation import (
    TransformError,
    check_online_sizes,
    check_rotatable,
    fold_online,
    random_hadamard_rotation,
)
from jaxquant.transforms.smooth import SITES, apply_smoothing, smoothing_scales

Params = dict[str, Any]
#: Transform names, for the CLI.
TRANSFORMS = ("none", "smooth", "rotate", "smoothrot")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformConfig:
    """Which transform to apply before quantization, and its settings."""

    kind: str = "none"  # one of TRANSFORMS
    alpha: float | None = 0.5  # SmoothQuant migration strength; None: searched per site
    seed: int = 0  # PRNG seed of the random Hadamard signs of the residual rotation
    online: bool = True  # rotate: also the online Hadamards (down_proj, o_proj, q/k, V)
    act_bits: int = 8  # alpha search: activation bits of the measured error
    weight_bits: int = 8  # alpha search: weight bits of the measured error
    sample_tokens: int = 2048  # alpha search: input rows sampled per layer
    batch_size: int = 8  # calibration windows per forward pass

    def __post_init__(self) -> None:
        if self.kind not in TRANSFORMS:
            raise TransformError(f"unknown transform {self.kind!r} (known: "
                                 f"{', '.join(TRANSFORMS)})")
        if self.alpha is not None and (isinstance(self.alpha, bool)
                                       or not isinstance(self.alpha, (int, float))
                                       or not 0.0 <= self.alpha <= 1.0):
            raise TransformError(f"alpha must be a number in [0, 1], got {self.alpha!r}")
        for name in ("act_bits", "weight_bits"):
            if getattr(self, name) not in range(2, 17):
                raise TransformError(f"{name} must be in 2..16, got {getattr(self, name)!r}")

    @property
    def smooths(self) -> bool:
        """True when the transform needs calibration data (SmoothQuant statistics)."""
        return self.kind in ("smooth", "smoothrot")

    @property
    def rotates(self) -> bool:
        """True when the residual stream is rotated."""
        return self.kind in ("rotate", "smoothrot")


def check_transform(params: Params, cfg: ModelConfig, tcfg: TransformConfig) -> None:
    """Raises :class:`TransformError` before any work if ``tcfg`` cannot apply."""
    if tcfg.kind == "none":
        return
    check_rotatable(flatten(params), cfg)
    if cfg.online_hadamard:
        raise TransformError("these weights are already rotated (online Hadamards folded)")
    if tcfg.rotates:
        try:
            hadamard_factorization(cfg.hidden_size)
        except ValueError as e:
            raise TransformError(f"rotation of hidden size {cfg.hidden_size}: {e}") from e
        if tcfg.online:
            check_online_sizes(cfg)


def apply_transform(params: Params, cfg: ModelConfig, tcfg: TransformConfig,
                    windows: np.ndarray | None = None) -> tuple[Params, ModelConfig, dict]:
    """Applies ``tcfg`` to float parameters.

    Args:
      params: Float parameters.
      cfg: Their model config.
      tcfg: The transform.
      windows: ``[n, seq]`` calibration token windows (smooth and smoothrot).

    Returns:
      ``(params, cfg, info)``: the transformed model and a JSON-able description
      (transform, alphas per site).

    Raises:
      TransformError: The transform cannot apply (see :func:`check_transform`) or
        calibration windows are missing.
    """
    check_transform(params, cfg, tcfg)
    info: dict[str, Any] = {"transform": tcfg.kind}
    if tcfg.kind == "none":
        return params, cfg, info
    if tcfg.smooths:
        if windows is None or len(windows) == 0:
            raise TransformError(f"{tcfg.kind} needs calibration windows")
        sites = tuple(SITES) if tcfg.kind == "smooth" else ("mlp.down_proj",)
        scales, alphas = smoothing_scales(
            params, cfg, windows, alpha=tcfg.alpha, sites=sites,
            rotate=tcfg.rotates and tcfg.online,
            act_bits=tcfg.act_bits, weight_bits=tcfg.weight_bits,
            sample_tokens=tcfg.sample_tokens, batch_size=tcfg.batch_size)
        params = apply_smoothing(params, cfg, scales)
        info["alpha"] = "searched" if tcfg.alpha is None else tcfg.alpha
        if tcfg.alpha is None:
            info["alphas"] = alphas
    if tcfg.rotates:
        if tcfg.online:
            params, cfg = fold_online(params, cfg)
        params, cfg = random_hadamard_rotation(params, cfg, jax.random.key(tcfg.seed))
        info["seed"] = tcfg.seed
        info["online_hadamard"] = tcfg.online
    return params, cfg, info
