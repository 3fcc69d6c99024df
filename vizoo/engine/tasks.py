"""Task adapters: what a batch is, what the loss is, what is measured.

The Trainer owns everything a task does not change: device and DDP, autocast, gradient
accumulation and clipping, optimizer/scheduler/EMA, freezing, checkpoints and resume, logging.
A task adapter owns the rest, through this interface (`TaskAdapter`):

==========================  ============================================================
``load_data(cfg)``          raw datasets by split + label names (before the model exists,
                            so the number of classes can size the model's head)
``create_model(cfg, data)`` build the model (default: `vizoo.create_model`)
``attach_transforms(...)``  preprocessing from the model's pretrained config; writes the
                            *training* input size/mean/std back into ``model.pretrained_cfg``
``collate_fn``              how samples become a batch (None: torch's default)
``to_device(batch, ...)``   move a batch (tensors, lists of dicts...) to the device
``train_step(model, b)``    forward + loss -> `StepOutput` (called under autocast)
``new_meter()``             an accumulator of evaluation sums with ``update``-style use in
``eval_step(model, b, m)``  and ``reduce(env)`` (sum across processes) + ``compute()``
``param_groups(model)``     optional optimizer groups (None: timm's weight-decay grouping)
``final_report(meter)``     end-of-run record of the best weights (classification: per-class
                            accuracy and confusion matrix -> confusion_matrix.json/.png)
``checkpoint_labels``       class names stored in checkpoints (None when not meaningful)
``primary_metric``          key of ``compute()`` that picks the best checkpoint
``higher_is_better``        direction of ``primary_metric``
==========================  ============================================================

How the other methods of the zoo plug in (as each method's paper and official code train it):

- **Detection (StageInteractor)**: ``load_data`` reads COCO-json (procedural shapes bundled);
  a batch is ``(images padded to a common size, [target dicts with boxes/labels/img_size]))``
  via its own ``collate_fn`` and ``to_device``; ``train_step`` runs all decoder stages, the
  per-stage Hungarian matching and cross-stage label assignment, and returns the summed stage
  losses with each term in ``logs``; the meter collects detections and scores COCO AP
  (``primary_metric = "AP"``); the recipe's AdamW + grad-clip 1.0 + frozen stem are plain config
  (``clip_grad``, ``freeze``).
- **Diffusion finetuning (QuEST)**: ``load_data`` yields calibration tuples ``(x_t, t, cond)``
  sampled from the full-precision model; ``train_step`` returns local (layer-output) MSE +
  global epsilon MSE against the FP teacher; the two phases (time-embedding layers, then
  attention layers) are two Trainer runs with different ``trainable`` patterns, and
  ``param_groups`` gives weights lr 1e-5 and activation scales lr 1e-4; the meter reports
  epsilon-MSE versus FP per timestep (``primary_metric = "eps_mse"``, lower is better).
- **Continual learning (CLR)**: `vizoo.continual.sequence.run_sequence` is the outer loop over a
  task sequence: ``model.add_task`` (which also sets what trains: CLR kernels, norms and the head,
  or all of it for the baselines that finetune), then one Trainer run of the ``continual``
  adapter (`vizoo.engine.continual.ContinualTask`: classification on one task's in-memory
  tensors, no augmentation, CE + ``param_norm_penalty``), best-val weights kept, the task's state
  saved alone, and the accuracy matrix updated on every task seen so far (frozen norms stay in
  eval through ``freeze_bn_stats``).

Model hook: if the unwrapped model defines ``on_train_step(epoch_progress: float)``, the Trainer
calls it before every training forward pass with the epochs elapsed as a fraction (epoch 2,
batch 5 of 20 -> 2.25); EViT's keep-rate schedule uses it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import TrainConfig
from .metrics import ClassificationMeter, accuracy_report


@dataclass
class StepOutput:
    """What one training forward gives the Trainer."""

    loss: torch.Tensor
    num_samples: int
    logs: dict[str, float] = field(default_factory=dict)


@dataclass
class TaskData:
    """Datasets by split (``train``/``val`` after transforms), label names, and their source."""

    splits: dict[str, Any]
    labels: list[str] | None
    source: str = ""

    @property
    def num_classes(self) -> int | None:
        return len(self.labels) if self.labels is not None else None


class TaskAdapter:
    """Base class of task adapters; see the module docstring for the contract."""

    name = "base"
    primary_metric = "loss"
    higher_is_better = False
    collate_fn: Callable | None = None
    #: where ``final_report`` is written in the run directory
    report_file = "confusion_matrix.json"
    #: DDP option for models whose forward leaves some parameters unused (StageInteractor's config sets it)
    ddp_find_unused_parameters = False

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def load_data(self, cfg: TrainConfig, splits: tuple[str, ...] = ("train", "val"),
                  labels: list[str] | None = None) -> TaskData:
        raise NotImplementedError(f"{type(self).__name__} must implement load_data (a task adapter's data)")

    def create_model(self, cfg: TrainConfig, data: TaskData) -> nn.Module:
        from vizoo.factory import create_model

        pretrained = cfg.pretrained
        if isinstance(pretrained, str) and pretrained.lower() in ("true", "1", "yes"):
            pretrained = True
        kwargs = dict(cfg.model_kwargs)
        if cfg.num_classes or data.num_classes:
            kwargs["num_classes"] = cfg.num_classes or data.num_classes
        return create_model(cfg.model, pretrained=pretrained or False, in_chans=cfg.in_chans or 3, **kwargs)

    def attach_transforms(self, cfg: TrainConfig, data: TaskData, model: nn.Module) -> None:
        pass

    def to_device(self, batch: Any, device: torch.device, channels_last: bool = False) -> Any:
        return _to_device(batch, device, channels_last)

    def train_step(self, model: nn.Module, batch: Any) -> StepOutput:
        raise NotImplementedError(f"{type(self).__name__} must implement train_step (loss of one batch)")

    def new_meter(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement new_meter (evaluation state)")

    def eval_step(self, model: nn.Module, batch: Any, meter: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement eval_step (update the meter)")

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]] | None:
        return None

    def final_report(self, meter: Any) -> dict[str, Any] | None:
        """The end-of-run evaluation record of the best weights (None: nothing beyond metrics.jsonl)."""
        return None

    @property
    def checkpoint_labels(self) -> list[str] | None:
        return None


def _to_device(batch: Any, device: torch.device, channels_last: bool) -> Any:
    if isinstance(batch, torch.Tensor):
        non_blocking = device.type == "cuda"
        if channels_last and batch.dim() == 4:
            return batch.to(device, non_blocking=non_blocking, memory_format=torch.channels_last)
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device, channels_last) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device, channels_last) for k, v in batch.items()}
    return batch


class ClassificationTask(TaskAdapter):
    """Images -> class logits; cross-entropy (timm losses, Mixup/CutMix); top-1/top-5/confusion."""

    name = "classification"
    primary_metric = "top1"
    higher_is_better = True

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.labels: list[str] | None = None
        self.mixup = None
        self.train_loss_fn: nn.Module | None = None

    # ---------------------------------------------------------------- data and model
    def load_data(self, cfg: TrainConfig, splits: tuple[str, ...] = ("train", "val"),
                  labels: list[str] | None = None) -> TaskData:
        from vizoo.data.loaders import build_datasets

        raw = build_datasets(cfg.data, img_size=resolved_img_size(cfg, None), in_chans=cfg.in_chans or 3,
                             val_fraction=cfg.val_fraction, split_seed=cfg.split_seed, classes=labels,
                             verify=cfg.verify_images, splits=splits)
        self.labels = list(raw.pop("classes"))
        return TaskData(splits=raw, labels=self.labels, source=str(cfg.data))

    def attach_transforms(self, cfg: TrainConfig, data: TaskData, model: nn.Module) -> None:
        from vizoo.data.loaders import TransformedDataset
        from vizoo.data.transforms import AugmentConfig, build_transform, resolve_data_cfg

        crop = cfg.crop_pct if cfg.crop_pct is not None else (1.0 if cfg.data == "digits" else None)
        dcfg = resolve_data_cfg(getattr(model, "pretrained_cfg", None), resolved_img_size(cfg, model),
                                cfg.in_chans or _model_in_chans(model), crop)
        model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), **dcfg.as_pretrained_cfg(),
                                "num_classes": getattr(model, "num_classes", data.num_classes)}
        aug = AugmentConfig(enabled=cfg.augment, scale=tuple(cfg.aug_scale), ratio=tuple(cfg.aug_ratio),
                            hflip=cfg.hflip,
                            color_jitter=cfg.color_jitter, auto_augment=cfg.auto_augment, re_prob=cfg.re_prob)
        for split, ds in list(data.splits.items()):
            training = split == "train"
            tf = build_transform(dcfg, is_training=training, augment=aug)
            # Random transforms are seeded per (seed, epoch, index): exact resume at any worker count.
            seed = cfg.seed if training and cfg.augment else None
            small = len(ds) * dcfg.in_chans * dcfg.img_size ** 2 * 4 <= _CACHE_BYTES
            data.splits[split] = TransformedDataset(ds, tf, seed=seed, cache=small and seed is None,
                                                    seed_numpy=bool(cfg.auto_augment))
        self.data_cfg = dcfg
        n_cls = getattr(model, "num_classes", None) or data.num_classes
        if cfg.mixup > 0 or cfg.cutmix > 0:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                               label_smoothing=cfg.smoothing, num_classes=n_cls)
        self.train_loss_fn = classification_loss(cfg)

    # ---------------------------------------------------------------- steps
    def train_step(self, model: nn.Module, batch: Any) -> StepOutput:
        x, y = batch
        if self.mixup is not None and x.shape[0] % 2 == 0:
            x, y = self.mixup(x, y)
        logits = model(x)
        loss = self.train_loss_fn(logits, y)
        if self.cfg.param_norm_penalty:
            loss = loss + self.cfg.param_norm_penalty * trainable_norm_sum(model)
        return StepOutput(loss=loss, num_samples=int(x.shape[0]))

    def new_meter(self) -> ClassificationMeter:
        return ClassificationMeter(len(self.labels))

    def eval_step(self, model: nn.Module, batch: Any, meter: ClassificationMeter) -> None:
        x, y = batch
        logits = model(x)
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        meter.update(logits, y, float(loss))

    def final_report(self, meter: ClassificationMeter) -> dict[str, Any]:
        return accuracy_report(meter, self.labels)

    @property
    def checkpoint_labels(self) -> list[str] | None:
        return self.labels


_CACHE_BYTES = 256 * 2 ** 20  # un-augmented datasets up to this size keep their tensors in memory


def trainable_norm_sum(model: nn.Module) -> torch.Tensor:
    """Sum over trainable tensors of their L2 norm (not squared): CLR's regulariser."""
    norms = [p.norm() for p in model.parameters() if p.requires_grad]
    return torch.stack(norms).sum() if norms else torch.zeros(())


def classification_loss(cfg: TrainConfig) -> nn.Module:
    """timm's losses: soft-target CE under mixup, label-smoothing CE, else plain CE."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg.mixup > 0 or cfg.cutmix > 0:
        return SoftTargetCrossEntropy()  # mixup already smooths the targets
    if cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return nn.CrossEntropyLoss()


def _model_in_chans(model: nn.Module) -> int:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size")
    return int(size[0]) if size else 3


def resolved_img_size(cfg: TrainConfig, model: nn.Module | None) -> int:
    """--img-size, else 32 for the bundled digits, else the model's default input size."""
    if cfg.img_size:
        return int(cfg.img_size)
    if cfg.data == "digits":
        return 32
    if model is not None:
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
        if size:
            return int(size[-1])
    return 224


TASKS: dict[str, type[TaskAdapter]] = {"classification": ClassificationTask}
#: adapters registered on first use ("module:Class"), so classification never imports their dependencies
LAZY_TASKS: dict[str, str] = {"detection": "vizoo.engine.detection:DetectionTask",
                               "continual": "vizoo.engine.continual:ContinualTask",
                               "diffusion": "vizoo.engine.diffusion:DiffusionTask",
                               "quest_te": "vizoo.engine.quest:TimeEmbeddingTask",
                               "quest_attn": "vizoo.engine.quest:AttentionTask"}


def register_task(cls: type[TaskAdapter]) -> type[TaskAdapter]:
    """Decorator: make an adapter available as ``--task NAME``."""
    TASKS[cls.name] = cls
    return cls


def create_task(cfg: TrainConfig) -> TaskAdapter:
    name = cfg.task
    if name == "auto":  # a config built directly, not through from_dict: the model's registered task
        from .config import infer_task

        name = infer_task(cfg.model, cfg.imports)
    if name not in TASKS and name in LAZY_TASKS:
        module, _, attr = LAZY_TASKS[name].partition(":")
        register_task(getattr(importlib.import_module(module), attr))
    if name not in TASKS:
        # An adapter may live in a module the user imports with --imports; try "pkg.mod:Class" too.
        module, _, attr = name.partition(":")
        if attr:
            return getattr(importlib.import_module(module), attr)(cfg)
        raise ValueError(f"unknown task {name!r}; available: {sorted({*TASKS, *LAZY_TASKS})} (or 'module:Class')")
    return TASKS[name](cfg)
