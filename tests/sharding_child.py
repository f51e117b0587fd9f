"""The sharded checks of ``tests/test_sharding.py``, run in a child process.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before JAX starts,
which the pytest process has already done with one device; so one child runs every
check on 8 simulated CPU devices and prints one JSON line of measurements, which the
tests assert on. Usage: ``python -m tests.sharding_child``.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import json
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxquant import calibration, sharding
from jaxquant.eval import evaluate_perplexity
from jaxquant.formats.base import is_quantized
from jaxquant.models import transformer
from jaxquant.params import flatten
from jaxquant.quantize import _calibrated_layer, quantize
from tests.tiny_sharded import CALIB_MESH, MESHES, RECIPE, kind, tiny_model


def device_bytes() -> int:
    """The most bytes of live arrays on any one device."""
    per: dict[Any, int] = {}
    for a in jax.live_arrays():
        for shard in a.addressable_shards:
            per[shard.device] = per.get(shard.device, 0) + shard.data.nbytes
    return max(per.values(), default=0)


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    out: dict[str, Any] = {"seconds": {}}
    start = time.perf_counter()

    def lap(name: str) -> None:
        out["seconds"][name] = round(time.perf_counter() - start - sum(
            out["seconds"].values()), 2)

    cfg, params = tiny_model()
    rng = np.random.default_rng(1)
    calib_windows = rng.integers(0, cfg.vocab_size, (8, 32)).astype(np.int32)
    tokens8 = rng.integers(0, cfg.vocab_size, (8, 24)).astype(np.int32)  # logits
    windows = tokens8[:7]  # perplexity: the last batch is padded
    calib = calibration.Calibration(config=cfg, windows=calib_windows, batch_size=4,
                                    progress=False)
    qparams = quantize(params, RECIPE, calib)
    flat_q = flatten(qparams)
    out["formats"] = {p: kind(w) for p, w in flat_q.items() if is_quantized(w)}
    lap("quantize")

    # Sharded, streamed calibration: same recipe on a 4x2 mesh.
    mesh = sharding.make_mesh(sharding.MeshConfig(data=CALIB_MESH[0], model=CALIB_MESH[1]))
    x = jax.device_put(jnp.ones((4, 32, cfg.hidden_size)),
                       NamedSharding(mesh, PartitionSpec("data")))
    block = sharding.shard_params(params["layers"][0], mesh)
    hlo = calibration._block_stats.lower(block, cfg, 0, x, 0, True).compile().as_text()
    out["hessian_all_reduce"] = "all-reduce" in hlo
    specs, _ = RECIPE.plan(flatten(params))
    memory: dict[str, list[int]] = {}

    def probe(path: str, w: Any, spec: Any, inputs: Any) -> Any:
        memory.setdefault(path.split(".")[1], []).append(device_bytes())
        return _calibrated_layer(path, w, spec, inputs)

    sharded_calib = calibration.Calibration(config=cfg, windows=calib_windows, batch_size=4,
                                            progress=False, mesh=mesh, stream=True)
    q2, _ = calibration.sequential_quantize(params, sharded_calib, probe, specs)
    diffs = {}
    host = True
    for path, w in flatten(q2).items():
        host &= all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(w))
        if is_quantized(w):
            a, b = np.asarray(w.dequantize()), np.asarray(flat_q[path].dequantize())
            ref = np.asarray(flatten(params)[path], np.float32)
            diffs[path] = {"kind": kind(w), "method": specs[path].method,
                           "maxdiff": float(np.abs(a - b).max()),
                           "mismatch": float(np.mean(a != b)),
                           "err": float(np.linalg.norm(a - ref) / np.linalg.norm(ref)),
                           "err_single": float(np.linalg.norm(b - ref) / np.linalg.norm(ref))}
    out["calibration"] = {"diffs": diffs, "on_host": bool(host), "memory": memory,
                          "block_bytes": int(sum(np.asarray(v).nbytes for v in flatten(
                              params["layers"][0]).values()))}
    lap("sharded calibration")

    # Single-device references.
    one = [jax.devices()[0]]
    ref = evaluate_perplexity(qparams, cfg, windows, batch_size=4, progress=False,
                              devices=one)
    fwd = jax.jit(transformer.forward, static_argnums=1)
    want = np.asarray(fwd(jax.device_put(qparams, one[0]), cfg,
                          jax.device_put(tokens8, one[0])))
    out["single"] = {"ppl": ref.ppl, "window_nll": ref.window_nll}
    out["logits_absmax"] = float(np.abs(want).max())
    lap("single-device reference")

    out["meshes"] = {}
    for d, m in (*MESHES, (1, 8)):
        mesh = sharding.make_mesh(sharding.MeshConfig(data=d, model=m))
        name = f"{d}x{m}"
        placed = sharding.shard_params(qparams, mesh)
        tokens = jax.device_put(tokens8, NamedSharding(mesh, PartitionSpec("data")))
        got = np.asarray(fwd(placed, cfg, tokens))
        row = {"logits_maxdiff": float(np.abs(got - want).max()),
               "layout": sharding.describe_layout(qparams, mesh),
               "split": {p: [list(s.spec) for s in jax.tree.leaves(sh)]
                         for p, sh in flatten(sharding.param_shardings(qparams, mesh)).items()
                         if is_quantized(flat_q[p])}}
        if (d, m) in MESHES:
            r = evaluate_perplexity(qparams, cfg, windows, batch_size=4, progress=False,
                                    mesh=mesh)
            row.update(ppl=r.ppl, window_nll=r.window_nll, mesh=r.mesh, devices=r.devices,
                       batch_size=r.batch_size)
        out["meshes"][name] = row
        lap(name)

    print(json.dumps(out))


if __name__ == "__main__":
    main()
    sys.stdout.flush()
