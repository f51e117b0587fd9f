"""Scale-out on one multi-GPU host: sharded perplexity, throughput, layer-streaming GPTQ.

Three measurements, each recorded with the device, the JAX version and the mesh:

(a) **Same perplexity on 1 and on all devices.** A random-weight model of the
    Llama-2-7B shape (``--eval-layers`` blocks; hidden 4096, FFN 11008, 32 heads,
    vocab 32000), RTN 4-bit g128-quantized, scored on ``--windows`` random token
    windows of ``--seq-len`` tokens on one device, then on every device with the
    default mesh (all on ``data``) and on a ``data x model`` mesh with ``model=2``
    (tensor parallel). Random weights give a meaningless perplexity but an exact
    comparison: the per-window NLLs must agree to float32 rounding (reported: the
    largest relative difference, and whether the perplexities are bit-identical).
(b) **Throughput vs devices.** Tokens per second after compilation
    (:attr:`PerplexityResult.tokens_per_second`) on the first 1, 2, 4, ... devices,
    data-parallel, ``--batch-per-device`` windows per device per step; the speedup
    over one device and the scaling efficiency.
(c) **Layer-streaming GPTQ of a Llama-2-7B-shaped model** (``--quant-layers`` blocks,
    32 by default) on a mesh of every device: the float model is built on the host
    (NumPy, ``--dtype``), only the current block goes to the devices, the calibration
    activations (``--calib-windows`` x ``--calib-seq-len`` random tokens) are split
    over ``data`` and the Hessians all-reduced
    (:class:`jaxquant.calibration.Calibration` with ``mesh`` and ``stream``). Recorded:
    wall time (the host model's creation excluded and reported apart), the host's
    maximum RSS, and every device's ``peak_bytes_in_use``, against the float model's
    size, which a device never has to hold.

Writes ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/gpu/sharded_eval_
<device>``; with ``--tiny``, ``benchmarks/results/sharded_eval_tiny_cpu``).

    python benchmarks/sharded_eval.py                          # a multi-GPU host
    python benchmarks/sharded_eval.py --quant-layers 4 --eval-layers 4   # quick run
    python benchmarks/sharded_eval.py --tiny                   # CPU smoke test, 8
                                                               # simulated devices
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke test: a small model on --cpu-devices simulated devices")
    p.add_argument("--cpu-devices", type=int, default=8,
                   help="simulated CPU devices with --tiny (8)")
    p.add_argument("--eval-layers", type=int, default=32, help="blocks of the eval model")
    p.add_argument("--quant-layers", type=int, default=32,
                   help="blocks of the streamed GPTQ model (32: Llama-2-7B)")
    p.add_argument("--windows", type=int, default=64, help="evaluation windows (64)")
    p.add_argument("--seq-len", type=int, default=2048, help="evaluation window length")
    p.add_argument("--batch-per-device", type=int, default=2,
                   help="windows per device per step (2)")
    p.add_argument("--calib-windows", type=int, default=128, help="calibration windows")
    p.add_argument("--calib-seq-len", type=int, default=2048)
    p.add_argument("--calib-batch-per-device", type=int, default=1,
                   help="calibration windows per device per forward step (1)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="parameter dtype (bfloat16)")
    p.add_argument("--skip", action="append", default=[], choices=["eval", "quantize"],
                   help="leave out a part (repeatable)")
    p.add_argument("--out", help="output path prefix (.json and .md are written)")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.tiny:  # before JAX starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_"
                               f"platform_device_count={ARGS.cpu_devices}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(ROOT))
from benchmarks.configs import llama2_7b, tiny_llama  # noqa: E402
from benchmarks.report import environment, host_max_rss_bytes  # noqa: E402
from jaxquant import sharding  # noqa: E402
from jaxquant.calibration import Calibration  # noqa: E402
from jaxquant.eval import evaluate_perplexity  # noqa: E402
from jaxquant.formats.base import tree_nbytes  # noqa: E402
from jaxquant.models import transformer  # noqa: E402
from jaxquant.models.config import ModelConfig  # noqa: E402
from jaxquant.params import flatten, unflatten  # noqa: E402
from jaxquant.quantize import quantize  # noqa: E402
from jaxquant.recipes import QuantSpec, Recipe  # noqa: E402


def host_params(cfg: ModelConfig, dtype: Any, seed: int = 0) -> dict:
    """Random float parameters on the host (NumPy), one tensor at a time (the largest
    temporary is one float32 tensor)."""
    rng = np.random.default_rng(seed)
    abstract = transformer.abstract_params(cfg)
    flat = {}
    for path, leaf in flatten(abstract).items():
        if len(leaf.shape) == 2:
            x = rng.standard_normal(leaf.shape, dtype=np.float32)
            x *= np.float32(1.0 / math.sqrt(leaf.shape[1]))
        else:
            x = np.ones(leaf.shape, np.float32)
        flat[path] = x.astype(dtype)
    return unflatten(flat)


def device_peaks() -> list[int] | None:
    """``peak_bytes_in_use`` of every local device (None where unsupported)."""
    out = []
    for d in jax.local_devices():
        try:
            stats = d.memory_stats()
        except Exception:  # backends without memory stats (CPU)
            return None
        if not stats or "peak_bytes_in_use" not in stats:
            return None
        out.append(int(stats["peak_bytes_in_use"]))
    return out








def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def run_eval(args: argparse.Namespace, dtype: Any) -> dict[str, Any]:
    """Parts (a) and (b)."""
    cfg = tiny_llama(args.eval_layers) if args.tiny else llama2_7b(args.eval_layers)
    params = host_params(cfg, dtype)
    start = time.perf_counter()
    qparams = jax.device_get(quantize(params, Recipe.uniform(QuantSpec(bits=4,
                                                                       group_size=128))))
    quant_s = time.perf_counter() - start
    del params
    devices = jax.local_devices()
    n = len(devices)
    # At least 3 steps on every device count: tokens/s is measured after the first.
    count = max(args.windows, 3 * args.batch_per_device * n)
    windows = np.random.default_rng(1).integers(0, cfg.vocab_size,
                                                (count, args.seq_len)).astype(np.int32)

    def score(devs: list[Any], mesh_cfg: sharding.MeshConfig) -> Any:
        mesh = sharding.make_mesh(mesh_cfg, devs)
        batch = args.batch_per_device * sharding.mesh_shape(mesh)["data"]
        return evaluate_perplexity(qparams, cfg, windows, batch_size=batch, progress=False,
                                   mesh=mesh)

    one = score(devices[:1], sharding.MeshConfig(data=1))
    meshes = [(k, sharding.MeshConfig(data=k))
              for k in sorted({1 << i for i in range(int(math.log2(n)) + 1)} | {n})]
    if n >= 2 and n % 2 == 0:
        meshes.append((n, sharding.MeshConfig(data=n // 2, model=2)))
    rows = []
    for k, mesh_cfg in meshes:
        r = one if k == 1 else score(devices[:k], mesh_cfg)
        rows.append({"devices": k, "mesh": r.mesh, "ppl": r.ppl,
                     "tokens_per_second": r.tokens_per_second,
                     "compile_seconds": r.compile_seconds, "seconds": r.seconds,
                     "max_rel_window_diff": float(np.max(np.abs(
                         np.asarray(r.window_nll) / np.asarray(one.window_nll) - 1))),
                     "identical": r.ppl == one.ppl})
    for row in rows:
        row["speedup"] = row["tokens_per_second"] / rows[0]["tokens_per_second"]
        row["efficiency"] = row["speedup"] / row["devices"]
    return {"config": cfg.to_dict(), "quantize_seconds": quant_s,
            "quantized_bytes": tree_nbytes(qparams), "windows": count,
            "seq_len": args.seq_len, "batch_per_device": args.batch_per_device,
            "rows": rows}


def run_quantize(args: argparse.Namespace, dtype: Any) -> dict[str, Any]:
    """Part (c)."""
    cfg = tiny_llama(args.quant_layers) if args.tiny else llama2_7b(args.quant_layers)
    start = time.perf_counter()
    params = host_params(cfg, dtype, seed=2)
    build_s = time.perf_counter() - start
    rss_model = host_max_rss_bytes()
    mesh = sharding.make_mesh(None, jax.local_devices())
    calib_windows = np.random.default_rng(3).integers(
        0, cfg.vocab_size, (args.calib_windows, args.calib_seq_len)).astype(np.int32)
    calibration = Calibration(config=cfg, windows=calib_windows,
                              batch_size=args.calib_batch_per_device * mesh.size,
                              progress=True, mesh=mesh, stream=True)
    start = time.perf_counter()
    qparams, stats = quantize(params, Recipe.uniform(QuantSpec(method="gptq", bits=4,
                                                               group_size=128)),
                              calibration, return_stats=True)
    seconds = time.perf_counter() - start
    on_host = all(isinstance(x, np.ndarray) for x in jax.tree.leaves(qparams))
    peaks = device_peaks()
    block = sum(np.asarray(v).nbytes for v in flatten(params["layers"][0]).values())
    return {"config": cfg.to_dict(), "dtype": args.dtype, "mesh": sharding.mesh_shape(mesh),
            "calib_windows": args.calib_windows, "calib_seq_len": args.calib_seq_len,
            "host_model_seconds": build_s, "seconds": seconds,
            "seconds_per_block": seconds / cfg.num_layers,
            "projected_32_block_seconds": seconds / cfg.num_layers * 32,
            "float_bytes": tree_nbytes(params), "block_bytes": int(block),
            "quantized_bytes": tree_nbytes(qparams), "result_on_host": on_host,
            "host_max_rss_after_model": rss_model, "host_max_rss": host_max_rss_bytes(),
            "device_peak_bytes": peaks,
            "mean_relative_error": float(np.mean([s["relative_error"]
                                                  for s in stats["layers"].values()]))}


def markdown(report: dict[str, Any]) -> list[str]:
    env = report["environment"]
    md = [f"# Sharded evaluation and layer-streaming quantization ({env['device']})", "",
          f"jax {env['jax']}, jaxlib {env['jaxlib']}, python {env['python']}"]
    ev = report.get("eval")
    if ev:
        c = ev["config"]
        md += ["", f"## Perplexity and throughput: RTN 4-bit g128, {c['num_layers']} blocks "
               f"of hidden {c['hidden_size']} / FFN {c['intermediate_size']} (random "
               f"weights), {ev['windows']} windows of {ev['seq_len']} tokens, "
               f"{ev['batch_per_device']} windows per device per step", "",
               "| devices | mesh | ppl | identical to 1 device | max rel. window diff | "
               "tokens/s | speedup | efficiency |", "|---|---|---|---|---|---|---|---|"]
        for r in ev["rows"]:
            m = r["mesh"]
            md.append(f"| {r['devices']} | data={m['data']},model={m['model']} | "
                      f"{r['ppl']:.6f} | {'yes' if r['identical'] else 'no'} | "
                      f"{r['max_rel_window_diff']:.1e} | {r['tokens_per_second']:.0f} | "
                      f"{r['speedup']:.2f}x | {100 * r['efficiency']:.0f}% |")
    q = report.get("quantize")
    if q:
        c = q["config"]
        peaks = q["device_peak_bytes"]
        md += ["", f"## Layer-streaming GPTQ 4-bit g128: {c['num_layers']} blocks of hidden "
               f"{c['hidden_size']} / FFN {c['intermediate_size']}, {q['dtype']}, mesh "
               f"data={q['mesh']['data']},model={q['mesh']['model']}, {q['calib_windows']} x "
               f"{q['calib_seq_len']} calibration tokens", "",
               "| quantity | value |", "|---|---|",
               f"| wall time (host model creation excluded) | {q['seconds']:.1f} s |",
               f"| per block | {q['seconds_per_block']:.2f} s |",
               f"| projected 32 blocks | {q['projected_32_block_seconds'] / 60:.1f} min |",
               f"| host model creation | {q['host_model_seconds']:.1f} s |",
               f"| float model | {_gib(q['float_bytes'])} |",
               f"| one block | {_gib(q['block_bytes'])} |",
               f"| quantized model (on host) | {_gib(q['quantized_bytes'])} |",
               f"| host max RSS after building the model | "
               f"{_gib(q['host_max_rss_after_model'])} |",
               f"| host max RSS (peak) | {_gib(q['host_max_rss'])} |",
               f"| device peak, max over devices | "
               f"{_gib(max(peaks) if peaks else None)} |",
               f"| mean relative layer error | {q['mean_relative_error']:.4f} |"]
    return md


def main(args: argparse.Namespace) -> int:
    dtype = jnp.dtype(args.dtype)
    report: dict[str, Any] = {"environment": environment(), "args": vars(args)}
    if "eval" not in args.skip:
        report["eval"] = run_eval(args, dtype)
    if "quantize" not in args.skip:
        report["quantize"] = run_quantize(args, dtype)
    if args.out:
        out = Path(args.out)
    elif args.tiny:
        out = ROOT / "benchmarks" / "results" / "sharded_eval_tiny_cpu"
    else:
        kind = jax.devices()[0].device_kind.lower().replace(" ", "_")
        out = ROOT / "benchmarks" / "results" / "gpu" / f"sharded_eval_{kind}"
    out.parent.mkdir(parents=True, exist_ok=True)
    md = markdown(report)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    if ARGS.tiny:  # small defaults unless given
        given = set(sys.argv)
        for flag, value in (("--eval-layers", 2), ("--quant-layers", 2), ("--windows", 16),
                            ("--seq-len", 64), ("--calib-windows", 8),
                            ("--calib-seq-len", 64), ("--dtype", "float32")):
            if flag not in given:
                setattr(ARGS, flag[2:].replace("-", "_"), value)
    sys.exit(main(ARGS))
