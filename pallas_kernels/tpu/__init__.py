"""Mosaic TPU kernels (run on TPUs; verified elsewhere in the Pallas TPU interpreter)."""
