"""The benchmark's full-precision diffusion model: trained once through the engine, then reused.

`train_fp_model` is ``vizoo train ddpm_digits16`` (the ``diffusion`` recipe: DDPM on the digits
at 16x16, AdamW, EMA) with a fixed run directory: a finished run is reused, an interrupted one is
resumed, so a benchmark can call it every time. `sample_report` checks that the model draws
digits (Frechet distance to real digits beside Gaussian noise's and real held-out digits', the
class histogram of its samples) and writes a grid of samples.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

#: settings whose change makes an existing run a different model (it is then not reused); more
#: epochs than a finished run had continue it
_IDENTITY_KEYS = ("model", "model_kwargs", "data", "seed", "batch_size", "lr", "ema", "ema_decay", "weight_decay")


def fp_model_name(conditional: bool = False) -> str:
    return "ddpm_digits16_cond" if conditional else "ddpm_digits16"


def train_fp_model(out_dir: str | os.PathLike = "runs/quest_fp", *, epochs: int | None = None,
                   repeats: int | None = None, batch_size: int | None = None, lr: float | None = None,
                   seed: int = 0, conditional: bool = False, num_threads: int | None = None,
                   progress: str = "auto", **overrides: Any) -> Path:
    """Train (or reuse, or resume) the FP UNet in ``out_dir``; returns its EMA weights
    (``last_ema.safetensors``, loadable with `vizoo.hub.load_model`).

    Unset arguments take the ``diffusion`` recipe (12 epochs x 8 passes of the 1,438 training
    digits, batch 64 = 2,148 steps; measured: 72 CPU-seconds per epoch on one thread, about 15
    minutes). ``num_threads`` sets torch's CPU threads for the run only; give 2 only on an idle
    2-core machine: with other jobs running, 2 threads measured 4x slower than 1 (OpenMP threads
    waiting on each other). ``overrides`` are further `TrainConfig` fields.
    """
    from vizoo.engine.config import TrainConfig
    from vizoo.engine.trainer import train

    values: dict[str, Any] = {"model": fp_model_name(conditional), "task": "diffusion", "out": str(out_dir),
                              "seed": seed, "resume": "auto", "progress": progress, **overrides}
    for key, value in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr)):
        if value is not None:
            values[key] = value
    if repeats is not None:
        values["data"] = f"digits16:x{int(repeats)}"
    cfg = TrainConfig.from_dict(values)
    done = finished_checkpoint(cfg)
    if done is not None:
        return done
    with torch_threads(num_threads):
        result = train(cfg)
    path = result.run_dir / ("last_ema.safetensors" if cfg.ema else "last.safetensors")
    if not path.is_file():
        raise RuntimeError(f"training finished but {path} is missing; rerun to resume from {result.run_dir}")
    return path


def finished_checkpoint(cfg: Any) -> Path | None:
    """The final weights of a finished run of ``cfg`` in ``cfg.out``; None when there is none yet
    (or it stopped early: the Trainer resumes it). Raises if the directory holds another model."""
    from vizoo.hub import read_sidecar

    path = Path(cfg.run_dir) / ("last_ema.safetensors" if cfg.ema else "last.safetensors")
    if not path.is_file():
        return None
    meta = read_sidecar(path)
    saved = meta.get("train_config") or {}
    wanted = cfg.to_dict()
    changed = [k for k in _IDENTITY_KEYS if k in saved and saved[k] != wanted[k]]
    if changed:
        found = ", ".join(f"{k}={saved[k]!r}" for k in changed)
        raise ValueError(f"{cfg.run_dir} holds a run with other settings ({found}); choose another out_dir or "
                         "delete that run")
    finished = meta.get("epoch") == cfg.epochs and meta.get("batch_in_epoch", 0) == 0
    return path if finished else None


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads (None: leave them)."""
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_fp_model(path: str | os.PathLike) -> nn.Module:
    """The FP UNet of a checkpoint written by `train_fp_model`, in eval mode."""
    from vizoo.hub import load_model

    return load_model(path).eval()


@torch.no_grad()
def sample_report(model: nn.Module, out_dir: str | os.PathLike | None = None, num_samples: int = 512,
                  num_steps: int = 20, seed: int = 0, progress: bool | str = False) -> dict[str, Any]:
    """Sample ``num_samples`` digits with DDIM and measure them against the real digits.

    Frechet distances (feature net space, real reference = all 1,797 digits) of: the samples, pure
    Gaussian noise (the ceiling) and the real val digits (the floor at that sample size). With
    ``out_dir``: ``samples.png`` (64 samples) and ``sample_report.json``.
    """
    from .metrics import classify_digits, digit_features, frechet_distance, load_feature_net, real_digit_features
    from .sampling import ddim_sample, save_image_grid
    from vizoo.data.digits16 import digits16

    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(num_samples, 1, 16, 16, generator=g)
    labels = torch.arange(num_samples) % 10 if getattr(model, "conditional", False) else None
    images = ddim_sample(model, noise, num_steps=num_steps, class_labels=labels, progress=progress).images
    net = load_feature_net()
    real = real_digit_features(net, "all")
    predicted = classify_digits(images, net)
    report: dict[str, Any] = {
        "num_samples": num_samples, "num_steps": num_steps, "seed": seed,
        "fd_samples": frechet_distance(digit_features(images, net), real),
        "fd_gaussian_noise": frechet_distance(digit_features(noise.clamp(-1, 1), net), real),
        "fd_real_val": frechet_distance(digit_features(digits16("val")[0], net), real),
        "class_histogram": torch.bincount(predicted, minlength=10).tolist(),
        "feature_net_val_accuracy": getattr(net, "val_accuracy", None),
    }
    if labels is not None:
        report["class_accuracy"] = float((predicted == labels).float().mean())
    if out_dir is not None:
        from vizoo.io import write_json_atomic

        out = Path(out_dir)
        save_image_grid(images[:64], out / "samples.png", nrow=8, scale=4)
        write_json_atomic(out / "sample_report.json", report)
    return report
