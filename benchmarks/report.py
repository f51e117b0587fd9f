"""What every benchmark records beside its numbers: the device, the versions, the machine."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
from typing import Any

import jax
import numpy as np


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name`` (None when it is not installed)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Device, versions and machine of this run."""
    d = jax.devices()[0]
    return {"device": f"{d.device_kind} x{jax.device_count()} ({jax.default_backend()})",
            "device_kind": d.device_kind, "backend": jax.default_backend(),
            "devices": jax.device_count(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "jaxlib": package_version("jaxlib"), "flax": package_version("flax"),
            "numpy": np.__version__}


def host_max_rss_bytes() -> int:
    """Maximum resident set size of this process, bytes (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
