"""The ``continual`` task adapter: one task of a continual-learning sequence.

Classification on one task of the bundled continual benchmark (`vizoo.data.continual`), held in
memory as tensors and normalised with the model's mean/std; no augmentation, as in CLR's recipe.
``--data continual:<task>`` names the task (``continual:proxy`` is the backbone's proxy task).
The loss is the classification loss plus ``param_norm_penalty``; `vizoo.continual.sequence`
runs one Trainer with this adapter per task.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from .config import TrainConfig
from .tasks import ClassificationTask, TaskData, classification_loss

DATA_PREFIX = "continual:"


class NormalizedTensors(Dataset):
    """(image, label) pairs from tensors in [0, 1], normalised once (the data is small)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, mean: Any, std: Any):
        c = x.shape[1]
        m = torch.tensor(list(mean)[:c], dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(list(std)[:c], dtype=torch.float32).view(1, -1, 1, 1)
        self.x = ((x - m) / s).contiguous()
        self.y = y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


@functools.lru_cache(maxsize=32)
def load_split(task: str, img_size: int, seed: int) -> Any:
    """One task's generated data (cached: the sequence runner reads each task several times)."""
    from vizoo.data import continual

    if task == "proxy":
        return continual.proxy_task(img_size=img_size, seed=seed)
    return continual.continual_tasks([task], img_size=img_size, seed=seed)[0]


def task_name(data: str) -> str:
    if not str(data).startswith(DATA_PREFIX):
        raise ValueError(f"the continual task adapter reads --data {DATA_PREFIX}<task> (e.g. continual:digits_0_4), "
                         f"not {data!r}")
    return str(data)[len(DATA_PREFIX):]


class ContinualTask(ClassificationTask):
    """Classification on one continual task's tensors (see the module docstring)."""

    name = "continual"

    def load_data(self, cfg: TrainConfig, splits: tuple[str, ...] = ("train", "val"),
                  labels: list[str] | None = None) -> TaskData:
        split = load_split(task_name(cfg.data), int(cfg.img_size or 32), int(cfg.split_seed))
        self.labels = list(split.classes)
        if labels is not None and list(labels) != self.labels:
            raise ValueError(f"the model's classes {list(labels)[:8]} are not task {split.name}'s {self.labels[:8]}")
        return TaskData(splits={s: getattr(split, s) for s in splits}, labels=self.labels, source=cfg.data)

    def attach_transforms(self, cfg: TrainConfig, data: TaskData, model: nn.Module) -> None:
        pcfg = dict(getattr(model, "pretrained_cfg", None) or {})
        mean, std = pcfg.get("mean", (0.0,) * 3), pcfg.get("std", (1.0,) * 3)
        for split, (x, y) in list(data.splits.items()):
            data.splits[split] = NormalizedTensors(x, y, mean, std)
        size = int(cfg.img_size or 32)
        model.pretrained_cfg = {**pcfg, "input_size": [3, size, size], "crop_pct": 1.0}
        self.train_loss_fn = classification_loss(cfg)
