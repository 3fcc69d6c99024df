"""CLR: channel-wise lightweight reprogramming of a frozen CNN (Ge et al., ICCV 2023).

Ge, Li, Liu, Nie, Aravindan, Itti, "CLR: Channel-wise Lightweight Reprogramming for Continual
Learning", ICCV 2023 (arXiv 2307.11386). A frozen ("anchor") conv's output channels are each
re-filtered, per task, by one k x k kernel: a depthwise conv with no bias placed between the conv
and its norm (``conv -> CLR -> BN -> act``). Initialised to the exact identity (a Dirac centre
tap), so a reprogrammed network computes exactly what the anchor network computed until trained.

Variants of the official code: ``main`` (the paper's CLR) wraps every conv whose kernel is not
1x1 (stem and 3x3 convs); ``full`` (CLR-Full) wraps every conv, 1x1 included.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn

__all__ = ["CLRConv2d", "apply_clr", "clr_layers", "identity_init_", "CLR_MODES"]

CLR_MODES = ("main", "full")


@torch.no_grad()
def identity_init_(dw: nn.Conv2d) -> nn.Conv2d:
    """Set a depthwise conv to the identity: every channel's kernel is 1 at its centre, 0 elsewhere."""
    kh, kw = dw.kernel_size
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"an identity depthwise kernel needs an odd size, got {dw.kernel_size}")
    dw.weight.zero_()
    dw.weight[:, 0, kh // 2, kw // 2] = 1.0
    if dw.bias is not None:
        dw.bias.zero_()
    return dw


class CLRConv2d(nn.Module):
    """A frozen conv followed by its per-task reprogramming kernel (``clr``, depthwise k x k).

    Reads like the conv it wraps (``in_channels``, ``out_channels``, ``stride``, ...), so code
    that inspects a model's convs (feature info, MAC counters) keeps working.
    """

    def __init__(self, conv: nn.Conv2d, kernel_size: int = 3):
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"CLR reprograms an nn.Conv2d, got {type(conv).__name__}")
        c = conv.out_channels
        self.conv = conv
        self.clr = nn.Conv2d(c, c, kernel_size, stride=1, padding=kernel_size // 2, groups=c, bias=False,
                             device=conv.weight.device, dtype=conv.weight.dtype)
        identity_init_(self.clr)

    in_channels = property(lambda self: self.conv.in_channels)
    out_channels = property(lambda self: self.conv.out_channels)
    kernel_size = property(lambda self: self.conv.kernel_size)
    stride = property(lambda self: self.conv.stride)
    padding = property(lambda self: self.conv.padding)
    dilation = property(lambda self: self.conv.dilation)
    groups = property(lambda self: self.conv.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clr(self.conv(x))

    def extra_repr(self) -> str:
        return f"reprogramming: depthwise {self.clr.kernel_size[0]}x{self.clr.kernel_size[1]} x {self.clr.out_channels}"


def _wants_clr(conv: nn.Conv2d, mode: str) -> bool:
    return mode == "full" or tuple(conv.kernel_size) != (1, 1)


def apply_clr(model: nn.Module, mode: str = "main", kernel_size: int = 3,
              exclude: tuple[str, ...] = ()) -> nn.Module:
    """Wrap the model's convs in `CLRConv2d`, in place; returns the model.

    ``mode="main"`` wraps every conv that is not 1x1 (the paper's CLR), ``"full"`` every conv
    (CLR-Full). ``exclude``: module-name prefixes left alone (e.g. a conv classifier). Works on
    any module tree: the zoo's CNNs, timm and torchvision ResNets and MobileNets. A model that is
    already reprogrammed is refused (a second wrapping would stack two kernels).
    """
    if mode not in CLR_MODES:
        raise ValueError(f"CLR mode {mode!r} is not one of {CLR_MODES}")
    if any(True for _ in clr_layers(model)):
        raise ValueError("this model already has CLR layers; build a fresh backbone to reprogram it again")
    wrapped = 0

    def visit(module: nn.Module, prefix: str) -> None:
        nonlocal wrapped
        for name, child in list(module.named_children()):
            path = f"{prefix}.{name}" if prefix else name
            if any(path == e or path.startswith(e + ".") for e in exclude):
                continue
            if isinstance(child, nn.Conv2d):
                if _wants_clr(child, mode):
                    setattr(module, name, CLRConv2d(child, kernel_size))
                    wrapped += 1
            else:
                visit(child, path)

    visit(model, "")
    if wrapped == 0:
        raise ValueError(f"no conv to reprogram in {type(model).__name__} (mode {mode!r}); CLR needs nn.Conv2d layers")
    return model


def clr_layers(model: nn.Module) -> Iterator[tuple[str, CLRConv2d]]:
    """(name, layer) of every CLR layer in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, CLRConv2d):
            yield name, m
