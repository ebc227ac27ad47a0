"""Deterministic batch order, so a resumed run sees exactly the batches the killed run would have."""

from __future__ import annotations

import torch

from ldm_cli.errors import DataError
from ldm_cli.training.distributed import DistInfo


class EpochBatches:
    """Epoch `e` shuffles with `seed + e`; each global batch is split between the processes."""

    def __init__(self, num_items: int, batch_size: int, seed: int, dist: DistInfo = DistInfo(), shuffle: bool = True) -> None:
        self.num_items, self.batch_size, self.seed, self.dist, self.shuffle = num_items, batch_size, seed, dist, shuffle
        self.global_batch = batch_size * dist.world_size
        if num_items < self.global_batch:
            raise DataError(
                f"the dataset has {num_items} items but one batch needs {self.global_batch}; lower train.batch_size"
            )

    def __len__(self) -> int:
        return self.num_items // self.global_batch  # the last, incomplete batch is dropped

    def epoch(self, epoch: int) -> list[list[int]]:
        """This process's batches of `epoch`, as lists of item indices."""
        if self.shuffle:
            order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(self.num_items))
        start = self.dist.rank * self.batch_size
        return [
            order[k * self.global_batch + start : k * self.global_batch + start + self.batch_size]
            for k in range(len(self))
        ]
