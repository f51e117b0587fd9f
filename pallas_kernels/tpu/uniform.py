"""Mosaic TPU kernel: ``y = x W^T`` for a uniform b-bit weight with group scales and zeros.

Computes ``y[m, n] = sum_k x[m, k] s[n, g(k)] (q[n, k] - z[n, g(k)])`` for a
:class:`jaxquant.formats.UniformWeight` (any width 1..8, groups along the input axis,
symmetric or not), dequantizing one ``[bk, bn]`` weight tile at a time in VMEM and
feeding it to the MXU with float32 accumulation. The weight is read once per M block
at ``b`` bits per code, so a memory-bound decode moves ``b/16`` of a bf16 weight's bytes.

Kernel layout (:func:`relayout`, once per weight, not per call): the codes are
transposed to ``[K, N]`` (input rows on sublanes, outputs on lanes), padded to whole
``[bk, bn]`` tiles, and split into the format's bit planes (3 = 2 + 1, as
:mod:`jaxquant.formats.packing`). A plane of width ``w`` packs ``p = 32 / w`` codes per
uint32 *strided within each K tile*: word row ``r`` of tile ``t`` holds rows
``t bk + j (bk / p) + r`` at bits ``[j w, (j + 1) w)``, ``j < p``. Unpacking is then
``p`` whole-tile shifts and masks whose results stack along sublanes, with no lane
shuffles. Scales and zeros are stored per *kernel group* of ``kg = gcd(group_size, bk)``
input rows, ``[K_pad / kg, N_pad]`` float32 (per output channel: one row
``[1, N_pad]``), and broadcast over their rows in VMEM. When a K tile has fewer than 8
scale rows (the TPU's sublane tiling), the scale block spans all K tiles (fetched once
per N tile) and the kernel slices the current tile's rows.

Grid ``(M / bm, N / bn, K / bk)``, the K axis innermost and sequential (a float32 VMEM
accumulator), the others parallel. Block sizes come from :func:`block_sizes`, a table
keyed by TPU generation with a safe fallback; the VMEM limit is set from an estimate.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.formats import packing
from jaxquant.formats.uniform import UniformWeight
from jaxquant.ops import register_linear
from pallas_kernels.compat import pl, pltpu, tpu_compiler_params, tpu_interpret

#: (bn, bk) per TPU generation: output lanes per tile, input rows per tile. bk is a
#: multiple of 256 so the 1-bit plane's tile has a whole number of 8-row sublane groups.
_NK_BLOCKS: dict[str, tuple[int, int]] = {
    "v4": (512, 1024),
    "v5e": (512, 1024),
    "v5p": (512, 1024),
    "v6e": (1024, 1024),
}
_FALLBACK_NK = (256, 512)
#: Largest M block; M is padded to a multiple of 16 (bf16 sublane packing).
_BM_MAX = 256
_VMEM_CAP = 48 * 2**20


def tpu_generation(device: Any | None = None) -> str | None:
    """``"v4"``, ``"v5e"``, ``"v5p"``, ``"v6e"``... from a device kind, else ``None``."""
    try:
        kind = (device or jax.devices()[0]).device_kind.lower()
    except Exception:  # no devices at all
        return None
    if "tpu" not in kind:
        return None
    for gen, keys in (("v6e", ("v6",)), ("v5e", ("v5 lite", "v5e")), ("v5p", ("v5p", "v5")),
                      ("v4", ("v4",))):
        if any(k in kind for k in keys):
            return gen
    return None


def block_sizes(n: int, k: int, generation: str | None = None) -> tuple[int, int]:
    """``(bn, bk)`` for an ``[n, k]`` weight: the generation's entry, shrunk for small
    weights (never below 128 lanes / 256 rows), else the safe fallback."""
    bn, bk = _NK_BLOCKS.get(generation or "", _FALLBACK_NK)
    bn = min(bn, max(128, _round_up(n, 128)))
    bk = min(bk, max(256, _round_up(k, 256)))
    return bn, bk


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class TpuUniformWeight:
    """A :class:`UniformWeight` in the kernel layout (see the module docstring)."""

    planes: tuple[jax.Array, ...]  # uint32 [K_pad / (32 / w), N_pad] per plane width w
    scales: jax.Array  # float32 [K_pad / kg, N_pad] (per output channel: [1, N_pad])
    zeros: jax.Array | None  # like scales; None: symmetric (2**(bits-1))
    shape: tuple[int, int] = dataclasses.field(metadata={"static": True})  # (N, K)
    bits: int = dataclasses.field(metadata={"static": True})  # code width
    kg: int = dataclasses.field(metadata={"static": True})  # input rows per stored scale row
    bn: int = dataclasses.field(metadata={"static": True})  # output lanes per tile
    bk: int = dataclasses.field(metadata={"static": True})  # input rows per tile

    @property
    def padded(self) -> tuple[int, int]:
        """``(N_pad, K_pad)``."""
        return int(self.scales.shape[1]), int(self.scales.shape[0]) * self.kg

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """The ``[N, K]`` weight back from the kernel layout (jnp; a test reference)."""
        n_pad, k_pad = self.padded
        codes = jnp.zeros((k_pad, n_pad), jnp.int32)
        shift = 0
        for plane, width in zip(self.planes, packing.plane_widths(self.bits), strict=True):
            per = 32 // width
            words = plane.reshape(k_pad // self.bk, 1, self.bk // per, n_pad)
            offsets = (jnp.arange(per, dtype=jnp.uint32) * width)[None, :, None, None]
            part = ((words >> offsets) & jnp.uint32((1 << width) - 1)).astype(jnp.int32)
            codes = codes | (part.reshape(k_pad, n_pad) << shift)
            shift += width
        s = jnp.repeat(self.scales, self.kg, axis=0)
        z = (jnp.float32(2 ** (self.bits - 1)) if self.zeros is None
             else jnp.repeat(self.zeros, self.kg, axis=0))
        w = s * (codes.astype(jnp.float32) - z)
        n, k = self.shape
        return w[:k, :n].T.astype(dtype)


def eligible(w: Any) -> str | None:
    """``None`` when :func:`relayout` can take ``w``, else the reason it cannot."""
    if not isinstance(w, UniformWeight):
        return f"not a UniformWeight ({type(w).__name__})"
    k = w.shape[1]
    if w.group_size < k and w.group_size % 8:
        return f"group size {w.group_size} is not a multiple of 8 (TPU sublane tiling)"
    return None


def relayout(w: UniformWeight, *, generation: str | None = None,
             blocks: tuple[int, int] | None = None) -> TpuUniformWeight:
    """The kernel layout of ``w`` (host NumPy work, once per weight).

    Args:
      w: The weight (:func:`eligible` must hold).
      generation: TPU generation for :func:`block_sizes` (default: the current device's).
      blocks: ``(bn, bk)`` overriding the table (bn a multiple of 128, bk of 256).

    Raises:
      ValueError: An ineligible weight or bad block sizes.
    """
    why = eligible(w)
    if why:
        raise ValueError(f"the TPU uniform kernel cannot take this weight: {why}")
    n, k = w.shape
    bn, bk = blocks or block_sizes(n, k, generation if generation else tpu_generation())
    if bn % 128 or bk % 256:
        raise ValueError(f"blocks must be (multiple of 128, multiple of 256), got {(bn, bk)}")
    n_pad, k_pad = _round_up(n, bn), _round_up(k, bk)
    codes = np.zeros((k_pad, n_pad), np.uint32)
    codes[:k, :n] = np.asarray(w.codes()).T
    planes, shift = [], 0
    for width in packing.plane_widths(w.bits):
        per = 32 // width
        part = (codes >> np.uint32(shift)) & np.uint32((1 << width) - 1)
        part = part.reshape(k_pad // bk, per, bk // per, n_pad)
        offsets = (np.arange(per, dtype=np.uint32) * np.uint32(width))[None, :, None, None]
        words = np.bitwise_or.reduce(part << offsets, axis=1)  # fields are disjoint
        planes.append(jnp.asarray(words.reshape(k_pad // per, n_pad)))
        shift += width
    if w.group_size >= k:  # per output channel: one row of scales for every K tile
        kg, groups = k_pad, np.zeros(1, np.int64)
    else:
        kg = math.gcd(w.group_size, bk)
        groups = np.minimum(np.arange(0, k_pad, kg) // w.group_size, w.scales.shape[1] - 1)

    def per_kernel_group(a: jax.Array) -> jax.Array:
        out = np.zeros((k_pad // kg, n_pad), np.float32)
        out[:, :n] = np.asarray(a, np.float32)[:, groups].T
        return jnp.asarray(out)

    return TpuUniformWeight(
        planes=tuple(planes), scales=per_kernel_group(w.scales),
        zeros=None if w.zeros is None else per_kernel_group(w.zeros),
        shape=(n, k), bits=w.bits, kg=kg, bn=bn, bk=bk)


def _kernel(*refs: Any, widths: tuple[int, ...], bits: int, kg: int, bk: int,
            symmetric: bool, whole_scales: bool, precision: Any) -> None:
    x_ref, *plane_refs = refs[:1 + len(widths)]
    rest = refs[1 + len(widths):]
    s_ref, rest = rest[0], rest[1:]
    z_ref, rest = (None, rest) if symmetric else (rest[0], rest[1:])
    o_ref, acc_ref = rest

    @pl.when(pl.program_id(2) == 0)
    def _init() -> None:
        acc_ref[...] = jnp.zeros_like(acc_ref)

    codes, shift = None, 0
    for plane_ref, width in zip(plane_refs, widths, strict=True):
        words = plane_ref[...]
        mask = jnp.uint32((1 << width) - 1)
        rows = [(words >> jnp.uint32(j * width)) & mask for j in range(32 // width)]
        part = (jnp.concatenate(rows, axis=0) if len(rows) > 1 else rows[0]).astype(jnp.int32)
        part = part << shift if shift else part
        codes = part if codes is None else codes | part
        shift += width
    bn = codes.shape[1]

    r = max(bk // kg, 1)  # stored scale rows per K tile

    def expand(ref: Any) -> jax.Array:  # this K tile's rows -> [bk, bn]
        if kg >= bk:  # per output channel: the block is the one row
            return jnp.broadcast_to(ref[...], (bk, bn))
        # whole_scales: the block holds every K tile's rows; take this tile's
        a = (ref[pl.ds(pl.multiple_of(pl.program_id(2) * r, r), r), :] if whole_scales
             else ref[...])
        return jnp.broadcast_to(a[:, None, :], (r, kg, bn)).reshape(bk, bn)

    z = jnp.float32(2 ** (bits - 1)) if symmetric else expand(z_ref)
    w = (codes.astype(jnp.float32) - z) * expand(s_ref)
    x = x_ref[...]
    acc_ref[...] += jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32,
                            precision=precision)

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _done() -> None:
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def vmem_bytes(bm: int, bn: int, bk: int, bits: int, x_itemsize: int) -> int:
    """Estimated VMEM of one grid step: double-buffered inputs and output, the
    accumulator, and the unpacked/dequantized tile temporaries (int32 + float32)."""
    inputs = bm * bk * x_itemsize + bk * bn * bits // 8 + 2 * bn * bk // 8 * 4
    return 2 * (inputs + bm * bn * x_itemsize) + bm * bn * 4 + 3 * bk * bn * 4


@functools.partial(jax.jit, static_argnames=("interpret",))
def uniform_matmul(x: jax.Array, w: TpuUniformWeight, *, interpret: bool | Any = False
                   ) -> jax.Array:
    """``x @ W^T`` for ``x [..., K]`` (float) and a weight in the kernel layout.

    Args:
      x: Activations; float32 runs the MXU at full float32 precision, bf16 natively.
      w: :func:`relayout` output.
      interpret: ``True`` runs the kernel in the Pallas TPU interpreter (any backend;
        tests on CPU), or pass ``pltpu.InterpretParams(...)``.

    Returns:
      ``[..., N]`` in ``x``'s dtype.
    """
    n, k = w.shape
    n_pad, k_pad = w.padded
    lead = x.shape[:-1]
    m = math.prod(lead)
    x2 = x.reshape(m, k)
    bm = min(_BM_MAX, _round_up(max(m, 1), 16))
    m_pad = _round_up(m, bm)
    x2 = jnp.pad(x2, ((0, m_pad - m), (0, k_pad - k)))
    widths = packing.plane_widths(w.bits)
    bn, bk, kg = w.bn, w.bk, w.kg
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    in_specs = [pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk))]
    in_specs += [pl.BlockSpec((bk // (32 // wd), bn), lambda i, j, kk: (kk, j)) for wd in widths]
    # Scale rows per K tile: a blocked spec needs a multiple of 8 rows (TPU tiling);
    # fewer (e.g. 4 groups of 128 in a 512-row tile) -> the block spans all K tiles'
    # rows (fetched once per N tile) and the kernel slices this tile's rows.
    rows = bk // kg if kg < bk else 1
    whole_scales = kg < bk and rows % 8 != 0
    if kg >= bk:
        s_spec = pl.BlockSpec((1, bn), lambda i, j, kk: (0, j))
    elif whole_scales:
        s_spec = pl.BlockSpec((w.scales.shape[0], bn), lambda i, j, kk: (0, j))
    else:
        s_spec = pl.BlockSpec((rows, bn), lambda i, j, kk: (kk, j))
    in_specs += [s_spec] * (1 if w.zeros is None else 2)
    operands = [x2, *w.planes, w.scales] + ([] if w.zeros is None else [w.zeros])
    vmem = vmem_bytes(bm, bn, bk, w.bits, x.dtype.itemsize)
    out = pl.pallas_call(
        functools.partial(_kernel, widths=widths, bits=w.bits, kg=kg, bk=bk,
                          symmetric=w.zeros is None, whole_scales=whole_scales,
                          precision=precision),
        grid=(m_pad // bm, n_pad // bn, k_pad // bk),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), x.dtype),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=tpu_compiler_params(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=min(_VMEM_CAP, max(16 * 2**20, 2 * vmem))),
        interpret=tpu_interpret(interpret),
    )(*operands)
    return out[:m, :n].reshape(*lead, n)


def linear(x: jax.Array, w: TpuUniformWeight) -> jax.Array:
    """:func:`jaxquant.ops.linear` for kernel-layout weights: the kernel on a TPU, the
    Pallas TPU interpreter elsewhere (weights prepared for a TPU, e.g. in tests)."""
    return uniform_matmul(x, w, interpret=jax.default_backend() != "tpu")


register_linear(TpuUniformWeight, linear)


def reference(x: jax.Array, w: UniformWeight) -> jax.Array:
    """The jnp reference: ``x @ dequantize(W)^T`` in float32 (HIGHEST precision)."""
    return jnp.einsum("...k,nk->...n", x.astype(jnp.float32), w.dequantize(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)


def main() -> None:
    """Benchmark on a TPU (Llama-2-7B shapes; median of 20 after warm-up)."""
    import time

    from jaxquant.algorithms.rtn import rtn

    if tpu_generation() is None:
        print("no TPU here: the benchmark needs one (tests run the kernel interpreted)")
        return
    rng = np.random.default_rng(0)
    for n, k in ((4096, 4096), (11008, 4096), (4096, 11008)):
        wf = jnp.asarray(rng.normal(size=(n, k)).astype(np.float32))
        for bits in (4, 3, 2):
            tw = relayout(rtn(wf, bits=bits, group_size=128, symmetric=False))
            for m in (1, 16, 512):
                x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
                f = jax.jit(uniform_matmul)
                f(x, tw).block_until_ready()
                ts = []
                for _ in range(20):
                    t = time.perf_counter()
                    f(x, tw).block_until_ready()
                    ts.append(time.perf_counter() - t)
                print(f"{n}x{k} {bits}-bit M={m}: {1e6 * float(np.median(ts)):.1f} us")


if __name__ == "__main__":
    main()
