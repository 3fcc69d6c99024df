"""Exact export forms of standard layers whose TFLite lowering leaves XNNPACK's fast path.

:func:`vizoo.layers.export_mode.export_mode` swaps these in for the duration of an export (and of
the verifier's export-form reference), in any model, and puts the originals back afterwards:

- ``nn.MaxPool2d`` with padding: PyTorch pads with -inf, which converts to PADV2, an op the XNNPACK
  delegate does not take (ResNet stems: the graph split in two). The export form pads by
  replicating the edge rows/columns (slices + concatenation, which XNNPACK runs): a padded value
  then equals a value already inside every window that reaches it, so the maximum is the same, bit
  for bit (padding <= kernel/2, as PyTorch requires).
- ``nn.GroupNorm`` on 4-D input: the group statistics by reshape lower to RESHAPE/TRANSPOSE/
  BROADCAST_TO in an NHWC graph (BROADCAST_TO is outside XNNPACK). The export form takes per-channel
  spatial means and averages them within groups by a grouped 1×1 conv with constant weights (see
  :func:`group_mean_rstd`), equal to the eager form up to float32 rounding.
- diffusers' ``Upsample2D`` (2× nearest, then a conv): ``F.interpolate(mode="nearest")`` lowers to
  RESIZE_NEAREST_NEIGHBOR, which XNNPACK does not take (the diffusion UNet split in three). The
  export form duplicates every column and row by stacking and reshaping (CONCATENATION/RESHAPE):
  bit-identical.
- ``nn.Embedding`` with a small table (class labels): the lookup lowers to EMBEDDING_LOOKUP, which
  XNNPACK does not take (the class-conditional UNet split in two). The export form multiplies a
  one-hot row, ``relu(1 - |i - arange(n)|)``, by the table (FULLY_CONNECTED): one term is the row
  times 1.0 and the rest are zeros, so it is bit-identical. Only an integer-to-float CAST of the
  input is left outside, before the partition.

The statistics helpers are shared with the grouped EvoNorms' export form.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .export_mode import ExportAware

__all__ = ["group_mean_rstd", "plus_eps", "MaxPool2dExport", "GroupNormExport", "Upsample2DExport",
           "EmbeddingExport", "upsample_nearest_2x", "EXPORT_SWAPS", "swap_in_export_forms"]


def plus_eps(t: torch.Tensor, eps: float) -> torch.Tensor:
    """``t + eps`` for a (B, C, 1, 1) statistic as a depthwise 1×1 conv (weight 1, bias eps).

    Why not an ADD: an int8 file quantizes a scalar 1e-5 with a scale XNNPACK's int8 ADD refuses,
    so that ADD ran outside the delegate and split full-integer graphs.
    """
    c = t.shape[1]
    weight = torch.ones((c, 1, 1, 1), dtype=t.dtype, device=t.device)
    return F.conv2d(t, weight, torch.full((c,), eps, dtype=t.dtype, device=t.device), groups=c)


def group_mean_rstd(x: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Group mean and 1/sqrt(biased group variance + eps) of a (B, C, H, W) tensor over (C/g, H, W),
    each (B, C, 1, 1) in float32, with ops XNNPACK runs in one partition (fp32 and int8).

    Two passes, as the eager EvoNorm/GroupNorm: per-channel spatial means, averaged within each
    group of C/g contiguous channels by a grouped 1×1 conv with constant weights g/C (output channel
    i is the mean of its group, already broadcast back: no reshape, expand or layout transpose),
    then the same for the squared deviations, with eps as that conv's bias (see :func:`plus_eps`).
    """
    c = x.shape[1]
    if c % groups:
        raise ValueError(f"{groups} groups do not divide {c} channels")
    k = c // groups
    xf = x.float()
    weight = torch.full((c, k, 1, 1), 1.0 / k, dtype=xf.dtype, device=xf.device)
    bias = torch.full((c,), eps, dtype=xf.dtype, device=xf.device)
    mean = xf.mean(dim=(2, 3), keepdim=True)
    if k > 1:
        mean = F.conv2d(mean, weight, groups=groups)
    dev = xf - mean
    var = F.conv2d((dev * dev).mean(dim=(2, 3), keepdim=True), weight, bias, groups=groups)
    return mean, var.rsqrt()


class MaxPool2dExport(ExportAware, nn.Module):
    """``nn.MaxPool2d`` with its padding done by edge replication (exact; see the module docstring)."""

    def __init__(self, pool: nn.MaxPool2d) -> None:
        super().__init__()
        self.pool = pool

    @staticmethod
    def applies(pool: nn.Module) -> bool:
        """Padded, no dilation, floor mode, no indices: the case this form reproduces exactly."""
        pad = pool.padding if isinstance(pool.padding, tuple) else (pool.padding, pool.padding)
        dil = pool.dilation if isinstance(pool.dilation, tuple) else (pool.dilation, pool.dilation)
        return any(pad) and dil == (1, 1) and not pool.ceil_mode and not pool.return_indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pool
        if not self.exporting or x.dim() != 4:
            return p(x)
        ph, pw = p.padding if isinstance(p.padding, tuple) else (p.padding, p.padding)
        if ph:
            x = torch.cat([x[:, :, :1]] * ph + [x] + [x[:, :, -1:]] * ph, dim=2)
        if pw:
            x = torch.cat([x[:, :, :, :1]] * pw + [x] + [x[:, :, :, -1:]] * pw, dim=3)
        return F.max_pool2d(x, p.kernel_size, p.stride, 0)


class GroupNormExport(ExportAware, nn.Module):
    """``nn.GroupNorm`` whose 3-D/4-D group statistics use :func:`group_mean_rstd` (shares the original's
    parameters; the eager form is the original module)."""

    def __init__(self, norm: nn.GroupNorm) -> None:
        super().__init__()
        self.norm = norm

    @staticmethod
    def applies(norm: nn.Module) -> bool:
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm
        if self.exporting and x.dim() == 3:  # (B, C, T), e.g. attention blocks' norms
            return self.forward(x.unsqueeze(-1)).squeeze(-1)
        if not self.exporting or x.dim() != 4:
            return n(x)
        mean, rstd = group_mean_rstd(x, n.num_groups, n.eps)
        y = (x.float() - mean) * rstd
        if n.affine:
            y = y * n.weight.float().view(1, -1, 1, 1) + n.bias.float().view(1, -1, 1, 1)
        return y.to(x.dtype)


def upsample_nearest_2x(x: torch.Tensor) -> torch.Tensor:
    """``F.interpolate(x, scale_factor=2, mode="nearest")`` of NCHW ``x`` by stacking copies (exact)."""
    b, c, h, w = x.shape
    x = torch.stack([x, x], dim=-1).reshape(b, c, h, 2 * w)
    return torch.stack([x, x], dim=3).reshape(b, c, 2 * h, 2 * w)


class Upsample2DExport(ExportAware, nn.Module):
    """diffusers' ``Upsample2D`` with its 2× nearest interpolation as :func:`upsample_nearest_2x`
    (shares the original's conv; other configurations run the original)."""

    def __init__(self, up: nn.Module) -> None:
        super().__init__()
        self.up = up

    @staticmethod
    def applies(up: nn.Module) -> bool:
        return (getattr(up, "norm", None) is None and not getattr(up, "use_conv_transpose", True)
                and getattr(up, "interpolate", False))

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None, *args, **kwargs) -> torch.Tensor:
        up = self.up
        doubled = output_size is None or tuple(output_size) == (2 * x.shape[-2], 2 * x.shape[-1])
        if not self.exporting or x.dim() != 4 or not doubled:
            return up(x, output_size, *args, **kwargs)
        x = upsample_nearest_2x(x)
        if up.use_conv:
            x = (up.conv if up.name == "conv" else up.Conv2d_0)(x)
        return x


class EmbeddingExport(ExportAware, nn.Module):
    """``nn.Embedding`` lookup as a one-hot row times the table (tables up to `MAX_ROWS` rows)."""

    MAX_ROWS = 1024  # the one-hot row has one entry per table row

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.embedding = embedding

    @classmethod
    def applies(cls, embedding: nn.Module) -> bool:
        return embedding.max_norm is None and embedding.num_embeddings <= cls.MAX_ROWS

    def __getattr__(self, name: str):
        """The table's own attributes (``weight``, ``num_embeddings``...): models that read a
        learned query table directly keep working while the form is swapped in."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["embedding"], name)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.exporting:
            return self.embedding(ids)
        table = self.embedding.weight
        rows = torch.arange(table.shape[0], dtype=table.dtype, device=table.device)
        one_hot = torch.relu(1.0 - (ids.to(table.dtype).unsqueeze(-1) - rows).abs())
        return one_hot @ table


#: Exact type -> its export form (subclasses, e.g. timm's own pooling layers, are left alone).
EXPORT_SWAPS: dict[type, type] = {nn.MaxPool2d: MaxPool2dExport, nn.GroupNorm: GroupNormExport,
                                  nn.Embedding: EmbeddingExport}


def _export_swaps() -> dict[type, type]:
    """:data:`EXPORT_SWAPS` plus diffusers' layers when diffusers is already imported (never imported here)."""
    import sys

    swaps = dict(EXPORT_SWAPS)
    upsampling = sys.modules.get("diffusers.models.upsampling")
    if upsampling is not None:
        swaps[upsampling.Upsample2D] = Upsample2DExport
    return swaps


def swap_in_export_forms(model: nn.Module) -> Callable[[], None]:
    """Replace every layer of :data:`EXPORT_SWAPS` in ``model`` by its export form; returns the
    function that puts the originals back."""
    done: list[tuple[nn.Module, str, nn.Module]] = []
    swaps = _export_swaps()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            form = swaps.get(type(child))
            if form is not None and form.applies(child):
                setattr(parent, name, form(child))
                done.append((parent, name, child))

    def restore() -> None:
        for parent, name, child in reversed(done):
            setattr(parent, name, child)

    return restore
