"""The noise schedule of a diffusion UNet, as diffusers' DDPM (training) and DDIM (sampling) schedulers.

Both are built from the model's own facts (``num_train_timesteps``, ``beta_schedule``), so that
training, sampling, calibration and the quantizer's timestep -> parameter-set table all use one
schedule. ``clip_sample=True``: the data lives in [-1, 1], and clipping the predicted x0 there
keeps a few-step DDIM sampler (and a quantized UNet's larger errors) from drifting out of range.
"""
from __future__ import annotations

from typing import Any

import torch

#: DDPM's linear schedule (Ho et al.): beta from 1e-4 to 0.02 over 1,000 steps
BETA_START, BETA_END = 1e-4, 0.02


def schedule_facts(model: Any) -> tuple[int, str]:
    """(num_train_timesteps, beta_schedule) of a DiffusionUNet, or of a wrapper holding one as
    ``.model`` / ``.module`` (a quantized UNet, DDP, an EMA copy)."""
    seen = model
    for _ in range(4):
        n = getattr(seen, "num_train_timesteps", None)
        if n is not None:
            return int(n), str(getattr(seen, "beta_schedule", "linear"))
        inner = getattr(seen, "model", None)
        if inner is None:
            inner = getattr(seen, "module", None)
        if not isinstance(inner, torch.nn.Module):
            break
        seen = inner
    raise ValueError(f"{type(model).__name__} has no num_train_timesteps: pass a diffusion UNet "
                     "(vizoo.create_model('ddpm_digits16')) or a wrapper of one (.model)")


def make_schedulers(model: Any = None, num_train_timesteps: int | None = None,
                    beta_schedule: str | None = None) -> tuple[Any, Any]:
    """``(DDPMScheduler, DDIMScheduler)`` for ``model``'s schedule (or the given facts).

    DDIM uses diffusers' defaults otherwise: "leading" spacing (20 steps: t = 950, 900, ..., 0)
    and ``set_alpha_to_one=True`` (the last step returns the predicted x0).
    """
    try:
        from diffusers import DDIMScheduler, DDPMScheduler
    except ImportError as e:
        raise ImportError("the diffusion schedulers need diffusers: pip install 'vizoo[diffusion]'") from e
    if model is not None:
        n, schedule = schedule_facts(model)
        num_train_timesteps = num_train_timesteps or n
        beta_schedule = beta_schedule or schedule
    kwargs = dict(num_train_timesteps=int(num_train_timesteps or 1000), beta_schedule=beta_schedule or "linear",
                  beta_start=BETA_START, beta_end=BETA_END, clip_sample=True, prediction_type="epsilon")
    return DDPMScheduler(**kwargs), DDIMScheduler(**kwargs)


def alphas_cumprod(model: Any = None, num_train_timesteps: int | None = None,
                   beta_schedule: str | None = None) -> torch.Tensor:
    """alpha-bar_t for t = 0..T-1 (float32): what the forward process x_t = sqrt(a) x0 + sqrt(1-a) eps uses."""
    ddpm, _ = make_schedulers(model, num_train_timesteps, beta_schedule)
    return ddpm.alphas_cumprod.clone().float()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, acp: torch.Tensor) -> torch.Tensor:
    """The forward process q(x_t | x0) at integer timesteps ``t`` ([B]) given alpha-bar ``acp``."""
    a = acp.to(x0.device)[t.long()].view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1.0 - a).sqrt() * noise


def ddim_timesteps(model: Any = None, num_steps: int = 20) -> list[int]:
    """The DDIM timesteps (descending) that ``ddim_sample`` feeds the model with ``num_steps`` steps."""
    _, ddim = make_schedulers(model)
    ddim.set_timesteps(num_steps)
    return [int(t) for t in ddim.timesteps]
