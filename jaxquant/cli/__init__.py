"""The ``jaxquant`` command line."""
