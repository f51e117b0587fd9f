"""Pallas dequant-matmul kernels, one package per backend.

- :mod:`pallas_kernels.tpu.uniform`: Mosaic TPU ``x @ W^T`` for uniform 1..8-bit weights
  with group scales and zeros (kernel layout built once by ``relayout``), verified in
  CI with the Pallas TPU interpreter and by lowering for TPU.
- :mod:`pallas_kernels.compat`: the version-specific Pallas imports.

Kernels will plug into :func:`jaxquant.ops.linear` through
:func:`jaxquant.ops.register_linear`; until that integration lands every linear layer
runs the plain ``jnp`` path.
"""
