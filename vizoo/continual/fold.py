"""One task of a `ContinualModel` as a plain inference module, shaped for multi-task files.

Converters (litert-torch, coremltools) fold a BatchNorm into the conv before it. In a file that
holds several tasks, a per-task BN after a *shared* frozen conv would then turn that conv into
per-task copies (measured: a two-task file doubled). So, per task:

- a BN whose input is a CLR kernel's output is folded into that kernel here (the kernel is the
  task's own anyway): ``W' = W * s``, ``b' = beta - mean * s``, ``s = gamma / sqrt(var + eps)``;
- any other task-owned BN (after an unwrapped 1x1 conv in CLR's main mode) becomes a
  `ChannelAffine`, a depthwise 1x1 conv with bias that converters leave as its own op;
- shared tensors stay the *same* tensor objects in every task's module, so the files store them once.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..layers.clr import CLRConv2d
from .bank import ContinualModel, shared_copy


class ChannelAffine(nn.Module):
    """``x * scale + shift`` per channel, as a depthwise 1x1 conv (an op converters keep apart)."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        c = scale.numel()
        self.conv = nn.Conv2d(c, c, 1, groups=c, bias=True)
        with torch.no_grad():
            self.conv.weight.copy_(scale.view(c, 1, 1, 1))
            self.conv.bias.copy_(shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class TaskExport(nn.Module):
    """``head(backbone(x))`` of one task, with what the exporter reads (labels, preprocessing)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, task: str, labels: list[str] | None,
                 pretrained_cfg: dict[str, Any], name: str):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.task = task
        self.labels = labels
        self.num_classes = head.out_features
        self.pretrained_cfg = {**pretrained_cfg, "num_classes": head.out_features}
        if labels is not None:
            self.pretrained_cfg["label_names"] = list(labels)
        self.vizoo_name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    inv = torch.rsqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(inv)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(inv)
    scale = gamma * inv
    return scale, beta - bn.running_mean.double() * scale


def _after_bn(bn: nn.Module, replacement: nn.Module) -> nn.Module:
    """timm's BatchNormAct2d carries its activation: keep it after the folded form."""
    act = getattr(bn, "act", None)
    if isinstance(act, nn.Module) and not isinstance(act, nn.Identity):
        drop = getattr(bn, "drop", None)
        parts = [replacement] + ([drop] if isinstance(drop, nn.Module) and not isinstance(drop, nn.Identity) else [])
        return nn.Sequential(*parts, act)
    return replacement


def bn_producers(backbone: nn.Module, sample: torch.Tensor) -> dict[str, str]:
    """For each BatchNorm, the CLR layer whose output is exactly its input (one traced forward)."""
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # the tensor is held: its id stays unique
    inputs: dict[str, tuple[int, torch.Tensor]] = {}
    hooks = []
    for name, m in backbone.named_modules():
        if isinstance(m, CLRConv2d):
            hooks.append(m.register_forward_hook(lambda mod, a, out, _n=name: outputs.__setitem__(id(out), (_n, out))))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            hooks.append(m.register_forward_pre_hook(lambda mod, a, _n=name: inputs.__setitem__(_n, (id(a[0]), a[0]))))
    try:
        with torch.no_grad():
            backbone(sample)
    finally:
        for h in hooks:
            h.remove()
    return {bn: outputs[t][0] for bn, (t, _) in inputs.items() if t in outputs}


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)


@torch.no_grad()
def fold_task_norms(backbone: nn.Module, sample: torch.Tensor) -> dict[str, int]:
    """In place, on a task's own copy: BNs folded into the CLR kernel before them, others made
    `ChannelAffine`. Returns how many of each."""
    backbone.eval()
    producers = bn_producers(backbone, sample)
    counts = {"folded_into_clr": 0, "channel_affine": 0}
    for name, bn in list(backbone.named_modules()):
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_var is None:
            continue
        scale, shift = _bn_scale_shift(bn)
        if name in producers:
            clr = backbone.get_submodule(producers[name]).clr
            folded = nn.Conv2d(clr.in_channels, clr.out_channels, clr.kernel_size, padding=clr.padding,
                               groups=clr.groups, bias=True)
            folded.weight.copy_((clr.weight.double() * scale.view(-1, 1, 1, 1)).float())
            folded.bias.copy_(shift.float())
            backbone.get_submodule(producers[name]).clr = folded
            _set_module(backbone, name, _after_bn(bn, nn.Identity()))
            counts["folded_into_clr"] += 1
        else:
            _set_module(backbone, name, _after_bn(bn, ChannelAffine(scale.float(), shift.float())))
            counts["channel_affine"] += 1
    return counts


def task_export_module(model: ContinualModel, task: str) -> TaskExport:
    """Task ``task`` (already live in ``model``) as a `TaskExport` sharing the frozen tensors."""
    owned = set(model.task_tensor_names())
    sd = model.state_dict(keep_vars=True)
    shared = [t for k, t in sd.items() if k not in owned]
    backbone = shared_copy(model.backbone, shared)
    head = shared_copy(model.head, [])
    if model.method.task_state in ("norm", "clr"):
        size = tuple(model.pretrained_cfg.get("input_size") or (3, 32, 32))
        fold_task_norms(backbone, torch.zeros(1, *size))
    name = f"{model.pretrained_cfg.get('architecture') or 'continual'}:{task}"
    out = TaskExport(backbone, head, task, model.labels, model.pretrained_cfg, name)
    return out.eval()
