"""One config object drives a run; a YAML file, CLI flags or Python keyword arguments fill it.

Every field is a CLI flag (``lr`` -> ``--lr``, ``channels_last`` -> ``--channels-last``), so the
flags, the YAML keys and the Python keywords are the same names and can never drift apart.
Precedence: defaults < the data's recipe (``recipe``) < ``--config FILE`` < explicit flags. The run directory gets the resolved
config as ``config.yaml``; ``vizoo train --config runs/x/config.yaml`` reruns it.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml


def _f(default: Any, help: str, **meta: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    """Everything needed to (re)run a training job. Field docs are the CLI help."""

    # --- model ---
    model: str = _f("", "registered model name (see `vizoo list`)")
    pretrained: str | None = _f(None, "start from weights: 'true' (the model's configured source), a "
                                "path or a URL", nargs="?", const="true")
    num_classes: int | None = _f(None, "classifier outputs (default: the number of classes in the data)")
    in_chans: int | None = _f(None, "input channels (default: the model's, usually 3)")
    model_kwargs: dict = _f({}, "extra constructor arguments, key=value (e.g. drop_path_rate=0.1)")
    head_init_scale: float | None = _f(None, "multiply the fresh classifier's initial weights (0: zero-init, "
                                       "so training starts at uniform predictions)")
    imports: list = _f([], "Python modules to import first (they may @register_model your own models)")
    task: str = _f("auto", "task adapter (see vizoo.engine.tasks): 'auto' (the model's registered task: "
                   "detection for detectors, diffusion for diffusion UNets, else classification), classification, "
                   "detection, diffusion or module:Class")
    recipe: str = _f("auto", "preset for the fields you leave unset: 'auto' (the tuned 'digits' recipe with "
                     "--data digits, 'detection' / 'diffusion' for those tasks, none otherwise), 'digits', "
                     "'detection', 'diffusion' or 'none'")
    # --- data ---
    data: str = _f("digits", "classification: 'digits' (bundled) or a folder of images, one sub-folder per "
                   "class; detection: 'shapes' (bundled, generated on first use) or a COCO folder "
                   "(annotations/instances_{train,val}.json + train/ + val/); diffusion: 'digits16' (the "
                   "digits at 16x16) or 'digits16:x<K>' (K passes per epoch)")
    img_size: int | None = _f(None, "training/eval image size (default: 32 for digits, else the model's)")
    val_fraction: float = _f(0.2, "share of each class held out for validation when the data has no val split")
    split_seed: int = _f(0, "seed of the train/val split (kept apart from --seed so splits never move)")
    num_workers: int = _f(0, "data loading processes")
    verify_images: bool = _f(True, "open every image once before training and skip unreadable ones")
    crop_pct: float | None = _f(None, "eval center-crop fraction (default: model's; 1.0 for digits)")
    augment: bool = _f(False, "training augmentation through timm.data.create_transform")
    aug_scale: list = _f([0.08, 1.0], "random-resized-crop area range (with --augment)", nargs=2, type=float)
    aug_ratio: list = _f([0.75, 1.3333333333333333], "random-resized-crop aspect-ratio range (with --augment)",
                         nargs=2, type=float)
    hflip: float = _f(0.5, "horizontal flip probability (with --augment)")
    color_jitter: float = _f(0.4, "colour jitter strength (with --augment)")
    auto_augment: str | None = _f(None, "timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (with --augment)")
    re_prob: float = _f(0.0, "random erasing probability (with --augment)")
    # --- loss ---
    smoothing: float = _f(0.0, "label smoothing")
    mixup: float = _f(0.0, "mixup alpha (0 = off), timm.data.Mixup")
    cutmix: float = _f(0.0, "cutmix alpha (0 = off)")
    mixup_prob: float = _f(1.0, "probability of applying mixup/cutmix to a batch")
    param_norm_penalty: float = _f(0.0, "add lambda * sum of the (non-squared) L2 norms of the trainable "
                                   "tensors to the loss (CLR's regulariser: 1e-5)")
    # --- optimisation ---
    epochs: int = _f(10, "epochs to train")
    batch_size: int = _f(64, "GLOBAL batch size (all processes together, per optimizer micro-step)")
    eval_batch_size: int | None = _f(None, "evaluation batch size (default: 2x batch size)")
    accum_steps: int = _f(1, "micro-batches accumulated per optimizer step")
    opt: str = _f("adamw", "optimizer name for timm.optim.create_optimizer_v2")
    lr: float = _f(2e-3, "peak learning rate")
    weight_decay: float = _f(0.05, "weight decay (not applied to biases and norms)")
    momentum: float = _f(0.9, "momentum (SGD-style optimizers)")
    layer_decay: float | None = _f(None, "layer-wise lr decay (timm), e.g. 0.75 for ViT finetuning")
    sched: str = _f("cosine", "schedule for timm.scheduler.create_scheduler_v2 (cosine, step, constant, ...)")
    warmup_epochs: int = _f(1, "linear warmup epochs")
    warmup_lr: float = _f(1e-5, "learning rate at the start of warmup")
    min_lr: float = _f(1e-6, "final learning rate of decaying schedules")
    decay_epochs: float = _f(30, "step schedule: decay interval in epochs")
    decay_rate: float = _f(0.1, "step schedule: decay factor")
    clip_grad: float | None = _f(None, "gradient clipping threshold (off by default)")
    clip_mode: str = _f("norm", "clipping mode: norm, value or agc")
    ema: bool = _f(False, "keep an EMA of the weights (timm ModelEmaV3); evaluate and keep 'best' on it")
    ema_decay: float = _f(0.998, "EMA decay per optimizer step")
    amp: str = _f("none", "autocast: none, bf16 (CPU or GPU) or fp16 (GPU, with a grad scaler)",
                  choices=("none", "bf16", "fp16"))
    channels_last: bool = _f(False, "NHWC memory layout for model and inputs")
    freeze: list = _f([], "freeze parameters whose names match (fnmatch, or 're:REGEX')")
    trainable: list = _f([], "train ONLY parameters whose names match (fnmatch, or 're:REGEX')")
    freeze_bn_stats: bool = _f(True, "norm layers whose parameters are all frozen keep their running stats")
    train_in_eval_mode: bool = _f(False, "run the model in eval mode while training (DeiT/EViT finetune)")
    sync_bn: bool = _f(False, "SyncBatchNorm under torchrun")
    # --- run ---
    out: str | None = _f(None, "run directory (default: runs/<model>-<data>)")
    seed: int = _f(0, "seed for weights init, data order, augmentation and dropout")
    deterministic: bool = _f(True, "torch.use_deterministic_algorithms (bit-reproducible runs)")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    checkpoint_every: int = _f(0, "also checkpoint every N optimizer steps (0: every epoch only)")
    resume: str | None = _f(None, "continue a run: 'auto' (OUT's last state) or a *_state.pt file",
                            nargs="?", const="auto")
    progress: str = _f("auto", "progress bars: auto (when a TTY), on or off", choices=("auto", "on", "off"))
    plots: bool = _f(True, "draw training_curves.png every epoch and confusion_matrix.png at the end")

    # ------------------------------------------------------------------ helpers
    def validate(self) -> "TrainConfig":
        if not self.model:
            raise ValueError("no model given: `vizoo train NAME ...` (see `vizoo list`)")
        checks = [(self.epochs >= 1, "epochs must be >= 1"), (self.batch_size >= 1, "batch size must be >= 1"),
                  (self.accum_steps >= 1, "accum_steps must be >= 1"), (self.lr > 0, "lr must be > 0"),
                  (self.img_size is None or self.img_size >= 1, "img_size must be >= 1"),
                  (self.checkpoint_every >= 0, "checkpoint_every must be >= 0"),
                  (self.num_workers >= 0, "num_workers must be >= 0")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"amp must be none, bf16 or fp16, not {self.amp!r}")
        if self.progress not in ("auto", "on", "off"):
            raise ValueError(f"progress must be auto, on or off, not {self.progress!r}")
        task = infer_task(self.model, self.imports) if self.task == "auto" else self.task
        if self.data in DETECTION_DATA and task == "classification":
            raise ValueError(f"--data {self.data} is a detection dataset but {self.model} is a classification "
                             "model; train a detector on it (e.g. stageinteractor_tiny) or use --data digits / "
                             "a folder of class sub-folders")
        return self

    @property
    def run_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        data = "digits" if self.data == "digits" else Path(self.data).name or "data"
        return Path("runs") / f"{self.model.replace('/', '_')}-{data}"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        values = {k.replace("-", "_"): v for k, v in dict(values).items()}
        unknown = [k for k in values if k not in names]
        if unknown:
            hints = {k: difflib.get_close_matches(k, names, n=1) for k in unknown}
            raise ValueError("unknown config keys: " + ", ".join(
                f"{k}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items()))
        return cls(**with_recipe(values))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a mapping of config keys, not {type(values).__name__}")
        return cls.from_dict(values)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


# Tuned on the bundled digits (1,438 train / 359 val, 32 px): mobilenetv2_100_evos0 reaches
# 97.2-98.6 % best val top-1 in 10 epochs over seeds 0-5 (batch 32: 96.4-98.1 %; plain defaults
# 95.8-96.9 %, a memorised train set). Batch 16 gives 900 steps in 10 epochs. Small shifts and
# scales, never flips (they change a digit's meaning).
#
# Detection: StageInteractor's recipe (AdamW, lr 2.5e-5 at batch 16 on COCO, weight decay 1e-4,
# grad clip 1.0, linear warmup, x0.1 at epochs 8 and 11 of 12), with the lr raised to 5e-4 for
# random-init models on small data: on the bundled shapes, stageinteractor_tiny reached val AP
# 0.36 / 0.23 / 0.29 after 1,000 steps at lr 5e-4 / 2.5e-4 / 1e-3. The engine's timm scheduler
# has no milestones option, so the two steps at 2/3 and 11/12 of training are replaced by cosine
# decay to lr / 250. Horizontal flips are the only augmentation; no mixup or label smoothing.
# Without --data, detectors train on the bundled shapes (as classifiers on the digits), 9 epochs
# (3,375 steps; about 13 minutes on 2 CPU cores for stageinteractor_tiny).
#
# Diffusion (DDPM on the bundled digits at 16x16, the QuEST benchmark's FP model): AdamW 1e-3 with
# one warmup epoch and cosine decay, grad clip 1.0 (as DDPM), EMA (timm's warmup caps the decay
# near 0.994 at this length), batch 64, 12 epochs of 8 passes = 2,148 steps (72 CPU-seconds an epoch
# on one thread): val eps-MSE 0.0209; DDIM-20 samples at Frechet distance 3.4 to the real digits
# (Gaussian noise: 192, real held-out digits: 0.50) in vizoo.diffusion.metrics' feature space.
RECIPES: dict[str, dict[str, Any]] = {
    "digits": {"batch_size": 16, "lr": 5e-3, "smoothing": 0.1, "augment": True, "aug_scale": [0.8, 1.0],
               "aug_ratio": [0.9, 1.11], "hflip": 0.0, "color_jitter": 0.0, "ema": True, "ema_decay": 0.99},
    "detection": {"opt": "adamw", "lr": 5e-4, "weight_decay": 1e-4, "clip_grad": 1.0, "clip_mode": "norm",
                  "batch_size": 8, "sched": "cosine", "warmup_epochs": 1, "warmup_lr": 2e-6, "min_lr": 2e-6,
                  "augment": True, "hflip": 0.5, "mixup": 0.0, "cutmix": 0.0, "smoothing": 0.0,
                  "data": "shapes", "epochs": 9},
    "diffusion": {"data": "digits16:x8", "epochs": 12, "batch_size": 64, "opt": "adamw", "lr": 1e-3,
                  "weight_decay": 0.01, "warmup_epochs": 1, "warmup_lr": 1e-5, "min_lr": 1e-5, "clip_grad": 1.0,
                  "ema": True, "ema_decay": 0.999},
}
#: ``--data`` names of the bundled detection data (classification models cannot train on them)
DETECTION_DATA = ("shapes",)


def infer_task(model: str, imports: list | tuple = ()) -> str:
    """The task of a registered model (its ``PretrainedCfg.task``): what ``--task auto`` means.

    Models registered by ``imports`` count (they are imported here, as the Trainer would); an
    unknown name is "classification", so that the model's own error is reported where it is built.
    """
    if not model:
        return "classification"
    import importlib

    from vizoo.registry import get_pretrained_cfg

    for module in imports or ():
        importlib.import_module(module)
    try:
        return getattr(get_pretrained_cfg(model), "task", "") or "classification"
    except ValueError:  # UnknownModelError
        return "classification"


def with_recipe(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` on top of the recipe they name (``recipe: auto`` picks one from ``data`` and the
    task); ``task: auto`` (or no task) is resolved here from the model, so config.yaml records it."""
    values = dict(values)
    if values.get("task", "auto") == "auto":
        values["task"] = infer_task(values.get("model", ""), values.get("imports", ()))
    name = values.get("recipe", "auto")
    if name == "auto":
        if values["task"] in ("detection", "diffusion"):
            name = values["task"]
        else:
            name = "digits" if values.get("data", "digits") == "digits" else "none"
    if name == "none":
        return {**values, "recipe": "none"}
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: use one of auto, none, {', '.join(RECIPES)}")
    return {**RECIPES[name], **values, "recipe": name}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


# ---------------------------------------------------------------------- CLI generation
def _base_type(hint: Any) -> tuple[Any, bool]:
    """(underlying type, optional?) of a field annotation such as ``int | None``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return hint, False


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key, yaml.safe_load(value)


def add_config_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ("model",)) -> None:
    """One ``--flag`` per `TrainConfig` field; unset flags stay absent (argparse.SUPPRESS)."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        kw: dict[str, Any] = {"help": meta.pop("help", ""), "default": argparse.SUPPRESS, "dest": f.name}
        typ, _ = _base_type(hints[f.name])
        if "nargs" in meta:
            kw.update(meta)
        elif typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typ is list or typing.get_origin(typ) is list:
            kw["nargs"] = "*"
        elif typ is dict or typing.get_origin(typ) is dict:
            kw.update(nargs="*", type=_key_value, metavar="KEY=VALUE")
        else:
            kw["type"] = typ
            kw.update(meta)
        parser.add_argument(flag, **kw)


def config_from_args(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    """Apply the flags the user actually gave on top of ``base`` (or the defaults and the recipe)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if base is None and getattr(args, "model_name", None):  # `vizoo train NAME`: the task follows the model
        given.setdefault("model", args.model_name)
    if isinstance(given.get("model_kwargs"), list):
        given["model_kwargs"] = {**(base.model_kwargs if base else {}), **dict(given["model_kwargs"])}
    if base is None:
        return TrainConfig.from_dict(given)
    return dataclasses.replace(base, **given)
