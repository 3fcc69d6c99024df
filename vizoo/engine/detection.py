"""The detection task adapter: COCO-format boxes in, COCO box AP out.

What a model needs (StageInteractor has it): ``forward(images [B, 3, H, W], img_sizes [B, 2] (h, w))
-> [per-stage {"logits": [B, N, C], "boxes": [B, N, 4] xyxy pixels}]``, ``predict(images, img_sizes)
-> [per-image {"boxes", "scores", "labels"}]``, and ``num_classes`` / ``csla`` / ``csla_iou``, which
size its loss (`vizoo.layers.det_loss.StageInteractorCriterion`).

Why each choice:

- ``--data shapes`` is the bundled procedural set, generated once into the cache with fixed
  parameters (`SHAPES`), so every run and every `vizoo eval` scores the same val images. Anything
  else is a COCO folder; a wrong layout is one error line that says which layout is expected.
- Images are resized to a square ``--img-size`` (default: the model's input size), boxes with
  them. Predictions are scaled back to each file's own pixels before scoring, so the AP is the
  one any COCO evaluator gives for the results file.
- The only augmentation is a horizontal flip (``--augment``, probability ``--hflip``): flipping
  keeps every shape's class, and its draws are seeded by (seed, epoch, index) like
  classification's, so a resumed run sees the same flips as an unbroken one.
- The meter scores what ``predict`` returns (the model's own inference, top-k without NMS) with
  the COCO evaluator (`vizoo.engine.coco_eval`). The val loss (the Trainer logs one) costs a
  second forward through all stages; ``predict`` decodes only the last.
- Files in the run directory: ``coco_results.json`` (detections of the latest evaluation; at the
  end, of the best weights, the ones the final report scores) and ``predictions.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from vizoo.data.loaders import seeded_sample

from .config import TrainConfig, infer_task
from .distributed import unwrap
from .tasks import StepOutput, TaskAdapter, TaskData, register_task

#: the bundled ``--data shapes``: fixed parameters and seed, so the val split never changes
SHAPES: dict[str, int] = {"num_train": 3000, "num_val": 400, "img_size": 128, "seed": 0}
RESULTS_JSON = "coco_results.json"
PREDICTIONS_PNG = "predictions.png"
#: predictions drawn in predictions.png score at least this much
SCORE_THRESHOLD = 0.3
FIGURE_IMAGES = 8
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")


# ----------------------------------------------------------------------------- data
def _layout(split: str) -> str:
    return (f"DIR/annotations/instances_{split}.json with images in DIR/{split}/ (COCO's own "
            f"instances_{split}2017.json + {split}2017/ also work), or DIR/{split}.json with images in "
            f"DIR/{split}/ or DIR/images/")


def _find_split(root: Path, split: str) -> tuple[Path, Path] | None:
    """(images folder, annotation file) of ``split`` under ``root``, or None if it has no such file."""
    candidates = [(root / "annotations" / f"instances_{name}.json", (root / name, root / "images" / name))
                  for name in (split, f"{split}2017")]
    candidates.append((root / f"{split}.json", (root / split, root / "images")))
    for ann, folders in candidates:
        if ann.is_file():
            for folder in folders:
                if folder.is_dir():
                    return folder, ann
            raise ValueError(f"{ann} has no image folder beside it: expected "
                             + " or ".join(str(f) for f in folders))
    return None


def coco_split_paths(data: str, splits: Sequence[str], progress: bool = False) -> dict[str, tuple[Path, Path]]:
    """(images folder, annotation file) per split of ``--data``: ``shapes`` or a COCO folder."""
    if str(data) == "shapes":
        from vizoo.data.shapes import ensure_shapes

        paths = ensure_shapes(progress=progress, **SHAPES)
        return {s: (paths[f"{s}_images"], paths[f"{s}_ann"]) for s in splits}
    if str(data) == "digits":
        raise ValueError("--data digits is classification data; detectors train on --data shapes (bundled) "
                         f"or a COCO folder: {_layout('train')}")
    root = Path(data).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"--data {data}: no such folder; detection data is 'shapes' (bundled) or a "
                                f"COCO folder: {_layout('train')}")
    out = {}
    for split in splits:
        found = _find_split(root, split)
        if found is None:
            raise ValueError(f"{root} is not a COCO detection folder (no {split} split): expected "
                             f"{_layout(split)}")
        out[split] = found
    return out


class DetectionSplit(Dataset):
    """One split as the engine feeds it: a `CocoDetection` whose transforms are set by
    `DetectionTask.attach_transforms`, images normalised, augmentation seeded per sample."""

    def __init__(self, base: Any):
        self.base = base
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        self.seed: int | None = None
        self.epoch = 0

    def configure(self, transforms: Any, mean: Sequence[float], std: Sequence[float], seed: int | None) -> None:
        self.base.transforms = transforms
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.seed is None:
            image, target = self.base[i]
        else:
            with seeded_sample(self.seed, self.epoch, i):
                image, target = self.base[i]
        if self.mean is not None:
            image = (image - self.mean) / self.std
        return image, target


def detection_img_size(cfg: TrainConfig, model: nn.Module) -> int:
    """``--img-size``, else the model's input size (the shorter side when it is not square)."""
    if cfg.img_size:
        return int(cfg.img_size)
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224)
    return int(min(size[1:]))


def _is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _finite(value: Any) -> Any:
    """JSON has no NaN: a figure COCO cannot measure (e.g. APl with no large object) is None."""
    return None if isinstance(value, float) and math.isnan(value) else value


# ----------------------------------------------------------------------------- the adapter
@register_task
class DetectionTask(TaskAdapter):
    """Images -> boxes, scores, labels; the model's set loss; COCO box AP (see the module docstring)."""

    name = "detection"
    primary_metric = "AP"
    higher_is_better = True
    ddp_find_unused_parameters = True  # as StageInteractor's official config (every parameter is used here)
    report_file = "detection_report.json"

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        from vizoo.data.coco import detection_collate

        self.collate_fn = detection_collate  # an instance attribute: not bound as a method
        self.labels: list[str] | None = None
        self.cat_ids: list[int] | None = None
        self.eval_split = "val"
        self.eval_dataset: Any = None
        self.ground_truth: dict[str, Any] | None = None
        #: where coco_results.json and predictions.png go (the run directory; `vizoo eval`: its --out)
        self.out_dir: Path | None = cfg.run_dir
        self._criterion: nn.Module | None = None

    # ---------------------------------------------------------------- data and model
    def load_data(self, cfg: TrainConfig, splits: tuple[str, ...] = ("train", "val"),
                  labels: list[str] | None = None) -> TaskData:
        from vizoo.data.coco import CocoDetection

        if cfg.in_chans not in (None, 3):
            raise ValueError(f"detection reads RGB images: --in-chans must be 3, not {cfg.in_chans}")
        progress = cfg.progress == "on" or (cfg.progress == "auto" and sys.stderr.isatty())
        paths = coco_split_paths(cfg.data, splits, progress=progress)
        raw = {s: DetectionSplit(CocoDetection(images, ann)) for s, (images, ann) in paths.items()}
        first = raw[splits[0]].base
        for split, ds in raw.items():
            if len(ds) == 0:
                raise ValueError(f"{ds.base.ann_file}: no usable image (none of its files is under "
                                 f"{ds.base.images_dir})")
            if (ds.base.categories, ds.base.cat_ids) != (first.categories, first.cat_ids):
                raise ValueError(f"the {split} split's categories {ds.base.categories} differ from the "
                                 f"{splits[0]} split's {first.categories}")
        if labels is not None and list(labels) != list(first.categories):
            raise ValueError(f"the checkpoint's classes {list(labels)} are not the categories of {cfg.data} "
                             f"({first.categories})")
        self.labels, self.cat_ids = list(first.categories), list(first.cat_ids)
        self.eval_split = "val" if "val" in raw else splits[-1]
        self.eval_dataset = raw[self.eval_split].base
        self.ground_truth = self.eval_dataset.ground_truth()
        return TaskData(splits=raw, labels=self.labels, source=str(cfg.data))

    def attach_transforms(self, cfg: TrainConfig, data: TaskData, model: nn.Module) -> None:
        from vizoo.data.coco import detection_transforms
        from vizoo.registry import IMAGENET_MEAN, IMAGENET_STD

        if not callable(getattr(model, "predict", None)) or not hasattr(model, "num_classes"):
            raise ValueError(f"{cfg.model or type(model).__name__} is not a detector: the detection task needs "
                             "forward(images, img_sizes) -> per-stage outputs, predict() and num_classes")
        pcfg = dict(getattr(model, "pretrained_cfg", None) or {})
        size = detection_img_size(cfg, model)
        mean = [float(v) for v in pcfg.get("mean") or IMAGENET_MEAN]
        std = [float(v) for v in pcfg.get("std") or IMAGENET_STD]
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"detection reads RGB images, but the model's mean/std have {len(mean)} channels")
        model.pretrained_cfg = {**pcfg, "input_size": [3, size, size], "mean": mean, "std": std,
                                "num_classes": int(model.num_classes)}
        ignored = [flag for flag, on in (("--mixup", cfg.mixup > 0), ("--cutmix", cfg.cutmix > 0),
                                         ("--smoothing", cfg.smoothing > 0), ("--auto-augment", bool(cfg.auto_augment)),
                                         ("--re-prob", cfg.re_prob > 0)) if on]
        if ignored:
            warnings.warn(f"the detection task ignores {', '.join(ignored)}: its only augmentation is the "
                          "horizontal flip (--augment, --hflip)", stacklevel=2)
        hflip = float(cfg.hflip) if cfg.augment else 0.0
        for split, ds in data.splits.items():
            training = split == "train" and hflip > 0
            ds.configure(detection_transforms(size, hflip if training else 0.0), mean, std,
                         seed=cfg.seed if training else None)

    # to_device: the base class moves tensors inside lists/dicts too (the targets' boxes and labels).

    # ---------------------------------------------------------------- steps
    def criterion(self, model: nn.Module) -> nn.Module:
        """The set loss, sized once from the (unwrapped) model."""
        if self._criterion is None:
            from vizoo.layers.det_loss import StageInteractorCriterion

            m = unwrap(model)
            self._criterion = StageInteractorCriterion(m.num_classes, csla=getattr(m, "csla", True),
                                                       csla_iou=getattr(m, "csla_iou", 0.5))
        return self._criterion

    @staticmethod
    def img_sizes(targets: Sequence[dict[str, Any]], device: torch.device) -> torch.Tensor:
        """``[B, 2]`` (h, w) of each image before padding."""
        return torch.tensor([list(t["img_size"]) for t in targets], dtype=torch.float32, device=device)

    def train_step(self, model: nn.Module, batch: Any) -> StepOutput:
        images, targets = batch
        outs = model(images, self.img_sizes(targets, images.device))
        loss, logs = self.criterion(model)(outs, targets)
        return StepOutput(loss=loss, num_samples=int(images.shape[0]), logs=logs)

    def new_meter(self) -> Any:
        from .coco_eval import DetectionMeter

        if self.ground_truth is None:
            raise RuntimeError("DetectionTask.load_data must run before new_meter")
        return DetectionMeter(self.ground_truth, self.cat_ids, out_json=self.results_path())

    def results_path(self) -> Path | None:
        return self.out_dir / RESULTS_JSON if self.out_dir is not None and _is_main() else None

    @torch.no_grad()
    def eval_step(self, model: nn.Module, batch: Any, meter: Any) -> None:
        from vizoo.data.coco import scale_boxes

        images, targets = batch
        m = unwrap(model)
        sizes = self.img_sizes(targets, images.device)
        loss, _ = self.criterion(m)(m(images, sizes), targets)
        predictions = []
        for pred, t in zip(m.predict(images, sizes), targets):
            h, w = t["orig_size"]
            boxes = scale_boxes(pred["boxes"].float(), t["img_size"], t["orig_size"])
            boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                                 boxes[:, 3].clamp(0, h)], dim=1)
            predictions.append({"boxes": boxes, "scores": pred["scores"], "labels": pred["labels"]})
        meter.update(predictions, targets, loss_sum=float(loss) * len(targets))

    # ---------------------------------------------------------------- reporting
    def final_report(self, meter: Any) -> dict[str, Any]:
        """COCO metrics of the evaluated weights (the Trainer: the best), the results file, and
        predictions.png of a few images of the scored split."""
        metrics = meter.compute()
        report: dict[str, Any] = {"task": "detection", **{k: _finite(metrics.get(k)) for k in METRICS},
                                  "loss": metrics.get("loss"), "num_images": metrics.get("num_images"),
                                  "split": self.eval_split, "labels": self.labels}
        results = self.results_path()
        report["results_json"] = str(results) if results is not None else None
        report["predictions_png"] = None
        if self.cfg.plots and self.out_dir is not None and _is_main():
            try:
                title = f"{self.cfg.model}: AP {metrics['AP']:.3f} (AP50 {metrics['AP50']:.3f})"
                report["predictions_png"] = str(self.plot_predictions(meter, self.out_dir / PREDICTIONS_PNG, title))
            except Exception as e:  # a figure must never fail a run
                warnings.warn(f"could not draw {PREDICTIONS_PNG}: {e}", stacklevel=2)
        return report

    def plot_predictions(self, meter: Any, path: Path, title: str = "") -> Path:
        """Ground truth and predictions (score >= `SCORE_THRESHOLD`) on the first scored images."""
        import numpy as np
        from PIL import Image

        from .plots import plot_detections

        index_of = {cid: k for k, cid in enumerate(self.cat_ids)}
        gt_of: dict[int, list[dict[str, Any]]] = {}
        for a in self.ground_truth["annotations"]:
            if not a.get("iscrowd", 0):
                gt_of.setdefault(int(a["image_id"]), []).append(a)
        samples = []
        for image in self.ground_truth["images"]:
            if len(samples) == FIGURE_IMAGES:
                break
            dets = meter.detections.get(int(image["id"]))
            if dets is None:
                continue
            with Image.open(Path(self.eval_dataset.images_dir) / image["file_name"]) as im:
                pixels = np.asarray(im.convert("RGB"))
            gts = gt_of.get(int(image["id"]), [])
            samples.append({
                "image": pixels, "name": Path(image["file_name"]).name,
                "gt_boxes": [_xyxy(a["bbox"]) for a in gts],
                "gt_labels": [index_of[int(a["category_id"])] for a in gts],
                "boxes": [_xyxy(d["bbox"]) for d in dets], "scores": [float(d["score"]) for d in dets],
                "labels": [index_of[int(d["category_id"])] for d in dets]})
        return plot_detections(samples, self.labels, path, score_threshold=SCORE_THRESHOLD, title=title)

    @property
    def checkpoint_labels(self) -> list[str] | None:
        return self.labels


def _xyxy(xywh: Sequence[float]) -> list[float]:
    x, y, w, h = (float(v) for v in xywh)
    return [x, y, x + w, y + h]


# ----------------------------------------------------------------------------- vizoo eval
def _checkpoint_file(path: str | Path) -> Path:
    path = Path(path)
    return path / "best.safetensors" if path.is_dir() else path


def is_detection_checkpoint(path: str | Path, name: str | None = None) -> bool:
    """Whether `vizoo eval` should score ``path`` as a detector: the model named on the command
    line, else the task recorded in the checkpoint's sidecar, else its model's registered task."""
    if name:
        return infer_task(name) == "detection"
    from vizoo.hub import read_sidecar

    meta = read_sidecar(_checkpoint_file(path))
    task = (meta.get("pretrained_cfg") or {}).get("task") or (meta.get("train_config") or {}).get("task")
    if task and task != "auto":
        return task == "detection"
    return bool(meta.get("model")) and infer_task(meta["model"]) == "detection"


@torch.no_grad()
def evaluate_detection(model_or_checkpoint: nn.Module | str | Path, data: str = "shapes", *, split: str = "val",
                       name: str | None = None, img_size: int | None = None, batch_size: int = 16,
                       num_workers: int = 0, device: str = "auto", amp: str = "none",
                       out_dir: str | Path | None = None, progress: bool = False) -> dict[str, Any]:
    """COCO box AP of a detector (or a checkpoint file / run directory) on ``data``'s ``split``.

    Scored as the training run scored its val split (same adapter, input size and normalisation
    from the checkpoint). With ``out_dir``: eval.json, coco_results.json and predictions.png there.
    """
    from .evaluate import run_eval_loop

    if split not in ("train", "val"):
        raise ValueError(f"detection data has train and val splits, not {split!r}")
    ckpt = ""
    if isinstance(model_or_checkpoint, nn.Module):
        model = model_or_checkpoint
    else:
        from vizoo.hub import load_model

        path = _checkpoint_file(model_or_checkpoint)
        model, ckpt = load_model(path, name=name), str(path)
    input_size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size") or [3, 224, 224]
    cfg = TrainConfig(model=getattr(model, "vizoo_name", "") or name or "model", data=str(data), task="detection",
                      img_size=img_size or int(input_size[-1]), augment=False, eval_batch_size=batch_size,
                      amp=amp, plots=out_dir is not None, progress="on" if progress else "off")
    task = DetectionTask(cfg)
    task.out_dir = Path(out_dir) if out_dir is not None else None
    task_data = task.load_data(cfg, splits=(split,), labels=getattr(model, "labels", None))
    task.attach_transforms(cfg, task_data, model)
    meter = run_eval_loop(task, model, task_data.splits[split], batch_size, num_workers, amp, device,
                          progress, desc=f"eval {split}")
    report = task.final_report(meter)
    report.update({"model": cfg.model, "checkpoint": ckpt, "data": str(data),
                   "input_size": list(model.pretrained_cfg["input_size"])})
    if task.out_dir is not None:
        from vizoo.io import write_json_atomic

        report["files"] = [str(task.out_dir / "eval.json")] + [
            report[k] for k in ("results_json", "predictions_png") if report.get(k)]
        write_json_atomic(task.out_dir / "eval.json", report)
    return report


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def run_eval_command(args: argparse.Namespace) -> int:
    """`vizoo eval` of a detector. ``--data digits`` (the command's default, never detection data)
    means the data the checkpoint was trained on, else the bundled shapes."""
    from vizoo.hub import read_sidecar

    data = args.data
    if data == "digits":
        trained_on = (read_sidecar(_checkpoint_file(args.checkpoint)).get("train_config") or {}).get("data")
        data = trained_on or "shapes"
    out = args.out
    if out is None:
        ckpt = Path(args.checkpoint)
        data_name = "shapes" if data == "shapes" else Path(data).name
        out = (ckpt if ckpt.is_dir() else ckpt.parent) / f"eval-{data_name}-{args.split}"
    report = evaluate_detection(args.checkpoint, data=data, split=args.split, name=args.model_name,
                                img_size=args.img_size, batch_size=args.batch_size, num_workers=args.num_workers,
                                device=args.device, amp=args.amp, out_dir=out, progress=not args.json)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['model']} on {report['data']} ({report['split']}, {report['num_images']} images): "
          f"AP {_fmt(report['AP'])}  AP50 {_fmt(report['AP50'])}  AP75 {_fmt(report['AP75'])}  "
          f"APs/APm/APl {_fmt(report['APs'])}/{_fmt(report['APm'])}/{_fmt(report['APl'])}")
    print(f"wrote {', '.join(report['files'])}")
    return 0
