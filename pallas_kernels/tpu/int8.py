"""Mosaic TPU kernel: W8A8, ``y = s_x s_w (q_x q_w^T)`` with an int8 x int8 -> int32 MXU dot.

Computes ``y[m, n] = s_x[m] s_w[n] sum_k qx[m, k] qw[n, k]`` for symmetric per-token
activation codes and symmetric per-output-channel weight codes
(:func:`jaxquant.algorithms.act_quant.int8_matmul` is the reference; it routes here on
TPU). The weight codes keep their ``[N, K]`` layout (an NT matmul on the MXU), so no
re-layout is needed; both K and N must be whole tiles (:func:`eligible`), which every
real model's widths are. Grid ``(M / bm, N / bn, K / bk)`` with an int32 VMEM
accumulator over K (exact); the scales are applied once, at the last K step.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import util
from pallas_kernels.compat import pl, pltpu, tpu_compiler_params, tpu_interpret
from pallas_kernels.tpu import common

_NT = (((1,), (1,)), ((), ()))


def blocks_for(n: int, k: int) -> tuple[int, int] | None:
    """``(bn, bk)``: the largest of 512/256/128 dividing ``n`` and of 1024..128 dividing
    ``k``; ``None`` when one of them is not a multiple of 128."""
    bn = next((b for b in (512, 256, 128) if n % b == 0), None)
    bk = next((b for b in (1024, 512, 256, 128) if k % b == 0), None)
    return None if bn is None or bk is None else (bn, bk)


def eligible(n: int, k: int) -> str | None:
    """``None`` when the kernel takes an ``[n, k]`` weight, else why not."""
    if blocks_for(n, k) is None:
        return f"weight {n}x{k}: both sides must be multiples of 128 (TPU tiles)"
    return None


def _kernel(x_ref: Any, w_ref: Any, xs_ref: Any, ws_ref: Any, o_ref: Any, acc_ref: Any
            ) -> None:
    @pl.when(pl.program_id(2) == 0)
    def _init() -> None:
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] += jax.lax.dot_general(x_ref[...], w_ref[...], _NT,
                                        preferred_element_type=jnp.int32)

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _done() -> None:
        o_ref[...] = acc_ref[...].astype(jnp.float32) * xs_ref[...] * ws_ref[...]


@functools.partial(jax.jit, static_argnames=("interpret",))
def int8_matmul(x_codes: jax.Array, x_scale: jax.Array, w_codes: jax.Array,
                w_scale: jax.Array, *, interpret: bool | Any = False) -> jax.Array:
    """``s_x s_w (q_x @ q_w^T)`` in float32.

    Args:
      x_codes: int8 ``[..., K]``; x_scale: float ``[..., 1]`` (or ``[...]``), per token.
      w_codes: int8 ``[N, K]``; w_scale: float ``[N]`` (or ``[N, 1]``), per channel.
      interpret: ``True`` runs the Pallas TPU interpreter (any backend; CI on CPU).

    Raises:
      ValueError: Codes that are not int8, or a weight :func:`eligible` refuses.
    """
    if x_codes.dtype != jnp.int8 or w_codes.dtype != jnp.int8:
        raise ValueError(f"int8 codes expected, got {x_codes.dtype} and {w_codes.dtype}")
    n, k = w_codes.shape
    why = eligible(n, k)
    if why:
        raise ValueError(f"the TPU int8 kernel cannot take this weight: {why}")
    bn, bk = blocks_for(n, k)
    lead = x_codes.shape[:-1]
    m = math.prod(lead)
    bm = min(common.BM_MAX, util.round_up(max(m, 1), 32))  # int8 packs 32 sublanes
    m_pad = util.round_up(m, bm)
    x2 = jnp.pad(x_codes.reshape(m, k), ((0, m_pad - m), (0, 0)))
    xs = jnp.pad(jnp.asarray(x_scale, jnp.float32).reshape(m, 1), ((0, m_pad - m), (0, 0)))
    ws = jnp.asarray(w_scale, jnp.float32).reshape(1, n)
    out = pl.pallas_call(
        _kernel,
        grid=(m_pad // bm, n // bn, k // bk),
        in_specs=[pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
                  pl.BlockSpec((bn, bk), lambda i, j, kk: (j, kk)),
                  pl.BlockSpec((bm, 1), lambda i, j, kk: (i, 0)),
                  pl.BlockSpec((1, bn), lambda i, j, kk: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m_pad, n), jnp.float32),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.int32)],
        compiler_params=tpu_compiler_params(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=tpu_interpret(interpret),
    )(x2, w_codes, xs, ws)
    return out[:m].reshape(*lead, n)


def reference(x_codes: jax.Array, x_scale: jax.Array, w_codes: jax.Array,
              w_scale: jax.Array) -> jax.Array:
    """The exact reference in NumPy int64."""
    acc = np.asarray(x_codes, np.int64) @ np.asarray(w_codes, np.int64).T
    xs = np.asarray(x_scale, np.float64).reshape(*acc.shape[:-1], 1)
    return acc * xs * np.asarray(w_scale, np.float64).reshape(-1)


def main() -> None:
    """Benchmark on a TPU: W8A8 against a bf16 matmul (Llama-2-7B shapes)."""
    if common.tpu_generation() is None:
        print("no TPU here: the benchmark needs one (tests run the kernel interpreted)")
        return
    rng = np.random.default_rng(0)
    timed = functools.partial(util.wall_us, runs=20)

    for n, k in ((4096, 4096), (11008, 4096), (4096, 11008)):
        wq = jnp.asarray(rng.integers(-127, 128, (n, k)), jnp.int8)
        ws = jnp.asarray(rng.uniform(0.01, 0.02, n), jnp.float32)
        wb = jnp.asarray(rng.normal(size=(n, k)), jnp.bfloat16)
        for m in (1, 16, 512, 2048):
            xq = jnp.asarray(rng.integers(-127, 128, (m, k)), jnp.int8)
            xs = jnp.asarray(rng.uniform(0.01, 0.02, (m, 1)), jnp.float32)
            xb = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
            t8 = timed(int8_matmul, xq, xs, wq, ws)
            t16 = timed(jax.jit(lambda a, b: a @ b.T), xb, wb)
            print(f"{n}x{k} M={m}: int8 {t8:.1f} us, bf16 {t16:.1f} us")


if __name__ == "__main__":
    main()
