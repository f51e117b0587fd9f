"""Pallas dequant-matmul kernels, one module per backend (filled by the kernel issues).

Kernels plug into :func:`jaxquant.ops.linear` through
:func:`jaxquant.ops.register_linear`; until then every linear layer runs the
plain ``jnp`` path.
"""
