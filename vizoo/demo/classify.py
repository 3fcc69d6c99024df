"""Classification: centre crop -> model -> softmax -> top-k labels on a shaded panel."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import overlay
from .runners import Geometry, Preprocessing, center_crop


@dataclass
class Classification:
    """The top-k classes of one frame, best first."""

    ids: list[int]
    labels: list[str]
    probs: list[float]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def top_k(outputs: dict[str, np.ndarray], k: int, labels: Sequence[str] | None) -> Classification:
    """Probabilities (softmax of the logits, or the file's own probabilities) -> the best ``k``."""
    probs = np.asarray(outputs["probs"], np.float64) if "probs" in outputs else softmax(outputs["logits"])
    probs = probs.reshape(-1)
    order = np.argsort(-probs, kind="stable")[: max(1, k)]
    names = [labels[i] if labels is not None and i < len(labels) else str(i) for i in order]
    return Classification([int(i) for i in order], names, [float(probs[i]) for i in order])


class ClassifyTask:
    """What the loop needs from a task: geometry, post-processing, drawing, a printed line."""

    name = "classify"

    def __init__(self, topk: int = 3):
        if topk < 1:
            raise ValueError(f"--topk must be at least 1, got {topk}")
        self.topk = topk

    def geometry(self, bgr: np.ndarray, pre: Preprocessing) -> tuple[np.ndarray, Geometry]:
        return center_crop(bgr, pre)

    def postprocess(self, outputs: dict[str, np.ndarray], geometry: Geometry, frame_shape: tuple[int, ...],
                    labels: Sequence[str] | None) -> Classification:
        return top_k(outputs, self.topk, labels)

    def draw(self, image: np.ndarray, result: Classification) -> None:
        overlay.panel_lines(image, [f"{label} {p:.2f}" for label, p in zip(result.labels, result.probs)],
                            bars=result.probs)

    def describe(self, result: Classification) -> str:
        return ", ".join(f"{label} {p:.3f}" for label, p in zip(result.labels, result.probs))
