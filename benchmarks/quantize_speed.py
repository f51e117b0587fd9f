"""Quantization speed on Llama-2-7B shapes: per layer against qwix, and a whole model.

Acceptance item: on the lent H100, quantizing a model with Llama-2-7B layer shapes (32
blocks, hidden 4096, FFN 11008) takes at most 5 minutes with GPTQ and 10 with SliM-LLM,
excluding loading; per layer, jaxquant's GPTQ is at least 20x faster than qwix's
``qwix.contrib.gptq`` on the same layer in the same run; peak memory is recorded.
Random weights and synthetic calibration data: only the time is measured here.

``--mode layer``: for each distinct Llama-2-7B linear shape (``[4096, 4096]`` q/k/v/o,
``[11008, 4096]`` gate/up, ``[4096, 11008]`` down), weights ``0.02 * normal`` and a
synthetic Hessian ``H = 2 X^T X / n`` of random activations ``X [n, in]`` whose channels
have log-normal magnitudes plus a few large outlier channels (as real LLM activations).
Times ``jaxquant.algorithms.gptq.gptq(w, H, bits=4, group_size=128)`` (asymmetric, the
default, and symmetric) after a warm-up call (reported: first call, i.e. compilation),
``jax.block_until_ready``, median of ``--repeats`` runs; then qwix's GPTQ
(``qwix.contrib.gptq_core.quantize_weight``, eager, as ``qwix.contrib.gptq.
quantize_params`` runs it) on the same weight and Hessian, symmetric int4 with groups of
128 (qwix 0.1.8's asymmetric per-group path fails: ``zero_point and ...`` on an array).
qwix is first run on the first ``--qwix-probe-cols`` columns, cold then warm; the whole
layer is timed when the warm per-column time predicts at most ``--qwix-max-seconds``,
otherwise its time is extrapolated linearly per column from the warm probe (labelled
"extrapolated"). For reference, the same qwix function under ``jax.jit`` (as qwix's own
tests run it; its Python loops unroll, so compilation grows faster than linearly with the
columns) is timed on ``--qwix-jit-cols`` columns, warm, extrapolated per column, its
compilation reported apart. SliM-LLM (``jaxquant.algorithms.slim.slim``, given a sample
of ``--sample-tokens`` input rows for its bit-allocation search) is timed like GPTQ when
that module exists. CLAQ (``jaxquant.algorithms.claq.claq`` at ``--claq-bits`` average
code bits, per-column K-Means on device) is timed like GPTQ, and beside it in the same
run the reference's way of fitting its codebooks: one scikit-learn ``KMeans(n_clusters=
2**b, random_state=10, n_init="auto")`` per column on the CPU (fayuge/CLAQ ``quant.
kmclustering``), timed on ``--sklearn-probe-cols`` columns of the same weight and
extrapolated per column to the layer (the reference's GPTQ updates on top are not
counted, so this is a lower bound of its layer time). The per-layer times also give a
layer-calls-only 32-block projection.

``--mode model``: a random-weight model with the Llama-2-7B config (parameters created
on the device), ``--calib-windows`` random token windows of ``--seq-len`` tokens, and the
wall time of ``jaxquant.quantize(params, Recipe.uniform(QuantSpec(method=...)),
calibration=Calibration(...))`` (parameter creation, the "loading", excluded; the
calibration forward passes, Hessians, compilation and quantization included). The time
spent inside the per-layer method calls (synchronised) is reported separately. With
``--layers N`` fewer blocks run and the 32-block time is extrapolated from the
per-block times after the first.

Memory: device ``peak_bytes_in_use`` (GPU) and the host's maximum RSS. Writes
``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/quantize_speed_<mode>...``).

    python benchmarks/quantize_speed.py --mode layer [--shapes llama2-7b|small] \\
        [--methods gptq,slim,claq] [--repeats 5] [--out benchmarks/results/gpu/NAME]
    python benchmarks/quantize_speed.py --mode model --method gptq|slim|claq \\
        [--dtype bfloat16|float32] [--layers 32] [--calib-windows 128] [--seq-len 2048]

CPU smoke runs: ``--mode layer --shapes small --repeats 2 --tokens 4096`` and ``--mode
model --layers 2 --hidden 256 --intermediate 640 --heads 4 --vocab 512 --calib-windows 4
--seq-len 128 --batch-size 2``. qwix is imported from the ``qwix`` wheel (pure Python):
``pip install --no-deps --target /tmp/site qwix-*.whl`` and ``PYTHONPATH=/tmp/site:.``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import importlib.metadata
import inspect
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import report as bench_report  # noqa: E402
from benchmarks.report import host_max_rss_bytes  # noqa: E402

_HI = jax.lax.Precision.HIGHEST

#: Distinct linear shapes ``(layers, out, in)`` of one Llama-2-7B block.
SHAPES = {
    "llama2-7b": (("q/k/v/o_proj", 4096, 4096, 4), ("gate/up_proj", 11008, 4096, 2),
                  ("down_proj", 4096, 11008, 1)),
    # SmolLM2-135M (the model of the accuracy tables): GQA k/v have 192 rows.
    "smollm2": (("q/o_proj", 576, 576, 2), ("k/v_proj", 192, 576, 2),
                ("gate/up_proj", 1536, 576, 2), ("down_proj", 576, 1536, 1)),
    # About 1/16 of the widths (multiples of 128, as qwix needs), for CPU smoke runs.
    "small": (("q/k/v/o_proj", 256, 256, 4), ("gate/up_proj", 640, 256, 2),
              ("down_proj", 256, 640, 1)),
}
LLAMA2_7B_BLOCKS = 32


# ----------------------------------------------------------------------------------------
# Helpers: synchronisation, timing, memory, environment.


def ready(tree: Any) -> Any:
    """Blocks until every array in ``tree`` (arrays, quantized formats, dicts) is computed."""
    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()
    return tree


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """``(seconds, result)`` of ``fn()``, synchronised."""
    start = time.perf_counter()
    out = ready(fn())
    return time.perf_counter() - start, out


def repeat_timing(fn: Callable[[], Any], repeats: int) -> dict[str, Any]:
    """First call (compilation included), then the median and min of ``repeats`` calls."""
    first, _ = timed(fn)
    runs = [timed(fn)[0] for _ in range(repeats)]
    return {"first_call_s": first, "median_s": statistics.median(runs), "min_s": min(runs),
            "runs_s": runs}


def device_memory() -> dict[str, int] | None:
    """``bytes_in_use`` / ``peak_bytes_in_use`` of device 0 (None where unsupported)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # backends without memory stats
        return None
    if not stats:
        return None
    keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
    return {k: int(stats[k]) for k in keys if k in stats}






def environment() -> dict[str, Any]:
    """Device, versions and machine of this run, with qwix's version and our commit."""
    return {**bench_report.environment(), "qwix": bench_report.package_version("qwix"),
            "jaxquant_git": _git_head()}


def _git_head() -> str | None:
    head = ROOT / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (ROOT / ".git" / ref[5:]).read_text().strip()
        return ref
    except OSError:
        return None


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def write_results(out: Path, report: dict[str, Any], md: list[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}", flush=True)


# ----------------------------------------------------------------------------------------
# Layer mode.


@functools.partial(jax.jit, static_argnames=("k", "tokens", "chunk", "outliers", "sample"))
def synthetic_inputs(key: jax.Array, *, k: int, tokens: int, chunk: int, outliers: int,
                     gain: float, sample: int) -> tuple[jax.Array, ...]:
    """``(H = 2 X^T X / n, max_t |X_tj|, sample rows)`` of synthetic activations ``X [n, k]``.

    Channel magnitudes are log-normal (sigma 0.5); ``outliers`` channels are ``gain``
    times larger, as the few massive channels of real LLM activations. ``X`` is drawn
    in chunks of ``chunk`` tokens and never materialised whole.
    """
    k_scale, k_out, k_x = jax.random.split(key, 3)
    scale = jnp.exp(0.5 * jax.random.normal(k_scale, (k,), jnp.float32))
    idx = jax.random.choice(k_out, k, (outliers,), replace=False)
    scale = scale.at[idx].multiply(gain)
    steps = tokens // chunk

    def draw(i: jax.Array) -> jax.Array:
        return jax.random.normal(jax.random.fold_in(k_x, i), (chunk, k), jnp.float32) * scale

    def body(i: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        gram, absmax = carry
        x = draw(i)
        return (gram + jnp.matmul(x.T, x, precision=_HI),
                jnp.maximum(absmax, jnp.abs(x).max(axis=0)))

    gram, absmax = jax.lax.fori_loop(
        0, steps, body, (jnp.zeros((k, k), jnp.float32), jnp.zeros((k,), jnp.float32)))
    rows = jax.random.normal(jax.random.fold_in(k_x, steps), (sample, k), jnp.float32) * scale
    return 2.0 * gram / (steps * chunk), absmax, rows


def qwix_gptq_fn(bits: int, group_size: int) -> Callable[[jax.Array, jax.Array], Any]:
    """qwix's GPTQ as ``qwix.contrib.gptq.quantize_params`` calls it (eager), symmetric."""
    from qwix._src.core import qarray
    from qwix.contrib import gptq_core

    qtype = {2: "int2", 4: "int4", 8: "int8"}[bits]
    how = qarray.HowToQuantize(qtype=getattr(jnp, qtype), channelwise_axes=(0,),
                               tiled_axes={1: group_size}, calibration_method="absmax")

    def run(w: jax.Array, h: jax.Array) -> Any:
        q, _ = gptq_core.quantize_weight(w, h, how, blocksize=128, percdamp=0.01)
        return q.qvalue, q.scale

    return run


def time_qwix(w: jax.Array, h: jax.Array, args: argparse.Namespace) -> dict[str, Any]:
    """qwix GPTQ on a column probe (cold, warm), then measured whole or extrapolated."""
    fn = qwix_gptq_fn(args.bits, args.group_size)
    k = w.shape[1]
    cols = min(k, args.qwix_probe_cols)
    wp, hp = w[:, :cols], h[:cols, :cols]
    cold, _ = timed(lambda: fn(wp, hp))
    warm, _ = timed(lambda: fn(wp, hp))
    per_col = warm / cols
    res: dict[str, Any] = {"config": f"int{args.bits} symmetric (absmax) g{args.group_size}, "
                           "eager", "probe_cols": cols, "probe_cold_s": cold,
                           "probe_warm_s": warm, "per_column_warm_s": per_col,
                           "predicted_full_s": per_col * k}
    if cols == k:
        res.update(mode="measured", seconds=warm, first_call_s=cold)
    elif per_col * k <= args.qwix_max_seconds:
        first, _ = timed(lambda: fn(w, h))
        res.update(mode="measured", first_call_s=first, seconds=first)
        if first <= args.qwix_max_seconds / 2:  # a second, warm run when it is cheap
            res["seconds"], _ = timed(lambda: fn(w, h))
    else:
        res.update(mode=f"extrapolated from {cols} columns", seconds=per_col * k)
    print(f"    qwix: probe {cols} cols cold {cold:.2f} s warm {warm:.2f} s -> "
          f"{res['mode']} {res['seconds']:.2f} s", flush=True)
    jcols = min(k, args.qwix_jit_cols)
    if jcols:  # the same function under jax.jit (as qwix's own tests run it): unrolled
        jfn = jax.jit(fn)
        wj, hj = w[:, :jcols], h[:jcols, :jcols]
        jcold, _ = timed(lambda: jfn(wj, hj))
        jwarm, _ = timed(lambda: jfn(wj, hj))
        res["jit"] = {"probe_cols": jcols, "first_call_s": jcold, "warm_s": jwarm,
                      "extrapolated_full_s": jwarm / jcols * k,
                      "mode": f"jax.jit, warm, extrapolated from {jcols} columns; "
                              "compilation excluded"}
        print(f"    qwix under jit: {jcols} cols first call (compile) {jcold:.1f} s, warm "
              f"{jwarm:.4f} s -> {jwarm / jcols * k:.3f} s extrapolated", flush=True)
    return res


def _slim_module() -> Any:
    try:
        return importlib.import_module("jaxquant.algorithms.slim")
    except ImportError as e:
        print(f"  note: SliM-LLM skipped: jaxquant.algorithms.slim is not importable ({e})",
              flush=True)
        return None


def slim_call(slim_fn: Any, w: jax.Array, h: jax.Array, absmax: jax.Array, sample: jax.Array,
              tokens: int, bits: int, group_size: int) -> Callable[[], Any] | str:
    """A no-argument call of ``slim(w, hessian, *, bits, group_size, ...)``, or why not.

    Parameters are filled by name: the Hessian (``hessian``/``h``), a sample of input
    rows (``inputs``/``x``/``sample``...), or a ``LayerInputs`` where ``inputs`` is
    annotated so; optional parameters keep their defaults except ``inputs`` (so that
    SliM-LLM's bit allocation search runs).
    """
    sig = inspect.signature(slim_fn)
    params = list(sig.parameters.values())
    pos: list[Any] = [w]
    kw: dict[str, Any] = {}
    samples = ("x", "xs", "sample", "x_sample", "activations", "inputs_sample", "calib_x")
    for p in params[1:]:
        name = p.name
        wants_layer_inputs = "LayerInputs" in str(p.annotation)
        if name in ("inputs", "layer_inputs") and not wants_layer_inputs:
            name = "x"
        if name in ("hessian", "h", "H"):
            value: Any = h
        elif name in samples:
            value = sample
        elif name in ("inputs", "layer_inputs"):
            try:
                cal = importlib.import_module("jaxquant.calibration")
                li = cal.LayerInputs
                fields = {f.name for f in dataclasses.fields(li)}
                given = {"hessian": h, "absmax": absmax, "sample": sample, "tokens": tokens}
                value = li(**{f: given[f] for f in fields if f in given})
            except (ImportError, AttributeError, TypeError) as e:
                return f"cannot build {name!r} for slim(): {e}"
        elif name == "bits":
            value = bits
        elif name == "group_size":
            value = group_size
        elif p.default is not inspect.Parameter.empty or p.kind in (
                inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        else:
            return f"slim() needs argument {name!r}, which this benchmark does not know"
        if p.kind == inspect.Parameter.KEYWORD_ONLY:
            kw[p.name] = value
        else:
            pos.append(value)
    return lambda: slim_fn(*pos, **kw)


def sklearn_kmeans_per_column(w: np.ndarray, bits: int, cols: int) -> dict[str, Any]:
    """The reference CLAQ's codebook fit: one scikit-learn K-Means per column, on the CPU.

    ``KMeans(n_clusters=2**bits, random_state=10, n_init="auto")`` (k-means++ start,
    Lloyd up to 300 iterations), as fayuge/CLAQ ``quant.kmclustering`` calls it, on the
    first ``cols`` columns of ``w``; the per-column time is extrapolated to all columns.
    """
    from sklearn.cluster import KMeans

    k = w.shape[1]
    cols = min(cols, k)
    KMeans(n_clusters=2 ** bits, random_state=10, n_init="auto").fit(w[:, :1])  # warm-up
    start = time.perf_counter()
    for j in range(cols):
        KMeans(n_clusters=2 ** bits, random_state=10, n_init="auto").fit(w[:, j:j + 1])
    per_col = (time.perf_counter() - start) / cols
    import sklearn

    return {"probe_cols": cols, "per_column_s": per_col, "extrapolated_layer_s": per_col * k,
            "sklearn": sklearn.__version__, "bits": bits,
            "mode": f"extrapolated from {cols} columns (k-means only, CPU)"}


def claq_rows(args: argparse.Namespace, w: jax.Array, h: jax.Array) -> dict[str, Any]:
    """CLAQ on one layer (device, timed like GPTQ) and the per-column sklearn baseline."""
    from jaxquant.algorithms.claq import ClaqConfig, claq

    out: dict[str, Any] = {}
    for bits in args.claq_bits:
        cfg = ClaqConfig(bits=bits)
        label = f"claq_{bits:g}"
        out[label] = repeat_timing(lambda cfg=cfg: claq(w, h, cfg), args.repeats)
        print(f"    jaxquant {label}: first {out[label]['first_call_s']:.3f} s, "
              f"median {out[label]['median_s']:.4f} s", flush=True)
    if args.sklearn_probe_cols:
        try:
            base = sklearn_kmeans_per_column(np.asarray(w), int(min(args.claq_bits)),
                                             args.sklearn_probe_cols)
        except ImportError as e:
            print(f"    note: sklearn baseline skipped: {e}", flush=True)
            out["sklearn_kmeans"] = {"skipped": str(e)}
        else:
            out["sklearn_kmeans"] = base
            ours = out[f"claq_{min(args.claq_bits):g}"]["median_s"]
            out["speedup_claq_vs_sklearn"] = base["extrapolated_layer_s"] / ours
            print(f"    sklearn per-column k-means ({base['bits']} bits): "
                  f"{base['per_column_s'] * 1e3:.1f} ms/column -> "
                  f"{base['extrapolated_layer_s']:.1f} s per layer; CLAQ "
                  f"{out['speedup_claq_vs_sklearn']:.0f}x faster", flush=True)
    return out


def layer_row(args: argparse.Namespace, key: jax.Array, n: int, k: int,
              slim_fn: Any) -> dict[str, Any]:
    """Times every method on one ``[n, k]`` layer."""
    from jaxquant.algorithms.gptq import gptq

    kw_, kh = jax.random.split(key)
    w = ready(0.02 * jax.random.normal(kw_, (n, k), jnp.float32))
    tokens = -(-max(args.tokens, 2 * k) // args.chunk) * args.chunk
    t_h, (h, absmax, sample) = timed(lambda: synthetic_inputs(
        kh, k=k, tokens=tokens, chunk=args.chunk, outliers=args.outliers,
        gain=args.outlier_gain, sample=args.sample_tokens))
    row: dict[str, Any] = {"shape": [n, k], "hessian_tokens": tokens, "hessian_seconds": t_h}
    for sym in (False, True) if "gptq" in args.methods.split(",") else ():
        label = "gptq_sym" if sym else "gptq_asym"
        row[label] = repeat_timing(lambda sym=sym: gptq(
            w, h, bits=args.bits, group_size=args.group_size, symmetric=sym), args.repeats)
        print(f"    jaxquant {label}: first {row[label]['first_call_s']:.3f} s, "
              f"median {row[label]['median_s']:.4f} s", flush=True)
    if slim_fn is not None:
        call = slim_call(slim_fn, w, h, absmax, sample, tokens, args.bits, args.group_size)
        if isinstance(call, str):
            print(f"    note: SliM-LLM skipped: {call}", flush=True)
            row["slim"] = {"skipped": call}
        else:
            try:
                row["slim"] = repeat_timing(call, args.repeats)
            except Exception as e:  # the module is work in progress: report, go on
                print(f"    note: SliM-LLM failed: {type(e).__name__}: {e}", flush=True)
                row["slim"] = {"skipped": f"{type(e).__name__}: {e}"}
            else:
                print(f"    jaxquant slim: first {row['slim']['first_call_s']:.3f} s, "
                      f"median {row['slim']['median_s']:.4f} s", flush=True)
    if "claq" in args.methods.split(","):
        row.update(claq_rows(args, w, h))
    if "gptq" not in args.methods.split(","):
        return row
    if not args.no_qwix:
        try:
            row["qwix_gptq"] = time_qwix(w, h, args)
        except Exception as e:  # a failing third-party baseline must not end the run
            print(f"  note: qwix skipped: {type(e).__name__}: {e}", flush=True)
            row["qwix_gptq"] = {"skipped": f"{type(e).__name__}: {e}"}
        else:
            q = row["qwix_gptq"]["seconds"]
            row["speedup_sym_vs_qwix"] = q / row["gptq_sym"]["median_s"]
            row["speedup_asym_vs_qwix"] = q / row["gptq_asym"]["median_s"]
            if "jit" in row["qwix_gptq"]:
                row["speedup_sym_vs_qwix_jit_warm"] = (
                    row["qwix_gptq"]["jit"]["extrapolated_full_s"] / row["gptq_sym"]["median_s"])
            print(f"    speedup (same config, symmetric): {row['speedup_sym_vs_qwix']:.1f}x",
                  flush=True)
    return row


def run_layers(args: argparse.Namespace) -> None:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    slim_mod = _slim_module() if "slim" in methods else None
    slim_fn = getattr(slim_mod, "slim", None) if slim_mod is not None else None
    if slim_mod is not None and slim_fn is None:
        print("  note: SliM-LLM skipped: jaxquant.algorithms.slim has no slim()", flush=True)
    rows = []
    blocks = 30 if args.shapes == "smollm2" else LLAMA2_7B_BLOCKS
    key = jax.random.PRNGKey(args.seed)
    for i, (name, n, k, count) in enumerate(SHAPES[args.shapes]):
        if args.only and args.only not in name:
            continue
        print(f"{name} [{n}, {k}]", flush=True)
        row = layer_row(args, jax.random.fold_in(key, i), n, k, slim_fn)
        rows.append({"layer": name, "per_block": count, **row})

    def projection(label: str) -> float | None:
        if len(rows) != len(SHAPES[args.shapes]) or not all(
                isinstance(r.get(label), dict) and "median_s" in r[label] for r in rows):
            return None
        return blocks * sum(r["per_block"] * r[label]["median_s"] for r in rows)

    claq_labels = [f"claq_{b:g}" for b in args.claq_bits] if "claq" in methods else []
    proj = {m: projection(m) for m in ("gptq_asym", "gptq_sym", "slim", *claq_labels)}
    if claq_labels and len(rows) == len(SHAPES[args.shapes]) and all(
            "extrapolated_layer_s" in r.get("sklearn_kmeans", {}) for r in rows):
        proj["sklearn_kmeans"] = blocks * sum(
            r["per_block"] * r["sklearn_kmeans"]["extrapolated_layer_s"] for r in rows)
    qwix_rows = [r.get("qwix_gptq", {}) for r in rows]
    if len(rows) == len(SHAPES[args.shapes]) and all("seconds" in q for q in qwix_rows):
        proj["qwix_gptq"] = blocks * sum(
            r["per_block"] * q["seconds"] for r, q in zip(rows, qwix_rows, strict=True))
    report = {"mode": "layer", "settings": vars(args), **environment(), "rows": rows,
              "model_blocks": blocks, "projection_model_s": proj,
              "device_memory": device_memory(),
              "host_max_rss_bytes": host_max_rss_bytes()}

    md = layer_gptq_md(args, report, rows) if "gptq" in methods else []
    if claq_labels:
        md += layer_claq_md(args, report, rows, claq_labels)
    model = "SmolLM2-135M" if args.shapes == "smollm2" else "Llama-2-7B"
    md += ["", f"Sum over one {model} model ({blocks} blocks x 7 linear layers), layer calls "
           "only (no calibration forward passes):", ""]
    for m, v in proj.items():
        if v is not None:
            md.append(f"- {m}: {v:.1f} s")
    if all(v is None for v in proj.values()):
        md.append("- n/a (not every shape was run)")
    mem = report["device_memory"] or {}
    md += ["", f"Peak device memory {_gib(mem.get('peak_bytes_in_use'))}, host max RSS "
           f"{_gib(report['host_max_rss_bytes'])}."]
    write_results(Path(args.out or ROOT / "benchmarks" / "results"
                       / f"quantize_speed_layer_{args.shapes}_{jax.default_backend()}"),
                  report, md)


def layer_claq_md(args: argparse.Namespace, report: dict[str, Any], rows: list[dict[str, Any]],
                  labels: list[str]) -> list[str]:
    """The CLAQ table of the layer mode: device time per layer against sklearn k-means."""
    md = [f"# Per-layer CLAQ time, {args.shapes} shapes", "",
          f"Device: {report['device']}, JAX {report['jax']}, Python {report['python']}, "
          f"{report['cpu_count']} CPU cores. Weights 0.02 * normal (float32), Hessian of "
          "synthetic activations as in the GPTQ table. jaxquant CLAQ (act-order, per-column "
          "K-Means on device: 24 Lloyd iterations per block of 128 columns, 4 per column "
          f"after compensation): median of {args.repeats} runs after a first (compiling) "
          "call. Baseline: the reference's codebook fit, one scikit-learn KMeans (k-means++, "
          "n_init='auto', up to 300 iterations) per column on the CPU, timed on a probe of "
          "columns and extrapolated; k-means only, without the reference's GPTQ updates "
          "(plain scikit-learn; the reference patches it with Intel's sklearnex).", "",
          "| layer | shape [out, in] | " + " | ".join(
              f"CLAQ {lbl[5:]} bits (s) | first call (s)" for lbl in labels)
          + " | sklearn per column (ms) | sklearn per layer (s) | speedup |",
          "|---|---|" + "---|---|" * len(labels) + "---|---|---|"]
    for r in rows:
        cells = " | ".join(f"{r[lbl]['median_s']:.3f} | {r[lbl]['first_call_s']:.1f}"
                           for lbl in labels)
        sk = r.get("sklearn_kmeans", {})
        sk_s = (f"{sk['per_column_s'] * 1e3:.1f} | {sk['extrapolated_layer_s']:.1f} (from "
                f"{sk['probe_cols']} cols, {sk['bits']} bits)" if "per_column_s" in sk
                else "n/a | n/a")
        sp = (f"{r['speedup_claq_vs_sklearn']:.0f}x" if "speedup_claq_vs_sklearn" in r
              else "n/a")
        md.append(f"| {r['layer']} | {r['shape'][0]} x {r['shape'][1]} | {cells} | {sk_s} | "
                  f"{sp} |")
    return md


def layer_gptq_md(args: argparse.Namespace, report: dict[str, Any],
                  rows: list[dict[str, Any]]) -> list[str]:
    """The GPTQ / SliM-LLM / qwix table of the layer mode."""
    md = [f"# Per-layer quantization time, {args.shapes} shapes ({args.bits}-bit, "
          f"group {args.group_size})", "",
          f"Device: {report['device']}, JAX {report['jax']}, qwix {report['qwix']}, "
          f"Python {report['python']}. Weights 0.02 * normal (float32); Hessian 2 X^T X / n "
          f"of synthetic activations (log-normal channel scales, {args.outliers} outlier "
          f"channels x{args.outlier_gain:g}). jaxquant: median of {args.repeats} runs after "
          "a first (compiling) call. qwix: `gptq_core.quantize_weight`, eager as its "
          "`quantize_params` runs it, symmetric int4 (absmax) with the same groups; speedup "
          "= qwix / jaxquant symmetric (same configuration).", "",
          "| layer | shape [out, in] | jaxquant GPTQ asym (s) | jaxquant GPTQ sym (s) | "
          "first call asym (s) | SliM-LLM (s) | qwix GPTQ sym (s) | qwix timing | speedup | "
          "qwix under jit, warm (s) | speedup vs jit |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q = r.get("qwix_gptq", {})
        slim = r.get("slim", {})
        slim_s = f"{slim['median_s']:.3f}" if "median_s" in slim else "n/a"
        q_s = f"{q['seconds']:.2f}" if "seconds" in q else "n/a"
        q_mode = q.get("mode", "skipped")
        if "probe_warm_s" in q:
            q_mode += (f" (probe {q['probe_cols']} cols: cold {q['probe_cold_s']:.2f} s, "
                       f"warm {q['probe_warm_s']:.2f} s)")
        sp = f"{r['speedup_sym_vs_qwix']:.1f}x" if "speedup_sym_vs_qwix" in r else "n/a"
        jit = q.get("jit")
        jit_s = (f"{jit['extrapolated_full_s']:.3f} (from {jit['probe_cols']} cols; compile "
                 f"{jit['first_call_s']:.0f} s)" if jit else "not run")
        jsp = (f"{r['speedup_sym_vs_qwix_jit_warm']:.1f}x"
               if "speedup_sym_vs_qwix_jit_warm" in r else "n/a")
        md.append(f"| {r['layer']} | {r['shape'][0]} x {r['shape'][1]} | "
                  f"{r['gptq_asym']['median_s']:.3f} | {r['gptq_sym']['median_s']:.3f} | "
                  f"{r['gptq_asym']['first_call_s']:.2f} | {slim_s} | {q_s} | {q_mode} | "
                  f"{sp} | {jit_s} | {jsp} |")
    return md


# ----------------------------------------------------------------------------------------
# Model mode.


def model_config(args: argparse.Namespace) -> Any:
    from jaxquant.models.config import ModelConfig

    heads = args.heads
    return ModelConfig(family="llama", vocab_size=args.vocab, hidden_size=args.hidden,
                       intermediate_size=args.intermediate, num_layers=args.layers,
                       num_heads=heads, num_kv_heads=args.kv_heads or heads,
                       head_dim=args.head_dim or args.hidden // heads, rms_norm_eps=1e-5,
                       max_position_embeddings=max(4096, args.seq_len))


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "ones"))
def _random_leaf(key: jax.Array, *, shape: tuple[int, ...], dtype: Any, ones: bool) -> Any:
    if ones:
        return jnp.ones(shape, dtype)
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def random_params(cfg: Any, dtype: Any, seed: int) -> Any:
    """Random parameters built on the device, leaf by leaf (norms 1, weights 0.02 N(0, 1))."""
    from jaxquant.models.transformer import abstract_params

    abstract = abstract_params(cfg, dtype)
    leaves, treedef = jax.tree.flatten(abstract)
    key = jax.random.PRNGKey(seed)
    out = [_random_leaf(jax.random.fold_in(key, i), shape=tuple(a.shape),
                        dtype=jnp.dtype(a.dtype), ones=len(a.shape) == 1)
           for i, a in enumerate(leaves)]
    return ready(jax.tree.unflatten(treedef, out))


def run_model(args: argparse.Namespace) -> None:
    import jaxquant
    from jaxquant.calibration import Calibration
    from jaxquant.recipes import QuantSpec, Recipe, RecipeError

    qmod = importlib.import_module("jaxquant.quantize")
    cfg = model_config(args)
    dtype = jnp.dtype(args.dtype)
    try:
        spec = QuantSpec(method=args.method, bits=args.bits, group_size=args.group_size)
        recipe = Recipe.uniform(spec)
    except RecipeError as e:
        print(f"note: method {args.method!r} skipped: {e}", flush=True)
        return
    if args.method not in qmod._METHODS:
        print(f"note: method {args.method!r} skipped: no implementation registered", flush=True)
        return

    t_load, params = timed(lambda: random_params(cfg, dtype, args.seed))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print(f"params: {n_params / 1e9:.3f} B in {args.dtype}, created in {t_load:.1f} s "
          "(excluded)", flush=True)
    windows = np.random.default_rng(args.seed).integers(
        0, cfg.vocab_size, (args.calib_windows, args.seq_len), dtype=np.int32)
    calibration = Calibration(config=cfg, windows=windows, batch_size=args.batch_size,
                              progress=args.progress)
    mem_before = device_memory()

    # Time spent inside the per-layer method calls, synchronised (wraps the registered
    # method; the call itself is unchanged).
    calls: list[tuple[float, float]] = []
    original = qmod._METHODS[args.method]

    def wrapped(w: Any, spec: Any, inputs: Any) -> Any:
        begin = time.perf_counter()
        out = ready(original(w, spec, inputs))
        calls.append((begin, time.perf_counter()))
        if len(calls) % 7 == 0:
            block = len(calls) // 7 - 1
            in_calls = sum(b - a for a, b in calls[-7:])
            print(f"  block {block}: done at {calls[-1][1] - start:.1f} s "
                  f"(layer calls {in_calls:.2f} s)", flush=True)
        return out

    start = time.perf_counter()
    if not args.no_breakdown:
        qmod.register_method(args.method, wrapped)
    try:
        start = time.perf_counter()
        qparams = ready(jaxquant.quantize(params, recipe, calibration))
        total = time.perf_counter() - start
    finally:
        qmod._METHODS[args.method] = original
    mem_after = device_memory()
    del qparams

    per_block = 7
    ends = [start] + [calls[i][1] for i in range(per_block - 1, len(calls), per_block)]
    block_s = [b - a for a, b in itertools.pairwise(ends)]
    layer_s = sum(b - a for a, b in calls)
    n = args.layers
    if len(block_s) >= 2:
        steady = statistics.median(block_s[1:])
        extrapolated = total + (LLAMA2_7B_BLOCKS - n) * steady
    else:
        steady = None
        extrapolated = total * LLAMA2_7B_BLOCKS / n
    limit = {"gptq": 300, "slim": 600, "claq": 900}.get(args.method)
    report = {"mode": "model", "settings": vars(args), **environment(),
              "config": cfg.to_dict(), "num_params": n_params, "create_params_s": t_load,
              "quantize_s": total, "layer_calls_s": layer_s if calls else None,
              "calibration_and_other_s": total - layer_s if calls else None,
              "block_s": block_s, "steady_block_s": steady,
              "extrapolated_32_blocks_s": extrapolated, "limit_s": limit,
              "device_memory_before": mem_before, "device_memory_after": mem_after,
              "host_max_rss_bytes": host_max_rss_bytes()}
    peak = (mem_after or {}).get("peak_bytes_in_use")
    md = [f"# Whole-model quantization time: {args.method}, Llama-2-7B shapes "
          f"({n} of {LLAMA2_7B_BLOCKS} blocks)", "",
          f"Device: {report['device']}, JAX {report['jax']}, Python {report['python']}. "
          f"Random {args.dtype} weights (hidden {cfg.hidden_size}, FFN "
          f"{cfg.intermediate_size}, {cfg.num_heads} heads, vocab {cfg.vocab_size}); "
          f"{args.calib_windows} random windows x {args.seq_len} tokens, batch "
          f"{args.batch_size}; {args.bits}-bit, group {args.group_size}. Time of "
          "`jaxquant.quantize` (calibration forward passes, Hessians, compilation and "
          "quantization; parameter creation excluded).", "",
          "| method | dtype | blocks | quantize (s) | in layer calls (s) | calibration + other "
          "(s) | steady s/block | 32 blocks (s) | limit (s) | peak device mem | host max RSS |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1f}"

    md.append(f"| {args.method} | {args.dtype} | {n} | {total:.1f} | "
              f"{fmt(report['layer_calls_s'])} | {fmt(report['calibration_and_other_s'])} | "
              f"{fmt(steady)} | {extrapolated:.1f}{'' if n == LLAMA2_7B_BLOCKS else ' (extrap.)'}"
              f" | {limit or 'n/a'} | {_gib(peak)} | {_gib(report['host_max_rss_bytes'])} |")
    md += ["", f"Per-block seconds: {', '.join(f'{b:.1f}' for b in block_s)}. Device memory "
           f"in use before quantize (params): {_gib((mem_before or {}).get('bytes_in_use'))}."]
    write_results(Path(args.out or ROOT / "benchmarks" / "results"
                       / f"quantize_speed_model_{args.method}_{jax.default_backend()}"),
                  report, md)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["layer", "model"], default="layer")
    parser.add_argument("--bits", type=float, default=4,
                        help="code bits (fractional: claq's average over columns)")
    parser.add_argument("--group-size", type=int, default=None,
                        help="default 128 (claq: per-column codebooks, no groups)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="output path prefix (.json and .md are written)")
    g = parser.add_argument_group("layer mode")
    g.add_argument("--shapes", choices=sorted(SHAPES), default="llama2-7b")
    g.add_argument("--methods", default="gptq,slim",
                   help="any of gptq (with qwix), slim, claq (with sklearn)")
    g.add_argument("--claq-bits", type=lambda v: [float(b) for b in v.split(",")],
                   default=[3.0], help="CLAQ average code bits to time, e.g. 3,2.1")
    g.add_argument("--sklearn-probe-cols", type=int, default=64,
                   help="columns timed with scikit-learn K-Means (0: no baseline)")
    g.add_argument("--repeats", type=int, default=5)
    g.add_argument("--tokens", type=int, default=16384,
                   help="synthetic activation rows for the Hessian (at least 2 x in)")
    g.add_argument("--chunk", type=int, default=2048, help="rows drawn per step")
    g.add_argument("--outliers", type=int, default=8, help="outlier input channels")
    g.add_argument("--outlier-gain", type=float, default=50.0)
    g.add_argument("--sample-tokens", type=int, default=4096,
                   help="input rows given to methods that take activations (SliM-LLM)")
    g.add_argument("--no-qwix", action="store_true")
    g.add_argument("--qwix-probe-cols", type=int, default=128)
    g.add_argument("--qwix-max-seconds", type=float, default=60.0,
                   help="time qwix on the whole layer only if predicted below this")
    g.add_argument("--qwix-jit-cols", type=int, default=128,
                   help="also time qwix under jax.jit on this many columns (0: no)")
    g.add_argument("--only", help="only the shapes whose name contains this (e.g. down)")
    g = parser.add_argument_group("model mode")
    g.add_argument("--method", default="gptq")
    g.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    g.add_argument("--layers", type=int, default=LLAMA2_7B_BLOCKS)
    g.add_argument("--hidden", type=int, default=4096)
    g.add_argument("--intermediate", type=int, default=11008)
    g.add_argument("--heads", type=int, default=32)
    g.add_argument("--kv-heads", type=int, default=0, help="0: as --heads")
    g.add_argument("--head-dim", type=int, default=0, help="0: hidden / heads")
    g.add_argument("--vocab", type=int, default=32000)
    g.add_argument("--calib-windows", type=int, default=128)
    g.add_argument("--seq-len", type=int, default=2048)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--progress", action="store_true", help="calibration progress bar")
    g.add_argument("--no-breakdown", action="store_true",
                   help="do not wrap the method to time the layer calls")
    args = parser.parse_args(argv)
    if args.group_size is None and not (args.mode == "model" and args.method == "claq"):
        args.group_size = 128
    if args.bits == int(args.bits):
        args.bits = int(args.bits)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} "
          f"({jax.default_backend()}), python {sys.version.split()[0]}", flush=True)
    if args.mode == "layer":
        run_layers(args)
    else:
        run_model(args)


if __name__ == "__main__":
    main()
