"""CLR task banks over ResNets: the paper's backbones and a CPU miniature.

Ge et al., "CLR: Channel-wise Lightweight Reprogramming for Continual Learning", ICCV 2023
(arXiv 2307.11386). The official code reprograms an ImageNet-pretrained torchvision ResNet-18
(a SwAV ResNet-50 was tried); the parameter figure the paper quotes (< 0.6 % per task) is the CLR
kernels plus BN affines of such a backbone (ResNet-50: 0.37 %, ResNet-18: 0.40 %).

``create_model("clr_resnet18", num_classes=N)`` returns a `vizoo.continual.ContinualModel` with a
first task ``task0`` of N classes (``num_classes=0``: no task yet); ``method=`` picks CLR, CLR-Full
or a baseline of `vizoo.continual.METHODS`; ``backbone_checkpoint=`` loads the anchor weights
(a checkpoint of the plain backbone, e.g. one trained by ``vizoo continual``'s proxy task).

- ``clr_resnet18`` / ``clr_resnet50``: timm's ResNet-18/-50 (torchvision's layout), 224 px.
- ``clr_resnet18_025``: ResNet-18 at a quarter of the width (16/32/64/128 channels, 0.70 M
  parameters), 32 px: the backbone of the bundled benchmark. Overhead per task scales as
  1/width (parameters ~ width^2, CLR kernels ~ width), so it is ~4x the full-width figure.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch.nn as nn
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from ..continual.bank import ContinualModel
from ..registry import IMAGENET_MEAN, IMAGENET_STD, PretrainedCfg, register_features, register_model, \
    register_pretrained_cfgs

_PAPER = "CLR: Channel-wise Lightweight Reprogramming for Continual Learning (ICCV 2023)"
_PAPER_URL = "https://arxiv.org/abs/2307.11386"
_NOTES = ("No CLR weights are published for this backbone here; train tasks with `vizoo continual` "
          "or ContinualModel.add_task + the engine. Pass backbone_checkpoint= for anchor weights.")


def _cfg(**kwargs: Any) -> PretrainedCfg:
    return PretrainedCfg(source="", mean=IMAGENET_MEAN, std=IMAGENET_STD, classifier="head",
                         first_conv="backbone.conv1.conv", license="apache-2.0", paper=_PAPER,
                         paper_url=_PAPER_URL, notes=_NOTES, export_formats=("coreml", "tflite"), **kwargs)


register_pretrained_cfgs({
    "clr_resnet18": _cfg(input_size=(3, 224, 224), test_input_size=(3, 64, 64), crop_pct=0.875,
                         paper_metrics={"params_added_per_task_pct": "< 0.6"}),
    "clr_resnet50": _cfg(input_size=(3, 224, 224), test_input_size=(3, 64, 64), crop_pct=0.875,
                         paper_metrics={"params_added_per_task_pct": "< 0.6"}),
    "clr_resnet18_025": _cfg(input_size=(3, 32, 32), num_classes=10, interpolation="bilinear", crop_pct=1.0),
})


def load_backbone_checkpoint(backbone: nn.Module, path: str | os.PathLike) -> None:
    """Load anchor weights into a plain backbone (classifier already removed); the checkpoint's
    classifier is ignored, every other backbone tensor must be there."""
    from ..hub import CheckpointError, read_checkpoint

    sd = read_checkpoint(path)
    own = backbone.state_dict()
    missing = [k for k in own if k not in sd]
    if missing:
        raise CheckpointError(f"{path} does not hold this backbone's weights (missing {missing[:4]}); pass a "
                              "checkpoint of the plain backbone architecture")
    bad = [k for k in own if tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointError(f"{path}: {bad[0]} has shape {tuple(sd[bad[0]].shape)}, the backbone "
                              f"{tuple(own[bad[0]].shape)}: a checkpoint of another width or depth")
    backbone.load_state_dict({k: sd[k] for k in own}, strict=True)


def build_continual(backbone: nn.Module, num_classes: int = 0, method: str = "clr",
                    backbone_checkpoint: str | os.PathLike | None = None, clr_kernel: int = 3) -> ContinualModel:
    """A task bank over ``backbone`` (anchor weights from ``backbone_checkpoint`` if given), with a
    first task ``task0`` when ``num_classes`` > 0."""
    backbone.reset_classifier(0)
    if backbone_checkpoint:
        load_backbone_checkpoint(backbone, backbone_checkpoint)
    model = ContinualModel(backbone, method=method, clr_kernel=clr_kernel)
    if num_classes:
        model.add_task("task0", int(num_classes), seed=0)
    return model


def bank_from_files(name: str, task_files: Sequence[str | os.PathLike],
                    backbone_checkpoint: str | os.PathLike | None = None) -> ContinualModel:
    """A registered CLR model with the anchor's weights and the saved tasks loaded in order (the
    method is read from the first task file): what ``vizoo export NAME --tasks ...`` exports."""
    from ..continual.bank import read_task_metadata
    from ..factory import create_model

    if not task_files:
        raise ValueError("no task files given; pass the task_state.safetensors files to load")
    method = read_task_metadata(task_files[0]).get("method", "clr")
    model = create_model(name, num_classes=0, method=method, backbone_checkpoint=backbone_checkpoint)
    if not isinstance(model, ContinualModel):
        raise ValueError(f"{name} is not a continual model; --tasks needs one of the clr_* models")
    for path in task_files:
        model.load_task(path)
    return model.eval()


def resnet18_025(num_classes: int = 10, in_chans: int = 3) -> ResNet:
    """The plain quarter-width ResNet-18 (the benchmark's anchor before reprogramming)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, in_chans=in_chans,
                  channels=(16, 32, 64, 128), stem_width=16)


@register_model
def clr_resnet18(num_classes: int = 1000, in_chans: int = 3, **kwargs: Any) -> ContinualModel:
    """CLR over ResNet-18 (the official code's backbone), 224 px."""
    return build_continual(ResNet(BasicBlock, (2, 2, 2, 2), in_chans=in_chans), num_classes, **kwargs)


@register_model
def clr_resnet50(num_classes: int = 1000, in_chans: int = 3, **kwargs: Any) -> ContinualModel:
    """CLR over ResNet-50 (the backbone of the paper's 0.37 % overhead figure), 224 px."""
    return build_continual(ResNet(Bottleneck, (3, 4, 6, 3), in_chans=in_chans), num_classes, **kwargs)


@register_model
def clr_resnet18_025(num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> ContinualModel:
    """CLR over a quarter-width ResNet-18 at 32 px: the bundled continual benchmark's backbone."""
    return build_continual(resnet18_025(in_chans=in_chans), num_classes, **kwargs)


register_features(["clr_resnet18", "clr_resnet50", "clr_resnet18_025"],
                  reason="a task bank swaps per-task layers; build features from the plain backbone")
