"""Classification metrics that add up exactly across batches and processes.

A meter keeps sums (loss, correct top-1/top-k, a confusion matrix), never averages of averages,
so the figures of a sharded evaluation under torchrun equal the single-process ones exactly.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from .distributed import DistEnv, all_reduce_sum


class ClassificationMeter:
    """Accumulates loss, top-1, top-k and the confusion matrix (rows: true class, cols: predicted)."""

    def __init__(self, num_classes: int, topk: int = 5):
        self.num_classes = num_classes
        self.topk = max(1, min(topk, num_classes))
        self.loss_sum = 0.0
        self.count = 0
        self.correct1 = 0
        self.correctk = 0
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor, loss_sum: float | None = None) -> None:
        """Add a batch: ``logits`` (B, C), integer ``target`` (B,), the batch's summed loss."""
        logits, target = logits.detach().float().cpu(), target.detach().cpu()
        top = logits.topk(self.topk, dim=1).indices
        hit = top == target[:, None]
        self.correct1 += int(hit[:, 0].sum())
        self.correctk += int(hit.any(dim=1).sum())
        self.count += int(target.numel())
        if loss_sum is not None:
            self.loss_sum += float(loss_sum)
        idx = target * self.num_classes + top[:, 0]
        self.confusion += torch.bincount(idx, minlength=self.num_classes ** 2).view(self.num_classes, -1)

    def reduce(self, env: DistEnv) -> "ClassificationMeter":
        """Sum every process's counts into every process (in place)."""
        if env.distributed:
            sums = torch.tensor([self.loss_sum, self.count, self.correct1, self.correctk], dtype=torch.float64)
            all_reduce_sum(sums, env)
            self.loss_sum = float(sums[0])
            self.count, self.correct1, self.correctk = (int(round(float(v))) for v in sums[1:])
            all_reduce_sum(self.confusion, env)
        return self

    def compute(self) -> dict[str, float]:
        n = max(self.count, 1)
        # "top5" is top-min(5, classes): with 3 classes every sample is a top-3 hit.
        return {"loss": self.loss_sum / n, "top1": 100.0 * self.correct1 / n,
                "top5": 100.0 * self.correctk / n, "num_samples": self.count}

    def per_class_accuracy(self) -> list[float | None]:
        """Recall of each class in percent (None for a class with no samples)."""
        totals = self.confusion.sum(dim=1)
        diag = self.confusion.diagonal()
        return [None if int(t) == 0 else 100.0 * float(d) / float(t) for d, t in zip(diag, totals)]


def accuracy_report(meter: ClassificationMeter, labels: Sequence[str] | None = None) -> dict[str, Any]:
    """The full evaluation record: summary metrics, per-class accuracy and the confusion matrix."""
    labels = list(labels) if labels is not None else [str(i) for i in range(meter.num_classes)]
    summary = meter.compute()
    return {
        **summary,
        "labels": labels,
        "per_class_accuracy": dict(zip(labels, meter.per_class_accuracy())),
        "confusion_matrix": meter.confusion.tolist(),
    }


def write_jsonl(path: str | os.PathLike, records: Sequence[dict[str, Any]]) -> None:
    """Rewrite the whole log atomically (the history lives in the training state, so a resumed run
    rewrites exactly the epochs it has finished, never a duplicate or a gap)."""
    from vizoo.io import write_text_atomic

    write_text_atomic(Path(path), "".join(json.dumps(r, sort_keys=False) + "\n" for r in records))


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
