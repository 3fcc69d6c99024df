"""Fixed-size 2-D real DFT and its inverse (``norm="ortho"``) as matmuls with constant matrices.

Why: CoreML and TFLite converters take no FFT op, but a DFT of a fixed size is a linear map. Done
separably (along W, then along H) it is two small matmuls with precomputed cos/sin matrices each
way, far cheaper than one dense (HW x HW) matrix, and every runtime has matmul.

Layout: channels last, ``[B, H, W, C]``, the layout TFLite's convolutions use, so an exported
model needs no transposes around the transforms except one per direction between the W and the H
step. Each step left-multiplies by a constant over a non-channel axis (BATCH_MATMUL in TFLite,
delegated to XNNPACK). Complex tensors are never used: the half-spectrum is one real tensor
``[B, K, 2, H, C]`` (``K = W // 2 + 1`` frequency columns first; axis 2 holds the real and the
imaginary part), so a complex 1-D DFT along H is ONE real matmul with a 2H x 2H matrix.

Inverse semantics: the C2R step takes "the real part of the full inverse", i.e. imaginary parts of
the DC (and, for even W, Nyquist) columns are ignored after the inverse along H. This is what CPU
``torch.fft.irfft2`` (pocketfft) and numpy do on a non-Hermitian spectrum; see
:func:`hermitian_project` for making any backend agree with it.

Matrices are computed once per (H, W, dtype) in float64 numpy and cached as numpy arrays; they are
turned into tensors at call time (``torch.from_numpy`` is free on the CPU), so a tracer such as
``torch.export`` records them as constants instead of caching fake tensors.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

__all__ = ["rfft2_ortho", "irfft2_ortho", "rfft2_ortho_nhwc", "irfft2_ortho_nhwc",
           "hermitian_project", "num_rfft_cols"]


def num_rfft_cols(width: int) -> int:
    """Columns kept by a real FFT along a width ``width`` axis."""
    return width // 2 + 1


@functools.lru_cache(maxsize=64)
def _matrices(height: int, width: int, dtype_name: str) -> dict[str, np.ndarray]:
    """The four matrices of the separable transforms (see module docstring)."""
    if height < 1 or width < 1:
        raise ValueError(f"DFT size must be positive, got {height}x{width}")
    k_w = num_rfft_cols(width)
    scale = 1.0 / np.sqrt(height * width)
    ang_w = 2.0 * np.pi * np.outer(np.arange(k_w), np.arange(width)) / width  # [K, W]
    cos_w, sin_w = np.cos(ang_w), np.sin(ang_w)
    ang_h = 2.0 * np.pi * np.outer(np.arange(height), np.arange(height)) / height  # [H, H], symmetric
    cos_h, sin_h = np.cos(ang_h), np.sin(ang_h)
    # C2R weights: every column but DC (and Nyquist for even W) stands for itself and its mirror.
    alpha = np.full(k_w, 2.0)
    alpha[0] = 1.0
    if width % 2 == 0:
        alpha[-1] = 1.0
    # Left-multiplication matrices; rows index the output, columns the input, "(p, k)" meaning
    # part-major (p = 0 real, 1 imaginary) over k.
    mats = {
        # x over W -> A over (p, k): A = sum_w x e^{-2 pi i k w / W}
        "fwd_w": np.concatenate([cos_w, -sin_w], axis=0),                           # [2K, W]
        # A over (p, h) -> X over (p, m): complex DFT along H, times the ortho scale
        "fwd_h": scale * np.block([[cos_h, sin_h], [-sin_h, cos_h]]),               # [2H, 2H]
        # Y over (p, m) -> B over (p, h): complex inverse DFT along H (scale applied along W)
        "inv_h": np.block([[cos_h, -sin_h], [sin_h, cos_h]]),                       # [2H, 2H]
        # B over (p, k) -> real signal over W (C2R: real part of the full inverse)
        "inv_w": scale * np.concatenate([(alpha[:, None] * cos_w).T,
                                         -(alpha[:, None] * sin_w).T], axis=1),     # [W, 2K]
    }
    return {k: np.ascontiguousarray(v.astype(dtype_name)) for k, v in mats.items()}


def _matrix(name: str, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    if not like.is_floating_point():
        raise TypeError(f"DFT input must be a floating point tensor, got {like.dtype}")
    dtype_name = str(like.dtype).replace("torch.", "")
    if dtype_name not in ("float32", "float64", "float16"):
        # bfloat16 has no numpy dtype; its precision is too low for a DFT anyway.
        raise TypeError(f"DFT matrices exist for float16/32/64, got {like.dtype}; cast to float32")
    mat = torch.from_numpy(_matrices(height, width, dtype_name)[name])
    return mat if like.device.type == "cpu" else mat.to(like.device)


def rfft2_ortho_nhwc(x: torch.Tensor) -> torch.Tensor:
    """``rfft2`` over (H, W) of channels-last ``x [B, H, W, C]``, ortho-normalised, as the packed
    real tensor ``[B, K, 2, H, C]``: ``[b, k, 0, m, c]`` is the real part of bin (m, k) of channel c,
    ``[b, k, 1, m, c]`` its imaginary part."""
    if x.ndim != 4:
        raise ValueError(f"expected a channels-last [B, H, W, C] tensor, got shape {tuple(x.shape)}")
    _, height, width, _ = x.shape
    if height == width == 1:  # the DFT of one point is itself; no size-1 matmuls for converters
        return torch.stack([x, torch.zeros_like(x)], dim=2)            # [B, 1, 2, 1, C]
    k_w = num_rfft_cols(width)
    a = _matrix("fwd_w", height, width, x) @ x                        # [B, H, 2K, C]
    a = a.unflatten(2, (2, k_w)).permute(0, 3, 2, 1, 4)               # [B, K, 2, H, C]
    out = _matrix("fwd_h", height, width, x) @ a.flatten(2, 3)        # [B, K, 2H, C]
    return out.unflatten(2, (2, height))


def irfft2_ortho_nhwc(spec: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of :func:`rfft2_ortho_nhwc`: packed ``[B, K, 2, H, C]`` -> ``[B, H, width, C]``, as
    ``irfft2(..., s=(H, width), norm="ortho")``; the spectrum need not be Hermitian (real part)."""
    if spec.ndim != 5 or spec.shape[2] != 2 or spec.shape[1] != num_rfft_cols(width):
        raise ValueError(f"packed spectrum must be [B, {num_rfft_cols(width)}, 2, H, C] for width "
                         f"{width}, got {tuple(spec.shape)}")
    _, k_w, _, height, _ = spec.shape
    if height == width == 1:  # real part of the one point (C2R semantics)
        return spec[:, :, 0]                                          # [B, 1, 1, C]
    b = _matrix("inv_h", height, width, spec) @ spec.flatten(2, 3)   # [B, K, 2H, C]
    b = b.unflatten(2, (2, height)).permute(0, 3, 2, 1, 4)            # [B, H, 2, K, C]
    return _matrix("inv_w", height, width, spec) @ b.flatten(2, 3)    # [B, H, W, C]


def rfft2_ortho(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.fft.rfft2(x, norm="ortho")`` of ``x [..., H, W]`` as (real, imag), each
    ``[..., H, W // 2 + 1]``."""
    lead, (height, width) = x.shape[:-2], x.shape[-2:]
    spec = rfft2_ortho_nhwc(x.reshape(-1, height, width, 1))[..., 0]  # [N, K, 2, H]
    real, imag = spec[:, :, 0].transpose(1, 2), spec[:, :, 1].transpose(1, 2)
    return real.reshape(*lead, height, -1), imag.reshape(*lead, height, -1)


def irfft2_ortho(real: torch.Tensor, imag: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``torch.fft.irfft2(real + 1j * imag, s=size, norm="ortho")`` with CPU (real-part) semantics."""
    height, width = size
    if real.shape != imag.shape or real.shape[-2:] != (height, num_rfft_cols(width)):
        raise ValueError(f"real/imag must both be [..., {height}, {num_rfft_cols(width)}] for "
                         f"size {size}, got {tuple(real.shape)} and {tuple(imag.shape)}")
    lead = real.shape[:-2]
    spec = torch.stack([real.reshape(-1, height, real.shape[-1]).transpose(1, 2),
                        imag.reshape(-1, height, imag.shape[-1]).transpose(1, 2)], dim=2)
    return irfft2_ortho_nhwc(spec[..., None], width)[..., 0].reshape(*lead, height, width)


def hermitian_project(spec: torch.Tensor, width: int) -> torch.Tensor:
    """Make the self-mirrored columns (DC and, for even ``width``, Nyquist) of a complex
    half-spectrum ``[..., H, K]`` Hermitian along H: ``Y[m] <- (Y[m] + conj(Y[-m])) / 2``.

    The real-part inverse is unchanged by this (it only depends on the Hermitian part), but after
    it every backend's C2R transform must agree: CUDA's ``irfft2`` is known to treat non-Hermitian
    input differently from the CPU (pytorch/pytorch#154496, #104867).
    """
    cols = [0] + ([spec.shape[-1] - 1] if width % 2 == 0 and spec.shape[-1] > 1 else [])
    out = spec.clone()
    for c in cols:
        col = spec[..., c]
        mirrored = torch.roll(torch.flip(col, dims=[-1]), shifts=1, dims=-1)  # Y[(-m) mod H]
        out[..., c] = 0.5 * (col + mirrored.conj())
    return out
