"""ULSAM: Ultra-Lightweight Subspace Attention Module (Saini et al., WACV 2020, arXiv 2006.15102).

The channels are split into ``g`` contiguous subspaces of ``G = m/g`` channels. Each subspace
learns one spatial attention map::

    d = ReLU(BN(DW1x1(x_n)))          # per-channel scale + shift (conv with bias), BN, ReLU
    p = MaxPool3x3/s1/p1(d)
    a = ReLU(BN(PW1x1_{G->1}(p)))      # one map per subspace (conv with bias), BN, ReLU
    A = softmax of a over the h*w positions
    y_n = A * x_n + x_n

This is what the official module (``Nandan91/ULSAM`` ``ulsam.py`` @9a07d68) computes; the BN+ReLU
pairs are in the code though not in the paper's diagram. The official code loops over g
sub-modules; here the same math is written as 7 ops on the whole tensor (a depthwise conv is
per-channel anyway, and a 1x1 conv with ``groups=g`` lets output map n see only subspace n), which
removes the Python loop, a chunk and a concat — better for latency and export. Official-layout
state dicts load through :func:`ulsam_checkpoint_filter`.

Small maps: on a map of 2x2 or smaller the 3x3 max pool gives every position the same value, so
the attention is exactly uniform (ULSAM scales by 1 + 1/(h*w)) and its parameters get no
gradient. MobileNet-V1's 14x14 stage is 2x2 at 32 px input: use >= 64 px for ULSAM to act.
"""
from __future__ import annotations

import re
from collections import defaultdict

import torch
import torch.nn as nn

__all__ = ["ULSAM", "OFFICIAL_BN_MOMENTUM", "ulsam_checkpoint_filter"]

#: BatchNorm momentum the official module passes, in PyTorch's convention
#: (running = (1 - m) * running + m * batch). 0.9 makes the running statistics follow the latest
#: batch almost entirely; it looks like TensorFlow's decay convention slipped into PyTorch, but it
#: is what the published module trains with, so it is the default here. Pass 0.1 for PyTorch's
#: usual smoothing.
OFFICIAL_BN_MOMENTUM = 0.9


class ULSAM(nn.Module):
    """Subspace attention over ``channels`` split into ``num_groups`` subspaces; shape-preserving.

    Learnable parameters: ``5 * channels + 3 * num_groups`` (DW weight+bias, BN(m), grouped PW
    weight ``m`` + bias ``g``, BN(g)). MACs counted by convolutions: ``2 * channels * h * w`` (the
    paper's "1K params, 0.2 MFLOPs" for 512 channels at 14x14 counts the same conv weights).
    """

    def __init__(self, channels: int, num_groups: int = 4, bn_momentum: float = OFFICIAL_BN_MOMENTUM,
                 bn_eps: float = 1e-5) -> None:
        super().__init__()
        if channels <= 0 or num_groups <= 0 or channels % num_groups:
            raise ValueError(f"ULSAM needs channels ({channels}) divisible by num_groups "
                             f"({num_groups}); pick a g that divides the channel count")
        self.channels = channels
        self.num_groups = num_groups
        # Attribute names follow the official SubSpace module so the key mapping stays obvious.
        self.conv_dws = nn.Conv2d(channels, channels, 1, groups=channels, bias=True)
        self.bn_dws = nn.BatchNorm2d(channels, eps=bn_eps, momentum=bn_momentum)
        self.relu_dws = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        self.conv_point = nn.Conv2d(channels, num_groups, 1, groups=num_groups, bias=True)
        self.bn_point = nn.BatchNorm2d(num_groups, eps=bn_eps, momentum=bn_momentum)
        self.relu_point = nn.ReLU()

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The g attention maps, shape (B, g, h*w); each row sums to 1."""
        b, _, h, w = x.shape
        a = self.relu_dws(self.bn_dws(self.conv_dws(x)))
        a = self.maxpool(a)
        a = self.relu_point(self.bn_point(self.conv_point(a)))
        return a.reshape(b, self.num_groups, h * w).softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if c != self.channels:
            raise ValueError(f"ULSAM built for {self.channels} channels got an input with {c}")
        attn = self.attention(x).unsqueeze(2)  # (B, g, 1, h*w)
        # 4-D throughout (TFLite/XNNPACK take 4-D broadcasts); `a * x + x` in the official order.
        xs = x.reshape(b, self.num_groups, c // self.num_groups, h * w)
        return (attn * xs + xs).reshape(b, c, h, w)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_groups={self.num_groups}"


# --- official checkpoint layout -> vectorised layout ----------------------------------------

_OFFICIAL_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?)subspaces\.(?P<n>\d+)\.(?P<layer>conv_dws|bn_dws|conv_point|bn_point)"
                           r"\.(?P<param>weight|bias|running_mean|running_var|num_batches_tracked)$")


def ulsam_checkpoint_filter(state_dict: dict[str, torch.Tensor], model: nn.Module | None = None
                            ) -> dict[str, torch.Tensor]:
    """Map official ``<prefix>subspaces.{n}.*`` keys onto :class:`ULSAM`'s ``<prefix>*`` keys.

    Per-subspace tensors are joined in subspace order: ``conv_dws``/``bn_dws`` tensors and the
    ``conv_point`` biases and ``bn_point`` tensors are concatenated on dim 0; the ``[1, G, 1, 1]``
    ``conv_point`` weights stack into the grouped ``[g, G, 1, 1]`` weight (also a dim-0 concat).
    ``num_batches_tracked`` is equal in every subspace; the first is kept. Other keys pass through,
    so the filter works for a bare module (empty prefix) and for ULSAM inside any model. With
    ``model`` given, a subspace count that differs from the model's ``num_groups`` is an error.
    """
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = _OFFICIAL_KEY.match(key)
        if m is None:
            out[key] = value
            continue
        groups[m["prefix"]][int(m["n"])][f"{m['layer']}.{m['param']}"] = value
    modules = dict(model.named_modules()) if model is not None else {}
    for prefix, subspaces in groups.items():
        n_sub = len(subspaces)
        if sorted(subspaces) != list(range(n_sub)):
            raise ValueError(f"official ULSAM keys under {prefix!r}subspaces are not numbered 0..{n_sub - 1} "
                             f"(found {sorted(subspaces)}); the checkpoint is incomplete")
        target = modules.get(prefix[:-1] if prefix else "")
        if isinstance(target, ULSAM) and target.num_groups != n_sub:
            raise ValueError(f"checkpoint has {n_sub} ULSAM subspaces at {prefix!r} but the model's ULSAM "
                             f"there has num_groups={target.num_groups}; create the model with g={n_sub}")
        names = set(subspaces[0])
        for n in range(1, n_sub):
            if set(subspaces[n]) != names:
                raise ValueError(f"official ULSAM subspaces under {prefix!r} hold different keys "
                                 f"({sorted(names ^ set(subspaces[n]))} differ in subspace {n})")
        for name in sorted(names):
            parts = [subspaces[n][name] for n in range(n_sub)]
            out[prefix + name] = parts[0] if name.endswith("num_batches_tracked") else torch.cat(parts, dim=0)
    return out
