"""Multi-host (multi-process) JAX: one process per host, one mesh over all of them.

:func:`initialize` calls :func:`jax.distributed.initialize` when the environment asks
for several processes, and does nothing otherwise, so the same command runs on one
machine and on many:

* **environment-driven** (several GPU hosts, or processes on one machine):
  ``JAX_COORDINATOR_ADDRESS=host:port`` (the address of process 0),
  ``JAX_NUM_PROCESSES=N`` and ``JAX_PROCESS_ID=i`` (``0 <= i < N``) in every
  process's environment; ``JAX_LOCAL_DEVICE_IDS`` optionally restricts a process to
  some of its host's GPUs (JAX reads it);
* **automatic on Cloud TPU VMs** (pod slices): where ``libtpu`` is installed and no
  coordinator is given, JAX's own cluster detection finds the workers of the slice
  (a single-host TPU VM becomes a one-process system, which changes nothing);
* ``JAXQUANT_DISTRIBUTED=1`` forces JAX's cluster detection everywhere (SLURM, Open
  MPI, Kubernetes), ``JAXQUANT_DISTRIBUTED=0`` turns all of this off.

It must run before anything touches a JAX device (the CLI calls it first). After it,
``jax.devices()`` lists every process's devices; :func:`jaxquant.sharding.make_mesh`
builds the mesh over all of them and :func:`jaxquant.evaluate_perplexity` splits each
batch so that every process feeds only its own devices' rows.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import jax

from jaxquant.errors import JaxquantError

#: The environment variables read (besides JAX's own).
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_SWITCH = "JAXQUANT_DISTRIBUTED"


class DistributedError(JaxquantError):
    """The multi-process environment is incomplete or JAX could not join it."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProcessInfo:
    """Where this process stands after :func:`initialize`."""

    process_index: int  # this process's index, 0 .. process_count - 1
    process_count: int  # processes (hosts) in the system; 1: single process
    local_devices: int  # devices this process drives
    devices: int  # devices of all processes together
    how: str  # "single" | "environment" | "auto" (JAX's cluster detection) | "already"

    @property
    def is_main(self) -> bool:
        """True for process 0, the one that prints and writes reports."""
        return self.process_index == 0


def _info(how: str) -> ProcessInfo:
    return ProcessInfo(process_index=jax.process_index(), process_count=jax.process_count(),
                       local_devices=jax.local_device_count(), devices=jax.device_count(),
                       how=how)


def _env_int(name: str, env: Any) -> int:
    value = env.get(name)
    if value is None:
        raise DistributedError(f"{ENV_COORDINATOR} is set, so {name} must be too (see "
                               "docs/sharding.md)")
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name} must be an integer, got {value!r}") from None


def _on_tpu_vm() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def initialize(env: Any = None) -> ProcessInfo:
    """Joins the multi-process system the environment describes (see the module docstring).

    Args:
      env: The environment mapping (default: ``os.environ``).

    Returns:
      This process's place in the system (one process when nothing is asked for).

    Raises:
      DistributedError: an incomplete or malformed environment, or JAX could not
        initialize (for example because a device was used before this call).
    """
    env = os.environ if env is None else env
    if jax.distributed.is_initialized():
        return _info("already")
    switch = env.get(ENV_SWITCH, "auto").strip().lower()
    if switch in ("0", "off", "false", "no"):
        return _info("single")
    kwargs: dict[str, Any] = {}
    if env.get(ENV_COORDINATOR):
        how = "environment"
        kwargs = {"coordinator_address": env[ENV_COORDINATOR],
                  "num_processes": _env_int(ENV_NUM_PROCESSES, env),
                  "process_id": _env_int(ENV_PROCESS_ID, env)}
        if not 0 <= kwargs["process_id"] < kwargs["num_processes"]:
            raise DistributedError(f"{ENV_PROCESS_ID}={kwargs['process_id']} must lie in "
                                   f"[0, {ENV_NUM_PROCESSES}={kwargs['num_processes']})")
    elif switch in ("1", "on", "true", "yes") or (switch == "auto" and _on_tpu_vm()):
        how = "auto"
    else:
        return _info("single")
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        if how == "auto" and switch == "auto":  # a TPU VM that is not part of a cluster
            return _info("single")
        first = next((s for s in str(e).splitlines() if s.strip()), type(e).__name__)
        raise DistributedError(f"jax.distributed.initialize failed: {first.strip()}") from e
    return _info(how)
