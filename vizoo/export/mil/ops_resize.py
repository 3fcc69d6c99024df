"""Image resizing MIL ops: upsample / resize (nearest, bilinear) and resample (grid_sample).

Bilinear resizing is separable: 1-D linear interpolation along H, then along W, on the
grid points each op's sampling mode defines (see the coremltools op docs).
"""
from __future__ import annotations

import numpy as np

from .registry import OpContext, register


def _linear_along(x: np.ndarray, grid: np.ndarray, axis: int) -> np.ndarray:
    n = x.shape[axis]
    grid = np.clip(grid, 0.0, n - 1)
    lo = np.floor(grid).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    frac = (grid - lo).astype(np.float32)
    shape = [1] * x.ndim
    shape[axis] = -1
    frac = frac.reshape(shape)
    return np.take(x, lo, axis=axis) * (1 - frac) + np.take(x, hi, axis=axis) * frac


def _bilinear(x: np.ndarray, grid_h: np.ndarray, grid_w: np.ndarray) -> np.ndarray:
    return _linear_along(_linear_along(x, grid_h, x.ndim - 2), grid_w, x.ndim - 1)


def _grid(mode: str, n_in: int, n_out: int) -> np.ndarray:
    """Sampling positions of resize_bilinear's sampling modes, in input pixel units."""
    i = np.arange(n_out, dtype=np.float64)
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
        if n_out == 1:
            return np.full(1, 0.0 if mode == "STRICT_ALIGN_CORNERS" else (n_in - 1) / 2)
        return i * (n_in - 1) / (n_out - 1)
    if mode == "DEFAULT":
        if n_out == 1:
            return np.zeros(1)
        return i * (n_in - n_in / n_out) / (n_out - 1)
    if mode == "OFFSET_CORNERS":
        delta = max(1, n_in - 1) / n_out
        return 0.5 * delta + i * delta
    if mode == "UNALIGN_CORNERS":
        spacing = n_in / n_out
        return i * spacing + 0.5 * spacing - 0.5
    raise ValueError(mode)


def _nearest_index(out: int, n_in: int, scale: float) -> np.ndarray | None:
    """Source rows of a nearest resize, or None where the runtime's rounding decides.

    PyTorch (and TF) take floor(i * in / out); a scale factor suggests floor(i / scale). The
    converter encodes a target size as a scale (nudged up so the output size floors right),
    and the two rules agree for integer and most upscaling factors. Where they disagree (e.g.
    4 -> 2 rows, scale 0.500025) Core ML's choice is undocumented, so the op is refused.
    """
    i = np.arange(out)
    by_size = np.minimum(np.floor(i * n_in / out).astype(np.int64), n_in - 1)
    by_scale = np.minimum(np.floor(i / scale).astype(np.int64), n_in - 1)
    return by_size if np.array_equal(by_size, by_scale) else None


def _nearest(ctx: OpContext, x: np.ndarray, out_h: int, out_w: int, scale_h: float, scale_w: float):
    ih = _nearest_index(out_h, x.shape[-2], scale_h)
    iw = _nearest_index(out_w, x.shape[-1], scale_w)
    if ih is None or iw is None:
        raise ctx.unsupported(
            f"nearest resize {x.shape[-2]}x{x.shape[-1]} -> {out_h}x{out_w} at scale "
            f"({scale_h:g}, {scale_w:g}): source pixels depend on undocumented rounding"
        )
    return np.take(np.take(x, ih, axis=-2), iw, axis=-1)


@register("upsample_nearest_neighbor")
def _upsample_nearest(ctx: OpContext) -> np.ndarray:
    x = ctx.raw("x")
    sh = float(ctx.scalar("scale_factor_height", 1))
    sw = float(ctx.scalar("scale_factor_width", 1))
    out_h, out_w = int(np.floor(x.shape[-2] * sh)), int(np.floor(x.shape[-1] * sw))
    return _nearest(ctx, x, out_h, out_w, sh, sw)


@register("resize_nearest_neighbor")
def _resize_nearest(ctx: OpContext) -> np.ndarray:
    x = ctx.raw("x")
    out_h, out_w = int(ctx.scalar("target_size_height")), int(ctx.scalar("target_size_width"))
    return _nearest(ctx, x, out_h, out_w, out_h / x.shape[-2], out_w / x.shape[-1])


@register("upsample_bilinear")
def _upsample_bilinear(ctx: OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    sh = float(ctx.scalar("scale_factor_height", 1))
    sw = float(ctx.scalar("scale_factor_width", 1))
    align = bool(ctx.scalar("align_corners", True))
    half_pixel = bool(ctx.scalar("half_pixel_centers", not align))
    h, w = x.shape[-2:]
    out_h, out_w = int(np.floor(h * sh)), int(np.floor(w * sw))
    if align:
        mode = "STRICT_ALIGN_CORNERS"
    elif half_pixel:
        mode = "UNALIGN_CORNERS"
    else:  # TF's legacy resize: position i * in / out
        return _bilinear(x, np.arange(out_h) * h / out_h, np.arange(out_w) * w / out_w)
    return _bilinear(x, _grid(mode, h, out_h), _grid(mode, w, out_w))


@register("resize_bilinear")
def _resize_bilinear(ctx: OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    out_h = int(ctx.scalar("target_size_height", 1))
    out_w = int(ctx.scalar("target_size_width", 1))
    mode = ctx.scalar("sampling_mode", "DEFAULT")
    try:
        return _bilinear(x, _grid(mode, x.shape[-2], out_h), _grid(mode, x.shape[-1], out_w))
    except ValueError:
        raise ctx.unsupported(f"sampling_mode {mode!r}") from None


@register("resize")
def _resize(ctx: OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    shape = ctx.ints("shape")
    dims = int(ctx.scalar("resized_dims"))
    interp = ctx.scalar("interpolation_mode", "LINEAR")
    mode = ctx.scalar("sampling_mode", "DEFAULT")
    if dims > 2:
        raise ctx.unsupported(f"resize over {dims} dims")
    targets = []
    for k in range(dims, 0, -1):  # right-most `dims` entries of shape, 0 keeps x's size
        s = shape[len(shape) - k]
        targets.append(x.shape[x.ndim - k] if s == 0 else s)
    if dims == 1:
        targets = [x.shape[-2]] + targets
    if interp == "NEAREST_NEIGHBOR":
        if mode != "DEFAULT":
            raise ctx.unsupported(f"nearest resize with sampling_mode {mode!r}")
        out_h, out_w = targets
        return _nearest(ctx, x, out_h, out_w, out_h / x.shape[-2], out_w / x.shape[-1])
    if interp != "LINEAR":
        raise ctx.unsupported(f"interpolation_mode {interp!r}")
    try:
        gh = _grid(mode, x.shape[-2], targets[0])
        gw = _grid(mode, x.shape[-1], targets[1])
    except ValueError:
        raise ctx.unsupported(f"sampling_mode {mode!r}") from None
    return _bilinear(x, gh, gw)


# -------------------------------------------------------------------------- resample
def _to_pixels(u: np.ndarray, size: int, coord_mode: str, align: bool) -> np.ndarray:
    if coord_mode == "unnormalized":
        return u
    if coord_mode == "normalized_minus_one_to_one":
        return (u + 1) / 2 * (size - 1) if align else ((u + 1) * size - 1) / 2
    if coord_mode == "normalized_zero_to_one":
        return u * (size - 1) if align else u * size - 0.5
    raise ValueError(coord_mode)


def _reflect(p: np.ndarray, low: float, high: float) -> np.ndarray:
    span = high - low
    if span <= 0:
        return np.zeros_like(p)
    q = np.abs(p - low) % (2 * span)
    return low + np.where(q > span, 2 * span - q, q)


def _fold(p: np.ndarray, size: int, padding: str) -> np.ndarray:
    """Map out-of-image positions into the image for the non-constant padding modes."""
    if padding == "border":
        return np.clip(p, 0, size - 1)
    if padding == "reflection":  # |1 2 3| -> 2 3 2 1 2 3 2 1: mirror at pixel centers
        return np.clip(_reflect(p, 0.0, size - 1.0), 0, size - 1)
    if padding == "symmetric":  # |1 2 3| -> 3 2 1 1 2 3 3 2 1: mirror at pixel edges
        return np.clip(_reflect(p, -0.5, size - 0.5), 0, size - 1)
    return p


@register("resample")
def _resample(ctx: OpContext) -> np.ndarray:
    x = ctx.tensor("x")  # [B, C, H, W]
    coords = ctx.tensor("coordinates").astype(np.float64)  # [B, H2, W2, 2] as (x, y)
    sampling = ctx.scalar("sampling_mode")
    padding = ctx.scalar("padding_mode")
    pad_value = float(ctx.scalar("padding_value", 0.0))
    coord_mode = ctx.scalar("coordinates_mode")
    align = bool(ctx.scalar("align_corners"))
    if sampling not in ("bilinear", "nearest"):
        raise ctx.unsupported(f"sampling_mode {sampling!r}")
    if padding not in ("constant", "border", "reflection", "symmetric"):
        raise ctx.unsupported(f"padding_mode {padding!r}")
    b, c, h, w = x.shape
    try:
        px = _fold(_to_pixels(coords[..., 0], w, coord_mode, align), w, padding)
        py = _fold(_to_pixels(coords[..., 1], h, coord_mode, align), h, padding)
    except ValueError:
        raise ctx.unsupported(f"coordinates_mode {coord_mode!r}") from None
    batch = np.arange(b).reshape(b, 1, 1)

    def tap(yi: np.ndarray, xi: np.ndarray) -> np.ndarray:
        inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
        vals = x[batch, :, np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)]  # [B, H2, W2, C]
        return np.where(inside[..., None], vals, np.float32(pad_value))

    if sampling == "nearest":
        out = tap(np.rint(py).astype(np.int64), np.rint(px).astype(np.int64))
    else:
        x0, y0 = np.floor(px).astype(np.int64), np.floor(py).astype(np.int64)
        fx, fy = (px - x0)[..., None], (py - y0)[..., None]
        out = (
            tap(y0, x0) * (1 - fx) * (1 - fy)
            + tap(y0, x0 + 1) * fx * (1 - fy)
            + tap(y0 + 1, x0) * (1 - fx) * fy
            + tap(y0 + 1, x0 + 1) * fx * fy
        )
    return np.moveaxis(out, -1, 1).astype(np.float32)
