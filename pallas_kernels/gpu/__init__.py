"""Mosaic GPU (Hopper) dequant-matmul kernels: :mod:`pallas_kernels.gpu.uniform`."""
