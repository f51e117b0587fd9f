"""Pallas dequant-matmul kernels, one package per backend.

- :mod:`pallas_kernels.tpu`: Mosaic TPU ``x @ W^T`` for uniform 1..8-bit weights with
  group scales and zeros (``uniform``) and per-column codebooks (``codebook``), on a
  shared tiled pipeline (``common``), and W8A8 int8 on the MXU (``int8``); verified in
  CI with the Pallas TPU interpreter and by lowering for TPU.
- :mod:`pallas_kernels.sparse`: float outliers as a sparse correction over any
  kernel-layout base.
- :mod:`pallas_kernels.compat`: the version-specific Pallas imports; :mod:`pallas_kernels.util`:
  tile arithmetic and the wall clock of the `main()` benchmarks.

Each kernel module has ``eligible``, ``relayout`` (the kernel layout, built once), a
jnp ``reference`` and a ``main()`` benchmark, and registers its layout type with
:func:`jaxquant.ops.register_kernel` (compiled on its platform, interpreted elsewhere);
:func:`jaxquant.backends.prepare` converts a
model's weights for the backend.
"""
