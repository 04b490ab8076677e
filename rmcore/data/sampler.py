"""Sampling: each rank's micro-batches of dataset indices, disjoint across ranks, deterministic from the seed,
resumable from a saved position."""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np


class ShardedSampler:
    """Yields this rank's micro-batches (lists of dataset indices) for one epoch at a time.

    Each epoch shuffles all indices with a generator seeded by (seed, epoch), cuts them into global batches of
    batch_size * world_size, and gives rank r the r-th slice of each: the ranks' shards are disjoint and together
    cover the whole split. The last global batch may be short; it is split as evenly as possible, so a rank may
    get a smaller (even empty) last batch — the losses divide by global counts, so the math is unaffected.
    With group_by_length, indices are sorted by length within windows of 64 global batches and the batches
    of a window are shuffled again: batches hold similar lengths, the order stays random.
    The position (epoch, batches taken) is saved with state_dict() and restored by load_state_dict().
    """

    def __init__(self, n: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, lengths: np.ndarray | None = None, window: int = 64):
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.shuffle, self.lengths, self.window = seed, shuffle, lengths, window
        self.epoch, self.taken = 0, 0

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        g = self.batch_size * self.world_size
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
        if self.lengths is not None:
            rng = np.random.default_rng([self.seed, epoch, 1])
            batches = []
            for w in range(0, self.n, g * self.window):
                chunk = order[w:w + g * self.window]
                chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                part = [chunk[i:i + g] for i in range(0, len(chunk), g)]
                batches += [part[i] for i in (rng.permutation(len(part)) if self.shuffle else range(len(part)))]
            return batches
        return [order[i:i + g] for i in range(0, self.n, g)]

    def __len__(self):
        return math.ceil(self.n / (self.batch_size * self.world_size))

    def _shard(self, batch: np.ndarray) -> list[int]:
        m = len(batch)
        lo, hi = self.rank * m // self.world_size, (self.rank + 1) * m // self.world_size
        return batch[lo:hi].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        """The rest of the current epoch; the next iteration starts the next epoch."""
        batches = self.global_batches(self.epoch)
        while self.taken < len(batches):
            batch = self._shard(batches[self.taken])
            self.taken += 1
            yield batch
        self.epoch, self.taken = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "taken": self.taken, "seed": self.seed, "n": self.n,
                "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict):
        for key in ("seed", "n", "batch_size", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume the data position: saved {key}={state[key]}, this run has "
                                 f"{getattr(self, key)}")
        self.epoch, self.taken = state["epoch"], state["taken"]
