"""End-to-end greedy decode tokens/s with a KV cache: bf16 vs 4/3/2-bit vs mixed precision.

A Llama-2-7B-shaped model (``--layers`` blocks of hidden 4096, FFN 11008, 32 heads of
128, vocab 32000) with random weights decodes greedily at batch 1 and 16 (``--batches``)
with a bf16 KV cache, for each weight type of ``--bits``:

* ``16``: bf16 weights (XLA's matmuls);
* ``4``, ``3``, ``2``: RTN uniform, asymmetric, group 128, bf16 scales
  (``quantize(params, Recipe.uniform(QuantSpec(bits=b, group_size=128)))``);
* ``mixed``: SliM-LLM-style mixed precision averaging ``--mixed-bits`` (2) code bits: per
  linear, a ``--mixed-moved`` (1/4) share of the 128-column groups gets ``N-1`` bits and
  as many ``N+1`` bits, the rest ``N`` (SliM-LLM's candidate bit maps,
  :func:`jaxquant.algorithms.slim.candidate_bits`, ordered by the groups' ``sum w^2``;
  RTN codes, 1-bit groups binarized as SliM-LLM does), stored as SliM-LLM stores it: a
  :class:`~jaxquant.formats.MixedWeight` of one uniform part per width over permuted
  columns. The real SliM-LLM needs calibration data for its bit maps (Hessian salience,
  KL search) and GPTQ codes; the storage and so the decode cost are the same.

Every block linear is quantized (embeddings, norms and ``lm_head`` stay bf16: the default
recipe). The model is built on the device one block at a time from a fixed random key
(normal weights scaled by ``1/sqrt(in_features)``, unit norms), quantized and, on a GPU,
re-laid out for the Mosaic GPU kernels (``jaxquant.backends.prepare(..., backend="gpu")``)
before the next block is made, so the device never holds more than one float block
besides the model being measured (plus, for the check below, its dequantized copy).

Measured per weight type and batch: ``--steps`` greedy decode steps of one token with
the KV cache, after a prompt of ``--prompt-len`` random tokens. ``--loop fused`` (the
default): all steps run inside one jitted ``lax.fori_loop``, one dispatch per run, so
host dispatch does not count; ``--loop python``: a Python loop over a jitted,
cache-donating step, one dispatch per token (what a simple serving loop does). The
prompt is fed through the same compiled loop, one token a step (its trip count and
forced tokens are traced: one compile per weight type and batch serves the prompt, the
timed decode and the check; the prompt's speed is not measured). Wall clock: warm-up,
``block_until_ready``, median of ``--runs`` runs; ``tokens/s = batch * steps /
seconds``. On a GPU also the CUPTI device time of the fused loop (the sum of its
kernels' times, the gaps between kernels excluded). The KV cache holds ``prompt-len +
steps`` slots and each step attends over all of them (masked), so every step costs the
attention of a ``prompt-len + steps`` context.

Checks (the run fails at the end, after writing its results, if one does not hold):
the first decode step's logits are finite, and for quantized weights they match those
of the same model with every quantized weight dequantized to bf16 (relative Frobenius
error at most ``--check-tol``, 0.1; same prompt, same token; at the first batch size), so
the kernels compute the format. Expected: 0 on the jnp path for uniform weights (the
same computation); ~1e-2 for mixed weights (each part's output is rounded to bf16) and
for the GPU kernel after two blocks (it dequantizes with a bf16 ``codes * s + bias``
FMA, not the format's float32 ``s * (q - z)``), growing slowly with depth. A broken
kernel gives errors of order 1 or NaN.

Writes ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/gpu/decode_gpu_
<device kind>``; with ``--tiny``, ``benchmarks/results/decode_gpu_tiny_cpu``), rewritten
after every measured row; ``--merge`` keeps the rows of weight types measured in an
earlier run with the same config (to split a long run into several commands).

    python benchmarks/decode_gpu.py                      # H100: the 32-block model
    python benchmarks/decode_gpu.py --layers 4 --bits 16,4    # a quick look
    python benchmarks/decode_gpu.py --tiny               # CPU smoke test (jnp path)
    python benchmarks/decode_gpu.py --tiny --kernels interpret --bits 16,4,mixed \\
        --batches 1 --steps 2 --prompt-len 2 --runs 1 --out /tmp/decode_interp
                                                         # GPU kernels, interpreted (3 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.configs import llama2_7b, tiny_llama  # noqa: E402
from benchmarks.report import environment  # noqa: E402
from benchmarks.timing import device_us, wall_samples_us  # noqa: E402
from jaxquant.algorithms.gptq import binary_params  # noqa: E402
from jaxquant.algorithms.rtn import rtn  # noqa: E402
from jaxquant.algorithms.slim import candidate_bits, fake_quant_groups  # noqa: E402
from jaxquant.backends import prepare  # noqa: E402
from jaxquant.formats import MixedWeight, UniformWeight, is_quantized  # noqa: E402
from jaxquant.models import transformer  # noqa: E402
from jaxquant.models.config import ModelConfig  # noqa: E402
from jaxquant.params import flatten, unflatten  # noqa: E402
from jaxquant.quantize import quantize  # noqa: E402
from jaxquant.recipes import BLOCK_LINEARS, QuantSpec, Recipe  # noqa: E402

GROUP = 128
Params = dict[str, Any]
_BLOCK_LINEAR = re.compile(BLOCK_LINEARS)


def is_block_linear(path: str) -> bool:
    """True for the block linears the recipes quantize (``layers.N.*_proj.weight``)."""
    return _BLOCK_LINEAR.fullmatch(path) is not None


# ----------------------------------------------------------------------------------------
# Configs and weight types






@dataclasses.dataclass(frozen=True)
class WeightType:
    """One row group of the table: float, uniform RTN, or mixed precision."""

    kind: str  # "float", "uniform" or "mixed"
    bits: int  # 16 for float; code bits (uniform) or average code bits (mixed)

    @property
    def label(self) -> str:
        """Table label."""
        if self.kind == "float":
            return "bf16"
        if self.kind == "uniform":
            return f"RTN {self.bits}-bit g{GROUP}"
        widths = "/".join(str(b) for b in (self.bits - 1, self.bits, self.bits + 1))
        return f"mixed {self.bits}-bit g{GROUP} ({widths})"


def parse_bits(text: str, mixed_bits: int) -> list[WeightType]:
    """``16,4,3,2,mixed`` -> weight types (``mixedN`` names the average explicitly)."""
    out = []
    for item in (s.strip().lower() for s in text.split(",") if s.strip()):
        if item in ("16", "bf16"):
            out.append(WeightType("float", 16))
        elif item.startswith("mixed"):
            out.append(WeightType("mixed", int(item[5:] or mixed_bits)))
        elif item.isdigit() and 2 <= int(item) <= 8:
            out.append(WeightType("uniform", int(item)))
        else:
            raise SystemExit(f"--bits: unknown weight type {item!r} (16, 2..8, mixed, mixedN)")
    for w in out:
        if w.kind == "mixed" and not 2 <= w.bits <= 7:
            raise SystemExit(f"--bits: mixed needs an average of 2..7 bits, got {w.bits}")
    return out


# ----------------------------------------------------------------------------------------
# Random model, built block by block on the device


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _normal(key: jax.Array, *, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    x = jax.random.normal(key, shape, jnp.float32) * (1.0 / math.sqrt(shape[1]))
    return x.astype(dtype)


def random_tensor(path: str, shape: tuple[int, ...], dtype: Any, seed: int) -> jax.Array:
    """The same tensor for a path in every weight type: 2-D normal / sqrt(in), 1-D ones."""
    if len(shape) != 2:
        return jnp.ones(shape, dtype)
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode()) & 0x7FFFFFFF)
    return _normal(key, shape=tuple(int(d) for d in shape), dtype=jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnames=("bits", "group_size"))
def _rtn_part(w: jax.Array, *, bits: int, group_size: int) -> UniformWeight:
    return rtn(w, bits=bits, group_size=group_size, symmetric=False,
               scale_dtype=jnp.bfloat16)


@functools.partial(jax.jit, static_argnames=("group_size",))
def _binary_codes(w: jax.Array, *, group_size: int) -> tuple[jax.Array, ...]:
    """SliM-LLM's 1-bit groups: ``mean +- mean|w - mean|`` per row of each group."""
    n, k = w.shape
    wg = w.astype(jnp.float32).reshape(n, k // group_size, group_size)
    valid = jnp.ones((group_size,), bool)
    s, z = jax.vmap(lambda g: binary_params(g, valid, jnp.bfloat16), in_axes=1,
                    out_axes=1)(wg)  # [n, groups] each
    codes = ((wg / s[..., None] + z[..., None]) > 0.5).astype(jnp.int32).reshape(n, k)
    return codes, s.astype(jnp.bfloat16), z.astype(jnp.bfloat16)


@jax.jit
def _group_sq_sums(w: jax.Array) -> jax.Array:
    n, k = w.shape
    return jnp.sum(jnp.square(w.astype(jnp.float32)).reshape(n, k // GROUP, GROUP),
                   axis=(0, 2))


def group_bits_for(w: jax.Array, bits: int, moved: float) -> np.ndarray:
    """Per-group widths: SliM-LLM's SBA candidate moving ``moved`` of the groups to N-1
    (least ``sum w^2``) and as many to N+1 (most); the average stays exactly ``bits``."""
    k = w.shape[1]
    g = k // GROUP
    salience = np.asarray(_group_sq_sums(w))
    cands = candidate_bits(salience, bits, np.full(g, GROUP))
    pairs = max(1, round(moved * g)) if moved > 0 else 0
    return cands[min(pairs, len(cands) - 1)]


def mixed_weight(w: jax.Array, bits: int, moved: float) -> MixedWeight:
    """``w`` as a SliM-LLM-layout :class:`MixedWeight` with RTN codes (see the module doc).

    Equal-width groups are gathered into one :class:`UniformWeight` part each (widths in
    increasing order), ``perm`` maps the stored columns back; its dequantization equals
    :func:`jaxquant.algorithms.slim.fake_quant_groups` of the same bit map.
    """
    n, k = w.shape
    if k % GROUP:
        raise ValueError(f"mixed: in_features {k} is not a multiple of {GROUP}")
    group_bits = group_bits_for(w, bits, moved)
    parts, order = [], []
    for b in sorted({int(x) for x in group_bits}):
        groups = np.flatnonzero(group_bits == b)
        cols = (groups[:, None] * GROUP + np.arange(GROUP)).reshape(-1)
        wb = jnp.take(w, jnp.asarray(cols, jnp.int32), axis=1)
        if b == 1:
            codes, s, z = _binary_codes(wb, group_size=GROUP)
            parts.append(UniformWeight.from_codes(codes, s, z, bits=1, group_size=GROUP))
        else:
            parts.append(_rtn_part(wb, bits=b, group_size=GROUP))
        order.append(cols)
    perm = jnp.asarray(np.concatenate(order), MixedWeight.perm_dtype(k))
    return MixedWeight(parts=tuple(parts), perm=perm, shape=(int(n), int(k)))


def _int4(dtype: Any) -> bool:
    return jnp.dtype(dtype).name in ("int4", "uint4")


def device_nbytes(tree: Any) -> int:
    """Bytes a pytree occupies in its arrays' layout (``int4`` counted as half a byte)."""
    total = 0.0
    for leaf in jax.tree.leaves(tree):
        size = int(np.prod(leaf.shape))
        total += size / 2 if _int4(leaf.dtype) else size * jnp.dtype(leaf.dtype).itemsize
    return int(total)


def kernel_status(leaf: Any) -> str:
    """``kernel`` (a Pallas kernel layout), ``partial`` (a mixed weight with some parts on
    a kernel), ``jnp`` (a quantized format on the jnp dequantize-then-matmul path) or
    ``xla`` (a float array: XLA's matmul)."""
    if type(leaf).__module__.startswith("pallas_kernels."):
        return "kernel"
    if isinstance(leaf, MixedWeight):
        parts = {kernel_status(p) for p in leaf.parts}
        return "kernel" if parts == {"kernel"} else "partial" if "kernel" in parts else "jnp"
    return "jnp" if is_quantized(leaf) else "xla"


def type_name(leaf: Any) -> str:
    """``GpuUniformWeight``, ``MixedWeight[GpuUniformWeight x3]``, ``ArrayImpl``, ..."""
    if isinstance(leaf, MixedWeight):
        inner = Counter(type(p).__name__ for p in leaf.parts)
        return "MixedWeight[" + ", ".join(f"{k} x{v}" for k, v in inner.items()) + "]"
    return type(leaf).__name__


def kernel_backend(choice: str) -> str | None:
    """The backend :func:`prepare` lays weights out for, or None (no kernels)."""
    if choice == "off":
        return None
    if choice == "interpret":  # GPU kernels in the Pallas GPU interpreter (CPU, slow)
        return "gpu"
    backend = jax.default_backend()
    return backend if backend in ("gpu", "tpu") else None


def build_model(cfg: ModelConfig, wt: WeightType, *, dtype: Any, seed: int,
                backend: str | None, reference: bool, moved: float
                ) -> tuple[Params, Params | None, dict[str, Any]]:
    """The random model in weight type ``wt``, block by block on the device.

    Returns:
      ``(params, reference, info)``: the parameters to decode with (kernel layouts
      where ``backend`` has kernels), the same model with every quantized weight
      dequantized to ``dtype`` (with ``reference`` and quantized weights; else None),
      and the storage / layout account.
    """
    abstract = flatten(transformer.abstract_params(cfg))
    blocks: dict[str, list[str]] = {}
    for path in abstract:
        head = path.split(".")[:2]
        blocks.setdefault(".".join(head) if head[0] == "layers" else "", []).append(path)
    recipe = (Recipe.uniform(QuantSpec(bits=wt.bits, group_size=GROUP))
              if wt.kind == "uniform" else None)
    flat: dict[str, Any] = {}
    ref: dict[str, Any] = {}
    stats = {"storage_bytes": 0, "linear_storage_bytes": 0, "linear_weights": 0,
             "device_bytes": 0, "kernel": Counter(), "types": Counter(), "summary": None}
    start = time.perf_counter()
    for paths in blocks.values():
        block = {p: random_tensor(p, abstract[p].shape, dtype, seed) for p in paths}
        if wt.kind == "uniform":
            block = flatten(quantize(unflatten(block), recipe))
        elif wt.kind == "mixed":
            block = {p: mixed_weight(v, wt.bits, moved) if is_block_linear(p) else v
                     for p, v in block.items()}
        prepared = block
        if backend and wt.kind != "float":
            prepared = flatten(prepare(unflatten(block), cfg, backend=backend))
        for p, v in block.items():
            stats["storage_bytes"] += int(v.nbytes)
            if is_quantized(v):
                stats["linear_storage_bytes"] += int(v.nbytes)
                stats["linear_weights"] += int(v.num_weights)
                stats["summary"] = stats["summary"] or v.summary()
                if reference:
                    ref[p] = v.dequantize(dtype)
            elif is_block_linear(p) and wt.kind == "float":
                stats["linear_storage_bytes"] += int(v.nbytes)
                stats["linear_weights"] += int(v.size)
            if reference and p not in ref:
                ref[p] = v
        for p, v in prepared.items():
            stats["device_bytes"] += device_nbytes(v)
            if is_block_linear(p) or p == "lm_head.weight":
                stats["kernel"][kernel_status(v)] += 1
                stats["types"][type_name(v)] += 1
        flat.update(prepared)
        jax.block_until_ready(list(prepared.values()))
    stats["build_seconds"] = time.perf_counter() - start
    stats["bits_per_weight"] = (8 * stats["linear_storage_bytes"] / stats["linear_weights"]
                                if stats["linear_weights"] else None)
    stats["kernel"] = dict(stats["kernel"])
    stats["types"] = dict(stats["types"])
    return unflatten(flat), (unflatten(ref) if reference and ref else None), stats


# ----------------------------------------------------------------------------------------
# Decoding


@functools.partial(jax.jit, static_argnums=1)
def decode_loop(params: Params, cfg: ModelConfig, cache: Any, forced: jax.Array,
                n_forced: jax.Array, n_steps: jax.Array
                ) -> tuple[jax.Array, jax.Array, Any]:
    """``n_steps`` decode steps of one token in one ``lax.fori_loop`` (one dispatch).

    Step ``i`` feeds ``forced[:, i]`` while ``i < n_forced``, then the previous step's
    greedy token. The counts are traced, so one compile serves the prefill (the prompt
    forced, one token a step) and the timed greedy decode (one token forced).

    Args:
      params: Model parameters.
      cfg: Model config.
      cache: KV cache; copied into the loop (the input stays valid).
      forced: ``[B, L]`` token ids; ``n_steps <= L``.
      n_forced: Steps that feed ``forced`` (at least 1).
      n_steps: Steps to run.

    Returns:
      The greedy token after every step ``[B, L]`` (valid up to ``n_steps``), the
      logits ``[B, vocab]`` of the step feeding the last forced token (kept by a select
      per step: ``B x vocab`` floats, noise next to a step's weight reads), the cache.
    """
    b, length = forced.shape

    def body(i: jax.Array, carry: tuple[jax.Array, Any, jax.Array, jax.Array]
             ) -> tuple[jax.Array, Any, jax.Array, jax.Array]:
        prev, cache, out, kept = carry
        tok = jnp.where(i < n_forced, forced[:, jnp.minimum(i, length - 1)], prev)
        logits, cache = transformer.decode_step(params, cfg, tok[:, None], cache)
        logits = logits[:, -1]
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        kept = jnp.where(i == n_forced - 1, logits, kept)
        return nxt, cache, out.at[:, i].set(nxt), kept

    init = (forced[:, 0], cache, jnp.zeros((b, length), jnp.int32),
            jnp.zeros((b, cfg.vocab_size), jnp.float32))
    _, cache, out, kept = jax.lax.fori_loop(0, n_steps, body, init)
    return out, kept, cache


@functools.partial(jax.jit, static_argnums=1, donate_argnums=3)
def _greedy_step(params: Params, cfg: ModelConfig, token: jax.Array, cache: Any
                 ) -> tuple[jax.Array, Any]:
    logits, cache = transformer.decode_step(params, cfg, token[:, None], cache)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


def python_loop(params: Params, cfg: ModelConfig, cache: Any, token: jax.Array,
                steps: int) -> jax.Array:
    """``steps`` greedy steps, one dispatch each (the cache copied once, then donated)."""
    cache = jax.tree.map(jnp.copy, cache)
    out = []
    for _ in range(steps):
        token, cache = _greedy_step(params, cfg, token, cache)
        out.append(token)
    return jnp.stack(out, axis=1)


def rel_err(a: jax.Array, b: jax.Array) -> float:
    """``||a - b|| / ||b||`` (float64 on the host)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def measure(params: Params, ref: Params | None, cfg: ModelConfig, batch: int,
            args: argparse.Namespace, dtype: Any, on_gpu: bool) -> dict[str, Any]:
    """The prompt, the first-step check and the decode timing of one model at one batch.

    ``ref`` (the dequantized model, or None) is compared with ``params`` on the first
    decode step; the row gets the timings, tokens/s and the check's errors.
    """
    rng = np.random.default_rng(1234 + batch)
    cache0 = transformer.init_cache(cfg, batch, args.prompt_len + args.steps, dtype)
    row: dict[str, Any] = {"batch": batch}

    length = max(args.prompt_len, args.steps)
    forced = np.zeros((batch, length), np.int32)
    forced[:, :args.prompt_len] = rng.integers(0, cfg.vocab_size, (batch, args.prompt_len))
    forced = jnp.asarray(forced)
    n_prompt, steps, one = (jnp.asarray(n, jnp.int32) for n in (args.prompt_len, args.steps,
                                                                1))

    def run_prefill(p: Params) -> tuple[jax.Array, jax.Array, Any]:
        out, last, cache = decode_loop(p, cfg, cache0, forced, n_prompt, n_prompt)
        return out[:, args.prompt_len - 1], last, cache

    t0 = time.perf_counter()
    token, last, cache = jax.block_until_ready(run_prefill(params))
    row["first_call_s"] = time.perf_counter() - t0
    first = jnp.zeros((batch, length), jnp.int32).at[:, 0].set(token)

    if args.loop == "fused":  # the executable of the prompt, reused
        fn: Any = decode_loop
        timed_args: tuple[Any, ...] = (params, cfg, cache, first, one, steps)
    else:
        fn = python_loop
        timed_args = (params, cfg, cache, token, args.steps)
    # The first decode step's logits (the same compiled loop, one step).
    logits = np.asarray(decode_loop(params, cfg, cache, first, one, one)[1], np.float32)
    row["first_step_finite"] = bool(np.isfinite(logits).all() and np.isfinite(
        np.asarray(last, np.float32)).all())
    if ref is not None:  # same prompt; the first step feeds the quantized model's token
        _, ref_last, ref_cache = run_prefill(ref)
        ref_logits = np.asarray(decode_loop(ref, cfg, ref_cache, first, one, one)[1],
                                np.float32)
        row["prefill_rel_err"] = rel_err(last, ref_last)
        row["first_step_rel_err"] = rel_err(logits, ref_logits)
        row["first_step_argmax_agree"] = float(np.mean(
            np.argmax(logits, -1) == np.argmax(ref_logits, -1)))
        del ref_cache

    samples = wall_samples_us(fn, *timed_args, runs=args.runs, warmup=1)
    seconds = float(np.median(samples)) / 1e6
    row.update(decode_us_samples=samples, decode_seconds=seconds,
               tokens_per_s=batch * args.steps / seconds,
               ms_per_token=1e3 * seconds / args.steps)
    if on_gpu and args.loop == "fused" and not args.no_device_time:
        how: dict[str, Any] = {}
        us = device_us(fn, [timed_args], iterations=args.runs, info=how)
        row["device_time_method"] = how["method"]
        if "error" in how:
            row["device_time_error"] = how["error"]
        row["device_seconds"] = us / 1e6
        row["device_tokens_per_s"] = batch * args.steps / (us / 1e6)
    return row


# ----------------------------------------------------------------------------------------
# Report






def _gb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def markdown(report: dict[str, Any]) -> list[str]:
    """The report as markdown lines."""
    env, c, a = report["environment"], report["config"], report["settings"]
    loop = ("one jitted `lax.fori_loop` of the steps per run" if a["loop"] == "fused"
            else "a Python loop over a jitted step (one dispatch per token)")
    md = [f"# End-to-end greedy decode with a KV cache ({env['device']})", "",
          f"jax {env['jax']}, jaxlib {env['jaxlib']}, flax {env['flax']}, python "
          f"{env['python']}", "",
          f"Model: {'tiny Llama' if a.get('tiny') else 'Llama-2-7B shape'} with "
          f"{c['num_layers']} blocks (hidden {c['hidden_size']}, "
          f"FFN {c['intermediate_size']}, {c['num_heads']} heads of {c['head_dim']}, vocab "
          f"{c['vocab_size']}), random weights, bf16 activations and KV cache. Every block "
          "linear quantized; embeddings, norms and lm_head bf16. Prompt of "
          f"{a['prompt_len']} tokens fed, then {a['steps']} greedy steps timed: {loop}; "
          f"median of {a['runs']} runs after a warm-up. Cache of {a['prompt_len'] + a['steps']} "
          f"slots. Kernels: {a['kernel_backend'] or 'none (jnp / XLA path)'}.", "",
          "| weights | bits/weight | model bytes | batch | tokens/s | x bf16 | ms/token | "
          "linears on kernel |", "|---|---|---|---|---|---|---|---|"]
    base = {r["batch"]: r["tokens_per_s"] for r in report["rows"] if r["weights"] == "bf16"}
    for r in report["rows"]:
        w = report["weights"][r["weights"]]
        x = base.get(r["batch"])
        xs = f"{r['tokens_per_s'] / x:.2f}x" if x else "n/a"
        bits = f"{w['bits_per_weight']:.3f}" if w["bits_per_weight"] else "n/a"
        k = w["kernel"]
        on = f"{k.get('kernel', 0)}/{sum(k.values())}"
        if k.get("partial"):
            on += f" ({k['partial']} partly)"
        md.append(f"| {r['weights']} | {bits} | {_gb(w['storage_bytes'])} | {r['batch']} | "
                  f"{r['tokens_per_s']:.1f} | {xs} | {r['ms_per_token']:.3f} | {on} |")
    md += ["", "bits/weight: everything the block linears store (codes, scales, zeros, "
           "permutations) per weight. Model bytes: the whole model as stored. Linears on "
           "kernel: of the block linears and lm_head (lm_head stays bf16 on XLA's matmul).",
           "", "| weights | linear layouts | bytes on device (kernel layout) | build s | "
           "first step vs dequantized (rel. err, argmax agree) |", "|---|---|---|---|---|"]
    for name, w in report["weights"].items():
        checks = [r for r in report["rows"] if r["weights"] == name
                  and "first_step_rel_err" in r]
        chk = "; ".join(f"B={r['batch']}: {r['first_step_rel_err']:.1e}, "
                        f"{r['first_step_argmax_agree']:.0%}" for r in checks) or "n/a"
        types = ", ".join(f"{t} x{n}" for t, n in w["types"].items())
        md.append(f"| {name} | {types} | {_gb(w['device_bytes'])} | "
                  f"{w['build_seconds']:.1f} | {chk} |")
    dev = [r for r in report["rows"] if "device_tokens_per_s" in r]
    if dev:
        md += ["", "Device time of the fused loop (CUPTI: the sum of its kernels' times, the "
               "gaps between kernels excluded; `wall`: CUPTI failed, see the JSON):", "",
               "| weights | batch | device tokens/s | device ms/token | wall / device | "
               "method |", "|---|---|---|---|---|---|"]
        for r in dev:
            md.append(f"| {r['weights']} | {r['batch']} | {r['device_tokens_per_s']:.1f} | "
                      f"{1e3 * r['device_seconds'] / a['steps']:.3f} | "
                      f"{r['decode_seconds'] / r['device_seconds']:.2f} | "
                      f"{r['device_time_method']} |")
    target = [r for r in report["rows"] if r["batch"] == 1 and r["weights"].startswith(
        "RTN 4-bit")]
    if target and base.get(1) and not a.get("tiny"):
        x = target[0]["tokens_per_s"] / base[1]
        md += ["", f"Target (batch 1, 4-bit at least 3x bf16 tokens/s): {x:.2f}x, "
               f"{'met' if x >= 3 else 'not met'}."]
    if report.get("failures"):
        md += ["", "**Check failures:**", ""] + [f"- {f}" for f in report["failures"]]
    return md


def write(out: Path, report: dict[str, Any], echo: bool = False) -> None:
    """Writes ``out.json`` and ``out.md``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    md = markdown(report)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    if echo:
        print("\n".join(md))
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


# ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (``--tiny`` changes the defaults of the ones not given)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke test: 2 blocks of hidden 256 (defaults below shrink)")
    p.add_argument("--layers", type=int, default=None, help="blocks (32; --tiny: 2)")
    p.add_argument("--batches", default="1,16", help="batch sizes (1,16)")
    p.add_argument("--bits", default="16,4,3,2,mixed",
                   help="weight types: 16 (bf16), 2..8 (RTN g128), mixed / mixedN")
    p.add_argument("--mixed-bits", type=int, default=2,
                   help="average code bits of 'mixed' (2: 1/2/3-bit groups)")
    p.add_argument("--mixed-moved", type=float, default=0.25,
                   help="share of groups at N-1 bits (as many at N+1) in 'mixed' (0.25)")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps (32; tiny 8)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (32; tiny 8)")
    p.add_argument("--runs", type=int, default=None, help="timed runs, median (5; tiny 3)")
    p.add_argument("--loop", choices=["fused", "python"], default="fused",
                   help="fused: one jitted fori_loop per run; python: a jitted step per token")
    p.add_argument("--kernels", choices=["auto", "off", "interpret"], default="auto",
                   help="auto: prepare() for the GPU/TPU kernels when on one; off: jnp path; "
                        "interpret: GPU kernels in the Pallas interpreter (CPU, slow)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the comparison with the dequantized model (saves its memory)")
    p.add_argument("--check-tol", type=float, default=0.1,
                   help="largest relative error of the first-step logits vs the "
                        "dequantized model (0.1; bf16 rounding gives ~1e-2)")
    p.add_argument("--no-device-time", action="store_true",
                   help="skip the CUPTI device time of the fused loop (GPU)")
    p.add_argument("--seed", type=int, default=0, help="weights' random key")
    p.add_argument("--merge", action="store_true",
                   help="keep rows of other weight types from an existing <out>.json")
    p.add_argument("--out", help="output path prefix (.json and .md are written)")
    args = p.parse_args(argv)
    defaults = ({"layers": 2, "steps": 8, "prompt_len": 8, "runs": 3} if args.tiny else
                {"layers": 32, "steps": 32, "prompt_len": 32, "runs": 5})
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def output_path(args: argparse.Namespace) -> Path:
    """``--out``, or the default under ``benchmarks/results``."""
    if args.out:
        return Path(args.out)
    if args.tiny:
        return ROOT / "benchmarks" / "results" / "decode_gpu_tiny_cpu"
    kind = jax.devices()[0].device_kind.lower().replace(" ", "_")
    sub = ("gpu",) if jax.default_backend() == "gpu" else ()
    return ROOT.joinpath("benchmarks", "results", *sub, f"decode_gpu_{kind}")


def self_test_mixed(cfg: ModelConfig, seed: int, bits: int, moved: float) -> float:
    """The mixed builder against :func:`fake_quant_groups` on one linear (max abs diff)."""
    path = "layers.0.mlp.down_proj.weight"
    shape = flatten(transformer.abstract_params(cfg))[path].shape
    w = random_tensor(path, shape, jnp.float32, seed)
    m = mixed_weight(w, bits, moved)
    ref = fake_quant_groups(w, jnp.asarray(group_bits_for(w, bits, moved)),
                            group_size=GROUP, scale_dtype=jnp.bfloat16)
    return float(jnp.max(jnp.abs(m.dequantize(jnp.float32) - ref)))


def main(args: argparse.Namespace) -> int:
    """Builds each weight type, measures every batch, writes the report."""
    cfg = tiny_llama(args.layers) if args.tiny else llama2_7b(args.layers)
    dtype = jnp.bfloat16
    types = parse_bits(args.bits, args.mixed_bits)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    backend = kernel_backend(args.kernels)
    on_gpu = jax.default_backend() == "gpu"
    out = output_path(args)
    settings = {k: getattr(args, k) for k in ("tiny", "steps", "prompt_len", "runs", "loop",
                                              "mixed_bits", "mixed_moved", "seed",
                                              "check_tol")}
    settings["kernel_backend"] = (f"{backend} (interpreted)" if args.kernels == "interpret"
                                  else backend)
    report: dict[str, Any] = {"environment": environment(), "config": cfg.to_dict(),
                              "settings": settings, "args": vars(args), "weights": {},
                              "rows": [], "failures": []}
    if args.merge and out.with_suffix(".json").exists():
        old = json.loads(out.with_suffix(".json").read_text())
        now = json.loads(json.dumps({"config": report["config"], "settings": settings}))
        if {"config": old.get("config"), "settings": old.get("settings")} == now:
            names = {w.label for w in types}
            report["weights"] = {k: v for k, v in old["weights"].items() if k not in names}
            report["rows"] = [r for r in old["rows"] if r["weights"] not in names]
            report["failures"] = [f for f in old.get("failures", [])
                                  if not any(f.startswith(n + " ") for n in names)]
            if "mixed_builder_max_abs_diff" in old:
                report["mixed_builder_max_abs_diff"] = old["mixed_builder_max_abs_diff"]
            print(f"merging {len(report['rows'])} rows of {out.with_suffix('.json')}")
        else:
            print(f"--merge: {out.with_suffix('.json')} has another config; not merged")
    print(f"{report['environment']['device']}: {cfg.num_layers} blocks, kernels: "
          f"{settings['kernel_backend']}, loop: {args.loop}", flush=True)

    if any(w.kind == "mixed" for w in types):
        diff = self_test_mixed(cfg, args.seed, next(w.bits for w in types
                                                    if w.kind == "mixed"), args.mixed_moved)
        report["mixed_builder_max_abs_diff"] = diff
        if diff > 1e-6:
            report["failures"].append(f"mixed builder differs from fake_quant_groups by {diff}")

    for wt in types:
        name = wt.label
        reference = wt.kind != "float" and not args.no_check
        params, ref, info = build_model(cfg, wt, dtype=dtype, seed=args.seed, backend=backend,
                                        reference=reference, moved=args.mixed_moved)
        report["weights"][name] = info
        print(f"{name}: {info['summary'] or 'bf16'}; built in {info['build_seconds']:.1f} s; "
              f"{_gb(info['storage_bytes'])} stored, {_gb(info['device_bytes'])} on device; "
              f"linears: {info['types']}", flush=True)
        for i, batch in enumerate(batches):
            row = {"weights": name, **measure(params, ref if i == 0 else None, cfg, batch,
                                              args, dtype, on_gpu)}
            report["rows"].append(row)
            msg = (f"  B={batch}: {row['tokens_per_s']:.1f} tokens/s, "
                   f"{row['ms_per_token']:.3f} ms/token (first call, compile included: "
                   f"{row['first_call_s']:.1f} s)")
            if "device_tokens_per_s" in row:
                msg += f", device {row['device_tokens_per_s']:.1f} tokens/s"
            if "first_step_rel_err" in row:
                msg += (f"; first step vs dequantized: rel err "
                        f"{row['first_step_rel_err']:.2e}, argmax agree "
                        f"{row['first_step_argmax_agree']:.0%}")
            print(msg, flush=True)
            if not row["first_step_finite"]:
                report["failures"].append(f"{name} B={batch}: non-finite first-step logits")
            if row.get("first_step_rel_err", 0.0) > args.check_tol:
                report["failures"].append(
                    f"{name} B={batch}: first-step logits differ from the dequantized "
                    f"model's by {row['first_step_rel_err']:.2e} > {args.check_tol}")
            write(out, report)
        del params, ref
    write(out, report, echo=True)
    for f in report["failures"]:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    ARGS = parse_args()
    if ARGS.tiny:  # before the first device is asked for
        jax.config.update("jax_platforms", "cpu")
        # Compile faster: the smoke test's CPU timings mean nothing anyway.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_"
                                   "optimization_level=0").strip()
    sys.exit(main(ARGS))
