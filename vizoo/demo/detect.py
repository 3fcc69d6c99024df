"""Detection: letterbox -> model -> top-k over the raw (query, class) scores above a threshold ->
boxes mapped back to the frame, drawn with their labels and scores.

Like the zoo's query-based detectors (StageInteractor ``predict``), there is no NMS: each query
predicts one object, so the best (query, class) pairs are the detections.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import overlay
from .runners import Geometry, Preprocessing, letterbox


@dataclass
class Detection:
    """One object: class, label, score and ``x0, y0, x1, y1`` in frame pixels."""

    class_id: int
    label: str
    score: float
    box: tuple[float, float, float, float]


def top_detections(scores: np.ndarray, boxes: np.ndarray, geometry: Geometry, frame_shape: tuple[int, ...],
                   k: int, threshold: float, labels: Sequence[str] | None) -> list[Detection]:
    """Top ``k`` of ``scores [1, N, C]`` (sigmoid) over all (query, class) pairs with score >=
    ``threshold``; the query's box of ``boxes [1, N, 4]`` (input pixels) mapped to the frame."""
    s = np.asarray(scores, np.float32).reshape(-1)
    n_classes = np.asarray(scores).shape[-1]
    k = min(max(1, k), s.size)
    best = np.argpartition(-s, k - 1)[:k]
    best = best[np.argsort(-s[best], kind="stable")]
    best = best[s[best] >= threshold]
    queries, classes = best // n_classes, best % n_classes
    frame_boxes = geometry.to_frame(np.asarray(boxes, np.float32).reshape(-1, 4)[queries])
    h, w = frame_shape[:2]
    frame_boxes[:, 0::2] = frame_boxes[:, 0::2].clip(0, w - 1)
    frame_boxes[:, 1::2] = frame_boxes[:, 1::2].clip(0, h - 1)
    return [Detection(int(c), labels[c] if labels is not None and c < len(labels) else str(int(c)),
                      float(s[i]), tuple(float(v) for v in b))  # type: ignore[arg-type]
            for i, c, b in zip(best, classes, frame_boxes)]


class DetectTask:
    """What the loop needs from a task: geometry, post-processing, drawing, a printed line."""

    name = "detect"

    def __init__(self, topk: int = 20, threshold: float = 0.3):
        if topk < 1:
            raise ValueError(f"--topk must be at least 1, got {topk}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"--score-threshold must be in [0, 1], got {threshold}")
        self.topk = topk
        self.threshold = threshold

    def geometry(self, bgr: np.ndarray, pre: Preprocessing) -> tuple[np.ndarray, Geometry]:
        return letterbox(bgr, pre)

    def postprocess(self, outputs: dict[str, np.ndarray], geometry: Geometry, frame_shape: tuple[int, ...],
                    labels: Sequence[str] | None) -> list[Detection]:
        return top_detections(outputs["scores"], outputs["boxes"], geometry, frame_shape, self.topk,
                              self.threshold, labels)

    def draw(self, image: np.ndarray, result: list[Detection]) -> None:
        for d in reversed(result):   # the best box drawn last, on top
            overlay.draw_box(image, d.box, f"{d.label} {d.score:.2f}", overlay.class_colour(d.class_id))

    def describe(self, result: list[Detection]) -> str:
        if not result:
            return "no detection"
        return "; ".join(f"{d.label} {d.score:.2f} [{', '.join(f'{v:.0f}' for v in d.box)}]" for d in result)
