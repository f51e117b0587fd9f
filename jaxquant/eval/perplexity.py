"""Perplexity: ``exp(mean NLL)`` over all predicted tokens of non-overlapping windows.

Windows are scored in batches under ``jax.jit`` on a ``data`` x ``model`` device mesh
(:mod:`jaxquant.sharding`): the batch axis is split over ``data``, the parameters are
placed by the partition rules (split over ``model``, replicated over ``data``), and
XLA's SPMD partitioner runs the forward. By default every device is on ``data``, so the
same call runs on one CPU, several GPUs, a TPU host or, after
:func:`jaxquant.distributed.initialize`, several hosts: each process then transfers
only its own rows of each batch, and the per-window losses are gathered once (a
replicated output), so every process sums every window exactly once. The lm_head runs
over sequence chunks so the ``[batch, seq, vocab]`` logits are never materialised at
once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxquant import sharding
from jaxquant.models import transformer
from jaxquant.models.config import ModelConfig
from jaxquant.sharding import MeshConfig

_CHUNK = 512  # sequence positions per lm_head chunk


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerplexityResult:
    """Outcome of :func:`evaluate_perplexity`."""

    ppl: float  # exp(mean NLL over predicted tokens)
    nll: float  # mean NLL (nats per token)
    windows: int  # windows scored
    tokens: int  # tokens predicted (windows * (seq_len - 1))
    seq_len: int  # window length
    batch_size: int  # windows per step (a multiple of the data axis size)
    devices: int  # devices of the mesh (data x model)
    seconds: float  # wall time of the whole evaluation, compilation included
    compile_seconds: float  # wall time of the first step (compilation + one batch)
    tokens_per_second: float  # input tokens per second after the first step
    window_nll: list[float]  # mean NLL of each window, in order
    mesh: dict[str, int] = dataclasses.field(default_factory=dict)  # {"data": D, "model": M}
    processes: int = 1  # JAX processes (hosts) the mesh spans

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return dataclasses.asdict(self)


def window_nll(params: Any, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Summed next-token NLL of each window ``tokens [B, T]`` -> ``[B]`` (float32)."""
    h = transformer.hidden_states(params, cfg, tokens)[:, :-1]
    targets = tokens[:, 1:]
    b, n, d = h.shape
    chunks = -(-n // _CHUNK)
    pad = chunks * _CHUNK - n
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, chunks, _CHUNK, d)
    targets = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, chunks, _CHUNK)
    valid = (jnp.arange(chunks * _CHUNK) < n).reshape(chunks, _CHUNK)

    def chunk_nll(args):
        hc, tc, vc = args  # [B, C, D], [B, C], [C]
        logits = transformer.logits_from_hidden(params, cfg, hc)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(vc, lse - picked, 0.0), axis=-1)  # [B]

    per_chunk = jax.lax.map(chunk_nll, (h.swapaxes(0, 1), targets.swapaxes(0, 1), valid))
    return per_chunk.sum(axis=0)


@functools.lru_cache(maxsize=8)
def _scorer(cfg: ModelConfig, mesh: Mesh):
    data = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    # Parameters keep the shardings they were placed with; the per-window losses come
    # back replicated, so every process reads all of them from its own devices.
    return jax.jit(lambda params, tokens: window_nll(params, cfg, tokens),
                   out_shardings=replicated), data


def resolve_mesh(mesh: Mesh | MeshConfig | None = None,
                 devices: list[Any] | None = None) -> Mesh:
    """The mesh an evaluation runs on.

    Args:
      mesh: A mesh, a :class:`~jaxquant.sharding.MeshConfig`, or None (every device on
        ``data``).
      devices: Devices for a config or None (default: the local devices in one process,
        every process's devices after :func:`jaxquant.distributed.initialize`).

    Returns:
      A ``data`` x ``model`` mesh (a given mesh is returned as is).
    """
    if isinstance(mesh, Mesh):
        return mesh
    if devices is None:
        devices = jax.local_devices() if jax.process_count() == 1 else jax.devices()
    return sharding.make_mesh(mesh, list(devices))


def evaluate_perplexity(params: Any, cfg: ModelConfig, windows: np.ndarray, *,
                        batch_size: int = 1, progress: bool = True,
                        devices: list[Any] | None = None,
                        mesh: Mesh | MeshConfig | None = None) -> PerplexityResult:
    """Perplexity of the model on ``windows [n, seq_len]`` of token ids.

    Args:
      params: Parameter pytree.
      cfg: Model config.
      windows: Token windows, e.g. from :func:`jaxquant.data.make_windows`.
      batch_size: Windows per step; rounded up to a multiple of the ``data`` axis size.
        Short final batches are padded with copies that are not counted.
      progress: Show a progress bar with the running perplexity.
      devices: Devices of the mesh (default: all local devices; with several
        processes, all devices of all processes).
      mesh: The device mesh, or its shape as a :class:`~jaxquant.sharding.MeshConfig`
        (default: every device on ``data``, parameters replicated). Parameters are
        placed by :func:`jaxquant.sharding.shard_params`.

    Returns:
      The perplexity and its accounting.

    Raises:
      ValueError: token ids outside the vocabulary.
      FloatingPointError: the loss is NaN or infinite.
      MeshError: the mesh shape does not match the devices.
    """
    windows = np.asarray(windows, dtype=np.int32)
    n, seq_len = windows.shape
    if windows.size and (windows.min() < 0 or windows.max() >= cfg.vocab_size):
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got "
                         f"[{windows.min()}, {windows.max()}]")
    mesh = resolve_mesh(mesh, devices)
    shape = sharding.mesh_shape(mesh)
    ndata = shape["data"]
    batch = -(-min(max(batch_size, 1), n) // ndata) * ndata  # no bigger than the windows need
    score, data_sharding = _scorer(cfg, mesh)
    params = sharding.shard_params(params, mesh)

    from tqdm.auto import tqdm

    start = time.perf_counter()
    first_step = 0.0
    nll = np.zeros(n, dtype=np.float64)
    bar = tqdm(total=n, unit="win", desc="perplexity", disable=not progress, leave=False)
    for lo in range(0, n, batch):
        chunk = windows[lo:lo + batch]
        real = len(chunk)
        if real < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - real, axis=0)])
        out = score(params, sharding.put(chunk, data_sharding))
        # Replicated: this process's first shard holds every window's loss.
        nll[lo:lo + real] = np.asarray(out.addressable_shards[0].data, np.float64)[:real]
        if lo == 0:
            first_step = time.perf_counter() - start
        done = lo + real
        bar.update(real)
        bar.set_postfix(ppl=f"{math.exp(nll[:done].sum() / (done * (seq_len - 1))):.4f}")
    bar.close()
    seconds = time.perf_counter() - start
    predicted = n * (seq_len - 1)
    mean = float(nll.sum() / predicted)
    if not math.isfinite(mean):
        bad = int(np.argmin(np.isfinite(nll)))
        raise FloatingPointError(
            f"the model produced a non-finite loss (first in window {bad}); its weights or "
            "activations overflow in this dtype")
    rest = max(n - min(batch, n), 0)
    steady = seconds - first_step
    tps = rest * seq_len / steady if rest and steady > 0 else min(batch, n) * seq_len / seconds
    return PerplexityResult(
        ppl=math.exp(mean), nll=mean, windows=n, tokens=predicted, seq_len=seq_len,
        batch_size=batch, devices=int(mesh.size), seconds=seconds, compile_seconds=first_step,
        tokens_per_second=tps, window_nll=[float(x) / (seq_len - 1) for x in nll],
        mesh=shape, processes=jax.process_count())
