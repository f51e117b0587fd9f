"""Perplexity: ``exp(mean NLL)`` over all predicted tokens of non-overlapping windows.

Windows are scored in batches under ``jax.jit``, data-parallel over every local
device (the batch axis is sharded over a one-axis ``data`` mesh, parameters are
replicated), so the same call runs on one CPU, several GPUs or a TPU host. The
lm_head runs over sequence chunks so the ``[batch, seq, vocab]`` logits are never
materialised at once.
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

from jaxquant.models import transformer
from jaxquant.models.config import ModelConfig

_CHUNK = 512  # sequence positions per lm_head chunk


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerplexityResult:
    """Outcome of :func:`evaluate_perplexity`."""

    ppl: float  # exp(mean NLL over predicted tokens)
    nll: float  # mean NLL (nats per token)
    windows: int  # windows scored
    tokens: int  # tokens predicted (windows * (seq_len - 1))
    seq_len: int  # window length
    batch_size: int  # windows per step (a multiple of the device count)
    devices: int  # devices the batch was split over
    seconds: float  # wall time of the whole evaluation, compilation included
    compile_seconds: float  # wall time of the first step (compilation + one batch)
    tokens_per_second: float  # input tokens per second after the first step
    window_nll: list[float]  # mean NLL of each window, in order

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
    return jax.jit(lambda params, tokens: window_nll(params, cfg, tokens),
                   in_shardings=(replicated, data), out_shardings=data), data, replicated


def evaluate_perplexity(params: Any, cfg: ModelConfig, windows: np.ndarray, *,
                        batch_size: int = 1, progress: bool = True,
                        devices: list[Any] | None = None) -> PerplexityResult:
    """Perplexity of the model on ``windows [n, seq_len]`` of token ids.

    Args:
      params: Parameter pytree.
      cfg: Model config.
      windows: Token windows, e.g. from :func:`jaxquant.data.make_windows`.
      batch_size: Windows per step; rounded up to a multiple of the device count.
        Short final batches are padded with copies that are not counted.
      progress: Show a progress bar with the running perplexity.
      devices: Devices to split batches over (default: all local devices).

    Returns:
      The perplexity and its accounting.

    Raises:
      ValueError: token ids outside the vocabulary.
      FloatingPointError: the loss is NaN or infinite.
    """
    windows = np.asarray(windows, dtype=np.int32)
    n, seq_len = windows.shape
    if windows.size and (windows.min() < 0 or windows.max() >= cfg.vocab_size):
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got "
                         f"[{windows.min()}, {windows.max()}]")
    devices = list(devices or jax.local_devices())
    ndev = len(devices)
    batch = -(-min(max(batch_size, 1), n) // ndev) * ndev  # no bigger than the windows need
    mesh = Mesh(np.asarray(devices), ("data",))
    score, data_sharding, replicated = _scorer(cfg, mesh)
    params = jax.device_put(params, replicated)

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
        out = score(params, jax.device_put(chunk, data_sharding))
        nll[lo:lo + real] = np.asarray(jax.device_get(out), dtype=np.float64)[:real]
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
        batch_size=batch, devices=len(devices), seconds=seconds, compile_seconds=first_step,
        tokens_per_second=tps, window_nll=[float(x) / (seq_len - 1) for x in nll])
