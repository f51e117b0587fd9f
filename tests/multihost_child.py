"""One process of the two-process evaluation in ``tests/test_sharding.py``.

The parent sets ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID``; this process gets 2 simulated CPU devices, joins the system with
:func:`jaxquant.distributed.initialize`, and evaluates the tiny RTN-quantized model on
a ``data=2,model=2`` mesh over both processes' devices. Prints one JSON line.
Usage: ``python -m tests.multihost_child``.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import json

from jaxquant import distributed

info = distributed.initialize()  # before anything touches a device

import jax  # noqa: E402

from jaxquant.eval import evaluate_perplexity  # noqa: E402
from jaxquant.sharding import MeshConfig  # noqa: E402
from tests.tiny_sharded import multihost_case  # noqa: E402

params, cfg, windows = multihost_case()
result = evaluate_perplexity(params, cfg, windows, batch_size=4, progress=False,
                             mesh=MeshConfig(data=2, model=2))
print(json.dumps({"how": info.how, "process_index": info.process_index,
                  "process_count": info.process_count, "devices": jax.device_count(),
                  "local_devices": jax.local_device_count(), "ppl": result.ppl,
                  "window_nll": result.window_nll, "mesh": result.mesh,
                  "processes": result.processes}))
