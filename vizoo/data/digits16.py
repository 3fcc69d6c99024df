"""The bundled digits at 16x16 in [-1, 1]: the training data of the diffusion benchmark.

A diffusion UNet models pixels directly, so the data are tensors scaled to [-1, 1] (DDPM's
convention, mean 0.5 / std 0.5 of [0, 1] images), not PIL images through a transform. The
train/val split is the classification split of `vizoo.data.digits` (stratified, ``split_seed``),
so a digit classifier and a diffusion model trained on "train" never saw the same "val" images.
"""
from __future__ import annotations

import torch

from .digits import DIGIT_LABELS, digits_split_tensors

IMG_SIZE = 16
#: ``--data`` name of this dataset
DATA_NAME = "digits16"


def digits16(split: str = "train", val_fraction: float = 0.2, split_seed: int = 0,
             img_size: int = IMG_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [N, 1, S, S] in [-1, 1], labels [N])`` of one split (train, val or all)."""
    x, y = digits_split_tensors(split, img_size=img_size, in_chans=1, val_fraction=val_fraction,
                                split_seed=split_seed)
    return x.mul(2.0).sub(1.0).contiguous(), y.long()


def class_names() -> list[str]:
    return list(DIGIT_LABELS)
