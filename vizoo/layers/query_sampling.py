"""3-D sub-box sampling of multi-level features around a query's box (StageInteractor / AdaMixer).

A query predicts, per channel group g and sub-box p, an offset ``(dx0, dy0, dz0)`` relative to its
box, and K second-level offsets ``(dx1, dy1, dz1)`` shared by all of its sub-boxes. Point
``(g, p, k)`` lies at

    x = x_box + w * (dx0 + 2^dz0 * dx1),   y = y_box + h * (dy0 + 2^dz0 * dy1),
    z = z_box + dz0 + dz1

(z is a log2 scale). Each point reads every feature level with bilinear ``grid_sample`` (zero
padding, ``align_corners=False``, pixel coordinates divided by feature size x stride), weighted by
a softmax over levels of ``-(z - z_l)^2 / tau`` where ``z_l = log2(stride_l) + 1`` (stride 4 <->
z = 3, i.e. 8-pixel boxes), and group g reads only its own channel slice of every level.

Export form: TFLite lowers ``grid_sample`` to gathers, casts and selects that the XNNPACK
delegate does not run (the tiny detector's file split into 10 partitions and ran 4x slower than
PyTorch). Bilinear sampling with zero padding is a weighted sum with the tent weights
``max(0, 1 - |i - x|)`` over the pixel columns and rows, so the export form writes it as one
matmul over the columns and a weighted sum over the rows: dense ops every delegate runs, equal to
``grid_sample`` up to float rounding. Its intermediate is [groups, points, channels x rows] per
level, which grows with the input: at 800x1333 the R50 detector's stride-4 level would need a
1.3 GB tensor. Levels whose dense intermediate exceeds `DENSE_SAMPLING_MAX_ELEMENTS` are sampled
by gathering the four neighbours instead (:func:`bilinear_sample_gather`; GATHER runs outside
XNNPACK, a partition boundary, but the memory stays proportional to the points).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .box_ops import pow2, xyzr_size
from .export_mode import ExportAware

__all__ = ["level_anchor_z", "level_weights", "sample_multilevel", "bilinear_sample_dense", "bilinear_sample_gather",
           "DENSE_SAMPLING_MAX_ELEMENTS", "SubBoxSampler"]

#: the largest dense-sampling intermediate (elements) the export form builds for one level; beyond
#: it the level is gathered (64 Mi floats = 256 MB)
DENSE_SAMPLING_MAX_ELEMENTS = 1 << 26


def level_anchor_z(strides: Sequence[int]) -> list[float]:
    """The log-scale each level is tuned to: ``log2(stride) + 1`` (strides 4..32 -> 3..6)."""
    return [math.log2(s) + 1.0 for s in strides]


def level_weights(z: torch.Tensor, anchors: Sequence[float], tau: float = 2.0) -> torch.Tensor:
    """``[...]`` log-scales -> ``[..., F]`` softmax weights over the F levels."""
    d = z[..., None] - z.new_tensor(list(anchors))
    return torch.softmax(d * d * (-1.0 / tau), dim=-1)     # d * d: TFLite has no float pow kernel


def bilinear_sample_dense(feat: torch.Tensor, points: torch.Tensor, stride: int) -> torch.Tensor:
    """``F.grid_sample(feat, grid, "bilinear", "zeros", align_corners=False)`` at image-pixel
    ``points`` ``[BG, N, M, 2]`` of a level of ``stride``, as dense ops: ``[BG, C, N, M]``."""
    BG, C, H, W = feat.shape
    _, N, M, _ = points.shape
    # align_corners=False: pixel centres sit at i + 0.5, so image x reads level column x/stride - 0.5
    col = (points[..., 0] * (1.0 / stride) - 0.5).reshape(BG, N * M, 1)
    row = (points[..., 1] * (1.0 / stride) - 0.5).reshape(BG, N * M, 1)
    wx = torch.relu(1.0 - (col - torch.arange(W, dtype=feat.dtype, device=feat.device)).abs())  # [BG, NM, W]
    wy = torch.relu(1.0 - (row - torch.arange(H, dtype=feat.dtype, device=feat.device)).abs())  # [BG, NM, H]
    by_row = torch.matmul(wx, feat.permute(0, 3, 1, 2).reshape(BG, W, C * H))   # [BG, NM, C*H]
    out = (by_row.reshape(BG, N * M, C, H) * wy.reshape(BG, N * M, 1, H)).sum(-1)   # [BG, NM, C]
    return out.transpose(1, 2).reshape(BG, C, N, M)


def bilinear_sample_gather(feat: torch.Tensor, points: torch.Tensor, stride: int) -> torch.Tensor:
    """The same sampling as :func:`bilinear_sample_dense` by gathering each point's four
    neighbours (zero outside the map): memory proportional to the points, not the map."""
    BG, C, H, W = feat.shape
    _, N, M, _ = points.shape
    x = (points[..., 0] * (1.0 / stride) - 0.5).reshape(BG, N * M)
    y = (points[..., 1] * (1.0 / stride) - 0.5).reshape(BG, N * M)
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = x - x0, y - y0
    rows = feat.permute(0, 2, 3, 1).reshape(BG * H * W, C)                  # one row per pixel
    base = (torch.arange(BG, dtype=feat.dtype, device=feat.device) * (H * W)).unsqueeze(1)
    out = None
    for dx, dy, weight in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                           (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + dx, y0 + dy
        xc, yc = xi.clamp(0, W - 1), yi.clamp(0, H - 1)
        # 1 inside the map, 0 outside, in float ops (comparisons and ANDs would run outside XNNPACK)
        inside = (1 - (xi - xc).abs().clamp(max=1)) * (1 - (yi - yc).abs().clamp(max=1))
        index = (base + yc * W + xc).reshape(-1).to(torch.int64)                           # [BG*NM]
        value = rows.index_select(0, index).reshape(BG, N * M, C)
        term = value * (weight * inside).unsqueeze(-1)
        out = term if out is None else out + term
    return out.transpose(1, 2).reshape(BG, C, N, M)


def sample_multilevel(features: Sequence[torch.Tensor], strides: Sequence[int], xy: torch.Tensor,
                      z: torch.Tensor, tau: float = 2.0, dense: bool = False) -> torch.Tensor:
    """Sample grouped multi-level features at 3-D points.

    features: F tensors ``[B, G*C_g, H_l, W_l]``; xy: ``[B, N, G, M, 2]`` pixel coordinates;
    z: ``[B, N, G, M]`` log2 scales. Returns ``[B, N, G, M, C_g]``. ``dense``: the export form
    (:func:`bilinear_sample_dense`, or :func:`bilinear_sample_gather` for a level too large for
    it) instead of ``grid_sample``.
    """
    B, N, G, M, _ = xy.shape
    weights = level_weights(z, level_anchor_z(strides), tau)          # [B, N, G, M, F]
    weights = weights.permute(0, 2, 4, 1, 3).reshape(B * G, len(features), 1, N, M)
    points = xy.permute(0, 2, 1, 3, 4).reshape(B * G, N, M, 2)
    out = None
    for level, (feat, stride) in enumerate(zip(features, strides)):
        _, C, H, W = feat.shape
        grouped = feat.reshape(B * G, C // G, H, W)
        if dense and B * G * N * M * (C // G) * H <= DENSE_SAMPLING_MAX_ELEMENTS:
            sampled = bilinear_sample_dense(grouped, points, stride)            # [B*G, C_g, N, M]
        elif dense:
            sampled = bilinear_sample_gather(grouped, points, stride)
        else:
            to_unit = points.new_tensor([2.0 / (W * stride), 2.0 / (H * stride)])
            sampled = F.grid_sample(grouped, points * to_unit - 1.0, mode="bilinear",
                                    padding_mode="zeros", align_corners=False)   # [B*G, C_g, N, M]
        sampled = sampled * weights[:, level]
        out = sampled if out is None else out + sampled
    C_g = out.shape[1]
    return out.view(B, G, C_g, N, M).permute(0, 3, 1, 4, 2)


class SubBoxSampler(ExportAware, nn.Module):
    """Generates the sub-box and point offsets from the query and samples ``[B, N, G, P*K, C_g]``
    (sub-box major, point minor); in export mode with dense bilinear sampling (see above)."""

    def __init__(self, dim: int, groups: int, num_sub_boxes: int, points_per_sub_box: int,
                 tau: float = 2.0):
        super().__init__()
        self.dim, self.groups = dim, groups
        self.num_sub_boxes, self.points_per_sub_box = num_sub_boxes, points_per_sub_box
        self.tau = tau
        # outputs laid out (group, sub-box, xyz) and (point, xyz)
        self.sub_box_offsets = nn.Linear(dim, 3 * groups * num_sub_boxes)
        self.point_offsets = nn.Linear(dim, 3 * points_per_sub_box)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for lin in (self.sub_box_offsets, self.point_offsets):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        nn.init.uniform_(self.sub_box_offsets.bias.view(-1, 3)[:, :2], -0.5, 0.5)
        b = 0.5 / math.sqrt(2.0)
        nn.init.uniform_(self.point_offsets.bias.view(-1, 3)[1:, :2], -b, b)

    def points(self, q: torch.Tensor, xyzr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel positions ``[B, N, G, P*K, 2]`` and log-scales ``[B, N, G, P*K]``."""
        B, N, _ = q.shape
        G, P, K = self.groups, self.num_sub_boxes, self.points_per_sub_box
        # batch and queries merged: CoreML takes tensors of rank <= 5 only
        d0 = self.sub_box_offsets(q).view(B * N, G, P, 1, 3)
        d1 = self.point_offsets(q).view(B * N, 1, 1, K, 3)
        w, h = xyzr_size(xyzr)
        centre = xyzr[..., 0:2].reshape(B * N, 1, 1, 1, 2)
        wh = torch.cat([w, h], dim=-1).view(B * N, 1, 1, 1, 2)
        rel = d0[..., 0:2] + pow2(d0[..., 2:3]) * d1[..., 0:2]          # [B*N, G, P, K, 2]
        xy = centre + wh * rel
        z = xyzr[..., 2].reshape(B * N, 1, 1, 1) + d0[..., 2] + d1[..., 2]   # [B*N, G, P, K]
        return xy.reshape(B, N, G, P * K, 2), z.reshape(B, N, G, P * K)

    def forward(self, features: Sequence[torch.Tensor], strides: Sequence[int], q: torch.Tensor,
                xyzr: torch.Tensor) -> torch.Tensor:
        xy, z = self.points(q, xyzr)
        return sample_multilevel(features, strides, xy, z, self.tau, dense=self.exporting)
