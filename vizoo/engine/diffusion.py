"""The ``diffusion`` task adapter: DDPM training of a diffusion UNet on the bundled digits.

A batch is clean images x0 in [-1, 1] (+ labels); ``train_step`` draws t ~ U{0..T-1} and
eps ~ N(0, I) from torch's global generator (which the Trainer seeds and checkpoints, so a
resumed run draws the same), forms x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps and regresses eps
(MSE, Ho et al.'s simple loss). Class labels go to the UNet when it is conditional.

Evaluation is the same loss on the val images with (t, eps) drawn ONCE from a fixed seed, so the
figure of every epoch (and of every run) is measured on identical inputs
(``primary_metric = "eps_mse"``, lower is better). EMA, optimizer, schedule, checkpoints and
resume are the Trainer's; the recipe ``diffusion`` (`vizoo.engine.config.RECIPES`) is the
benchmark's FP training.

``--data digits16`` is the bundled digits at 16x16; ``digits16:x<K>`` repeats the training images
K times per epoch (each repeat with fresh t and noise), so that an epoch, and its evaluation and
checkpoint, covers a useful number of steps on a 1,438-image dataset.
"""
from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from .config import TrainConfig
from .distributed import DistEnv, all_reduce_sum
from .tasks import StepOutput, TaskAdapter, TaskData

DATA_PATTERN = re.compile(r"^digits16(?::x(\d+))?$")
#: seed of the val set's (t, noise) draws; kept apart from --seed so every run is scored alike
VAL_SEED = 0
#: the final report's epsilon MSE by timestep range: this many equal ranges of [0, T)
REPORT_BUCKETS = 10


def parse_data(data: str) -> int:
    """The repeat count of a ``digits16[:xK]`` data name (clear error for anything else)."""
    m = DATA_PATTERN.match(str(data))
    if not m or (m.group(1) is not None and int(m.group(1)) < 1):
        raise ValueError(f"the diffusion task trains on --data digits16 (the bundled digits at 16x16) or "
                         f"digits16:x<K> (K passes per epoch, e.g. digits16:x8), not {data!r}")
    return int(m.group(1) or 1)


class RepeatedImages(Dataset):
    """``(x0, label)``, the images repeated ``repeats`` times (one epoch = ``repeats`` passes)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, repeats: int = 1):
        self.x, self.y, self.repeats = x, y, int(repeats)

    def __len__(self) -> int:
        return len(self.x) * self.repeats

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = i % len(self.x)
        return self.x[j], self.y[j]


class FixedNoiseImages(Dataset):
    """``(x0, label, t, noise)`` with one (t, noise) per image drawn from ``seed``: the val inputs."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_train_timesteps: int, seed: int = VAL_SEED):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = x, y
        self.t = torch.randint(0, num_train_timesteps, (len(x),), generator=g)
        self.noise = torch.randn(x.shape, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return self.x[i], self.y[i], self.t[i], self.noise[i]


class EpsMSEMeter:
    """Sums of squared epsilon error per sample, by timestep range (exact across processes)."""

    def __init__(self, num_train_timesteps: int, buckets: int = REPORT_BUCKETS):
        self.num_train_timesteps, self.buckets = int(num_train_timesteps), int(buckets)
        self.sums = torch.zeros(2, self.buckets, dtype=torch.float64)  # [squared error, samples]

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> None:
        err = (pred.detach().float() - target.float()).pow(2).flatten(1).mean(1).double().cpu()
        b = (t.detach().cpu().long() * self.buckets // self.num_train_timesteps).clamp(0, self.buckets - 1)
        self.sums[0].index_add_(0, b, err)
        self.sums[1].index_add_(0, b, torch.ones_like(err))

    def reduce(self, env: DistEnv) -> "EpsMSEMeter":
        all_reduce_sum(self.sums, env)
        return self

    def compute(self) -> dict[str, float]:
        n = float(self.sums[1].sum())
        mse = float(self.sums[0].sum()) / max(n, 1.0)
        return {"loss": mse, "eps_mse": mse, "num_samples": int(n)}

    def by_timestep(self) -> dict[str, float | None]:
        width = self.num_train_timesteps // self.buckets
        return {f"t{b * width:04d}-{(b + 1) * width - 1:04d}":
                (float(self.sums[0, b] / self.sums[1, b]) if self.sums[1, b] > 0 else None)
                for b in range(self.buckets)}


class DiffusionTask(TaskAdapter):
    """DDPM training (epsilon MSE) of a diffusion UNet; see the module docstring."""

    name = "diffusion"
    primary_metric = "eps_mse"
    higher_is_better = False
    report_file = "diffusion_report.json"

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.conditional = False
        self.num_train_timesteps = 1000
        self.alphas_cumprod: torch.Tensor | None = None
        self.labels: list[str] | None = None

    # ---------------------------------------------------------------- data and model
    def load_data(self, cfg: TrainConfig, splits: tuple[str, ...] = ("train", "val"),
                  labels: list[str] | None = None) -> TaskData:
        from vizoo.data.digits16 import class_names, digits16

        repeats = parse_data(cfg.data)
        self.labels = class_names()
        raw = {s: digits16(s, cfg.val_fraction, cfg.split_seed) for s in splits}
        # the train split repeats; val gets its fixed (t, noise) once the model's T is known
        data = {s: RepeatedImages(x, y, repeats) if s == "train" else (x, y) for s, (x, y) in raw.items()}
        return TaskData(splits=data, labels=self.labels, source=str(cfg.data))

    def create_model(self, cfg: TrainConfig, data: TaskData) -> nn.Module:
        """The registered UNet; the number of classes comes only from --num-classes (the digits'
        10 labels must not make an unconditional model conditional)."""
        from vizoo.factory import create_model

        if cfg.in_chans not in (None, 1):
            raise ValueError(f"the digits are grey images: --in-chans must be 1 (or unset), not {cfg.in_chans}")
        pretrained = cfg.pretrained
        if isinstance(pretrained, str) and pretrained.lower() in ("true", "1", "yes"):
            pretrained = True
        kwargs = dict(cfg.model_kwargs)
        if cfg.num_classes is not None:
            kwargs["num_classes"] = cfg.num_classes
        return create_model(cfg.model, pretrained=pretrained or False, **kwargs)

    def attach_transforms(self, cfg: TrainConfig, data: TaskData, model: nn.Module) -> None:
        from vizoo.diffusion.schedule import alphas_cumprod, schedule_facts

        try:
            self.num_train_timesteps, _ = schedule_facts(model)
        except ValueError as e:
            raise ValueError(f"--task diffusion trains a diffusion UNet (e.g. ddpm_digits16): {e}") from None
        self.conditional = bool(getattr(model, "conditional", False))
        if self.conditional and getattr(model, "num_classes", 10) < len(self.labels or ()):
            raise ValueError(f"{cfg.model} embeds {model.num_classes} classes but the digits have 10")
        self.alphas_cumprod = alphas_cumprod(model)
        size = list((getattr(model, "pretrained_cfg", None) or {}).get("input_size") or [1, 16, 16])
        data_size = [1, 16, 16]
        if cfg.img_size not in (None, 16) or size != data_size:
            raise ValueError(f"{cfg.model} takes {tuple(size)} inputs; digits16 is (1, 16, 16): leave --img-size "
                             "unset (or 16)")
        for split, value in list(data.splits.items()):
            if isinstance(value, tuple):
                data.splits[split] = FixedNoiseImages(*value, self.num_train_timesteps, VAL_SEED + cfg.split_seed)
        model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), "input_size": data_size,
                                "mean": [0.5], "std": [0.5], "crop_pct": 1.0}

    # ---------------------------------------------------------------- steps
    def _noisy(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        from vizoo.diffusion.schedule import add_noise

        if self.alphas_cumprod.device != x0.device:
            self.alphas_cumprod = self.alphas_cumprod.to(x0.device)
        return add_noise(x0, noise, t, self.alphas_cumprod)

    def _predict(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(x_t, t, y) if self.conditional else model(x_t, t)

    def train_step(self, model: nn.Module, batch: Any) -> StepOutput:
        x0, y = batch
        t = torch.randint(0, self.num_train_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        pred = self._predict(model, self._noisy(x0, t, noise), t, y)
        loss = F.mse_loss(pred.float(), noise)
        return StepOutput(loss=loss, num_samples=int(x0.shape[0]))

    def new_meter(self) -> EpsMSEMeter:
        return EpsMSEMeter(self.num_train_timesteps)

    def eval_step(self, model: nn.Module, batch: Any, meter: EpsMSEMeter) -> None:
        x0, y, t, noise = batch
        meter.update(self._predict(model, self._noisy(x0, t, noise), t, y), noise, t)

    def final_report(self, meter: EpsMSEMeter) -> dict[str, Any]:
        return {**meter.compute(), "eps_mse_by_timestep": meter.by_timestep(),
                "inputs": f"each val image once, t and noise drawn with seed {VAL_SEED + self.cfg.split_seed}",
                "conditional": self.conditional}

    @property
    def checkpoint_labels(self) -> list[str] | None:
        return self.labels if self.conditional else None
