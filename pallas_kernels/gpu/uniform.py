"""Mosaic GPU kernel (Hopper): ``y = x W^T`` for a uniform weight of up to 8 bits.

Computes ``y[m, n] = sum_k x[m, k] s[n, g(k)] (q[n, k] - z[n, g(k)])`` for a
:class:`jaxquant.formats.UniformWeight`, with the weight streamed through shared memory
by TMA once per M tile and dequantized in registers straight into the tensor cores.

The matmul is computed transposed ("swap AB"), ``y^T = W x^T``: wgmma's A operand (64
rows a warpgroup, taken from registers) is the dequantized weight tile and B is the
activation tile, whose M (1..256) becomes wgmma's N (a multiple of 8). A decode step
(M = 1..16) thus uses an 8- or 16-wide wgmma instead of padding M to 64.

Kernel layout (:func:`relayout`, once per weight, not per call):

- ``codes``, widths 4..8: ``[N_pad, K_pad]`` signed ``int4`` (width 4) or ``int8``
  (5..8), ``v = q - 2**(bits-1)``: Mosaic GPU converts both to bf16 in registers (int4
  with the packed-nibble fast path).
- ``codes`` (and ``codes_hi``), widths 1..3: the unsigned codes ``v = q`` packed into
  uint8 *bit planes* of width ``w`` (``8 / w`` codes a byte): width 2 one 2-bit plane,
  width 1 one 1-bit plane, width 3 a 2-bit plane (``codes``, bits 0-1) and a 1-bit plane
  (``codes_hi``, bit 2). In a plane, each run of ``8 / w`` consecutive blocks of
  ``PLANE_UNIT`` (64) columns shares one 64-byte block, block ``p`` of the run in bits
  ``w p .. w p + w - 1`` of each byte: a 64-column sub-tile is one byte slice, one
  shift and one mask (in int16 registers: Mosaic GPU has no shifts on 8-bit registers),
  and the weight moves ``bits / 8`` bytes a code.
- ``scales``, ``bias``: ``[K_pad / kg, N_pad]`` bf16 per *kernel group* of
  ``kg = gcd(group_size, 128)`` input columns (transposed, so one K tile's rows are a
  contiguous block), ``bias = s * (o - z)`` with ``o`` the codes' offset
  (``2**(bits-1)`` in the int4/int8 containers, 0 in bit planes); the tile is
  dequantized as ``v * s + bias`` (one bf16 FMA per weight) and padding has
  ``s = bias = 0``.

Above ``DECODE_M`` activation rows (mid batches and prefill), :func:`uniform_matmul` runs
:mod:`pallas_kernels.gpu.uniform_wide` instead: a warp-specialized persistent kernel on the
same layout that reads each weight tile once per 128 or 256 tokens.

Grid ``(N_pad / tn, M_pad / tm, split)``: each program owns ``tn`` rows and a ``1/split``
share of K (split-K, so that a decode step has enough programs to fill 132 SMs), runs a
``steps``-deep TMA pipeline over its K tiles of ``tk`` columns, and writes a float32
partial ``[tn, tm]``; the partials are summed (and transposed back) in XLA.

In the Pallas GPU interpreter (CPU tests) two things differ, because it implements
neither: the dequantized tile goes through shared memory instead of registers, and the
activations are read ``[K, M]`` (M-major) instead of through a transposed view. The
register path and the transposed view are checked by lowering for CUDA in CI and on the
device by ``benchmarks/kernels_gpu.py --check``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.formats.uniform import UniformWeight
from jaxquant.ops import register_kernel
from pallas_kernels.compat import gpu_interpret, pl, plgpu
from pallas_kernels.gpu import uniform_wide
from pallas_kernels.reference import dequant_reference
from pallas_kernels.util import round_up

#: Input columns per scale row in the kernel (wgmma K slice per FMA'd sub-tile).
KG_MAX = 128
#: Output rows per program (one warpgroup's wgmma M is 64).
TN = 64
#: Rows the layout pads N to: the wide kernel's blocks hold 128 weight rows.
N_ALIGN = uniform_wide.TW
#: Up to this many activation rows this (decode) kernel runs; above, the wide kernel
#: (measured on an H100, benchmarks/results/gpu/kernels_gpu_*: at M = 64 this kernel is
#: the faster on two of the three Llama-2-7B shapes, at M = 128 the wide one on all).
DECODE_M = 64
#: Shared memory the pipeline may take (bytes; Hopper allows 227 KiB a block).
SMEM_BUDGET = 200 * 1024
#: Columns per field of a bit plane (and per wgmma sub-tile when the codes are planes).
PLANE_UNIT = 64
#: Widths held in bit planes: the planes' widths, low bits first.
PLANES = {1: (1,), 2: (2,), 3: (2, 1)}


def plane_run(widths: tuple[int, ...]) -> int:
    """Columns of one run of fields in every plane (a K tile is a multiple of it)."""
    return max(8 // w for w in widths) * PLANE_UNIT


def pack_plane(v: np.ndarray, width: int) -> np.ndarray:
    """``[N, K]`` values below ``2**width`` as a ``[N, K * width / 8]`` uint8 bit plane
    (module docstring; ``K`` a multiple of ``8 / width * PLANE_UNIT``)."""
    n, k = v.shape
    per = 8 // width
    f = v.astype(np.uint8).reshape(n, k // (per * PLANE_UNIT), per, PLANE_UNIT)
    out = np.zeros((n, k // (per * PLANE_UNIT), PLANE_UNIT), np.uint8)
    for p in range(per):
        out |= f[:, :, p] << np.uint8(width * p)
    return out.reshape(n, -1)


def unpack_plane(plane: jax.Array, width: int) -> jax.Array:
    """The ``[N, K]`` int32 values of a bit plane (:func:`pack_plane`'s inverse, jnp)."""
    n, nbytes = plane.shape
    per = 8 // width
    b = plane.astype(jnp.int32).reshape(n, nbytes // PLANE_UNIT, 1, PLANE_UNIT)
    shifts = (width * jnp.arange(per, dtype=jnp.int32))[None, None, :, None]
    return ((b >> shifts) & (2 ** width - 1)).reshape(n, nbytes * per)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class GpuUniformWeight:
    """A :class:`UniformWeight` in the GPU kernel layout (see the module docstring)."""

    codes: jax.Array  # int4/int8 [N_pad, K_pad]: q - 2**(bits-1); uint8 plane (bits <= 3)
    codes_hi: jax.Array | None  # bits 3: the 1-bit plane of bit 2 (uint8); else None
    scales: jax.Array  # bf16 [K_pad / kg, N_pad]
    bias: jax.Array  # bf16 [K_pad / kg, N_pad]: s * (offset - z)
    shape: tuple[int, int] = dataclasses.field(metadata={"static": True})  # (N, K)
    bits: int = dataclasses.field(metadata={"static": True})  # code width, 1..8
    kg: int = dataclasses.field(metadata={"static": True})  # columns per scale row
    tk: int = dataclasses.field(metadata={"static": True})  # columns per K tile
    max_split: int = dataclasses.field(metadata={"static": True})  # K_pad / tk divides by it

    @property
    def planes(self) -> tuple[int, ...]:
        """Widths of the bit planes (widths 1..3), ``()`` for the int4/int8 containers."""
        return PLANES.get(self.bits, ())

    @property
    def container(self) -> int:
        """Bits each code is stored in: its width in bit planes (1..3), else 4 (``int4``)
        or 8 (``int8``)."""
        return self.bits if self.planes else 4 if self.bits <= 4 else 8

    @property
    def offset(self) -> int:
        """``v = q - offset`` is what the codes hold (0 in bit planes)."""
        return 0 if self.planes else 2 ** (self.bits - 1)

    @property
    def padded(self) -> tuple[int, int]:
        """``(N_pad, K_pad)``."""
        return int(self.codes.shape[0]), int(self.scales.shape[0]) * self.kg

    @property
    def code_bytes(self) -> int:
        """Bytes of the stored codes (what a matmul streams besides scales and bias)."""
        if self.planes:
            return int(self.codes.size) + (int(self.codes_hi.size)
                                           if self.codes_hi is not None else 0)
        return int(self.codes.size) * self.container // 8

    def values(self) -> jax.Array:
        """The ``[N_pad, K_pad]`` values ``v`` (int32 for planes; jnp)."""
        if not self.planes:
            return self.codes
        v = unpack_plane(self.codes, self.planes[0])
        if self.codes_hi is not None:
            v = v | (unpack_plane(self.codes_hi, 1) << self.planes[0])
        return v

    def container_codes(self) -> tuple[jax.Array, jax.Array]:
        """``(codes, bias)`` in the ``int4``/``int8`` container layout (codes
        ``q - 2**(bits-1)``), what the wide kernel reads: bit planes are unpacked by XLA
        per call (prefill is compute-bound), and their bias moved by ``s * 2**(bits-1)``."""
        if not self.planes:
            return self.codes, self.bias
        half = 2 ** (self.bits - 1)
        bias = self.bias.astype(jnp.float32) + half * self.scales.astype(jnp.float32)
        return (self.values() - half).astype(jnp.int4), bias.astype(self.bias.dtype)

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """The ``[N, K]`` weight back from the kernel layout (jnp; a test reference)."""
        n, k = self.shape
        return self.dequantize_padded(jnp.float32)[:n, :k].astype(dtype)

    def dequantize_padded(self, dtype: Any) -> jax.Array:
        """The padded ``[N_pad, K_pad]`` weight, ``codes * s + bias`` computed in ``dtype``
        (bf16: what the kernels compute in registers)."""
        s = jnp.repeat(self.scales.astype(dtype).T, self.kg, axis=1)
        b = jnp.repeat(self.bias.astype(dtype).T, self.kg, axis=1)
        return self.values().astype(dtype) * s + b


def eligible(w: Any) -> str | None:
    """``None`` when :func:`relayout` can take ``w``, else the reason it cannot."""
    if not isinstance(w, UniformWeight):
        return f"not a UniformWeight ({type(w).__name__})"
    k = w.shape[1]
    if w.group_size < k and w.group_size % 64:
        return (f"group size {w.group_size} is not a multiple of 64 (the kernel applies "
                "scales per 64- or 128-column wgmma slice)")
    return None


def relayout(w: UniformWeight, *, tk: int | None = None) -> GpuUniformWeight:
    """The kernel layout of ``w`` (host NumPy work, once per weight).

    Args:
      w: The weight (:func:`eligible` must hold).
      tk: Columns per K tile (a multiple of the kernel group, and of
        :func:`plane_run` for widths 1..3); default 256, or 128 for ``K < 2048``; for
        bit planes one plane run (256 for 2 bits, 512 for 1 and 3).

    Raises:
      ValueError: An ineligible weight.
    """
    why = eligible(w)
    if why:
        raise ValueError(f"the GPU uniform kernel cannot take this weight: {why}")
    n, k = w.shape
    kg = KG_MAX if w.group_size >= k else math.gcd(w.group_size, KG_MAX)
    widths = PLANES.get(w.bits, ())
    if tk is None and widths:
        tk = plane_run(widths)
    tk = tk or (256 if k >= 2048 else 128)
    if tk % kg or (widths and tk % plane_run(widths)):
        raise ValueError(f"tk={tk} is not a multiple of the kernel group {kg}"
                         + (f" and of the bit planes' run {plane_run(widths)}" if widths else ""))
    steps = -(-k // tk)
    # split-K for decode: 4 from 16 K tiles, 2 from 4; with bit planes' wider K tiles
    # the largest split that pads K at most k/32 more than the least padding does
    # (K_pad is a multiple of tk * max_split)
    splits = [sp for sp in (4, 2, 1) if steps >= sp * sp]
    least = min(round_up(k, tk * sp) for sp in splits)
    max_split = next(sp for sp in splits
                     if not widths or round_up(k, tk * sp) <= least + k // 32)
    n_pad, k_pad = round_up(n, N_ALIGN), round_up(k, tk * max_split)
    half = 0 if widths else 2 ** (w.bits - 1)  # the codes' offset (GpuUniformWeight.offset)
    codes = np.zeros((n_pad, k_pad), np.int16)
    codes[:n, :k] = np.asarray(w.codes(), np.int16) - half
    cols = np.arange(0, k_pad, kg)
    groups = np.minimum(cols // w.group_size, w.scales.shape[1] - 1)
    s = np.asarray(w.scales, np.float32)[:, groups]  # [n, K_pad / kg]
    z = (np.full_like(s, 2 ** (w.bits - 1)) if w.zeros is None
         else np.asarray(w.zeros, np.float32)[:, groups])
    live = (cols < k)[None, :]
    scales = np.zeros((k_pad // kg, n_pad), np.float32)
    bias = np.zeros((k_pad // kg, n_pad), np.float32)
    scales[:, :n] = np.where(live, s, 0.0).T
    bias[:, :n] = np.where(live, s * (half - z), 0.0).T
    if widths:
        lo = jnp.asarray(pack_plane(codes & (2 ** widths[0] - 1), widths[0]))
        hi = (jnp.asarray(pack_plane(codes >> widths[0], widths[1]))
              if len(widths) > 1 else None)
    else:
        lo, hi = jnp.asarray(codes, jnp.int4 if w.bits <= 4 else jnp.int8), None
    return GpuUniformWeight(
        codes=lo, codes_hi=hi,
        scales=jnp.asarray(scales, jnp.bfloat16), bias=jnp.asarray(bias, jnp.bfloat16),
        shape=(n, k), bits=w.bits, kg=kg, tk=tk, max_split=max_split)


def tiles_for(m: int, w: GpuUniformWeight) -> tuple[int, int, int]:
    """``(tm, split, steps)`` for ``m`` rows of activations: the decode widths 8/16 with
    split-K so that about 2-4 programs run per SM (132 SMs), wider M tiles without split
    for larger batches. Measured on an H100 by ``benchmarks/kernels_gpu.py``."""
    n_pad = w.padded[0]
    tm = 8 if m <= 8 else 16 if m <= 16 else 64 if m <= 64 else 128
    split = 1
    if m <= 64:
        while split < w.max_split and (n_pad // TN) * split < 256:
            split *= 2
    # pipeline depth: 4 stages of (codes + activations + scales) where shared memory
    # (227 KiB a block on Hopper, less the output tile) allows, at least 2
    def stages(tm: int) -> int:
        stage = TN * w.tk * w.container // 8 + tm * w.tk * 2 + 2 * (w.tk // w.kg) * TN * 2
        return min(4, (SMEM_BUDGET - TN * tm * 4) // stage)

    while stages(tm) < 2 and tm > 8:  # wide K tiles (bit planes) at a forced large M
        tm //= 2
    return tm, split, max(2, stages(tm))


def kernel_for(m: int, w: GpuUniformWeight) -> tuple[str, tuple[int, ...]]:
    """The kernel :func:`uniform_matmul` runs for ``m`` activation rows, with its tiles:
    ``("decode", (tm, split, steps))`` up to :data:`DECODE_M` rows (:func:`tiles_for`),
    ``("wide", (tt, tk, split, steps))`` above (:func:`uniform_wide.tiles_for`)."""
    if m <= DECODE_M:
        return "decode", tiles_for(m, w)
    n_pad, k_pad = w.padded
    return "wide", uniform_wide.tiles_for(m, n_pad, w.shape[1], k_pad, w.kg,
                                          4 if w.planes else w.container)


def plane_values(planes: list[Any], widths: tuple[int, ...], j: int) -> jax.Array:
    """The int16 values of 64-column sub-tile ``j`` of a K tile held in bit planes
    (shared-memory refs ``[rows, tk * w / 8]``, module docstring): per plane one byte
    slice upcast to int16, one shift and one mask; planes OR-ed in from the low bits."""
    value, low = None, 0
    for ref, w in zip(planes, widths, strict=True):
        per = 8 // w
        field = ref[:, pl.ds(j // per * PLANE_UNIT, PLANE_UNIT)].astype(jnp.int16)
        shift = w * (j % per)
        if shift:
            field = jax.lax.shift_right_logical(field, jnp.asarray(shift, jnp.int16))
        if shift + w < 8:
            field = field & jnp.asarray(2 ** w - 1, jnp.int16)
        if low:
            field = jax.lax.shift_left(field, jnp.asarray(low, jnp.int16))
        value = field if value is None else value | field
        low += w
    return value


def store_partial(acc: jax.Array, dst: Any) -> None:
    """Stores a program's ``[TN, tm]`` accumulator (its split-K partial) to the ``dst``
    view of global memory through shared memory (TMA), and waits for the copy."""
    @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM(acc.shape, acc.dtype))
    def _store(o_smem):
        o_smem[...] = acc
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, dst)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)


@functools.cache
def _kernel(m_pad: int, n_pad: int, k_pad: int, *, tm: int, tk: int, kg: int, split: int,
            steps: int, widths: tuple[int, ...], interpret: Any) -> Any:
    ku = PLANE_UNIT if widths else kg  # columns per wgmma (one scale row each)
    sub, srows = tk // ku, tk // kg
    ksteps = k_pad // tk // split
    xk = not interpret  # activations [M, K] through a transposed view (GPU only)
    code_blocks = [(TN, tk * w // 8) for w in widths] or [(TN, tk)]  # per code array

    def body(x_gmem, *refs):
        *q_gmems, s_gmem, b_gmem, o_gmem, a_smem = refs
        ni, mi, si = (jax.lax.axis_index(a) for a in ("n", "m", "s"))

        def scope(acc_ref):
            def step(_, *smem):
                *q_smems, x_smem, s_smem, b_smem = smem
                for j in range(sub):  # one wgmma per ku columns
                    if widths:
                        a = plane_values(q_smems, widths, j).astype(jnp.bfloat16)
                    else:
                        a = q_smems[0][:, pl.ds(j * ku, ku)].astype(jnp.bfloat16)
                    shape, r = a.shape, j * ku // kg
                    a = (a * jax.lax.broadcast_in_dim(s_smem[r, :], shape, [0])
                         + jax.lax.broadcast_in_dim(b_smem[r, :], shape, [0]))
                    if interpret:  # the interpreter takes wgmma's A from a ref only
                        a_smem[...] = a
                        plgpu.commit_smem()
                        a = a_smem
                    xs = (plgpu.transpose_ref(x_smem.at[:, pl.ds(j * ku, ku)], (1, 0)) if xk
                          else x_smem.at[pl.ds(j * ku, ku), :])
                    plgpu.wgmma(acc_ref, a, xs)
                plgpu.wgmma_wait(0)

            x_spec = (plgpu.BlockSpec((tm, tk), lambda k: (mi, si * ksteps + k)) if xk
                      else plgpu.BlockSpec((tk, tm), lambda k: (si * ksteps + k, mi)))
            q_specs = [plgpu.BlockSpec(block, lambda k: (ni, si * ksteps + k))
                       for block in code_blocks]
            plgpu.emit_pipeline(
                step, grid=(ksteps,),
                in_specs=[
                    *q_specs,
                    x_spec,
                    plgpu.BlockSpec((srows, TN), lambda k: (si * ksteps + k, ni)),
                    plgpu.BlockSpec((srows, TN), lambda k: (si * ksteps + k, ni)),
                ],
                max_concurrent_steps=min(steps, ksteps),
            )(*q_gmems, x_gmem, s_gmem, b_gmem)
            return acc_ref[...]

        acc = pl.run_scoped(scope, plgpu.ACC((TN, tm), jnp.float32))
        store_partial(acc, o_gmem.at[si, pl.ds(ni * TN, TN), pl.ds(mi * tm, tm)])

    return plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((split, n_pad, m_pad), jnp.float32),
        grid=(n_pad // TN, m_pad // tm, split), grid_names=("n", "m", "s"),
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        scratch_types=[plgpu.SMEM((TN, ku), jnp.bfloat16)],
        interpret=interpret)


@functools.partial(jax.jit, static_argnames=("interpret", "tiles", "wide_tiles"))
def uniform_matmul(x: jax.Array, w: GpuUniformWeight, *, interpret: bool | Any = False,
                   tiles: tuple[int, int, int] | None = None,
                   wide_tiles: tuple[int, int, int, int] | None = None) -> jax.Array:
    """``x @ W^T`` for ``x [..., K]`` (float) and a weight in the kernel layout.

    The kernel and tiles are :func:`kernel_for`'s unless ``tiles`` (this module's decode
    kernel) or ``wide_tiles`` (:mod:`pallas_kernels.gpu.uniform_wide`) force them.

    Args:
      x: Activations (computed in bf16 on the tensor cores, float32 accumulation).
      w: :func:`relayout` output.
      interpret: ``True`` runs the kernel in the Pallas GPU interpreter (CPU tests).
      tiles: Decode kernel ``(tm, split, steps)`` overriding :func:`tiles_for`.
      wide_tiles: Wide kernel ``(tt, tk, split, steps)`` overriding
        :func:`pallas_kernels.gpu.uniform_wide.tiles_for`.

    Returns:
      ``[..., N]`` in ``x``'s dtype.
    """
    n, k = w.shape
    n_pad, k_pad = w.padded
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    interp = gpu_interpret(interpret)
    if tiles is None and wide_tiles is None:
        kind, chosen = kernel_for(m, w)
        tiles, wide_tiles = (chosen, None) if kind == "decode" else (None, chosen)
    if wide_tiles is not None:
        codes, bias = w.container_codes()
        y = uniform_wide.wide_matmul(x2, codes, w.scales, bias, n=n, kg=w.kg,
                                     tiles=wide_tiles, interpret=interp)
        return y.astype(x.dtype).reshape(*lead, n)
    tm, split, steps = tiles
    m_pad = round_up(m, tm)
    xb = jnp.pad(x2.astype(jnp.bfloat16), ((0, m_pad - m), (0, k_pad - k)))
    kernel = _kernel(m_pad, n_pad, k_pad, tm=tm, tk=w.tk, kg=w.kg, split=split, steps=steps,
                     widths=w.planes, interpret=interp)
    codes = (w.codes,) if w.codes_hi is None else (w.codes, w.codes_hi)
    parts = kernel(xb.T if interp else xb, *codes, w.scales, w.bias)
    y = parts.sum(0)[:n, :m].T
    return y.astype(x.dtype).reshape(*lead, n)


register_kernel(GpuUniformWeight, uniform_matmul, platform="gpu")


#: The jnp reference (``x @ dequantize(W)^T``, float32 HIGHEST) the tests compare with.
reference = dequant_reference


def main() -> None:
    """Benchmark on a GPU: see ``benchmarks/kernels_gpu.py`` (the full table)."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "benchmarks/kernels_gpu.py", "--quick"], check=False)


if __name__ == "__main__":
    main()
