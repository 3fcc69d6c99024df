"""COCO box AP: the detection metric, computed by the COCO evaluator itself, never re-implemented.

Why a library: AP's details (101-point interpolation, crowd regions, area ranges, max 100
detections per image) decide the number, and papers report the reference evaluator's. We use
faster-coco-eval (its C++ port, same figures) and fall back to pycocotools if that is what is
installed. Its printed summary is captured so training logs stay ours.

`DetectionMeter` is the engine's evaluation meter for detection: it collects detections per
image during a (possibly sharded) evaluation, gathers them across processes, and scores once.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .distributed import DistEnv, all_gather_objects

METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
_STAT_INDEX = {"AP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5, "AR100": 8}


def _backend():
    """(COCO, COCOeval) classes of the installed evaluator."""
    try:
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    except ImportError:
        pass
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    except ImportError:
        raise ImportError("COCO evaluation needs faster-coco-eval (`pip install 'faster-coco-eval>=1.6'`) "
                          "or pycocotools") from None


def _ground_truth(gt: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(gt, Mapping):
        data = copy.deepcopy(dict(gt))  # the evaluator adds fields to what it is given
    else:
        from vizoo.data.coco import load_coco_json

        data = load_coco_json(gt)
    data.setdefault("info", {})
    data.setdefault("licenses", [])
    data.setdefault("annotations", [])
    for a in data["annotations"]:
        a.setdefault("iscrowd", 0)
        a.setdefault("area", float(a["bbox"][2] * a["bbox"][3]))
    return data


def _clean(d: Mapping[str, Any]) -> dict[str, Any]:
    return {"image_id": int(d["image_id"]), "category_id": int(d["category_id"]),
            "bbox": [float(v) for v in d["bbox"]], "score": float(d["score"])}


def coco_evaluate(gt_ann_file_or_dict: str | os.PathLike | Mapping[str, Any],
                  detections: Sequence[Mapping[str, Any]], out_json: str | os.PathLike | None = None,
                  image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """Box AP of ``detections`` (``image_id``, ``category_id``, ``bbox`` xywh, ``score``).

    Returns AP (0.50:0.95), AP50, AP75, APs/APm/APl (by area) and AR100 in [0, 1]; a figure
    with no ground truth to measure (e.g. APl when no object is large) is NaN, as COCO's -1 is
    not a score. ``image_ids`` limits scoring to those images (those actually evaluated). With
    ``out_json`` the results file is written first (atomically), as COCO's servers take it.
    """
    dets = [_clean(d) for d in detections]
    if out_json is not None:
        from vizoo.io import write_text_atomic

        write_text_atomic(Path(out_json), json.dumps(dets))
    gt = _ground_truth(gt_ann_file_or_dict)
    known = {int(im["id"]) for im in gt["images"]}
    stray = sorted({d["image_id"] for d in dets} - known)
    if stray:
        raise ValueError(f"{len(stray)} detection image ids are not in the ground truth (e.g. {stray[:5]}); "
                         "detections must use the COCO image ids")
    if not dets:
        return {k: 0.0 for k in METRIC_KEYS}
    COCO, COCOeval = _backend()
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()  # filled by hand: pycocotools' constructor takes only a file name
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted({int(i) for i in image_ids})
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float(s) for s in ev.stats]
    return {k: (math.nan if stats[i] < 0 else stats[i]) for k, i in _STAT_INDEX.items()}


class DetectionMeter:
    """Collects per-image detections during evaluation and scores them with `coco_evaluate`.

    ``ground_truth``: COCO json path or dict to score against (e.g. ``CocoDetection.ground_truth()``);
    ``cat_ids``: contiguous class index -> COCO category id (``CocoDetection.cat_ids``). Only the
    images seen by ``update`` are scored, so a partial evaluation is not penalised for the rest.
    """

    def __init__(self, ground_truth: str | os.PathLike | Mapping[str, Any], cat_ids: Sequence[int],
                 out_json: str | os.PathLike | None = None):
        self.ground_truth = ground_truth
        self.cat_ids = [int(c) for c in cat_ids]
        self.out_json = out_json
        self.detections: dict[int, list[dict[str, Any]]] = {}  # image id -> its detections
        self.loss_sum = 0.0
        self.loss_count = 0

    @torch.no_grad()
    def update(self, predictions: Sequence[Mapping[str, torch.Tensor]], targets: Sequence[Mapping[str, Any]],
               loss_sum: float | None = None) -> None:
        """Add a batch. ``predictions[i]``: ``boxes`` (N, 4) xyxy in the original image's pixels,
        ``scores`` (N,), ``labels`` (N,) contiguous class indices; ``targets[i]["image_id"]``."""
        for pred, tgt in zip(predictions, targets, strict=True):
            boxes = pred["boxes"].detach().float().cpu().reshape(-1, 4)
            scores = pred["scores"].detach().float().cpu().reshape(-1)
            labels = pred["labels"].detach().cpu().reshape(-1)
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
            image_id = int(tgt["image_id"])
            self.detections[image_id] = [
                {"image_id": image_id, "category_id": self.cat_ids[int(c)], "bbox": b, "score": s}
                for b, s, c in zip(xywh.tolist(), scores.tolist(), labels.tolist())]
        if loss_sum is not None:
            self.loss_sum += float(loss_sum)
            self.loss_count += len(targets)

    def reduce(self, env: DistEnv) -> "DetectionMeter":
        """Give every process the detections of all (in place); a sample that two processes
        evaluated (padding of a sharded split) counts once."""
        if env.distributed:
            parts = all_gather_objects((self.detections, self.loss_sum, self.loss_count), env)
            merged: dict[int, list[dict[str, Any]]] = {}
            for dets, _, _ in parts:
                for k, v in dets.items():
                    merged.setdefault(k, v)
            self.detections = merged
            self.loss_sum = sum(p[1] for p in parts)
            self.loss_count = sum(p[2] for p in parts)
        return self

    def compute(self) -> dict[str, float]:
        """COCO metrics of the images seen, plus ``num_images`` (and ``loss`` if one was given)."""
        dets = [d for image_id in sorted(self.detections) for d in self.detections[image_id]]
        out: dict[str, float] = dict(coco_evaluate(self.ground_truth, dets, self.out_json,
                                                   image_ids=sorted(self.detections)))
        out["num_images"] = len(self.detections)
        if self.loss_count:
            out["loss"] = self.loss_sum / self.loss_count
        return out
