"""EvoNorm: evolved normalization-activation layers (Liu et al., NeurIPS 2020, arXiv 2004.02967).

One layer replaces a BatchNorm + activation pair. The math follows the paper's TF reference
(`tensorflow/tpu` ``resnet_model.py``: ``evonorm``, ``_batch_std``, ``_instance_std``,
``_group_std``); parameter and buffer names/shapes follow timm's ``EvoNorm2d*`` (``weight`` = γ,
``bias`` = β, ``v`` = v1, all ``(C,)``; B variants add the ``running_var`` buffer), so timm
checkpoints load strictly.

Where timm and the paper differ, the default is the paper's and ``timm_compatible=True`` gives
timm's numbers exactly:

=======================  =============================  ====================================
option                   paper / TF (default)            ``timm_compatible=True``
=======================  =============================  ====================================
``eps`` (B0)             1e-5                           1e-3
running-variance update  biased batch variance          × n/(n−1) (Bessel)
groups not dividing C    TF rule: ``while C % g: g -= 1``  ``ValueError`` (timm asserts)
=======================  =============================  ====================================

Momentum: TF's ``decay=0.9`` (``mv -= (mv − var)(1 − decay)``) is the same update as PyTorch's
``momentum=0.1`` (``mv = (1 − m)·mv + m·var``); both sides use 0.1 here.

``apply_act=False`` (TF's ``nonlinearity=False``) makes B0/B1/S0/S1 an affine ``x·γ + β`` with no
normalisation, as the TF reference does for norms not followed by an activation; timm's "a"
variants (S0a) keep normalising.

All statistics are computed in float32 and cast back, so half-precision inputs do not overflow
the variance. The group std uses only 4-D tensors (per-channel spatial means, then a group
average on the tiny (B, C, 1, 1) tensor), the same two-pass arithmetic as a 5-D reshape but with no
5-D op for TFLite GPU delegates / NHWC layout conversion to trip on.

Export form (the grouped S0/S0a/S1 layers are :class:`~vizoo.layers.export_mode.ExportAware`):
the group average of the (B, C, 1, 1) statistics is a grouped 1×1 convolution with constant
weights 1/(C/g) (``g`` groups of C/g channels: each output channel is the mean of its group, already
broadcast back), instead of reshape → mean → expand → reshape. In an NHWC TFLite graph the latter
becomes RESHAPE/TRANSPOSE pairs and a BROADCAST_TO, which XNNPACK does not run: MobileNetV2-S0 split
into 67 delegate partitions. The conv form is one CONV_2D per average, all inside one partition.
The normalisation is applied as one multiply by ``rsqrt(var + eps)·γ`` (the std folded into the
affine scale), one full-resolution multiply fewer, and eps enters as that conv's bias. B0/B1 are
ExportAware too: at inference their per-sample statistic gets eps as a conv bias, not an ADD of a
scalar (an int8 file quantizes that scalar with a scale XNNPACK refuses). Equal to the eager form up
to float32 rounding (tested, and checked on every export).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .export_mode import ExportAware
from .export_swaps import group_mean_rstd, plus_eps

__all__ = [
    "EvoNorm2dB0", "EvoNorm2dB1", "EvoNorm2dS0", "EvoNorm2dS0a", "EvoNorm2dS1",
    "tf_num_groups", "resolve_num_groups", "instance_std", "group_std", "group_rstd_export",
    "EVONORM_LAYERS",
    "get_evonorm_layer", "evonorm_norm_act",
]

PAPER_EPS = 1e-5
TIMM_B0_EPS = 1e-3
DEFAULT_GROUPS = 32


# --- statistics (fp32) --------------------------------------------------------------------------

def tf_num_groups(num_channels: int, groups: int = DEFAULT_GROUPS) -> int:
    """The TF reference's fallback: the largest g <= ``groups`` that divides C (24 -> 24, 40 -> 20)."""
    g = groups
    while g > 1 and num_channels % g:
        g -= 1
    return g


def resolve_num_groups(num_channels: int, groups: int = DEFAULT_GROUPS, group_size: Optional[int] = None,
                       group_fallback: bool = True) -> int:
    """Number of channel groups for S variants.

    ``group_size`` (timm's option) wins over ``groups``. With ``group_fallback`` (paper/TF), a
    ``groups`` that does not divide C is lowered by the TF rule; without it (timm), that is an error.
    """
    if group_size:
        if num_channels % group_size:
            raise ValueError(f"EvoNorm: group_size={group_size} does not divide {num_channels} channels")
        return num_channels // group_size
    if groups < 1:
        raise ValueError(f"EvoNorm: groups must be >= 1, got {groups}")
    if num_channels % groups:
        if not group_fallback:
            raise ValueError(
                f"EvoNorm: {groups} groups do not divide {num_channels} channels (timm-compatible mode "
                "asserts this). Pass group_fallback=True for the TF rule "
                f"(-> {tf_num_groups(num_channels, groups)} groups), or set groups/group_size.")
        return tf_num_groups(num_channels, groups)
    return groups


def instance_std(x: torch.Tensor, eps: float) -> torch.Tensor:
    """sqrt(biased var over (H, W) + eps), shape (B, C, 1, 1), in float32."""
    return x.float().var(dim=(2, 3), unbiased=False, keepdim=True).add(eps).sqrt()


def _group_average(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Average a (B, C, 1, 1) tensor within contiguous channel groups, broadcast back to (B, C, 1, 1)."""
    b, c = t.shape[0], t.shape[1]
    if groups == c:
        return t
    grouped = t.reshape(b, groups, c // groups, 1)
    return grouped.mean(dim=2, keepdim=True).expand(b, groups, c // groups, 1).reshape(b, c, 1, 1)


def group_var(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Biased variance over (C/g, H, W), shape (B, C, 1, 1), in float32.

    Two passes with 4-D tensors only: the group mean is the average of per-channel spatial means
    (all channels have H·W elements), then the same for the squared deviations from it.
    """
    if x.shape[1] % groups:
        raise ValueError(f"EvoNorm: {groups} groups do not divide {x.shape[1]} channels")
    xf = x.float()
    mean = _group_average(xf.mean(dim=(2, 3), keepdim=True), groups)
    dev = xf - mean
    return _group_average((dev * dev).mean(dim=(2, 3), keepdim=True), groups)


def group_std(x: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """sqrt(`group_var` + eps), shape (B, C, 1, 1), in float32."""
    return group_var(x, groups).add(eps).sqrt()


def group_rstd(x: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """1 / `group_std` as one rsqrt. S0 multiplies by it instead of dividing by the std: the same
    math, but it exports to a full-integer TFLite file (an int8 DIV aborts when the quantized
    divisor rounds to its zero point; RSQRT has no such case)."""
    return group_var(x, groups).add(eps).rsqrt()


def group_rstd_export(x: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """`group_rstd` in the export form: the same two passes, every op one XNNPACK runs in a
    single partition, in float32 and in int8 (:func:`vizoo.layers.export_swaps.group_mean_rstd`:
    group averages as grouped 1×1 convs with constant weights instead of reshape → mean → expand,
    which becomes RESHAPE/TRANSPOSE/BROADCAST_TO in an NHWC graph; eps as a conv bias)."""
    if x.shape[1] % groups:
        raise ValueError(f"EvoNorm: {groups} groups do not divide {x.shape[1]} channels")
    return group_mean_rstd(x, groups, eps)[1]


def _check_4d(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"EvoNorm2d expects a 4-D (B, C, H, W) input, got shape {tuple(x.shape)}")


# --- base ---------------------------------------------------------------------------------------

class _EvoNormBase(nn.Module):
    """γ, β (and v when the layer has an activation) per channel; timm's names and (C,) shapes."""

    has_v = True

    def __init__(self, num_features: int, apply_act: bool = True, eps: float = PAPER_EPS,
                 device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.apply_act = apply_act
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(num_features, **dd))
        self.bias = nn.Parameter(torch.empty(num_features, **dd))
        self.v = nn.Parameter(torch.empty(num_features, **dd)) if (apply_act and self.has_v) else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        if self.v is not None:
            nn.init.ones_(self.v)

    def _affine(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        return x * self.weight.to(x.dtype).view(shape) + self.bias.to(x.dtype).view(shape)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Old timm (<= 0.4, EvoNormBatch2d/EvoNormSample2d) stored (1, C, 1, 1); ours are (C,).
        for name in ("weight", "bias", "v", "running_var"):
            key = prefix + name
            t = state_dict.get(key)
            if t is not None and t.dim() == 4 and t.numel() == self.num_features:
                state_dict[key] = t.reshape(self.num_features)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, apply_act={self.apply_act}, eps={self.eps}"


class _BatchVarMixin:
    """Batch variance over (N, H, W) in training, the running variance (fp32 buffer) at inference."""

    momentum: float
    unbiased_running_var: bool
    running_var: torch.Tensor

    def _batch_var(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.running_var.float()
        var = x.float().var(dim=(0, 2, 3), unbiased=False)
        with torch.no_grad():
            update = var.detach()
            n = x.numel() // x.shape[1]
            if self.unbiased_running_var and n > 1:
                update = update * (n / (n - 1))
            self.running_var.mul_(1.0 - self.momentum).add_(update.to(self.running_var.dtype), alpha=self.momentum)
        return var


# --- B variants (batch-dependent) -------------------------------------------------------------------

class EvoNorm2dB0(ExportAware, _BatchVarMixin, _EvoNormBase):
    """EvoNorm-B0: ``x / max(sqrt(var_{N,H,W}(x) + eps), v·x + sqrt(var_{H,W}(x) + eps)) · γ + β``.

    The left term uses the batch variance in training and ``running_var`` at inference; the right
    term is per sample. ``timm_compatible=True`` = timm's ``EvoNorm2dB0`` (eps 1e-3, Bessel-corrected
    running variance). ``act_layer`` and ``inplace`` are accepted (timm's model builders pass them)
    and ignored: the nonlinearity is part of the layer.
    """

    def __init__(self, num_features: int, apply_act: bool = True, momentum: float = 0.1,
                 eps: Optional[float] = None, unbiased_running_var: Optional[bool] = None,
                 timm_compatible: bool = False, act_layer=None, inplace: Optional[bool] = None,
                 device=None, dtype=None) -> None:
        if eps is None:
            eps = TIMM_B0_EPS if timm_compatible else PAPER_EPS
        super().__init__(num_features, apply_act=apply_act, eps=eps, device=device, dtype=dtype)
        self.momentum = momentum
        self.unbiased_running_var = timm_compatible if unbiased_running_var is None else unbiased_running_var
        self.register_buffer("running_var", torch.ones(num_features, device=device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_4d(x)
        if self.apply_act:
            left = self._batch_var(x).add(self.eps).sqrt().view(1, -1, 1, 1)
            if self.exporting and not self.training:  # eps of the instance variance as a conv bias
                xf = x.float()
                dev = xf - xf.mean(dim=(2, 3), keepdim=True)
                std = plus_eps((dev * dev).mean(dim=(2, 3), keepdim=True), self.eps).sqrt()
                right = xf * self.v.float().view(1, -1, 1, 1) + std
            else:
                right = x.float() * self.v.float().view(1, -1, 1, 1) + instance_std(x, self.eps)
            x = (x.float() / torch.maximum(left, right)).to(x.dtype)
        return self._affine(x)


class EvoNorm2dB1(ExportAware, _BatchVarMixin, _EvoNormBase):
    """timm's EvoNorm-B1 (paper correspondence unverified): ``x / max(sqrt(var_b + eps),
    (x + 1)·rms_{H,W}(x))``; no ``v``. Only the running-variance Bessel factor differs from timm."""

    has_v = False

    def __init__(self, num_features: int, apply_act: bool = True, momentum: float = 0.1,
                 eps: float = PAPER_EPS, unbiased_running_var: Optional[bool] = None,
                 timm_compatible: bool = False, act_layer=None, inplace: Optional[bool] = None,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, apply_act=apply_act, eps=eps, device=device, dtype=dtype)
        self.momentum = momentum
        self.unbiased_running_var = timm_compatible if unbiased_running_var is None else unbiased_running_var
        self.register_buffer("running_var", torch.ones(num_features, device=device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_4d(x)
        if self.apply_act:
            left = self._batch_var(x).add(self.eps).sqrt().view(1, -1, 1, 1)
            xf = x.float()
            if self.exporting and not self.training:  # eps as a conv bias (see plus_eps)
                rms = plus_eps((xf * xf).mean(dim=(2, 3), keepdim=True), self.eps).sqrt()
            else:
                rms = xf.square().mean(dim=(2, 3), keepdim=True).add(self.eps).sqrt()
            x = (xf / torch.maximum(left, (xf + 1) * rms)).to(x.dtype)
        return self._affine(x)


# --- S variants (per sample, batch-independent) ---------------------------------------------------

class _GroupedEvoNorm(ExportAware, _EvoNormBase):
    """Per-sample group statistics; ``exporting`` switches to the export form (module docstring)."""

    def __init__(self, num_features: int, groups: int = DEFAULT_GROUPS, group_size: Optional[int] = None,
                 apply_act: bool = True, eps: float = PAPER_EPS, group_fallback: Optional[bool] = None,
                 timm_compatible: bool = False, device=None, dtype=None) -> None:
        super().__init__(num_features, apply_act=apply_act, eps=eps, device=device, dtype=dtype)
        fallback = (not timm_compatible) if group_fallback is None else group_fallback
        self.groups = resolve_num_groups(num_features, groups, group_size, fallback)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", groups={self.groups}"

    def _scale_shift(self, rstd: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Export form: ``rstd·γ`` (B, C, 1, 1) and ``β`` (1, C, 1, 1), so ``y = a·scale + shift``."""
        shape = (1, -1, 1, 1)
        return (rstd.to(dtype) * self.weight.to(dtype).view(shape)), self.bias.to(dtype).view(shape)


class EvoNorm2dS0(_GroupedEvoNorm):
    """EvoNorm-S0: ``x · sigmoid(v·x) / sqrt(var_{C/g,H,W}(x) + eps) · γ + β`` (std of the input x).

    Groups are contiguous channel blocks, 32 by default; when 32 does not divide C the TF rule picks
    the largest divisor below it (24 -> 24, 40 -> 20, 144 -> 24). ``timm_compatible=True`` raises
    instead, as timm's ``EvoNorm2dS0`` asserts; eps is 1e-5 in both.
    """

    def __init__(self, num_features: int, groups: int = DEFAULT_GROUPS, group_size: Optional[int] = None,
                 apply_act: bool = True, eps: float = PAPER_EPS, group_fallback: Optional[bool] = None,
                 timm_compatible: bool = False, act_layer=None, inplace: Optional[bool] = None,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, groups, group_size, apply_act, eps, group_fallback,
                         timm_compatible, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_4d(x)
        if self.apply_act:
            v = self.v.to(x.dtype).view(1, -1, 1, 1)
            if self.exporting:
                scale, shift = self._scale_shift(group_rstd_export(x, self.groups, self.eps), x.dtype)
                return x * torch.sigmoid(x * v) * scale + shift
            x = x * torch.sigmoid(x * v) * group_rstd(x, self.groups, self.eps).to(x.dtype)
        return self._affine(x)


class EvoNorm2dS0a(EvoNorm2dS0):
    """timm's S0a: eps 1e-3 and the group std is applied even when ``apply_act=False``."""

    def __init__(self, num_features: int, groups: int = DEFAULT_GROUPS, group_size: Optional[int] = None,
                 apply_act: bool = True, eps: float = 1e-3, group_fallback: Optional[bool] = None,
                 timm_compatible: bool = False, act_layer=None, inplace: Optional[bool] = None,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, groups, group_size, apply_act, eps, group_fallback,
                         timm_compatible, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_4d(x)
        if self.exporting:
            scale, shift = self._scale_shift(group_rstd_export(x, self.groups, self.eps), x.dtype)
            if self.v is not None:
                x = x * torch.sigmoid(x * self.v.to(x.dtype).view(1, -1, 1, 1))
            return x * scale + shift
        d = group_std(x, self.groups, self.eps).to(x.dtype)
        if self.v is not None:
            x = x * torch.sigmoid(x * self.v.to(x.dtype).view(1, -1, 1, 1))
        return self._affine(x / d)


class EvoNorm2dS1(_GroupedEvoNorm):
    """timm's S1 (paper correspondence unverified): ``act(x) / group_std(x) · γ + β``, act = SiLU."""

    has_v = False

    def __init__(self, num_features: int, groups: int = DEFAULT_GROUPS, group_size: Optional[int] = None,
                 apply_act: bool = True, act_layer: Optional[type] = None, eps: float = PAPER_EPS,
                 group_fallback: Optional[bool] = None, timm_compatible: bool = False,
                 inplace: Optional[bool] = None, device=None, dtype=None) -> None:
        super().__init__(num_features, groups, group_size, apply_act, eps, group_fallback,
                         timm_compatible, device=device, dtype=dtype)
        self.act = (act_layer or nn.SiLU)() if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_4d(x)
        if self.apply_act:
            if self.exporting:
                scale, shift = self._scale_shift(group_rstd_export(x, self.groups, self.eps), x.dtype)
                return self.act(x) * scale + shift
            x = self.act(x) / group_std(x, self.groups, self.eps).to(x.dtype)
        return self._affine(x)


#: Short names used by model builders and the converter.
EVONORM_LAYERS: dict[str, type[nn.Module]] = {
    "b0": EvoNorm2dB0, "b1": EvoNorm2dB1, "s0": EvoNorm2dS0, "s0a": EvoNorm2dS0a, "s1": EvoNorm2dS1,
}


def get_evonorm_layer(kind: str) -> type[nn.Module]:
    """``'b0'`` / ``'s0'`` / ... (or timm's ``'evonormb0'``) -> the layer class."""
    key = kind.lower().replace("_", "").replace("evonorm2d", "").replace("evonorm", "")
    if key not in EVONORM_LAYERS:
        raise ValueError(f"unknown EvoNorm kind {kind!r}; choose from {sorted(EVONORM_LAYERS)}")
    return EVONORM_LAYERS[key]


def evonorm_norm_act(kind: str = "s0", **defaults):
    """A plain function ``f(num_features, **kw) -> layer`` that timm's builders accept as
    ``norm_layer`` (timm's ``get_norm_act_layer`` takes functions as-is; a class or partial of ours
    would be looked up in its own tables and rejected)."""
    cls = get_evonorm_layer(kind)

    def norm_act(num_features: int, **kwargs) -> nn.Module:
        return cls(num_features, **{**defaults, **kwargs})

    norm_act.__name__ = f"evonorm_{kind}"
    norm_act.__qualname__ = norm_act.__name__
    return norm_act
