"""Training / validation data for QAT: samples (MACE input naming) as a torch ``Dataset`` fed by a
``DataLoader`` (worker processes) through a ``DistributedSampler`` (one shard per rank)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class SampleDataset(Dataset):
    """Item ``i``: ``(feeds, label)`` with labels, else ``feeds`` -- ``feeds`` maps each input tensor name to
    one sample's array without the leading batch dimension of 1 (the collate function stacks them)."""

    def __init__(self, samples: Sequence, labels: Sequence[int] | None = None):
        if labels is not None and len(labels) != len(samples):
            raise ValueError(f"{len(labels)} labels for {len(samples)} samples")
        self.feeds = [{k: np.asarray(v, np.float32)[0] if np.ndim(v) and np.shape(v)[0] == 1
                       else np.asarray(v, np.float32) for k, v in s.feeds.items()} for s in samples]
        self.names = [getattr(s, "name", str(i)) for i, s in enumerate(samples)]
        self.labels = None if labels is None else [int(v) for v in labels]

    def __len__(self) -> int:
        return len(self.feeds)

    def __getitem__(self, i: int):
        if self.labels is None:
            return self.feeds[i]
        return self.feeds[i], self.labels[i]


def collate(items: list):
    """Stack a list of items into ``feeds`` (dict of batched tensors) or ``(feeds, labels)`` -- a tuple, which
    the trainer reads as an input/label pair.

    Args:
        items: dataset items, all ``feeds`` dicts or all ``(feeds, label)`` pairs.

    Returns:
        ``{name: tensor of shape (len(items), ...)}``, or that and a ``long`` tensor of the labels.
    """
    if isinstance(items[0], tuple):
        feeds = collate([f for f, _ in items])
        return feeds, torch.tensor([y for _, y in items], dtype=torch.long)
    return {k: torch.from_numpy(np.stack([it[k] for it in items])) for k in items[0]}


def make_loader(dataset: Dataset, *, global_batch: int, rank: int = 0, world: int = 1, shuffle: bool = True,
                seed: int = 0, workers: int = 0) -> DataLoader:
    """A loader over this rank's shard: ``DistributedSampler`` (also with one process, so the visiting order is
    the same for any number of ranks) with batches of ``global_batch / world`` samples.

    With ``world`` ranks, global step ``k`` of an epoch draws the samples ``perm[k*B:(k+1)*B]`` of the
    sampler's permutation ``perm`` (epoch-seeded), rank ``r`` the ones at positions ``r, r + world, ...``: the
    union over ranks is the one-process batch. Call ``loader.sampler.set_epoch(e)`` each epoch (the trainer
    does).

    Args:
        dataset: the samples (e.g. :class:`SampleDataset`).
        global_batch: samples per step over all ranks ``B``.
        rank: this process's rank.
        world: number of processes.
        shuffle: draw an epoch-seeded permutation (else the dataset order).
        seed: the sampler's seed.
        workers: ``DataLoader`` worker processes (0: load in this process).

    Returns:
        The loader, batches of ``global_batch // world`` samples collated by :func:`collate`.

    Raises:
        ValueError: ``global_batch`` is not a multiple of ``world``.
    """
    if global_batch % world:
        raise ValueError(f"batch size {global_batch} is not a multiple of the number of processes {world}")
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
    return DataLoader(dataset, batch_size=global_batch // world, sampler=sampler, num_workers=workers,
                      collate_fn=collate, persistent_workers=workers > 0)
