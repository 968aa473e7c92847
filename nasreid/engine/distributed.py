"""Data-parallel training over several processes (``torchrun``): NCCL on GPUs, gloo on CPU.

One process per device (``torchrun --nproc_per_node N -m nasreid search|train ...``, or ``nasreid ... --nproc N``
which calls torchrun). Each process reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` from the environment that
torchrun sets; without them everything here is a no-op and nasreid runs as one process.

The contract, as the rest of the engine relies on it:

* **Global batch.** ``data.batch_size`` is the *global* batch (P identities x K images). Every rank computes
  the same global PK order from ``(seed, epoch)`` (:class:`~nasreid.data.samplers.PKSampler`) and takes the
  identities at slots ``rank, rank + W, rank + 2W, ...`` of each global batch: P/W identities x K images per
  rank and step. Within a step the ranks hold disjoint identities, over an epoch every image is seen by
  exactly one rank, and the union of the ranks' batches at step t is the single-process batch t. P must be a
  multiple of W.
* **Gradients.** The network is wrapped in ``DistributedDataParallel`` for the forward of a training step
  (:func:`wrap_model`), so gradients are averaged over ranks (the mean of the per-rank mean losses, which is
  the global mean of the ID loss for equal shards; batch-hard triplet mining and BatchNorm statistics stay
  per rank unless ``distributed.sync_bn``). Strategies whose steps back-propagate into a subset of the
  parameters (DARTS: ``backward(inputs=omega)`` then ``backward(inputs=alpha)``) do not use DDP; they call
  :func:`average_gradients` before each optimiser step instead.
* **Architecture parameters** (Gumbel pi, DARTS alpha) are parameters of the network, so they receive the
  same averaged gradient and stay bit-identical on every rank after every step. The Gumbel noise generator
  has the same seed on every rank, so all ranks draw the same noise and, in hard mode, the same path: one
  sample per step over the global batch, exactly the single-process semantics (the alternative, noise per
  rank, would act like W Monte-Carlo samples; ``strategy.kwargs.samples`` already offers that knob).
* **Files.** Rank 0 alone writes logs, TensorBoard, ``alphas.csv``, ``metrics.json``, ``genotype.json`` and
  checkpoints (atomic). Every rank resumes from the same ``checkpoints/last.pt``.
* **Evaluation** runs on rank 0 (the chunked evaluator never holds a full distance matrix); the other ranks
  wait at a barrier.
"""
from __future__ import annotations

import datetime
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "init_distributed", "info", "is_distributed", "is_main", "rank", "world_size", "barrier",
           "broadcast_object", "average_gradients", "all_gather_cat", "all_reduce_mean", "wrap_model",
           "main_first", "shutdown"]

log = logging.getLogger("nasreid")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` in ``[0, world_size)``, ``local_rank`` on its machine, the
    process-group ``backend`` (``"gloo"`` / ``"nccl"``; ``None`` when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def init_distributed(device: str = "cpu", backend: Optional[str] = None, timeout_minutes: float = 30.0) -> DistInfo:
    """Join the process group torchrun prepared (idempotent); returns this process's :class:`DistInfo`.

    Args:
        device: the recipe's device; ``cuda`` selects NCCL and the GPU ``LOCAL_RANK``, anything else gloo.
        backend: force ``"gloo"`` or ``"nccl"``.
        timeout_minutes: collective timeout (a rank that died leaves the others waiting this long at most;
            torchrun normally tears the group down first).

    Without ``WORLD_SIZE > 1`` in the environment nothing is initialised and ``DistInfo()`` is returned.
    """
    if dist.is_available() and dist.is_initialized():
        return info()
    if _env_world() <= 1:
        return DistInfo()
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    i = info()
    log.debug("rank %d/%d joined (%s)", i.rank, i.world_size, backend)
    return i


def info() -> DistInfo:
    """This process's :class:`DistInfo` (``DistInfo()`` when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                    dist.get_backend())


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return info().enabled


def rank() -> int:
    return info().rank


def world_size() -> int:
    return info().world_size


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes files."""
    return info().rank == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


@contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. creates a folder), the others after it."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (picklable) on every rank; ``obj`` itself in a single process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Replace each ``p.grad`` by its mean over ranks (in place; ``None`` grads count as zeros and are created
    when another rank has one). One flattened all-reduce per dtype. No-op in a single process."""
    if not is_distributed():
        return
    params = list(params)
    W = world_size()
    by_dtype: dict[tuple, list[torch.Tensor]] = {}  # the grads, by (dtype, device)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for group in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat)
        flat /= W
        off = 0
        for g in group:
            n = g.numel()
            g.copy_(flat[off:off + n].view_as(g))
            off += n


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """``[N, ...]`` on every rank -> ``[W*N, ...]`` (rank order) on every rank; equal ``N`` on all ranks.
    No gradient flows through the gathered copy. ``t`` itself in a single process."""
    if not is_distributed():
        return t
    out = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out, 0)


def all_reduce_mean(values: Mapping[str, float]) -> dict[str, float]:
    """Mean over ranks of each scalar (same keys on every rank; a key missing on some rank is not allowed)."""
    if not is_distributed():
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if info().backend == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    t /= world_size()
    return {k: float(v) for k, v in zip(keys, t.cpu().tolist())}


def wrap_model(model: nn.Module, device: torch.device, find_unused_parameters: bool = True,
               sync_bn: bool = False) -> nn.Module:
    """``DistributedDataParallel(model)`` in a process group, ``model`` itself otherwise.

    The wrapper shares the module's parameters: keep using ``model`` for checkpoints and evaluation, and call
    the wrapper for the forward of training steps. DDP broadcasts rank 0's parameters and buffers at
    construction and its buffers (BN running statistics) before every forward.

    Args:
        device: the process's device (CUDA: ``device_ids=[index]``).
        find_unused_parameters: needed when a step does not use every parameter (Gumbel hard mode, a
            frozen backbone, heads used only at test time); costs one graph traversal per step.
        sync_bn: convert BatchNorm layers to ``SyncBatchNorm`` in place first (CUDA only; PyTorch's SyncBN has
            no CPU kernel).

    Raises:
        ValueError: ``sync_bn`` on a non-CUDA device.
    """
    if not is_distributed():
        return model
    if sync_bn:
        if device.type != "cuda":
            raise ValueError("distributed.sync_bn needs CUDA (PyTorch's SyncBatchNorm has no CPU implementation)")
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if converted is not model:  # the root itself was a BN layer: nothing sensible to train
            raise ValueError("sync_bn: the model's root module is a BatchNorm layer")
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def shutdown() -> None:
    """Leave the process group (end of a distributed command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
