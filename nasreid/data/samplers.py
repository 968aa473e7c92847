"""Identity (PK) sampling for metric learning.

PK sampling: each mini-batch holds P identities × K images each (Hermans, Beyer & Leibe, "In Defense of the
Triplet Loss for Person Re-Identification", arXiv:1703.07737, 2017); batch-hard triplet losses need it.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

__all__ = ["PKSampler"]


class PKSampler(Sampler[int]):
    """Yield dataset indices so that every consecutive ``batch_size`` chunk holds P ids × K images.

    Per epoch, each identity's indices are shuffled (drawn with replacement up to K when it has fewer than K
    images) and cut into chunks of K (an incomplete trailing chunk is dropped); batches are then formed by
    drawing P distinct identities that still have chunks, until fewer than P remain. The order is a pure function
    of ``(seed, epoch)``; call :meth:`set_epoch` each epoch for a new order. ``len(sampler)`` is the exact number of
    indices of the current epoch (a multiple of ``batch_size``), so use the loader with ``drop_last=True`` or not —
    both give full batches.

    Args:
        pids: identity label of every dataset item, ``len(pids) == len(dataset)``.
        num_instances: K, images per identity in a batch (>= 1).
        batch_size: P × K (must be divisible by K).
        seed: base seed.
        num_replicas, rank: data-parallel share (``torchrun``; see :mod:`nasreid.engine.distributed`). Every
            replica computes the same global order; replica ``rank`` yields, of each global batch, the
            identities at slots ``rank, rank + W, ...`` (P/W identities x K images, ``batch_size / W`` indices
            per step). The replicas' identities are disjoint within each step, every index of the epoch goes to
            exactly one replica, and concatenating the replicas' step-t batches gives the single-process batch
            t (as a set). ``len(sampler)`` is this replica's count.

    Raises:
        ValueError: ``batch_size`` not a positive multiple of ``num_instances``, fewer than P distinct ids, or P
            not a multiple of ``num_replicas`` (names ``data.batch_size``).
    """

    def __init__(self, pids: Sequence[int], num_instances: int, batch_size: int, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0):
        if num_instances < 1:
            raise ValueError(f"num_instances (K) must be >= 1, got {num_instances}")
        if batch_size < num_instances or batch_size % num_instances:
            raise ValueError(
                f"batch_size must be a positive multiple of num_instances (P*K): batch_size={batch_size}, "
                f"num_instances={num_instances}"
            )
        self.num_instances = int(num_instances)
        self.batch_size = int(batch_size)
        self.num_pids_per_batch = self.batch_size // self.num_instances
        self.seed = int(seed)
        self.epoch = 0
        index_dic: dict[int, list[int]] = defaultdict(list)
        for i, pid in enumerate(pids):
            index_dic[int(pid)].append(i)
        self.index_dic = dict(sorted(index_dic.items()))
        self.pids = list(self.index_dic)
        if len(self.pids) < self.num_pids_per_batch:
            raise ValueError(
                f"PKSampler needs at least P={self.num_pids_per_batch} identities "
                f"(batch_size={batch_size} / num_instances={num_instances}), got {len(self.pids)}"
            )
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} must be in [0, num_replicas={num_replicas})")
        if self.num_pids_per_batch % num_replicas:
            raise ValueError(
                f"data.batch_size: P = batch_size / num_instances = {self.num_pids_per_batch} identities per global "
                f"batch must be a multiple of the {num_replicas} processes (each process takes P / W of them)")
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self._cache: tuple[int, list[int]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order is produced next (deterministic per ``(seed, epoch)``)."""
        self.epoch = int(epoch)

    def _indices(self) -> list[int]:
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, self.epoch])
        K, P = self.num_instances, self.num_pids_per_batch
        chunks: dict[int, list[list[int]]] = {}
        for pid, idxs in self.index_dic.items():
            arr = np.asarray(idxs)
            if len(arr) < K:
                arr = rng.choice(arr, size=K, replace=True)
            else:
                arr = rng.permutation(arr)
            n = len(arr) // K
            chunks[pid] = [arr[j * K:(j + 1) * K].tolist() for j in range(n)]
        available = [pid for pid in self.pids if chunks[pid]]
        out: list[int] = []
        while len(available) >= P:
            chosen = rng.choice(len(available), size=P, replace=False)
            for j in chosen:
                out.extend(chunks[available[j]].pop())
            available = [pid for pid in available if chunks[pid]]
        self._cache = (self.epoch, out)
        return out

    def _shard(self) -> list[int]:
        out = self._indices()
        W = self.num_replicas
        if W == 1:
            return out
        K, B = self.num_instances, self.batch_size
        mine: list[int] = []
        for b in range(0, len(out), B):
            for j in range(self.rank, B // K, W):  # identity slots rank, rank + W, ...
                mine.extend(out[b + j * K:b + (j + 1) * K])
        return mine

    def __iter__(self) -> Iterator[int]:
        return iter(self._shard())

    def __len__(self) -> int:
        return len(self._indices()) // self.num_replicas
