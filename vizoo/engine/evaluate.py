"""Evaluate a classifier: top-1/top-5, per-class accuracy, confusion matrix (JSON + PNG).

Preprocessing comes from the checkpoint (its sidecar stores the input size, mean and std the
model was trained with), and class folders are mapped to the checkpoint's label order, so a
folder evaluated here is scored exactly as the training run scored its val split.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .config import TrainConfig
from .distributed import DistEnv, resolve_device
from .metrics import accuracy_report
from .tasks import ClassificationTask


def _load(model_or_checkpoint: nn.Module | str | os.PathLike, name: str | None) -> tuple[nn.Module, str]:
    if isinstance(model_or_checkpoint, nn.Module):
        return model_or_checkpoint, ""
    from vizoo.hub import load_model

    path = Path(model_or_checkpoint)
    if path.is_dir():  # a run directory: its best checkpoint
        path = path / "best.safetensors"
    return load_model(path, name=name), str(path)


@torch.no_grad()
def evaluate(model_or_checkpoint: nn.Module | str | os.PathLike, data: str | os.PathLike = "digits", *,
             split: str = "val", name: str | None = None, img_size: int | None = None, batch_size: int = 128,
             num_workers: int = 0, val_fraction: float = 0.2, split_seed: int = 0, device: str = "auto",
             amp: str = "none", out_dir: str | os.PathLike | None = None, progress: bool = False) -> dict[str, Any]:
    """Score a model (or a checkpoint file / run directory) on ``data``'s ``split``.

    Returns ``top1``, ``top5``, ``loss``, ``num_samples``, ``per_class_accuracy`` (label -> %),
    ``confusion_matrix`` (rows: true class) and ``labels``; with ``out_dir``, also writes
    ``eval.json`` and ``confusion_matrix.png`` there.
    """
    model, ckpt = _load(model_or_checkpoint, name)
    pcfg = dict(getattr(model, "pretrained_cfg", None) or {})
    input_size = pcfg.get("input_size") or [3, 224, 224]
    labels = getattr(model, "labels", None)
    num_classes = getattr(model, "num_classes", None)
    cfg = TrainConfig(model=getattr(model, "vizoo_name", "") or name or "model", data=str(data),
                      img_size=img_size or int(input_size[-1]), in_chans=int(input_size[0]),
                      val_fraction=val_fraction, split_seed=split_seed, crop_pct=pcfg.get("crop_pct"),
                      eval_batch_size=batch_size, amp=amp)
    task = ClassificationTask(cfg)
    task_data = task.load_data(cfg, splits=(split,), labels=labels)
    if num_classes is not None and task_data.num_classes is not None and num_classes < task_data.num_classes:
        raise ValueError(f"the model has {num_classes} outputs but {data} has {task_data.num_classes} classes")
    if labels is None and num_classes is not None and num_classes != task_data.num_classes:
        raise ValueError(f"the model has {num_classes} outputs but {data} has {task_data.num_classes} classes, "
                         "and the checkpoint names no labels to map them")
    task.attach_transforms(cfg, task_data, model)
    task.labels = list(labels) if labels is not None else task_data.labels

    meter = run_eval_loop(task, model, task_data.splits[split], batch_size, num_workers, amp, device,
                          progress, desc=f"eval {split}")
    report = accuracy_report(meter, task.labels)
    report.update({"model": cfg.model, "checkpoint": ckpt, "data": str(data), "split": split,
                   "input_size": list(model.pretrained_cfg["input_size"])})
    if out_dir is not None:
        from vizoo.io import write_json_atomic

        from .plots import plot_confusion_matrix

        out = Path(out_dir)
        write_json_atomic(out / "eval.json", report)
        plot_confusion_matrix(report["confusion_matrix"], report["labels"], out / "confusion_matrix.png",
                              title=f"{cfg.model} on {Path(str(data)).name} ({split}): top-1 {report['top1']:.2f}%")
        report["files"] = [str(out / "eval.json"), str(out / "confusion_matrix.png")]
    return report


def run_eval_loop(task: Any, model: torch.nn.Module, dataset: Any, batch_size: int, num_workers: int,
                  amp: str | None, device: str | None, progress: bool, desc: str = "eval") -> Any:
    """One pass of ``task.eval_step`` over ``dataset`` outside a Trainer: the task's meter, reduced.

    Shared by ``vizoo eval`` for every task, so evaluation outside training batches, casts and
    reduces exactly as the Trainer's validation does.
    """
    from tqdm import tqdm

    from vizoo.data.loaders import eval_loader

    dev = resolve_device(device)
    model.to(dev).eval()
    loader = eval_loader(dataset, batch_size, num_workers=num_workers, collate_fn=task.collate_fn)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if amp == "bf16" else contextlib.nullcontext()
    meter = task.new_meter()
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
        batch = task.to_device(batch, dev)
        with autocast:
            task.eval_step(model, batch, meter)
    meter.reduce(DistEnv())
    return meter
