"""Box helpers for query-based detectors that keep boxes as ``xyzr``.

``xyzr`` is (x, y, z, r): the centre in pixels, ``z = log2(sqrt(w * h))`` (log scale) and
``r = log2(h / w)`` (log aspect ratio), so ``w = 2^(z - r/2)`` and ``h = 2^(z + r/2)``. Powers of two
are written as ``exp(t * ln 2)``, which every exporter maps to a plain ``exp``.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "pow2", "xyzr_to_xyxy", "xyxy_to_xyzr", "xyzr_size", "refine_xyzr", "whole_image_xyzr",
    "box_iof", "xyzr_position_embedding",
]

_LN2 = math.log(2.0)


def pow2(t: torch.Tensor) -> torch.Tensor:
    """``2 ** t`` written as ``exp(t * ln 2)`` (one exp op in exported graphs)."""
    return torch.exp(t * _LN2)


def xyzr_size(xyzr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Width and height (each ``[..., 1]``) of ``xyzr`` boxes."""
    z, r = xyzr[..., 2:3], xyzr[..., 3:4]
    return pow2(z - 0.5 * r), pow2(z + 0.5 * r)


def xyzr_to_xyxy(xyzr: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` xyzr -> ``[..., 4]`` corners (x1, y1, x2, y2)."""
    w, h = xyzr_size(xyzr)
    half = torch.cat([w, h], dim=-1) * 0.5
    centre = xyzr[..., 0:2]
    return torch.cat([centre - half, centre + half], dim=-1)


def xyxy_to_xyzr(xyxy: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` corners -> xyzr (boxes must have positive width and height)."""
    wh = xyxy[..., 2:4] - xyxy[..., 0:2]
    centre = 0.5 * (xyxy[..., 0:2] + xyxy[..., 2:4])
    w, h = wh[..., 0:1], wh[..., 1:2]
    z = 0.5 * torch.log2(w * h)
    r = torch.log2(h / w)
    return torch.cat([centre, z, r], dim=-1)


def refine_xyzr(xyzr: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Apply a (dx, dy, dz, dr) update: the centre moves by ``dx * w`` / ``dy * h`` of the input box,
    log-scale and log-ratio are shifted additively."""
    w, h = xyzr_size(xyzr)
    x = xyzr[..., 0:1] + delta[..., 0:1] * w
    y = xyzr[..., 1:2] + delta[..., 1:2] * h
    return torch.cat([x, y, xyzr[..., 2:4] + delta[..., 2:4]], dim=-1)


def whole_image_xyzr(img_sizes: torch.Tensor, num_queries: int) -> torch.Tensor:
    """``[B, N, 4]`` xyzr boxes that each cover the whole (unpadded) image.

    ``img_sizes`` is ``[B, 2]`` holding (h, w) of every image.
    """
    sizes = img_sizes.to(torch.float32)
    h, w = sizes[:, 0:1], sizes[:, 1:2]
    xyzr = torch.cat([0.5 * w, 0.5 * h, 0.5 * torch.log2(w * h), torch.log2(h / w)], dim=-1)
    return xyzr[:, None, :].expand(-1, num_queries, -1)


def box_iof(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Pairwise intersection over the *first* box's area ("intersection over foreground").

    ``boxes1`` ``[..., N, 4]``, ``boxes2`` ``[..., M, 4]`` xyxy -> ``[..., N, M]``; the area is
    clamped below by ``eps``.
    """
    lt = torch.maximum(boxes1[..., :, None, 0:2], boxes2[..., None, :, 0:2])
    rb = torch.minimum(boxes1[..., :, None, 2:4], boxes2[..., None, :, 2:4])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    return inter / area1.clamp(min=eps)[..., :, None]


def xyzr_position_embedding(xyzr: torch.Tensor, dim: int, temperature: float = 10000.0,
                            xy_scale: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding of (x / xy_scale, y / xy_scale, z, r): ``dim / 4`` channels per
    coordinate, laid out coordinate by coordinate as (sin a0, cos a0, sin a1, cos a1, ...) with
    ``a_k = value / temperature^(2k / (dim/4))``."""
    if dim % 8:
        raise ValueError(f"position embedding needs dim divisible by 8, got {dim}")
    per_coord = dim // 4
    scale = xyzr.new_tensor([xy_scale, xy_scale, 1.0, 1.0])
    coords = xyzr / scale
    k = torch.arange(per_coord // 2, dtype=xyzr.dtype, device=xyzr.device)
    inv_freq = torch.exp(-(2.0 * k / per_coord) * math.log(temperature))
    angles = coords[..., None] * inv_freq                       # [..., 4, per_coord/2]
    emb = torch.stack([angles.sin(), angles.cos()], dim=-1)     # [..., 4, per_coord/2, 2]
    return emb.flatten(-3)
