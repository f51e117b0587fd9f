"""Quantized weight formats (registered pytrees with a jnp ``dequantize`` reference)."""

from jaxquant.formats.base import QuantizedWeight, from_layout, is_quantized, register_format
from jaxquant.formats.codebook import CodebookWeight
from jaxquant.formats.mixed import MixedWeight
from jaxquant.formats.outliers import OutlierWeight
from jaxquant.formats.uniform import UniformWeight, storage_bits

__all__ = [
    "CodebookWeight",
    "MixedWeight",
    "OutlierWeight",
    "QuantizedWeight",
    "UniformWeight",
    "from_layout",
    "is_quantized",
    "register_format",
    "storage_bits",
]
