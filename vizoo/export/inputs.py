"""Inputs for models whose inputs are not one camera image: what verification and calibration feed.

A model with several tensor inputs (a diffusion UNet's noisy sample and timestep, a model given
``example_inputs=`` explicitly) cannot be checked on photographs: a photo is not a noisy latent,
and a parity check that repeats one fixed timestep exercises one time embedding only. Inputs are
drawn here from what each input means:

- diffusion models (``export_task == "diffusion"``): x_t ~ N(0, 1), timesteps stratified over
  [0, num_train_timesteps) (one per sample, the same across a sample's batch, as a sampler feeds
  them), class labels cycling over the classes;
- models with an ``example_inputs`` hook: seeded draws of it;
- explicit example inputs (no hook): float inputs drawn as N(mean, std) of the given tensor,
  integer inputs uniform over [min, max] of the given tensor.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn

#: The number of training timesteps assumed for a diffusion model that does not say.
DEFAULT_TIMESTEPS = 1000


def model_attr(model: nn.Module, name: str, default: Any = None) -> Any:
    """An attribute of ``model`` or of the model it wraps (``model.model``: a quantized wrapper
    such as QuantUNet keeps the float model's attributes there)."""
    for m in (model, getattr(model, "model", None), getattr(model, "module", None)):
        if m is not None and getattr(m, name, None) is not None:
            return getattr(m, name)
    return default


def is_diffusion(model: nn.Module) -> bool:
    """A denoising model: ``forward(sample, timestep[, class_labels])`` predicting noise."""
    return model_attr(model, "export_task") == "diffusion"


def diffusion_inputs(example: Sequence[torch.Tensor], n: int, seed: int, num_timesteps: int,
                     num_classes: int | None = None) -> list[tuple[torch.Tensor, ...]]:
    """``n`` samples shaped like ``example`` (sample, timestep[, class_labels]).

    x_t ~ N(0, 1) (the marginal a sampler starts from; late steps are closer to data, whose
    range [-1, 1] N(0, 1) covers); timestep i is drawn in the i-th of n equal strata of
    [0, num_timesteps), so n samples always span the schedule; one timestep per sample (a
    quantized UNet selects its activation set per batch).
    """
    g = torch.Generator().manual_seed(int(seed))
    sample, timestep = example[0], example[1]
    out = []
    for i in range(n):
        x = torch.randn(sample.shape, generator=g, dtype=sample.dtype if sample.is_floating_point()
                        else torch.float32)
        u = float(torch.rand((), generator=g))
        t = min(num_timesteps - 1, int(math.floor((i + u) * num_timesteps / n)))
        ts = torch.full(timestep.shape, t, dtype=timestep.dtype)
        row: list[torch.Tensor] = [x.contiguous(), ts]
        if len(example) > 2:
            k = num_classes or int(example[2].max()) + 1
            row.append(torch.full(example[2].shape, (i + seed) % max(k, 1), dtype=example[2].dtype))
        out.append(tuple(row))
    return out


def like_inputs(example: Sequence[torch.Tensor], n: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """``n`` seeded draws resembling ``example`` (explicit inputs of a model with no hook)."""
    g = torch.Generator().manual_seed(int(seed))
    out = []
    for _ in range(n):
        row = []
        for x in example:
            if x.is_floating_point():
                std = float(x.float().std()) if x.numel() > 1 else 0.0
                mean = float(x.float().mean())
                y = torch.randn(x.shape, generator=g) * (std if std > 0 else max(abs(mean), 1.0)) + mean
                row.append(y.to(x.dtype).contiguous())
            elif x.dtype == torch.bool:
                row.append(torch.rand(x.shape, generator=g) < 0.5)
            else:
                lo, hi = int(x.min()), int(x.max())
                row.append(torch.randint(lo, hi + 1, x.shape, generator=g, dtype=x.dtype))
        out.append(tuple(row))
    return out


def draw_inputs(model: nn.Module, example: Sequence[torch.Tensor], n: int, seed: int,
                batch_size: int = 1, input_size: Any = None,
                hook: bool = True) -> tuple[list[tuple[torch.Tensor, ...]], str]:
    """``n`` input tuples for a model without one image input, and a phrase saying what they are.

    ``hook``: use the model's ``example_inputs`` hook (False when the caller gave the inputs).
    """
    if is_diffusion(model) and len(example) >= 2:
        steps = int(model_attr(model, "num_train_timesteps", DEFAULT_TIMESTEPS))
        classes = model_attr(model, "num_classes") or _num_class_embeds(model)
        samples = diffusion_inputs(example, n, seed, steps, classes)
        return samples, (f"{n} diffusion inputs: x_t ~ N(0, 1), timesteps stratified over [0, {steps}) "
                         f"(seed {seed})")
    if hook and hasattr(model, "example_inputs"):
        samples = []
        for i in range(n):
            torch.manual_seed(seed + i)
            samples.append(tuple(x.contiguous() for x in
                                 model.example_inputs(batch_size=batch_size, input_size=input_size)))
        return samples, f"{n} draws of the model's example_inputs, seeds {seed}.."
    return like_inputs(example, n, seed), (f"{n} draws resembling the given example inputs "
                                           f"(floats ~ N(mean, std), ints over [min, max]), seed {seed}")


def _num_class_embeds(model: nn.Module) -> int | None:
    unet = model_attr(model, "unet")
    cfg = getattr(unet, "config", None)
    return getattr(cfg, "num_class_embeds", None) if cfg is not None else None
