"""Orthogonal transforms applied to activations and weights before quantization.

:mod:`jaxquant.transforms.hadamard` builds Hadamard matrices of every practical order
(``K * 2^m`` with ``K`` from the Paley, Williamson/Goethals-Seidel and Kronecker
constructions) and a fast, jit-able Hadamard transform for QuaRot-style rotations.
"""
