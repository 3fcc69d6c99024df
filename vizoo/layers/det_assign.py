"""Label assignment for query-based detectors: per-stage Hungarian matching and the cross-stage
label assigner (CSLA) of StageInteractor.

Conventions shared by everything here:

* predictions of one decoder stage: ``logits`` ``[B, N, C]`` (before the sigmoid) and ``boxes``
  ``[B, N, 4]``, xyxy in absolute pixels;
* targets: one dict per image, ``{"boxes": [M, 4] xyxy pixels, "labels": LongTensor[M] (0-based),
  "img_size": (h, w)}`` where ``img_size`` is the resized image *before* padding;
* a match of one image is a pair ``(query_idx, gt_idx)`` of equally long LongTensors; ``gt_idx``
  indexes that image's own targets. ``matches[s][b]`` is the match of stage ``s``, image ``b``.

Matching cost (per image, on detached predictions)::

    cost[q, g] = w_cls * (pos(q, c_g) - neg(q, c_g))
               + w_l1  * |box_q / S - gt_g / S|_1          (S = (w, h, w, h), xyxy)
               - w_giou * GIoU(box_q, gt_g)

with the focal terms ``pos = a (1 - p)^y (-log p)`` and ``neg = (1 - a) p^y (-log(1 - p))`` at
the GT class (``p`` = sigmoid of the logit). The logs are taken as softplus of the logit, i.e.
exactly, instead of ``log(p + eps)``; the two agree wherever ``eps`` does not matter.

CSLA (the behaviour of the released configuration): stage ``s`` gets a classification positive
``(q, class(g))`` for every match ``(q, g)`` of any candidate stage ``j`` in
``J(s) = {s} + {s-1 if s >= 1} + {s+1, ..., L-1}`` whose GT overlaps stage ``s``'s *own* box of
that query with IoU >= ``iou_thr``. Targets are multi-hot and binary (a pair found at several
stages is still 1). A stage's own match below the threshold is a negative. Box regression is not
affected: it uses the stage's own matches only (see ``det_loss.py``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, generalized_box_iou

__all__ = [
    "Match", "hungarian_match", "hungarian_match_batch", "candidate_stages", "csla_targets",
    "concat_targets", "flatten_matches", "image_scales",
]

Match = tuple[torch.Tensor, torch.Tensor]

# a valid box for padding GT slots in the batched cost (its columns are never read)
_PAD_BOX = (0.0, 0.0, 1.0, 1.0)


def _image_scale(img_size, device) -> torch.Tensor:
    """(h, w) -> tensor [w, h, w, h] (float32) on ``device``."""
    h, w = (float(v) for v in img_size)
    return torch.tensor([w, h, w, h], dtype=torch.float32, device=device)


def image_scales(targets: Sequence[dict], device) -> torch.Tensor:
    """Per-image normalisers ``[B, 4] = (w, h, w, h)`` from the targets' unpadded ``img_size``."""
    if not targets:
        return torch.zeros(0, 4, device=device)
    return torch.stack([_image_scale(t["img_size"], device) for t in targets])


def _empty_match(device) -> Match:
    e = torch.zeros(0, dtype=torch.long, device=device)
    return e, e.clone()


def _focal_cost(x: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Focal matching cost from the logits ``x`` at the GT classes: pos_cost - neg_cost."""
    p = x.sigmoid()
    pos = alpha * (1.0 - p).pow(gamma) * F.softplus(-x)      # -log(p)     = softplus(-x)
    neg = (1.0 - alpha) * p.pow(gamma) * F.softplus(x)       # -log(1 - p) = softplus(x)
    return pos - neg


def _pad_targets(targets: Sequence[dict], device):
    """Pad the GTs of a batch to the largest M: boxes [B, Mmax, 4], labels [B, Mmax], counts."""
    counts = [int(t["labels"].numel()) for t in targets]
    m_max = max(counts, default=0)
    B = len(targets)
    boxes = torch.tensor(_PAD_BOX, device=device).repeat(B, m_max, 1)
    labels = torch.zeros(B, m_max, dtype=torch.long, device=device)
    for b, (t, m) in enumerate(zip(targets, counts)):
        if m:
            boxes[b, :m] = t["boxes"].to(device=device, dtype=torch.float32).reshape(m, 4)
            labels[b, :m] = t["labels"].to(device=device, dtype=torch.long).reshape(m)
    return boxes, labels, counts


def _solve(cost) -> Match:
    """Minimum-cost one-to-one assignment of a [N, M] CPU cost matrix (queries x GTs)."""
    from scipy.optimize import linear_sum_assignment  # imported lazily: only training needs it

    rows, cols = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


@torch.no_grad()
def hungarian_match_batch(logits: torch.Tensor, boxes: torch.Tensor, targets: Sequence[dict],
                          weights: Sequence[float] = (2.0, 5.0, 2.0), alpha: float = 0.25,
                          gamma: float = 2.0) -> list[Match]:
    """Hungarian matching of one stage for a whole batch.

    The cost is built for all images at once on GTs padded to the largest count (one device->host
    copy per call); scipy then solves each image's [N, M_b] block. Returns one
    ``(query_idx, gt_idx)`` per image, on ``logits.device``, sorted by query index.
    """
    device = logits.device
    B, N, _ = logits.shape
    if len(targets) != B:
        raise ValueError(f"{B} images of predictions but {len(targets)} targets")
    gt_boxes, gt_labels, counts = _pad_targets(targets, device)
    if N == 0 or max(counts, default=0) == 0:
        return [_empty_match(device) for _ in range(B)]
    w_cls, w_l1, w_giou = weights
    x = logits.detach().float()
    pb = boxes.detach().float()
    m_max = gt_boxes.shape[1]
    cls_x = torch.gather(x, 2, gt_labels[:, None, :].expand(B, N, m_max))            # [B, N, Mmax]
    scale = image_scales(targets, device)[:, None, :]                                 # [B, 1, 4]
    cost = (w_cls * _focal_cost(cls_x, alpha, gamma)
            + w_l1 * torch.cdist(pb / scale, gt_boxes / scale, p=1)
            - w_giou * generalized_box_iou(pb, gt_boxes))
    cost = cost.cpu()
    out = []
    for b, m in enumerate(counts):
        if m == 0:
            out.append(_empty_match(device))
            continue
        q, g = _solve(cost[b, :, :m])
        out.append((q.to(device), g.to(device)))
    return out


def hungarian_match(logits: torch.Tensor, boxes: torch.Tensor, gt_boxes: torch.Tensor,
                    gt_labels: torch.Tensor, img_size, weights: Sequence[float] = (2.0, 5.0, 2.0),
                    alpha: float = 0.25, gamma: float = 2.0) -> Match:
    """One image: ``logits [N, C]``, ``boxes [N, 4]`` -> ``(query_idx [M'], gt_idx [M'])``.

    ``M' = min(N, M)``; empty when there is no GT. Predictions are detached.
    """
    target = {"boxes": gt_boxes, "labels": gt_labels, "img_size": img_size}
    return hungarian_match_batch(logits[None], boxes[None], [target], weights, alpha, gamma)[0]


def candidate_stages(s: int, num_stages: int) -> list[int]:
    """Stages whose matches stage ``s`` may borrow: ``[s, s-1 (if s >= 1), s+1, ..., L-1]``."""
    if not 0 <= s < num_stages:
        raise ValueError(f"stage {s} out of range for {num_stages} stages")
    return [s] + ([s - 1] if s >= 1 else []) + list(range(s + 1, num_stages))


def concat_targets(targets: Sequence[dict], device):
    """GTs of a batch concatenated: boxes [Mtot, 4] (float32), labels [Mtot], offsets [B + 1]."""
    counts = [int(t["labels"].numel()) for t in targets]
    offsets = [0]
    for m in counts:
        offsets.append(offsets[-1] + m)
    if offsets[-1]:
        boxes = torch.cat([t["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 4)
                           for t in targets])
        labels = torch.cat([t["labels"].to(device=device, dtype=torch.long).reshape(-1)
                            for t in targets])
    else:
        boxes = torch.zeros(0, 4, device=device)
        labels = torch.zeros(0, dtype=torch.long, device=device)
    return boxes, labels, offsets


def flatten_matches(matches: Sequence[Match], offsets: Sequence[int], num_queries: int,
                    device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image matches -> flat ``(row, gt)``: ``row = b * N + q`` and ``gt`` indexes the
    concatenated GTs of :func:`concat_targets`."""
    rows, gts = [], []
    for b, (q, g) in enumerate(matches):
        rows.append(q.to(device=device, dtype=torch.long) + b * num_queries)
        gts.append(g.to(device=device, dtype=torch.long) + offsets[b])
    if not rows:
        return _empty_match(device)
    return torch.cat(rows), torch.cat(gts)


@torch.no_grad()
def csla_targets(matches: Sequence[Sequence[Match]], stage_boxes: Sequence[torch.Tensor],
                 targets: Sequence[dict], num_classes: int, iou_thr: float = 0.5,
                 enabled: bool = True) -> list[torch.Tensor]:
    """Classification targets of every stage, ``[B, N, num_classes]`` float32 in {0, 1}.

    ``enabled=True``: CSLA as described in the module docstring (IoU with the stage's own box,
    ``>= iou_thr``). ``enabled=False``: the plain one-to-one targets of the stage's own matches,
    with no IoU threshold (the DETR / AdaMixer baseline). Pure function of its inputs.
    """
    L = len(stage_boxes)
    if len(matches) != L:
        raise ValueError(f"{len(matches)} stages of matches but {L} stages of boxes")
    if L == 0:
        return []
    B, N = stage_boxes[0].shape[:2]
    device = stage_boxes[0].device
    gt_boxes, gt_labels, offsets = concat_targets(targets, device)
    flat = [flatten_matches(matches[j], offsets, N, device) for j in range(L)]
    out = []
    for s in range(L):
        target = torch.zeros(B * N, num_classes, device=device)
        if enabled:
            js = candidate_stages(s, L)
            rows = torch.cat([flat[j][0] for j in js])
            gts = torch.cat([flat[j][1] for j in js])
            if rows.numel():
                # IoU of stage s's own box of each candidate query with the candidate GT
                own = stage_boxes[s].detach().reshape(B * N, 4).float()
                iou = box_iou(own, gt_boxes)[rows, gts]
                keep = iou >= iou_thr
                rows, gts = rows[keep], gts[keep]
        else:
            rows, gts = flat[s]
        target[rows, gt_labels[gts]] = 1.0        # assignment, not accumulation: duplicates -> 1
        out.append(target.view(B, N, num_classes))
    return out
