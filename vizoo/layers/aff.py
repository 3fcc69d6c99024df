"""Adaptive Frequency Filter (AFF) token mixer of AFFNet (Huang et al., ICCV 2023).

``out = irfft2(M(X) * X) + v`` with ``X = rfft2(v)`` (ortho): an instance-adaptive mask ``M``,
predicted from the spectrum itself by a complex two-layer MLP over channels that is block-diagonal
in ``num_groups`` contiguous channel groups and shared by all frequency bins, sparsified by a
soft-shrink of its real and imaginary parts. In the spatial domain this is a global circular
convolution of every channel with its own input-dependent kernel, at O(N log N).

Two equal forms:
- training/eval: ``torch.fft`` in float32 with autocast disabled (as the official code);
- export (inside :func:`vizoo.layers.export_mode.export_mode`): no FFT and no complex dtype. The
  DFT is matmuls with constant matrices in channels-last layout (:mod:`vizoo.layers.dft`), the
  mask MLP is grouped 1x1 convolutions, and soft-shrink is ``x - clamp(x, -l, l)``; in TFLite all
  of it runs in one XNNPACK partition with two transposes per transform direction.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import get_act_layer

from .dft import hermitian_project, irfft2_ortho_nhwc, rfft2_ortho_nhwc
from .export_mode import ExportAware

__all__ = ["AdaptiveFrequencyFilter"]


def _group_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-group channel map at every bin: x [B, K, i, H, W], weight [K, i, o] -> [B, K, o, H, W]."""
    return torch.einsum("bkihw,kio->bkohw", x, weight)


def _compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """Half precision is too coarse for a spectrum: compute in float32 (float64 stays float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` that records no op when nothing changes (keeps exported graphs clean)."""
    return t if t.dtype == dtype else t.to(dtype)


def _swap_real_imag(packed: torch.Tensor) -> torch.Tensor:
    """[re, im] -> [-im, re] on axis 2 of [B, K, 2, H, C]: multiplication by the imaginary unit."""
    return torch.cat([-packed[:, :, 1:2], packed[:, :, 0:1]], dim=2)


class AdaptiveFrequencyFilter(ExportAware, nn.Module):
    """AFF token mixer on ``[B, C, H, W]`` (any H, W); returns ``filtered + input``.

    Parameters keep the official names and layouts (index 0 real, 1 imaginary part; weights stored
    input-major, ``out[o] = sum_i in[i] * w[k, i, o]``): ``w1 [2, K, c, c*f]``, ``b1 [2, K, c*f]``,
    ``w2 [2, K, c*f, c]``, ``b2 [2, K, c]`` with ``c = dim / K``.

    Args:
        dim: channels C; must be divisible by ``num_groups``.
        num_groups: K, block-diagonal groups of the mask MLP (AFFNet fixes 8).
        hidden_factor: f, hidden width of the mask MLP per group as a multiple of c.
        sparsity_threshold: soft-shrink lambda, applied to the ortho-normalised spectrum.
        act_layer: activation between the two complex layers (applied to real and imaginary parts
            separately); the released AFFNet weights were trained with SiLU ("swish").
    """

    def __init__(self, dim: int, num_groups: int = 8, hidden_factor: int = 1,
                 sparsity_threshold: float = 0.01, act_layer: str | Callable[..., nn.Module] = "silu",
                 init_std: float = 0.02) -> None:
        super().__init__()
        if dim % num_groups != 0:
            raise ValueError(f"AFF: channels {dim} must be divisible by num_groups {num_groups}")
        self.dim = dim
        self.num_groups = num_groups
        self.group_size = dim // num_groups
        self.hidden_factor = hidden_factor
        self.sparsity_threshold = float(sparsity_threshold)
        c, hidden = self.group_size, self.group_size * hidden_factor
        self.w1 = nn.Parameter(init_std * torch.randn(2, num_groups, c, hidden))
        self.b1 = nn.Parameter(init_std * torch.randn(2, num_groups, hidden))
        self.w2 = nn.Parameter(init_std * torch.randn(2, num_groups, hidden, c))
        self.b2 = nn.Parameter(init_std * torch.randn(2, num_groups, c))
        self.act = get_act_layer(act_layer)()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_groups={self.num_groups}, hidden_factor={self.hidden_factor}, "
                f"sparsity_threshold={self.sparsity_threshold}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.dim:
            raise ValueError(f"AFF expects [B, {self.dim}, H, W], got {tuple(x.shape)}")
        filtered = self._filter_dft(x) if self.exporting else self._filter_fft(x)
        return filtered + x

    # --- training form: torch.fft, float32, autocast off -------------------------------------
    def _filter_fft(self, x: torch.Tensor) -> torch.Tensor:
        b, ch, height, width = x.shape
        k, lam = self.num_groups, self.sparsity_threshold
        with torch.autocast(device_type=x.device.type, enabled=False):
            spec = torch.fft.rfft2(_compute_dtype(x), norm="ortho")  # [B, C, H, Kw] complex
            grouped = spec.reshape(b, k, self.group_size, height, spec.shape[-1])
            re, im = grouped.real, grouped.imag
            dt = spec.real.dtype
            w1, b1 = self.w1.to(dt), self.b1.to(dt)[..., None, None]
            w2, b2 = self.w2.to(dt), self.b2.to(dt)[..., None, None]
            h_re = self.act(_group_linear(re, w1[0]) - _group_linear(im, w1[1]) + b1[0])
            h_im = self.act(_group_linear(im, w1[0]) + _group_linear(re, w1[1]) + b1[1])
            m_re = _group_linear(h_re, w2[0]) - _group_linear(h_im, w2[1]) + b2[0]
            m_im = _group_linear(h_im, w2[0]) + _group_linear(h_re, w2[1]) + b2[1]
            mask = torch.complex(F.softshrink(m_re, lam), F.softshrink(m_im, lam))
            filtered = mask.reshape(b, ch, height, -1) * spec
            if x.device.type != "cpu":
                # CUDA's C2R may treat non-Hermitian input unlike the CPU (pytorch#154496); on a
                # Hermitian spectrum all backends agree, and the CPU result is unchanged.
                filtered = hermitian_project(filtered, width)
            out = torch.fft.irfft2(filtered, s=(height, width), norm="ortho")
        return out.to(x.dtype)

    # --- export form: channels-last DFT matmuls, grouped 1x1 convs, clamp soft-shrink --------
    def _conv_weights(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[2, K, i, o] input-major -> two grouped-conv weights [K*o, i, 1, 1] (real, imag)."""
        k, i, o = weight.shape[1:]
        w = weight.transpose(-1, -2).reshape(2, k * o, i, 1, 1)
        return w[0], w[1]

    def _complex_layer(self, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Complex group-linear over channels of a packed spectrum [B, K, 2, H, C]:
        ``W_re z + W_im (i z) + b`` with ``i z = [-z_im, z_re]`` (no complex dtype needed)."""
        w_re, w_im = self._conv_weights(_cast(weight, z.dtype))
        height = z.shape[3]

        def conv(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            # [B, K, 2, H, C] seen as an NCHW image [B, C, K, 2H]; the permutes cancel against the
            # converter's own NCHW->NHWC transposes, so the exported conv runs channels-last.
            return F.conv2d(t.flatten(2, 3).permute(0, 3, 1, 2), w, groups=self.num_groups)

        out = conv(z, w_re) + conv(_swap_real_imag(z), w_im)
        out = out.permute(0, 2, 3, 1).unflatten(2, (2, height))            # [B, K, 2, H, C']
        return out + _cast(bias, z.dtype).reshape(2, 1, -1)                 # [2, 1, C'] per part

    def _filter_dft(self, x: torch.Tensor) -> torch.Tensor:
        lam = self.sparsity_threshold
        spec = rfft2_ortho_nhwc(_compute_dtype(x).permute(0, 2, 3, 1))      # [B, K, 2, H, C]
        hidden = self.act(self._complex_layer(spec, self.w1, self.b1))
        mask = self._complex_layer(hidden, self.w2, self.b2)
        mask = mask - mask.clamp(-lam, lam)                                 # soft-shrink
        m_re, m_im = mask[:, :, 0:1], mask[:, :, 1:2]
        s_re, s_im = spec[:, :, 0:1], spec[:, :, 1:2]
        filtered = torch.cat([m_re * s_re - m_im * s_im, m_re * s_im + m_im * s_re], dim=2)
        out = irfft2_ortho_nhwc(filtered, x.shape[-1]).permute(0, 3, 1, 2)  # back to NCHW
        return _cast(out, x.dtype)
