"""SliM-LLM: salience-driven mixed-precision GPTQ (Huang et al., 2024, arXiv 2405.14917).

Three parts, all per linear layer, on top of the GPTQ sweep
(:func:`jaxquant.algorithms.gptq.sweep`):

* **Salience** (eq. 5): ``delta_ij = w_ij^2 / U_jj^2`` with ``U`` the upper Cholesky
  factor of the damped inverse Hessian (``[H^-1]_jj`` in the sequential OBS sense);
  a group's salience is the sum over its ``out x group_size`` weights.
* **Salience-determined bit allocation (SBA, Sec. 3.1)**: groups sorted by salience;
  candidate ``i`` gives the ``i`` least salient groups ``N-1`` bits and the ``i`` most
  salient ``N+1`` (the rest ``N``), so the average stays exactly ``N``. The candidate
  minimising ``KL(softmax(X Q_i^T) || softmax(X W^T))`` (softmax over output features,
  mean over calibration tokens ``X``; ``Q_i`` the RTN quantization of the candidate)
  is kept. Unlike the reference code, ``i = 0`` (uniform) and ``i = n/2`` are tried,
  and a short last group (SmolLM2: 576 = 4 x 128 + 64) always keeps ``N`` bits so the
  average is exact (the reference's average drifts by +-64/576 bits there).
* **Salience-weighted quantizer calibration (SQC, Sec. 3.2)**: each group's
  ``[min, max]`` range is scaled by the factor in ``{1, 1.002, .., 1.1, 0.998, .., 0.9}``
  minimising ``sum weight_ij |w_ij - Q(w_ij)|^2.4`` where weights whose salience has a
  group z-score above 2 weigh ``salience_weight`` and the rest 1 (the reference's
  ``lambda = 1`` makes the salience weighting a no-op; jaxquant's default was picked
  by calibration data, see ``docs/quantization.md``).

At 2 bits the ``N-1 = 1``-bit groups are binarized around each row's mean
(:func:`jaxquant.algorithms.gptq.binary_params`).

The result is a :class:`MixedWeight`: input columns permuted so that equal-width groups
are contiguous, one :class:`UniformWeight` part per width.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.algorithms.gptq import (
    GroupQuantizer,
    binary_params,
    inverse_cholesky,
    prepare_hessian,
    sweep,
)
from jaxquant.algorithms.rtn import ClipSearch, group_params
from jaxquant.formats.base import QuantizedWeight
from jaxquant.formats.mixed import MixedWeight
from jaxquant.formats.uniform import UniformWeight, num_groups

_HI = jax.lax.Precision.HIGHEST

def _sqc_grid() -> tuple[float, ...]:
    up = np.linspace(1.0, 1.1, 51)[1:]
    down = np.linspace(1.0, 0.9, 51)[1:]
    return tuple(float(f) for f in np.concatenate([[1.0], up, down]))


#: SQC's range search: factor 1 first (it wins ties), then stretches up to 1.1, then
#: shrinks down to 0.9 (step 0.002, 101 factors), error ``|.|^2.4``, as the reference.
SQC = ClipSearch(grid=_sqc_grid(), norm=2.4)


def group_salience(w: jax.Array, u: jax.Array, group_size: int) -> jax.Array:
    """``[groups]``: sum of ``w_ij^2 / U_jj^2`` over each group's weights (SliM-LLM eq. 5)."""
    k = w.shape[1]
    sal = jnp.sum(w.astype(jnp.float32) ** 2, axis=0) / jnp.diag(u) ** 2
    g = num_groups(k, group_size)
    return jnp.pad(sal, (0, g * group_size - k)).reshape(g, group_size).sum(axis=1)


def candidate_bits(salience: np.ndarray, bits: int, widths: np.ndarray) -> np.ndarray:
    """SBA's candidate bit maps ``[candidates, groups]`` (candidate ``i`` moves ``i`` pairs).

    Only full-width groups take part, so every candidate averages exactly ``bits`` per
    weight; candidate 0 is uniform.
    """
    salience = np.asarray(salience, np.float64)
    full = np.flatnonzero(widths == widths.max())
    order = full[np.argsort(salience[full], kind="stable")]  # least salient first
    cands = []
    for i in range(len(full) // 2 + 1):
        b = np.full(len(salience), bits, np.int32)
        if i:
            b[order[:i]] = bits - 1
            b[order[-i:]] = bits + 1
        cands.append(b)
    return np.stack(cands)


@functools.partial(jax.jit, static_argnames=("group_size", "scale_dtype"))
def fake_quant_groups(w: jax.Array, group_bits: jax.Array, *, group_size: int,
                      scale_dtype: Any = jnp.bfloat16) -> jax.Array:
    """RTN with a bit width per group of columns (1-bit groups binarized); dequantized."""
    n, k = w.shape
    g = num_groups(k, group_size)
    pad = g * group_size - k
    wp = jnp.pad(w.astype(jnp.float32), ((0, 0), (0, pad))).reshape(n, g, group_size)
    valid = (jnp.arange(g * group_size) < k).reshape(g, group_size)

    def one(wg: jax.Array, bits: jax.Array, vg: jax.Array) -> jax.Array:
        def uniform(_: Any) -> tuple[jax.Array, jax.Array]:
            s, z = group_params(wg, bits=bits, group_size=group_size, symmetric=False,
                                scale_dtype=scale_dtype)
            return s[:, 0], z[:, 0]

        s, z = jax.lax.cond(bits == 1, lambda _: binary_params(wg, vg, scale_dtype),
                            uniform, None)
        maxq = (2 ** bits - 1).astype(jnp.float32)
        q = jnp.where(bits == 1, (wg / s[:, None] + z[:, None]) > 0.5,
                      jnp.clip(jnp.round(wg / s[:, None]) + z[:, None], 0, maxq))
        return s[:, None] * (q - z[:, None])

    dq = jax.vmap(one, in_axes=(1, 0, 0), out_axes=1)(wp, group_bits, valid)
    return dq.reshape(n, g * group_size)[:, :k]


@functools.partial(jax.jit, static_argnames=("group_size", "scale_dtype"))
def kl_scores(w: jax.Array, x: jax.Array, candidates: jax.Array, *, group_size: int,
              scale_dtype: Any = jnp.bfloat16) -> jax.Array:
    """``KL(softmax(X Q_c^T) || softmax(X W^T))`` per candidate bit map, mean over tokens."""
    w = w.astype(jnp.float32)
    x = x.astype(jnp.float32)
    log_q = jax.nn.log_softmax(jnp.matmul(x, w.T, precision=_HI), axis=-1)

    def one(bits: jax.Array) -> jax.Array:
        wq = fake_quant_groups(w, bits, group_size=group_size, scale_dtype=scale_dtype)
        log_p = jax.nn.log_softmax(jnp.matmul(x, wq.T, precision=_HI), axis=-1)
        return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))

    return jax.lax.map(one, candidates)


def allocate_bits(w: jax.Array, u: jax.Array, x: jax.Array | None, *, bits: int,
                  group_size: int, scale_dtype: Any = jnp.bfloat16
                  ) -> tuple[np.ndarray, dict[str, Any]]:
    """SBA: the bit width of each group (processing order) and how it was chosen."""
    k = w.shape[1]
    g = num_groups(k, group_size)
    widths = np.minimum(group_size, k - group_size * np.arange(g))
    sal = np.asarray(group_salience(w, u, group_size))
    cands = candidate_bits(sal, bits, widths)
    if x is None or len(cands) == 1:
        scores = np.zeros(len(cands))
    else:
        scores = np.asarray(kl_scores(w, x, jnp.asarray(cands), group_size=group_size,
                                      scale_dtype=scale_dtype))
    if not np.isfinite(scores).all():
        raise ValueError("the SBA search produced non-finite KL divergences")
    best = int(np.argmin(scores))
    return cands[best], {"pairs": best, "kl": scores.tolist()}


def mixed_from_groups(codes: jax.Array, scales: jax.Array, zeros: jax.Array,
                      group_bits: np.ndarray, perm: jax.Array | None, *, group_size: int,
                      symmetric: bool, scale_dtype: Any) -> QuantizedWeight:
    """Packs per-group-width codes into a :class:`MixedWeight` (one part per width).

    Groups of equal width become contiguous; a short last group is placed last in its
    part and that part last, so each part is an ordinary grouped :class:`UniformWeight`
    and the groups of the stored (permuted) column order are aligned runs of
    ``group_size``.
    """
    n, k = codes.shape
    g = len(group_bits)
    widths = np.minimum(group_size, k - group_size * np.arange(g))
    # Gathered and packed on the host: part shapes vary with the bit map, and eager jnp
    # ops would compile anew for each.
    codes, scales, zeros = np.asarray(codes), np.asarray(scales), np.asarray(zeros)
    sdt = jnp.dtype(scale_dtype)
    base = np.arange(k) if perm is None else np.asarray(perm)
    parts, order = [], []
    short = [i for i in range(g) if widths[i] < group_size]
    widths_order = sorted(set(int(x) for x in group_bits))
    if short:  # the run holding the short group goes last: all groups stay aligned
        last = int(group_bits[short[0]])
        widths_order = [b for b in widths_order if b != last] + [last]
    for b in widths_order:
        gs = [i for i in range(g) if group_bits[i] == b]
        gs.sort(key=lambda i: (widths[i] < group_size, i))  # the short group goes last
        cols = np.concatenate([np.arange(i * group_size, i * group_size + widths[i])
                               for i in gs])
        keep_zeros = not symmetric or b == 1  # binarized groups have a real-valued zero
        z = jnp.asarray(zeros[:, gs].astype(sdt)) if keep_zeros else None
        if symmetric and b == 1:
            raise ValueError("1-bit groups need asymmetric storage")
        s = jnp.asarray(scales[:, gs].astype(sdt))
        parts.append(UniformWeight.from_codes(codes[:, cols], s, z, bits=b,
                                              group_size=group_size))
        order.append(base[cols])
    new_perm = np.concatenate(order)
    if len(parts) == 1 and np.array_equal(new_perm, np.arange(k)):
        return parts[0]
    return MixedWeight(parts=tuple(parts),
                       perm=jnp.asarray(new_perm, MixedWeight.perm_dtype(k)), shape=(n, k))


def slim(w: jax.Array, hessian: jax.Array, *, bits: int, group_size: int,
         inputs: jax.Array | None = None, salience_weight: float = 4.0, sqc: bool = True,
         act_order: bool = False, damp: float = 0.01, scale_dtype: Any = jnp.bfloat16,
         block_size: int | None = None, return_info: bool = False,
         return_state: bool = False) -> Any:
    """SliM-LLM-quantizes ``w [out, in]`` to an average of ``bits`` per weight.

    Args:
      w: Float weight.
      hessian: ``2 X^T X / n`` of the layer's calibration inputs.
      bits: Average code width ``N`` (groups get ``N-1``, ``N`` or ``N+1``); 2..7.
      group_size: Columns per group (128 in the paper).
      inputs: Calibration input rows ``[m, in]`` for SBA's KL search; ``None`` keeps
        every group at ``N`` bits.
      salience_weight: SQC's weight of salient weights (1: plain l_2.4 range search).
      sqc: Search each group's range (SQC); otherwise plain min/max.
      act_order: Sweep columns by decreasing Hessian diagonal (groups then run over the
        permuted columns).
      damp: Relative Hessian damping (raised automatically if Cholesky fails).
      scale_dtype: Storage dtype of scales and zeros.
      block_size: Lazy-update block (default: the group size).
      return_info: Also return the SBA choice (pairs moved, KL per candidate).
      return_state: Also return the sweep's state in processing order (``codes``,
        ``perm``, ``group_bits``, ``scales``, ``zeros``, ``group_size``), whose ranges
        SliM-LLM+ tunes.

    Returns:
      A :class:`MixedWeight` (or :class:`UniformWeight` when SBA keeps every group at
      ``N`` bits without act-order); with ``return_info`` / ``return_state`` a tuple
      ``(weight, info[, state])``.
    """
    if not 2 <= bits <= 7:
        raise ValueError(f"SliM-LLM needs an average of 2 to 7 bits, got {bits}")
    n, k = w.shape
    g = min(group_size, k)
    w, h = prepare_hessian(w, hessian)
    perm = None
    if act_order:
        perm = jnp.argsort(-jnp.diag(h), stable=True)
        w, h = w[:, perm], h[perm][:, perm]
        if inputs is not None:
            inputs = inputs[:, perm]
    u, _ = inverse_cholesky(h, damp=damp)
    group_bits, info = allocate_bits(w, u, inputs, bits=bits, group_size=g,
                                     scale_dtype=scale_dtype)
    quantizer = GroupQuantizer(symmetric=False, scale_dtype=jnp.dtype(scale_dtype),
                               clip=SQC if sqc else None,
                               salience_weight=float(salience_weight), binary=True)
    empty = jnp.zeros((n, 0), jnp.float32)
    codes, scales, zeros = sweep(
        w, u, jnp.asarray(group_bits), empty, empty, group_size=g,
        block_size=block_size or g, quantizer=quantizer, static_scales=False)
    q = mixed_from_groups(codes, scales, zeros, group_bits, perm, group_size=g,
                          symmetric=False, scale_dtype=scale_dtype)
    info["group_bits"] = [int(b) for b in group_bits]
    if return_state:
        state = {"perm": np.arange(k) if perm is None else np.asarray(perm),
                 "group_bits": group_bits, "scales": scales, "zeros": zeros,
                 "codes": codes, "group_size": g}
        return q, info, state
    return (q, info) if return_info else q
