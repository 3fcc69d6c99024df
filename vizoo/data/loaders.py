"""Datasets by name and data loaders whose order is a pure function of (seed, epoch, position).

That property is what makes resuming exact: a run killed mid-epoch and resumed sees the same
remaining batches, with the same augmentation draws, as a run that was never stopped, and a
``torchrun`` job with W processes of batch B sees exactly the global batches of one process
with batch W*B (each process takes every W-th sample of the same global batch).
"""
from __future__ import annotations

import contextlib
import os
import random
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from .digits import DigitsDataset
from .folder import DatasetError, image_folder_splits

BUNDLED = ("digits",)


def build_datasets(data: str | os.PathLike, *, img_size: int = 32, in_chans: int = 3,
                   val_fraction: float = 0.2, split_seed: int = 0, classes: Sequence[str] | None = None,
                   verify: bool = True, splits: Sequence[str] = ("train", "val")) -> dict[str, Any]:
    """Raw ``(PIL image, label)`` datasets of ``data`` (``digits`` or a folder), by split name.

    The returned dict also holds ``"classes"``: the label names in class-index order.
    """
    if str(data) == "digits":
        out: dict[str, Any] = {s: DigitsDataset(s, img_size=img_size, in_chans=in_chans,
                                                val_fraction=val_fraction, split_seed=split_seed)
                               for s in splits}
        out["classes"] = list(DigitsDataset.classes)
        if classes is not None and list(classes) != out["classes"]:
            raise DatasetError(f"the model's classes {list(classes)[:12]} are not the digits 0-9")
        return out
    found = image_folder_splits(data, val_fraction=val_fraction, split_seed=split_seed,
                                classes=classes, verify=verify)
    missing = [s for s in splits if s not in found]
    if missing:
        raise DatasetError(f"{data} has no {missing[0]!r} split (it holds only {sorted(found)})")
    out = {s: found[s] for s in splits}
    out["classes"] = found[splits[0]].classes
    for s in splits:
        if len(found[s]) == 0:
            raise DatasetError(f"the {s} split of {data} is empty; add images or lower val_fraction")
    return out


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 0x9E3779B1 + epoch * 0x85EBCA77 + index * 0xC2B2AE3D + 0x27D4EB2F) % (2 ** 32)


@contextlib.contextmanager
def seeded_sample(seed: int, epoch: int, index: int, numpy: bool = False) -> Iterator[None]:
    """Seed the random streams that timm/torchvision transforms draw from (torch's default
    generator, ``random``, optionally NumPy's) for one sample, by (seed, epoch, index): the same
    augmentation whatever the worker count or resume point. In the main process the streams are
    put back afterwards (dropout and the rest of training keep their own sequence)."""
    s = _sample_seed(seed, epoch, index)
    gen = torch.default_generator
    in_main = get_worker_info() is None
    saved = (gen.get_state(), random.getstate(), np.random.get_state() if numpy else None) if in_main else None
    gen.manual_seed(s)
    random.seed(s)
    if numpy:
        np.random.seed(s)
    try:
        yield
    finally:
        if saved is not None:
            gen.set_state(saved[0])
            random.setstate(saved[1])
            if saved[2] is not None:
                np.random.set_state(saved[2])


class TransformedDataset(Dataset):
    """Applies a transform; with ``seed`` set, every random draw of the transform is seeded by
    (seed, epoch, index), so augmentation does not depend on worker count or resume point.

    timm/torchvision transforms draw from Python's ``random`` and torch's default generator;
    NumPy's global generator only in RandAugment/AugMix, so it is seeded only when
    ``seed_numpy`` is set (saving/restoring it costs ~0.15 ms a sample). In the main process
    the states are restored afterwards (model dropout and Mixup keep their own streams).
    """

    def __init__(self, base: Dataset, transform: Callable, seed: int | None = None, cache: bool = False,
                 seed_numpy: bool = False):
        self.base = base
        self.transform = transform
        self.seed = seed
        self.seed_numpy = seed_numpy
        self.epoch = 0
        # A deterministic transform (no augmentation) of a small dataset is computed once.
        self._cache: dict[int, Any] | None = {} if cache and seed is None else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        img, target = self.base[i]
        if self.seed is None:
            item = self.transform(img), target
            if self._cache is not None:
                self._cache[i] = item
            return item
        with seeded_sample(self.seed, self.epoch, i, numpy=self.seed_numpy):
            return self.transform(img), target


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of one process: a permutation fixed by (seed, epoch), cut into global batches of
    ``global_batch_size``; process ``rank`` of ``world_size`` takes every ``world_size``-th sample
    of each. ``start_batch`` skips batches already trained (resume), ``drop_last`` drops a last
    global batch that is not full (the default for training, as in timm)."""

    def __init__(self, num_samples: int, global_batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True):
        if global_batch_size % world_size:
            raise ValueError(f"batch size {global_batch_size} is not divisible by the {world_size} processes; "
                             "--batch-size is the global batch (all processes together)")
        if num_samples < max(world_size, 1):
            raise DatasetError(f"the training set has {num_samples} samples, fewer than the {world_size} "
                               "processes; every process needs at least one")
        if drop_last and num_samples < global_batch_size:
            drop_last = False  # a tiny dataset still trains: one short batch per epoch
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        """Batches in a whole epoch (not counting ``start_batch``)."""
        n, b = self.num_samples, self.global_batch_size
        return n // b if self.drop_last else -(-n // b)

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        b = self.global_batch_size
        for j in range(self.start_batch, len(self)):
            batch = order[j * b:(j + 1) * b]
            shard = batch[self.rank::self.world_size]
            if shard:
                yield shard


class ShardSampler(Sampler[int]):
    """Evaluation: every sample exactly once across processes, no padding (exact metrics)."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, num_samples, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


def train_loader(dataset: Dataset, global_batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, drop_last: bool = True,
                 collate_fn: Callable | None = None, pin_memory: bool = False) -> DataLoader:
    """Loader over an `EpochBatchSampler`; call ``loader.batch_sampler.set_epoch(e, start)`` per epoch."""
    sampler = EpochBatchSampler(len(dataset), global_batch_size, shuffle=True, seed=seed, rank=rank,
                                world_size=world_size, drop_last=drop_last)
    # A private generator: creating the iterator must not consume the global RNG, or a resumed
    # run (iterator created mid-epoch) would draw different dropout masks than an unbroken one.
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_fn,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed),
                      persistent_workers=False)


def eval_loader(dataset: Dataset, batch_size: int, *, rank: int = 0, world_size: int = 1,
                num_workers: int = 0, collate_fn: Callable | None = None,
                pin_memory: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank, world_size),
                      num_workers=num_workers, collate_fn=collate_fn, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(0))
