"""Uniform (affine) quantization: b-bit codes with per-group scales and zero points.

``W[n, k] = s[n, g(k)] * (q[n, k] - z[n, g(k)])`` with ``g(k) = k // group_size``
(Jacob et al., 2018, eq. 1; GPTQ's quantizer). Groups run along the input axis; the
last group is shorter when ``group_size`` does not divide ``in_features`` (SmolLM2:
576 = 4 x 128 + 64). Per-output-channel quantization is ``group_size = in_features``.
Symmetric weights store no zeros: ``z = 2**(bits - 1)``.

Layout: ``planes`` are the bit-packed codes (:mod:`jaxquant.formats.packing`),
``uint32 [out, words]`` per plane; ``scales`` and ``zeros`` are ``[out, groups]`` in a
float dtype (zeros hold integers, exact in bfloat16 up to 8 bits).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.formats import packing
from jaxquant.formats.base import QuantizedWeight, register_format, static


def num_groups(k: int, group_size: int) -> int:
    """Groups along an input dimension of ``k`` (the last may be shorter)."""
    return -(-k // group_size)


def expand_groups(x: jax.Array, group_size: int, k: int) -> jax.Array:
    """``[out, groups]`` -> ``[out, k]``: each group's value repeated over its columns."""
    return jnp.repeat(x, group_size, axis=1, total_repeat_length=num_groups(k, group_size)
                      * group_size)[:, :k]


@register_format
@dataclasses.dataclass(frozen=True, kw_only=True)
class UniformWeight(QuantizedWeight):
    """A uniformly quantized ``[out, in]`` weight (see module docstring)."""

    NAME = "uniform"

    planes: tuple[jax.Array, ...]  # bit-packed codes, uint32 [out, words] per plane
    scales: jax.Array  # [out, groups] float
    zeros: jax.Array | None  # [out, groups] float holding integers; None: symmetric
    shape: tuple[int, int] = static()  # (out_features, in_features)
    bits: int = static()  # code width, 1..8
    group_size: int = static()  # columns per group (in_features: per output channel)

    @property
    def symmetric(self) -> bool:
        """True when zeros are implied (``2**(bits - 1)``)."""
        return self.zeros is None

    @property
    def dtype(self) -> Any:
        return self.scales.dtype

    def codes(self) -> jax.Array:
        """Unpacked int32 codes ``[out, in]``."""
        return packing.unpack(self.planes, self.bits, self.shape[1])

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        k = self.shape[1]
        q = self.codes().astype(jnp.float32)
        s = expand_groups(self.scales.astype(jnp.float32), self.group_size, k)
        if self.zeros is None:
            z = jnp.float32(2 ** (self.bits - 1))
        else:
            z = expand_groups(self.zeros.astype(jnp.float32), self.group_size, k)
        return (s * (q - z)).astype(dtype)

    def integer_codes(self) -> tuple[jax.Array, jax.Array] | None:
        """Symmetric per-channel weights: ``(codes - 2**(bits-1)`` as int8, scales)``."""
        if self.zeros is not None or self.group_size < self.shape[1]:
            return None
        codes = (self.codes() - 2 ** (self.bits - 1)).astype(jnp.int8)
        return codes, self.scales[:, 0].astype(jnp.float32)

    def summary(self) -> str:
        n, k = self.shape
        group = "per-channel" if self.group_size >= k else f"g{self.group_size}"
        kind = "sym" if self.symmetric else "asym"
        return (f"uniform {self.bits}-bit {kind} {group} {jnp.dtype(self.dtype).name} scales, "
                f"{n}x{k}, {self.bits_per_weight:.3f} bits/weight")

    @classmethod
    def from_codes(cls, codes: jax.Array, scales: jax.Array, zeros: jax.Array | None, *,
                   bits: int, group_size: int) -> UniformWeight:
        """Packs int codes ``[out, in]`` with their ``[out, groups]`` scales and zeros."""
        n, k = codes.shape
        return cls(planes=packing.pack(codes, bits), scales=scales, zeros=zeros,
                   shape=(int(n), int(k)), bits=bits, group_size=int(min(group_size, k)))


def storage_bits(shape: tuple[int, int], *, bits: int, group_size: int, symmetric: bool,
                 scale_dtype: Any) -> int:
    """Exact bits a :class:`UniformWeight` of these parameters holds (without building it)."""
    n, k = shape
    groups = num_groups(k, min(group_size, k))
    per_group = np.dtype(scale_dtype).itemsize * 8 * (1 if symmetric else 2)
    return n * (32 * packing.row_words(k, bits) + groups * per_group)
