"""Real images that ship inside installed packages, for tests, parity checks and calibration.

- scikit-learn's 1,797 handwritten 8x8 digits (10 classes), resized to any size;
- scikit-image's bundled photographs (astronaut, chelsea, coffee, rocket, ...), resized and
  cropped to any size, and random crops of them for as many images as needed.
Images are float32 NCHW in [0, 1]; normalisation is the model's business.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right",
               "horse", "brick", "grass", "gravel", "camera", "cat", "hubble_deep_field",
               "immunohistochemistry", "logo", "moon", "page", "text", "retina")


def digits_arrays(img_size: int = 32, in_chans: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as (N, in_chans, img_size, img_size) in [0, 1] and labels (N,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    if img_size != 8:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False).clamp(0, 1)
    if in_chans != 1:
        x = x.expand(-1, in_chans, -1, -1).contiguous()
    return x, torch.from_numpy(d.target.astype(np.int64))


def _photo(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    img = img[..., :3]
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).astype(np.uint8) if img.max() <= 1 else img.astype(np.uint8)
    return img


def photo_images(n: int, img_size: int | tuple[int, int] = 224, in_chans: int = 3,
                 seed: int = 0) -> torch.Tensor:
    """``n`` real photographs (N, in_chans, H, W) in [0, 1]: whole bundled photos first, then
    seeded random crops of them (so any ``n`` is real data, never noise)."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    gen = np.random.default_rng(seed)
    photos = []
    for name in PHOTO_NAMES:
        try:
            photos.append(_photo(name))
        except Exception:  # a photo missing from this skimage version (or needing pooch)
            continue
    if not photos:
        raise RuntimeError("scikit-image's bundled photos are missing; `pip install scikit-image`")
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        t = torch.from_numpy(img).permute(2, 0, 1).float().div(255)
        if i >= len(photos):  # random crop of 40-100% of the side
            H, W = t.shape[1:]
            s = gen.uniform(0.4, 1.0)
            ch, cw = max(8, int(H * s)), max(8, int(W * s))
            y0, x0 = gen.integers(0, H - ch + 1), gen.integers(0, W - cw + 1)
            t = t[:, y0:y0 + ch, x0:x0 + cw]
            if gen.random() < 0.5:
                t = t.flip(-1)
        t = F.interpolate(t[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
        out.append(t.clamp(0, 1))
    x = torch.stack(out)
    if in_chans == 1:
        x = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    elif in_chans != 3:
        x = x.mean(1, keepdim=True).expand(-1, in_chans, -1, -1).contiguous()
    return x


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Apply a model's mean/std to [0, 1] images (channel count taken from ``x``)."""
    c = x.shape[1]
    m = torch.tensor(list(mean)[:c] if len(mean) >= c else list(mean) * c, dtype=x.dtype).view(1, c, 1, 1)
    s = torch.tensor(list(std)[:c] if len(std) >= c else list(std) * c, dtype=x.dtype).view(1, c, 1, 1)
    return (x - m) / s
