"""Sample-quality and fidelity metrics for the diffusion benchmark (offline, CPU).

FID needs Inception weights, which cannot be downloaded here, so the Frechet distance is taken in
the feature space of a small CNN trained on the REAL bundled digits (`DigitFeatureNet`, specs
§3.10 (c)): the same statistic (Gaussian fits of features, Frechet distance between them), a
feature space that knows what a digit looks like. It trains once (< 1 minute) and is cached as
safetensors. The classifier's predictions also give the class histogram of unconditional samples
and the class accuracy of conditional ones.

Fidelity to the FP model: `eps_mse` (epsilon prediction error on the same inputs) and `psnr`
(final samples from the same noise).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ArrayLike = torch.Tensor | np.ndarray

# ---------------------------------------------------------------------- feature network
#: how the feature net is trained; the cache file name is a hash of this, so a change retrains
_RECIPE = {"version": 1, "widths": (16, 32, 64, 64), "feature_dim": 64, "epochs": 15, "batch_size": 64,
           "lr": 3e-3, "weight_decay": 1e-4, "shift": 1, "seed": 0, "split_seed": 0, "val_fraction": 0.2}
#: below this val accuracy the features are not trusted (the contract of the benchmark)
MIN_VAL_ACCURACY = 0.95


class DigitFeatureNet(nn.Module):
    """A small CNN for 16x16 digits in [-1, 1]: ``features`` (penultimate, [N, D]) and ``logits``."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 64), feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        c1, c2, c3, c4 = widths

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(*block(1, c1), *block(c1, c2), nn.MaxPool2d(2),   # 8x8
                                  *block(c2, c3), nn.MaxPool2d(2),                  # 4x4
                                  *block(c3, c4), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                  nn.Linear(c4 * 4, feature_dim), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))

    forward = logits


def default_cache_dir() -> Path:
    """``$VIZOO_CACHE``, else ``$XDG_CACHE_HOME/vizoo`` (``~/.cache/vizoo``)."""
    base = os.environ.get("VIZOO_CACHE")
    if base:
        return Path(base).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "vizoo"


def feature_net_path(cache_dir: str | os.PathLike | None = None) -> Path:
    digest = hashlib.sha1(json.dumps(_RECIPE, sort_keys=True).encode()).hexdigest()[:10]
    return Path(cache_dir or default_cache_dir()) / f"digit_feature_net-{digest}.safetensors"


def load_feature_net(cache_dir: str | os.PathLike | None = None, verbose: bool = False) -> DigitFeatureNet:
    """The feature net in eval mode, trained on first use (< 1 minute) and cached as safetensors.

    Concurrent first uses each train the same deterministic net and write it atomically, so the
    cache is never half-written.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = feature_net_path(cache_dir)
    net = DigitFeatureNet(_RECIPE["widths"], _RECIPE["feature_dim"])
    if path.is_file():
        try:
            net.load_state_dict(load_file(str(path)))
            with safe_open(str(path), "pt") as f:
                net.val_accuracy = float((f.metadata() or {}).get("val_accuracy", "nan"))
            return _frozen(net)
        except Exception as e:  # noqa: BLE001 - a corrupt cache file is retrained, never trusted
            if verbose:
                print(f"retraining the digit feature net: {path} is unreadable ({e})")
    net, acc, seconds = train_feature_net()
    if acc < MIN_VAL_ACCURACY:
        raise RuntimeError(f"the digit feature net reached only {100 * acc:.1f}% val accuracy (needs "
                           f"{100 * MIN_VAL_ACCURACY:.0f}%); its features would not measure digit quality. "
                           "Report this as a bug (the recipe is in vizoo.diffusion.metrics._RECIPE).")
    from vizoo.io import save_safetensors_atomic

    save_safetensors_atomic(net.state_dict(), path, metadata={"val_accuracy": f"{acc:.4f}",
                                                              "recipe": json.dumps(_RECIPE)})
    if verbose:
        print(f"trained the digit feature net in {seconds:.0f}s: val accuracy {100 * acc:.1f}% -> {path}")
    net.val_accuracy = acc
    return _frozen(net)


def _frozen(net: DigitFeatureNet) -> DigitFeatureNet:
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def train_feature_net(recipe: dict[str, Any] | None = None) -> tuple[DigitFeatureNet, float, float]:
    """Train on the real digits' train split (random 1-pixel shifts); returns (net, val accuracy, s).

    Deterministic (own seeds, global RNG untouched), so every process builds the same net.
    """
    from vizoo.data.digits16 import digits16

    r = {**_RECIPE, **(recipe or {})}
    t0 = time.perf_counter()
    x_train, y_train = digits16("train", r["val_fraction"], r["split_seed"])
    x_val, y_val = digits16("val", r["val_fraction"], r["split_seed"])
    gen = torch.Generator().manual_seed(r["seed"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(r["seed"])
        net = DigitFeatureNet(r["widths"], r["feature_dim"])
        opt = torch.optim.AdamW(net.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
        steps = r["epochs"] * (len(x_train) // r["batch_size"])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=steps, pct_start=0.15)
        net.train()
        for _ in range(r["epochs"]):
            order = torch.randperm(len(x_train), generator=gen)
            for i in range(len(x_train) // r["batch_size"]):
                idx = order[i * r["batch_size"]:(i + 1) * r["batch_size"]]
                x = _random_shift(x_train[idx], r["shift"], gen)
                loss = F.cross_entropy(net.logits(x), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    net.eval()
    with torch.no_grad():
        acc = float((net.logits(x_val).argmax(1) == y_val).float().mean())
    return net, acc, time.perf_counter() - t0


def _random_shift(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``shift`` pixels (background -1 fills in): generated digits are
    not centred exactly like the data's."""
    if shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


@torch.no_grad()
def digit_features(images: torch.Tensor, net: DigitFeatureNet | None = None, batch_size: int = 512) -> torch.Tensor:
    """Feature-net features ``[N, D]`` of images in [-1, 1] (loads the cached net if not given)."""
    net = net if net is not None else load_feature_net()
    x = images.detach().float().cpu().clamp(-1, 1)
    return torch.cat([net.features(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def classify_digits(images: torch.Tensor, net: DigitFeatureNet | None = None, batch_size: int = 512) -> torch.Tensor:
    """Predicted digit ``[N]`` of images in [-1, 1]."""
    net = net if net is not None else load_feature_net()
    x = images.detach().float().cpu().clamp(-1, 1)
    return torch.cat([net.logits(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def real_digit_features(net: DigitFeatureNet | None = None, split: str = "all") -> torch.Tensor:
    """Features of the real bundled digits (``split`` train, val or all): the reference set."""
    from vizoo.data.digits16 import digits16

    return digit_features(digits16(split)[0], net)


def frechet_to_digits(images: torch.Tensor, net: DigitFeatureNet | None = None, split: str = "all") -> float:
    """Frechet distance between ``images`` and the real digits in the feature net's space."""
    net = net if net is not None else load_feature_net()
    return frechet_distance(digit_features(images, net), real_digit_features(net, split))


# ---------------------------------------------------------------------- Frechet distance
def gaussian_stats(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64, unbiased) of ``[N, D]`` features."""
    f = _as_numpy(features)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance_from_stats(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray,
                                eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^1/2): the Frechet distance of two Gaussians.

    As in FID: the real part of ``scipy.linalg.sqrtm``; a product too singular for it (ReLU
    features with units that never fire give singular covariances) is regularised with ``eps`` on
    the diagonals.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    cov1, cov2 = np.atleast_2d(cov1).astype(np.float64), np.atleast_2d(cov2).astype(np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape:
        raise ValueError(f"statistics of different dimension: {mu1.shape} vs {mu2.shape}")
    covmean = _sqrtm(cov1 @ cov2)
    if covmean is None:  # the distance of the regularised pair (traces included: identical -> 0)
        cov1, cov2 = cov1 + np.eye(len(cov1)) * eps, cov2 + np.eye(len(cov2)) * eps
        covmean = _sqrtm(cov1 @ cov2, strict=False)
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean))


def _sqrtm(a: np.ndarray, strict: bool = True) -> np.ndarray | None:
    """``scipy.linalg.sqrtm``; None (strict) when scipy finds the matrix singular or the result is
    not finite."""
    import warnings

    from scipy import linalg

    with warnings.catch_warnings():
        warnings.simplefilter("error" if strict else "ignore", linalg.LinAlgWarning)
        try:
            root = linalg.sqrtm(a)
        except linalg.LinAlgWarning:
            return None
    return root if not strict or np.isfinite(root).all() else None


def frechet_distance(feat_a: ArrayLike, feat_b: ArrayLike) -> float:
    """Frechet distance between Gaussian fits of two feature sets ``[N, D]`` and ``[M, D]``."""
    return frechet_distance_from_stats(*gaussian_stats(feat_a), *gaussian_stats(feat_b))


def _as_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


# ---------------------------------------------------------------------- fidelity to the FP model
def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean over images of the per-image PSNR in dB (``data_range`` 2 for [-1, 1] data); inf when
    every image is identical."""
    if a.shape != b.shape:
        raise ValueError(f"psnr of tensors of different shapes {tuple(a.shape)} and {tuple(b.shape)}")
    mse = (a.detach().double() - b.detach().double()).pow(2).flatten(1).mean(1)
    return float((10.0 * torch.log10(data_range ** 2 / mse)).mean())


@torch.no_grad()
def eps_mse_by_timestep(model: Callable[..., torch.Tensor], reference: Callable[..., torch.Tensor] | torch.Tensor,
                        x_t: torch.Tensor, t: torch.Tensor | int, class_labels: torch.Tensor | None = None,
                        batch_size: int = 64) -> dict[int, float]:
    """Mean squared error between ``model``'s epsilon and ``reference`` (a model, or the target
    epsilon as a tensor like ``x_t``) on the inputs ``(x_t, t)``, per timestep.

    Each model call holds one timestep (a quantized UNet picks its activation parameters by it).
    """
    t = torch.as_tensor(t).long().reshape(-1)
    if len(t) == 1 and len(x_t) != 1:
        t = t.expand(len(x_t))
    if len(t) != len(x_t):
        raise ValueError(f"t has {len(t)} entries for {len(x_t)} inputs")
    if isinstance(reference, torch.Tensor) and reference.shape != x_t.shape:
        raise ValueError(f"reference epsilon has shape {tuple(reference.shape)}, x_t {tuple(x_t.shape)}")
    out = {}
    for tv in sorted(set(t.tolist()), reverse=True):
        idx = (t == tv).nonzero().flatten()
        sq, count = 0.0, 0
        for i in range(0, len(idx), batch_size):
            j = idx[i:i + batch_size]
            x = x_t[j]
            tt = torch.full((len(j),), tv, dtype=torch.long, device=x.device)
            args = (x, tt) if class_labels is None else (x, tt, class_labels[j])
            ref = reference[j] if isinstance(reference, torch.Tensor) else reference(*args)
            sq += float((model(*args).double() - ref.double()).pow(2).sum())
            count += x.numel()
        out[int(tv)] = sq / count
    return out


def eps_mse(model: Callable[..., torch.Tensor], reference: Callable[..., torch.Tensor] | torch.Tensor,
            x_t: torch.Tensor, t: torch.Tensor | int, class_labels: torch.Tensor | None = None,
            batch_size: int = 64) -> float:
    """Epsilon MSE over all inputs (every input weighs the same; see `eps_mse_by_timestep`)."""
    per_t = eps_mse_by_timestep(model, reference, x_t, t, class_labels, batch_size)
    tt = torch.as_tensor(t).long().reshape(-1)
    counts = {int(v): int(c) for v, c in zip(*torch.unique(tt, return_counts=True))}
    if len(tt) == 1:
        counts = {int(tt): len(x_t)}
    return sum(per_t[v] * counts[v] for v in per_t) / sum(counts.values())
