"""Sequential (layer-by-layer) calibration, as GPTQ does it.

Block by block: the inputs of block ``i`` are computed by the *already quantized*
blocks ``0..i-1``; for every linear layer of the block the statistics of its inputs
are accumulated over batches of calibration windows:

* the Hessian of its reconstruction loss, ``H = 2 X^T X / n`` over all calibration
  tokens (float32, ``precision=HIGHEST``);
* the per-channel maximum ``max_t |X_tj|`` (for smoothing and outlier methods);
* optionally a strided sample of the input rows themselves (for methods that score
  candidate quantizations on real layer outputs, such as SliM-LLM's KL search).

The block's layers are quantized with their method, an optional block-level step runs
(SliM-LLM+ trains its clipping on block outputs there), and the quantized block
computes the next block's inputs. With ``true_sequential`` the statistics of a
layer are collected *after* the layers feeding it inside the block are quantized
(stages q/k/v, o, gate/up, down), as the GPTQ reference's ``--true-sequential``.

Memory: one block's parameters, the current activations of the calibration windows
(``[windows, seq_len, hidden]``, float32) and one batch's intermediate activations;
never the whole model's activations.

On a device mesh (``Calibration.mesh``, :mod:`jaxquant.sharding`) the same loop runs
sharded: each batch of activations is split over the ``data`` axis, each block's
weights are placed by the partition rules (split over ``model``), and XLA all-reduces
the Hessians ``X^T X`` over ``data`` inside the jitted block forward (the token axis
they sum over is split). Each layer's quantizer (GPTQ, SliM-LLM, CLAQ) then runs on the
mesh's first device with the reduced statistics, and the quantized layer is placed back
on the mesh. With ``Calibration.stream`` (layer streaming) only the current block's
weights are on the devices: the other blocks stay where the caller keeps them (pass
host NumPy arrays for a model larger than a device) and every quantized block is moved
to the host as soon as it is done, so a model larger than one accelerator quantizes.
Host memory peak of streaming: the float model as passed, plus the quantized model
built so far, plus one block in transit.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Collection, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant import ops
from jaxquant.models import transformer
from jaxquant.models.config import ModelConfig
from jaxquant.params import flatten, unflatten

#: Stages of a block for ``true_sequential``: layers that read the same input.
STAGES = (("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
          ("self_attn.o_proj.weight",),
          ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
          ("mlp.down_proj.weight",))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Calibration:
    """Calibration data and how to feed it, for methods that need it (GPTQ and later)."""

    config: ModelConfig  # the model the windows are fed through
    windows: np.ndarray  # int32 token windows [n, seq_len]
    batch_size: int = 8  # windows per forward step
    progress: bool = True  # show a progress bar per block, with the running layer error
    true_sequential: bool = False  # collect each stage's inputs after quantizing earlier ones
    sample_tokens: int = 4096  # input rows kept per layer for methods that need activations
    mesh: Any = None  # jax.sharding.Mesh (data x model) to run on; None: the default device
    stream: bool = False  # layer streaming: only the current block on device, results to host


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerInputs:
    """What calibration knows of one linear layer's inputs ``X [n_tokens, in]``."""

    hessian: jax.Array | None  # 2 X^T X / n, float32 [in, in] (None: not collected)
    absmax: jax.Array  # max_t |X_tj|, float32 [in]
    sample: jax.Array | None  # a strided sample of rows of X, float32 [m, in]
    tokens: int  # n, calibration tokens the statistics are over


#: ``fn(path, weight, spec, inputs) -> QuantizedWeight | (QuantizedWeight, state)``;
#: a ``state`` is handed to the block step.
LayerFn = Callable[[str, jax.Array, Any, LayerInputs], Any]
#: ``fn(config, layer, float_block, quantized_block, inputs, specs, states) ->
#: (block, info)``: a block-level step after the block's layers are quantized
#: (``inputs``: the block's input activations, a list of ``[batch, seq, hidden]``
#: arrays; ``states``: what the layer steps returned beside their weights, by path;
#: ``info``: a JSON-able dict for the statistics).
BlockFn = Callable[[ModelConfig, int, Any, Any, list[jax.Array], dict[str, Any],
                    dict[str, Any]], tuple[Any, dict[str, Any]]]


@functools.partial(jax.jit, static_argnums=(1, 2, 4, 5))
def _block_stats(block_params: Any, cfg: ModelConfig, layer: int, x: jax.Array,
                 sample_stride: int, gram: bool) -> Any:
    with ops.capture_inputs(sample_stride, gram=gram):
        block = transformer.bind_block(block_params, cfg, layer)
        b, t, _ = x.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

        def run(blk: Any, x: jax.Array, positions: jax.Array) -> jax.Array:
            return blk(x, positions, None, None)[0]

        if hasattr(nnx, "capture"):  # flax >= 0.12.8: sow only inside nnx.capture
            y, stats = nnx.capture(run, nnx.Intermediate)(block, x, positions)
        else:
            y = run(block, x, positions)
            stats = nnx.state(block, nnx.Intermediate)
    return y, nnx.to_pure_dict(stats)


_apply_block = jax.jit(transformer.apply_block, static_argnums=(1, 2))


def apply_block(block_params: Any, cfg: ModelConfig, layer: int, x: jax.Array) -> jax.Array:
    """Jitted block ``layer`` (compiled once per kind of block)."""
    return _apply_block(block_params, cfg, transformer.canonical_layer(cfg, layer), x)
_embed = jax.jit(transformer.embed, static_argnums=1)


@functools.partial(jax.jit, static_argnums=(1, 3))
def _embed_table(table: Any, cfg: ModelConfig, tokens: jax.Array, dtype: Any) -> jax.Array:
    """The first block's input from the embedding table alone (layer streaming)."""
    x = ops.embedding_lookup(table, tokens, dtype)
    return x * jnp.asarray(cfg.embed_scale, dtype) if cfg.embed_scale != 1.0 else x


class _Placement:
    """Where calibration keeps blocks, activations and per-layer work (see the module
    docstring); everything is left where it is without a mesh and streaming."""

    def __init__(self, mesh: Any, stream: bool):
        self.mesh, self.stream = mesh, stream
        self.device = None
        if mesh is not None:
            from jaxquant import sharding

            self.sharding = sharding
            self.data = sharding.mesh_shape(mesh)["data"]
            local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
            if len(local) != mesh.size:
                raise ValueError("calibration on a mesh runs in one process: the mesh "
                                 "spans devices of other processes")
            self.device = local[0]
        elif stream:
            self.device = jax.devices()[0]

    def batch_size(self, batch_size: int) -> int:
        """Windows per step: a multiple of the data axis size."""
        d = self.data if self.mesh is not None else 1
        return -(-max(1, batch_size) // d) * d

    def block(self, tree: Any) -> Any:
        """A block's (or the embedding's) parameters, placed for the block forward."""
        if self.mesh is not None:
            return self.sharding.shard_params(tree, self.mesh)
        return jax.device_put(tree, self.device) if self.stream else tree

    def acts(self, x: Any) -> jax.Array:
        """A batch of activations or tokens: split over ``data`` where it divides."""
        if self.mesh is None:
            return jnp.asarray(x)
        from jax.sharding import NamedSharding, PartitionSpec

        spec = PartitionSpec("data") if x.shape[0] % self.data == 0 else PartitionSpec()
        return jax.device_put(x, NamedSharding(self.mesh, spec))

    def layer(self, tree: Any) -> Any:
        """Arrays of ``tree`` on the device that runs the per-layer quantizers."""
        if self.mesh is None:
            return tree
        return jax.tree.map(lambda a: jax.device_put(a, self.device)
                            if isinstance(a, jax.Array) else a, tree)

    def inputs(self, x: LayerInputs) -> LayerInputs:
        """:meth:`layer` for a layer's statistics."""
        if self.mesh is None:
            return x
        return dataclasses.replace(x, hessian=self.layer(x.hessian),
                                   absmax=self.layer(x.absmax), sample=self.layer(x.sample))

    def host(self, tree: Any) -> Any:
        """A finished quantized layer: on the host when streaming."""
        return jax.device_get(tree) if self.stream else tree


def _layer_stats(stats: Any) -> dict[str, dict[str, jax.Array]]:
    """``{"mlp": {"up_proj": {"input_gram": (g,)}}}`` -> ``{"mlp.up_proj.weight": {...}}``."""
    out: dict[str, dict[str, jax.Array]] = {}
    for path, value in flatten(stats).items():
        for name in ("input_gram", "input_absmax", "input_sample"):
            head, sep, _ = path.partition("." + name)
            if sep:
                v = value[0] if isinstance(value, (tuple, list)) else value
                out.setdefault(head + ".weight", {})[name] = v
    return out


@jax.jit
def relative_layer_error(w: jax.Array, q: jax.Array, h: jax.Array) -> jax.Array:
    """``tr(D H D^T) / tr(W H W^T)``, ``D = W - Q``: the relative output error on X."""
    w = w.astype(jnp.float32)
    d = w - q.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    num = jnp.sum(jnp.matmul(d, h, precision=hi) * d)
    den = jnp.sum(jnp.matmul(w, h, precision=hi) * w)
    return num / jnp.maximum(den, 1e-30)


def _stages(paths: list[str], true_sequential: bool) -> list[list[str]]:
    if not true_sequential:
        return [paths]
    stages = [[p for p in stage if p in paths] for stage in STAGES]
    rest = [p for p in paths if not any(p in s for s in STAGES)]
    return [s for s in [*stages, rest] if s]


def collect_inputs(block_params: Any, cfg: ModelConfig, layer: int, xs: list[jax.Array],
                   paths: list[str], sample_tokens: int = 0, *, hessian: bool = True
                   ) -> dict[str, LayerInputs]:
    """Input statistics of the linear layers ``paths`` of one block over batches ``xs``.

    ``hessian=False`` skips the ``[in, in]`` Gram matrices (``LayerInputs.hessian`` is
    None) for callers that need only the maxima and samples.
    """
    return _collect(block_params, cfg, layer, xs, paths, sample_tokens, hessian)[0]


def _collect(block_params: Any, cfg: ModelConfig, layer: int, xs: list[jax.Array],
             paths: list[str], sample_tokens: int, hessian: bool
             ) -> tuple[dict[str, LayerInputs], list[jax.Array]]:
    """:func:`collect_inputs`, and the block's outputs of the same forward passes."""
    tokens = sum(int(np.prod(x.shape[:2])) for x in xs)
    stride = 0
    if sample_tokens > 0:
        stride = max(1, tokens // sample_tokens)
        stride += stride % 2 == 0 and stride > 1  # odd: do not always hit the same positions
    acc: dict[str, dict[str, Any]] = {}
    outs = []
    for x in xs:
        y, stats = _block_stats(block_params, cfg, transformer.canonical_layer(cfg, layer), x,
                             stride, hessian)
        outs.append(y)
        for path, st in _layer_stats(stats).items():
            if path not in paths:
                continue
            a = acc.setdefault(path, {"gram": 0.0, "absmax": 0.0, "sample": []})
            if hessian:
                a["gram"] = a["gram"] + st["input_gram"]
            a["absmax"] = jnp.maximum(a["absmax"], st["input_absmax"])
            if "input_sample" in st:
                a["sample"].append(st["input_sample"])
    return {p: LayerInputs(hessian=a["gram"] * (2.0 / tokens) if hessian else None,
                           absmax=a["absmax"],
                           sample=jnp.concatenate(a["sample"]) if a["sample"] else None,
                           tokens=tokens)
            for p, a in acc.items()}, outs


def float_block_inputs(params: Any, cfg: ModelConfig, windows: np.ndarray, *,
                       batch_size: int = 8, sample_tokens: int = 0, hessian: bool = False,
                       blocks: Collection[int] | None = None
                       ) -> Iterator[tuple[int, Any, dict[str, LayerInputs]]]:
    """Walks the *float* model block by block: the input statistics of every linear layer.

    Unlike :func:`sequential_quantize`, nothing is quantized on the way: block ``i``'s
    inputs are the float outputs of blocks ``0..i-1`` (what SmoothQuant, AWQ and the
    difficulty analysis measure). Memory: one block's activations of the windows.

    Args:
      params: Parameters (a block's linear weights may be any format).
      cfg: Their model config.
      windows: ``[n, seq]`` int token windows.
      batch_size: Windows per forward pass.
      sample_tokens: Input rows sampled per layer (0: none).
      hessian: Also collect the ``[in, in]`` Hessians.
      blocks: Only these blocks (the walk runs up to the largest; default: all).

    Yields:
      ``(layer, block_params, {path: LayerInputs})`` with paths relative to the block
      (``mlp.down_proj.weight``). Each block runs once per batch: the forward that
      captures its inputs' statistics also gives the next block's inputs.
    """
    windows = np.asarray(windows, np.int32)
    bs = max(1, batch_size)
    xs = [_embed(params, cfg, jnp.asarray(windows[i:i + bs]))
          for i in range(0, len(windows), bs)]
    wanted = set(range(cfg.num_layers) if blocks is None else blocks)
    last = max(wanted, default=-1)
    for layer in range(last + 1):
        block = params["layers"][layer]
        if layer not in wanted:
            xs = [apply_block(block, cfg, layer, x) for x in xs]
            continue
        paths = sorted(p for p in flatten(block) if p.endswith("proj.weight"))
        stats, xs = _collect(block, cfg, layer, xs, paths, sample_tokens, hessian)
        yield layer, block, stats


def sequential_quantize(params: Any, calibration: Calibration, quantize_layer: LayerFn,
                        specs: dict[str, Any], *, block_fn: BlockFn | None = None,
                        sample_tokens: int = 0) -> tuple[Any, dict]:
    """Quantizes the block layers in ``specs`` block by block on calibration inputs.

    Args:
      params: Float params.
      calibration: Windows, config and feeding options.
      quantize_layer: ``fn(path, weight, spec, inputs) -> QuantizedWeight``.
      specs: Parameter path -> spec, for the layers to quantize.
      block_fn: Optional block-level step after a block's layers are quantized.
      sample_tokens: Input rows to keep per layer (0: none; the methods ask for them).

    Returns:
      ``(qparams, stats)``: ``stats["layers"][path]`` holds ``seconds`` and
      ``relative_error`` (``tr(D H D^T) / tr(W H W^T)`` on the layer's calibration
      inputs), ``stats["tokens"]`` and ``stats["seconds"]`` the totals, and
      ``stats["blocks"][layer]`` what the block step reported.
    """
    from tqdm.auto import tqdm

    start_all = time.perf_counter()
    cfg = calibration.config
    windows = np.asarray(calibration.windows, np.int32)
    place = _Placement(calibration.mesh, calibration.stream)
    bs = place.batch_size(calibration.batch_size)
    flat = dict(flatten(params))
    batches = [windows[i:i + bs] for i in range(0, len(windows), bs)]
    if calibration.mesh is None and not calibration.stream:
        xs = [_embed(params, cfg, jnp.asarray(b)) for b in batches]
    else:  # only the embedding table on device
        table = place.block({"embed_tokens": {"weight": params["embed_tokens"]["weight"]}})
        dtype = jnp.dtype(params["norm"]["weight"].dtype)
        xs = [_embed_table(table["embed_tokens"]["weight"], cfg, place.acts(b), dtype)
              for b in batches]
        del table
    stats: dict[str, Any] = {}
    errors: list[float] = []
    blocks: dict[int, Any] = {}
    bar = tqdm(range(cfg.num_layers), desc="calibrate", unit="block",
               disable=not calibration.progress, leave=False)
    for layer in bar:
        prefix = f"layers.{layer}."
        float_block = place.block(params["layers"][layer])
        wanted = {p[len(prefix):]: s for p, s in specs.items() if p.startswith(prefix)}
        float_block_flat = flatten(float_block)
        qblock = dict(float_block_flat)
        block_inputs: dict[str, LayerInputs] = {}
        states: dict[str, Any] = {}
        for stage in _stages(sorted(wanted), calibration.true_sequential):
            inputs = collect_inputs(unflatten(qblock), cfg, layer, xs, stage, sample_tokens)
            block_inputs.update(inputs)
            for path in stage:
                start = time.perf_counter()
                w = place.layer(qblock[path])
                layer_inputs = place.inputs(inputs[path])
                q = quantize_layer(prefix + path, w, wanted[path], layer_inputs)
                if isinstance(q, tuple):
                    q, states[path] = q
                err = float(relative_layer_error(w, q.dequantize(jnp.float32),
                                                 layer_inputs.hessian))
                del w, layer_inputs
                qblock[path] = flatten(place.block(unflatten({path: q})))[path]
                errors.append(err)
                stats[prefix + path] = {"seconds": time.perf_counter() - start,
                                        "relative_error": err}
                bar.set_postfix_str(f"{path.removesuffix('.weight')} err {err:.2e} "
                                    f"(mean {np.mean(errors):.2e})")
        block_params = unflatten(qblock)
        if block_fn is not None and wanted:
            # On a mesh the block step runs on one device, as the layer quantizers do.
            block_params, info = block_fn(
                cfg, layer, place.layer(float_block), place.layer(block_params),
                place.layer(xs), wanted, place.layer(states))
            block_params = place.block(block_params)
            blocks[layer] = info
            qblock = dict(flatten(block_params))
            for path in wanted:  # the block step changed the weights: errors after it
                st = stats[prefix + path]
                st["relative_error_before_block_step"] = st["relative_error"]
                st["relative_error"] = float(relative_layer_error(
                    float_block_flat[path], qblock[path].dequantize(jnp.float32),
                    block_inputs[path].hessian))
        for path in wanted:
            flat[prefix + path] = place.host(qblock[path])
        xs = [apply_block(block_params, cfg, layer, x) for x in xs]
        # Drop this block's device arrays before the next block is placed (streaming).
        float_block = float_block_flat = block_params = qblock = None
        block_inputs = inputs = states = None
    bar.close()
    out = {"tokens": int(windows.size), "layers": stats,
           "seconds": time.perf_counter() - start_all}
    if blocks:
        out["blocks"] = blocks
    return unflatten(flat), out
