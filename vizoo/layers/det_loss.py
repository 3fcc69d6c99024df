"""Set criterion of StageInteractor (and of its AdaMixer-style baseline with ``csla=False``).

Per decoder stage ``s`` (all stages weighted 1, summed)::

    loss_cls  = w_cls  * sum(sigmoid_focal(logits_s, T_s)) / max(#positive entries of T_s, #own)
    loss_l1   = w_l1   * sum |box / S - gt / S|_1 over own matches / #own     (S = (w, h, w, h))
    loss_giou = w_giou * sum (1 - GIoU(box, gt))  over own matches / #own

``T_s`` are the (CSLA or one-to-one) multi-hot targets of :func:`csla_targets`; "own" are the
stage's own Hungarian matches. All stages are matched before any loss is computed, because CSLA
at stage ``s`` borrows the matches of later stages. Both normalisers are averaged over processes
when ``torch.distributed`` is initialised, then clamped to >= 1.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from .det_assign import (Match, concat_targets, csla_targets, flatten_matches, hungarian_match_batch,
                         image_scales)

__all__ = ["StageInteractorCriterion"]


def _average_across_processes(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x = x / dist.get_world_size()
    return x


class StageInteractorCriterion(nn.Module):
    """Hungarian matching + CSLA classification targets + focal / L1 / GIoU losses.

    Args:
        num_classes: C, the width of the logits.
        csla: cross-stage label assignment; ``False`` gives plain per-stage one-to-one targets.
        csla_iou: IoU threshold of CSLA (eta).
        weights: (cls, l1, giou) weights, used for both the matching cost and the loss.
        alpha, gamma: focal parameters, used for both the matching cost and the loss.

    ``forward(stage_outputs, targets) -> (total_loss, logs)``; ``stage_outputs`` is a list of
    ``{"logits": [B, N, C], "boxes": [B, N, 4] xyxy pixels}``, one per stage.
    """

    def __init__(self, num_classes: int, csla: bool = True, csla_iou: float = 0.5,
                 weights: Sequence[float] = (2.0, 5.0, 2.0), alpha: float = 0.25,
                 gamma: float = 2.0):
        super().__init__()
        self.num_classes = int(num_classes)
        self.csla = bool(csla)
        self.csla_iou = float(csla_iou)
        self.weights = tuple(float(w) for w in weights)
        self.alpha = float(alpha)
        self.gamma = float(gamma)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, csla={self.csla}, csla_iou={self.csla_iou}, "
                f"weights={self.weights}, alpha={self.alpha}, gamma={self.gamma}")

    def match(self, stage_outputs: Sequence[dict], targets: Sequence[dict]) -> list[list[Match]]:
        """Hungarian matches of every stage: ``matches[s][b] = (query_idx, gt_idx)``."""
        return [hungarian_match_batch(o["logits"].detach(), o["boxes"].detach(), targets,
                                      self.weights, self.alpha, self.gamma) for o in stage_outputs]

    def forward(self, stage_outputs: Sequence[dict], targets: Sequence[dict]):
        L = len(stage_outputs)
        if L == 0:
            raise ValueError("no stage outputs")
        B, N, C = stage_outputs[0]["logits"].shape
        if C != self.num_classes:
            raise ValueError(f"logits have {C} classes, criterion expects {self.num_classes}")
        device = stage_outputs[0]["logits"].device
        w_cls, w_l1, w_giou = self.weights

        # 1. all matches first (stage s borrows from later stages), then the targets
        matches = self.match(stage_outputs, targets)
        cls_targets = csla_targets(matches, [o["boxes"].detach() for o in stage_outputs], targets,
                                   self.num_classes, self.csla_iou, enabled=self.csla)
        gt_boxes, _, offsets = concat_targets(targets, device)
        scale = image_scales(targets, device)                                          # [B, 4]
        flat = [flatten_matches(m, offsets, N, device) for m in matches]

        # 2. normalisers: [L, 2] = (cls, box), one all_reduce for all of them
        num_pos = torch.stack([t.sum() for t in cls_targets])                         # [L]
        num_own = torch.tensor([float(r.numel()) for r, _ in flat], device=device)      # [L]
        norms = torch.stack([torch.maximum(num_pos, num_own), num_own], dim=1)
        norms = _average_across_processes(norms).clamp(min=1.0)

        # 3. losses
        total = stage_outputs[0]["logits"].new_zeros((), dtype=torch.float32)
        stage_terms = []
        for s, out in enumerate(stage_outputs):
            logits = out["logits"].float()
            cls = sigmoid_focal_loss(logits, cls_targets[s], self.alpha, self.gamma, reduction="sum")
            rows, gts = flat[s]
            pred = out["boxes"].float().reshape(B * N, 4)[rows]
            gt = gt_boxes[gts]
            s_pair = scale[torch.div(rows, N, rounding_mode="floor")]
            l1 = (pred / s_pair - gt / s_pair).abs().sum()
            giou = generalized_box_iou_loss(pred, gt, reduction="sum")
            terms = torch.stack([w_cls * cls / norms[s, 0], w_l1 * l1 / norms[s, 1],
                                 w_giou * giou / norms[s, 1]])
            total = total + terms.sum()
            stage_terms.append(terms)

        # 4. logs: one host copy
        stage_terms = torch.stack(stage_terms).detach()                                   # [L, 3]
        num_gt = float(offsets[-1])
        pos_per_gt = num_pos.detach() / max(num_gt, 1.0)
        values = torch.cat([total.detach()[None], stage_terms.sum(0), stage_terms.flatten(),
                            pos_per_gt]).tolist()
        logs = {"loss": values[0], "loss_cls": values[1], "loss_l1": values[2],
                "loss_giou": values[3]}
        per_stage = values[4:4 + 3 * L]
        for s in range(L):
            logs[f"loss_cls_s{s}"], logs[f"loss_l1_s{s}"], logs[f"loss_giou_s{s}"] = \
                per_stage[3 * s:3 * s + 3]
        for s in range(L):
            logs[f"pos_per_gt_s{s}"] = values[4 + 3 * L + s]
        return total, logs
