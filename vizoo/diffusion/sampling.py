"""DDIM sampling (diffusers' DDIMScheduler) for any module with the DiffusionUNet forward.

One sampler serves the FP model, the quantized UNets and the calibration: with ``record=True``
it returns the exact inputs x_t the model saw at every step, which is QuEST's data-free
calibration set (specs §3.4) and the held-out (x_t, t) pairs of the epsilon-MSE metric. With
eta = 0 the result is a deterministic function of the noise, so two models sampled from the same
noise can be compared image by image (the PSNR metric).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .schedule import make_schedulers

#: the benchmark's sampler: DDIM with 20 steps (calibration keeps every 2nd)
DEFAULT_NUM_STEPS = 20


@dataclass
class SampleResult:
    """Final images, the DDIM timesteps (descending) and, with ``record``, the model's inputs."""

    images: torch.Tensor
    timesteps: list[int]
    inputs: list[torch.Tensor] | None = None


@torch.no_grad()
def ddim_sample(model: Callable[..., torch.Tensor], noise: torch.Tensor, num_steps: int = DEFAULT_NUM_STEPS,
                eta: float = 0.0, class_labels: torch.Tensor | None = None, record: bool = False,
                progress: bool | str = False, batch_size: int = 64,
                generator: torch.Generator | None = None) -> SampleResult:
    """Sample from ``noise`` ``[N, C, H, W]`` with ``num_steps`` DDIM steps.

    ``model(x_t, t, class_labels)`` is called with a long ``t`` ``[b]`` holding ONE timestep per
    call (a quantized UNet picks its activation parameters from it). Samples run in chunks of
    ``batch_size``; the model is put in eval mode for the call and restored after. ``progress``:
    True or a label shows a tqdm bar (one tick per model call). ``eta`` > 0 adds DDIM noise drawn
    from ``generator``. Returns images in [-1, 1] (the scheduler clips predicted x0).
    """
    if noise.dim() != 4:
        raise ValueError(f"noise must be [N, C, H, W], got shape {tuple(noise.shape)}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if class_labels is not None:
        class_labels = torch.as_tensor(class_labels, device=noise.device).long().reshape(-1)
        if len(class_labels) != len(noise):
            raise ValueError(f"class_labels has {len(class_labels)} entries for {len(noise)} noise images")
    _, scheduler = make_schedulers(model)
    scheduler.set_timesteps(num_steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    chunks = list(range(0, len(noise), max(int(batch_size), 1)))
    bar = _progress_bar(progress, total=len(chunks) * len(timesteps))
    images, inputs = [], [[] for _ in timesteps] if record else None
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        for start in chunks:
            x = noise[start:start + batch_size] * scheduler.init_noise_sigma
            labels = class_labels[start:start + batch_size] if class_labels is not None else None
            for k, t in enumerate(timesteps):
                if inputs is not None:
                    inputs[k].append(x.detach().clone())
                t_batch = torch.full((len(x),), t, dtype=torch.long, device=x.device)
                eps = model(x, t_batch, labels) if labels is not None else model(x, t_batch)
                x = scheduler.step(eps, t, x, eta=eta, generator=generator).prev_sample
                bar.update(1)
            images.append(x)
    finally:
        bar.close()
        if hasattr(model, "train"):
            model.train(was_training)
    recorded = [torch.cat(step) for step in inputs] if inputs is not None else None
    return SampleResult(images=torch.cat(images), timesteps=timesteps, inputs=recorded)


def _progress_bar(progress: bool | str, total: int) -> Any:
    from tqdm import tqdm

    label = progress if isinstance(progress, str) else "DDIM sampling"
    return tqdm(total=total, desc=label, unit="call", disable=not progress, dynamic_ncols=True, leave=False)


def image_grid(images: torch.Tensor, nrow: int = 8, pad: int = 1, scale: int = 1) -> np.ndarray:
    """``[N, C, H, W]`` images in [-1, 1] as one uint8 grid (``[rows, cols]`` grey or ``[rows, cols, C]``),
    separated by grey lines (digits are white on black, so black gaps would vanish)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, c, h, w = x.shape
    rows = -(-n // nrow)
    grid = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), 128, dtype=torch.uint8)  # grey gaps
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = x[i]
    if scale > 1:
        grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    arr = grid.permute(1, 2, 0).numpy()
    return arr[..., 0] if c == 1 else arr


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8, scale: int = 4) -> None:
    """Write a PNG grid of images in [-1, 1] (atomically; ``scale`` enlarges 16 px digits to see them)."""
    from PIL import Image

    from vizoo.io import atomic_path

    arr = image_grid(images, nrow=nrow, scale=scale)
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
