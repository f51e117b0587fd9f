"""GPTQ: second-order error-compensating quantization (Frantar et al., 2023, "GPTQ").

Columns (input channels) are quantized one at a time; the error of each is spread
over the not-yet-quantized columns through the inverse Hessian of the layer's
reconstruction loss ``||X W^T - X Q^T||^2`` (``H = 2 X^T X / n``), Alg. 1 of the
paper with its lazy batch updates: inside a block of ``block_size`` columns the
updates are applied column by column, and to the rest of the matrix once per block.

As in the reference implementation (IST-DASLab/gptq):

* dead inputs (``H_jj = 0``) get ``H_jj = 1`` and zero weights;
* damping ``lambda = damp * mean(diag H)`` is added to the diagonal; JAX's Cholesky
  returns NaN instead of raising when ``H`` is not positive definite, which is
  detected here, and damping is raised tenfold until it succeeds (up to 6 times);
* ``U`` is the upper Cholesky factor of ``H^-1`` and the column error is
  ``(w - q) / U_jj`` (eq. 3-4 in Cholesky form);
* with groups, a group's scale and zero are found when its first column is
  reached, from the weights as updated by all earlier blocks (``static_groups``
  finds them all up front from the original weights instead);
* act-order processes columns by decreasing ``H_jj``. With dynamic groups the groups
  are then contiguous in that order, so the result is stored permuted
  (:class:`MixedWeight` with one part and the permutation); with static groups it
  is stored in the original order.

The column loop runs in ``lax.fori_loop`` inside ``jit``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.algorithms.rtn import ClipSearch, group_params
from jaxquant.formats.base import QuantizedWeight
from jaxquant.formats.mixed import MixedWeight
from jaxquant.formats.uniform import UniformWeight, expand_groups, num_groups

_HI = jax.lax.Precision.HIGHEST


class HessianError(ValueError):
    """The Hessian stays non-positive-definite after all damping increases."""


@functools.partial(jax.jit, static_argnames=("damp_scale",))
def _inverse_cholesky(h: jax.Array, damp: jax.Array, damp_scale: float = 1.0):
    """Upper Cholesky factor ``U`` of ``(H + damp I)^-1`` (NaN if not positive definite)."""
    k = h.shape[0]
    eye = jnp.eye(k, dtype=jnp.float32)
    lower = jnp.linalg.cholesky(h + damp * damp_scale * eye)
    lower_inv = jax.scipy.linalg.solve_triangular(lower, eye, lower=True)
    h_inv = jnp.matmul(lower_inv.T, lower_inv, precision=_HI)
    return jnp.linalg.cholesky(h_inv).T


@dataclasses.dataclass(frozen=True, kw_only=True)
class GroupQuantizer:
    """How the sweep finds a group's scale and zero when it reaches the group.

    The plain GPTQ quantizer is ``GroupQuantizer()``: min/max range, no search. Mixed
    precision (SliM-LLM) adds per-group bit widths, 1-bit binarization and a
    salience-weighted range search (SQC).
    """

    symmetric: bool = False  # symmetric grid (binarized 1-bit groups always store zeros)
    scale_dtype: Any = jnp.bfloat16  # storage dtype; codes are chosen for rounded params
    clip: ClipSearch | None = None  # range search (GPTQ --mse; SliM-LLM SQC)
    salience_weight: float = 1.0  # SQC: error weight of salient weights (z-score > 2)
    binary: bool = True  # 1-bit groups: sign(w - mean) * alpha + mean (SliM-LLM)


def binary_params(w: jax.Array, valid: jax.Array, scale_dtype: Any
                  ) -> tuple[jax.Array, jax.Array]:
    """1-bit binarization of each row of a group as a uniform ``s (q - z)``, q in {0, 1}.

    SliM-LLM (Huang et al., 2024, Sec. 3.2) binarizes its 1-bit groups around the row
    mean: ``w' = mean + alpha sign(w - mean)``. Here ``alpha = mean |w - mean|``, the
    least-squares optimum for fixed signs (the reference code uses ``mean |w|``). The
    two levels ``mean -/+ alpha`` are ``s (q - z)`` with ``s = 2 alpha`` and
    ``z = 1/2 - mean / s`` (a real-valued zero point).

    Args:
      w: ``[out, g]`` group weights.
      valid: ``[g]`` bool, columns that exist (the short last group is zero-padded).
      scale_dtype: Storage dtype of scale and zero (rounded before use).

    Returns:
      ``(scale, zero)``, each ``[out]`` float32.
    """
    cnt = jnp.maximum(valid.sum(), 1)
    mean = jnp.sum(jnp.where(valid, w, 0.0), axis=1) / cnt
    alpha = jnp.sum(jnp.where(valid, jnp.abs(w - mean[:, None]), 0.0), axis=1) / cnt
    scale = jnp.maximum(2 * alpha, jnp.finfo(scale_dtype).tiny)
    scale = scale.astype(scale_dtype).astype(jnp.float32)
    zero = (0.5 - mean / scale).astype(scale_dtype).astype(jnp.float32)
    return scale, zero


def salience_weights(w: jax.Array, u_diag: jax.Array, valid: jax.Array, weight: float
                     ) -> jax.Array:
    """SQC error weights of a group: ``weight`` where salience is an outlier, else 1.

    Salience ``w_ij^2 / U_jj^2`` (SliM-LLM eq. 5); salient weights are those whose
    salience z-score over the group exceeds 2. Padded columns weigh 0.
    """
    sal = w ** 2 / u_diag[None, :] ** 2
    m = valid[None, :]
    cnt = jnp.maximum(m.sum() * w.shape[0], 2)
    mean = jnp.sum(jnp.where(m, sal, 0.0)) / cnt
    std = jnp.sqrt(jnp.sum(jnp.where(m, (sal - mean) ** 2, 0.0)) / (cnt - 1))
    salient = (sal - mean) > 2 * std
    return jnp.where(m, jnp.where(salient, weight, 1.0), 0.0)


def _group_params(wg, u_diag, valid, bits, quantizer: GroupQuantizer):
    """Scale and zero ``[out]`` of one group of ``bits`` (traced) for the sweep."""
    q = quantizer
    weights = None
    if q.clip is not None and q.salience_weight != 1.0:
        weights = salience_weights(wg, u_diag, valid, q.salience_weight)
    elif q.clip is not None:
        weights = jnp.broadcast_to(valid[None, :], wg.shape).astype(jnp.float32)

    def uniform(_):
        s, z = group_params(wg, bits=bits, group_size=wg.shape[1], symmetric=q.symmetric,
                            scale_dtype=q.scale_dtype, clip=q.clip, weights=weights)
        return s[:, 0], z[:, 0]

    if not q.binary:
        return uniform(None)
    return jax.lax.cond(bits == 1, lambda _: binary_params(wg, valid, q.scale_dtype),
                        uniform, None)


def _quantize_column(w, scale, zero, maxq, binary):
    """Codes and dequantized values of one column (binary: the nearer of two levels)."""
    if binary is None:
        q = jnp.clip(jnp.round(w / scale) + zero, 0, maxq)
    else:
        q = jnp.where(binary, (w / scale + zero) > 0.5,
                      jnp.clip(jnp.round(w / scale) + zero, 0, maxq))
    return q, scale * (q - zero)


@functools.partial(jax.jit, static_argnames=("group_size", "block_size", "quantizer",
                                             "static_scales"))
def sweep(w: jax.Array, u: jax.Array, group_bits: jax.Array, scales0: jax.Array,
          zeros0: jax.Array, *, group_size: int, block_size: int, quantizer: GroupQuantizer,
          static_scales: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The GPTQ sweep over (already permuted) columns, with a bit width per group.

    Args:
      w: ``[out, in]`` float32 weights in processing order.
      u: Upper Cholesky factor of the damped inverse Hessian (same order).
      group_bits: ``[groups]`` int32 code width of each group of ``group_size`` columns
        (in processing order).
      scales0, zeros0: ``[out, groups]`` group parameters when ``static_scales``.
      group_size: Columns per group.
      block_size: Columns per lazy batch update.
      quantizer: How group parameters are found.
      static_scales: Use ``scales0``/``zeros0`` instead of finding them in the sweep.

    Returns:
      ``(codes [out, in] int32, scales, zeros [out, groups])``.
    """
    n, k = w.shape
    kp = -(-k // block_size) * block_size
    g = group_size
    groups = num_groups(kp, g)
    # Padding: zero weights and identity Hessian rows quantize to zero with no error;
    # g extra columns keep group windows in bounds.
    wp = jnp.zeros((n, kp + g), jnp.float32).at[:, :k].set(w)
    up = jnp.eye(kp, dtype=jnp.float32).at[:k, :k].set(u)
    u_diag = jnp.ones((kp + g,), jnp.float32).at[:kp].set(jnp.diag(up))
    gbits = jnp.full((groups + 1,), 8, jnp.int32).at[:group_bits.shape[0]].set(group_bits)
    codes = jnp.zeros((n, kp), jnp.int32)
    scales = jnp.ones((n, groups), jnp.float32).at[:, :scales0.shape[1]].set(scales0)
    zeros = jnp.zeros((n, groups), jnp.float32).at[:, :zeros0.shape[1]].set(zeros0)
    cols = jnp.arange(kp)
    binary_groups = quantizer.binary and not static_scales

    def block(b, carry):
        wp, codes, scales, zeros = carry
        i1 = b * block_size
        w1 = jax.lax.dynamic_slice(wp, (0, i1), (n, block_size))
        u1 = jax.lax.dynamic_slice(up, (i1, i1), (block_size, block_size))

        def column(i, inner):
            w1, codes1, scales, zeros, err1 = inner
            col = i1 + i
            gi = col // g
            bits = gbits[gi]
            if not static_scales:
                def refresh(sz):
                    wg = jax.lax.dynamic_slice(wp, (0, col), (n, g))
                    ud = jax.lax.dynamic_slice(u_diag, (col,), (g,))
                    valid = col + jnp.arange(g) < k
                    s, z = _group_params(wg, ud, valid, bits, quantizer)
                    return (jax.lax.dynamic_update_slice(sz[0], s[:, None], (0, gi)),
                            jax.lax.dynamic_update_slice(sz[1], z[:, None], (0, gi)))
                scales, zeros = jax.lax.cond(col % g == 0, refresh, lambda sz: sz,
                                             (scales, zeros))
            s = jax.lax.dynamic_index_in_dim(scales, gi, axis=1, keepdims=False)
            z = jax.lax.dynamic_index_in_dim(zeros, gi, axis=1, keepdims=False)
            wcol = jax.lax.dynamic_index_in_dim(w1, i, axis=1, keepdims=False)
            maxq = (2 ** bits - 1).astype(jnp.float32)
            q, dq = _quantize_column(wcol, s, z, maxq, (bits == 1) if binary_groups else None)
            d = u1[i, i]
            err = (wcol - dq) / d
            w1 = w1 - err[:, None] * u1[i][None, :]  # U is upper: columns < i are unchanged
            codes1 = jax.lax.dynamic_update_slice(codes1, q.astype(jnp.int32)[:, None], (0, i))
            err1 = jax.lax.dynamic_update_slice(err1, err[:, None], (0, i))
            return w1, codes1, scales, zeros, err1

        err1 = jnp.zeros((n, block_size), jnp.float32)
        codes1 = jnp.zeros((n, block_size), jnp.int32)
        w1, codes1, scales, zeros, err1 = jax.lax.fori_loop(
            0, block_size, column, (w1, codes1, scales, zeros, err1))
        codes = jax.lax.dynamic_update_slice(codes, codes1, (0, i1))
        # Lazy batch update of every later column: W[:, i2:] -= Err1 U[i1:i2, i2:].
        rows = jax.lax.dynamic_slice(up, (i1, 0), (block_size, kp))
        later = (cols >= i1 + block_size)[None, :]
        update = jnp.matmul(err1, jnp.where(later, rows, 0.0), precision=_HI)
        wp = wp.at[:, :kp].add(-update)
        wp = jax.lax.dynamic_update_slice(wp, w1, (0, i1))
        return wp, codes, scales, zeros

    _, codes, scales, zeros = jax.lax.fori_loop(0, kp // block_size, block,
                                                (wp, codes, scales, zeros))
    return codes[:, :k], scales[:, :num_groups(k, g)], zeros[:, :num_groups(k, g)]


def _sweep(w, u, scales0, zeros0, *, bits, group_size, block_size, symmetric, scale_dtype,
           static_scales, clip=None):
    """Uniform-bit sweep (every group ``bits`` wide)."""
    groups = num_groups(w.shape[1], group_size)
    return sweep(w, u, jnp.full((groups,), bits, jnp.int32), scales0, zeros0,
                 group_size=group_size, block_size=block_size,
                 quantizer=GroupQuantizer(symmetric=symmetric, scale_dtype=scale_dtype,
                                          clip=clip, binary=False),
                 static_scales=static_scales)


def prepare_hessian(w: jax.Array, hessian: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Dead inputs (``H_jj == 0``): ``H_jj = 1`` and zero weights (reference behaviour)."""
    h = jnp.asarray(hessian, jnp.float32)
    dead = jnp.diag(h) == 0
    h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
    return jnp.where(dead[None, :], 0.0, jnp.asarray(w, jnp.float32)), h


def _inverse_cholesky_host(h: np.ndarray, damp: float) -> np.ndarray:
    """The same as :func:`_inverse_cholesky` with SciPy's LAPACK (XLA's CPU one is slow)."""
    import scipy.linalg
    from threadpoolctl import threadpool_limits

    k = h.shape[0]
    eye = np.eye(k, dtype=np.float32)
    # One BLAS thread: next to XLA's spinning thread pool, OpenBLAS's own threads made
    # these small factorizations 10-100x slower on 2-core machines.
    with threadpool_limits(limits=1, user_api="blas"):
        try:
            lower = scipy.linalg.cholesky(h + np.float32(damp) * eye, lower=True)
            lower_inv = scipy.linalg.solve_triangular(lower, eye, lower=True)
            return scipy.linalg.cholesky(lower_inv.T @ lower_inv, lower=False)
        except np.linalg.LinAlgError:
            return np.full_like(h, np.nan)


def inverse_cholesky(h: jax.Array, *, damp: float = 0.01, max_tries: int = 6
                     ) -> tuple[jax.Array, float]:
    """Upper Cholesky factor of the damped inverse Hessian, raising damping on failure.

    On the CPU backend the factorizations run in LAPACK (float32, as on accelerators),
    which is two orders of magnitude faster there than XLA's Cholesky.

    Returns:
      ``(U, damp_used)`` where ``damp_used`` is the relative damping that succeeded.

    Raises:
      HessianError: still not positive definite after ``max_tries`` tenfold increases.
    """
    host = jax.default_backend() == "cpu"
    hh = np.asarray(h, np.float32) if host else None
    base = float(jnp.mean(jnp.diag(h)))
    for attempt in range(max_tries + 1):
        rel = damp * 10.0 ** attempt
        if host:
            u = _inverse_cholesky_host(hh, base * rel)
            if np.isfinite(u).all():
                return jnp.asarray(u), rel
        else:
            u = _inverse_cholesky(h, jnp.float32(base * rel))
            if bool(jnp.isfinite(u).all()):
                return u, rel
    raise HessianError(f"the Hessian is not positive definite even with damping {rel:g} x "
                       "mean(diag H); the layer's calibration inputs are degenerate")


def gptq(w: jax.Array, hessian: jax.Array, *, bits: int, group_size: int | None,
         symmetric: bool = False, scale_dtype: Any = jnp.bfloat16, block_size: int = 128,
         damp: float = 0.01, act_order: bool = False, static_groups: bool = False,
         mse: bool = False) -> QuantizedWeight:
    """GPTQ-quantizes ``w [out, in]`` given ``H = 2 X^T X / n`` of its inputs ``[in, in]``.

    Args:
      w: Float weight.
      hessian: Layer Hessian (float32, symmetric positive semi-definite).
      bits: Code width.
      group_size: Input channels per scale; ``None`` per output channel.
      symmetric: Symmetric quantization grid.
      scale_dtype: Storage dtype of scales and zeros (codes are chosen for the rounded
        scales).
      block_size: Columns per lazy batch update (128 in the paper).
      damp: Relative damping (0.01 = 1% of the mean diagonal), raised on failure.
      act_order: Process columns by decreasing Hessian diagonal.
      static_groups: Find all group parameters from the original weights up front.
      mse: Search each group's range (shrink factors 1 .. 0.21, error ``|.|^2.4``) as
        the reference's ``--mse`` option does, instead of plain min/max.

    Returns:
      A :class:`UniformWeight`, or with act-order and dynamic groups a
      :class:`MixedWeight` holding the permuted uniform weight and its permutation.
    """
    n, k = w.shape
    g = k if group_size is None else min(group_size, k)
    w, h = prepare_hessian(w, hessian)
    clip = ClipSearch() if mse else None
    static_scales = static_groups or group_size is None
    if static_scales:
        s0, z0 = group_params(w, bits=bits, group_size=g, symmetric=symmetric,
                              scale_dtype=scale_dtype, clip=clip)
    perm = None
    if act_order:
        perm = jnp.argsort(-jnp.diag(h), stable=True)
        w, h = w[:, perm], h[perm][:, perm]
    u, _ = inverse_cholesky(h, damp=damp)
    if static_scales and perm is not None:
        # Column j (processing order) uses its original group perm[j] // g: give each
        # column its own "group" in processing order for the sweep.
        col_s = expand_groups(s0, g, k)[:, perm]
        col_z = expand_groups(z0, g, k)[:, perm]
        codes, _, _ = _sweep(w, u, col_s, col_z, bits=bits, group_size=1,
                             block_size=block_size, symmetric=symmetric,
                             scale_dtype=jnp.dtype(scale_dtype), static_scales=True, clip=clip)
        inv = jnp.argsort(perm)
        return UniformWeight.from_codes(codes[:, inv], s0.astype(scale_dtype),
                                        None if symmetric else z0.astype(scale_dtype),
                                        bits=bits, group_size=g)
    if static_scales:
        scales0, zeros0 = s0, z0
    else:
        scales0 = zeros0 = jnp.zeros((n, 0), jnp.float32)
    codes, scales, zeros = _sweep(w, u, scales0, zeros0, bits=bits, group_size=g,
                                  block_size=block_size, symmetric=symmetric,
                                  scale_dtype=jnp.dtype(scale_dtype),
                                  static_scales=static_scales, clip=clip)
    q = UniformWeight.from_codes(codes, scales.astype(scale_dtype),
                                 None if symmetric else zeros.astype(scale_dtype),
                                 bits=bits, group_size=g)
    if perm is None:
        return q
    return MixedWeight(parts=(q,), perm=perm.astype(MixedWeight.perm_dtype(k)), shape=(n, k))


def proxy_loss(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
    """``tr((W - Q) H (W - Q)^T)``: the layer reconstruction loss GPTQ minimises."""
    d = np.asarray(w, np.float64) - np.asarray(q, np.float64)
    return float(np.einsum("ij,jk,ik->", d, np.asarray(h, np.float64), d))
