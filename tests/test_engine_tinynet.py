"""A tiny registered CNN for the engine tests (importable by subprocesses with ``--imports``),
and checks of the pieces the Trainer builds from it (freezing, frozen-norm detection)."""
from __future__ import annotations

import torch
import torch.nn as nn

from vizoo.registry import register_model


class TinyNet(nn.Module):
    """conv-BN-ReLU, conv-ReLU, global pool, linear head: enough to learn digits in seconds."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 16, use_bn: bool = True,
                 drop_rate: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, width, 3, padding=1, bias=not use_bn)
        self.bn1 = nn.BatchNorm2d(width) if use_bn else nn.Identity()
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(2 * width, num_classes)
        self.progress_seen: list[float] = []

    def on_train_step(self, epoch_progress: float) -> None:
        self.progress_seen.append(epoch_progress)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x)).mean((2, 3))
        return self.head(self.drop(x))


if "engine_tinynet" not in __import__("vizoo.registry", fromlist=["_entrypoints"])._entrypoints:
    @register_model
    def engine_tinynet(**kwargs) -> TinyNet:
        return TinyNet(**kwargs)
