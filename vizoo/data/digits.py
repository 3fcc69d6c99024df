"""The bundled default dataset: scikit-learn's 1,797 real handwritten digits as PIL images.

Images come from :func:`vizoo.data.bundled.digits_arrays` (resized once, bilinear) and are stored
as 8-bit images, which is what a camera or a file gives an exported model; the model's own
transform (timm) then normalises them. The train/val split is stratified and fixed by
``split_seed``, independent of the training seed, so every run evaluates on the same images.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .bundled import digits_arrays

_cached_digits = functools.lru_cache(maxsize=4)(digits_arrays)  # train and val splits share one load

DIGIT_LABELS = tuple(str(i) for i in range(10))


def stratified_split(targets: np.ndarray | list[int], val_fraction: float,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train and val indices with ``val_fraction`` of each class in val (at least one per class)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = max(1, int(round(len(idx) * val_fraction))) if len(idx) > 1 else 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def digits_split_tensors(split: str = "val", img_size: int = 32, in_chans: int = 1, val_fraction: float = 0.2,
                         split_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One split as (N, in_chans, S, S) in [0, 1] and labels: the very images `DigitsDataset`
    holds for that split (e.g. to verify an exported file on the held-out digits)."""
    ds = DigitsDataset(split, img_size, 1, val_fraction, split_seed)
    x = torch.from_numpy(ds._pixels).float().div(255).unsqueeze(1).expand(-1, in_chans, -1, -1)
    return x.contiguous(), torch.tensor(ds.targets)


class DigitsDataset(Dataset):
    """``(PIL image, label)`` pairs of one split of the digits (``split`` in train/val/all)."""

    classes = list(DIGIT_LABELS)

    def __init__(self, split: str = "train", img_size: int = 32, in_chans: int = 1,
                 val_fraction: float = 0.2, split_seed: int = 0):
        if split not in ("train", "val", "all"):
            raise ValueError(f"digits split must be train, val or all, not {split!r}")
        x, y = _cached_digits(img_size, 1)
        if split == "all":
            keep = np.arange(len(y))
        else:
            train_idx, val_idx = stratified_split(y.numpy(), val_fraction, split_seed)
            keep = train_idx if split == "train" else val_idx
        pixels = (x[keep, 0] * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
        self._pixels = pixels  # (N, S, S) uint8: grey; RGB copies are made per item
        self.targets = [int(t) for t in y[keep]]
        self.indices = keep
        self.mode = "L" if in_chans == 1 else "RGB"
        self.split = split

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        img = Image.fromarray(self._pixels[i])  # uint8 (S, S) -> mode "L"
        if self.mode != "L":
            img = img.convert(self.mode)
        return img, self.targets[i]

    def __repr__(self) -> str:
        return f"DigitsDataset(split={self.split!r}, n={len(self)}, size={self._pixels.shape[-1]})"
