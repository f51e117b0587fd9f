"""Activation and KV-cache quantization, the W8A8 integer matmul, and outlier diagnostics.

Pure array math for the activation side of W4A4 / W8A8 quantization (no model plumbing):

* **Activations**, last axis = channels, one scale per token (row), computed at run
  time ("dynamic per-token", QuaRot: Ashkboos et al., 2024, arXiv 2404.00456, Sec. 4;
  its 4-bit activations clip the range to 0.9 of the row's max), or one scale for the
  whole tensor fixed from calibration data ("static per-tensor", SmoothQuant: Xiao et
  al., 2023, arXiv 2211.10438, Sec. 3/5). With ``b`` bits and clip ratio ``c``:

  - symmetric, *narrow* signed range: ``qmax = 2**(b-1) - 1``,
    ``s = c max|x| / qmax``, ``q = clip(round(x / s), -qmax, qmax)`` (int8 codes; the
    code ``-2**(b-1)`` is never produced, so the grid is symmetric, ``-q`` is always a
    code, and an int8 x int8 product is at most ``127**2``), ``x' = s q``;
  - asymmetric (dynamic only): ``lo = c min(min x, 0)``, ``hi = c max(max x, 0)``,
    ``s = (hi - lo) / (2**b - 1)``, ``z = round(-lo / s)``,
    ``q = clip(round(x / s) + z, 0, 2**b - 1)`` (uint8 codes), ``x' = s (q - z)``.
    The range contains 0, so 0 is exactly a code (QuaRot's ``ActQuantizer``).

  Inside ``[lo, hi]`` (``[-c max|x|, c max|x|]``) every value is within ``s / 2`` of
  its reconstruction; outside it the code saturates at the end of the range.

* **KV cache** (:func:`quantize_kv`): asymmetric min-max per token and head over
  ``head_dim`` (KIVI: Liu et al., 2024, arXiv 2402.02750, its per-token value
  quantization; QuaRot quantizes K and V this way, per head), ``uint8`` codes.

* **W8A8 matmul** (:func:`int8_matmul`): int8 x int8 -> int32 ``dot_general``, then one
  float rescale by the per-token activation scale and the per-output-channel weight
  scale (SmoothQuant's W8A8 GEMM; LLM.int8(): Dettmers et al., 2022, Eq. 3).

* **Diagnostics** of smooth-then-rotate (Czakó, Kertész, Szénási, "Turning LLM
  Activations Quantization-Friendly", SACI 2025): the channel difficulty metric
  (std of per-channel L2 norms) and the layer error
  ``||X W^T - Q(X) Q(W)^T||_F^2`` with its analytic estimate.

Non-finite input: a token (row, or KV group) that holds any NaN or +-Inf gets scale
NaN and codes 0, so it dequantizes to all NaN (in both dynamic and static modes);
the other tokens are unaffected. Nothing non-finite is turned into finite values.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

_TINY = float(jnp.finfo(jnp.float32).tiny)  # smallest normal float32: floor of a scale
_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, kw_only=True)
class ActQuantConfig:
    """How activations are quantized (see the module docstring for the formulas)."""

    bits: int = 8  # code width, 2..8 (4: W4A4, 8: W8A8)
    symmetric: bool = True  # narrow signed range around 0 (int8 codes); else uint8 + zero
    clip_ratio: float = 1.0  # range = ratio * max|x| (or ratio * [min, max]); QuaRot 4-bit: 0.9
    dynamic: bool = True  # per-token scales at run time; False: one static per-tensor scale

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ValueError(f"bits must be an int in 2..8, got {self.bits!r}")
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8 (codes are stored in 8-bit integers), "
                             f"got {self.bits}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be a bool, got {self.symmetric!r}")
        if not isinstance(self.dynamic, bool):
            raise ValueError(f"dynamic must be a bool, got {self.dynamic!r}")
        if (isinstance(self.clip_ratio, bool) or not isinstance(self.clip_ratio, (int, float))
                or not math.isfinite(self.clip_ratio) or not 0 < self.clip_ratio <= 1):
            raise ValueError(f"clip_ratio must be a float in (0, 1], got {self.clip_ratio!r}")
        if not self.dynamic and not self.symmetric:
            raise ValueError("static (per-tensor) activation quantization is symmetric only: "
                             "set symmetric=True or dynamic=True")

    @property
    def qmax(self) -> int:
        """Largest code: ``2**(b-1) - 1`` (symmetric, codes ``-qmax..qmax``) or ``2**b - 1``."""
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1


def _finite_rows(x: jax.Array, axis: int = -1) -> tuple[jax.Array, jax.Array]:
    """``(x with non-finite values set to 0, bad)``; ``bad`` marks rows holding any."""
    fin = jnp.isfinite(x)
    return jnp.where(fin, x, 0.0), ~jnp.all(fin, axis=axis, keepdims=True)


def _sym_scale(amax: jax.Array, cfg: ActQuantConfig) -> jax.Array:
    """``c amax / qmax``, floored at the smallest normal float; 1 where ``amax == 0``."""
    s = jnp.maximum(cfg.clip_ratio * amax / cfg.qmax, _TINY)
    return jnp.where(amax > 0, s, 1.0)


@functools.partial(jax.jit, static_argnames=("cfg",))
def quantize_activations(x: jax.Array, cfg: ActQuantConfig, *, scale: jax.Array | None = None
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Quantize activations ``x [..., channels]`` (any float dtype; math in float32).

    Args:
      x: Activations, last axis = channels; every other index is a token.
      cfg: The quantizer.
      scale: Static mode only (``cfg.dynamic=False``, required there): the per-tensor
        scale (positive, finite), e.g. from :func:`calibrate_static_scale` (broadcastable to
        ``[..., 1]``).

    Returns:
      ``(codes, scale, zero)``: ``codes`` shaped like ``x`` (int8 in ``[-qmax, qmax]``
      when symmetric, uint8 in ``[0, 2**b - 1]`` otherwise); ``scale`` and ``zero``
      float32 ``[..., 1]``, one per token (static: the same scale repeated), ``zero``
      all 0 when symmetric. A token holding NaN/Inf gets scale NaN and codes 0.
      ``x ~= scale * (codes - zero)`` (:func:`dequantize_activations`).
    """
    if cfg.dynamic and scale is not None:
        raise ValueError("a scale is only given in static mode (ActQuantConfig(dynamic=False))")
    if not cfg.dynamic and scale is None:
        raise ValueError("static activation quantization needs a scale: "
                         "see calibrate_static_scale")
    xf, bad = _finite_rows(x.astype(jnp.float32))
    row = (*xf.shape[:-1], 1)
    if cfg.symmetric:
        if cfg.dynamic:
            s = _sym_scale(jnp.max(jnp.abs(xf), axis=-1, keepdims=True), cfg)
        else:
            s = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), row)
        q = jnp.clip(jnp.round(xf / s), -cfg.qmax, cfg.qmax)
        z = jnp.zeros(row, jnp.float32)
        dtype = jnp.int8
    else:
        lo = cfg.clip_ratio * jnp.minimum(jnp.min(xf, axis=-1, keepdims=True), 0.0)
        hi = cfg.clip_ratio * jnp.maximum(jnp.max(xf, axis=-1, keepdims=True), 0.0)
        s = jnp.maximum((hi - lo) / cfg.qmax, _TINY)
        s = jnp.where(hi > lo, s, 1.0)
        z = jnp.round(-lo / s)
        q = jnp.clip(jnp.round(xf / s) + z, 0, cfg.qmax)
        dtype = jnp.uint8
    codes = jnp.where(bad, 0, q).astype(dtype)
    s = jnp.where(bad, jnp.nan, s)
    z = jnp.where(bad, 0.0, z)
    return codes, s, z


def dequantize_activations(codes: jax.Array, scale: jax.Array, zero: jax.Array | None = None,
                           *, dtype: Any = jnp.float32) -> jax.Array:
    """``scale * (codes - zero)`` in float32, cast to ``dtype`` (``zero=None``: 0)."""
    q = codes.astype(jnp.float32)
    if zero is not None:
        q = q - zero
    return (scale * q).astype(dtype)


def fake_quant_activations(x: jax.Array, cfg: ActQuantConfig, scale: jax.Array | None = None
                           ) -> jax.Array:
    """Quantize then dequantize ``x`` (same shape and dtype as ``x``)."""
    codes, s, z = quantize_activations(x, cfg, scale=scale)
    return dequantize_activations(codes, s, z, dtype=x.dtype)


def calibrate_static_scale(xs: jax.Array | Sequence[jax.Array], cfg: ActQuantConfig
                           ) -> jax.Array:
    """Per-tensor symmetric scale ``c max|x| / qmax`` over all calibration rows.

    Args:
      xs: Calibration activations ``[..., channels]``, or a sequence of such batches.
      cfg: The quantizer (must be symmetric; ``dynamic`` is not looked at).

    Returns:
      A float32 scalar (1 when every value is 0). Non-finite values are ignored.
    """
    if not cfg.symmetric:
        raise ValueError("static per-tensor scales are symmetric only")
    batches = [xs] if hasattr(xs, "shape") else list(xs)
    if not batches:
        raise ValueError("calibrate_static_scale needs at least one batch")
    amax = jnp.zeros((), jnp.float32)
    for b in batches:
        bf = jnp.asarray(b).astype(jnp.float32)
        amax = jnp.maximum(amax, jnp.max(jnp.where(jnp.isfinite(bf), jnp.abs(bf), 0.0)))
    return _sym_scale(amax, cfg)


# --- KV cache ---------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("bits", "axis"))
def quantize_kv(x: jax.Array, bits: int, *, axis: int = -1
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Asymmetric min-max quantization of a K or V cache, one group per token and head.

    The group is the 1-D slice along ``axis`` (``head_dim``) at every other index: for
    ``x [batch, seq, kv_heads, head_dim]`` and ``axis=-1`` there is one ``(scale,
    offset)`` per ``(batch, seq, kv_head)``, over that head's ``head_dim`` values (KIVI's
    per-token grouping, QuaRot's per-head KV quantization). With ``m = min``, ``M = max``
    over the group: ``s = (M - m) / (2**b - 1)``, ``q = clip(round((x - m) / s), 0,
    2**b - 1)``, ``x' = s q + m``; so ``|x - x'| <= s / 2`` everywhere (no clipping). A
    constant group gets ``s = 1`` (and reconstructs exactly); a group holding NaN/Inf
    gets scale and offset NaN and codes 0.

    Args:
      x: Keys or values, e.g. ``[batch, seq, kv_heads, head_dim]``; any float dtype.
      bits: Code width, 2..8 (4 and 8 are the usual ones). Codes are not packed.
      axis: The ``head_dim`` axis, reduced over.

    Returns:
      ``(codes uint8 like x, scale float32, offset float32)``, ``scale`` and ``offset``
      shaped like ``x`` with ``axis`` kept at size 1.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"KV bits must be an int in 2..8, got {bits!r}")
    xf, bad = _finite_rows(x.astype(jnp.float32), axis=axis)
    lo = jnp.min(xf, axis=axis, keepdims=True)
    hi = jnp.max(xf, axis=axis, keepdims=True)
    qmax = 2 ** bits - 1
    s = jnp.where(hi > lo, jnp.maximum((hi - lo) / qmax, _TINY), 1.0)
    q = jnp.clip(jnp.round((xf - lo) / s), 0, qmax)
    codes = jnp.where(bad, 0, q).astype(jnp.uint8)
    return codes, jnp.where(bad, jnp.nan, s), jnp.where(bad, jnp.nan, lo)


def dequantize_kv(codes: jax.Array, scale: jax.Array, offset: jax.Array, *,
                  dtype: Any = jnp.float32) -> jax.Array:
    """``scale * codes + offset`` in float32, cast to ``dtype``."""
    return (scale * codes.astype(jnp.float32) + offset).astype(dtype)


# --- W8A8 -------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("bits",))
def quantize_weight_symmetric(w: jax.Array, *, bits: int = 8) -> tuple[jax.Array, jax.Array]:
    """Per-output-channel symmetric weights for :func:`int8_matmul`.

    ``s_o = max_k |w_ok| / qmax``, ``qmax = 2**(b-1) - 1``, ``q = clip(round(w / s),
    -qmax, qmax)``; an all-zero row gets ``s = 1``.

    Returns:
      ``(codes int8 [out, in], scale float32 [out])``.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"weight bits must be an int in 2..8, got {bits!r}")
    cfg = ActQuantConfig(bits=bits)
    codes, s, _ = quantize_activations(w, cfg)
    return codes, s[:, 0]


@jax.jit
def int8_matmul(x_codes: jax.Array, x_scale: jax.Array, w_codes: jax.Array,
                w_scale: jax.Array) -> jax.Array:
    """``y[..., o] = s_x[...] s_w[o] sum_k qx[..., k] qw[o, k]``, the int accumulation exact.

    One ``dot_general`` of int8 x int8 operands with an int32 result (an integer GEMM on
    hardware that has one), then a float32 rescale. On TPU the Pallas int8 MXU kernel
    (:mod:`pallas_kernels.tpu.int8`) computes it where the weight is whole 128-tiles. On
    CUDA the codes are multiplied in float32 instead (exact while the sums stay below
    2**24), see the comment inside, or with ``JAXQUANT_GPU_INT8=1`` (opt-in, read at
    trace time) by the Mosaic GPU int8 kernel (:mod:`pallas_kernels.gpu.int8`).
    The int32 sum cannot overflow for ``in < 2**31 / 127**2 = 133,144`` channels
    (narrow-range codes). Symmetric codes only:
    asymmetric activations would need the zero-point term ``- z_x sum_k qw[o, k]``.

    Args:
      x_codes: int8 ``[..., in]`` (:func:`quantize_activations`, symmetric).
      x_scale: Per-token scale ``[..., 1]`` or ``[...]``, or a scalar.
      w_codes: int8 ``[out, in]`` (:func:`quantize_weight_symmetric`).
      w_scale: Per-output-channel scale ``[out]`` (or ``[out, 1]``, or a scalar).

    Returns:
      float32 ``[..., out]``.
    """
    if x_codes.dtype != jnp.int8 or w_codes.dtype != jnp.int8:
        raise ValueError(f"int8_matmul needs int8 codes, got {x_codes.dtype} and "
                         f"{w_codes.dtype}")
    dims = (((x_codes.ndim - 1,), (1,)), ((), ()))

    def int_dot(a: jax.Array, b: jax.Array) -> jax.Array:
        return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.int32
                                   ).astype(jnp.float32)

    def float_dot(a: jax.Array, b: jax.Array) -> jax.Array:
        # CUDA: the int8 GEMM XLA emits (JAX 0.11.2, H100) returned wrong rows inside a
        # model (isolated dots were exact), so the same codes go through float32 there,
        # or, opted in (JAXQUANT_GPU_INT8=1), through the Mosaic GPU int8 kernel (unit
        # scales: the exact int32 sums as float32, like int_dot).
        from jaxquant.backends import gpu_int8_enabled
        from pallas_kernels.gpu import int8 as gpu_int8

        if gpu_int8_enabled() and gpu_int8.eligible(*b.shape) is None:
            ones = jnp.ones((*a.shape[:-1], 1), jnp.float32)
            return gpu_int8.int8_matmul(a, ones, b, jnp.ones((b.shape[0],), jnp.float32))
        return jax.lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32), dims,
                                   precision=_HI)

    def tpu_dot(a: jax.Array, b: jax.Array) -> jax.Array:
        # TPU: the Pallas int8 MXU kernel (unit scales: it returns the exact int32 sum as
        # float32, like int_dot) when the weight is whole tiles and kernels are enabled.
        from jaxquant.backends import kernels_enabled
        from pallas_kernels.tpu import int8 as tpu_int8

        if not kernels_enabled() or tpu_int8.eligible(*b.shape) is not None:
            return int_dot(a, b)
        ones = jnp.ones((*a.shape[:-1], 1), jnp.float32)
        return tpu_int8.int8_matmul(a, ones, b, jnp.ones((b.shape[0],), jnp.float32))

    acc = jax.lax.platform_dependent(x_codes, w_codes, default=int_dot, cuda=float_dot,
                                     tpu=tpu_dot)
    xs = jnp.asarray(x_scale, jnp.float32)
    if xs.ndim == x_codes.ndim - 1 and xs.ndim > 0:
        xs = xs[..., None]
    ws = jnp.asarray(w_scale, jnp.float32).reshape(-1)
    return acc * xs * ws


# --- diagnostics ------------------------------------------------------------------------

@jax.jit
def channel_norms(x: jax.Array) -> jax.Array:
    """``c_j = ||x[..., j]||_2`` over every axis but the last (float32 ``[channels]``).

    For activations ``X [tokens, channels]`` the norm of each channel over tokens; for a
    weight ``W [out, in]`` the norm of each input channel (column) over output rows.
    """
    xf = x.astype(jnp.float32).reshape(-1, x.shape[-1])
    return jnp.sqrt(jnp.sum(xf * xf, axis=0))


@jax.jit
def channel_difficulty(x: jax.Array) -> jax.Array:
    """Quantization difficulty: the population std (``ddof=0``) of :func:`channel_norms`.

    ``mean_j (c_j - mean(c))**2`` under a square root, a float32 scalar (Czakó et al.,
    SACI 2025). The same call measures weights ``W [out, in]`` per input channel.
    """
    return jnp.std(channel_norms(x))


def _minmax_rtn(a: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
    """Per-row asymmetric min-max RTN: ``(dequantized a, step Δ [rows])`` (float32).

    ``Δ = (max - min) / (2**b - 1)``, ``q = clip(round((a - min) / Δ), 0, 2**b - 1)``,
    ``a' = min + Δ q`` (both ends exact; a constant row, ``Δ = 0``, is kept as is).
    """
    af = a.astype(jnp.float32)
    lo = jnp.min(af, axis=-1, keepdims=True)
    hi = jnp.max(af, axis=-1, keepdims=True)
    d = (hi - lo) / (2 ** bits - 1)
    ds = jnp.where(d > 0, d, 1.0)
    q = jnp.clip(jnp.round((af - lo) / ds), 0, 2 ** bits - 1)
    return jnp.where(d > 0, lo + ds * q, af), d[:, 0]


@functools.partial(jax.jit, static_argnames=("x_bits", "w_bits"))
def layer_error(x: jax.Array, w: jax.Array, x_bits: int, w_bits: int) -> jax.Array:
    """``||X W^T - Q(X) Q(W)^T||_F^2`` for ``X [tokens, in]``, ``W [out, in]`` (float32).

    ``Q`` is per-row asymmetric min-max RTN (:func:`_minmax_rtn`): per token for ``X``
    (``x_bits``), per output row for ``W`` (``w_bits``), no clipping, the range not forced
    to contain 0. Computed as ``||E_x Q(W)^T + X E_w^T||_F^2`` (``E = Q(A) - A``, an
    identity) so no large products cancel, at ``precision=HIGHEST``.
    """
    qx, _ = _minmax_rtn(x, x_bits)
    qw, _ = _minmax_rtn(w, w_bits)
    xf, wf = x.astype(jnp.float32), w.astype(jnp.float32)
    d = jnp.matmul(qx - xf, qw.T, precision=_HI) + jnp.matmul(xf, (qw - wf).T, precision=_HI)
    return jnp.sum(d * d)


@functools.partial(jax.jit, static_argnames=("x_bits", "w_bits"))
def layer_error_estimate(x: jax.Array, w: jax.Array, x_bits: int, w_bits: int) -> jax.Array:
    """Analytic estimate of :func:`layer_error` (Czakó et al., SACI 2025).

    ``(||W||_F^2 sum_t Δ_x,t^2 + ||X||_F^2 sum_o Δ_w,o^2) / 12`` with the per-row steps
    ``Δ = (max - min) / (2**b - 1)`` of the same quantizer: each rounding error taken as
    independent, uniform on ``[-Δ/2, Δ/2]`` (variance ``Δ^2 / 12``), the cross term
    ``E_x E_w^T`` dropped. It slightly overestimates (the row ends are exact).
    """
    _, dx = _minmax_rtn(x, x_bits)
    _, dw = _minmax_rtn(w, w_bits)
    xf, wf = x.astype(jnp.float32), w.astype(jnp.float32)
    return (jnp.sum(wf * wf) * jnp.sum(dx * dx) + jnp.sum(xf * xf) * jnp.sum(dw * dw)) / 12
