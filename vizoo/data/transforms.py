"""Image transforms from a model's pretrained config, through timm's own factory.

The engine never hand-writes preprocessing: `resolve_data_config` reads input size, mean, std,
interpolation and crop from the model's ``pretrained_cfg`` and `create_transform` builds the
pipeline. What vizoo adds is the channel count (1-channel digits on a 3-channel-default model)
and an explicit input size, so that the *training* values can be written back into the model's
``pretrained_cfg`` (the exporter and apps read them from the checkpoint).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from PIL import Image


@dataclass
class DataConfig:
    """Preprocessing a model was (or will be) trained with; JSON-friendly."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    crop_mode: str = "center"

    @property
    def in_chans(self) -> int:
        return self.input_size[0]

    @property
    def img_size(self) -> int:
        return self.input_size[-1]

    def as_pretrained_cfg(self) -> dict[str, Any]:
        """The keys a model's ``pretrained_cfg`` uses (lists, so JSON round-trips unchanged)."""
        return {"input_size": list(self.input_size), "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "crop_pct": self.crop_pct}


def _fit_channels(values: tuple[float, ...], in_chans: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == in_chans:
        return values
    if in_chans == 1:  # grey input on an RGB-normalised model: the average channel
        return (sum(values) / len(values),)
    if len(values) == 1:
        return values * in_chans
    raise ValueError(f"normalisation has {len(values)} values but the model takes {in_chans} channels")


def resolve_data_cfg(pretrained_cfg: dict[str, Any] | None, img_size: int | None = None,
                     in_chans: int | None = None, crop_pct: float | None = None) -> DataConfig:
    """Preprocessing for a model: its pretrained config, with the size/channels/crop overridden."""
    from timm.data import resolve_data_config

    from vizoo.registry import PretrainedCfg

    cfg = dict(pretrained_cfg or {}) or PretrainedCfg().to_dict()  # no config: timm/ImageNet defaults
    base = resolve_data_config({}, pretrained_cfg=cfg)
    chans = in_chans or int(base["input_size"][0])
    size = int(img_size or base["input_size"][-1])
    if size < 1:
        raise ValueError(f"image size must be positive, got {size}")
    return DataConfig(
        input_size=(chans, size, size),
        mean=_fit_channels(tuple(base["mean"]), chans),
        std=_fit_channels(tuple(base["std"]), chans),
        interpolation=str(base.get("interpolation", "bicubic")),
        crop_pct=float(crop_pct if crop_pct is not None else base.get("crop_pct", 0.875)),
        crop_mode=str(base.get("crop_mode", "center") or "center"),
    )


@dataclass
class AugmentConfig:
    """Training augmentation, passed to `timm.data.create_transform(is_training=True)`.

    ``enabled=False`` trains on the evaluation transform (what tiny grey digits want: crops and
    flips change a digit's meaning). Defaults are timm's.
    """

    enabled: bool = False
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float = 0.4
    auto_augment: str | None = None
    re_prob: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def build_transform(data_cfg: DataConfig, is_training: bool = False,
                    augment: AugmentConfig | None = None) -> Callable[[Image.Image], Any]:
    """PIL image -> normalised tensor of ``data_cfg.input_size`` (timm's factory does the work)."""
    from timm.data import create_transform

    common = dict(input_size=data_cfg.input_size, interpolation=data_cfg.interpolation,
                  mean=data_cfg.mean, std=data_cfg.std)
    aug = augment or AugmentConfig()
    if is_training and aug.enabled:
        tf = create_transform(is_training=True, scale=tuple(aug.scale), ratio=tuple(aug.ratio),
                              hflip=aug.hflip, color_jitter=aug.color_jitter,
                              auto_augment=aug.auto_augment, re_prob=aug.re_prob, **aug.extra, **common)
    else:
        tf = create_transform(is_training=False, crop_pct=data_cfg.crop_pct, crop_mode=data_cfg.crop_mode,
                              **common)
    return _ConvertMode(tf, "L" if data_cfg.in_chans == 1 else "RGB")


class _ConvertMode:
    """Bring any PIL image to the mode the model takes (grey <-> RGB, palette, alpha) first."""

    def __init__(self, transform: Callable, mode: str):
        self.transform = transform
        self.mode = mode

    def __call__(self, img: Image.Image):
        if img.mode != self.mode:
            img = img.convert(self.mode)
        return self.transform(img)

    def __repr__(self) -> str:
        return f"ConvertMode({self.mode}) -> {self.transform!r}"
