"""Convolution and pooling MIL ops (1-D to 3-D spatial), written as im2col + BLAS.

Depthwise convolutions take a shifted multiply-add path instead (one pass per kernel tap),
which is far cheaper than a batched matmul with K = kernel size.
"""
from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .registry import OpContext, register


# ------------------------------------------------------------------------ geometry
def spatial_pads(
    pad_type: str,
    in_sizes: tuple[int, ...],
    kernel: list[int],
    strides: list[int],
    dilations: list[int],
    custom: list[int] | None,
) -> list[tuple[int, int]]:
    """(before, after) padding per spatial dim for MIL's pad_type values."""
    if pad_type == "valid":
        return [(0, 0)] * len(kernel)
    if pad_type == "custom":
        custom = custom or [0] * (2 * len(kernel))
        return [(custom[2 * i], custom[2 * i + 1]) for i in range(len(kernel))]
    if pad_type in ("same", "same_lower"):
        pads = []
        for size, k, s, d in zip(in_sizes, kernel, strides, dilations):
            eff = (k - 1) * d + 1
            total = max(0, (math.ceil(size / s) - 1) * s + eff - size)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if pad_type == "same" else (big, small))
        return pads
    raise ValueError(f"unknown pad_type {pad_type!r}")


def _conv_params(ctx: OpContext, x: np.ndarray, kernel: list[int]):
    n_sp = x.ndim - 2
    strides = ctx.ints("strides", None) or [1] * n_sp
    dilations = ctx.ints("dilations", None) or [1] * n_sp
    pad_type = ctx.scalar("pad_type", "valid")
    pads = spatial_pads(pad_type, x.shape[2:], kernel, strides, dilations, ctx.ints("pad", None))
    return strides, dilations, pads


def _windows(
    x: np.ndarray, kernel: list[int], strides: list[int], dilations: list[int]
) -> np.ndarray:
    """View of shape (N, C, *out, *kernel) over an already padded input."""
    n_sp = len(kernel)
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    win = sliding_window_view(x, eff, axis=tuple(range(2, 2 + n_sp)))
    sel = (slice(None), slice(None))
    sel += tuple(slice(None, None, s) for s in strides)
    sel += tuple(slice(None, None, d) for d in dilations)
    return win[sel]


# ---------------------------------------------------------------------------- conv
def convolve(
    x: np.ndarray,
    w: np.ndarray,
    strides: list[int],
    dilations: list[int],
    pads: list[tuple[int, int]],
    groups: int,
) -> np.ndarray:
    """Grouped N-d cross-correlation, weight [C_out, C_in/groups, *K], fp32 accumulation."""
    x = x.astype(np.float32, copy=False)
    w = w.astype(np.float32, copy=False)
    n, c_in = x.shape[:2]
    c_out, cg = w.shape[:2]
    kernel = list(w.shape[2:])
    n_sp = len(kernel)
    if cg * groups != c_in or c_out % groups:
        raise ValueError(f"conv: C_in={c_in}, weight {w.shape} and groups={groups} do not agree")
    if any(p for pair in pads for p in pair):
        x = np.pad(x, [(0, 0), (0, 0)] + [tuple(p) for p in pads])
    og = c_out // groups
    if all(k == 1 for k in kernel):
        xs = x[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)]
        out_sp = xs.shape[2:]
        cols = xs.reshape(n, groups, cg, -1)  # (N, G, Cg, P)
        out = np.matmul(w.reshape(groups, og, cg), cols)  # (N, G, og, P)
        return out.reshape((n, c_out) + out_sp)
    win = _windows(x, kernel, strides, dilations)  # (N, C, *out, *K)
    out_sp = win.shape[2 : 2 + n_sp]
    if cg == 1 and groups == c_in:
        mult = c_out // c_in
        wk = w.reshape((c_in, mult) + tuple(kernel))
        out = np.zeros((n, c_in, mult) + tuple(out_sp), dtype=np.float32)
        for tap in np.ndindex(*kernel):
            xs = win[(Ellipsis,) + tap][:, :, None]  # (N, C, 1, *out)
            wt = wk[(slice(None), slice(None)) + tap].reshape((1, c_in, mult) + (1,) * n_sp)
            out += xs * wt
        return out.reshape((n, c_out) + tuple(out_sp))
    p = int(np.prod(out_sp))
    k = int(np.prod(kernel))
    win = win.reshape((n, groups, cg) + tuple(out_sp) + tuple(kernel))
    perm = (1, 0) + tuple(range(3, 3 + n_sp)) + (2,) + tuple(range(3 + n_sp, 3 + 2 * n_sp))
    cols = np.ascontiguousarray(win.transpose(perm)).reshape(groups, n * p, cg * k)
    wmat = w.reshape(groups, og, cg * k).transpose(0, 2, 1)  # (G, cg*K, og)
    out = np.matmul(cols, wmat)  # (G, N*P, og)
    out = out.reshape((groups, n) + tuple(out_sp) + (og,))
    out = np.moveaxis(out, -1, 2)  # (G, N, og, *out)
    out = np.moveaxis(out, 0, 1).reshape((n, c_out) + tuple(out_sp))
    return out


@register("conv")
def _conv(ctx: OpContext) -> np.ndarray:
    x, w = ctx.tensor("x"), ctx.tensor("weight")
    strides, dilations, pads = _conv_params(ctx, x, list(w.shape[2:]))
    out = convolve(x, w, strides, dilations, pads, int(ctx.scalar("groups", 1)))
    if ctx.has("bias"):
        out = out + ctx.tensor("bias").reshape((1, -1) + (1,) * (out.ndim - 2))
    return out


@register("conv_transpose")
def _conv_transpose(ctx: OpContext) -> np.ndarray:
    x, w = ctx.tensor("x"), ctx.tensor("weight")  # weight [C_in, C_out/groups, *K]
    n, c_in = x.shape[:2]
    groups = int(ctx.scalar("groups", 1))
    kernel = list(w.shape[2:])
    n_sp = len(kernel)
    strides = ctx.ints("strides", None) or [1] * n_sp
    dilations = ctx.ints("dilations", None) or [1] * n_sp
    pad_type = ctx.scalar("pad_type", "valid")
    og = w.shape[1]
    cg = c_in // groups
    c_out = og * groups
    full = [(i - 1) * s + (k - 1) * d + 1 for i, s, k, d in zip(x.shape[2:], strides, kernel, dilations)]
    out = np.zeros((n, groups, og) + tuple(full), dtype=np.float32)
    xg = x.reshape((n, groups, cg) + x.shape[2:])
    wg = w.reshape((groups, cg, og) + tuple(kernel))
    for tap in np.ndindex(*kernel):
        # contribution of tap t: out[..., i*s + t*d] += sum_c x[c, i] * w[c, o, t]
        contrib = np.einsum("ngc...,gco->ngo...", xg, wg[(Ellipsis,) + tap], optimize=True)
        sel = tuple(
            slice(t * d, t * d + (i - 1) * s + 1, s)
            for t, d, i, s in zip(tap, dilations, x.shape[2:], strides)
        )
        out[(slice(None), slice(None), slice(None)) + sel] += contrib
    out = out.reshape((n, c_out) + tuple(full))
    if pad_type == "custom":
        pad = ctx.ints("pad", None) or [0] * (2 * n_sp)
        before = [pad[2 * i] for i in range(n_sp)]
        sizes = [f - pad[2 * i] - pad[2 * i + 1] for i, f in enumerate(full)]
    elif pad_type == "same":
        sizes = [i * s for i, s in zip(x.shape[2:], strides)]
        before = [max(f - sz, 0) // 2 for f, sz in zip(full, sizes)]
    elif pad_type == "valid":
        before, sizes = [0] * n_sp, full
    else:
        raise ctx.unsupported(f"pad_type {pad_type!r}")
    if ctx.has("output_shape"):
        sizes = ctx.ints("output_shape")[-n_sp:]
    # crop (or zero-extend, PyTorch's output_padding) to the requested output size
    res = np.zeros((n, c_out) + tuple(sizes), dtype=np.float32)
    src = tuple(slice(b, min(b + sz, f)) for b, sz, f in zip(before, sizes, full))
    dst = tuple(slice(0, s.stop - s.start) for s in src)
    res[(slice(None), slice(None)) + dst] = out[(slice(None), slice(None)) + src]
    if ctx.has("bias"):
        res = res + ctx.tensor("bias").reshape((1, -1) + (1,) * n_sp)
    return res


# ----------------------------------------------------------------------------- pools
def _pool_geometry(ctx: OpContext, x: np.ndarray):
    kernel = ctx.ints("kernel_sizes")
    n_sp = len(kernel)
    strides = ctx.ints("strides", None) or [1] * n_sp
    pad_type = ctx.scalar("pad_type", "valid")
    pads = spatial_pads(pad_type, x.shape[2:], kernel, strides, [1] * n_sp, ctx.ints("pad", None))
    ceil_mode = bool(ctx.scalar("ceil_mode", False))
    extra = []  # cells past the padded input that ceil mode's last window reaches
    for size, k, s, (pb, pa) in zip(x.shape[2:], kernel, strides, pads):
        padded = size + pb + pa
        if ceil_mode:
            out = (padded - k + s - 1) // s + 1
            if (out - 1) * s >= size + pb and (pb + pa) > 0:
                out -= 1
        else:
            out = (padded - k) // s + 1
        extra.append(max(0, (out - 1) * s + k - padded))
    return kernel, strides, pads, extra


def _pool(ctx: OpContext, x: np.ndarray, fill: float):
    kernel, strides, pads, extra = _pool_geometry(ctx, x)
    widths = [(0, 0), (0, 0)] + [(pb, pa + e) for (pb, pa), e in zip(pads, extra)]
    xp = np.pad(x, widths, constant_values=fill)
    return _windows(xp, kernel, strides, [1] * len(kernel)), kernel, strides, pads, extra


@register("max_pool")
def _max_pool(ctx: OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    win, kernel, *_ = _pool(ctx, x, -np.inf)
    return win.max(axis=tuple(range(-len(kernel), 0)))


@register("l2_pool")
def _l2_pool(ctx: OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    win, kernel, *_ = _pool(ctx, np.square(x), 0.0)
    return np.sqrt(win.sum(axis=tuple(range(-len(kernel), 0)), dtype=np.float64))


@register("avg_pool")
def _avg_pool(ctx: OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    win, kernel, strides, pads, extra = _pool(ctx, x, 0.0)
    axes = tuple(range(-len(kernel), 0))
    total = win.sum(axis=axes, dtype=np.float64)
    exclude = bool(ctx.scalar("exclude_padding_from_average", False))
    # divisor: count of real input cells (exclude) or of input + explicit padding cells;
    # cells only ceil mode reaches never count (PyTorch's rule, also Core ML's)
    ones = np.ones((1, 1) + x.shape[2:], dtype=np.float64)
    widths = [(0, 0), (0, 0)] + [(pb, pa) for pb, pa in pads]
    counted = ones if exclude else np.pad(ones, widths, constant_values=1.0)
    lead = [(0, 0), (0, 0)] + ([(pb, pa + e) for (pb, pa), e in zip(pads, extra)] if exclude
                                else [(0, e) for e in extra])
    counted = np.pad(counted, lead, constant_values=0.0)
    count = _windows(counted, kernel, strides, [1] * len(kernel)).sum(axis=axes)
    return (total / count).astype(np.float32)
