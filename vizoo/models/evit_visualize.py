"""Which image patches each EViT reorganising block kept, drawn as in the paper's figures.

A token that survives a block is traced back to the patch it started from; the fused token is not
a patch and is left out. Dropped/fused patches are drawn black (as the official
``visualize_mask.py`` and the paper's Figure 1 do), one panel per reorganising block.

>>> masks = kept_patch_masks(model, x)            # (B, blocks, grid_h, grid_w) bool
>>> save_kept_patches(model, "cat.jpg", "cat_kept.png")
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .evit import EViT

FUSED = -1  # source index of the fused token (no patch)


@torch.no_grad()
def kept_patch_indices(model: EViT, x: torch.Tensor, keep_rate: float | None = None) -> list[torch.Tensor]:
    """Per block that reduced tokens: the original patch index of every token it kept (B, k);
    ``FUSED`` (-1) marks a fused token kept from an earlier block."""
    if not isinstance(model, EViT):
        raise TypeError(f"kept patches need an EViT model, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    try:
        _, kept = model.forward_features(x, keep_rate=keep_rate, return_kept=True)
    finally:
        model.train(was_training)
    source = torch.arange(model.patch_embed.num_patches).expand(x.shape[0], -1)  # token -> patch
    out = []
    for idx in kept:
        kept_src = source.gather(1, idx)
        out.append(kept_src)
        if model.fuse_token:
            kept_src = torch.cat([kept_src, torch.full_like(kept_src[:, :1], FUSED)], dim=1)
        source = kept_src
    return out


def kept_patch_masks(model: EViT, x: torch.Tensor, keep_rate: float | None = None) -> torch.Tensor:
    """(B, reducing blocks, grid_h, grid_w) bool: True where the patch is still a token."""
    gh, gw = model.patch_embed.grid_size
    masks = []
    for src in kept_patch_indices(model, x, keep_rate):
        m = torch.zeros(x.shape[0], gh * gw + 1, dtype=torch.bool)
        m.scatter_(1, torch.where(src == FUSED, gh * gw, src), True)
        masks.append(m[:, :-1].view(-1, gh, gw))
    return torch.stack(masks, dim=1) if masks else torch.zeros(x.shape[0], 0, gh, gw, dtype=torch.bool)


def render_kept_patches(image: torch.Tensor, masks: torch.Tensor, titles: Sequence[str] = (),
                        gap: int = 4) -> np.ndarray:
    """One row: the image, then the image with dropped patches black for each mask.

    ``image`` is (3, H, W) in [0, 1]; ``masks`` (blocks, grid_h, grid_w). Returns uint8 HWC.
    """
    _, h, w = image.shape
    panels = [image]
    for m in masks:
        keep = F.interpolate(m[None, None].float(), size=(h, w), mode="nearest")[0]
        panels.append(image * keep)
    row = []
    for p in panels:
        row += [p, torch.ones(3, h, gap)]
    img = (torch.cat(row[:-1], dim=2).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    if titles:
        img = _add_titles(img, titles, w, gap)
    return img


def _add_titles(img: np.ndarray, titles: Sequence[str], panel_w: int, gap: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    band = 16
    canvas = Image.new("RGB", (img.shape[1], img.shape[0] + band), "white")
    canvas.paste(Image.fromarray(img), (0, band))
    draw = ImageDraw.Draw(canvas)
    for i, t in enumerate(titles):
        draw.text((i * (panel_w + gap) + 2, 2), t, fill="black")
    return np.asarray(canvas)


def load_image(path: str | os.PathLike, size: int, crop_pct: float = 0.875) -> torch.Tensor:
    """(3, size, size) in [0, 1]: shorter side resized to size / crop_pct (bicubic), centre crop,
    the evaluation preprocessing of DeiT/EViT."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    img = Image.open(path).convert("RGB")
    scale = size / crop_pct / min(img.size)
    img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))),
                     Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255


def save_kept_patches(model: EViT, images: torch.Tensor | str | os.PathLike | Sequence[str | os.PathLike],
                      path: str | os.PathLike, keep_rate: float | None = None) -> Path:
    """Write a PNG with one row per image: input, then the patches kept after each reorganising
    block. ``images``: file path(s), or a (B, 3, H, W) tensor in [0, 1] at the model's size."""
    from PIL import Image

    from ..data.bundled import normalize

    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = model.patch_embed.img_size[0]
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    if not isinstance(images, torch.Tensor):
        images = torch.stack([load_image(p, size, cfg.get("crop_pct", 0.875)) for p in images])
    if images.dim() != 4 or images.shape[-2:] != tuple(model.patch_embed.img_size):
        raise ValueError(f"images must be (B, C, {size}, {size}) in [0, 1], got {tuple(images.shape)}")
    x = normalize(images, cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225)))
    masks = kept_patch_masks(model, x, keep_rate)
    reducing = [i for i, b in enumerate(model.blocks) if b.reorganizes][:masks.shape[1]]
    titles = ["input"] + [f"block {i + 1}" for i in reducing]
    shown = images if images.shape[1] == 3 else images[:, :1].expand(-1, 3, -1, -1)
    rows = [render_kept_patches(img, m, titles if j == 0 else ()) for j, (img, m) in enumerate(zip(shown, masks))]
    width = max(r.shape[1] for r in rows)
    sheet = np.concatenate([np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255)
                            for r in rows])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(path)
    return path
