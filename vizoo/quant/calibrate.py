"""Data-free calibration: the FP model's own sampling trajectories (specs §3.4).

QuEST needs no training images: it samples from Gaussian noise with the FP model and keeps the
UNet inputs (x_t, t[, class]) at evenly spaced sampler steps. A :class:`CalibrationSet` holds them
step-major ([S, N, ...]) because per-step activation parameters want one timestep per batch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn

__all__ = ["CalibrationSet", "collect_calibration", "fp_eps_of"]

Batch = tuple  # (x_t, t, class_labels | None, step_index[, fp_eps])


@dataclass
class CalibrationSet:
    """UNet inputs kept from FP sampling trajectories.

    ``x``: [S, N, C, H, W]; ``t``: [S] long, descending (the kept sampler timesteps);
    ``class_labels``: [S, N] or None; ``fp_eps``: the FP model's ε on the same inputs
    ([S, N, C, H, W]) or None.
    """

    x: torch.Tensor
    t: torch.Tensor
    class_labels: torch.Tensor | None = None
    fp_eps: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.x.ndim < 3 or self.x.shape[0] != self.t.numel():
            raise ValueError(f"CalibrationSet: x {tuple(self.x.shape)} must be [S, N, ...] with S = len(t) = "
                             f"{self.t.numel()}")
        self.t = self.t.long().reshape(-1)

    @property
    def num_steps(self) -> int:
        return self.x.shape[0]

    @property
    def num_samples(self) -> int:
        """Samples per step (N)."""
        return self.x.shape[1]

    def _labels(self, step: int, index: torch.Tensor | slice) -> torch.Tensor | None:
        return None if self.class_labels is None else self.class_labels[step][index]

    def step(self, step: int, max_samples: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(x_t, t, class_labels) of the first ``max_samples`` samples of one step."""
        index = slice(0, max_samples)
        x = self.x[step][index]
        return x, self.t[step].expand(x.shape[0]).clone(), self._labels(step, index)

    def flat(self, max_per_step: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """All steps in one batch (mixed timesteps: only for single-set or weight-only use)."""
        parts = [self.step(s, max_per_step) for s in range(self.num_steps)]
        labels = None if self.class_labels is None else torch.cat([p[2] for p in parts])
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), labels

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0,
                return_eps: bool = False) -> Iterator[Batch]:
        """Yield ``(x_t, t, class_labels, step_index)`` batches with ONE timestep each.

        ``shuffle`` permutes samples within each step and the order of the (step, chunk) batches;
        ``return_eps`` appends the FP ε of the batch (needs ``fp_eps``).
        """
        if return_eps and self.fp_eps is None:
            raise ValueError("CalibrationSet has no fp_eps: collect it with with_eps=True or call with_fp_eps(model)")
        gen = torch.Generator().manual_seed(seed)
        n = self.num_samples
        jobs = []
        for step in range(self.num_steps):
            order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
            jobs += [(step, order[i:i + batch_size]) for i in range(0, n, batch_size)]
        if shuffle:
            jobs = [jobs[i] for i in torch.randperm(len(jobs), generator=gen).tolist()]
        for step, index in jobs:
            batch = (self.x[step][index], self.t[step].expand(len(index)).clone(), self._labels(step, index), step)
            yield batch + (self.fp_eps[step][index],) if return_eps else batch

    def subset(self, steps: list[int] | None = None, samples: slice | torch.Tensor | None = None) -> "CalibrationSet":
        """A smaller set (some steps and/or some samples of every step), sharing no storage."""
        steps_idx = torch.arange(self.num_steps) if steps is None else torch.as_tensor(steps, dtype=torch.long)
        pick = slice(None) if samples is None else samples

        def take(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor[steps_idx][:, pick].clone()
        return CalibrationSet(take(self.x), self.t[steps_idx].clone(), take(self.class_labels), take(self.fp_eps))

    def with_fp_eps(self, fp_model: nn.Module, batch_size: int = 64) -> "CalibrationSet":
        """This set with ``fp_eps`` computed by ``fp_model`` (the finetuning labels)."""
        return CalibrationSet(self.x, self.t, self.class_labels, fp_eps_of(fp_model, self, batch_size))

    def to(self, device: torch.device | str) -> "CalibrationSet":
        move = (lambda v: None if v is None else v.to(device))
        return CalibrationSet(move(self.x), move(self.t), move(self.class_labels), move(self.fp_eps))

    def save(self, path: str | os.PathLike) -> None:
        from vizoo.io import save_safetensors_atomic
        tensors = {"x": self.x, "t": self.t}
        if self.class_labels is not None:
            tensors["class_labels"] = self.class_labels
        if self.fp_eps is not None:
            tensors["fp_eps"] = self.fp_eps
        save_safetensors_atomic(tensors, path, metadata={"format": "vizoo.quant.CalibrationSet"})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibrationSet":
        from safetensors.torch import load_file
        data = load_file(str(path))
        return cls(data["x"], data["t"], data.get("class_labels"), data.get("fp_eps"))


@torch.no_grad()
def fp_eps_of(model: nn.Module, calib: CalibrationSet, batch_size: int = 64) -> torch.Tensor:
    """``model``'s ε on every calibration input, [S, N, ...] (one timestep per forward)."""
    device = next(model.parameters()).device
    out = torch.empty_like(calib.x)
    for step in range(calib.num_steps):
        for i in range(0, calib.num_samples, batch_size):
            index = slice(i, i + batch_size)
            x = calib.x[step][index].to(device)
            labels = calib._labels(step, index)
            t = calib.t[step].expand(x.shape[0]).to(device)
            out[step][index] = model(x, t, None if labels is None else labels.to(device)).to(out.device)
    return out


def _sample_shape(model: nn.Module) -> tuple[int, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" in cfg:
        return tuple(cfg["input_size"])
    unet = getattr(model, "unet", model)
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (unet.config.in_channels,) + size


def _default_labels(model: nn.Module, n: int) -> torch.Tensor | None:
    """Balanced class labels for a conditional model (0, 1, …, K−1, 0, …), None otherwise."""
    if not getattr(model, "conditional", False):
        return None
    unet = getattr(model, "unet", model)
    return torch.arange(n) % int(unet.config.num_class_embeds)


def collect_calibration(fp_model: nn.Module, n_samples: int, num_steps: int = 20, keep_every: int = 2,
                        seed: int = 0, class_labels: torch.Tensor | None = None, progress: bool | str = False,
                        batch_size: int = 64, with_eps: bool = True) -> CalibrationSet:
    """Sample ``n_samples`` trajectories with DDIM (η = 0) from seeded noise; keep every ``keep_every``-th step.

    Steps ``range(0, num_steps, keep_every)`` are kept, as the official ``get_train_samples``
    (``range(0, n_steps, n_steps // cali_st)``). ``with_eps`` also stores the FP ε (finetuning labels).
    """
    from vizoo.diffusion.sampling import ddim_sample

    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((n_samples,) + _sample_shape(fp_model), generator=gen)
    if class_labels is None:
        class_labels = _default_labels(fp_model, n_samples)
    training = fp_model.training
    fp_model.eval()
    try:
        result = ddim_sample(fp_model, noise, num_steps, eta=0.0, class_labels=class_labels, record=True,
                             progress="calibration" if progress is True else progress, batch_size=batch_size)
    finally:
        fp_model.train(training)
    kept = list(range(0, len(result.timesteps), keep_every))
    x = torch.stack([result.inputs[i].detach().cpu() for i in kept])
    t = torch.tensor([int(result.timesteps[i]) for i in kept], dtype=torch.long)
    labels = None if class_labels is None else class_labels.cpu().long().expand(len(kept), -1).clone()
    calib = CalibrationSet(x, t, labels)
    if with_eps:
        fp_model.eval()
        try:
            calib = calib.with_fp_eps(fp_model, batch_size)
        finally:
            fp_model.train(training)
    return calib
