"""Figures of a run: training curves, the confusion matrix, detections (matplotlib, no display needed)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig: Any, path: str | os.PathLike) -> Path:
    """Lay out, write atomically (a crash never leaves half a PNG) and free the figure."""
    from vizoo.io import atomic_path

    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    _pyplot().close(fig)
    return path


def plot_training_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Loss (train, val), accuracy (top-1, top-5) and learning rate against epochs."""

    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r.get("train_loss") for r in history], "o-", label="train loss")
    if any(r.get("val_loss") is not None for r in history):
        ax_loss.plot(epochs, [r.get("val_loss") for r in history], "o-", label="val loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    ax_loss.grid(alpha=0.3)
    ax_lr = ax_loss.twinx()
    ax_lr.plot(epochs, [r.get("lr") for r in history], ":", color="grey", label="lr")
    ax_lr.set_ylabel("learning rate (dotted)")
    ax_loss.legend(loc="upper right")
    for key, style in (("val_top1", "o-"), ("val_top5", "s--")):
        if any(r.get(key) is not None for r in history):
            ax_acc.plot(epochs, [r.get(key) for r in history], style, label=key.replace("_", " "))
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.grid(alpha=0.3)
    if ax_acc.lines:  # no accuracy in a detection run's history
        ax_acc.legend(loc="lower right")
    if title:
        fig.suptitle(title)
    return _save_png(fig, path)


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], labels: Sequence[str], path: str | os.PathLike,
                          title: str = "") -> Path:
    """Row-normalised confusion matrix (rows: true class); counts written in cells up to 30 classes."""
    import numpy as np


    plt = _pyplot()
    m = np.asarray(matrix, dtype=np.float64)
    rows = m.sum(axis=1, keepdims=True)
    norm = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    n = len(labels)
    side = min(max(4.0, 0.45 * n + 2), 20.0)
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    if n <= 50:
        ax.set_xticks(range(n), labels=list(labels), rotation=90 if n > 10 else 0)
        ax.set_yticks(range(n), labels=list(labels))
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    return _save_png(fig, path)


def plot_detections(samples: Sequence[dict[str, Any]], labels: Sequence[str], path: str | os.PathLike,
                    score_threshold: float = 0.3, title: str = "", columns: int = 4) -> Path:
    """A grid of images with ground-truth boxes (dashed white) and predictions scoring at least
    ``score_threshold`` (solid, one colour per class, "label score" written on the box).

    ``samples[i]``: ``image`` (H, W, 3) uint8, ``gt_boxes`` / ``boxes`` xyxy pixels of that image,
    ``gt_labels`` / ``labels`` class indices into ``labels``, ``scores``; optional ``name``.
    Drawing GT and predictions on one image shows misses, duplicates and wrong classes at a glance.
    """
    import numpy as np
    from matplotlib.patches import Rectangle

    plt = _pyplot()
    n = max(len(samples), 1)
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax in axes.ravel():
        ax.axis("off")
    for ax, s in zip(axes.ravel(), samples):
        ax.imshow(np.asarray(s["image"]))
        for (x0, y0, x1, y1), c in zip(s.get("gt_boxes", []), s.get("gt_labels", [])):
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linewidth=1.2,
                                   linestyle="--"))
            name = labels[int(c)] if 0 <= int(c) < len(labels) else str(int(c))
            ax.text(x0, y1, name, fontsize=5, color="white", va="top",
                    bbox={"facecolor": "black", "alpha": 0.5, "pad": 0.3, "linewidth": 0})
        shown = 0
        for (x0, y0, x1, y1), score, c in zip(s.get("boxes", []), s.get("scores", []), s.get("labels", [])):
            if score < score_threshold:
                continue
            colour = colours(int(c) % 10)
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.5))
            name = labels[int(c)] if 0 <= int(c) < len(labels) else str(int(c))
            ax.text(x0, y0, f"{name} {score:.2f}", fontsize=6, color="white", va="bottom",
                    bbox={"facecolor": colour, "alpha": 0.8, "pad": 0.5, "linewidth": 0})
            shown += 1
        ax.set_title(f"{s.get('name', '')} {len(s.get('gt_boxes', []))} GT / {shown} pred".strip(), fontsize=8)
    fig.suptitle((title + "\n" if title else "") + f"dashed: ground truth; solid: predictions with score "
                 f">= {score_threshold:g}", fontsize=9)
    return _save_png(fig, path)
